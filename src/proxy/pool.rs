//! Kept-alive HTTP/1.1 connections to plain-HTTP upstreams, by authority.
//!
//! hyper-util's pooled client did this before. Its work around each request was ≈ 7 k of the
//! node's ≈ 113 k instructions per request at the benchmark (docs/benchmarks.md, *Round 16*):
//! a SipHash of the pool's key when a connection is taken and again when it is returned, a task
//! spawned per request to return the connection once it is idle, boxed futures. Here a
//! connection goes back when its answer is dropped (`Lease`), found by its authority's text; the
//! next exchange that takes it waits until hyper has it idle (the rest of the answer drained),
//! finds it closed (an answer cut short), or after `READY_GRACE` takes another.
//!
//! What it keeps of hyper-util's behaviour: origin-form request targets and a `Host` header, a
//! request that never left a connection closed under it is sent on another (a connection the
//! upstream closed while idle), idle connections are closed after `IDLE_TIMEOUT` (swept every
//! `SWEEP_EVERY`) and at most `MAX_IDLE_PER_HOST` are kept, a connect timeout shared by a name's
//! addresses, `TCP_NODELAY` and TCP keep-alive. hyper-util also tried the other address family
//! 300 ms into a slow first attempt; here each address has its share of the timeout.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{HeaderValue, HOST};
use hyper::http::uri::{Authority, PathAndQuery};
use hyper::{Request, Response, Uri};
use hyper_util::rt::TokioIo;

/// Idle connections are closed after this long.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle connections kept per upstream.
const MAX_IDLE_PER_HOST: usize = 1024;
/// How often idle connections past `IDLE_TIMEOUT` are closed.
const SWEEP_EVERY: Duration = Duration::from_secs(30);
/// How long a request waits for a pooled connection still finishing its last exchange before it
/// tries another.
const READY_GRACE: Duration = Duration::from_millis(100);
/// TCP keep-alive probes start after this long without traffic.
const TCP_KEEPALIVE: Duration = Duration::from_secs(15);

type Sender = SendRequest<Full<Bytes>>;

/// Why an exchange through the pool failed.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("the upstream URL has no host")]
    NoHost,
    #[error("could not connect: {0}")]
    Connect(std::io::Error),
    #[error("connecting timed out")]
    ConnectTimeout,
    #[error(transparent)]
    Exchange(#[from] hyper::Error),
}

/// Idle connections by upstream authority (`host:port` as written in its URL).
pub struct Pool {
    idle: Mutex<foldhash::HashMap<Box<str>, VecDeque<Idle>>>,
    connect_timeout: Duration,
}

struct Idle {
    sender: Sender,
    since: Instant,
}

/// One connection lent to one exchange; back to the pool when dropped. Drop it after the
/// answer's body (`UpstreamResponse` holds the body first): held while the body lives, the
/// connection would wait for that body before it takes another request.
pub struct Lease {
    pool: Arc<Pool>,
    authority: Authority,
    sender: Option<Sender>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(sender) = self.sender.take() {
            self.pool.put(self.authority.as_str(), sender);
        }
    }
}

impl Pool {
    /// Within a Tokio runtime, a task closes idle connections past their time for as long as the
    /// pool lives.
    pub fn new(connect_timeout: Duration) -> Arc<Pool> {
        let pool = Arc::new(Pool { idle: Mutex::default(), connect_timeout });
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let weak = Arc::downgrade(&pool);
            runtime.spawn(async move {
                let mut every = tokio::time::interval(SWEEP_EVERY);
                every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    every.tick().await;
                    match weak.upgrade() {
                        Some(pool) => pool.sweep(),
                        None => return,
                    }
                }
            });
        }
        pool
    }

    fn lease(self: &Arc<Self>, authority: Authority, sender: Sender) -> Lease {
        Lease { pool: self.clone(), authority, sender: Some(sender) }
    }

    /// Sends `req` (absolute URI) on an idle connection to its authority, or a new one, and
    /// waits for the head of the answer.
    pub async fn send(self: &Arc<Self>, req: Request<Bytes>) -> Result<(Response<Incoming>, Lease), PoolError> {
        let (mut parts, body) = req.into_parts();
        let authority = parts.uri.authority().cloned().ok_or(PoolError::NoHost)?;
        if !parts.headers.contains_key(HOST) {
            // As hyper-util wrote it: the host, and its port unless the default.
            let host = match authority.port_u16() {
                Some(port) if port != 80 => HeaderValue::from_str(&format!("{}:{port}", authority.host())),
                _ => HeaderValue::from_str(authority.host()),
            };
            parts.headers.insert(HOST, host.map_err(|_| PoolError::NoHost)?);
        }
        parts.uri = Uri::from(parts.uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/")));
        let mut req = Request::from_parts(parts, Full::new(body));
        while let Some(mut sender) = self.take(authority.as_str()) {
            // Returned with its answer: hyper may still be draining that answer, or writing the
            // request's body to an upstream that answered early and stopped reading it. Such a
            // connection is not waited on for long.
            if !sender.is_ready() && !matches!(tokio::time::timeout(READY_GRACE, sender.ready()).await, Ok(Ok(()))) {
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok((resp, self.lease(authority, sender))),
                // Not written: the connection closed under it (an upstream closing idle ones).
                Err(mut e) => match e.take_message() {
                    Some(unsent) => req = unsent,
                    None => return Err(PoolError::Exchange(e.into_error())),
                },
            }
        }
        let mut sender = self.connect(&authority).await?;
        let resp = sender.send_request(req).await?;
        Ok((resp, self.lease(authority, sender)))
    }

    /// The most recently returned live connection to `authority`.
    fn take(&self, authority: &str) -> Option<Sender> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let queue = idle.get_mut(authority)?;
        while let Some(entry) = queue.pop_back() {
            if !entry.sender.is_closed() && entry.since.elapsed() < IDLE_TIMEOUT {
                return Some(entry.sender);
            }
        }
        None
    }

    fn put(&self, authority: &str, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let queue = match idle.get_mut(authority) {
            Some(queue) => queue,
            None => idle.entry(authority.into()).or_default(),
        };
        // The oldest are at the front: those past their time, or beyond the limit, go.
        while queue
            .front()
            .is_some_and(|old| queue.len() >= MAX_IDLE_PER_HOST || now.duration_since(old.since) >= IDLE_TIMEOUT)
        {
            queue.pop_front();
        }
        queue.push_back(Idle { sender, since: now });
    }

    /// Closes idle connections past their time, and forgets upstreams with none.
    fn sweep(&self) {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.retain(|_, queue| {
            queue.retain(|entry| !entry.sender.is_closed() && now.duration_since(entry.since) < IDLE_TIMEOUT);
            !queue.is_empty()
        });
    }

    async fn connect(&self, authority: &Authority) -> Result<Sender, PoolError> {
        let port = authority.port_u16().unwrap_or(80);
        let host = authority.host();
        let deadline = tokio::time::Instant::now() + self.connect_timeout;
        let literal = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
        let addrs: Vec<SocketAddr> = match literal.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => match tokio::time::timeout_at(deadline, tokio::net::lookup_host((host, port))).await {
                Ok(found) => found.map_err(PoolError::Connect)?.collect(),
                Err(_) => return Err(PoolError::ConnectTimeout),
            },
        };
        // Each address has its share of the time left, so that one that does not answer (a
        // broken IPv6 route) leaves time for the next.
        let mut last = PoolError::Connect(std::io::Error::new(std::io::ErrorKind::NotFound, "the name has no address"));
        let mut connected = None;
        for (i, addr) in addrs.iter().enumerate() {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let share = left / u32::try_from(addrs.len() - i).unwrap_or(u32::MAX);
            match tokio::time::timeout(share, tokio::net::TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => {
                    connected = Some(stream);
                    break;
                }
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::TimedOut => last = PoolError::ConnectTimeout,
                Ok(Err(e)) => last = PoolError::Connect(e),
                Err(_) => last = PoolError::ConnectTimeout,
            }
        }
        let stream = connected.ok_or(last)?;
        let _ = stream.set_nodelay(true);
        let _ =
            socket2::SockRef::from(&stream).set_tcp_keepalive(&socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE));
        let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "upstream connection closed");
            }
        });
        Ok(sender)
    }

    #[cfg(test)]
    fn idle_count(&self, authority: &str) -> usize {
        self.idle.lock().unwrap().get(authority).map_or(0, VecDeque::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use hyper::service::service_fn;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// An upstream that counts its connections; `/close` answers with `Connection: close`, and
    /// with `close_idle` each connection is closed after its first exchange, without a word.
    async fn upstream(close_idle: bool) -> (String, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let service = service_fn(|req: Request<Incoming>| async move {
                    let close = req.uri().path() == "/close";
                    let host = req.headers().get(HOST).cloned();
                    let target = req.uri().to_string();
                    let mut resp = Response::new(Full::new(Bytes::from(target)));
                    if close {
                        resp.headers_mut().insert("connection", HeaderValue::from_static("close"));
                    }
                    if let Some(host) = host {
                        resp.headers_mut().insert("x-host", host);
                    }
                    Ok::<_, std::convert::Infallible>(resp)
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .keep_alive(!close_idle)
                    .serve_connection(TokioIo::new(stream), service);
                tokio::spawn(conn);
            }
        });
        (format!("127.0.0.1:{}", addr.port()), accepted)
    }

    /// An upstream that reads the start of each request, writes `answer`, then neither reads nor
    /// writes nor closes.
    async fn silent_after(answer: &'static [u8]) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority = format!("127.0.0.1:{}", listener.local_addr().unwrap().port());
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut buf = [0u8; 4096];
                    let _ = stream.read(&mut buf).await;
                    let _ = stream.write_all(answer).await;
                    tokio::time::sleep(Duration::from_secs(30)).await;
                });
            }
        });
        authority
    }

    fn get(authority: &str, path: &str) -> Request<Bytes> {
        let mut req = Request::new(Bytes::new());
        *req.uri_mut() = format!("http://{authority}{path}?q=1").parse().unwrap();
        req
    }

    async fn exchange(pool: &Arc<Pool>, authority: &str, path: &str) -> (String, Option<HeaderValue>) {
        let (resp, lease) = pool.send(get(authority, path)).await.unwrap();
        let host = resp.headers().get("x-host").cloned();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        drop(lease);
        (String::from_utf8(body.to_vec()).unwrap(), host)
    }

    #[tokio::test]
    async fn a_connection_is_reused_once_its_answer_was_read() {
        let (authority, accepted) = upstream(false).await;
        let pool = Pool::new(Duration::from_secs(1));
        for _ in 0..3 {
            let (target, host) = exchange(&pool, &authority, "/v1/models").await;
            // Origin form, and the Host header hyper-util wrote.
            assert_eq!(target, "/v1/models?q=1");
            assert_eq!(host.unwrap().to_str().unwrap(), authority);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(pool.idle_count(&authority), 1);

        // Two at once need two connections; both are kept.
        let (a, b) = tokio::join!(pool.send(get(&authority, "/a")), pool.send(get(&authority, "/b")));
        let ((ra, la), (rb, lb)) = (a.unwrap(), b.unwrap());
        ra.into_body().collect().await.unwrap();
        rb.into_body().collect().await.unwrap();
        drop((la, lb));
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        assert_eq!(pool.idle_count(&authority), 2);

        // An answer dropped unread (a stream left at its terminal event): hyper drains what it
        // has, and the connection serves the next exchange.
        let (resp, lease) = pool.send(get(&authority, "/a")).await.unwrap();
        drop(resp);
        drop(lease);
        assert_eq!(exchange(&pool, &authority, "/b").await.0, "/b?q=1");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);

        // Idle past their time: closed by the sweep, and the upstream forgotten.
        for entry in pool.idle.lock().unwrap().get_mut(authority.as_str()).unwrap() {
            entry.since = entry.since.checked_sub(IDLE_TIMEOUT).expect("a machine up for 90 s");
        }
        pool.sweep();
        assert_eq!(pool.idle_count(&authority), 0);
        assert!(pool.idle.lock().unwrap().is_empty());
        exchange(&pool, &authority, "/c").await;
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_stream_cut_short_does_not_hold_its_connection() {
        // An upstream that sends a head and the start of a body, then nothing.
        let authority = silent_after(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n6\r\ndata: \r\n",
        )
        .await;
        let pool = Pool::new(Duration::from_secs(1));
        let (mut resp, lease) = pool.send(get(&authority, "/stream")).await.unwrap();
        resp.body_mut().frame().await.unwrap().unwrap();
        drop(resp);
        drop(lease);
        // The next exchange does not wait on it: hyper closed it, and a new one is opened.
        let next = tokio::time::timeout(Duration::from_secs(2), pool.send(get(&authority, "/stream"))).await;
        assert!(next.expect("not held up by the first connection").is_ok());
    }

    #[tokio::test]
    async fn connections_the_upstream_closes_are_replaced_without_an_error() {
        let (authority, accepted) = upstream(true).await;
        let pool = Pool::new(Duration::from_secs(1));
        for i in 1..=3 {
            assert_eq!(exchange(&pool, &authority, "/x").await.0, "/x?q=1");
            assert_eq!(accepted.load(Ordering::SeqCst), i);
        }
        // `Connection: close` from a keep-alive upstream: the next exchange opens another.
        let (authority, accepted) = upstream(false).await;
        exchange(&pool, &authority, "/close").await;
        exchange(&pool, &authority, "/x").await;
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_connection_still_writing_its_last_request_is_not_waited_on() {
        // An upstream that answers at once, then neither reads the rest of the request's body
        // nor closes.
        let authority = silent_after(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
        let pool = Pool::new(Duration::from_secs(1));
        let mut large = get(&authority, "/upload");
        *large.method_mut() = hyper::Method::POST;
        *large.body_mut() = Bytes::from(vec![b'x'; 64 * 1024 * 1024]);
        let (resp, lease) = pool.send(large).await.unwrap();
        assert_eq!(&resp.into_body().collect().await.unwrap().to_bytes()[..], b"ok");
        drop(lease);
        // Its connection is still writing: the next request goes on another one.
        let next = tokio::time::timeout(Duration::from_secs(2), pool.send(get(&authority, "/next"))).await;
        assert!(next.expect("not held up by the busy connection").is_ok());
    }

    #[tokio::test]
    async fn connect_errors_are_told_apart() {
        let pool = Pool::new(Duration::from_secs(1));
        // Nobody listens on the discard port.
        assert!(matches!(pool.send(get("127.0.0.1:9", "/")).await, Err(PoolError::Connect(_))));
        let mut no_host = Request::new(Bytes::new());
        *no_host.uri_mut() = "/relative".parse().unwrap();
        assert!(matches!(pool.send(no_host).await, Err(PoolError::NoHost)));
    }
}
