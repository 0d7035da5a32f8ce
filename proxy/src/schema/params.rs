//! Validate stage, request time: query, header, path and cookie parameters. Every value
//! arrives as a string; it is coerced to the type its schema declares the way OpenAPI
//! serializes parameters (`?limit=10` is the integer 10, `?tags=a&tags=b` an array), then
//! checked against the compiled schema.

use std::borrow::Cow;

use jsonschema::Validator;
use serde_json::{Number, Value};

use super::violation::{Violation, Violations};
use super::ParamIn;

/// How a parameter's array values are written (OpenAPI `style`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamStyle {
    /// `form` (query, cookie) or `simple` (path, header): comma-separated unless exploded.
    Form,
    /// `a b c`.
    SpaceDelimited,
    /// `a|b|c`.
    PipeDelimited,
    /// `deepObject`, `matrix`, `label`: the value is checked as a plain string.
    Unsupported,
}

/// The scalar type a string value is coerced to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scalar {
    Integer,
    Number,
    Boolean,
    String,
}

/// How raw strings become JSON values for one parameter, decided at load time from the
/// schema's `type`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Coercion {
    /// Try these scalar types in order; the first that parses wins, else the raw string.
    Scalars(Vec<Scalar>),
    /// An array: items coerced with the inner scalars, split on `separator` unless exploded.
    Array {
        /// Item types.
        items: Vec<Scalar>,
        /// Separator for non-exploded values.
        separator: char,
        /// Whether each occurrence is one item (`?t=a&t=b`) rather than a list (`?t=a,b`).
        explode: bool,
    },
    /// The value is a JSON document (`content: application/json` parameters).
    Json,
}

fn scalars_of(schema: Option<&Value>) -> Vec<Scalar> {
    let types: Vec<&str> = match schema.and_then(|s| s.get("type")) {
        Some(Value::String(t)) => vec![t.as_str()],
        Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    let mut out = Vec::new();
    // Most specific first: "10" is an integer before it is a number or a string.
    for (name, s) in [
        ("integer", Scalar::Integer),
        ("number", Scalar::Number),
        ("boolean", Scalar::Boolean),
    ] {
        if types.contains(&name) {
            out.push(s);
        }
    }
    out.push(Scalar::String);
    out
}

impl Coercion {
    /// The coercion for a parameter whose (dereferenced) schema is `schema`.
    pub fn for_schema(
        schema: Option<&Value>,
        location: ParamIn,
        style: ParamStyle,
        explode: bool,
        json_content: bool,
    ) -> Coercion {
        if json_content {
            return Coercion::Json;
        }
        let is_array = schema.and_then(|s| s.get("type")).is_some_and(|t| {
            t == "array" || t.as_array().is_some_and(|a| a.iter().any(|x| x == "array"))
        });
        if !is_array || style == ParamStyle::Unsupported {
            return Coercion::Scalars(scalars_of(schema));
        }
        let items = scalars_of(schema.and_then(|s| s.get("items")));
        let separator = match style {
            ParamStyle::SpaceDelimited => ' ',
            ParamStyle::PipeDelimited => '|',
            _ => ',',
        };
        Coercion::Array {
            items,
            separator,
            // Headers and path segments carry one occurrence: always a comma list.
            explode: explode && matches!(location, ParamIn::Query | ParamIn::Cookie),
        }
    }
}

fn coerce_scalar(raw: &str, types: &[Scalar]) -> Value {
    for t in types {
        match t {
            Scalar::Integer => {
                if let Ok(i) = raw.parse::<i64>() {
                    return Value::from(i);
                }
                if let Ok(u) = raw.parse::<u64>() {
                    return Value::from(u);
                }
            }
            Scalar::Number => {
                // Only plain decimal notation: "inf", "NaN" and "0x10" stay strings.
                let plain = !raw.is_empty()
                    && raw.bytes().all(|b| {
                        b.is_ascii_digit() || matches!(b, b'-' | b'+' | b'.' | b'e' | b'E')
                    });
                if plain {
                    if let Some(n) = raw.parse::<f64>().ok().and_then(Number::from_f64) {
                        return Value::Number(n);
                    }
                }
            }
            Scalar::Boolean => match raw {
                "true" => return Value::Bool(true),
                "false" => return Value::Bool(false),
                _ => {}
            },
            Scalar::String => return Value::String(raw.to_string()),
        }
    }
    Value::String(raw.to_string())
}

/// One declared parameter, compiled.
pub struct CompiledParam {
    /// Name as declared (headers: lower-case).
    pub name: String,
    /// Where it is read from.
    pub location: ParamIn,
    /// Whether it must be present.
    pub required: bool,
    /// How raw values are coerced.
    pub coercion: Coercion,
    /// The compiled schema (`None`: presence only).
    pub validator: Option<Validator>,
}

impl CompiledParam {
    /// Checks the occurrences of this parameter (raw, already percent-decoded values).
    /// Scalars are checked once per occurrence, so `?limit=10&limit=abc` cannot slip a bad
    /// value past a backend that reads the last one.
    pub fn check(&self, values: &[Cow<'_, str>], out: &mut Violations) {
        if values.is_empty() {
            if self.required {
                out.push(Violation::new(
                    self.location,
                    format!("/{}", self.name),
                    "required",
                    format!("{} {:?} is required", self.location.noun(), self.name),
                ));
            }
            return;
        }
        let Some(validator) = &self.validator else {
            return;
        };
        match &self.coercion {
            Coercion::Scalars(types) => {
                for raw in values {
                    self.validate(validator, &coerce_scalar(raw, types), out);
                }
            }
            Coercion::Array {
                items,
                separator,
                explode,
            } => {
                let list: Vec<Value> = if *explode {
                    values.iter().map(|v| coerce_scalar(v, items)).collect()
                } else {
                    values
                        .iter()
                        .flat_map(|v| v.split(*separator))
                        .map(|v| coerce_scalar(v.trim(), items))
                        .collect()
                };
                self.validate(validator, &Value::Array(list), out);
            }
            Coercion::Json => {
                for raw in values {
                    match serde_json::from_str::<Value>(raw) {
                        Ok(v) => self.validate(validator, &v, out),
                        Err(e) => out.push(Violation::new(
                            self.location,
                            format!("/{}", self.name),
                            "type",
                            format!(
                                "{} {:?} is not valid JSON: {e}",
                                self.location.noun(),
                                self.name
                            ),
                        )),
                    }
                }
            }
        }
    }

    fn validate(&self, validator: &Validator, value: &Value, out: &mut Violations) {
        if validator.is_valid(value) {
            return;
        }
        for e in validator.iter_errors(value) {
            if out.is_full() {
                out.mark_truncated();
                return;
            }
            out.push(Violation::new(
                self.location,
                format!("/{}{}", self.name, e.instance_path()),
                e.kind().keyword(),
                e.to_string(),
            ));
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic, reason = "tests")]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn scalars_follow_openapi() {
        let int = scalars_of(Some(&json!({"type": "integer"})));
        assert_eq!(coerce_scalar("10", &int), json!(10));
        assert_eq!(coerce_scalar("10.5", &int), json!("10.5"));
        assert_eq!(coerce_scalar("ten", &int), json!("ten"));
        let num = scalars_of(Some(&json!({"type": ["number", "null"]})));
        assert_eq!(coerce_scalar("2.5", &num), json!(2.5));
        assert_eq!(coerce_scalar("NaN", &num), json!("NaN"));
        let b = scalars_of(Some(&json!({"type": "boolean"})));
        assert_eq!(coerce_scalar("true", &b), json!(true));
        assert_eq!(coerce_scalar("1", &b), json!("1"));
        assert_eq!(coerce_scalar("7", &scalars_of(None)), json!("7"));
    }

    #[test]
    fn arrays_split_or_explode() {
        let s = json!({"type": "array", "items": {"type": "integer"}});
        let c = Coercion::for_schema(Some(&s), ParamIn::Query, ParamStyle::Form, false, false);
        assert_eq!(
            c,
            Coercion::Array {
                items: vec![Scalar::Integer, Scalar::String],
                separator: ',',
                explode: false
            }
        );
        let c = Coercion::for_schema(Some(&s), ParamIn::Header, ParamStyle::Form, true, false);
        assert!(matches!(c, Coercion::Array { explode: false, .. }));
    }
}
