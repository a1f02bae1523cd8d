//! The node's own traffic through arti: two small proxies on 127.0.0.1 (ephemeral ports), both
//! opening their connections with the node's Tor client.
//!
//! - An HTTP proxy: `CONNECT host:port` for HTTPS (the TLS stays end to end), absolute-form
//!   requests for plain HTTP (`.onion` upstreams are usually plain HTTP). Any HTTP client that
//!   takes a proxy URL uses it: reqwest (`Proxy::all`, or `Proxy::custom` for `.onion` hosts
//!   only), cdk's mint client (`HttpClient::with_proxy`).
//! - A SOCKS5 proxy (CONNECT only, no authentication) for the Nostr relay pool's WebSockets.
//!   Connections to loopback (`127.0.0.0/8`, `::1`, `localhost`) go direct: a relay on the same
//!   host reveals nothing and is not reachable through Tor anyway.
//!
//! Host names are resolved by the exit (or are onion addresses), never locally (socks5h).

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use arti_client::TorClient;
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tor_rtcompat::PreferredRuntime;

type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// Binds the proxy on 127.0.0.1 and serves it in the background; returns its address.
pub async fn start(client: Arc<TorClient<PreferredRuntime>>) -> std::io::Result<SocketAddr> {
    serve_loopback("Tor proxy", move |stream| {
        let client = client.clone();
        async move {
            let service = hyper::service::service_fn(move |req| handle(client.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
        }
    })
    .await
}

/// Binds `what` on 127.0.0.1 (an ephemeral port) and hands each connection to `serve` in its
/// own task; returns the address.
async fn serve_loopback<F, Fut>(what: &'static str, serve: F) -> io::Result<SocketAddr>
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(serve(stream));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "{what} accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
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

/// A byte stream to a destination (a Tor stream, or a TCP connection for loopback).
pub(crate) trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

type Connecting = Pin<Box<dyn Future<Output = io::Result<Box<dyn Stream>>> + Send>>;

/// Opens a connection to `(host, port)` through Tor: arti in the node, a fake in tests.
pub(crate) type Connector = Arc<dyn Fn(String, u16) -> Connecting + Send + Sync>;

/// The connector that opens streams with the node's Tor client.
pub(crate) fn tor_connector(client: Arc<TorClient<PreferredRuntime>>) -> Connector {
    Arc::new(move |host: String, port: u16| {
        let client = client.clone();
        Box::pin(async move {
            let stream = client.connect((host.as_str(), port)).await.map_err(io::Error::other)?;
            Ok(Box::new(stream) as Box<dyn Stream>)
        })
    })
}

/// A whole SOCKS handshake must arrive within this long.
const SOCKS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

const SOCKS_VERSION: u8 = 5;
const NO_AUTH: u8 = 0x00;
const NO_ACCEPTABLE_METHOD: u8 = 0xff;
const CMD_CONNECT: u8 = 0x01;
const ATYP_IPV4: u8 = 0x01;
const ATYP_DOMAIN: u8 = 0x03;
const ATYP_IPV6: u8 = 0x04;
const REP_SUCCEEDED: u8 = 0x00;
const REP_GENERAL_FAILURE: u8 = 0x01;
const REP_CONNECTION_REFUSED: u8 = 0x05;
const REP_TTL_EXPIRED: u8 = 0x06;
const REP_COMMAND_NOT_SUPPORTED: u8 = 0x07;
const REP_ADDRESS_TYPE_NOT_SUPPORTED: u8 = 0x08;

/// Binds the SOCKS5 proxy on 127.0.0.1 and serves it in the background; returns its address.
pub(crate) async fn start_socks(connector: Connector) -> io::Result<SocketAddr> {
    serve_loopback("SOCKS proxy", move |stream| {
        let connector = connector.clone();
        async move {
            if let Err(e) = socks_session(stream, connector).await {
                tracing::debug!(error = %e, "SOCKS session ended");
            }
        }
    })
    .await
}

/// Whether a destination is on this host (connected to directly, never through Tor).
fn is_loopback(host: &str) -> bool {
    match host.parse::<IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => host.trim_end_matches('.').eq_ignore_ascii_case("localhost"),
    }
}

/// One SOCKS5 client: method negotiation (no authentication), one CONNECT, then bytes both ways.
async fn socks_session(mut client: TcpStream, connector: Connector) -> io::Result<()> {
    let (host, port) = match tokio::time::timeout(SOCKS_HANDSHAKE_TIMEOUT, socks_request(&mut client)).await {
        Ok(Ok(Ok(target))) => target,
        Ok(Ok(Err(rep))) => return socks_reply(&mut client, rep).await,
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "SOCKS handshake timed out")),
    };
    let connected: io::Result<Box<dyn Stream>> = if is_loopback(&host) {
        TcpStream::connect((host.as_str(), port)).await.map(|s| Box::new(s) as Box<dyn Stream>)
    } else {
        connector(host.clone(), port).await
    };
    let mut remote = match connected {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(%host, port, error = %e, "SOCKS connect failed");
            let rep = match e.kind() {
                io::ErrorKind::ConnectionRefused => REP_CONNECTION_REFUSED,
                io::ErrorKind::TimedOut => REP_TTL_EXPIRED,
                _ => REP_GENERAL_FAILURE,
            };
            return socks_reply(&mut client, rep).await;
        }
    };
    socks_reply(&mut client, REP_SUCCEEDED).await?;
    tokio::io::copy_bidirectional(&mut client, &mut remote).await?;
    Ok(())
}

/// Reads the greeting and the request: the CONNECT target, or the reply code refusing it.
async fn socks_request(client: &mut TcpStream) -> io::Result<Result<(String, u16), u8>> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
    let mut head = [0u8; 2];
    client.read_exact(&mut head).await?;
    if head[0] != SOCKS_VERSION {
        return Err(bad("not SOCKS5"));
    }
    let mut methods = vec![0u8; head[1] as usize];
    client.read_exact(&mut methods).await?;
    if !methods.contains(&NO_AUTH) {
        client.write_all(&[SOCKS_VERSION, NO_ACCEPTABLE_METHOD]).await?;
        return Err(bad("the client offers no method without authentication"));
    }
    client.write_all(&[SOCKS_VERSION, NO_AUTH]).await?;

    let mut req = [0u8; 4];
    client.read_exact(&mut req).await?;
    if req[0] != SOCKS_VERSION {
        return Err(bad("not SOCKS5"));
    }
    let host = match req[3] {
        ATYP_IPV4 => {
            let mut a = [0u8; 4];
            client.read_exact(&mut a).await?;
            Ipv4Addr::from(a).to_string()
        }
        ATYP_IPV6 => {
            let mut a = [0u8; 16];
            client.read_exact(&mut a).await?;
            Ipv6Addr::from(a).to_string()
        }
        ATYP_DOMAIN => {
            let mut len = [0u8; 1];
            client.read_exact(&mut len).await?;
            let mut name = vec![0u8; len[0] as usize];
            client.read_exact(&mut name).await?;
            match String::from_utf8(name) {
                Ok(name) if !name.is_empty() => name,
                _ => return Ok(Err(REP_GENERAL_FAILURE)),
            }
        }
        _ => return Ok(Err(REP_ADDRESS_TYPE_NOT_SUPPORTED)),
    };
    let mut port = [0u8; 2];
    client.read_exact(&mut port).await?;
    if req[1] != CMD_CONNECT {
        return Ok(Err(REP_COMMAND_NOT_SUPPORTED));
    }
    Ok(Ok((host, u16::from_be_bytes(port))))
}

/// The reply to a request (the bound address is not meaningful here: 0.0.0.0:0).
async fn socks_reply(client: &mut TcpStream, rep: u8) -> io::Result<()> {
    client.write_all(&[SOCKS_VERSION, rep, 0, ATYP_IPV4, 0, 0, 0, 0, 0, 0]).await?;
    client.flush().await
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    type Seen = Arc<Mutex<Vec<(String, u16)>>>;

    /// An echo server on loopback, prefixing what it echoes with `tag`.
    async fn echo(tag: &'static [u8]) -> SocketAddr {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    while let Ok(n @ 1..) = s.read(&mut buf).await {
                        let _ = s.write_all(tag).await;
                        let _ = s.write_all(&buf[..n]).await;
                    }
                });
            }
        });
        addr
    }

    /// A fake Tor: records each target and connects to `via` instead (or refuses with `fail`).
    fn fake(via: SocketAddr, fail: Option<io::ErrorKind>) -> (Connector, Seen) {
        let seen: Seen = Arc::default();
        let log = seen.clone();
        let connector: Connector = Arc::new(move |host: String, port: u16| {
            log.lock().unwrap().push((host, port));
            Box::pin(async move {
                if let Some(kind) = fail {
                    return Err(io::Error::new(kind, "fake Tor says no"));
                }
                Ok(Box::new(TcpStream::connect(via).await?) as Box<dyn Stream>)
            })
        });
        (connector, seen)
    }

    /// Greets without authentication; returns the stream after the method reply.
    async fn greet(proxy: SocketAddr) -> TcpStream {
        let mut s = TcpStream::connect(proxy).await.unwrap();
        s.write_all(&[5, 2, 0x02, 0x00]).await.unwrap();
        let mut choice = [0u8; 2];
        s.read_exact(&mut choice).await.unwrap();
        assert_eq!(choice, [5, 0], "no authentication chosen");
        s
    }

    /// Sends a request (`cmd`, address bytes with their type, port) and returns the reply code.
    async fn request(s: &mut TcpStream, cmd: u8, addr: &[u8], port: u16) -> u8 {
        let mut req = vec![5, cmd, 0];
        req.extend_from_slice(addr);
        req.extend_from_slice(&port.to_be_bytes());
        s.write_all(&req).await.unwrap();
        let mut reply = [0u8; 10];
        s.read_exact(&mut reply).await.unwrap();
        assert_eq!((reply[0], reply[2], reply[3]), (5, 0, ATYP_IPV4), "{reply:?}");
        reply[1]
    }

    async fn round_trip(s: &mut TcpStream, expect_tag: &[u8]) {
        s.write_all(b"ping").await.unwrap();
        let mut got = vec![0u8; expect_tag.len() + 4];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(got, [expect_tag, b"ping"].concat());
    }

    fn domain(name: &str) -> Vec<u8> {
        [&[ATYP_DOMAIN, name.len() as u8][..], name.as_bytes()].concat()
    }

    #[tokio::test]
    async fn connect_by_domain_goes_through_tor_unresolved() {
        let tor_side = echo(b"tor:").await;
        let (connector, seen) = fake(tor_side, None);
        let proxy = start_socks(connector).await.unwrap();
        let onion = format!("{}.onion", "a".repeat(56));
        let mut s = greet(proxy).await;
        assert_eq!(request(&mut s, CMD_CONNECT, &domain(&onion), 80).await, REP_SUCCEEDED);
        round_trip(&mut s, b"tor:").await;
        let mut s = greet(proxy).await;
        assert_eq!(request(&mut s, CMD_CONNECT, &domain("relay.example.com"), 443).await, REP_SUCCEEDED);
        round_trip(&mut s, b"tor:").await;
        assert_eq!(*seen.lock().unwrap(), [(onion, 80), ("relay.example.com".to_owned(), 443)]);
    }

    #[tokio::test]
    async fn connect_by_ip_goes_through_tor() {
        let tor_side = echo(b"tor:").await;
        let (connector, seen) = fake(tor_side, None);
        let proxy = start_socks(connector).await.unwrap();
        let mut s = greet(proxy).await;
        assert_eq!(request(&mut s, CMD_CONNECT, &[ATYP_IPV4, 93, 184, 215, 14], 443).await, REP_SUCCEEDED);
        round_trip(&mut s, b"tor:").await;
        let v6: Ipv6Addr = "2001:db8::1".parse().unwrap();
        let mut s = greet(proxy).await;
        assert_eq!(request(&mut s, CMD_CONNECT, &[&[ATYP_IPV6][..], &v6.octets()].concat(), 80).await, REP_SUCCEEDED);
        round_trip(&mut s, b"tor:").await;
        assert_eq!(*seen.lock().unwrap(), [("93.184.215.14".to_owned(), 443), ("2001:db8::1".to_owned(), 80)]);
    }

    #[tokio::test]
    async fn loopback_goes_direct() {
        let tor_side = echo(b"tor:").await;
        let local = echo(b"local:").await;
        let (connector, seen) = fake(tor_side, None);
        let proxy = start_socks(connector).await.unwrap();
        let mut s = greet(proxy).await;
        assert_eq!(request(&mut s, CMD_CONNECT, &[ATYP_IPV4, 127, 0, 0, 1], local.port()).await, REP_SUCCEEDED);
        round_trip(&mut s, b"local:").await;
        let mut s = greet(proxy).await;
        assert_eq!(request(&mut s, CMD_CONNECT, &domain("localhost"), local.port()).await, REP_SUCCEEDED);
        round_trip(&mut s, b"local:").await;
        assert!(seen.lock().unwrap().is_empty(), "nothing went through Tor");
        // A loopback port nobody listens on: refused, still not through Tor.
        let closed = TcpListener::bind(("127.0.0.1", 0)).await.unwrap().local_addr().unwrap().port();
        let mut s = greet(proxy).await;
        assert_eq!(request(&mut s, CMD_CONNECT, &[ATYP_IPV4, 127, 0, 0, 1], closed).await, REP_CONNECTION_REFUSED);
        assert!(seen.lock().unwrap().is_empty());
        assert!(is_loopback("::1") && is_loopback("127.8.9.10") && is_loopback("LOCALHOST."));
        assert!(!is_loopback("10.0.0.1") && !is_loopback("localhost.example") && !is_loopback("x.onion"));
    }

    #[tokio::test]
    async fn unsupported_requests_are_refused() {
        let tor_side = echo(b"tor:").await;
        let (connector, seen) = fake(tor_side, None);
        let proxy = start_socks(connector).await.unwrap();
        // BIND and UDP ASSOCIATE: command not supported.
        for cmd in [0x02, 0x03] {
            let mut s = greet(proxy).await;
            assert_eq!(request(&mut s, cmd, &domain("example.com"), 80).await, REP_COMMAND_NOT_SUPPORTED);
        }
        // An unknown address type.
        let mut s = greet(proxy).await;
        s.write_all(&[5, CMD_CONNECT, 0, 0x09]).await.unwrap();
        let mut reply = [0u8; 10];
        s.read_exact(&mut reply).await.unwrap();
        assert_eq!(reply[1], REP_ADDRESS_TYPE_NOT_SUPPORTED);
        // Only username/password offered: no acceptable method, and the connection closes.
        let mut s = TcpStream::connect(proxy).await.unwrap();
        s.write_all(&[5, 1, 0x02]).await.unwrap();
        let mut choice = [0u8; 2];
        s.read_exact(&mut choice).await.unwrap();
        assert_eq!(choice, [5, NO_ACCEPTABLE_METHOD]);
        assert_eq!(s.read(&mut choice).await.unwrap(), 0, "closed");
        // SOCKS4: dropped.
        let mut s = TcpStream::connect(proxy).await.unwrap();
        s.write_all(&[4, 1, 0, 80, 127, 0, 0, 1, 0]).await.unwrap();
        assert_eq!(s.read(&mut choice).await.unwrap_or(0), 0, "closed");
        assert!(seen.lock().unwrap().is_empty(), "nothing went through Tor");
    }

    #[tokio::test]
    async fn tor_failures_are_reported() {
        let tor_side = echo(b"tor:").await;
        let (connector, seen) = fake(tor_side, Some(io::ErrorKind::Other));
        let proxy = start_socks(connector).await.unwrap();
        let mut s = greet(proxy).await;
        assert_eq!(request(&mut s, CMD_CONNECT, &domain("unreachable.onion"), 80).await, REP_GENERAL_FAILURE);
        assert_eq!(seen.lock().unwrap().len(), 1);
    }

    /// The client nostr-sdk uses (tokio-socks, via async-wsocket) gets through.
    #[tokio::test]
    async fn nostr_sdk_relay_through_the_proxy() {
        use nostr_relay_builder::prelude::{LocalRelay, RelayBuilder};
        use nostr_sdk::prelude::{Client, ClientOptions, Connection, Keys};
        let relay = LocalRelay::new(RelayBuilder::default());
        relay.run().await.unwrap();
        let relay_url = relay.url().await.to_string();
        let relay_addr: SocketAddr = relay_url.trim_start_matches("ws://").trim_end_matches('/').parse().unwrap();
        // Loopback straight through; a clearnet-looking name through the fake Tor (to the relay).
        let (connector, seen) = fake(relay_addr, None);
        let proxy = start_socks(connector).await.unwrap();
        let opts = ClientOptions::new().connection(Connection::new().proxy(proxy));
        let client = Client::builder().signer(Keys::generate()).opts(opts).build();
        client.add_relay(relay_url.as_str()).await.unwrap();
        client.add_relay("ws://relay.example.com").await.unwrap();
        client.connect().await;
        client.wait_for_connection(Duration::from_secs(5)).await;
        for (url, relay) in client.relays().await {
            assert_eq!(relay.status(), nostr_sdk::prelude::RelayStatus::Connected, "{url}");
        }
        assert_eq!(*seen.lock().unwrap(), [("relay.example.com".to_owned(), 80)]);
        client.shutdown().await;
    }
}
