//! `palisade test`: runs the inline tests of rule-set files offline (no network) and reports
//! per file, with a clear diff on failure.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use http::HeaderMap;

use super::compile::{load, rule_files, CompiledRuleSet};
use super::engine::Engine;
use super::eval::{engine_rule_matches, AttachedRuleSet};
use super::fields::RuleInput;
use super::file::{TestExpectation, TestRequest};
use crate::identity::geo::CountryCode;
use crate::identity::ipset::IpSet;

/// An example request, owned, from which a [`RuleInput`] borrows.
pub struct OwnedRequest {
    method: String,
    path: String,
    query: String,
    headers: HeaderMap,
    body: Vec<u8>,
    client_ip: Option<IpAddr>,
    country: Option<CountryCode>,
    asn: Option<u32>,
}

impl OwnedRequest {
    /// Builds one from a test/explain request description.
    pub fn from_test(r: &TestRequest) -> Result<OwnedRequest, String> {
        let target = r.path.clone().unwrap_or_else(|| "/".into());
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p.to_string(), q.to_string()),
            None => (target, String::new()),
        };
        let mut headers = HeaderMap::new();
        for (k, v) in &r.headers {
            let name = http::header::HeaderName::from_bytes(k.to_ascii_lowercase().as_bytes())
                .map_err(|_| format!("invalid header name {k:?}"))?;
            let value = http::HeaderValue::from_str(v)
                .map_err(|_| format!("invalid value for header {k:?}"))?;
            headers.append(name, value);
        }
        let mut body = r.body.clone().unwrap_or_default().into_bytes();
        if let Some(j) = &r.json {
            body = serde_json::to_vec(j).map_err(|e| e.to_string())?;
            headers
                .entry(http::header::CONTENT_TYPE)
                .or_insert(http::HeaderValue::from_static("application/json"));
        }
        if let Some(f) = &r.form {
            body = form_urlencoded::Serializer::new(String::new())
                .extend_pairs(f.iter())
                .finish()
                .into_bytes();
            headers
                .entry(http::header::CONTENT_TYPE)
                .or_insert(http::HeaderValue::from_static(
                    "application/x-www-form-urlencoded",
                ));
        }
        let client_ip = match &r.client_ip {
            Some(s) => Some(s.parse().map_err(|_| format!("invalid client_ip {s:?}"))?),
            None => "192.0.2.1".parse().ok(),
        };
        let country = match &r.country {
            Some(c) => Some(CountryCode::parse(c).ok_or_else(|| format!("invalid country {c:?}"))?),
            None => None,
        };
        Ok(OwnedRequest {
            method: r
                .method
                .clone()
                .unwrap_or_else(|| "GET".into())
                .to_ascii_uppercase(),
            path,
            query,
            headers,
            body,
            client_ip,
            country,
            asn: r.asn,
        })
    }

    /// The rules' view of it.
    pub fn input(&self) -> RuleInput<'_> {
        RuleInput::new(
            &self.method,
            &self.path,
            &self.query,
            &self.headers,
            &self.body,
            self.client_ip,
            self.country,
            self.asn,
        )
    }

    /// The request head as the proxy's stages see it (with `Content-Length` for the body),
    /// and the body. `None` when the method or target is not valid HTTP.
    pub fn head(&self) -> Option<(http::request::Parts, &[u8])> {
        let target = if self.query.is_empty() {
            self.path.clone()
        } else {
            format!("{}?{}", self.path, self.query)
        };
        let mut b = http::Request::builder()
            .method(self.method.as_str())
            .uri(target);
        for (k, v) in &self.headers {
            b = b.header(k, v);
        }
        if !self.body.is_empty() && !self.headers.contains_key(http::header::CONTENT_LENGTH) {
            b = b.header(http::header::CONTENT_LENGTH, self.body.len());
        }
        let (parts, ()) = b.body(()).ok()?.into_parts();
        Some((parts, &self.body))
    }
}

/// Result of one file's tests.
#[derive(Debug, Default)]
pub struct FileReport {
    /// Tests that passed.
    pub passed: usize,
    /// Failure descriptions.
    pub failures: Vec<String>,
    /// Load errors.
    pub load_error: Option<String>,
}

/// Runs every inline test of one compiled set, through the inspection engine and through
/// the reference evaluation (each value tested with the rule's own operators): a test fails
/// when either gives the wrong answer, so the engine's prefilters are checked on every test.
pub fn run_set(set: &Arc<CompiledRuleSet>) -> FileReport {
    let mut report = FileReport::default();
    let labels: Vec<Cow<'static, str>> = Vec::new();
    let engine = Engine::new(vec![AttachedRuleSet::plain(Arc::clone(set))]);
    for rule in &set.rules {
        for (i, t) in rule.tests.iter().enumerate() {
            let name = t.name.clone().unwrap_or_else(|| format!("test #{}", i + 1));
            let req = match OwnedRequest::from_test(&t.request) {
                Ok(r) => r,
                Err(e) => {
                    report
                        .failures
                        .push(format!("rule {} ({name}): bad test request: {e}", rule.id));
                    continue;
                }
            };
            let input = req.input();
            let matched = engine_rule_matches(&engine, rule, &input, &labels, &mut (), true);
            let fast = engine_rule_matches(&engine, rule, &input, &labels, &mut (), false);
            let want = t.expect == TestExpectation::Match;
            if matched == want && fast == want {
                report.passed += 1;
            } else if matched == want {
                report.failures.push(format!(
                    "rule {} ({name}), line {}: the inspection engine says {} where the rule's own operators say {} (an engine bug: please report it)",
                    rule.id,
                    rule.line,
                    outcome(fast),
                    outcome(matched),
                ));
            } else {
                let mut trace: Vec<String> = Vec::new();
                engine_rule_matches(&engine, rule, &input, &labels, &mut trace, true);
                report.failures.push(format!(
                    "rule {} ({name}), line {}:\n    expected: {}\n    actual:   {}\n    request:  {} {}{}{}\n{}",
                    rule.id,
                    rule.line,
                    outcome(want),
                    outcome(matched),
                    req.method,
                    req.path,
                    if req.query.is_empty() { "" } else { "?" },
                    req.query,
                    trace.iter().map(|l| format!("    {l}")).collect::<Vec<_>>().join("\n")
                ));
            }
        }
    }
    report
}

/// How a test report words a match result.
fn outcome(matched: bool) -> &'static str {
    if matched {
        "match"
    } else {
        "no match"
    }
}

/// Runs the tests of every rule file under `paths`; returns reports by file.
pub fn run_paths(
    paths: &[&Path],
    ip_sets: &BTreeMap<String, Arc<IpSet>>,
) -> Vec<(String, FileReport)> {
    let mut out = Vec::new();
    for p in paths {
        let files = match rule_files(p) {
            Ok(f) => f,
            Err(e) => {
                out.push((
                    p.display().to_string(),
                    FileReport {
                        load_error: Some(e.to_string()),
                        ..Default::default()
                    },
                ));
                continue;
            }
        };
        for f in files {
            let name = f.display().to_string();
            match load(&f, ip_sets) {
                Ok(set) => out.push((name, run_set(&Arc::new(set)))),
                Err(e) => out.push((
                    name,
                    FileReport {
                        load_error: Some(e.to_string()),
                        ..Default::default()
                    },
                )),
            }
        }
    }
    out
}
