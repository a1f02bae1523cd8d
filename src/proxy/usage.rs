//! Reading usage from upstream answers: JSON bodies and Server-Sent Event streams, in the OpenAI
//! (chat, completions, embeddings, Responses) and Anthropic shapes. Pure, no I/O.
//!
//! When an answer carries no usage it is still not free: `estimate` charges the prompt at one
//! token per 4 request bytes and the completion at one token per streamed event (or per 4
//! characters of JSON content), and only when output actually reached the client.

use bytes::{BufMut, Bytes, BytesMut};
use serde_json::{json, Value};

use crate::pricing::{Cost, Usage};

/// What normalising a usage object reads of it: whether it names a member, and members as
/// counts (0 unless a whole number that fits a u64, as `Value::as_u64` reads it).
trait UsageObject {
    fn has(&self, name: &str) -> bool;
    fn count(&self, name: &str) -> u64;
    /// `self[outer][name]` as a count.
    fn nested_count(&self, outer: &str, name: &str) -> u64;
}

impl UsageObject for serde_json::Map<String, Value> {
    fn has(&self, name: &str) -> bool {
        self.contains_key(name)
    }
    fn count(&self, name: &str) -> u64 {
        self.get(name).and_then(Value::as_u64).unwrap_or(0)
    }
    fn nested_count(&self, outer: &str, name: &str) -> u64 {
        self.get(outer).and_then(|o| o.get(name)).and_then(Value::as_u64).unwrap_or(0)
    }
}

/// Normalises a usage object; `None` when it holds no token counts.
pub fn from_usage_object(u: &Value) -> Option<Usage> {
    usage_of(u.as_object()?)
}

fn usage_of(u: &impl UsageObject) -> Option<Usage> {
    if u.has("prompt_tokens") || u.has("completion_tokens") {
        // OpenAI chat/completions/embeddings: prompt_tokens includes cached tokens.
        let prompt = u.count("prompt_tokens");
        let cached = u.nested_count("prompt_tokens_details", "cached_tokens").min(prompt);
        return Some(Usage {
            input_tokens: prompt - cached,
            output_tokens: u.count("completion_tokens"),
            cache_read_tokens: cached,
            cache_write_tokens: 0,
        });
    }
    if u.has("input_tokens") || u.has("output_tokens") {
        if u.has("total_tokens") || u.has("input_tokens_details") {
            // OpenAI Responses: input_tokens includes cached tokens.
            let input = u.count("input_tokens");
            let cached = u.nested_count("input_tokens_details", "cached_tokens").min(input);
            return Some(Usage {
                input_tokens: input - cached,
                output_tokens: u.count("output_tokens"),
                cache_read_tokens: cached,
                cache_write_tokens: 0,
            });
        }
        // Anthropic: input_tokens excludes cache reads and writes.
        return Some(Usage {
            input_tokens: u.count("input_tokens"),
            output_tokens: u.count("output_tokens"),
            cache_read_tokens: u.count("cache_read_input_tokens"),
            cache_write_tokens: u.count("cache_creation_input_tokens"),
        });
    }
    None
}

const USAGE_PATHS: [&str; 3] = ["/usage", "/message/usage", "/response/usage"];

/// The usage object of an answer or event, wherever its shape keeps it.
pub fn find_usage(v: &Value) -> Option<Usage> {
    USAGE_PATHS.iter().filter_map(|p| v.pointer(p)).find_map(from_usage_object)
}

fn find_usage_mut(v: &mut Value) -> Option<&mut Value> {
    let path = USAGE_PATHS.iter().find(|p| v.pointer(p).is_some_and(|u| from_usage_object(u).is_some()))?;
    v.pointer_mut(path)
}

/// Counts reported in parts (Anthropic's input in `message_start`, output in `message_delta`;
/// cumulative repeats elsewhere): the largest of each.
pub fn merge(a: Usage, b: Usage) -> Usage {
    Usage {
        input_tokens: a.input_tokens.max(b.input_tokens),
        output_tokens: a.output_tokens.max(b.output_tokens),
        cache_read_tokens: a.cache_read_tokens.max(b.cache_read_tokens),
        cache_write_tokens: a.cache_write_tokens.max(b.cache_write_tokens),
    }
}

/// The usage-less estimate (see the module docs).
pub fn estimate(request_body_len: usize, output_tokens: u64) -> Usage {
    Usage { input_tokens: (request_body_len as u64).div_ceil(4), output_tokens, ..Usage::default() }
}

/// The `usage.cost` object clients see: the cost's parts, and the total in USD when a rate is
/// known. One shape for every path (`cost_json` builds it as a `Value`, `TopUsage::with_cost`
/// writes it as text).
pub struct CostView<'a> {
    cost: &'a Cost,
    total_usd: Option<f64>,
}

/// `Cost`'s members, then `total_usd`: written out rather than `#[serde(flatten)]`, which goes
/// through a map and costs more than the rest of writing it, on every paid answer.
impl serde::Serialize for CostView<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct as _;
        let Cost { base_msats, input_msats, output_msats, rounding_msats, total_msats } = *self.cost;
        let mut out = serializer.serialize_struct("CostView", 6)?;
        out.serialize_field("base_msats", &base_msats)?;
        out.serialize_field("input_msats", &input_msats)?;
        out.serialize_field("output_msats", &output_msats)?;
        if rounding_msats != 0 {
            out.serialize_field("rounding_msats", &rounding_msats)?;
        }
        out.serialize_field("total_msats", &total_msats)?;
        if let Some(usd) = self.total_usd {
            out.serialize_field("total_usd", &usd)?;
        }
        out.end()
    }
}

impl<'a> CostView<'a> {
    pub fn new(cost: &'a Cost, usd: Option<f64>) -> CostView<'a> {
        CostView { cost, total_usd: usd }
    }
}

pub fn cost_json(cost: &Cost, usd: Option<f64>) -> Value {
    serde_json::to_value(CostView::new(cost, usd)).unwrap_or_else(|_| json!({ "total_msats": cost.total_msats }))
}

/// Adds `cost` into an answer's usage object (creating `usage` when there is none).
pub fn insert_cost(v: &mut Value, cost: Value) {
    if let Some(usage) = find_usage_mut(v) {
        usage["cost"] = cost;
    } else if let Some(obj) = v.as_object_mut() {
        obj.insert("usage".into(), json!({ "cost": cost }));
    }
}

/// An answer whose usage sits at the top (`{…, "usage": {…}, …}`, every shape's whole answer),
/// read without building the whole answer: the fast path for metering and costing it.
pub struct TopUsage {
    pub usage: Usage,
    /// Where the usage object's text is in the answer.
    span: std::ops::Range<usize>,
    /// The usage object, read whole when the cost cannot be written into its text: it names a
    /// member twice (its text is not what was read, where the last one counts) or has a `cost`
    /// of its own (another node's, upstream, to be replaced). It is then rebuilt.
    rebuild: Option<Value>,
}

/// A JSON object's members as they are in its text, in order (a name with an escape is
/// refused, leaving the answer to the slow path).
struct RawMembers<'a>(Vec<(&'a str, &'a str)>);

impl<'a> RawMembers<'a> {
    fn read(object: &'a str) -> Option<RawMembers<'a>> {
        let (mut members, mut refused) = (Vec::with_capacity(8), false);
        super::json_scan::members(object.as_bytes(), |name, value| {
            // The scan's spans start and end at ASCII bytes (quotes, structure, literals).
            match (name.escaped, object.get(name.text), object.get(value)) {
                (false, Some(name), Some(value)) => members.push((name, value)),
                _ => refused = true,
            }
        })
        .ok()?;
        (!refused).then_some(RawMembers(members))
    }
}

impl RawMembers<'_> {
    /// The member `name` counts as (the last, as in a parsed object).
    fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().rev().find(|(n, _)| *n == name).map(|(_, v)| *v)
    }

    fn repeats_a_name(&self) -> bool {
        // Pairwise for the usual handful of members; a set for an answer with many.
        if self.0.len() <= 16 {
            return self.0.iter().enumerate().any(|(i, (name, _))| self.0[..i].iter().any(|(n, _)| n == name));
        }
        let mut seen = std::collections::HashSet::with_capacity(self.0.len());
        !self.0.iter().all(|(name, _)| seen.insert(name))
    }
}

impl UsageObject for RawMembers<'_> {
    fn has(&self, name: &str) -> bool {
        self.get(name).is_some()
    }
    fn count(&self, name: &str) -> u64 {
        // JSON's text of a whole number is what `u64` parses (a fraction, exponent, sign or
        // overflow is not a count, as for `Value::as_u64`).
        self.get(name).and_then(|v| v.parse().ok()).unwrap_or(0)
    }
    fn nested_count(&self, outer: &str, name: &str) -> u64 {
        let outer = self.get(outer).and_then(|v| serde_json::from_str::<Value>(v).ok());
        outer.and_then(|o| o.get(name).and_then(Value::as_u64)).unwrap_or(0)
    }
}

impl TopUsage {
    /// `None` unless `body` is a JSON object with one top-level `usage` object holding token
    /// counts; the caller then reads it through `Value` (`find_usage`), which agrees with this
    /// whenever both can read the answer. This one reads a little more: the fields it skips are
    /// checked for syntax only (not for valid UTF-8 in strings, unpaired surrogates, number
    /// range or nesting depth), so such an answer is charged by the usage it reports rather than
    /// estimated, and passed on as it came.
    pub fn read(body: &[u8]) -> Option<TopUsage> {
        // Checks the whole answer's syntax, skipping everything but `usage` (a repeated `usage`
        // leaves the answer to the slow path).
        let span = super::json_scan::top_member(body, "usage").ok()??;
        let raw = std::str::from_utf8(&body[span.clone()]).ok()?;
        let members = RawMembers::read(raw)?;
        let usage = usage_of(&members)?;
        // Read here, not when the cost is added: one that cannot be read is left to the slow path.
        let rebuild =
            if members.repeats_a_name() || members.has("cost") { Some(serde_json::from_str(raw).ok()?) } else { None };
        Some(TopUsage { usage, span, rebuild })
    }

    /// The answer with `cost` in its usage object, the rest of its text unchanged. The cost is
    /// written into the object's text before its closing brace (the object has token counts, so
    /// a member comes before it), unless the object must be rebuilt (see `rebuild`).
    pub fn with_cost(self, body: &[u8], cost: &CostView) -> Bytes {
        let span = self.span.clone();
        if self.rebuild.is_none() && span.end.checked_sub(1).and_then(|i| body.get(i)) == Some(&b'}') {
            let mut out = BytesMut::with_capacity(body.len() + 160);
            out.extend_from_slice(&body[..span.end - 1]);
            out.extend_from_slice(b",\"cost\":");
            if serde_json::to_writer((&mut out).writer(), cost).is_ok() {
                out.extend_from_slice(&body[span.end - 1..]);
                return out.freeze();
            }
        }
        let mut object =
            self.rebuild.unwrap_or_else(|| serde_json::from_slice(&body[span.clone()]).unwrap_or_default());
        object["cost"] = serde_json::to_value(cost).unwrap_or(Value::Null);
        let usage = serde_json::to_vec(&object).unwrap_or_default();
        let mut out = BytesMut::with_capacity(body.len() + usage.len());
        out.extend_from_slice(&body[..span.start]);
        out.extend_from_slice(&usage);
        out.extend_from_slice(&body[span.end..]);
        out.freeze()
    }
}

/// Rough output tokens of a JSON answer without usage: its generated text / 4.
pub fn json_output_estimate(v: &Value) -> u64 {
    fn text_len(v: &Value) -> usize {
        match v {
            Value::String(s) => s.len(),
            Value::Array(a) => a.iter().map(text_len).sum(),
            Value::Object(o) => ["content", "text", "message", "output", "arguments"]
                .iter()
                .filter_map(|k| o.get(*k))
                .map(text_len)
                .sum(),
            _ => 0,
        }
    }
    let len: usize = ["choices", "content", "output", "data"].iter().filter_map(|k| v.get(*k)).map(text_len).sum();
    (len as u64).div_ceil(4)
}

/// Largest SSE event held back until it is whole. A longer one (or a stream that never ends an
/// event) passes on in pieces of this size, so one stream cannot grow without bound; such a
/// piece is not read for usage.
pub const MAX_EVENT_BYTES: usize = 4 << 20;

/// Splits a byte stream into whole SSE events (each with its blank-line terminator).
#[derive(Default)]
pub struct SseSplitter {
    partial: BytesMut,
    /// How far into `partial` no terminator starts: a long event is scanned once, not again
    /// with every chunk.
    scanned: usize,
}

/// The end of the first event that ends at or after `from` (a terminator starting there).
fn event_end(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while i + 1 < buf.len() {
        if buf[i] == b'\n' {
            if buf[i + 1] == b'\n' {
                return Some(i + 2);
            }
            if buf[i + 1] == b'\r' && buf.get(i + 2) == Some(&b'\n') {
                return Some(i + 3);
            }
        }
        i += 1;
    }
    None
}

impl SseSplitter {
    /// Whole events completed by this chunk. Without a partial event pending, they are slices of
    /// the chunk itself (no copy).
    pub fn push(&mut self, chunk: Bytes, out: &mut Vec<Bytes>) {
        if self.partial.is_empty() {
            let mut rest = chunk;
            while let Some(end) = event_end(&rest, 0) {
                out.push(rest.split_to(end));
            }
            if !rest.is_empty() {
                self.partial.extend_from_slice(&rest);
                self.scanned = self.partial.len().saturating_sub(2);
            }
        } else {
            self.partial.extend_from_slice(&chunk);
            while let Some(end) = event_end(&self.partial, self.scanned) {
                out.push(self.partial.split_to(end).freeze());
                self.scanned = 0;
            }
            // A terminator may start in the last two bytes and end in the next chunk.
            self.scanned = self.partial.len().saturating_sub(2);
        }
        if self.partial.len() > MAX_EVENT_BYTES {
            out.push(self.partial.split().freeze());
            self.scanned = 0;
        }
    }

    /// Whatever is left when the stream ends (an unterminated last event).
    pub fn finish(&mut self) -> Option<Bytes> {
        self.scanned = 0;
        if self.partial.is_empty() {
            None
        } else {
            Some(std::mem::take(&mut self.partial).freeze())
        }
    }
}

/// What one SSE event means for metering.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct EventInfo {
    /// `data: [DONE]` (OpenAI) or an Anthropic `message_stop`: the stream's last event.
    pub terminal: bool,
    pub usage: Option<Usage>,
}

fn data_payload(event: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(event).ok()?;
    let mut data: Option<String> = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("data:") {
            let rest = rest.strip_prefix(' ').unwrap_or(rest);
            match &mut data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(rest);
                }
                None => data = Some(rest.to_owned()),
            }
        }
    }
    data
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Inspects an event, parsing JSON only when it may hold usage or a stop.
pub fn inspect_event(event: &[u8]) -> EventInfo {
    // Chat chunks carry `"usage":null` on every event: only an object is worth parsing.
    let may_have_usage = contains(event, b"\"usage\":{") || contains(event, b"\"usage\": {");
    let may_stop = contains(event, b"[DONE]") || contains(event, b"message_stop");
    if !may_have_usage && !may_stop {
        return EventInfo::default();
    }
    let Some(data) = data_payload(event) else { return EventInfo::default() };
    if data.trim() == "[DONE]" {
        return EventInfo { terminal: true, usage: None };
    }
    let Ok(v) = serde_json::from_str::<Value>(&data) else { return EventInfo::default() };
    EventInfo { terminal: v.get("type").and_then(Value::as_str) == Some("message_stop"), usage: find_usage(&v) }
}

/// The JSON of an event's data, if it has any.
pub fn event_json(event: &[u8]) -> Option<Value> {
    serde_json::from_str(&data_payload(event)?).ok()
}

/// The event with `cost` added to its usage; the `event:` line is kept.
pub fn event_with_cost(event: &[u8], cost: Value) -> Option<Bytes> {
    let data = data_payload(event)?;
    let mut v: Value = serde_json::from_str(&data).ok()?;
    insert_cost(&mut v, cost);
    let text = std::str::from_utf8(event).ok()?;
    let mut out = String::with_capacity(data.len() + 128);
    for line in text.lines().filter(|l| l.starts_with("event:")) {
        out.push_str(line);
        out.push('\n');
    }
    out.push_str("data: ");
    out.push_str(&serde_json::to_string(&v).ok()?);
    out.push_str("\n\n");
    Some(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_usage_with_cache() {
        let v = json!({"usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120,
                                  "prompt_tokens_details": {"cached_tokens": 30}}});
        assert_eq!(
            find_usage(&v),
            Some(Usage { input_tokens: 70, output_tokens: 20, cache_read_tokens: 30, cache_write_tokens: 0 })
        );
    }

    #[test]
    fn anthropic_and_responses_usage() {
        let a = json!({"type": "message", "usage": {"input_tokens": 10, "output_tokens": 5,
                        "cache_read_input_tokens": 3, "cache_creation_input_tokens": 2}});
        assert_eq!(
            find_usage(&a),
            Some(Usage { input_tokens: 10, output_tokens: 5, cache_read_tokens: 3, cache_write_tokens: 2 })
        );
        let start = json!({"type": "message_start", "message": {"usage": {"input_tokens": 25, "output_tokens": 1}}});
        let delta = json!({"type": "message_delta", "usage": {"output_tokens": 15}});
        let merged = merge(find_usage(&start).unwrap(), find_usage(&delta).unwrap());
        assert_eq!((merged.input_tokens, merged.output_tokens), (25, 15));
        let r = json!({"type": "response.completed", "response": {"usage": {"input_tokens": 9, "output_tokens": 4, "total_tokens": 13,
                        "input_tokens_details": {"cached_tokens": 4}}}});
        assert_eq!(
            find_usage(&r),
            Some(Usage { input_tokens: 5, output_tokens: 4, cache_read_tokens: 4, cache_write_tokens: 0 })
        );
        assert_eq!(find_usage(&json!({"usage": null})), None);
    }

    #[test]
    fn splits_events_across_chunks() {
        let mut s = SseSplitter::default();
        let mut out = Vec::new();
        s.push(Bytes::from_static(b"data: a\n\ndata: b"), &mut out);
        assert_eq!(out, vec![Bytes::from_static(b"data: a\n\n")]);
        s.push(Bytes::from_static(b"\n\nevent: x\r\ndata: c\r\n\r\n"), &mut out);
        assert_eq!(out.len(), 3);
        assert_eq!(out[1], Bytes::from_static(b"data: b\n\n"));
        assert_eq!(s.finish(), None);
        s.push(Bytes::from_static(b"data: tail"), &mut out);
        assert_eq!(s.finish(), Some(Bytes::from_static(b"data: tail")));
    }

    #[test]
    fn repeated_member_names_are_found_in_small_and_large_objects() {
        let object = |names: &[String]| {
            let members: Vec<String> = names.iter().map(|n| format!("\"{n}\":1")).collect();
            format!("{{{}}}", members.join(","))
        };
        for size in [3, 40] {
            let mut names: Vec<String> = (0..size).map(|i| format!("m{i}")).collect();
            let text = object(&names);
            assert!(!RawMembers::read(&text).unwrap().repeats_a_name(), "{size}");
            names.push("m1".into());
            let text = object(&names);
            assert!(RawMembers::read(&text).unwrap().repeats_a_name(), "{size}");
        }
    }

    #[test]
    fn a_terminator_split_over_chunks_byte_by_byte_is_found() {
        let stream = b"data: one\n\nevent: two\r\ndata: 2\r\n\r\ndata: three\n\n";
        let (mut s, mut out) = (SseSplitter::default(), Vec::new());
        for byte in stream {
            s.push(Bytes::copy_from_slice(&[*byte]), &mut out);
        }
        let events: Vec<&[u8]> = out.iter().map(|b| b.as_ref()).collect();
        assert_eq!(events, vec![&b"data: one\n\n"[..], b"event: two\r\ndata: 2\r\n\r\n", b"data: three\n\n"]);
        assert_eq!(s.finish(), None);
    }

    #[test]
    fn an_event_that_never_ends_passes_on_in_bounded_pieces() {
        let (mut s, mut out) = (SseSplitter::default(), Vec::new());
        let chunk = Bytes::from(vec![b'x'; 16 * 1024]);
        let mut pushed = 0;
        while pushed < 3 * MAX_EVENT_BYTES {
            s.push(chunk.clone(), &mut out);
            pushed += chunk.len();
            assert!(s.partial.len() <= MAX_EVENT_BYTES);
        }
        let passed: usize = out.iter().map(Bytes::len).sum::<usize>() + s.finish().map_or(0, |b| b.len());
        assert_eq!(passed, pushed);
        assert!(out.len() >= 2 && out.iter().all(|piece| piece.len() <= MAX_EVENT_BYTES + chunk.len()));
        // After a piece, whole events split as before.
        s.push(Bytes::from_static(b"data: a\n\n"), &mut out);
        assert_eq!(out.last().map(|b| b.as_ref()), Some(&b"data: a\n\n"[..]));
    }

    #[test]
    fn inspects_and_rewrites_events() {
        assert!(inspect_event(b"data: [DONE]\n\n").terminal);
        assert_eq!(inspect_event(b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n"), EventInfo::default());
        assert_eq!(inspect_event(b"data: {\"usage\":null,\"choices\":[]}\n\n").usage, None);
        let ev = b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2}}\n\n";
        assert_eq!(inspect_event(ev).usage.map(|u| u.output_tokens), Some(2));
        let stop = b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
        assert!(inspect_event(stop).terminal);

        let with = event_with_cost(
            b"event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":4}}\n\n",
            json!({"total_msats": 7}),
        )
        .unwrap();
        let text = std::str::from_utf8(&with).unwrap();
        assert!(text.starts_with("event: message_delta\ndata: "));
        assert!(text.contains("\"cost\":{\"total_msats\":7}"));
    }

    #[test]
    fn top_level_usage_fast_path_agrees_with_the_value_path() {
        let parts = Cost::new(34, 0, 1200);
        let view = CostView::new(&parts, Some(0.5));
        let cost = cost_json(&parts, Some(0.5));
        let answers = [
            r#"{"id":"x","choices":[{"message":{"content":"h\u00e9llo \"usage\": {}"}}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 4}}}"#,
            r#"  {"type":"message","usage":{"input_tokens":3,"output_tokens":7,"cache_read_input_tokens":2},"content":[]} "#,
            r#"{"usage":{"input_tokens":8,"output_tokens":1,"total_tokens":9,"cost":{"old":true}},"output":[]}"#,
            // Counts only from whole numbers that fit, as `Value::as_u64` reads them; details of
            // another shape count nothing; the last of a repeated name counts.
            r#"{"usage":{"prompt_tokens":10.0,"completion_tokens":-5,"prompt_tokens_details":[1]}}"#,
            r#"{"usage":{"prompt_tokens":"7","completion_tokens":1e3,"prompt_tokens_details":null}}"#,
            r#"{"usage":{"prompt_tokens":18446744073709551616,"completion_tokens":18446744073709551615}}"#,
            r#"{"usage":{"input_tokens":5,"input_tokens_details":{"cached_tokens":9},"input_tokens":6}}"#,
            r#"{"usage":{"input_tokens":4,"output_tokens":2,"cache_read_input_tokens":1,"cache_creation_input_tokens":3}}"#,
        ];
        for answer in answers {
            let fast = TopUsage::read(answer.as_bytes()).expect("fast path");
            let mut slow: Value = serde_json::from_str(answer).unwrap();
            assert_eq!(Some(fast.usage), find_usage(&slow));
            let rewritten: Value = serde_json::from_slice(&fast.with_cost(answer.as_bytes(), &view)).unwrap();
            insert_cost(&mut slow, cost.clone());
            assert_eq!(rewritten, slow);
        }
        // Written into the text: the rest of the answer, and the usage's own members, are
        // passed on byte for byte.
        let answer = r#"{"usage": {"total_tokens": 3, "prompt_tokens": 1, "completion_tokens": 2} , "id": "x"}"#;
        let rewritten = TopUsage::read(answer.as_bytes()).unwrap().with_cost(answer.as_bytes(), &view);
        assert_eq!(
            std::str::from_utf8(&rewritten).unwrap(),
            r#"{"usage": {"total_tokens": 3, "prompt_tokens": 1, "completion_tokens": 2,"cost":{"base_msats":34,"input_msats":0,"output_msats":1200,"total_msats":1234,"total_usd":0.5}} , "id": "x"}"#
        );
        // A usage naming a count twice is charged by the last, and only that one is passed on.
        let answer = r#"{"usage":{"prompt_tokens":1,"completion_tokens":2,"prompt_tokens":9}}"#;
        let fast = TopUsage::read(answer.as_bytes()).unwrap();
        assert_eq!(fast.usage.input_tokens, 9);
        let rewritten = fast.with_cost(answer.as_bytes(), &view);
        let text = std::str::from_utf8(&rewritten).unwrap();
        assert_eq!(text.matches("prompt_tokens").count(), 1, "{text}");
        assert_eq!(serde_json::from_str::<Value>(text).unwrap()["usage"]["prompt_tokens"], 9);
        // Not for the fast path: no usage at the top, usage without counts, a repeated usage,
        // an array, broken JSON. The Value path handles them (or refuses them) as before.
        for answer in [
            r#"{"message":{"usage":{"input_tokens":1}}}"#,
            r#"{"usage":null,"message":{"usage":{"input_tokens":1}}}"#,
            r#"{"usage":{}}"#,
            r#"{"usage":{"prompt_tokens":1},"usage":{"prompt_tokens":2}}"#,
            // To be rebuilt, but not readable whole (a number out of range).
            r#"{"usage":{"prompt_tokens":1,"x":1e400,"prompt_tokens":2}}"#,
            r#"[{"prompt_tokens":1}]"#,
            r#"{"usage":{"prompt_tokens":1}"#,
            "",
        ] {
            assert!(TopUsage::read(answer.as_bytes()).is_none(), "{answer}");
        }
    }

    #[test]
    fn the_cost_view_is_the_cost_and_its_usd() {
        for cost in [Cost::new(34, 0, 1200), Cost { rounding_msats: 7, ..Cost::new(1, 2, 3) }] {
            let mut expected = serde_json::to_value(cost).unwrap();
            assert_eq!(serde_json::to_value(CostView::new(&cost, None)).unwrap(), expected);
            expected["total_usd"] = json!(0.25);
            assert_eq!(serde_json::to_value(CostView::new(&cost, Some(0.25))).unwrap(), expected);
        }
        // In `Cost`'s order, as before.
        let text = serde_json::to_string(&CostView::new(&Cost::new(1, 2, 3), Some(0.5))).unwrap();
        assert_eq!(text, r#"{"base_msats":1,"input_msats":2,"output_msats":3,"total_msats":6,"total_usd":0.5}"#);
    }

    #[test]
    fn estimates_without_usage() {
        assert_eq!(estimate(401, 7), Usage { input_tokens: 101, output_tokens: 7, ..Usage::default() });
        let v = json!({"choices": [{"message": {"role": "assistant", "content": "12345678"}}]});
        assert_eq!(json_output_estimate(&v), 2);
        let mut v2 = json!({"id": "x"});
        insert_cost(&mut v2, json!({"total_msats": 1}));
        assert_eq!(v2["usage"]["cost"]["total_msats"], 1);
    }
}
