//! Tor: the node's onion service, hosted in process with arti.
//!
//! With `ONION_SERVICE=true` the node starts a Tor client in the background (clearnet, when on,
//! already serves), launches an onion service whose keys live in `TOR_STATE_DIR` (owner-only, so
//! the address survives restarts), and serves every onion stream with the same router as
//! clearnet, tagged [`Origin::Onion`](crate::server::Origin). Progress is in the logs and in
//! [`Tor::status`], which `/v1/info` shows and the Nostr announcer can watch with
//! [`Tor::subscribe`].
//!
//! Abuse limits (there is no client IP): arti tears down a circuit that opens more than
//! `ONION_MAX_STREAMS_PER_CIRCUIT` streams, the introduction points rate-limit introductions
//! (`ONION_INTRO_RATE`/`ONION_INTRO_BURST`), and at most `ONION_MAX_NEW_CIRCUITS` rendezvous
//! requests are accepted per `ONION_CIRCUIT_WINDOW_SECONDS`.

mod client_config;
mod limits;
mod outbound;
mod service;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arti_client::TorClient;
use futures_util::StreamExt;
use serde::Serialize;
use tokio::sync::watch;
use tor_rtcompat::PreferredRuntime;

use crate::config::Settings;

pub use client_config::client_config;
pub use limits::CircuitWindow;
pub use service::spawn;

/// The onion service's nickname in arti's keystore. Fixed: changing it changes the address.
pub const SERVICE_NICKNAME: &str = "routstr-node";

/// Where the onion service's keys and arti's state and cache live.
pub fn state_dir(settings: &Settings) -> PathBuf {
    settings.tor_state_dir.clone().unwrap_or_else(|| settings.data_dir.join("tor"))
}

/// How far the onion service has come.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TorState {
    /// The Tor client is connecting to the network and fetching the directory.
    Bootstrapping,
    /// Connected; building introduction points and publishing the descriptor.
    Publishing,
    /// The descriptor is published: clients can reach the onion address.
    Reachable,
    /// Something is wrong (see `error`); arti keeps retrying where it can.
    Broken,
    /// Bootstrapped, for outbound traffic only (no onion service).
    Connected,
    /// Shut down.
    Stopped,
}

/// What `/v1/info` shows under `tor`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TorStatus {
    pub state: TorState,
    /// Bootstrap progress, 0–100.
    pub bootstrap_percent: u8,
    /// arti's own summary of the bootstrap.
    pub bootstrap: String,
    /// `….onion`, once the service's keys exist.
    pub onion_address: Option<String>,
    /// The latest problem, if any.
    pub error: Option<String>,
}

impl Default for TorStatus {
    fn default() -> Self {
        TorStatus {
            state: TorState::Bootstrapping,
            bootstrap_percent: 0,
            bootstrap: "starting".into(),
            onion_address: None,
            error: None,
        }
    }
}

/// Pause between bootstrap attempts that failed.
const BOOTSTRAP_RETRY: Duration = Duration::from_secs(15);

/// The node's Tor side: the arti client (shared by the onion service and outbound traffic), its
/// status, and the local proxies (HTTP and SOCKS5) that carry traffic through it: `.onion`
/// destinations always, everything else (but loopback) with TOR_OUTBOUND.
pub struct Tor {
    status: watch::Sender<TorStatus>,
    client: Arc<TorClient<PreferredRuntime>>,
    http_proxy: SocketAddr,
    socks_proxy: SocketAddr,
    outbound: bool,
}

impl Tor {
    /// Creates the Tor client and bootstraps it in the background (progress in the logs), and
    /// starts the local proxies. Returns at once.
    pub async fn start(settings: &Settings) -> Result<Arc<Tor>, String> {
        // arti's TLS needs a process-wide rustls provider; another part may have installed one.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let config = client_config(settings)?;
        tracing::info!(state_dir = %state_dir(settings).display(), "starting Tor (arti)");
        let client =
            TorClient::builder().config(config).create_unbootstrapped().map_err(|e| format!("Tor client: {e}"))?;
        let http_proxy = outbound::start(client.clone()).await.map_err(|e| format!("Tor HTTP proxy: {e}"))?;
        let socks_proxy = outbound::start_socks(outbound::tor_connector(client.clone()))
            .await
            .map_err(|e| format!("Tor SOCKS proxy: {e}"))?;
        let tor = Arc::new(Tor {
            status: watch::Sender::new(TorStatus::default()),
            client,
            http_proxy,
            socks_proxy,
            outbound: settings.tor_outbound,
        });
        tor.spawn_bootstrap(settings.onion_service);
        Ok(tor)
    }

    /// The arti client, e.g. to open a stream through Tor.
    pub fn client(&self) -> Arc<TorClient<PreferredRuntime>> {
        self.client.clone()
    }

    /// Whether all outbound traffic (but loopback) goes through Tor (TOR_OUTBOUND).
    pub fn outbound(&self) -> bool {
        self.outbound
    }

    /// `http://127.0.0.1:<port>`: the proxy carrying outbound traffic through Tor (TOR_OUTBOUND).
    pub fn outbound_proxy_url(&self) -> Option<String> {
        self.outbound.then(|| self.http_proxy_url())
    }

    /// `http://127.0.0.1:<port>`: the HTTP proxy through Tor, e.g. for `.onion` hosts.
    pub fn http_proxy_url(&self) -> String {
        format!("http://{}", self.http_proxy)
    }

    /// `127.0.0.1:<port>`: the SOCKS5 proxy through Tor (names resolved by Tor; loopback direct),
    /// for the Nostr relay pool.
    pub fn socks_proxy(&self) -> SocketAddr {
        self.socks_proxy
    }

    pub fn status(&self) -> TorStatus {
        self.status.borrow().clone()
    }

    /// Changes of the status (address known, reachable, …), e.g. to re-announce the node.
    pub fn subscribe(&self) -> watch::Receiver<TorStatus> {
        self.status.subscribe()
    }

    /// `http://….onion` once the address is known.
    pub fn onion_url(&self) -> Option<String> {
        self.status.borrow().onion_address.as_ref().map(|a| format!("http://{a}"))
    }

    pub(crate) fn update(&self, f: impl FnOnce(&mut TorStatus)) {
        self.status.send_if_modified(|s| {
            let before = s.clone();
            f(s);
            *s != before
        });
    }
}

impl Tor {
    /// Bootstraps (retrying) and mirrors the progress into the logs (each new 10 % step) and
    /// the status.
    fn spawn_bootstrap(self: &Arc<Self>, onion_service: bool) {
        let client = self.client.clone();
        tokio::spawn(async move {
            while let Err(e) = client.bootstrap().await {
                tracing::warn!(error = %e, "Tor bootstrap failed; retrying");
                tokio::time::sleep(BOOTSTRAP_RETRY).await;
            }
        });
        let mut events = self.client.bootstrap_events();
        let tor = self.clone();
        tokio::spawn(async move {
            let mut logged: Option<(u8, bool)> = None;
            while let Some(status) = events.next().await {
                let percent = (status.as_frac() * 100.0).round().clamp(0.0, 100.0) as u8;
                let ready = status.ready_for_traffic();
                let summary = status.to_string();
                if logged.is_none_or(|(p, r)| percent / 10 > p / 10 || ready != r) {
                    tracing::info!(percent, ready, "Tor bootstrap: {summary}");
                    logged = Some((percent, ready));
                }
                tor.update(|s| {
                    s.bootstrap_percent = percent;
                    s.bootstrap = summary;
                    if ready && s.state == TorState::Bootstrapping {
                        s.state = if onion_service { TorState::Publishing } else { TorState::Connected };
                    }
                });
            }
        });
    }
}

/// Whether a URL's host is an onion address (reachable only through Tor).
pub fn is_onion(url: &reqwest::Url) -> bool {
    url.host_str().is_some_and(is_onion_host)
}

fn is_onion_host(host: &str) -> bool {
    host.trim_end_matches('.').to_ascii_lowercase().ends_with(".onion")
}

/// Hosts never sent through Tor, even with TOR_OUTBOUND.
const LOOPBACK_HOSTS: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// Whether traffic to `host` must go through Tor: the one rule for reqwest's clients (`route`)
/// and for the upstream calls that bypass reqwest (`proxy::client`).
pub fn carries(tor: Option<&Tor>, host: &str) -> bool {
    tor.is_some_and(|tor| carries_with(tor.outbound, host))
}

/// `carries` for a node with Tor, with or without TOR_OUTBOUND.
fn carries_with(outbound: bool, host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']').trim_end_matches('.');
    is_onion_host(host) || (outbound && !LOOPBACK_HOSTS.iter().any(|h| h.eq_ignore_ascii_case(bare)))
}

/// Routes a reqwest client's traffic through Tor where it must go: `.onion` hosts whenever the
/// node has a Tor client (ONION_SERVICE or TOR_OUTBOUND), and with TOR_OUTBOUND everything
/// except loopback (a mint or upstream on the same host reveals nothing and is not reachable
/// through Tor anyway). Without Tor the builder is unchanged.
pub fn route(builder: reqwest::ClientBuilder, tor: Option<&Arc<Tor>>) -> Result<reqwest::ClientBuilder, String> {
    let Some(tor) = tor else {
        return Ok(builder);
    };
    let proxy = reqwest::Url::parse(&tor.http_proxy_url()).map_err(|e| format!("Tor proxy: {e}"))?;
    let outbound = tor.outbound;
    let rule = reqwest::Proxy::custom(move |target| {
        target.host_str().is_some_and(|host| carries_with(outbound, host)).then(|| proxy.clone())
    });
    Ok(builder.proxy(rule))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tor_carries_onions_and_with_outbound_all_but_loopback() {
        for outbound in [false, true] {
            assert!(carries_with(outbound, "abcdef.onion"));
            assert!(carries_with(outbound, "ABCDEF.ONION."));
            assert!(!carries_with(outbound, "127.0.0.1"));
            assert!(!carries_with(outbound, "localhost"));
            assert!(!carries_with(outbound, "[::1]"));
        }
        assert!(!carries_with(false, "upstream.internal"));
        assert!(carries_with(true, "upstream.internal"));
        assert!(carries_with(true, "10.0.0.1"));
    }
}
