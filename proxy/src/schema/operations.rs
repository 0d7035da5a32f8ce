//! Validate step: operations (method + path template) and the table that finds the one a
//! request is for. Specs come from `operations:` in `palisade.yaml` or from an OpenAPI
//! document; both compile here into [`OperationTable`], once, at load time.
//!
//! Matching follows OpenAPI: concrete paths win over templated ones (`/activities/stats`
//! before `/activities/{id}`), comparing segment by segment from the left. Cost per request:
//! one pass over the templates with the request's segment count, no allocation for paths
//! without percent-escapes.

use std::borrow::Cow;
use std::collections::BTreeMap;

use http::Method;
use jsonschema::{Draft, Validator};
use percent_encoding::percent_decode_str;
use regex::Regex;
use serde_json::Value;

use super::documents::DocumentStore;
pub use super::params::ParamStyle;
use super::params::{Coercion, CompiledParam};
use super::ParamIn;

/// A parameter as declared (config or OpenAPI).
#[derive(Debug, Clone)]
pub struct ParamSpec {
    /// Name.
    pub name: String,
    /// Where it is read from.
    pub location: ParamIn,
    /// Whether it must be present.
    pub required: bool,
    /// Its schema (`None`: only presence is checked).
    pub schema: Option<Value>,
    /// Serialization style of arrays.
    pub style: ParamStyle,
    /// Whether each occurrence is one array item.
    pub explode: bool,
    /// Whether the value is a JSON document (`content:` parameters).
    pub json_content: bool,
}

/// A request body as declared.
#[derive(Debug, Clone)]
pub struct BodySpec {
    /// Whether a body must be sent.
    pub required: bool,
    /// Accepted media types or ranges (`application/json`, `application/*`, `*/*`), each
    /// with the schema of JSON bodies of that type. Empty: any type, nothing validated.
    pub media_types: Vec<(String, Option<Value>)>,
}

/// One operation as declared.
#[derive(Debug, Clone)]
pub struct OperationSpec {
    /// `METHOD /path` for logs, metrics and error bodies.
    pub label: String,
    /// Methods (empty: any).
    pub methods: Vec<Method>,
    /// Full path template (`/v1/activities/{id}`); `None`: any path of the route.
    pub path: Option<String>,
    /// Parameters.
    pub params: Vec<ParamSpec>,
    /// Request body.
    pub body: Option<BodySpec>,
    /// Default draft of its schemas.
    pub draft: Option<Draft>,
    /// Body size limit of this operation, bytes.
    pub max_body: Option<usize>,
    /// The OpenAPI `operationId`.
    pub operation_id: Option<String>,
}

/// One segment of a path template.
#[derive(Debug)]
enum Segment {
    /// Must equal this text.
    Literal(String),
    /// A whole-segment parameter `{name}`.
    Param(String),
    /// A segment mixing text and parameters (`{name}.{ext}`): a regex with named groups.
    Mixed(Regex, Vec<String>),
}

impl Segment {
    /// Literal segments outrank mixed ones, which outrank whole parameters.
    fn rank(&self) -> u8 {
        match self {
            Segment::Literal(_) => 2,
            Segment::Mixed(..) => 1,
            Segment::Param(_) => 0,
        }
    }
}

/// A compiled path template.
#[derive(Debug)]
struct Template {
    segments: Vec<Segment>,
    /// Shape without parameter names (`/activities/{}`): templates with equal shapes are one.
    shape: String,
}

fn parse_template(path: &str) -> Result<Template, String> {
    if !path.starts_with('/') {
        return Err(format!("path template {path:?} must start with `/`"));
    }
    let trimmed = if path.len() > 1 {
        path.strip_suffix('/').unwrap_or(path)
    } else {
        path
    };
    let mut segments = Vec::new();
    let mut shape = String::new();
    for seg in trimmed.split('/').skip(1) {
        shape.push('/');
        if let Some(name) = seg
            .strip_prefix('{')
            .and_then(|s| s.strip_suffix('}'))
            .filter(|n| !n.contains(['{', '}']))
        {
            if name.is_empty() {
                return Err(format!(
                    "path template {path:?}: empty parameter name `{{}}`"
                ));
            }
            segments.push(Segment::Param(name.to_string()));
            shape.push_str("{}");
        } else if seg.contains('{') {
            let mut pattern = String::from("^");
            let mut names = Vec::new();
            let mut rest = seg;
            while let Some(start) = rest.find('{') {
                let end = rest[start..]
                    .find('}')
                    .map(|e| start + e)
                    .ok_or_else(|| format!("path template {path:?}: unclosed `{{`"))?;
                pattern.push_str(&regex::escape(&rest[..start]));
                pattern.push_str(&format!("(?P<p{}>[^/]+?)", names.len()));
                names.push(rest[start + 1..end].to_string());
                shape.push_str(&rest[..start]);
                shape.push_str("{}");
                rest = &rest[end + 1..];
            }
            pattern.push_str(&regex::escape(rest));
            pattern.push('$');
            shape.push_str(rest);
            let re = Regex::new(&pattern).map_err(|e| format!("path template {path:?}: {e}"))?;
            segments.push(Segment::Mixed(re, names));
        } else {
            segments.push(Segment::Literal(seg.to_string()));
            shape.push_str(seg);
        }
    }
    Ok(Template { segments, shape })
}

/// Percent-decodes a path segment only when it has escapes.
fn decode(seg: &str) -> Cow<'_, str> {
    if seg.contains('%') {
        percent_decode_str(seg).decode_utf8_lossy()
    } else {
        Cow::Borrowed(seg)
    }
}

impl Template {
    /// Matches request path segments; returns the captured parameters.
    fn matches<'p>(&self, segs: &[&'p str]) -> Option<Vec<(&str, Cow<'p, str>)>> {
        if segs.len() != self.segments.len() {
            return None;
        }
        let mut captures = Vec::new();
        for (t, s) in self.segments.iter().zip(segs) {
            match t {
                Segment::Literal(l) => {
                    if *s != l.as_str() && decode(s) != l.as_str() {
                        return None;
                    }
                }
                Segment::Param(name) => {
                    if s.is_empty() {
                        return None;
                    }
                    captures.push((name.as_str(), decode(s)));
                }
                Segment::Mixed(re, names) => {
                    let c = re.captures(s)?;
                    for (i, name) in names.iter().enumerate() {
                        let v = c.name(&format!("p{i}")).map_or("", |m| m.as_str());
                        captures.push((name.as_str(), Cow::Owned(decode(v).into_owned())));
                    }
                }
            }
        }
        Some(captures)
    }

    fn param_names(&self) -> impl Iterator<Item = &str> {
        self.segments.iter().flat_map(|s| match s {
            Segment::Param(n) => vec![n.as_str()],
            Segment::Mixed(_, names) => names.iter().map(String::as_str).collect(),
            Segment::Literal(_) => vec![],
        })
    }
}

/// A path template (`/users/{user}/activities/{id}`) for other modules (Cedar operations):
/// the same matcher request validation uses.
#[derive(Debug)]
pub struct PathTemplate(Template);

impl PathTemplate {
    /// Parses a template; the error says what is wrong.
    pub fn parse(path: &str) -> Result<PathTemplate, String> {
        parse_template(path).map(PathTemplate)
    }

    /// The captured parameters when `path` (raw, percent-encoded) matches; one trailing
    /// slash is not significant.
    pub fn matches<'t, 'p>(&'t self, path: &'p str) -> Option<Vec<(&'t str, Cow<'p, str>)>> {
        let trimmed = if path.len() > 1 {
            path.strip_suffix('/').unwrap_or(path)
        } else {
            path
        };
        let segs: Vec<&str> = trimmed.split('/').skip(1).collect();
        self.0.matches(&segs)
    }

    /// Specificity: compare descending to try the most specific template first.
    pub fn rank(&self) -> Vec<u8> {
        self.0.segments.iter().map(Segment::rank).collect()
    }

    /// Names of its parameters.
    pub fn params(&self) -> Vec<&str> {
        self.0.param_names().collect()
    }
}

/// The kind of media range a request's `Content-Type` is compared with.
#[derive(Debug, PartialEq, Eq)]
enum MediaRange {
    /// `type/subtype`, lower-case.
    Exact(String),
    /// `type/*`, the type lower-case.
    Type(String),
    /// `*/*`.
    Any,
}

impl MediaRange {
    fn parse(text: &str) -> MediaRange {
        let essence = text
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        match essence.split_once('/') {
            _ if essence == "*/*" || essence == "*" => MediaRange::Any,
            Some((t, "*")) => MediaRange::Type(t.to_string()),
            _ => MediaRange::Exact(essence),
        }
    }

    /// Specificity of a match with `essence` (higher is better), `None` when it does not match.
    fn score(&self, essence: &str) -> Option<u8> {
        match self {
            MediaRange::Exact(e) => (e == essence).then_some(2),
            MediaRange::Type(t) => essence.split_once('/').filter(|(et, _)| et == t).map(|_| 1),
            MediaRange::Any => Some(0),
        }
    }
}

/// A compiled request body declaration.
pub struct CompiledBody {
    /// Whether a body must be sent.
    pub required: bool,
    media: Vec<(MediaRange, String, Option<Validator>)>,
}

/// What the body's content type selects.
pub enum MediaMatch<'a> {
    /// Accepted; validate JSON bodies with this validator when present.
    Accepted(Option<&'a Validator>),
    /// Not accepted: the accepted types, for the error message.
    Rejected(Vec<&'a str>),
}

impl CompiledBody {
    /// Whether a body is checked against a JSON Schema for some media type.
    pub fn has_schema(&self) -> bool {
        self.media.iter().any(|(_, _, v)| v.is_some())
    }

    /// Selects the declaration for a `Content-Type` header value (`None`: header absent).
    pub fn media_for(&self, content_type: Option<&str>) -> MediaMatch<'_> {
        if self.media.is_empty() {
            return MediaMatch::Accepted(None);
        }
        let essence = content_type
            .map(|c| {
                c.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase()
            })
            .unwrap_or_default();
        let best = self
            .media
            .iter()
            .filter_map(|(range, _, v)| range.score(&essence).map(|s| (s, v)))
            .max_by_key(|(s, _)| *s);
        match best {
            // An absent Content-Type only matches `*/*`.
            Some((_, v)) => MediaMatch::Accepted(v.as_ref()),
            None => MediaMatch::Rejected(self.media.iter().map(|(_, t, _)| t.as_str()).collect()),
        }
    }
}

/// One compiled operation.
pub struct CompiledOperation {
    /// `METHOD /path`.
    pub label: String,
    methods: Vec<Method>,
    /// Request body declaration.
    pub body: Option<CompiledBody>,
    /// Query, header, path and cookie parameters.
    pub params: Vec<CompiledParam>,
    /// Body size limit, bytes.
    pub max_body: Option<usize>,
}

impl CompiledOperation {
    fn accepts(&self, method: &Method) -> bool {
        self.methods.is_empty() || self.methods.contains(method)
    }
}

/// Operations sharing one path template.
struct PathEntry {
    template: Option<Template>,
    ops: Vec<usize>,
}

/// What the table says about a request.
pub enum Lookup<'t, 'p> {
    /// This operation, with the path parameters captured from the template.
    Found(&'t CompiledOperation, Vec<(&'t str, Cow<'p, str>)>),
    /// The path is known but not for this method: the methods it has (for `Allow`).
    MethodNotAllowed(String),
    /// A CORS preflight for a known path without a declared `OPTIONS` operation.
    Preflight,
    /// No operation has this path.
    Unknown,
}

/// Every operation of a route, ready for lookups.
pub struct OperationTable {
    ops: Vec<CompiledOperation>,
    /// Most specific template first; the any-path entry (if any) last.
    entries: Vec<PathEntry>,
}

impl std::fmt::Debug for OperationTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.ops.iter().map(|o| &o.label))
            .finish()
    }
}

impl OperationTable {
    /// Compiles operation specs; schema `$ref`s resolve against `base_uri`. Errors name the
    /// operation.
    ///
    /// Specs from index `imported_from` on (an OpenAPI import) give way to earlier ones
    /// (hand-written) with the same method and path, so an operator can tighten one operation
    /// of a document. Errors carry the index of the spec they concern.
    pub fn compile(
        specs: &[OperationSpec],
        imported_from: usize,
        store: &DocumentStore,
        base_uri: &str,
    ) -> Result<OperationTable, Vec<(usize, String)>> {
        let mut errors = Vec::new();
        let mut ops = Vec::new();
        // The spec index of each compiled operation.
        let mut op_spec: Vec<usize> = Vec::new();
        let mut by_shape: BTreeMap<Option<String>, usize> = BTreeMap::new();
        let mut entries: Vec<PathEntry> = Vec::new();
        for (index, spec) in specs.iter().enumerate() {
            let template = match spec.path.as_deref().map(parse_template).transpose() {
                Ok(t) => t,
                Err(e) => {
                    errors.push((index, format!("{}: {e}", spec.label)));
                    continue;
                }
            };
            match compile_operation(spec, template.as_ref(), store, base_uri) {
                Ok(op) => {
                    let shape = template.as_ref().map(|t| t.shape.clone());
                    let entry = match by_shape.get(&shape) {
                        Some(&i) => i,
                        None => {
                            by_shape.insert(shape, entries.len());
                            entries.push(PathEntry {
                                template,
                                ops: Vec::new(),
                            });
                            entries.len() - 1
                        }
                    };
                    let clash = entries[entry].ops.iter().find(|&&o| {
                        let other: &CompiledOperation = &ops[o];
                        other.methods.is_empty()
                            || op.methods.is_empty()
                            || op.methods.iter().any(|m| other.methods.contains(m))
                    });
                    if let Some(&o) = clash {
                        if index < imported_from || op_spec[o] >= imported_from {
                            errors.push((
                                index,
                                format!(
                                    "{}: the same method and path as {}; one of them could \
                                     never be used",
                                    op.label, ops[o].label
                                ),
                            ));
                        }
                        continue;
                    }
                    entries[entry].ops.push(ops.len());
                    ops.push(op);
                    op_spec.push(index);
                }
                Err(e) => errors.extend(
                    e.into_iter()
                        .map(|e| (index, format!("{}: {e}", spec.label))),
                ),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        // Most specific first: compare segment ranks left to right; any-path last.
        entries.sort_by(|a, b| {
            let key = |e: &PathEntry| {
                e.template
                    .as_ref()
                    .map(|t| t.segments.iter().map(Segment::rank).collect::<Vec<_>>())
            };
            match (key(a), key(b)) {
                (Some(x), Some(y)) => y.cmp(&x),
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (None, None) => std::cmp::Ordering::Equal,
            }
        });
        Ok(OperationTable { ops, entries })
    }

    /// Number of operations.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Whether there are no operations.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Whether any operation validates a body against a schema.
    pub fn needs_body(&self) -> bool {
        self.ops
            .iter()
            .any(|o| o.body.as_ref().is_some_and(CompiledBody::has_schema))
    }

    /// Labels of operations whose path template can never match a path under `prefix` (a
    /// route's `path_prefix`): typically an OpenAPI document whose paths lack the base path.
    pub fn outside_prefix(&self, prefix: &str) -> Vec<&str> {
        let wanted: Vec<&str> = prefix.split('/').filter(|s| !s.is_empty()).collect();
        let mut out = Vec::new();
        for entry in &self.entries {
            let Some(t) = &entry.template else {
                continue;
            };
            let reachable = wanted
                .iter()
                .enumerate()
                .all(|(i, w)| match t.segments.get(i) {
                    Some(Segment::Literal(l)) => l == w,
                    Some(_) => true,
                    // Shorter than the prefix: never under it.
                    None => false,
                });
            if !reachable {
                out.extend(entry.ops.iter().map(|&i| self.ops[i].label.as_str()));
            }
        }
        out
    }

    /// Whether some operation has its own body size limit.
    pub fn has_size_limit(&self) -> bool {
        self.ops.iter().any(|o| o.max_body.is_some())
    }

    /// Finds the operation for a request.
    pub fn lookup<'t, 'p>(
        &'t self,
        method: &Method,
        path: &'p str,
        preflight: bool,
    ) -> Lookup<'t, 'p> {
        // One trailing slash is not significant (`/activities/` is `/activities`).
        let trimmed = if path.len() > 1 {
            path.strip_suffix('/').unwrap_or(path)
        } else {
            path
        };
        let segs: Vec<&str> = trimmed.split('/').skip(1).collect();
        for entry in &self.entries {
            let captures = match &entry.template {
                Some(t) => match t.matches(&segs) {
                    Some(c) => c,
                    None => continue,
                },
                None => Vec::new(),
            };
            let find = |m: &Method| {
                entry
                    .ops
                    .iter()
                    .map(|&i| &self.ops[i])
                    .find(|o| o.accepts(m))
            };
            let op = find(method).or_else(|| {
                // HEAD is GET without a body unless the API declares it.
                (method == Method::HEAD)
                    .then(|| find(&Method::GET))
                    .flatten()
            });
            if let Some(op) = op {
                return Lookup::Found(op, captures);
            }
            if method == Method::OPTIONS && preflight {
                return Lookup::Preflight;
            }
            let mut allowed: Vec<&str> = entry
                .ops
                .iter()
                .flat_map(|&i| self.ops[i].methods.iter().map(Method::as_str))
                .collect();
            allowed.sort_unstable();
            allowed.dedup();
            return Lookup::MethodNotAllowed(allowed.join(", "));
        }
        Lookup::Unknown
    }
}

fn compile_operation(
    spec: &OperationSpec,
    template: Option<&Template>,
    store: &DocumentStore,
    base_uri: &str,
) -> Result<CompiledOperation, Vec<String>> {
    let mut errors = Vec::new();
    let mut params = Vec::new();
    for p in &spec.params {
        if p.location == ParamIn::Path
            && !template.is_some_and(|t| t.param_names().any(|n| n == p.name))
        {
            errors.push(format!(
                "path parameter {:?} does not appear in the path template {:?}",
                p.name,
                spec.path.as_deref().unwrap_or("(any path)")
            ));
            continue;
        }
        let validator = match &p.schema {
            None => None,
            Some(s) => match store.build(s, base_uri, spec.draft) {
                Ok(v) => Some(v),
                Err(e) => {
                    errors.push(format!("{} {:?}: {e}", p.location.noun(), p.name));
                    continue;
                }
            },
        };
        let resolved = p
            .schema
            .as_ref()
            .and_then(|s| store.resolve_shallow(s, base_uri))
            .map(|(s, _)| s);
        let name = if p.location == ParamIn::Header {
            p.name.to_ascii_lowercase()
        } else {
            p.name.clone()
        };
        params.push(CompiledParam {
            name,
            location: p.location,
            required: p.required,
            coercion: Coercion::for_schema(
                resolved.as_ref(),
                p.location,
                p.style,
                p.explode,
                p.json_content,
            ),
            validator,
        });
    }
    let body = match &spec.body {
        None => None,
        Some(b) => {
            let mut media = Vec::new();
            for (range, schema) in &b.media_types {
                let validator = match schema {
                    None => None,
                    Some(s) => match store.build(s, base_uri, spec.draft) {
                        Ok(v) => Some(v),
                        Err(e) => {
                            errors.push(format!("request body ({range}): {e}"));
                            continue;
                        }
                    },
                };
                media.push((MediaRange::parse(range), range.clone(), validator));
            }
            Some(CompiledBody {
                required: b.required,
                media,
            })
        }
    };
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(CompiledOperation {
        label: spec.label.clone(),
        methods: spec.methods.clone(),
        body,
        params,
        max_body: spec.max_body,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic, reason = "tests")]
mod tests {
    use super::*;

    fn spec(method: Method, path: &str) -> OperationSpec {
        OperationSpec {
            label: format!("{method} {path}"),
            methods: vec![method],
            path: Some(path.into()),
            params: vec![],
            body: None,
            draft: None,
            max_body: None,
            operation_id: None,
        }
    }

    fn table(specs: &[OperationSpec]) -> OperationTable {
        OperationTable::compile(
            specs,
            specs.len(),
            &DocumentStore::new(),
            "file:///tmp/c.yaml",
        )
        .unwrap()
    }

    fn found(t: &OperationTable, m: Method, p: &str) -> String {
        match t.lookup(&m, p, false) {
            Lookup::Found(op, caps) => {
                let caps: Vec<String> = caps.iter().map(|(n, v)| format!("{n}={v}")).collect();
                format!("{} {}", op.label, caps.join(","))
            }
            Lookup::MethodNotAllowed(a) => format!("405 {a}"),
            Lookup::Preflight => "preflight".into(),
            Lookup::Unknown => "unknown".into(),
        }
    }

    #[test]
    fn concrete_paths_win_and_params_are_captured() {
        let t = table(&[
            spec(Method::GET, "/v1/activities/{id}"),
            spec(Method::GET, "/v1/activities/stats"),
            spec(Method::POST, "/v1/activities"),
            spec(Method::GET, "/v1/files/{name}.{ext}"),
        ]);
        assert_eq!(
            found(&t, Method::GET, "/v1/activities/stats"),
            "GET /v1/activities/stats "
        );
        assert_eq!(
            found(&t, Method::GET, "/v1/activities/a%20b/"),
            "GET /v1/activities/{id} id=a b"
        );
        assert_eq!(found(&t, Method::DELETE, "/v1/activities"), "405 POST");
        assert_eq!(
            found(&t, Method::HEAD, "/v1/activities/7"),
            "GET /v1/activities/{id} id=7"
        );
        assert_eq!(
            found(&t, Method::GET, "/v1/files/report.tar.gz"),
            "GET /v1/files/{name}.{ext} name=report,ext=tar.gz"
        );
        assert_eq!(found(&t, Method::GET, "/v1/other"), "unknown");
        assert_eq!(found(&t, Method::GET, "/v1/activities//"), "unknown");
        assert!(matches!(
            t.lookup(&Method::OPTIONS, "/v1/activities", true),
            Lookup::Preflight
        ));
    }

    #[test]
    fn duplicate_operations_and_bad_templates_are_errors() {
        let err = OperationTable::compile(
            &[spec(Method::GET, "/a/{x}"), spec(Method::GET, "/a/{y}")],
            2,
            &DocumentStore::new(),
            "file:///tmp/c.yaml",
        )
        .unwrap_err();
        assert!(err[0].1.contains("same method and path"), "{err:?}");
        assert!(parse_template("/a/{").is_err());
        assert!(parse_template("a").is_err());
    }

    #[test]
    fn operations_outside_the_route_prefix_are_found() {
        let t = table(&[
            spec(Method::GET, "/activities"),
            spec(Method::GET, "/v1/activities"),
            spec(Method::GET, "/{version}/stats"),
            spec(Method::GET, "/v1"),
        ]);
        assert_eq!(t.outside_prefix("/v1"), vec!["GET /activities"]);
        assert!(t.outside_prefix("/").is_empty());
        assert_eq!(t.outside_prefix("/v1/activities").len(), 3);
    }

    #[test]
    fn media_ranges() {
        let body = CompiledBody {
            required: true,
            media: vec![
                (
                    MediaRange::parse("application/json"),
                    "application/json".into(),
                    None,
                ),
                (MediaRange::parse("text/*"), "text/*".into(), None),
            ],
        };
        assert!(matches!(
            body.media_for(Some("Application/JSON; charset=utf-8")),
            MediaMatch::Accepted(_)
        ));
        assert!(matches!(
            body.media_for(Some("text/csv")),
            MediaMatch::Accepted(_)
        ));
        assert!(matches!(
            body.media_for(Some("application/xml")),
            MediaMatch::Rejected(_)
        ));
        assert!(matches!(body.media_for(None), MediaMatch::Rejected(_)));
    }
}
