//! Tor end to end: a private Tor network on loopback (tests/tor/tornet.sh, Debian's `tor`), the
//! built node hosting its onion service with arti, reached by C tor's client through curl
//! `--socks5-hostname`. Paid requests over the onion settle; after a restart in onion-only mode
//! (CLEARNET_LISTEN=false) the address is the same; with TOR_OUTBOUND the node reaches an onion
//! upstream through arti. Discovery health-checks an onion provider through arti (with the onion
//! service alone, and with TOR_OUTBOUND), and with TOR_OUTBOUND the relay pool reaches a relay
//! behind an onion service through the node's SOCKS proxy while a loopback relay stays direct.
//! When the network cannot come up the test fails; it never skips.
#![cfg(feature = "demo")]

#[allow(dead_code)]
#[path = "../e2e/harness.rs"]
mod harness;
mod net;

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nostr_relay_builder::prelude::{LocalRelay, RelayBuilder};
use nostr_sdk::prelude::{Client, Event, EventBuilder, Keys, Kind, Tag};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

use harness::{chat, Harness, Options};
use net::{curl, get_until_ok, TorNet};

// Stand-in prices at 100k USD/BTC, no markup: 1 msat per prompt token, 2 per completion token.
const CHAT_COST_MSAT: u64 = 3 + 8 * 2;
/// How long the onion may take to become reachable (bootstrap, introduction points, descriptor).
const REACH_WITHIN: Duration = Duration::from_secs(300);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn onion_service_serves_paid_requests_and_keeps_its_address() {
    let t0 = Instant::now();
    let net_dir = harness::temp_dir("tornet");
    let net = TorNet::start(&net_dir);
    let socks = net.socks_port();
    // Two Nostr relays: one on loopback, one only reachable behind the C tor onion service.
    let (_loopback_relay, loopback_relay_url, _) = start_relay().await;
    let (_onion_relay, _, onion_relay) = start_relay().await;
    // The C tor onion service's target: WebSocket upgrades go to the onion relay, `/v1/info` gets
    // a static JSON answer (a provider's health check), everything else a static answer until
    // the stand-in upstream exists.
    let (forward_to, forwarded) = forward(net.hs_target_port(), onion_relay).await;
    // First the network itself: C tor bootstrapped, and the C tor onion service reachable (so
    // the HSDir ring has settled) before arti looks at it.
    net.wait().await;
    let c_onion = net.c_onion();
    let (_, took) = get_until_ok(socks, &format!("http://{c_onion}/"), REACH_WITHIN).await;
    eprintln!("tor test: network up, C tor onion reachable after {:?} ({took:?} of retries)", t0.elapsed());
    let tor_env = vec![
        ("ONION_SERVICE", "true".to_owned()),
        ("ARTI_CONFIG", net.arti_config().display().to_string()),
        ("LOG_LEVEL", "info,tor_netdir=error,tor_circmgr=error".to_owned()),
    ];
    let mut h_env = tor_env.clone();
    h_env.extend([
        ("NOSTR_ENABLED", "true".to_owned()),
        ("RELAYS", loopback_relay_url.clone()),
        ("NOSTR_HEALTH_SECONDS", "5".to_owned()),
    ]);
    let mut h = Harness::start_with("tor", Options { env: h_env, ..Options::default() }).await;
    // A provider announced at the C tor onion service's URL, on the loopback relay.
    let c_onion_url = format!("http://{c_onion}");
    let provider_a = Keys::generate();
    publish(&loopback_relay_url, announcement(&provider_a, "onion-a", &c_onion_url)).await;
    eprintln!("tor test: network {} (base port {}), node data {}", net_dir.display(), net.base, h.data_dir.display());

    // The address is known as soon as the keys exist, long before it is reachable.
    let info = wait_for(Duration::from_secs(60), || async {
        let info = h.get("/v1/info", None).await.json;
        (info["onion_url"].as_str().unwrap_or("").ends_with(".onion")).then_some(info)
    })
    .await
    .expect("/v1/info shows the onion address");
    let onion_url = info["onion_url"].as_str().unwrap().to_owned();
    let onion = info["tor"]["onion_address"].as_str().expect("tor.onion_address").to_owned();
    assert_eq!(onion_url, format!("http://{onion}"));
    assert_eq!(onion.len(), 56 + ".onion".len(), "a v3 onion address: {onion}");
    assert!(matches!(info["tor"]["state"].as_str(), Some("bootstrapping" | "publishing" | "reachable")), "{info}");

    // /v1/info over the onion: reachable, and nothing reveals the clearnet side.
    let (remote, took) = get_until_ok(socks, &format!("{onion_url}/v1/info"), REACH_WITHIN).await;
    eprintln!("tor test: onion reachable after {:?} ({took:?} of retries)", t0.elapsed());
    assert_eq!(remote.json["onion_url"], onion_url.as_str());
    assert_eq!(remote.json["http_url"], "");
    assert!(!remote.text.contains(&format!("127.0.0.1:{}", h.node.port)), "{}", remote.text);
    // Served over the onion, so reachable. arti may report a re-publish in between (this test
    // network's consensus lasts minutes), which the node shows as "publishing" until its next
    // onion stream or arti's next "running": a few more requests are allowed for that.
    let mut info = h.get("/v1/info", None).await.json;
    for _ in 0..3 {
        if info["tor"]["state"] == "reachable" {
            break;
        }
        get_until_ok(socks, &format!("{onion_url}/v1/info"), REACH_WITHIN).await;
        info = h.get("/v1/info", None).await.json;
    }
    assert_eq!(info["tor"]["state"], "reachable", "served over the onion, so reachable: {info}");

    // ONION_SERVICE alone (no TOR_OUTBOUND): the onion provider is health-checked through arti.
    let provider = wait_for(Duration::from_secs(180), || async {
        let v = h.get("/v1/providers", None).await.json;
        healthy(&v, &provider_a)
    })
    .await;
    let Some(provider) = provider else {
        panic!("onion provider never healthy: {}", h.get("/v1/providers", None).await.json);
    };
    assert_eq!(provider["endpoint_url"], c_onion_url.as_str(), "{provider}");
    eprintln!("tor test: onion provider healthy ({}) after {:?}", provider["latency_ms"], t0.elapsed());

    // A paid request per request (X-Cashu) over the onion: charged, change handed back.
    let token = h.token(30, false).await;
    let answer = curl(
        socks,
        "POST",
        &format!("{onion_url}/v1/chat/completions"),
        &[("x-cashu", &token)],
        Some(&chat(false).to_string()),
    )
    .await
    .expect("paid request over the onion");
    assert_eq!(answer.status, 200, "{}", answer.text);
    h.paid_in_msat += 30_000;
    assert_eq!(answer.json["usage"]["cost"]["total_msats"], 1000, "{}", answer.text);
    let change = answer.header("x-cashu").expect("change in X-Cashu").to_owned();
    assert_eq!(h.redeem(&change).await, 29);

    // A key bought over the onion, then used: metered exactly.
    let token = h.token(50, false).await;
    let body = json!({ "initial_balance_token": token }).to_string();
    let created =
        curl(socks, "POST", &format!("{onion_url}/v1/balance/create"), &[], Some(&body)).await.expect("create");
    assert_eq!(created.status, 200, "{}", created.text);
    h.paid_in_msat += 50_000;
    let key = created.json["api_key"].as_str().expect("api_key").to_owned();
    let bearer = format!("Bearer {key}");
    let answer = curl(
        socks,
        "POST",
        &format!("{onion_url}/v1/chat/completions"),
        &[("authorization", &bearer)],
        Some(&chat(false).to_string()),
    )
    .await
    .expect("key request over the onion");
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.header("x-routstr-cost-msats"), Some(CHAT_COST_MSAT.to_string().as_str()));
    assert_eq!(h.balance(&key).await, (50_000 - CHAT_COST_MSAT, 0));
    h.wait_until_settled().await;

    // Restart in onion-only mode: no TCP listener at all, same onion address.
    let port = h.node.port;
    h.node.kill().await;
    let t_restart = Instant::now();
    let mut env: Vec<(String, String)> = vec![
        ("DATA_DIR".into(), h.data_dir.display().to_string()),
        ("CASHU_MINTS".into(), h.mint.url.clone()),
        ("UPSTREAM_BASE_URL".into(), h.upstream.base_url.clone()),
        ("UPSTREAM_API_KEY".into(), "upstream-secret".into()),
        ("BTC_USD_PRICE".into(), "100000".into()),
        ("UPSTREAM_PROVIDER_FEE".into(), "1.0".into()),
        ("EXCHANGE_FEE".into(), "1.0".into()),
        ("LEDGER_SYNC".into(), "normal".into()),
        ("HOST".into(), "127.0.0.1".into()),
        ("PORT".into(), port.to_string()),
        ("CLEARNET_LISTEN".into(), "false".into()),
        ("NOSTR_ENABLED".into(), "false".into()),
        // Onion clients have no address: they are limited per circuit.
        ("RATE_LIMIT_PER_MINUTE".into(), "6".into()),
    ];
    env.extend(tor_env.iter().map(|(k, v)| (k.to_string(), v.clone())));
    let mut child = spawn_node(&h, &env);
    let (remote, _) = get_until_ok(socks, &format!("{onion_url}/v1/info"), REACH_WITHIN).await;
    eprintln!("tor test: onion reachable again {:?} after the restart", t_restart.elapsed());
    assert_eq!(remote.json["onion_url"], onion_url.as_str(), "the same address after a restart");
    assert_eq!(remote.json["tor"]["onion_address"], onion.as_str());
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err(), "CLEARNET_LISTEN=false: nothing listens");

    // The key still pays, over the onion only.
    let answer = curl(
        socks,
        "POST",
        &format!("{onion_url}/v1/chat/completions"),
        &[("authorization", &bearer)],
        Some(&chat(false).to_string()),
    )
    .await
    .expect("key request after the restart");
    assert_eq!(answer.status, 200, "{}", answer.text);
    let balance = curl(socks, "GET", &format!("{onion_url}/v1/balance/info"), &[("authorization", &bearer)], None)
        .await
        .expect("balance over the onion");
    assert_eq!(balance.json["balance"], 50_000 - 2 * CHAT_COST_MSAT, "{}", balance.text);
    // Over one circuit (C tor keeps its circuit to the service), the seventh request in a minute
    // finds the bucket empty.
    let mut statuses = Vec::new();
    for _ in 0..6 {
        let info = curl(socks, "GET", &format!("{onion_url}/v1/info"), &[], None).await.expect("info over the onion");
        statuses.push(info.status);
    }
    assert!(statuses.contains(&429), "a circuit is rate-limited: {statuses:?}");

    // A clean stop (SIGTERM drains the onion side too).
    stop(&mut child).await;

    // TOR_OUTBOUND: the node, as a Tor client, reaches an onion upstream (the C tor onion
    // service of the test network, forwarding to the stand-in upstream).
    *forward_to.lock().unwrap() = Some(h.upstream.addr);
    let mut env: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| {
            !matches!(k.as_str(), "CLEARNET_LISTEN" | "ONION_SERVICE" | "UPSTREAM_BASE_URL" | "NOSTR_ENABLED")
        })
        .collect();
    env.push(("TOR_OUTBOUND".into(), "true".into()));
    env.push(("UPSTREAM_BASE_URL".into(), format!("http://{c_onion}/v1")));
    // Relays: the one behind the onion (through the SOCKS proxy and arti) and the loopback one
    // (direct). A second onion provider is announced only on the onion relay.
    env.push(("NOSTR_ENABLED".into(), "true".into()));
    env.push(("RELAYS".into(), format!("ws://{c_onion},{loopback_relay_url}")));
    env.push(("NOSTR_HEALTH_SECONDS".into(), "5".into()));
    let provider_b = Keys::generate();
    publish(&format!("ws://{onion_relay}"), announcement(&provider_b, "onion-b", &c_onion_url)).await;
    let t_outbound = Instant::now();
    let mut child = spawn_node(&h, &env);
    let node_url = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let models = wait_for(REACH_WITHIN, || async {
        let r = http.get(format!("{node_url}/v1/models")).send().await.ok()?;
        let v: Value = r.json().await.ok()?;
        (v["data"].as_array().is_some_and(|d| !d.is_empty())).then_some(v)
    })
    .await;
    assert!(
        models.is_some(),
        "the node never listed the onion upstream's models (see {}/node.log)",
        h.data_dir.display()
    );
    eprintln!("tor test: onion upstream listed {:?} after the outbound start", t_outbound.elapsed());
    let answer = http
        .post(format!("{node_url}/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&chat(false))
        .send()
        .await
        .expect("chat through the onion upstream");
    assert_eq!(answer.status(), 200);
    let answer: Value = answer.json().await.unwrap();
    assert_eq!(answer["usage"]["cost"]["total_msats"], CHAT_COST_MSAT, "{answer}");
    assert!(forwarded.load(Ordering::SeqCst) > 0, "the upstream was reached through the onion service");
    let seen = h.upstream.last_request().expect("the stand-in saw the request");
    assert_eq!(seen.header("host"), Some(c_onion.as_str()), "addressed to the onion");

    // Discovery with TOR_OUTBOUND: provider B, only on the relay behind the onion, proves the
    // relay pool went through Tor; provider A, only on the loopback relay, that loopback stayed
    // reachable (direct). Both onion providers healthy through arti.
    let providers = wait_for(Duration::from_secs(180), || async {
        let r = http.get(format!("{node_url}/v1/providers")).send().await.ok()?;
        let v: Value = r.json().await.ok()?;
        (healthy(&v, &provider_a).is_some() && healthy(&v, &provider_b).is_some()).then_some(v)
    })
    .await;
    assert!(
        providers.is_some(),
        "providers A (loopback relay) and B (onion relay) not both healthy through Tor (see {}/node.log)",
        h.data_dir.display()
    );
    eprintln!("tor test: relays and onion providers through Tor after {:?}", t_outbound.elapsed());
    stop(&mut child).await;

    // The books balance.
    h.assert_conserved().await;
    eprintln!("tor test: done in {:?}", t0.elapsed());
}

type ForwardTo = Arc<Mutex<Option<SocketAddr>>>;

/// Serves 127.0.0.1:`port` (where the C tor onion service sends its port 80): WebSocket
/// upgrades go to `relay`; `GET /v1/info` and, while the target is unset, anything else get a
/// static JSON object; the rest is forwarded to the target, counting forwarded connections.
async fn forward(port: u16, relay: SocketAddr) -> (ForwardTo, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.expect("bind the onion target port");
    let to: ForwardTo = Arc::default();
    let count = Arc::new(AtomicUsize::new(0));
    let (target, seen) = (to.clone(), count.clone());
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let (target, seen) = (target.clone(), seen.clone());
            tokio::spawn(async move {
                // The request head (one HTTP/1.1 request per connection through the node's proxy).
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
                    match inbound.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let lower = String::from_utf8_lossy(&head).to_ascii_lowercase();
                let to = if lower.contains("upgrade: websocket") {
                    Some(relay)
                } else if lower.starts_with("get /v1/info ") {
                    None
                } else {
                    *target.lock().unwrap()
                };
                let Some(to) = to else {
                    let body = r#"{"name":"c tor onion service"}"#;
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = inbound.write_all(answer.as_bytes()).await;
                    return;
                };
                if to != relay {
                    seen.fetch_add(1, Ordering::SeqCst);
                }
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await {
                    if outbound.write_all(&head).await.is_ok() {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                }
            });
        }
    });
    (to, count)
}

/// A Nostr relay in process on loopback: the relay (keep it), its URL and address.
async fn start_relay() -> (LocalRelay, String, SocketAddr) {
    let relay = LocalRelay::new(RelayBuilder::default());
    relay.run().await.expect("relay runs");
    let url = relay.url().await.to_string().trim_end_matches('/').to_owned();
    let addr = url.trim_start_matches("ws://").parse().expect("relay address");
    (relay, url, addr)
}

/// A provider's announcement (kind 38421) at `url`.
fn announcement(keys: &Keys, d: &str, url: &str) -> Event {
    EventBuilder::new(Kind::from(38421), json!({ "name": d, "about": "" }).to_string())
        .tags([
            Tag::parse(["d", d]).unwrap(),
            Tag::parse(["u", url]).unwrap(),
            Tag::parse(["version", "9.9.9"]).unwrap(),
        ])
        .sign_with_keys(keys)
        .unwrap()
}

async fn publish(relay_url: &str, event: Event) {
    let client = Client::default();
    client.add_relay(relay_url).await.expect("relay url");
    client.connect().await;
    client.wait_for_connection(Duration::from_secs(5)).await;
    client.send_event(&event).await.expect("publish the announcement");
    client.shutdown().await;
}

/// The provider announced by `keys` in a `/v1/providers` answer, if healthy with a latency.
fn healthy(providers: &Value, keys: &Keys) -> Option<Value> {
    let pubkey = keys.public_key().to_hex();
    let p = providers["providers"].as_array()?.iter().find(|p| p["pubkey"] == pubkey.as_str())?;
    (p["health"] == "ok" && p["latency_ms"].as_u64().is_some()).then(|| p.clone())
}

fn spawn_node(h: &Harness, env: &[(String, String)]) -> Child {
    let log =
        std::fs::OpenOptions::new().create(true).append(true).open(h.data_dir.join("node.log")).expect("node log");
    Command::new(env!("CARGO_BIN_EXE_routstr-node"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("spawn routstr-node")
}

async fn stop(child: &mut Child) {
    let pid = child.id().expect("node pid");
    let _ = std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
    let status = tokio::time::timeout(Duration::from_secs(40), child.wait()).await;
    assert!(matches!(status, Ok(Ok(s)) if s.success()), "node did not exit cleanly: {status:?}");
}

async fn wait_for<F, Fut>(within: Duration, mut probe: F) -> Option<Value>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<Value>>,
{
    let start = Instant::now();
    while start.elapsed() < within {
        if let Some(v) = probe().await {
            return Some(v);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    None
}
