//! The latest log lines that name a request (`request_id = …`), kept in memory so the dashboard
//! can show a request's log. They are the same lines the node writes to stderr (which never
//! carry tokens or keys); nothing is written to disk.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::Mutex;

use serde::Serialize;
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::Context;
use tracing_subscriber::Layer;

const KEPT: usize = 5000;

#[derive(Debug, Clone, Serialize)]
pub struct LogLine {
    pub at: i64,
    pub level: String,
    pub target: String,
    pub request_id: String,
    pub message: String,
}

static LINES: Mutex<VecDeque<LogLine>> = Mutex::new(VecDeque::new());

/// The lines logged for `request_id`, oldest first.
pub fn for_request(request_id: &str) -> Vec<LogLine> {
    LINES.lock().map(|l| l.iter().filter(|line| line.request_id == request_id).cloned().collect()).unwrap_or_default()
}

/// A tracing layer keeping events that carry a `request_id` field.
pub struct CaptureLayer;

#[derive(Default)]
struct Fields {
    request_id: Option<String>,
    message: String,
    rest: String,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "request_id" => self.request_id = Some(value.to_owned()),
            "message" => self.message = value.to_owned(),
            name => {
                let _ = write!(self.rest, " {name}={value}");
            }
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "request_id" => self.request_id = Some(format!("{value:?}").trim_matches('"').to_owned()),
            "message" => self.message = format!("{value:?}"),
            name => {
                let _ = write!(self.rest, " {name}={value:?}");
            }
        }
    }
}

impl<S: tracing::Subscriber> Layer<S> for CaptureLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let Some(request_id) = fields.request_id else { return };
        let meta = event.metadata();
        let line = LogLine {
            at: crate::ledger::now_secs(),
            level: meta.level().to_string(),
            target: meta.target().to_owned(),
            request_id,
            message: format!("{}{}", fields.message, fields.rest),
        };
        if let Ok(mut lines) = LINES.lock() {
            lines.push_back(line);
            while lines.len() > KEPT {
                lines.pop_front();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::prelude::*;

    #[test]
    fn keeps_lines_with_a_request_id() {
        let subscriber = tracing_subscriber::registry().with(CaptureLayer);
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(request_id = "req-abc", upstream = "u1", "upstream failed");
            tracing::info!("no request here");
        });
        let lines = for_request("req-abc");
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].message, "upstream failed upstream=u1");
        assert_eq!(lines[0].level, "WARN");
    }
}
