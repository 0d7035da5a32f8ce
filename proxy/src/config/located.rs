//! The one located-error type of every file Palisade reads: the config, rule-set files, schema
//! and OpenAPI documents, IP lists. A [`Problem`] keeps its file, line and column as structure
//! from where it is found to `palisade check`, `GET /config` and the reload log; it is never
//! turned into text and split back into lines.

use std::fmt;
use std::sync::Arc;

/// One problem in one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file (a path, or a name such as `<embedded default config>`).
    pub file: Arc<str>,
    /// 1-based line; 0 when the problem concerns the file as a whole.
    pub line: u64,
    /// 1-based column; 0 when unknown.
    pub column: u64,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl Problem {
    /// A problem at a YAML location of `file`.
    pub fn at(file: &Arc<str>, loc: &serde_saphyr::Location, message: String) -> Problem {
        Problem {
            file: Arc::clone(file),
            line: loc.line(),
            column: loc.column(),
            message,
        }
    }

    /// A problem of `file` as a whole.
    pub fn file(file: &Arc<str>, message: String) -> Problem {
        Problem {
            file: Arc::clone(file),
            line: 0,
            column: 0,
            message,
        }
    }

    /// A YAML syntax or shape error of `file`, at the location the parser gives.
    pub fn yaml(file: &Arc<str>, e: &serde_saphyr::Error) -> Problem {
        let (line, column, message) = yaml_error_parts(e);
        Problem {
            file: Arc::clone(file),
            line,
            column,
            message,
        }
    }

    /// The problem as JSON (`GET /config`).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "file": &*self.file,
            "line": self.line,
            "column": self.column,
            "message": self.message,
        })
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line > 0 {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file, self.line, self.column, self.message
            )
        } else {
            write!(f, "{}: {}", self.file, self.message)
        }
    }
}

/// Every problem found in one load: config, rule sets, schema documents together.
#[derive(Debug, Clone, Default, PartialEq, Eq, thiserror::Error)]
pub struct Problems(pub Vec<Problem>);

impl Problems {
    /// Adds one problem.
    pub fn push(&mut self, p: Problem) {
        self.0.push(p);
    }

    /// Whether nothing was found.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Number of problems.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Sorted by file, then position (whole-file problems last within a file); `Err` if any.
    pub fn into_result(mut self) -> Result<(), Problems> {
        if self.0.is_empty() {
            return Ok(());
        }
        self.sort();
        Err(self)
    }

    /// Sorts by file order of first appearance, then line and column.
    pub fn sort(&mut self) {
        let mut order: Vec<Arc<str>> = Vec::new();
        for p in &self.0 {
            if !order.contains(&p.file) {
                order.push(Arc::clone(&p.file));
            }
        }
        self.0.sort_by_key(|p| {
            (
                order.iter().position(|f| *f == p.file).unwrap_or(0),
                p.line == 0,
                p.line,
                p.column,
            )
        });
    }
}

impl From<Problem> for Problems {
    fn from(p: Problem) -> Self {
        Problems(vec![p])
    }
}

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

/// Line, column (1-based, 0 when unknown) and message of a YAML error: the error's own
/// Display repeats the location and adds a snippet; keep just the message.
pub fn yaml_error_parts(e: &serde_saphyr::Error) -> (u64, u64, String) {
    let (line, column) = e
        .location()
        .map(|l| (l.line(), l.column()))
        .unwrap_or((0, 0));
    let full = e.to_string();
    let first = full.lines().next().unwrap_or_default();
    let message = first
        .strip_prefix("error: ")
        .unwrap_or(first)
        .split_once(": ")
        .filter(|(loc, _)| loc.starts_with("line "))
        .map(|(_, m)| m.to_string())
        .unwrap_or_else(|| first.to_string());
    (line, column, message)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn problems_sort_by_file_then_position() {
        let a: Arc<str> = "a.yaml".into();
        let b: Arc<str> = "b.yaml".into();
        let p = |f: &Arc<str>, line| Problem {
            file: Arc::clone(f),
            line,
            column: 1,
            message: "m".into(),
        };
        let mut ps = Problems(vec![p(&a, 0), p(&b, 3), p(&a, 9), p(&a, 2)]);
        ps.sort();
        let lines: Vec<String> =
            ps.0.iter()
                .map(|p| format!("{}:{}", p.file, p.line))
                .collect();
        assert_eq!(lines, ["a.yaml:2", "a.yaml:9", "a.yaml:0", "b.yaml:3"]);
        assert_eq!(ps.0[0].to_string(), "a.yaml:2:1: m");
        assert_eq!(ps.0[2].to_string(), "a.yaml: m");
    }
}
