//! `/admin/api/…`: JSON for the dashboard. Every route but `login` and `session` needs a live
//! session; POSTs must be JSON and, when the browser says where they come from (`Origin`), come
//! from this very host.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE, HOST, ORIGIN, SET_COOKIE};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};

use super::auth::{self, LoginError, MIN_PASSWORD_LEN, SESSION_COOKIE};
use crate::error::ApiError;
use crate::http::{self, Body};
use crate::layers::AdminUpstream;
use crate::node::Node;
use crate::pricing::msat_to_sats;
use crate::server::{ClientIp, Origin};

const BODY_LIMIT: usize = 16 * 1024;

fn ok(value: Value) -> Result<Response<Body>, ApiError> {
    Ok(http::json_response(StatusCode::OK, &value))
}

fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    let raw = query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v)
    })?;
    // Hex hashes, numbers and request ids: %-decoding of ASCII is all that is needed.
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let decoded =
            (bytes[i] == b'%').then(|| raw.get(i + 1..i + 3)).flatten().and_then(|h| u8::from_str_radix(h, 16).ok());
        match decoded {
            Some(b) => {
                out.push(b);
                i += 3;
            }
            None => {
                out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
                i += 1;
            }
        }
    }
    Some(String::from_utf8_lossy(&out).into_owned())
}

/// What lies between `prefix` and `suffix` in a path: `keys/<hash>/adjust` → `<hash>`; `None`
/// when the path is not of that form (or they overlap, as in `keys/adjust`).
fn inner<'a>(path: &'a str, prefix: &str, suffix: &str) -> Option<&'a str> {
    path.strip_prefix(prefix)?.strip_suffix(suffix)
}

fn number(query: Option<&str>, name: &str, default: u32, max: u32) -> u32 {
    query_param(query, name).and_then(|v| v.parse().ok()).unwrap_or(default).min(max)
}

/// Who is logging in, for the attempt limit.
fn client_of(req: &Request<Incoming>) -> String {
    match (req.extensions().get::<Origin>(), req.extensions().get::<ClientIp>()) {
        (Some(Origin::Onion), _) => "onion".to_owned(),
        (_, Some(ClientIp(ip))) => ip.to_string(),
        _ => "unknown".to_owned(),
    }
}

/// A POST must be JSON (a cross-site form cannot send that without CORS) and, if the browser
/// names its origin, be same-origin.
fn check_post(req: &Request<Incoming>) -> Result<(), ApiError> {
    let headers = req.headers();
    let json = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains("application/json"));
    if !json {
        return Err(ApiError::BadRequest("admin POSTs must be application/json".into()));
    }
    if let Some(origin) = headers.get(ORIGIN).and_then(|v| v.to_str().ok()) {
        let host = headers.get(HOST).and_then(|v| v.to_str().ok()).unwrap_or_default();
        let origin_host = origin.split_once("://").map(|(_, h)| h).unwrap_or(origin);
        if origin_host != host {
            return Err(ApiError::Conflict("cross-origin admin request refused".into()));
        }
    }
    Ok(())
}

async fn json_body(req: Request<Incoming>) -> Result<Value, ApiError> {
    let body = http::read_limited(req.into_body(), BODY_LIMIT).await?;
    if body.is_empty() {
        return Ok(json!({}));
    }
    serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))
}

fn session_cookie(token: &str, max_age: i64) -> HeaderValue {
    HeaderValue::from_str(&format!(
        "{SESSION_COOKIE}={token}; Path=/admin; HttpOnly; SameSite=Strict; Max-Age={max_age}"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static(""))
}

fn login_error(e: LoginError) -> ApiError {
    match e {
        LoginError::RateLimited(secs) => ApiError::RateLimited { retry_after_secs: secs },
        LoginError::WrongPassword => ApiError::InvalidKey,
        LoginError::Internal(e) => ApiError::Internal(e),
    }
}

pub async fn handle(
    node: &Arc<Node>,
    req: Request<Incoming>,
    rest: &str,
    _request_id: &str,
) -> Result<Response<Body>, ApiError> {
    let admin = &node.admin;
    let method = req.method().clone();
    let query = req.uri().query().map(str::to_owned);
    let query = query.as_deref();
    if method == Method::POST || method == Method::DELETE {
        check_post(&req)?;
    }
    let token = auth::session_token(req.headers());
    let authenticated = token.as_deref().is_some_and(|t| admin.auth.is_valid(t));
    match (&method, rest) {
        (&Method::POST, "login") => {
            let client = client_of(&req);
            let body = json_body(req).await?;
            let password = body.get("password").and_then(Value::as_str).unwrap_or_default();
            let token = admin.auth.login(&client, password).await.map_err(login_error)?;
            tracing::info!(client = %client, "admin login");
            let mut resp = http::json_response(StatusCode::OK, &json!({ "ok": true, "token": token }));
            resp.headers_mut().insert(SET_COOKIE, session_cookie(&token, admin.auth.session_secs()));
            return Ok(resp);
        }
        (&Method::GET, "session") => return ok(json!({ "authenticated": authenticated })),
        _ => {}
    }
    if !authenticated {
        return Err(ApiError::InvalidKey);
    }
    match (&method, rest) {
        (&Method::POST, "logout") => {
            if let Some(t) = &token {
                admin.auth.logout(t);
            }
            let mut resp = http::json_response(StatusCode::OK, &json!({ "ok": true }));
            resp.headers_mut().insert(SET_COOKIE, session_cookie("", 0));
            Ok(resp)
        }
        (&Method::POST, "password") => {
            let client = client_of(&req);
            let body = json_body(req).await?;
            let current = body.get("current").and_then(Value::as_str).unwrap_or_default();
            let new = body.get("new").and_then(Value::as_str).unwrap_or_default();
            if new.chars().count() < MIN_PASSWORD_LEN {
                return Err(ApiError::BadRequest(format!(
                    "the new password needs at least {MIN_PASSWORD_LEN} characters"
                )));
            }
            let token = admin.auth.change_password(&client, current, new).await.map_err(login_error)?;
            tracing::info!("admin password changed; other sessions ended");
            let mut resp = http::json_response(StatusCode::OK, &json!({ "ok": true, "token": token }));
            resp.headers_mut().insert(SET_COOKIE, session_cookie(&token, admin.auth.session_secs()));
            Ok(resp)
        }
        (&Method::GET, "overview") => overview(node).await,
        (&Method::GET, "wallet") => ok(wallet(node).await?),
        (&Method::POST, "withdraw") => {
            let body = json_body(req).await?;
            withdraw(node, &body).await
        }
        (&Method::GET, "keys") => {
            let q = query_param(query, "q").unwrap_or_default().to_ascii_lowercase();
            if !q.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(ApiError::BadRequest("q is the start of a key hash (hex)".into()));
            }
            let limit = number(query, "limit", 50, 500);
            let offset = number(query, "offset", 0, u32::MAX);
            let (keys, total) = node.ledger().admin_keys(q, limit, offset).await?;
            ok(json!({ "keys": keys, "total": total }))
        }
        (&Method::GET, r) if r.starts_with("keys/") && !r[5..].contains('/') => {
            let hash = r[5..].to_owned();
            let (key, requests) =
                node.ledger().admin_key(hash).await?.ok_or_else(|| ApiError::NotFoundResource("no such key".into()))?;
            ok(json!({ "key": key, "requests": requests }))
        }
        (&Method::POST, r) if inner(r, "keys/", "/adjust").is_some() => {
            let hash = inner(r, "keys/", "/adjust").unwrap_or_default().to_owned();
            let body = json_body(req).await?;
            adjust(node, hash, &body).await
        }
        (&Method::POST, r) if inner(r, "keys/", "/revoke").is_some() => {
            let hash = inner(r, "keys/", "/revoke").unwrap_or_default().to_owned();
            let body = json_body(req).await?;
            let revoked = body.get("revoked").and_then(Value::as_bool).unwrap_or(true);
            let key = node.ledger().admin_set_revoked(hash, revoked).await.map_err(not_found_key)?;
            tracing::info!(revoked, "admin changed a key's revocation");
            ok(json!({ "key": key }))
        }
        (&Method::GET, "transactions") => {
            let limit = number(query, "limit", 100, 1000);
            let before = query_param(query, "before").and_then(|v| v.parse::<i64>().ok());
            ok(json!({ "transactions": node.ledger().admin_transactions(limit, before).await? }))
        }
        (&Method::GET, "upstreams") => ok(upstreams(node)?),
        (&Method::POST, "upstreams") => {
            let body = json_body(req).await?;
            add_upstream(node, &body).await
        }
        (&Method::POST, r) if r.starts_with("upstreams/") => {
            let name = r["upstreams/".len()..].to_owned();
            let body = json_body(req).await?;
            edit_upstream(node, name, &body).await
        }
        (&Method::DELETE, r) if r.starts_with("upstreams/") => {
            delete_upstream(node, r["upstreams/".len()..].to_owned()).await
        }
        (&Method::GET, "models") => ok(models(node)),
        (&Method::POST, r) if inner(r, "models/", "/price").is_some() => {
            let id = inner(r, "models/", "/price").unwrap_or_default().to_owned();
            let body = json_body(req).await?;
            let pricing =
                body.get("pricing").cloned().ok_or_else(|| ApiError::BadRequest("pricing is required".into()))?;
            set_price(node, id, Some(pricing)).await
        }
        (&Method::DELETE, r) if inner(r, "models/", "/price").is_some() => {
            set_price(node, inner(r, "models/", "/price").unwrap_or_default().to_owned(), None).await
        }
        (&Method::GET, "nostr") => ok(nostr(node)),
        (&Method::GET, "tor") => ok(json!({
            "onion_service": node.settings.onion_service,
            "tor_outbound": node.settings.tor_outbound,
            "clearnet_listen": node.settings.clearnet_listen,
            "onion_url": node.settings.onion_url.clone().or_else(|| node.tor.as_ref()?.onion_url()),
            "status": node.tor.as_ref().map(|t| t.status()),
            "admin_onion": node.settings.admin_onion,
        })),
        (&Method::GET, "settings") => ok(json!({
            "settings": settings(&node.settings),
            "admin_layer": node.layers.lock().map(|l| l.to_json()).unwrap_or(Value::Null),
        })),
        (&Method::GET, "requests") => {
            let limit = number(query, "limit", 100, 1000) as usize;
            ok(json!({ "requests": admin.metrics.recent(limit) }))
        }
        (&Method::GET, "logs") => {
            let id = query_param(query, "request_id")
                .filter(|id| !id.is_empty())
                .ok_or_else(|| ApiError::BadRequest("request_id is required".into()))?;
            ok(json!({
                "request_id": id,
                "request": admin.metrics.find(&id),
                "ledger": node.ledger().admin_request(id.clone()).await?,
                "lines": super::logs::for_request(&id),
            }))
        }
        (_, r)
            if KNOWN.iter().any(|k| {
                r == *k || r.starts_with("keys/") || r.starts_with("upstreams/") || r.starts_with("models/")
            }) =>
        {
            Err(ApiError::MethodNotAllowed)
        }
        _ => Err(ApiError::NotFound(format!("/admin/api/{rest}"))),
    }
}

const KNOWN: &[&str] = &[
    "login",
    "logout",
    "session",
    "password",
    "overview",
    "wallet",
    "withdraw",
    "keys",
    "transactions",
    "upstreams",
    "models",
    "nostr",
    "tor",
    "settings",
    "requests",
    "logs",
];

fn not_found_key(e: crate::ledger::LedgerError) -> ApiError {
    match e {
        crate::ledger::LedgerError::KeyNotFound => ApiError::NotFoundResource("no such key".into()),
        other => other.into(),
    }
}

/// The money: per mint, next to users' balances, and the operator's earnings.
async fn wallet(node: &Node) -> Result<Value, ApiError> {
    let balances = node.wallet().balances().await?;
    let totals = node.ledger().totals().await?;
    let held: u64 = balances.iter().map(|b| b.balance_msat).sum();
    let earnings = totals.earnings_msat(held);
    Ok(json!({
        "mints": balances.iter().map(|b| json!({
            "mint_url": b.mint_url, "unit": b.unit, "balance_msat": b.balance_msat, "pending_msat": b.pending_msat,
        })).collect::<Vec<_>>(),
        "wallet_msat": held,
        "user_balances_msat": totals.balances_msat,
        "reserved_msat": totals.reserved_msat,
        "earnings_msat": earnings,
        "earnings_sat": msat_to_sats(earnings),
        "undercovered": totals.undercovered(held, balances.iter().map(|b| b.pending_msat).sum()),
        "totals": totals,
    }))
}

async fn overview(node: &Node) -> Result<Response<Body>, ApiError> {
    let money = wallet(node).await?;
    let now = crate::ledger::now_secs();
    let since = now - now.rem_euclid(3600) - 23 * 3600;
    let usage = node.ledger().admin_usage(since, 3600).await?;
    let (requests, errors) = node.admin.metrics.counts();
    ok(json!({
        "node": {
            "name": node.settings.name,
            "version": env!("CARGO_PKG_VERSION"),
            "npub": node.nostr.npub(),
            "uptime_seconds": node.admin.metrics.uptime().as_secs(),
            "models": node.catalog().len(),
            "upstreams": node.upstreams().len(),
        },
        "money": money,
        "requests_since_start": requests,
        "errors_since_start": errors,
        "in_flight": node.inflight.count(),
        "usage": { "since": since, "bucket_seconds": 3600, "buckets": usage },
        "hours": node.admin.metrics.hours(),
    }))
}

/// `POST /admin/api/withdraw {"amount_sat": N, "mint": "…"?}`: earnings out as a Cashu token.
/// Refused when N is more than the earnings: the wallet minus every user's balance (reserved
/// included), counted once over all mints.
async fn withdraw(node: &Node, body: &Value) -> Result<Response<Body>, ApiError> {
    let amount_sat = body
        .get("amount_sat")
        .and_then(Value::as_u64)
        .filter(|a| *a > 0)
        .ok_or_else(|| ApiError::BadRequest("amount_sat (a positive number of sats) is required".into()))?;
    let amount_msat = amount_sat.saturating_mul(1000);
    let _one_at_a_time = node.admin.earnings_lock.lock().await;
    let balances = node.wallet().balances().await?;
    let held: u64 = balances.iter().map(|b| b.balance_msat).sum();
    let totals = node.ledger().totals().await?;
    let earnings = totals.earnings_msat(held);
    if amount_msat > earnings {
        return Err(ApiError::Conflict(format!(
            "refused: {amount_sat} sat is more than the operator's earnings ({} sat); the rest backs users' balances",
            earnings / 1000
        )));
    }
    let mint = match body.get("mint").and_then(Value::as_str).filter(|m| !m.is_empty()) {
        Some(m) => m.to_owned(),
        None => balances
            .iter()
            .max_by_key(|b| b.balance_msat)
            .map(|b| b.mint_url.clone())
            .ok_or_else(|| ApiError::Conflict("the wallet is empty".into()))?,
    };
    // The mint's fee comes out of the wallet too: token and fee within the earnings.
    let sent = node.wallet().send_within(&mint, amount_msat, earnings).await?;
    tracing::info!(amount_sat, mint = %sent.mint_url, fee_msat = sent.fee_msat, "admin withdrew earnings");
    ok(json!({
        "token": sent.token,
        "amount_sat": amount_sat,
        "mint": sent.mint_url,
        "fee_msat": sent.fee_msat,
    }))
}

/// `POST /admin/api/keys/{hash}/adjust {"delta_msat": ±N, "note": "…"}`. A credit comes out
/// of the operator's earnings and is refused beyond them.
async fn adjust(node: &Node, hash: String, body: &Value) -> Result<Response<Body>, ApiError> {
    let delta = body
        .get("delta_msat")
        .and_then(Value::as_i64)
        .filter(|d| *d != 0)
        .ok_or_else(|| ApiError::BadRequest("delta_msat (a non-zero number of msat) is required".into()))?;
    let note = body.get("note").and_then(Value::as_str).unwrap_or("").chars().take(200).collect::<String>();
    let _one_at_a_time = node.admin.earnings_lock.lock().await;
    if delta > 0 {
        let held: u64 = node.wallet().balances().await?.iter().map(|b| b.balance_msat).sum();
        let earnings = node.ledger().totals().await?.earnings_msat(held);
        if delta.unsigned_abs() > earnings {
            return Err(ApiError::Conflict(format!(
                "refused: a credit of {delta} msat is more than the operator's earnings ({earnings} msat)"
            )));
        }
    }
    let key = node.ledger().admin_adjust(hash, delta, note).await.map_err(not_found_key)?;
    tracing::info!(delta_msat = delta, "admin adjusted a key's balance");
    ok(json!({ "key": key }))
}

fn upstreams(node: &Node) -> Result<Value, ApiError> {
    let active = node.upstreams();
    let layers = node.layers.lock().map_err(|_| ApiError::Internal("layers lock".into()))?;
    let layered = layers.layered().map_err(|e| ApiError::Internal(e.to_string()))?;
    let list: Vec<Value> = layered
        .iter()
        .map(|l| {
            let live = active.iter().find(|u| u.name == l.spec.name);
            json!({
                "name": l.spec.name,
                "base_url": without_userinfo(l.spec.base_url.trim_end_matches('/')),
                "has_api_key": l.spec.api_key.is_some() || l.spec.api_key_env.is_some(),
                "markup": l.spec.markup,
                "effective_markup": live.map(|u| u.markup.factor()),
                "models": l.spec.models,
                "aliases": l.spec.aliases,
                "source": l.source,
                "disabled": l.disabled,
                "health": live.map(|u| u.health()),
            })
        })
        .collect();
    Ok(json!({
        "upstreams": list,
        "layers": layers.to_json(),
        "exchange_fee": node.settings.exchange_fee,
        "fixed_pricing": node.settings.fixed_pricing,
        "btc_usd": node.rates.get().map(|r| r.usd_per_btc()),
    }))
}

fn field<T: serde::de::DeserializeOwned>(body: &Value, name: &str) -> Result<Option<T>, ApiError> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => {
            serde_json::from_value(v.clone()).map(Some).map_err(|e| ApiError::BadRequest(format!("{name}: {e}")))
        }
    }
}

/// Fills `entry` from the fields `body` sets. An empty `api_key` leaves the key as it is.
fn edit_entry(entry: &mut AdminUpstream, body: &Value) -> Result<(), ApiError> {
    if let Some(v) = field::<String>(body, "base_url")? {
        entry.base_url = Some(v);
    }
    if let Some(v) = field::<String>(body, "api_key")?.filter(|k| !k.is_empty()) {
        entry.api_key = Some(v);
    }
    if let Some(v) = field(body, "models")? {
        entry.models = Some(v);
    }
    if let Some(v) = field(body, "aliases")? {
        entry.aliases = Some(v);
    }
    if let Some(v) = field(body, "markup")? {
        entry.markup = Some(v);
    }
    if let Some(v) = field(body, "disabled")? {
        entry.disabled = v;
    }
    Ok(())
}

/// `POST /admin/api/upstreams {name, base_url, api_key?, models?, aliases?, markup?}`.
async fn add_upstream(node: &Node, body: &Value) -> Result<Response<Body>, ApiError> {
    let name = field::<String>(body, "name")?
        .map(|n| n.trim().to_owned())
        .filter(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)))
        .ok_or_else(|| ApiError::BadRequest("name (letters, digits, '.', '_', '-') is required".into()))?;
    if field::<String>(body, "base_url")?.is_none() {
        return Err(ApiError::BadRequest("base_url is required".into()));
    }
    node.edit_layers(|layers| {
        if layers.is_env(&name) || layers.admin.iter().any(|a| a.name == name) {
            return Err(ApiError::Conflict(format!("an upstream named '{name}' exists; edit it instead")));
        }
        let mut entry = AdminUpstream { name: name.clone(), ..AdminUpstream::default() };
        edit_entry(&mut entry, body)?;
        layers.admin.push(entry);
        Ok(())
    })
    .await?;
    tracing::info!(upstream = %name, "admin added an upstream");
    ok(upstreams(node)?)
}

/// `POST /admin/api/upstreams/{name}`: changes the fields given (`disabled` included). An
/// environment upstream gets an admin entry over it.
async fn edit_upstream(node: &Node, name: String, body: &Value) -> Result<Response<Body>, ApiError> {
    node.edit_layers(|layers| {
        let known = layers.is_env(&name);
        match layers.admin.iter_mut().find(|a| a.name == name) {
            Some(entry) => edit_entry(entry, body),
            None if known => {
                let mut entry = AdminUpstream { name: name.clone(), ..AdminUpstream::default() };
                edit_entry(&mut entry, body)?;
                layers.admin.push(entry);
                Ok(())
            }
            None => Err(ApiError::NotFoundResource(format!("no upstream named '{name}'"))),
        }
    })
    .await?;
    tracing::info!(upstream = %name, "admin edited an upstream");
    ok(upstreams(node)?)
}

/// `DELETE /admin/api/upstreams/{name}`: removes the admin entry (an environment upstream
/// comes back as the environment defines it; disable it to stop using it).
async fn delete_upstream(node: &Node, name: String) -> Result<Response<Body>, ApiError> {
    node.edit_layers(|layers| {
        let before = layers.admin.len();
        layers.admin.retain(|a| a.name != name);
        match (before != layers.admin.len(), layers.is_env(&name)) {
            (true, _) => Ok(()),
            (false, true) => Err(ApiError::Conflict(format!(
                "'{name}' comes from the environment (UPSTREAM_* / UPSTREAMS_PATH): disable it here, or remove it there"
            ))),
            (false, false) => Err(ApiError::NotFoundResource(format!("no upstream named '{name}'"))),
        }
    })
    .await?;
    tracing::info!(upstream = %name, "admin deleted an upstream");
    ok(upstreams(node)?)
}

/// `POST /admin/api/models/{id}/price {"pricing": {"prompt": "…", "completion": "…", …}}`
/// (USD per token, OpenRouter fields) or `DELETE` to drop the override.
async fn set_price(node: &Node, id: String, pricing: Option<Value>) -> Result<Response<Body>, ApiError> {
    if let Some(p) = &pricing {
        crate::layers::check_pricing(p).map_err(ApiError::BadRequest)?;
    }
    let removed = node
        .edit_layers(|layers| {
            Ok(match &pricing {
                Some(p) => {
                    layers.prices.insert(id.clone(), p.clone());
                    false
                }
                None => layers.prices.remove(&id).is_some(),
            })
        })
        .await?;
    if pricing.is_none() && !removed {
        return Err(ApiError::NotFoundResource(format!("no price override for '{id}'")));
    }
    tracing::info!(model = %id, set = pricing.is_some(), "admin changed a model's price override");
    ok(models(node))
}

fn models(node: &Node) -> Value {
    let c = node.catalog();
    let mut v = c.to_json(c.upstreams(), &node.policy, node.rates.get());
    v["price_overrides"] = node.layers.lock().map(|l| Value::Object(l.prices.clone())).unwrap_or(Value::Null);
    v
}

fn nostr(node: &Node) -> Value {
    let stats = node.nostr.stats();
    json!({
        "enabled": node.settings.nostr_enabled,
        "discovery": node.settings.nostr_discovery,
        "npub": node.nostr.npub(),
        "provider_id": stats.d,
        "relays": node.nostr.relays.iter().map(|r| json!({ "url": r.url, "read": r.read, "write": r.write })).collect::<Vec<_>>(),
        "announcements_signed": stats.announcements_signed,
        "price_lists_signed": stats.price_lists_signed,
        "last_announcement_at": stats.last_announcement_at,
        "last_price_list_at": stats.last_price_list_at,
        "providers": node.nostr.providers_json(None)["providers"].clone(),
    })
}

/// The settings as `--help` names them, from their debug form (secrets print redacted).
fn settings(settings: &crate::config::Settings) -> Vec<Value> {
    let text = format!("{settings:#?}");
    let mut out: Vec<Value> = Vec::new();
    let mut current: Option<(String, String)> = None;
    for line in text.lines().skip(1) {
        let top = line.starts_with("    ") && !line[4..].starts_with(' ');
        if top {
            if let Some((name, value)) = current.take() {
                out.push(setting(&name, &value));
            }
            if let Some((name, value)) = line.trim().split_once(": ") {
                current = Some((name.to_owned(), value.to_owned()));
            }
        } else if let Some((_, value)) = current.as_mut() {
            if line != "}" {
                value.push(' ');
                value.push_str(line.trim());
            }
        }
    }
    if let Some((name, value)) = current.take() {
        out.push(setting(&name, &value));
    }
    out
}

fn setting(name: &str, value: &str) -> Value {
    json!({ "name": name.to_ascii_uppercase(), "value": without_userinfo(value.trim_end_matches(',')) })
}

/// `text` with the credentials of every URL in it (`scheme://user:pass@host`) starred out.
fn without_userinfo(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (head, tail) = rest.split_at(at + 3);
        out.push_str(head);
        let authority_end = tail.find(['/', '?', '#', '"', ' ', ',']).unwrap_or(tail.len());
        match tail[..authority_end].rfind('@') {
            Some(userinfo_end) => {
                out.push_str("***");
                rest = &tail[userinfo_end..];
            }
            None => rest = tail,
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_listed_and_secrets_redacted() {
        let mut s = crate::config::Settings::from_env().unwrap();
        s.upstream_api_key = Some(crate::secret::Secret::new("sk-upstream-very-secret"));
        s.admin_password = Some(crate::secret::Secret::new("hunter2hunter2"));
        let list = settings(&s);
        let text = serde_json::to_string(&list).unwrap();
        assert!(!text.contains("very-secret") && !text.contains("hunter2"));
        assert!(list.iter().any(|v| v["name"] == "PORT"));
        assert!(list.iter().any(|v| v["name"] == "CASHU_MINTS"));
    }

    #[test]
    fn urls_lose_their_credentials() {
        let mut s = crate::config::Settings::from_env().unwrap();
        s.upstream_base_url = Some("http://user:pa55word@upstream.example:8080/v1".into());
        let text = serde_json::to_string(&settings(&s)).unwrap();
        assert!(!text.contains("pa55word") && text.contains("http://***@upstream.example:8080/v1"), "{text}");
        assert_eq!(without_userinfo("a https://x@h/p, b http://h2/q@r"), "a https://***@h/p, b http://h2/q@r");
        assert_eq!(without_userinfo("no url here"), "no url here");
    }

    #[test]
    fn paths_around_an_id() {
        assert_eq!(inner("keys/ab12/adjust", "keys/", "/adjust"), Some("ab12"));
        assert_eq!(inner("keys/adjust", "keys/", "/adjust"), None);
        assert_eq!(inner("models/price", "models/", "/price"), None);
        assert_eq!(inner("models//price", "models/", "/price"), Some(""));
    }

    #[test]
    fn query_params() {
        assert_eq!(query_param(Some("q=ab&limit=5"), "limit").as_deref(), Some("5"));
        assert_eq!(query_param(Some("request_id=req%2D1"), "request_id").as_deref(), Some("req-1"));
        assert_eq!(query_param(Some("x=%4"), "x").as_deref(), Some("%4"));
    }
}
