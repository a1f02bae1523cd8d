//! The metered proxy, in phases: read and check the request → price it → reserve its maximum
//! cost → forward (failing over between upstreams before any byte reached the client) → meter
//! the answer → settle (charge what was used, release the rest) → return change.
//!
//! Once the request is priced, its work runs to the end whatever the client does: on the
//! connection's task while the client waits, in a task of its own once the answer has left (a
//! stream) or the client has (`Detachable`). So a client that disconnects cannot leave a
//! reservation open: the work always settles or releases.

pub mod client;
mod json_scan;
mod pool;
pub mod remote;
pub mod request;
pub mod usage;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use tokio::sync::oneshot;

use crate::catalog::ModelRoute;
use crate::error::ApiError;
use crate::http::{self, Body, ChannelBody};
use crate::node::Node;
use crate::payment::{PaidOut, Payer};
use crate::pricing::{BtcRate, Cost, MsatPrices, Usage};
use crate::upstream::Upstream;
use client::{ReadError, UpstreamError, UpstreamResponse};
use request::{BodyError, RequestFields, MAX_CHOICES};

/// Largest upstream answer read whole (non-streaming JSON); larger ones are refused.
const MAX_UPSTREAM_BODY: usize = 64 * 1024 * 1024;
/// Largest upstream error answer read (to pass on).
const ERROR_BODY_LIMIT: usize = 1024 * 1024;
/// Chunks buffered between the upstream reader and a slow client.
const STREAM_DEPTH: usize = 64;

/// Request headers never forwarded: credentials, hop-by-hop, and anything naming the client.
const STRIPPED_REQUEST_HEADERS: &[&str] = &[
    "authorization",
    "x-cashu",
    "refund-lnurl",
    "key-expiry-time",
    "x-api-key",
    "host",
    "content-length",
    "connection",
    "keep-alive",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "accept-encoding",
    "cookie",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-real-ip",
    "via",
    "origin",
    "referer",
    remote::HOPS_HEADER,
];

/// Upstream response headers not passed on.
const STRIPPED_RESPONSE_HEADERS: &[&str] = &[
    "content-length",
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-encoding",
    "set-cookie",
    "trailer",
    "upgrade",
    "proxy-authenticate",
    "alt-svc",
    // Ours to set: an upstream's (or a remote provider's) change and costs are not the client's.
    "x-cashu",
    "x-routstr-cost-msats",
    "x-routstr-input-cost-msats",
    "x-routstr-output-cost-msats",
    "x-routstr-cost-usd",
];

/// Where the request's work sends its answer (the handler waits on the other end).
type Respond = oneshot::Sender<Result<Response<Body>, ApiError>>;

/// Longest wait for a client to take the next chunk of a stream before it counts as gone.
const CLIENT_STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// One way to serve the request, priced.
struct PricedRoute {
    route: ModelRoute,
    upstream: Arc<Upstream>,
    prices: MsatPrices,
    /// Set when the route buys from a discovered provider (paid from our wallet).
    remote: Option<remote::RemoteOffer>,
}

/// A settlement queued in the ledger, resolving once durable.
type QueuedSettlement = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<crate::ledger::Settled, crate::ledger::LedgerError>> + Send>,
>;

/// What the settling task needs to know about the request.
struct Metering {
    node: Arc<Node>,
    payer: Payer,
    request_id: String,
    request_len: usize,
    /// The completion tokens the reservation covers: an estimate (no usage reported) never
    /// charges more, so it cannot take more than was held.
    max_output_tokens: u64,
}

impl Metering {
    /// The usage charged when the upstream reported none (see `usage::estimate`).
    fn estimate(&self, output_tokens: u64) -> Usage {
        usage::estimate(self.request_len, output_tokens.min(self.max_output_tokens))
    }

    /// Charges `usage` (or releases everything when `None`), then pays `X-Cashu` change.
    async fn settle(&self, prices: &MsatPrices, usage: Option<Usage>, note: &str) -> (Option<Cost>, Option<PaidOut>) {
        self.settle_cost(usage.map(|u| prices.cost(&u)), note).await
    }

    /// Charges `cost` (or releases everything when `None`), then pays `X-Cashu` change.
    async fn settle_cost(&self, cost: Option<Cost>, note: &str) -> (Option<Cost>, Option<PaidOut>) {
        let (cost, queued) = self.queue_settlement(cost, note);
        let cost = self.settled(cost, queued).await;
        let change = self.pay_change().await;
        (cost, change)
    }

    /// Queues the charge (or release) in the ledger now: every later ledger job, such as the
    /// client's next balance query, already sees it. Returns the cost as charged (with the
    /// rounding of a stateless payment) and the settlement to await.
    fn queue_settlement(&self, cost: Option<Cost>, note: &str) -> (Option<Cost>, QueuedSettlement) {
        let cost = cost.map(|cost| match &self.payer.xcashu {
            Some(x) => cost.with_rounding(x.rounding_after(cost.total_msats)),
            None => cost,
        });
        let queued = Box::pin(self.node.ledger().end(&self.payer.reservation, cost.map(|c| c.total_msats), note));
        (cost, queued)
    }

    /// Waits for a queued settlement to be durable; the cost actually charged.
    async fn settled(&self, cost: Option<Cost>, queued: QueuedSettlement) -> Option<Cost> {
        match queued.await {
            Ok(settled) => cost.map(|c| {
                if settled.charged_msat < c.total_msats {
                    // Only part could be collected: report what was charged.
                    Cost::new(
                        c.base_msats.min(settled.charged_msat),
                        0,
                        settled.charged_msat.saturating_sub(c.base_msats),
                    )
                } else {
                    c
                }
            }),
            Err(e) => {
                settlement_failed(&self.request_id, &e);
                cost
            }
        }
    }

    /// Queues the charge of a key-paid request (or its release when `None`) without waiting for
    /// the disk: every later ledger job sees it, and a failure is logged once known. The answer to
    /// a key holder need not wait for the fsync; the node's shutdown waits for the ledger instead.
    async fn settle_detached(&self, cost: Option<Cost>, note: &str) -> Option<Cost> {
        let request_id = self.request_id.clone();
        let queued = self.node.ledger().end_detached(
            &self.payer.reservation,
            cost.map(|c| c.total_msats),
            note,
            move |result| {
                if let Err(e) = result {
                    settlement_failed(&request_id, &e);
                }
            },
        );
        // Queued before the answer leaves (and while this request still counts as in flight). A
        // job that could not be queued is dropped unrun: the callback above hears of it.
        let _ = queued.await;
        cost
    }

    async fn pay_change(&self) -> Option<PaidOut> {
        let token_hash = &self.payer.xcashu.as_ref()?.token_hash;
        match self
            .node
            .payments
            .xcashu_change(&self.payer.reservation.key_hash, token_hash, Some(&self.request_id))
            .await
        {
            Ok(change) => change,
            Err(e) => {
                tracing::warn!(request_id = %self.request_id, error = %e, "change could not be made now; it stays recoverable");
                None
            }
        }
    }

    fn usd(&self, cost: &Cost) -> Option<f64> {
        self.node.rates.get().map(|r| r.msat_to_usd(cost.total_msats))
    }
}

fn settlement_failed(request_id: &str, e: &crate::ledger::LedgerError) {
    tracing::error!(request_id, error = %e, "settlement failed: not charged; a hold still on the key is released at the next start");
}

pub async fn handle(
    node: Arc<Node>,
    req: Request<Incoming>,
    path: String,
    request_id: String,
) -> Result<Response<Body>, ApiError> {
    let (parts, body) = req.into_parts();
    let body = http::read_limited(body, node.settings.max_body_bytes).await?;
    let fields = if body.is_empty() {
        None
    } else {
        match RequestFields::parse(&body) {
            Ok(fields) => Some(fields),
            Err(BodyError::NotAnObject) => {
                return Err(ApiError::BadRequest("the request body must be a JSON object".into()))
            }
            Err(BodyError::Invalid(why)) if is_json(&parts.headers) || parts.method == Method::POST => {
                return Err(ApiError::BadRequest(format!("invalid JSON body: {why}")))
            }
            Err(BodyError::Invalid(_)) => None,
        }
    };
    let model = fields.as_ref().map(RequestFields::model).unwrap_or_default().to_owned();
    if let Some(slot) = parts.extensions.get::<crate::admin::ModelSlot>() {
        slot.set(&model); // the label of this request in /metrics
    }
    if parts.method == Method::POST && model.is_empty() && BODY_NEEDS_MODEL.contains(&path.as_str()) {
        return Err(ApiError::BadRequest("the request has no \"model\"".into()));
    }
    if fields.as_ref().map_or(1, RequestFields::choices_asked) > MAX_CHOICES {
        return Err(ApiError::BadRequest(format!("at most {MAX_CHOICES} completions per request")));
    }
    let local = price_routes(&node, &model);
    let first_local = local.as_ref().ok().and_then(|routes| routes.first()).map(|r| &r.route);
    let (per_choice, choices) = completion_limit(fields.as_ref(), &path, first_local, &node);
    // Capped only when a local upstream serves the model (the reservation is then the node's own
    // for it); a provider it falls back to gets the same body. One bought from alone is paid for
    // its own maximum, whatever the answer's length.
    let cap = match (&fields, first_local) {
        (Some(f), Some(route)) => completion_cap(f, &path, route, &node),
        _ => None,
    };

    // A body the node rewrites for some route is parsed whole, once, here: what the partial
    // parse skipped must be JSON too (invalid UTF-8 in a skipped string is already refused).
    let whole = match &fields {
        Some(f)
            if wants_usage(f, &path)
                || local.as_ref().is_ok_and(|routes| routes.iter().any(|r| renames(f, &r.route))) =>
        {
            Some(
                serde_json::from_slice::<Value>(&body)
                    .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))?,
            )
        }
        _ => None,
    };
    let forward = Forward {
        method: parts.method,
        path,
        query: parts.uri.query().map(str::to_owned),
        hops: remote::hops(&parts.headers),
        headers: parts.headers,
        fields,
        whole,
        cap,
        raw: body,
    };
    // Providers discovered on Nostr, when routing may use them (never for a request that
    // already came through a router).
    let remote_offers = || {
        if forward.hops >= remote::MAX_HOPS || node.nostr.registry.is_empty() {
            return Err(remote::NoOffer::Nobody);
        }
        let body_len = forward.body_for(&remote_route(&model)).len();
        remote::offers(&node, &model, forward.fields.as_ref(), &forward.path, body_len)
    };
    let (routes, max_cost, max_output_tokens) = match local {
        Ok(mut routes) => {
            let max_completion = if forward.path == "embeddings" { 0 } else { per_choice.saturating_mul(choices) };
            let prompt_estimate = (forward.raw.len() as u64)
                .div_ceil(3)
                .saturating_add(request::attachments(&forward.raw).saturating_mul(request::ATTACHMENT_TOKENS));
            let max_cost = routes
                .iter()
                .map(|r| r.prices.max_cost(prompt_estimate, max_completion).total_msats)
                .max()
                .unwrap_or(0);
            // If every local upstream fails: the providers whose price fits this reservation.
            if let Ok(offers) = remote_offers() {
                let fitting = offers.into_iter().filter(|o| o.reserve_msat() <= max_cost);
                routes.extend(fitting.filter_map(|o| remote_priced(&model, o)));
            }
            (routes, max_cost, max_completion)
        }
        Err(
            e @ (ApiError::UnknownModel(_)
            | ApiError::Unavailable(_)
            | ApiError::Unpriced(_)
            | ApiError::PriceUnavailable),
        ) => match remote_offers() {
            Ok(offers) => {
                let max_cost = offers.iter().map(remote::RemoteOffer::reserve_msat).max().unwrap_or(0);
                let routes: Vec<PricedRoute> = offers.into_iter().filter_map(|o| remote_priced(&model, o)).collect();
                if routes.is_empty() {
                    return Err(e);
                }
                (routes, max_cost, per_choice.saturating_mul(choices))
            }
            Err(remote::NoOffer::Refused(err)) => return Err(err),
            Err(remote::NoOffer::Nobody) if node.upstreams().is_empty() && node.settings.remote_routing => {
                return Err(ApiError::Unavailable(format!(
                    "this node has no upstream of its own and no provider discovered on Nostr sells '{model}' right now"
                )))
            }
            Err(remote::NoOffer::Nobody) => return Err(e),
        },
        Err(e) => return Err(e),
    };
    // From here on the work always runs to its end: a client that goes away (even while its
    // token is being redeemed) cannot leave a reservation behind (see `Detachable`).
    let (respond, response) = oneshot::channel();
    let work = async move {
        let _in_flight = node.inflight.enter();
        let payer = match node.payments.authorize(&forward.headers, max_cost, &request_id, &model).await {
            Ok(payer) => payer,
            Err(e) => {
                let _ = respond.send(Err(e));
                return;
            }
        };
        let request_len = forward.raw.len();
        let metering = Metering { node, payer, request_id, request_len, max_output_tokens };
        run_request(metering, forward, routes, respond).await;
    };
    Detachable::new(work)
        .answer(response)
        .await
        .map_err(|_| ApiError::Internal("the request's work ended without an answer".into()))?
}

/// A request's work, run on its connection's task until the answer is ready: most requests end
/// there, with no task of their own and no hand-off between threads. Whatever is left when it is
/// dropped (a stream's body still to pass on, or everything when the client left first) goes on
/// in a task of its own, so the work always settles.
struct Detachable {
    work: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl Detachable {
    fn new(work: impl Future<Output = ()> + Send + 'static) -> Detachable {
        // Boxed as it comes: its state is large, and each wrapper around it would move it again.
        Detachable { work: Some(Box::pin(work)) }
    }

    /// Runs the work until `answer` is ready (or the work ends without one).
    async fn answer<T>(mut self, mut answer: oneshot::Receiver<T>) -> Result<T, oneshot::error::RecvError> {
        let inline = Arc::new(InlineWake::default());
        let answer_waker = std::task::Waker::from(inline.clone());
        std::future::poll_fn(|cx| {
            inline.follow(cx.waker());
            if let Some(work) = self.work.as_mut() {
                // A panic ends the work alone (its answer then is an internal error), as it did
                // when the work was a task of its own, not the client's connection. (Once
                // detached, it is a task of its own again.)
                let poll = || std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work.as_mut().poll(cx)));
                if inline.while_polling(poll).map_or(true, |p| p.is_ready()) {
                    self.work = None;
                }
            }
            // Ended without an answer: the sender is gone, so this is ready too.
            Pin::new(&mut answer).poll(&mut std::task::Context::from_waker(&answer_waker))
        })
        .await
    }
}

/// The waker of a request's answer. The work sends its answer while this task polls it, and the
/// answer is looked at right after: waking the task then would only make tokio poll it once more
/// for nothing, and first hand it to the other worker (a task woken while it runs goes to the back
/// of the queue and a parked worker is woken for it: ≈ one thread wake-up per request). So a wake
/// during the work's poll is dropped; one from elsewhere (an answer sent by another task) is not.
#[derive(Default)]
struct InlineWake {
    polling: AtomicBool,
    task: std::sync::Mutex<Option<std::task::Waker>>,
}

impl InlineWake {
    /// Wakes `waker`'s task from now on.
    fn follow(&self, waker: &std::task::Waker) {
        let mut task = self.task.lock().unwrap_or_else(|p| p.into_inner());
        if !task.as_ref().is_some_and(|t| t.will_wake(waker)) {
            *task = Some(waker.clone());
        }
    }

    /// Runs `poll_work`, dropping the wakes that come meanwhile.
    fn while_polling<R>(&self, poll_work: impl FnOnce() -> R) -> R {
        self.polling.store(true, Ordering::SeqCst);
        let result = poll_work();
        self.polling.store(false, Ordering::SeqCst);
        // With the fence in `wake_by_ref`: a wake dropped during the poll came after an answer
        // that the caller's look, after this, sees.
        std::sync::atomic::fence(Ordering::SeqCst);
        result
    }
}

impl std::task::Wake for InlineWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        std::sync::atomic::fence(Ordering::SeqCst);
        if !self.polling.load(Ordering::SeqCst) {
            if let Some(task) = self.task.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
                task.wake_by_ref();
            }
        }
    }
}

impl Drop for Detachable {
    fn drop(&mut self) {
        let Some(work) = self.work.take() else { return };
        // Not after a panic in the work itself (it cannot be resumed), nor without a runtime
        // (the process is ending; the ledger releases holds at the next start).
        if std::thread::panicking() {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(work);
        }
    }
}

/// Endpoints whose POST body must name a model.
const BODY_NEEDS_MODEL: &[&str] = &["chat/completions", "completions", "embeddings", "responses", "messages"];

fn is_json(headers: &HeaderMap) -> bool {
    headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains("json"))
}

fn price_routes(node: &Node, model: &str) -> Result<Vec<PricedRoute>, ApiError> {
    let catalog = node.catalog();
    let upstreams = catalog.upstreams();
    let routes = if model.is_empty() {
        // No model (other upstream paths): any upstream, at the fixed prices.
        (0..upstreams.len())
            .map(|i| ModelRoute {
                id: "".into(),
                upstream_model: "".into(),
                upstream: i,
                usd: None,
                context_length: None,
                max_completion_tokens: None,
                raw: Arc::new(Value::Null),
            })
            .collect()
    } else {
        catalog.routes(model)
    };
    if routes.is_empty() {
        return Err(if upstreams.is_empty() {
            ApiError::Unavailable("this node has no upstream configured".into())
        } else {
            ApiError::UnknownModel(model.to_owned())
        });
    }
    let rate = node.rates.get();
    let mut priced = Vec::with_capacity(routes.len());
    let mut last_err = None;
    for route in routes {
        let Some(upstream) = upstreams.get(route.upstream).cloned() else { continue };
        match node.policy.msat_prices(&route, upstream.markup, rate) {
            Ok(prices) => priced.push(PricedRoute { route, upstream, prices, remote: None }),
            Err(e) => last_err = Some(e),
        }
    }
    if priced.is_empty() {
        return Err(last_err.unwrap_or_else(|| ApiError::UnknownModel(model.to_owned())));
    }
    // Healthy upstreams first; cooling ones stay as a last resort.
    priced.sort_by_key(|r| r.upstream.is_cooling_down());
    Ok(priced)
}

/// The route of a request bought from a discovered provider: the model under its own name.
fn remote_route(model: &str) -> ModelRoute {
    ModelRoute {
        id: model.into(),
        upstream_model: model.into(),
        upstream: usize::MAX,
        usd: None,
        context_length: None,
        max_completion_tokens: None,
        raw: Arc::new(Value::Null),
    }
}

fn remote_priced(model: &str, offer: remote::RemoteOffer) -> Option<PricedRoute> {
    let spec = crate::upstream::UpstreamSpec {
        name: if offer.name.is_empty() { offer.provider.chars().take(12).collect() } else { offer.name.clone() },
        base_url: format!("{}/v1", offer.base_url),
        api_key: None,
        api_key_env: None,
        models: Vec::new(),
        aliases: Default::default(),
        markup: 1.0,
    };
    let upstream = Upstream::from_spec(spec, crate::pricing::Markup::NONE).ok()?;
    Some(PricedRoute {
        route: remote_route(model),
        upstream: Arc::new(upstream),
        prices: offer.prices.clone(),
        remote: Some(offer),
    })
}

/// The most completion tokens one completion of a request can produce (the limit it gives for
/// its endpoint, else the model's, else the default), and the number of completions asked for.
fn completion_limit(fields: Option<&RequestFields>, path: &str, route: Option<&ModelRoute>, node: &Node) -> (u64, u64) {
    let (asked, choices) = fields.map_or((None, 1), |f| f.asked_completion(path));
    let model_limit = route.and_then(|r| r.max_completion_tokens);
    (asked.or(model_limit).unwrap_or(node.settings.default_max_completion_tokens), choices)
}

/// Where the request's body gets the limit reserved for (`CAP_COMPLETION_TOKENS`): at its
/// endpoint's own field, when it gives none and the model's listing gives one, below its context
/// length (the reservation's default is no limit an upstream has stated it accepts: a model with
/// a small context would refuse it).
fn completion_cap(fields: &RequestFields, path: &str, route: &ModelRoute, node: &Node) -> Option<(&'static str, u64)> {
    let field = RequestFields::limit_field(path)?;
    let listed = route.max_completion_tokens.filter(|&limit| route.context_length.is_none_or(|ctx| limit < ctx))?;
    (node.settings.cap_completion_tokens && fields.asked_completion(path).0.is_none()).then_some((field, listed))
}

/// `body` (a JSON object) with `"field": value` as its first member: the rest stays as the client
/// wrote it, byte for byte (key order matters to structured outputs).
fn with_first_member(body: &[u8], field: &str, value: u64) -> Option<Bytes> {
    let open = body.iter().position(|b| !b.is_ascii_whitespace()).filter(|&i| body[i] == b'{')?;
    let rest = &body[open + 1..];
    let empty = rest.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'}');
    let member = format!("\"{field}\":{value}{}", if empty { "" } else { "," });
    let mut out = Vec::with_capacity(body.len() + member.len());
    out.extend_from_slice(&body[..=open]);
    out.extend_from_slice(member.as_bytes());
    out.extend_from_slice(rest);
    Some(Bytes::from(out))
}

/// Whether a route's upstream knows the model under another name, so the body names it.
fn renames(fields: &RequestFields, route: &ModelRoute) -> bool {
    !route.upstream_model.is_empty() && fields.model() != &*route.upstream_model
}

/// Whether a stream must ask its upstream for usage (the charge is by usage).
fn wants_usage(fields: &RequestFields, path: &str) -> bool {
    fields.stream && matches!(path, "chat/completions" | "completions") && fields.include_usage != Some(true)
}

/// The request as it will be forwarded.
struct Forward {
    method: Method,
    path: String,
    query: Option<String>,
    headers: HeaderMap,
    /// `None` when the body is empty or, outside a POST, not JSON: it is passed on as it is.
    fields: Option<RequestFields>,
    /// The whole body, parsed only when some route rewrites it.
    whole: Option<Value>,
    /// The completion limit written into the body, and its field (see `completion_cap`).
    cap: Option<(&'static str, u64)>,
    raw: Bytes,
    /// Routers the request came through (`X-Routstr-Hops`).
    hops: u64,
}

impl Forward {
    /// The body for one route: its upstream model name, usage asked for on streams, and the
    /// completion limit reserved for when the request gives none.
    fn body_for(&self, route: &ModelRoute) -> Bytes {
        let cap_only = || {
            let (field, limit) = self.cap?;
            with_first_member(&self.raw, field, limit)
        };
        // `whole` is there whenever a route of this request rewrites its body (see `handle`).
        let (Some(fields), Some(whole)) = (&self.fields, &self.whole) else {
            return cap_only().unwrap_or_else(|| self.raw.clone());
        };
        let rename = renames(fields, route);
        let wants_usage = wants_usage(fields, &self.path);
        if !rename && !wants_usage {
            return cap_only().unwrap_or_else(|| self.raw.clone());
        }
        let mut json = whole.clone();
        if rename {
            json["model"] = json!(route.upstream_model);
        }
        if let Some((field, limit)) = self.cap {
            json[field] = json!(limit);
        }
        if wants_usage {
            match json.get_mut("stream_options").and_then(Value::as_object_mut) {
                Some(options) => {
                    options.insert("include_usage".into(), json!(true));
                }
                None => json["stream_options"] = json!({ "include_usage": true }),
            }
        }
        serde_json::to_vec(&json).map(Bytes::from).unwrap_or_else(|_| self.raw.clone())
    }

    /// The request to one upstream; `None` when its URL cannot be one.
    fn request(&self, upstream: &Upstream, body: Bytes) -> Option<Request<Bytes>> {
        let mut headers = HeaderMap::with_capacity(self.headers.len() + 3);
        for (name, value) in &self.headers {
            if !STRIPPED_REQUEST_HEADERS.contains(&name.as_str()) {
                headers.append(name.clone(), value.clone());
            }
        }
        // Else the client writes it for every request.
        if let Some(host) = &upstream.host {
            headers.insert(hyper::header::HOST, host.clone());
        }
        if let Some(authorization) = &upstream.authorization {
            headers.insert(hyper::header::AUTHORIZATION, authorization.clone());
        }
        if let (Some(key), "messages") = (&upstream.x_api_key, self.path.as_str()) {
            headers.insert(HeaderName::from_static("x-api-key"), key.clone());
        }
        let mut req = Request::new(body);
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = upstream.uri_for(&self.path, self.query.as_deref())?;
        *req.headers_mut() = headers;
        Some(req)
    }
}

/// Why a route was given up on before any byte reached the client.
enum Failure {
    /// Connect error or timeout.
    Transport(ApiError),
    /// 5xx, 429, or the node's credentials refused (`upstream_trouble`): passed on if no
    /// other route answers.
    Status(StatusCode, HeaderMap, Bytes),
}

/// The request's work (see `Detachable`). Every path but a local answer to a key holder is boxed
/// where it begins (remote providers, `X-Cashu` settlement, failures, streams): the work's state
/// is allocated for every request, so it should be the size of the common path.
async fn run_request(metering: Metering, forward: Forward, routes: Vec<PricedRoute>, respond: Respond) {
    let node = metering.node.clone();
    let threshold = node.settings.upstream_failure_threshold;
    let cooldown = Duration::from_secs(node.settings.upstream_cooldown_seconds);
    let mut last_failure = None;
    for priced in &routes {
        let body = forward.body_for(&priced.route);
        let Some(mut req) = forward.request(&priced.upstream, body) else {
            last_failure = Some(Failure::Transport(ApiError::Upstream("the upstream's URL is not valid".into())));
            continue;
        };
        // A discovered provider is paid up front with a token from our wallet.
        let mut spend = None;
        let asked_at = std::time::Instant::now();
        if let Some(offer) = &priced.remote {
            match Box::pin(remote::pay(&node, &metering.request_id, offer)).await {
                Ok(s) => {
                    let Ok(token) = HeaderValue::from_str(&s.token) else {
                        // Not expected (tokens are base64url): the token is taken back, not lost.
                        Box::pin(remote::finish(&node, &s, None, false, None)).await;
                        let why = format!("the token for provider {} is not a header value", offer.name);
                        last_failure = Some(Failure::Transport(ApiError::Upstream(why)));
                        continue;
                    };
                    let headers = req.headers_mut();
                    headers.insert(crate::payment::X_CASHU, token);
                    headers.insert(remote::HOPS_HEADER, HeaderValue::from(forward.hops + 1));
                    spend = Some(s);
                }
                Err(e) => {
                    tracing::warn!(request_id = %metering.request_id, provider = %offer.name, error = %e, "could not pay the provider");
                    last_failure = Some(Failure::Transport(e));
                    continue;
                }
            }
        }
        let sent = node.upstream_client.send(req).await;
        let failure = match (sent, &spend, &priced.remote) {
            (Ok(resp), Some(spend), Some(offer)) if !resp.status().is_success() => {
                let status = resp.status();
                let headers = resp.headers().clone();
                let body = resp.read_whole(ERROR_BODY_LIMIT).await.unwrap_or_default();
                let change = remote::change_from_headers(&headers);
                if !remote::refused(status, &body) {
                    // The provider judged the request itself (a client error): passed on. One
                    // that did not give the token back for it (less a mint's fee at most) is not
                    // asked again for a while: refusing requests must not collect tokens.
                    let back = Box::pin(remote::finish(&node, spend, change.as_deref(), false, None)).await;
                    let margin = 1000 + spend.amount_msat / 100;
                    match back.is_some_and(|b| b.saturating_add(margin) >= spend.amount_msat) {
                        true => node.router.record_success(&offer.provider, asked_at),
                        false => node.router.record_failure(&offer.provider),
                    }
                    let (_, change) =
                        Box::pin(metering.settle(&priced.prices, None, "the provider refused the request")).await;
                    let mut out = passthrough_error(status, &headers, body, &metering.request_id);
                    add_change_header(&mut out, change.as_ref());
                    let _ = respond.send(Ok(out));
                    return;
                }
                Box::pin(remote::finish(&node, spend, change.as_deref(), false, None)).await;
                Failure::Transport(ApiError::Upstream(format!("provider {} answered {status}", offer.name)))
            }
            (Ok(resp), _, _) if upstream_trouble(resp.status()) => {
                let status = resp.status();
                let headers = resp.headers().clone();
                let body = resp.read_whole(ERROR_BODY_LIMIT).await.unwrap_or_default();
                Failure::Status(status, headers, body)
            }
            (Ok(resp), _, _) => {
                match &priced.remote {
                    Some(offer) => node.router.record_success(&offer.provider, asked_at),
                    None => priced.upstream.record_success(),
                }
                deliver(metering, priced, resp, respond, spend).await;
                return;
            }
            (Err(e), spend, offer) => {
                if let Some(spend) = spend {
                    Box::pin(remote::finish(&node, spend, None, false, None)).await;
                }
                match (offer, matches!(e, UpstreamError::Timeout)) {
                    (Some(o), true) => Failure::Transport(ApiError::Upstream(format!("provider {} timed out", o.name))),
                    (Some(o), false) => {
                        Failure::Transport(ApiError::Upstream(format!("could not reach provider {}", o.name)))
                    }
                    (None, true) => Failure::Transport(ApiError::UpstreamTimeout),
                    (None, false) => {
                        tracing::debug!(request_id = %metering.request_id, error = %e, "upstream call failed");
                        Failure::Transport(ApiError::Upstream(describe(&e)))
                    }
                }
            }
        };
        match &priced.remote {
            Some(offer) => node.router.record_failure(&offer.provider),
            None => priced.upstream.record_failure(threshold, cooldown),
        }
        tracing::warn!(request_id = %metering.request_id, upstream = %priced.upstream.name, "upstream failed; trying the next one if any");
        last_failure = Some(failure);
    }
    // Nothing was served: release everything, and X-Cashu gets its whole token back as change.
    let (_, change) = Box::pin(metering.settle(&routes[0].prices, None, "upstream failed")).await;
    let mut resp = match last_failure {
        Some(Failure::Status(status, headers, body)) => passthrough_error(status, &headers, body, &metering.request_id),
        Some(Failure::Transport(err)) => http::error_response(&err, &metering.request_id),
        None => http::error_response(&ApiError::Unavailable("no upstream".into()), &metering.request_id),
    };
    add_change_header(&mut resp, change.as_ref());
    let _ = respond.send(Ok(resp));
}

/// An answer that says the upstream, not the request, is in trouble: another upstream may serve.
/// 401 and 407 mean the node's own credentials were refused.
fn upstream_trouble(status: StatusCode) -> bool {
    status.is_server_error()
        || matches!(
            status,
            StatusCode::TOO_MANY_REQUESTS | StatusCode::UNAUTHORIZED | StatusCode::PROXY_AUTHENTICATION_REQUIRED
        )
}

/// The status a client sees for an upstream's error. What concerns the node's own standing with
/// its upstream (its credentials refused or forbidden, a server error) is a gateway error here:
/// passed on as 401 or 403 it would tell the client that *its* key is bad (PROTOCOL.md §4).
fn client_status(upstream: StatusCode) -> StatusCode {
    match upstream {
        StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT => upstream,
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN | StatusCode::PROXY_AUTHENTICATION_REQUIRED => {
            StatusCode::BAD_GATEWAY
        }
        s if s.is_server_error() => StatusCode::BAD_GATEWAY,
        s => s,
    }
}

/// An upstream error body, passed on in the OpenAI envelope (wrapped when it is not one), under
/// the status `client_status` gives. A refusal of the node's credentials is not passed on: its
/// text may quote the operator's upstream key.
fn passthrough_error(status: StatusCode, headers: &HeaderMap, body: Bytes, request_id: &str) -> Response<Body> {
    let credentials_refused = matches!(status, StatusCode::UNAUTHORIZED | StatusCode::PROXY_AUTHENTICATION_REQUIRED);
    let parsed: Option<Value> = if credentials_refused { None } else { serde_json::from_slice(&body).ok() };
    let mut value = match parsed {
        Some(v) if v.get("error").is_some() => v,
        _ if credentials_refused => {
            tracing::warn!(request_id, %status, "the upstream refused the node's credentials (check its API key)");
            json!({ "error": { "message": format!("the upstream refused this node's credentials ({status}); the operator has to fix them"), "type": "upstream_error", "code": "upstream_error" } })
        }
        _ => {
            let text = String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned();
            json!({ "error": { "message": format!("upstream answered {status}: {text}"), "type": "upstream_error", "code": "upstream_error" } })
        }
    };
    value["request_id"] = json!(request_id);
    let mut resp = http::json_response(client_status(status), &value);
    if let Some(retry) = headers.get(hyper::header::RETRY_AFTER) {
        resp.headers_mut().insert(hyper::header::RETRY_AFTER, retry.clone());
    }
    resp
}

/// What the client is told of a failed upstream call (not its cause: that stays in the log).
fn describe(e: &UpstreamError) -> String {
    match e {
        UpstreamError::Connect => "could not connect to the upstream".into(),
        _ => "the upstream connection failed".into(),
    }
}

/// What the client is told when an answer could not be read whole.
fn read_failure(e: ReadError) -> ApiError {
    match e {
        ReadError::TooLarge { .. } => ApiError::Upstream(e.to_string()),
        ReadError::Upstream(UpstreamError::Timeout) => ApiError::UpstreamTimeout,
        ReadError::Upstream(e) => ApiError::Upstream(describe(&e)),
    }
}

fn response_head(status: StatusCode, upstream: &HeaderMap) -> hyper::http::response::Builder {
    let mut builder = Response::builder().status(status);
    if let Some(headers) = builder.headers_mut() {
        // Room for the cost, change and request id headers too: a map grown one step at a time
        // rehashes every header each time.
        let _ = headers.try_reserve(upstream.len() + 8);
        for (name, value) in upstream {
            if !STRIPPED_RESPONSE_HEADERS.contains(&name.as_str()) {
                let _ = headers.try_append(name.clone(), value.clone());
            }
        }
    }
    builder
}

// Constants, so the names are checked once at compile time rather than on every answer.
const COST_MSATS: HeaderName = HeaderName::from_static("x-routstr-cost-msats");
const INPUT_COST_MSATS: HeaderName = HeaderName::from_static("x-routstr-input-cost-msats");
const OUTPUT_COST_MSATS: HeaderName = HeaderName::from_static("x-routstr-output-cost-msats");
const COST_USD: HeaderName = HeaderName::from_static("x-routstr-cost-usd");

fn add_cost_headers(headers: &mut HeaderMap, cost: &Cost, rate: Option<BtcRate>) {
    headers.insert(COST_MSATS, HeaderValue::from(cost.total_msats));
    headers.insert(INPUT_COST_MSATS, HeaderValue::from(cost.input_msats));
    headers.insert(OUTPUT_COST_MSATS, HeaderValue::from(cost.output_msats));
    if let Some(usd) = rate.and_then(|r| HeaderValue::try_from(r.msat_to_usd_text(cost.total_msats)).ok()) {
        headers.insert(COST_USD, usd);
    }
}

fn add_change_header(resp: &mut Response<Body>, change: Option<&PaidOut>) {
    if let Some(change) = change {
        if let Ok(v) = HeaderValue::from_str(&change.token) {
            resp.headers_mut().insert(crate::payment::X_CASHU, v);
        }
    }
}

/// An upstream answered (not 5xx/429): meter its answer and pass it on.
async fn deliver(
    metering: Metering,
    priced: &PricedRoute,
    resp: UpstreamResponse,
    respond: Respond,
    spend: Option<remote::Spend>,
) {
    let status = resp.status();
    let content_type = resp.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    if !status.is_success() {
        // A client error (bad request, unknown model upstream…): nothing is charged.
        let headers = resp.headers().clone();
        let body = resp.read_whole(ERROR_BODY_LIMIT).await.unwrap_or_default();
        let (_, change) = Box::pin(metering.settle(&priced.prices, None, "upstream refused the request")).await;
        let mut out = passthrough_error(status, &headers, body, &metering.request_id);
        add_change_header(&mut out, change.as_ref());
        let _ = respond.send(Ok(out));
        return;
    }
    if content_type.starts_with("text/event-stream") {
        // Boxed: a stream's state is large, and only streams should carry it.
        Box::pin(stream_answer(metering, priced, resp, respond, spend)).await;
    } else {
        whole_answer(metering, priced, resp, respond, spend).await;
    }
}

/// A non-streaming answer: read it whole, charge its usage, add the cost, send it.
async fn whole_answer(
    metering: Metering,
    priced: &PricedRoute,
    resp: UpstreamResponse,
    respond: Respond,
    spend: Option<remote::Spend>,
) {
    let status = resp.status();
    let head = response_head(status, resp.headers());
    let remote_change = remote::change_from_headers(resp.headers());
    let reported_cost = resp
        .headers()
        .get(&COST_MSATS)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .map(|total| json!({ "total_msats": total }));
    let body = match resp.read_whole(MAX_UPSTREAM_BODY).await {
        Ok(body) => body,
        Err(e) => {
            let err = read_failure(e);
            if let Some(spend) = &spend {
                Box::pin(remote::finish(&metering.node, spend, remote_change.as_deref(), true, None)).await;
            }
            let (_, change) = Box::pin(metering.settle(&priced.prices, None, "upstream answer unreadable")).await;
            let mut out = http::error_response(&err, &metering.request_id);
            add_change_header(&mut out, change.as_ref());
            let _ = respond.send(Ok(out));
            return;
        }
    };
    // Usage at the top of the answer (the usual case) is read and costed without building the
    // whole answer; a remote provider's answer is read whole (its own cost is in it).
    let top = if spend.is_none() { usage::TopUsage::read(&body) } else { None };
    let mut parsed: Option<Value> = if top.is_some() { None } else { serde_json::from_slice(&body).ok() };
    let reported = top.as_ref().map(|t| t.usage).or_else(|| parsed.as_ref().and_then(usage::find_usage));
    let usage = match &parsed {
        _ if reported.is_some() => reported,
        Some(v) => Some(metering.estimate(usage::json_output_estimate(v))),
        None if body.is_empty() => None,
        None => Some(metering.estimate((body.len() as u64).div_ceil(4))),
    };
    let note = if reported.is_some() { "usage" } else { "estimated: no usage reported" };
    let (cost, change) = match (&spend, &priced.remote) {
        (Some(spend), Some(offer)) => {
            let theirs = parsed.as_ref().and_then(remote::their_cost).or(reported_cost);
            let due = remote::change_due(spend.amount_msat, theirs.as_ref());
            Box::pin(settle_remote(&metering, spend, offer, theirs, remote_change.as_deref(), due)).await
        }
        _ if metering.payer.xcashu.is_none() => {
            // A key pays: the charge is queued (every later ledger read sees it) and the answer
            // goes out now; the charge reaches the disk with its batch.
            (metering.settle_detached(usage.map(|u| priced.prices.cost(&u)), note).await, None)
        }
        _ => Box::pin(metering.settle(&priced.prices, usage, note)).await,
    };
    let body = match (top, &mut parsed, &cost) {
        (Some(top), _, Some(cost)) => top.with_cost(&body, &usage::CostView::new(cost, metering.usd(cost))),
        (None, Some(v), Some(cost)) => {
            usage::insert_cost(v, usage::cost_json(cost, metering.usd(cost)));
            serde_json::to_vec(v).map(Bytes::from).unwrap_or(body)
        }
        _ => body,
    };
    let mut out = head.body(http::full(body)).unwrap_or_else(|_| Response::new(http::empty()));
    if let Some(cost) = &cost {
        add_cost_headers(out.headers_mut(), cost, metering.node.rates.get());
    }
    add_change_header(&mut out, change.as_ref());
    let _ = respond.send(Ok(out));
}

/// Settles a request bought from a remote provider: the client pays what the provider kept,
/// with our markup, once its change is back; by usage at the provider's prices (with our markup)
/// while the change is not known yet.
async fn settle_remote(
    metering: &Metering,
    spend: &remote::Spend,
    offer: &remote::RemoteOffer,
    theirs: Option<Value>,
    change_token: Option<&str>,
    due: Option<u64>,
) -> (Option<Cost>, Option<PaidOut>) {
    match remote::finish(&metering.node, spend, change_token, true, due).await {
        Some(returned) => {
            let cost = remote::charge(offer, spend.amount_msat, returned, theirs.as_ref());
            metering.settle_cost(Some(cost), "remote provider").await
        }
        // It answered and kept the whole token, as far as we know now: that is what this answer
        // cost us, and what the client pays (the most it agreed to). Charging by the usage the
        // provider reports would let a provider that keeps tokens (and a client of its own)
        // drain our wallet; change recovered later is the operator's.
        None => {
            let cost = remote::charge(offer, spend.amount_msat, 0, theirs.as_ref());
            metering.settle_cost(Some(cost), "remote provider: no change came back, charged what was sent").await
        }
    }
}

/// A streaming answer: every event goes out as it arrives. The event carrying usage is held
/// until the stream's end so the cost can be added to it; `X-Cashu` change follows as a
/// `cashu-change` event; then the terminal event.
async fn stream_answer(
    metering: Metering,
    priced: &PricedRoute,
    mut resp: UpstreamResponse,
    respond: Respond,
    spend: Option<remote::Spend>,
) {
    let (tx, body) = ChannelBody::new(STREAM_DEPTH);
    let head = response_head(resp.status(), resp.headers());
    let out = head.body(body.boxed()).unwrap_or_else(|_| Response::new(http::empty()));
    if respond.send(Ok(out)).is_err() {
        // The client left before the answer began.
        drop(resp);
        if let Some(spend) = &spend {
            Box::pin(remote::finish(&metering.node, spend, None, true, None)).await;
        }
        Box::pin(metering.settle(&priced.prices, None, "client left before the stream began")).await;
        return;
    }
    // A remote provider's change arrives as an event of its own, never shown to our client.
    let mut remote_change: Option<String> = None;
    let mut splitter = usage::SseSplitter::default();
    let mut events = Vec::with_capacity(8);
    let mut held: Option<Bytes> = None;
    let mut terminal: Option<Bytes> = None;
    let mut seen_usage: Option<Usage> = None;
    let mut output_events: u64 = 0;
    let mut client_gone = false;
    let mut stopping = metering.node.stopping();
    'read: loop {
        let chunk = tokio::select! {
            _ = tx.closed() => { client_gone = true; break 'read; }
            _ = stopping.wait_for(|s| *s) => {
                tracing::info!(request_id = %metering.request_id, "stream cut short: the node is shutting down");
                break 'read;
            }
            chunk = resp.chunk() => chunk,
        };
        match chunk {
            Ok(Some(bytes)) => {
                splitter.push(bytes, &mut events);
                for event in events.drain(..) {
                    if spend.is_some() {
                        if let Some(token) = remote::change_event(&event) {
                            remote_change = token.or(remote_change);
                            continue;
                        }
                    }
                    let info = usage::inspect_event(&event);
                    if let Some(u) = info.usage {
                        seen_usage = Some(seen_usage.map_or(u, |s| usage::merge(s, u)));
                    }
                    if info.terminal {
                        terminal = Some(event);
                        break 'read;
                    }
                    if let Some(previous) = held.take() {
                        if !send_or_gone(&tx, previous).await {
                            client_gone = true;
                            break 'read;
                        }
                    }
                    if info.usage.is_some() {
                        held = Some(event);
                    } else {
                        output_events += 1;
                        if !send_or_gone(&tx, event).await {
                            client_gone = true;
                            break 'read;
                        }
                    }
                }
            }
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(request_id = %metering.request_id, error = %e, "upstream stream broke off");
                break;
            }
        }
    }
    drop(resp);
    let leftover = splitter.finish();
    let flowed = output_events > 0 || held.is_some();
    // A stream cut short (no terminal event) may carry only partial counts (Anthropic reports
    // output in its last events): charge at least one token per event that reached the client.
    let charged_usage = match (seen_usage, terminal.is_some()) {
        (Some(u), true) => Some(u),
        (Some(u), false) => Some(Usage { output_tokens: u.output_tokens.max(output_events), ..u }),
        (None, _) => flowed.then(|| metering.estimate(output_events)),
    };
    let note = match (seen_usage.is_some(), client_gone) {
        (true, _) => "usage",
        (false, true) => "estimated: client left mid-stream",
        (false, false) => "estimated: no usage reported",
    };
    let (cost, change) = match (&spend, &priced.remote) {
        (Some(spend), Some(offer)) => {
            let theirs = held.as_deref().and_then(usage::event_json).as_ref().and_then(remote::their_cost);
            // The provider's cost is final only when its stream ended properly.
            let due = if terminal.is_some() { remote::change_due(spend.amount_msat, theirs.as_ref()) } else { None };
            Box::pin(settle_remote(&metering, spend, offer, theirs, remote_change.as_deref(), due)).await
        }
        _ => metering.settle(&priced.prices, charged_usage, note).await,
    };
    if client_gone {
        return;
    }
    let mut tail: Vec<Bytes> = Vec::with_capacity(4);
    if let Some(rest) = leftover {
        tail.push(rest);
    }
    let cost_value = cost.as_ref().map(|c| usage::cost_json(c, metering.usd(c)));
    match (held, &cost_value) {
        (Some(event), Some(cv)) => tail.push(usage::event_with_cost(&event, cv.clone()).unwrap_or(event)),
        (Some(event), None) => tail.push(event),
        (None, Some(cv))
            if terminal
                .as_deref()
                .is_some_and(|t| usage::inspect_event(t).usage.is_none() && t.starts_with(b"data:")) =>
        {
            tail.push(Bytes::from(format!(
                "data: {}\n\n",
                json!({ "object": "chat.completion.chunk", "choices": [], "usage": { "cost": cv } })
            )));
        }
        _ => {}
    }
    if let Some(change) = change {
        let event = json!({ "token": change.token, "msats": change.amount_msat });
        tail.push(Bytes::from(format!("event: cashu-change\ndata: {event}\n\n")));
    }
    if let Some(t) = terminal {
        tail.push(t);
    }
    for bytes in tail {
        if !send_or_gone(&tx, bytes).await {
            break;
        }
    }
}

/// Sends one chunk to the client; false when the client is gone or has stopped reading.
async fn send_or_gone(tx: &tokio::sync::mpsc::Sender<Bytes>, bytes: Bytes) -> bool {
    matches!(tokio::time::timeout(CLIENT_STALL_TIMEOUT, tx.send(bytes)).await, Ok(Ok(())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_goes_first_and_the_rest_stays_as_written() {
        let add = |body: &str| {
            with_first_member(body.as_bytes(), "max_tokens", 7).map(|b| String::from_utf8(b.to_vec()).unwrap())
        };
        assert_eq!(add(r#"{"z":1,"a":{"y":2,"b":3}}"#).as_deref(), Some(r#"{"max_tokens":7,"z":1,"a":{"y":2,"b":3}}"#));
        assert_eq!(add("  { }").as_deref(), Some(r#"  {"max_tokens":7 }"#));
        assert_eq!(add("\n{\n \"m\": 1}").as_deref(), Some("\n{\"max_tokens\":7,\n \"m\": 1}"));
        assert_eq!(add("[1]"), None);
        for body in [r#"{"z":1,"a":{"y":2,"b":3}}"#, "  { }", "{\"m\":\"}\"}"] {
            let out: Value = serde_json::from_slice(&with_first_member(body.as_bytes(), "f", 1).unwrap()).unwrap();
            assert_eq!(out["f"], 1, "{body}");
        }
    }

    #[tokio::test]
    async fn work_that_panics_ends_without_an_answer() {
        let (respond, answer) = oneshot::channel::<u8>();
        let work = async move {
            let _respond = respond;
            panic!("a bug in the request's work");
        };
        assert!(Detachable::new(work).answer(answer).await.is_err());
    }

    #[tokio::test]
    async fn work_left_after_the_answer_runs_on() {
        let (respond, answer) = oneshot::channel::<u8>();
        let (finished, rest_ran) = oneshot::channel::<()>();
        let work = async move {
            let _ = respond.send(1);
            // What a stream does after its head: more to do once the answer has left.
            tokio::task::yield_now().await;
            let _ = finished.send(());
        };
        assert_eq!(Detachable::new(work).answer(answer).await.unwrap(), 1);
        tokio::time::timeout(Duration::from_secs(5), rest_ran).await.expect("the rest ran").unwrap();
    }

    /// The answer wakes nobody while the work that sends it is being polled (it is looked at right
    /// after), but an answer sent from elsewhere still wakes the waiting task.
    #[tokio::test]
    async fn an_answer_wakes_the_task_only_from_outside_the_work() {
        let (respond, answer) = oneshot::channel::<u8>();
        let (hand_over, handed) = oneshot::channel::<oneshot::Sender<u8>>();
        // The work gives its sender away and ends; another task answers 20 ms later.
        let work = async move {
            let _ = hand_over.send(respond);
        };
        tokio::spawn(async move {
            let respond = handed.await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            let _ = respond.send(7);
        });
        let got = tokio::time::timeout(Duration::from_secs(5), Detachable::new(work).answer(answer)).await;
        assert_eq!(got.expect("woken by the answer from the other task").unwrap(), 7);

        let inline = Arc::new(InlineWake::default());
        let woken = Arc::new(AtomicBool::new(false));
        struct Flag(Arc<AtomicBool>);
        impl std::task::Wake for Flag {
            fn wake(self: Arc<Self>) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        inline.follow(&std::task::Waker::from(Arc::new(Flag(woken.clone()))));
        let answer_waker = std::task::Waker::from(inline.clone());
        inline.while_polling(|| answer_waker.wake_by_ref());
        assert!(!woken.load(Ordering::SeqCst), "woken while its own work was being polled");
        answer_waker.wake_by_ref();
        assert!(woken.load(Ordering::SeqCst), "not woken from outside the work");
    }

    #[tokio::test]
    async fn work_dropped_before_its_answer_runs_on() {
        let (respond, answer) = oneshot::channel::<u8>();
        let (finished, rest_ran) = oneshot::channel::<()>();
        let work = async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = respond.send(1);
            let _ = finished.send(());
        };
        // The client leaves: the handler's future is dropped while the work waits.
        let gone = tokio::time::timeout(Duration::from_millis(5), Detachable::new(work).answer(answer)).await;
        assert!(gone.is_err());
        tokio::time::timeout(Duration::from_secs(5), rest_ran).await.expect("the work ran to its end").unwrap();
    }
}
