//! Rules step 3 (evaluate): one request against the rule sets attached to its route, in
//! priority order, with per-route overrides and exclusions. No locks; per request, each
//! (field, transforms) source is extracted and transformed at most once, and each source's
//! `RegexSet` scans each value once for all the rules that use it.

use std::borrow::Cow;
use std::rc::Rc;
use std::sync::Arc;

use super::compile::{CompiledRule, CompiledRuleSet, Cond, Leaf, Mode, Op};
use super::fields::{Field, FieldValues, Origin, RuleInput};
use super::file::RuleAction;
use super::transforms::apply_chain;

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

/// A transformed value; borrows from the request when no transform changed it.
struct SourceValue<'i> {
    origin: Origin,
    name: Option<Cow<'i, str>>,
    text: Cow<'i, str>,
}

/// Transformed values of every (field, transforms) source computed so far in this request,
/// by process-wide source id, shared by all attached rule sets: sets that inspect the same
/// fields through the same chain (the managed ones all do) pay for extraction and transforms
/// once.
type SharedSources<'i> = Vec<Option<Rc<Vec<SourceValue<'i>>>>>;

/// Per-request, per-set state: transformed values and RegexSet hits, computed on demand.
struct SetState<'s, 'i, 'c> {
    set: &'s CompiledRuleSet,
    values: Vec<Option<Rc<Vec<SourceValue<'i>>>>>,
    regex_hits: Vec<Option<Vec<bool>>>,
    shared: &'c mut SharedSources<'i>,
}

impl<'s, 'i, 'c> SetState<'s, 'i, 'c> {
    fn new(set: &'s CompiledRuleSet, shared: &'c mut SharedSources<'i>) -> Self {
        let n = set.sources.len();
        SetState {
            set,
            values: (0..n).map(|_| None).collect(),
            regex_hits: (0..n).map(|_| None).collect(),
            shared,
        }
    }

    fn values(
        &mut self,
        s: usize,
        input: &'i RuleInput<'_>,
        labels: &[Cow<'static, str>],
    ) -> &[SourceValue<'i>] {
        let src = &self.set.sources[s];
        let gid = self.set.source_ids.get(s).copied();
        // Labels change while rules run, so that source is never cached.
        let labels_source = src.field == Field::Labels;
        if self.values[s].is_none() || labels_source {
            let cached = match gid {
                Some(g) if !labels_source => self.shared.get(g).and_then(Clone::clone),
                _ => None,
            };
            let vals = cached.unwrap_or_else(|| {
                let vals: Rc<Vec<SourceValue<'i>>> = Rc::new(
                    input
                        .values(&src.field, labels)
                        .into_iter()
                        .map(|v| SourceValue {
                            origin: v.origin,
                            name: v.name,
                            text: match v.text {
                                Cow::Borrowed(b) => apply_chain(&src.chain, b),
                                Cow::Owned(o) => {
                                    Cow::Owned(apply_chain(&src.chain, &o).into_owned())
                                }
                            },
                        })
                        .collect(),
                );
                if let (Some(g), false) = (gid, labels_source) {
                    if self.shared.len() <= g {
                        self.shared.resize(g + 1, None);
                    }
                    self.shared[g] = Some(Rc::clone(&vals));
                }
                vals
            });
            self.values[s] = Some(vals);
        }
        self.values[s].as_ref().map_or(&[], |v| v.as_slice())
    }

    fn regex_hit(
        &mut self,
        s: usize,
        slot: usize,
        input: &'i RuleInput<'_>,
        labels: &[Cow<'static, str>],
    ) -> bool {
        if self.regex_hits[s].is_none() {
            let set = self.set;
            let n = set.regex_sets[s].as_ref().map_or(0, |r| r.len());
            let mut hits = vec![false; n];
            if let Some(rs) = &set.regex_sets[s] {
                for v in self.values(s, input, labels) {
                    // Most values match nothing: the one-pass `is_match` (lazy DFA) rules that
                    // out cheaply before asking which patterns matched.
                    if rs.is_match(&v.text) {
                        for i in rs.matches(&v.text).iter() {
                            hits[i] = true;
                        }
                    }
                }
            }
            self.regex_hits[s] = Some(hits);
        }
        self.regex_hits[s]
            .as_ref()
            .is_some_and(|h| h.get(slot).copied().unwrap_or(false))
    }
}

fn value_matches(op: &Op, text: &str) -> bool {
    match op {
        Op::Regex { regex, .. } => regex.is_match(text),
        Op::Phrases(ac) => ac.is_match(text),
        Op::Contains(s) => text.contains(s.as_str()),
        Op::Equals(s) => text == s,
        Op::StartsWith(s) => text.starts_with(s.as_str()),
        Op::EndsWith(s) => text.ends_with(s.as_str()),
        Op::Number(c) => text.trim().parse::<f64>().is_ok_and(|x| c.holds(x)),
        Op::Size(c) => c.holds(text.len() as f64),
        Op::Sqli => libinjectionrs::detect_sqli(text.as_bytes()).is_injection(),
        Op::Xss => libinjectionrs::detect_xss(text.as_bytes()).is_injection(),
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

struct Ctx<'a, 'i, T: Tracer> {
    input: &'i RuleInput<'i>,
    labels: &'a [Cow<'static, str>],
    exclusions: &'a [ExclusionTarget],
    trace: &'a mut T,
}

fn eval_leaf<'i, T: Tracer>(
    leaf: &Leaf,
    st: &mut SetState<'_, 'i, '_>,
    cx: &mut Ctx<'_, 'i, T>,
) -> bool {
    let mut hit = false;
    for (k, &s) in leaf.sources.iter().enumerate() {
        // Fast path: a regex on a source without exclusions reads the shared RegexSet scan.
        if let (Op::Regex { slots, .. }, true) =
            (&leaf.op, cx.exclusions.is_empty() && !cx.trace.enabled())
        {
            if st.regex_hit(s, slots[k], cx.input, cx.labels) {
                hit = true;
                break;
            }
            continue;
        }
        let set = st.set;
        let vals = st.values(s, cx.input, cx.labels);
        let kept = vals.iter().filter(|v| {
            !cx.exclusions
                .iter()
                .any(|e| e.excludes(v.origin, v.name.as_deref()))
        });
        if let Op::Count(c) = &leaf.op {
            let n = kept.count();
            if c.holds(n as f64) {
                hit = true;
            }
            if cx.trace.enabled() {
                cx.trace
                    .line(format!("      count of {:?} = {n}", set.sources[s].field));
            }
        } else {
            for v in kept {
                let m = leaf.confirm.as_ref().is_none_or(|c| c.is_match(&v.text))
                    && value_matches(&leaf.op, &v.text);
                if cx.trace.enabled() {
                    let shown: String = v.text.chars().take(120).collect();
                    cx.trace.line(format!(
                        "      {:?}{} after {:?} = {shown:?} -> {}",
                        set.sources[s].field,
                        v.name
                            .as_deref()
                            .map(|n| format!("[{n}]"))
                            .unwrap_or_default(),
                        set.sources[s].chain,
                        if m { "MATCH" } else { "no match" }
                    ));
                }
                if m {
                    hit = true;
                    break;
                }
            }
        }
        if hit {
            break;
        }
    }
    hit != leaf.negate
}

fn eval_cond<'i, T: Tracer>(
    c: &Cond,
    st: &mut SetState<'_, 'i, '_>,
    cx: &mut Ctx<'_, 'i, T>,
) -> bool {
    match c {
        Cond::All(v) => v.iter().all(|x| eval_cond(x, st, cx)),
        Cond::Any(v) => v.iter().any(|x| eval_cond(x, st, cx)),
        Cond::Not(x) => !eval_cond(x, st, cx),
        Cond::Leaf(l) => eval_leaf(l, st, cx),
    }
}

/// Whether one rule of a set matches (used by `palisade test` and `explain`).
pub fn rule_matches<T: Tracer>(
    set: &CompiledRuleSet,
    rule: &CompiledRule,
    input: &RuleInput<'_>,
    labels: &[Cow<'static, str>],
    trace: &mut T,
) -> bool {
    let mut shared = Vec::new();
    let mut st = SetState::new(set, &mut shared);
    let mut cx = Ctx {
        input,
        labels,
        exclusions: &[],
        trace,
    };
    eval_cond(&rule.cond, &mut st, &mut cx)
}

/// Evaluates a request against attached rule sets in order.
pub fn evaluate<T: Tracer>(
    sets: &[AttachedRuleSet],
    input: &RuleInput<'_>,
    trace: &mut T,
) -> RulesOutcome {
    let mut labels: Vec<Cow<'static, str>> = Vec::new();
    let mut matches = Vec::new();
    let mut shared: SharedSources<'_> = Vec::new();
    for att in sets {
        let set = &*att.set;
        let mut st = SetState::new(set, &mut shared);
        let mut score = 0u32;
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
                    input,
                    labels: &labels,
                    exclusions: &tuning.exclusions,
                    trace: &mut *trace,
                };
                eval_cond(&rule.cond, &mut st, &mut cx)
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
