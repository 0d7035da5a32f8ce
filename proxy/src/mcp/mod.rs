//! MCP-aware routes (`policy.mcp`): a route in front of an MCP server speaking the
//! Streamable HTTP transport, whose POST bodies are JSON-RPC 2.0 messages (one, or a batch).
//!
//! Each message is parsed once ([`parse`], cached in the request as [`Request::mcp`]) and
//! exposed to the other stages: rule fields `mcp.method` and `mcp.tool`, rate-limit key parts
//! `mcp.method` and `mcp.tool` (a batch counts each message), and Cedar, which decides each
//! message as the action `tools/call:<tool>` (other methods: the method, `tools/list`) with the
//! tool's arguments in `context.input`. Tool arguments are validated against a JSON Schema
//! written in the config or the `inputSchema` the server advertised in its last `tools/list`
//! answer, and `tools/list` answers are filtered to the tools Cedar lets the caller call.
//!
//! A refused message gets a JSON-RPC error object, not Palisade's usual JSON error, so agents
//! see an answer their client library understands: -32700 (not JSON), -32600 (not JSON-RPC,
//! or too large a batch), -32602 (arguments not valid for the tool), -32001 (forbidden).
//!
//! The route is also an OAuth 2.0 protected resource as the MCP authorization spec asks: its
//! metadata document (RFC 9728) is served by the proxy, 401 answers name it in
//! `WWW-Authenticate: Bearer resource_metadata="…"`, tokens must carry the resource in `aud`
//! (RFC 8707), and the client's token is not sent to the MCP server.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use serde_json::{json, Map, Value};

use crate::authz::{RouteAuthz, Verdict};
use crate::pipeline::{Block, BlockDetails, Decision, Eval, Needs, Notes, Stage, StageKind};
use crate::request::jsonrpc::{Invalid, Message};
use crate::request::Request;

/// JSON-RPC error codes used in answers.
pub mod code {
    /// The body is not JSON.
    pub const PARSE_ERROR: i64 = -32700;
    /// Not a JSON-RPC request (or a batch too large).
    pub const INVALID_REQUEST: i64 = -32600;
    /// The tool's arguments do not fit its schema.
    pub const INVALID_PARAMS: i64 = -32602;
    /// Refused by policy (an implementation-defined server error).
    pub const FORBIDDEN: i64 = -32001;
}

/// A JSON-RPC error object for a message (`id` null when unknown).
pub fn error_object(id: Option<&Value>, code: i64, message: &str, data: Value) -> Value {
    json!({
        "jsonrpc": "2.0",
        "id": id.cloned().unwrap_or(Value::Null),
        "error": {"code": code, "message": message, "data": data},
    })
}

/// An MCP route, compiled.
pub struct McpRoute {
    /// Route name.
    pub route: String,
    /// Most messages in a batch.
    pub max_batch: usize,
    /// Where the client's token is, to remove it before the request goes upstream (`None`:
    /// `forward_token: true`). Parsed once, at load.
    pub strip_token: Option<crate::auth::TokenSource>,
    /// Filter `tools/list` answers with Cedar.
    pub filter_tools_list: bool,
    /// Validate against advertised `inputSchema`s.
    pub advertised: bool,
    /// Schemas written in the config, by tool.
    configured: HashMap<String, jsonschema::Validator>,
    /// Schemas the server advertised in its last `tools/list` answer, by tool.
    learned: ArcSwap<HashMap<String, Arc<jsonschema::Validator>>>,
    /// Cedar, when the route has `authorize`.
    pub authz: Option<Arc<RouteAuthz>>,
    /// The protected-resource metadata, when `resource` is set.
    pub metadata: Option<ResourceMetadata>,
}

impl std::fmt::Debug for McpRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("McpRoute")
            .field("route", &self.route)
            .field("tools", &self.configured.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// An OAuth protected resource's metadata (RFC 9728) and where it is served.
#[derive(Debug, Clone)]
pub struct ResourceMetadata {
    /// The resource identifier (`https://mcp.example.com/mcp`).
    pub resource: String,
    /// Path it is served at (`/.well-known/oauth-protected-resource/mcp`).
    pub path: String,
    /// Its full URL, for `WWW-Authenticate`.
    pub url: String,
    /// The JSON document.
    pub document: bytes::Bytes,
}

impl ResourceMetadata {
    /// The metadata of `resource` (an absolute http(s) URL, checked by the config step).
    pub fn new(
        resource: &str,
        authorization_servers: &[String],
        scopes: &[String],
    ) -> ResourceMetadata {
        let (origin, path) = split_url(resource);
        let path = if path == "/" { "" } else { path };
        let well_known = format!("/.well-known/oauth-protected-resource{path}");
        let mut doc = Map::new();
        doc.insert("resource".into(), Value::String(resource.to_string()));
        doc.insert(
            "authorization_servers".into(),
            Value::Array(
                authorization_servers
                    .iter()
                    .cloned()
                    .map(Value::String)
                    .collect(),
            ),
        );
        if !scopes.is_empty() {
            doc.insert(
                "scopes_supported".into(),
                Value::Array(scopes.iter().cloned().map(Value::String).collect()),
            );
        }
        doc.insert(
            "bearer_methods_supported".into(),
            Value::Array(vec![Value::String("header".into())]),
        );
        ResourceMetadata {
            resource: resource.to_string(),
            url: format!("{origin}{well_known}"),
            path: well_known,
            document: bytes::Bytes::from(Value::Object(doc).to_string()),
        }
    }
}

/// `https://host:port/path?q` → (`https://host:port`, `/path`).
fn split_url(url: &str) -> (&str, &str) {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    let path_at = url[after_scheme..]
        .find(['/', '?'])
        .map_or(url.len(), |i| after_scheme + i);
    let path_end = url[path_at..].find('?').map_or(url.len(), |i| path_at + i);
    let path = &url[path_at..path_end];
    (&url[..path_at], if path.is_empty() { "/" } else { path })
}

impl McpRoute {
    /// An MCP route.
    #[allow(clippy::too_many_arguments, reason = "one call site, in compile")]
    pub fn new(
        route: &str,
        max_batch: usize,
        strip_token: Option<crate::auth::TokenSource>,
        filter_tools_list: bool,
        advertised: bool,
        configured: HashMap<String, jsonschema::Validator>,
        authz: Option<Arc<RouteAuthz>>,
        metadata: Option<ResourceMetadata>,
    ) -> McpRoute {
        McpRoute {
            route: route.to_string(),
            max_batch,
            strip_token,
            filter_tools_list,
            advertised,
            configured,
            learned: ArcSwap::from_pointee(HashMap::new()),
            authz,
            metadata,
        }
    }

    /// Takes over the input schemas `previous` learned (a reload of this route, in front of
    /// the same server), when both use advertised schemas.
    pub fn keep_learned(&self, previous: &McpRoute) {
        if self.advertised && previous.advertised {
            self.learned.store(previous.learned.load_full());
        }
    }

    /// The schema violations of a tool's arguments (empty: valid or no schema).
    fn violations(&self, tool: &str, args: &Value) -> Vec<String> {
        let describe = |v: &jsonschema::Validator| -> Vec<String> {
            v.iter_errors(args)
                .take(5)
                .map(|e| {
                    let at = e.instance_path().to_string();
                    if at.is_empty() {
                        e.to_string()
                    } else {
                        format!("{at}: {e}")
                    }
                })
                .collect()
        };
        if let Some(v) = self.configured.get(tool) {
            return describe(v);
        }
        if self.advertised {
            if let Some(v) = self.learned.load().get(tool) {
                return describe(v);
            }
        }
        Vec::new()
    }

    /// Cedar's verdict on one message (`None`: the route has no `authorize`).
    fn decide(
        &self,
        m: &Message,
        claims: &Map<String, Value>,
        req: &Request<'_>,
    ) -> Option<Verdict> {
        let authz = self.authz.as_ref()?;
        let method = m.method.as_deref()?;
        let empty = Value::Object(Map::new());
        let (action, input) = match &m.tool {
            Some(t) => (
                format!("tools/call:{t}"),
                Some(m.arguments.as_ref().unwrap_or(&empty)),
            ),
            None => (method.to_string(), None),
        };
        Some(authz.decide_action(claims, &action, input, req))
    }

    /// Whether Cedar lets the caller call `tool` (for `tools/list` filtering): the decision
    /// for a call with no arguments.
    pub fn may_call(&self, tool: &str, claims: &Map<String, Value>, req: &Request<'_>) -> bool {
        let m = Message {
            id: None,
            method: Some("tools/call".into()),
            tool: Some(tool.to_string()),
            arguments: None,
        };
        matches!(
            self.decide(&m, claims, req),
            None | Some(Verdict::Allow { .. })
        )
    }

    /// Rewrites a JSON-RPC answer carrying a `tools/list` result: keeps the tools `keep`
    /// accepts, and learns each tool's `inputSchema`. Returns the new text, or `None` when
    /// the value is not such an answer.
    pub fn filter_tools_answer(&self, answer: &mut Value, keep: &dyn Fn(&str) -> bool) -> bool {
        let Some(tools) = answer
            .get_mut("result")
            .and_then(|r| r.get_mut("tools"))
            .and_then(Value::as_array_mut)
        else {
            return false;
        };
        if self.advertised {
            let mut learned: HashMap<String, Arc<jsonschema::Validator>> =
                (**self.learned.load()).clone();
            for t in tools.iter() {
                let (Some(name), Some(schema)) =
                    (t.get("name").and_then(Value::as_str), t.get("inputSchema"))
                else {
                    continue;
                };
                // A schema the validator cannot build is not enforced (the server's own
                // validation still applies); the config's schemas take precedence anyway.
                if let Ok(v) = jsonschema::validator_for(schema) {
                    learned.insert(name.to_string(), Arc::new(v));
                }
            }
            self.learned.store(Arc::new(learned));
        }
        if self.filter_tools_list {
            tools.retain(|t| t.get("name").and_then(Value::as_str).is_some_and(keep));
        }
        true
    }
}

impl McpRoute {
    /// A JSON answer body with its `tools/list` results filtered; `None`: nothing to change
    /// (not JSON, or no such result).
    pub fn rewrite_json(&self, body: &[u8], keep: &dyn Fn(&str) -> bool) -> Option<Vec<u8>> {
        let mut v: Value = serde_json::from_slice(body).ok()?;
        let changed = match &mut v {
            Value::Array(a) => {
                // Every answer of the batch is filtered (no short circuit).
                let mut any = false;
                for x in a.iter_mut() {
                    any |= self.filter_tools_answer(x, keep);
                }
                any
            }
            one => self.filter_tools_answer(one, keep),
        };
        changed.then(|| serde_json::to_vec(&v).ok()).flatten()
    }

    /// One server-sent event (without its blank-line terminator) with a `tools/list` result
    /// in its data filtered; `None`: unchanged.
    pub fn rewrite_event(&self, event: &[u8], keep: &dyn Fn(&str) -> bool) -> Option<Vec<u8>> {
        let text = std::str::from_utf8(event).ok()?;
        let mut data = String::new();
        let mut other = Vec::new();
        for line in text.split('\n') {
            let line = line.strip_suffix('\r').unwrap_or(line);
            match line.strip_prefix("data:") {
                Some(d) => {
                    if !data.is_empty() {
                        data.push('\n');
                    }
                    data.push_str(d.strip_prefix(' ').unwrap_or(d));
                }
                None => other.push(line),
            }
        }
        let new = self.rewrite_json(data.as_bytes(), keep)?;
        let mut out = Vec::with_capacity(new.len() + 64);
        for l in other {
            out.extend_from_slice(l.as_bytes());
            out.push(b'\n');
        }
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(&new);
        Some(out)
    }
}

/// A response being filtered (`tools/list` answers of an MCP route).
#[derive(Debug, Default)]
pub struct ToolsListFilter {
    /// The answer is an event stream (else one JSON document).
    pub sse: bool,
    /// Bytes not yet passed on.
    pub buffer: Vec<u8>,
    /// Gave up (too large): pass the rest through.
    pub passthrough: bool,
}

/// Largest JSON `tools/list` answer filtered (larger ones pass unfiltered; calls are still
/// decided by Cedar).
pub const MAX_FILTERED_ANSWER: usize = 4 << 20;

impl ToolsListFilter {
    /// Takes the next chunk of the answer; returns what can be sent now.
    pub fn push(
        &mut self,
        mcp: &McpRoute,
        chunk: &[u8],
        end: bool,
        keep: &dyn Fn(&str) -> bool,
    ) -> Vec<u8> {
        if self.passthrough {
            let mut out = std::mem::take(&mut self.buffer);
            out.extend_from_slice(chunk);
            return out;
        }
        self.buffer.extend_from_slice(chunk);
        if self.buffer.len() > MAX_FILTERED_ANSWER {
            tracing::warn!(route = %mcp.route, "tools/list answer too large to filter; passed on unfiltered");
            self.passthrough = true;
            return std::mem::take(&mut self.buffer);
        }
        if !self.sse {
            if !end {
                return Vec::new();
            }
            let all = std::mem::take(&mut self.buffer);
            return mcp.rewrite_json(&all, keep).unwrap_or(all);
        }
        let mut out = Vec::new();
        while let Some((at, sep)) = event_end(&self.buffer) {
            let event: Vec<u8> = self.buffer.drain(..at + sep).collect();
            let body = &event[..at];
            match mcp.rewrite_event(body, keep) {
                Some(new) => {
                    out.extend_from_slice(&new);
                    out.extend_from_slice(b"\n\n");
                }
                None => out.extend_from_slice(&event),
            }
        }
        if end {
            out.append(&mut self.buffer);
        }
        out
    }
}

/// Where the first event of an event stream ends: (its length, the separator's length).
fn event_end(buf: &[u8]) -> Option<(usize, usize)> {
    let lf = memchr::memmem::find(buf, b"\n\n").map(|i| (i, 2));
    let crlf = memchr::memmem::find(buf, b"\r\n\r\n").map(|i| (i, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

/// The stage of an MCP route: parses the JSON-RPC body, validates tool arguments and asks
/// Cedar about each message.
#[derive(Debug)]
pub struct McpStage {
    mcp: Arc<McpRoute>,
}

impl McpStage {
    /// The stage.
    pub fn new(mcp: Arc<McpRoute>) -> McpStage {
        McpStage { mcp }
    }
}

fn rpc_block(status: u16, reason: &'static str, body: Value, log: Map<String, Value>) -> Block {
    let mut b = Block::new(status, reason);
    b.details = Some(Arc::new(BlockDetails {
        fields: log,
        expose: false,
        body: Some(body),
    }));
    b
}

impl Stage for McpStage {
    fn kind(&self) -> StageKind {
        StageKind::Mcp
    }

    fn needs(&self) -> Needs {
        Needs {
            body: true,
            geo: false,
        }
    }

    fn evaluate<'s>(&'s self, req: &Request<'_>, _notes: &mut Notes) -> Eval<'s> {
        // GET opens the server's event stream and DELETE ends a session: no body.
        if req.method != "POST" {
            return Eval::Done(Decision::Continue);
        }
        if !req.body_complete {
            return Eval::Done(Decision::Block(rpc_block(
                413,
                "mcp_body_too_large",
                error_object(
                    None,
                    code::INVALID_REQUEST,
                    "the message is larger than the gateway inspects",
                    Value::Null,
                ),
                Map::new(),
            )));
        }
        let doc = match req.json_document() {
            Ok(d) => d,
            Err(e) => {
                return Eval::Done(Decision::Block(rpc_block(
                    400,
                    "mcp_parse_error",
                    error_object(
                        None,
                        code::PARSE_ERROR,
                        "parse error",
                        json!({"line": e.line, "column": e.column}),
                    ),
                    Map::new(),
                )))
            }
        };
        let messages = match req.mcp() {
            Some(Ok(m)) => m,
            Some(Err(Invalid(why))) => {
                return Eval::Done(Decision::Block(rpc_block(
                    400,
                    "mcp_invalid_request",
                    error_object(doc.get("id"), code::INVALID_REQUEST, why, Value::Null),
                    Map::new(),
                )))
            }
            None => return Eval::Done(Decision::Continue),
        };
        if messages.items.len() > self.mcp.max_batch {
            return Eval::Done(Decision::Block(rpc_block(
                400,
                "mcp_batch_too_large",
                error_object(
                    None,
                    code::INVALID_REQUEST,
                    &format!(
                        "a batch of {} messages; at most {} are accepted",
                        messages.items.len(),
                        self.mcp.max_batch
                    ),
                    Value::Null,
                ),
                Map::new(),
            )));
        }
        let empty = Map::new();
        let claims = req.claims().unwrap_or(&empty);
        let mut errors = Vec::new();
        let mut forbidden = false;
        let mut log = Map::new();
        let mut policies = Vec::new();
        for m in &messages.items {
            if let Some(tool) = &m.tool {
                // A call without arguments is checked as `{}`.
                let empty = Value::Object(Map::new());
                let args = m.arguments.as_ref().unwrap_or(&empty);
                let v = self.mcp.violations(tool, args);
                if !v.is_empty() {
                    log.insert("tool".into(), Value::String(tool.clone()));
                    errors.push(error_object(
                        m.id.as_ref(),
                        code::INVALID_PARAMS,
                        &format!("invalid arguments for tool {tool:?}"),
                        json!({"violations": v}),
                    ));
                    continue;
                }
            }
            match self.mcp.decide(m, claims, req) {
                None | Some(Verdict::Allow { .. }) => {}
                Some(verdict) => {
                    forbidden = true;
                    let what = match &m.tool {
                        Some(t) => format!("tool {t:?}"),
                        None => format!("method {:?}", m.method.as_deref().unwrap_or("")),
                    };
                    if let Some(t) = &m.tool {
                        log.insert("tool".into(), Value::String(t.clone()));
                    } else if let Some(me) = &m.method {
                        log.insert("method".into(), Value::String(me.clone()));
                    }
                    match verdict {
                        Verdict::Deny { policies: p } => policies.extend(p),
                        Verdict::Error(e) => {
                            log.insert("authorization_error".into(), Value::String(e));
                        }
                        Verdict::Allow { .. } => {}
                    }
                    errors.push(error_object(
                        m.id.as_ref(),
                        code::FORBIDDEN,
                        &format!("forbidden: the caller may not use {what}"),
                        Value::Null,
                    ));
                }
            }
        }
        if errors.is_empty() {
            return Eval::Done(Decision::Continue);
        }
        if forbidden {
            log.insert(
                "policies".into(),
                Value::Array(policies.into_iter().map(Value::String).collect()),
            );
        }
        let body = if messages.batch {
            Value::Array(errors)
        } else {
            errors.pop().unwrap_or(Value::Null)
        };
        let (status, reason) = if forbidden {
            (403, "forbidden")
        } else {
            (400, "mcp_invalid_params")
        };
        Eval::Done(Decision::Block(rpc_block(status, reason, body, log)))
    }
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        reason = "tests"
    )]
    use super::*;

    #[test]
    fn metadata_is_served_under_the_resource_path() {
        let m = ResourceMetadata::new(
            "https://mcp.example.com:8443/mcp",
            &["https://id.example.com".into()],
            &["mcp:tools".into()],
        );
        assert_eq!(m.path, "/.well-known/oauth-protected-resource/mcp");
        assert_eq!(
            m.url,
            "https://mcp.example.com:8443/.well-known/oauth-protected-resource/mcp"
        );
        let doc: Value = serde_json::from_slice(&m.document).unwrap();
        assert_eq!(doc["resource"], "https://mcp.example.com:8443/mcp");
        assert_eq!(doc["authorization_servers"][0], "https://id.example.com");
        let root = ResourceMetadata::new("https://mcp.example.com", &[], &[]);
        assert_eq!(root.path, "/.well-known/oauth-protected-resource");
    }
}
