//! The clearnet listener: accepts connections (bounded), serves HTTP/1.1 and HTTP/2 with hyper,
//! and drains gracefully on shutdown.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use crate::node::Node;

/// Longest wait for a client's request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
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

/// The hyper service for one connection: every request, tagged with its origin, goes to the API.
pub fn service(
    node: Arc<Node>,
    origin: Origin,
) -> impl hyper::service::Service<
    hyper::Request<hyper::body::Incoming>,
    Response = hyper::Response<crate::http::Body>,
    Error = Infallible,
    Future = impl std::future::Future<Output = Result<hyper::Response<crate::http::Body>, Infallible>> + Send,
> + Clone {
    service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        let node = node.clone();
        req.extensions_mut().insert(origin);
        async move { Ok::<_, Infallible>(crate::api::handle(node, req).await) }
    })
}

/// The clearnet client's address, for the per-IP rate limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientIp(pub std::net::IpAddr);

fn clearnet_service(
    node: Arc<Node>,
    peer: std::net::IpAddr,
) -> impl hyper::service::Service<
    hyper::Request<hyper::body::Incoming>,
    Response = hyper::Response<crate::http::Body>,
    Error = Infallible,
    Future = impl std::future::Future<Output = Result<hyper::Response<crate::http::Body>, Infallible>> + Send,
> + Clone {
    let inner = service(node, Origin::Clearnet);
    service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(ClientIp(peer));
        hyper::service::Service::call(&inner, req)
    })
}

/// HTTP/1.1 and HTTP/2 with bounded heads and header timeouts; shared by every listener.
pub fn http_builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        // The head is bounded by size here and to hyper's default of 100 headers, not by a
        // `max_headers` of our own: setting one moves hyper's header table from the stack to a
        // heap allocation initialised on every request (≈ 2 % of the node's instructions).
        .max_buf_size(MAX_HEAD_BYTES);
    builder.http2().timer(TokioTimer::new()).max_concurrent_streams(256);
    builder
}

pub async fn serve(listener: TcpListener, node: Arc<Node>, mut shutdown: watch::Receiver<bool>) {
    let builder = Arc::new(http_builder());
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(node.settings.max_connections.max(1)));
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
        let conn =
            builder.serve_connection(TokioIo::new(stream), clearnet_service(node.clone(), peer.ip())).into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_DEADLINE, graceful.shutdown()).await.is_err() {
        tracing::warn!("some connections were still open at the drain deadline");
    }
}
