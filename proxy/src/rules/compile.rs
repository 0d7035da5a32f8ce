//! Rules step 2 (validate + compile): a parsed rule-set file becomes an immutable
//! [`CompiledRuleSet`]: fields and transform chains deduplicated into "sources", and every
//! regex, phrase list and substring test of a source listed as a [`ScanPattern`], which the
//! inspection engine (`engine`) merges across all rule sets of a route into one prefilter
//! per source. Every problem is reported with file, line, column and rule id.
//!
//! Regexes use Rust's `regex` syntax, which has no back-references or look-around: matching
//! is linear in the input whatever the pattern, and a pattern that needs more is rejected
//! here with its line.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aho_corasick::AhoCorasick;
use regex::{Regex, RegexBuilder};
use serde_saphyr::{Location, Spanned};

use super::fields::Field;
use super::file::{
    Comparison, ConditionFile, OneOrMany, RuleAction, RuleSetFile, RuleSetMode, RuleTestFile,
};
use super::transforms::Transform;
use crate::config::{Problem, Problems};
use crate::identity::geo::CountryCode;
use crate::identity::ipset::IpSet;

/// Regex compile size limit for patterns from rule files (see `regex::RegexBuilder`).
const REGEX_SIZE_LIMIT: usize = 4 << 20;

/// How a rule set decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// First terminating rule wins.
    FirstMatch,
    /// Scores add up to a threshold.
    Anomaly {
        /// Blocking threshold.
        threshold: u32,
    },
}

/// A field and the transform chain applied to its values: the unit of caching.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Source {
    /// The field.
    pub field: Field,
    /// The transforms, in order.
    pub chain: Vec<Transform>,
}

/// An operator.
#[derive(Debug, Clone)]
pub enum Op {
    /// Regex (also a [`ScanPattern`] of each of the leaf's sources).
    Regex(Regex),
    /// Any phrase occurs (ASCII case-insensitive).
    Phrases(Arc<AhoCorasick>),
    /// Substring.
    Contains(String),
    /// Equality.
    Equals(String),
    /// Prefix.
    StartsWith(String),
    /// Suffix.
    EndsWith(String),
    /// Numeric value comparison.
    Number(Comparison),
    /// Length comparison.
    Size(Comparison),
    /// Number-of-values comparison.
    Count(Comparison),
    /// libinjection SQLi.
    Sqli,
    /// libinjection XSS.
    Xss,
    /// IP in set.
    IpIn(Arc<IpSet>),
    /// Country in list.
    CountryIn(Vec<CountryCode>),
    /// ASN in list.
    AsnIn(Vec<u32>),
    /// Label present (exact, or prefix when `prefix`).
    Label {
        /// The label or prefix.
        label: String,
        /// Prefix match.
        prefix: bool,
    },
}

/// What the engine scans a source's values for, once per value for every rule of every set
/// that uses it.
#[derive(Debug, Clone)]
pub enum ScanPattern {
    /// A regex.
    Regex(Regex),
    /// Any of these phrases (ASCII case-insensitive).
    Phrases(Vec<String>),
    /// A substring (case-sensitive).
    Contains(String),
}

/// A field test.
#[derive(Debug, Clone)]
pub struct Leaf {
    /// Indices into [`CompiledRuleSet::sources`].
    pub sources: Vec<usize>,
    /// The operator.
    pub op: Op,
    /// For a scanned operator (regex, phrases, contains), its index in each source's
    /// [`CompiledRuleSet::scans`] (parallel to `sources`); empty otherwise.
    pub scan: Vec<usize>,
    /// A regex each value must also match (`confirm`).
    pub confirm: Option<Regex>,
    /// The `confirm` regex's index in each source's scans (parallel to `sources`): when no
    /// value of a source matches it, the operator (libinjection) need not run there.
    pub confirm_scan: Vec<usize>,
    /// Inverted.
    pub negate: bool,
}

/// A condition tree.
#[derive(Debug, Clone)]
pub enum Cond {
    /// Conjunction.
    All(Vec<Cond>),
    /// Disjunction.
    Any(Vec<Cond>),
    /// Negation.
    Not(Box<Cond>),
    /// Field test.
    Leaf(Leaf),
}

/// A compiled rule.
#[derive(Debug, Clone)]
pub struct CompiledRule {
    /// Id.
    pub id: String,
    /// Description.
    pub description: String,
    /// Labels added on match.
    pub labels: Vec<String>,
    /// Action.
    pub action: RuleAction,
    /// Block status.
    pub status: u16,
    /// Anomaly score.
    pub score: u32,
    /// Paranoia level (1–4): routes below it skip the rule.
    pub paranoia: u8,
    /// Condition.
    pub cond: Cond,
    /// Line of the rule in its file.
    pub line: u64,
    /// Inline tests.
    pub tests: Vec<RuleTestFile>,
}

/// A compiled rule set: immutable, `Send + Sync`, shared by every route that attaches it.
#[derive(Debug)]
pub struct CompiledRuleSet {
    /// Name.
    pub name: String,
    /// Version.
    pub version: String,
    /// Description.
    pub description: String,
    /// File it came from.
    pub path: PathBuf,
    /// Decision mode.
    pub mode: Mode,
    /// Rules in order.
    pub rules: Vec<CompiledRule>,
    /// Deduplicated (field, transforms) pairs.
    pub sources: Vec<Source>,
    /// Per source, the patterns its leaves scan for (see [`Leaf::scan`]).
    pub scans: Vec<Vec<ScanPattern>>,
    /// Whether any rule reads the body.
    pub needs_body: bool,
    /// Whether any rule reads country/ASN.
    pub needs_geo: bool,
}

struct Compiler<'a> {
    base_dir: &'a Path,
    ip_sets: &'a BTreeMap<String, Arc<IpSet>>,
    sources: Vec<Source>,
    scans: Vec<Vec<ScanPattern>>,
    file: Arc<str>,
    issues: Problems,
    rule: Option<String>,
    needs_body: bool,
    needs_geo: bool,
}

impl Compiler<'_> {
    fn issue(&mut self, loc: &Location, message: String) {
        let message = match &self.rule {
            Some(r) => format!("rule {r:?}: {message}"),
            None => message,
        };
        self.issues.push(Problem::at(&self.file, loc, message));
    }

    fn source(&mut self, s: Source) -> usize {
        if let Some(i) = self.sources.iter().position(|x| *x == s) {
            return i;
        }
        self.sources.push(s);
        self.scans.push(Vec::new());
        self.sources.len() - 1
    }

    /// Registers `p` as a scan pattern of each source; returns its index per source.
    fn scan(&mut self, sources: &[usize], p: &ScanPattern) -> Vec<usize> {
        sources
            .iter()
            .map(|&s| {
                self.scans[s].push(p.clone());
                self.scans[s].len() - 1
            })
            .collect()
    }

    fn cond(&mut self, c: &Spanned<ConditionFile>) -> Option<Cond> {
        let loc = &c.referenced;
        let f = &c.value;
        let has_leaf =
            f.field.is_some() || f.label.is_some() || f.country_in.is_some() || f.asn_in.is_some();
        let kinds = [f.all.is_some(), f.any.is_some(), f.not.is_some(), has_leaf];
        if kinds.iter().filter(|k| **k).count() != 1 {
            self.issue(loc, "a condition needs exactly one of `all`, `any`, `not`, or a `field` with an operator".into());
            return None;
        }
        if let Some(list) = &f.all {
            return Some(Cond::All(
                list.iter().filter_map(|x| self.cond(x)).collect(),
            ));
        }
        if let Some(list) = &f.any {
            return Some(Cond::Any(
                list.iter().filter_map(|x| self.cond(x)).collect(),
            ));
        }
        if let Some(inner) = &f.not {
            return self.cond(inner).map(|x| Cond::Not(Box::new(x)));
        }
        self.leaf(loc, f).map(Cond::Leaf)
    }

    /// The entries of a data file (one a line; blank lines and `#` comments skipped), resolved
    /// like `phrases_file`: relative to the rule-set file, or among the embedded data files
    /// for the managed sets. `None` (with the problem reported) when unreadable; emptiness is
    /// the caller's to judge (`phrases_file` reports it with the inline phrases).
    fn data_lines(&mut self, rel: &str, loc: &Location, what: &str) -> Option<Vec<String>> {
        let path = self.base_dir.join(rel);
        // The managed sets' data files are embedded with them (see `managed`).
        let embedded = (self.base_dir == Path::new(super::managed::BUILTIN_MANAGED))
            .then(|| super::managed::data_file(rel));
        let text = match embedded {
            Some(Some(text)) => Ok(text.to_string()),
            Some(None) => Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "not among the managed rule sets' data files",
            )),
            None => crate::files::read_text_file(&path, crate::files::MAX_TEXT_FILE),
        };
        match text {
            Ok(text) => {
                let list: Vec<String> = text
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(str::to_string)
                    .collect();
                Some(list)
            }
            Err(e) => {
                self.issue(
                    loc,
                    format!("cannot read {what} file {}: {e}", path.display()),
                );
                None
            }
        }
    }

    /// Replaces each `{{list:FILE}}` in a regex with `(?:e1|e2|…)`, the escaped entries of
    /// that data file: long word lists (commands, function names) stay data while the rule
    /// keeps the context around them (`(?:^|[;|&])\s*{{list:data/unix-commands.txt}}\b`).
    /// `{{` cannot start valid regex syntax, so the placeholder is unambiguous.
    fn expand_lists(&mut self, pattern: &str, loc: &Location) -> Option<String> {
        const OPEN: &str = "{{list:";
        if !pattern.contains(OPEN) {
            return Some(pattern.to_string());
        }
        let mut out = String::with_capacity(pattern.len());
        let mut rest = pattern;
        let mut ok = true;
        while let Some(at) = rest.find(OPEN) {
            out.push_str(&rest[..at]);
            let after = &rest[at + OPEN.len()..];
            let Some(end) = after.find("}}") else {
                self.issue(loc, "unterminated `{{list:FILE}}` in regex".into());
                return None;
            };
            let file = after[..end].trim();
            match self.data_lines(file, loc, "list") {
                Some(list) if list.is_empty() => {
                    self.issue(
                        loc,
                        format!(
                            "list file {} has no entries",
                            self.base_dir.join(file).display()
                        ),
                    );
                    ok = false;
                }
                Some(list) => {
                    let mut words: Vec<String> = list.iter().map(|w| regex::escape(w)).collect();
                    // Longest first: the leftmost match then prefers `python3` to `python`.
                    words.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
                    words.dedup();
                    out.push_str("(?:");
                    out.push_str(&words.join("|"));
                    out.push(')');
                }
                None => ok = false,
            }
            rest = &after[end + 2..];
        }
        out.push_str(rest);
        ok.then_some(out)
    }

    fn leaf(&mut self, loc: &Location, f: &ConditionFile) -> Option<Leaf> {
        // Fields: explicit, or implied by the client-data operators.
        let field_names: Vec<String> = match &f.field {
            Some(OneOrMany::One(s)) => vec![s.clone()],
            Some(OneOrMany::Many(v)) => v.clone(),
            None if f.label.is_some() => vec!["labels".into()],
            None if f.country_in.is_some() => vec!["country".into()],
            None if f.asn_in.is_some() => vec!["asn".into()],
            None => vec![],
        };
        let mut chain = Vec::new();
        for t in &f.transforms {
            match Transform::parse(&t.value) {
                Some(x) => chain.push(x),
                None => self.issue(
                    &t.referenced,
                    format!(
                        "unknown transform {:?}; transforms are {}",
                        t.value,
                        Transform::NAMES.join(", ")
                    ),
                ),
            }
        }
        let mut fields = Vec::new();
        for n in &field_names {
            match Field::parse(n) {
                Ok(fl) => fields.push(fl),
                Err(e) => self.issue(loc, e),
            }
        }
        if fields.is_empty() {
            if field_names.is_empty() {
                self.issue(loc, "a field test needs `field`".into());
            }
            return None;
        }
        self.needs_body |= fields.iter().any(Field::needs_body);
        self.needs_geo |= fields.iter().any(Field::needs_geo);
        let sources: Vec<usize> = fields
            .into_iter()
            .map(|field| {
                self.source(Source {
                    field,
                    chain: chain.clone(),
                })
            })
            .collect();

        let mut ops = Vec::new();
        let mut scan = Vec::new();
        if let Some(r) = &f.regex {
            let pattern = self.expand_lists(&r.value, &r.referenced)?;
            match RegexBuilder::new(&pattern)
                .size_limit(REGEX_SIZE_LIMIT)
                .build()
            {
                Ok(regex) => {
                    scan = self.scan(&sources, &ScanPattern::Regex(regex.clone()));
                    ops.push(Op::Regex(regex));
                }
                Err(e) => self.issue(
                    &r.referenced,
                    format!("invalid regex: {}", e.to_string().replace('\n', " ")),
                ),
            }
        }
        let mut phrases: Vec<String> = f.phrases.clone().unwrap_or_default();
        if let Some(pf) = &f.phrases_file {
            if let Some(list) = self.data_lines(&pf.value, &pf.referenced, "phrases") {
                phrases.extend(list);
            }
        }
        if f.phrases.is_some() || f.phrases_file.is_some() {
            if phrases.is_empty() {
                self.issue(loc, "the phrase list is empty".into());
            } else {
                match AhoCorasick::builder()
                    .ascii_case_insensitive(true)
                    .build(&phrases)
                {
                    Ok(ac) => {
                        scan = self.scan(&sources, &ScanPattern::Phrases(phrases));
                        ops.push(Op::Phrases(Arc::new(ac)));
                    }
                    Err(e) => self.issue(loc, format!("cannot build the phrase matcher: {e}")),
                }
            }
        }
        if let Some(s) = &f.contains {
            scan = self.scan(&sources, &ScanPattern::Contains(s.clone()));
            ops.push(Op::Contains(s.clone()));
        }
        if let Some(s) = &f.equals {
            ops.push(Op::Equals(s.clone()));
        }
        if let Some(s) = &f.starts_with {
            ops.push(Op::StartsWith(s.clone()));
        }
        if let Some(s) = &f.ends_with {
            ops.push(Op::EndsWith(s.clone()));
        }
        for (cmp, make) in [
            (f.number, Op::Number as fn(Comparison) -> Op),
            (f.size, Op::Size),
            (f.count, Op::Count),
        ] {
            if let Some(c) = cmp {
                if c.is_empty() {
                    self.issue(
                        loc,
                        "a comparison needs at least one of gt, ge, lt, le, eq".into(),
                    );
                }
                ops.push(make(c));
            }
        }
        match f.sqli {
            Some(true) => ops.push(Op::Sqli),
            Some(false) => self.issue(
                loc,
                "`sqli: false` means nothing; remove it or use `negate`".into(),
            ),
            None => {}
        }
        match f.xss {
            Some(true) => ops.push(Op::Xss),
            Some(false) => self.issue(
                loc,
                "`xss: false` means nothing; remove it or use `negate`".into(),
            ),
            None => {}
        }
        if let Some(set) = &f.ip_in {
            match self.ip_sets.get(&set.value) {
                Some(s) => ops.push(Op::IpIn(Arc::clone(s))),
                None => {
                    let known: Vec<&str> = self.ip_sets.keys().map(String::as_str).collect();
                    self.issue(
                        &set.referenced,
                        format!(
                            "unknown ip set {:?}; defined ip_sets: [{}]",
                            set.value,
                            known.join(", ")
                        ),
                    );
                }
            }
        }
        if let Some(list) = &f.country_in {
            let mut codes = Vec::new();
            for c in list {
                match CountryCode::parse(c) {
                    Some(cc) => codes.push(cc),
                    None => self.issue(
                        loc,
                        format!("{c:?} is not an ISO 3166-1 alpha-2 country code"),
                    ),
                }
            }
            self.needs_geo = true;
            ops.push(Op::CountryIn(codes));
        }
        if let Some(list) = &f.asn_in {
            self.needs_geo = true;
            ops.push(Op::AsnIn(list.clone()));
        }
        if let Some(l) = &f.label {
            let (label, prefix) = match l.strip_suffix('*') {
                Some(p) => (p.to_string(), true),
                None => (l.clone(), false),
            };
            ops.push(Op::Label { label, prefix });
        }
        // Count the operators written, not those that compiled: a bad regex is reported once.
        let given = [
            f.regex.is_some(),
            f.phrases.is_some() || f.phrases_file.is_some(),
            f.contains.is_some(),
            f.equals.is_some(),
            f.starts_with.is_some(),
            f.ends_with.is_some(),
            f.number.is_some(),
            f.size.is_some(),
            f.count.is_some(),
            f.sqli.is_some(),
            f.xss.is_some(),
            f.ip_in.is_some(),
            f.country_in.is_some(),
            f.asn_in.is_some(),
            f.label.is_some(),
        ]
        .iter()
        .filter(|x| **x)
        .count();
        let confirm = match &f.confirm {
            None => None,
            Some(_) if f.regex.is_some() || f.count.is_some() => {
                self.issue(
                    loc,
                    "`confirm` goes with an operator that tests values one by one (not `regex`: write one regex; not `count`)".into(),
                );
                None
            }
            Some(r) => match RegexBuilder::new(&r.value)
                .size_limit(REGEX_SIZE_LIMIT)
                .build()
            {
                Ok(regex) => Some(regex),
                Err(e) => {
                    self.issue(
                        &r.referenced,
                        format!(
                            "invalid confirm regex: {}",
                            e.to_string().replace('\n', " ")
                        ),
                    );
                    None
                }
            },
        };
        let confirm_scan = match &confirm {
            Some(c) if given == 1 && ops.len() == 1 => {
                self.scan(&sources, &ScanPattern::Regex(c.clone()))
            }
            _ => Vec::new(),
        };
        match given {
            1 if ops.len() == 1 => ops.pop().map(|op| Leaf {
                sources,
                op,
                scan,
                confirm,
                confirm_scan,
                negate: f.negate,
            }),
            1 => None,
            0 => {
                self.issue(loc, "a field test needs one operator: regex, phrases, phrases_file, contains, equals, starts_with, ends_with, number, size, count, sqli, xss, ip_in, country_in, asn_in or label".into());
                None
            }
            _ => {
                self.issue(
                    loc,
                    "a field test takes exactly one operator; combine several with `all` or `any`"
                        .into(),
                );
                None
            }
        }
    }
}

/// Compiles a parsed rule-set file. `base_dir` resolves `phrases_file`.
pub fn compile(
    path: &Path,
    file: RuleSetFile,
    ip_sets: &BTreeMap<String, Arc<IpSet>>,
) -> Result<CompiledRuleSet, Problems> {
    let base_dir = path.parent().unwrap_or(Path::new("."));
    let mut c = Compiler {
        base_dir,
        ip_sets,
        sources: Vec::new(),
        scans: Vec::new(),
        file: path.display().to_string().into(),
        issues: Problems::default(),
        rule: None,
        needs_body: false,
        needs_geo: false,
    };
    if file.name.value.trim().is_empty() {
        c.issue(
            &file.name.referenced,
            "the rule set needs a non-empty `name`".into(),
        );
    }
    let mode = match file.mode {
        Some(RuleSetMode::Anomaly) => Mode::Anomaly {
            threshold: file.anomaly_threshold.unwrap_or(5).max(1),
        },
        _ => Mode::FirstMatch,
    };
    let mut ids = HashSet::new();
    let mut rules = Vec::new();
    for r in file.rules {
        let id = r.id.value.clone();
        c.rule = Some(id.clone());
        if id.is_empty()
            || !id
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '-' | '_' | '.' | ':'))
        {
            c.issue(
                &r.id.referenced,
                "rule ids use letters, digits, `-`, `_`, `.`, `:`".into(),
            );
        }
        if !ids.insert(id.clone()) {
            c.issue(
                &r.id.referenced,
                format!("duplicate rule id {id:?} in this rule set"),
            );
        }
        if let Some(s) = r.status {
            if !(100..=599).contains(&s) {
                c.issue(
                    &r.id.referenced,
                    format!("invalid status {s}: use 100..=599"),
                );
            }
        }
        if let Some(Err(e)) = r.paranoia.map(crate::config::paranoia_level) {
            c.issue(&r.id.referenced, e);
        }
        let cond = c.cond(&r.condition);
        if let Some(cond) = cond {
            rules.push(CompiledRule {
                id,
                description: r.description.unwrap_or_default(),
                labels: r.labels,
                action: r.action.unwrap_or(RuleAction::Block),
                status: r.status.unwrap_or(403),
                score: r.score.unwrap_or(5),
                paranoia: r.paranoia.unwrap_or(1),
                cond,
                line: r.id.referenced.line(),
                tests: r.tests,
            });
        }
    }
    c.rule = None;
    c.issues.into_result()?;
    Ok(CompiledRuleSet {
        name: file.name.value,
        version: file.version.unwrap_or_default(),
        description: file.description.unwrap_or_default(),
        path: path.to_path_buf(),
        mode,
        rules,
        sources: c.sources,
        scans: c.scans,
        needs_body: c.needs_body,
        needs_geo: c.needs_geo,
    })
}

/// Reads, parses and compiles one rule-set file.
pub fn load(
    path: &Path,
    ip_sets: &BTreeMap<String, Arc<IpSet>>,
) -> Result<CompiledRuleSet, Problems> {
    let text = crate::files::read_text_file(path, crate::files::MAX_TEXT_FILE).map_err(|e| {
        Problem::file(
            &path.display().to_string().into(),
            format!("cannot read rule set: {e}"),
        )
    })?;
    load_text(path, &text, ip_sets)
}

/// Parses and compiles rule-set text; `path` names it in errors and resolves `phrases_file`.
pub fn load_text(
    path: &Path,
    text: &str,
    ip_sets: &BTreeMap<String, Arc<IpSet>>,
) -> Result<CompiledRuleSet, Problems> {
    let name: Arc<str> = path.display().to_string().into();
    let file: RuleSetFile =
        serde_saphyr::from_str_with_options(text, crate::config::yaml_options())
            .map_err(|e| Problem::yaml(&name, &e))?;
    compile(path, file, ip_sets)
}

/// The managed rule sets embedded in the binary (see [`super::managed`]), compiled.
pub fn load_managed(
    ip_sets: &BTreeMap<String, Arc<IpSet>>,
) -> Vec<Result<CompiledRuleSet, Problems>> {
    super::managed::MANAGED_RULESETS
        .iter()
        .map(|(file, text)| {
            let path = PathBuf::from(format!("{}/{file}", super::managed::BUILTIN_MANAGED));
            load_text(&path, text, ip_sets)
        })
        .collect()
}

/// Rule-set files under a path: the file itself, or every `*.yaml`/`*.yml` in a directory
/// (not recursive), sorted.
pub fn rule_files(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut out: Vec<PathBuf> = std::fs::read_dir(path)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    out.sort();
    Ok(out)
}
