//! The private Tor network (tests/tor/tornet.sh) from Rust, and curl through its C tor client.

use std::path::{Path, PathBuf};
use std::process::Command as StdCommand;
use std::time::{Duration, Instant};

use tokio::process::Command;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tor/tornet.sh");

/// Three authorities, three relays, a C tor client and a C tor onion service on 127.0.0.1.
/// Dropping it stops the daemons (by their pid files).
pub struct TorNet {
    pub dir: PathBuf,
    pub base: u16,
}

fn require(cmd: &str, arg: &str) {
    // Runs at all (tor-gencert --help exits non-zero).
    let ok = StdCommand::new(cmd).arg(arg).output().is_ok();
    assert!(
        ok,
        "the Tor test needs `{cmd}` on PATH; install it with:\n  \
         printf '#!/bin/sh\\nexit 101\\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d\n  \
         apt-get install -y tor curl"
    );
}

fn port_free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// A base port whose whole block (ORPorts, DirPorts, SocksPort, onion target) is free. Below
/// the ephemeral range, so the ports other parts of the test pick cannot collide.
fn free_base() -> u16 {
    let offset = rand::random::<u16>() % 10;
    (0..10)
        .map(|k| 20_000 + ((offset + k) % 10) * 1000)
        .find(|base| (0..6).chain(100..106).chain([206, 300]).all(|d| port_free(base + d)))
        .expect("no free block of ports for the Tor test network")
}

impl TorNet {
    /// Generates keys and configs, starts the daemons. Panics (loudly) when it cannot.
    pub fn start(dir: &Path) -> TorNet {
        require("tor", "--version");
        require("tor-gencert", "--help");
        require("curl", "--version");
        let base = free_base();
        let net = TorNet { dir: dir.to_path_buf(), base };
        net.script("setup");
        net.script("start");
        net
    }

    fn script(&self, cmd: &str) {
        let out = StdCommand::new("bash")
            .arg(SCRIPT)
            .arg(cmd)
            .arg(&self.dir)
            .env("TORNET_BASE_PORT", self.base.to_string())
            .output()
            .expect("run tests/tor/tornet.sh");
        assert!(
            out.status.success(),
            "tornet.sh {cmd} failed in {}:\n{}{}",
            self.dir.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Waits for the C tor client and onion service to bootstrap (the script's 180 s limit).
    pub async fn wait(&self) {
        let dir = self.dir.clone();
        let base = self.base;
        let out = tokio::task::spawn_blocking(move || {
            StdCommand::new("bash")
                .arg(SCRIPT)
                .arg("wait")
                .arg(&dir)
                .env("TORNET_BASE_PORT", base.to_string())
                .output()
                .expect("run tornet.sh wait")
        })
        .await
        .expect("wait task");
        assert!(
            out.status.success(),
            "the private Tor network did not come up in {}:\n{}{}",
            self.dir.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The node's ARTI_CONFIG for this network.
    pub fn arti_config(&self) -> PathBuf {
        self.dir.join("arti.toml")
    }

    pub fn socks_port(&self) -> u16 {
        self.base + 206
    }

    /// Where the C tor onion service (h7) forwards its port 80.
    pub fn hs_target_port(&self) -> u16 {
        self.base + 300
    }

    /// The C tor onion service's address.
    pub fn c_onion(&self) -> String {
        std::fs::read_to_string(self.dir.join("h7/hs/hostname")).expect("h7 hostname").trim().to_owned()
    }
}

impl Drop for TorNet {
    fn drop(&mut self) {
        let _ = StdCommand::new("bash")
            .arg(SCRIPT)
            .arg("stop")
            .arg(&self.dir)
            .env("TORNET_BASE_PORT", self.base.to_string())
            .output();
        // A failed run keeps the directory: it holds every daemon's log.
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// One HTTP exchange through the C tor client's SOCKS port.
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub text: String,
    pub json: serde_json::Value,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// `curl --socks5-hostname 127.0.0.1:<socks> <url>`; `Err` when curl itself fails (no route
/// to the onion yet, SOCKS error …).
pub async fn curl(
    socks: u16,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Result<Reply, String> {
    let scratch = std::env::temp_dir().join(format!("routstr-tor-curl-{}", rand::random::<u64>()));
    let head_file = scratch.with_extension("head");
    let mut cmd = Command::new("curl");
    cmd.arg("-sS")
        .args(["--max-time", "60"])
        .arg("--socks5-hostname")
        .arg(format!("127.0.0.1:{socks}"))
        .args(["-X", method])
        .arg("-D")
        .arg(&head_file)
        .arg(url);
    for (k, v) in headers {
        cmd.arg("-H").arg(format!("{k}: {v}"));
    }
    if let Some(b) = body {
        cmd.args(["-H", "content-type: application/json", "--data-binary", b]);
    }
    let out = cmd.output().await.map_err(|e| format!("curl: {e}"))?;
    let head = std::fs::read_to_string(&head_file).unwrap_or_default();
    let _ = std::fs::remove_file(&head_file);
    if !out.status.success() {
        return Err(format!("curl {url}: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status line in {head:?}"))?;
    let headers =
        lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned())).collect();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let json = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
    Ok(Reply { status, headers, text, json })
}

/// Retries a GET through Tor until it answers 200 (the first tries fail while the descriptor
/// is not published yet); panics with the last error at the deadline.
pub async fn get_until_ok(socks: u16, url: &str, within: Duration) -> (Reply, Duration) {
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < within {
        match curl(socks, "GET", url, &[], None).await {
            Ok(r) if r.status == 200 => return (r, start.elapsed()),
            Ok(r) => last = format!("HTTP {}: {}", r.status, r.text),
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    panic!("{url} not reachable through Tor within {within:?}; last: {last}");
}
