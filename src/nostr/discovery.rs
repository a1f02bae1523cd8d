//! Discovery: the live registry of providers announced on Nostr, fed by a subscription to kinds
//! 38421 and 38450 on the read relays, and each provider's health and latency measured over HTTP.
//!
//! Every event is verified again here (whatever the relay pool did), events dated in the future
//! are dropped, and only the newest event per `(pubkey, d)` is kept (ties: the lowest id, as
//! NIP-01 says). Health checks fetch `/v1/info` and `/v1/models` of each announced `u`: only
//! `http(s)` URLs, no redirects, bounded time and bounded body size, since any announcer picks
//! those URLs. `.onion` URLs are checked through Tor when the node has a Tor client (ONION_SERVICE
//! or TOR_OUTBOUND), with a longer time bound (a first circuit to an onion service is slow).

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use nostr_sdk::prelude::{Event, EventId, Kind, PublicKey, Timestamp, ToBech32};
use serde_json::{json, Map, Value};
use tokio::sync::Notify;

use super::events::{self, Announcement, ModelOffer, ANNOUNCEMENT_KIND, MODELS_KIND};

/// Events dated more than this far ahead of our clock are from the future.
pub const FUTURE_TOLERANCE_SECS: u64 = 60;
/// At most this many providers (and as many price lists) are tracked.
pub const MAX_PROVIDERS: usize = 2000;
/// At most this many of them (announcements, and price lists) per key: one key cannot fill the
/// registry and keep everyone else out.
pub const MAX_PER_PUBKEY: usize = 8;
/// A health check tries at most this many of a provider's URLs (in its order).
const MAX_PROBED_URLS: usize = 3;
const INFO_BODY_LIMIT: usize = 256 * 1024;
const MODELS_BODY_LIMIT: usize = 4 * 1024 * 1024;
const CHECK_CONCURRENCY: usize = 16;
/// The least time an onion health request gets (descriptor, introduction, rendezvous).
const ONION_MIN_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HealthStatus {
    #[default]
    Unknown,
    Ok,
    Down,
}

impl HealthStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            HealthStatus::Unknown => "unknown",
            HealthStatus::Ok => "ok",
            HealthStatus::Down => "down",
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Health {
    pub status: HealthStatus,
    pub latency_ms: Option<u64>,
    /// The URL that answered.
    pub url: Option<String>,
    /// The models and prices its `/v1/models` listed.
    pub models: Vec<ModelOffer>,
    pub error: Option<String>,
    pub checked_at: Option<u64>,
    pub last_ok: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct Provider {
    pub pubkey: PublicKey,
    pub event_id: EventId,
    pub created_at: Timestamp,
    pub announcement: Announcement,
    pub health: Health,
}

/// A healthy provider's offer of one model, for routing.
#[derive(Debug, Clone)]
pub struct Offer {
    /// Hex public key.
    pub pubkey: String,
    pub name: String,
    /// The URL that answered its health check.
    pub url: String,
    pub mints: Vec<String>,
    /// The model's `sats_pricing` (`prompt`, `completion`, `request`, `max_completion_cost`…).
    pub sats_pricing: Value,
    pub latency_ms: u64,
}

#[derive(Debug, Clone)]
struct PriceList {
    event_id: EventId,
    created_at: Timestamp,
    models: Vec<ModelOffer>,
}

/// What became of an event offered to the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ingest {
    Accepted,
    Duplicate,
    BadSignature,
    FromTheFuture,
    /// Older than (or losing the tie against) what is already kept for its `(pubkey, d)`.
    Stale,
    /// Our own events.
    Own,
    /// Not a kind discovery reads, or a price list linked to another provider's announcement.
    Ignored,
    Full,
}

type Key = (PublicKey, String);

#[derive(Default)]
struct Inner {
    providers: HashMap<Key, Provider>,
    prices: HashMap<Key, PriceList>,
}

#[derive(Default)]
pub struct Registry {
    own: Option<PublicKey>,
    inner: RwLock<Inner>,
    /// Woken when a provider appears or its URLs change, so it is checked right away.
    pub changed: Notify,
}

/// Whether `(created_at, id)` replaces `(old_created_at, old_id)`.
fn newer(created_at: Timestamp, id: &EventId, old_created_at: Timestamp, old_id: &EventId) -> Option<bool> {
    if id == old_id {
        return None;
    }
    Some(created_at > old_created_at || (created_at == old_created_at && id < old_id))
}

impl Registry {
    pub fn new(own: Option<PublicKey>) -> Registry {
        Registry { own, ..Registry::default() }
    }

    pub fn len(&self) -> usize {
        self.inner.read().map(|i| i.providers.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Offers an event received from a relay.
    pub fn ingest(&self, event: &Event, now: Timestamp) -> Ingest {
        let kind = event.kind;
        if kind != Kind::from(ANNOUNCEMENT_KIND) && kind != Kind::from(MODELS_KIND) {
            return Ingest::Ignored;
        }
        if event.verify().is_err() {
            return Ingest::BadSignature;
        }
        if event.created_at.as_secs() > now.as_secs() + FUTURE_TOLERANCE_SECS {
            return Ingest::FromTheFuture;
        }
        if Some(event.pubkey) == self.own {
            return Ingest::Own;
        }
        let Ok(mut inner) = self.inner.write() else { return Ingest::Ignored };
        if kind == Kind::from(ANNOUNCEMENT_KIND) {
            let Some(announcement) = Announcement::parse(event) else { return Ingest::Ignored };
            let key = (event.pubkey, announcement.d.clone());
            let health = match inner.providers.get(&key) {
                Some(old) => match newer(event.created_at, &event.id, old.created_at, &old.event_id) {
                    None => return Ingest::Duplicate,
                    Some(false) => return Ingest::Stale,
                    Some(true) if old.announcement.urls == announcement.urls => old.health.clone(),
                    Some(true) => Health::default(),
                },
                None if inner.providers.len() >= MAX_PROVIDERS => return Ingest::Full,
                None if inner.providers.keys().filter(|(pk, _)| *pk == event.pubkey).count() >= MAX_PER_PUBKEY => {
                    return Ingest::Full
                }
                None => Health::default(),
            };
            let recheck = health.checked_at.is_none();
            inner.providers.insert(
                key,
                Provider {
                    pubkey: event.pubkey,
                    event_id: event.id,
                    created_at: event.created_at,
                    announcement,
                    health,
                },
            );
            drop(inner);
            if recheck {
                self.changed.notify_one();
            }
            Ingest::Accepted
        } else {
            let Some((d, a, models)) = events::parse_models(event) else { return Ingest::Ignored };
            if a.as_deref().is_some_and(|a| a != events::coordinate(&event.pubkey, &d)) {
                return Ingest::Ignored;
            }
            let key = (event.pubkey, d);
            match inner.prices.get(&key) {
                Some(old) => match newer(event.created_at, &event.id, old.created_at, &old.event_id) {
                    None => return Ingest::Duplicate,
                    Some(false) => return Ingest::Stale,
                    Some(true) => {}
                },
                None if inner.prices.len() >= MAX_PROVIDERS => return Ingest::Full,
                None if inner.prices.keys().filter(|(pk, _)| *pk == event.pubkey).count() >= MAX_PER_PUBKEY => {
                    return Ingest::Full
                }
                None => {}
            }
            inner.prices.insert(key, PriceList { event_id: event.id, created_at: event.created_at, models });
            Ingest::Accepted
        }
    }

    /// Checks every provider's health now (a few at a time), at the URLs `reach` allows (`.onion`
    /// ones are then reached through Tor by `http`, see [`health_client`]).
    pub async fn check_all(&self, http: &reqwest::Client, timeout: Duration, reach: Reach) {
        let targets: Vec<(Key, Vec<String>)> = match self.inner.read() {
            Ok(inner) => inner.providers.iter().map(|(k, p)| (k.clone(), p.announcement.urls.clone())).collect(),
            Err(_) => return,
        };
        // Each result is kept as it comes: a pass slowed by providers that never answer does not
        // hold back what the others' checks found.
        futures_util::stream::iter(targets)
            .for_each_concurrent(CHECK_CONCURRENCY, |(key, urls)| async move {
                let mut health = probe(http, &urls, timeout, reach).await;
                if let Ok(mut inner) = self.inner.write() {
                    if let Some(p) = inner.providers.get_mut(&key) {
                        if p.announcement.urls == urls {
                            if health.status != HealthStatus::Ok {
                                health.last_ok = p.health.last_ok;
                            }
                            p.health = health;
                        }
                    }
                }
            })
            .await;
    }

    /// A snapshot of the providers.
    pub fn providers(&self) -> Vec<Provider> {
        self.inner.read().map(|i| i.providers.values().cloned().collect()).unwrap_or_default()
    }

    /// The healthy providers selling `model`, each with its price for it: the prices its
    /// `/v1/models` showed at the last health check (what it charges), else its signed price list.
    pub fn offers(&self, model: &str) -> Vec<Offer> {
        let Ok(inner) = self.inner.read() else { return Vec::new() };
        inner
            .providers
            .iter()
            .filter(|(_, p)| p.health.status == HealthStatus::Ok)
            .filter_map(|(key, p)| {
                let listed = inner.prices.get(key).map(|l| l.models.as_slice()).unwrap_or_default();
                let offer = p.health.models.iter().chain(listed).find(|o| o.id == model)?;
                Some(Offer {
                    pubkey: p.pubkey.to_hex(),
                    name: p.announcement.name.clone(),
                    url: p.health.url.clone().or_else(|| p.announcement.urls.first().cloned())?,
                    mints: p.announcement.mints.clone(),
                    sats_pricing: offer.sats_pricing.clone(),
                    latency_ms: p.health.latency_ms.unwrap_or(u64::MAX),
                })
            })
            .collect()
    }

    /// Each provider as `/v1/providers` shows it.
    pub fn to_json(&self) -> Vec<Value> {
        let Ok(inner) = self.inner.read() else { return Vec::new() };
        inner
            .providers
            .iter()
            .map(|(key, p)| {
                let listed = inner.prices.get(key).map(|l| l.models.as_slice());
                provider_json(p, listed)
            })
            .collect()
    }
}

fn provider_json(p: &Provider, listed: Option<&[ModelOffer]>) -> Value {
    let a = &p.announcement;
    // The price list the provider signed, else what its /v1/models showed.
    let offers: &[ModelOffer] = match listed {
        Some(l) if !l.is_empty() => l,
        _ => &p.health.models,
    };
    let pricing: Map<String, Value> = offers.iter().map(|o| (o.id.clone(), o.sats_pricing.clone())).collect();
    let last_seen = p.created_at.as_secs().max(p.health.last_ok.unwrap_or(0));
    json!({
        "id": a.d,
        "d": a.d,
        "pubkey": p.pubkey.to_hex(),
        "npub": p.pubkey.to_bech32().unwrap_or_default(),
        "name": a.name,
        "about": a.about,
        "urls": a.urls,
        "endpoint_url": p.health.url.clone().or_else(|| a.urls.first().cloned()),
        "mints": a.mints,
        "version": a.version,
        "models": offers.iter().map(|o| o.id.clone()).collect::<Vec<_>>(),
        "pricing": pricing,
        "health": p.health.status.as_str(),
        "latency_ms": p.health.latency_ms,
        "error": p.health.error,
        "last_seen": last_seen,
        "created_at": p.created_at.as_secs(),
        "event_id": p.event_id.to_hex(),
    })
}

/// Ranks `/v1/providers` entries: healthy first, then (for a model) cheapest, then fastest.
/// With a model, providers not offering it are left out.
pub fn rank(providers: &mut Vec<Value>, model: Option<&str>) {
    if let Some(model) = model {
        providers.retain(|p| p["models"].as_array().is_some_and(|m| m.iter().any(|id| id == model)));
    }
    let health_rank = |p: &Value| match p["health"].as_str() {
        Some("ok") => 0,
        Some("unknown") => 1,
        _ => 2,
    };
    let cost = |p: &Value| -> f64 {
        model
            .and_then(|m| p["pricing"].get(m))
            .and_then(|sats| serde_json::from_value::<Value>(sats.clone()).ok())
            .map(|sats| {
                ModelOffer { id: String::new(), name: None, context_length: None, sats_pricing: sats }.reference_cost()
            })
            .unwrap_or(f64::INFINITY)
    };
    let latency = |p: &Value| p["latency_ms"].as_u64().unwrap_or(u64::MAX);
    providers.sort_by(|a, b| {
        health_rank(a)
            .cmp(&health_rank(b))
            .then(cost(a).total_cmp(&cost(b)))
            .then(latency(a).cmp(&latency(b)))
            .then(a["name"].as_str().cmp(&b["name"].as_str()))
    });
}

/// A table for a person.
pub fn table(providers: &[Value], model: Option<&str>) -> String {
    let mut out = String::new();
    let price_col = if model.is_some() { "sats/1k+1k" } else { "models" };
    out.push_str(&format!(
        "{:<3} {:<24} {:<8} {:>8} {:>12}  {:<14} {}\n",
        "#", "name", "health", "ms", price_col, "pubkey", "url"
    ));
    for (i, p) in providers.iter().enumerate() {
        let price = match model {
            Some(m) => p["pricing"]
                .get(m)
                .map(|s| {
                    ModelOffer { id: String::new(), name: None, context_length: None, sats_pricing: s.clone() }
                        .reference_cost()
                })
                .map(|c| format!("{c:.3}"))
                .unwrap_or_else(|| "-".into()),
            None => p["models"].as_array().map(|m| m.len()).unwrap_or(0).to_string(),
        };
        let name: String = p["name"].as_str().unwrap_or("").chars().take(24).collect();
        let pubkey: String = p["pubkey"].as_str().unwrap_or("").chars().take(12).collect();
        out.push_str(&format!(
            "{:<3} {:<24} {:<8} {:>8} {:>12}  {:<14} {}\n",
            i + 1,
            name,
            p["health"].as_str().unwrap_or("?"),
            p["latency_ms"].as_u64().map(|l| l.to_string()).unwrap_or_else(|| "-".into()),
            price,
            format!("{pubkey}…"),
            p["endpoint_url"].as_str().unwrap_or("-"),
        ));
    }
    if providers.is_empty() {
        out.push_str("(no providers found)\n");
    }
    out
}

/// Which announced URLs the node contacts: `.onion` ones only with a Tor client; loopback and
/// private addresses only when `private` (`NOSTR_ALLOW_PRIVATE_HOSTS`: tests and private
/// networks). Announcements are anyone's: without this, a stranger could have the node probe its
/// operator's own network and read the outcome in `/v1/providers`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Reach {
    pub onion: bool,
    pub private: bool,
}

/// The HTTP client for health checks: no redirects, bounded connect and total time. With a Tor
/// client, `.onion` hosts (and, with TOR_OUTBOUND, all but loopback) go through Tor. Unless
/// `private`, names that resolve to no public address are not connected to.
pub fn health_client(
    timeout: Duration,
    tor: Option<&std::sync::Arc<crate::tor::Tor>>,
    private: bool,
) -> reqwest::Client {
    let builder = reqwest::Client::builder();
    let builder = match crate::tor::route(builder, tor) {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(error = %e, "health checks without Tor");
            reqwest::Client::builder()
        }
    };
    let builder = if private { builder } else { builder.dns_resolver(crate::lnurl::public_only_resolver()) };
    builder
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(timeout)
        .timeout(timeout)
        .user_agent(concat!("routstr-node/", env!("CARGO_PKG_VERSION")))
        .build()
        .unwrap_or_default()
}

/// The base of an announced URL: `https://x/`, `https://x/v1` → `https://x`. `None` for anything
/// but http(s), for onion hosts unless `reach.onion` (they need Tor), for loopback and private
/// addresses unless `reach.private`, and for URLs with a query or fragment (the node appends
/// its own paths).
pub fn probe_base(url: &str, reach: Reach) -> Option<String> {
    let parsed = reqwest::Url::parse(url).ok()?;
    let host = parsed.host_str()?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.query().is_some() || parsed.fragment().is_some() {
        return None;
    }
    if !reach.onion && crate::tor::is_onion(&parsed) {
        return None;
    }
    if !reach.private && crate::lnurl::is_local_host(&crate::lnurl::normalize_host(host)) {
        return None;
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return None;
    }
    let trimmed = url.trim_end_matches('/');
    Some(trimmed.strip_suffix("/v1").unwrap_or(trimmed).to_owned())
}

async fn probe(http: &reqwest::Client, urls: &[String], timeout: Duration, reach: Reach) -> Health {
    let now = Timestamp::now().as_secs();
    let mut error = None;
    for url in urls.iter().take(MAX_PROBED_URLS) {
        let Some(base) = probe_base(url, reach) else {
            error.get_or_insert_with(|| format!("{url}: not a public http(s) URL the node may reach"));
            continue;
        };
        let timeout = match reqwest::Url::parse(&base).is_ok_and(|u| crate::tor::is_onion(&u)) {
            true => timeout.max(ONION_MIN_TIMEOUT),
            false => timeout,
        };
        let started = Instant::now();
        match get_json(http, &format!("{base}/v1/info"), INFO_BODY_LIMIT, timeout).await {
            Ok(info) if info.is_object() => {
                let latency_ms = started.elapsed().as_millis() as u64;
                let models = match get_json(http, &format!("{base}/v1/models"), MODELS_BODY_LIMIT, timeout).await {
                    Ok(listing) => events::offers_from_listing(&listing),
                    Err(_) => Vec::new(),
                };
                return Health {
                    status: HealthStatus::Ok,
                    latency_ms: Some(latency_ms),
                    url: Some(url.clone()),
                    models,
                    error: None,
                    checked_at: Some(now),
                    last_ok: Some(now),
                };
            }
            Ok(_) => error = Some(format!("{url}: /v1/info is not a JSON object")),
            Err(e) => error = Some(format!("{url}: {e}")),
        }
    }
    let status =
        if urls.iter().any(|u| probe_base(u, reach).is_some()) { HealthStatus::Down } else { HealthStatus::Unknown };
    Health { status, error, checked_at: Some(now), ..Health::default() }
}

/// GET a JSON document of at most `limit` bytes within `timeout`.
pub async fn get_json(http: &reqwest::Client, url: &str, limit: usize, timeout: Duration) -> Result<Value, String> {
    let fetch = async {
        let mut resp = http.get(url).timeout(timeout).send().await.map_err(|e| short_error(&e))?;
        if !resp.status().is_success() {
            return Err(format!("HTTP {}", resp.status().as_u16()));
        }
        if resp.content_length().is_some_and(|n| n as usize > limit) {
            return Err("response too large".to_owned());
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| short_error(&e))? {
            if body.len() + chunk.len() > limit {
                return Err("response too large".to_owned());
            }
            body.extend_from_slice(&chunk);
        }
        serde_json::from_slice(&body).map_err(|_| "not JSON".to_owned())
    };
    tokio::time::timeout(timeout, fetch).await.map_err(|_| "timed out".to_owned())?
}

fn short_error(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".into()
    } else if e.is_connect() {
        "connection failed".into()
    } else {
        "request failed".into()
    }
}

#[cfg(test)]
mod tests {
    use nostr_sdk::prelude::{EventBuilder, Keys};

    use super::*;

    fn announcement(d: &str, name: &str) -> Announcement {
        Announcement {
            d: d.into(),
            urls: vec!["http://127.0.0.1:1".into()],
            mints: vec![],
            version: "1.0.0".into(),
            name: name.into(),
            about: String::new(),
        }
    }

    fn forged(event: &Event, content: &str) -> Event {
        let mut json: Value = serde_json::to_value(event).unwrap();
        json["content"] = json!(content);
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn forged_future_stale_and_own_are_ignored() {
        let own = Keys::generate();
        let registry = Registry::new(Some(own.public_key()));
        let keys = Keys::generate();
        let now = Timestamp::now();
        let newer = announcement("p", "new").builder(now - 10).sign_with_keys(&keys).unwrap();
        let older = announcement("p", "old").builder(now - 100).sign_with_keys(&keys).unwrap();
        assert_eq!(registry.ingest(&newer, now), Ingest::Accepted);
        assert_eq!(registry.ingest(&newer, now), Ingest::Duplicate);
        assert_eq!(registry.ingest(&older, now), Ingest::Stale);
        assert_eq!(registry.ingest(&forged(&newer, r#"{"name":"evil"}"#), now), Ingest::BadSignature);
        let future = announcement("p", "future").builder(now + 3600).sign_with_keys(&keys).unwrap();
        assert_eq!(registry.ingest(&future, now), Ingest::FromTheFuture);
        let mine = announcement("p", "me").builder(now).sign_with_keys(&own).unwrap();
        assert_eq!(registry.ingest(&mine, now), Ingest::Own);
        let note = EventBuilder::text_note("hi").sign_with_keys(&keys).unwrap();
        assert_eq!(registry.ingest(&note, now), Ingest::Ignored);
        let list = registry.to_json();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0]["name"], "new");
        // Another d of the same key is another provider.
        let other = announcement("q", "second").builder(now).sign_with_keys(&keys).unwrap();
        assert_eq!(registry.ingest(&other, now), Ingest::Accepted);
        assert_eq!(registry.len(), 2);
    }

    #[test]
    fn one_key_cannot_fill_the_registry() {
        let registry = Registry::new(None);
        let (flooder, honest) = (Keys::generate(), Keys::generate());
        let now = Timestamp::now();
        let outcomes: Vec<Ingest> = (0..MAX_PER_PUBKEY + 5)
            .map(|i| {
                let event = announcement(&format!("d{i}"), "flood").builder(now).sign_with_keys(&flooder).unwrap();
                registry.ingest(&event, now)
            })
            .collect();
        assert_eq!(outcomes.iter().filter(|o| **o == Ingest::Accepted).count(), MAX_PER_PUBKEY);
        assert_eq!(outcomes.last(), Some(&Ingest::Full));
        let event = announcement("mine", "honest").builder(now).sign_with_keys(&honest).unwrap();
        assert_eq!(registry.ingest(&event, now), Ingest::Accepted, "another key still gets in");
        // A newer announcement of a key's existing provider is still taken.
        let update = announcement("d0", "flood v2").builder(now + 1).sign_with_keys(&flooder).unwrap();
        assert_eq!(registry.ingest(&update, now + 1), Ingest::Accepted);
    }

    #[test]
    fn price_lists_attach_to_their_own_announcement_only() {
        let registry = Registry::new(None);
        let keys = Keys::generate();
        let now = Timestamp::now();
        let ann = announcement("p", "n").builder(now).sign_with_keys(&keys).unwrap();
        registry.ingest(&ann, now);
        let offers = vec![ModelOffer {
            id: "m1".into(),
            name: None,
            context_length: None,
            sats_pricing: json!({"prompt": 0.001, "completion": 0.002, "request": 0.0}),
        }];
        let list = events::models_builder(&keys.public_key(), "p", &offers, now).sign_with_keys(&keys).unwrap();
        assert_eq!(registry.ingest(&list, now), Ingest::Accepted);
        // A list claiming another provider's announcement is ignored.
        let other = Keys::generate();
        let mut tags = events::models_tags(&other.public_key(), "p", &offers);
        tags[1][1] = events::coordinate(&keys.public_key(), "p");
        let hijack = EventBuilder::new(Kind::from(MODELS_KIND), events::models_content(&offers))
            .tags(tags.into_iter().map(|t| nostr_sdk::prelude::Tag::parse(t).unwrap()))
            .sign_with_keys(&other)
            .unwrap();
        assert_eq!(registry.ingest(&hijack, now), Ingest::Ignored);
        let mut view = registry.to_json();
        assert_eq!(view[0]["models"], json!(["m1"]));
        rank(&mut view, Some("m1"));
        assert_eq!(view.len(), 1);
        rank(&mut view, Some("absent"));
        assert!(view.is_empty());
    }

    #[test]
    fn ranking_and_probe_urls() {
        let mut list = vec![
            json!({"name": "down", "health": "down", "models": ["m"], "pricing": {"m": {"prompt": 0.0}}}),
            json!({"name": "slow", "health": "ok", "latency_ms": 900, "models": ["m"], "pricing": {"m": {"prompt": 0.001}}}),
            json!({"name": "fast", "health": "ok", "latency_ms": 10, "models": ["m"], "pricing": {"m": {"prompt": 0.001}}}),
            json!({"name": "cheap", "health": "ok", "latency_ms": 500, "models": ["m"], "pricing": {"m": {"prompt": 0.0001}}}),
        ];
        rank(&mut list, Some("m"));
        let names: Vec<&str> = list.iter().map(|p| p["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["cheap", "fast", "slow", "down"]);
        assert!(table(&list, Some("m")).contains("cheap"));
        for onion in [false, true] {
            let anywhere = Reach { onion, private: true };
            assert_eq!(probe_base("https://x.example/v1/", anywhere).as_deref(), Some("https://x.example"));
            assert_eq!(probe_base("http://127.0.0.1:8000", anywhere).as_deref(), Some("http://127.0.0.1:8000"));
            assert_eq!(probe_base("file:///etc/passwd", anywhere), None);
            assert_eq!(probe_base("ftp://x.example", anywhere), None);
            assert_eq!(probe_base("http://user:pw@x.example", anywhere), None);
            // The node appends its own paths: a fragment or query would swallow them.
            assert_eq!(probe_base("http://x.example/any/path?q#", anywhere), None);
            let public = Reach { onion, private: false };
            assert_eq!(probe_base("https://x.example/v1/", public).as_deref(), Some("https://x.example"));
            for local in [
                "http://127.0.0.1:8000",
                "http://10.0.0.5",
                "http://169.254.169.254/",
                "http://[::1]:80",
                "http://localhost:1",
                "http://a.localhost",
            ] {
                assert_eq!(probe_base(local, public), None, "{local}");
            }
        }
        let onion = format!("http://{}.onion", "a".repeat(56));
        let (without_tor, with_tor) = (Reach { onion: false, private: false }, Reach { onion: true, private: false });
        assert_eq!(probe_base(&onion, without_tor), None, "onion needs Tor");
        assert_eq!(probe_base(&format!("{onion}/v1"), with_tor), Some(onion.clone()));
        assert_eq!(probe_base(&format!("https://{}.ONION/", "b".repeat(56)), without_tor), None);
    }
}
