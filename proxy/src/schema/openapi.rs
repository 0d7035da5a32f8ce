//! Validate step, load time: OpenAPI 3.0/3.1 import. An OpenAPI document becomes a list of
//! [`OperationSpec`]s (method, path template, parameters, JSON request bodies), the same form
//! hand-written `operations:` in `palisade.yaml` take, so one compiler serves both.
//!
//! OpenAPI 3.0 schema objects are a dialect of JSON Schema draft 4 (`nullable`, boolean
//! `exclusiveMinimum`); [`normalize_document`] rewrites them into plain JSON Schema when the
//! document is loaded. 3.1 schemas are JSON Schema 2020-12 already. In both, `readOnly`
//! properties are dropped from `required`: Palisade validates requests, and OpenAPI says a
//! required read-only property is required in responses only.

use http::Method;
use jsonschema::Draft;
use percent_encoding::utf8_percent_encode;
use serde_json::{json, Map, Value};

use super::documents::{file_uri, DocumentStore, URI_ESCAPES};
use super::operations::{BodySpec, OperationSpec, ParamSpec, ParamStyle};
use super::ParamIn;

/// HTTP methods an OpenAPI path item can hold.
const METHODS: [(&str, Method); 8] = [
    ("get", Method::GET),
    ("put", Method::PUT),
    ("post", Method::POST),
    ("delete", Method::DELETE),
    ("options", Method::OPTIONS),
    ("head", Method::HEAD),
    ("patch", Method::PATCH),
    ("trace", Method::TRACE),
];

/// The OpenAPI version of a document: `Some(0)` for 3.0, `Some(1)` for 3.1, `None` otherwise.
fn minor_version(doc: &Value) -> Option<u8> {
    let v = doc.get("openapi")?.as_str()?;
    if v.starts_with("3.0") {
        Some(0)
    } else if v.starts_with("3.1") {
        Some(1)
    } else {
        None
    }
}

/// Rewrites the schema objects of an OpenAPI document in place (see the module docs); other
/// documents are left untouched.
pub fn normalize_document(doc: &mut Value) {
    let Some(minor) = minor_version(doc) else {
        return;
    };
    let v30 = minor == 0;
    let Some(root) = doc.as_object_mut() else {
        return;
    };
    // The dialect of its schemas, for `$ref`s into the document (3.0: draft 4 semantics).
    let dialect = if v30 {
        "http://json-schema.org/draft-04/schema#"
    } else {
        "https://json-schema.org/draft/2020-12/schema"
    };
    root.insert("$schema".into(), json!(dialect));
    if let Some(components) = root.get_mut("components").and_then(Value::as_object_mut) {
        if let Some(schemas) = components.get_mut("schemas").and_then(Value::as_object_mut) {
            for s in schemas.values_mut() {
                normalize_schema(s, v30);
            }
        }
        for section in ["parameters", "headers"] {
            if let Some(items) = components.get_mut(section).and_then(Value::as_object_mut) {
                for p in items.values_mut() {
                    normalize_parameter(p, v30);
                }
            }
        }
        if let Some(bodies) = components
            .get_mut("requestBodies")
            .and_then(Value::as_object_mut)
        {
            for b in bodies.values_mut() {
                normalize_content(b, v30);
            }
        }
    }
    if let Some(paths) = root.get_mut("paths").and_then(Value::as_object_mut) {
        for item in paths.values_mut() {
            let Some(item) = item.as_object_mut() else {
                continue;
            };
            if let Some(params) = item.get_mut("parameters").and_then(Value::as_array_mut) {
                params.iter_mut().for_each(|p| normalize_parameter(p, v30));
            }
            for (m, _) in METHODS {
                let Some(op) = item.get_mut(m).and_then(Value::as_object_mut) else {
                    continue;
                };
                if let Some(params) = op.get_mut("parameters").and_then(Value::as_array_mut) {
                    params.iter_mut().for_each(|p| normalize_parameter(p, v30));
                }
                if let Some(body) = op.get_mut("requestBody") {
                    normalize_content(body, v30);
                }
            }
        }
    }
}

fn normalize_parameter(p: &mut Value, v30: bool) {
    if let Some(s) = p.get_mut("schema") {
        normalize_schema(s, v30);
    }
}

fn normalize_content(body: &mut Value, v30: bool) {
    if let Some(content) = body.get_mut("content").and_then(Value::as_object_mut) {
        for media in content.values_mut() {
            if let Some(s) = media.get_mut("schema") {
                normalize_schema(s, v30);
            }
        }
    }
}

/// One schema object and its subschemas.
fn normalize_schema(schema: &mut Value, v30: bool) {
    let Some(obj) = schema.as_object_mut() else {
        return;
    };
    if v30 {
        if obj.remove("nullable") == Some(Value::Bool(true)) {
            if let Some(Value::String(t)) = obj.get("type") {
                let t = t.clone();
                obj.insert("type".into(), json!([t, "null"]));
            }
            if let Some(Value::Array(values)) = obj.get_mut("enum") {
                if !values.contains(&Value::Null) {
                    values.push(Value::Null);
                }
            }
        }
        // `format: int32/int64` is a range in OpenAPI; JSON Schema's `format` only checks
        // strings, so the range becomes `minimum`/`maximum` unless the author set tighter ones.
        let is_integer = obj.get("type").is_some_and(|t| {
            t == "integer"
                || t.as_array()
                    .is_some_and(|a| a.iter().any(|x| x == "integer"))
        });
        let range = match obj.get("format").and_then(Value::as_str) {
            Some("int32") if is_integer => Some((json!(i32::MIN), json!(i32::MAX))),
            Some("int64") if is_integer => Some((json!(i64::MIN), json!(i64::MAX))),
            _ => None,
        };
        if let Some((min, max)) = range {
            obj.entry("minimum").or_insert(min);
            obj.entry("maximum").or_insert(max);
        }
    } else if let Some(Value::String(s)) = obj.get("$schema") {
        // The OAS base dialect is 2020-12 plus annotations; the validator knows 2020-12.
        if s.starts_with("https://spec.openapis.org/oas/3.1/dialect") {
            obj.insert(
                "$schema".into(),
                json!("https://json-schema.org/draft/2020-12/schema"),
            );
        }
    }
    drop_read_only_required(obj);
    for key in ["properties", "patternProperties", "$defs", "definitions"] {
        if let Some(map) = obj.get_mut(key).and_then(Value::as_object_mut) {
            for s in map.values_mut() {
                normalize_schema(s, v30);
            }
        }
    }
    for key in [
        "additionalProperties",
        "items",
        "not",
        "contains",
        "propertyNames",
        "if",
        "then",
        "else",
        "unevaluatedProperties",
        "unevaluatedItems",
    ] {
        if let Some(s) = obj.get_mut(key) {
            match s {
                Value::Array(items) => items.iter_mut().for_each(|s| normalize_schema(s, v30)),
                s => normalize_schema(s, v30),
            }
        }
    }
    for key in ["allOf", "anyOf", "oneOf", "prefixItems"] {
        if let Some(Value::Array(items)) = obj.get_mut(key) {
            items.iter_mut().for_each(|s| normalize_schema(s, v30));
        }
    }
}

/// Removes properties marked `readOnly: true` from `required` (requests never carry them).
fn drop_read_only_required(obj: &mut Map<String, Value>) {
    let read_only: Vec<String> = match obj.get("properties").and_then(Value::as_object) {
        Some(props) => props
            .iter()
            .filter(|(_, s)| s.get("readOnly") == Some(&Value::Bool(true)))
            .map(|(k, _)| k.clone())
            .collect(),
        None => return,
    };
    if read_only.is_empty() {
        return;
    }
    if let Some(Value::Array(required)) = obj.get_mut("required") {
        required.retain(|r| !r.as_str().is_some_and(|r| read_only.iter().any(|x| x == r)));
        if required.is_empty() {
            obj.remove("required");
        }
    }
}

/// JSON-pointer escaping of one reference token, percent-encoded for a URI fragment.
fn escape(token: &str) -> String {
    utf8_percent_encode(&token.replace('~', "~0").replace('/', "~1"), URI_ESCAPES).to_string()
}

/// An imported document: its operations and the draft its schemas follow.
#[derive(Debug)]
pub struct Imported {
    /// Operations in document order.
    pub operations: Vec<OperationSpec>,
    /// Draft of the document's schemas (draft 4 for 3.0, 2020-12 for 3.1).
    pub draft: Draft,
    /// The base path every template was prefixed with.
    pub base_path: String,
}

/// Follows a local `$ref` (`#/components/...`) inside the document, at most 8 hops; returns
/// the object and its pointer.
fn deref<'a>(
    doc: &'a Value,
    value: &'a Value,
    pointer: String,
) -> Result<(&'a Value, String), String> {
    let mut current = (value, pointer);
    for _ in 0..8 {
        let Some(r) = current.0.get("$ref").and_then(Value::as_str) else {
            return Ok(current);
        };
        let Some(p) = r.strip_prefix('#') else {
            return Err(format!(
                "{}: $ref {r:?}: only references inside the document (#/components/…) are \
                 supported for parameters and request bodies",
                current.1
            ));
        };
        let target = doc
            .pointer(p)
            .ok_or_else(|| format!("{}: unresolvable $ref {r:?}", current.1))?;
        current = (target, p.to_string());
    }
    Err(format!("{}: $ref chain longer than 8", current.1))
}

/// The path part of the first server URL (`https://api.example.com/v1` → `/v1`), with server
/// variables replaced by their defaults.
fn server_base_path(doc: &Value) -> String {
    let Some(server) = doc
        .get("servers")
        .and_then(Value::as_array)
        .and_then(|s| s.first())
    else {
        return String::new();
    };
    let mut url = server
        .get("url")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    if let Some(vars) = server.get("variables").and_then(Value::as_object) {
        for (name, var) in vars {
            if let Some(d) = var.get("default").and_then(Value::as_str) {
                url = url.replace(&format!("{{{name}}}"), d);
            }
        }
    }
    let path = match url.find("://") {
        Some(i) => url[i + 3..].find('/').map_or("", |j| &url[i + 3 + j..]),
        None => url.as_str(),
    };
    path.trim_end_matches('/').to_string()
}

/// Imports the OpenAPI document at `path`. `base_path` overrides the servers' path. Errors
/// name the place in the document.
pub fn import(
    store: &DocumentStore,
    path: &std::path::Path,
    base_path: Option<&str>,
) -> Result<Imported, Vec<String>> {
    let doc = store.document(path).map_err(|e| vec![e])?;
    let Some(minor) = minor_version(&doc) else {
        return Err(vec![format!(
            "{}: not an OpenAPI 3.0 or 3.1 document (no `openapi: 3.x` field); Swagger 2.0 \
             must be converted to OpenAPI 3 first",
            path.display()
        )]);
    };
    let draft = if minor == 0 {
        Draft::Draft4
    } else {
        Draft::Draft202012
    };
    let base_path = base_path
        .map(|b| b.trim_end_matches('/').to_string())
        .unwrap_or_else(|| server_base_path(&doc));
    let uri = file_uri(path);
    let mut errors = Vec::new();
    let mut operations = Vec::new();
    let Some(paths) = doc.get("paths").and_then(Value::as_object) else {
        return Err(vec![format!(
            "{}: the document has no `paths`",
            path.display()
        )]);
    };
    for (template, item) in paths {
        let item_ptr = format!("/paths/{}", escape(template));
        if !template.starts_with('/') {
            errors.push(format!(
                "{}: {item_ptr}: path {template:?} must start with `/`",
                path.display()
            ));
            continue;
        }
        let (item, item_ptr) = match deref(&doc, item, item_ptr) {
            Ok(x) => x,
            Err(e) => {
                errors.push(format!("{}: {e}", path.display()));
                continue;
            }
        };
        let shared = params_of(&doc, item, &item_ptr, &uri);
        for (name, method) in &METHODS {
            let Some(op) = item.get(*name) else {
                continue;
            };
            let op_ptr = format!("{item_ptr}/{name}");
            let result =
                operation(&doc, op, &op_ptr, &uri, &shared).map(|(params, body)| OperationSpec {
                    label: format!("{} {}{}", method, base_path, template),
                    methods: vec![method.clone()],
                    path: Some(format!("{base_path}{template}")),
                    params,
                    body,
                    draft: Some(draft),
                    max_body: None,
                    operation_id: op
                        .get("operationId")
                        .and_then(Value::as_str)
                        .map(str::to_string),
                });
            match result {
                Ok(spec) => operations.push(spec),
                Err(e) => errors.push(format!("{}: {e}", path.display())),
            }
        }
    }
    if errors.is_empty() {
        Ok(Imported {
            operations,
            draft,
            base_path,
        })
    } else {
        Err(errors)
    }
}

/// The parameters declared on a path item or operation.
fn params_of(doc: &Value, holder: &Value, ptr: &str, uri: &str) -> Vec<Result<ParamSpec, String>> {
    let Some(list) = holder.get("parameters").and_then(Value::as_array) else {
        return Vec::new();
    };
    list.iter()
        .enumerate()
        .map(|(i, p)| {
            let (p, p_ptr) = deref(doc, p, format!("{ptr}/parameters/{i}"))?;
            parameter(p, &p_ptr, uri)
        })
        .collect()
}

fn parameter(p: &Value, ptr: &str, uri: &str) -> Result<ParamSpec, String> {
    let name = p
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("{ptr}: parameter without a `name`"))?;
    let location = match p.get("in").and_then(Value::as_str) {
        Some("query") => ParamIn::Query,
        Some("header") => ParamIn::Header,
        Some("path") => ParamIn::Path,
        Some("cookie") => ParamIn::Cookie,
        other => return Err(format!("{ptr}: parameter {name:?}: unknown `in` {other:?}")),
    };
    let style = match p.get("style").and_then(Value::as_str) {
        None | Some("form") | Some("simple") => ParamStyle::Form,
        Some("spaceDelimited") => ParamStyle::SpaceDelimited,
        Some("pipeDelimited") => ParamStyle::PipeDelimited,
        Some("deepObject") | Some("matrix") | Some("label") => ParamStyle::Unsupported,
        Some(other) => {
            return Err(format!(
                "{ptr}: parameter {name:?}: unknown style {other:?}"
            ))
        }
    };
    // OpenAPI: `explode` defaults to true for form style (query, cookie), false otherwise.
    let explode = p
        .get("explode")
        .and_then(Value::as_bool)
        .unwrap_or(location == ParamIn::Query || location == ParamIn::Cookie);
    let schema = if p.get("schema").is_some() {
        Some(json!({ "$ref": format!("{uri}#{ptr}/schema") }))
    } else if let Some(content) = p.get("content").and_then(Value::as_object) {
        // A parameter with `content` carries one serialized (JSON) value.
        content
            .iter()
            .find(|(m, s)| is_json(m) && s.get("schema").is_some())
            .map(|(m, _)| json!({ "$ref": format!("{uri}#{ptr}/content/{}/schema", escape(m)) }))
    } else {
        None
    };
    Ok(ParamSpec {
        name: name.to_string(),
        location,
        required: location == ParamIn::Path
            || p.get("required").and_then(Value::as_bool).unwrap_or(false),
        schema,
        style,
        explode,
        json_content: p.get("schema").is_none() && p.get("content").is_some(),
    })
}

/// Whether a media type (or range) is JSON: `application/json` or a `+json` suffix.
pub fn is_json(media: &str) -> bool {
    let essence = media.split(';').next().unwrap_or("").trim();
    essence.eq_ignore_ascii_case("application/json")
        || essence.to_ascii_lowercase().ends_with("+json")
}

type OperationParts = (Vec<ParamSpec>, Option<BodySpec>);

fn operation(
    doc: &Value,
    op: &Value,
    ptr: &str,
    uri: &str,
    shared: &[Result<ParamSpec, String>],
) -> Result<OperationParts, String> {
    let mut params: Vec<ParamSpec> = Vec::new();
    // Operation-level parameters override path-level ones with the same name and location.
    for p in params_of(doc, op, ptr, uri)
        .into_iter()
        .chain(shared.iter().cloned())
    {
        let p = p?;
        if !params
            .iter()
            .any(|q| q.location == p.location && q.name.eq_ignore_ascii_case(&p.name))
        {
            params.push(p);
        }
    }
    let body = match op.get("requestBody") {
        None => None,
        Some(b) => {
            let (b, b_ptr) = deref(doc, b, format!("{ptr}/requestBody"))?;
            let required = b.get("required").and_then(Value::as_bool).unwrap_or(false);
            let mut media_types = Vec::new();
            if let Some(content) = b.get("content").and_then(Value::as_object) {
                for (media, m) in content {
                    let schema = m.get("schema").filter(|_| is_json(media)).map(|_| {
                        json!({ "$ref": format!("{uri}#{b_ptr}/content/{}/schema", escape(media)) })
                    });
                    media_types.push((media.clone(), schema));
                }
            }
            Some(BodySpec {
                required,
                media_types,
            })
        }
    };
    Ok((params, body))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn openapi_30_schemas_become_json_schema() {
        let mut doc = json!({
            "openapi": "3.0.3",
            "components": {"schemas": {"A": {
                "type": "object",
                "required": ["id", "n"],
                "properties": {
                    "id": {"type": "string", "readOnly": true},
                    "n": {"type": "integer", "format": "int32", "nullable": true},
                    "e": {"type": "string", "enum": ["a"], "nullable": true}
                }
            }}}
        });
        normalize_document(&mut doc);
        let a = &doc["components"]["schemas"]["A"];
        assert_eq!(a["required"], json!(["n"]));
        assert_eq!(a["properties"]["n"]["type"], json!(["integer", "null"]));
        assert_eq!(a["properties"]["n"]["maximum"], json!(i32::MAX));
        assert_eq!(a["properties"]["e"]["enum"], json!(["a", null]));
    }

    #[test]
    fn server_path_and_variables() {
        let doc = json!({"servers": [{"url": "https://{host}/api/{v}/", "variables": {
            "host": {"default": "x.example"}, "v": {"default": "v2"}}}]});
        assert_eq!(server_base_path(&doc), "/api/v2");
        assert_eq!(
            server_base_path(&json!({"servers": [{"url": "/v1"}]})),
            "/v1"
        );
        assert_eq!(server_base_path(&json!({})), "");
    }

    #[test]
    fn json_media_types() {
        assert!(is_json("application/json; charset=utf-8"));
        assert!(is_json("application/merge-patch+json"));
        assert!(!is_json("text/plain"));
    }
}
