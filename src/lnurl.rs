//! LNURL-pay client (LUD-06, LUD-16 Lightning addresses, LUD-01 bech32 `lnurl1…`).
//!
//! Used to refund a balance over Lightning to an address the user gave (`Refund-LNURL`) and to
//! pay the operator's `RECEIVE_LN_ADDRESS`. Users choose these addresses, so every request is a
//! server-side request forgery risk and is fenced in:
//!
//! - no redirects; bodies are streamed with a hard size cap; the whole exchange has one deadline;
//! - unless `allow_private_hosts`, hosts that are, or resolve to, loopback, private, link-local,
//!   CGNAT, multicast, unspecified or reserved addresses are refused. Names are checked by a DNS
//!   resolver that filters the addresses it hands to the connector (so a rebinding answer between
//!   a check and the connect cannot slip through), literal IPs (which skip the resolver) by
//!   [`LnurlClient::resolve_url`]. The callback URL the server returns is checked the same way;
//! - `.onion` hosts only through `proxy`. With a proxy every non-loopback host goes through it,
//!   and names are then resolved by the proxy (a Tor exit refuses private addresses itself);
//! - logs carry [`destination_host`] only, never the address or the invoice.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use cdk::Bolt11Invoice;
use futures_util::StreamExt;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::Url;
use serde_json::Value;

/// Longest destination accepted (an LNURL of a long URL is still far below this).
const MAX_DESTINATION_CHARS: usize = 512;
/// Longest server-supplied text (an error `reason`, a `tag`) copied into an error message.
const MAX_REASON_CHARS: usize = 200;

/// Why an LNURL-pay exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum LnurlError {
    #[error("invalid Lightning address or LNURL: {0}")]
    Invalid(String),
    #[error("the LNURL host refused or is not allowed: {0}")]
    NotAllowed(String),
    #[error("the LNURL host could not be reached: {0}")]
    Unreachable(String),
    #[error("the LNURL host answered badly: {0}")]
    BadResponse(String),
    #[error("{amount_msat} msat is outside what the recipient accepts ({min_msat}..={max_msat} msat)")]
    AmountOutOfRange { amount_msat: u64, min_msat: u64, max_msat: u64 },
}

/// Tunables of [`LnurlClient`].
#[derive(Debug, Clone)]
pub struct LnurlOptions {
    /// Deadline for a whole exchange (pay params and callback together).
    pub timeout: Duration,
    /// Largest response body read; anything longer is refused.
    pub max_response_bytes: usize,
    /// Allow loopback and private hosts (and plain http to them): tests and the demo only.
    pub allow_private_hosts: bool,
    /// HTTP proxy (the node's Tor proxy with TOR_OUTBOUND) for every host except loopback, like
    /// the wallet's. Without it `.onion` hosts are refused.
    pub proxy: Option<String>,
}

impl Default for LnurlOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            max_response_bytes: 64 * 1024,
            allow_private_hosts: false,
            proxy: None,
        }
    }
}

/// The LUD-06 `payRequest` parameters a recipient publishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayParams {
    /// Where to ask for an invoice (already checked like the first URL).
    pub callback: Url,
    pub min_sendable_msat: u64,
    pub max_sendable_msat: u64,
    /// Longest comment the recipient accepts (0: none).
    pub comment_allowed: u64,
}

/// An LNURL-pay client. Cheap to clone (the connection pool is shared).
#[derive(Clone)]
pub struct LnurlClient {
    http: reqwest::Client,
    opts: Arc<LnurlOptions>,
}

impl fmt::Debug for LnurlClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The proxy URL is left out: it could carry credentials.
        f.debug_struct("LnurlClient")
            .field("timeout", &self.opts.timeout)
            .field("max_response_bytes", &self.opts.max_response_bytes)
            .field("allow_private_hosts", &self.opts.allow_private_hosts)
            .field("proxy", &self.opts.proxy.is_some())
            .finish()
    }
}

impl LnurlClient {
    /// Builds the HTTP client: no redirects, the filtering resolver, the proxy (or explicitly
    /// none, so an `HTTPS_PROXY` in the environment cannot route around the filter).
    pub fn new(opts: LnurlOptions) -> Result<Self, LnurlError> {
        let proxy = match opts.proxy.as_deref() {
            Some(p) => Some(Url::parse(p).map_err(|e| LnurlError::Invalid(format!("proxy URL: {e}")))?),
            None => None,
        };
        // The proxy itself may be named (`http://localhost:8118`): its name must resolve.
        let proxy_host = proxy.as_ref().and_then(Url::host_str).map(normalize_host);
        let resolver = GuardedResolver { allow_private: opts.allow_private_hosts, proxy_host };
        let builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .referer(false)
            .connect_timeout(opts.timeout)
            .timeout(opts.timeout)
            .dns_resolver(resolver)
            .user_agent(concat!("routstr-node/", env!("CARGO_PKG_VERSION")));
        let builder = match proxy {
            Some(proxy) => {
                builder.proxy(reqwest::Proxy::custom(move |url| (!is_loopback_url(url)).then(|| proxy.clone())))
            }
            None => builder.no_proxy(),
        };
        let http = builder.build().map_err(|e| LnurlError::Invalid(format!("HTTP client: {}", error_chain(&e))))?;
        Ok(Self { http, opts: Arc::new(opts) })
    }

    /// Normalise what a user gave into the URL to GET: `user@domain` (LUD-16), `lnurl1…`
    /// (LUD-01, any case, optional `lightning:` prefix) or an `https://` URL. Pure: no I/O.
    pub fn resolve_url(&self, destination: &str) -> Result<Url, LnurlError> {
        if destination.chars().count() > MAX_DESTINATION_CHARS {
            return Err(LnurlError::Invalid(format!("longer than {MAX_DESTINATION_CHARS} characters")));
        }
        let d = strip_lightning_prefix(destination.trim());
        let url = if is_bech32_lnurl(d) {
            decode_lnurl(d)?
        } else if d.contains("://") {
            Url::parse(d).map_err(|e| LnurlError::Invalid(format!("URL: {e}")))?
        } else if d.contains('@') {
            self.address_url(d)?
        } else {
            return Err(LnurlError::Invalid("expected user@domain, lnurl1… or an https:// URL".into()));
        };
        self.check_url(&url)?;
        Ok(url)
    }

    /// Fetch the recipient's pay parameters.
    pub async fn pay_params(&self, destination: &str) -> Result<PayParams, LnurlError> {
        let host = destination_host(destination);
        tracing::debug!(%host, "LNURL-pay: fetching pay parameters");
        let result = self.within_deadline(self.fetch_pay_params(destination)).await;
        if let Err(e) = &result {
            tracing::debug!(%host, error = %e, "LNURL-pay: pay parameters failed");
        }
        result
    }

    /// The whole LUD-06 flow: pay parameters, range check, callback with `amount`, and a bolt11
    /// checked to be for exactly `amount_msat` (so a recipient cannot make us overpay).
    pub async fn invoice(&self, destination: &str, amount_msat: u64) -> Result<String, LnurlError> {
        let host = destination_host(destination);
        tracing::debug!(%host, amount_msat, "LNURL-pay: requesting an invoice");
        let result = self
            .within_deadline(async {
                let params = self.fetch_pay_params(destination).await?;
                if amount_msat < params.min_sendable_msat || amount_msat > params.max_sendable_msat {
                    return Err(LnurlError::AmountOutOfRange {
                        amount_msat,
                        min_msat: params.min_sendable_msat,
                        max_msat: params.max_sendable_msat,
                    });
                }
                let mut callback = params.callback;
                callback.query_pairs_mut().append_pair("amount", &amount_msat.to_string());
                let answer = self.get_json(callback).await?;
                let pr = answer
                    .get("pr")
                    .and_then(Value::as_str)
                    .map(str::trim)
                    .ok_or_else(|| LnurlError::BadResponse("no invoice (`pr`) in the callback's answer".into()))?;
                check_invoice(pr, amount_msat)?;
                Ok(pr.to_owned())
            })
            .await;
        match &result {
            Ok(_) => tracing::debug!(%host, amount_msat, "LNURL-pay: got an invoice"),
            Err(e) => tracing::debug!(%host, error = %e, "LNURL-pay: invoice failed"),
        }
        result
    }

    async fn within_deadline<T>(&self, fut: impl Future<Output = Result<T, LnurlError>>) -> Result<T, LnurlError> {
        let timeout = self.opts.timeout;
        match tokio::time::timeout(timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(LnurlError::Unreachable(format!("no complete answer within {timeout:?}"))),
        }
    }

    async fn fetch_pay_params(&self, destination: &str) -> Result<PayParams, LnurlError> {
        let url = self.resolve_url(destination)?;
        let answer = self.get_json(url).await?;
        self.parse_pay_params(&answer)
    }

    fn parse_pay_params(&self, v: &Value) -> Result<PayParams, LnurlError> {
        let tag = v.get("tag").and_then(Value::as_str).unwrap_or("");
        if tag != "payRequest" {
            return Err(LnurlError::BadResponse(format!("not a payRequest (tag {:?})", sanitize(tag))));
        }
        let callback =
            v.get("callback").and_then(Value::as_str).ok_or_else(|| LnurlError::BadResponse("no callback".into()))?;
        let callback =
            Url::parse(callback.trim()).map_err(|e| LnurlError::BadResponse(format!("callback URL: {e}")))?;
        // A refused host stays NotAllowed; anything else wrong with it is the server's fault.
        self.check_url(&callback).map_err(|e| match e {
            LnurlError::Invalid(m) => LnurlError::BadResponse(format!("callback URL: {m}")),
            other => other,
        })?;
        let min = msat_field(v, "minSendable")?;
        let max = msat_field(v, "maxSendable")?;
        if min > max {
            return Err(LnurlError::BadResponse(format!("minSendable {min} > maxSendable {max}")));
        }
        let comment_allowed = v.get("commentAllowed").and_then(Value::as_u64).unwrap_or(0);
        Ok(PayParams { callback, min_sendable_msat: min, max_sendable_msat: max, comment_allowed })
    }

    /// GET a JSON document with the size cap; an LNURL `{"status":"ERROR"}` becomes BadResponse.
    async fn get_json(&self, url: Url) -> Result<Value, LnurlError> {
        let resp =
            self.http.get(url).header(reqwest::header::ACCEPT, "application/json").send().await.map_err(map_reqwest)?;
        let status = resp.status();
        if status.is_redirection() {
            return Err(LnurlError::BadResponse(format!("HTTP {status}: redirects are not followed")));
        }
        let max = self.opts.max_response_bytes;
        let too_big = || LnurlError::BadResponse(format!("response larger than {max} bytes"));
        if resp.content_length().is_some_and(|len| len > max as u64) {
            return Err(too_big());
        }
        let mut body = Vec::new();
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(map_reqwest)?;
            if body.len() + chunk.len() > max {
                return Err(too_big());
            }
            body.extend_from_slice(&chunk);
        }
        let json = serde_json::from_slice::<Value>(&body).ok();
        if let Some(reason) = json.as_ref().and_then(lnurl_error_reason) {
            return Err(LnurlError::BadResponse(reason));
        }
        if !status.is_success() {
            return Err(LnurlError::BadResponse(format!("HTTP {status}")));
        }
        json.ok_or_else(|| LnurlError::BadResponse("the answer is not JSON".into()))
    }

    /// The same rules for another host a user chose, e.g. the mint of a foreign token the node
    /// is asked to melt there: scheme, credentials, no private or loopback host (unless
    /// allowed), names resolved and checked too. cdk's client resolves the name again when it
    /// connects, so a rebinding answer in between is not caught here (the LNURL requests
    /// themselves go through the filtering resolver).
    pub async fn check_user_host(&self, url: &str) -> Result<(), LnurlError> {
        let url = Url::parse(url).map_err(|e| LnurlError::Invalid(format!("URL: {e}")))?;
        self.check_url(&url)?;
        let host = url.host_str().map(normalize_host).unwrap_or_default();
        if self.opts.allow_private_hosts || host.ends_with(".onion") || host.parse::<IpAddr>().is_ok() {
            return Ok(());
        }
        // Through the proxy (Tor) the name is resolved by it, and a Tor exit refuses private
        // addresses itself: resolving it here would ask the system's resolver, outside Tor.
        if self.opts.proxy.is_some() {
            return Ok(());
        }
        let port = url.port_or_known_default().unwrap_or(443);
        let addrs = tokio::time::timeout(self.opts.timeout, tokio::net::lookup_host((host.as_str(), port)))
            .await
            .map_err(|_| LnurlError::Unreachable(format!("{host}: name lookup timed out")))?
            .map_err(|e| LnurlError::Unreachable(format!("{host}: {e}")))?;
        for addr in addrs {
            if !is_public_ip(addr.ip()) {
                return Err(LnurlError::NotAllowed(format!("{host} resolves to a non-public address")));
            }
        }
        Ok(())
    }

    /// Scheme, credentials and host rules shared by the first URL and the callback.
    fn check_url(&self, url: &Url) -> Result<(), LnurlError> {
        let scheme = url.scheme();
        if scheme != "https" && scheme != "http" {
            return Err(LnurlError::Invalid(format!("scheme {scheme:?} (expected https)")));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(LnurlError::Invalid("credentials in the URL".into()));
        }
        let host = url.host_str().map(normalize_host).ok_or_else(|| LnurlError::Invalid("no host".into()))?;
        let onion = host.ends_with(".onion");
        if onion && self.opts.proxy.is_none() {
            return Err(LnurlError::NotAllowed(format!("{host}: .onion hosts need the Tor proxy")));
        }
        let local = is_local_host(&host);
        if local && !self.opts.allow_private_hosts {
            return Err(LnurlError::NotAllowed(format!("{host} is not a public host")));
        }
        if scheme == "http" && !onion && !local {
            return Err(LnurlError::Invalid(format!("{host}: plain http is only allowed for .onion hosts")));
        }
        Ok(())
    }

    /// LUD-16: `user@domain` → `https://domain/.well-known/lnurlp/user` (http for `.onion`, and
    /// for loopback/private hosts when those are allowed).
    fn address_url(&self, address: &str) -> Result<Url, LnurlError> {
        let (user, domain) = address.split_once('@').ok_or_else(|| LnurlError::Invalid("no @".into()))?;
        let user = user.to_ascii_lowercase();
        let user_ok = !user.is_empty()
            && user.len() <= 64
            && user.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'+'));
        if !user_ok {
            return Err(LnurlError::Invalid("the user part may only hold a-z 0-9 - _ . +".into()));
        }
        let domain_ok = !domain.is_empty()
            && domain.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b':' | b'[' | b']'));
        if !domain_ok {
            return Err(LnurlError::Invalid("malformed domain".into()));
        }
        let parsed =
            Url::parse(&format!("https://{domain}/")).map_err(|e| LnurlError::Invalid(format!("domain: {e}")))?;
        let host = parsed.host_str().map(normalize_host).ok_or_else(|| LnurlError::Invalid("no domain".into()))?;
        let plain = host.ends_with(".onion") || (self.opts.allow_private_hosts && is_local_host(&host));
        let scheme = if plain { "http" } else { "https" };
        let mut url =
            Url::parse(&format!("{scheme}://{domain}/")).map_err(|e| LnurlError::Invalid(format!("domain: {e}")))?;
        url.set_path(&format!("/.well-known/lnurlp/{user}"));
        Ok(url)
    }
}

/// For logs: the host only (`alice@example.com` → `example.com`), never the whole address.
pub fn destination_host(destination: &str) -> String {
    const INVALID: &str = "(invalid)";
    if destination.chars().count() > MAX_DESTINATION_CHARS {
        return INVALID.into();
    }
    let d = strip_lightning_prefix(destination.trim());
    let url = if is_bech32_lnurl(d) {
        decode_lnurl(d).ok()
    } else if d.contains("://") {
        Url::parse(d).ok()
    } else if let Some((_, domain)) = d.split_once('@') {
        // Only the characters an address may hold, so the URL parser cannot be steered.
        let clean = domain.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b':' | b'[' | b']'));
        clean.then(|| Url::parse(&format!("http://{domain}/")).ok()).flatten()
    } else {
        None
    };
    url.as_ref().and_then(Url::host_str).map(str::to_owned).unwrap_or_else(|| INVALID.into())
}

fn strip_lightning_prefix(s: &str) -> &str {
    match s.get(..10) {
        Some(p) if p.eq_ignore_ascii_case("lightning:") => &s[10..],
        _ => s,
    }
}

fn is_bech32_lnurl(s: &str) -> bool {
    s.get(..6).is_some_and(|p| p.eq_ignore_ascii_case("lnurl1"))
}

/// LUD-01: bech32 with hrp `lnurl` over the UTF-8 URL.
fn decode_lnurl(s: &str) -> Result<Url, LnurlError> {
    let (hrp, data) = bech32::decode(s).map_err(|e| LnurlError::Invalid(format!("bech32: {e}")))?;
    if hrp.to_lowercase() != "lnurl" {
        return Err(LnurlError::Invalid("bech32 prefix is not lnurl".into()));
    }
    let text = String::from_utf8(data).map_err(|_| LnurlError::Invalid("LNURL is not UTF-8".into()))?;
    Url::parse(text.trim()).map_err(|e| LnurlError::Invalid(format!("LNURL holds no URL: {e}")))
}

/// Lower case, without the brackets of an IPv6 literal and without a trailing root dot.
pub(crate) fn normalize_host(host: &str) -> String {
    host.trim_start_matches('[').trim_end_matches(']').trim_end_matches('.').to_ascii_lowercase()
}

fn is_localhost_name(host: &str) -> bool {
    host == "localhost" || host.ends_with(".localhost")
}

/// `localhost` or a literal IP that is not public (`host` normalised).
pub(crate) fn is_local_host(host: &str) -> bool {
    is_localhost_name(host) || host.parse::<IpAddr>().is_ok_and(|ip| !is_public_ip(ip))
}

/// Loopback destinations skip the proxy (a node on the same host is not reachable through Tor).
fn is_loopback_url(url: &Url) -> bool {
    let Some(host) = url.host_str().map(normalize_host) else { return false };
    is_localhost_name(&host)
        || match host.parse::<IpAddr>() {
            Ok(IpAddr::V4(v4)) => v4.is_loopback(),
            Ok(IpAddr::V6(v6)) => v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
            Err(_) => false,
        }
}

/// Whether `ip` is a globally routable unicast address we may connect to on a user's behalf.
fn is_public_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(a == 0 // "this network", incl. unspecified
        || a == 10
        || (a == 100 && (64..128).contains(&b)) // CGNAT 100.64/10
        || a == 127
        || (a == 169 && b == 254) // link-local
        || (a == 172 && (16..32).contains(&b))
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
        || (a == 192 && b == 168)
        || (a == 198 && (b == 18 || b == 19)) // benchmarking
        || a >= 224) // multicast, reserved, broadcast
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    if let Some(v4) = ip.to_ipv4_mapped() {
        return is_public_v4(v4);
    }
    // IPv4-compatible (deprecated, ::a.b.c.d) and NAT64 (64:ff9b::/96) carry an IPv4 address.
    if s[..6] == [0, 0, 0, 0, 0, 0] || s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        let v4 = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
        return !ip.is_unspecified() && !ip.is_loopback() && is_public_v4(v4);
    }
    if s[0] == 0x2002 {
        // 6to4 embeds the IPv4 address in segments 1 and 2.
        let v4 = Ipv4Addr::new((s[1] >> 8) as u8, s[1] as u8, (s[2] >> 8) as u8, s[2] as u8);
        return is_public_v4(v4);
    }
    !((s[0] & 0xfe00) == 0xfc00 // unique local fc00::/7
        || (s[0] & 0xffc0) == 0xfe80 // link-local fe80::/10
        || (s[0] & 0xffc0) == 0xfec0 // site-local (deprecated) fec0::/10
        || (s[0] & 0xff00) == 0xff00 // multicast
        || (s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1) // local-use NAT64 64:ff9b:1::/48
        || (s[0] == 0x2001 && s[1] == 0) // Teredo 2001::/32
        || (s[0] == 0x2001 && s[1] == 0xdb8)) // documentation
}

/// Marks a resolver refusal so it can be told apart from "could not reach" after reqwest wraps it.
#[derive(Debug)]
struct Blocked(String);

impl fmt::Display for Blocked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl StdError for Blocked {}

/// A resolver that keeps only public addresses (see `GuardedResolver`), for other clients that
/// contact hosts strangers named (discovered providers).
pub(crate) fn public_only_resolver() -> Arc<dyn Resolve> {
    Arc::new(GuardedResolver { allow_private: false, proxy_host: None })
}

/// Resolves with the system resolver and keeps only public addresses, so what is checked is
/// exactly what is connected to.
#[derive(Debug)]
struct GuardedResolver {
    allow_private: bool,
    /// The proxy's own host name, which may be local.
    proxy_host: Option<String>,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let host = normalize_host(name.as_str());
        let unfiltered = self.allow_private || self.proxy_host.as_deref() == Some(host.as_str());
        Box::pin(async move {
            if !unfiltered && is_localhost_name(&host) {
                return Err(
                    Box::new(Blocked(format!("{host} is not a public host"))) as Box<dyn StdError + Send + Sync>
                );
            }
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let kept: Vec<SocketAddr> = addrs.into_iter().filter(|a| unfiltered || is_public_ip(a.ip())).collect();
            if kept.is_empty() {
                return Err(Box::new(Blocked(format!("{host} resolves to no public address")))
                    as Box<dyn StdError + Send + Sync>);
            }
            Ok(Box::new(kept.into_iter()) as Addrs)
        })
    }
}

/// Classifies a reqwest error, without its URL (it would name the user).
fn map_reqwest(e: reqwest::Error) -> LnurlError {
    let e = e.without_url();
    let mut source: Option<&(dyn StdError + 'static)> = Some(&e);
    while let Some(s) = source {
        if let Some(b) = s.downcast_ref::<Blocked>() {
            return LnurlError::NotAllowed(b.0.clone());
        }
        source = s.source();
    }
    if e.is_timeout() {
        LnurlError::Unreachable("timed out".into())
    } else if e.is_decode() || e.is_body() {
        LnurlError::BadResponse(error_chain(&e))
    } else {
        LnurlError::Unreachable(error_chain(&e))
    }
}

fn error_chain(e: &(dyn StdError + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// The `reason` of an LNURL `{"status":"ERROR"}` answer.
fn lnurl_error_reason(v: &Value) -> Option<String> {
    let status = v.get("status")?.as_str()?;
    if !status.eq_ignore_ascii_case("ERROR") {
        return None;
    }
    Some(sanitize(v.get("reason").and_then(Value::as_str).unwrap_or("no reason given")))
}

/// Server text fit for an error message: no control characters, bounded length.
fn sanitize(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).take(MAX_REASON_CHARS).collect()
}

/// An msat amount; some servers send integral floats or digit strings.
fn msat_field(v: &Value, key: &str) -> Result<u64, LnurlError> {
    let field = v.get(key);
    let amount = match field {
        Some(Value::Number(n)) => n
            .as_u64()
            .or_else(|| n.as_f64().filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f < u64::MAX as f64).map(|f| f as u64)),
        Some(Value::String(s)) => s.trim().parse::<u64>().ok(),
        _ => None,
    };
    amount.ok_or_else(|| LnurlError::BadResponse(format!("missing or invalid {key}")))
}

/// The invoice must parse and be for exactly the amount asked.
fn check_invoice(pr: &str, amount_msat: u64) -> Result<(), LnurlError> {
    let invoice =
        Bolt11Invoice::from_str(pr).map_err(|e| LnurlError::BadResponse(format!("the invoice does not parse: {e}")))?;
    match invoice.amount_milli_satoshis() {
        Some(got) if got == amount_msat => Ok(()),
        Some(got) => Err(LnurlError::BadResponse(format!("the invoice is for {got} msat, not {amount_msat} msat"))),
        None => Err(LnurlError::BadResponse("the invoice has no amount".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bech32::{Bech32, Hrp};

    fn client(allow_private: bool, proxy: Option<&str>) -> LnurlClient {
        LnurlClient::new(LnurlOptions {
            allow_private_hosts: allow_private,
            proxy: proxy.map(str::to_owned),
            ..LnurlOptions::default()
        })
        .expect("client")
    }

    fn encode_lnurl(url: &str) -> String {
        bech32::encode::<Bech32>(Hrp::parse("lnurl").expect("hrp"), url.as_bytes()).expect("encode")
    }

    #[test]
    fn lightning_address() {
        let c = client(false, None);
        let url = c.resolve_url("alice@example.com").expect("address");
        assert_eq!(url.as_str(), "https://example.com/.well-known/lnurlp/alice");
        let url = c.resolve_url("  lightning:Alice@Example.COM ").expect("address, prefix, case");
        assert_eq!(url.as_str(), "https://example.com/.well-known/lnurlp/alice");
        let url = c.resolve_url("bob.smith+tips@pay.example.org:8443").expect("port");
        assert_eq!(url.as_str(), "https://pay.example.org:8443/.well-known/lnurlp/bob.smith+tips");
        for bad in ["@example.com", "alice@", "al ice@example.com", "alice@exa/mple.com", "alice@ex?ample.com", "a@b@c"]
        {
            assert!(matches!(c.resolve_url(bad), Err(LnurlError::Invalid(_))), "{bad}");
        }
        assert!(matches!(c.resolve_url("example.com"), Err(LnurlError::Invalid(_))));
        assert!(matches!(c.resolve_url(&format!("{}@example.com", "a".repeat(600))), Err(LnurlError::Invalid(_))));
    }

    #[test]
    fn private_addresses_need_permission() {
        let strict = client(false, None);
        for dest in ["alice@127.0.0.1:8080", "alice@localhost", "alice@[::1]:80", "alice@10.1.2.3", "alice@192.168.1.1"]
        {
            assert!(matches!(strict.resolve_url(dest), Err(LnurlError::NotAllowed(_))), "{dest}");
        }
        let lax = client(true, None);
        let url = lax.resolve_url("alice@127.0.0.1:8080").expect("allowed");
        assert_eq!(url.as_str(), "http://127.0.0.1:8080/.well-known/lnurlp/alice");
        let url = lax.resolve_url("alice@localhost:9000").expect("allowed");
        assert_eq!(url.as_str(), "http://localhost:9000/.well-known/lnurlp/alice");
        // A named host still gets https, even when private hosts are allowed.
        assert_eq!(lax.resolve_url("alice@example.com").expect("ok").scheme(), "https");
    }

    #[test]
    fn bech32_round_trip() {
        let c = client(false, None);
        let target = "https://service.example.com/api/v1/lnurl/pay/abc?q=1";
        let lnurl = encode_lnurl(target);
        assert!(lnurl.starts_with("lnurl1"));
        assert_eq!(c.resolve_url(&lnurl).expect("lower").as_str(), target);
        assert_eq!(c.resolve_url(&lnurl.to_uppercase()).expect("upper").as_str(), target);
        assert_eq!(c.resolve_url(&format!("lightning:{}", lnurl.to_uppercase())).expect("prefix").as_str(), target);
        assert_eq!(destination_host(&lnurl), "service.example.com");

        // Broken checksum, wrong hrp, an http:// or private URL inside.
        let mut broken = lnurl.clone();
        broken.pop();
        broken.push(if lnurl.ends_with('q') { 'p' } else { 'q' });
        assert!(matches!(c.resolve_url(&broken), Err(LnurlError::Invalid(_))));
        let other = bech32::encode::<Bech32>(Hrp::parse("lnurx").expect("hrp"), target.as_bytes()).expect("encode");
        assert!(matches!(c.resolve_url(&other), Err(LnurlError::Invalid(_))));
        assert!(matches!(c.resolve_url(&encode_lnurl("http://example.com/x")), Err(LnurlError::Invalid(_))));
        assert!(matches!(c.resolve_url(&encode_lnurl("https://127.0.0.1/x")), Err(LnurlError::NotAllowed(_))));
    }

    #[test]
    fn urls() {
        let c = client(false, None);
        let url = c.resolve_url("https://example.com/lnurlp/alice?x=1").expect("https");
        assert_eq!(url.as_str(), "https://example.com/lnurlp/alice?x=1");
        assert!(matches!(c.resolve_url("http://example.com/lnurlp/alice"), Err(LnurlError::Invalid(_))));
        assert!(matches!(c.resolve_url("ftp://example.com/x"), Err(LnurlError::Invalid(_))));
        assert!(matches!(c.resolve_url("https://user:pw@example.com/x"), Err(LnurlError::Invalid(_))));
        for dest in [
            "https://127.0.0.1/x",
            "https://2130706433/x", // 127.0.0.1 as one number: the URL parser normalises it
            "https://0x7f.1/x",
            "https://[::1]/x",
            "https://[::ffff:10.0.0.1]/x",
            "https://169.254.169.254/latest/meta-data",
            "https://100.64.0.1/x",
            "https://[fd00::1]/x",
            "https://[fe80::1]/x",
            "https://0.0.0.0/x",
            "https://224.0.0.1/x",
            "https://localhost/x",
            "https://foo.localhost./x",
        ] {
            assert!(matches!(c.resolve_url(dest), Err(LnurlError::NotAllowed(_))), "{dest}");
        }
        let lax = client(true, None);
        assert!(lax.resolve_url("http://127.0.0.1:3000/x").is_ok());
        assert!(matches!(lax.resolve_url("http://example.com/x"), Err(LnurlError::Invalid(_))));
    }

    #[test]
    fn onion_needs_proxy() {
        let onion = "alice@2gzyxa5ihm7nsggfxnu52rck2vv4rvmdlkiu3zzui5du4xyclen53wid.onion";
        assert!(matches!(client(false, None).resolve_url(onion), Err(LnurlError::NotAllowed(_))));
        let url = client(false, Some("http://127.0.0.1:9080")).resolve_url(onion).expect("via proxy");
        assert_eq!(url.scheme(), "http");
        assert_eq!(url.path(), "/.well-known/lnurlp/alice");
    }

    #[test]
    fn host_for_logs() {
        assert_eq!(destination_host("alice@example.com"), "example.com");
        assert_eq!(destination_host("lightning:alice@Example.com:8080"), "example.com");
        assert_eq!(destination_host("alice@127.0.0.1:8080"), "127.0.0.1");
        assert_eq!(destination_host("https://pay.example.com/lnurlp/alice?x=1"), "pay.example.com");
        assert_eq!(destination_host("alice@[::1]:80"), "[::1]");
        assert_eq!(destination_host("garbage"), "(invalid)");
        assert_eq!(destination_host("alice@exa/mple.com"), "(invalid)");
        assert_eq!(destination_host("lnurl1notvalid"), "(invalid)");
        assert_eq!(destination_host(""), "(invalid)");
    }

    #[test]
    fn ip_filter() {
        let public = ["1.1.1.1", "8.8.8.8", "172.32.0.1", "100.128.0.1", "2606:4700::1111", "2a00:1450::1"];
        for ip in public {
            assert!(is_public_ip(ip.parse().expect("ip")), "{ip}");
        }
        let private = [
            "0.0.0.0",
            "0.1.2.3",
            "10.0.0.1",
            "100.64.0.1",
            "100.127.255.255",
            "127.0.0.1",
            "127.255.0.1",
            "169.254.169.254",
            "172.16.0.1",
            "172.31.255.255",
            "192.0.0.8",
            "192.168.0.1",
            "198.18.0.1",
            "224.0.0.1",
            "240.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "::ffff:127.0.0.1",
            "::ffff:192.168.1.1",
            "::127.0.0.1",
            "64:ff9b::a00:1",
            "2002:c0a8:0101::1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "fec0::1",
            "ff02::1",
            "2001:db8::1",
        ];
        for ip in private {
            assert!(!is_public_ip(ip.parse().expect("ip")), "{ip}");
        }
        assert!(is_public_ip("::ffff:8.8.8.8".parse().expect("ip")));
        assert!(is_public_ip("64:ff9b::808:808".parse().expect("ip")));
    }

    #[test]
    fn invoice_check_and_pay_params() {
        assert!(matches!(check_invoice("lnbc1notaninvoice", 1000), Err(LnurlError::BadResponse(_))));
        let c = client(false, None);
        let ok = serde_json::json!({
            "tag": "payRequest", "callback": "https://example.com/cb?k=v",
            "minSendable": 1000, "maxSendable": "2000", "metadata": "[]", "commentAllowed": 32
        });
        let p = c.parse_pay_params(&ok).expect("params");
        assert_eq!((p.min_sendable_msat, p.max_sendable_msat, p.comment_allowed), (1000, 2000, 32));
        assert_eq!(p.callback.as_str(), "https://example.com/cb?k=v");
        let private = serde_json::json!({
            "tag": "payRequest", "callback": "https://10.0.0.1/cb", "minSendable": 1, "maxSendable": 2
        });
        assert!(matches!(c.parse_pay_params(&private), Err(LnurlError::NotAllowed(_))));
        let http = serde_json::json!({
            "tag": "payRequest", "callback": "http://example.com/cb", "minSendable": 1, "maxSendable": 2
        });
        assert!(matches!(c.parse_pay_params(&http), Err(LnurlError::BadResponse(_))));
        let wrong_tag = serde_json::json!({"tag": "withdrawRequest"});
        assert!(matches!(c.parse_pay_params(&wrong_tag), Err(LnurlError::BadResponse(_))));
        let err = serde_json::json!({"status": "ERROR", "reason": "no such user\n"});
        assert_eq!(lnurl_error_reason(&err).as_deref(), Some("no such user"));
    }

    #[tokio::test]
    async fn a_user_host_is_not_resolved_outside_the_proxy() {
        // Without a proxy the name is looked up (and this one does not exist); through the
        // proxy (Tor) it is left to the proxy: no lookup on the system's resolver.
        let direct = client(false, None);
        assert!(matches!(direct.check_user_host("https://nonexistent.invalid").await, Err(LnurlError::Unreachable(_))));
        let through_tor = client(false, Some("http://127.0.0.1:1"));
        assert!(through_tor.check_user_host("https://nonexistent.invalid").await.is_ok());
        assert!(matches!(through_tor.check_user_host("https://10.0.0.1").await, Err(LnurlError::NotAllowed(_))));
    }

    #[tokio::test]
    async fn resolver_refuses_local_names() {
        // `localhost` is refused by name; reaching it through the client shows up as NotAllowed,
        // which proves the refusal survives reqwest's error wrapping.
        let c = client(false, None);
        let url = Url::parse("https://localhost:1/x").expect("url");
        assert!(matches!(c.get_json(url).await, Err(LnurlError::NotAllowed(_))));
        let r = GuardedResolver { allow_private: false, proxy_host: None };
        assert!(r.resolve(Name::from_str("localhost").expect("name")).await.is_err());
        let r = GuardedResolver { allow_private: false, proxy_host: Some("localhost".into()) };
        assert!(r.resolve(Name::from_str("localhost").expect("name")).await.is_ok());
    }
}
