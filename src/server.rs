//! The clearnet listener: accepts connections (bounded), serves HTTP/1.1 and HTTP/2 with hyper,
//! and drains gracefully on shutdown.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{watch, OwnedSemaphorePermit};

use crate::node::Node;

/// Largest request head (request line and headers) accepted.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Outer bound on draining connections once shutdown starts (the node ends its streams sooner).
const DRAIN_DEADLINE: Duration = Duration::from_secs(120);

/// Where a connection came in. Handlers use it to keep the onion side from revealing the
/// clearnet host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Clearnet,
    Onion,
}

/// What tells an idle connection: its requests still open (until their answer's body ends) and
/// how many times one began or ended.
#[derive(Debug, Default)]
pub struct ConnectionUse {
    open: AtomicUsize,
    /// Counts each request's start and its end: a connection is idle only after a whole period
    /// without either, so the last answer's bytes still in hyper's buffers have long been sent.
    moves: AtomicUsize,
}

impl ConnectionUse {
    fn begin(self: &Arc<Self>) -> OpenRequest {
        self.moves.fetch_add(1, Ordering::Relaxed);
        self.open.fetch_add(1, Ordering::Relaxed);
        OpenRequest(self.clone())
    }

    /// Returns once the connection has gone `idle` with no request open, begun or ended: both
    /// HTTP/1's wait for a first request (hyper's header timeout starts only after it has told
    /// HTTP/1 from HTTP/2) and an HTTP/2 connection without streams would otherwise last for good.
    pub async fn idle(&self, idle: Duration) {
        let mut seen = 0;
        loop {
            tokio::time::sleep(idle).await;
            let moves = self.moves.load(Ordering::Relaxed);
            if moves == seen && self.open.load(Ordering::Relaxed) == 0 {
                return;
            }
            seen = moves;
        }
    }
}

/// A request open on its connection; it ends when its answer's body is dropped.
struct OpenRequest(Arc<ConnectionUse>);

impl Drop for OpenRequest {
    fn drop(&mut self) {
        self.0.moves.fetch_add(1, Ordering::Relaxed);
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An answer's body that keeps its request open until it is done with.
struct Tracked {
    body: crate::http::Body,
    _open: OpenRequest,
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = crate::http::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// Serves one accepted connection in a task of its own until it ends, goes idle (see
/// `ConnectionUse::idle`) or the node drains; its slot is freed then.
pub fn spawn_connection<F>(conn: F, used: Arc<ConnectionUse>, idle: Duration, slot: OwnedSemaphorePermit)
where
    F: std::future::Future + Send + 'static,
{
    tokio::spawn(async move {
        tokio::select! {
            biased;
            _ = conn => {}
            _ = used.idle(idle) => tracing::debug!("closed a connection idle for the client idle timeout"),
        }
        drop(slot);
    });
}

/// The hyper service for one connection: every request, tagged with its origin and with `client`
/// (who is rate-limited: a clearnet [`ClientIp`] or an onion [`Circuit`]), goes to the API.
pub fn service<C: Clone + Send + Sync + 'static>(
    node: Arc<Node>,
    origin: Origin,
    client: C,
    used: Arc<ConnectionUse>,
) -> impl hyper::service::Service<
    hyper::Request<hyper::body::Incoming>,
    Response = hyper::Response<crate::http::Body>,
    Error = Infallible,
    Future = impl std::future::Future<Output = Result<hyper::Response<crate::http::Body>, Infallible>> + Send,
> + Clone {
    service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        let node = node.clone();
        let open = used.begin();
        req.extensions_mut().insert(origin);
        req.extensions_mut().insert(client.clone());
        async move {
            let resp = crate::api::handle(node, req).await;
            Ok::<_, Infallible>(resp.map(|body| Tracked { body, _open: open }.boxed()))
        }
    })
}

/// The clearnet client's address, for the per-IP rate limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientIp(pub std::net::IpAddr);

/// The onion client's circuit (there is no address), for the per-circuit rate limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Circuit(pub u64);

/// HTTP/1.1 and HTTP/2 with bounded heads and header timeouts; shared by every listener.
pub fn http_builder(header_read_timeout: Duration) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        // The head is bounded by size here and to hyper's default of 100 headers, not by a
        // `max_headers` of our own: setting one moves hyper's header table from the stack to a
        // heap allocation initialised on every request (≈ 2 % of the node's instructions).
        .max_buf_size(MAX_HEAD_BYTES);
    builder.http2().timer(TokioTimer::new()).max_concurrent_streams(256);
    builder
}

pub async fn serve(listener: TcpListener, node: Arc<Node>, mut shutdown: watch::Receiver<bool>) {
    let idle = node.settings.client_idle_timeout();
    let builder = Arc::new(http_builder(idle));
    let graceful = GracefulShutdown::new();
    let slots = node.connection_slots.clone();
    loop {
        // Take a slot first: beyond the limit, connections wait in the kernel's accept queue.
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = shutdown.changed() => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: pause instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        let used = Arc::new(ConnectionUse::default());
        let service = service(node.clone(), Origin::Clearnet, ClientIp(peer.ip()), used.clone());
        let conn = builder.serve_connection(TokioIo::new(stream), service).into_owned();
        spawn_connection(graceful.watch(conn), used, idle, permit);
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_DEADLINE, graceful.shutdown()).await.is_err() {
        tracing::warn!("some connections were still open at the drain deadline");
    }
}
