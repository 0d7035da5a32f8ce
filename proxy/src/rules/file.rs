//! Rules step 1 (parse): the shapes of a rule-set YAML file, as rule authors write them.
//! Unknown keys are errors with line and column; every condition keeps its location so the
//! compiler can name the line of a bad regex or an unknown field.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::Deserialize;
use serde_saphyr::Spanned;

/// A rule-set file.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RuleSetFile {
    /// Unique name; routes attach rule sets by it.
    #[schemars(with = "String")]
    pub name: Spanned<String>,
    /// Version of the rule set (free text, e.g. `1.2.0`).
    #[serde(default)]
    pub version: Option<String>,
    /// What the rule set protects against.
    #[serde(default)]
    pub description: Option<String>,
    /// `first_match` (default: the first blocking or allowing rule decides) or `anomaly`
    /// (matching `block` rules add their `score`; the request is blocked when the total
    /// reaches `anomaly_threshold`).
    #[serde(default)]
    pub mode: Option<RuleSetMode>,
    /// Score at which an `anomaly` rule set blocks (default 5).
    #[serde(default)]
    pub anomaly_threshold: Option<u32>,
    /// The rules, evaluated in order.
    pub rules: Vec<RuleFile>,
}

/// How a rule set decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RuleSetMode {
    /// The first terminating rule decides.
    FirstMatch,
    /// Scores add up; block at the threshold.
    Anomaly,
}

/// One rule.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RuleFile {
    /// Unique id within the rule set (used in logs, metrics, overrides, exclusions).
    #[schemars(with = "String")]
    pub id: Spanned<String>,
    /// What the rule detects.
    #[serde(default)]
    pub description: Option<String>,
    /// Labels added to the request when the rule matches (e.g. `palisade:sqli`).
    #[serde(default)]
    pub labels: Vec<String>,
    /// `block` (default), `allow`, `count` or `log`.
    #[serde(default)]
    pub action: Option<RuleAction>,
    /// HTTP status for `block` (default 403).
    #[serde(default)]
    pub status: Option<u16>,
    /// Anomaly score added by a matching `block` rule in an `anomaly` rule set (default 5).
    #[serde(default)]
    pub score: Option<u32>,
    /// Paranoia level 1–4 (default 1), as in the OWASP CRS: a route runs the rules at or
    /// below its `policy.paranoia` (default 1). Level 1 holds checks that stay quiet on real
    /// API traffic; broader, more false-positive-prone checks go to 2–4.
    #[serde(default)]
    pub paranoia: Option<u8>,
    /// The condition.
    #[serde(rename = "match")]
    #[schemars(with = "ConditionFile")]
    pub condition: Spanned<ConditionFile>,
    /// Example requests and whether the rule must match them (`palisade test`).
    #[serde(default)]
    pub tests: Vec<RuleTestFile>,
}

/// What a matching rule does (defined with the config shapes, which name it too).
pub use crate::config::file::RuleAction;

/// A condition: exactly one of `all`, `any`, `not`, or a field test.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConditionFile {
    /// Every sub-condition must hold.
    #[serde(default)]
    #[schemars(with = "Option<Vec<ConditionFile>>")]
    pub all: Option<Vec<Spanned<ConditionFile>>>,
    /// At least one sub-condition must hold.
    #[serde(default)]
    #[schemars(with = "Option<Vec<ConditionFile>>")]
    pub any: Option<Vec<Spanned<ConditionFile>>>,
    /// The sub-condition must not hold.
    #[serde(default)]
    #[schemars(with = "Option<Box<ConditionFile>>")]
    pub not: Option<Box<Spanned<ConditionFile>>>,
    /// Field(s) to inspect: one name or a list (`query.values`, `header:user-agent`, …).
    #[serde(default)]
    pub field: Option<OneOrMany>,
    /// Transformations applied in order before the operator.
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub transforms: Vec<Spanned<String>>,
    /// Rust regex (`regex` crate syntax), matched anywhere in the value.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub regex: Option<Spanned<String>>,
    /// Phrases: matches when any occurs in the value (Aho-Corasick, case-insensitive).
    #[serde(default)]
    pub phrases: Option<Vec<String>>,
    /// File of phrases, one a line (`#` comments), relative to the rule-set file.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub phrases_file: Option<Spanned<String>>,
    /// Substring.
    #[serde(default)]
    pub contains: Option<String>,
    /// Whole value equals.
    #[serde(default)]
    pub equals: Option<String>,
    /// Value starts with.
    #[serde(default)]
    pub starts_with: Option<String>,
    /// Value ends with.
    #[serde(default)]
    pub ends_with: Option<String>,
    /// Numeric comparison of the value parsed as a number.
    #[serde(default)]
    pub number: Option<Comparison>,
    /// Comparison of the value's length in bytes.
    #[serde(default)]
    pub size: Option<Comparison>,
    /// Comparison of the number of values (e.g. query args); true/false, not per value.
    #[serde(default)]
    pub count: Option<Comparison>,
    /// libinjection SQL-injection detection.
    #[serde(default)]
    pub sqli: Option<bool>,
    /// libinjection XSS detection.
    #[serde(default)]
    pub xss: Option<bool>,
    /// The value (an IP) is in this named IP set.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub ip_in: Option<Spanned<String>>,
    /// The client's country is one of these.
    #[serde(default)]
    pub country_in: Option<Vec<String>>,
    /// The client's ASN is one of these.
    #[serde(default)]
    pub asn_in: Option<Vec<u32>>,
    /// An earlier rule added this label (`*` at the end matches a prefix).
    #[serde(default)]
    pub label: Option<String>,
    /// With an operator other than `regex` and `count`: a value only matches when it also
    /// matches this regex. Checked first, so a cheap confirmation in front of `sqli`/`xss`
    /// also saves their cost on values that cannot be injections.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub confirm: Option<Spanned<String>>,
    /// Inverts the field test.
    #[serde(default)]
    pub negate: bool,
}

/// One field or several.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum OneOrMany {
    /// One.
    One(String),
    /// Several.
    Many(Vec<String>),
}

/// A numeric comparison: any of `gt`, `ge`, `lt`, `le`, `eq` (all given must hold).
#[derive(Debug, Default, Clone, Copy, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Comparison {
    /// Greater than.
    #[serde(default)]
    pub gt: Option<f64>,
    /// Greater or equal.
    #[serde(default)]
    pub ge: Option<f64>,
    /// Less than.
    #[serde(default)]
    pub lt: Option<f64>,
    /// Less or equal.
    #[serde(default)]
    pub le: Option<f64>,
    /// Equal.
    #[serde(default)]
    pub eq: Option<f64>,
}

impl Comparison {
    /// Whether `x` satisfies every bound given.
    pub fn holds(&self, x: f64) -> bool {
        self.gt.is_none_or(|v| x > v)
            && self.ge.is_none_or(|v| x >= v)
            && self.lt.is_none_or(|v| x < v)
            && self.le.is_none_or(|v| x <= v)
            && self.eq.is_none_or(|v| x == v)
    }

    /// Whether no bound is given.
    pub fn is_empty(&self) -> bool {
        self.gt.is_none()
            && self.ge.is_none()
            && self.lt.is_none()
            && self.le.is_none()
            && self.eq.is_none()
    }
}

/// An inline test of a rule.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RuleTestFile {
    /// What the example shows.
    #[serde(default)]
    pub name: Option<String>,
    /// The request.
    pub request: TestRequest,
    /// `match` or `no_match`.
    pub expect: TestExpectation,
}

/// Whether a rule must match an example.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TestExpectation {
    /// The rule matches.
    Match,
    /// The rule does not match.
    NoMatch,
}

/// An example request (also the format of `palisade explain --request`).
#[derive(Debug, Default, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TestRequest {
    /// Method (default GET).
    #[serde(default)]
    pub method: Option<String>,
    /// Path, optionally with `?query` (default `/`), sent as written (encode it yourself).
    #[serde(default)]
    pub path: Option<String>,
    /// Headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Raw body.
    #[serde(default)]
    pub body: Option<String>,
    /// A JSON body (sets `content-type: application/json`).
    #[serde(default)]
    pub json: Option<serde_json::Value>,
    /// An urlencoded form body (sets the content type).
    #[serde(default)]
    pub form: Option<BTreeMap<String, String>>,
    /// Client IP (default 192.0.2.1).
    #[serde(default)]
    pub client_ip: Option<String>,
    /// Client country code.
    #[serde(default)]
    pub country: Option<String>,
    /// Client autonomous system number.
    #[serde(default)]
    pub asn: Option<u32>,
}
