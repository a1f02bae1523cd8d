//! Routing to discovered providers: when no local upstream serves a model, or every local one
//! failed before a byte reached the client, the request is bought from the best provider found
//! on Nostr and paid with eCash from the node's own wallet.
//!
//! Each remote request is paid statelessly with `X-Cashu` (PROTOCOL.md §1): a token worth the
//! provider's maximum cost for the request (its advertised `sats_pricing` applied to the request,
//! rounded up to whole sats), at a mint both sides accept, never more than
//! `MAX_REMOTE_PRICE_SATS`. The provider returns the unused part as change (the `X-Cashu`
//! response header, or an `event: cashu-change` SSE event, which our client never sees), taken
//! straight back into our wallet. What the provider kept (token − change) times `REMOTE_MARKUP`
//! is what our client is charged, through the ordinary reservation.
//!
//! Bounds on spending:
//! - per request: the token is at most `MAX_REMOTE_PRICE_SATS`;
//! - balance parked at a remote provider: none. Nothing is prepaid; each token pays one request
//!   and its change comes back with the answer, so "the maximum balance parked" is 0 and there
//!   are no idle balances whose refunds would need pulling back;
//! - change that could not be taken back (a mint down, a stream cut short, a crash) stays on
//!   record as `recovering` with the original token, and a background task recovers it: the
//!   change token when we have it, else the original token itself if the provider never redeemed
//!   it, else the provider's `/v1/balance/refund` with `X-Cashu: <original token>`.
//!
//! The ledger records each spend before its token is made and keeps the token before it is sent,
//! so the wallet always reconciles: wallet = credited − paid out − payout fees − (remote sent −
//! remote change returned) (+ what the operator put in directly).
//!
//! Loops: a request carries `X-Routstr-Hops`; one that already came through a router is never
//! routed again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::header::HeaderMap;
use serde_json::{json, Value};

use super::request::RequestFields;
use crate::error::ApiError;
use crate::ledger::RemoteSpend;
use crate::node::Node;
use crate::nostr::discovery::Offer;
use crate::pricing::{Cost, Markup, MsatPrices};
use crate::wallet::{normalize_mint_url, WalletError};

/// How many routers a request went through.
pub const HOPS_HEADER: &str = "x-routstr-hops";
/// A request that already came through this many routers is served locally or not at all.
pub const MAX_HOPS: u64 = 1;
/// How long a provider that failed is skipped.
const COOLDOWN: Duration = Duration::from_secs(60);
/// Largest refund answer read from a provider.
const REFUND_BODY_LIMIT: usize = 64 * 1024;

/// A discovered provider, priced for one request.
#[derive(Debug, Clone)]
pub struct RemoteOffer {
    /// Hex public key.
    pub provider: String,
    pub name: String,
    /// Base URL without `/v1`.
    pub base_url: String,
    /// The mint the token is made at (accepted by both sides).
    pub mint: String,
    /// The token's value: the provider's maximum cost for this request, in whole sats.
    pub token_msat: u64,
    pub markup: Markup,
    /// The provider's prices with our markup (what the request is shown to cost per token).
    pub prices: MsatPrices,
    latency_ms: u64,
}

impl RemoteOffer {
    /// What the client's reservation must cover for this provider.
    pub fn reserve_msat(&self) -> u64 {
        mark_up(self.token_msat, self.markup)
    }
}

fn mark_up(msat: u64, markup: Markup) -> u64 {
    u64::try_from((msat as u128 * markup.0 as u128).div_ceil(10_000)).unwrap_or(u64::MAX)
}

/// Providers that failed recently, skipped for a while.
#[derive(Default)]
pub struct Router {
    /// When each cooling provider failed last, and until when it is skipped.
    cooling: Mutex<HashMap<String, (Instant, Instant)>>,
}

impl Router {
    pub fn record_failure(&self, provider: &str) {
        if let Ok(mut map) = self.cooling.lock() {
            let now = Instant::now();
            map.insert(provider.to_owned(), (now, now + COOLDOWN));
        }
    }

    /// A request to `provider` sent at `asked_at` was served. It ends the provider's cooldown only
    /// if the failure came before it was sent: a request that was already on its way when the
    /// provider failed another says nothing about the failure.
    pub fn record_success(&self, provider: &str, asked_at: Instant) {
        if let Ok(mut map) = self.cooling.lock() {
            if map.get(provider).is_some_and(|(failed_at, _)| *failed_at < asked_at) {
                map.remove(provider);
            }
        }
    }

    fn is_cooling(&self, provider: &str) -> bool {
        let Ok(mut map) = self.cooling.lock() else { return false };
        let now = Instant::now();
        map.retain(|_, (_, until)| *until > now);
        map.contains_key(provider)
    }
}

/// The hop count a request arrived with.
pub fn hops(headers: &HeaderMap) -> u64 {
    headers.get(HOPS_HEADER).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

/// A provider's `sats_pricing` as msat prices (exact for prices derived from msat per million
/// tokens, as routstr-node and Routstr Core publish them).
pub fn prices_from_sats(sats: &Value) -> Option<MsatPrices> {
    let field = |k: &str| -> Option<f64> {
        match sats.get(k) {
            None | Some(Value::Null) => Some(0.0),
            Some(v) => v.as_f64().filter(|x| x.is_finite() && *x >= 0.0),
        }
    };
    sats.get("prompt")?;
    sats.get("completion")?;
    let per_mtok = |x: f64| (x * 1e9).round() as u128;
    let prompt = per_mtok(field("prompt")?);
    let cache = |k: &str| field(k).map(per_mtok).filter(|p| *p > 0).unwrap_or(prompt);
    Some(MsatPrices {
        prompt_per_mtok: prompt,
        completion_per_mtok: per_mtok(field("completion")?),
        cache_read_per_mtok: cache("input_cache_read"),
        cache_write_per_mtok: cache("input_cache_write"),
        request_msat: (field("request")? * 1000.0).round() as u64,
    })
}

/// The most a provider charges for this request, in msat, as it reserves it (PROTOCOL.md §3):
/// prompt estimate × prompt + max completion × completion + request fee. Without a limit in the
/// request, the completion part is the model's own `max_completion_cost`.
pub fn max_cost_msat(
    sats: &Value,
    prices: &MsatPrices,
    fields: Option<&RequestFields>,
    path: &str,
    body_len: usize,
    default_completion: u64,
) -> u64 {
    let prompt_estimate = (body_len as u64).div_ceil(3);
    if path == "embeddings" {
        return prices.max_cost(prompt_estimate, 0).total_msats;
    }
    let (asked, choices) = fields.map_or((None, 1), |f| f.asked_completion(path));
    match (asked, sats.get("max_completion_cost").and_then(Value::as_f64).filter(|c| c.is_finite() && *c >= 0.0)) {
        (None, Some(per_choice_sats)) => {
            let completion = ((per_choice_sats * 1000.0).round() as u64).saturating_mul(choices);
            prices.max_cost(prompt_estimate, 0).total_msats.saturating_add(completion)
        }
        (asked, _) => {
            let per_choice = asked.unwrap_or(default_completion);
            prices.max_cost(prompt_estimate, per_choice.saturating_mul(choices)).total_msats
        }
    }
}

/// Why no provider can take a request.
pub enum NoOffer {
    /// None sells the model (or routing is off): the caller's own error stands.
    Nobody,
    /// Some sell it, but none within the limits: this error explains why.
    Refused(ApiError),
}

/// The providers that can take this request, best first: healthy, not cooling down, sharing a
/// mint with us, within `MAX_REMOTE_PRICE_SATS`; ranked by price, then latency.
pub fn offers(
    node: &Node,
    model: &str,
    fields: Option<&RequestFields>,
    path: &str,
    body_len: usize,
) -> Result<Vec<RemoteOffer>, NoOffer> {
    let s = &node.settings;
    if !s.remote_routing || model.is_empty() {
        return Err(NoOffer::Nobody);
    }
    let markup = Markup::from_factor(s.remote_markup).unwrap_or(Markup::NONE);
    let ours: Vec<String> = node.wallet().trusted_mints();
    let found: Vec<Offer> = node.nostr.registry.offers(model);
    if found.is_empty() {
        return Err(NoOffer::Nobody);
    }
    let cap_msat = s.max_remote_price_sats.saturating_mul(1000);
    let mut cheapest_refused: Option<u64> = None;
    let mut no_shared_mint = 0;
    let mut priced = Vec::new();
    for offer in found {
        if node.router.is_cooling(&offer.pubkey) {
            continue;
        }
        let reach = crate::nostr::discovery::Reach {
            onion: node.tor.is_some(),
            private: node.settings.nostr_allow_private_hosts,
        };
        let Some(base_url) = crate::nostr::discovery::probe_base(&offer.url, reach) else { continue };
        let Some(prices) = prices_from_sats(&offer.sats_pricing) else { continue };
        let shared = offer
            .mints
            .iter()
            .filter_map(|m| normalize_mint_url(m).ok().map(|u| u.to_string()))
            .find(|m| ours.contains(m));
        let Some(mint) = shared else {
            no_shared_mint += 1;
            continue;
        };
        let max = max_cost_msat(&offer.sats_pricing, &prices, fields, path, body_len, s.default_max_completion_tokens);
        let token_msat = max.max(1).div_ceil(1000).saturating_mul(1000);
        if token_msat > cap_msat {
            tracing::info!(provider = %offer.name, price_sats = token_msat / 1000, cap_sats = s.max_remote_price_sats, "provider skipped: above MAX_REMOTE_PRICE_SATS");
            cheapest_refused = Some(cheapest_refused.map_or(token_msat, |c| c.min(token_msat)));
            continue;
        }
        priced.push(RemoteOffer {
            provider: offer.pubkey,
            name: offer.name,
            base_url,
            mint,
            token_msat,
            markup,
            prices: with_markup(&prices, markup),
            latency_ms: offer.latency_ms,
        });
    }
    if priced.is_empty() {
        return Err(match (cheapest_refused, no_shared_mint) {
            (Some(cheapest), _) => NoOffer::Refused(ApiError::Unavailable(format!(
                "no provider sells '{model}' within MAX_REMOTE_PRICE_SATS ({} sats); the cheapest asks {} sats for this request",
                s.max_remote_price_sats,
                cheapest / 1000
            ))),
            (None, n) if n > 0 => NoOffer::Refused(ApiError::Unavailable(format!(
                "no provider selling '{model}' accepts a mint this node trusts"
            ))),
            _ => NoOffer::Nobody,
        });
    }
    priced.sort_by(|a, b| a.token_msat.cmp(&b.token_msat).then(a.latency_ms.cmp(&b.latency_ms)));
    priced.truncate(s.remote_max_attempts.max(1));
    Ok(priced)
}

fn with_markup(p: &MsatPrices, markup: Markup) -> MsatPrices {
    let m = |v: u128| v.saturating_mul(markup.0 as u128).div_ceil(10_000);
    MsatPrices {
        prompt_per_mtok: m(p.prompt_per_mtok),
        completion_per_mtok: m(p.completion_per_mtok),
        cache_read_per_mtok: m(p.cache_read_per_mtok),
        cache_write_per_mtok: m(p.cache_write_per_mtok),
        request_msat: mark_up(p.request_msat, markup),
    }
}

/// A token sent to a provider for one request.
pub struct Spend {
    pub id: i64,
    pub token: String,
    pub amount_msat: u64,
}

/// Makes the token for `offer`: recorded before it is made, kept before it is sent.
pub async fn pay(node: &Node, request_id: &str, offer: &RemoteOffer) -> Result<Spend, ApiError> {
    let ledger = node.ledger();
    let id =
        ledger.begin_remote_spend(request_id, &offer.provider, &offer.base_url, &offer.mint, offer.token_msat).await?;
    match node.wallet().send_tagged(&offer.mint, offer.token_msat, &format!("remote:{id}")).await {
        Ok(sent) => {
            crate::failpoint::hit("remote:after-send");
            match ledger.remote_spend_sent(id, &sent.token, sent.amount_msat, sent.fee_msat).await {
                Ok(()) => Ok(Spend { id, token: sent.token, amount_msat: sent.amount_msat }),
                Err(e) => {
                    // Not on record: never sent. Take it back into the wallet.
                    if let Err(we) = node.wallet().receive(&sent.token).await {
                        tracing::error!(error = %we, "a remote payment token could not be recorded nor taken back");
                    }
                    Err(e.into())
                }
            }
        }
        Err(e) => {
            let _ = ledger.fail_remote_spend(id, &e.to_string()).await;
            Err(match e {
                WalletError::InsufficientFunds => ApiError::Unavailable(format!(
                    "this node's wallet cannot pay {} sats to a provider at {}",
                    offer.token_msat / 1000,
                    offer.mint
                )),
                other => other.into(),
            })
        }
    }
}

/// The change a provider put in its `X-Cashu` response header (a token, or `{"token": …}`).
pub fn change_from_headers(headers: &reqwest::header::HeaderMap) -> Option<String> {
    let v = headers.get(crate::payment::X_CASHU)?.to_str().ok()?.trim();
    token_in(v)
}

/// A token, or the token of a `{"token": …}` JSON object.
pub fn token_in(text: &str) -> Option<String> {
    let text = text.trim();
    if text.starts_with("cashuA") || text.starts_with("cashuB") {
        return Some(text.to_owned());
    }
    let v: Value = serde_json::from_str(text).ok()?;
    v.get("token").and_then(Value::as_str).filter(|t| t.starts_with("cashu")).map(str::to_owned)
}

/// Whether an SSE event is the provider's `cashu-change` event; its token if so.
pub fn change_event(event: &[u8]) -> Option<Option<String>> {
    let text = std::str::from_utf8(event).ok()?;
    if !text.lines().any(|l| l.trim_end() == "event: cashu-change" || l.trim_end() == "event:cashu-change") {
        return None;
    }
    let data: String = text
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| d.strip_prefix(' ').unwrap_or(d))
        .collect::<Vec<_>>()
        .join("\n");
    Some(token_in(&data))
}

/// Whether a provider's answer means it would not take our payment (or our request as a
/// paying router): the next provider is tried and our token taken back.
pub fn refused(status: reqwest::StatusCode, body: &[u8]) -> bool {
    use reqwest::StatusCode as S;
    if status.is_server_error()
        || matches!(status, S::TOO_MANY_REQUESTS | S::UNAUTHORIZED | S::PAYMENT_REQUIRED | S::FORBIDDEN | S::NOT_FOUND)
    {
        return true;
    }
    let code = serde_json::from_slice::<Value>(body).ok().and_then(|v| v["error"]["code"].as_str().map(str::to_owned));
    matches!(
        code.as_deref(),
        Some(
            "invalid_token"
                | "untrusted_mint"
                | "token_already_spent"
                | "token_pending"
                | "unsupported_unit"
                | "mint_unavailable"
                | "mint_error"
        )
    )
}

/// The change a provider owes for a token of `sent_msat`, from the cost it reported: change is
/// paid in whole sats, the sub-sat rest is charged (PROTOCOL.md §3).
pub fn change_due(sent_msat: u64, their_cost: Option<&Value>) -> Option<u64> {
    let total = their_cost?.get("total_msats")?.as_u64()?;
    Some(sent_msat.saturating_sub(total) / 1000 * 1000)
}

/// Ends a spend: takes the change back into the wallet. `change` is what the provider returned;
/// `served` whether it answered the request (else, without change, the token itself may still
/// be ours); `due` the change its cost report implies (only used to tell "no change due" from
/// "change owed"). Returns what of the token is back in our wallet now: the change (0 when none
/// was due), for charging the client, or for a request not served the token itself when the
/// provider never redeemed it; `None` when nothing is (owed, unreadable, spent, or its mint
/// away): the client then pays the whole token, and change recovered later is the operator's.
/// Counting change that is not in hand would let a provider keep tokens at our expense.
pub async fn finish(node: &Node, spend: &Spend, change: Option<&str>, served: bool, due: Option<u64>) -> Option<u64> {
    let ledger = node.ledger();
    let (recorded, in_hand) = match change {
        Some(token) => match node.wallet().receive(token).await {
            Ok(r) => (
                ledger.settle_remote_spend(spend.id, r.credited_msat, r.fee_msat, "change received").await,
                // What reached the wallet: the mint's fee for taking the change in is a cost of
                // this request, not the operator's.
                Some(r.credited_msat),
            ),
            Err(e) => {
                tracing::warn!(error = %e, "remote change not received now; it will be recovered");
                let note = format!("change not received: {e}");
                (ledger.recovering_remote_spend(spend.id, Some(token), &note).await, None)
            }
        },
        None if !served => match reclaim(node, spend.id, &spend.token).await {
            Ok(back) => (Ok(()), back),
            Err(e) => (Err(e), None),
        },
        // It kept the whole token (its cost, rounded to whole sats, took it all).
        None if due == Some(0) => (ledger.settle_remote_spend(spend.id, 0, 0, "no change due").await, Some(0)),
        None => (ledger.recovering_remote_spend(spend.id, None, "no change received with the answer").await, None),
    };
    if let Err(e) = recorded {
        tracing::error!(error = %e, "remote spend could not be updated");
    }
    in_hand
}

/// The provider did not serve: take the token back if it never redeemed it (returns what came
/// back), else leave the change to recovery.
async fn reclaim(node: &Node, id: i64, token: &str) -> Result<Option<u64>, crate::ledger::LedgerError> {
    let ledger = node.ledger();
    match node.wallet().receive(token).await {
        Ok(r) => {
            let note = "token taken back: the provider did not redeem it";
            ledger.settle_remote_spend(id, r.credited_msat, r.fee_msat, note).await.map(|()| Some(r.credited_msat))
        }
        Err(WalletError::AlreadySpent) => ledger
            .recovering_remote_spend(id, None, "the provider redeemed the token; its change is asked back")
            .await
            .map(|()| None),
        Err(e) => {
            ledger.recovering_remote_spend(id, None, &format!("token not taken back yet: {e}")).await.map(|()| None)
        }
    }
}

/// What the client pays for a remote answer: what the provider kept, with our markup, split
/// like the provider's own cost report when it gave one.
pub fn charge(offer: &RemoteOffer, sent_msat: u64, change_msat: u64, theirs: Option<&Value>) -> Cost {
    let total = mark_up(sent_msat.saturating_sub(change_msat), offer.markup);
    let part = |k: &str| theirs.and_then(|c| c.get(k)).and_then(Value::as_u64).unwrap_or(0);
    let their_total = part("total_msats");
    if their_total == 0 {
        return Cost::new(total, 0, 0);
    }
    // The provider's parts only split our total: together they never exceed it, whatever they say.
    let input_part = part("input_msats").min(their_total);
    let output_part = part("output_msats").min(their_total - input_part);
    let share = |v: u64| u64::try_from(total as u128 * v as u128 / their_total as u128).unwrap_or(total);
    let (input, output) = (share(input_part), share(output_part));
    Cost::new(total.saturating_sub(input.saturating_add(output)), input, output)
}

/// The provider's `usage.cost` in an answer or event.
pub fn their_cost(v: &Value) -> Option<Value> {
    ["/usage/cost", "/message/usage/cost", "/response/usage/cost"].iter().find_map(|p| v.pointer(p)).cloned()
}

/// Recovers the change of every spend left `recovering` (at least `min_age_secs` old).
pub async fn recover_all(node: &Arc<Node>, min_age_secs: i64) {
    let spends = match node.ledger().remote_spends_to_recover(min_age_secs).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "could not list remote change to recover");
            return;
        }
    };
    for spend in spends {
        if let Err(e) = recover(node, &spend).await {
            tracing::debug!(id = spend.id, error = %e, "remote change still not recovered");
            let _ = node.ledger().recovering_remote_spend(spend.id, None, &e).await;
        }
    }
}

async fn recover(node: &Node, spend: &RemoteSpend) -> Result<(), String> {
    let ledger = node.ledger();
    let wallet = node.wallet();
    let db = |e: crate::ledger::LedgerError| e.to_string();
    if let Some(change) = &spend.change_token {
        return match wallet.receive(change).await {
            Ok(r) => {
                ledger.settle_remote_spend(spend.id, r.credited_msat, r.fee_msat, "change recovered").await.map_err(db)
            }
            Err(WalletError::AlreadySpent) => {
                let ys = wallet.parse_token(change).map(|p| p.proof_ys).unwrap_or_default();
                match wallet.received_by_us(&spend.mint_url, &ys).await {
                    Ok(Some(credited)) => {
                        ledger.settle_remote_spend(spend.id, credited, 0, "change recovered").await.map_err(db)
                    }
                    Ok(None) => ledger
                        .settle_remote_spend(spend.id, 0, 0, "the change token was spent elsewhere")
                        .await
                        .map_err(db),
                    Err(e) => Err(e.to_string()),
                }
            }
            Err(e) => Err(e.to_string()),
        };
    }
    let Some(token) = &spend.token else {
        return ledger.settle_remote_spend(spend.id, 0, 0, "no token was sent").await.map_err(db);
    };
    match wallet.receive(token).await {
        Ok(r) => {
            return ledger
                .settle_remote_spend(
                    spend.id,
                    r.credited_msat,
                    r.fee_msat,
                    "token taken back: the provider did not redeem it",
                )
                .await
                .map_err(db)
        }
        Err(WalletError::AlreadySpent) => {}
        Err(e) => return Err(e.to_string()),
    }
    // The provider redeemed it: ask for the change it keeps for that token.
    let resp = node
        .client
        .post(format!("{}/v1/balance/refund", spend.url))
        .header(crate::payment::X_CASHU, token.as_str())
        .json(&json!({}))
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .map_err(|e| format!("provider unreachable: {}", e.without_url()))?;
    let status = resp.status();
    let body = crate::proxy::client::UpstreamResponse::from(resp)
        .read_whole(REFUND_BODY_LIMIT)
        .await
        .map_err(|e| e.to_string())?;
    if status == reqwest::StatusCode::NOT_FOUND {
        return ledger.settle_remote_spend(spend.id, 0, 0, "the provider holds no change for it").await.map_err(db);
    }
    if !status.is_success() {
        return Err(format!("provider answered {status} to the refund"));
    }
    let change = std::str::from_utf8(&body).ok().and_then(token_in).ok_or("no token in the provider's refund")?;
    ledger.recovering_remote_spend(spend.id, Some(&change), "change handed back by the provider").await.map_err(db)?;
    match wallet.receive(&change).await {
        Ok(r) => {
            ledger.settle_remote_spend(spend.id, r.credited_msat, r.fee_msat, "change recovered").await.map_err(db)
        }
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_success_ends_a_cooldown_only_if_asked_after_the_failure() {
        let router = Router::default();
        let asked_before = Instant::now();
        std::thread::sleep(Duration::from_millis(2));
        router.record_failure("p");
        assert!(router.is_cooling("p"));
        // Sent before the failure, answered after it: the provider keeps cooling.
        router.record_success("p", asked_before);
        assert!(router.is_cooling("p"));
        std::thread::sleep(Duration::from_millis(2));
        router.record_success("p", Instant::now());
        assert!(!router.is_cooling("p"));
        router.record_success("never failed", Instant::now());
        assert!(!router.is_cooling("never failed"));
    }

    #[test]
    fn sats_pricing_round_trips_to_msat_prices() {
        let sats = json!({"prompt": 0.001, "completion": 0.002, "request": 0.0, "max_completion_cost": 8.192});
        let p = prices_from_sats(&sats).unwrap();
        assert_eq!((p.prompt_per_mtok, p.completion_per_mtok, p.request_msat), (1_000_000, 2_000_000, 0));
        // 300 body bytes → 100 prompt tokens (100 msat) + 100 completion tokens (200 msat).
        let fields = |body: &str| RequestFields::parse(body.as_bytes()).unwrap();
        assert_eq!(
            max_cost_msat(&sats, &p, Some(&fields(r#"{"max_tokens": 100}"#)), "chat/completions", 300, 4096),
            300
        );
        // No limit in the request: the model's max completion cost.
        assert_eq!(max_cost_msat(&sats, &p, Some(&fields("{}")), "chat/completions", 300, 4096), 100 + 8192);
        assert_eq!(
            max_cost_msat(&sats, &p, Some(&fields(r#"{"n": 2}"#)), "chat/completions", 300, 4096),
            100 + 2 * 8192
        );
        assert_eq!(max_cost_msat(&sats, &p, None, "embeddings", 300, 4096), 100);
        assert!(prices_from_sats(&json!({"prompt": -1.0, "completion": 0.1})).is_none());
    }

    #[test]
    fn change_in_headers_and_events() {
        assert_eq!(token_in("cashuBabc").as_deref(), Some("cashuBabc"));
        assert_eq!(token_in(r#"{"token":"cashuAxyz","msats":1000}"#).as_deref(), Some("cashuAxyz"));
        assert_eq!(token_in("garbage"), None);
        let event = b"event: cashu-change\ndata: {\"token\": \"cashuBq\", \"msats\": 5}\n\n";
        assert_eq!(change_event(event), Some(Some("cashuBq".to_owned())));
        assert_eq!(change_event(b"data: {\"choices\":[]}\n\n"), None);
    }

    #[test]
    fn charge_marks_up_what_was_kept() {
        let offer = RemoteOffer {
            provider: String::new(),
            name: String::new(),
            base_url: String::new(),
            mint: String::new(),
            token_msat: 10_000,
            markup: Markup::from_factor(1.1).unwrap(),
            prices: MsatPrices::default(),
            latency_ms: 0,
        };
        assert_eq!(offer.reserve_msat(), 11_000);
        let c = charge(&offer, 10_000, 7_000, None);
        assert_eq!(c.total_msats, 3_300);
        let theirs = json!({"base_msats": 0, "input_msats": 1000, "output_msats": 2000, "total_msats": 3000});
        let c = charge(&offer, 10_000, 7_000, Some(&theirs));
        assert_eq!((c.input_msats, c.output_msats, c.total_msats), (1_100, 2_200, 3_300));
        assert_eq!(change_due(5_000, Some(&theirs)), Some(2_000));
        // A cost report whose parts exceed its total only splits ours; it never adds to it.
        let inflated = json!({"total_msats": 3000, "input_msats": 3_000_000_000u64, "output_msats": u64::MAX});
        let c = charge(&offer, 10_000, 7_000, Some(&inflated));
        assert_eq!((c.input_msats, c.output_msats, c.total_msats), (3_300, 0, 3_300));
        // No change back: the whole token is what the answer cost.
        assert_eq!(charge(&offer, 10_000, 0, None).total_msats, 11_000);
        assert_eq!(change_due(1_000, Some(&json!({"total_msats": 1_000}))), Some(0));
        assert!(refused(reqwest::StatusCode::PAYMENT_REQUIRED, b""));
        assert!(refused(reqwest::StatusCode::BAD_REQUEST, br#"{"error":{"code":"token_already_spent"}}"#));
        assert!(!refused(reqwest::StatusCode::BAD_REQUEST, br#"{"error":{"code":"bad_request"}}"#));
    }
}
