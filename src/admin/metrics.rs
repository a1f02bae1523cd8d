//! `/metrics` in the Prometheus text format (0.0.4), and the in-memory request counters the
//! dashboard's charts and request log use. Nothing here is a secret or about one user: labels
//! are models, statuses, mints and upstream names; money is summed over all keys.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Response, StatusCode};
use serde::Serialize;

use crate::http::{self, Body};
use crate::ledger::now_secs;
use crate::node::Node;

/// Upper bounds of the latency histogram, in seconds.
pub const LATENCY_BUCKETS: [f64; 12] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
/// Distinct models counted by name; more are counted as `other` (clients choose model names).
const MAX_MODELS: usize = 200;
const RECENT: usize = 1000;
const HOURS_KEPT: usize = 7 * 24;

/// Where the proxy writes the model of a request, so the API can label its metrics.
#[derive(Debug, Clone, Default)]
pub struct ModelSlot(Arc<OnceLock<String>>);

impl ModelSlot {
    pub fn set(&self, model: &str) {
        let _ = self.0.set(model.to_owned());
    }

    pub fn get(&self) -> Option<&str> {
        self.0.get().map(String::as_str)
    }
}

/// One request as the dashboard's request log shows it.
#[derive(Debug, Clone, Serialize)]
pub struct RequestRecord {
    pub request_id: String,
    pub at: i64,
    pub path: String,
    pub model: String,
    pub status: u16,
    pub latency_ms: u64,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct HourCount {
    pub start: i64,
    pub requests: u64,
    pub errors: u64,
}

#[derive(Default)]
struct Inner {
    /// Requests by model label, then by status.
    requests: BTreeMap<String, BTreeMap<u16, u64>>,
    latency: [u64; LATENCY_BUCKETS.len()],
    latency_sum: f64,
    latency_count: u64,
    recent: VecDeque<RequestRecord>,
    hours: VecDeque<HourCount>,
}

pub struct Metrics {
    started: Instant,
    inner: Mutex<Inner>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics { started: Instant::now(), inner: Mutex::default() }
    }
}

impl Metrics {
    /// Counts one model request: its status and the time to its response head.
    pub fn record(&self, request_id: &str, path: &str, model: &str, status: u16, latency: Duration) {
        let Ok(mut inner) = self.inner.lock() else { return };
        let label = if model.is_empty() {
            "none"
        } else if inner.requests.contains_key(model) || inner.requests.len() < MAX_MODELS {
            model
        } else {
            "other"
        };
        match inner.requests.get_mut(label) {
            Some(by_status) => *by_status.entry(status).or_default() += 1,
            None => {
                inner.requests.insert(label.to_owned(), BTreeMap::from([(status, 1)]));
            }
        }
        let secs = latency.as_secs_f64();
        for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
            if secs <= *bound {
                inner.latency[i] += 1;
            }
        }
        inner.latency_sum += secs;
        inner.latency_count += 1;
        let now = now_secs();
        let hour = now - now.rem_euclid(3600);
        if inner.hours.back().is_none_or(|h| h.start != hour) {
            inner.hours.push_back(HourCount { start: hour, ..Default::default() });
            while inner.hours.len() > HOURS_KEPT {
                inner.hours.pop_front();
            }
        }
        if let Some(h) = inner.hours.back_mut() {
            h.requests += 1;
            h.errors += u64::from(status >= 400);
        }
        inner.recent.push_back(RequestRecord {
            request_id: request_id.to_owned(),
            at: now,
            path: path.to_owned(),
            model: label.to_owned(),
            status,
            latency_ms: latency.as_millis() as u64,
        });
        while inner.recent.len() > RECENT {
            inner.recent.pop_front();
        }
    }

    /// Latest requests, newest first.
    pub fn recent(&self, limit: usize) -> Vec<RequestRecord> {
        self.inner.lock().map(|i| i.recent.iter().rev().take(limit).cloned().collect()).unwrap_or_default()
    }

    pub fn find(&self, request_id: &str) -> Option<RequestRecord> {
        self.inner.lock().ok()?.recent.iter().rev().find(|r| r.request_id == request_id).cloned()
    }

    /// Requests and errors per hour since start.
    pub fn hours(&self) -> Vec<HourCount> {
        self.inner.lock().map(|i| i.hours.iter().copied().collect()).unwrap_or_default()
    }

    /// (requests, errors) since start.
    pub fn counts(&self) -> (u64, u64) {
        self.inner
            .lock()
            .map(|i| {
                i.requests
                    .values()
                    .flatten()
                    .fold((0, 0), |(n, e), (status, c)| (n + c, e + if *status >= 400 { *c } else { 0 }))
            })
            .unwrap_or_default()
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }
}

/// A label value, escaped as the text format wants.
fn label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// `GET /metrics`.
pub async fn render(node: &Arc<Node>) -> Response<Body> {
    let mut out = String::with_capacity(4096);
    let m = &node.admin.metrics;

    family(&mut out, "routstr_build_info", "gauge", "Version of this node.");
    let _ = writeln!(out, "routstr_build_info{{version=\"{}\"}} 1", label(env!("CARGO_PKG_VERSION")));
    family(&mut out, "routstr_uptime_seconds", "gauge", "Seconds since the node started.");
    let _ = writeln!(out, "routstr_uptime_seconds {:.3}", m.uptime().as_secs_f64());

    {
        let inner = m.inner.lock().unwrap_or_else(|e| e.into_inner());
        family(&mut out, "routstr_requests_total", "counter", "Model requests by model and HTTP status, since start.");
        for (model, by_status) in &inner.requests {
            for (status, count) in by_status {
                let _ =
                    writeln!(out, "routstr_requests_total{{model=\"{}\",status=\"{status}\"}} {count}", label(model));
            }
        }
        family(
            &mut out,
            "routstr_request_duration_seconds",
            "histogram",
            "Time from a model request's arrival to its response head (streams: first byte), since start.",
        );
        for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
            let _ = writeln!(out, "routstr_request_duration_seconds_bucket{{le=\"{bound}\"}} {}", inner.latency[i]);
        }
        let _ = writeln!(out, "routstr_request_duration_seconds_bucket{{le=\"+Inf\"}} {}", inner.latency_count);
        let _ = writeln!(out, "routstr_request_duration_seconds_sum {:.6}", inner.latency_sum);
        let _ = writeln!(out, "routstr_request_duration_seconds_count {}", inner.latency_count);
    }

    if let Ok(models) = node.ledger().admin_model_totals().await {
        family(
            &mut out,
            "routstr_charged_msat_total",
            "counter",
            "Msat charged for ended requests, by model (ledger).",
        );
        for t in &models {
            let _ = writeln!(out, "routstr_charged_msat_total{{model=\"{}\"}} {}", label(&t.model), t.charged_msat);
        }
        family(
            &mut out,
            "routstr_settled_requests_total",
            "counter",
            "Paid requests that ended, by model and outcome (charged, or released: nothing charged) (ledger).",
        );
        for t in &models {
            let model = label(&t.model);
            let _ =
                writeln!(out, "routstr_settled_requests_total{{model=\"{model}\",outcome=\"charged\"}} {}", t.charged);
            let _ = writeln!(
                out,
                "routstr_settled_requests_total{{model=\"{model}\",outcome=\"released\"}} {}",
                t.released
            );
        }
    }
    let totals = node.ledger().totals().await.ok();
    if let Some(t) = &totals {
        family(&mut out, "routstr_reservations_open", "gauge", "Requests running with a reservation.");
        let _ = writeln!(out, "routstr_reservations_open {}", t.open_reservations);
        family(&mut out, "routstr_reserved_msat", "gauge", "Msat reserved by running requests, all keys together.");
        let _ = writeln!(out, "routstr_reserved_msat {}", t.reserved_msat);
        family(&mut out, "routstr_user_balances_msat", "gauge", "Users' balances (liabilities), all keys together.");
        let _ = writeln!(out, "routstr_user_balances_msat {}", t.balances_msat);
        family(&mut out, "routstr_pending_redemptions", "gauge", "Token redemptions waiting for their mint.");
        let _ = writeln!(out, "routstr_pending_redemptions {}", t.pending_redemptions);
    }
    if let Ok(balances) = node.wallet().balances().await {
        family(
            &mut out,
            "routstr_wallet_balance_msat",
            "gauge",
            "Spendable proofs in the node's wallet, per mint and unit.",
        );
        for b in &balances {
            let _ = writeln!(
                out,
                "routstr_wallet_balance_msat{{mint=\"{}\",unit=\"{}\"}} {}",
                label(&b.mint_url),
                label(&b.unit),
                b.balance_msat
            );
        }
        family(&mut out, "routstr_wallet_pending_msat", "gauge", "Proofs in flight at each mint.");
        for b in &balances {
            let _ = writeln!(
                out,
                "routstr_wallet_pending_msat{{mint=\"{}\",unit=\"{}\"}} {}",
                label(&b.mint_url),
                label(&b.unit),
                b.pending_msat
            );
        }
        if let Some(t) = &totals {
            let held: u64 = balances.iter().map(|b| b.balance_msat).sum();
            family(&mut out, "routstr_operator_earnings_msat", "gauge", "Wallet minus users' balances.");
            let _ = writeln!(out, "routstr_operator_earnings_msat {}", t.earnings_msat(held));
        }
    }

    family(&mut out, "routstr_upstream_up", "gauge", "1 when the upstream is not cooling down after failures.");
    for u in node.upstreams().iter() {
        let _ =
            writeln!(out, "routstr_upstream_up{{upstream=\"{}\"}} {}", label(&u.name), u8::from(!u.is_cooling_down()));
    }
    family(&mut out, "routstr_upstream_consecutive_failures", "gauge", "Failures in a row of each upstream.");
    for u in node.upstreams().iter() {
        let failures = u.health().get("consecutive_failures").and_then(serde_json::Value::as_u64).unwrap_or(0);
        let _ = writeln!(out, "routstr_upstream_consecutive_failures{{upstream=\"{}\"}} {failures}", label(&u.name));
    }
    family(&mut out, "routstr_models", "gauge", "Models in the catalog.");
    let _ = writeln!(out, "routstr_models {}", node.catalog().len());
    family(&mut out, "routstr_nostr_providers", "gauge", "Providers discovered on Nostr.");
    let _ = writeln!(out, "routstr_nostr_providers {}", node.nostr.registry.len());
    if let Some(tor) = &node.tor {
        let status = tor.status();
        family(&mut out, "routstr_tor_bootstrap_percent", "gauge", "Tor bootstrap progress.");
        let _ = writeln!(out, "routstr_tor_bootstrap_percent {}", status.bootstrap_percent);
        family(&mut out, "routstr_onion_reachable", "gauge", "1 when the onion service is reachable.");
        let reachable = serde_json::to_value(status.state).ok().and_then(|v| v.as_str().map(|s| s == "reachable"));
        let _ = writeln!(out, "routstr_onion_reachable {}", u8::from(reachable.unwrap_or(false)));
    }

    let mut resp = Response::new(http::full(out));
    *resp.status_mut() = StatusCode::OK;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_and_caps_models() {
        let m = Metrics::default();
        m.record("req-1", "chat/completions", "gpt", 200, Duration::from_millis(30));
        m.record("req-2", "chat/completions", "", 402, Duration::from_millis(1));
        assert_eq!(m.counts(), (2, 1));
        assert_eq!(m.recent(10)[0].request_id, "req-2");
        assert_eq!(m.find("req-1").unwrap().model, "gpt");
        {
            // Cumulative buckets: both are within 50 ms, one within 5 ms.
            let inner = m.inner.lock().unwrap();
            assert_eq!(inner.latency[LATENCY_BUCKETS.iter().position(|b| *b == 0.05).unwrap()], 2);
            assert_eq!(inner.latency[0], 1);
        }
        for i in 0..MAX_MODELS + 5 {
            m.record("r", "chat/completions", &format!("m{i}"), 404, Duration::ZERO);
        }
        let inner = m.inner.lock().unwrap();
        // `gpt` and `none` came first, so the last 7 names are counted as `other`.
        assert_eq!(inner.requests["other"][&404], 7);
        assert_eq!(inner.requests.len(), MAX_MODELS + 1, "at most MAX_MODELS names, then `other`");
    }

    #[test]
    fn escapes_labels() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
