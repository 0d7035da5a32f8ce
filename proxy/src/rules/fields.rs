//! Rules step (evaluate): the parts of a request a rule can inspect ("fields"), extracted
//! lazily once per request, each value tagged with where it came from so per-route
//! exclusions can skip it.

use std::borrow::Cow;
use std::cell::OnceCell;
use std::net::IpAddr;

use http::HeaderMap;

use crate::identity::geo::CountryCode;

/// Where a value came from; exclusions name these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Origin {
    /// A query argument.
    Query,
    /// A form field (urlencoded or multipart).
    Form,
    /// A JSON body member (name = JSON pointer).
    Json,
    /// A header.
    Header,
    /// A cookie.
    Cookie,
    /// The raw body.
    Body,
    /// The path.
    Path,
    /// The whole URI or query string.
    Uri,
    /// Anything else (method, client data, labels).
    Other,
}

/// A field a condition inspects.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Field {
    /// The method.
    Method,
    /// The path, raw (percent-encoded as received).
    Path,
    /// Path and query as received.
    Uri,
    /// The raw query string.
    QueryString,
    /// Query argument names (decoded once).
    QueryNames,
    /// Query argument values (decoded once).
    QueryValues,
    /// One query argument's values.
    QueryArg(String),
    /// One header's values.
    Header(String),
    /// All header names.
    HeaderNames,
    /// All header values.
    HeaderValues,
    /// Cookie names.
    CookieNames,
    /// Cookie values.
    CookieValues,
    /// One cookie.
    Cookie(String),
    /// The raw body (as inspected: at most the inspection limit).
    Body,
    /// Form field names (urlencoded and multipart).
    FormNames,
    /// Form field values (urlencoded and multipart; files' contents excluded).
    FormValues,
    /// One form field.
    FormField(String),
    /// Multipart file names.
    FileNames,
    /// JSON object keys (every level).
    JsonKeys,
    /// JSON scalar values (every level; strings, numbers, booleans as text).
    JsonValues,
    /// The value at a JSON pointer (`/user/name`).
    JsonPointer(String),
    /// Names of query args, form fields and JSON keys.
    ArgsNames,
    /// Values of query args, form fields and JSON members.
    ArgsValues,
    /// The client IP as text.
    ClientIp,
    /// The client country code.
    Country,
    /// The client ASN.
    Asn,
    /// Labels added by earlier rules.
    Labels,
}

impl Field {
    /// Parses a field as written in rule files (`query.values`, `header:user-agent`, …).
    pub fn parse(s: &str) -> Result<Field, String> {
        if let Some((kind, name)) = s.split_once(':') {
            let name = name.trim();
            if name.is_empty() {
                return Err(format!("field {s:?}: the name after `:` is empty"));
            }
            return Ok(match kind {
                "query" => Field::QueryArg(name.to_string()),
                "header" => Field::Header(name.to_ascii_lowercase()),
                "cookie" => Field::Cookie(name.to_string()),
                "form" => Field::FormField(name.to_string()),
                "json" if name.starts_with('/') => Field::JsonPointer(name.to_string()),
                "json" => return Err(format!("field {s:?}: a JSON pointer starts with `/` (e.g. json:/user/name)")),
                _ => return Err(format!("unknown field kind {kind:?} in {s:?}: use query:, header:, cookie:, form: or json:")),
            });
        }
        Ok(match s {
            "method" => Field::Method,
            "path" => Field::Path,
            "uri" => Field::Uri,
            "query_string" => Field::QueryString,
            "query.names" => Field::QueryNames,
            "query.values" => Field::QueryValues,
            "headers.names" => Field::HeaderNames,
            "headers.values" => Field::HeaderValues,
            "cookies.names" => Field::CookieNames,
            "cookies.values" => Field::CookieValues,
            "body" => Field::Body,
            "form.names" => Field::FormNames,
            "form.values" => Field::FormValues,
            "files.names" => Field::FileNames,
            "json.keys" => Field::JsonKeys,
            "json.values" => Field::JsonValues,
            "args.names" => Field::ArgsNames,
            "args.values" => Field::ArgsValues,
            "client_ip" => Field::ClientIp,
            "country" => Field::Country,
            "asn" => Field::Asn,
            "labels" => Field::Labels,
            _ => return Err(format!(
                "unknown field {s:?}; fields are method, path, uri, query_string, query.names, query.values, query:NAME, \
                 header:NAME, headers.names, headers.values, cookie:NAME, cookies.names, cookies.values, body, \
                 form.names, form.values, form:NAME, files.names, json.keys, json.values, json:/POINTER, \
                 args.names, args.values, client_ip, country, asn, labels"
            )),
        })
    }

    /// Whether reading this field needs the request body.
    pub fn needs_body(&self) -> bool {
        matches!(
            self,
            Field::Body
                | Field::FormNames
                | Field::FormValues
                | Field::FormField(_)
                | Field::FileNames
                | Field::JsonKeys
                | Field::JsonValues
                | Field::JsonPointer(_)
                | Field::ArgsNames
                | Field::ArgsValues
        )
    }

    /// Whether this field needs country/ASN.
    pub fn needs_geo(&self) -> bool {
        matches!(self, Field::Country | Field::Asn)
    }
}

/// One inspected value with its origin and name (argument name, header name, JSON pointer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Value<'a> {
    /// Where it came from.
    pub origin: Origin,
    /// Its name, when it has one.
    pub name: Option<Cow<'a, str>>,
    /// The text.
    pub text: Cow<'a, str>,
}

/// A request as the rules see it. Collections are parsed on first use.
pub struct RuleInput<'a> {
    /// Method.
    pub method: &'a str,
    /// Raw path.
    pub path: &'a str,
    /// Raw query string (without `?`).
    pub query: &'a str,
    /// Headers.
    pub headers: &'a HeaderMap,
    /// The inspected body bytes.
    pub body: &'a [u8],
    /// Client address.
    pub client_ip: Option<IpAddr>,
    /// Client country.
    pub country: Option<CountryCode>,
    /// Client ASN.
    pub asn: Option<u32>,
    query_pairs: OnceCell<Vec<(String, String)>>,
    cookies: OnceCell<Vec<(String, String)>>,
    form: OnceCell<ParsedForm>,
    json: OnceCell<Vec<JsonMember>>,
}

/// Form fields and uploaded file names.
#[derive(Debug, Default)]
pub struct ParsedForm {
    /// (name, value) of every non-file field.
    pub fields: Vec<(String, String)>,
    /// Uploaded file names.
    pub files: Vec<String>,
}

impl<'a> RuleInput<'a> {
    /// A view of one request.
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
        RuleInput {
            method,
            path,
            query,
            headers,
            body,
            client_ip,
            country,
            asn,
            query_pairs: OnceCell::new(),
            cookies: OnceCell::new(),
            form: OnceCell::new(),
            json: OnceCell::new(),
        }
    }

    fn content_type(&self) -> &str {
        self.headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    fn query_pairs(&self) -> &[(String, String)] {
        self.query_pairs.get_or_init(|| {
            form_urlencoded::parse(self.query.as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect()
        })
    }

    fn cookies(&self) -> &[(String, String)] {
        self.cookies.get_or_init(|| {
            self.headers
                .get_all(http::header::COOKIE)
                .iter()
                .flat_map(|v| {
                    String::from_utf8_lossy(v.as_bytes())
                        .split(';')
                        .map(str::to_string)
                        .collect::<Vec<_>>()
                })
                .filter_map(|pair| {
                    let (k, v) = pair.split_once('=').unwrap_or((pair.as_str(), ""));
                    let k = k.trim();
                    (!k.is_empty()).then(|| (k.to_string(), v.trim().to_string()))
                })
                .collect()
        })
    }

    /// Form fields from an urlencoded or multipart body.
    pub fn form(&self) -> &ParsedForm {
        self.form.get_or_init(|| {
            let ct = self.content_type().to_ascii_lowercase();
            if ct.starts_with("application/x-www-form-urlencoded") {
                ParsedForm {
                    fields: form_urlencoded::parse(self.body)
                        .map(|(k, v)| (k.into_owned(), v.into_owned()))
                        .collect(),
                    files: vec![],
                }
            } else if ct.starts_with("multipart/form-data") {
                super::multipart::parse(self.content_type(), self.body)
            } else {
                ParsedForm::default()
            }
        })
    }

    /// JSON members, in document order.
    fn json(&self) -> &[JsonMember] {
        self.json.get_or_init(|| {
            let ct = self.content_type().to_ascii_lowercase();
            let looks_json = ct.contains("json")
                || (ct.is_empty() && self.body.first().is_some_and(|b| *b == b'{' || *b == b'['));
            if !looks_json {
                return Vec::new();
            }
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(self.body) else {
                return Vec::new();
            };
            let mut out = Vec::new();
            flatten_json(&v, &mut String::new(), None, &mut out, 0);
            out
        })
    }

    /// The values of a field, borrowing from the request wherever possible.
    pub fn values<'s>(&'s self, field: &Field, labels: &[Cow<'static, str>]) -> Vec<Value<'s>> {
        fn bv<'s>(origin: Origin, name: Option<&'s str>, text: &'s str) -> Value<'s> {
            Value {
                origin,
                name: name.map(Cow::Borrowed),
                text: Cow::Borrowed(text),
            }
        }
        fn header_text(v: &http::HeaderValue) -> Cow<'_, str> {
            match v.to_str() {
                Ok(s) => Cow::Borrowed(s),
                Err(_) => String::from_utf8_lossy(v.as_bytes()),
            }
        }
        let pairs = |list: &'s [(String, String)],
                     origin: Origin,
                     names: bool,
                     only: Option<&str>|
         -> Vec<Value<'s>> {
            list.iter()
                .filter(|(k, _)| only.is_none_or(|o| o == k))
                .map(|(k, x)| bv(origin, Some(k), if names { k } else { x }))
                .collect()
        };
        match field {
            Field::Method => vec![bv(Origin::Other, None, self.method)],
            Field::Path => vec![bv(Origin::Path, None, self.path)],
            Field::Uri => {
                let text = if self.query.is_empty() {
                    Cow::Borrowed(self.path)
                } else {
                    Cow::Owned(format!("{}?{}", self.path, self.query))
                };
                vec![Value {
                    origin: Origin::Uri,
                    name: None,
                    text,
                }]
            }
            Field::QueryString => vec![bv(Origin::Uri, None, self.query)],
            Field::QueryNames => pairs(self.query_pairs(), Origin::Query, true, None),
            Field::QueryValues => pairs(self.query_pairs(), Origin::Query, false, None),
            Field::QueryArg(n) => pairs(self.query_pairs(), Origin::Query, false, Some(n)),
            Field::Header(h) => self
                .headers
                .get_all(h.as_str())
                .iter()
                .map(|x| Value {
                    origin: Origin::Header,
                    name: Some(Cow::Owned(h.clone())),
                    text: header_text(x),
                })
                .collect(),
            Field::HeaderNames => self
                .headers
                .keys()
                .map(|k| bv(Origin::Header, Some(k.as_str()), k.as_str()))
                .collect(),
            Field::HeaderValues => self
                .headers
                .iter()
                .map(|(k, x)| Value {
                    origin: Origin::Header,
                    name: Some(Cow::Borrowed(k.as_str())),
                    text: header_text(x),
                })
                .collect(),
            Field::CookieNames => pairs(self.cookies(), Origin::Cookie, true, None),
            Field::CookieValues => pairs(self.cookies(), Origin::Cookie, false, None),
            Field::Cookie(n) => pairs(self.cookies(), Origin::Cookie, false, Some(n)),
            Field::Body => {
                if self.body.is_empty() {
                    vec![]
                } else {
                    vec![Value {
                        origin: Origin::Body,
                        name: None,
                        text: String::from_utf8_lossy(self.body),
                    }]
                }
            }
            Field::FormNames => pairs(&self.form().fields, Origin::Form, true, None),
            Field::FormValues => pairs(&self.form().fields, Origin::Form, false, None),
            Field::FormField(n) => pairs(&self.form().fields, Origin::Form, false, Some(n)),
            Field::FileNames => self
                .form()
                .files
                .iter()
                .map(|f| bv(Origin::Form, None, f))
                .collect(),
            Field::JsonKeys => self
                .json()
                .iter()
                .filter_map(|m| {
                    m.key
                        .as_deref()
                        .map(|k| bv(Origin::Json, Some(&m.pointer), k))
                })
                .collect(),
            Field::JsonValues => self
                .json()
                .iter()
                .filter_map(|m| {
                    m.scalar
                        .as_deref()
                        .map(|x| bv(Origin::Json, Some(&m.pointer), x))
                })
                .collect(),
            Field::JsonPointer(ptr) => self
                .json()
                .iter()
                .filter(|m| &m.pointer == ptr)
                .filter_map(|m| {
                    m.scalar
                        .as_deref()
                        .map(|x| bv(Origin::Json, Some(&m.pointer), x))
                })
                .collect(),
            Field::ArgsNames => {
                let mut out = self.values(&Field::QueryNames, labels);
                out.extend(self.values(&Field::FormNames, labels));
                out.extend(self.values(&Field::JsonKeys, labels));
                out
            }
            Field::ArgsValues => {
                let mut out = self.values(&Field::QueryValues, labels);
                out.extend(self.values(&Field::FormValues, labels));
                out.extend(self.values(&Field::JsonValues, labels));
                out
            }
            Field::ClientIp => self
                .client_ip
                .map(|ip| Value {
                    origin: Origin::Other,
                    name: None,
                    text: Cow::Owned(ip.to_string()),
                })
                .into_iter()
                .collect(),
            Field::Country => self
                .country
                .map(|c| Value {
                    origin: Origin::Other,
                    name: None,
                    text: Cow::Owned(c.to_string()),
                })
                .into_iter()
                .collect(),
            Field::Asn => self
                .asn
                .map(|a| Value {
                    origin: Origin::Other,
                    name: None,
                    text: Cow::Owned(a.to_string()),
                })
                .into_iter()
                .collect(),
            Field::Labels => labels
                .iter()
                .map(|l| Value {
                    origin: Origin::Other,
                    name: None,
                    text: Cow::Owned(l.to_string()),
                })
                .collect(),
        }
    }
}

/// JSON nesting deeper than this is not inspected further (bounds work on hostile bodies).
const MAX_JSON_DEPTH: usize = 64;

/// One member of a JSON document.
#[derive(Debug, Clone)]
struct JsonMember {
    /// Its JSON pointer.
    pointer: String,
    /// Its key, when it is an object entry.
    key: Option<String>,
    /// Its value as text, when it is a scalar (strings, numbers, booleans; null is empty).
    scalar: Option<String>,
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
