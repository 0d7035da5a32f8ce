//! Rules step (evaluate): the parts of a request a rule can inspect ("fields"), extracted
//! lazily once per request, each value tagged with where it came from so per-route
//! exclusions can skip it.

use std::borrow::Cow;

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
    /// The path, decoded and normalized (what routing sees: `/x/../%61dmin` is `/admin`).
    Path,
    /// The path as received (percent-encoded, dot segments and `;` parameters kept): where
    /// traversal and encoding tricks show.
    PathRaw,
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
    /// Form field names (urlencoded and multipart, file parts included).
    FormNames,
    /// Form field values (urlencoded and multipart; files' contents excluded).
    FormValues,
    /// One form field.
    FormField(String),
    /// Multipart file names.
    FileNames,
    /// Contents of uploaded files that are text (first 16 KiB of each).
    FileContents,
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
    /// Values of headers other than the standard ones with a fixed grammar (see
    /// [`STANDARD_HEADERS`]): where custom headers such as `X-Api-Version` carry input. A
    /// standard header whose value does not fit its grammar (`Accept-Language: en' OR 1=1`)
    /// is inspected here too (see `rules::grammar`).
    HeadersCustom,
    /// The body when no parser claims it: not urlencoded, multipart, XML, or valid JSON
    /// (plain text, GraphQL documents, a malformed JSON or multipart body).
    BodyUnparsed,
    /// Text and attribute values of an XML body (entities left encoded; `html_entity_decode`
    /// decodes them). Also part of `args.values`.
    XmlValues,
    /// The body length in bytes: `Content-Length` when given, else the bytes read.
    BodySize,
    /// The JA3 fingerprint of the client's TLS hello (MD5, 32 hex digits); TLS listeners.
    TlsJa3,
    /// The JA4 fingerprint of the client's TLS hello (`t13d1516h2_8daaf6152771_e5627efa2ab1`).
    TlsJa4,
    /// The SNI the client sent.
    TlsSni,
    /// The subject of the verified client certificate (mTLS), e.g. `CN=alice, O=Example`.
    TlsClientSubject,
    /// The subjectAltName entries of the verified client certificate (`DNS:…`, `email:…`,
    /// `URI:…`, `IP:…`).
    TlsClientSans,
    /// A claim of the verified bearer token (routes with `policy.auth`).
    Claim(String),
    /// Methods of the JSON-RPC messages of the body (MCP routes: `tools/call`, …).
    McpMethod,
    /// Tool names of the body's `tools/call` messages (MCP routes).
    McpTool,
}

/// The fields without a name, as rule files write them: the one table [`Field::parse`] and
/// [`Field::spelling`] read.
const NAMED: &[(&str, Field)] = &[
    ("method", Field::Method),
    ("path", Field::Path),
    ("path.raw", Field::PathRaw),
    ("uri", Field::Uri),
    ("query_string", Field::QueryString),
    ("query.names", Field::QueryNames),
    ("query.values", Field::QueryValues),
    ("headers.names", Field::HeaderNames),
    ("headers.values", Field::HeaderValues),
    ("cookies.names", Field::CookieNames),
    ("cookies.values", Field::CookieValues),
    ("body", Field::Body),
    ("form.names", Field::FormNames),
    ("form.values", Field::FormValues),
    ("files.names", Field::FileNames),
    ("files.contents", Field::FileContents),
    ("json.keys", Field::JsonKeys),
    ("json.values", Field::JsonValues),
    ("args.names", Field::ArgsNames),
    ("args.values", Field::ArgsValues),
    ("client_ip", Field::ClientIp),
    ("country", Field::Country),
    ("asn", Field::Asn),
    ("labels", Field::Labels),
    ("headers.custom", Field::HeadersCustom),
    ("body.unparsed", Field::BodyUnparsed),
    ("xml.values", Field::XmlValues),
    ("body_size", Field::BodySize),
    ("tls.ja3", Field::TlsJa3),
    ("tls.ja4", Field::TlsJa4),
    ("tls.sni", Field::TlsSni),
    ("tls.client_subject", Field::TlsClientSubject),
    ("tls.client_sans", Field::TlsClientSans),
    ("mcp.method", Field::McpMethod),
    ("mcp.tool", Field::McpTool),
];

pub use crate::request::grammar::STANDARD_HEADERS;

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
                "claim" => Field::Claim(name.to_string()),
                "json" => return Err(format!("field {s:?}: a JSON pointer starts with `/` (e.g. json:/user/name)")),
                _ => return Err(format!("unknown field kind {kind:?} in {s:?}: use query:, header:, cookie:, form:, json: or claim:")),
            });
        }
        match NAMED.iter().find(|(n, _)| *n == s) {
            Some((_, f)) => Ok(f.clone()),
            None => Err(format!(
                "unknown field {s:?}; fields are query:NAME, header:NAME, cookie:NAME, form:NAME, \
                 json:/POINTER, claim:NAME, {}",
                NAMED.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
            )),
        }
    }

    /// How logs name a value of this field: its origin and name when it has one
    /// (`query:q`, `json:/user/bio`, `header:user-agent`), else the field as rule files
    /// write it (`body`, `uri`, `path.raw`).
    pub fn label(&self, origin: Origin, name: Option<&str>) -> String {
        let kind = match origin {
            Origin::Query => "query",
            Origin::Form => "form",
            Origin::Json => "json",
            Origin::Header => "header",
            Origin::Cookie => "cookie",
            _ => "",
        };
        match name {
            Some(n) if !kind.is_empty() => format!("{kind}:{n}"),
            _ => self.spelling(),
        }
    }

    /// The field as rule files write it.
    pub fn spelling(&self) -> String {
        match self {
            Field::QueryArg(n) => format!("query:{n}"),
            Field::Header(n) => format!("header:{n}"),
            Field::Cookie(n) => format!("cookie:{n}"),
            Field::FormField(n) => format!("form:{n}"),
            Field::JsonPointer(p) => format!("json:{p}"),
            Field::Claim(c) => format!("claim:{c}"),
            named => NAMED
                .iter()
                .find(|(_, f)| f == named)
                .map_or_else(|| format!("{named:?}"), |(n, _)| (*n).to_string()),
        }
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
                | Field::FileContents
                | Field::JsonKeys
                | Field::JsonValues
                | Field::JsonPointer(_)
                | Field::ArgsNames
                | Field::ArgsValues
                | Field::BodyUnparsed
                | Field::XmlValues
                | Field::BodySize
                | Field::McpMethod
                | Field::McpTool
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

/// A request as the rules see it: the one request model.
pub type RuleInput<'a> = crate::request::Request<'a>;

/// The values of a rule field in a request.
pub trait FieldValues {
    /// The values of a field, borrowing from the request wherever possible.
    fn values<'s>(&'s self, field: &Field, labels: &[Cow<'static, str>]) -> Vec<Value<'s>>;
}

impl FieldValues for RuleInput<'_> {
    fn values<'s>(&'s self, field: &Field, labels: &[Cow<'static, str>]) -> Vec<Value<'s>> {
        fn bv<'s>(origin: Origin, name: Option<&'s str>, text: &'s str) -> Value<'s> {
            Value {
                origin,
                name: name.map(Cow::Borrowed),
                text: Cow::Borrowed(text),
            }
        }
        let tls_value = |f: fn(&crate::tls::TlsConnection) -> Option<&str>| -> Vec<Value<'s>> {
            self.tls
                .and_then(f)
                .map(|t| bv(Origin::Other, None, t))
                .into_iter()
                .collect()
        };
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
            Field::Path => vec![bv(Origin::Path, None, self.path())],
            Field::PathRaw => vec![bv(Origin::Path, None, self.raw_path)],
            Field::Uri => {
                let text = if self.query.is_empty() {
                    Cow::Borrowed(self.raw_path)
                } else {
                    Cow::Owned(format!("{}?{}", self.raw_path, self.query))
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
            Field::FormNames => {
                let form = self.form();
                let mut names = pairs(&form.fields, Origin::Form, true, None);
                names.extend(
                    form.file_fields
                        .iter()
                        .map(|n| bv(Origin::Form, Some(n), n)),
                );
                names
            }
            Field::FormValues => pairs(&self.form().fields, Origin::Form, false, None),
            Field::FormField(n) => pairs(&self.form().fields, Origin::Form, false, Some(n)),
            Field::FileNames => self
                .form()
                .files
                .iter()
                .map(|f| bv(Origin::Form, None, f))
                .collect(),
            Field::FileContents => self
                .form()
                .file_texts
                .iter()
                .map(|f| bv(Origin::Form, None, f))
                .collect(),
            Field::JsonKeys => self
                .json()
                .members
                .iter()
                .filter_map(|m| {
                    m.key
                        .as_deref()
                        .map(|k| bv(Origin::Json, Some(&m.pointer), k))
                })
                .collect(),
            Field::JsonValues => self
                .json()
                .members
                .iter()
                .filter_map(|m| {
                    m.scalar
                        .as_deref()
                        .map(|x| bv(Origin::Json, Some(&m.pointer), x))
                })
                .collect(),
            Field::JsonPointer(ptr) => self
                .json()
                .members
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
                out.extend(self.values(&Field::XmlValues, labels));
                out
            }
            Field::HeadersCustom => self
                .headers
                .iter()
                .zip(self.custom_headers())
                .filter(|(_, custom)| **custom)
                .map(|((k, x), _)| Value {
                    origin: Origin::Header,
                    name: Some(Cow::Borrowed(k.as_str())),
                    text: header_text(x),
                })
                .collect(),
            Field::BodyUnparsed => {
                let unparsed = match self.body_kind() {
                    crate::request::BodyKind::Other => true,
                    crate::request::BodyKind::Json => self.json().malformed,
                    crate::request::BodyKind::Multipart => self.form().malformed,
                    crate::request::BodyKind::Xml => self.xml().1,
                    _ => false,
                };
                if unparsed && !self.body.is_empty() {
                    vec![Value {
                        origin: Origin::Body,
                        name: None,
                        text: String::from_utf8_lossy(self.body),
                    }]
                } else {
                    vec![]
                }
            }
            Field::XmlValues => self
                .xml()
                .0
                .iter()
                .map(|x| bv(Origin::Body, None, x))
                .collect(),
            Field::BodySize => {
                let declared = self.content_length();
                let size = declared
                    .unwrap_or(self.body.len() as u64)
                    .max(self.body.len() as u64);
                vec![Value {
                    origin: Origin::Other,
                    name: None,
                    text: Cow::Owned(size.to_string()),
                }]
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
            Field::TlsJa3 => tls_value(|t| Some(t.ja3.as_str())),
            Field::TlsJa4 => tls_value(|t| Some(t.ja4.as_str())),
            Field::TlsSni => tls_value(|t| t.sni.as_deref()),
            Field::TlsClientSubject => tls_value(|t| t.client_subject.as_deref()),
            Field::TlsClientSans => self
                .tls
                .map(|t| {
                    t.client_sans
                        .iter()
                        .map(|s| Value {
                            origin: Origin::Other,
                            name: None,
                            text: Cow::Borrowed(s.as_str()),
                        })
                        .collect()
                })
                .unwrap_or_default(),
            Field::Claim(c) => self
                .claim(c)
                .map(|t| Value {
                    origin: Origin::Other,
                    name: None,
                    text: t,
                })
                .into_iter()
                .collect(),
            Field::McpMethod | Field::McpTool => match self.mcp() {
                Some(Ok(m)) => {
                    let names: Vec<&str> = if *field == Field::McpTool {
                        m.tools().collect()
                    } else {
                        m.methods().collect()
                    };
                    names
                        .into_iter()
                        .map(|t| Value {
                            origin: Origin::Other,
                            name: None,
                            text: Cow::Borrowed(t),
                        })
                        .collect()
                }
                _ => Vec::new(),
            },
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

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;
    use http::HeaderMap;

    #[test]
    fn standard_headers_sorted_for_binary_search() {
        assert!(STANDARD_HEADERS.windows(2).all(|w| w[0] < w[1]));
    }

    fn input<'a>(headers: &'a HeaderMap, body: &'a [u8]) -> RuleInput<'a> {
        RuleInput::new("POST", "/", "", headers, body, None, None, None)
    }

    fn texts(v: Vec<Value<'_>>) -> Vec<String> {
        v.into_iter().map(|v| v.text.into_owned()).collect()
    }

    #[test]
    fn named_fields_parse_and_spell_back() {
        for (name, field) in NAMED {
            assert_eq!(&Field::parse(name).unwrap(), field);
            assert_eq!(field.spelling(), *name);
        }
        for spec in [
            "query:q",
            "header:x-a",
            "cookie:c",
            "form:f",
            "json:/a/0",
            "claim:sub",
        ] {
            assert_eq!(Field::parse(spec).unwrap().spelling(), spec);
        }
        let e = Field::parse("bogus").unwrap_err();
        assert!(e.contains("mcp.tool") && e.contains("json:/POINTER"), "{e}");
    }

    #[test]
    fn mcp_fields_list_each_message() {
        let mut h = HeaderMap::new();
        h.insert("content-type", "application/json".parse().unwrap());
        let body = br#"[{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_activities"}},
                        {"jsonrpc":"2.0","method":"notifications/initialized"},
                        {"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"delete_route","arguments":{}}}]"#;
        let i = input(&h, body);
        assert_eq!(
            texts(i.values(&Field::McpTool, &[])),
            ["get_activities", "delete_route"]
        );
        assert_eq!(
            texts(i.values(&Field::McpMethod, &[])),
            ["tools/call", "notifications/initialized", "tools/call"]
        );
        assert_eq!(Field::parse("mcp.tool").unwrap().spelling(), "mcp.tool");
        assert!(Field::McpTool.needs_body());
        // Not JSON-RPC: no values.
        assert!(input(&h, br#"{"a":1}"#)
            .values(&Field::McpTool, &[])
            .is_empty());
    }

    #[test]
    fn xml_values_and_unparsed_bodies() {
        let mut h = HeaderMap::new();
        h.insert("content-type", "text/xml; charset=utf-8".parse().unwrap());
        let body = br#"<?xml version="1.0"?><e:Envelope xmlns:e="urn:x"><q id="a&amp;b"> 1 &lt; 2 </q><r><![CDATA[<x>]]></r></e:Envelope>"#;
        let i = input(&h, body);
        assert_eq!(
            texts(i.values(&Field::XmlValues, &[])),
            ["a&amp;b", "1 &lt; 2", "<x>"]
        );
        assert!(i.values(&Field::BodyUnparsed, &[]).is_empty());
        assert_eq!(i.values(&Field::ArgsValues, &[]).len(), 3);

        let not_xml = input(&h, b";id;");
        assert_eq!(
            texts(not_xml.values(&Field::BodyUnparsed, &[])),
            [";id;"],
            "text sent as XML"
        );

        h.insert("content-type", "application/json".parse().unwrap());
        let bad = b"{\"a\": 1' or '1'='1";
        let i = input(&h, bad);
        assert_eq!(
            texts(i.values(&Field::BodyUnparsed, &[])).len(),
            1,
            "malformed JSON is inspected as text"
        );
        let good = b"{\"a\": \"x\"}";
        assert!(input(&h, good).values(&Field::BodyUnparsed, &[]).is_empty());

        h.insert("content-type", "application/graphql".parse().unwrap());
        assert_eq!(
            texts(input(&h, b"{ __schema { types { name } } }").values(&Field::BodyUnparsed, &[]))
                .len(),
            1
        );
    }

    #[test]
    fn custom_headers_and_body_size() {
        let mut h = HeaderMap::new();
        h.insert("user-agent", "curl/8".parse().unwrap());
        h.insert("x-api-version", "${jndi:ldap://x}".parse().unwrap());
        h.insert("content-length", "9000".parse().unwrap());
        let i = input(&h, b"");
        assert_eq!(
            texts(i.values(&Field::HeadersCustom, &[])),
            ["${jndi:ldap://x}"]
        );
        assert_eq!(texts(i.values(&Field::BodySize, &[])), ["9000"]);
    }
}
