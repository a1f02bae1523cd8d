//! `TOR_OUTBOUND`: the node's own HTTP(S) traffic through arti.
//!
//! A small HTTP proxy on 127.0.0.1 (an ephemeral port) that opens every connection through the
//! Tor client: `CONNECT host:port` for HTTPS (the TLS stays end to end), absolute-form requests
//! for plain HTTP (`.onion` upstreams are usually plain HTTP). Any HTTP client that takes a
//! proxy URL uses it: reqwest (`Proxy::all`), cdk's mint client (`HttpClient::with_proxy`).
//! Host names are resolved by the exit (or are onion addresses), never locally.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use arti_client::TorClient;
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tor_rtcompat::PreferredRuntime;

type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// Binds the proxy on 127.0.0.1 and serves it in the background; returns its address.
pub async fn start(client: Arc<TorClient<PreferredRuntime>>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "Tor proxy accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let client = client.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| handle(client.clone(), req));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades()
                    .await;
            });
        }
    });
    Ok(addr)
}

fn reply(status: StatusCode, text: &str) -> Response<ProxyBody> {
    let mut r = Response::new(Full::new(Bytes::from(text.to_owned())).map_err(|never| match never {}).boxed());
    *r.status_mut() = status;
    r
}

/// Host and port of the request's target (CONNECT authority or absolute URI).
fn target(req: &Request<hyper::body::Incoming>) -> Option<(String, u16)> {
    let uri = req.uri();
    let host = uri.host()?.trim_start_matches('[').trim_end_matches(']').to_owned();
    let port = uri.port_u16().or(match uri.scheme_str() {
        Some("https") => Some(443),
        Some("http") => Some(80),
        _ => None,
    })?;
    Some((host, port))
}

async fn handle(
    client: Arc<TorClient<PreferredRuntime>>,
    mut req: Request<hyper::body::Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let Some((host, port)) = target(&req) else {
        return Ok(reply(StatusCode::BAD_REQUEST, "absolute URI or CONNECT authority expected"));
    };
    let stream = match client.connect((host.as_str(), port)).await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(error = %e, "Tor connection failed");
            return Ok(reply(StatusCode::BAD_GATEWAY, &format!("Tor: {e}")));
        }
    };
    if req.method() == Method::CONNECT {
        tokio::spawn(async move {
            match hyper::upgrade::on(req).await {
                Ok(upgraded) => {
                    let mut upgraded = TokioIo::new(upgraded);
                    let mut stream = stream;
                    let _ = tokio::io::copy_bidirectional(&mut upgraded, &mut stream).await;
                }
                Err(e) => tracing::debug!(error = %e, "proxy upgrade failed"),
            }
        });
        return Ok(Response::new(Empty::new().map_err(|never| match never {}).boxed()));
    }
    // Plain HTTP: one fresh connection through Tor per request, in origin form.
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await {
        Ok(pair) => pair,
        Err(e) => return Ok(reply(StatusCode::BAD_GATEWAY, &format!("handshake: {e}"))),
    };
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let path = req.uri().path_and_query().map(|p| p.as_str().to_owned()).unwrap_or_else(|| "/".into());
    *req.uri_mut() = match path.parse() {
        Ok(uri) => uri,
        Err(_) => return Ok(reply(StatusCode::BAD_REQUEST, "bad path")),
    };
    req.headers_mut().remove("proxy-connection");
    req.headers_mut().remove("proxy-authorization");
    match sender.send_request(req).await {
        Ok(resp) => Ok(resp.map(|b| b.boxed())),
        Err(e) => Ok(reply(StatusCode::BAD_GATEWAY, &format!("upstream: {e}"))),
    }
}
