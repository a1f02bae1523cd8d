//! The node on Nostr: its identity, its relays, its announcement (kind 38421) and price list
//! (kind 38450), and discovery of other providers. PROTOCOL.md §5; docs/nips/routstr-models.md.
//!
//! Relays are handled by nostr-sdk's pool, which reconnects each relay on its own with backoff.
//! With a Tor client, `.onion` relays are reached through its SOCKS5 proxy; with TOR_OUTBOUND,
//! every relay is (the proxy connects loopback relays directly).
//! Publishing goes to each write relay separately, each send bounded in time; a relay that
//! fails is retried later with exponential backoff, never holding up the others.

pub mod cli;
pub mod discovery;
pub mod events;
pub mod identity;
pub mod relays;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nostr_sdk::prelude::{
    Client, ClientOptions, Connection, ConnectionTarget, Event, Filter, Keys, Kind, PublicKey, RelayPoolNotification,
    RelayStatus, RelayUrl, Timestamp, ToBech32,
};
use serde_json::{json, Value};
use tokio::sync::{broadcast, watch};

use self::discovery::Registry;
use self::events::{Announcement, ANNOUNCEMENT_KIND, MODELS_KIND};
use self::relays::RelaySpec;
use crate::config::Settings;
use crate::node::Node;

const MIN_BACKOFF: Duration = Duration::from_secs(2);
const MAX_BACKOFF: Duration = Duration::from_secs(600);

/// The node's Nostr side.
pub struct Nostr {
    keys: Keys,
    pub relays: Vec<RelaySpec>,
    client: Client,
    pub registry: Arc<Registry>,
    onion: watch::Sender<Option<String>>,
    http: reqwest::Client,
    /// Whether `http` reaches `.onion` providers (the node has a Tor client).
    reach: discovery::Reach,
    timeout: Duration,
    stats: Mutex<Stats>,
}

/// What the node published since it started.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub announcements_signed: u64,
    pub price_lists_signed: u64,
    /// When the last announcement / price list was signed (Unix seconds, its `created_at`).
    pub last_announcement_at: Option<u64>,
    pub last_price_list_at: Option<u64>,
    pub d: Option<String>,
}

impl Nostr {
    /// Loads (or creates) the identity and reads the relay list. Connects nothing yet. With
    /// `tor`, relays and health checks go through Tor where they must (see [`relay_connection`]).
    pub fn new(settings: &Settings, tor: Option<&Arc<crate::tor::Tor>>) -> Result<Nostr, String> {
        let keys =
            identity::load_or_create(settings.nsec.as_ref().map(|s| s.expose()), &settings.data_dir.join("nostr.key"))?;
        let relays = relays::resolve(&settings.relays, settings.relays_path.as_deref())?;
        let timeout = Duration::from_secs(settings.nostr_timeout_seconds.max(1));
        Ok(Nostr {
            client: Client::builder()
                .signer(keys.clone())
                .opts(ClientOptions::new().connection(relay_connection(tor)))
                .build(),
            registry: Arc::new(Registry::new(Some(keys.public_key()))),
            onion: watch::Sender::new(settings.onion_url.clone().filter(|u| !u.is_empty())),
            http: discovery::health_client(timeout, tor, settings.nostr_allow_private_hosts),
            reach: discovery::Reach { onion: tor.is_some(), private: settings.nostr_allow_private_hosts },
            keys,
            relays,
            timeout,
            stats: Mutex::new(Stats::default()),
        })
    }

    pub fn public_key(&self) -> PublicKey {
        self.keys.public_key()
    }

    pub fn npub(&self) -> String {
        self.keys.public_key().to_bech32().unwrap_or_default()
    }

    pub fn stats(&self) -> Stats {
        self.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// The onion URL to announce, set once the onion service is reachable (`None` withdraws it).
    /// The announcement is re-published at the next check.
    pub fn set_onion_url(&self, url: Option<String>) {
        self.onion.send_replace(url.filter(|u| !u.is_empty()));
    }

    /// `GET /v1/providers`: the discovered providers, ranked (only those offering `model`, if given).
    pub fn providers_json(&self, model: Option<&str>) -> Value {
        let mut providers = self.registry.to_json();
        discovery::rank(&mut providers, model);
        json!({ "providers": providers })
    }

    /// Connects the relays and starts publishing and discovery.
    pub fn spawn(node: &Arc<Node>) {
        let s = &node.settings;
        if !s.nostr_enabled {
            tracing::info!("Nostr is off (NOSTR_ENABLED=false)");
            return;
        }
        let node = node.clone();
        tokio::spawn(async move {
            let nostr = &node.nostr;
            add_relays(&nostr.client, &nostr.relays).await;
            nostr.client.connect().await;
            tracing::info!(npub = %nostr.npub(), relays = nostr.relays.len(), "on Nostr");
            if node.settings.nostr_discovery {
                let n = node.clone();
                tokio::spawn(async move { discover(&n.nostr).await });
                let n = node.clone();
                tokio::spawn(async move { check_health(&n.nostr, &n.settings).await });
            }
            publish(&node).await;
        });
    }
}

/// How the relay pool connects: through Tor's SOCKS5 proxy for every relay with TOR_OUTBOUND,
/// for `.onion` relays only with just ONION_SERVICE; directly without Tor.
pub fn relay_connection(tor: Option<&Arc<crate::tor::Tor>>) -> Connection {
    match tor {
        None => Connection::new(),
        Some(tor) => Connection::new().proxy(tor.socks_proxy()).target(match tor.outbound() {
            true => ConnectionTarget::All,
            false => ConnectionTarget::Onion,
        }),
    }
}

async fn add_relays(client: &Client, relays: &[RelaySpec]) {
    for r in relays {
        let added = match (r.read, r.write) {
            (true, true) => client.add_relay(r.url.as_str()).await,
            (true, false) => client.add_read_relay(r.url.as_str()).await,
            (false, true) => client.add_write_relay(r.url.as_str()).await,
            (false, false) => continue,
        };
        if let Err(e) = added {
            tracing::warn!(relay = %r.url, error = %e, "relay left out");
        }
    }
}

/// Subscribes to announcements and price lists on the read relays and feeds the registry.
async fn discover(nostr: &Nostr) {
    let mut notifications = nostr.client.notifications();
    let filter = Filter::new().kinds([Kind::from(ANNOUNCEMENT_KIND), Kind::from(MODELS_KIND)]);
    if let Err(e) = nostr.client.subscribe(filter, None).await {
        tracing::warn!(error = %e, "discovery: no read relay to subscribe on");
        return;
    }
    loop {
        match notifications.recv().await {
            Ok(RelayPoolNotification::Event { relay_url, event, .. }) => {
                let outcome = nostr.registry.ingest(&event, Timestamp::now());
                tracing::debug!(relay = %relay_url, id = %event.id, kind = %event.kind, ?outcome, "discovery event");
            }
            Ok(RelayPoolNotification::Shutdown) | Err(broadcast::error::RecvError::Closed) => return,
            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
        }
    }
}

async fn check_health(nostr: &Nostr, settings: &Settings) {
    let every = Duration::from_secs(settings.nostr_health_seconds.max(1));
    loop {
        nostr.registry.check_all(&nostr.http, nostr.timeout, nostr.reach).await;
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = nostr.registry.changed.notified() => {
                // Let a burst of announcements arrive before checking.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// One signed event and the write relays that still need it.
struct Outbox {
    event: Event,
    pending: HashMap<RelayUrl, (u32, Instant)>,
}

impl Outbox {
    fn new(event: Event, relays: &[RelayUrl]) -> Outbox {
        let now = Instant::now();
        Outbox { event, pending: relays.iter().map(|r| (r.clone(), (0, now))).collect() }
    }

    /// Sends to every relay that is due, all at once, each bounded by `timeout`.
    async fn flush(&mut self, client: &Client, timeout: Duration, what: &str) {
        let now = Instant::now();
        let due: Vec<RelayUrl> =
            self.pending.iter().filter(|(_, (_, at))| *at <= now).map(|(r, _)| r.clone()).collect();
        let sends = due.into_iter().map(|relay| async {
            let sent = tokio::time::timeout(timeout, client.send_event_to([relay.clone()], &self.event)).await;
            let result = match sent {
                Ok(Ok(out)) if out.success.contains(&relay) => Ok(()),
                Ok(Ok(out)) => Err(out.failed.get(&relay).cloned().unwrap_or_else(|| "not accepted".into())),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("timed out".to_owned()),
            };
            (relay, result)
        });
        for (relay, result) in futures_util::future::join_all(sends).await {
            match result {
                Ok(()) => {
                    tracing::info!(%relay, id = %self.event.id, "{what} published");
                    self.pending.remove(&relay);
                }
                Err(reason) => {
                    if let Some((failures, at)) = self.pending.get_mut(&relay) {
                        *failures += 1;
                        let wait = MIN_BACKOFF.saturating_mul(1 << (*failures - 1).min(10)).min(MAX_BACKOFF);
                        *at = Instant::now() + wait;
                        tracing::warn!(%relay, %reason, retry_in_s = wait.as_secs(), "{what} not published");
                    }
                }
            }
        }
    }
}

fn is_newer(a: &Event, b: &Event) -> bool {
    a.created_at > b.created_at || (a.created_at == b.created_at && a.id < b.id)
}

/// A `created_at` after `last`'s, so the new event replaces it everywhere.
fn next_timestamp(last: Option<&Event>) -> Timestamp {
    let now = Timestamp::now().as_secs();
    Timestamp::from_secs(last.map_or(now, |e| now.max(e.created_at.as_secs() + 1)))
}

/// Keeps the announcement and price list on the write relays: re-signed when they change,
/// refreshed at most daily otherwise, nothing sent when nothing changed.
async fn publish(node: &Arc<Node>) {
    let nostr = &node.nostr;
    let s = &node.settings;
    let check_every = Duration::from_secs(s.nostr_check_seconds.max(1));
    let refresh = s.nostr_refresh_seconds.max(60);
    let models_interval = s.nostr_models_min_interval_seconds;
    let write_relays: Vec<RelayUrl> =
        nostr.relays.iter().filter(|r| r.write).filter_map(|r| RelayUrl::parse(&r.url).ok()).collect();
    if write_relays.is_empty() {
        tracing::info!("no write relay: the node does not announce itself");
        return;
    }
    let mut d: Option<String> = s.provider_id.clone().filter(|d| !d.is_empty());
    let mut last_announcement: Option<Event> = None;
    let mut last_models: Option<Event> = None;
    let mut looked_up = false;
    let mut announcement_out: Option<Outbox> = None;
    let mut models_out: Option<Outbox> = None;
    let mut said_no_url = false;
    // The onion service's URL, announced once it has been reachable (and kept through brief
    // outages: the address does not change, and flapping would re-publish every time).
    let mut onion_seen: Option<String> = None;
    loop {
        if let Some(tor) = node.tor.as_ref() {
            if tor.status().state == crate::tor::TorState::Reachable {
                onion_seen = tor.onion_url().or(onion_seen);
            }
        }
        let onion = nostr.onion.borrow().clone().or_else(|| onion_seen.clone());
        let urls: Vec<String> = s.http_url.iter().cloned().chain(onion).filter(|u| !u.is_empty()).collect();
        if urls.is_empty() {
            if !said_no_url {
                tracing::info!("no HTTP_URL or onion URL to announce: not announcing on Nostr");
                said_no_url = true;
            }
            tokio::time::sleep(check_every).await;
            continue;
        }
        said_no_url = false;
        if !looked_up {
            if !any_connected(&nostr.client).await {
                tokio::time::sleep(Duration::from_millis(250)).await;
                continue;
            }
            // Our newest events on the relays: their `d` keeps the provider id stable, and
            // what they say needs no re-sending.
            let filter = Filter::new()
                .author(nostr.public_key())
                .kinds([Kind::from(ANNOUNCEMENT_KIND), Kind::from(MODELS_KIND)]);
            match nostr.client.fetch_events(filter, nostr.timeout).await {
                Ok(found) => {
                    let mut newest: Option<Event> = None;
                    for e in found.iter().filter(|e| e.kind == Kind::from(ANNOUNCEMENT_KIND) && e.verify().is_ok()) {
                        if newest.as_ref().is_none_or(|n| is_newer(e, n)) {
                            newest = Some(e.clone());
                        }
                    }
                    if d.is_none() {
                        d = newest.as_ref().and_then(|e| e.tags.identifier().map(str::to_owned));
                    }
                    let d_now = d.clone().unwrap_or_else(|| default_d(&nostr.public_key()));
                    last_announcement = newest.filter(|e| e.tags.identifier() == Some(d_now.as_str()));
                    for e in found.iter().filter(|e| e.kind == Kind::from(MODELS_KIND) && e.verify().is_ok()) {
                        if e.tags.identifier() == Some(d_now.as_str())
                            && last_models.as_ref().is_none_or(|n| is_newer(e, n))
                        {
                            last_models = Some(e.clone());
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "could not look up our announcement on the relays"),
            }
            looked_up = true;
        }
        let d = d.get_or_insert_with(|| default_d(&nostr.public_key())).clone();
        if let Ok(mut stats) = nostr.stats.lock() {
            stats.d = Some(d.clone());
        }
        let now = Timestamp::now().as_secs();

        let announcement = Announcement {
            d: d.clone(),
            urls,
            mints: node.wallet().trusted_mints(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            name: s.name.clone(),
            about: s.description.clone(),
        };
        let due = match &last_announcement {
            None => true,
            Some(e) => !announcement.matches(e) || now.saturating_sub(e.created_at.as_secs()) >= refresh,
        };
        if due {
            match announcement.builder(next_timestamp(last_announcement.as_ref())).sign_with_keys(&nostr.keys) {
                Ok(event) => {
                    tracing::info!(d = %d, id = %event.id, "announcement signed");
                    let signed_at = event.created_at.as_secs();
                    announcement_out = Some(Outbox::new(event.clone(), &write_relays));
                    last_announcement = Some(event);
                    if let Ok(mut stats) = nostr.stats.lock() {
                        stats.announcements_signed += 1;
                        stats.last_announcement_at = Some(signed_at);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "could not sign the announcement"),
            }
        }

        let listing = {
            let c = node.catalog();
            c.to_json(c.upstreams(), &node.policy, node.rates.get())
        };
        let offers = events::offers_from_listing(&listing);
        let models_due = match &last_models {
            None => !offers.is_empty(),
            Some(e) => {
                let age = now.saturating_sub(e.created_at.as_secs());
                let changed = match events::parse_models(e) {
                    Some((old_d, _, old)) => old_d != d || events::prices_moved(&old, &offers, s.nostr_price_threshold),
                    None => true,
                };
                (changed && age >= models_interval) || age >= refresh
            }
        };
        if models_due {
            let builder =
                events::models_builder(&nostr.public_key(), &d, &offers, next_timestamp(last_models.as_ref()));
            match builder.sign_with_keys(&nostr.keys) {
                Ok(event) => {
                    tracing::info!(d = %d, models = offers.len(), id = %event.id, "price list signed");
                    let signed_at = event.created_at.as_secs();
                    models_out = Some(Outbox::new(event.clone(), &write_relays));
                    last_models = Some(event);
                    if let Ok(mut stats) = nostr.stats.lock() {
                        stats.price_lists_signed += 1;
                        stats.last_price_list_at = Some(signed_at);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "could not sign the price list"),
            }
        }

        let timeout = nostr.timeout;
        let client = &nostr.client;
        let flush_announcement = async {
            if let Some(out) = announcement_out.as_mut() {
                out.flush(client, timeout, "announcement").await;
            }
        };
        let flush_models = async {
            if let Some(out) = models_out.as_mut() {
                out.flush(client, timeout, "price list").await;
            }
        };
        tokio::join!(flush_announcement, flush_models);
        tokio::time::sleep(check_every).await;
    }
}

/// The default provider id: the first 12 hex characters of the public key.
pub fn default_d(pubkey: &PublicKey) -> String {
    pubkey.to_hex()[..12].to_owned()
}

async fn any_connected(client: &Client) -> bool {
    client.relays().await.values().any(|r| r.status() == RelayStatus::Connected)
}
