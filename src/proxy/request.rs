//! The few fields of a request body the node reads (model, stream, limits), parsed without
//! building the rest: a chat request is mostly `messages`, which is checked for syntax and
//! skipped, not turned into a tree of maps and strings. A body the node rewrites (a model alias,
//! usage asked for on a stream) is parsed whole as well; one it passes on unchanged may hold what
//! only a whole parse refuses (a lone surrogate escape, a number beyond `f64`, nesting deeper
//! than 128): that is the upstream's to judge, and a refusal there charges nothing.

use std::fmt;
use std::sync::LazyLock;

use memchr::memmem::Finder;

use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::Value;

/// Most completions one request may ask for (`n`, `best_of`), so a reservation stays bounded.
pub const MAX_CHOICES: u64 = 128;

/// Input tokens reserved for each image, file or audio part a request has: a URL or file id is a
/// few bytes of the body, but the upstream bills what it points to (a large image is ≈ 1,100–1,600
/// tokens at the common providers; inline data is counted by its bytes as well).
pub const ATTACHMENT_TOKENS: u64 = 1_600;

/// The content-part types (`"type": …`) of the OpenAI and Anthropic APIs that stand for content
/// billed by what it points to, not by its bytes in the body.
const ATTACHMENT_TYPES: [&[u8]; 7] =
    [b"image_url", b"input_image", b"image", b"input_file", b"file", b"document", b"input_audio"];

/// How many image, file and audio parts a JSON body has: each `"type"` member whose value is one
/// of `ATTACHMENT_TYPES`. A `"type"` inside a string is escaped there (`\"type\"`), so only
/// members count. A body with `\u` escapes (which could spell a key or value another way) is
/// parsed and walked instead.
pub fn attachments(body: &[u8]) -> u64 {
    // Built once: a searcher's set-up costs more than searching a short body.
    static ESCAPE: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\\u"));
    static TYPE_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"type\""));
    if ESCAPE.find(body).is_some() {
        return serde_json::from_slice::<Value>(body).map_or(0, |v| attachments_in(&v));
    }
    let mut count = 0;
    for at in TYPE_KEY.find_iter(body) {
        let rest = &body[at + 6..];
        let Some(value) = skip_space(rest).strip_prefix(b":").map(skip_space) else { continue };
        let Some(value) = value.strip_prefix(b"\"") else { continue };
        if ATTACHMENT_TYPES.iter().any(|t| value.strip_prefix(*t).is_some_and(|end| end.first() == Some(&b'"'))) {
            count += 1;
        }
    }
    count
}

fn attachments_in(value: &Value) -> u64 {
    match value {
        Value::Object(members) => {
            let own =
                members.get("type").and_then(Value::as_str).is_some_and(|t| ATTACHMENT_TYPES.contains(&t.as_bytes()));
            u64::from(own) + members.values().map(attachments_in).sum::<u64>()
        }
        Value::Array(items) => items.iter().map(attachments_in).sum(),
        _ => 0,
    }
}

fn skip_space(s: &[u8]) -> &[u8] {
    s.iter().position(|b| !b.is_ascii_whitespace()).map_or(&[][..], |i| &s[i..])
}

/// What the node reads from a JSON request body. A field of an unexpected type counts as absent
/// (as the upstream would judge it, not us); a repeated field counts as its last value.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RequestFields {
    pub model: Option<String>,
    pub stream: bool,
    /// `stream_options.include_usage`.
    pub include_usage: Option<bool>,
    n: Option<u64>,
    best_of: Option<u64>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    max_output_tokens: Option<u64>,
}

/// Why a body is not a request the node can read.
#[derive(Debug)]
pub enum BodyError {
    /// Valid JSON, but not an object.
    NotAnObject,
    /// Not JSON at all: why.
    Invalid(String),
}

impl RequestFields {
    pub fn parse(body: &[u8]) -> Result<RequestFields, BodyError> {
        // Skipped strings are not checked for UTF-8 by the parser: the whole body is, here.
        if let Err(e) = std::str::from_utf8(body) {
            return Err(BodyError::Invalid(format!("not UTF-8 ({e})")));
        }
        if let Some(fields) = Self::scan(body) {
            return Ok(fields);
        }
        serde_json::from_slice(body).map_err(|e| {
            // A type error at the top means valid JSON of another kind, unless the rest of it is
            // not JSON either: tell which (only on this error path is the body read twice).
            if e.is_data() && serde_json::from_slice::<IgnoredAny>(body).is_ok() {
                BodyError::NotAnObject
            } else {
                BodyError::Invalid(e.to_string())
            }
        })
    }

    /// The common case, faster: the body's syntax checked by a scan, and only the members read
    /// parsed, as the parse (`Deserialize` below) parses them. `None` leaves the body to that
    /// parse: a syntax error (whose message it gives), a name with an escape, a value it refuses.
    fn scan(body: &[u8]) -> Option<RequestFields> {
        let (mut fields, mut readable) = (RequestFields::default(), true);
        super::json_scan::members(body, |name, value| {
            readable = readable && !name.escaped && fields.read(&body[name.text], &body[value]).is_some();
        })
        .ok()?;
        readable.then_some(fields)
    }

    /// One member, as `visit_map` reads it; `None` if its value is not JSON the parse accepts.
    /// (A value nested deeply is left to the parse: alone it may parse where, one level down
    /// in the body, it would meet serde_json's recursion limit.)
    fn read(&mut self, name: &[u8], value: &[u8]) -> Option<()> {
        let field = Field::named(name);
        if matches!(field, Field::Other) {
            return Some(());
        }
        if matches!(value.first(), Some(b'[' | b'{')) && super::json_scan::depth(value) > 32 {
            return None;
        }
        self.set(field, serde_json::from_slice(value).ok()?);
        Some(())
    }

    /// A member read: a field of an unexpected type counts as absent.
    fn set(&mut self, field: Field, value: Value) {
        let slot = match field {
            Field::Other => return,
            Field::Model => {
                self.model = match value {
                    Value::String(s) => Some(s),
                    _ => None,
                };
                return;
            }
            Field::Stream => {
                self.stream = value.as_bool().unwrap_or(false);
                return;
            }
            Field::StreamOptions => {
                self.include_usage = value.get("include_usage").and_then(Value::as_bool);
                return;
            }
            Field::N => &mut self.n,
            Field::BestOf => &mut self.best_of,
            Field::MaxTokens => &mut self.max_tokens,
            Field::MaxCompletionTokens => &mut self.max_completion_tokens,
            Field::MaxOutputTokens => &mut self.max_output_tokens,
        };
        *slot = value.as_u64();
    }

    pub fn model(&self) -> &str {
        self.model.as_deref().unwrap_or_default()
    }

    /// Completions asked for (`n`, `best_of`), as given.
    pub fn choices_asked(&self) -> u64 {
        self.n.max(self.best_of).unwrap_or(1)
    }

    /// The field that limits completions at `path`, where the node writes the limit it reserved
    /// for when the request gives none (`CAP_COMPLETION_TOKENS`).
    pub fn limit_field(path: &str) -> Option<&'static str> {
        match path {
            "chat/completions" => Some("max_completion_tokens"),
            "completions" | "messages" => Some("max_tokens"),
            "responses" => Some("max_output_tokens"),
            _ => None,
        }
    }

    /// The completion limit the request gives at `path`, if any, and the number of completions,
    /// within `1..=MAX_CHOICES`. Only the fields that endpoint defines count: an upstream ignores
    /// the others (`max_output_tokens: 1` on chat completions would otherwise shrink the hold
    /// while the answer runs to the model's own limit). Elsewhere the largest one given counts.
    pub fn asked_completion(&self, path: &str) -> (Option<u64>, u64) {
        let asked = match path {
            "chat/completions" => self.max_tokens.max(self.max_completion_tokens),
            "completions" | "messages" => self.max_tokens,
            "responses" => self.max_output_tokens,
            _ => self.max_tokens.max(self.max_completion_tokens).max(self.max_output_tokens),
        };
        (asked, self.choices_asked().clamp(1, MAX_CHOICES))
    }
}

/// The body's keys the node reads; any other is skipped.
enum Field {
    Model,
    Stream,
    StreamOptions,
    N,
    BestOf,
    MaxTokens,
    MaxCompletionTokens,
    MaxOutputTokens,
    Other,
}

impl Field {
    fn named(name: &[u8]) -> Field {
        match name {
            b"model" => Field::Model,
            b"stream" => Field::Stream,
            b"stream_options" => Field::StreamOptions,
            b"n" => Field::N,
            b"best_of" => Field::BestOf,
            b"max_tokens" => Field::MaxTokens,
            b"max_completion_tokens" => Field::MaxCompletionTokens,
            b"max_output_tokens" => Field::MaxOutputTokens,
            _ => Field::Other,
        }
    }
}

impl<'de> Deserialize<'de> for Field {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Field, D::Error> {
        struct FieldVisitor;
        impl Visitor<'_> for FieldVisitor {
            type Value = Field;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E>(self, name: &str) -> Result<Field, E> {
                Ok(Field::named(name.as_bytes()))
            }
        }
        deserializer.deserialize_identifier(FieldVisitor)
    }
}

impl<'de> Deserialize<'de> for RequestFields {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<RequestFields, D::Error> {
        struct BodyVisitor;
        impl<'de> Visitor<'de> for BodyVisitor {
            type Value = RequestFields;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RequestFields, A::Error> {
                let mut fields = RequestFields::default();
                while let Some(key) = map.next_key::<Field>()? {
                    // The fields read are small: each is taken as a `Value` and kept if of the
                    // expected type.
                    match key {
                        Field::Other => {
                            map.next_value::<IgnoredAny>()?;
                        }
                        field => fields.set(field, map.next_value::<Value>()?),
                    }
                }
                Ok(fields)
            }
        }
        deserializer.deserialize_map(BodyVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fields as the node read them from a whole `Value` before this module.
    fn from_value(v: &Value) -> RequestFields {
        let u = |k: &str| v.get(k).and_then(Value::as_u64);
        RequestFields {
            model: v.get("model").and_then(Value::as_str).map(str::to_owned),
            stream: v.get("stream").and_then(Value::as_bool).unwrap_or(false),
            include_usage: v.pointer("/stream_options/include_usage").and_then(Value::as_bool),
            n: u("n"),
            best_of: u("best_of"),
            max_tokens: u("max_tokens"),
            max_completion_tokens: u("max_completion_tokens"),
            max_output_tokens: u("max_output_tokens"),
        }
    }

    #[test]
    fn reads_what_a_whole_parse_reads() {
        for body in [
            r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi \"there\" \u00e9"}],"max_tokens":16}"#,
            r#"{"model":"m","stream":true,"stream_options":{"include_usage":false},"n":3,"best_of":5}"#,
            r#"{"model":"m","stream_options":{"include_usage":true},"max_completion_tokens":7,"max_output_tokens":9}"#,
            // Unexpected types count as absent, repeated keys as their last value.
            r#"{"model":42,"stream":"yes","n":-1,"max_tokens":1.5,"stream_options":[1]}"#,
            r#"{"model":"first","model":"second","n":2,"n":4}"#,
            r#"{"mod\u0065l":"escaped key","tools":[{"a":{"b":[null,true,{"c":"d"}]}}]}"#,
            r#"  {}  "#,
        ] {
            let value: Value = serde_json::from_str(body).unwrap();
            assert_eq!(RequestFields::parse(body.as_bytes()).unwrap(), from_value(&value), "{body}");
            // The scan reads what the parse reads; a name with an escape is left to the parse.
            let parsed: RequestFields = serde_json::from_str(body).unwrap();
            let scanned = RequestFields::scan(body.as_bytes());
            assert_eq!(scanned.is_none(), body.contains(r#""mod\u0065l""#), "{body}");
            assert!(scanned.is_none_or(|scanned| scanned == parsed), "{body}");
        }
    }

    #[test]
    fn the_scan_reads_a_body_only_as_the_parse_does() {
        let nested = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        let bodies = [
            // What the parse refuses in a member it reads, and accepts in one it skips: the
            // scan reads only the second kind (`true`), leaving the first to the parse.
            (r#"{"model":"\ud800"}"#.to_owned(), false),
            (r#"{"messages":"\ud800","model":"m"}"#.to_owned(), true),
            (r#"{"max_tokens":1e400}"#.to_owned(), false),
            (r#"{"tools":1e400,"max_tokens":3}"#.to_owned(), true),
            (r#"{"stream_options":{"include_usage":true,"x":"\udfff"}}"#.to_owned(), false),
            (r#"{"model":"a\u00e9\n","stream":true}"#.to_owned(), true),
            // Nesting: unlimited where skipped; where read, the parse's limit counts the body's
            // own level (127 levels fail in the body, though alone they would parse).
            (format!(r#"{{"tools":{},"n":2}}"#, nested(300)), true),
            (format!(r#"{{"n":{}}}"#, nested(127)), false),
            (format!(r#"{{"stream_options":{}}}"#, nested(20)), true),
        ];
        for (body, scans) in bodies {
            let parsed = serde_json::from_str::<RequestFields>(&body).ok();
            let scanned = RequestFields::scan(body.as_bytes());
            assert_eq!(scanned.is_some(), scans, "{body}");
            assert!(scanned.is_none_or(|scanned| Some(scanned) == parsed), "{body}");
            assert_eq!(RequestFields::parse(body.as_bytes()).ok(), parsed, "{body}");
        }
        assert!(serde_json::from_str::<RequestFields>(&format!(r#"{{"n":{}}}"#, nested(127))).is_err());
        assert!(RequestFields::scan(br#"{"mod\u0065l":"m"}"#).is_none(), "a name with an escape is the parse's");
        assert_eq!(RequestFields::scan(br#"{"model":"m","stream":true}"#).and_then(|f| f.model), Some("m".into()));
    }

    #[test]
    fn limits_and_choices() {
        let f = RequestFields::parse(br#"{"max_tokens":10,"max_completion_tokens":30,"n":2,"best_of":3}"#).unwrap();
        assert_eq!(f.asked_completion("chat/completions"), (Some(30), 3));
        assert_eq!(RequestFields::parse(b"{}").unwrap().asked_completion("chat/completions"), (None, 1));
        // A limit the endpoint does not define is not one the upstream keeps to.
        // Each endpoint's own field is the one a limit is written to.
        for path in ["chat/completions", "completions", "messages", "responses"] {
            let field = RequestFields::limit_field(path).unwrap();
            let body = format!("{{\"{field}\":3}}");
            assert_eq!(RequestFields::parse(body.as_bytes()).unwrap().asked_completion(path), (Some(3), 1), "{path}");
        }
        assert_eq!(RequestFields::limit_field("embeddings"), None);
        let foreign = RequestFields::parse(br#"{"max_output_tokens":1}"#).unwrap();
        assert_eq!(foreign.asked_completion("chat/completions"), (None, 1));
        assert_eq!(foreign.asked_completion("messages"), (None, 1));
        assert_eq!(foreign.asked_completion("responses"), (Some(1), 1));
        let chat = RequestFields::parse(br#"{"max_completion_tokens":5,"max_output_tokens":9}"#).unwrap();
        assert_eq!(chat.asked_completion("completions"), (None, 1));
        assert_eq!(chat.asked_completion("chat/completions"), (Some(5), 1));
        assert_eq!(chat.asked_completion("audio/speech"), (Some(9), 1));
        let many = RequestFields::parse(br#"{"n":100000}"#).unwrap();
        assert_eq!((many.choices_asked(), many.asked_completion("chat/completions").1), (100_000, MAX_CHOICES));
    }

    #[test]
    fn counts_image_file_and_audio_parts() {
        let openai = br#"{"messages":[{"role":"user","content":[{"type":"text","text":"what is this \"type\":\"image\""},
            {"type": "image_url", "image_url": {"url": "https://x/y.png"}}, {"type" :"input_audio","input_audio":{}}]}]}"#;
        assert_eq!(attachments(openai), 2, "the quoted text is not a part");
        let anthropic = br#"{"messages":[{"role":"user","content":[{"type":"image","source":{"type":"url","url":"u"}},
            {"type":"document","source":{"type":"file","file_id":"f"}}]}]}"#;
        assert_eq!(attachments(anthropic), 3, "image, document, and its file source (an over-estimate)");
        // Escapes spelling the key or the value another way are read as the upstream reads them.
        let escaped = br#"{"messages":[{"content":[{"typ\u0065":"image\u005furl"},{"type":"te\u0078t","text":"\"type\":\"image\""}]}]}"#;
        assert_eq!(attachments(escaped), 1);
        let responses = br#"{"input":[{"role":"user","content":[{"type":"input_image","image_url":"u"},{"type":"input_file","file_id":"f"},{"type":"input_text","text":"t"}]}]}"#;
        assert_eq!(attachments(responses), 2);
        assert_eq!(attachments(br#"{"type":"imagery","type":"image"#), 0, "a prefix or an unfinished value is none");
        assert_eq!(attachments(b"{}"), 0);
    }

    #[test]
    fn tells_other_json_from_no_json() {
        for other in ["[1,2]", "\"text\"", "42", "null", "true"] {
            assert!(matches!(RequestFields::parse(other.as_bytes()), Err(BodyError::NotAnObject)), "{other}");
        }
        for broken in ["{", "{\"model\":}", "[1,2", "hello", "{} trailing", "{\"a\":1,}"] {
            assert!(matches!(RequestFields::parse(broken.as_bytes()), Err(BodyError::Invalid(_))), "{broken}");
        }
        // Invalid UTF-8 in a string the parser skips.
        assert!(matches!(RequestFields::parse(b"{\"messages\":\"\xff\"}"), Err(BodyError::Invalid(_))));
    }
}
