//! A small, fast OpenAI-compatible upstream LLM server: the "stand-in".
//!
//! The node's tests, its `demo` command and its benchmark all talk to this instead of a real
//! provider. It answers deterministically, so metering can be checked to the token:
//!
//! * `prompt_tokens` = number of whitespace-separated words in the prompt text (message
//!   `content`/`text` fields, `prompt`, `input`, `system`, `instructions`), at least 1;
//! * `completion_tokens` = number of content chunks = `stream_chunks` (or the
//!   `x-stand-in-chunks` header), capped by `max_tokens` / `max_completion_tokens` /
//!   `max_output_tokens` (then `finish_reason` is `length`).
//!
//! Endpoints (each also without the `/v1` prefix): `GET /v1/models` (OpenRouter model schema),
//! `GET /v1/models/{id}`, `POST /v1/chat/completions`, `POST /v1/completions`,
//! `POST /v1/embeddings`, `POST /v1/responses`, `POST /v1/messages` (Anthropic), `GET /health`.
//!
//! Faults are injected either globally ([`StandInUpstream::set_behavior`]) or per request with
//! the header `x-stand-in-behavior: normal|<status>|stall|no-usage|disconnect|stall-mid-stream|drop`
//! (the proxy forwards unknown headers). `x-stand-in-chunks: N` sets the stream length and
//! `x-stand-in-delay-ms: N` the delay between content chunks; `x-stand-in-answer-delay-us: N`
//! (or `LOW-HIGH`, a different delay for each request) delays a non-streamed answer by that many
//! microseconds (the benchmark's upstream "think time").
//!
//! The hot path takes no blocking lock: counters are atomics, the behaviour is one atomic word,
//! and the last request is recorded with a `try_lock` (skipped if another request is recording
//! at that very instant) that only moves already-parsed, reference-counted parts.

use std::borrow::Cow;
use std::fmt::{self, Write as _};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{HeaderMap, HeaderName, HeaderValue, CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Method, Request, Response, StatusCode, Uri};
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use tokio::net::TcpSocket;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Sleep;

/// Header selecting a per-request [`Behavior`].
pub const BEHAVIOR_HEADER: &str = "x-stand-in-behavior";
/// Header overriding the number of content chunks (= completion tokens before `max_tokens`).
pub const CHUNKS_HEADER: &str = "x-stand-in-chunks";
/// Header overriding the delay between content chunks, in milliseconds.
pub const DELAY_HEADER: &str = "x-stand-in-delay-ms";
/// Header delaying a non-streamed answer, in microseconds.
pub const ANSWER_DELAY_HEADER: &str = "x-stand-in-answer-delay-us";

/// Largest accepted request body.
const MAX_BODY: usize = 32 * 1024 * 1024;
/// Largest accepted `x-stand-in-chunks`.
const MAX_CHUNKS: usize = 100_000;
/// Dimensions of the (constant) embedding vectors.
const EMBEDDING_DIMS: usize = 8;
/// The words the stand-in "generates", one per content chunk, cycled.
const WORDS: [&str; 16] = [
    "Hello",
    " from",
    " the",
    " stand-in",
    " upstream",
    ".",
    " This",
    " is",
    " a",
    " deterministic",
    " reply",
    " used",
    " for",
    " metering",
    " tests",
    "!",
];

/// OpenRouter-schema pricing: USD per token (or per request/image/search) as decimal strings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StandInPricing {
    /// USD per prompt (input) token.
    pub prompt: String,
    /// USD per completion (output) token.
    pub completion: String,
    /// USD per request.
    pub request: String,
    /// USD per input image.
    pub image: String,
    /// USD per web search.
    pub web_search: String,
    /// USD per internal reasoning token.
    pub internal_reasoning: String,
    /// USD per cached input token read.
    pub input_cache_read: String,
    /// USD per input token written to the cache.
    pub input_cache_write: String,
}

impl StandInPricing {
    /// Per-token prompt and completion prices; everything else "0".
    pub fn per_token(prompt: &str, completion: &str) -> Self {
        StandInPricing { prompt: prompt.to_owned(), completion: completion.to_owned(), ..StandInPricing::default() }
    }
}

impl Default for StandInPricing {
    fn default() -> Self {
        let zero = || "0".to_owned();
        StandInPricing {
            prompt: zero(),
            completion: zero(),
            request: zero(),
            image: zero(),
            web_search: zero(),
            internal_reasoning: zero(),
            input_cache_read: zero(),
            input_cache_write: zero(),
        }
    }
}

/// One model served by the stand-in. Every model answers on every endpoint; `embedding` only
/// changes what `/v1/models` advertises.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StandInModel {
    /// Model id clients put in `"model"`.
    pub id: String,
    /// Human-readable name.
    pub name: String,
    /// Advertised context window.
    pub context_length: u64,
    /// Advertised `top_provider.max_completion_tokens`.
    pub max_completion_tokens: u64,
    /// Advertise as an embedding model (`text->embeddings`).
    pub embedding: bool,
    /// Advertised pricing (omitted when [`StandInConfig::with_pricing`] is false).
    pub pricing: StandInPricing,
}

impl StandInModel {
    /// A chat/text model with per-token prices (USD per token, decimal strings).
    pub fn chat(id: &str, prompt: &str, completion: &str) -> Self {
        StandInModel {
            id: id.to_owned(),
            name: format!("Stand-in: {id}"),
            context_length: 128_000,
            max_completion_tokens: 16_384,
            embedding: false,
            pricing: StandInPricing::per_token(prompt, completion),
        }
    }

    /// An embedding model with a per-token input price.
    pub fn embedding(id: &str, prompt: &str) -> Self {
        StandInModel {
            id: id.to_owned(),
            name: format!("Stand-in: {id}"),
            context_length: 8_192,
            max_completion_tokens: 0,
            embedding: true,
            pricing: StandInPricing::per_token(prompt, "0"),
        }
    }
}

/// Configuration of a stand-in server.
#[derive(Debug, Clone)]
pub struct StandInConfig {
    /// Where to listen; the default `127.0.0.1:0` picks a free port.
    pub listen: SocketAddr,
    /// Models listed in `/v1/models`; requests for any other model get a 404.
    pub models: Vec<StandInModel>,
    /// Content chunks per response (= completion tokens unless `max_tokens` is lower).
    pub stream_chunks: usize,
    /// Delay between content chunks of a streamed response.
    pub chunk_delay: Duration,
    /// Include `pricing` in `/v1/models`.
    pub with_pricing: bool,
}

impl Default for StandInConfig {
    fn default() -> Self {
        StandInConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            models: vec![
                // $1 / M prompt tokens, $2 / M completion tokens.
                StandInModel::chat("gpt-test", "0.000001", "0.000002"),
                // $0.10 / M input tokens.
                StandInModel::embedding("embed-test", "0.0000001"),
            ],
            stream_chunks: 8,
            chunk_delay: Duration::ZERO,
            with_pricing: true,
        }
    }
}

/// How the stand-in answers completion-type requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Behavior {
    /// Answer normally.
    #[default]
    Normal,
    /// Reply with this HTTP status and an OpenAI error body (429 also gets `retry-after: 1`).
    Status(u16),
    /// Read the request, then never answer.
    Stall,
    /// Answer normally but omit usage (JSON `usage`, SSE usage chunk / fields).
    NoUsage,
    /// Send half the content chunks (half the JSON body when not streaming), then drop the
    /// connection.
    DisconnectMidStream,
    /// Send half the content chunks (half the JSON body when not streaming), then hang forever.
    StallMidStream,
    /// Drop the TCP connection without any response. Set globally, new connections are also
    /// closed right after `accept`.
    ConnectRefused,
}

impl Behavior {
    fn encode(self) -> u32 {
        match self {
            Behavior::Normal => 0,
            Behavior::Status(code) => 1 | (u32::from(code) << 8),
            Behavior::Stall => 2,
            Behavior::NoUsage => 3,
            Behavior::DisconnectMidStream => 4,
            Behavior::StallMidStream => 5,
            Behavior::ConnectRefused => 6,
        }
    }

    fn decode(v: u32) -> Self {
        match v & 0xff {
            1 => Behavior::Status((v >> 8) as u16),
            2 => Behavior::Stall,
            3 => Behavior::NoUsage,
            4 => Behavior::DisconnectMidStream,
            5 => Behavior::StallMidStream,
            6 => Behavior::ConnectRefused,
            _ => Behavior::Normal,
        }
    }

    /// Parses an `x-stand-in-behavior` header value.
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        Some(match s.to_ascii_lowercase().as_str() {
            "normal" => Behavior::Normal,
            "stall" => Behavior::Stall,
            "no-usage" => Behavior::NoUsage,
            "disconnect" => Behavior::DisconnectMidStream,
            "stall-mid-stream" => Behavior::StallMidStream,
            "drop" => Behavior::ConnectRefused,
            other => {
                let code: u16 = other.parse().ok()?;
                if !(400..=599).contains(&code) {
                    return None;
                }
                Behavior::Status(code)
            }
        })
    }
}

/// A request received on a completion-type endpoint, as the upstream saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedRequest {
    /// HTTP method, e.g. `POST`.
    pub method: String,
    /// Path without the query string, e.g. `/v1/chat/completions`.
    pub path: String,
    /// Header names are lowercase; repeated headers appear repeatedly, in order.
    pub headers: Vec<(String, String)>,
    /// The body parsed as JSON (`Null` if empty or not JSON).
    pub body: serde_json::Value,
}

impl RecordedRequest {
    /// First value of a header (name compared case-insensitively).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// What the hot path stores: only cheap, reference-counted clones or moves.
struct RawRecord {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
}

impl RawRecord {
    fn to_public(&self) -> RecordedRequest {
        RecordedRequest {
            method: self.method.as_str().to_owned(),
            path: self.uri.path().to_owned(),
            headers: self
                .headers
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
                .collect(),
            body: serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null),
        }
    }
}

struct KnownModel {
    id: String,
    /// The id as a JSON string literal (quoted, escaped), ready to splice into output.
    json: String,
}

struct Shared {
    behavior: AtomicU32,
    requests: AtomicU64,
    connections: AtomicU64,
    last: Mutex<Option<RawRecord>>,
    models_json: Bytes,
    models: Vec<KnownModel>,
    model_objects: Vec<Bytes>,
    embedding_json: String,
    stream_chunks: usize,
    chunk_delay: Duration,
}

impl Shared {
    fn behavior(&self) -> Behavior {
        Behavior::decode(self.behavior.load(Ordering::Relaxed))
    }

    fn record(&self, rec: RawRecord) {
        // Never block the hot path: if someone else is recording right now, theirs is "last".
        let old = match self.last.try_lock() {
            Ok(mut slot) => slot.replace(rec),
            Err(_) => None,
        };
        drop(old);
    }
}

/// A running stand-in server. Dropping it stops the server and closes its connections.
pub struct StandInUpstream {
    /// The bound address (the real port when `listen` had port 0).
    pub addr: SocketAddr,
    /// `http://127.0.0.1:PORT/v1`
    pub base_url: String,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    accept_task: JoinHandle<()>,
}

impl fmt::Debug for StandInUpstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StandInUpstream")
            .field("addr", &self.addr)
            .field("base_url", &self.base_url)
            .field("behavior", &self.shared.behavior())
            .field("requests", &self.requests())
            .finish()
    }
}

impl StandInUpstream {
    /// Binds the listener and starts serving on the current tokio runtime.
    pub async fn start(cfg: StandInConfig) -> io::Result<Self> {
        let socket = if cfg.listen.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        socket.set_reuseaddr(true)?;
        socket.bind(cfg.listen)?;
        // The benchmark opens ~1,024 connections at once.
        let listener = socket.listen(4096)?;
        let addr = listener.local_addr()?;

        let models = cfg
            .models
            .iter()
            .map(|m| Ok(KnownModel { id: m.id.clone(), json: serde_json::to_string(&m.id).map_err(io::Error::other)? }))
            .collect::<io::Result<Vec<_>>>()?;
        let objects: Vec<serde_json::Value> = cfg.models.iter().map(|m| model_object(m, cfg.with_pricing)).collect();
        let model_objects = objects
            .iter()
            .map(|o| serde_json::to_vec(o).map(Bytes::from))
            .collect::<Result<Vec<_>, _>>()
            .map_err(io::Error::other)?;
        let models_json =
            serde_json::to_vec(&serde_json::json!({"object": "list", "data": objects})).map_err(io::Error::other)?;

        let shared = Arc::new(Shared {
            behavior: AtomicU32::new(Behavior::Normal.encode()),
            requests: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            last: Mutex::new(None),
            models_json: Bytes::from(models_json),
            models,
            model_objects,
            embedding_json: embedding_vector(),
            stream_chunks: cfg.stream_chunks.min(MAX_CHUNKS),
            chunk_delay: cfg.chunk_delay,
        });

        let (shutdown, shutdown_rx) = watch::channel(false);
        let accept_task = {
            let (refusing, serving) = (shared.clone(), shared.clone());
            tokio::spawn(super::serve_until(
                listener,
                shutdown_rx,
                // Asked once per accepted connection: counted here.
                move || {
                    refusing.connections.fetch_add(1, Ordering::Relaxed);
                    refusing.behavior() == Behavior::ConnectRefused
                },
                move |req| handle(serving.clone(), req),
            ))
        };
        Ok(StandInUpstream { addr, base_url: format!("http://{addr}/v1"), shared, shutdown, accept_task })
    }

    /// Sets the default behaviour (a request's `x-stand-in-behavior` header still wins).
    pub fn set_behavior(&self, b: Behavior) {
        self.shared.behavior.store(b.encode(), Ordering::Relaxed);
    }

    /// The current default behaviour.
    pub fn behavior(&self) -> Behavior {
        self.shared.behavior()
    }

    /// Requests that reached a completion-type endpoint (chat/completions, completions,
    /// embeddings, responses, messages), whatever the outcome (faults and errors included).
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::Relaxed)
    }

    /// TCP connections accepted (refused ones included): a client that keeps its connections
    /// alive opens few.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::Relaxed)
    }

    /// The last request received on a completion-type endpoint (`/models` is not recorded, so
    /// a proxy's background price refresh cannot overwrite it).
    pub fn last_request(&self) -> Option<RecordedRequest> {
        let slot = self.shared.last.lock().unwrap_or_else(|e| e.into_inner());
        slot.as_ref().map(RawRecord::to_public)
    }
}

impl Drop for StandInUpstream {
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
        self.accept_task.abort();
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Chat,
    Completions,
    Embeddings,
    Responses,
    Messages,
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<StandInBody>, io::Error> {
    let full = req.uri().path();
    let path = match full.strip_prefix("/v1") {
        Some(rest) if rest.is_empty() || rest.starts_with('/') => rest,
        _ => full,
    };
    let endpoint = match path {
        "/chat/completions" => Endpoint::Chat,
        "/completions" => Endpoint::Completions,
        "/embeddings" => Endpoint::Embeddings,
        "/responses" => Endpoint::Responses,
        "/messages" => Endpoint::Messages,
        "/models" | "/models/" if req.method() == Method::GET => {
            return Ok(json_response(StatusCode::OK, shared.models_json.clone()));
        }
        "/health" | "/" if req.method() == Method::GET => {
            return Ok(json_response(StatusCode::OK, Bytes::from_static(b"{\"status\":\"ok\"}")));
        }
        p if req.method() == Method::GET && p.starts_with("/models/") => {
            let id = &p["/models/".len()..];
            return Ok(match shared.models.iter().position(|m| m.id == id) {
                Some(i) => json_response(StatusCode::OK, shared.model_objects[i].clone()),
                None => model_not_found(id, false),
            });
        }
        "/models" | "/health" => {
            return Ok(error_response(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed",
                "invalid_request_error",
                "method_not_allowed",
                false,
            ));
        }
        _ => {
            return Ok(error_response(
                StatusCode::NOT_FOUND,
                &format!("unknown path {}", full),
                "invalid_request_error",
                "unknown_url",
                false,
            ));
        }
    };
    let anthropic = endpoint == Endpoint::Messages;
    if req.method() != Method::POST {
        return Ok(error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed; use POST",
            "invalid_request_error",
            "method_not_allowed",
            anthropic,
        ));
    }

    let (parts, body) = req.into_parts();
    // Overrides are read before the headers move into the record.
    let behavior = match header_str(&parts.headers, BEHAVIOR_HEADER) {
        None => Ok(shared.behavior()),
        Some(v) => Behavior::parse(v).ok_or("x-stand-in-behavior"),
    };
    let chunks = match header_str(&parts.headers, CHUNKS_HEADER) {
        None => Ok(shared.stream_chunks),
        Some(v) => v.trim().parse::<usize>().map(|n| n.min(MAX_CHUNKS)).map_err(|_| "x-stand-in-chunks"),
    };
    let delay = match header_str(&parts.headers, DELAY_HEADER) {
        None => Ok(shared.chunk_delay),
        Some(v) => v.trim().parse::<u64>().map(Duration::from_millis).map_err(|_| "x-stand-in-delay-ms"),
    };
    let answer_delay = match header_str(&parts.headers, ANSWER_DELAY_HEADER) {
        None => Ok(None),
        Some(v) => answer_delay_range(v).map(Some).ok_or("x-stand-in-answer-delay-us"),
    };

    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) => {
            // Includes a client that went away mid-body: nobody will read this anyway.
            return Ok(error_response(
                StatusCode::BAD_REQUEST,
                &format!("could not read request body: {e}"),
                "invalid_request_error",
                "invalid_body",
                anthropic,
            ));
        }
    };
    shared.record(RawRecord { method: parts.method, uri: parts.uri, headers: parts.headers, body: body.clone() });
    let seq = shared.requests.fetch_add(1, Ordering::Relaxed) + 1;

    let (behavior, chunks, delay, answer_delay) = match (behavior, chunks, delay, answer_delay) {
        // Picked by this request's own sequence number: requests arriving together differ.
        (Ok(b), Ok(c), Ok(d), Ok(a)) => (b, c, d, a.map_or(Duration::ZERO, |range| pick_delay(range, seq))),
        (Err(h), _, _, _) | (_, Err(h), _, _) | (_, _, Err(h), _) | (_, _, _, Err(h)) => {
            return Ok(error_response(
                StatusCode::BAD_REQUEST,
                &format!("invalid {h} header"),
                "invalid_request_error",
                "invalid_stand_in_header",
                anthropic,
            ));
        }
    };

    match behavior {
        Behavior::ConnectRefused => {
            // An error from the service makes hyper close the connection without a response.
            return Err(io::Error::new(io::ErrorKind::ConnectionAborted, "stand-in: dropping the connection"));
        }
        Behavior::Stall => return std::future::pending().await,
        Behavior::Status(code) => return Ok(status_response(code, anthropic)),
        Behavior::Normal | Behavior::NoUsage | Behavior::DisconnectMidStream | Behavior::StallMidStream => {}
    }

    let parsed: ReqBody<'_> = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) => {
            return Ok(error_response(
                StatusCode::BAD_REQUEST,
                &format!("could not parse the JSON body of your request: {e}"),
                "invalid_request_error",
                "invalid_json",
                anthropic,
            ));
        }
    };
    let Some(model) = parsed.model.as_deref() else {
        return Ok(error_response(
            StatusCode::BAD_REQUEST,
            "you must provide a model parameter",
            "invalid_request_error",
            "missing_model",
            anthropic,
        ));
    };
    let Some(known) = shared.models.iter().find(|m| m.id == model) else {
        return Ok(model_not_found(model, anthropic));
    };

    let limit = parsed
        .max_completion_tokens
        .or(parsed.max_tokens)
        .or(parsed.max_output_tokens)
        .map_or(usize::MAX, |m| usize::try_from(m).unwrap_or(usize::MAX));
    let words = [&parsed.messages, &parsed.prompt, &parsed.input, &parsed.system, &parsed.instructions]
        .iter()
        .filter_map(|c| c.as_ref())
        .map(|c| c.words)
        .sum::<u64>();
    let gen = Gen {
        seq,
        created: unix_now(),
        model: &known.json,
        prompt: words.max(1),
        completion: chunks.min(limit),
        truncated: limit < chunks,
        usage: behavior != Behavior::NoUsage,
        include_usage: parsed.stream_options.as_ref().and_then(|o| o.include_usage).unwrap_or(false),
    };
    let (cut, tail) = match behavior {
        Behavior::DisconnectMidStream => (true, Tail::Abort),
        Behavior::StallMidStream => (true, Tail::Stall),
        _ => (false, Tail::End),
    };
    let stream = parsed.stream.unwrap_or(false) && endpoint != Endpoint::Embeddings;

    if !stream {
        let json = match endpoint {
            Endpoint::Chat => gen.chat_json(),
            Endpoint::Completions => gen.completion_json(),
            Endpoint::Embeddings => {
                let n = parsed.input.as_ref().map_or(1, |c| c.items.max(1));
                gen.embeddings_json(n, &shared.embedding_json)
            }
            Endpoint::Responses => gen.responses_json(),
            Endpoint::Messages => gen.messages_json(),
        };
        let json = Bytes::from(json);
        if !answer_delay.is_zero() {
            // tokio's timer rounds up to its next millisecond tick: a delay spread over a range
            // wider than that gets the same rounding, on average, whatever path reached it.
            tokio::time::sleep(answer_delay).await;
        }
        if !cut {
            return Ok(json_response(StatusCode::OK, json));
        }
        let half = json.slice(..json.len() / 2);
        let body = StandInBody::frames(vec![half], 1, Duration::ZERO, 0..0, tail);
        return Ok(with_content_type(Response::new(body), HeaderValue::from_static("application/json")));
    }

    let sse = match endpoint {
        Endpoint::Completions => gen.completion_sse(),
        Endpoint::Responses => gen.responses_sse(),
        Endpoint::Messages => gen.messages_sse(),
        // Embeddings never stream (see `stream` above); chat is a harmless placeholder.
        Endpoint::Chat | Endpoint::Embeddings => gen.chat_sse(),
    };
    let n = gen.completion;
    let pre = sse.len() - n - 1;
    // Delay goes before every content chunk but the first.
    let delayed = (pre + 1)..(pre + n);
    let cut_at = if cut { pre + n.div_ceil(2) } else { sse.len() };
    let body = StandInBody::frames(sse, cut_at, delay, delayed, tail);
    let mut resp = with_content_type(Response::new(body), HeaderValue::from_static("text/event-stream"));
    resp.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(resp)
}

/// `N` or `LOW-HIGH` microseconds, as an inclusive range.
fn answer_delay_range(header: &str) -> Option<(u64, u64)> {
    let (low, high) = match header.trim().split_once('-') {
        None => {
            let micros = header.trim().parse::<u64>().ok()?;
            (micros, micros)
        }
        Some((low, high)) => (low.trim().parse::<u64>().ok()?, high.trim().parse::<u64>().ok()?),
    };
    (low <= high).then_some((low, high))
}

/// A delay in `range` for request `seq`, spread evenly over it (a multiplicative hash of the
/// sequence number: cheap and repeatable), so that clients waiting on it do not move in step.
fn pick_delay((low, high): (u64, u64), seq: u64) -> Duration {
    let spread = seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11;
    Duration::from_micros(low + (high - low).checked_add(1).map_or(spread, |width| spread % width))
}

fn header_str<'a>(headers: &'a HeaderMap, name: &'static str) -> Option<&'a str> {
    headers.get(HeaderName::from_static(name)).and_then(|v| v.to_str().ok())
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// Request parsing: a borrowed, allocation-light view of the fields the stand-in needs.

#[derive(Deserialize)]
struct ReqBody<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
    #[serde(default)]
    max_output_tokens: Option<u64>,
    #[serde(default)]
    messages: Option<WordCount>,
    #[serde(default)]
    prompt: Option<WordCount>,
    #[serde(default)]
    input: Option<WordCount>,
    #[serde(default)]
    system: Option<WordCount>,
    #[serde(default)]
    instructions: Option<WordCount>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

/// Words in any JSON value: strings count their whitespace-separated words, numbers count 1
/// (token ids), arrays sum their elements and objects sum their `content` and `text` fields.
/// `items` is the array length of a top-level array (1 otherwise): the number of embeddings.
#[derive(Default)]
struct WordCount {
    words: u64,
    items: usize,
}

impl<'de> Deserialize<'de> for WordCount {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(WordVisitor)
    }
}

struct WordVisitor;

impl<'de> Visitor<'de> for WordVisitor {
    type Value = WordCount;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<WordCount, E> {
        Ok(WordCount { words: s.split_whitespace().count() as u64, items: 1 })
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<WordCount, E> {
        Ok(WordCount { words: 1, items: 1 })
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<WordCount, E> {
        Ok(WordCount { words: 1, items: 1 })
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<WordCount, E> {
        Ok(WordCount { words: 1, items: 1 })
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<WordCount, E> {
        Ok(WordCount { words: 0, items: 1 })
    }

    fn visit_unit<E: de::Error>(self) -> Result<WordCount, E> {
        Ok(WordCount::default())
    }

    fn visit_none<E: de::Error>(self) -> Result<WordCount, E> {
        Ok(WordCount::default())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<WordCount, A::Error> {
        let mut out = WordCount::default();
        while let Some(w) = seq.next_element::<WordCount>()? {
            out.words += w.words;
            out.items += 1;
        }
        Ok(out)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<WordCount, A::Error> {
        let mut out = WordCount { words: 0, items: 1 };
        while let Some(counted) = map.next_key::<CountedKey>()? {
            if counted.0 {
                out.words += map.next_value::<WordCount>()?.words;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(out)
    }
}

/// An object key, reduced to "is it `content` or `text`" without allocating.
struct CountedKey(bool);

impl<'de> Deserialize<'de> for CountedKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = CountedKey;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object key")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<CountedKey, E> {
                Ok(CountedKey(s == "content" || s == "text"))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

// ---------------------------------------------------------------------------------------------
// Response generation. JSON is assembled with `format!` from pre-escaped parts (the model id
// is escaped once at start-up; the generated words need no escaping).

struct Gen<'a> {
    seq: u64,
    created: u64,
    /// JSON string literal of the model id.
    model: &'a str,
    prompt: u64,
    completion: usize,
    truncated: bool,
    /// False under [`Behavior::NoUsage`].
    usage: bool,
    /// `stream_options.include_usage` was requested.
    include_usage: bool,
}

impl Gen<'_> {
    fn content(&self) -> String {
        let mut s = String::with_capacity(self.completion * 8);
        for i in 0..self.completion {
            s.push_str(WORDS[i % WORDS.len()]);
        }
        s
    }

    fn total(&self) -> u64 {
        self.prompt + self.completion as u64
    }

    fn openai_usage(&self) -> String {
        format!(
            r#"{{"prompt_tokens":{},"completion_tokens":{},"total_tokens":{}}}"#,
            self.prompt,
            self.completion,
            self.total()
        )
    }

    /// `,"usage":{…}` or nothing under NoUsage.
    fn openai_usage_field(&self) -> String {
        if self.usage {
            format!(r#","usage":{}"#, self.openai_usage())
        } else {
            String::new()
        }
    }

    fn finish(&self) -> &'static str {
        if self.truncated {
            "length"
        } else {
            "stop"
        }
    }

    fn chat_json(&self) -> String {
        format!(
            r#"{{"id":"chatcmpl-standin-{seq}","object":"chat.completion","created":{created},"model":{model},"choices":[{{"index":0,"message":{{"role":"assistant","content":"{content}","refusal":null}},"logprobs":null,"finish_reason":"{finish}"}}]{usage}}}"#,
            seq = self.seq,
            created = self.created,
            model = self.model,
            content = self.content(),
            finish = self.finish(),
            usage = self.openai_usage_field(),
        )
    }

    /// `data:` frames: one per content chunk, then one tail frame (finish chunk, usage chunk
    /// if `include_usage`, `[DONE]`).
    fn chat_sse(&self) -> Vec<Bytes> {
        let head = format!(
            r#"data: {{"id":"chatcmpl-standin-{}","object":"chat.completion.chunk","created":{},"model":{}"#,
            self.seq, self.created, self.model
        );
        // OpenAI sends `"usage":null` on every chunk when usage was requested.
        let null_usage = if self.include_usage { r#","usage":null"# } else { "" };
        let mut frames = Vec::with_capacity(self.completion + 1);
        for i in 0..self.completion {
            let role = if i == 0 { r#""role":"assistant","# } else { "" };
            frames.push(Bytes::from(format!(
                "{head},\"choices\":[{{\"index\":0,\"delta\":{{{role}\"content\":\"{}\"}},\"logprobs\":null,\"finish_reason\":null}}]{null_usage}}}\n\n",
                WORDS[i % WORDS.len()]
            )));
        }
        let mut tail = format!(
            "{head},\"choices\":[{{\"index\":0,\"delta\":{{}},\"logprobs\":null,\"finish_reason\":\"{}\"}}]{null_usage}}}\n\n",
            self.finish()
        );
        if self.include_usage && self.usage {
            let _ = write!(tail, "{head},\"choices\":[],\"usage\":{}}}\n\n", self.openai_usage());
        }
        tail.push_str("data: [DONE]\n\n");
        frames.push(Bytes::from(tail));
        frames
    }

    fn completion_json(&self) -> String {
        format!(
            r#"{{"id":"cmpl-standin-{seq}","object":"text_completion","created":{created},"model":{model},"choices":[{{"text":"{content}","index":0,"logprobs":null,"finish_reason":"{finish}"}}]{usage}}}"#,
            seq = self.seq,
            created = self.created,
            model = self.model,
            content = self.content(),
            finish = self.finish(),
            usage = self.openai_usage_field(),
        )
    }

    fn completion_sse(&self) -> Vec<Bytes> {
        let head = format!(
            r#"data: {{"id":"cmpl-standin-{}","object":"text_completion","created":{},"model":{}"#,
            self.seq, self.created, self.model
        );
        let mut frames = Vec::with_capacity(self.completion + 1);
        for i in 0..self.completion {
            frames.push(Bytes::from(format!(
                "{head},\"choices\":[{{\"text\":\"{}\",\"index\":0,\"logprobs\":null,\"finish_reason\":null}}]}}\n\n",
                WORDS[i % WORDS.len()]
            )));
        }
        let mut tail = format!(
            "{head},\"choices\":[{{\"text\":\"\",\"index\":0,\"logprobs\":null,\"finish_reason\":\"{}\"}}]}}\n\n",
            self.finish()
        );
        if self.include_usage && self.usage {
            let _ = write!(tail, "{head},\"choices\":[],\"usage\":{}}}\n\n", self.openai_usage());
        }
        tail.push_str("data: [DONE]\n\n");
        frames.push(Bytes::from(tail));
        frames
    }

    fn embeddings_json(&self, n: usize, vector: &str) -> String {
        let mut s = String::with_capacity(96 + n * (vector.len() + 48));
        s.push_str(r#"{"object":"list","data":["#);
        for i in 0..n {
            if i > 0 {
                s.push(',');
            }
            let _ = write!(s, r#"{{"object":"embedding","index":{i},"embedding":{vector}}}"#);
        }
        let _ = write!(s, r#"],"model":{}"#, self.model);
        if self.usage {
            let _ = write!(s, r#","usage":{{"prompt_tokens":{p},"total_tokens":{p}}}"#, p = self.prompt);
        }
        s.push('}');
        s
    }

    fn responses_usage_field(&self) -> String {
        if self.usage {
            format!(
                r#","usage":{{"input_tokens":{},"input_tokens_details":{{"cached_tokens":0}},"output_tokens":{},"output_tokens_details":{{"reasoning_tokens":0}},"total_tokens":{}}}"#,
                self.prompt,
                self.completion,
                self.total()
            )
        } else {
            String::new()
        }
    }

    /// The Responses-API response object; `done` selects the final (completed) form.
    fn response_object(&self, done: bool) -> String {
        let (status, incomplete) = match (done, self.truncated) {
            (false, _) => ("in_progress", "null"),
            (true, false) => ("completed", "null"),
            (true, true) => ("incomplete", r#"{"reason":"max_output_tokens"}"#),
        };
        let output = if done {
            format!(
                r#"[{{"type":"message","id":"msg_standin_{}","status":"completed","role":"assistant","content":[{{"type":"output_text","text":"{}","annotations":[]}}]}}]"#,
                self.seq,
                self.content()
            )
        } else {
            "[]".to_owned()
        };
        format!(
            r#"{{"id":"resp_standin_{seq}","object":"response","created_at":{created},"status":"{status}","incomplete_details":{incomplete},"model":{model},"output":{output}{usage}}}"#,
            seq = self.seq,
            created = self.created,
            model = self.model,
            usage = if done { self.responses_usage_field() } else { String::new() },
        )
    }

    fn responses_json(&self) -> String {
        self.response_object(true)
    }

    fn responses_sse(&self) -> Vec<Bytes> {
        let mut frames = Vec::with_capacity(self.completion + 2);
        frames.push(Bytes::from(format!(
            "event: response.created\ndata: {{\"type\":\"response.created\",\"sequence_number\":0,\"response\":{}}}\n\n",
            self.response_object(false)
        )));
        for i in 0..self.completion {
            frames.push(Bytes::from(format!(
                "event: response.output_text.delta\ndata: {{\"type\":\"response.output_text.delta\",\"sequence_number\":{},\"item_id\":\"msg_standin_{}\",\"output_index\":0,\"content_index\":0,\"delta\":\"{}\"}}\n\n",
                i + 1,
                self.seq,
                WORDS[i % WORDS.len()]
            )));
        }
        let n = self.completion + 1;
        frames.push(Bytes::from(format!(
            "event: response.output_text.done\ndata: {{\"type\":\"response.output_text.done\",\"sequence_number\":{n},\"item_id\":\"msg_standin_{seq}\",\"output_index\":0,\"content_index\":0,\"text\":\"{text}\"}}\n\n\
             event: response.completed\ndata: {{\"type\":\"response.completed\",\"sequence_number\":{n1},\"response\":{resp}}}\n\n",
            seq = self.seq,
            text = self.content(),
            n1 = n + 1,
            resp = self.response_object(true),
        )));
        frames
    }

    fn stop_reason(&self) -> &'static str {
        if self.truncated {
            "max_tokens"
        } else {
            "end_turn"
        }
    }

    fn messages_json(&self) -> String {
        let usage = if self.usage {
            format!(
                r#","usage":{{"input_tokens":{},"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":{}}}"#,
                self.prompt, self.completion
            )
        } else {
            String::new()
        };
        format!(
            r#"{{"id":"msg_standin_{seq}","type":"message","role":"assistant","model":{model},"content":[{{"type":"text","text":"{content}"}}],"stop_reason":"{stop}","stop_sequence":null{usage}}}"#,
            seq = self.seq,
            model = self.model,
            content = self.content(),
            stop = self.stop_reason(),
        )
    }

    /// Anthropic SSE: one preamble frame (message_start with input usage, content_block_start,
    /// ping), one frame per content_block_delta, one tail frame (content_block_stop,
    /// message_delta with the cumulative output usage, message_stop).
    fn messages_sse(&self) -> Vec<Bytes> {
        let start_usage = if self.usage {
            // Like Anthropic, message_start reports a provisional output count (at most 1);
            // the final count comes in message_delta.
            format!(
                r#","usage":{{"input_tokens":{},"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":{}}}"#,
                self.prompt,
                self.completion.min(1)
            )
        } else {
            String::new()
        };
        let mut frames = Vec::with_capacity(self.completion + 2);
        frames.push(Bytes::from(format!(
            "event: message_start\ndata: {{\"type\":\"message_start\",\"message\":{{\"id\":\"msg_standin_{seq}\",\"type\":\"message\",\"role\":\"assistant\",\"model\":{model},\"content\":[],\"stop_reason\":null,\"stop_sequence\":null{start_usage}}}}}\n\n\
             event: content_block_start\ndata: {{\"type\":\"content_block_start\",\"index\":0,\"content_block\":{{\"type\":\"text\",\"text\":\"\"}}}}\n\n\
             event: ping\ndata: {{\"type\":\"ping\"}}\n\n",
            seq = self.seq,
            model = self.model,
        )));
        for i in 0..self.completion {
            frames.push(Bytes::from(format!(
                "event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"text_delta\",\"text\":\"{}\"}}}}\n\n",
                WORDS[i % WORDS.len()]
            )));
        }
        let delta_usage =
            if self.usage { format!(r#","usage":{{"output_tokens":{}}}"#, self.completion) } else { String::new() };
        frames.push(Bytes::from(format!(
            "event: content_block_stop\ndata: {{\"type\":\"content_block_stop\",\"index\":0}}\n\n\
             event: message_delta\ndata: {{\"type\":\"message_delta\",\"delta\":{{\"stop_reason\":\"{}\",\"stop_sequence\":null}}{delta_usage}}}\n\n\
             event: message_stop\ndata: {{\"type\":\"message_stop\"}}\n\n",
            self.stop_reason()
        )));
        frames
    }
}

fn embedding_vector() -> String {
    let mut s = String::from("[");
    for d in 0..EMBEDDING_DIMS {
        if d > 0 {
            s.push(',');
        }
        let v = ((d * 37 + 11) % 100) as f64 / 100.0 - 0.5;
        let _ = write!(s, "{v}");
    }
    s.push(']');
    s
}

fn model_object(m: &StandInModel, with_pricing: bool) -> serde_json::Value {
    let (modality, output) = if m.embedding { ("text->embeddings", "embeddings") } else { ("text->text", "text") };
    let mut obj = serde_json::json!({
        "id": m.id,
        "canonical_slug": m.id,
        "name": m.name,
        "created": 1_700_000_000u64,
        "description": "Deterministic stand-in model served by routstr-node's test upstream.",
        "context_length": m.context_length,
        "architecture": {
            "modality": modality,
            "input_modalities": ["text"],
            "output_modalities": [output],
            "tokenizer": "Other",
            "instruct_type": null,
        },
        "top_provider": {
            "context_length": m.context_length,
            "max_completion_tokens": m.max_completion_tokens,
            "is_moderated": false,
        },
        "per_request_limits": null,
        "supported_parameters": ["max_tokens", "stream", "stream_options", "temperature"],
    });
    if with_pricing {
        let p = &m.pricing;
        obj["pricing"] = serde_json::json!({
            "prompt": p.prompt,
            "completion": p.completion,
            "request": p.request,
            "image": p.image,
            "web_search": p.web_search,
            "internal_reasoning": p.internal_reasoning,
            "input_cache_read": p.input_cache_read,
            "input_cache_write": p.input_cache_write,
        });
    }
    obj
}

// ---------------------------------------------------------------------------------------------
// Responses and errors.

fn with_content_type(mut resp: Response<StandInBody>, ct: HeaderValue) -> Response<StandInBody> {
    resp.headers_mut().insert(CONTENT_TYPE, ct);
    resp
}

fn json_response(status: StatusCode, body: Bytes) -> Response<StandInBody> {
    let mut resp =
        with_content_type(Response::new(StandInBody::full(body)), HeaderValue::from_static("application/json"));
    *resp.status_mut() = status;
    resp
}

/// OpenAI error envelope `{"error":{"message","type","param","code"}}`; for the Anthropic
/// endpoint also the top-level `"type":"error"` Anthropic clients look for.
fn error_response(status: StatusCode, message: &str, kind: &str, code: &str, anthropic: bool) -> Response<StandInBody> {
    let mut err = serde_json::json!({
        "error": {"message": message, "type": kind, "param": null, "code": code}
    });
    if anthropic {
        err["type"] = serde_json::Value::from("error");
    }
    let body = serde_json::to_vec(&err).unwrap_or_default();
    json_response(status, Bytes::from(body))
}

fn model_not_found(model: &str, anthropic: bool) -> Response<StandInBody> {
    error_response(
        StatusCode::NOT_FOUND,
        &format!("The model `{model}` does not exist or you do not have access to it."),
        if anthropic { "not_found_error" } else { "invalid_request_error" },
        "model_not_found",
        anthropic,
    )
}

fn status_response(code: u16, anthropic: bool) -> Response<StandInBody> {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let (kind, err_code) = match status.as_u16() {
        400 => ("invalid_request_error", "invalid_request"),
        401 => ("authentication_error", "invalid_api_key"),
        402 => ("insufficient_quota", "insufficient_quota"),
        403 => ("permission_error", "forbidden"),
        404 => ("invalid_request_error", "not_found"),
        429 => ("rate_limit_error", "rate_limit_exceeded"),
        503 => ("server_error", "service_unavailable"),
        529 => ("overloaded_error", "overloaded"),
        500..=599 => ("server_error", "internal_error"),
        _ => ("upstream_error", "stand_in_status"),
    };
    let mut resp = error_response(
        status,
        &format!("stand-in upstream injected HTTP {}", status.as_u16()),
        kind,
        err_code,
        anthropic,
    );
    if status == StatusCode::TOO_MANY_REQUESTS {
        resp.headers_mut().insert(RETRY_AFTER, HeaderValue::from_static("1"));
    }
    resp
}

// ---------------------------------------------------------------------------------------------
// The response body: either one buffer, or a list of frames yielded one by one with optional
// delays, ending normally, with an error (hyper then drops the connection) or never.

/// Response body of the stand-in.
pub struct StandInBody(BodyInner);

enum BodyInner {
    Full(Option<Bytes>),
    Frames(Box<Frames>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tail {
    End,
    Abort,
    Stall,
}

struct Frames {
    frames: Vec<Bytes>,
    next: usize,
    /// Frames at or past this index are not sent; `tail` happens instead.
    cut: usize,
    tail: Tail,
    delay: Duration,
    /// Frame indices preceded by `delay`.
    delayed: std::ops::Range<usize>,
    sleep: Option<Pin<Box<Sleep>>>,
    sleeping: bool,
    flushed: bool,
}

impl StandInBody {
    fn full(b: Bytes) -> Self {
        StandInBody(BodyInner::Full(Some(b)))
    }

    fn frames(frames: Vec<Bytes>, cut: usize, delay: Duration, delayed: std::ops::Range<usize>, tail: Tail) -> Self {
        let cut = if tail == Tail::End { frames.len() } else { cut.min(frames.len()) };
        StandInBody(BodyInner::Frames(Box::new(Frames {
            frames,
            next: 0,
            cut,
            tail,
            delay,
            delayed,
            sleep: None,
            sleeping: false,
            flushed: false,
        })))
    }
}

impl Frames {
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        if self.sleeping {
            if let Some(sleep) = self.sleep.as_mut() {
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
            }
            self.sleeping = false;
        }
        if self.next >= self.cut {
            return match self.tail {
                Tail::End => Poll::Ready(None),
                // Never woken: the connection stays open until the client or server goes away.
                Tail::Stall => Poll::Pending,
                Tail::Abort => {
                    if !self.flushed {
                        // Yield once so hyper flushes what was sent before the error.
                        self.flushed = true;
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                    Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "stand-in: disconnecting mid-stream",
                    ))))
                }
            };
        }
        let frame = std::mem::take(&mut self.frames[self.next]);
        self.next += 1;
        if !self.delay.is_zero() && self.next < self.cut && self.delayed.contains(&self.next) {
            let deadline = tokio::time::Instant::now() + self.delay;
            match self.sleep.as_mut() {
                Some(s) => s.as_mut().reset(deadline),
                None => self.sleep = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
            self.sleeping = true;
        }
        Poll::Ready(Some(Ok(Frame::data(frame))))
    }
}

impl Body for StandInBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match &mut self.get_mut().0 {
            BodyInner::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            BodyInner::Frames(f) => f.poll_next(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            BodyInner::Full(b) => b.is_none(),
            BodyInner::Frames(f) => f.tail == Tail::End && f.next >= f.cut,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            BodyInner::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            BodyInner::Full(None) => SizeHint::with_exact(0),
            BodyInner::Frames(_) => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answer_delays_are_read_and_spread_over_their_range() {
        assert_eq!(answer_delay_range(" 250 "), Some((250, 250)));
        assert_eq!(answer_delay_range("5 - 9"), Some((5, 9)));
        for bad in ["", "x", "9-1", "1-", "-4", "1-2-3"] {
            assert_eq!(answer_delay_range(bad), None, "{bad:?}");
        }
        assert_eq!(pick_delay((250, 250), 7), Duration::from_micros(250));
        // The widest range does not overflow.
        let _ = pick_delay((0, u64::MAX), 3);
        let picked: Vec<u64> = (0..1000).map(|seq| pick_delay((5000, 15000), seq).as_micros() as u64).collect();
        assert!(picked.iter().all(|us| (5000..=15000).contains(us)));
        // Spread over the range, not bunched: each tenth of it gets some of the thousand.
        let mut tenths = [0u32; 10];
        for us in &picked {
            tenths[((us - 5000) * 10 / 10001) as usize] += 1;
        }
        assert!(tenths.iter().all(|&n| n > 50), "{tenths:?}");
    }
}
