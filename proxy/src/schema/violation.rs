//! Validate stage: what a failed validation reports. Violations are capped in number and each
//! text in length, so a hostile request cannot make the error response (or the log line)
//! large: 10 violations × ~600 bytes by default.

use serde_json::{json, Value};

use super::ParamIn;

/// Longest message or pointer kept, in bytes (cut at a character boundary, `…` appended).
const MAX_TEXT: usize = 240;

/// One reason a request does not match its operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Which part of the request: body, query, header, path, cookie.
    pub location: ParamIn,
    /// JSON pointer into that part (`/heart_rate/avg`; for parameters `/<name>`).
    pub pointer: String,
    /// The JSON Schema keyword that failed (`type`, `required`, `enum` …).
    pub keyword: String,
    /// Readable explanation.
    pub message: String,
}

/// Cuts `s` to the longest text kept in reports.
pub fn cap(mut s: String) -> String {
    if s.len() > MAX_TEXT {
        let mut end = MAX_TEXT;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

impl Violation {
    /// A violation; texts longer than the cap are cut.
    pub fn new(location: ParamIn, pointer: String, keyword: &str, message: String) -> Violation {
        Violation {
            location,
            pointer: cap(pointer),
            keyword: keyword.to_string(),
            message: cap(message),
        }
    }

    /// The JSON form sent to clients and logged.
    pub fn to_json(&self) -> Value {
        json!({
            "in": self.location.name(),
            "pointer": self.pointer,
            "keyword": self.keyword,
            "message": self.message,
        })
    }
}

/// The violations of one request, up to a cap.
#[derive(Debug)]
pub struct Violations {
    items: Vec<Violation>,
    max: usize,
    truncated: bool,
}

impl Violations {
    /// An empty list keeping at most `max` violations.
    pub fn new(max: usize) -> Violations {
        Violations {
            items: Vec::new(),
            max: max.max(1),
            truncated: false,
        }
    }

    /// Adds one (ignored, and the list marked truncated, once full).
    pub fn push(&mut self, v: Violation) {
        if self.is_full() {
            self.truncated = true;
        } else {
            self.items.push(v);
        }
    }

    /// Whether the cap is reached.
    pub fn is_full(&self) -> bool {
        self.items.len() >= self.max
    }

    /// Records that more violations were found than kept.
    pub fn mark_truncated(&mut self) {
        self.truncated = true;
    }

    /// Whether nothing was found.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The kept violations.
    pub fn items(&self) -> &[Violation] {
        &self.items
    }

    /// `{"violations": [...], "truncated": bool}`.
    pub fn to_json(&self) -> Value {
        json!({
            "violations": self.items.iter().map(Violation::to_json).collect::<Vec<_>>(),
            "truncated": self.truncated,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn capped_in_count_and_length() {
        let mut v = Violations::new(2);
        for i in 0..5 {
            v.push(Violation::new(
                ParamIn::Body,
                format!("/{i}"),
                "type",
                "é".repeat(500),
            ));
        }
        assert_eq!(v.items().len(), 2);
        let j = v.to_json();
        assert_eq!(j["truncated"], true);
        let msg = j["violations"][0]["message"].as_str().unwrap();
        assert!(msg.len() <= MAX_TEXT + 3 && msg.ends_with('…'));
    }
}
