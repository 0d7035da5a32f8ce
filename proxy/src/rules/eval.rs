//! Rules step 3b (evaluate): one request against the rule sets attached to its route, in
//! priority order, with per-route overrides and exclusions. The route's [`Engine`] computes
//! each (field, transforms) source once and scans each value once for every pattern of every
//! set; rules then read hits. No locks.

use std::borrow::Cow;
use std::sync::Arc;

use super::compile::{CompiledRule, CompiledRuleSet, Cond, Leaf, Mode, Op};
use super::engine::{Engine, Run};
use super::fields::{Field, FieldValues, Origin, RuleInput};
use super::file::RuleAction;
use super::transforms::{apply_chain, Transform};

/// A field a route excludes from a rule's inspection (`query:token`, `json:/password`,
/// `header:cookie`, `body`, …).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExclusionTarget {
    /// Origin of the values.
    pub origin: Origin,
    /// Name (JSON pointers match as prefixes); `None` = every value of that origin.
    pub name: Option<String>,
}

impl ExclusionTarget {
    /// Parses `query:NAME`, `form:NAME`, `json:/POINTER`, `header:NAME`, `cookie:NAME`, or a
    /// whole origin: `query`, `form`, `json`, `headers`, `cookies`, `body`, `path`, `uri`.
    pub fn parse(s: &str) -> Result<ExclusionTarget, String> {
        let (kind, name) = match s.split_once(':') {
            Some((k, n)) => (k, Some(n.to_string())),
            None => (s, None),
        };
        let origin = match kind {
            "query" => Origin::Query,
            "form" => Origin::Form,
            "json" => Origin::Json,
            "header" | "headers" => Origin::Header,
            "cookie" | "cookies" => Origin::Cookie,
            "body" => Origin::Body,
            "path" => Origin::Path,
            "uri" => Origin::Uri,
            _ => return Err(format!("invalid exclusion field {s:?}: use query:NAME, form:NAME, json:/POINTER, header:NAME, cookie:NAME, or query, form, json, headers, cookies, body, path, uri")),
        };
        let name = name.map(|n| {
            if origin == Origin::Header {
                n.to_ascii_lowercase()
            } else {
                n
            }
        });
        Ok(ExclusionTarget { origin, name })
    }

    fn excludes(&self, origin: Origin, name: Option<&str>) -> bool {
        if self.origin != origin {
            return false;
        }
        match (&self.name, name) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(want), Some(have)) if origin == Origin::Json => {
                have == want
                    || (have.starts_with(want.as_str())
                        && have.as_bytes().get(want.len()) == Some(&b'/'))
            }
            (Some(want), Some(have)) => want == have,
        }
    }
}

/// Per-route handling of one rule of an attached set.
#[derive(Debug, Clone, Default)]
pub struct RuleTuning {
    /// Skip the rule.
    pub disabled: bool,
    /// Replace its action.
    pub action: Option<RuleAction>,
    /// Values it must not inspect.
    pub exclusions: Vec<ExclusionTarget>,
}

/// A rule set attached to a route, with the route's overrides.
#[derive(Debug, Clone)]
pub struct AttachedRuleSet {
    /// The shared compiled set.
    pub set: Arc<CompiledRuleSet>,
    /// Replace every terminating action with this (`count` = dry run of the whole set).
    pub action_override: Option<RuleAction>,
    /// Per rule (parallel to `set.rules`).
    pub tuning: Vec<RuleTuning>,
}

impl AttachedRuleSet {
    /// Attaches a set with no overrides.
    pub fn plain(set: Arc<CompiledRuleSet>) -> AttachedRuleSet {
        let n = set.rules.len();
        AttachedRuleSet {
            set,
            action_override: None,
            tuning: vec![RuleTuning::default(); n],
        }
    }
}

/// One rule that matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleMatch {
    /// Rule set name.
    pub set: String,
    /// Rule id.
    pub rule: String,
    /// The action taken (after overrides).
    pub action: RuleAction,
}

/// The result of evaluating a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RulesVerdict {
    /// No terminating rule: forward.
    Pass,
    /// An `allow` rule: forward, skip later stages.
    Allow {
        /// Set name.
        set: String,
        /// Rule id.
        rule: String,
    },
    /// Blocked.
    Block {
        /// Status.
        status: u16,
        /// Reason (`rule:<id>` or `anomaly:<set>`).
        reason: String,
    },
}

/// What happened to one request.
#[derive(Debug, Clone)]
pub struct RulesOutcome {
    /// The decision.
    pub verdict: RulesVerdict,
    /// Every rule that matched, in order.
    pub matches: Vec<RuleMatch>,
    /// Labels added.
    pub labels: Vec<Cow<'static, str>>,
}

/// Receives explanation lines (`palisade explain`); the request path uses `()`.
pub trait Tracer {
    /// Whether lines are wanted (lets the evaluator skip building them).
    fn enabled(&self) -> bool;
    /// One line.
    fn line(&mut self, s: String);
    /// A value satisfied a leaf's operator (called only when enabled).
    fn value_matched(
        &mut self,
        _origin: Origin,
        _field: &Field,
        _name: Option<&str>,
        _chain: &[Transform],
        _text: &str,
    ) {
    }
}

/// Where a rule matched, for the decision log: the value's field (`json:/user/bio`,
/// `query:q`, `header:user-agent`, `body`), the transforms applied, and the start of the
/// transformed value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MatchEvidence {
    /// Rule set.
    pub set: String,
    /// Rule id.
    pub rule: String,
    /// The field, as rule files and logs name it; empty for a rule matched on counts or
    /// labels only.
    pub field: String,
    /// Transform names in order.
    pub transforms: Vec<&'static str>,
    /// The first [`SNIPPET_CHARS`] characters of the transformed value.
    pub snippet: String,
}

/// Characters of a matched value kept as its snippet.
pub const SNIPPET_CHARS: usize = 80;

/// Collects the first matching value of a rule's evaluation.
#[derive(Default)]
struct EvidenceTracer {
    first: Option<(String, Vec<&'static str>, String)>,
}

impl Tracer for EvidenceTracer {
    fn enabled(&self) -> bool {
        true
    }
    fn line(&mut self, _: String) {}
    fn value_matched(
        &mut self,
        origin: Origin,
        field: &Field,
        name: Option<&str>,
        chain: &[Transform],
        text: &str,
    ) {
        if self.first.is_none() {
            self.first = Some((
                field.label(origin, name),
                chain.iter().map(|t| t.name()).collect(),
                text.chars().take(SNIPPET_CHARS).collect(),
            ));
        }
    }
}

impl Engine {
    /// Where each of `matches` matched in `input`: only those rules are evaluated again,
    /// with a collector (the request path skips this unless a decision log wants it).
    pub fn evidence(
        &self,
        input: &RuleInput<'_>,
        matches: &[RuleMatch],
        labels: &[Cow<'static, str>],
    ) -> Vec<MatchEvidence> {
        let mut run = self.run(input);
        let mut out = Vec::with_capacity(matches.len());
        for m in matches {
            let Some((si, att)) = self
                .sets
                .iter()
                .enumerate()
                .find(|(_, a)| a.set.name == m.set)
            else {
                continue;
            };
            let Some(i) = att.set.rules.iter().position(|r| r.id == m.rule) else {
                continue;
            };
            let mut ev = EvidenceTracer::default();
            {
                let mut cx = Ctx {
                    set: si,
                    labels,
                    exclusions: &att.tuning[i].exclusions,
                    trace: &mut ev,
                    reference: false,
                };
                eval_cond(&att.set.rules[i].cond, &mut run, &mut cx);
            }
            let (field, transforms, snippet) = ev.first.unwrap_or_default();
            out.push(MatchEvidence {
                set: m.set.clone(),
                rule: m.rule.clone(),
                field,
                transforms,
                snippet,
            });
        }
        out
    }
}

impl Tracer for () {
    #[inline]
    fn enabled(&self) -> bool {
        false
    }
    fn line(&mut self, _: String) {}
}

impl Tracer for Vec<String> {
    fn enabled(&self) -> bool {
        true
    }
    fn line(&mut self, s: String) {
        self.push(s);
    }
}

fn value_matches(op: &Op, text: &str) -> bool {
    match op {
        Op::Regex(regex) => regex.is_match(text),
        Op::Phrases(ac) => ac.is_match(text),
        Op::Contains(s) => text.contains(s.as_str()),
        Op::Equals(s) => text == s,
        Op::StartsWith(s) => text.starts_with(s.as_str()),
        Op::EndsWith(s) => text.ends_with(s.as_str()),
        Op::Number(c) => text.trim().parse::<f64>().is_ok_and(|x| c.holds(x)),
        Op::Size(c) => c.holds(text.len() as f64),
        Op::Sqli => {
            verdict_cache::cached(0, text, |b| libinjectionrs::detect_sqli(b).is_injection())
        }
        Op::Xss => {
            may_be_html(text)
                && verdict_cache::cached(1, text, |b| libinjectionrs::detect_xss(b).is_injection())
        }
        Op::IpIn(set) => text.parse().is_ok_and(|ip| set.contains(ip)),
        Op::CountryIn(list) => list.iter().any(|c| c.as_str() == text),
        Op::AsnIn(list) => text.parse::<u32>().is_ok_and(|a| list.contains(&a)),
        Op::Label { label, prefix } => {
            if *prefix {
                text.starts_with(label.as_str())
            } else {
                text == label
            }
        }
        Op::Count(_) => false,
    }
}

/// libinjection's verdicts on recent values, per thread. The same values come back request
/// after request (a browser's `User-Agent`, a client's fixed parameters), and libinjection
/// costs microseconds per value where a lookup costs tens of nanoseconds. Direct-mapped and
/// bounded (256 slots of values up to 256 bytes per thread); a slot holds the value itself,
/// so a hash collision costs a recomputation, never a wrong verdict. Thread-local: no lock.
mod verdict_cache {
    use std::cell::RefCell;
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};

    const SLOTS: usize = 256;
    const MAX_LEN: usize = 256;

    /// (kind, value, verdict).
    type Slot = Option<(u8, Box<str>, bool)>;

    thread_local! {
        static CACHE: RefCell<Vec<Slot>> = RefCell::new(vec![None; SLOTS]);
    }

    /// `detect(text)`, remembered per (`kind`, text).
    pub(super) fn cached(kind: u8, text: &str, detect: impl Fn(&[u8]) -> bool) -> bool {
        if text.len() > MAX_LEN {
            return detect(text.as_bytes());
        }
        let h = BuildHasherDefault::<DefaultHasher>::default().hash_one((kind, text));
        let slot = (h % SLOTS as u64) as usize;
        let known = CACHE.with(|c| {
            c.borrow().get(slot).and_then(|e| match e {
                Some((k, t, v)) if *k == kind && &**t == text => Some(*v),
                _ => None,
            })
        });
        if let Some(v) = known {
            return v;
        }
        let v = detect(text.as_bytes());
        CACHE.with(|c| {
            if let Some(e) = c.borrow_mut().get_mut(slot) {
                *e = Some((kind, text.into(), v));
            }
        });
        v
    }
}

/// libinjection's XSS check tokenizes the value as HTML in five contexts and reports only a
/// tag, comment or doctype (each starts with `<`) or an attribute value (which follows `=`):
/// a value with neither cannot be XSS to it, and the tokenizer need not run.
fn may_be_html(text: &str) -> bool {
    memchr::memchr2(b'<', b'=', text.as_bytes()).is_some()
}

struct Ctx<'a, T: Tracer> {
    set: usize,
    labels: &'a [Cow<'static, str>],
    exclusions: &'a [ExclusionTarget],
    trace: &'a mut T,
    /// Evaluate every value with the leaf's own operator (no shared scan, no gates): the
    /// reference the engine is tested against.
    reference: bool,
}

fn eval_leaf<T: Tracer>(leaf: &Leaf, run: &mut Run<'_, '_>, cx: &mut Ctx<'_, T>) -> bool {
    let engine = run.engine();
    let fast = !cx.reference && cx.exclusions.is_empty() && !cx.trace.enabled();
    let mut hit = false;
    for (k, &s) in leaf.sources.iter().enumerate() {
        let (u, first) = engine.set_sources[cx.set][s];
        let src = &engine.sources[u as usize].source;
        let labels_source = src.field == Field::Labels;
        if fast && !labels_source {
            if let Some(&slot) = leaf.scan.get(k) {
                if run.hit(u, first + slot as u32) {
                    hit = true;
                    break;
                }
                continue;
            }
            // libinjection runs only where its `confirm` regex matched some value.
            if let Some(&slot) = leaf.confirm_scan.get(k) {
                if !run.hit(u, first + slot as u32) {
                    continue;
                }
            }
        }
        if labels_source {
            // Labels change while rules run: never cached.
            let vals: Vec<(Origin, Option<Cow<'_, str>>, Cow<'_, str>)> = run
                .input()
                .values(&Field::Labels, cx.labels)
                .into_iter()
                .map(|v| {
                    let t = apply_chain(&src.chain, &v.text).into_owned();
                    (v.origin, v.name, Cow::Owned(t))
                })
                .collect();
            hit = test_values(
                leaf,
                src,
                vals.iter().map(|(o, n, t)| (*o, n.as_deref(), t.as_ref())),
                cx,
            );
        } else {
            let range = run.values(u);
            hit = test_values(
                leaf,
                src,
                range.map(|i| {
                    let (m, t) = run.value(i);
                    (m.origin, m.name.as_deref(), t)
                }),
                cx,
            );
        }
        if hit {
            break;
        }
    }
    hit != leaf.negate
}

/// The leaf's operator on each value not excluded (the path for exclusions, explanations,
/// operators that are not scanned, and the reference).
fn test_values<'v, T: Tracer>(
    leaf: &Leaf,
    src: &super::compile::Source,
    vals: impl Iterator<Item = (Origin, Option<&'v str>, &'v str)>,
    cx: &mut Ctx<'_, T>,
) -> bool {
    let kept =
        vals.filter(|(origin, name, _)| !cx.exclusions.iter().any(|e| e.excludes(*origin, *name)));
    if let Op::Count(c) = &leaf.op {
        let n = kept.count();
        if cx.trace.enabled() {
            cx.trace
                .line(format!("      count of {:?} = {n}", src.field));
        }
        return c.holds(n as f64);
    }
    for (origin, name, text) in kept {
        let m =
            leaf.confirm.as_ref().is_none_or(|c| c.is_match(text)) && value_matches(&leaf.op, text);
        if m && cx.trace.enabled() {
            cx.trace
                .value_matched(origin, &src.field, name, &src.chain, text);
        }
        if cx.trace.enabled() {
            let shown: String = text.chars().take(120).collect();
            cx.trace.line(format!(
                "      {:?}{} after {:?} = {shown:?} -> {}",
                src.field,
                name.map(|n| format!("[{n}]")).unwrap_or_default(),
                src.chain,
                if m { "MATCH" } else { "no match" }
            ));
        }
        if m {
            return true;
        }
    }
    false
}

fn eval_cond<T: Tracer>(c: &Cond, run: &mut Run<'_, '_>, cx: &mut Ctx<'_, T>) -> bool {
    match c {
        Cond::All(v) => v.iter().all(|x| eval_cond(x, run, cx)),
        Cond::Any(v) => v.iter().any(|x| eval_cond(x, run, cx)),
        Cond::Not(x) => !eval_cond(x, run, cx),
        Cond::Leaf(l) => eval_leaf(l, run, cx),
    }
}

/// Whether one rule of the engine's first set matches, through the engine's shared scan
/// (`reference: false`) or the rule's own operators (`true`). `palisade test` runs both and
/// reports any disagreement.
pub fn engine_rule_matches<T: Tracer>(
    engine: &Engine,
    rule: &CompiledRule,
    input: &RuleInput<'_>,
    labels: &[Cow<'static, str>],
    trace: &mut T,
    reference: bool,
) -> bool {
    let mut run = engine.run(input);
    let mut cx = Ctx {
        set: 0,
        labels,
        exclusions: &[],
        trace,
        reference,
    };
    eval_cond(&rule.cond, &mut run, &mut cx)
}

/// Evaluates a request against attached rule sets in order. Builds the engine for them
/// first: the proxy keeps one per route instead (see [`Engine::evaluate`]).
pub fn evaluate<T: Tracer>(
    sets: &[AttachedRuleSet],
    input: &RuleInput<'_>,
    trace: &mut T,
) -> RulesOutcome {
    Engine::new(sets.to_vec()).evaluate(input, trace)
}

impl Engine {
    /// Evaluates a request against the engine's rule sets in order.
    pub fn evaluate<T: Tracer>(&self, input: &RuleInput<'_>, trace: &mut T) -> RulesOutcome {
        let mut labels: Vec<Cow<'static, str>> = Vec::new();
        let mut matches = Vec::new();
        let mut run = self.run(input);
        let mut candidates: Vec<u64> = Vec::new();
        for (si, att) in self.sets.iter().enumerate() {
            let set = &*att.set;
            let mut score = 0u32;
            // Explanations walk every rule; requests only those that can match.
            let gated = !trace.enabled();
            if gated {
                run.candidates(si, &mut candidates);
            }
            if trace.enabled() {
                trace.line(format!(
                    "rule set {:?} ({:?}{})",
                    set.name,
                    set.mode,
                    att.action_override
                        .map(|a| format!(", override {a:?}"))
                        .unwrap_or_default()
                ));
            }
            for (i, rule) in set.rules.iter().enumerate() {
                if gated && candidates[i / 64] & (1 << (i % 64)) == 0 {
                    continue;
                }
                let tuning = &att.tuning[i];
                if tuning.disabled {
                    if trace.enabled() {
                        trace.line(format!("  {}: disabled on this route", rule.id));
                    }
                    continue;
                }
                if trace.enabled() {
                    trace.line(format!("  {}: {}", rule.id, rule.description));
                }
                let matched = {
                    let mut cx = Ctx {
                        set: si,
                        labels: &labels,
                        exclusions: &tuning.exclusions,
                        trace: &mut *trace,
                        reference: false,
                    };
                    eval_cond(&rule.cond, &mut run, &mut cx)
                };
                if trace.enabled() {
                    trace.line(format!(
                        "    => {}",
                        if matched { "MATCHED" } else { "not matched" }
                    ));
                }
                if !matched {
                    continue;
                }
                labels.extend(rule.labels.iter().map(|l| Cow::Owned(l.clone())));
                let mut action = tuning.action.unwrap_or(rule.action);
                if matches!(action, RuleAction::Block | RuleAction::Allow) {
                    if let Some(o) = att.action_override {
                        action = o;
                    }
                }
                matches.push(RuleMatch {
                    set: set.name.clone(),
                    rule: rule.id.clone(),
                    action,
                });
                match (action, set.mode) {
                    (RuleAction::Block, Mode::Anomaly { .. }) => score += rule.score,
                    (RuleAction::Block, Mode::FirstMatch) => {
                        return RulesOutcome {
                            verdict: RulesVerdict::Block {
                                status: rule.status,
                                reason: format!("rule:{}", rule.id),
                            },
                            matches,
                            labels,
                        };
                    }
                    (RuleAction::Allow, _) => {
                        return RulesOutcome {
                            verdict: RulesVerdict::Allow {
                                set: set.name.clone(),
                                rule: rule.id.clone(),
                            },
                            matches,
                            labels,
                        };
                    }
                    (RuleAction::Count | RuleAction::Log, _) => {}
                }
            }
            if let Mode::Anomaly { threshold } = set.mode {
                if trace.enabled() {
                    trace.line(format!("  anomaly score {score} (threshold {threshold})"));
                }
                if score >= threshold {
                    return RulesOutcome {
                        verdict: RulesVerdict::Block {
                            status: 403,
                            reason: format!("anomaly:{}", set.name),
                        },
                        matches,
                        labels,
                    };
                }
            }
        }
        RulesOutcome {
            verdict: RulesVerdict::Pass,
            matches,
            labels,
        }
    }
}
