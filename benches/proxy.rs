//! What the node adds, measured against the same load sent directly to the upstream.
//!
//! `cargo bench --bench proxy` builds the release binary, starts a real Cashu mint (fake
//! Lightning) and a stand-in upstream (instant, but for the below-saturation figure) in this
//! process, starts the node with a file-backed ledger, funds a key with a real token, and drives
//! both with the load generator below (keep-alive HTTP/1.1 connections, one request in flight per
//! connection). The load figures also go through a bare hyper proxy (this program started again
//! with `--bare-proxy`): what any proxy costs here, the floor under the node's figures.
//!
//! Options (after `--`): `--quick` (a seconds-long smoke run; CI runs it as
//! `ROUTSTR_BENCH_QUICK=1 cargo test --bench proxy`, asserting no timing),
//! `--write` (write the table to docs/benchmarks.md, above the analysis), `--seconds N` per measurement,
//! `--ledger-sync full|normal`, `--connections 1,64,1024` (the instant-upstream load figures'
//! connection counts), `--think-ms 40` (the upstream's mean time per answer in the
//! below-saturation figure, which runs at 64 connections after the others), `--own-core` (the
//! node and the bare proxy on one core of their own, this program on the others: a node on a
//! single core, with clients and upstream elsewhere), `--instructions` (instead of timing, the
//! instructions the node and the bare proxy run per request, counted by callgrind: a figure the
//! machine's noise hardly moves, for comparing builds; needs valgrind).
//! `ROUTSTR_BENCH_NODE_ENV="NAME=value,..."` adds environment for the node alone;
//! `ROUTSTR_BENCH_NODE_BIN=path` measures another build of the node.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper::Request;
use hyper_util::rt::TokioIo;
use routstr_node::demo::mint::{mint_token, redeem_token, start_test_mint, TestMintConfig};
use routstr_node::demo::upstream::{StandInConfig, StandInUpstream, ANSWER_DELAY_HEADER};
use tokio::net::TcpStream;

struct Options {
    quick: bool,
    write: bool,
    seconds: f64,
    ledger_sync: String,
    /// Concurrent connections of each load figure.
    connections: Vec<usize>,
    /// How long the upstream takes per answer in the below-saturation figure, in ms.
    think_ms: f64,
    /// `--own-core`: the proxies measured run on a core of their own (see `split_cores`).
    own_core: bool,
    /// `--instructions`: count the proxies' instructions per request under callgrind instead.
    instructions: bool,
}

/// Where the node listens (its `HOST`; valgrind also names its control pipes after it).
const NODE_HOST: &str = "127.0.0.1";

/// Connections of the below-saturation figure (the targets' 64).
const PACED_CONNECTIONS: usize = 64;

fn options() -> Options {
    let args: Vec<String> = std::env::args().collect();
    let value = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    // CI runs `ROUTSTR_BENCH_QUICK=1 cargo test --bench proxy`: a smoke run of the same code.
    let quick = args.iter().any(|a| a == "--quick") || std::env::var_os("ROUTSTR_BENCH_QUICK").is_some();
    let instructions = args.iter().any(|a| a == "--instructions");
    Options {
        quick,
        write: args.iter().any(|a| a == "--write"),
        seconds: value("--seconds").and_then(|s| s.parse().ok()).unwrap_or(if quick { 0.5 } else { 5.0 }),
        ledger_sync: value("--ledger-sync").unwrap_or_else(|| "full".into()),
        // `--connections none`: only the below-saturation figure.
        connections: value("--connections")
            .map(|list| list.split(',').filter_map(|n| n.trim().parse().ok()).filter(|&n| n > 0).collect::<Vec<_>>())
            .filter(|list| !list.is_empty() || value("--connections").as_deref() == Some("none"))
            .unwrap_or_else(|| if instructions { vec![1, 64] } else { vec![1, 64, 1024] }),
        think_ms: value("--think-ms").and_then(|s| s.parse().ok()).filter(|&ms: &f64| ms > 0.0).unwrap_or(40.0),
        own_core: args.iter().any(|a| a == "--own-core"),
        instructions,
    }
}

/// One target of the load: where, and with which headers.
#[derive(Clone)]
struct Target {
    addr: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Bytes,
    /// The process whose CPU time this target's requests are charged with.
    pid: u32,
    /// The upstream's think time, in µs, chosen per request from this range (see `Thinking`).
    think_us: Option<(u64, u64)>,
}

impl Target {
    fn request(&self) -> Request<Full<Bytes>> {
        self.request_thinking(None)
    }

    /// The request, asking the stand-in upstream to wait `think_us` before answering.
    fn request_thinking(&self, think_us: Option<u64>) -> Request<Full<Bytes>> {
        let mut req = Request::post(&self.path).header("host", &self.addr).header("content-type", "application/json");
        for (k, v) in &self.headers {
            req = req.header(k, v);
        }
        if let Some(us) = think_us {
            req = req.header(ANSWER_DELAY_HEADER, us);
        }
        req.body(Full::new(self.body.clone())).expect("request")
    }
}

/// The think times one connection asks for: evenly spread over the range, the same sequence for
/// every target (seeded by the connection's number). Each latency is recorded less its request's
/// think time, so the figures compare what each path adds, without the sampling noise of the
/// think times themselves (with 20–60 ms drawn independently per path, the median of ≈ 7,500
/// latencies moves by ≈ ±0.25 ms between paths by chance alone: as much as the target).
struct Thinking {
    range: (u64, u64),
    state: u64,
}

impl Thinking {
    fn new(range: (u64, u64), connection: usize) -> Thinking {
        Thinking { range, state: 0x9e37_79b9_7f4a_7c15 ^ connection as u64 }
    }

    /// The next think time, in µs (splitmix64).
    fn next_us(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        let (low, high) = self.range;
        low + z % (high - low + 1)
    }
}

async fn try_connect(addr: &str) -> Option<http1::SendRequest<Full<Bytes>>> {
    let stream = TcpStream::connect(addr).await.ok()?;
    stream.set_nodelay(true).ok();
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await.ok()?;
    tokio::spawn(conn);
    Some(sender)
}

async fn connect(addr: &str) -> http1::SendRequest<Full<Bytes>> {
    try_connect(addr).await.expect("connect")
}

/// CPU time (user + system, all threads) a process has used so far, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            // Fields 14 and 15 (utime, stime), counted after the command name's closing parenthesis.
            let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
            let user: f64 = fields.next()?.parse().ok()?;
            let system: f64 = fields.next()?.parse().ok()?;
            Some((user + system) / ticks_per_second)
        })
        .unwrap_or(0.0)
}

/// What one `load` gave: latencies (ns, sorted), requests per second, errors, and the CPU seconds
/// the target's process used meanwhile.
struct Loaded {
    latencies: Vec<u64>,
    rps: f64,
    errors: u64,
    cpu_seconds: f64,
}

/// Every request completed in `duration` over `connections` connections.
async fn load(target: &Target, connections: usize, duration: Duration) -> Loaded {
    let cpu_before = cpu_seconds(target.pid);
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for connection in 0..connections {
        let target = target.clone();
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(4096);
            let mut errors = 0u64;
            let mut thinking = target.think_us.map(|range| Thinking::new(range, connection));
            let Some(mut sender) = try_connect(&target.addr).await else { return (latencies, 1) };
            while !stop.load(Ordering::Relaxed) {
                let think_us = thinking.as_mut().map(Thinking::next_us);
                let started = Instant::now();
                match sender.send_request(target.request_thinking(think_us)).await {
                    Ok(resp) => {
                        let ok = resp.status().is_success();
                        let _ = resp.into_body().collect().await;
                        if ok {
                            let think_ns = think_us.unwrap_or(0) * 1000;
                            latencies.push((started.elapsed().as_nanos() as u64).saturating_sub(think_ns));
                        } else {
                            errors += 1;
                        }
                    }
                    Err(_) => {
                        errors += 1;
                        match try_connect(&target.addr).await {
                            Some(s) => sender = s,
                            None => break,
                        }
                    }
                }
            }
            (latencies, errors)
        }));
    }
    let started = Instant::now();
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await.expect("load task");
        all.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    // What the target does after its last answer (its ledger's last commit and fsync) is its own.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let cpu_seconds = cpu_seconds(target.pid) - cpu_before;
    all.sort_unstable();
    let rps = all.len() as f64 / elapsed;
    Loaded { latencies: all, rps, errors, cpu_seconds }
}

/// Slices of this many alternate between the direct and the node load, so that both see the same
/// conditions on a shared machine (other tenants' load drifts over seconds).
const SLICES: u32 = 5;

/// What one target's load gave.
#[derive(Default)]
struct Measured {
    /// Sorted, in ns.
    latencies: Vec<u64>,
    rps: f64,
    errors: u64,
    cpu_seconds: f64,
}

impl Measured {
    /// CPU time of the target's process per completed request, in µs.
    fn cpu_per_request_us(&self) -> f64 {
        self.cpu_seconds * 1e6 / self.latencies.len().max(1) as f64
    }
}

/// `load` of each target for `duration`, in alternating slices: latencies merged, throughput over
/// the total time.
async fn interleaved<const N: usize>(targets: [&Target; N], connections: usize, duration: Duration) -> [Measured; N] {
    let slice = duration / SLICES;
    let mut out: [Measured; N] = std::array::from_fn(|_| Measured::default());
    for _ in 0..SLICES {
        for (target, out) in targets.iter().zip(out.iter_mut()) {
            let loaded = load(target, connections, slice).await;
            out.latencies.extend(loaded.latencies);
            out.rps += loaded.rps / f64::from(SLICES);
            out.errors += loaded.errors;
            out.cpu_seconds += loaded.cpu_seconds;
        }
    }
    for m in &mut out {
        m.latencies.sort_unstable();
    }
    out
}

/// The latency, throughput and CPU rows of one load figure (direct, bare proxy, node).
fn load_rows(label: &str, latency: &str, [d, b, n]: &[Measured; 3], rows: &mut Vec<Row>, notes: &mut Vec<String>) {
    for (what, p) in [("p50", 0.5), ("p99", 0.99)] {
        rows.push(Row {
            what: format!("{what} {latency}, {label}"),
            direct: percentile(&d.latencies, p),
            bare: Some(percentile(&b.latencies, p)),
            node: percentile(&n.latencies, p),
            unit: "ms",
            difference: true,
        });
    }
    rows.push(Row {
        what: format!("throughput, {label}"),
        direct: d.rps,
        bare: Some(b.rps),
        node: n.rps,
        unit: "req/s",
        difference: true,
    });
    rows.push(Row {
        what: format!("CPU per request, {label}"),
        direct: d.cpu_per_request_us(),
        bare: Some(b.cpu_per_request_us()),
        node: n.cpu_per_request_us(),
        unit: "µs",
        difference: false,
    });
    if d.errors + b.errors + n.errors > 0 {
        notes.push(format!("{label}: {} direct, {} bare proxy and {} node errors", d.errors, b.errors, n.errors));
    }
}

/// The think times of the below-saturation figure: half to one and a half times `think_ms`, in µs.
fn think_range_us(think_ms: f64) -> (u64, u64) {
    ((think_ms * 500.0) as u64, (think_ms * 1500.0) as u64)
}

/// The think time range, for the figure's label (in ms).
fn think_label(think_ms: f64) -> String {
    let (low, high) = think_range_us(think_ms);
    format!("{}–{}", low as f64 / 1000.0, high as f64 / 1000.0)
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1e6
}

/// Time to first byte and mean gap between chunks of one streamed answer, in ms.
async fn stream_timing(target: &Target) -> (f64, f64, usize) {
    let mut sender = connect(&target.addr).await;
    let started = Instant::now();
    let resp = sender.send_request(target.request()).await.expect("stream request");
    let mut body = resp.into_body();
    let mut first = None;
    let mut last = started;
    let mut gaps = Vec::new();
    let mut frames = 0;
    while let Some(frame) = body.frame().await {
        if frame.map(|f| f.is_data()).unwrap_or(false) {
            let now = Instant::now();
            if first.is_none() {
                first = Some(now - started);
            } else {
                gaps.push((now - last).as_secs_f64() * 1e3);
            }
            last = now;
            frames += 1;
        }
    }
    let ttfb = first.map(|d| d.as_secs_f64() * 1e3).unwrap_or(f64::NAN);
    let gap = if gaps.is_empty() { 0.0 } else { gaps.iter().sum::<f64>() / gaps.len() as f64 };
    (ttfb, gap, frames)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

struct Row {
    what: String,
    direct: f64,
    /// Through the bare proxy, for the load figures.
    bare: Option<f64>,
    node: f64,
    unit: &'static str,
    /// Whether `node − direct` means anything (not for CPU time, where the direct column is the
    /// load generator's and the upstream's process).
    difference: bool,
}

impl Row {
    fn line(&self) -> String {
        let ratio = |base: f64| if base > 0.0 { format!("{:.2}×", self.node / base) } else { "–".into() };
        let unit = self.unit;
        let bare = self.bare.map_or("–".into(), |b| format!("{b:.3} {unit}"));
        let difference = if self.difference { format!("{:+.3} {unit}", self.node - self.direct) } else { "–".into() };
        format!(
            "| {} | {:.3} {unit} | {bare} | {:.3} {unit} | {difference} | {} | {} |",
            self.what,
            self.direct,
            self.node,
            ratio(self.direct),
            self.bare.map_or("–".into(), ratio),
        )
    }
}

/// `--help`: the options of the module documentation above.
const USAGE: &str = "\
What the node adds, measured against the same load sent directly to the upstream.

Usage: cargo bench --bench proxy [-- OPTIONS]

Options:
  --quick                 a seconds-long smoke run (also ROUTSTR_BENCH_QUICK=1)
  --write                 write the table to docs/benchmarks.md, above the analysis
  --seconds N             seconds per load figure (default 5)
  --ledger-sync full|normal
                          the node's LEDGER_SYNC (default full)
  --connections 1,64,1024 connection counts of the instant-upstream load figures
                          (none: only the below-saturation figure)
  --think-ms 40           the upstream's mean think time in the below-saturation figure
                          (64 connections; each answer waits 0.5-1.5x this)
  --own-core              the node and the bare proxy on the last core alone, this program
                          (load generator, upstream, mint) on the others, as when clients
                          and upstream are other machines (needs two cores or more)
  --instructions          instead of timing: the instructions each proxy runs per request,
                          under callgrind (needs valgrind; --connections default 1,64)

Environment:
  ROUTSTR_BENCH_NODE_ENV=\"NAME=value,...\"   extra environment for the node alone
  ROUTSTR_BENCH_NODE_BIN=path                another build of the node to measure
";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        print!("{USAGE}");
        return;
    }
    // The floor: this same program, started again as a separate process (see `bare_proxy`).
    if let Some(i) = args.iter().position(|a| a == "--bare-proxy") {
        let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
        runtime.block_on(bare_proxy(
            args.get(i + 1).and_then(|p| p.parse().ok()).expect("--bare-proxy PORT UPSTREAM"),
            args.get(i + 2).cloned().expect("--bare-proxy PORT UPSTREAM"),
        ));
        return;
    }
    let opts = options();
    // Before the runtime starts its threads: they inherit this thread's cores.
    let proxy_core = match opts.own_core.then(split_cores) {
        None => None,
        Some(Some(core)) => Some(core),
        Some(None) => {
            eprintln!("--own-core needs two cores or more that this process may use");
            std::process::exit(2);
        }
    };
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    runtime.block_on(bench(opts, proxy_core));
}

/// `--own-core`: keeps this process off the last of the cores it may use and returns that core,
/// for the proxies measured (`pin_to`). The load generator and the upstream then no longer take
/// the proxy's core from it, as on a deployment where clients and upstream are other machines.
/// `None` with fewer than two cores.
fn split_cores() -> Option<usize> {
    let size = std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: a zeroed cpu_set_t is an empty set; the calls get its true size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, size, &mut set) != 0 {
            return None;
        }
        let cores: Vec<usize> = (0..libc::CPU_SETSIZE as usize).filter(|&c| libc::CPU_ISSET(c, &set)).collect();
        let (&proxy, others) = cores.split_last()?;
        if others.is_empty() {
            return None;
        }
        libc::CPU_CLR(proxy, &mut set);
        (libc::sched_setaffinity(0, size, &set) == 0).then_some(proxy)
    }
}

/// Starts `command`'s process on `core` alone (its runtime then has one worker).
fn pin_to(command: &mut tokio::process::Command, core: Option<usize>) {
    let Some(core) = core else { return };
    // SAFETY: between fork and exec only the async-signal-safe sched_setaffinity system call runs.
    unsafe {
        command.pre_exec(move || {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(core, &mut set);
            match libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) {
                0 => Ok(()),
                _ => Err(std::io::Error::last_os_error()),
            }
        });
    }
}

/// The least any HTTP proxy does: hyper's server in, hyper's pooled client out, bodies passed
/// through, nothing read, checked or written down. Run as its own process with the node's
/// runtime (one worker per core), its figures are the floor under the node's.
async fn bare_proxy(port: u16, upstream: String) {
    use hyper_util::client::legacy::{connect::HttpConnector, Client};
    use hyper_util::rt::TokioExecutor;
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Incoming> = Client::builder(TokioExecutor::new()).build(connector);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.expect("bind the bare proxy");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of file descriptors and the like: pause instead of spinning.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        stream.set_nodelay(true).ok();
        let (client, upstream) = (client.clone(), upstream.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let client = client.clone();
                let (mut parts, body) = req.into_parts();
                let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
                let uri = format!("http://{upstream}{path}").parse();
                async move {
                    parts.uri = uri.map_err(std::io::Error::other)?;
                    client.request(Request::from_parts(parts, body)).await.map_err(std::io::Error::other)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

async fn bench(opts: Options, proxy_core: Option<usize>) {
    let secs = Duration::from_secs_f64(opts.seconds);
    let mint = start_test_mint(TestMintConfig::default()).await.expect("mint");
    let upstream = StandInUpstream::start(StandInConfig::default()).await.expect("stand-in");
    let data_dir: PathBuf = std::env::temp_dir().join(format!("routstr-bench-{}", std::process::id()));
    std::fs::create_dir_all(&data_dir).expect("data dir");
    let port = free_port();
    // Another build of the node can be measured against this one's bare proxy (comparing builds).
    let node_bin =
        std::env::var("ROUTSTR_BENCH_NODE_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_routstr-node").into());
    let mut node = proxy_command(&node_bin, opts.instructions.then_some("node"));
    pin_to(&mut node, proxy_core);
    let mut node = node
        .env_clear()
        .env("HOST", NODE_HOST)
        .env("PORT", port.to_string())
        .env("DATA_DIR", &data_dir)
        .env("CASHU_MINTS", &mint.url)
        .env("UPSTREAM_BASE_URL", &upstream.base_url)
        .env("BTC_USD_PRICE", "100000")
        .env("LEDGER_SYNC", &opts.ledger_sync)
        .env("RATE_LIMIT_PER_MINUTE", "0")
        .env("NOSTR_ENABLED", "false")
        .env("LOG_LEVEL", "warn")
        .envs(extra_node_env())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start the node");
    let pid = node.id().expect("pid");
    let node_addr = format!("{NODE_HOST}:{port}");
    let http = reqwest::Client::new();
    // Under callgrind a process starts ≈ 20× slower.
    let start_timeout = Duration::from_secs(if opts.instructions { 300 } else { 30 });
    let deadline = Instant::now() + start_timeout;
    while http.get(format!("http://{node_addr}/health")).send().await.is_err() {
        assert!(Instant::now() < deadline, "node did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Its port is picked once the node holds its own.
    let bare_port = free_port();
    let this_program = std::env::current_exe().expect("this program");
    let mut bare = proxy_command(&this_program.to_string_lossy(), opts.instructions.then_some("bare"));
    pin_to(&mut bare, proxy_core);
    let mut bare = bare
        .args(["--bare-proxy", &bare_port.to_string(), &upstream.addr.to_string()])
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start the bare proxy");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let idle_rss = rss_kib(pid);

    let token = mint_token(&mint.url, 1_000_000, false).await.expect("fund");
    let created: serde_json::Value = http
        .post(format!("http://{node_addr}/v1/balance/create"))
        .json(&serde_json::json!({ "initial_balance_token": token }))
        .send()
        .await
        .expect("create")
        .json()
        .await
        .expect("create json");
    let key = created["api_key"].as_str().expect("api key").to_owned();

    let body = Bytes::from_static(
        br#"{"model":"gpt-test","messages":[{"role":"user","content":"hello there world"}],"max_tokens":16}"#,
    );
    let upstream_addr = upstream.addr.to_string();
    let bare_addr = format!("127.0.0.1:{bare_port}");
    let deadline = Instant::now() + start_timeout;
    while try_connect(&bare_addr).await.is_none() {
        assert!(Instant::now() < deadline, "the bare proxy did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let direct = Target {
        addr: upstream_addr.clone(),
        path: "/v1/chat/completions".into(),
        headers: vec![("authorization".into(), "Bearer x".into())],
        body: body.clone(),
        pid: std::process::id(),
        think_us: None,
    };
    let via_bare = Target { addr: bare_addr.clone(), pid: bare.id().expect("bare proxy pid"), ..direct.clone() };
    let via_node = Target {
        addr: node_addr.clone(),
        path: "/v1/chat/completions".into(),
        headers: vec![("authorization".into(), format!("Bearer {key}"))],
        body: body.clone(),
        pid,
        think_us: None,
    };

    if opts.instructions {
        count_instructions(&opts, [&via_bare, &via_node]).await;
        let _ = node.kill().await;
        let _ = bare.kill().await;
        let _ = std::fs::remove_dir_all(&data_dir);
        // A killed valgrind leaves its control pipes behind.
        remove_profiles("vgdb-pipe");
        return;
    }

    let mut rows = Vec::new();
    let mut notes = Vec::new();
    for &conns in &opts.connections {
        // Warm up both paths.
        load(&direct, conns, Duration::from_millis(200)).await;
        load(&via_bare, conns, Duration::from_millis(200)).await;
        load(&via_node, conns, Duration::from_millis(200)).await;
        let measured = interleaved([&direct, &via_bare, &via_node], conns, secs).await;
        load_rows(&format!("{conns} conn"), "latency", &measured, &mut rows, &mut notes);
    }

    // Below saturation: 64 connections again, the upstream now thinking about `--think-ms` per
    // answer (≈ 64 ÷ think time requests per second): the latency a client sees added by the
    // proxy itself rather than by queueing for the CPU. Each answer gets its own think time
    // (see `think_range_us`): clients that all wait the same time move in step, in bursts.
    let paced = |t: &Target| Target { think_us: Some(think_range_us(opts.think_ms)), ..t.clone() };
    let (paced_direct, paced_bare, paced_node) = (paced(&direct), paced(&via_bare), paced(&via_node));
    for target in [&paced_direct, &paced_bare, &paced_node] {
        load(target, PACED_CONNECTIONS, Duration::from_millis(200)).await;
    }
    let measured = interleaved([&paced_direct, &paced_bare, &paced_node], PACED_CONNECTIONS, secs).await;
    let label = format!("{PACED_CONNECTIONS} conn, upstream {} ms", think_label(opts.think_ms));
    load_rows(&label, "latency beyond the upstream's think time", &measured, &mut rows, &mut notes);

    // The first request of a new connection (accepted, then answered): what a stream's first
    // byte below includes besides the streaming itself.
    let fresh_runs = if opts.quick { 3 } else { 21 };
    let (mut fd, mut fb, mut fnode) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..fresh_runs {
        fd.push(stream_timing(&direct).await.0);
        fb.push(stream_timing(&via_bare).await.0);
        fnode.push(stream_timing(&via_node).await.0);
    }
    let median_of = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    rows.push(Row {
        what: "first request on a new connection, JSON answer, time to first byte, median".into(),
        direct: median_of(fd),
        bare: Some(median_of(fb)),
        node: median_of(fnode),
        unit: "ms",
        difference: true,
    });

    let streaming_body = Bytes::from_static(br#"{"model":"gpt-test","stream":true,"messages":[{"role":"user","content":"stream please"}],"max_tokens":600}"#);
    let chunks = if opts.quick { "50" } else { "500" };
    let mut d_stream = Target { body: streaming_body.clone(), ..direct.clone() };
    d_stream.headers.push(("x-stand-in-chunks".into(), chunks.into()));
    let mut n_stream = Target { body: streaming_body, ..via_node.clone() };
    n_stream.headers.push(("x-stand-in-chunks".into(), chunks.into()));
    n_stream.headers.push(("x-stand-in-delay-ms".into(), "1".into()));
    d_stream.headers.push(("x-stand-in-delay-ms".into(), "1".into()));
    // The bare proxy passes the same stream through: the floor for a stream's first byte too.
    let b_stream = Target { addr: via_bare.addr.clone(), pid: via_bare.pid, ..d_stream.clone() };
    let runs = if opts.quick { 3 } else { 21 };
    let (mut dt, mut dg, mut nt, mut ng) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut bt, mut bg) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let (t, g, _) = stream_timing(&d_stream).await;
        dt.push(t);
        dg.push(g);
        let (t, g, _) = stream_timing(&b_stream).await;
        bt.push(t);
        bg.push(g);
        let (t, g, frames) = stream_timing(&n_stream).await;
        nt.push(t);
        ng.push(g);
        assert!(frames > 10, "the node streamed chunk by chunk ({frames} frames)");
    }
    rows.push(Row {
        what: format!("stream time to first byte, median ({chunks} chunks, 1 ms apart)"),
        direct: median_of(dt),
        bare: Some(median_of(bt)),
        node: median_of(nt),
        unit: "ms",
        difference: true,
    });
    rows.push(Row {
        what: "stream gap between chunks, median".into(),
        direct: median_of(dg),
        bare: Some(median_of(bg)),
        node: median_of(ng),
        unit: "ms",
        difference: true,
    });

    // X-Cashu: each request redeems a fresh token and pays change; compare to the mint's own swap.
    let xruns = if opts.quick { 3 } else { 20 };
    let mut swap = Vec::new();
    let mut paid = Vec::new();
    for _ in 0..xruns {
        let t = mint_token(&mint.url, 20, false).await.expect("token");
        let started = Instant::now();
        redeem_token(&mint.url, &t).await.expect("swap");
        swap.push(started.elapsed().as_nanos() as u64);
        let t = mint_token(&mint.url, 20, false).await.expect("token");
        let started = Instant::now();
        let resp = http
            .post(format!("http://{node_addr}/v1/chat/completions"))
            .header("x-cashu", t)
            .body(body.clone())
            .header("content-type", "application/json")
            .send()
            .await
            .expect("x-cashu");
        assert!(resp.status().is_success());
        let _ = resp.bytes().await;
        paid.push(started.elapsed().as_nanos() as u64);
    }
    swap.sort_unstable();
    paid.sort_unstable();
    rows.push(Row {
        what: "X-Cashu request vs one mint swap (p50)".into(),
        direct: percentile(&swap, 0.5),
        bare: None,
        node: percentile(&paid, 0.5),
        unit: "ms",
        difference: true,
    });
    notes.push(
        "CPU per request: user + system time of all threads per completed request; the direct column is the \
         benchmark's own process (load generator and upstream), the others the proxy's process alone."
            .into(),
    );
    notes.push(format!(
        "Rows marked \"upstream {} ms\": the upstream takes that long before each answer (spread evenly over \
         the range), so {PACED_CONNECTIONS} connections offer at most ≈ {:.0} requests/s, well below what \
         the machine can serve: the difference to direct is mostly what the proxy adds to each request, not queueing \
         for the CPU. Their latencies are each request's less the think time it asked the upstream for (the same \
         sequence of think times on every path); the upstream sleeps on tokio's timer, which rounds up to its next \
         millisecond, so even direct shows about a millisecond.",
        think_label(opts.think_ms),
        PACED_CONNECTIONS as f64 * 1000.0 / opts.think_ms
    ));
    notes.push("The X-Cashu path makes two mint round trips (swap in, change out); the direct column is one swap by a fresh wallet.".into());

    // Memory with many open streams.
    let open = if opts.quick { 50 } else { 1000 };
    let mut held = Vec::new();
    for _ in 0..open {
        let mut t = n_stream.clone();
        t.headers.retain(|(k, _)| !k.starts_with("x-stand-in"));
        t.headers.push(("x-stand-in-chunks".into(), "600".into()));
        t.headers.push(("x-stand-in-delay-ms".into(), "1000".into()));
        held.push(tokio::spawn(async move {
            let mut sender = connect(&t.addr).await;
            let resp = sender.send_request(t.request()).await.expect("open stream");
            let mut body = resp.into_body();
            let _ = body.frame().await;
            tokio::time::sleep(Duration::from_secs(3600)).await;
            drop(body);
        }));
    }
    tokio::time::sleep(Duration::from_secs(if opts.quick { 1 } else { 3 })).await;
    let busy_rss = rss_kib(pid);
    for h in held {
        h.abort();
    }

    let mut out = String::new();
    // With `--own-core` this process lost the proxies' core from what it may use.
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0) + usize::from(proxy_core.is_some());
    let placement = match proxy_core {
        Some(core) => format!(
            ": the node and the bare proxy on core {core} alone, the load generator, upstream and mint on the others"
        ),
        None => String::new(),
    };
    // The node is built with this program's profile: release under `cargo bench`, debug under the
    // CI's `cargo test --bench proxy`.
    let build = if cfg!(debug_assertions) { "debug" } else { "release" };
    out.push_str(&format!(
        "Measured {} on this machine ({cores} cores{placement}), node {build} build, ledger `LEDGER_SYNC={}`, {} s per \
         load figure (direct, bare proxy and node in {SLICES} alternating slices each).\n\n",
        chrono_free_date(),
        opts.ledger_sync,
        opts.seconds
    ));
    out.push_str(
        "| figure | direct | bare proxy | via node | node − direct | node ÷ direct | node ÷ bare proxy |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for r in &rows {
        out.push_str(&r.line());
        out.push('\n');
    }
    out.push_str(&format!(
        "\nResident memory of the node: {:.1} MB idle, {:.1} MB with {open} open streams.\n",
        idle_rss as f64 / 1024.0,
        busy_rss as f64 / 1024.0
    ));
    for n in &notes {
        out.push_str(&format!("\n- {n}"));
    }
    out.push('\n');
    println!("{out}");
    if opts.write {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/benchmarks.md");
        let doc = std::fs::read_to_string(&path).unwrap_or_default();
        std::fs::write(&path, with_figures(&doc, &out, proxy_core.is_some())).expect("write docs/benchmarks.md");
        eprintln!("wrote {}", path.display());
    }
    let _ = node.kill().await;
    let _ = bare.kill().await;
    let _ = std::fs::remove_dir_all(&data_dir);
}

/// The command that starts a proxy to measure: `program` itself, or with `--instructions`
/// `program` under callgrind, its counts written to target/profile/callgrind.`name`.
fn proxy_command(program: &str, callgrind: Option<&str>) -> tokio::process::Command {
    let Some(name) = callgrind else { return tokio::process::Command::new(program) };
    let dir = profile_dir();
    std::fs::create_dir_all(&dir).expect("target/profile");
    remove_profiles(&format!("callgrind.{name}"));
    // The node's environment is cleared: valgrind is named by its full path.
    let valgrind = which("valgrind").expect("--instructions needs valgrind (apt-get install valgrind)");
    let mut command = tokio::process::Command::new(valgrind);
    // Valgrind names its control pipe after HOST, which the node has as its listen address: the
    // same for every proxy, so that `count_instructions` finds them.
    command.env("HOST", NODE_HOST);
    command.args([
        "--tool=callgrind".into(),
        format!("--callgrind-out-file={}/callgrind.{name}", dir.display()),
        vgdb_prefix(),
        program.into(),
    ]);
    command
}

/// Where `--instructions` leaves its profiles.
fn profile_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/profile")
}

/// Removes the files in `profile_dir` whose names start with `prefix`.
fn remove_profiles(prefix: &str) {
    for file in std::fs::read_dir(profile_dir()).into_iter().flatten().flatten() {
        if file.file_name().to_string_lossy().starts_with(prefix) {
            let _ = std::fs::remove_file(file.path());
        }
    }
}

/// Valgrind's control pipes go next to the profiles, not into /tmp (a killed valgrind leaves
/// them behind).
fn vgdb_prefix() -> String {
    format!("--vgdb-prefix={}/vgdb-pipe", profile_dir().display())
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?).map(|dir| dir.join(program)).find(|p| p.is_file())
}

/// `--instructions`: the instructions (user space, all threads) each proxy runs per request,
/// counted by callgrind over `--seconds` of load at each connection count. Unlike time, the count
/// barely depends on what else the machine does (the node's by ≈ 3 % on a busy machine: its
/// batches and timers follow the clock), so two builds compare to within about a per cent.
/// Callgrind runs a process's threads one at a time, ≈ 50× slower: batching (charges sharing a
/// commit) differs from a real run, and the kernel's part (system calls, thread switches) is not
/// counted. Each measurement's profile stays in target/profile for `callgrind_annotate`.
async fn count_instructions(opts: &Options, targets: [&Target; 2]) {
    let control = which("callgrind_control").expect("callgrind_control (comes with valgrind)");
    let dump = |pid: u32, label: String| {
        let control = control.clone();
        async move {
            let status = tokio::process::Command::new(&control)
                .env("HOST", NODE_HOST)
                .arg(vgdb_prefix())
                .arg(format!("--dump={label}"))
                .arg(pid.to_string())
                .stdout(Stdio::null())
                .status()
                .await
                .expect("callgrind_control");
            assert!(status.success(), "callgrind_control --dump failed for {pid}");
        }
    };
    let dir = profile_dir();
    let seconds = Duration::from_secs_f64(opts.seconds);
    let warm_up = Duration::from_secs_f64(if opts.quick { 0.2 } else { 2.0 });
    println!("| connections | bare proxy, instructions per request | node | node ÷ bare proxy |\n|---|---|---|---|");
    for &conns in &opts.connections {
        let mut per_request = [0.0; 2];
        for (i, target) in targets.iter().enumerate() {
            let name = ["bare", "node"][i];
            load(target, conns, warm_up).await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            dump(target.pid, format!("before-{conns}")).await;
            let loaded = load(target, conns, seconds).await;
            // Under callgrind the ledger's last commit after the last answer takes longer.
            tokio::time::sleep(Duration::from_secs(1)).await;
            dump(target.pid, format!("{conns}-connections")).await;
            let requests = loaded.latencies.len() as f64 + loaded.errors as f64;
            let profile = latest_dump(&dir, name).expect("callgrind's dump");
            per_request[i] = dumped_instructions(&profile) as f64 / requests.max(1.0);
            eprintln!("{name}, {conns} connections: {requests} requests, profile in {}", profile.display());
        }
        println!(
            "| {conns} | {:.0} | {:.0} | {:.2}× |",
            per_request[0],
            per_request[1],
            per_request[1] / per_request[0]
        );
    }
}

/// The last part callgrind dumped for `name`'s process (`callgrind.NAME.N`, numbered from 1).
fn latest_dump(dir: &std::path::Path, name: &str) -> Option<PathBuf> {
    let prefix = format!("callgrind.{name}.");
    let part = |file: &str| file.strip_prefix(&prefix)?.parse::<u64>().ok();
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter_map(|e| Some((part(&e.file_name().to_string_lossy())?, e.path())))
        .max_by_key(|(n, _)| *n)
        .map(|(_, path)| path)
}

/// The instructions counted in one callgrind dump (its `summary:` or `totals:` line).
fn dumped_instructions(profile: &std::path::Path) -> u64 {
    let text = std::fs::read_to_string(profile).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("summary:").or_else(|| l.strip_prefix("totals:")))
        .and_then(|n| n.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// `ROUTSTR_BENCH_NODE_ENV="NAME=value,NAME=value"`: more environment for the node only (for
/// experiments such as `TOKIO_WORKER_THREADS=1` or `MALLOC_ARENA_MAX=4`).
fn extra_node_env() -> Vec<(String, String)> {
    std::env::var("ROUTSTR_BENCH_NODE_ENV")
        .unwrap_or_default()
        .split(',')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

/// Where the generated part of docs/benchmarks.md ends.
const GENERATED_END: &str = "<!-- end of the generated figures -->";
/// Where the figures of `--own-core` begin and end in docs/benchmarks.md (in its analysis).
const OWN_CORE_BEGIN: &str = "<!-- own-core figures -->";
const OWN_CORE_END: &str = "<!-- end of the own-core figures -->";

/// docs/benchmarks.md with a run's figures in their place; the analysis around them stays.
fn with_figures(doc: &str, figures: &str, own_core: bool) -> String {
    if !own_core {
        let kept = doc.find(GENERATED_END).map_or_else(|| format!("{GENERATED_END}\n"), |i| doc[i..].to_owned());
        return format!(
            "# Benchmarks\n\nCommand: `cargo bench --bench proxy -- --write` (add `--ledger-sync normal` for the other \
             sync setting).\n\n{figures}\n{kept}"
        );
    }
    let block = format!(
        "{OWN_CORE_BEGIN}\nCommand: `cargo bench --bench proxy -- --own-core --write`.\n\n{figures}{OWN_CORE_END}"
    );
    match (doc.find(OWN_CORE_BEGIN), doc.find(OWN_CORE_END)) {
        (Some(begin), Some(end)) if begin < end => {
            format!("{}{block}{}", &doc[..begin], &doc[end + OWN_CORE_END.len()..])
        }
        _ => format!("{}\n{block}\n", doc.trim_end()),
    }
}

/// Today's date from the system clock, without a date crate: `date -u +%F`.
fn chrono_free_date() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%F"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}
