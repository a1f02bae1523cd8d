//! Offline stand-ins for the outside world, used by `routstr-node demo`, the tests and the
//! benchmark: a real cdk mint with the fake Lightning backend, and an OpenAI-compatible upstream
//! that can misbehave on demand.

pub mod lnurl_server;
pub mod mint;
pub mod upstream;
pub mod walkthrough;

use std::future::Future;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Serves `handler` on `listener` (HTTP/1.1 and HTTP/2) until `shutdown` turns, which also ends
/// the open connections. `refuse()` true drops a new connection at once ("connection refused"
/// as the client sees it). Shared by the stand-ins: upstream and LNURL server.
pub(crate) async fn serve_until<H, Fut, B, E>(
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
    refuse: impl Fn() -> bool + Send + 'static,
    handler: H,
) where
    H: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<B>, E>> + Send + 'static,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let builder = std::sync::Arc::new(auto::Builder::new(TokioExecutor::new()));
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.changed() => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(_) => {
                // e.g. out of file descriptors: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
        };
        if refuse() {
            drop(stream);
            continue;
        }
        let (builder, handler, mut shutdown) = (builder.clone(), handler.clone(), shutdown.clone());
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            let conn = builder.serve_connection(TokioIo::new(stream), service_fn(handler));
            tokio::select! {
                _ = conn => {}
                _ = shutdown.changed() => {}
            }
        });
    }
}
