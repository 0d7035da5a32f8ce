//! The one request model (every phase, every stage): a request's parts, parsed lazily and at
//! most once per request, whoever asks first. Rules, validation and rate-limit keys all read
//! it, so they cannot disagree about what a request says: `?user=%61lice` is the user `alice`
//! for a rate-limit key, a schema and a rule alike, as it is for the backend.
//!
//! The view ([`Request`]) is a handful of references, rebuilt for each phase at no cost; the
//! parsed parts live in a [`RequestCache`] owned by the per-request context, so what the
//! header phase parsed (query, cookies) the body phase reuses. Body parts (form, JSON, XML)
//! are only parsed by stages after the body pre-read.

pub mod canon;
mod decode;
pub mod grammar;
pub mod json;
pub mod jsonrpc;
mod multipart;

use std::net::IpAddr;
use std::sync::OnceLock;

use http::HeaderMap;

use crate::identity::geo::CountryCode;
pub use decode::{bytes_to_text, parse_cookies, parse_urlencoded, without_cookie};

/// Parsed parts of one request, filled on first use. Owned by the per-request context, which
/// pingora requires to be `Sync`: hence `OnceLock` (an uncontended atomic per first use).
#[derive(Debug, Default)]
pub struct RequestCache {
    path: OnceLock<String>,
    custom_headers: OnceLock<Vec<bool>>,
    query_pairs: OnceLock<Vec<(String, String)>>,
    cookies: OnceLock<Vec<(String, String)>>,
    body_kind: OnceLock<BodyKind>,
    form: OnceLock<ParsedForm>,
    json_doc: OnceLock<Result<serde_json::Value, JsonError>>,
    json: OnceLock<ParsedJson>,
    xml: OnceLock<(Vec<String>, bool)>,
    /// Verified token claims (set by the auth stage).
    claims: OnceLock<std::sync::Arc<serde_json::Map<String, serde_json::Value>>>,
    /// JSON-RPC messages of the body (`None`: not JSON).
    mcp: OnceLock<Option<Result<jsonrpc::Messages, jsonrpc::Invalid>>>,
}

/// Why a body is not valid JSON, with where (for the 400 `invalid_json` answer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonError {
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// The parser's message.
    pub message: String,
}

enum Cache<'a> {
    Owned(Box<RequestCache>),
    Shared(&'a RequestCache),
}

/// A request as every stage sees it.
pub struct Request<'a> {
    /// Method.
    pub method: &'a str,
    /// Raw path, as received (percent-encoded; [`Request::path`] is the normalized one).
    pub raw_path: &'a str,
    /// Raw query string (without `?`).
    pub query: &'a str,
    /// Headers.
    pub headers: &'a HeaderMap,
    /// The pre-read body bytes (empty when none was read).
    pub body: &'a [u8],
    /// Whether the body was pre-read (stages after the body step).
    pub body_read: bool,
    /// Whether `body` is the whole body (false when cut at the inspection limit).
    pub body_complete: bool,
    /// Client address.
    pub client_ip: Option<IpAddr>,
    /// Client country.
    pub country: Option<CountryCode>,
    /// Client ASN.
    pub asn: Option<u32>,
    /// The client's TLS connection (fingerprints, client certificate), on TLS listeners.
    pub tls: Option<&'a crate::tls::TlsConnection>,
    cache: Cache<'a>,
}

/// The JSON members of a body, and whether it was JSON that parsed.
#[derive(Debug, Default)]
pub struct ParsedJson {
    /// Members in document order.
    pub members: Vec<JsonMember>,
    /// The body claimed to be JSON (or looked like it) but did not parse.
    pub malformed: bool,
}

/// The value of a parameter of a media type (`charset` of `text/plain; charset=utf-8`),
/// unquoted; `None` when absent.
pub fn content_type_param<'a>(content_type: &'a str, name: &str) -> Option<&'a str> {
    content_type.split(';').skip(1).find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().trim_matches('"'))
    })
}

/// Form fields and uploaded file names.
#[derive(Debug, Default)]
pub struct ParsedForm {
    /// (name, value) of every non-file field.
    pub fields: Vec<(String, String)>,
    /// Uploaded file names (the `filename` parameter).
    pub files: Vec<String>,
    /// Field names of the file parts (their `name` parameter), in order: names like any
    /// other form field's, which parsers split on `;` and `=` as readily.
    pub file_fields: Vec<String>,
    /// Contents of uploaded files that are text (UTF-8), in order.
    pub file_texts: Vec<String>,
    /// The multipart body did not parse to its end, or had more parts than are inspected.
    pub malformed: bool,
    /// Why the body must be refused (ambiguous boundary or part headers).
    pub refusal: Option<canon::Refusal>,
}

/// How the body is parsed, from its content type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// `application/x-www-form-urlencoded`.
    Form,
    /// `multipart/form-data`.
    Multipart,
    /// A JSON type, or no type and a body that starts like JSON.
    Json,
    /// An XML type.
    Xml,
    /// Anything else.
    Other,
}

/// `Content-Length` as a number; `None` when absent, repeated or not one plain number (the
/// proxy refuses those before any stage, see [`canon::framing`], which reads it the same way
/// with [`canon::parse_length`]). Validation and the rules call this.
pub fn content_length(headers: &HeaderMap) -> Option<u64> {
    let mut all = headers.get_all(http::header::CONTENT_LENGTH).iter();
    match (all.next(), all.next()) {
        (Some(v), None) => canon::parse_length(v.as_bytes()),
        _ => None,
    }
}

impl RequestCache {
    /// The normalized path recorded by [`RequestCache::set_path`] (`/` before that).
    pub fn path(&self) -> &str {
        self.path.get().map_or("/", String::as_str)
    }

    /// Records the normalized path of the request (done once, before routing).
    pub fn set_path(&self, path: String) {
        // Set once per request, before any stage reads it.
        let _ = self.path.set(path);
    }
}

impl<'a> Request<'a> {
    /// A view of one request with a cache of its own (tests, `palisade explain`, benches).
    #[allow(clippy::too_many_arguments, reason = "plain data constructor")]
    pub fn new(
        method: &'a str,
        path: &'a str,
        query: &'a str,
        headers: &'a HeaderMap,
        body: &'a [u8],
        client_ip: Option<IpAddr>,
        country: Option<CountryCode>,
        asn: Option<u32>,
    ) -> Self {
        Request {
            method,
            raw_path: path,
            query,
            headers,
            body,
            body_read: true,
            body_complete: true,
            client_ip,
            country,
            asn,
            tls: None,
            cache: Cache::Owned(Box::default()),
        }
    }

    /// The same request with an empty cache of its own: everything parsed again on use
    /// (benchmarks measure a whole request's inspection this way).
    pub fn fresh(&self) -> Request<'a> {
        Request {
            cache: Cache::Owned(Box::default()),
            ..*self
        }
    }

    /// A view of a request head, sharing `cache` with the other phases of the same request.
    pub fn of_head(head: &'a http::request::Parts, cache: &'a RequestCache) -> Self {
        Request {
            method: head.method.as_str(),
            raw_path: head.uri.path(),
            query: head.uri.query().unwrap_or(""),
            headers: &head.headers,
            body: &[],
            body_read: false,
            body_complete: false,
            client_ip: None,
            country: None,
            asn: None,
            tls: None,
            cache: Cache::Shared(cache),
        }
    }

    /// The same view with the client's address and geo data.
    pub fn with_client(
        mut self,
        ip: Option<IpAddr>,
        country: Option<CountryCode>,
        asn: Option<u32>,
    ) -> Self {
        self.client_ip = ip;
        self.country = country;
        self.asn = asn;
        self
    }

    /// The same view with the client's TLS connection.
    pub fn with_tls(mut self, tls: Option<&'a crate::tls::TlsConnection>) -> Self {
        self.tls = tls;
        self
    }

    /// Records the verified claims of the request's token (the auth stage); later stages and
    /// phases of the same request read them with [`Request::claims`].
    pub fn set_claims(&self, claims: std::sync::Arc<serde_json::Map<String, serde_json::Value>>) {
        let _ = self.cache().claims.set(claims);
    }

    /// The verified token claims, once the auth stage has run.
    pub fn claims(&self) -> Option<&serde_json::Map<String, serde_json::Value>> {
        self.cache().claims.get().map(|c| &**c)
    }

    /// A claim as text (`sub`, `client_id`; numbers and booleans as written, arrays joined by
    /// spaces).
    pub fn claim(&self, name: &str) -> Option<std::borrow::Cow<'_, str>> {
        use std::borrow::Cow;
        match self.claims()?.get(name)? {
            serde_json::Value::String(s) => Some(Cow::Borrowed(s.as_str())),
            serde_json::Value::Array(a) => Some(Cow::Owned(
                a.iter()
                    .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string))
                    .collect::<Vec<_>>()
                    .join(" "),
            )),
            serde_json::Value::Null => None,
            v => Some(Cow::Owned(v.to_string())),
        }
    }

    /// The same view with the pre-read body.
    pub fn with_body(mut self, body: Option<&'a [u8]>, complete: bool) -> Self {
        self.body = body.unwrap_or(&[]);
        self.body_read = body.is_some();
        self.body_complete = complete;
        self
    }

    fn cache(&self) -> &RequestCache {
        match &self.cache {
            Cache::Owned(c) => c,
            Cache::Shared(c) => c,
        }
    }

    /// The decoded, normalized path (see [`canon::normalize_path`]) that routing, rules,
    /// validation and rate limits use. The proxy sets it before routing, with the configured
    /// encoded-slash policy; otherwise it is computed on first use with the default policy
    /// (and a path that does not normalize is used raw: the proxy refuses such requests).
    pub fn path(&self) -> &str {
        self.cache().path.get_or_init(|| {
            canon::normalize_path(self.raw_path, canon::EncodedSlash::default())
                .map(|p| p.decoded())
                .unwrap_or_else(|_| self.raw_path.to_string())
        })
    }

    /// `Content-Length`, parsed by the one parser.
    pub fn content_length(&self) -> Option<u64> {
        content_length(self.headers)
    }

    /// The first value of a query argument, decoded.
    pub fn query_arg(&self, name: &str) -> Option<&str> {
        self.query_pairs()
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The first value of a cookie.
    pub fn cookie(&self, name: &str) -> Option<&str> {
        self.cookies()
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as a JSON document, parsed once (strictly: duplicate keys are an error, see
    /// [`json`]), whatever its declared type; validation reads it when an operation's media
    /// type is JSON, the rules when the body kind is JSON.
    pub fn json_document(&self) -> &Result<serde_json::Value, JsonError> {
        self.cache().json_doc.get_or_init(|| {
            json::parse_strict(self.body).map_err(|e| JsonError {
                line: e.line(),
                column: e.column(),
                message: e.to_string(),
            })
        })
    }

    /// The JSON-RPC messages of the body (MCP routes), read once; `None` when the body is
    /// not JSON (or was not read).
    pub fn mcp(&self) -> Option<&Result<jsonrpc::Messages, jsonrpc::Invalid>> {
        self.cache()
            .mcp
            .get_or_init(|| {
                if !self.body_read || self.body.is_empty() {
                    return None;
                }
                self.json_document().as_ref().ok().map(jsonrpc::parse)
            })
            .as_ref()
    }

    /// JSON members of a JSON body (every level, every occurrence of a repeated key), and
    /// whether it failed to parse.
    pub fn json(&self) -> &ParsedJson {
        self.cache().json.get_or_init(|| {
            if self.body_kind() != BodyKind::Json || self.body.is_empty() {
                return ParsedJson::default();
            }
            let essence = self.essence();
            let parsed = if is_json_stream(&essence) {
                json::stream_members(self.body)
            } else {
                // An undeclared body shaped like JSON may be a stream all the same (lines of
                // NDJSON sent as `text/plain`, or with no type): a lenient backend reads it
                // line by line, so it is inspected document by document, not as text.
                // Declared JSON that is not one document stays malformed (and refused).
                json::members(self.body).or_else(|e| {
                    if self.declares_json() {
                        Err(e)
                    } else {
                        json::stream_members(self.body)
                    }
                })
            };
            match parsed {
                Ok(members) => ParsedJson {
                    members,
                    malformed: false,
                },
                Err(_) => ParsedJson {
                    members: Vec::new(),
                    malformed: true,
                },
            }
        })
    }

    /// Refuses a pre-read body that cannot be inspected as the backend will read it: JSON
    /// nested deeper than [`json::MAX_DEPTH`], a multipart body whose boundary or part headers
    /// can be read two ways, a charset whose bytes do not show ASCII syntax as ASCII (UTF-7,
    /// UTF-16, EBCDIC …). Run once, right after the body is read, before any stage sees it.
    pub fn body_refusal(&self) -> Option<canon::Refusal> {
        if let Some(charset) = content_type_param(self.content_type(), "charset") {
            let ok = [
                "utf-8",
                "utf8",
                "us-ascii",
                "ascii",
                "iso-8859-1",
                "latin1",
                "windows-1252",
            ]
            .iter()
            .any(|c| charset.eq_ignore_ascii_case(c));
            if !ok {
                return Some(canon::Refusal {
                    status: 415,
                    reason: "unsupported_media_type",
                    detail: "a charset other than UTF-8, US-ASCII or Latin-1",
                });
            }
        }
        if self.body.is_empty() {
            return None;
        }
        match self.body_kind() {
            BodyKind::Json if json::depth(self.body) > json::MAX_DEPTH => Some(canon::Refusal {
                status: 400,
                reason: "json_too_deep",
                detail: "JSON nested deeper than 64 levels",
            }),
            // Declared JSON that is not JSON has no single reading: lenient parsers accept
            // `NaN`, comments or trailing commas that the inspection cannot walk.
            BodyKind::Json
                if self.body_complete && self.declares_json() && self.json().malformed =>
            {
                Some(canon::Refusal {
                    status: 400,
                    reason: "invalid_json",
                    detail: "a body declared as JSON that is not valid JSON",
                })
            }
            BodyKind::Multipart => self.form().refusal.clone(),
            _ => None,
        }
    }

    /// How the body is parsed, decided once per request from the content type.
    pub fn body_kind(&self) -> BodyKind {
        *self
            .cache()
            .body_kind
            .get_or_init(|| self.detect_body_kind())
    }

    /// Whether the `Content-Type` says JSON (anywhere in it, as lenient parsers match).
    fn declares_json(&self) -> bool {
        self.content_type()
            .as_bytes()
            .windows(4)
            .any(|w| w.eq_ignore_ascii_case(b"json"))
    }

    /// The media type of the `Content-Type`, without parameters, lowercased.
    fn essence(&self) -> String {
        self.content_type()
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase()
    }

    fn detect_body_kind(&self) -> BodyKind {
        let ct = self.content_type().trim_start();
        let starts = |p: &str| ct.len() >= p.len() && ct[..p.len()].eq_ignore_ascii_case(p);
        let essence = self.essence();
        if starts("application/x-www-form-urlencoded") {
            BodyKind::Form
        } else if starts("multipart/form-data") {
            BodyKind::Multipart
        } else if essence.contains("json") {
            BodyKind::Json
        } else if essence.ends_with("/xml") || essence.ends_with("+xml") {
            BodyKind::Xml
        } else if json::looks_like_json(self.body) {
            // Undeclared (or `text/plain`) but shaped like JSON: lenient backends parse it
            // (Flask's `get_json(force=True)`, Express with `type: '*/*'`), so it is inspected
            // as JSON; if it does not parse, as text.
            BodyKind::Json
        } else {
            BodyKind::Other
        }
    }

    /// Text and attribute values of an XML body, and whether it failed to parse.
    pub fn xml(&self) -> &(Vec<String>, bool) {
        self.cache().xml.get_or_init(|| {
            if self.body_kind() == BodyKind::Xml && !self.body.is_empty() {
                xml_values(self.body)
            } else {
                (Vec::new(), false)
            }
        })
    }

    /// The `Content-Type` header (empty when absent or not text).
    pub fn content_type(&self) -> &str {
        self.headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// Query arguments, decoded once by [`parse_urlencoded`], in order (duplicates kept).
    pub fn query_pairs(&self) -> &[(String, String)] {
        self.cache()
            .query_pairs
            .get_or_init(|| parse_urlencoded(self.query.as_bytes()))
    }

    /// For each header, in [`HeaderMap::iter`] order, whether it carries free input: a
    /// header that is not one of the standard ones with a fixed grammar
    /// ([`grammar::STANDARD_HEADERS`]), or a standard one whose value breaks its grammar.
    /// Computed once per request (the rules read it for every rule on `headers.custom`).
    pub fn custom_headers(&self) -> &[bool] {
        self.cache().custom_headers.get_or_init(|| {
            self.headers
                .iter()
                .map(|(k, v)| {
                    grammar::STANDARD_HEADERS
                        .binary_search(&k.as_str())
                        .is_err()
                        || !grammar::conforms(k.as_str(), v.as_bytes())
                })
                .collect()
        })
    }

    /// Cookies of every `Cookie` header, parsed once by [`parse_cookies`], in order.
    pub fn cookies(&self) -> &[(String, String)] {
        self.cache()
            .cookies
            .get_or_init(|| parse_cookies(self.headers))
    }

    /// Form fields from an urlencoded or multipart body.
    pub fn form(&self) -> &ParsedForm {
        self.cache().form.get_or_init(|| match self.body_kind() {
            BodyKind::Form => ParsedForm {
                fields: parse_urlencoded(self.body),
                ..ParsedForm::default()
            },
            BodyKind::Multipart => multipart::parse(self.content_type(), self.body),
            _ => ParsedForm::default(),
        })
    }
}

/// At most this many XML values are inspected (bounds work on hostile bodies).
const MAX_XML_VALUES: usize = 4096;

/// Text runs (with entity references kept as written) and attribute values of an XML
/// document, in order; stops at the first syntax error, keeping what was read, and reports
/// the document malformed then (or when it has no element at all), so the rules also see it
/// as `body.unparsed`. Namespace declarations (`xmlns`, `xmlns:*`) are skipped: they are URIs.
fn xml_values(body: &[u8]) -> (Vec<String>, bool) {
    use quick_xml::events::Event;
    let doc = String::from_utf8_lossy(body);
    let mut reader = quick_xml::Reader::from_str(&doc);
    let mut out = Vec::new();
    let mut text = String::new();
    let flush = |text: &mut String, out: &mut Vec<String>| {
        let t = text.trim();
        if !t.is_empty() {
            out.push(t.to_string());
        }
        text.clear();
    };
    let mut elements = false;
    let mut malformed = false;
    while out.len() < MAX_XML_VALUES {
        match reader.read_event() {
            Ok(Event::Text(t)) => text.push_str(&t),
            Ok(Event::CData(t)) => text.push_str(&t),
            Ok(Event::GeneralRef(r)) => {
                text.push('&');
                text.push_str(&r);
                text.push(';');
            }
            Ok(Event::Start(e) | Event::Empty(e)) => {
                elements = true;
                flush(&mut text, &mut out);
                for a in e.attributes().with_checks(false) {
                    let Ok(a) = a else {
                        // Unquoted or broken attributes: HTML sent as XML, inspect it raw too.
                        malformed = true;
                        continue;
                    };
                    let key = a.key.as_ref();
                    if key == "xmlns" || key.starts_with("xmlns:") {
                        continue;
                    }
                    if !a.value.trim().is_empty() {
                        out.push(a.value.into_owned());
                    }
                }
            }
            Ok(Event::Eof) => break,
            Err(_) => {
                malformed = true;
                break;
            }
            Ok(_) => flush(&mut text, &mut out),
        }
    }
    flush(&mut text, &mut out);
    // Values past the cap were not read: the rules see the whole body as text instead.
    if out.len() >= MAX_XML_VALUES {
        malformed = true;
    }
    (out, malformed || !elements)
}

/// One member of a JSON document.
#[derive(Debug, Clone)]
pub struct JsonMember {
    /// Its JSON pointer.
    pub pointer: String,
    /// Its key, when it is an object entry.
    pub key: Option<String>,
    /// Its value as text, when it is a scalar (strings, numbers, booleans; null is empty).
    pub scalar: Option<String>,
}

/// Line-delimited JSON streams (NDJSON, JSON Lines, RFC 7464 JSON text sequences): one JSON
/// document per line, parsed one by one (members under `/0`, `/1` …) rather than refused as
/// one malformed document.
fn is_json_stream(essence: &str) -> bool {
    ["ndjson", "jsonl", "jsonlines", "json-seq"]
        .iter()
        .any(|k| essence.contains(k))
}
