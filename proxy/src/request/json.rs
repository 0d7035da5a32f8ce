//! Request model: parsing JSON bodies, once, for validation and the rules alike.
//!
//! `serde_json::Value` keeps the last of duplicate object keys. A backend whose parser keeps
//! the first one would then act on a value the schema never saw (`{"role":"user",
//! "role":"admin"}`), a classic parser-differential bypass. RFC 8259 leaves duplicates to the
//! implementation and I-JSON (RFC 7493) forbids them. So validation parses strictly
//! ([`parse_strict`]: duplicates are an error, answered 400), and the rules walk the document
//! with [`members`], which yields every occurrence of a repeated key: whichever one the
//! backend uses was inspected. Both need visitors of our own (serde_json offers neither).
//!
//! Nesting: [`depth`] measures it without parsing; the proxy refuses bodies deeper than
//! [`MAX_DEPTH`] before any stage reads them, so validation and inspection see the same
//! documents (serde_json's own recursion limit, 128, is above it).

use std::fmt;

use serde::de::{
    Deserialize, DeserializeSeed, Deserializer, Error as _, MapAccess, SeqAccess, Visitor,
};
use serde_json::{Map, Number, Value};

use super::JsonMember;

/// Deepest nesting of arrays and objects accepted in a JSON body (deeper is refused with 400).
pub const MAX_DEPTH: usize = 64;

/// The deepest nesting of arrays and objects in a JSON text (strings skipped, escapes
/// honoured), without parsing it; linear in the length, no allocation.
pub fn depth(bytes: &[u8]) -> usize {
    let (mut depth, mut max, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for &b in bytes {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// Every member of a JSON document, in document order: each object entry (with its key) and
/// array element at every level, containers included, scalars as text. A repeated key yields
/// one member per occurrence (same pointer). Fails on invalid JSON.
pub fn members(bytes: &[u8]) -> Result<Vec<JsonMember>, serde_json::Error> {
    let bytes = strip_bom(bytes);
    let mut out = Vec::new();
    let mut ptr = String::new();
    let mut de = serde_json::Deserializer::from_slice(bytes);
    Walk {
        out: &mut out,
        ptr: &mut ptr,
        key: None,
    }
    .deserialize(&mut de)?;
    de.end()?;
    Ok(out)
}

/// The members of a JSON stream (NDJSON, JSON Lines, RFC 7464 sequences): one document after
/// another, separated by whitespace; document `n`'s members carry pointers under `/n`. Fails
/// when any document is invalid.
pub fn stream_members(bytes: &[u8]) -> Result<Vec<JsonMember>, serde_json::Error> {
    // RFC 7464 puts a record separator (0x1E) before each document: read as whitespace.
    // Copied only when one is there (NDJSON bodies have none).
    let bytes = strip_bom(bytes);
    let bytes: std::borrow::Cow<'_, [u8]> = if bytes.contains(&0x1e) {
        bytes
            .iter()
            .map(|&b| if b == 0x1e { b'\n' } else { b })
            .collect::<Vec<u8>>()
            .into()
    } else {
        bytes.into()
    };
    let mut out = Vec::new();
    let mut de = serde_json::Deserializer::from_slice(&bytes);
    let mut n = 0usize;
    // `end` skips whitespace and succeeds only at the end of the input.
    while de.end().is_err() {
        let mut ptr = format!("/{n}");
        Walk {
            out: &mut out,
            ptr: &mut ptr,
            key: None,
        }
        .deserialize(&mut de)?;
        n += 1;
    }
    Ok(out)
}

struct Walk<'o> {
    out: &'o mut Vec<JsonMember>,
    ptr: &'o mut String,
    key: Option<String>,
}

impl Walk<'_> {
    fn scalar(self, text: String) {
        self.out.push(JsonMember {
            pointer: self.ptr.clone(),
            key: self.key,
            scalar: Some(text),
        });
    }
    fn container(&mut self) {
        if let Some(k) = self.key.take() {
            self.out.push(JsonMember {
                pointer: self.ptr.clone(),
                key: Some(k),
                scalar: None,
            });
        }
    }
}

impl<'de> DeserializeSeed<'de> for Walk<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Walk<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<(), E> {
        self.scalar(v.to_string());
        Ok(())
    }
    fn visit_i64<E>(self, v: i64) -> Result<(), E> {
        self.scalar(v.to_string());
        Ok(())
    }
    fn visit_u64<E>(self, v: u64) -> Result<(), E> {
        self.scalar(v.to_string());
        Ok(())
    }
    fn visit_f64<E>(self, v: f64) -> Result<(), E> {
        let text = Number::from_f64(v).map_or_else(String::new, |n| n.to_string());
        self.scalar(text);
        Ok(())
    }
    fn visit_str<E>(self, v: &str) -> Result<(), E> {
        self.scalar(v.to_string());
        Ok(())
    }
    fn visit_string<E>(self, v: String) -> Result<(), E> {
        self.scalar(v);
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        self.scalar(String::new());
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
        self.container();
        let mut i = 0usize;
        loop {
            let len = self.ptr.len();
            self.ptr.push('/');
            self.ptr.push_str(&i.to_string());
            let seed = Walk {
                out: &mut *self.out,
                ptr: &mut *self.ptr,
                key: None,
            };
            let more = seq.next_element_seed(seed)?.is_some();
            self.ptr.truncate(len);
            if !more {
                return Ok(());
            }
            i += 1;
        }
    }
    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<(), A::Error> {
        self.container();
        while let Some(key) = map.next_key::<String>()? {
            let len = self.ptr.len();
            self.ptr.push('/');
            self.ptr
                .push_str(&key.replace('~', "~0").replace('/', "~1"));
            map.next_value_seed(Walk {
                out: &mut *self.out,
                ptr: &mut *self.ptr,
                key: Some(key),
            })?;
            self.ptr.truncate(len);
        }
        Ok(())
    }
}

/// The text without a leading UTF-8 byte-order mark, which Python's and .NET's JSON readers
/// skip (serde_json does not).
pub fn strip_bom(bytes: &[u8]) -> &[u8] {
    bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(bytes)
}

/// Whether a body is shaped like a JSON object or array (after a BOM and whitespace).
pub fn looks_like_json(bytes: &[u8]) -> bool {
    strip_bom(bytes)
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| *b == b'{' || *b == b'[')
}

/// Parses a whole JSON document, rejecting duplicate keys in any object.
pub fn parse_strict(bytes: &[u8]) -> Result<Value, serde_json::Error> {
    let bytes = strip_bom(bytes);
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let StrictValue(v) = StrictValue::deserialize(&mut de)?;
    de.end()?;
    Ok(v)
}

struct StrictValue(Value);

impl<'de> Deserialize<'de> for StrictValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = StrictValue;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::Bool(v)))
    }
    fn visit_i64<E>(self, v: i64) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::from(v)))
    }
    fn visit_u64<E>(self, v: u64) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::from(v)))
    }
    fn visit_f64<E>(self, v: f64) -> Result<StrictValue, E> {
        Ok(StrictValue(
            Number::from_f64(v).map_or(Value::Null, Value::Number),
        ))
    }
    fn visit_str<E>(self, v: &str) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::String(v.to_string())))
    }
    fn visit_string<E>(self, v: String) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::String(v)))
    }
    fn visit_unit<E>(self) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::Null))
    }
    fn visit_none<E>(self) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::Null))
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<StrictValue, D::Error> {
        StrictValue::deserialize(d)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<StrictValue, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        while let Some(StrictValue(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(StrictValue(Value::Array(items)))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<StrictValue, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                let shown: String = key.chars().take(64).collect();
                return Err(A::Error::custom(format!("duplicate key {shown:?}")));
            }
            let StrictValue(v) = map.next_value()?;
            out.insert(key, v);
        }
        Ok(StrictValue(Value::Object(out)))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn same_values_as_serde_json_and_duplicates_rejected() {
        let doc = br#"{"a":[1,-2,3.5,true,null,"x\u00e9"],"b":{"c":{}},"n":18446744073709551615}"#;
        assert_eq!(
            parse_strict(doc).unwrap(),
            serde_json::from_slice::<Value>(doc).unwrap()
        );
        let e = parse_strict(br#"{"role":"user","x":{"k":1},"role":"admin"}"#).unwrap_err();
        assert!(e.to_string().contains("duplicate key \"role\""), "{e}");
        // The position is the end of the repeated key.
        assert_eq!((e.line(), e.column()), (1, 33));
        assert!(parse_strict(br#"{"a":{"b":1,"b":2}}"#).is_err());
        assert!(parse_strict(br#"{"a":1} x"#).is_err());
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        assert!(parse_strict(deep.as_bytes()).is_err());
    }

    #[test]
    fn members_keep_every_occurrence_and_depth_is_measured() {
        let m = members(br#"{"q":"<attack>","o":{"a":[1,"x"]},"q":"ok"}"#).unwrap();
        let got: Vec<(String, Option<String>, Option<String>)> = m
            .into_iter()
            .map(|m| (m.pointer, m.key, m.scalar))
            .collect();
        let s = |x: &str| Some(x.to_string());
        assert_eq!(
            got,
            vec![
                ("/q".into(), s("q"), s("<attack>")),
                ("/o".into(), s("o"), None),
                ("/o/a".into(), s("a"), None),
                ("/o/a/0".into(), None, s("1")),
                ("/o/a/1".into(), None, s("x")),
                ("/q".into(), s("q"), s("ok")),
            ]
        );
        assert!(members(b"{\"a\":}").is_err());
        assert_eq!(depth(br#"{"a":[[{"b":"[[[[\"]]"}]]}"#), 4);
        assert_eq!(depth(b"1"), 0);
        let deep = format!("{}{}", "[".repeat(100), "]".repeat(100));
        assert_eq!(depth(deep.as_bytes()), 100);
    }
}
