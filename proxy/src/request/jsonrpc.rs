//! JSON-RPC 2.0 bodies (MCP's Streamable HTTP transport): the messages of one body, read
//! once per request ([`super::Request::mcp`]) for the MCP stage, rule fields and rate-limit
//! keys.

use serde_json::Value;

/// One JSON-RPC message of a body.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// The id (absent for notifications and for responses without one).
    pub id: Option<Value>,
    /// The method (absent for responses the client sends to server requests).
    pub method: Option<String>,
    /// For `tools/call`: the tool's name.
    pub tool: Option<String>,
    /// For `tools/call`: the arguments (an object, or absent).
    pub arguments: Option<Value>,
}

/// The messages of one body.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Messages {
    /// In body order.
    pub items: Vec<Message>,
    /// The body was a JSON array (a batch).
    pub batch: bool,
}

impl Messages {
    /// Tool names of the `tools/call` messages, in order.
    pub fn tools(&self) -> impl Iterator<Item = &str> {
        self.items.iter().filter_map(|m| m.tool.as_deref())
    }

    /// Methods of the request and notification messages, in order.
    pub fn methods(&self) -> impl Iterator<Item = &str> {
        self.items.iter().filter_map(|m| m.method.as_deref())
    }
}

/// Why a body is not JSON-RPC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid(pub String);

/// Reads the JSON-RPC messages of a parsed body.
pub fn parse(doc: &Value) -> Result<Messages, Invalid> {
    let (objects, batch): (Vec<&Value>, bool) = match doc {
        Value::Array(a) if a.is_empty() => return Err(Invalid("an empty batch".into())),
        Value::Array(a) => (a.iter().collect(), true),
        v @ Value::Object(_) => (vec![v], false),
        _ => {
            return Err(Invalid(
                "a JSON-RPC body is an object or an array of objects".into(),
            ))
        }
    };
    let mut items = Vec::with_capacity(objects.len());
    for (i, o) in objects.into_iter().enumerate() {
        let at = if batch {
            format!("message {i}: ")
        } else {
            String::new()
        };
        let Value::Object(o) = o else {
            return Err(Invalid(format!("{at}not an object")));
        };
        if o.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
            return Err(Invalid(format!("{at}`jsonrpc` must be \"2.0\"")));
        }
        let id = match o.get("id") {
            None => None,
            Some(v @ (Value::String(_) | Value::Number(_) | Value::Null)) => Some(v.clone()),
            Some(_) => return Err(Invalid(format!("{at}`id` must be a string or a number"))),
        };
        let method = match o.get("method") {
            None => None,
            Some(Value::String(m)) => Some(m.clone()),
            Some(_) => return Err(Invalid(format!("{at}`method` must be a string"))),
        };
        if method.is_none() && !(o.contains_key("result") || o.contains_key("error")) {
            return Err(Invalid(format!(
                "{at}neither a request (`method`) nor a response (`result`, `error`)"
            )));
        }
        let (mut tool, mut arguments) = (None, None);
        if method.as_deref() == Some("tools/call") {
            let params = o.get("params").and_then(Value::as_object);
            match params.and_then(|p| p.get("name")) {
                Some(Value::String(n)) if !n.is_empty() => tool = Some(n.clone()),
                _ => {
                    return Err(Invalid(format!(
                        "{at}tools/call needs `params.name`, the tool's name"
                    )))
                }
            }
            match params.and_then(|p| p.get("arguments")) {
                None | Some(Value::Null) => {}
                Some(a @ Value::Object(_)) => arguments = Some(a.clone()),
                Some(_) => {
                    return Err(Invalid(format!(
                        "{at}tools/call `params.arguments` must be an object"
                    )))
                }
            }
        }
        items.push(Message {
            id,
            method,
            tool,
            arguments,
        });
    }
    Ok(Messages { items, batch })
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
    use serde_json::json;

    #[test]
    fn single_batch_and_malformed_messages() {
        let one = parse(&json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
            "params": {"name": "get_activities", "arguments": {"user": "alice"}}}))
        .unwrap();
        assert!(!one.batch);
        assert_eq!(one.tools().collect::<Vec<_>>(), ["get_activities"]);
        let batch = parse(&json!([
            {"jsonrpc": "2.0", "id": "a", "method": "tools/list"},
            {"jsonrpc": "2.0", "method": "notifications/initialized"},
            {"jsonrpc": "2.0", "id": 7, "result": {}},
            {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "delete_route"}},
        ]))
        .unwrap();
        assert!(batch.batch);
        assert_eq!(
            batch.methods().collect::<Vec<_>>(),
            ["tools/list", "notifications/initialized", "tools/call"]
        );
        assert_eq!(batch.tools().collect::<Vec<_>>(), ["delete_route"]);
        for bad in [
            json!([]),
            json!("x"),
            json!({"id": 1, "method": "x"}),
            json!({"jsonrpc": "2.0", "id": {}, "method": "x"}),
            json!({"jsonrpc": "2.0", "id": 1}),
            json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {}}),
            json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                   "params": {"name": "t", "arguments": [1]}}),
            json!([{"jsonrpc": "2.0", "id": 1, "method": "ok"}, 3]),
        ] {
            assert!(parse(&bad).is_err(), "{bad}");
        }
    }
}
