//! The operator's side: the dashboard (`/admin`), its JSON API (`/admin/api/…`) and `/metrics`.
//!
//! Served to loopback clients on clearnet (plus `ADMIN_ALLOW_IPS`), and on the onion side only
//! with `ADMIN_ONION`; everyone else gets the same 404 as an unknown path. A clearnet request
//! that carries proxy headers (`X-Forwarded-For`, `Forwarded`, `X-Real-IP`) is not treated as
//! loopback: behind a reverse proxy on the same host every client would look local.

mod api;
pub mod auth;
pub mod logs;
pub mod metrics;

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};

use crate::config::Settings;
use crate::error::ApiError;
use crate::http::{self, Body};
use crate::node::Node;
use crate::server::{ClientIp, Origin};

pub use metrics::{Metrics, ModelSlot};

/// The admin side's state, one per node.
pub struct Admin {
    pub auth: auth::Auth,
    pub metrics: Metrics,
    /// Withdrawals and credits from earnings run one at a time: two at once could each see the
    /// same earnings.
    pub(crate) earnings_lock: tokio::sync::Mutex<()>,
}

impl Admin {
    /// Loads (or creates) the password hash and the sessions in `DATA_DIR`.
    pub fn open(settings: &Settings) -> Result<Admin, String> {
        Ok(Admin {
            auth: auth::Auth::open(settings)?,
            metrics: Metrics::default(),
            earnings_lock: tokio::sync::Mutex::new(()),
        })
    }
}

/// Whether `path` belongs to the admin side (routed here by the API).
pub fn is_admin_path(path: &str) -> bool {
    path == "/metrics" || path == "/admin" || path.starts_with("/admin/")
}

const PROXY_HEADERS: &[&str] = &["x-forwarded-for", "forwarded", "x-real-ip", "x-forwarded-host"];

/// Who may see the admin side at all.
fn allowed(settings: &Settings, req: &Request<Incoming>) -> bool {
    match req.extensions().get::<Origin>() {
        Some(Origin::Onion) => settings.admin_onion,
        Some(Origin::Clearnet) => {
            let Some(ClientIp(ip)) = req.extensions().get::<ClientIp>() else { return false };
            let local = ip.is_loopback() || ip.to_canonical().is_loopback();
            let listed = settings.admin_allow_ips.iter().any(|a| a.to_canonical() == ip.to_canonical());
            let proxied = PROXY_HEADERS.iter().any(|h| req.headers().contains_key(*h));
            (local && !proxied) || listed
        }
        None => false,
    }
}

/// Every `/admin…` and `/metrics` request.
pub async fn handle(node: &Arc<Node>, req: Request<Incoming>, request_id: &str) -> Result<Response<Body>, ApiError> {
    let path = req.uri().path().to_owned();
    if !allowed(&node.settings, &req) {
        return Err(ApiError::NotFound(path));
    }
    let method = req.method().clone();
    match (&method, path.as_str()) {
        (&Method::GET, "/metrics") => Ok(metrics::render(node).await),
        (_, "/metrics") => Err(ApiError::MethodNotAllowed),
        (&Method::GET, "/admin" | "/admin/") => Ok(asset(INDEX_HTML, "text/html; charset=utf-8")),
        (&Method::GET, "/admin/app.js") => Ok(asset(APP_JS, "text/javascript; charset=utf-8")),
        (&Method::GET, "/admin/app.css") => Ok(asset(APP_CSS, "text/css; charset=utf-8")),
        (_, p) if p.starts_with("/admin/api/") => {
            let rest = p.trim_start_matches("/admin/api/").trim_end_matches('/').to_owned();
            let mut resp = api::handle(node, req, &rest, request_id).await?;
            resp.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
            Ok(resp)
        }
        _ => Err(ApiError::NotFound(path)),
    }
}

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");

/// An embedded asset, with a policy that allows nothing from elsewhere.
fn asset(body: &'static str, content_type: &'static str) -> Response<Body> {
    let mut resp = Response::new(http::full(body));
    *resp.status_mut() = StatusCode::OK;
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        "content-security-policy",
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
        ),
    );
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}
