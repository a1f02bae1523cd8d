//! A small LNURL-pay server (LUD-06/LUD-16) for the tests and the demo: the other end of
//! Lightning refunds and of `RECEIVE_LN_ADDRESS`.
//!
//! Serves on `127.0.0.1:PORT`:
//! * `GET /.well-known/lnurlp/{user}` → the `payRequest` parameters (1 sat ..= 100,000,000 sat);
//! * `GET /lnurlp/{user}/callback?amount=<msat>` → `{"pr": <bolt11>, "routes": []}` with an
//!   invoice from the [`InvoiceSource`] given at start, or an LNURL error
//!   `{"status":"ERROR","reason":…}` for a bad amount or a failing source.
//!
//! [`LnurlServer::set_behavior`] makes it misbehave, so the client's defences can be tested.

use std::convert::Infallible;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Makes a bolt11 invoice for an amount in msat, or says why it cannot.
pub type InvoiceSource = Arc<dyn Fn(u64) -> BoxFuture<'static, Result<String, String>> + Send + Sync>;

/// Smallest amount advertised (`minSendable`), msat.
pub const MIN_SENDABLE_MSAT: u64 = 1_000;
/// Largest amount advertised (`maxSendable`), msat.
pub const MAX_SENDABLE_MSAT: u64 = 100_000_000_000;
/// Size of the [`Behavior::HugeBody`] answer.
const HUGE_BODY_BYTES: usize = 1024 * 1024;
/// The `text/plain` metadata entry.
const DESCRIPTION: &str = "routstr test recipient";

type ServerBody = BoxBody<Bytes, Infallible>;

/// How the server answers from now on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behavior {
    /// Correct answers.
    Normal,
    /// The callback hands out an invoice for 1,000 msat more than asked (pay params stay correct).
    WrongAmount,
    /// Every request hangs without an answer.
    Stall,
    /// Every request gets a 1 MiB body, sent chunked (no `Content-Length`).
    HugeBody,
    /// Every request gets an LNURL error `{"status":"ERROR"}`.
    Error,
}

impl Behavior {
    fn encode(self) -> u8 {
        match self {
            Behavior::Normal => 0,
            Behavior::WrongAmount => 1,
            Behavior::Stall => 2,
            Behavior::HugeBody => 3,
            Behavior::Error => 4,
        }
    }

    fn decode(v: u8) -> Self {
        match v {
            1 => Behavior::WrongAmount,
            2 => Behavior::Stall,
            3 => Behavior::HugeBody,
            4 => Behavior::Error,
            _ => Behavior::Normal,
        }
    }
}

struct Shared {
    base_url: String,
    source: InvoiceSource,
    behavior: AtomicU8,
    invoices: Mutex<Vec<(String, u64, String)>>,
}

impl Shared {
    fn behavior(&self) -> Behavior {
        Behavior::decode(self.behavior.load(Ordering::Relaxed))
    }
}

/// A running LNURL-pay server. Dropping it stops the server and closes its connections.
pub struct LnurlServer {
    /// The bound address.
    pub addr: SocketAddr,
    /// `http://127.0.0.1:PORT`
    pub url: String,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    accept_task: JoinHandle<()>,
}

impl fmt::Debug for LnurlServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LnurlServer")
            .field("url", &self.url)
            .field("behavior", &self.shared.behavior())
            .field("invoices", &self.lock_invoices().len())
            .finish()
    }
}

impl LnurlServer {
    /// Binds 127.0.0.1 on a free port and serves on the current tokio runtime.
    pub async fn start(source: InvoiceSource) -> io::Result<LnurlServer> {
        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let addr = listener.local_addr()?;
        let url = format!("http://{addr}");
        let shared = Arc::new(Shared {
            base_url: url.clone(),
            source,
            behavior: AtomicU8::new(Behavior::Normal.encode()),
            invoices: Mutex::new(Vec::new()),
        });
        let (shutdown, shutdown_rx) = watch::channel(false);
        let serving = shared.clone();
        let accept_task =
            tokio::spawn(super::serve_until(listener, shutdown_rx, || false, move |req| handle(serving.clone(), req)));
        Ok(LnurlServer { addr, url, shared, shutdown, accept_task })
    }

    /// The Lightning address of `user` here: `user@127.0.0.1:PORT`.
    pub fn address(&self, user: &str) -> String {
        format!("{user}@{}", self.addr)
    }

    /// Every invoice handed out, in order: (user, the invoice's amount in msat, bolt11). With
    /// [`Behavior::WrongAmount`] the amount is the wrong one actually in the invoice.
    pub fn invoices(&self) -> Vec<(String, u64, String)> {
        self.lock_invoices().clone()
    }

    /// How to answer the next requests.
    pub fn set_behavior(&self, b: Behavior) {
        self.shared.behavior.store(b.encode(), Ordering::Relaxed);
    }

    fn lock_invoices(&self) -> std::sync::MutexGuard<'_, Vec<(String, u64, String)>> {
        self.shared.invoices.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for LnurlServer {
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
        self.accept_task.abort();
    }
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<ServerBody>, Infallible> {
    if req.method() != Method::GET {
        return Ok(json(StatusCode::METHOD_NOT_ALLOWED, lnurl_error("use GET")));
    }
    match shared.behavior() {
        Behavior::Stall => return std::future::pending().await,
        Behavior::HugeBody => return Ok(huge_body()),
        Behavior::Error => return Ok(json(StatusCode::OK, lnurl_error("the test recipient is failing on purpose"))),
        Behavior::Normal | Behavior::WrongAmount => {}
    }
    let path = req.uri().path();
    if let Some(user) = path.strip_prefix("/.well-known/lnurlp/").filter(|u| valid_user(u)) {
        return Ok(json(StatusCode::OK, pay_params(&shared.base_url, user)));
    }
    if let Some(user) =
        path.strip_prefix("/lnurlp/").and_then(|p| p.strip_suffix("/callback")).filter(|u| valid_user(u))
    {
        let user = user.to_owned();
        let body = callback(&shared, user, req.uri().query().unwrap_or("")).await;
        return Ok(json(StatusCode::OK, body));
    }
    Ok(json(StatusCode::NOT_FOUND, lnurl_error("no such user")))
}

/// Only characters that are safe to echo back into the callback URL.
fn valid_user(user: &str) -> bool {
    !user.is_empty() && user.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'+'))
}

fn pay_params(base_url: &str, user: &str) -> serde_json::Value {
    let metadata = serde_json::json!([["text/plain", DESCRIPTION]]).to_string();
    serde_json::json!({
        "tag": "payRequest",
        "callback": format!("{base_url}/lnurlp/{user}/callback"),
        "minSendable": MIN_SENDABLE_MSAT,
        "maxSendable": MAX_SENDABLE_MSAT,
        "metadata": metadata,
        "commentAllowed": 0,
    })
}

async fn callback(shared: &Shared, user: String, query: &str) -> serde_json::Value {
    let amount = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == "amount")
        .and_then(|(_, v)| v.parse::<u64>().ok());
    let Some(amount) = amount else {
        return lnurl_error("amount missing or not a number of msat");
    };
    if !(MIN_SENDABLE_MSAT..=MAX_SENDABLE_MSAT).contains(&amount) {
        return lnurl_error(&format!("amount must be {MIN_SENDABLE_MSAT}..={MAX_SENDABLE_MSAT} msat"));
    }
    let invoice_amount = match shared.behavior() {
        Behavior::WrongAmount => amount + 1_000,
        _ => amount,
    };
    match (shared.source)(invoice_amount).await {
        Ok(pr) => {
            shared.invoices.lock().unwrap_or_else(|e| e.into_inner()).push((user, invoice_amount, pr.clone()));
            serde_json::json!({"pr": pr, "routes": []})
        }
        Err(e) => lnurl_error(&format!("could not make an invoice: {e}")),
    }
}

fn lnurl_error(reason: &str) -> serde_json::Value {
    serde_json::json!({"status": "ERROR", "reason": reason})
}

fn json(status: StatusCode, body: serde_json::Value) -> Response<ServerBody> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())).boxed());
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// 1 MiB of valid JSON in 64 KiB chunks without a length, so only a streaming cap stops it.
fn huge_body() -> Response<ServerBody> {
    const CHUNK: usize = 64 * 1024;
    let mut parts = vec![Bytes::from_static(b"{\"pad\":\"")];
    parts.extend((0..HUGE_BODY_BYTES / CHUNK).map(|_| Bytes::from(vec![b'x'; CHUNK])));
    parts.push(Bytes::from_static(b"\"}"));
    let stream = futures_util::stream::iter(parts.into_iter().map(|b| Ok::<_, Infallible>(Frame::data(b))));
    let mut resp = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}
