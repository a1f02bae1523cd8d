//! The running onion service: arti in the background, rendezvous requests admitted under the
//! circuit window, each onion stream served by the node's own router.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arti_client::config::onion_service::OnionServiceConfigBuilder;
use arti_client::DataStream;
use futures_util::StreamExt;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use safelog::DisplayRedacted;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tor_cell::relaycell::msg::{Connected, End, EndReason};
use tor_hsservice::config::TokenBucketConfig;
use tor_hsservice::status::State as HsState;
use tor_hsservice::{HsNickname, OnionServiceConfig, RendRequest};
use tor_proto::stream::IncomingStreamRequest;

use super::{CircuitWindow, Tor, TorState, SERVICE_NICKNAME};
use crate::config::Settings;
use crate::node::Node;
use crate::server::{self, Origin};

/// The onion service's only virtual port.
const ONION_PORT: u16 = 80;
/// How long in-flight onion requests may take to finish once shutdown starts.
const DRAIN_DEADLINE: Duration = Duration::from_secs(30);

/// Starts Tor and the onion service in the background; returns at once. The task ends when
/// `shutdown` turns true, after in-flight onion requests have drained.
pub fn spawn(node: Arc<Node>, tor: Arc<Tor>, shutdown: watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(e) = run(node, tor.clone(), shutdown).await {
            tracing::error!(error = %e, "onion service failed");
            tor.update(|s| {
                s.state = TorState::Broken;
                s.error = Some(e);
            });
        }
    })
}

fn service_config(settings: &Settings) -> Result<OnionServiceConfig, String> {
    let nickname: HsNickname = SERVICE_NICKNAME.parse().map_err(|e| format!("onion service nickname: {e}"))?;
    let mut b = OnionServiceConfigBuilder::default();
    b.nickname(nickname);
    b.max_concurrent_streams_per_circuit(settings.onion_max_streams_per_circuit.max(1));
    if settings.onion_intro_rate > 0 {
        b.rate_limit_at_intro(Some(TokenBucketConfig::new(
            settings.onion_intro_rate,
            settings.onion_intro_burst.max(settings.onion_intro_rate),
        )));
    }
    b.build().map_err(|e| format!("onion service configuration: {e}"))
}

async fn run(node: Arc<Node>, tor: Arc<Tor>, mut shutdown: watch::Receiver<bool>) -> Result<(), String> {
    let settings = &node.settings;
    let svc_config = service_config(settings)?;
    let client = tor.client();
    let (service, rend_requests) = client
        .launch_onion_service(svc_config)
        .map_err(|e| format!("launching the onion service: {e}"))?
        .ok_or("the onion service is disabled in ARTI_CONFIG")?;
    let address = service.onion_address().map(|id| id.display_unredacted().to_string());
    match &address {
        Some(a) => tracing::info!(onion = %a, "onion service address"),
        None => tracing::warn!("the onion service has no identity key yet"),
    }
    tor.update(|s| s.onion_address = address.clone());
    spawn_service_status(&service, tor.clone());
    if node.settings.onion_url.as_deref().unwrap_or("").is_empty() {
        spawn_announce(node.clone(), tor.subscribe());
    }

    // Admitted rendezvous circuits hand their accepted streams to this loop, which serves them
    // under one graceful-shutdown watch.
    let (streams_tx, mut streams_rx) = mpsc::channel::<(DataStream, OwnedSemaphorePermit, server::Circuit)>(64);
    let slots = node.connection_slots.clone();
    let mut window =
        CircuitWindow::new(settings.onion_max_new_circuits, Duration::from_secs(settings.onion_circuit_window_seconds));
    let idle = node.settings.client_idle_timeout();
    let builder = Arc::new(server::http_builder(idle));
    let graceful = GracefulShutdown::new();
    let mut rend_requests = Box::pin(rend_requests);
    let mut refused = 0u64;
    loop {
        tokio::select! {
            rend = rend_requests.next() => {
                let Some(rend) = rend else {
                    tracing::warn!("the onion service stopped handing out requests");
                    break;
                };
                if !window.admit(Instant::now()) {
                    refused += 1;
                    if refused.is_power_of_two() {
                        tracing::warn!(refused, "onion circuit limit reached (ONION_MAX_NEW_CIRCUITS): dropping rendezvous requests");
                    }
                    let _ = rend.reject().await;
                    continue;
                }
                tokio::spawn(accept_circuit(rend, tor.clone(), slots.clone(), streams_tx.clone()));
            }
            Some((stream, permit, circuit)) = streams_rx.recv() => {
                let used = Arc::new(server::ConnectionUse::default());
                let service = server::service(node.clone(), Origin::Onion, circuit, used.clone());
                let conn = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                server::spawn_connection(graceful.watch(conn), used, idle, permit);
            }
            _ = shutdown.changed() => break,
        }
    }
    drop(rend_requests);
    drop(service);
    if tokio::time::timeout(DRAIN_DEADLINE, graceful.shutdown()).await.is_err() {
        tracing::warn!("some onion connections were still open at the drain deadline");
    }
    tor.update(|s| s.state = TorState::Stopped);
    Ok(())
}

/// Completes the rendezvous, then accepts each stream to port 80 while there is a free slot.
async fn accept_circuit(
    rend: RendRequest,
    tor: Arc<Tor>,
    slots: Arc<Semaphore>,
    streams: mpsc::Sender<(DataStream, OwnedSemaphorePermit, server::Circuit)>,
) {
    // Numbered in this process: what the rate limit counts on (a circuit has no address).
    static CIRCUITS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let circuit = server::Circuit(CIRCUITS.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    let mut requests = match rend.accept().await {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(error = %e, "rendezvous failed");
            return;
        }
    };
    while let Some(req) = requests.next().await {
        let to_our_port = matches!(req.request(), IncomingStreamRequest::Begin(b) if b.port() == ONION_PORT);
        let permit = if to_our_port { slots.clone().try_acquire_owned().ok() } else { None };
        let Some(permit) = permit else {
            // Another port, or too many connections: the same answer C tor gives.
            let _ = req.reject(End::new_with_reason(EndReason::DONE)).await;
            continue;
        };
        match req.accept(Connected::new_empty()).await {
            Ok(stream) => {
                // A client found us through the descriptor: reachable, whatever arti reports.
                tor.update(|s| {
                    if matches!(s.state, TorState::Bootstrapping | TorState::Publishing) {
                        s.state = TorState::Reachable;
                    }
                });
                if streams.send((stream, permit, circuit)).await.is_err() {
                    return; // shutting down
                }
            }
            Err(e) => tracing::debug!(error = %e, "could not accept an onion stream"),
        }
    }
}

/// Hands the onion URL to the Nostr announcement once the service is reachable.
fn spawn_announce(node: Arc<Node>, mut status: watch::Receiver<super::TorStatus>) {
    tokio::spawn(async move {
        let mut announced: Option<String> = None;
        loop {
            let url = {
                let s = status.borrow_and_update();
                s.onion_address.as_ref().filter(|_| s.state == TorState::Reachable).map(|a| format!("http://{a}"))
            };
            if url.is_some() && url != announced {
                node.nostr.set_onion_url(url.clone());
                announced = url;
            }
            if status.changed().await.is_err() {
                break;
            }
        }
    });
}

/// Mirrors the onion service's own state (introduction points, descriptor) into the status.
fn spawn_service_status(service: &tor_hsservice::RunningOnionService, tor: Arc<Tor>) {
    let mut events = service.status_events();
    tokio::spawn(async move {
        while let Some(status) = events.next().await {
            tracing::debug!(?status, "onion service status event");
            let hs_state = status.state();
            let problem = status.current_problem().map(|p| {
                let mut s = format!("{p:?}");
                s.truncate(300);
                s
            });
            let before = tor.status().state;
            tor.update(|s| {
                s.state = next_state(s.state, hs_state);
                s.error = problem.clone();
            });
            let now = tor.status().state;
            if now != before {
                match now {
                    TorState::Reachable => tracing::info!(?hs_state, "onion service reachable"),
                    TorState::Broken => tracing::warn!(?hs_state, ?problem, "onion service broken"),
                    _ => tracing::info!(?hs_state, state = ?now, "onion service status"),
                }
            }
        }
    });
}

/// Our state after arti reports `hs`. arti's publisher says "bootstrapping" again whenever it
/// waits to re-upload a descriptor (new consensus, rate limit), while the published one still
/// serves: once reachable, only a real problem takes that back.
fn next_state(current: TorState, hs: HsState) -> TorState {
    match hs {
        HsState::Running | HsState::DegradedReachable => TorState::Reachable,
        HsState::Broken => TorState::Broken,
        // Not launched yet (or shutting down, which `run` reports itself).
        HsState::Shutdown => current,
        HsState::Bootstrapping if current == TorState::Reachable => TorState::Reachable,
        // The client is not bootstrapped yet: the service cannot be further than that.
        _ if current == TorState::Bootstrapping => TorState::Bootstrapping,
        _ => TorState::Publishing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn republishing_keeps_reachable() {
        use TorState::*;
        assert_eq!(next_state(Bootstrapping, HsState::Bootstrapping), Bootstrapping);
        assert_eq!(next_state(Publishing, HsState::Bootstrapping), Publishing);
        assert_eq!(next_state(Publishing, HsState::Running), Reachable);
        assert_eq!(next_state(Reachable, HsState::Bootstrapping), Reachable);
        assert_eq!(next_state(Reachable, HsState::Recovering), Publishing);
        assert_eq!(next_state(Reachable, HsState::Broken), Broken);
        assert_eq!(next_state(Publishing, HsState::Shutdown), Publishing);
    }
}
