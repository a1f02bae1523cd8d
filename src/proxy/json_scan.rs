//! The top-level members of a JSON object, found without building it: the request's fields
//! and the answer's `usage`, on every request's path. Pure, no I/O, no allocation unless the
//! text nests.
//!
//! The scan checks the whole text's syntax (what serde_json would refuse as JSON, it refuses)
//! but not what only a parse into values would: valid UTF-8, unpaired surrogates, number range
//! or nesting depth. Callers that need those read the member's text with serde_json.

use std::ops::Range;

/// Why a text was not scanned to an answer; the caller then reads it the slow way.
#[derive(Debug, PartialEq, Eq)]
pub enum NotScanned {
    /// Not one JSON object, or not valid JSON.
    Syntax,
    /// The member is named twice (a parse keeps the last), or a name cannot be read (an escape
    /// the parse refuses): only a whole parse can say what counts.
    Ambiguous,
}

/// The text span of the value of the top-level member `name` of the JSON object `text`, or
/// `None` when it has no such member. A name written with escapes is read as it spells.
pub fn top_member(text: &[u8], name: &str) -> Result<Option<Range<usize>>, NotScanned> {
    let (mut found, mut ambiguous) = (None, false);
    members(text, |key, value| {
        let named = if key.escaped {
            // With its quotes: a JSON string. One the parse refuses (a lone surrogate) cannot
            // be told from `name`.
            let quoted = text.get(key.text.start - 1..key.text.end + 1).unwrap_or_default();
            match serde_json::from_slice::<String>(quoted) {
                Ok(spelled) => spelled == name,
                Err(_) => {
                    ambiguous = true;
                    false
                }
            }
        } else {
            &text[key.text] == name.as_bytes()
        };
        if named {
            ambiguous |= found.is_some();
            found = Some(value);
        }
    })?;
    if ambiguous {
        return Err(NotScanned::Ambiguous);
    }
    Ok(found)
}

/// How deeply `value` (one JSON value, its syntax already checked) nests arrays and objects.
pub fn depth(value: &[u8]) -> usize {
    let (mut depth, mut deepest, mut in_string, mut escaped) = (0usize, 0, false, false);
    for &byte in value {
        match (in_string, byte) {
            (true, _) if escaped => escaped = false,
            (true, b'\\') => escaped = true,
            (true, b'"') | (false, b'"') => in_string = !in_string,
            (false, b'[' | b'{') => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            (false, b']' | b'}') => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// Calls `each` with every member of the JSON object `text` in order: its name (between the
/// quotes) and the span of its value. An error after some calls makes them void.
pub fn members(text: &[u8], mut each: impl FnMut(Name, Range<usize>)) -> Result<(), NotScanned> {
    let mut s = Scanner { text, at: 0 };
    s.whitespace();
    s.expect(b'{')?;
    s.whitespace();
    if s.peek() == Some(b'}') {
        s.at += 1;
    } else {
        loop {
            let key = s.string()?;
            s.whitespace();
            s.expect(b':')?;
            s.whitespace();
            let start = s.at;
            s.value()?;
            each(key, start..s.at);
            s.whitespace();
            match s.next() {
                Some(b',') => s.whitespace(),
                Some(b'}') => break,
                _ => return Err(NotScanned::Syntax),
            }
        }
    }
    s.whitespace();
    if s.at != text.len() {
        return Err(NotScanned::Syntax);
    }
    Ok(())
}

struct Scanner<'a> {
    text: &'a [u8],
    at: usize,
}

/// A member's name: its text between the quotes, and whether that holds an escape (then it is
/// not the name as read).
pub struct Name {
    pub text: Range<usize>,
    pub escaped: bool,
}

#[derive(Clone, Copy, PartialEq)]
enum Open {
    Object,
    Array,
}

impl Scanner<'_> {
    fn peek(&self) -> Option<u8> {
        self.text.get(self.at).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let byte = self.peek();
        self.at += usize::from(byte.is_some());
        byte
    }

    fn expect(&mut self, byte: u8) -> Result<(), NotScanned> {
        if self.next() == Some(byte) {
            Ok(())
        } else {
            Err(NotScanned::Syntax)
        }
    }

    fn whitespace(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.at += 1;
        }
    }

    /// One value (with whatever it nests), from its first byte to just past its last. Nesting
    /// is tracked on a stack of its own, not by recursion, so no depth overflows the thread's.
    fn value(&mut self) -> Result<(), NotScanned> {
        let mut open: Vec<Open> = Vec::new();
        loop {
            // A value starts here.
            match self.peek().ok_or(NotScanned::Syntax)? {
                b'{' => {
                    self.at += 1;
                    self.whitespace();
                    if self.peek() == Some(b'}') {
                        self.at += 1;
                    } else {
                        open.push(Open::Object);
                        self.member_name()?;
                        continue;
                    }
                }
                b'[' => {
                    self.at += 1;
                    self.whitespace();
                    if self.peek() == Some(b']') {
                        self.at += 1;
                    } else {
                        open.push(Open::Array);
                        continue;
                    }
                }
                b'"' => {
                    self.string()?;
                }
                b'-' | b'0'..=b'9' => self.number()?,
                b't' => self.literal(b"true")?,
                b'f' => self.literal(b"false")?,
                b'n' => self.literal(b"null")?,
                _ => return Err(NotScanned::Syntax),
            }
            // A value ended: close what it ends, until another value is due.
            loop {
                let Some(&inner) = open.last() else { return Ok(()) };
                self.whitespace();
                match (self.next(), inner) {
                    (Some(b','), Open::Object) => {
                        self.whitespace();
                        self.member_name()?;
                        break;
                    }
                    (Some(b','), Open::Array) => {
                        self.whitespace();
                        break;
                    }
                    (Some(b'}'), Open::Object) | (Some(b']'), Open::Array) => {
                        open.pop();
                    }
                    _ => return Err(NotScanned::Syntax),
                }
            }
        }
    }

    /// A member's name and its colon, up to its value.
    fn member_name(&mut self) -> Result<(), NotScanned> {
        self.string()?;
        self.whitespace();
        self.expect(b':')?;
        self.whitespace();
        Ok(())
    }

    /// A string, from its opening quote to just past its closing one.
    #[inline(always)] // most of a scan's work, in short strings: a call costs as much as one
    fn string(&mut self) -> Result<Name, NotScanned> {
        self.expect(b'"')?;
        let start = self.at;
        let mut escaped = false;
        loop {
            self.plain_run();
            match self.next().ok_or(NotScanned::Syntax)? {
                b'"' => return Ok(Name { text: start..self.at - 1, escaped }),
                b'\\' => {
                    escaped = true;
                    match self.next().ok_or(NotScanned::Syntax)? {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => {}
                        b'u' => {
                            let digits = self.text.get(self.at..self.at + 4).ok_or(NotScanned::Syntax)?;
                            if !digits.iter().all(u8::is_ascii_hexdigit) {
                                return Err(NotScanned::Syntax);
                            }
                            self.at += 4;
                        }
                        _ => return Err(NotScanned::Syntax),
                    }
                }
                // A control character, which JSON strings must escape.
                _ => return Err(NotScanned::Syntax),
            }
        }
    }

    /// Skips string bytes that need no attention (not a quote, a backslash or a control
    /// character), eight at a time.
    #[inline(always)]
    fn plain_run(&mut self) {
        const ONES: u64 = 0x0101_0101_0101_0101;
        const HIGH: u64 = 0x8080_8080_8080_8080;
        // The high bit of each byte of `word` below `n` (n ≤ 128). Exact up to the first such
        // byte: a borrow only carries out of a byte that is below `n`.
        let below = |word: u64, n: u8| word.wrapping_sub(ONES * u64::from(n)) & !word & HIGH;
        while let Some(chunk) = self.text.get(self.at..self.at + 8) {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(chunk);
            let word = u64::from_le_bytes(bytes);
            let stops = below(word, 0x20)
                | below(word ^ (ONES * u64::from(b'"')), 1)
                | below(word ^ (ONES * u64::from(b'\\')), 1);
            if stops != 0 {
                // Little-endian: the lowest flagged bit is the first byte to stop at.
                self.at += (stops.trailing_zeros() / 8) as usize;
                return;
            }
            self.at += 8;
        }
        while matches!(self.peek(), Some(byte) if byte >= 0x20 && byte != b'"' && byte != b'\\') {
            self.at += 1;
        }
    }

    /// `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`
    fn number(&mut self) -> Result<(), NotScanned> {
        if self.peek() == Some(b'-') {
            self.at += 1;
        }
        match self.next() {
            Some(b'0') => {}
            Some(b'1'..=b'9') => self.digits(),
            _ => return Err(NotScanned::Syntax),
        }
        if self.peek() == Some(b'.') {
            self.at += 1;
            self.some_digits()?;
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.at += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.at += 1;
            }
            self.some_digits()?;
        }
        Ok(())
    }

    fn digits(&mut self) {
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.at += 1;
        }
    }

    fn some_digits(&mut self) -> Result<(), NotScanned> {
        let start = self.at;
        self.digits();
        if self.at == start {
            return Err(NotScanned::Syntax);
        }
        Ok(())
    }

    fn literal(&mut self, word: &[u8]) -> Result<(), NotScanned> {
        if self.text.get(self.at..self.at + word.len()) != Some(word) {
            return Err(NotScanned::Syntax);
        }
        self.at += word.len();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage_of(text: &str) -> Result<Option<&str>, NotScanned> {
        top_member(text.as_bytes(), "usage").map(|span| span.map(|s| &text[s]))
    }

    #[test]
    fn finds_the_top_level_member_and_nothing_nested() {
        let text = r#" {"id":"x","choices":[{"message":{"usage":1,"content":"\"usage\": 2"}}],
            "usage" : {"prompt_tokens": 3, "d": [1, -2.5e+3, true, false, null, {}, []]} , "z":0} "#;
        assert_eq!(usage_of(text), Ok(Some(r#"{"prompt_tokens": 3, "d": [1, -2.5e+3, true, false, null, {}, []]}"#)));
        assert_eq!(usage_of(r#"{"message":{"usage":{"input_tokens":1}}}"#), Ok(None));
        assert_eq!(usage_of("{}"), Ok(None));
        assert_eq!(usage_of(r#"{"usage":null}"#), Ok(Some("null")));
        assert_eq!(usage_of(r#"{"usage":"a\u00e9\n"}"#), Ok(Some(r#""a\u00e9\n""#)));
    }

    #[test]
    fn names_are_read_as_they_spell() {
        assert_eq!(usage_of(r#"{"usage":1,"usage":2}"#), Err(NotScanned::Ambiguous));
        assert_eq!(usage_of(r#"{"us\u0061ge":1}"#), Ok(Some("1")));
        assert_eq!(usage_of(r#"{"us\u0061ge":1,"usage":2}"#), Err(NotScanned::Ambiguous));
        assert_eq!(usage_of(r#"{"a\n":1,"usage":2}"#), Ok(Some("2")));
        assert_eq!(usage_of(r#"{"a\ud800":1,"usage":2}"#), Err(NotScanned::Ambiguous));
    }

    #[test]
    fn measures_nesting() {
        assert_eq!(depth(b"1"), 0);
        assert_eq!(depth(br#""[{""#), 0);
        assert_eq!(depth(br#"{"a":[1,{"b":"]\"}"}],"c":[]}"#), 3);
        assert_eq!(depth(br#"[[],[[]]]"#), 3);
    }

    /// Whatever serde_json refuses as JSON (for reasons of syntax), the scan refuses too, and
    /// what it accepts, the scan accepts.
    #[test]
    fn agrees_with_serde_json_on_syntax() {
        let texts = [
            "",
            " ",
            "{",
            "}",
            "{}",
            "[]",
            "[{}]",
            "1",
            "\"a\"",
            "null",
            "{} {}",
            "{}x",
            "{},",
            r#"{"a"}"#,
            r#"{"a":}"#,
            r#"{"a":1,}"#,
            r#"{"a":1 "b":2}"#,
            r#"{"a" 1}"#,
            r#"{a:1}"#,
            r#"{'a':1}"#,
            r#"{"a":[1,]}"#,
            r#"{"a":[,1]}"#,
            r#"{"a":[1 2]}"#,
            r#"{"a":[1}"#,
            r#"{"a":{"b":1]}"#,
            r#"{"a":{"b"}}"#,
            r#"{"a":{"b":1,}}"#,
            r#"{"a":{,}}"#,
            r#"{"a":01}"#,
            r#"{"a":-}"#,
            r#"{"a":1.}"#,
            r#"{"a":.5}"#,
            r#"{"a":1e}"#,
            r#"{"a":1e+}"#,
            r#"{"a":+1}"#,
            r#"{"a":-0.0e-0}"#,
            r#"{"a":1E5}"#,
            r#"{"a":0x1}"#,
            r#"{"a":tru}"#,
            r#"{"a":truex}"#,
            r#"{"a":nul}"#,
            r#"{"a":False}"#,
            r#"{"a":true}"#,
            r#"{"a":"\x"}"#,
            r#"{"a":"\u12"}"#,
            r#"{"a":"\u12g4"}"#,
            r#"{"a":"\u12AF"}"#,
            r#"{"a":"\/\b\f\n\r\t\"\\"}"#,
            "{\"a\":\"tab\there\"}",
            "{\"a\":\"nl\nhere\"}",
            r#"{"a":"unterminated}"#,
            r#"{"a":"ends in a backslash\"#,
            r#"{"a":"long plain text, more than eight bytes at a time"}"#,
            "{\"a\":\"long text with a control \u{1} character past eight bytes\"}",
            r#"{"a":"quote after eight bytes \" here"}"#,
            r#"{"a":[[[[[[[[[[]]]]]]]]]]}"#,
            r#"{"a":[[[[[[[[[[]]]]]]]]]}"#,
            r#"{"a":[{"b":[{"c":{}}]}]}"#,
            " \t\r\n{ \t\r\n} \t\r\n",
            "\u{c}{}",
            "{\"a\":1}\u{0}",
            r#"{"a":"é ü 😀"}"#,
        ];
        for text in texts {
            let serde =
                serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok() && text.trim_start().starts_with('{');
            let scanned = top_member(text.as_bytes(), "usage");
            assert_eq!(scanned.is_ok(), serde, "{text:?}: {scanned:?}");
        }
    }

    #[test]
    fn a_string_ends_wherever_its_stop_falls_in_a_word() {
        for len in 0..24 {
            let plain = "é".repeat(len / 2) + &"a".repeat(len % 2);
            for (stop, ok) in [("\"", true), ("\\n\"", true), ("\\x\"", false), ("\n\"", false), ("\u{1f}\"", false)] {
                let text = format!(r#"{{"{plain}":"{plain}{stop}}}"#);
                let scanned = members(text.as_bytes(), |name, value| {
                    assert_eq!(&text[name.text], plain);
                    assert_eq!(&text[value.start + 1..value.start + 1 + plain.len()], plain);
                });
                assert_eq!(scanned.is_ok(), ok, "{text:?}");
                assert_eq!(serde_json::from_str::<serde::de::IgnoredAny>(&text).is_ok(), ok, "{text:?}");
            }
        }
    }

    #[test]
    fn members_come_in_order_with_their_names_as_written() {
        let text = br#"{"a":1, "b\n" : [2,{"c":3}] ,"a":"4"}"#;
        let mut seen = Vec::new();
        members(text, |name, value| seen.push((&text[name.text], name.escaped, &text[value]))).unwrap();
        assert_eq!(seen, [(&b"a"[..], false, &b"1"[..]), (b"b\\n", true, br#"[2,{"c":3}]"#), (b"a", false, br#""4""#)]);
    }

    #[test]
    fn deep_nesting_does_not_overflow() {
        let deep = format!(r#"{{"a":{}1{}}}"#, "[".repeat(200_000), "]".repeat(200_000));
        assert_eq!(top_member(deep.as_bytes(), "usage"), Ok(None));
        let unclosed = format!(r#"{{"a":{}}}"#, "[".repeat(200_000));
        assert_eq!(top_member(unclosed.as_bytes(), "usage"), Err(NotScanned::Syntax));
    }
}
