//! The model catalog: which models are served, by which upstream, at what price.
//!
//! Sources, in order of precedence: the local models file (`MODELS_PATH`, OpenRouter schema),
//! each upstream's `/v1/models` (when it carries `pricing`), and the `FIXED_*` settings for any
//! model without a known price. `FIXED_PRICING=true` uses the fixed prices for every model.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::error::ApiError;
use crate::pricing::{BtcRate, Markup, MsatPrices, UsdPrices};
use crate::upstream::Upstream;

#[derive(Debug, Clone)]
pub struct ModelRoute {
    /// The name clients use (shared, as `raw`: routes are cloned on every request).
    pub id: Arc<str>,
    /// The name sent upstream.
    pub upstream_model: Arc<str>,
    /// Index into the node's upstreams.
    pub upstream: usize,
    /// USD prices before markup; `None` when unknown (fixed prices apply).
    pub usd: Option<UsdPrices>,
    pub context_length: Option<u64>,
    pub max_completion_tokens: Option<u64>,
    /// The model object as its source gave it, shown in `/v1/models` (shared: routes are
    /// cloned on every request).
    pub raw: Arc<Value>,
}

/// How prices are set, node-wide.
#[derive(Debug, Clone)]
pub struct PricePolicy {
    pub fixed_only: bool,
    pub fixed: MsatPrices,
    pub default_max_completion_tokens: u64,
}

impl PricePolicy {
    /// The msat prices of a route: fixed, or its USD prices with the upstream's markup at `rate`.
    pub fn msat_prices(
        &self,
        route: &ModelRoute,
        markup: Markup,
        rate: Option<BtcRate>,
    ) -> Result<MsatPrices, ApiError> {
        match (&route.usd, self.fixed_only) {
            (Some(usd), false) => {
                let rate = rate.ok_or(ApiError::PriceUnavailable)?;
                Ok(MsatPrices::from_usd(&usd.with_markup(markup), rate))
            }
            (_, true) => Ok(self.fixed.clone()),
            // A model without a price is sold at the fixed prices only when they charge per
            // token: a flat fee for an unbounded amount of tokens would sell at a loss.
            (None, false) if self.fixed.prompt_per_mtok > 0 || self.fixed.completion_per_mtok > 0 => {
                Ok(self.fixed.clone())
            }
            (None, false) => Err(ApiError::Unpriced(route.id.to_string())),
        }
    }
}

#[derive(Debug, Default)]
pub struct Catalog {
    routes: HashMap<String, Vec<ModelRoute>>,
    /// Display order of public ids.
    order: Vec<String>,
    /// Upstreams whose model list is unknown (it could not be fetched): they get any model.
    open_upstreams: Vec<usize>,
    /// The upstreams the routes' indices point into (swapped together with the routes).
    upstreams: Arc<Vec<Arc<Upstream>>>,
}

fn model_id(v: &Value) -> Option<&str> {
    v.get("id").and_then(Value::as_str).filter(|s| !s.is_empty())
}

fn route_from(id: &str, upstream_model: &str, upstream: usize, v: &Value) -> ModelRoute {
    ModelRoute {
        id: id.into(),
        upstream_model: upstream_model.into(),
        upstream,
        usd: v.get("pricing").and_then(UsdPrices::from_json),
        context_length: v.get("context_length").and_then(Value::as_u64),
        max_completion_tokens: v.pointer("/top_provider/max_completion_tokens").and_then(Value::as_u64),
        raw: Arc::new(v.clone()),
    }
}

impl Catalog {
    /// Builds the catalog. `listings[i]` is upstream i's `/v1/models` data, `None` if unknown.
    pub fn build(upstreams: &[Arc<Upstream>], listings: &[Option<Vec<Value>>], file_models: &[Value]) -> Catalog {
        let mut catalog = Catalog::default();
        for (index, upstream) in upstreams.iter().enumerate() {
            match listings.get(index).and_then(Option::as_ref) {
                Some(list) => {
                    for v in list {
                        let Some(id) = model_id(v) else { continue };
                        if upstream.models.is_empty() || upstream.models.iter().any(|m| m == id) {
                            catalog.add(route_from(id, id, index, v));
                        }
                    }
                }
                None if !upstream.models.is_empty() => {
                    for id in &upstream.models {
                        catalog.add(route_from(id, id, index, &json!({ "id": id })));
                    }
                }
                None => catalog.open_upstreams.push(index),
            }
            for (alias, target) in &upstream.aliases {
                let base = catalog
                    .routes
                    .get(target)
                    .and_then(|rs| rs.iter().find(|r| r.upstream == index))
                    .map(|r| (*r.raw).clone())
                    .unwrap_or_else(|| json!({ "id": target }));
                catalog.add(route_from(alias, target, index, &base));
            }
        }
        for v in file_models {
            let Some(id) = model_id(v) else { continue };
            if let Some(routes) = catalog.routes.get_mut(id) {
                for r in routes.iter_mut() {
                    let upstream_model = r.upstream_model.clone();
                    *r = route_from(id, &upstream_model, r.upstream, v);
                }
                continue;
            }
            let named =
                v.get("upstream").and_then(Value::as_str).and_then(|n| upstreams.iter().position(|u| u.name == n));
            let upstream = named.or_else(|| catalog.open_upstreams.first().copied()).or(if upstreams.is_empty() {
                None
            } else {
                Some(0)
            });
            if let Some(upstream) = upstream {
                catalog.add(route_from(id, id, upstream, v));
            }
        }
        catalog
    }

    /// Keeps the upstreams this catalog was built from, so routes and upstreams swap as one.
    pub fn with_upstreams(mut self, upstreams: Arc<Vec<Arc<Upstream>>>) -> Catalog {
        self.upstreams = upstreams;
        self
    }

    pub fn upstreams(&self) -> &Arc<Vec<Arc<Upstream>>> {
        &self.upstreams
    }

    /// The operator's price overrides (model id → OpenRouter `pricing`, USD per token), over
    /// every other source. Overrides of models not served are ignored.
    pub fn apply_prices(&mut self, prices: &serde_json::Map<String, Value>) {
        for (id, pricing) in prices {
            let Some(usd) = UsdPrices::from_json(pricing) else { continue };
            if let Some(routes) = self.routes.get_mut(id) {
                for r in routes.iter_mut() {
                    let mut raw = (*r.raw).clone();
                    if !raw.is_object() {
                        raw = json!({ "id": id });
                    }
                    raw["pricing"] = pricing.clone();
                    r.raw = Arc::new(raw);
                    r.usd = Some(usd.clone());
                }
            }
        }
    }

    fn add(&mut self, route: ModelRoute) {
        let routes = self.routes.entry(route.id.to_string()).or_default();
        if routes.is_empty() {
            self.order.push(route.id.to_string());
        }
        if !routes.iter().any(|r| r.upstream == route.upstream) {
            routes.push(route);
        }
    }

    /// Every way to serve `model`, in preference order. Empty if it is not served.
    pub fn routes(&self, model: &str) -> Vec<ModelRoute> {
        let mut routes = self.routes.get(model).cloned().unwrap_or_default();
        for &upstream in &self.open_upstreams {
            if !routes.iter().any(|r| r.upstream == upstream) {
                routes.push(route_from(model, model, upstream, &json!({ "id": model })));
            }
        }
        routes
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// `/v1/models`: the OpenRouter objects with marked-up `pricing` and `sats_pricing`.
    pub fn to_json(&self, upstreams: &[Arc<Upstream>], policy: &PricePolicy, rate: Option<BtcRate>) -> Value {
        let data: Vec<Value> = self
            .order
            .iter()
            .filter_map(|id| self.routes.get(id)?.first())
            .map(|route| {
                let markup = upstreams.get(route.upstream).map(|u| u.markup).unwrap_or(Markup::NONE);
                let mut v = (*route.raw).clone();
                if !v.is_object() {
                    v = json!({});
                }
                v["id"] = json!(route.id);
                if v.get("name").is_none() {
                    v["name"] = json!(route.id);
                }
                v["object"] = json!("model");
                let msat = policy.msat_prices(route, markup, rate);
                match (&route.usd, policy.fixed_only, &msat, rate) {
                    (Some(usd), false, _, _) => v["pricing"] = usd.with_markup(markup).charged().to_json(),
                    // Sold at fixed sats prices: their worth in USD at today's rate.
                    (_, _, Ok(msat), Some(rate)) => v["pricing"] = msat.to_usd(rate).to_json(),
                    _ => {
                        if let Some(obj) = v.as_object_mut() {
                            obj.remove("pricing");
                        }
                    }
                }
                if let Ok(msat) = &msat {
                    v["sats_pricing"] = sats_pricing(msat, route, policy);
                }
                v
            })
            .collect();
        json!({ "object": "list", "data": data })
    }
}

fn sats_pricing(p: &MsatPrices, route: &ModelRoute, policy: &PricePolicy) -> Value {
    let per_token = MsatPrices::sats_per_token;
    let context = route.context_length.unwrap_or(0);
    let completion = route.max_completion_tokens.unwrap_or(policy.default_max_completion_tokens);
    let max_prompt = p.max_cost(context, 0).input_msats;
    let max_completion = p.max_cost(0, completion).output_msats;
    let max_total = p.max_cost(context, completion).total_msats;
    json!({
        "prompt": per_token(p.prompt_per_mtok),
        "completion": per_token(p.completion_per_mtok),
        "request": crate::pricing::msat_to_sats(p.request_msat),
        "image": 0.0,
        "web_search": 0.0,
        "internal_reasoning": 0.0,
        "input_cache_read": per_token(p.cache_read_per_mtok),
        "input_cache_write": per_token(p.cache_write_per_mtok),
        "max_prompt_cost": crate::pricing::msat_to_sats(max_prompt),
        "max_completion_cost": crate::pricing::msat_to_sats(max_completion),
        "max_cost": crate::pricing::msat_to_sats(max_total),
    })
}

/// Reads the models file: `{"data":[…]}`, `{"models":[…]}` or a bare array.
pub fn load_models_file(path: &Path) -> Result<Vec<Value>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read models file {}: {e}", path.display()))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| format!("invalid models file {}: {e}", path.display()))?;
    listing_from_json(v).ok_or_else(|| format!("models file {} has no model list", path.display()))
}

fn listing_from_json(v: Value) -> Option<Vec<Value>> {
    match v {
        Value::Array(list) => Some(list),
        Value::Object(mut obj) => match obj.remove("data").or_else(|| obj.remove("models")) {
            Some(Value::Array(list)) => Some(list),
            _ => None,
        },
        _ => None,
    }
}

/// Largest `/models` answer read from an upstream.
const MAX_LISTING_BYTES: usize = 16 * 1024 * 1024;

/// Fetches an upstream's `/models`; `None` when it cannot be had.
pub async fn fetch_listing(client: &reqwest::Client, upstream: &Upstream) -> Option<Vec<Value>> {
    let mut req = client.get(upstream.url_for("models", None)).timeout(Duration::from_secs(15));
    if let Some(key) = &upstream.api_key {
        req = req.bearer_auth(key);
    }
    let result = async {
        let resp = req.send().await.map_err(|e| e.without_url().to_string())?;
        let resp = resp.error_for_status().map_err(|e| e.without_url().to_string())?;
        let body = crate::proxy::client::UpstreamResponse::from(resp)
            .read_whole(MAX_LISTING_BYTES)
            .await
            .map_err(|e| e.to_string())?;
        let v: Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
        listing_from_json(v).ok_or_else(|| "no model list in the answer".to_owned())
    }
    .await;
    match result {
        Ok(list) => Some(list),
        Err(reason) => {
            tracing::warn!(upstream = %upstream.name, %reason, "could not list the upstream's models");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::UpstreamSpec;

    fn upstream(name: &str, models: &[&str], aliases: &[(&str, &str)]) -> Arc<Upstream> {
        Arc::new(
            Upstream::from_spec(
                UpstreamSpec {
                    name: name.into(),
                    base_url: "http://127.0.0.1:1/v1".into(),
                    api_key: None,
                    api_key_env: None,
                    models: models.iter().map(|s| s.to_string()).collect(),
                    aliases: aliases.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect(),
                    markup: 1.5,
                },
                Markup::NONE,
            )
            .unwrap(),
        )
    }

    fn policy(fixed_only: bool) -> PricePolicy {
        PricePolicy { fixed_only, fixed: MsatPrices::fixed(1.0, 0.0, 0.0), default_max_completion_tokens: 4096 }
    }

    #[test]
    fn routes_failover_order_aliases_and_file_overrides() {
        let ups = vec![upstream("a", &[], &[("fast", "m1")]), upstream("b", &[], &[])];
        let listing_a = vec![
            json!({"id": "m1", "pricing": {"prompt": "0.000001", "completion": "0.000002"}, "context_length": 1000}),
        ];
        let listing_b = vec![json!({"id": "m1"}), json!({"id": "m2"})];
        let file = vec![json!({"id": "m2", "pricing": {"prompt": "0.00001", "completion": "0.00002"}})];
        let c = Catalog::build(&ups, &[Some(listing_a), Some(listing_b)], &file);
        let m1 = c.routes("m1");
        assert_eq!(m1.iter().map(|r| r.upstream).collect::<Vec<_>>(), vec![0, 1]);
        assert!(m1[0].usd.is_some() && m1[1].usd.is_none());
        let fast = c.routes("fast");
        assert_eq!((fast.len(), &*fast[0].upstream_model), (1, "m1"));
        assert_eq!(c.routes("m2")[0].usd.as_ref().unwrap().prompt, 10_000_000);
        assert!(c.routes("nope").is_empty());
    }

    #[test]
    fn unknown_listing_accepts_any_model_only_at_per_token_fixed_prices() {
        let ups = vec![upstream("a", &[], &[])];
        let c = Catalog::build(&ups, &[None], &[]);
        let r = c.routes("anything");
        assert_eq!(r.len(), 1);
        // A flat per-request fee alone would sell unbounded tokens: refused.
        assert!(matches!(policy(false).msat_prices(&r[0], Markup::NONE, None), Err(ApiError::Unpriced(_))));
        let per_token = PricePolicy { fixed: MsatPrices::fixed(1.0, 0.5, 1.0), ..policy(false) };
        let p = per_token.msat_prices(&r[0], Markup::NONE, None).unwrap();
        assert_eq!(p.request_msat, 1000);
        assert!(policy(true).msat_prices(&r[0], Markup::NONE, None).is_ok());
    }

    #[test]
    fn priced_model_needs_a_rate_and_shows_markup() {
        let ups = vec![upstream("a", &["m1"], &[])];
        let listing = vec![
            json!({"id": "m1", "pricing": {"prompt": "0.000001", "completion": "0.000002"}, "context_length": 1000, "top_provider": {"max_completion_tokens": 100}}),
            json!({"id": "other"}),
        ];
        let c = Catalog::build(&ups, &[Some(listing)], &[]);
        assert_eq!(c.len(), 1, "the allowlist filters");
        let route = &c.routes("m1")[0];
        assert!(matches!(policy(false).msat_prices(route, ups[0].markup, None), Err(ApiError::PriceUnavailable)));
        let rate = BtcRate::from_usd(100_000.0);
        let out = c.to_json(&ups, &policy(false), rate);
        let m = &out["data"][0];
        assert_eq!(m["pricing"]["prompt"], "0.0000015");
        // 1.5e-6 USD at 100k USD/BTC = 1.5 msat = 0.0015 sat per token.
        assert_eq!(m["sats_pricing"]["prompt"], 0.0015);
        assert_eq!(m["sats_pricing"]["max_prompt_cost"], 1.5);
        assert_eq!(m["sats_pricing"]["max_completion_cost"], 0.3);
        assert_eq!(m["sats_pricing"]["max_cost"], 1.8);
        // Fixed pricing shows the fixed fee, in USD at the rate too (1 sat at 100k USD/BTC).
        let fixed = c.to_json(&ups, &policy(true), rate);
        assert_eq!(fixed["data"][0]["pricing"]["request"], "0.001");
        assert_eq!(fixed["data"][0]["pricing"]["prompt"], "0");
        assert_eq!(fixed["data"][0]["sats_pricing"]["request"], 1.0);
        // Without a rate there is no USD figure for it.
        assert!(c.to_json(&ups, &policy(true), None)["data"][0].get("pricing").is_none());
    }

    #[test]
    fn shown_prices_are_the_ones_charged() {
        let ups = vec![upstream("a", &[], &[])];
        let listing = vec![json!({"id": "m1", "pricing": {"prompt": "0.000001", "completion": "0.000002",
            "image": "0.01", "web_search": "0.02", "internal_reasoning": "0.000003"}})];
        let c = Catalog::build(&ups, &[Some(listing)], &[]);
        let m = &c.to_json(&ups, &policy(false), BtcRate::from_usd(100_000.0))["data"][0];
        for unmetered in ["image", "web_search", "internal_reasoning"] {
            assert_eq!((&m["pricing"][unmetered], &m["sats_pricing"][unmetered]), (&json!("0"), &json!(0.0)));
        }
        assert_eq!(m["pricing"]["completion"], "0.000003", "the markup of 1.5 stays");
    }
}
