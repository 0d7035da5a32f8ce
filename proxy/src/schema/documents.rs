//! Validate step, load time: schema documents (JSON or YAML files under `schemas/`) and the
//! `jsonschema` validators built from them.
//!
//! `$ref` between files is resolved by [`DocumentStore`]: before a build it reads every local
//! `file://` document reachable through `$ref` (each once per load), and every build shares
//! one prepared `jsonschema` registry of them (a document referenced by forty operations is
//! parsed once and never copied). Remote `http(s)://` references are refused: a proxy must not
//! fetch code-like input from the network while loading, and a schema that changes under a
//! running proxy would change what it accepts.
//!
//! Every validator is built with the same options: formats are assertions (an unknown format
//! is a load error), OpenAPI's numeric formats are known, and `pattern` uses the `regex`
//! crate, which runs in linear time on attacker-chosen input (ECMA look-arounds are therefore
//! a load error rather than a backtracking risk on the request path).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};

use jsonschema::{Draft, PatternOptions, Registry, Validator};
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, CONTROLS};
use serde_json::Value;

use super::openapi;

/// Characters escaped in the paths and fragments (JSON pointers such as `/paths/~1a~1{id}`) of
/// the `file://` URIs built here.
pub const URI_ESCAPES: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'[')
    .add(b']')
    .add(b'\\')
    .add(b'^')
    .add(b'`')
    .add(b'{')
    .add(b'|')
    .add(b'}');

/// Formats OpenAPI defines on top of JSON Schema. `format` only constrains strings, so the
/// numeric ones are annotations here (ranges of `int32`/`int64` are added as `minimum`/`maximum`
/// when an OpenAPI document is imported).
const OPENAPI_ANNOTATION_FORMATS: [&str; 6] =
    ["int32", "int64", "float", "double", "binary", "password"];

/// Formats JSON Schema defined after draft 4 (or 6/7) that schemas of every draft use in
/// practice: OpenAPI 3.0 documents follow draft 4, yet `uuid`, `uri-reference` or `duration`
/// are in OpenAPI's format registry and all over real API descriptions. `jsonschema` only
/// knows them from the draft that introduced them, so they are checked in every draft with
/// its own 2020-12 checkers (see [`later_format_checker`]) instead of being load errors.
const LATER_FORMATS: [&str; 9] = [
    "uuid",
    "duration",
    "uri-reference",
    "uri-template",
    "json-pointer",
    "relative-json-pointer",
    "iri",
    "iri-reference",
    "idn-hostname",
];

/// One `{"format": name}` validator per [`LATER_FORMATS`] entry, built once with draft
/// 2020-12: delegating to `jsonschema`'s checkers keeps one definition of each format instead
/// of a second, hand-written one.
static LATER_FORMAT_VALIDATORS: LazyLock<HashMap<&'static str, Validator>> = LazyLock::new(|| {
    LATER_FORMATS
        .iter()
        .filter_map(|&name| {
            let validator = jsonschema::options()
                .with_draft(Draft::Draft202012)
                .should_validate_formats(true)
                .should_ignore_unknown_formats(false)
                .build(&serde_json::json!({"format": name}))
                .ok()?;
            Some((name, validator))
        })
        .collect()
});

/// The checker registered for `name`, one of [`LATER_FORMATS`] (`None` if this `jsonschema`
/// build lacks it: the format then stays unknown, a load error, rather than passing anything).
fn later_format_checker(name: &'static str) -> Option<impl Fn(&str) -> bool + Send + Sync> {
    let validator = LATER_FORMAT_VALIDATORS.get(name)?;
    // One short string copy per checked value: `jsonschema` checks formats on JSON values.
    Some(move |s: &str| validator.is_valid(&Value::String(s.to_owned())))
}

/// `file://` URI of an absolute path.
pub fn file_uri(path: &Path) -> String {
    let text = path.to_string_lossy();
    let encoded = utf8_percent_encode(&text, URI_ESCAPES).to_string();
    if encoded.starts_with('/') {
        format!("file://{encoded}")
    } else {
        format!("file:///{encoded}")
    }
}

/// The path of a `file://` URI (without fragment), or `None` for other schemes.
fn uri_path(uri: &str) -> Option<PathBuf> {
    let rest = uri.strip_prefix("file://")?;
    let rest = rest.split('#').next().unwrap_or(rest);
    Some(PathBuf::from(
        percent_decode_str(rest).decode_utf8_lossy().into_owned(),
    ))
}

/// Makes `path` absolute against the current directory (and canonical when it exists), so
/// URIs, messages and the document cache are stable.
pub fn absolute(path: &Path) -> PathBuf {
    if let Ok(p) = std::fs::canonicalize(path) {
        p
    } else if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(path))
            .unwrap_or_else(|_| path.to_path_buf())
    }
}

/// Reads and parses one schema or OpenAPI document: `.json` as JSON, `.yaml`/`.yml` as YAML,
/// anything else as JSON and then YAML. Errors carry `file:line:col`.
pub fn read_document(path: &Path) -> Result<Value, String> {
    let text = crate::files::read_text_file(path, crate::files::MAX_TEXT_FILE)
        .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default()
        .to_ascii_lowercase();
    let json = || {
        serde_json::from_str::<Value>(&text).map_err(|e| {
            format!(
                "{}:{}:{}: invalid JSON: {e}",
                path.display(),
                e.line(),
                e.column()
            )
        })
    };
    let yaml = || {
        serde_saphyr::from_str_with_options::<Value>(&text, crate::config::yaml_options()).map_err(
            |e| {
                let (line, column, message) = crate::config::yaml_error_parts(&e);
                format!(
                    "{}:{line}:{column}: invalid YAML: {message}",
                    path.display()
                )
            },
        )
    };
    let mut doc = match ext.as_str() {
        "json" => json()?,
        "yaml" | "yml" => yaml()?,
        _ => json().or_else(|_| yaml())?,
    };
    // OpenAPI 3.0 schema objects are not JSON Schema: rewrite them once, on load, so that
    // every `$ref` into the document sees the converted form.
    openapi::normalize_document(&mut doc);
    Ok(doc)
}

#[derive(Default)]
struct Loaded {
    /// Parsed documents by path.
    docs: HashMap<PathBuf, Arc<Value>>,
    /// Read errors by path (kept to name the file when `jsonschema` reports a failed retrieve).
    errors: HashMap<PathBuf, String>,
    /// Other documents each document refers to (`file://` URIs).
    refs: HashMap<PathBuf, Vec<String>>,
    /// Prepared registries by the set of documents they hold.
    registries: HashMap<Vec<PathBuf>, Arc<Registry<'static>>>,
}

/// The schema documents loaded for one configuration, shared by every validator built from it.
#[derive(Clone, Default)]
pub struct DocumentStore {
    loaded: Arc<Mutex<Loaded>>,
}

impl DocumentStore {
    /// An empty store.
    pub fn new() -> DocumentStore {
        DocumentStore::default()
    }

    // Load time only (never on the request path), and a poisoned lock only means another load
    // thread panicked: its cache entries are still complete values.
    fn lock(&self) -> MutexGuard<'_, Loaded> {
        self.loaded.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The parsed document at `path` (read once, then cached).
    pub fn document(&self, path: &Path) -> Result<Arc<Value>, String> {
        if let Some(doc) = self.lock().docs.get(path) {
            return Ok(Arc::clone(doc));
        }
        match read_document(path) {
            Ok(doc) => {
                // The documents it refers to, found once (a large OpenAPI document is walked
                // once, not once per operation).
                let mut refs = Vec::new();
                collect_refs(&doc, &file_uri(path), &mut refs);
                refs.sort();
                refs.dedup();
                let doc = Arc::new(doc);
                let mut loaded = self.lock();
                loaded.docs.insert(path.to_path_buf(), Arc::clone(&doc));
                loaded.refs.insert(path.to_path_buf(), refs);
                Ok(doc)
            }
            Err(e) => {
                self.lock().errors.insert(path.to_path_buf(), e.clone());
                Err(e)
            }
        }
    }

    /// Every file read so far (for `palisade check` and, later, reload watching).
    pub fn files(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = self.lock().docs.keys().cloned().collect();
        files.sort();
        files
    }

    /// Follows `$ref` (relative to `base`, a `file://` URI) until a schema without one, at
    /// most 16 hops; `None` when a reference cannot be resolved (the validator build reports
    /// that with a proper message). Used to read a parameter's declared `type`.
    pub fn resolve_shallow(&self, schema: &Value, base: &str) -> Option<(Value, String)> {
        let mut current = schema.clone();
        let mut base = base.to_string();
        for _ in 0..16 {
            let Some(reference) = current.get("$ref").and_then(Value::as_str) else {
                return Some((current, base));
            };
            let (target_uri, fragment) = join_uri(&base, reference);
            let doc = self.document(&uri_path(&target_uri)?).ok()?;
            let target = if fragment.is_empty() {
                (*doc).clone()
            } else {
                let pointer = percent_decode_str(&fragment).decode_utf8_lossy();
                doc.pointer(&pointer)?.clone()
            };
            current = target;
            base = target_uri;
        }
        None
    }

    /// Loads every local document reachable through `$ref` from `schema` (whose relative
    /// references resolve against `base`) and returns their paths, sorted. A document that
    /// cannot be read is recorded (and left out); the build then names it.
    fn load_reachable(&self, schema: &Value, base: &str) -> Vec<PathBuf> {
        let mut queue = Vec::new();
        collect_refs(schema, base, &mut queue);
        let mut seen = std::collections::BTreeSet::new();
        let mut found = Vec::new();
        while let Some(uri) = queue.pop() {
            let Some(path) = uri_path(&uri) else {
                continue;
            };
            if !seen.insert(path.clone()) {
                continue;
            }
            if self.document(&path).is_ok() {
                if let Some(refs) = self.lock().refs.get(&path) {
                    queue.extend(refs.iter().cloned());
                }
                found.push(path);
            }
        }
        found.sort();
        found
    }

    /// A registry holding `paths` (cached per set: every operation of one OpenAPI document
    /// shares one). The documents are shared (`Arc`), not copied, so building hundreds of
    /// operation validators from one large document stays cheap. One registry per set, not
    /// one for all: preparing a registry resolves every reference in it, and a broken document
    /// must fail only the schemas that use it.
    fn registry(&self, paths: Vec<PathBuf>) -> Result<Arc<Registry<'static>>, String> {
        let mut loaded = self.lock();
        if let Some(r) = loaded.registries.get(&paths) {
            return Ok(Arc::clone(r));
        }
        let mut builder = Registry::new();
        for path in &paths {
            if let Some(doc) = loaded.docs.get(path) {
                builder = builder
                    .add(file_uri(path), Arc::clone(doc))
                    .map_err(|e| format!("{}: {e}", path.display()))?;
            }
        }
        let registry = match builder.prepare() {
            Ok(r) => Arc::new(r),
            Err(e) => {
                let message = e.to_string();
                return Err(explain_message(&loaded, &message).unwrap_or(message));
            }
        };
        loaded.registries.insert(paths, Arc::clone(&registry));
        Ok(registry)
    }

    /// Builds a validator for `schema`, whose relative `$ref`s resolve against `base_uri`
    /// (a `file://` URI). `draft` applies to `schema` itself when it has no `$schema`;
    /// documents name their own (default 2020-12; OpenAPI documents get theirs on load).
    pub fn build(
        &self,
        schema: &Value,
        base_uri: &str,
        draft: Option<Draft>,
    ) -> Result<Validator, String> {
        let paths = self.load_reachable(schema, base_uri);
        let registry = self.registry(paths)?;
        let mut options = jsonschema::options()
            .with_registry(&registry)
            .with_base_uri(base_uri.to_string())
            .should_validate_formats(true)
            .should_ignore_unknown_formats(false)
            .with_pattern_options(PatternOptions::regex())
            .with_format("byte", is_base64);
        for name in OPENAPI_ANNOTATION_FORMATS {
            options = options.with_format(name, |_: &str| true);
        }
        for name in LATER_FORMATS {
            if let Some(check) = later_format_checker(name) {
                options = options.with_format(name, check);
            }
        }
        if let Some(d) = draft {
            options = options.with_draft(d);
        }
        options.build(schema).map_err(|e| self.explain(&e))
    }

    /// A build error, with the file it comes from whenever that can be found out.
    fn explain(&self, e: &jsonschema::ValidationError<'_>) -> String {
        let message = e.to_string();
        if let Some(m) = explain_message(&self.lock(), &message) {
            return m;
        }
        let mut out = String::new();
        // A keyword location in one of our files names it; one in a meta-schema (the schema
        // itself is malformed) does not help: then the instance path is the place in the
        // schema being compiled.
        match e
            .absolute_keyword_location()
            .map(|l| l.as_str())
            .and_then(|l| Some((uri_path(l)?, l.split_once('#').map_or("", |(_, f)| f))))
        {
            Some((file, fragment)) => {
                let _ = write!(out, "{}: {fragment}: invalid schema: ", file.display());
            }
            None if !e.instance_path().as_str().is_empty() => {
                let _ = write!(out, "invalid schema at {}: ", e.instance_path());
            }
            None => out.push_str("invalid schema: "),
        }
        out.push_str(&message);
        out
    }
}

/// The unknown-format and unresolvable-reference errors of `jsonschema`, restated with the
/// file they concern; `None` for other errors.
fn explain_message(loaded: &Loaded, message: &str) -> Option<String> {
    // jsonschema names the keyword location but not the document for unknown formats: find
    // the document that uses the format.
    if let Some(name) = message
        .strip_prefix("Unknown format: '")
        .and_then(|m| m.split('\'').next())
    {
        let hint = "use a format JSON Schema or OpenAPI defines (date-time, email, uuid, int32 …) \
                    or remove it";
        let mut paths: Vec<&PathBuf> = loaded.docs.keys().collect();
        paths.sort();
        for path in paths {
            if let Some(pointer) = find_format(&loaded.docs[path], name, &mut String::new()) {
                return Some(format!(
                    "{}: {pointer}: unknown format {name:?}; {hint}",
                    path.display()
                ));
            }
        }
        return Some(format!("unknown format {name:?}; {hint}"));
    }
    // A failed retrieve: prefer our own error (it has the line and column of a parse error)
    // over jsonschema's wrapper.
    if message.contains("retrieving it failed") {
        let uri = message
            .split_once("Resource '")
            .and_then(|(_, r)| r.split('\'').next())
            .unwrap_or_default();
        let Some(path) = uri_path(uri) else {
            return Some(format!(
                "unresolvable $ref {uri:?}: only local files can be referenced; download the \
                 schema into the schemas directory and refer to it by a relative path"
            ));
        };
        return Some(match loaded.errors.get(&path) {
            Some(err) => format!("unresolvable $ref: {err}"),
            None => format!("unresolvable $ref {uri:?}"),
        });
    }
    None
}

/// Pushes the document URI of every `$ref` in `v` that points outside the document `base`.
fn collect_refs(v: &Value, base: &str, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            if let Some(Value::String(r)) = map.get("$ref") {
                let (doc, _) = join_uri(base, r);
                if doc != base.split('#').next().unwrap_or(base) {
                    out.push(doc);
                }
            }
            map.values().for_each(|v| collect_refs(v, base, out));
        }
        Value::Array(items) => items.iter().for_each(|v| collect_refs(v, base, out)),
        _ => {}
    }
}

/// Where `format: name` occurs in `doc`, as a JSON pointer.
fn find_format(doc: &Value, name: &str, at: &mut String) -> Option<String> {
    match doc {
        Value::Object(map) => {
            if map.get("format").and_then(Value::as_str) == Some(name) {
                return Some(format!("{at}/format"));
            }
            for (k, v) in map {
                let len = at.len();
                at.push('/');
                at.push_str(&k.replace('~', "~0").replace('/', "~1"));
                if let Some(p) = find_format(v, name, at) {
                    return Some(p);
                }
                at.truncate(len);
            }
            None
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                let len = at.len();
                let _ = write!(at, "/{i}");
                if let Some(p) = find_format(v, name, at) {
                    return Some(p);
                }
                at.truncate(len);
            }
            None
        }
        _ => None,
    }
}

/// Resolves `reference` against `base` (both `file://` or relative): `(document URI, fragment)`.
fn join_uri(base: &str, reference: &str) -> (String, String) {
    let (target, fragment) = reference.split_once('#').unwrap_or((reference, ""));
    let base_doc = base.split('#').next().unwrap_or(base);
    let doc = if target.is_empty() {
        base_doc.to_string()
    } else if target.contains("://") {
        target.to_string()
    } else if target.starts_with('/') {
        format!("file://{target}")
    } else {
        let dir = base_doc
            .rsplit_once('/')
            .map(|(d, _)| d)
            .unwrap_or(base_doc);
        let mut parts: Vec<&str> = dir.split('/').collect();
        for seg in target.split('/') {
            match seg {
                "." | "" => {}
                ".." => {
                    if parts.len() > 3 {
                        parts.pop();
                    }
                }
                s => parts.push(s),
            }
        }
        parts.join("/")
    };
    (doc, fragment.to_string())
}

/// `format: byte` (OpenAPI): standard base64 with padding.
fn is_base64(s: &str) -> bool {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(s).is_ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic, reason = "tests")]
mod tests {
    use super::*;
    use serde_json::json;

    fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        dir
    }

    #[test]
    fn refs_across_json_and_yaml_files() {
        let dir = dir_with(&[
            (
                "a.json",
                r#"{"type":"object","properties":{"hr":{"$ref":"b.yaml#/$defs/hr"}}}"#,
            ),
            ("b.yaml", "$defs:\n  hr: {type: integer, maximum: 250}\n"),
        ]);
        let store = DocumentStore::new();
        let base = file_uri(&dir.path().join("config.yaml"));
        let v = store
            .build(&json!({"$ref": "a.json"}), &base, None)
            .unwrap();
        assert!(v.is_valid(&json!({"hr": 100})));
        assert!(!v.is_valid(&json!({"hr": 300})));
        assert_eq!(store.files().len(), 2);
    }

    #[test]
    fn unknown_format_names_the_file_and_pointer() {
        let dir = dir_with(&[(
            "a.json",
            r#"{"properties":{"x":{"type":"string","format":"colour"}}}"#,
        )]);
        let store = DocumentStore::new();
        let base = file_uri(&dir.path().join("c.yaml"));
        let err = store
            .build(&json!({"$ref": "a.json"}), &base, None)
            .unwrap_err();
        assert!(err.contains("a.json: /properties/x/format"), "{err}");
        assert!(err.contains("colour"), "{err}");
    }

    #[test]
    fn missing_file_and_bad_yaml_are_named() {
        let dir = dir_with(&[("bad.yaml", "type: [1, 2\nx: 3\n")]);
        let store = DocumentStore::new();
        let base = file_uri(&dir.path().join("c.yaml"));
        let err = store
            .build(&json!({"$ref": "missing.json"}), &base, None)
            .unwrap_err();
        assert!(err.contains("missing.json"), "{err}");
        let err = store
            .build(&json!({"$ref": "bad.yaml"}), &base, None)
            .unwrap_err();
        assert!(err.contains("bad.yaml:2:"), "{err}");
    }

    #[test]
    fn remote_refs_are_refused_and_patterns_are_linear() {
        let store = DocumentStore::new();
        let err = store
            .build(
                &json!({"$ref": "https://example.com/s.json"}),
                "file:///tmp/x.yaml",
                None,
            )
            .unwrap_err();
        assert!(err.contains("only local files"), "{err}");
        let err = store
            .build(
                &json!({"type": "string", "pattern": "^(?=a)a$"}),
                "file:///tmp/x.yaml",
                None,
            )
            .unwrap_err();
        assert!(err.contains("invalid schema"), "{err}");
    }

    #[test]
    fn drafts_follow_schema_keyword_or_default() {
        let store = DocumentStore::new();
        let s = json!({"type": "integer", "minimum": 5, "exclusiveMinimum": true});
        let d4 = store
            .build(&s, "file:///tmp/x.yaml", Some(Draft::Draft4))
            .unwrap();
        assert!(!d4.is_valid(&json!(5)));
        let s7 = json!({"$schema": "http://json-schema.org/draft-07/schema#",
            "type": "integer", "exclusiveMinimum": 5});
        let d7 = store.build(&s7, "file:///tmp/x.yaml", None).unwrap();
        assert!(!d7.is_valid(&json!(5)) && d7.is_valid(&json!(6)));
    }

    #[test]
    fn later_formats_are_checked_in_every_draft() {
        let store = DocumentStore::new();
        for draft in [Draft::Draft4, Draft::Draft7, Draft::Draft202012] {
            let v = store
                .build(
                    &json!({"properties": {"id": {"type": "string", "format": "uuid"},
                        "every": {"type": "string", "format": "duration"},
                        "next": {"type": "string", "format": "uri-reference"}}}),
                    "file:///tmp/x.yaml",
                    Some(draft),
                )
                .unwrap();
            let good = json!({"id": "0b6f1c2e-8d4a-4c1e-9f3b-2a7d5e6c8b90",
                "every": "PT15M", "next": "/activities?cursor=2"});
            assert!(v.is_valid(&good), "{draft:?}");
            for (field, bad) in [
                ("id", "0b6f1c2e8d4a4c1e9f3b2a7d5e6c8b90x"),
                ("every", "15 minutes"),
                ("next", "/a b\\c"),
            ] {
                let mut instance = good.clone();
                instance[field] = json!(bad);
                assert!(!v.is_valid(&instance), "{draft:?} {field}={bad}");
            }
        }
    }

    #[test]
    fn uri_round_trip_and_join() {
        let p = Path::new("/tmp/my schemas/a#b.json");
        assert_eq!(uri_path(&file_uri(p)).unwrap(), p);
        assert_eq!(
            join_uri("file:///x/y/c.yaml", "../s/a.json#/defs/A"),
            ("file:///x/s/a.json".to_string(), "/defs/A".to_string())
        );
        assert_eq!(
            join_uri("file:///x/y/c.yaml", "#/defs/A").0,
            "file:///x/y/c.yaml"
        );
    }
}
