//! The call to an upstream (or a discovered provider). Plain-HTTP upstreams that Tor need not
//! carry go straight to hyper's HTTP/1.1 client over the node's own pool of kept-alive
//! connections (`pool`); HTTPS and Tor-routed ones go through reqwest (TLS, proxies). reqwest's
//! own layer around each request (URL and URI conversions, default headers, redirect and proxy
//! checks, boxed futures) was ≈ 8–10 % of the node's request work at the benchmark, and
//! hyper-util's pool around hyper another ≈ 6 % (docs/benchmarks.md): most upstreams a node
//! meters sit next to it, on plain HTTP.
//!
//! Both paths keep the same timeouts: a connect timeout, and an idle timeout that bounds the wait
//! for the answer's head and then for each chunk of its body. What only reqwest does stays with
//! it: a redirect answered on the direct path is sent again through reqwest (which follows it),
//! and an egress proxy set in the environment sends every call through reqwest.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{HeaderMap, LOCATION};
use hyper::{Method, Request, Response, StatusCode, Uri};

use super::pool::{Lease, Pool, PoolError};
use crate::tor::Tor;

/// Why an upstream call failed. Deliberately without the URL or the upstream's words: both can
/// name the client's request.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("could not connect to the upstream")]
    Connect,
    #[error("the upstream did not answer in time")]
    Timeout,
    #[error("the upstream connection failed: {0}")]
    Broken(String),
}

/// How the node calls its upstreams.
pub struct UpstreamClient {
    direct: Arc<Pool>,
    /// HTTPS and Tor-routed calls (the node's own reqwest client, shared).
    general: reqwest::Client,
    idle: Duration,
    /// Which hosts Tor must carry (those go through `general`, routed by `tor::route`).
    tor: Option<Arc<Tor>>,
    /// An egress proxy from the environment (`HTTP_PROXY`, `ALL_PROXY`) that reqwest honours
    /// when the node has no Tor: then every call goes through reqwest.
    env_proxy: bool,
}

/// The proxy variables reqwest reads for plain-HTTP requests.
const PROXY_VARIABLES: [&str; 4] = ["http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"];

impl UpstreamClient {
    /// `general` carries what the direct path cannot; it should have the same timeouts.
    pub fn new(general: reqwest::Client, connect: Duration, idle: Duration, tor: Option<Arc<Tor>>) -> UpstreamClient {
        let direct = Pool::new(connect);
        let env_proxy =
            tor.is_none() && PROXY_VARIABLES.iter().any(|v| std::env::var_os(v).is_some_and(|x| !x.is_empty()));
        if env_proxy {
            tracing::info!("an HTTP proxy is set in the environment: upstream calls go through it");
        }
        UpstreamClient { direct, general, idle, tor, env_proxy }
    }

    /// Sends a request and waits for the head of its answer.
    pub async fn send(&self, req: Request<Bytes>) -> Result<UpstreamResponse, UpstreamError> {
        if !self.is_direct(req.uri()) {
            return self.send_general(req).await;
        }
        // Kept to send again through reqwest should the upstream redirect (rare; reqwest follows
        // redirects as the node always has). Cheap: the URI and body are shared, not copied.
        let again = (req.method().clone(), req.uri().clone(), req.headers().clone(), req.body().clone());
        let sent = tokio::time::timeout(self.idle, self.direct.send(req)).await;
        match sent {
            Ok(Ok((resp, lease))) if resp.status().is_redirection() && resp.headers().contains_key(LOCATION) => {
                // The answer before its connection (see `Lease`).
                drop(resp);
                drop(lease);
                let (method, uri, headers, body) = again;
                let mut req = Request::new(body);
                (*req.method_mut(), *req.uri_mut(), *req.headers_mut()) = (method, uri, headers);
                self.send_general(req).await
            }
            Ok(Ok((resp, lease))) => {
                Ok(UpstreamResponse { inner: Inner::Direct { resp, _lease: lease }, idle: self.idle })
            }
            Ok(Err(PoolError::Connect(_) | PoolError::NoHost)) => Err(UpstreamError::Connect),
            Ok(Err(PoolError::ConnectTimeout)) => Err(UpstreamError::Timeout),
            Ok(Err(PoolError::Exchange(e))) if timed_out(&e) => Err(UpstreamError::Timeout),
            Ok(Err(PoolError::Exchange(e))) => Err(UpstreamError::Broken(cause(&e))),
            Err(_) => Err(UpstreamError::Timeout),
        }
    }

    async fn send_general(&self, req: Request<Bytes>) -> Result<UpstreamResponse, UpstreamError> {
        let (parts, body) = req.into_parts();
        let url = reqwest::Url::parse(&parts.uri.to_string()).map_err(|e| UpstreamError::Broken(e.to_string()))?;
        let mut out = reqwest::Request::new(parts.method, url);
        *out.headers_mut() = parts.headers;
        if !body.is_empty() || out.method() == Method::POST {
            *out.body_mut() = Some(body.into());
        }
        match self.general.execute(out).await {
            Ok(resp) => Ok(UpstreamResponse::from(resp)),
            Err(e) if e.is_timeout() => Err(UpstreamError::Timeout),
            Err(e) if e.is_connect() => Err(UpstreamError::Connect),
            Err(e) => Err(UpstreamError::Broken(e.without_url().to_string())),
        }
    }

    /// Whether hyper's client alone can carry a request to `uri`: plain HTTP, and no Tor on
    /// the way.
    fn is_direct(&self, uri: &Uri) -> bool {
        !self.env_proxy
            && uri.scheme_str() == Some("http")
            && uri.host().is_some_and(|host| !crate::tor::carries(self.tor.as_deref(), host))
    }
}

/// Whether a hyper client error is a timeout.
fn timed_out(e: &hyper::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if s.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut) {
            return true;
        }
        source = s.source();
    }
    false
}

/// The innermost cause of an error, for the log.
fn cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut last = e;
    while let Some(s) = last.source() {
        last = s;
    }
    last.to_string()
}

/// An upstream's answer, its body still to read.
pub struct UpstreamResponse {
    inner: Inner,
    idle: Duration,
}

enum Inner {
    /// The answer, then its connection's lease: fields drop in order, so the body goes first and
    /// the connection back to the pool after it.
    Direct { resp: Response<Incoming>, _lease: Lease },
    /// reqwest applies its own idle timeout to each read.
    General(reqwest::Response),
}

impl From<reqwest::Response> for UpstreamResponse {
    fn from(resp: reqwest::Response) -> UpstreamResponse {
        UpstreamResponse { inner: Inner::General(resp), idle: Duration::MAX }
    }
}

impl UpstreamResponse {
    pub fn status(&self) -> StatusCode {
        match &self.inner {
            Inner::Direct { resp: r, .. } => r.status(),
            Inner::General(r) => r.status(),
        }
    }

    pub fn headers(&self) -> &HeaderMap {
        match &self.inner {
            Inner::Direct { resp: r, .. } => r.headers(),
            Inner::General(r) => r.headers(),
        }
    }

    /// The body's length when the upstream announced it.
    pub fn content_length(&self) -> Option<u64> {
        match &self.inner {
            Inner::Direct { resp: r, .. } => hyper::body::Body::size_hint(r.body()).exact(),
            Inner::General(r) => r.content_length(),
        }
    }

    /// The next chunk of the body; `None` at its end.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, UpstreamError> {
        match &mut self.inner {
            Inner::Direct { resp: r, .. } => loop {
                let frame = match crate::http::timeout_unless_ready(self.idle, r.body_mut().frame()).await {
                    Err(_) => return Err(UpstreamError::Timeout),
                    Ok(None) => return Ok(None),
                    Ok(Some(Err(e))) => return Err(UpstreamError::Broken(cause(&e))),
                    Ok(Some(Ok(frame))) => frame,
                };
                // Trailers carry nothing the node passes on.
                if let Ok(data) = frame.into_data() {
                    if !data.is_empty() {
                        return Ok(Some(data));
                    }
                }
            },
            Inner::General(r) => match r.chunk().await {
                Ok(chunk) => Ok(chunk),
                Err(e) if e.is_timeout() => Err(UpstreamError::Timeout),
                Err(e) => Err(UpstreamError::Broken(e.without_url().to_string())),
            },
        }
    }

    /// Reads the body whole, refusing more than `limit` bytes.
    pub async fn read_whole(mut self, limit: usize) -> Result<Bytes, ReadError> {
        if self.content_length().is_some_and(|n| n > limit as u64) {
            return Err(ReadError::TooLarge { limit });
        }
        let first = match self.chunk().await? {
            Some(chunk) => chunk,
            None => return Ok(Bytes::new()),
        };
        // The usual answer comes in one chunk: passed on without a copy.
        let Some(second) = self.chunk().await? else {
            return match first.len() > limit {
                true => Err(ReadError::TooLarge { limit }),
                false => Ok(first),
            };
        };
        let mut buf = bytes::BytesMut::with_capacity(first.len() + second.len());
        let mut next = Some(second);
        buf.extend_from_slice(&first);
        while let Some(chunk) = next {
            if buf.len() + chunk.len() > limit {
                return Err(ReadError::TooLarge { limit });
            }
            buf.extend_from_slice(&chunk);
            next = self.chunk().await?;
        }
        Ok(buf.freeze())
    }
}

/// Why an answer could not be read whole.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("the upstream answer is larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;

    fn client() -> UpstreamClient {
        UpstreamClient::new(reqwest::Client::new(), Duration::from_secs(1), Duration::from_secs(1), None)
    }

    #[tokio::test]
    async fn plain_http_goes_direct_unless_tor_must_carry_it() {
        let plain = client();
        let uri = |s: &str| s.parse::<Uri>().unwrap();
        assert!(plain.is_direct(&uri("http://127.0.0.1:8000/v1/chat/completions")));
        assert!(plain.is_direct(&uri("http://upstream.internal/v1/models")));
        assert!(!plain.is_direct(&uri("https://api.openai.com/v1/models")));
    }

    /// An upstream that moved `/old` to `/new` (307: the method and body stay) and echoes bodies.
    async fn redirecting_upstream() -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let service = service_fn(|req: Request<Incoming>| async move {
                    let moved = req.uri().path() == "/old";
                    let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                    let mut resp = Response::new(Full::new(body));
                    if moved {
                        *resp.status_mut() = StatusCode::TEMPORARY_REDIRECT;
                        resp.headers_mut().insert(LOCATION, hyper::header::HeaderValue::from_static("/new"));
                    }
                    Ok::<_, std::convert::Infallible>(resp)
                });
                let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
                tokio::spawn(conn);
            }
        });
        format!("http://{addr}")
    }

    #[tokio::test]
    async fn a_redirect_is_followed_with_its_body() {
        let base = redirecting_upstream().await;
        let mut req = Request::new(Bytes::from_static(b"{\"model\":\"m\"}"));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = format!("{base}/old").parse().unwrap();
        let resp = client().send(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(&resp.read_whole(1024).await.unwrap()[..], b"{\"model\":\"m\"}");
    }

    #[tokio::test]
    async fn answers_are_read_whole_within_their_limit() {
        let base = redirecting_upstream().await;
        let client = client();
        let send = |body: &'static [u8]| {
            let mut req = Request::new(Bytes::from_static(body));
            *req.method_mut() = Method::POST;
            *req.uri_mut() = format!("{base}/new").parse().unwrap();
            client.send(req)
        };
        assert_eq!(&send(b"12345").await.unwrap().read_whole(5).await.unwrap()[..], b"12345");
        let too_large = send(b"123456").await.unwrap().read_whole(5).await;
        assert!(matches!(too_large, Err(ReadError::TooLarge { limit: 5 })));
        // Nobody listens: a connection error, told apart from a timeout.
        let mut req = Request::new(Bytes::new());
        *req.uri_mut() = "http://127.0.0.1:9/v1/models".parse().unwrap();
        assert!(matches!(client.send(req).await, Err(UpstreamError::Connect)));
    }
}
