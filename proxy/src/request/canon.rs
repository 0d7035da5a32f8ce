//! The canonical request: framing, authority and path read once, the way the backend reads
//! them, before anything is routed or inspected.
//!
//! A WAF is bypassed whenever it and the backend disagree about what a request says: which
//! route a path belongs to (`/%61dmin`, `/x/../admin`, `/admin;x`), which host it is for
//! (`Host: api.example.com.`), where its body ends (`Content-Length: 13, 13`). This module
//! turns the head into one reading of each, and refuses what has no single reading, so that
//! routing, every stage and the backend agree. It is hand-written because no crate does what
//! a proxy needs here: `url` normalizes for browsers (and keeps `;` parameters and `%2F`),
//! `http` only parses; the rules are RFC 3986 §5.2.4 (dot segments) and §6.2.2
//! (percent-encoding normalization) plus what servers are known to do beyond them (Tomcat's
//! `;` path parameters, IIS's backslashes, merged slashes).

use http::HeaderMap;

/// Why a request is refused before inspection (always a client error).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// HTTP status (400, 431 …).
    pub status: u16,
    /// Machine-readable reason, the `error` of the JSON answer.
    pub reason: &'static str,
    /// What exactly was wrong (logged, never echoed with request data).
    pub detail: &'static str,
}

const fn refuse(reason: &'static str, detail: &'static str) -> Refusal {
    Refusal {
        status: 400,
        reason,
        detail,
    }
}

/// How the body of a request is delimited, as the HTTP layer reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Framing {
    /// `Transfer-Encoding: chunked`.
    pub chunked: bool,
    /// `Content-Length`, when given.
    pub length: Option<u64>,
}

/// Reads the framing headers and refuses every form two HTTP implementations could read
/// differently (RFC 9112 §6.3): more than one `Content-Length` field or a list in one
/// (`13, 13`, which some libraries accept as 13 and others reject), anything but digits,
/// `Transfer-Encoding` other than exactly `chunked` (`CHUNKED` is the same coding and is
/// accepted; `gzip, chunked`, `xchunked` or two fields are not), and both headers together.
pub fn framing(headers: &HeaderMap) -> Result<Framing, Refusal> {
    let mut cl = headers.get_all(http::header::CONTENT_LENGTH).iter();
    let length = match (cl.next(), cl.next()) {
        (None, _) => None,
        (Some(_), Some(_)) => {
            return Err(refuse(
                "bad_content_length",
                "more than one Content-Length field",
            ))
        }
        (Some(v), None) => Some(parse_length(v.as_bytes()).ok_or(refuse(
            "bad_content_length",
            "Content-Length is not one decimal number",
        ))?),
    };
    let mut te = headers.get_all(http::header::TRANSFER_ENCODING).iter();
    let chunked = match (te.next(), te.next()) {
        (None, _) => false,
        (Some(v), None) if trim_ows(v.as_bytes()).eq_ignore_ascii_case(b"chunked") => true,
        _ => {
            return Err(Refusal {
                status: 501,
                reason: "unsupported_transfer_encoding",
                detail: "Transfer-Encoding other than one `chunked`",
            })
        }
    };
    if chunked && length.is_some() {
        return Err(refuse(
            "ambiguous_framing",
            "both Content-Length and Transfer-Encoding",
        ));
    }
    Ok(Framing { chunked, length })
}

/// One `Content-Length` value: decimal digits only (optional surrounding whitespace), no sign,
/// no list, at most 18 digits.
pub fn parse_length(value: &[u8]) -> Option<u64> {
    let digits = trim_ows(value);
    if digits.is_empty() || digits.len() > 18 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(
        digits
            .iter()
            .fold(0u64, |n, d| n * 10 + u64::from(d - b'0')),
    )
}

fn trim_ows(b: &[u8]) -> &[u8] {
    let start = b.iter().position(|c| *c != b' ' && *c != b'\t');
    let end = b.iter().rposition(|c| *c != b' ' && *c != b'\t');
    match (start, end) {
        (Some(s), Some(e)) => &b[s..=e],
        _ => &[],
    }
}

/// The host a request is for: lower-case, without a trailing dot, and its port when given.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Authority {
    /// Host name or IP literal (IPv6 in brackets), canonical.
    pub host: String,
    /// The port, when the request named one.
    pub port: Option<u16>,
}

impl Authority {
    /// `host[:port]`, as forwarded in `Host`.
    pub fn to_header(&self) -> String {
        match self.port {
            Some(p) => format!("{}:{p}", self.host),
            None => self.host.clone(),
        }
    }
}

/// The one authority of a request: from the authority of the request target (`target`: the
/// absolute form's, or HTTP/2's `:authority`) or the `Host` header. A request with neither,
/// with several `Host` fields, or whose target and `Host` name different hosts is refused:
/// each is a way to have the proxy route on one host while the backend serves another.
pub fn authority(target: Option<&[u8]>, headers: &HeaderMap) -> Result<Authority, Refusal> {
    let mut hosts = headers.get_all(http::header::HOST).iter();
    let header = match (hosts.next(), hosts.next()) {
        (_, Some(_)) => return Err(refuse("bad_host", "more than one Host field")),
        (Some(v), None) => Some(parse_authority(v.as_bytes())?),
        (None, None) => None,
    };
    let target = match target {
        Some(a) => Some(parse_authority(a)?),
        None => None,
    };
    match (target, header) {
        (Some(t), Some(h)) if t.host != h.host => Err(refuse(
            "bad_host",
            "the request target and Host name different hosts",
        )),
        (Some(t), _) => Ok(t),
        (None, Some(h)) => Ok(h),
        (None, None) => Err(refuse("bad_host", "no Host")),
    }
}

fn parse_authority(raw: &[u8]) -> Result<Authority, Refusal> {
    const BAD: Refusal = refuse("bad_host", "Host is not a host name or IP literal");
    let raw = std::str::from_utf8(trim_ows(raw)).map_err(|_| BAD)?;
    // Userinfo (`user@host`) is not allowed in HTTP targets (RFC 9110 §4.2.4).
    if raw.is_empty() || raw.contains('@') {
        return Err(BAD);
    }
    let (host, port) = if let Some(rest) = raw.strip_prefix('[') {
        let end = rest.find(']').ok_or(BAD)?;
        let literal = &rest[..end];
        literal.parse::<std::net::Ipv6Addr>().map_err(|_| BAD)?;
        (
            format!("[{}]", literal.to_ascii_lowercase()),
            &rest[end + 1..],
        )
    } else {
        let (h, p) = match raw.find(':') {
            Some(i) => (&raw[..i], &raw[i..]),
            None => (raw, ""),
        };
        let h = h.strip_suffix('.').unwrap_or(h);
        let ok = !h.is_empty()
            && h.len() <= 253
            && h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
            && !h.contains("..");
        if !ok {
            return Err(BAD);
        }
        (h.to_ascii_lowercase(), p)
    };
    let port = match port {
        "" => None,
        p => {
            let digits = p.strip_prefix(':').ok_or(BAD)?;
            if digits.is_empty() {
                None
            } else if digits.len() <= 5 && digits.bytes().all(|b| b.is_ascii_digit()) {
                Some(digits.parse::<u16>().map_err(|_| BAD)?)
            } else {
                return Err(BAD);
            }
        }
    };
    Ok(Authority { host, port })
}

/// What an encoded slash (`%2F`) in a path means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EncodedSlash {
    /// A path separator, like `/` (what nginx and many frameworks do once decoded).
    #[default]
    Decode,
    /// Refuse the request (400).
    Reject,
    /// Part of the segment: routing and inspection see `%2F`, and it is forwarded encoded.
    Keep,
}

/// A path decoded and normalized once: what routes, rules, validation and rate-limit keys
/// see, and what is forwarded when the route forwards the normalized path.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NormalPath {
    /// Decoded segments without dot segments, empty segments or `;` parameters.
    segments: Vec<String>,
    /// The raw path ended with a slash.
    trailing_slash: bool,
}

impl NormalPath {
    /// The decoded, normalized path (`/admin/users`), for routing and inspection. With
    /// [`EncodedSlash::Keep`], a slash inside a segment shows as `%2F`.
    pub fn decoded(&self) -> String {
        let mut out = String::with_capacity(self.segments.iter().map(|s| s.len() + 1).sum());
        for s in &self.segments {
            out.push('/');
            for c in s.chars() {
                if c == '/' {
                    out.push_str("%2F");
                } else {
                    out.push(c);
                }
            }
        }
        if out.is_empty() || self.trailing_slash {
            out.push('/');
        }
        out
    }

    /// The same path percent-encoded for the request line: unreserved characters and the
    /// sub-delimiters that mean the same to every server stay literal; `;` (a parameter
    /// separator for Java servers), `%`, `?`, `#`, `\`, a slash inside a segment, spaces,
    /// controls and non-ASCII are encoded.
    pub fn encoded(&self) -> String {
        let mut out = String::with_capacity(self.segments.iter().map(|s| s.len() + 1).sum());
        for s in &self.segments {
            out.push('/');
            for &b in s.as_bytes() {
                let literal = is_path_literal(b);
                if literal {
                    out.push(b as char);
                } else {
                    out.push('%');
                    out.push(HEX[usize::from(b >> 4)] as char);
                    out.push(HEX[usize::from(b & 15)] as char);
                }
            }
        }
        if out.is_empty() || self.trailing_slash {
            out.push('/');
        }
        out
    }
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// Bytes a normalized path segment carries literally: unreserved characters and the
/// sub-delimiters every server reads alike (not `;`, a parameter separator for Java servers).
fn is_path_literal(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'-' | b'.'
                | b'_'
                | b'~'
                | b'!'
                | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b'='
                | b':'
                | b'@'
        )
}

/// Decodes and normalizes a raw request path:
/// - `;` starts a segment's parameters, which are dropped (`/admin;x`, `/..;/admin`): Java
///   servers route without them;
/// - percent-escapes are decoded once (`/%61dmin`); a malformed escape, a decoded control
///   character (NUL, CR, LF …) or bytes that are not UTF-8 (overlong forms such as `%c0%af`
///   included) are refused;
/// - `\` (raw or `%5C`) separates segments as `/` does, as IIS and Windows backends read it;
/// - `%2F` follows `slash`;
/// - empty segments (`//admin`) and `.` are dropped and `..` removes the segment before it
///   (RFC 3986 §5.2.4; never above the root), after decoding, so `%2e%2e` counts too.
///
/// A target that is not a path (`*` of `OPTIONS *`) normalizes to itself.
pub fn normalize_path(raw: &str, slash: EncodedSlash) -> Result<NormalPath, Refusal> {
    const BAD_ESCAPE: Refusal = refuse("bad_path", "malformed percent-escape in the path");
    const CONTROL: Refusal = refuse("bad_path", "control character in the path");
    const NOT_UTF8: Refusal = refuse("bad_path", "the decoded path is not UTF-8");
    const SLASH: Refusal = refuse("bad_path", "encoded slash in the path");
    let mut out = NormalPath::default();
    // Fast path: a path of plain segments (no escapes, parameters, backslashes, dot or empty
    // segments) is already normal; split it without decoding.
    if is_plain(raw) {
        out.trailing_slash = raw.len() > 1 && raw.ends_with('/');
        out.segments = raw
            .split('/')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        return Ok(out);
    }
    if raw == "*" {
        out.segments.push("*".into());
        return Ok(out);
    }
    let mut bytes = Vec::new();
    let mut pieces: Vec<Vec<u8>> = Vec::new();
    let last = raw.len().saturating_sub(1);
    out.trailing_slash = raw.len() > 1 && matches!(raw.as_bytes()[last], b'/' | b'\\');
    for raw_seg in raw.split(['/', '\\']) {
        // Parameters end at the next separator; `%3B` is data, not a separator.
        let seg = raw_seg.split(';').next().unwrap_or("");
        bytes.clear();
        let b = seg.as_bytes();
        let mut i = 0;
        while i < b.len() {
            let c = b[i];
            if c == b'%' {
                let hex = |x: u8| (x as char).to_digit(16);
                let (Some(h), Some(l)) = (
                    b.get(i + 1).copied().and_then(hex),
                    b.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err(BAD_ESCAPE);
                };
                bytes.push((h * 16 + l) as u8);
                i += 3;
            } else {
                bytes.push(c);
                i += 1;
            }
        }
        // Split what decoding revealed: `%5C` always, `%2F` by policy.
        let mut start = 0;
        for (j, &c) in bytes.iter().enumerate() {
            let separator = match c {
                b'\\' => true,
                b'/' => match slash {
                    EncodedSlash::Decode => true,
                    EncodedSlash::Reject => return Err(SLASH),
                    EncodedSlash::Keep => false,
                },
                c if c < 0x20 || c == 0x7f => return Err(CONTROL),
                _ => false,
            };
            if separator {
                pieces.push(bytes[start..j].to_vec());
                start = j + 1;
            }
        }
        pieces.push(bytes[start..].to_vec());
        for piece in pieces.drain(..) {
            let text = String::from_utf8(piece).map_err(|_| NOT_UTF8)?;
            match text.as_str() {
                "" | "." => {}
                ".." => {
                    out.segments.pop();
                }
                _ => out.segments.push(text),
            }
        }
    }
    if out.segments.is_empty() {
        out.trailing_slash = false;
    }
    Ok(out)
}

/// Whether a path is already normal: it starts with `/`, holds only characters that are
/// literal in a normalized path, and has no empty, `.` or `..` segment. Such a path
/// normalizes to itself, decoded and encoded alike (the common case, checked without
/// allocating).
pub fn is_plain(raw: &str) -> bool {
    let b = raw.as_bytes();
    if b.first() != Some(&b'/') {
        return false;
    }
    if !b.iter().all(|&c| c == b'/' || is_path_literal(c)) {
        return false;
    }
    // No `//`, and no segment that is `.` or `..` (a trailing `/` is fine).
    !raw.contains("//") && raw[1..].split('/').all(|seg| seg != "." && seg != "..")
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    fn norm(p: &str) -> String {
        normalize_path(p, EncodedSlash::Decode).unwrap().decoded()
    }

    #[test]
    fn every_spelling_of_admin_is_admin() {
        for p in [
            "/admin",
            "/%61dmin",
            "/%61%64%6D%69%6E",
            "//admin",
            "/./admin",
            "/x/../admin",
            "/admin;x",
            "/..;/admin",
            "/x/..;/admin",
            "/%2e%2e/admin",
            "/x/%2E%2E/admin",
            "\\admin",
            "/x\\..\\admin",
            "/x%5c..%5cadmin",
            "/../../admin",
            "/admin/.",
        ] {
            assert_eq!(norm(p), "/admin", "{p}");
        }
        assert_eq!(norm("/admin%2fusers"), "/admin/users");
        assert_eq!(norm("/admin/"), "/admin/");
        assert_eq!(norm("/"), "/");
        assert_eq!(norm(""), "/");
        assert_eq!(norm("/.."), "/");
        assert_eq!(norm("/a/b/../"), "/a/");
        assert_eq!(norm("/caf%C3%A9"), "/café");
        assert_eq!(norm("/a%3Bb"), "/a;b");
        // The fast path agrees with the full one.
        for p in [
            "/a/b",
            "/a/b/",
            "/",
            "/a.b/c~d",
            "/x/./y",
            "/x//y",
            "/x/..",
            "/a/.b/..c",
        ] {
            assert_eq!(
                is_plain(p),
                !matches!(p, "/x/./y" | "/x//y" | "/x/.."),
                "{p}"
            );
        }
        assert_eq!(norm("/a.b/c~d/"), "/a.b/c~d/");
        assert_eq!(norm("/a/.b/..c"), "/a/.b/..c");
    }

    #[test]
    fn bad_paths_are_refused() {
        for p in [
            "/a%zz",
            "/a%2",
            "/a%00b",
            "/a%0d%0aX",
            "/%c0%af",
            "/%ff",
            "/a%7f",
        ] {
            let e = normalize_path(p, EncodedSlash::Decode).unwrap_err();
            assert_eq!((e.status, e.reason), (400, "bad_path"), "{p}");
        }
        assert!(normalize_path("/a%2Fb", EncodedSlash::Reject).is_err());
        let kept = normalize_path("/files/a%2Fb", EncodedSlash::Keep).unwrap();
        assert_eq!(kept.decoded(), "/files/a%2Fb");
        assert_eq!(kept.encoded(), "/files/a%2Fb");
    }

    #[test]
    fn encoding_round_trips_and_quotes_what_servers_read_differently() {
        let n =
            normalize_path("/a%3Bb/c%20d/%25/%3F/caf%C3%A9/x:y@z", EncodedSlash::Decode).unwrap();
        assert_eq!(n.encoded(), "/a%3Bb/c%20d/%25/%3F/caf%C3%A9/x:y@z");
        let again = normalize_path(&n.encoded(), EncodedSlash::Decode).unwrap();
        assert_eq!(again, n);
    }

    #[test]
    fn framing_refuses_what_can_be_read_two_ways() {
        let h = |pairs: &[(&str, &str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.append(
                    http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                );
            }
            m
        };
        assert_eq!(
            framing(&h(&[("content-length", "13")])).unwrap().length,
            Some(13)
        );
        assert!(
            framing(&h(&[("transfer-encoding", "CHUNKED")]))
                .unwrap()
                .chunked
        );
        for bad in [
            h(&[("content-length", "13, 13")]),
            h(&[("content-length", "13"), ("content-length", "13")]),
            h(&[("content-length", "+13")]),
            h(&[("content-length", "-5")]),
            h(&[("content-length", "")]),
            h(&[("content-length", "0x10")]),
            h(&[("content-length", "5"), ("transfer-encoding", "chunked")]),
            h(&[("transfer-encoding", "gzip, chunked")]),
            h(&[("transfer-encoding", "xchunked")]),
            h(&[
                ("transfer-encoding", "chunked"),
                ("transfer-encoding", "chunked"),
            ]),
        ] {
            assert!(framing(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn one_authority() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(http::header::HOST, v.parse().unwrap());
            m
        };
        let origin = None;
        let a = authority(origin, &h("API.Example.com.:8080")).unwrap();
        assert_eq!((a.host.as_str(), a.port), ("api.example.com", Some(8080)));
        assert_eq!(
            authority(origin, &h("[::1]:80")).unwrap().host,
            "[::1]".to_string()
        );
        let absolute = Some(&b"api.example.com"[..]);
        assert_eq!(
            authority(absolute, &HeaderMap::new()).unwrap().host,
            "api.example.com"
        );
        assert!(authority(absolute, &h("other.example.com")).is_err());
        assert!(authority(origin, &HeaderMap::new()).is_err());
        for bad in ["a b", "a@b", "a..b", "x:y", "[zz]", "host:99999", "-"] {
            let r = authority(origin, &h(bad));
            if bad == "-" {
                // A bare label of allowed characters is a (strange) host name, not an attack.
                assert!(r.is_ok());
            } else {
                assert!(r.is_err(), "{bad}");
            }
        }
        let mut two = h("a");
        two.append(http::header::HOST, "b".parse().unwrap());
        assert!(authority(origin, &two).is_err());
    }
}
