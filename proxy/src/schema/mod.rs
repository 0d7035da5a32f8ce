//! The `validate` stage: request validation against JSON Schemas and OpenAPI documents, as API
//! Gateway's request validators do, in front of any backend.
//!
//! ```text
//!  load:    palisade.yaml `validate:` ─┬─ operations (inline / file schemas) ─┐
//!           OpenAPI 3.0/3.1 document ──┴─ openapi::import ────────────────────┴─▶ OperationTable
//!                                          (every schema compiled once by `jsonschema`)
//!  request: method + path ─▶ operation ─▶ 413 size ─▶ 415 content type ─▶ parameters (coerced)
//!           ─▶ JSON body (400 invalid_json) ─▶ schema ─▶ 400 with violations, or forward
//! ```
//!
//! Runs last in the pipeline, after the rule sets, on the pre-read body (see
//! `shared/notes/pingora-body-inspection.md`): a body that cannot be read whole cannot be
//! validated and gets 413. Evaluation takes no lock; it allocates only for the parsed body,
//! the query pairs of operations that declare query parameters, and failures.

mod documents;
pub mod openapi;
pub mod operations;
mod params;
mod violation;

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use prometheus::IntCounterVec;
use serde_json::{json, Map, Value};

pub use documents::{absolute, file_uri, DocumentStore};
use operations::{
    BodySpec, Lookup, MediaMatch, OperationSpec, OperationTable, ParamSpec, ParamStyle,
};
pub use violation::{Violation, Violations};

use crate::config::file::{
    OperationConfig, ParamConfig, UnknownOperation, ValidateAction, ValidateConfig, ValidateMode,
};
use crate::config::Problem;
use crate::metrics::LabelCache;
use crate::pipeline::{Block, BlockDetails, Decision, Eval, Needs, Notes, Stage, StageKind};
use crate::request::Request;

/// Default cap on reported violations.
const DEFAULT_MAX_VIOLATIONS: usize = 10;

/// Which part of a request a parameter or violation concerns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamIn {
    /// The request body.
    Body,
    /// The query string.
    Query,
    /// A header.
    Header,
    /// A path template parameter.
    Path,
    /// A cookie.
    Cookie,
}

impl ParamIn {
    /// Name in violation reports (`in`).
    pub fn name(self) -> &'static str {
        match self {
            ParamIn::Body => "body",
            ParamIn::Query => "query",
            ParamIn::Header => "header",
            ParamIn::Path => "path",
            ParamIn::Cookie => "cookie",
        }
    }

    /// Noun in messages.
    pub fn noun(self) -> &'static str {
        match self {
            ParamIn::Body => "body",
            ParamIn::Query => "query parameter",
            ParamIn::Header => "header",
            ParamIn::Path => "path parameter",
            ParamIn::Cookie => "cookie",
        }
    }

    /// Block reason when the first violation is here.
    fn reason(self) -> &'static str {
        match self {
            ParamIn::Body => "invalid_body",
            ParamIn::Query => "invalid_query",
            ParamIn::Header => "invalid_header",
            ParamIn::Path => "invalid_path",
            ParamIn::Cookie => "invalid_cookie",
        }
    }
}

/// A route's compiled validation.
#[derive(Debug)]
pub struct RouteValidation {
    mode: ValidateMode,
    action: ValidateAction,
    expose_details: bool,
    max_violations: usize,
    max_body: Option<usize>,
    unknown_block: bool,
    table: OperationTable,
    /// The operations imported from OpenAPI (for Cedar actions named by `operationId`).
    pub imported: Vec<ImportedOperation>,
    /// Schema and OpenAPI files the configuration had loaded once this route was compiled.
    pub files: Vec<PathBuf>,
}

/// An operation of an OpenAPI document: its method, full path template and `operationId`.
#[derive(Debug, Clone)]
pub struct ImportedOperation {
    /// Method.
    pub method: http::Method,
    /// Full path template.
    pub path: String,
    /// `operationId`.
    pub operation_id: Option<String>,
}

/// Where a route's `validate:` section is written, for locating its problems.
pub struct ConfigSite<'a> {
    /// The config file.
    pub file: &'a Arc<str>,
    /// The route's name.
    pub route: &'a str,
    /// The route's location (fallback when a problem has no location of its own).
    pub route_at: serde_saphyr::Location,
}

impl ConfigSite<'_> {
    fn problem(&self, at: Option<serde_saphyr::Location>, message: String) -> Problem {
        Problem::at(
            self.file,
            &at.unwrap_or(self.route_at),
            format!("route {:?}: {message}", self.route),
        )
    }
}

/// A schema written in the config: a string is a reference (`file.json#/$defs/X`), anything
/// else an inline schema.
pub fn config_schema(v: &Value) -> Value {
    match v {
        Value::String(r) => json!({ "$ref": r }),
        other => other.clone(),
    }
}

fn param_specs(
    out: &mut Vec<ParamSpec>,
    map: &std::collections::BTreeMap<String, ParamConfig>,
    location: ParamIn,
) {
    for (name, p) in map {
        out.push(ParamSpec {
            name: name.clone(),
            location,
            required: p.required || location == ParamIn::Path,
            schema: p.schema.as_ref().map(|s| config_schema(&s.value)),
            style: ParamStyle::Form,
            explode: p
                .explode
                .unwrap_or(matches!(location, ParamIn::Query | ParamIn::Cookie)),
            json_content: false,
        });
    }
}

fn operation_spec(op: &OperationConfig) -> OperationSpec {
    let methods: Vec<http::Method> = op
        .methods
        .as_ref()
        .map(|m| m.iter().map(|m| m.0.clone()).collect())
        .unwrap_or_default();
    let path = op.path.as_ref().map(|p| p.value.clone());
    let method_text = if methods.is_empty() {
        "ANY".to_string()
    } else {
        methods
            .iter()
            .map(http::Method::as_str)
            .collect::<Vec<_>>()
            .join("|")
    };
    let mut params = Vec::new();
    param_specs(&mut params, &op.query, ParamIn::Query);
    param_specs(&mut params, &op.headers, ParamIn::Header);
    param_specs(&mut params, &op.path_params, ParamIn::Path);
    param_specs(&mut params, &op.cookies, ParamIn::Cookie);
    let schema = op.body.as_ref().map(|b| config_schema(&b.value));
    let content_types = op.content_types.clone().unwrap_or_else(|| {
        if schema.is_some() {
            vec!["application/json".into()]
        } else {
            Vec::new()
        }
    });
    let body = (schema.is_some() || !content_types.is_empty()).then(|| BodySpec {
        required: op.body_required.unwrap_or(schema.is_some()),
        media_types: content_types
            .iter()
            .map(|t| {
                let s = schema
                    .clone()
                    .filter(|_| openapi::is_json(t) || t.contains('*'));
                (t.clone(), s)
            })
            .collect(),
    });
    OperationSpec {
        label: format!("{method_text} {}", path.as_deref().unwrap_or("*")),
        methods,
        path,
        params,
        body,
        draft: None,
        max_body: op.max_body.map(|s| s.0 as usize),
        operation_id: None,
    }
}

/// The base URI of schemas written in the config: inline schemas and references resolve
/// against the config file's directory.
pub fn config_base_uri(base_dir: &Path) -> String {
    file_uri(&absolute(base_dir).join("palisade-config"))
}

/// Compiles a route's `validate:` section. `base_dir` is the config file's directory (file
/// references are relative to it); `store` is shared by every route of the config so each
/// document is read once.
///
/// Problems are located in `config_file` at the item they concern, or at `route_at` (the
/// route's name) when the schema library cannot say more; `route` prefixes their messages.
pub fn compile(
    cfg: &ValidateConfig,
    base_dir: &Path,
    store: &DocumentStore,
    at: &ConfigSite<'_>,
) -> Result<RouteValidation, Vec<Problem>> {
    let base_dir = absolute(base_dir);
    let base_uri = config_base_uri(&base_dir);
    let mut specs: Vec<OperationSpec> = cfg.operations.iter().map(operation_spec).collect();
    let mut locations: Vec<Option<serde_saphyr::Location>> = cfg
        .operations
        .iter()
        .map(|o| {
            o.path
                .as_ref()
                .map(|p| p.referenced)
                .or_else(|| o.body.as_ref().map(|b| b.referenced))
        })
        .collect();
    let imported_from = specs.len();
    let mut imported = Vec::new();
    let mut errors = Vec::new();
    if let Some(doc) = &cfg.openapi {
        let path = absolute(&base_dir.join(&doc.value));
        match openapi::import(store, &path, cfg.base_path.as_deref()) {
            Ok(doc_ops) => {
                locations.extend(doc_ops.operations.iter().map(|_| Some(doc.referenced)));
                imported.extend(doc_ops.operations.iter().filter_map(|o| {
                    Some(ImportedOperation {
                        method: o.methods.first()?.clone(),
                        path: o.path.clone()?,
                        operation_id: o.operation_id.clone(),
                    })
                }));
                specs.extend(doc_ops.operations);
            }
            Err(es) => errors.extend(es.into_iter().map(|message| {
                at.problem(Some(doc.referenced), format!("validate.openapi: {message}"))
            })),
        }
    }
    if specs.is_empty() && errors.is_empty() {
        errors.push(at.problem(
            None,
            "validate: no operations; add `operations:` or `openapi:`".into(),
        ));
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let table = OperationTable::compile(&specs, imported_from, store, &base_uri).map_err(|es| {
        es.into_iter()
            .map(|(i, message)| {
                at.problem(
                    locations.get(i).copied().flatten(),
                    format!("validate: operation {message}"),
                )
            })
            .collect::<Vec<_>>()
    })?;
    let unknown_default = if cfg.openapi.is_some() {
        UnknownOperation::Block
    } else {
        UnknownOperation::Allow
    };
    Ok(RouteValidation {
        mode: cfg.mode.unwrap_or(ValidateMode::All),
        action: cfg.action.unwrap_or(ValidateAction::Block),
        expose_details: cfg.expose_details.unwrap_or(true),
        max_violations: cfg.max_violations.unwrap_or(DEFAULT_MAX_VIOLATIONS),
        max_body: cfg.max_body.map(|s| s.0 as usize),
        unknown_block: cfg.unknown_operation.unwrap_or(unknown_default) == UnknownOperation::Block,
        table,
        imported,
        files: store.files(),
    })
}

impl RouteValidation {
    /// Whether bodies must be pre-read (a JSON body schema is checked).
    pub fn needs_body(&self) -> bool {
        self.mode != ValidateMode::Params && (self.table.needs_body() || self.has_size_limit())
    }

    /// Whether a body size limit applies to some operation.
    pub fn has_size_limit(&self) -> bool {
        self.max_body.is_some() || self.table.has_size_limit()
    }

    /// The largest body size limit that applies to a body validated against a schema.
    pub fn max_body(&self) -> Option<usize> {
        self.max_body
    }

    /// Number of operations.
    pub fn operations(&self) -> usize {
        self.table.len()
    }

    /// Operations a route with this `path_prefix` can never send here.
    pub fn outside_prefix(&self, prefix: &str) -> Vec<&str> {
        self.table.outside_prefix(prefix)
    }
}

/// The validate stage of one route.
pub struct ValidateStage {
    validation: Arc<RouteValidation>,
    route: String,
    /// `palisade_validation_failures_total` handles by (operation, reason), resolved once.
    failures: LabelCache,
}

impl ValidateStage {
    /// The stage for `route`; failures are counted in `failures`
    /// (`palisade_validation_failures_total{route, operation, reason}`).
    pub fn new(validation: Arc<RouteValidation>, route: &str, failures: IntCounterVec) -> Self {
        ValidateStage {
            validation,
            route: route.to_string(),
            failures: LabelCache::new(failures),
        }
    }

    fn reject(
        &self,
        notes: &mut Notes,
        operation: &str,
        status: u16,
        reason: &'static str,
        mut fields: Map<String, Value>,
        headers: Vec<(&'static str, String)>,
    ) -> Decision {
        if operation != "-" {
            fields
                .entry("operation")
                .or_insert_with(|| Value::from(operation));
        }
        self.failures
            .get(&[self.route.as_str(), operation, reason])
            .inc();
        match self.validation.action {
            ValidateAction::Count => {
                let details = Value::Object(fields).to_string();
                tracing::info!(
                    target: "palisade::validation",
                    route = %self.route,
                    operation,
                    reason,
                        details = %details,
                    "request failed validation (count mode: forwarded)"
                );
                notes.counted.push(Cow::Owned(format!("validate:{reason}")));
                Decision::Continue
            }
            ValidateAction::Block => Decision::Block(Block {
                status,
                reason: Cow::Borrowed(reason),
                headers,
                details: Some(Arc::new(BlockDetails {
                    fields,
                    expose: self.validation.expose_details,
                    body: None,
                })),
            }),
        }
    }
}

/// The details of a rejection that carries one field.
fn detail(key: &str, value: Value) -> Map<String, Value> {
    let mut fields = Map::new();
    fields.insert(key.into(), value);
    fields
}

/// The details of a rejection explained by one message.
fn message(text: &str) -> Map<String, Value> {
    detail("message", json!(text))
}

/// Whether a `Content-Type` value's `charset` parameter, if any, names UTF-8.
fn charset_is_utf8(content_type: Option<&str>) -> bool {
    content_type
        .into_iter()
        .flat_map(|c| c.split(';').skip(1))
        .filter_map(|param| param.split_once('='))
        .filter(|(name, _)| name.trim().eq_ignore_ascii_case("charset"))
        .all(|(_, value)| {
            let value = value.trim().trim_matches('"');
            value.eq_ignore_ascii_case("utf-8") || value.eq_ignore_ascii_case("utf8")
        })
}

/// Values of one parameter in the request, from the one request model (query and cookies
/// decoded as for the rules and rate-limit keys).
fn param_values<'r>(
    req: &'r Request<'_>,
    location: ParamIn,
    name: &str,
    captures: &'r [(&str, Cow<'r, str>)],
) -> Vec<Cow<'r, str>> {
    match location {
        ParamIn::Query => req
            .query_pairs()
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| Cow::Borrowed(v.as_str()))
            .collect(),
        ParamIn::Header => req
            .headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()))
            .collect(),
        ParamIn::Path => captures
            .iter()
            .filter(|(k, _)| *k == name)
            .map(|(_, v)| Cow::Borrowed(v.as_ref()))
            .collect(),
        ParamIn::Cookie => req
            .cookies()
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| Cow::Borrowed(v.as_str()))
            .collect(),
        ParamIn::Body => Vec::new(),
    }
}

impl Stage for ValidateStage {
    fn kind(&self) -> StageKind {
        StageKind::Validate
    }

    fn needs(&self) -> Needs {
        Needs {
            body: self.validation.needs_body(),
            geo: false,
        }
    }

    fn evaluate<'s>(&'s self, req: &Request<'_>, notes: &mut Notes) -> Eval<'s> {
        Eval::Done(self.check(req, notes))
    }
}

impl ValidateStage {
    fn check(&self, req: &Request<'_>, notes: &mut Notes) -> Decision {
        let v = &*self.validation;
        let Ok(method) = http::Method::from_bytes(req.method.as_bytes()) else {
            return Decision::Continue;
        };
        let preflight = method == http::Method::OPTIONS
            && req.headers.contains_key("access-control-request-method");
        let (op, captures) = match v.table.lookup(&method, req.path(), preflight) {
            Lookup::Found(op, captures) => (op, captures),
            Lookup::Preflight => return Decision::Continue,
            Lookup::MethodNotAllowed(allow) if v.unknown_block => {
                let fields = detail("allowed", json!(allow));
                return self.reject(
                    notes,
                    "-",
                    405,
                    "method_not_allowed",
                    fields,
                    vec![("allow", allow)],
                );
            }
            Lookup::Unknown if v.unknown_block => {
                return self.reject(notes, "-", 404, "unknown_operation", Map::new(), vec![]);
            }
            Lookup::MethodNotAllowed(_) | Lookup::Unknown => return Decision::Continue,
        };
        let label = op.label.as_str();
        let mut violations = Violations::new(v.max_violations);
        let check_body = v.mode != ValidateMode::Params;

        let declared_length = req.content_length();
        let chunked = req.headers.contains_key(http::header::TRANSFER_ENCODING);
        let body = req.body_read.then_some(req.body);
        let has_body = match body {
            // Read whole: it speaks for itself (an empty chunked body is no body).
            Some(b) if req.body_complete => !b.is_empty(),
            _ => declared_length.is_some_and(|n| n > 0) || chunked,
        };
        if check_body {
            if let Some(limit) = op.max_body.or(v.max_body) {
                let seen = body.map_or(0, <[u8]>::len) as u64;
                // A body cut at the inspection limit is longer than what was seen.
                let cut = body.is_some() && !req.body_complete;
                if declared_length.unwrap_or(0).max(seen) > limit as u64
                    || (cut && seen >= limit as u64)
                {
                    return self.reject(
                        notes,
                        label,
                        413,
                        "body_too_large",
                        detail("limit", json!(limit)),
                        vec![],
                    );
                }
            }
        }
        // Body: content type and, for JSON types with a schema, the parsed document.
        let mut body_validator = None;
        if let (true, Some(body)) = (check_body, &op.body) {
            if has_body {
                let mut content_types = req.headers.get_all(http::header::CONTENT_TYPE).iter();
                let content_type = content_types.next().and_then(|c| c.to_str().ok());
                // Content-Type is a singleton (RFC 9110 §8.3): with two, this check could read
                // one and the backend the other (`application/json`, then a form type that
                // reads `{"a":"x&role=admin"}` differently).
                if content_types.next().is_some() {
                    return self.reject(
                        notes,
                        label,
                        400,
                        "ambiguous_content_type",
                        message("more than one Content-Type header"),
                        vec![],
                    );
                }
                let encoded = req
                    .headers
                    .get_all(http::header::CONTENT_ENCODING)
                    .iter()
                    .any(|e| !e.as_bytes().eq_ignore_ascii_case(b"identity"));
                match body.media_for(content_type) {
                    // JSON is UTF-8 (RFC 8259 §8.1): a body declared in another charset would
                    // be read as UTF-8 here and decoded otherwise by the backend.
                    MediaMatch::Accepted(Some(_)) if !charset_is_utf8(content_type) => {
                        let m = message(
                            "JSON bodies must be UTF-8; drop the charset parameter or set it to utf-8",
                        );
                        return self.reject(notes, label, 415, "unsupported_media_type", m, vec![]);
                    }
                    // A compressed body cannot be checked (and is not decompressed at the edge).
                    MediaMatch::Accepted(Some(_)) if encoded => {
                        let m = message(
                            "a body with a Content-Encoding cannot be validated; send it uncompressed",
                        );
                        return self.reject(notes, label, 415, "unsupported_media_type", m, vec![]);
                    }
                    MediaMatch::Accepted(validator) => body_validator = validator,
                    MediaMatch::Rejected(accepted) => {
                        return self.reject(
                            notes,
                            label,
                            415,
                            "unsupported_media_type",
                            detail("accepted", json!(accepted)),
                            vec![],
                        );
                    }
                }
            } else if body.required {
                violations.push(Violation::new(
                    ParamIn::Body,
                    String::new(),
                    "required",
                    "a request body is required".into(),
                ));
            }
        }

        if v.mode != ValidateMode::Body {
            for p in &op.params {
                let values = param_values(req, p.location, &p.name, &captures);
                p.check(&values, &mut violations);
            }
        }

        if let Some(validator) = body_validator {
            match body {
                Some(_) if req.body_complete => {}
                // Longer than the inspection limit (or not read): it cannot be checked whole.
                _ => {
                    let m = message(
                        "the body is larger than the inspection limit and cannot be validated",
                    );
                    return self.reject(notes, label, 413, "body_too_large", m, vec![]);
                }
            };
            match req.json_document() {
                Err(e) => {
                    let mut fields = Map::new();
                    fields.insert(
                        "position".into(),
                        json!({ "line": e.line, "column": e.column }),
                    );
                    fields.insert("message".into(), json!(violation::cap(e.message.clone())));
                    return self.reject(notes, label, 400, "invalid_json", fields, vec![]);
                }
                Ok(doc) => {
                    if !validator.is_valid(doc) {
                        for e in validator.iter_errors(doc) {
                            if violations.is_full() {
                                violations.mark_truncated();
                                break;
                            }
                            violations.push(Violation::new(
                                ParamIn::Body,
                                e.instance_path().to_string(),
                                e.kind().keyword(),
                                e.to_string(),
                            ));
                        }
                    }
                }
            }
        }

        match violations.items().first() {
            None => Decision::Continue,
            Some(first) => {
                let reason = first.location.reason();
                let mut fields = Map::new();
                if let Value::Object(report) = violations.to_json() {
                    fields.extend(report);
                }
                self.reject(notes, label, 400, reason, fields, vec![])
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic, reason = "tests")]
mod tests {
    use super::*;

    fn stage(dir: &Path, yaml: &str) -> ValidateStage {
        let cfg: ValidateConfig =
            serde_saphyr::from_str_with_options(yaml, crate::config::yaml_options()).unwrap();
        let file: Arc<str> = "t.yaml".into();
        let site = ConfigSite {
            file: &file,
            route: "r",
            route_at: serde_saphyr::Location::UNKNOWN,
        };
        let v =
            compile(&cfg, dir, &DocumentStore::new(), &site).unwrap_or_else(|e| panic!("{e:?}"));
        let metric = IntCounterVec::new(
            prometheus::Opts::new("t", "t"),
            &["route", "operation", "reason"],
        )
        .unwrap();
        ValidateStage::new(Arc::new(v), "r", metric)
    }

    /// The block reason and violations of one request (`"pass"` when it goes on).
    fn check(
        s: &ValidateStage,
        method: &str,
        uri: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (String, Value) {
        let mut b = http::Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        if !body.is_empty() {
            b = b.header("content-length", body.len().to_string());
        }
        let (parts, ()) = b.body(()).unwrap().into_parts();
        let cache = crate::request::RequestCache::default();
        let view = Request::of_head(&parts, &cache)
            .with_body((!body.is_empty()).then_some(body.as_bytes()), true);
        let mut notes = Notes::default();
        let Eval::Done(d) = s.evaluate(&view, &mut notes) else {
            panic!("validation never waits")
        };
        if let Some(l) = notes.counted.first() {
            return (l.to_string(), Value::Null);
        }
        match d {
            Decision::Continue => ("pass".into(), Value::Null),
            Decision::Block(b) => {
                let d = b
                    .details
                    .map(|d| Value::Object(d.fields.clone()))
                    .unwrap_or_default();
                (b.reason.into_owned(), d)
            }
            d => panic!("unexpected {d:?}"),
        }
    }

    #[test]
    fn openapi_31_with_external_refs_and_shared_parameters() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("order.schema.json"),
            r#"{"$schema":"https://json-schema.org/draft/2020-12/schema","type":"object",
                "required":["sku","qty"],"additionalProperties":false,
                "properties":{"sku":{"type":"string"},"qty":{"type":"integer","exclusiveMinimum":0},
                "note":{"type":["string","null"]}}}"#,
        )
        .unwrap();
        std::fs::write(
            dir.path().join("api.json"),
            r##"{"openapi":"3.1.0","info":{"title":"t","version":"1"},
              "paths":{"/shops/{shop}/orders":{
                "parameters":[{"name":"shop","in":"path","required":true,"schema":{"type":"integer","minimum":1}}],
                "post":{"parameters":[{"$ref":"#/components/parameters/Trace"},
                          {"name":"filter","in":"query","content":{"application/json":{"schema":{"type":"object","required":["q"]}}}}],
                        "requestBody":{"$ref":"#/components/requestBodies/Order"}}}},
              "components":{
                "parameters":{"Trace":{"name":"X-Trace","in":"header","required":true,"schema":{"type":"string","minLength":4}}},
                "requestBodies":{"Order":{"required":true,"content":{"application/json":{"schema":{"$ref":"order.schema.json"}}}}}}}"##,
        )
        .unwrap();
        let s = stage(dir.path(), "openapi: api.json\nbase_path: /api\n");
        let ok = r#"{"sku":"a-1","qty":2,"note":null}"#;
        let trace = [("x-trace", "abcd"), ("content-type", "application/json")];
        assert_eq!(
            check(&s, "POST", "/api/shops/7/orders", &trace, ok).0,
            "pass"
        );
        assert_eq!(
            check(
                &s,
                "POST",
                "/api/shops/7/orders?filter=%7B%22q%22%3A1%7D",
                &trace,
                ok
            )
            .0,
            "pass"
        );
        let (reason, d) = check(&s, "POST", "/api/shops/7/orders?filter=%7B%7D", &trace, ok);
        assert_eq!(
            (reason.as_str(), &d["violations"][0]["pointer"]),
            ("invalid_query", &json!("/filter"))
        );
        let (reason, d) = check(&s, "POST", "/api/shops/0/orders", &trace, ok);
        assert_eq!(reason, "invalid_path", "{d}");
        let (reason, d) = check(&s, "POST", "/api/shops/7/orders", &trace[1..], ok);
        assert_eq!(reason, "invalid_header", "{d}");
        let (reason, d) = check(
            &s,
            "POST",
            "/api/shops/7/orders",
            &trace,
            r#"{"sku":"a","qty":0}"#,
        );
        assert_eq!(
            d["violations"][0]["keyword"], "exclusiveMinimum",
            "{reason} {d}"
        );
        assert_eq!(
            check(&s, "GET", "/api/shops/7/orders", &trace, "").0,
            "method_not_allowed"
        );
        let gzip = [trace[0], trace[1], ("content-encoding", "gzip")];
        assert_eq!(
            check(&s, "POST", "/api/shops/7/orders", &gzip, ok).0,
            "unsupported_media_type"
        );
        let gzip_second = [
            trace[0],
            trace[1],
            ("content-encoding", "identity"),
            ("content-encoding", "gzip"),
        ];
        assert_eq!(
            check(&s, "POST", "/api/shops/7/orders", &gzip_second, ok).0,
            "unsupported_media_type"
        );
        let two_types = [
            trace[0],
            trace[1],
            ("content-type", "application/x-www-form-urlencoded"),
        ];
        assert_eq!(
            check(&s, "POST", "/api/shops/7/orders", &two_types, ok).0,
            "ambiguous_content_type"
        );
        for (charset, reason) in [("utf-16", "unsupported_media_type"), ("\"UTF-8\"", "pass")] {
            let ct = format!("application/json; charset={charset}");
            let h = [trace[0], ("content-type", ct.as_str())];
            assert_eq!(
                check(&s, "POST", "/api/shops/7/orders", &h, ok).0,
                reason,
                "{ct}"
            );
        }
        assert_eq!(
            check(&s, "GET", "/shops/7/orders", &[], "").0,
            "unknown_operation"
        );
    }

    #[test]
    fn hostile_inputs_get_a_reason_not_a_panic() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let cfg = "openapi: ../schemas/fitness/openapi.yaml\nmax_violations: 3\n";
        let s = stage(&root, cfg);
        let json = [
            ("content-type", "application/json"),
            ("idempotency-key", "6f1c2b4e-8a3d-4f5e-9b7c-0d1e2f3a4b5c"),
        ];
        let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
        let (reason, d) = check(&s, "POST", "/v1/activities", &json, &deep);
        assert_eq!(reason, "invalid_json", "{d}");
        let huge = r#"{"type":"run","started_at":"2026-11-20T07:30:00Z","duration_s":1e999}"#;
        assert_eq!(
            check(&s, "POST", "/v1/activities", &json, huge).0,
            "invalid_json"
        );
        // Many violations: capped, and marked truncated.
        let many = format!(
            r#"{{"type":1,"started_at":2,"duration_s":"x","title":4,"notes":5,"tags":{}}}"#,
            serde_json::to_string(&vec![7; 50]).unwrap()
        );
        let (reason, d) = check(&s, "POST", "/v1/activities", &json, &many);
        assert_eq!(reason, "invalid_body");
        assert_eq!(d["violations"].as_array().unwrap().len(), 3);
        assert_eq!(d["truncated"], true);
        // Long and odd values are cut in messages.
        let long = format!(
            "/v1/activities?cursor={}&limit=%FF%FE{}",
            "A".repeat(5000),
            "9".repeat(400)
        );
        let (reason, d) = check(&s, "GET", &long, &[], "");
        assert_eq!(reason, "invalid_query");
        assert!(d.to_string().len() < 2000, "{d}");
        let (reason, _) = check(
            &s,
            "GET",
            &format!("/v1/activities/{}", "%C3%28".repeat(300)),
            &[],
            "",
        );
        assert_eq!(reason, "invalid_path");
    }

    #[test]
    fn manual_operation_overrides_the_imported_one_and_modes_limit_checks() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("api.yaml"),
            "openapi: 3.0.3\ninfo: {title: t, version: '1'}\npaths:\n  /items:\n    get:\n      parameters:\n        - {name: n, in: query, required: true, schema: {type: integer}}\n      responses: {}\n",
        )
        .unwrap();
        let s = stage(
            dir.path(),
            "openapi: api.yaml\noperations:\n  - methods: [GET]\n    path: /items\n    query:\n      n: {schema: {type: integer, maximum: 5}}\n",
        );
        // The hand-written operation replaced the imported one: `n` is optional and at most 5.
        assert_eq!(check(&s, "GET", "/items", &[], "").0, "pass");
        assert_eq!(check(&s, "GET", "/items?n=9", &[], "").0, "invalid_query");
        let body_only = stage(dir.path(), "mode: body\nopenapi: api.yaml\n");
        assert_eq!(check(&body_only, "GET", "/items?n=x", &[], "").0, "pass");
        let count = stage(dir.path(), "action: count\nopenapi: api.yaml\n");
        assert_eq!(
            check(&count, "GET", "/items?n=x", &[], "").0,
            "validate:invalid_query"
        );
    }
}
