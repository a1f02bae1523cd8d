//! Routing and the node's own endpoints (info, models, providers, balance). Everything else under
//! `/v1/` (and the OpenAI paths without the prefix) goes to the proxy.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::header::{
    HeaderValue, ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS, ACCESS_CONTROL_ALLOW_ORIGIN,
    ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE, ACCESS_CONTROL_REQUEST_HEADERS, ORIGIN, VARY,
};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::http::{self, Body, REQUEST_ID};
use crate::ledger::KeyKind;
use crate::lightning::InvoiceStatus;
use crate::node::Node;
use crate::payment::{credential, hash_api_key, Credential};

/// Paths proxied even without the `/v1` prefix.
const BARE_PROXY_PATHS: &[&str] = &["chat/completions", "completions", "embeddings", "responses", "messages"];

/// Body limit for the node's own JSON endpoints.
const SMALL_BODY_LIMIT: usize = 64 * 1024;

/// `req-` and 32 hex digits: the time in milliseconds (6 bytes), then 10 random bytes. Ids in time
/// order keep the ledger's request records appended at the end of their index: random ones
/// would dirty a different index page per request, for every commit and checkpoint to write.
/// 80 random bits per millisecond keep two requests from ever sharing an id (the ledger records
/// a request's charge once per id).
pub fn new_request_id() -> String {
    let millis = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
    let mut bytes = [0u8; 16];
    bytes[..6].copy_from_slice(&(millis as u64).to_be_bytes()[2..]);
    bytes[6..].copy_from_slice(&rand::random::<[u8; 10]>());
    crate::payment::prefixed_hex("req-", &bytes)
}

/// Every request enters here; every response leaves with a request id and CORS headers.
pub async fn handle(node: Arc<Node>, req: Request<Incoming>) -> Response<Body> {
    let request_id = new_request_id();
    let origin = req.headers().get(ORIGIN).cloned();
    let mut resp = match route(&node, req, &request_id).await {
        Ok(resp) => resp,
        Err(err) => {
            if err.status().is_server_error() {
                tracing::warn!(request_id, error = ?err, "request failed");
            } else {
                tracing::debug!(request_id, error = %err, "request refused");
            }
            let mut resp = http::error_response(&err, &request_id);
            if let Some(msat) = err.payment_request_msat() {
                // NUT-24: a payment request any Cashu wallet can pay.
                let sats = msat.div_ceil(1000).max(1);
                if let Ok(v) = HeaderValue::from_str(&node.wallet().payment_request(sats)) {
                    resp.headers_mut().insert(crate::payment::X_CASHU, v);
                }
            }
            resp
        }
    };
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        resp.headers_mut().insert(REQUEST_ID, v);
    }
    apply_cors(&node, origin, &mut resp);
    resp
}

fn apply_cors(node: &Node, origin: Option<HeaderValue>, resp: &mut Response<Body>) {
    let allowed = &node.settings.cors_origins;
    let allow = if allowed.iter().any(|o| o == "*") {
        Some(HeaderValue::from_static("*"))
    } else {
        origin.filter(|o| o.to_str().is_ok_and(|o| allowed.iter().any(|a| a == o)))
    };
    if let Some(allow) = allow {
        let h = resp.headers_mut();
        h.insert(ACCESS_CONTROL_ALLOW_ORIGIN, allow);
        h.insert(VARY, HeaderValue::from_static("Origin"));
        h.insert(
            ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static("x-cashu, x-routstr-request-id, x-routstr-cost-msats, x-routstr-input-cost-msats, x-routstr-output-cost-msats, x-routstr-cost-usd"),
        );
    }
}

async fn route(node: &Arc<Node>, req: Request<Incoming>, request_id: &str) -> Result<Response<Body>, ApiError> {
    let path = req.uri().path().to_owned();
    let (versioned, rest) = match path.strip_prefix("/v1") {
        Some(r) if r.is_empty() || r.starts_with('/') => (true, r.trim_start_matches('/').to_owned()),
        _ => (false, path.trim_start_matches('/').to_owned()),
    };
    let rest = rest.trim_end_matches('/');
    // Health checks (load balancers, Docker) are not limited.
    let health = req.uri().path() == "/health";
    let client =
        match (req.extensions().get::<crate::server::ClientIp>(), req.extensions().get::<crate::server::Circuit>()) {
            (Some(crate::server::ClientIp(ip)), _) => Some(crate::ratelimit::Client::Ip(*ip)),
            (None, Some(crate::server::Circuit(id))) => Some(crate::ratelimit::Client::Circuit(*id)),
            (None, None) => None,
        };
    if let Some(client) = client.filter(|_| !health) {
        if let Err(wait) = node.rate_limiter.check(client) {
            return Err(ApiError::RateLimited { retry_after_secs: wait.as_secs().max(1) });
        }
    }
    let method = req.method().clone();
    let onion = req.extensions().get::<crate::server::Origin>() == Some(&crate::server::Origin::Onion);
    if method == Method::OPTIONS {
        let mut resp = Response::new(http::empty());
        *resp.status_mut() = StatusCode::NO_CONTENT;
        let h = resp.headers_mut();
        h.insert(ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("GET, POST, OPTIONS"));
        // Whatever headers the browser asks to send (SDKs add their own, such as OpenAI's
        // `x-stainless-*`): every route checks its credentials itself, so none is dangerous.
        let asked = req.headers().get(ACCESS_CONTROL_REQUEST_HEADERS).filter(|v| v.len() <= 1024).cloned();
        h.insert(
            ACCESS_CONTROL_ALLOW_HEADERS,
            asked.unwrap_or(HeaderValue::from_static(
                "authorization, content-type, x-cashu, refund-lnurl, key-expiry-time",
            )),
        );
        h.insert(ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
        return Ok(resp);
    }
    if crate::admin::is_admin_path(&path) {
        // Boxed, like the balance routes: their futures (cdk's inside) would otherwise make
        // every request's future, the proxied ones too, KBs larger.
        return Box::pin(crate::admin::handle(node, req, request_id)).await;
    }
    match (&method, rest) {
        (&Method::GET, "" | "info") => Ok(info(node, onion)),
        (&Method::GET, "health") => Ok(http::json_response(StatusCode::OK, &json!({ "status": "ok" }))),
        (&Method::GET, "models") => Ok(models(node)),
        // OpenAI's `models.retrieve`; ids may hold a `/` (`org/model`).
        (&Method::GET, r) if r.starts_with("models/") => model(node, &percent_decode(&r["models/".len()..])),
        (&Method::GET, "providers") => {
            let model = param(req.uri().query(), &None, &["model"]);
            Ok(http::json_response(StatusCode::OK, &node.nostr.providers_json(model.as_deref())))
        }
        // Routstr Core's `GET /v1/balance/` (kept there for its frontend): the key's info.
        (&Method::GET, "balance" | "wallet") => Box::pin(balance(node, req, "info")).await,
        (_, r) if r.starts_with("balance/") || r.starts_with("wallet/") => {
            let action = r.split_once('/').map(|(_, a)| a).unwrap_or_default().to_owned();
            Box::pin(balance(node, req, &action)).await
        }
        (_, r) if versioned && !crate::upstream::stays_under_base(r) => {
            Err(ApiError::BadRequest("the path may not have '.' or '..' segments".into()))
        }
        (_, r) if versioned || BARE_PROXY_PATHS.contains(&r) => {
            let r = r.to_owned();
            // The proxy names the model in the slot; the request is counted for /metrics.
            let (slot, started) = (crate::admin::ModelSlot::default(), std::time::Instant::now());
            let mut req = req;
            req.extensions_mut().insert(slot.clone());
            let result = crate::proxy::handle(node.clone(), req, r.clone(), request_id.to_owned()).await;
            let status = result.as_ref().map(|resp| resp.status()).unwrap_or_else(|e| e.status());
            node.admin.metrics.record(request_id, &r, slot.get().unwrap_or(""), status.as_u16(), started.elapsed());
            result
        }
        _ => Err(ApiError::NotFound(path)),
    }
}

/// `/v1/info`. Over the onion service the clearnet URL is left out: nothing on that side may
/// lead to the clearnet host.
fn info(node: &Node, onion: bool) -> Response<Body> {
    let s = &node.settings;
    let http_url = if onion { String::new() } else { s.http_url.clone().unwrap_or_default() };
    http::json_response(
        StatusCode::OK,
        &json!({
            "name": s.name,
            "description": s.description,
            "version": env!("CARGO_PKG_VERSION"),
            "npub": node.nostr.npub(),
            "mints": node.wallet().trusted_mints(),
            "http_url": http_url,
            "onion_url": s.onion_url.clone().or_else(|| node.tor.as_ref()?.onion_url()).unwrap_or_default(),
            "models": node.catalog().len(),
            "upstreams": node.upstreams().iter().map(|u| u.health()).collect::<Vec<_>>(),
            "tor": node.tor.as_ref().map(|t| t.status()),
        }),
    )
}

/// `/v1/models`' listing.
fn listing(node: &Node) -> Value {
    let c = node.catalog();
    c.to_json(c.upstreams(), &node.policy, node.rates.get())
}

fn models(node: &Node) -> Response<Body> {
    http::json_response(StatusCode::OK, &listing(node))
}

/// One model's object, as `/v1/models` lists it.
fn model(node: &Node, id: &str) -> Result<Response<Body>, ApiError> {
    let found = listing(node)["data"]
        .as_array_mut()
        .and_then(|models| models.iter_mut().find(|m| m["id"] == id))
        .map(Value::take)
        .ok_or_else(|| ApiError::UnknownModel(id.to_owned()))?;
    Ok(http::json_response(StatusCode::OK, &found))
}

/// A string field from the query string or the JSON body.
fn param(query: Option<&str>, body: &Option<Value>, names: &[&str]) -> Option<String> {
    if let Some(q) = query {
        for pair in q.split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if names.contains(&k) && !v.is_empty() {
                return Some(percent_decode(v));
            }
        }
    }
    let body = body.as_ref()?;
    names.iter().find_map(|n| body.get(*n).and_then(Value::as_str).map(str::to_owned))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                match u8::from_str_radix(std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                    }
                    Err(_) => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn balance(node: &Arc<Node>, req: Request<Incoming>, action: &str) -> Result<Response<Body>, ApiError> {
    let (parts, body) = req.into_parts();
    let body = http::read_limited(body, SMALL_BODY_LIMIT).await?;
    let json: Option<Value> = if body.is_empty() {
        None
    } else {
        Some(serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))?)
    };
    let query = parts.uri.query();
    let payments = &node.payments;
    match (action, &parts.method) {
        ("create", &Method::GET | &Method::POST) => {
            let token = param(query, &json, &["initial_balance_token", "cashu_token", "token"]).ok_or_else(|| {
                ApiError::BadRequest("initial_balance_token is required (a cashuA… or cashuB… token)".into())
            })?;
            let api_key = payments.api_key_for_token(&token);
            let key_hash = hash_api_key(&api_key);
            let refund = payments.refund_headers_for_new_key(&parts.headers)?;
            let redeemed = payments.redeem(&token, &key_hash, KeyKind::Key).await?;
            payments.apply_refund_headers(&key_hash, refund).await?;
            Ok(http::json_response(
                StatusCode::OK,
                &json!({ "api_key": api_key, "balance": redeemed.balance_msat, "fee_msats": redeemed.fee_msat }),
            ))
        }
        ("info", &Method::GET) => {
            let (key_hash, api_key) = key_credential(node, &parts.headers).await?;
            let info = node.ledger().key_info(&key_hash).await?.ok_or(ApiError::InvalidKey)?;
            Ok(http::json_response(
                StatusCode::OK,
                &json!({
                    "api_key": api_key,
                    "balance": info.available_msat(),
                    "reserved": info.reserved_msat,
                    "total_balance": info.balance_msat,
                    "total_spent": info.spent_msat,
                    "total_requests": info.requests,
                    "refund_address": info.refund_address,
                    "expiry_time": info.expiry_time,
                }),
            ))
        }
        ("topup", &Method::POST) => {
            let (key_hash, _) = key_credential(node, &parts.headers).await?;
            // Money put on a key that cannot spend it would only wait for a refund.
            node.ledger().key_info(&key_hash).await?.ok_or(ApiError::InvalidKey)?.usable(crate::ledger::now_secs())?;
            let token = param(query, &json, &["cashu_token", "token"])
                .ok_or_else(|| ApiError::BadRequest("cashu_token is required".into()))?;
            let redeemed = payments.redeem(&token, &key_hash, KeyKind::Key).await?;
            if !redeemed.new {
                return Err(crate::wallet::WalletError::AlreadySpent.into());
            }
            Ok(http::json_response(
                StatusCode::OK,
                &json!({ "msats": redeemed.credited_msat, "balance": redeemed.balance_msat, "fee_msats": redeemed.fee_msat }),
            ))
        }
        ("refund", &Method::POST) => {
            let (paid, earlier) = match credential(&parts.headers)? {
                Some(Credential::XCashu(token)) => (payments.recover_change(token).await?, Vec::new()),
                Some(_) => {
                    let (key_hash, _) = key_credential(node, &parts.headers).await?;
                    let refund = payments.refund_headers(&parts.headers)?;
                    payments.apply_refund_headers(&key_hash, refund).await?;
                    let info = node.ledger().key_info(&key_hash).await?.ok_or(ApiError::InvalidKey)?;
                    match info.refund_address.filter(|_| payments.lightning.enabled) {
                        Some(address) => return lightning_refund(payments, &key_hash, &address).await,
                        None => {
                            let paid = payments.refund_key(&key_hash).await?;
                            let earlier = payments.earlier_refunds(&key_hash, &paid).await?;
                            (paid, earlier)
                        }
                    }
                }
                None => return Err(ApiError::InvalidKey),
            };
            let sats = paid.amount_msat / 1000;
            let mut answer = json!({ "token": paid.token, "sats": sats.to_string(), "msats": paid.amount_msat });
            if !earlier.is_empty() {
                let tokens: Vec<Value> =
                    earlier.iter().map(|p| json!({ "token": p.token, "msats": p.amount_msat })).collect();
                answer["earlier_tokens"] = Value::Array(tokens);
            }
            Ok(http::json_response(StatusCode::OK, &answer))
        }
        ("lightning/invoice", &Method::POST) => {
            let amount_sat = json
                .as_ref()
                .and_then(|j| j.get("amount_sats").or_else(|| j.get("amount")))
                .and_then(Value::as_u64)
                .or_else(|| param(query, &None, &["amount_sats"]).and_then(|a| a.parse().ok()))
                .ok_or_else(|| ApiError::BadRequest("amount_sats (a whole number of sats) is required".into()))?;
            let purpose = param(query, &json, &["purpose"]).unwrap_or_else(|| "create".into());
            let topup_key = match purpose.as_str() {
                "create" => None,
                "topup" => Some(key_credential(node, &parts.headers).await?.0),
                other => return Err(ApiError::BadRequest(format!("purpose must be create or topup, not {other:?}"))),
            };
            let created = payments.create_invoice(amount_sat, topup_key).await?;
            Ok(http::json_response(StatusCode::OK, &serde_json::to_value(created).unwrap_or_default()))
        }
        (a, &Method::GET) if a.starts_with("lightning/invoice/") && a.ends_with("/status") => {
            let id = a.trim_start_matches("lightning/invoice/").trim_end_matches("/status");
            if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return Err(ApiError::NotFoundResource("no such invoice".into()));
            }
            let body = match payments.invoice_status(id).await? {
                InvoiceStatus::Pending { expires_at } => json!({ "status": "pending", "expires_at": expires_at }),
                InvoiceStatus::Expired => json!({ "status": "expired" }),
                InvoiceStatus::Paid { credited_msat, api_key, balance_msat } => json!({
                    "status": "paid",
                    "api_key": api_key,
                    "amount_sats": credited_msat / 1000,
                    "msats": credited_msat,
                    "balance": balance_msat,
                }),
            };
            Ok(http::json_response(StatusCode::OK, &body))
        }
        ("create" | "info" | "topup" | "refund" | "lightning/invoice", _) => Err(ApiError::MethodNotAllowed),
        _ => Err(ApiError::NotFound(format!("/v1/balance/{action}"))),
    }
}

/// `/v1/balance/refund` for a key with a `Refund-LNURL`: paid over Lightning (202 while the
/// payment is in flight; asking again shows how it ended).
async fn lightning_refund(
    payments: &crate::payment::Payments,
    key_hash: &str,
    address: &str,
) -> Result<Response<Body>, ApiError> {
    let refund = payments.refund_lightning(key_hash, address).await?;
    let status = if refund.paid { StatusCode::OK } else { StatusCode::ACCEPTED };
    Ok(http::json_response(
        status,
        &json!({
            "recipient": refund.recipient,
            "sats": (refund.amount_msat / 1000).to_string(),
            "msats": refund.amount_msat,
            "fee_reserve_msats": refund.fee_reserve_msat,
            "fee_msats": refund.fee_msat,
            "status": if refund.paid { "paid" } else { "pending" },
        }),
    ))
}

/// The key behind `Authorization` (an `sk-` key, or a token used as a key, redeemed on first
/// use): its hash and the key itself.
async fn key_credential(node: &Node, headers: &hyper::HeaderMap) -> Result<(String, String), ApiError> {
    let cred = credential(headers)?.ok_or(ApiError::InvalidKey)?;
    let (key_hash, api_key) = node.payments.key_of(cred).ok_or(ApiError::InvalidKey)?;
    if let Credential::BearerToken(token) = cred {
        if node.ledger().key_info(&key_hash).await?.is_none() {
            node.payments.redeem(token, &key_hash, KeyKind::Key).await?;
        }
    }
    Ok((key_hash, api_key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_and_body_params() {
        assert_eq!(
            param(Some("a=1&initial_balance_token=cashuA%3D%3D"), &None, &["initial_balance_token"]).as_deref(),
            Some("cashuA==")
        );
        let body = Some(json!({"cashu_token": "cashuBx"}));
        assert_eq!(param(None, &body, &["cashu_token"]).as_deref(), Some("cashuBx"));
        assert_eq!(param(Some("x=%zz"), &None, &["x"]).as_deref(), Some("%zz"));
        assert_eq!(param(Some("x=%4"), &None, &["x"]).as_deref(), Some("%4"));
    }

    #[test]
    fn request_ids_are_unique_and_in_time_order() {
        let first = new_request_id();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let ids: Vec<String> = (0..1000).map(|_| new_request_id()).collect();
        assert!(ids.iter().all(|id| id.len() == 36 && id.starts_with("req-") && id > &first));
        let unique: std::collections::HashSet<&String> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len());
    }
}
