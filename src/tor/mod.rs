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
mod service;

use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;
use tokio::sync::watch;

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

/// The node's handle on its Tor side: current status, and a way to watch it change.
pub struct Tor {
    status: watch::Sender<TorStatus>,
}

impl Tor {
    pub fn new() -> Arc<Tor> {
        Arc::new(Tor { status: watch::Sender::new(TorStatus::default()) })
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
