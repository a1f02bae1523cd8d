//! The two events a node publishes, built and parsed: the provider announcement (kind 38421,
//! PROTOCOL.md §5) and the models-and-prices list (kind 38450, docs/nips/routstr-models.md).

use nostr_sdk::prelude::{Event, EventBuilder, Kind, PublicKey, Tag, Timestamp};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Routstr provider announcement (RIP-02, proposed NIP-91).
pub const ANNOUNCEMENT_KIND: u16 = 38421;
/// Provider models and prices (this repository's docs/nips/routstr-models.md).
pub const MODELS_KIND: u16 = 38450;
/// The single-letter tag carrying a model id, filterable as `#m`.
pub const MODEL_TAG: &str = "m";

/// At most this many models in one price list (relays cap event sizes).
pub const MAX_MODELS: usize = 500;
const MAX_URLS: usize = 8;
const MAX_MINTS: usize = 16;
const MAX_FIELD: usize = 1024;

/// The content and tags of a 38421, in the order they are published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    pub d: String,
    /// Clearnet URL first, then the onion URL.
    pub urls: Vec<String>,
    pub mints: Vec<String>,
    pub version: String,
    pub name: String,
    pub about: String,
}

#[derive(Serialize, Deserialize, Default)]
struct NameAbout {
    #[serde(default)]
    name: String,
    #[serde(default)]
    about: String,
}

impl Announcement {
    /// `d`, one `u` per URL, one `mint` per mint, `version`: exactly PROTOCOL.md §5.
    pub fn tags(&self) -> Vec<Vec<String>> {
        let mut tags = vec![vec!["d".to_owned(), self.d.clone()]];
        tags.extend(self.urls.iter().map(|u| vec!["u".to_owned(), u.clone()]));
        tags.extend(self.mints.iter().map(|m| vec!["mint".to_owned(), m.clone()]));
        tags.push(vec!["version".to_owned(), self.version.clone()]);
        tags
    }

    /// `{"name": …, "about": …}`.
    pub fn content(&self) -> String {
        serde_json::to_string(&NameAbout { name: self.name.clone(), about: self.about.clone() }).unwrap_or_default()
    }

    pub fn builder(&self, created_at: Timestamp) -> EventBuilder {
        builder(ANNOUNCEMENT_KIND, self.content(), self.tags(), created_at)
    }

    /// Whether `event` already says exactly this.
    pub fn matches(&self, event: &Event) -> bool {
        event.kind == Kind::from(ANNOUNCEMENT_KIND) && event.content == self.content() && tags_of(event) == self.tags()
    }

    /// Reads a 38421 (any signer's). Over-long fields and lists are cut.
    pub fn parse(event: &Event) -> Option<Announcement> {
        if event.kind != Kind::from(ANNOUNCEMENT_KIND) {
            return None;
        }
        let values = |name: &str, max: usize| -> Vec<String> {
            event
                .tags
                .iter()
                .filter(|t| t.as_slice().first().map(String::as_str) == Some(name))
                .filter_map(|t| t.as_slice().get(1))
                .filter(|v| !v.is_empty() && v.len() <= MAX_FIELD)
                .take(max)
                .cloned()
                .collect()
        };
        let content: NameAbout = serde_json::from_str(&event.content).unwrap_or_default();
        Some(Announcement {
            d: event.tags.identifier().unwrap_or_default().chars().take(256).collect(),
            urls: values("u", MAX_URLS),
            mints: values("mint", MAX_MINTS),
            version: values("version", 1).into_iter().next().unwrap_or_default(),
            name: content.name.chars().take(256).collect(),
            about: content.about.chars().take(MAX_FIELD).collect(),
        })
    }
}

/// One model in a price list: its id and its `sats_pricing` as `/v1/models` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelOffer {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_length: Option<u64>,
    pub sats_pricing: Value,
}

/// The fields of a model's `sats_pricing` (PROTOCOL.md §2); others are dropped.
const PRICE_FIELDS: [&str; 11] = [
    "prompt",
    "completion",
    "request",
    "image",
    "web_search",
    "internal_reasoning",
    "input_cache_read",
    "input_cache_write",
    "max_prompt_cost",
    "max_completion_cost",
    "max_cost",
];
/// Longest model id or name kept.
const MAX_MODEL_TEXT: usize = 256;

impl ModelOffer {
    /// The offer as a stranger may hand it to us, bounded: an id of sensible length, a name cut
    /// short, and a `sats_pricing` of the known fields' numbers (anything else in it is
    /// dropped), so no provider makes the registry large. `None` without an id or prices.
    fn bounded(mut self) -> Option<ModelOffer> {
        if self.id.is_empty() || self.id.len() > MAX_MODEL_TEXT {
            return None;
        }
        if let Some(name) = &mut self.name {
            if let Some((cut, _)) = name.char_indices().nth(MAX_MODEL_TEXT) {
                name.truncate(cut);
            }
        }
        let given = self.sats_pricing.as_object()?;
        let prices: serde_json::Map<String, Value> = PRICE_FIELDS
            .iter()
            .filter_map(|field| given.get(*field).filter(|v| v.is_number()).map(|v| ((*field).to_owned(), v.clone())))
            .collect();
        self.sats_pricing = Value::Object(prices);
        Some(self)
    }

    fn price(&self, field: &str) -> f64 {
        self.sats_pricing.get(field).and_then(Value::as_f64).unwrap_or(0.0)
    }

    /// Sats for a request of 1,000 prompt and 1,000 completion tokens: what ranking compares.
    pub fn reference_cost(&self) -> f64 {
        self.price("request") + 1000.0 * (self.price("prompt") + self.price("completion"))
    }
}

#[derive(Serialize, Deserialize, Default)]
struct ModelsContent {
    #[serde(default)]
    models: Vec<ModelOffer>,
}

/// The models a node sells, from its `/v1/models` JSON (those with a sats price), sorted by id.
pub fn offers_from_listing(listing: &Value) -> Vec<ModelOffer> {
    let mut offers: Vec<ModelOffer> = listing
        .get("data")
        .and_then(Value::as_array)
        .map(|data| {
            data.iter()
                .filter_map(|m| {
                    let id = m.get("id")?.as_str()?.to_owned();
                    let sats_pricing = m.get("sats_pricing").filter(|p| p.is_object())?.clone();
                    ModelOffer {
                        name: m.get("name").and_then(Value::as_str).filter(|n| *n != id).map(str::to_owned),
                        context_length: m.get("context_length").and_then(Value::as_u64),
                        id,
                        sats_pricing,
                    }
                    .bounded()
                })
                .collect()
        })
        .unwrap_or_default();
    offers.sort_by(|a, b| a.id.cmp(&b.id));
    offers.dedup_by(|a, b| a.id == b.id);
    offers.truncate(MAX_MODELS);
    offers
}

/// The `a` tag value pointing at a provider's announcement.
pub fn coordinate(pubkey: &PublicKey, d: &str) -> String {
    format!("{ANNOUNCEMENT_KIND}:{}:{d}", pubkey.to_hex())
}

/// The price list's tags: `d` (the announcement's), `a` (the announcement), one `m` per model.
pub fn models_tags(pubkey: &PublicKey, d: &str, offers: &[ModelOffer]) -> Vec<Vec<String>> {
    let mut tags = vec![vec!["d".to_owned(), d.to_owned()], vec!["a".to_owned(), coordinate(pubkey, d)]];
    tags.extend(offers.iter().map(|o| vec![MODEL_TAG.to_owned(), o.id.clone()]));
    tags
}

pub fn models_content(offers: &[ModelOffer]) -> String {
    serde_json::to_string(&ModelsContent { models: offers.to_vec() }).unwrap_or_default()
}

pub fn models_builder(pubkey: &PublicKey, d: &str, offers: &[ModelOffer], created_at: Timestamp) -> EventBuilder {
    builder(MODELS_KIND, models_content(offers), models_tags(pubkey, d, offers), created_at)
}

/// A price list's `d`, `a` and models.
pub fn parse_models(event: &Event) -> Option<(String, Option<String>, Vec<ModelOffer>)> {
    if event.kind != Kind::from(MODELS_KIND) {
        return None;
    }
    let content: ModelsContent = serde_json::from_str(&event.content).ok()?;
    let a = event
        .tags
        .iter()
        .find(|t| t.as_slice().first().map(String::as_str) == Some("a"))
        .and_then(|t| t.as_slice().get(1).cloned());
    let mut models: Vec<ModelOffer> = content.models.into_iter().filter_map(ModelOffer::bounded).collect();
    models.truncate(MAX_MODELS);
    Some((event.tags.identifier().unwrap_or_default().to_owned(), a, models))
}

/// Whether the model set changed or any price moved by more than `threshold` (0.05 = 5 %).
pub fn prices_moved(old: &[ModelOffer], new: &[ModelOffer], threshold: f64) -> bool {
    if old.len() != new.len() {
        return true;
    }
    old.iter().zip(new).any(|(a, b)| {
        a.id != b.id
            || ["prompt", "completion", "request"].iter().any(|f| relative_change(a.price(f), b.price(f)) > threshold)
    })
}

fn relative_change(old: f64, new: f64) -> f64 {
    if old == new {
        0.0
    } else if old == 0.0 {
        f64::INFINITY
    } else {
        ((new - old) / old).abs()
    }
}

pub fn tags_of(event: &Event) -> Vec<Vec<String>> {
    event.tags.iter().map(|t| t.as_slice().to_vec()).collect()
}

fn builder(kind: u16, content: String, tags: Vec<Vec<String>>, created_at: Timestamp) -> EventBuilder {
    EventBuilder::new(Kind::from(kind), content)
        .tags(tags.into_iter().filter_map(|t| Tag::parse(t).ok()))
        .custom_created_at(created_at)
}

#[cfg(test)]
mod tests {
    use nostr_sdk::prelude::Keys;
    use serde_json::json;

    use super::*;

    fn announcement() -> Announcement {
        Announcement {
            d: "abc".into(),
            urls: vec!["https://node.example".into(), format!("http://{}.onion", "a".repeat(56))],
            mints: vec!["https://mint.example".into()],
            version: "0.1.0".into(),
            name: "n".into(),
            about: "a \"quoted\" node".into(),
        }
    }

    #[test]
    fn announcement_is_exact_and_round_trips() {
        let keys = Keys::generate();
        let a = announcement();
        let event = a.builder(Timestamp::from_secs(1_700_000_000)).sign_with_keys(&keys).unwrap();
        let json: Value = serde_json::from_str(&serde_json::to_string(&event).unwrap()).unwrap();
        assert_eq!(json["kind"], 38421);
        assert_eq!(
            json["tags"],
            json!([
                ["d", "abc"],
                ["u", "https://node.example"],
                ["u", format!("http://{}.onion", "a".repeat(56))],
                ["mint", "https://mint.example"],
                ["version", "0.1.0"]
            ])
        );
        assert_eq!(json["content"], r#"{"name":"n","about":"a \"quoted\" node"}"#);
        assert!(a.matches(&event));
        assert_eq!(Announcement::parse(&event).unwrap(), a);
        let mut changed = a.clone();
        changed.mints.push("https://mint2.example".into());
        assert!(!changed.matches(&event));
    }

    #[test]
    fn models_event_links_and_tags_each_model() {
        let keys = Keys::generate();
        let listing = json!({"data": [
            {"id": "b-model", "name": "b-model", "sats_pricing": {"prompt": 0.001, "completion": 0.002, "request": 0.0}},
            {"id": "a-model", "name": "A", "context_length": 1000, "sats_pricing": {"prompt": 0.01, "completion": 0.02, "request": 1.0}},
            {"id": "unpriced"}
        ]});
        let offers = offers_from_listing(&listing);
        assert_eq!(offers.iter().map(|o| o.id.as_str()).collect::<Vec<_>>(), ["a-model", "b-model"]);
        let event = models_builder(&keys.public_key(), "abc", &offers, Timestamp::now()).sign_with_keys(&keys).unwrap();
        assert_eq!(
            tags_of(&event),
            vec![
                vec!["d".to_owned(), "abc".to_owned()],
                vec!["a".to_owned(), format!("38421:{}:abc", keys.public_key().to_hex())],
                vec!["m".to_owned(), "a-model".to_owned()],
                vec!["m".to_owned(), "b-model".to_owned()],
            ]
        );
        let (d, a, models) = parse_models(&event).unwrap();
        assert_eq!((d.as_str(), a.unwrap()), ("abc", coordinate(&keys.public_key(), "abc")));
        assert_eq!(models, offers);
        assert_eq!(models[0].reference_cost(), 1.0 + 1000.0 * 0.03);
    }

    #[test]
    fn a_strangers_model_list_is_kept_small() {
        let mut pricing = serde_json::Map::new();
        pricing.insert("prompt".into(), json!(0.001));
        pricing.insert("padding".into(), json!("x".repeat(1_000_000)));
        pricing.insert("n".repeat(100), json!(1.0));
        for i in 0..100 {
            pricing.insert(format!("f{i:03}"), json!(i));
        }
        let listing = json!({"data": [
            {"id": "m", "name": "N".repeat(10_000), "sats_pricing": pricing},
            {"id": "x".repeat(300), "sats_pricing": {"prompt": 1.0}},
        ]});
        let offers = offers_from_listing(&listing);
        assert_eq!(offers.len(), 1, "an id too long is dropped");
        let kept = offers[0].sats_pricing.as_object().unwrap();
        assert_eq!(kept.keys().collect::<Vec<_>>(), ["prompt"], "only the known fields, as numbers");
        assert_eq!(offers[0].name.as_ref().map(|n| n.chars().count()), Some(MAX_MODEL_TEXT));
        assert!(serde_json::to_string(&offers).unwrap().len() < 2_000);
    }

    #[test]
    fn price_threshold() {
        let offer = |id: &str, prompt: f64| ModelOffer {
            id: id.into(),
            name: None,
            context_length: None,
            sats_pricing: json!({"prompt": prompt, "completion": 0.002, "request": 0.0}),
        };
        let old = vec![offer("m", 0.001)];
        assert!(!prices_moved(&old, &[offer("m", 0.00104)], 0.05));
        assert!(prices_moved(&old, &[offer("m", 0.00106)], 0.05));
        assert!(prices_moved(&old, &[offer("n", 0.001)], 0.05));
        assert!(prices_moved(&old, &[], 0.05));
        assert!(prices_moved(&[offer("m", 0.0)], &[offer("m", 0.001)], 0.05));
    }
}
