//! Request model: the decoders every consumer of a request shares. There is one of each on
//! purpose: two decoders of the same bytes inside one proxy are a parser differential.

use std::borrow::Cow;

use http::HeaderMap;

/// `application/x-www-form-urlencoded` pairs. Unlike `form_urlencoded::parse`, bytes that are
/// not UTF-8 go through the rules' byte-to-text step, so overlong encodings of ASCII
/// (`%C0%AE` for `.`, a classic traversal evasion) decode to what old decoders saw.
pub fn parse_urlencoded(input: &[u8]) -> Vec<(String, String)> {
    fn decode(part: &[u8]) -> String {
        let plus: Cow<'_, [u8]> = if part.contains(&b'+') {
            Cow::Owned(
                part.iter()
                    .map(|&b| if b == b'+' { b' ' } else { b })
                    .collect(),
            )
        } else {
            Cow::Borrowed(part)
        };
        let bytes: Vec<u8> = percent_encoding::percent_decode(&plus).collect();
        bytes_to_text(bytes)
    }
    input
        .split(|&b| b == b'&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let mut it = pair.splitn(2, |&b| b == b'=');
            let k = it.next().unwrap_or_default();
            let v = it.next().unwrap_or_default();
            (decode(k), decode(v))
        })
        .collect()
}

/// Each cookie of every `Cookie` header, in order, as `(name, value, pair)`: pairs split on
/// `;` and trimmed, the name before the first `=` (the whole pair when there is none) and the
/// value after it, both trimmed; empty names are skipped. The one reading of cookie names, so
/// the cookie the auth stage reads is the cookie [`without_cookie`] removes.
fn each_cookie(headers: &HeaderMap, mut f: impl FnMut(&str, &str, &str)) {
    for v in headers.get_all(http::header::COOKIE) {
        let text = String::from_utf8_lossy(v.as_bytes());
        for pair in text.split(';') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let k = k.trim();
            if !k.is_empty() {
                f(k, v.trim(), pair.trim());
            }
        }
    }
}

/// Cookies of every `Cookie` header, in order: `name=value` pairs split on `;`, names and
/// values trimmed, one pair of surrounding double quotes removed from a value (RFC 6265
/// `cookie-value`, as backends' cookie parsers unquote it); a pair without `=` is a name with
/// an empty value; empty names are dropped.
pub fn parse_cookies(headers: &HeaderMap) -> Vec<(String, String)> {
    let mut out = Vec::new();
    each_cookie(headers, |k, v, _| {
        let v = v
            .strip_prefix('"')
            .and_then(|x| x.strip_suffix('"'))
            .unwrap_or(v);
        out.push((k.to_string(), v.to_string()));
    });
    out
}

/// The `Cookie` header without the cookie `name` (every occurrence, as [`parse_cookies`]
/// splits it): the other cookies joined by `; `, or `None` when none is left.
pub fn without_cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    let mut kept: Vec<String> = Vec::new();
    each_cookie(headers, |k, _, pair| {
        if k != name {
            kept.push(pair.to_string());
        }
    });
    (!kept.is_empty()).then(|| kept.join("; "))
}

/// Bytes to text: valid UTF-8 as is; otherwise decode overlong 2-byte sequences of ASCII
/// (`C0 AE` → `.`, the classic traversal evasion) and replace other invalid bytes.
pub fn bytes_to_text(bytes: Vec<u8>) -> String {
    match String::from_utf8(bytes) {
        Ok(s) => s,
        Err(e) => {
            let b = e.into_bytes();
            let mut fixed = Vec::with_capacity(b.len());
            let mut i = 0;
            while i < b.len() {
                if (b[i] == 0xC0 || b[i] == 0xC1) && i + 1 < b.len() && (b[i + 1] & 0xC0) == 0x80 {
                    fixed.push(((b[i] & 0x1F) << 6) | (b[i + 1] & 0x3F));
                    i += 2;
                } else if b[i] == 0xE0
                    && i + 2 < b.len()
                    && b[i + 1] == 0x80
                    && (b[i + 2] & 0xC0) == 0x80
                {
                    fixed.push(b[i + 2] & 0x3F);
                    i += 3;
                } else {
                    fixed.push(b[i]);
                    i += 1;
                }
            }
            String::from_utf8_lossy(&fixed).into_owned()
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn a_cookie_is_removed_from_every_cookie_header() {
        let mut h = HeaderMap::new();
        h.append(
            http::header::COOKIE,
            "theme=dark; at=SECRET".parse().unwrap(),
        );
        h.append(http::header::COOKIE, "at=SECRET2;lang=en".parse().unwrap());
        assert_eq!(
            without_cookie(&h, "at").as_deref(),
            Some("theme=dark; lang=en")
        );
        let mut only = HeaderMap::new();
        only.insert(http::header::COOKIE, "at=x".parse().unwrap());
        assert_eq!(without_cookie(&only, "at"), None);
    }

    #[test]
    fn urlencoded_decodes_once_with_overlong_ascii() {
        let p = parse_urlencoded(b"user=%61lice&a+b=c%20d&dot=%c0%ae&&e");
        assert_eq!(
            p,
            [
                ("user".to_string(), "alice".to_string()),
                ("a b".into(), "c d".into()),
                ("dot".into(), ".".into()),
                ("e".into(), String::new()),
            ]
        );
    }

    #[test]
    fn cookies_are_trimmed_and_unquoted() {
        let mut h = HeaderMap::new();
        h.append("cookie", "a=1; b=\"two\" ;flag".parse().unwrap());
        h.append("cookie", "c = 3".parse().unwrap());
        let c = parse_cookies(&h);
        let pairs: Vec<(&str, &str)> = c.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(pairs, [("a", "1"), ("b", "two"), ("flag", ""), ("c", "3")]);
    }
}
