//! The end-to-end harness: a real cdk mint (fake Lightning) and a stand-in upstream in this
//! process, and the built `routstr-node` binary as a child process driven over HTTP.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use reqwest::header::HeaderMap;
use routstr_node::demo::mint::{mint_token, redeem_token, start_test_mint, TestMint, TestMintConfig};
use routstr_node::demo::upstream::{StandInConfig, StandInUpstream};
use routstr_node::ledger::{open_reader, read_totals, Totals};
use routstr_node::wallet::WalletService;
use serde_json::{json, Value};
use tokio::process::{Child, Command};

pub struct Node {
    child: Option<Child>,
    pub url: String,
    pub port: u16,
    env: Vec<(String, String)>,
}

pub struct Harness {
    pub mint: TestMint,
    pub upstream: StandInUpstream,
    pub node: Node,
    pub http: reqwest::Client,
    /// Removed when the test passes (see `ScratchDir`), after the node is stopped.
    pub data_dir: ScratchDir,
    /// Token value this test handed the node that the node should have credited (msat).
    pub paid_in_msat: u64,
    /// What the operator put straight into the node's wallet (`routstr-node wallet receive`).
    pub operator_in_msat: u64,
}

#[derive(Default)]
pub struct Options {
    pub stand_in: StandInConfig,
    pub env: Vec<(&'static str, String)>,
    /// Variables left out of the node's environment (e.g. `UPSTREAM_BASE_URL` for a node
    /// without an upstream of its own).
    pub unset: Vec<&'static str>,
    pub mint_fee_ppk: u64,
    /// The harness mint's fake Lightning: seconds before its invoices pay themselves, and its
    /// quotes' lifetime (`None`: the defaults, at once and hours).
    pub mint_lightning: Option<(u64, u64)>,
}

/// Sends `request` as it is (no client library to normalise its path) and reads the answer
/// until the node closes the connection.
pub async fn raw_http(port: u16, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut answer))
        .await
        .expect("the node answers and closes")
        .expect("read");
    String::from_utf8_lossy(&answer).into_owned()
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("routstr-e2e-{name}-{}-{}", std::process::id(), rand::random::<u32>()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// A test's folder (the node's data, files a test hands the node), removed when the test passes
/// and kept, for a look, when it fails.
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    pub fn new(name: &str) -> ScratchDir {
        ScratchDir(temp_dir(name))
    }
}

impl std::ops::Deref for ScratchDir {
    type Target = std::path::Path;

    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Node {
    /// On a given port (when the node must know its own URL, e.g. for HTTP_URL).
    pub async fn start_on(port: u16, env: Vec<(String, String)>) -> Node {
        let mut node = Node { child: None, url: format!("http://127.0.0.1:{port}"), port, env };
        node.spawn().await;
        node
    }

    async fn spawn(&mut self) {
        let log_dir = self.env.iter().find(|(k, _)| k == "DATA_DIR").map(|(_, v)| PathBuf::from(v)).expect("DATA_DIR");
        std::fs::create_dir_all(&log_dir).expect("data dir");
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(log_dir.join("node.log")).expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_routstr-node"));
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOST", "127.0.0.1")
            .env("PORT", self.port.to_string())
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true);
        self.child = Some(cmd.spawn().expect("spawn routstr-node"));
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = http.get(format!("{}/health", self.url)).send().await {
                if r.status().is_success() {
                    return;
                }
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("routstr-node exited at start: {status}; see {}", log_dir.join("node.log").display());
                }
            }
            assert!(Instant::now() < deadline, "routstr-node did not come up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL: the process dies wherever it is.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// SIGKILL and reap, where nothing can be awaited (a drop).
    fn kill_now(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    /// SIGTERM, then wait for a clean exit.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = child.id() {
                let _ = std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
            }
            let status = tokio::time::timeout(Duration::from_secs(40), child.wait()).await;
            assert!(matches!(status, Ok(Ok(s)) if s.success()), "node did not exit cleanly: {status:?}");
        }
    }

    /// The mints the node trusts (its `CASHU_MINTS`).
    pub fn mints(&self) -> Vec<String> {
        let list = self.env.iter().find(|(k, _)| k == "CASHU_MINTS").map(|(_, v)| v.as_str()).unwrap_or_default();
        list.split(',').map(str::trim).filter(|m| !m.is_empty()).map(str::to_owned).collect()
    }

    /// This node's environment with one variable replaced (to start another node like it).
    pub fn env_with(&self, key: &str, value: &str) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = self.env.iter().filter(|(k, _)| k != key).cloned().collect();
        env.push((key.to_owned(), value.to_owned()));
        env
    }

    /// Sets (or with `None` removes) a variable of the node's environment for its next start.
    pub fn set_env(&mut self, key: &str, value: Option<&str>) {
        self.env.retain(|(k, _)| k != key);
        if let Some(v) = value {
            self.env.push((key.to_owned(), v.to_owned()));
        }
    }

    /// Runs an operator command (`routstr-node wallet …`) with the node's own environment.
    pub async fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_routstr-node"))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .await
            .expect("run routstr-node")
    }

    pub async fn restart(&mut self) {
        self.kill().await;
        self.spawn().await;
    }
}

/// A test that passed leaves nothing behind (each run of the suite left ≈ 40 MB in the temp
/// folder); one that failed keeps its node's folder, with the node's log. The node stops here,
/// before its folder (a field, dropped after this) is removed.
impl Drop for Harness {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            self.node.kill_now();
        }
    }
}

impl Harness {
    pub async fn start(name: &str) -> Harness {
        Harness::start_with(name, Options::default()).await
    }

    pub async fn start_with(name: &str, options: Options) -> Harness {
        let (payment_delay_secs, quote_ttl_secs) = options.mint_lightning.unwrap_or((0, 10_000));
        let mint = start_test_mint(TestMintConfig {
            input_fee_ppk: options.mint_fee_ppk,
            payment_delay_secs,
            quote_ttl_secs,
            ..TestMintConfig::default()
        })
        .await
        .expect("test mint");
        let upstream = StandInUpstream::start(options.stand_in).await.expect("stand-in upstream");
        let data_dir = ScratchDir::new(name);
        let mut env: Vec<(String, String)> = vec![
            ("DATA_DIR".into(), data_dir.display().to_string()),
            ("CASHU_MINTS".into(), mint.url.clone()),
            ("UPSTREAM_BASE_URL".into(), upstream.base_url.clone()),
            ("UPSTREAM_API_KEY".into(), "upstream-secret".into()),
            ("BTC_USD_PRICE".into(), "100000".into()),
            ("UPSTREAM_PROVIDER_FEE".into(), "1.0".into()),
            ("EXCHANGE_FEE".into(), "1.0".into()),
            ("LOG_LEVEL".into(), "info".into()),
            ("LEDGER_SYNC".into(), "normal".into()),
            // Hermetic: no public relays. The Nostr tests turn it on with their own relay.
            ("NOSTR_ENABLED".into(), "false".into()),
            // Every provider in these tests is on loopback.
            ("NOSTR_ALLOW_PRIVATE_HOSTS".into(), "true".into()),
        ];
        // `{PORT}` in a value becomes the node's port (e.g. HTTP_URL=http://127.0.0.1:{PORT}),
        // `{MINT}` this harness's mint.
        let port = free_port();
        for (k, v) in options.env {
            env.retain(|(ek, _)| ek != k);
            env.push((k.to_owned(), v.replace("{PORT}", &port.to_string()).replace("{MINT}", &mint.url)));
        }
        env.retain(|(k, _)| !options.unset.contains(&k.as_str()));
        let node = Node::start_on(port, env).await;
        Harness { mint, upstream, node, http: reqwest::Client::new(), data_dir, paid_in_msat: 0, operator_in_msat: 0 }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.node.url, path)
    }

    /// A fresh token from the test mint (cashuB unless `v3`).
    pub async fn token(&self, sats: u64, v3: bool) -> String {
        mint_token(&self.mint.url, sats, v3).await.expect("mint a token")
    }

    pub async fn redeem(&self, token: &str) -> u64 {
        redeem_token(&self.mint.url, token).await.expect("the token the node gave out is real and unspent")
    }

    /// Buys a key with a new token of `sats`.
    pub async fn key(&mut self, sats: u64) -> String {
        let token = self.token(sats, false).await;
        let resp = self.post("/v1/balance/create", None, &json!({ "initial_balance_token": token })).await;
        assert_eq!(resp.status, 200, "{}", resp.json);
        self.paid_in_msat += sats * 1000;
        assert_eq!(resp.json["balance"], sats * 1000);
        resp.json["api_key"].as_str().expect("api_key").to_owned()
    }

    pub async fn post(&self, path: &str, key: Option<&str>, body: &Value) -> Answer {
        let mut req = self.http.post(self.url(path)).json(body);
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        Answer::from(req.send().await.expect("request")).await
    }

    pub async fn post_with(&self, path: &str, headers: &[(&str, &str)], body: &Value) -> Answer {
        let mut req = self.http.post(self.url(path)).json(body);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        Answer::from(req.send().await.expect("request")).await
    }

    pub async fn get(&self, path: &str, key: Option<&str>) -> Answer {
        let mut req = self.http.get(self.url(path));
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        Answer::from(req.send().await.expect("request")).await
    }

    /// Starts a 10 s stream (200 chunks, 50 ms apart) paid by `key`, for tests that cut it short.
    pub async fn slow_stream(&self, key: &str, body: &Value) -> reqwest::Response {
        self.http
            .post(self.url("/v1/chat/completions"))
            .bearer_auth(key)
            .header("x-stand-in-chunks", "200")
            .header("x-stand-in-delay-ms", "50")
            .json(body)
            .send()
            .await
            .expect("stream request")
    }

    pub async fn balance(&self, key: &str) -> (u64, u64) {
        let info = self.get("/v1/balance/info", Some(key)).await;
        assert_eq!(info.status, 200, "{}", info.json);
        (info.json["balance"].as_u64().unwrap(), info.json["reserved"].as_u64().unwrap())
    }

    pub fn totals(&self) -> Totals {
        let conn = open_reader(&self.data_dir.join("ledger.sqlite")).expect("ledger");
        read_totals(&conn).expect("totals")
    }

    /// The conservation check: every msat paid in is a balance, a charge or a payout, the
    /// wallet's proofs match (net of what remote providers kept), nothing is left reserved or
    /// unsettled, and no secret reached the logs.
    pub async fn assert_conserved(&self) -> Totals {
        // This reads the ledger file from outside the node, which sees a request's charge once
        // its batch has committed (the node answers before that): let the last batch land.
        self.wait_until_settled().await;
        let t = self.totals();
        assert!(t.conserved(), "ledger not conserved: {t:?}");
        assert_eq!(t.open_reservations, 0, "reservations left open: {t:?}");
        assert_eq!(t.reserved_msat, 0, "msat left reserved: {t:?}");
        assert_eq!(t.pending_redemptions, 0, "redemptions left pending: {t:?}");
        assert_eq!(t.remote_open, 0, "remote payments left unsettled: {t:?}");
        assert_eq!(t.operator_open, 0, "operator payouts left unsettled: {t:?}");
        assert_eq!(t.payouts_open, 0, "payouts left unfinished: {t:?}");
        assert_eq!(
            t.credited_msat + t.redemption_fees_msat,
            self.paid_in_msat,
            "credited + mint fees = tokens paid in: {t:?}"
        );
        let wallet = WalletService::open(
            &self.data_dir.join("wallet.sqlite"),
            &self.data_dir.join("wallet.seed"),
            &self.node.mints(),
        )
        .await
        .expect("open the node's wallet");
        let held: u64 = wallet.balances().await.expect("balances").iter().map(|b| b.balance_msat).sum();
        assert_eq!(
            held,
            t.credited_msat + self.operator_in_msat
                - t.paid_out_msat
                - t.payout_fees_msat
                - t.remote_net_msat()
                - t.operator_out_msat(),
            "wallet proofs = credited + operator's deposits - paid out - payout fees - kept by remote providers - operator's Lightning payouts: {t:?}"
        );
        assert!(held >= t.liabilities_msat(), "the wallet must cover users' balances: {held} < {t:?}");
        self.assert_no_secrets_in_logs();
        t
    }

    pub fn assert_no_secrets_in_logs(&self) {
        let log = std::fs::read_to_string(self.data_dir.join("node.log")).unwrap_or_default();
        for needle in ["cashuA", "cashuB", "sk-", "upstream-secret"] {
            assert!(!log.contains(needle), "the node logged a secret ({needle})");
        }
    }

    pub async fn wait_until_settled(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        // Running requests hold reservations in the node's memory, counted by its /metrics (a
        // stopped node runs none).
        while self.running_requests().await.is_some_and(|n| n > 0) {
            assert!(Instant::now() < deadline, "requests kept running");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        loop {
            // The node commits within a few tens of milliseconds of its last job (key holders'
            // charges gather for 3 ms): the file unchanged for far longer than that means the
            // requests answered so far are all on disk. (Reading /metrics above commits them
            // too: its totals are a job that waits for the disk.)
            let before = self.totals();
            tokio::time::sleep(Duration::from_millis(250)).await;
            if self.totals() == before {
                return;
            }
            assert!(Instant::now() < deadline, "the ledger kept changing");
        }
    }

    /// Requests the node is running: `None` when it is stopped, or limits this client's rate.
    async fn running_requests(&self) -> Option<u64> {
        let resp = match self.http.get(self.url("/metrics")).send().await {
            Ok(resp) => resp,
            Err(e) if e.is_connect() => return None,
            Err(e) => panic!("/metrics: {e}"),
        };
        if resp.status() == 429 {
            return None;
        }
        assert_eq!(resp.status(), 200, "/metrics");
        let metrics = resp.text().await.expect("/metrics");
        let open = metrics.lines().find_map(|l| l.strip_prefix("routstr_reservations_open "));
        Some(open.and_then(|n| n.trim().parse().ok()).expect("routstr_reservations_open in /metrics"))
    }
}

pub struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    pub text: String,
    pub json: Value,
}

impl Answer {
    async fn from(resp: reqwest::Response) -> Answer {
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap_or_default();
        let json = serde_json::from_str(&text).unwrap_or(Value::Null);
        Answer { status, headers, text, json }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The JSON of every SSE `data:` line (skipping `[DONE]`).
    pub fn sse_data(&self) -> Vec<Value> {
        self.text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str(d).ok())
            .collect()
    }

    pub fn error_code(&self) -> &str {
        self.json["error"]["code"].as_str().unwrap_or("")
    }
}

pub fn chat(stream: bool) -> Value {
    json!({
        "model": "gpt-test",
        "messages": [{ "role": "user", "content": "hello there world" }],
        "max_tokens": 100,
        "stream": stream,
    })
}
