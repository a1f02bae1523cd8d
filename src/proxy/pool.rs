//! Kept-alive HTTP/1.1 connections to plain-HTTP upstreams, by authority.
//!
//! hyper-util's pooled client did this before. Its work around each request was ≈ 6 k of the
//! node's ≈ 113 k instructions per request at the benchmark (docs/benchmarks.md, *Round 16*):
//! a SipHash of the pool's key when a connection is taken and again when it is returned, a task
//! spawned per request to return the connection once it is idle, boxed futures. Here a
//! connection goes back the moment its answer's body has been read to its end (`Lease`), found
//! by its authority's text.
//!
//! What it keeps of hyper-util's behaviour: origin-form request targets and a `Host` header, a
//! request that never left a connection closed under it is sent on another (a connection the
//! upstream closed while idle), idle connections are dropped after `IDLE_TIMEOUT` and at most
//! `MAX_IDLE_PER_HOST` are kept, a connect timeout over all of a name's addresses, `TCP_NODELAY`
//! and TCP keep-alive.

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

/// One connection lent to one exchange. `release` it once the answer's body has been read to its
/// end; dropped before that, the connection is closed with the body (HTTP/1.1 cannot reuse it).
pub struct Lease {
    pool: Arc<Pool>,
    authority: Authority,
    sender: Sender,
}

impl Lease {
    pub fn release(self) {
        self.pool.put(self.authority.as_str(), self.sender);
    }
}

impl Pool {
    pub fn new(connect_timeout: Duration) -> Arc<Pool> {
        Arc::new(Pool { idle: Mutex::default(), connect_timeout })
    }

    /// Sends `req` (absolute URI) on an idle connection to its authority, or a new one, and
    /// waits for the head of the answer.
    pub async fn send(self: &Arc<Self>, req: Request<Bytes>) -> Result<(Response<Incoming>, Lease), PoolError> {
        let (mut parts, body) = req.into_parts();
        let authority = parts.uri.authority().cloned().ok_or(PoolError::NoHost)?;
        if !parts.headers.contains_key(HOST) {
            let host = HeaderValue::from_str(authority.as_str()).map_err(|_| PoolError::NoHost)?;
            parts.headers.insert(HOST, host);
        }
        parts.uri = Uri::from(parts.uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/")));
        let mut req = Request::from_parts(parts, Full::new(body));
        while let Some(mut sender) = self.take(authority.as_str()) {
            // Returned as its answer ended: its connection may not be ready for the next one yet.
            if sender.ready().await.is_err() {
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok((resp, Lease { pool: self.clone(), authority, sender })),
                // Not written: the connection closed under it (an upstream closing idle ones).
                Err(mut e) => match e.take_message() {
                    Some(unsent) => req = unsent,
                    None => return Err(PoolError::Exchange(e.into_error())),
                },
            }
        }
        let mut sender = self.connect(&authority).await?;
        let resp = sender.send_request(req).await?;
        Ok((resp, Lease { pool: self.clone(), authority, sender }))
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

    async fn connect(&self, authority: &Authority) -> Result<Sender, PoolError> {
        let port = authority.port_u16().unwrap_or(80);
        let host = authority.host();
        let stream = tokio::time::timeout(self.connect_timeout, async {
            let literal = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
            let addrs: Vec<SocketAddr> = match literal.parse::<IpAddr>() {
                Ok(ip) => vec![SocketAddr::new(ip, port)],
                Err(_) => tokio::net::lookup_host((host, port)).await?.collect(),
            };
            let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "the name has no address");
            for addr in addrs {
                match tokio::net::TcpStream::connect(addr).await {
                    Ok(stream) => return Ok(stream),
                    Err(e) => last = e,
                }
            }
            Err(last)
        })
        .await
        .map_err(|_| PoolError::ConnectTimeout)?
        .map_err(PoolError::Connect)?;
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

    fn get(authority: &str, path: &str) -> Request<Bytes> {
        let mut req = Request::new(Bytes::new());
        *req.uri_mut() = format!("http://{authority}{path}?q=1").parse().unwrap();
        req
    }

    async fn exchange(pool: &Arc<Pool>, authority: &str, path: &str) -> (String, Option<HeaderValue>) {
        let (resp, lease) = pool.send(get(authority, path)).await.unwrap();
        let host = resp.headers().get("x-host").cloned();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        lease.release();
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
        la.release();
        lb.release();
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        assert_eq!(pool.idle_count(&authority), 2);

        // A lease dropped before its body was read closes its connection: not reused.
        let (_resp, lease) = pool.send(get(&authority, "/a")).await.unwrap();
        drop(lease);
        assert_eq!(pool.idle_count(&authority), 1);
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
    async fn connect_errors_are_told_apart() {
        let pool = Pool::new(Duration::from_secs(1));
        // Nobody listens on the discard port.
        assert!(matches!(pool.send(get("127.0.0.1:9", "/")).await, Err(PoolError::Connect(_))));
        let mut no_host = Request::new(Bytes::new());
        *no_host.uri_mut() = "/relative".parse().unwrap();
        assert!(matches!(pool.send(no_host).await, Err(PoolError::NoHost)));
    }
}
