//! Upstreams: where requests go, with their keys, models, aliases and markup, and their health.
//!
//! An upstreams file (TOML) can list several; the `UPSTREAM_BASE_URL`/`UPSTREAM_API_KEY` pair
//! adds one more. An upstream that keeps failing cools down for a while and is skipped.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hyper::header::HeaderValue;
use serde::Deserialize;

use crate::pricing::Markup;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamConfigError {
    #[error("cannot read upstreams file {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("invalid upstreams file {path}: {reason}")]
    Parse { path: String, reason: String },
    #[error("upstream '{name}': {reason}")]
    Invalid { name: String, reason: String },
}

/// One `[[upstream]]` entry of the upstreams file.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSpec {
    pub name: String,
    pub base_url: String,
    #[serde(default)]
    pub api_key: Option<String>,
    /// Read the key from this environment variable instead of the file.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Only these models (upstream ids); empty means every model the upstream lists.
    #[serde(default)]
    pub models: Vec<String>,
    /// Public name → upstream model id.
    #[serde(default)]
    pub aliases: HashMap<String, String>,
    /// Price multiplier, e.g. 1.1 for +10 %.
    #[serde(default = "one")]
    pub markup: f64,
}

fn one() -> f64 {
    1.0
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpstreamsFile {
    #[serde(default, rename = "upstream")]
    upstreams: Vec<UpstreamSpec>,
}

pub fn load_file(path: &Path) -> Result<Vec<UpstreamSpec>, UpstreamConfigError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| UpstreamConfigError::Read { path: shown.clone(), reason: e.to_string() })?;
    let file: UpstreamsFile =
        toml::from_str(&text).map_err(|e| UpstreamConfigError::Parse { path: shown, reason: e.to_string() })?;
    Ok(file.upstreams)
}

impl std::fmt::Debug for UpstreamSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamSpec")
            .field("name", &self.name)
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream").field("name", &self.name).field("base_url", &self.base_url).finish_non_exhaustive()
    }
}

/// A configured upstream and its health.
pub struct Upstream {
    pub name: String,
    /// Base URL without a trailing slash, usually ending in `/v1`.
    pub base_url: String,
    pub api_key: Option<String>,
    /// The `Authorization` of every request to it, built once: `Bearer {api_key}`, or without
    /// a key the `Basic` credentials given in `base_url` (`http://user:password@host/v1`, as
    /// reqwest sends a URL's credentials). Marked sensitive.
    pub authorization: Option<HeaderValue>,
    /// `x-api-key: {api_key}`, sent besides on Anthropic's `messages` path.
    pub x_api_key: Option<HeaderValue>,
    /// The `Host` of every request to it, built once, as hyper's client would build it for
    /// each: the host, and the port unless it is the scheme's default.
    pub host: Option<HeaderValue>,
    pub models: Vec<String>,
    pub aliases: HashMap<String, String>,
    pub markup: Markup,
    consecutive_failures: AtomicU32,
    cooldown_until_ms: AtomicU64,
    /// `uri_for` of each of `COMMON_PATHS`, parsed at first use.
    common_uris: [OnceLock<Option<hyper::Uri>>; COMMON_PATHS.len()],
}

/// A header value holding a credential: kept out of debug output (and HTTP/2's index).
fn sensitive(value: &str) -> Option<HeaderValue> {
    let mut value = HeaderValue::from_str(value).ok()?;
    value.set_sensitive(true);
    Some(value)
}

/// `Host` for requests to `url` (see `Upstream::host`); `None` leaves it to the client.
fn host_header(url: &reqwest::Url) -> Option<HeaderValue> {
    // The requests' own URIs are parsed from the same normalised URL (`uri_for`).
    let uri = hyper::Uri::try_from(url.as_str()).ok()?;
    let host = uri.host()?;
    let text = match (uri.port_u16(), uri.scheme_str()) {
        (None, _) | (Some(80), Some("http")) | (Some(443), Some("https")) => host.to_owned(),
        (Some(port), _) => format!("{host}:{port}"),
    };
    HeaderValue::from_str(&text).ok()
}

/// The paths nearly every request goes to: their URLs are parsed once, not per request.
const COMMON_PATHS: [&str; 5] = ["chat/completions", "completions", "embeddings", "responses", "messages"];

impl Upstream {
    /// `extra_markup` (EXCHANGE_FEE) is applied on top of the upstream's own markup.
    pub fn from_spec(spec: UpstreamSpec, extra_markup: Markup) -> Result<Upstream, UpstreamConfigError> {
        let invalid =
            |reason: &str| UpstreamConfigError::Invalid { name: spec.name.clone(), reason: reason.to_owned() };
        let url = reqwest::Url::parse(&spec.base_url).map_err(|e| invalid(&format!("base_url: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(invalid("base_url must be http(s)"));
        }
        let markup = Markup::from_factor(spec.markup).ok_or_else(|| invalid("markup must be between 1.0 and 100"))?;
        let api_key = match (&spec.api_key, &spec.api_key_env) {
            (Some(k), _) => Some(k.clone()),
            (None, Some(var)) => {
                Some(std::env::var(var).map_err(|_| invalid(&format!("environment variable {var} is not set")))?)
            }
            (None, None) => None,
        };
        let url_credentials = match (url.username(), url.password()) {
            ("", None) => None,
            (user, password) => {
                use base64::Engine as _;
                let decode = |s: &str| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned();
                let pair = format!("{}:{}", decode(user), decode(password.unwrap_or_default()));
                let encoded = base64::engine::general_purpose::STANDARD.encode(pair);
                Some(sensitive(&format!("Basic {encoded}")).ok_or_else(|| invalid("base_url: credentials"))?)
            }
        };
        let not_a_header = || invalid("api_key: not a valid HTTP header value");
        let (authorization, x_api_key) = match &api_key {
            Some(key) => (
                Some(sensitive(&format!("Bearer {key}")).ok_or_else(not_a_header)?),
                Some(sensitive(key).ok_or_else(not_a_header)?),
            ),
            None => (url_credentials, None),
        };
        Ok(Upstream {
            base_url: spec.base_url.trim_end_matches('/').to_owned(),
            api_key,
            authorization,
            x_api_key,
            host: host_header(&url),
            models: spec.models,
            aliases: spec.aliases,
            markup: markup.then(extra_markup),
            name: spec.name,
            consecutive_failures: AtomicU32::new(0),
            cooldown_until_ms: AtomicU64::new(0),
            common_uris: Default::default(),
        })
    }

    /// `{base}/{path}` where `path` is what follows `/v1/` in the client's request (see
    /// `stays_under_base`).
    pub fn url_for(&self, path: &str, query: Option<&str>) -> String {
        let mut url = format!("{}/{}", self.base_url, path.trim_start_matches('/'));
        if let Some(q) = query {
            url.push('?');
            url.push_str(q);
        }
        url
    }

    /// `url_for` as a request URI (its query made valid the way a browser would); `None` when
    /// it cannot be one. Parsed once for the common paths.
    pub fn uri_for(&self, path: &str, query: Option<&str>) -> Option<hyper::Uri> {
        let parse = || {
            if !stays_under_base(path) {
                return None;
            }
            let url = reqwest::Url::parse(&self.url_for(path, query)).ok()?;
            hyper::Uri::try_from(url.as_str()).ok()
        };
        match COMMON_PATHS.iter().position(|p| *p == path).filter(|_| query.is_none()) {
            Some(i) => self.common_uris[i].get_or_init(parse).clone(),
            None => parse(),
        }
    }

    pub fn is_cooling_down(&self) -> bool {
        self.cooldown_until_ms.load(Ordering::Relaxed) > now_ms()
    }

    pub fn record_success(&self) {
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
    }

    /// Counts a failure; after `threshold` in a row the upstream cools down for `cooldown`.
    pub fn record_failure(&self, threshold: u32, cooldown: Duration) {
        let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures >= threshold.max(1) {
            self.cooldown_until_ms.store(now_ms() + cooldown.as_millis() as u64, Ordering::Relaxed);
            self.consecutive_failures.store(0, Ordering::Relaxed);
            tracing::warn!(upstream = %self.name, cooldown_secs = cooldown.as_secs(), "upstream keeps failing; cooling down");
        }
    }

    pub fn health(&self) -> serde_json::Value {
        serde_json::json!({
            "name": self.name,
            "cooling_down": self.is_cooling_down(),
            "consecutive_failures": self.consecutive_failures.load(Ordering::Relaxed),
        })
    }
}

/// Whether a client's path, joined to an upstream's base URL, stays under it. URL parsers resolve
/// `.` and `..` segments (percent-encoded ones too) and read `\\` as `/`, so `/v1/../admin` would
/// reach the upstream's `/admin` with the operator's credentials; some servers decode `%2F` and
/// `%5C` before they resolve, so those count as separators here too.
pub fn stays_under_base(path: &str) -> bool {
    // The common case, checked without allocating: nothing that could make a dot segment.
    if !path.bytes().any(|b| matches!(b, b'.' | b'%' | b'\\')) {
        return true;
    }
    let lower = path.to_ascii_lowercase();
    let unfolded = lower.replace("%2e", ".").replace("%2f", "/").replace("%5c", "/").replace('\\', "/");
    !unfolded.split('/').any(|segment| segment == "." || segment == "..")
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(markup: f64) -> UpstreamSpec {
        UpstreamSpec {
            name: "u".into(),
            base_url: "http://127.0.0.1:9/v1/".into(),
            api_key: None,
            api_key_env: None,
            models: vec![],
            aliases: HashMap::new(),
            markup,
        }
    }

    #[test]
    fn parses_file_format() {
        let text = r#"
            [[upstream]]
            name = "a"
            base_url = "https://api.example.com/v1"
            api_key = "k"
            markup = 1.2
            models = ["m1"]
            [upstream.aliases]
            fast = "m1"

            [[upstream]]
            name = "b"
            base_url = "http://127.0.0.1:1234/v1"
        "#;
        let file: UpstreamsFile = toml::from_str(text).unwrap();
        assert_eq!(file.upstreams.len(), 2);
        assert_eq!(file.upstreams[0].aliases["fast"], "m1");
        assert_eq!(file.upstreams[1].markup, 1.0);
        assert!(toml::from_str::<UpstreamsFile>("[[upstream]]\nname='x'\nbase_url='http://a'\nbogus=1").is_err());
    }

    #[test]
    fn urls_and_markup() {
        let u = Upstream::from_spec(spec(1.1), Markup::NONE).unwrap();
        assert_eq!(u.url_for("/chat/completions", None), "http://127.0.0.1:9/v1/chat/completions");
        assert_eq!(u.url_for("models", Some("a=b")), "http://127.0.0.1:9/v1/models?a=b");
        assert_eq!(u.markup, Markup(11_000));
        // The common paths' URIs are parsed once, and are the same URLs; so are the others.
        for _ in 0..2 {
            let uri = u.uri_for("chat/completions", None).expect("a common path");
            assert_eq!(uri.to_string(), u.url_for("chat/completions", None));
        }
        assert_eq!(u.uri_for("models", Some("a=b")).unwrap().to_string(), "http://127.0.0.1:9/v1/models?a=b");
        // A query a browser would send is made a valid URI, not refused.
        assert_eq!(u.uri_for("models", Some("q=a b")).unwrap().to_string(), "http://127.0.0.1:9/v1/models?q=a%20b");
        for escape in
            ["../admin", "chat/../../x", "%2e%2E/x", ".%2e/x", "./x/..", "..\\x", "x%5C..%5Cy", "..%2Fx", ".."]
        {
            assert!(!stays_under_base(escape), "{escape}");
            assert_eq!(u.uri_for(escape, None), None, "{escape}");
        }
        for fine in ["chat/completions", "files/a..b", "x/...", "models/gpt-4.1", "models/org%2Fmodel", ""] {
            assert!(stays_under_base(fine), "{fine}");
        }
        assert!(Upstream::from_spec(spec(0.9), Markup::NONE).is_err());
    }

    #[test]
    fn credentials_in_the_url_become_basic_auth() {
        let mut with = spec(1.0);
        with.base_url = "http://user:p%40ss@127.0.0.1:9/v1".into();
        let u = Upstream::from_spec(with, Markup::NONE).unwrap();
        // base64("user:p@ss"): decoded, as reqwest sends a URL's credentials.
        assert_eq!(u.authorization.as_ref().unwrap().to_str().unwrap(), "Basic dXNlcjpwQHNz");
        assert!(u.authorization.as_ref().unwrap().is_sensitive() && u.x_api_key.is_none());
        assert!(Upstream::from_spec(spec(1.0), Markup::NONE).unwrap().authorization.is_none());
    }

    #[test]
    fn an_api_key_is_sent_as_bearer_and_x_api_key_over_url_credentials() {
        let mut with = spec(1.0);
        with.base_url = "http://user:pass@127.0.0.1:9/v1".into();
        with.api_key = Some("sk-upstream".into());
        let u = Upstream::from_spec(with.clone(), Markup::NONE).unwrap();
        assert_eq!(u.authorization.as_ref().unwrap().to_str().unwrap(), "Bearer sk-upstream");
        assert_eq!(u.x_api_key.as_ref().unwrap().to_str().unwrap(), "sk-upstream");
        assert!(u.authorization.unwrap().is_sensitive() && u.x_api_key.unwrap().is_sensitive());
        // A key no header can carry is a configuration error, not a request sent without it.
        with.api_key = Some("sk-\nline".into());
        let err = Upstream::from_spec(with, Markup::NONE).err().unwrap().to_string();
        assert!(err.contains("api_key"), "{err}");
    }

    #[test]
    fn the_host_header_is_what_the_client_would_write() {
        for (base_url, host) in [
            ("http://127.0.0.1:9/v1", "127.0.0.1:9"),
            ("https://api.example.com/v1", "api.example.com"),
            ("https://api.example.com:443/v1", "api.example.com"),
            ("http://example.com:80", "example.com"),
            ("http://example.com:443/v1", "example.com:443"),
            ("https://user:pw@Example.COM:8443/v1", "example.com:8443"),
            ("http://[::1]:8080/v1", "[::1]:8080"),
        ] {
            let mut with = spec(1.0);
            with.base_url = base_url.into();
            let u = Upstream::from_spec(with, Markup::NONE).unwrap();
            assert_eq!(u.host.as_ref().map(|h| h.to_str().unwrap()), Some(host), "{base_url}");
            // The same as hyper's client derives from the request's URI.
            let uri = u.uri_for("chat/completions", None).unwrap();
            let port =
                uri.port_u16().filter(|p| !matches!((p, uri.scheme_str()), (80, Some("http")) | (443, Some("https"))));
            let derived = port.map_or(uri.host().unwrap().to_owned(), |p| format!("{}:{p}", uri.host().unwrap()));
            assert_eq!(derived, host, "{base_url}");
        }
    }

    #[test]
    fn cools_down_after_threshold() {
        let u = Upstream::from_spec(spec(1.0), Markup::NONE).unwrap();
        u.record_failure(2, Duration::from_secs(60));
        assert!(!u.is_cooling_down());
        u.record_failure(2, Duration::from_secs(60));
        assert!(u.is_cooling_down());
    }
}
