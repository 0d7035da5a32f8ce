//! The one request model (every phase, every stage): a request's parts, parsed lazily and at
//! most once per request, whoever asks first. Rules, validation and rate-limit keys all read
//! it, so they cannot disagree about what a request says: `?user=%61lice` is the user `alice`
//! for a rate-limit key, a schema and a rule alike, as it is for the backend.
//!
//! The view ([`Request`]) is a handful of references, rebuilt for each phase at no cost; the
//! parsed parts live in a [`RequestCache`] owned by the per-request context, so what the
//! header phase parsed (query, cookies) the body phase reuses. Body parts (form, JSON, XML)
//! are only parsed by stages after the body pre-read.

mod decode;
pub mod json;
mod multipart;

use std::net::IpAddr;
use std::sync::OnceLock;

use http::HeaderMap;

use crate::identity::geo::CountryCode;
pub use decode::{bytes_to_text, parse_cookies, parse_urlencoded};

/// Parsed parts of one request, filled on first use. Owned by the per-request context, which
/// pingora requires to be `Sync`: hence `OnceLock` (an uncontended atomic per first use).
#[derive(Debug, Default)]
pub struct RequestCache {
    query_pairs: OnceLock<Vec<(String, String)>>,
    cookies: OnceLock<Vec<(String, String)>>,
    body_kind: OnceLock<BodyKind>,
    form: OnceLock<ParsedForm>,
    json_doc: OnceLock<Result<serde_json::Value, JsonError>>,
    json: OnceLock<ParsedJson>,
    xml: OnceLock<(Vec<String>, bool)>,
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
    /// Raw path, as received.
    pub path: &'a str,
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

/// Form fields and uploaded file names.
#[derive(Debug, Default)]
pub struct ParsedForm {
    /// (name, value) of every non-file field.
    pub fields: Vec<(String, String)>,
    /// Uploaded file names.
    pub files: Vec<String>,
    /// The multipart body did not parse to its end.
    pub malformed: bool,
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

/// `Content-Length` as a number; `None` when absent or not a plain number (the HTTP layer has
/// already refused conflicting values). The one parser of it: body pre-read, validation and
/// rules all call this.
pub fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
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
            path,
            query,
            headers,
            body,
            body_read: true,
            body_complete: true,
            client_ip,
            country,
            asn,
            cache: Cache::Owned(Box::default()),
        }
    }

    /// A view of a request head, sharing `cache` with the other phases of the same request.
    pub fn of_head(head: &'a http::request::Parts, cache: &'a RequestCache) -> Self {
        Request {
            method: head.method.as_str(),
            path: head.uri.path(),
            query: head.uri.query().unwrap_or(""),
            headers: &head.headers,
            body: &[],
            body_read: false,
            body_complete: false,
            client_ip: None,
            country: None,
            asn: None,
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

    /// JSON members of a JSON body (every level), and whether it failed to parse.
    pub fn json(&self) -> &ParsedJson {
        self.cache().json.get_or_init(|| {
            if self.body_kind() != BodyKind::Json || self.body.is_empty() {
                return ParsedJson::default();
            }
            match self.json_document() {
                Ok(v) => {
                    let mut members = Vec::new();
                    flatten_json(v, &mut String::new(), None, &mut members, 0);
                    ParsedJson {
                        members,
                        malformed: false,
                    }
                }
                Err(_) => ParsedJson {
                    members: Vec::new(),
                    malformed: true,
                },
            }
        })
    }

    /// How the body is parsed, decided once per request from the content type.
    pub fn body_kind(&self) -> BodyKind {
        *self
            .cache()
            .body_kind
            .get_or_init(|| self.detect_body_kind())
    }

    fn detect_body_kind(&self) -> BodyKind {
        let ct = self.content_type().trim_start();
        let starts = |p: &str| ct.len() >= p.len() && ct[..p.len()].eq_ignore_ascii_case(p);
        let essence = ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if starts("application/x-www-form-urlencoded") {
            BodyKind::Form
        } else if starts("multipart/form-data") {
            BodyKind::Multipart
        } else if essence.contains("json")
            || (ct.is_empty() && self.body.first().is_some_and(|b| *b == b'{' || *b == b'['))
        {
            BodyKind::Json
        } else if essence.ends_with("/xml") || essence.ends_with("+xml") {
            BodyKind::Xml
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
    (out, malformed || !elements)
}

/// JSON nesting deeper than this is not inspected further (bounds work on hostile bodies).
const MAX_JSON_DEPTH: usize = 64;

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

fn flatten_json(
    v: &serde_json::Value,
    ptr: &mut String,
    key: Option<&str>,
    out: &mut Vec<JsonMember>,
    depth: usize,
) {
    if depth > MAX_JSON_DEPTH {
        return;
    }
    match v {
        serde_json::Value::Object(m) => {
            if let Some(k) = key {
                out.push(JsonMember {
                    pointer: ptr.clone(),
                    key: Some(k.to_string()),
                    scalar: None,
                });
            }
            for (k, child) in m {
                let len = ptr.len();
                ptr.push('/');
                ptr.push_str(&k.replace('~', "~0").replace('/', "~1"));
                flatten_json(child, ptr, Some(k), out, depth + 1);
                ptr.truncate(len);
            }
        }
        serde_json::Value::Array(a) => {
            if let Some(k) = key {
                out.push(JsonMember {
                    pointer: ptr.clone(),
                    key: Some(k.to_string()),
                    scalar: None,
                });
            }
            for (i, child) in a.iter().enumerate() {
                let len = ptr.len();
                ptr.push('/');
                ptr.push_str(&i.to_string());
                flatten_json(child, ptr, None, out, depth + 1);
                ptr.truncate(len);
            }
        }
        scalar => {
            let text = match scalar {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Null => String::new(),
                other => other.to_string(),
            };
            out.push(JsonMember {
                pointer: ptr.clone(),
                key: key.map(str::to_string),
                scalar: Some(text),
            });
        }
    }
}
