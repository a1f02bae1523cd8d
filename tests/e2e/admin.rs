//! The operator's side: admin API (every route, and its refusals), `/metrics` parsed strictly,
//! the generated password, and the dashboard in a real headless Chromium.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Stdio;
use std::time::{Duration, Instant};

use base64::Engine as _;
use reqwest::header::{CONTENT_TYPE, COOKIE, SET_COOKIE};
use serde_json::{json, Value};

use crate::harness::{chat, Answer, Harness, Options};

const PASSWORD: &str = "correct horse battery staple";

fn admin_env(extra: &[(&'static str, &str)]) -> Options {
    let mut env = vec![("ADMIN_PASSWORD", PASSWORD.to_owned())];
    env.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
    Options { env, ..Options::default() }
}

/// An admin client: the session cookie the login set, sent back on every call.
struct Admin {
    http: reqwest::Client,
    base: String,
    cookie: Option<String>,
}

impl Admin {
    fn new(h: &Harness) -> Self {
        Admin { http: h.http.clone(), base: h.node.url.clone(), cookie: None }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Answer {
        let req = match &self.cookie {
            Some(c) => req.header(COOKIE, c),
            None => req,
        };
        answer(req.send().await.expect("request")).await
    }

    async fn get(&self, path: &str) -> Answer {
        self.send(self.http.get(self.url(path))).await
    }

    async fn post(&self, path: &str, body: &Value) -> Answer {
        self.send(self.http.post(self.url(path)).json(body)).await
    }

    async fn delete(&self, path: &str) -> Answer {
        self.send(self.http.delete(self.url(path)).json(&json!({}))).await
    }

    async fn login(&mut self, password: &str) -> Answer {
        let resp = self.http.post(self.url("/admin/api/login")).json(&json!({ "password": password })).send().await;
        let resp = resp.expect("login");
        if let Some(set) = resp.headers().get(SET_COOKIE).and_then(|v| v.to_str().ok()) {
            assert!(set.contains("HttpOnly") && set.contains("SameSite=Strict"), "{set}");
            self.cookie = set.split(';').next().map(str::to_owned);
        }
        answer(resp).await
    }
}

async fn answer(resp: reqwest::Response) -> Answer {
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap_or_default();
    let json = serde_json::from_str(&text).unwrap_or(Value::Null);
    Answer { status, headers, text, json }
}

async fn wallet_held(h: &Harness) -> u64 {
    let wallet = routstr_node::wallet::WalletService::open(
        &h.data_dir.join("wallet.sqlite"),
        &h.data_dir.join("wallet.seed"),
        std::slice::from_ref(&h.mint.url),
    )
    .await
    .expect("wallet");
    wallet.balances().await.expect("balances").iter().map(|b| b.balance_msat).sum()
}

#[tokio::test]
async fn admin_api_every_route_and_refusals() {
    let mut h = Harness::start_with(
        "admin-api",
        admin_env(&[("ADMIN_LOGIN_ATTEMPTS_PER_MINUTE", "4"), ("NAME", "admin-test")]),
    )
    .await;
    let mut admin = Admin::new(&h);

    // The page itself is public (it shows the login); its policy allows nothing from elsewhere.
    let page = admin.get("/admin").await;
    assert_eq!(page.status, 200);
    assert!(page.text.contains("login-form"));
    assert!(page.header("content-security-policy").unwrap().contains("default-src 'self'"));
    assert!(!page.text.contains("http://") && !page.text.contains("https://"), "no third-party assets");
    assert_eq!(admin.get("/admin/app.js").await.status, 200);
    assert_eq!(admin.get("/admin/app.css").await.status, 200);

    // No session: every route refuses.
    assert_eq!(admin.get("/admin/api/session").await.json["authenticated"], false);
    for path in [
        "overview",
        "wallet",
        "keys",
        "transactions",
        "upstreams",
        "models",
        "nostr",
        "tor",
        "settings",
        "requests",
        "logs?request_id=x",
    ] {
        assert_eq!(admin.get(&format!("/admin/api/{path}")).await.status, 401, "{path}");
    }
    assert_eq!(admin.post("/admin/api/withdraw", &json!({ "amount_sat": 1 })).await.status, 401);
    let forged = admin.send(h.http.get(h.url("/admin/api/overview")).header(COOKIE, "routstr_admin=00ff")).await;
    assert_eq!(forged.status, 401);

    // Wrong password (attempt 1), not JSON (refused before counting), then the right one (2).
    assert_eq!(admin.login("wrong password").await.status, 401);
    assert!(admin.cookie.is_none());
    let form = h.http.post(h.url("/admin/api/login")).body("password=x").send().await.unwrap();
    assert_eq!(form.status(), 400);
    let cross = h
        .http
        .post(h.url("/admin/api/login"))
        .header("origin", "https://evil.example")
        .json(&json!({ "password": PASSWORD }))
        .send()
        .await
        .unwrap();
    assert_eq!(cross.status(), 409, "cross-origin POST refused");
    let ok = admin.login(PASSWORD).await;
    assert_eq!(ok.status, 200, "{}", ok.text);
    assert!(admin.cookie.is_some());
    assert_eq!(admin.get("/admin/api/session").await.json["authenticated"], true);

    // A paid request, then the money as the operator sees it.
    let key = h.key(200).await;
    let paid = h.post("/v1/chat/completions", Some(&key), &chat(false)).await;
    assert_eq!(paid.status, 200, "{}", paid.text);
    let cost: u64 = paid.header("x-routstr-cost-msats").unwrap().parse().unwrap();
    let request_id = paid.header("x-routstr-request-id").unwrap().to_owned();
    h.wait_until_settled().await;

    let o = admin.get("/admin/api/overview").await;
    assert_eq!(o.status, 200, "{}", o.text);
    assert_eq!(o.json["node"]["name"], "admin-test");
    assert_eq!(o.json["money"]["wallet_msat"], 200_000);
    assert_eq!(o.json["money"]["user_balances_msat"], 200_000 - cost);
    assert_eq!(o.json["money"]["earnings_msat"], cost);
    assert_eq!(o.json["requests_since_start"], 1);
    let buckets = o.json["usage"]["buckets"].as_array().unwrap();
    assert_eq!(buckets.len(), 1);
    assert_eq!((buckets[0]["model"].as_str(), buckets[0]["charged_msat"].as_u64()), (Some("gpt-test"), Some(cost)));

    let w = admin.get("/admin/api/wallet").await;
    assert_eq!(
        w.json["mints"][0]["mint_url"].as_str().unwrap().trim_end_matches('/'),
        h.mint.url.trim_end_matches('/')
    );
    assert_eq!(w.json["earnings_msat"], cost);

    // Keys: listed by hash, searchable by prefix, with their requests.
    let keys = admin.get("/admin/api/keys").await;
    assert_eq!(keys.json["total"], 1);
    let k = &keys.json["keys"][0];
    let hash = k["key_hash"].as_str().unwrap().to_owned();
    assert_eq!(hash, routstr_node::payment::hash_api_key(&key));
    assert_eq!((k["balance_msat"].as_u64(), k["requests"].as_u64()), (Some(200_000 - cost), Some(1)));
    assert_eq!(admin.get(&format!("/admin/api/keys?q={}", &hash[..6])).await.json["total"], 1);
    let other = if hash.starts_with('0') { "1" } else { "0" };
    assert_eq!(admin.get(&format!("/admin/api/keys?q={other}{}", &hash[1..6])).await.json["total"], 0);
    assert_eq!(admin.get("/admin/api/keys?q=zz'").await.status, 400);
    let detail = admin.get(&format!("/admin/api/keys/{hash}")).await;
    assert_eq!(detail.json["requests"][0]["request_id"], request_id.as_str());
    assert_eq!(admin.get("/admin/api/keys/ffff").await.status, 404);

    // The transaction ledger: money in and the charge, never a token.
    let tx = admin.get("/admin/api/transactions").await;
    let kinds: BTreeSet<&str> =
        tx.json["transactions"].as_array().unwrap().iter().filter_map(|t| t["kind"].as_str()).collect();
    assert_eq!(kinds, BTreeSet::from(["charge", "redemption"]));
    assert!(!tx.text.contains("cashu"), "no token in the history");

    // Logs by request id: the request, its ledger record.
    let log = admin.get(&format!("/admin/api/logs?request_id={request_id}")).await;
    assert_eq!(log.json["request"]["status"], 200);
    assert_eq!(log.json["request"]["model"], "gpt-test");
    assert_eq!(log.json["ledger"]["reservation"]["charged_msat"], cost);
    assert_eq!(admin.get("/admin/api/logs").await.status, 400);
    let recent = admin.get("/admin/api/requests").await;
    assert_eq!(recent.json["requests"][0]["request_id"], request_id.as_str());

    // Upstreams, models, Nostr, Tor, settings: no secret among them.
    let up = admin.get("/admin/api/upstreams").await;
    assert_eq!(up.json["upstreams"][0]["name"], "default");
    assert_eq!(up.json["upstreams"][0]["has_api_key"], true);
    let models = admin.get("/admin/api/models").await;
    assert!(models.json["data"].as_array().unwrap().iter().any(|m| m["id"] == "gpt-test"));
    let nostr = admin.get("/admin/api/nostr").await;
    assert!(nostr.json["npub"].as_str().unwrap().starts_with("npub1"));
    assert_eq!(nostr.json["enabled"], false);
    let tor = admin.get("/admin/api/tor").await;
    assert_eq!((tor.json["onion_service"].as_bool(), tor.json["status"].is_null()), (Some(false), true));
    let settings = admin.get("/admin/api/settings").await;
    let names: Vec<&str> =
        settings.json["settings"].as_array().unwrap().iter().filter_map(|s| s["name"].as_str()).collect();
    assert!(names.contains(&"UPSTREAM_API_KEY") && names.contains(&"ADMIN_PASSWORD"), "{names:?}");
    for a in [&up, &models, &nostr, &tor, &settings] {
        assert!(!a.text.contains("upstream-secret") && !a.text.contains(PASSWORD), "a secret in {}", a.text);
    }

    // Withdraw: refused beyond earnings (earnings are msat here), then with operator money in.
    let too_much = admin.post("/admin/api/withdraw", &json!({ "amount_sat": 1 })).await;
    assert_eq!(too_much.status, 409, "{}", too_much.text);
    assert!(too_much.text.contains("earnings"));
    assert_eq!(admin.post("/admin/api/withdraw", &json!({ "amount_sat": 0 })).await.status, 400);
    let deposit = h.token(10, false).await;
    let out = h.node.cli(&["wallet", "receive", &deposit]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let taken = admin.post("/admin/api/withdraw", &json!({ "amount_sat": 10 })).await;
    assert_eq!(taken.status, 200, "{}", taken.text);
    assert_eq!(h.redeem(taken.json["token"].as_str().unwrap()).await, 10);
    let w = admin.get("/admin/api/wallet").await;
    assert_eq!(w.json["earnings_msat"], cost, "only the deposit left");
    assert_eq!(admin.post("/admin/api/withdraw", &json!({ "amount_sat": 1 })).await.status, 409);

    // Adjust: a credit beyond earnings is refused; a debit, then a credit within earnings.
    // A path without a key in it is no route (it used to panic the connection).
    for path in ["/admin/api/keys/adjust", "/admin/api/keys/revoke", "/admin/api/models/price"] {
        let none = admin.post(path, &json!({ "delta_msat": 1 })).await;
        assert!(matches!(none.status, 404 | 405) && none.json["error"].is_object(), "{path}: {}", none.text);
    }
    let url = format!("/admin/api/keys/{hash}/adjust");
    assert_eq!(admin.post(&url, &json!({ "delta_msat": cost as i64 + 1 })).await.status, 409);
    assert_eq!(admin.post(&url, &json!({ "delta_msat": 0 })).await.status, 400);
    let debit = admin.post(&url, &json!({ "delta_msat": -1000, "note": "support" })).await;
    assert_eq!(debit.status, 200, "{}", debit.text);
    assert_eq!(debit.json["key"]["balance_msat"], 200_000 - cost - 1000);
    let credit = admin.post(&url, &json!({ "delta_msat": 500 })).await;
    assert_eq!(credit.json["key"]["balance_msat"], 200_000 - cost - 500);
    assert_eq!(h.balance(&key).await.0, 200_000 - cost - 500);
    assert_eq!(admin.post("/admin/api/keys/abcd/adjust", &json!({ "delta_msat": -1 })).await.status, 404);
    let too_big_debit = admin.post(&url, &json!({ "delta_msat": -10_000_000 })).await;
    assert_eq!(too_big_debit.status, 402);

    // Revoke: the key cannot pay; restore: it can again.
    let url = format!("/admin/api/keys/{hash}/revoke");
    assert_eq!(admin.post(&url, &json!({})).await.json["key"]["revoked"], true);
    assert_eq!(h.post("/v1/chat/completions", Some(&key), &chat(false)).await.status, 403);
    let topup_token = h.token(3, false).await;
    let topup = h.post("/v1/balance/topup", Some(&key), &json!({ "cashu_token": topup_token })).await;
    assert_eq!((topup.status, topup.error_code()), (403, "key_revoked"), "{}", topup.json);
    assert_eq!(h.redeem(&topup_token).await, 3, "the refused top-up's token was not taken");
    assert_eq!(admin.post(&url, &json!({ "revoked": false })).await.json["key"]["revoked"], false);
    assert_eq!(h.post("/v1/chat/completions", Some(&key), &chat(false)).await.status, 200);
    h.wait_until_settled().await;

    // The books still balance: the credit came out of earnings, the debit went into them.
    let t = h.totals();
    assert!(t.conserved(), "{t:?}");
    let held = wallet_held(&h).await;
    assert_eq!(held, 200_000, "the deposit went out again; users' money stayed");
    assert!(held >= t.liabilities_msat());
    assert_eq!(admin.get("/admin/api/wallet").await.json["earnings_msat"], held - t.liabilities_msat());

    // Not loopback as far as the admin side is concerned: behind a proxy, or any other path.
    let proxied = admin.send(h.http.get(h.url("/admin/api/overview")).header("x-forwarded-for", "203.0.113.9")).await;
    assert_eq!(proxied.status, 404);
    assert_eq!(admin.get("/admin/api/nothing").await.status, 404);
    assert_eq!(admin.get("/admin/api/withdraw").await.status, 405);

    // Sessions survive a restart; logout ends one.
    h.node.restart().await;
    assert_eq!(admin.get("/admin/api/session").await.json["authenticated"], true);
    assert_eq!(admin.post("/admin/api/logout", &json!({})).await.status, 200);
    assert_eq!(admin.get("/admin/api/overview").await.status, 401);

    // Rate limit (4 a minute; the restart reset the counter): 3 wrong, 1 right, then even the
    // right password is refused.
    for _ in 0..3 {
        assert_eq!(admin.login("nope").await.status, 401);
    }
    assert_eq!(admin.login(PASSWORD).await.status, 200);
    let limited = admin.login(PASSWORD).await;
    assert_eq!(limited.status, 429, "{}", limited.text);
    assert!(limited.header("retry-after").is_some());

    h.assert_no_secrets_in_logs();
    let log = std::fs::read_to_string(h.data_dir.join("node.log")).unwrap_or_default();
    assert!(
        !log.contains(PASSWORD)
            && !log.contains(admin.cookie.as_deref().unwrap_or("-").trim_start_matches("routstr_admin="))
    );
    let stored = std::fs::read_to_string(h.data_dir.join("admin-password")).unwrap();
    assert!(stored.starts_with("$argon2id$") && !stored.contains(PASSWORD));
}

#[tokio::test]
async fn generated_password_is_printed_once() {
    let mut h = Harness::start("admin-generated").await;
    let log = std::fs::read_to_string(h.data_dir.join("node.log")).unwrap();
    let line = log.lines().find(|l| l.contains("admin password (shown once")).expect("the password is printed");
    let password = line.rsplit(' ').next().unwrap().to_owned();
    assert_eq!(password.len(), 20);
    let mut admin = Admin::new(&h);
    assert_eq!(admin.login(&password).await.status, 200);
    h.node.restart().await;
    let log = std::fs::read_to_string(h.data_dir.join("node.log")).unwrap();
    assert_eq!(log.matches("admin password (shown once").count(), 1, "printed once, not at every start");
    let mut admin = Admin::new(&h);
    assert_eq!(admin.login(&password).await.status, 200, "the same password after a restart");
}

/// A strict reader of the Prometheus text format (0.0.4): every sample belongs to a family
/// declared by `# TYPE` before it, names and labels are well formed, values are numbers,
/// histograms are cumulative and end in `+Inf` = `_count`.
fn parse_prometheus(text: &str) -> BTreeMap<String, f64> {
    fn valid_name(n: &str) -> bool {
        let mut chars = n.chars();
        chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    }
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut samples = BTreeMap::new();
    assert!(text.ends_with('\n'), "ends with a newline");
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (kind, name, value) = (parts.next().unwrap(), parts.next().unwrap(), parts.next().unwrap_or(""));
            assert!(valid_name(name), "{line}");
            match kind {
                "HELP" => assert!(!value.is_empty(), "{line}"),
                "TYPE" => {
                    assert!(["counter", "gauge", "histogram", "summary", "untyped"].contains(&value), "{line}");
                    assert!(types.insert(name.to_owned(), value.to_owned()).is_none(), "family declared twice: {name}");
                }
                _ => panic!("unknown comment: {line}"),
            }
            continue;
        }
        assert!(!line.is_empty(), "no blank lines");
        let (series, value) = line.rsplit_once(' ').expect("series and value");
        let v: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("value in {line}")),
        };
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (n, Some(l.strip_suffix('}').unwrap_or_else(|| panic!("labels end with }}: {line}")))),
            None => (series, None),
        };
        assert!(valid_name(name), "{line}");
        if let Some(labels) = labels {
            // name="value" pairs, comma separated, values escaped.
            let mut rest = labels;
            while !rest.is_empty() {
                let (lname, after) = rest.split_once("=\"").unwrap_or_else(|| panic!("label in {line}"));
                assert!(valid_name(lname), "{line}");
                let mut end = None;
                let mut escaped = false;
                for (i, c) in after.char_indices() {
                    match (escaped, c) {
                        (true, '\\' | '"' | 'n') => escaped = false,
                        (true, _) => panic!("bad escape in {line}"),
                        (false, '\\') => escaped = true,
                        (false, '"') => {
                            end = Some(i);
                            break;
                        }
                        (false, '\n') => panic!("raw newline"),
                        _ => {}
                    }
                }
                let end = end.unwrap_or_else(|| panic!("unterminated label in {line}"));
                rest = after[end + 1..].strip_prefix(',').unwrap_or(&after[end + 1..]);
            }
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| types.get(*f).is_some_and(|t| t == "histogram")))
            .unwrap_or(name);
        let kind = types.get(family).unwrap_or_else(|| panic!("sample before its # TYPE: {line}"));
        if kind == "counter" {
            assert!(name.ends_with("_total"), "counters end in _total: {name}");
            assert!(v >= 0.0);
        }
        assert!(samples.insert(series.to_owned(), v).is_none(), "duplicate series {series}");
    }
    // Histograms: cumulative buckets, +Inf equals _count.
    for (family, _) in types.iter().filter(|(_, t)| *t == "histogram") {
        let buckets: Vec<(f64, f64)> = samples
            .iter()
            .filter_map(|(s, v)| {
                let le = s.strip_prefix(&format!("{family}_bucket{{le=\""))?.strip_suffix("\"}")?;
                Some((if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap() }, *v))
            })
            .collect();
        let mut sorted = buckets.clone();
        sorted.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
        assert!(sorted.windows(2).all(|w| w[0].1 <= w[1].1), "{family} buckets are cumulative");
        assert_eq!(sorted.last().map(|b| b.0), Some(f64::INFINITY));
        assert_eq!(sorted.last().map(|b| b.1), samples.get(&format!("{family}_count")).copied());
    }
    samples
}

#[tokio::test]
async fn metrics_in_prometheus_format() {
    let mut h = Harness::start_with("admin-metrics", admin_env(&[])).await;
    let key = h.key(100).await;
    let paid = h.post("/v1/chat/completions", Some(&key), &chat(true)).await;
    assert_eq!(paid.status, 200);
    let unknown = h.post("/v1/chat/completions", Some(&key), &json!({ "model": "nope", "messages": [] })).await;
    assert_eq!(unknown.status, 404);
    h.wait_until_settled().await;

    let resp = h.http.get(h.url("/metrics")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()[CONTENT_TYPE].to_str().unwrap().starts_with("text/plain; version=0.0.4"));
    let text = resp.text().await.unwrap();
    let m = parse_prometheus(&text);
    let cost = 100_000 - h.balance(&key).await.0;
    assert_eq!(m[r#"routstr_requests_total{model="gpt-test",status="200"}"#], 1.0, "{text}");
    assert_eq!(m[r#"routstr_requests_total{model="nope",status="404"}"#], 1.0);
    assert_eq!(m["routstr_request_duration_seconds_count"], 2.0);
    assert_eq!(m[r#"routstr_charged_msat_total{model="gpt-test"}"#], cost as f64);
    assert_eq!(m[r#"routstr_settled_requests_total{model="gpt-test",outcome="charged"}"#], 1.0);
    assert_eq!(m["routstr_reservations_open"], 0.0);
    assert_eq!(m["routstr_user_balances_msat"], (100_000 - cost) as f64);
    assert_eq!(m["routstr_operator_earnings_msat"], cost as f64);
    let wallet: f64 = m.iter().filter(|(k, _)| k.starts_with("routstr_wallet_balance_msat{")).map(|(_, v)| v).sum();
    assert_eq!(wallet, 100_000.0);
    assert_eq!(m[r#"routstr_upstream_up{upstream="default"}"#], 1.0);
    // No secret, no per-user data.
    let hash = routstr_node::payment::hash_api_key(&key);
    for needle in [key.as_str(), &hash[..16], "upstream-secret", PASSWORD, "cashu"] {
        assert!(!text.contains(needle), "/metrics shows {needle}");
    }
    // Not for clients behind a proxy; not POST.
    let proxied = h.http.get(h.url("/metrics")).header("forwarded", "for=203.0.113.9").send().await.unwrap();
    assert_eq!(proxied.status(), 404);
    assert_eq!(h.http.post(h.url("/metrics")).send().await.unwrap().status(), 405);
    h.assert_conserved().await;
}

// --- The dashboard in a real browser (Debian's `chromium` and `chromium-driver`) ---

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

struct WebDriver {
    http: reqwest::Client,
    base: String,
    child: tokio::process::Child,
    /// The driver's and the browser's TMPDIR: chromium leaves a folder there even when its
    /// session is ended, which would otherwise stay in /tmp.
    _tmp: crate::harness::ScratchDir,
}

impl WebDriver {
    async fn start() -> Option<WebDriver> {
        let driver = ["chromedriver", "/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
            .into_iter()
            .find(|p| std::process::Command::new(p).arg("--version").output().is_ok_and(|o| o.status.success()))?;
        let port = crate::harness::free_port();
        let tmp = crate::harness::ScratchDir::new("chromium-tmp");
        let child = tokio::process::Command::new(driver)
            .arg(format!("--port={port}"))
            .env("TMPDIR", &*tmp)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .ok()?;
        let wd = WebDriver { http: reqwest::Client::new(), base: format!("http://127.0.0.1:{port}"), child, _tmp: tmp };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = wd.http.get(format!("{}/status", wd.base)).send().await {
                if r.json::<Value>().await.is_ok_and(|v| v["value"]["ready"] == true) {
                    return Some(wd);
                }
            }
            assert!(Instant::now() < deadline, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let v: Value = req.send().await.expect("webdriver").json().await.expect("webdriver JSON");
        assert!(v["value"].get("error").is_none(), "webdriver {path}: {v}");
        v["value"].clone()
    }

    async fn session(&self, user_data_dir: &std::path::Path) -> String {
        let binary =
            ["/usr/bin/chromium", "/usr/lib/chromium/chromium"].into_iter().find(|p| std::path::Path::new(p).exists());
        let mut options = json!({ "args": [
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--no-first-run", "--window-size=1200,1000",
            format!("--user-data-dir={}", user_data_dir.display()),
        ]});
        if let Some(b) = binary {
            options["binary"] = json!(b);
        }
        let caps =
            json!({ "capabilities": { "alwaysMatch": { "browserName": "chrome", "goog:chromeOptions": options } } });
        let v = self.call(reqwest::Method::POST, "/session", Some(caps)).await;
        v["sessionId"].as_str().expect("session id").to_owned()
    }
}

struct Page<'a> {
    wd: &'a WebDriver,
    id: String,
}

impl Page<'_> {
    async fn go(&self, url: &str) {
        self.wd.call(reqwest::Method::POST, &format!("/session/{}/url", self.id), Some(json!({ "url": url }))).await;
    }

    async fn find(&self, css: &str) -> String {
        let v = self
            .wd
            .call(
                reqwest::Method::POST,
                &format!("/session/{}/element", self.id),
                Some(json!({ "using": "css selector", "value": css })),
            )
            .await;
        v[ELEMENT].as_str().unwrap_or_else(|| panic!("element {css}: {v}")).to_owned()
    }

    async fn type_into(&self, css: &str, text: &str) {
        let e = self.find(css).await;
        let path = format!("/session/{}/element/{e}/value", self.id);
        self.wd.call(reqwest::Method::POST, &path, Some(json!({ "text": text }))).await;
    }

    async fn click(&self, css: &str) {
        let e = self.find(css).await;
        self.wd.call(reqwest::Method::POST, &format!("/session/{}/element/{e}/click", self.id), Some(json!({}))).await;
    }

    async fn text(&self, css: &str) -> String {
        let script = "const e = document.querySelector(arguments[0]); return e && !e.closest('[hidden]') ? e.textContent : null;";
        let path = format!("/session/{}/execute/sync", self.id);
        let v = self.wd.call(reqwest::Method::POST, &path, Some(json!({ "script": script, "args": [css] }))).await;
        v.as_str().unwrap_or_default().to_owned()
    }

    /// Waits until the visible text of `css` contains `needle`.
    async fn wait_text(&self, css: &str, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let t = self.text(css).await;
            if t.contains(needle) {
                return t;
            }
            assert!(Instant::now() < deadline, "{css} never showed {needle:?} (last: {t:?})");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn screenshot(&self) -> Vec<u8> {
        let v = self.wd.call(reqwest::Method::GET, &format!("/session/{}/screenshot", self.id), None).await;
        base64::engine::general_purpose::STANDARD.decode(v.as_str().expect("base64 PNG")).expect("PNG")
    }
}

#[tokio::test]
async fn dashboard_in_headless_chromium() {
    let Some(mut wd) = WebDriver::start().await else {
        assert!(
            std::env::var_os("ROUTSTR_REQUIRE_BROWSER").is_none(),
            "chromedriver not found: apt-get install chromium chromium-driver"
        );
        eprintln!("SKIPPED dashboard_in_headless_chromium: no chromedriver (apt-get install chromium chromium-driver)");
        return;
    };
    let mut h = Harness::start_with("admin-browser", admin_env(&[])).await;
    let key = h.key(300).await;
    let paid = h.post("/v1/chat/completions", Some(&key), &chat(false)).await;
    assert_eq!(paid.status, 200);
    h.wait_until_settled().await;
    let (balance, _) = h.balance(&key).await;
    let cost = 300_000 - balance;
    let hash = routstr_node::payment::hash_api_key(&key);
    let sats = |msat: u64| format!("{}", msat as f64 / 1000.0);

    let profile = crate::harness::ScratchDir::new("chromium-profile");
    let page = Page { id: wd.session(&profile).await, wd: &wd };
    page.go(&h.url("/admin")).await;
    page.wait_text("#login h1", "Operator login").await;
    page.type_into("#password", "not it").await;
    page.click("#login-button").await;
    page.wait_text("#login-error", "Wrong password").await;
    let clear = format!("/session/{}/element/{}/clear", page.id, page.find("#password").await);
    wd.call(reqwest::Method::POST, &clear, Some(json!({}))).await;
    page.type_into("#password", PASSWORD).await;
    page.click("#login-button").await;

    // The overview: wallet and users' balances after the paid request.
    page.wait_text("#wallet-total", "300 sat").await;
    page.wait_text("#user-balances", &sats(balance)).await;
    page.wait_text("#earnings", &sats(cost)).await;
    page.wait_text("#models-usage", "gpt-test").await;
    // The keys: the key's balance.
    page.click("#tab-keys").await;
    let row = page.wait_text("#keys-table tbody", &hash[..16]).await;
    assert!(row.contains(&sats(balance)), "{row}");

    page.click("#tab-overview").await;
    page.wait_text("#wallet-total", "300 sat").await;
    let png = page.screenshot().await;
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG");
    assert!(png.len() > 10_000, "a real picture, not a blank page: {} bytes", png.len());
    let shot = h.data_dir.join("dashboard.png");
    std::fs::write(&shot, &png).unwrap();
    eprintln!("dashboard screenshot: {}", shot.display());

    wd.call(reqwest::Method::DELETE, &format!("/session/{}", page.id), None).await;
    let _ = wd.child.kill().await;
    h.assert_conserved().await;
}

fn chat_for(model: &str) -> Value {
    let mut body = chat(false);
    body["model"] = json!(model);
    body
}

fn cost(a: &Answer) -> u64 {
    assert_eq!(a.status, 200, "{}", a.text);
    a.json["usage"]["cost"]["total_msats"].as_u64().expect("a cost")
}

/// Upstreams added, edited (markup, key), disabled and deleted at runtime, a price override,
/// all without a restart and all kept across one; keys never shown.
#[tokio::test]
async fn upstreams_and_prices_edited_at_runtime() {
    use routstr_node::demo::upstream::{StandInConfig, StandInModel, StandInUpstream};
    const CHAT_COST_MSAT: u64 = 3 + 8 * 2;
    let mut h = Harness::start_with("admin-edit", admin_env(&[])).await;
    let second = StandInUpstream::start(StandInConfig {
        models: vec![StandInModel::chat("second-model", "0.000001", "0.000002")],
        ..StandInConfig::default()
    })
    .await
    .expect("second stand-in");
    let mut admin = Admin::new(&h);

    // No session: every edit refuses.
    let add = json!({
        "name": "second",
        "base_url": second.base_url,
        "api_key": "second-secret",
        "models": ["second-model"],
        "aliases": { "alias-two": "second-model" },
        "markup": 2.0,
    });
    assert_eq!(admin.post("/admin/api/upstreams", &add).await.status, 401);
    assert_eq!(admin.post("/admin/api/upstreams/default", &json!({ "disabled": true })).await.status, 401);
    assert_eq!(admin.delete("/admin/api/upstreams/default").await.status, 401);
    let price = json!({ "pricing": { "prompt": "0.00001", "completion": "0.00002" } });
    assert_eq!(admin.post("/admin/api/models/gpt-test/price", &price).await.status, 401);
    assert_eq!(admin.login(PASSWORD).await.status, 200);
    let key = h.key(100).await;
    let mut texts = Vec::new();

    // Add: the new upstream serves its model and alias at once, with its markup and key.
    assert_ne!(h.post("/v1/chat/completions", Some(&key), &chat_for("second-model")).await.status, 200);
    let bad = admin.post("/admin/api/upstreams", &json!({ "name": "broken", "base_url": "ftp://x" })).await;
    assert_eq!(bad.status, 400, "{}", bad.text);
    let added = admin.post("/admin/api/upstreams", &add).await;
    assert_eq!(added.status, 200, "{}", added.text);
    let list = added.json["upstreams"].as_array().unwrap().clone();
    assert_eq!(list.len(), 2, "the invalid one was not kept: {list:?}");
    assert_eq!((list[0]["name"].as_str(), list[0]["source"].as_str()), (Some("default"), Some("environment")));
    assert_eq!((list[1]["name"].as_str(), list[1]["source"].as_str()), (Some("second"), Some("admin")));
    assert_eq!(list[1]["has_api_key"], true);
    assert_eq!(admin.post("/admin/api/upstreams", &add).await.status, 409, "names are unique");
    texts.push(added.text);
    assert_eq!(cost(&h.post("/v1/chat/completions", Some(&key), &chat_for("second-model")).await), 2 * CHAT_COST_MSAT);
    assert_eq!(cost(&h.post("/v1/chat/completions", Some(&key), &chat_for("alias-two")).await), 2 * CHAT_COST_MSAT);
    let seen = second.last_request().expect("the second upstream served");
    assert_eq!(seen.body["model"], "second-model");
    assert!(seen.headers.iter().any(|(k, v)| k == "authorization" && v == "Bearer second-secret"));

    // Edit: markup and key change without a restart.
    let edited =
        admin.post("/admin/api/upstreams/second", &json!({ "markup": 1.0, "api_key": "rotated-secret" })).await;
    assert_eq!(edited.status, 200, "{}", edited.text);
    texts.push(edited.text);
    assert_eq!(cost(&h.post("/v1/chat/completions", Some(&key), &chat_for("second-model")).await), CHAT_COST_MSAT);
    let seen = second.last_request().unwrap();
    assert!(seen.headers.iter().any(|(k, v)| k == "authorization" && v == "Bearer rotated-secret"));
    assert_eq!(admin.post("/admin/api/upstreams/nope", &json!({ "markup": 1.0 })).await.status, 404);

    // A price override changes what a request costs (10× the upstream's prices).
    assert_eq!(cost(&h.post("/v1/chat/completions", Some(&key), &chat(false)).await), CHAT_COST_MSAT);
    let bad = admin.post("/admin/api/models/gpt-test/price", &json!({ "pricing": { "prompt": "x" } })).await;
    assert_eq!(bad.status, 400);
    let priced = admin.post("/admin/api/models/gpt-test/price", &price).await;
    assert_eq!(priced.status, 200, "{}", priced.text);
    assert_eq!(priced.json["price_overrides"]["gpt-test"]["prompt"], "0.00001");
    assert_eq!(cost(&h.post("/v1/chat/completions", Some(&key), &chat(false)).await), 10 * CHAT_COST_MSAT);

    // Disable and enable; an environment upstream can be disabled, not deleted.
    let off = admin.post("/admin/api/upstreams/second", &json!({ "disabled": true })).await;
    assert_eq!(off.json["upstreams"][1]["disabled"], true);
    assert_ne!(h.post("/v1/chat/completions", Some(&key), &chat_for("second-model")).await.status, 200);
    let off = admin.post("/admin/api/upstreams/default", &json!({ "disabled": true })).await;
    assert_eq!(off.json["upstreams"][0]["source"], "environment+admin");
    assert_ne!(h.post("/v1/chat/completions", Some(&key), &chat(false)).await.status, 200);
    assert_eq!(admin.delete("/admin/api/upstreams/default").await.status, 200, "the admin layer over it goes");
    assert_eq!(admin.delete("/admin/api/upstreams/default").await.status, 409, "the environment's stays");
    assert_eq!(cost(&h.post("/v1/chat/completions", Some(&key), &chat(false)).await), 10 * CHAT_COST_MSAT);

    // The layering is visible in the settings view.
    let settings = admin.get("/admin/api/settings").await;
    let layer = &settings.json["admin_layer"];
    assert!(layer["upstreams_file"].as_str().unwrap().ends_with("admin-upstreams.toml"));
    assert_eq!(layer["price_overrides"], json!(["gpt-test"]));
    assert_eq!(layer["admin_upstreams"][0]["name"], "second");
    texts.push(settings.text);

    // Edits survive a restart.
    h.node.restart().await;
    let log = std::fs::read_to_string(h.data_dir.join("node.log")).unwrap();
    assert!(log.contains("admin layer applied on top of the environment"), "the start log says where from");
    let mut admin = Admin::new(&h);
    assert_eq!(admin.login(PASSWORD).await.status, 200);
    let up = admin.get("/admin/api/upstreams").await;
    assert_eq!(up.json["upstreams"][1]["name"], "second");
    assert_eq!(up.json["upstreams"][1]["disabled"], true);
    assert_eq!(up.json["upstreams"][1]["markup"], 1.0);
    texts.push(up.text);
    assert_eq!(cost(&h.post("/v1/chat/completions", Some(&key), &chat(false)).await), 10 * CHAT_COST_MSAT);
    let on = admin.post("/admin/api/upstreams/second", &json!({ "disabled": false })).await;
    assert_eq!(on.status, 200);
    assert_eq!(cost(&h.post("/v1/chat/completions", Some(&key), &chat_for("second-model")).await), CHAT_COST_MSAT);
    assert!(second.last_request().unwrap().headers.iter().any(|(_, v)| v == "Bearer rotated-secret"));

    // Delete: the override and the upstream go.
    assert_eq!(admin.delete("/admin/api/models/gpt-test/price").await.status, 200);
    assert_eq!(admin.delete("/admin/api/models/gpt-test/price").await.status, 404);
    assert_eq!(cost(&h.post("/v1/chat/completions", Some(&key), &chat(false)).await), CHAT_COST_MSAT);
    let gone = admin.delete("/admin/api/upstreams/second").await;
    assert_eq!(gone.status, 200, "{}", gone.text);
    assert_eq!(gone.json["upstreams"].as_array().unwrap().len(), 1);
    assert_ne!(h.post("/v1/chat/completions", Some(&key), &chat_for("second-model")).await.status, 200);
    texts.push(admin.get("/admin/api/models").await.text);
    for t in &texts {
        assert!(!t.contains("second-secret") && !t.contains("rotated-secret") && !t.contains("upstream-secret"), "{t}");
    }
}

/// The Nostr view shows when the last announcement and price list were signed.
#[tokio::test]
async fn nostr_view_shows_the_last_announcement() {
    let (_relay, relay_url, _) = crate::nostr::start_relay().await;
    let h = Harness::start_with(
        "admin-nostr",
        admin_env(&[
            ("NOSTR_ENABLED", "true"),
            ("RELAYS", &relay_url),
            ("HTTP_URL", "http://127.0.0.1:{PORT}"),
            ("NOSTR_CHECK_SECONDS", "1"),
            ("NOSTR_TIMEOUT_SECONDS", "2"),
        ]),
    )
    .await;
    let mut admin = Admin::new(&h);
    assert_eq!(admin.get("/admin/api/nostr").await.status, 401);
    assert_eq!(admin.login(PASSWORD).await.status, 200);
    let before = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() - 60;
    let view = crate::nostr::eventually("the announcement and price list", 30, || async {
        let v = admin.get("/admin/api/nostr").await.json;
        (v["last_announcement_at"].is_u64() && v["last_price_list_at"].is_u64()).then_some(v)
    })
    .await;
    assert!(view["last_announcement_at"].as_u64().unwrap() >= before);
    assert!(view["announcements_signed"].as_u64().unwrap() >= 1);
    assert_eq!(
        view["relays"][0]["url"].as_str().map(|u| u.trim_end_matches('/')),
        Some(relay_url.trim_end_matches('/'))
    );
}

/// Records past `LEDGER_RETENTION_DAYS` are folded into daily totals when the node starts: the
/// request's own record goes, and no balance, sum or counter changes.
#[tokio::test]
async fn request_records_past_retention_are_folded_at_start() {
    let mut h = Harness::start_with("admin-retention", admin_env(&[("LEDGER_RETENTION_DAYS", "30")])).await;
    let key = h.key(100).await;
    let mut request_ids = Vec::new();
    for stream in [false, true, false] {
        let paid = h.post("/v1/chat/completions", Some(&key), &chat(stream)).await;
        assert_eq!(paid.status, 200, "{}", paid.text);
        request_ids.push(paid.header("x-routstr-request-id").expect("request id").to_owned());
    }
    h.wait_until_settled().await;
    let metrics = |h: &Harness| {
        let url = h.url("/metrics");
        let http = h.http.clone();
        async move {
            let text = http.get(url).send().await.unwrap().text().await.unwrap();
            parse_prometheus(&text)
                .into_iter()
                .filter(|(k, _)| {
                    k.starts_with("routstr_charged_msat_total") || k.starts_with("routstr_settled_requests_total")
                })
                .collect::<BTreeMap<_, _>>()
        }
    };
    let counters = metrics(&h).await;
    assert_eq!(counters[r#"routstr_settled_requests_total{model="gpt-test",outcome="charged"}"#], 3.0, "{counters:?}");
    let balance = h.balance(&key).await;
    let totals = h.assert_conserved().await;

    // The node stops; its requests now began 40 days ago.
    h.node.stop().await;
    let ledger = rusqlite::Connection::open(h.data_dir.join("ledger.sqlite")).unwrap();
    let aged = ledger.execute("UPDATE reservations SET created_at = created_at - 40 * 86400", []).unwrap();
    assert_eq!(aged, 3);
    drop(ledger);
    h.node.restart().await;

    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let reader = routstr_node::ledger::open_reader(&h.data_dir.join("ledger.sqlite")).unwrap();
        let left: i64 = reader.query_row("SELECT COUNT(*) FROM reservations", [], |r| r.get(0)).unwrap();
        if left == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{left} records past retention still there");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(metrics(&h).await, counters, "per-model counters include the folded records");
    assert_eq!(h.balance(&key).await, balance);
    assert_eq!(h.assert_conserved().await, totals);
    let mut admin = Admin::new(&h);
    assert_eq!(admin.login(PASSWORD).await.status, 200);
    let log = admin.get(&format!("/admin/api/logs?request_id={}", request_ids[0])).await;
    assert!(log.json["ledger"]["reservation"].is_null(), "{}", log.text);
    let node_log = std::fs::read_to_string(h.data_dir.join("node.log")).unwrap();
    assert!(node_log.contains("past the retention period folded"), "the fold is logged");
}
