//! Rules step 3a (compile per route, then evaluate): the inspection engine. Built once per
//! route from every rule set attached to it, so its cost per request stays flat as rules are
//! added:
//!
//! - **Values once per (field, transform prefix).** Sources are nodes of a tree per field:
//!   `url_decode_uni → html_entity_decode → lowercase` and `url_decode_uni → lowercase` share
//!   their first step. A transform that changes nothing (no `%`, no `&`) borrows its input.
//! - **One scan per value for all patterns.** Every regex, phrase list and substring test of
//!   every attached set that reads a source is merged into one prefilter for that source: an
//!   Aho-Corasick automaton over the literals each pattern cannot match without (see
//!   `literals`), plus one `RegexSet` for the few patterns without a useful literal. A value
//!   runs a pattern's regex only when one of its literals occurs, so most benign values never
//!   reach a per-rule regex. Hits are kept per (source, pattern) for the request.
//! - **libinjection behind cheap gates.** SQLi leaves run libinjection only on values that
//!   match their `confirm` regex (itself prefiltered); XSS only on values holding `<` or `=`,
//!   without which libinjection's HTML5 tokenizer emits no tag, comment, doctype or attribute
//!   value and cannot report XSS.
//!
//! Nothing here is locked or shared between requests; per request, a [`Run`] holds the
//! transformed values in two arenas and the hits in a bit set.

use std::borrow::Cow;
use std::collections::HashMap;

use aho_corasick::{AhoCorasick, AhoCorasickKind, MatchKind};
use regex::{Regex, RegexSet, RegexSetBuilder};

use super::compile::{Cond, Op, ScanPattern, Source};
use super::eval::AttachedRuleSet;
use super::fields::{Field, FieldValues, Origin, RuleInput};
use super::literals::{fold_ascii_variants, required_literals_in, Context};
use super::transforms::{classes, Transform};

/// Size limit of the combined `RegexSet` of patterns without literals.
const REST_SIZE_LIMIT: usize = 64 << 20;

/// How a scan pattern is confirmed once a literal of it occurs in a value.
#[derive(Debug)]
enum Check {
    /// The literal is the pattern (a phrase): matched.
    Exact,
    /// Run the pattern's regex.
    Regex(Regex),
    /// Case-sensitive substring (the automaton is case-insensitive).
    Contains(String),
}

/// A pattern to confirm: (global pattern id, check index, the source's index in its root).
type Target = (u32, u32, u32);

/// The prefilter of one field: every pattern of every source (transform chain) on it.
#[derive(Debug, Default)]
struct Scanner {
    /// Over the distinct literals of the patterns; `None` when there are none.
    ac: Option<AhoCorasick>,
    /// Per literal, the range of `targets` it leads to.
    lit_targets: Vec<(u32, u32)>,
    targets: Vec<Target>,
    /// Patterns without a useful literal, scanned together.
    rest: Option<RegexSet>,
    /// (pattern, source index in the root) of each member of `rest`.
    rest_ids: Vec<(u32, u32)>,
    /// Patterns checked on every value (an empty substring or phrase; a regex the combined
    /// set could not hold).
    always: Vec<Target>,
}

/// A field and every source (transform chain) on it: scanned together, each distinct
/// transformed text of a value once.
#[derive(Debug)]
struct Root {
    /// Engine sources on this field, in local order.
    sources: Vec<u32>,
    /// The field's transform tree: node ids, the field itself first, each after its parent.
    nodes: Vec<u32>,
    /// Per node after the first: its parent's position in `nodes`, and its transform.
    steps: Vec<(u32, Transform)>,
    scanner: Scanner,
    /// Labels change while rules run: never scanned (leaves read them value by value).
    labels: bool,
}

/// A transformed source in the engine.
#[derive(Debug)]
pub(crate) struct EngineSource {
    /// The field and chain.
    pub(crate) source: Source,
    /// Its node in the transform tree.
    node: u32,
    /// Its root (field) and its index among the root's sources.
    root: u32,
    local: u32,
}

/// A node of the transform tree: a field (root) or a parent node plus one transform.
#[derive(Debug)]
enum Node {
    Root(Field),
    Step(u32, Transform),
}

/// Which rules of a set can match only where the shared scan found one of their patterns.
#[derive(Debug, Default)]
pub(crate) struct SetPlan {
    /// Rules evaluated on every request (bit per rule index): those with a condition the
    /// scan cannot vouch for (`not`, `count`, `equals`, …).
    pub(crate) always: Vec<u64>,
    /// The set's patterns: first global id, and per pattern the rule it gates (`u32::MAX`
    /// when it gates none).
    pub(crate) first: u32,
    pub(crate) gates: Vec<u32>,
    /// Roots to scan before the set's gated rules are skipped on missing hits.
    pub(crate) roots: Vec<u32>,
}

/// The patterns one of which must hit for `c` to match, or `None` when `c` can match
/// without any (a negation, a comparison, a label).
fn gate(c: &Cond, pattern: &dyn Fn(usize, usize) -> u32) -> Option<Vec<u32>> {
    match c {
        Cond::Leaf(l) if !l.negate => {
            let slots = if !l.scan.is_empty() {
                &l.scan
            } else if matches!(l.op, Op::Sqli | Op::Xss) && !l.confirm_scan.is_empty() {
                // libinjection runs only on values that match `confirm`.
                &l.confirm_scan
            } else {
                return None;
            };
            Some(
                l.sources
                    .iter()
                    .zip(slots)
                    .map(|(&s, &slot)| pattern(s, slot))
                    .collect(),
            )
        }
        Cond::Leaf(_) | Cond::Not(_) => None,
        // Matching all of them needs any one's gate.
        Cond::All(v) => v.iter().find_map(|x| gate(x, pattern)),
        // Matching one of them needs that one's gate: every child must have one.
        Cond::Any(v) => v.iter().try_fold(Vec::new(), |mut acc, x| {
            acc.extend(gate(x, pattern)?);
            Some(acc)
        }),
    }
}

/// The per-route inspection engine.
#[derive(Debug)]
pub struct Engine {
    /// The attached sets, in priority order.
    pub(crate) sets: Vec<AttachedRuleSet>,
    /// Per set, per local source: (engine source, first global pattern of that set's scans).
    pub(crate) set_sources: Vec<Vec<(u32, u32)>>,
    pub(crate) sources: Vec<EngineSource>,
    pub(crate) plans: Vec<SetPlan>,
    roots: Vec<Root>,
    nodes: Vec<Node>,
    /// Per node, its root.
    node_root: Vec<u32>,
    checks: Vec<Check>,
    patterns: u32,
}

impl Engine {
    /// Builds the engine for rule sets attached to one route (load and reload time).
    pub fn new(sets: Vec<AttachedRuleSet>) -> Engine {
        let mut nodes: Vec<Node> = Vec::new();
        let mut node_ids: HashMap<(Field, Vec<Transform>), u32> = HashMap::new();
        let mut sources: Vec<EngineSource> = Vec::new();
        let mut by_source: HashMap<Source, u32> = HashMap::new();
        let mut roots: Vec<Root> = Vec::new();
        let mut root_of: HashMap<Field, u32> = HashMap::new();
        // Per root, its patterns (global id, local source, pattern) in order of registration.
        let mut pats: Vec<Vec<(u32, u32, ScanPattern)>> = Vec::new();
        let mut set_sources = Vec::with_capacity(sets.len());
        let mut next = 0u32;
        for att in &sets {
            let mut local = Vec::with_capacity(att.set.sources.len());
            for (s, src) in att.set.sources.iter().enumerate() {
                let u = *by_source.entry(src.clone()).or_insert_with(|| {
                    let node = node_for(&mut nodes, &mut node_ids, src);
                    let root = *root_of.entry(src.field.clone()).or_insert_with(|| {
                        roots.push(Root {
                            sources: Vec::new(),
                            nodes: Vec::new(),
                            steps: Vec::new(),
                            scanner: Scanner::default(),
                            labels: src.field == Field::Labels,
                        });
                        pats.push(Vec::new());
                        (roots.len() - 1) as u32
                    });
                    let u = sources.len() as u32;
                    let r = &mut roots[root as usize];
                    r.sources.push(u);
                    sources.push(EngineSource {
                        source: src.clone(),
                        node,
                        root,
                        local: (r.sources.len() - 1) as u32,
                    });
                    u
                });
                local.push((u, next));
                let es = &sources[u as usize];
                for p in &att.set.scans[s] {
                    pats[es.root as usize].push((next, es.local, p.clone()));
                    next += 1;
                }
            }
            set_sources.push(local);
        }
        // Each root's transform tree, parents first (node ids grow along every chain).
        let mut node_root = vec![0u32; nodes.len()];
        for ((field, _), &id) in &node_ids {
            if let Some(&r) = root_of.get(field) {
                roots[r as usize].nodes.push(id);
                node_root[id as usize] = r;
            }
        }
        for r in &mut roots {
            r.nodes.sort_unstable();
            for &id in &r.nodes[1..] {
                if let Node::Step(parent, tr) = nodes[id as usize] {
                    let p = r.nodes.binary_search(&parent).unwrap_or(0) as u32;
                    r.steps.push((p, tr));
                }
            }
        }
        let mut checks = Vec::new();
        for (r, list) in pats.into_iter().enumerate() {
            let ctx = match roots[r].nodes.first().map(|&n| &nodes[n as usize]) {
                Some(Node::Root(
                    Field::QueryString
                    | Field::Uri
                    | Field::Body
                    | Field::HeaderValues
                    | Field::Header(_),
                )) => Context::Structured,
                _ => Context::Values,
            };
            roots[r].scanner = build_scanner(list, &mut checks, ctx);
        }
        let mut plans = Vec::with_capacity(sets.len());
        for (i, att) in sets.iter().enumerate() {
            let local = &set_sources[i];
            let first = local.iter().map(|&(_, f)| f).min().unwrap_or(next);
            let end = set_sources
                .get(i + 1)
                .and_then(|l| l.iter().map(|&(_, f)| f).min())
                .unwrap_or(next);
            let mut plan = SetPlan {
                always: vec![0; att.set.rules.len().div_ceil(64)],
                first,
                gates: vec![u32::MAX; (end.saturating_sub(first)) as usize],
                roots: Vec::new(),
            };
            let pattern = |s: usize, slot: usize| local[s].1 + slot as u32;
            for (ri, rule) in att.set.rules.iter().enumerate() {
                match gate(&rule.cond, &pattern) {
                    Some(ps) if !ps.is_empty() => {
                        for p in ps {
                            if let Some(g) = plan.gates.get_mut((p - first) as usize) {
                                *g = ri as u32;
                            }
                        }
                    }
                    _ => plan.always[ri / 64] |= 1 << (ri % 64),
                }
            }
            let mut rs: Vec<u32> = local
                .iter()
                .map(|&(u, _)| sources[u as usize].root)
                .filter(|&r| !roots[r as usize].labels)
                .collect();
            rs.sort_unstable();
            rs.dedup();
            plan.roots = rs;
            plans.push(plan);
        }
        Engine {
            sets,
            set_sources,
            plans,
            sources,
            roots,
            nodes,
            node_root,
            checks,
            patterns: next,
        }
    }

    /// A fresh per-request state.
    pub(crate) fn run<'e, 'i>(&'e self, input: &'i RuleInput<'i>) -> Run<'e, 'i> {
        let words = (self.patterns as usize).div_ceil(64) + self.roots.len().div_ceil(64);
        Run {
            engine: self,
            input,
            metas: Vec::with_capacity(32),
            texts: Vec::with_capacity(256),
            owned: Vec::new(),
            memo: Vec::new(),
            ranges: vec![UNSET; self.nodes.len()],
            bits: vec![0; words],
            checked: Vec::new(),
            starts: Vec::new(),
            groups: Vec::new(),
        }
    }

    /// How many distinct (field, transforms) sources and patterns the engine scans.
    pub fn stats(&self) -> (usize, usize) {
        (self.sources.len(), self.patterns as usize)
    }

    /// A description of the engine's size (fields, transform nodes, sources, patterns,
    /// prefiltered literals, patterns without literals), for `palisade check` and benchmarks.
    pub fn describe(&self) -> String {
        let lits: usize = self.roots.iter().map(|r| r.scanner.lit_targets.len()).sum();
        let rest: usize = self.roots.iter().map(|r| r.scanner.rest_ids.len()).sum();
        let bytes: usize = self
            .roots
            .iter()
            .filter_map(|r| r.scanner.ac.as_ref())
            .map(AhoCorasick::memory_usage)
            .sum();
        format!(
            "{} fields, {} transform nodes, {} sources, {} patterns ({} literals in automata of {} KiB; {} without a literal)",
            self.roots.len(),
            self.nodes.len(),
            self.sources.len(),
            self.patterns,
            lits,
            bytes / 1024,
            rest
        )
    }
}

fn node_for(
    nodes: &mut Vec<Node>,
    ids: &mut HashMap<(Field, Vec<Transform>), u32>,
    src: &Source,
) -> u32 {
    let mut parent = None;
    for k in 0..=src.chain.len() {
        let key = (src.field.clone(), src.chain[..k].to_vec());
        let id = *ids.entry(key).or_insert_with(|| {
            nodes.push(match parent {
                None => Node::Root(src.field.clone()),
                Some(p) => Node::Step(p, src.chain[k - 1]),
            });
            (nodes.len() - 1) as u32
        });
        parent = Some(id);
    }
    parent.unwrap_or(0)
}

fn build_scanner(
    list: Vec<(u32, u32, ScanPattern)>,
    checks: &mut Vec<Check>,
    ctx: Context,
) -> Scanner {
    let mut sc = Scanner::default();
    let mut lits: Vec<Vec<u8>> = Vec::new();
    let mut lit_index: HashMap<Vec<u8>, usize> = HashMap::new();
    let mut per_lit: Vec<Vec<Target>> = Vec::new();
    let mut rest: Vec<(u32, u32, Regex)> = Vec::new();
    // Identical patterns (the same regex on several chains of a field) share one check.
    let mut regex_checks: HashMap<String, u32> = HashMap::new();
    let mut add = |lit: Vec<u8>, target: Target, per_lit: &mut Vec<Vec<Target>>| {
        let i = *lit_index.entry(lit.clone()).or_insert_with(|| {
            lits.push(lit);
            per_lit.push(Vec::new());
            lits.len() - 1
        });
        per_lit[i].push(target);
    };
    for (id, l, p) in list {
        match p {
            ScanPattern::Regex(re) => match required_literals_in(re.as_str(), ctx) {
                Some(set) => {
                    let c = *regex_checks
                        .entry(re.as_str().to_string())
                        .or_insert_with(|| {
                            checks.push(Check::Regex(re));
                            (checks.len() - 1) as u32
                        });
                    for lit in set {
                        add(lit, (id, c, l), &mut per_lit);
                    }
                }
                None => rest.push((id, l, re)),
            },
            ScanPattern::Phrases(list) => {
                checks.push(Check::Exact);
                let c = (checks.len() - 1) as u32;
                for ph in list {
                    if ph.is_empty() {
                        sc.always.push((id, c, l));
                    } else {
                        add(ph.into_bytes(), (id, c, l), &mut per_lit);
                    }
                }
            }
            ScanPattern::Contains(s) => {
                let bytes = s.as_bytes().to_vec();
                checks.push(Check::Contains(s));
                let c = (checks.len() - 1) as u32;
                if bytes.is_empty() {
                    sc.always.push((id, c, l));
                } else {
                    add(bytes, (id, c, l), &mut per_lit);
                }
            }
        }
    }
    if !lits.is_empty() {
        // A DFA: the fastest search, at a memory cost that literal sets of this size afford;
        // the automatic choice (an NFA) when it cannot be built.
        let mut builder = AhoCorasick::builder();
        builder
            .ascii_case_insensitive(true)
            .match_kind(MatchKind::Standard);
        let built = builder
            .kind(Some(AhoCorasickKind::DFA))
            .build(&lits)
            .or_else(|_| builder.kind(None).build(&lits));
        match built {
            Ok(ac) => {
                sc.ac = Some(ac);
                for targets in per_lit {
                    let start = sc.targets.len() as u32;
                    sc.targets.extend(targets);
                    sc.lit_targets.push((start, sc.targets.len() as u32));
                }
            }
            Err(e) => {
                // Cannot happen with literals from rule files short of memory limits; every
                // pattern is then checked on every value instead (slower, same verdicts).
                tracing::warn!(error = %e, "cannot build a literal prefilter; checking every pattern");
                let mut all: Vec<Target> = per_lit.into_iter().flatten().collect();
                all.sort_unstable();
                all.dedup();
                sc.always.extend(all);
            }
        }
    }
    if !rest.is_empty() {
        match RegexSetBuilder::new(rest.iter().map(|(_, _, r)| r.as_str()))
            .size_limit(REST_SIZE_LIMIT)
            .build()
        {
            Ok(set) => {
                sc.rest = Some(set);
                sc.rest_ids = rest.iter().map(|(id, l, _)| (*id, *l)).collect();
            }
            Err(_) => {
                for (id, l, re) in rest {
                    checks.push(Check::Regex(re));
                    sc.always.push((id, (checks.len() - 1) as u32, l));
                }
            }
        }
    }
    sc
}

const UNSET: (u32, u32) = (u32::MAX, 0);

/// A value's text: borrowed from the request or in the run's arena.
#[derive(Debug, Clone, Copy)]
enum Text<'i> {
    Req(&'i str),
    Own(u32),
}

/// A value's origin and name (for exclusions and explanations).
#[derive(Debug)]
pub(crate) struct Meta<'i> {
    pub(crate) origin: Origin,
    pub(crate) name: Option<Cow<'i, str>>,
}

/// Per-request engine state.
pub(crate) struct Run<'e, 'i> {
    engine: &'e Engine,
    input: &'i RuleInput<'i>,
    metas: Vec<Meta<'i>>,
    /// (meta, text, byte classes of the text) of every value of every computed node, node
    /// by node.
    texts: Vec<(u32, Text<'i>, u32)>,
    owned: Vec<String>,
    /// Transforms already applied to the texts of the value being computed.
    memo: Vec<(Text<'i>, Transform, Text<'i>, u32)>,
    /// Per node, its range in `texts`.
    ranges: Vec<(u32, u32)>,
    /// Pattern hits, then scanned roots.
    bits: Vec<u64>,
    checked: Vec<u32>,
    /// Scratch of a root scan: each source's first value, and the distinct texts of one
    /// value with the sources (bit set of local indices) that have it.
    starts: Vec<usize>,
    groups: Vec<(Text<'i>, Vec<u64>)>,
}

impl<'e, 'i> Run<'e, 'i> {
    /// The engine.
    pub(crate) fn engine(&self) -> &'e Engine {
        self.engine
    }

    /// The request.
    pub(crate) fn input(&self) -> &'i RuleInput<'i> {
        self.input
    }

    fn text(&self, t: Text<'i>) -> &str {
        match t {
            Text::Req(s) => s,
            Text::Own(i) => self.owned.get(i as usize).map_or("", String::as_str),
        }
    }

    /// The values of engine source `u`: (meta index, text) pairs, computed on first use.
    pub(crate) fn values(&mut self, u: u32) -> std::ops::Range<usize> {
        let node = self.engine.sources[u as usize].node;
        self.compute(node);
        let (a, b) = self.ranges[node as usize];
        a as usize..b as usize
    }

    /// The `i`-th value: its meta and text.
    pub(crate) fn value(&self, i: usize) -> (&Meta<'i>, &str) {
        let (m, t, _) = self.texts[i];
        (&self.metas[m as usize], self.text(t))
    }

    /// Computes every node of `node`'s field at once, value by value: a transform applied
    /// to the same text under two chains (`lowercase` after `url_decode` that changed
    /// nothing, and `lowercase` alone) runs once.
    fn compute(&mut self, node: u32) {
        if self.ranges[node as usize] != UNSET {
            return;
        }
        let engine = self.engine;
        let root = &engine.roots[engine.node_root[node as usize] as usize];
        let Some(Node::Root(field)) = root.nodes.first().map(|&n| &engine.nodes[n as usize]) else {
            return;
        };
        let base = self.texts.len();
        for v in self.input.values(field, &[]) {
            self.metas.push(Meta {
                origin: v.origin,
                name: v.name,
            });
            let m = (self.metas.len() - 1) as u32;
            let c = classes(&v.text);
            let t = match v.text {
                Cow::Borrowed(s) => Text::Req(s),
                Cow::Owned(o) => {
                    self.owned.push(o);
                    Text::Own((self.owned.len() - 1) as u32)
                }
            };
            self.texts.push((m, t, c));
        }
        let n = self.texts.len() - base;
        // Node k's values are texts[base + k*n ..][..n].
        self.texts
            .resize(base + n * root.nodes.len(), (0, Text::Req(""), 0));
        let mut memo = std::mem::take(&mut self.memo);
        for j in 0..n {
            memo.clear();
            for (k, &(parent, tr)) in root.steps.iter().enumerate() {
                let (m, t, c) = self.texts[base + parent as usize * n + j];
                let entry = if !tr.may_change(c) {
                    (m, t, c)
                } else if let Some(&(_, _, out, oc)) =
                    memo.iter().find(|(i, x, _, _)| *x == tr && same(*i, t))
                {
                    (m, out, oc)
                } else {
                    let (out, oc) = self.apply(tr, t, c);
                    memo.push((t, tr, out, oc));
                    (m, out, oc)
                };
                self.texts[base + (k + 1) * n + j] = entry;
            }
        }
        self.memo = memo;
        for (k, &id) in root.nodes.iter().enumerate() {
            let start = (base + k * n) as u32;
            self.ranges[id as usize] = (start, start + n as u32);
        }
    }

    /// One transform on one text: the same text when nothing changed (a decoder that
    /// rebuilt an equal string counts as unchanged: one distinct text is scanned once).
    fn apply(&mut self, tr: Transform, t: Text<'i>, c: u32) -> (Text<'i>, u32) {
        let next = match t {
            Text::Req(s) => match tr.apply(s) {
                Cow::Borrowed(x) if x.len() == s.len() => Ok(Text::Req(x)),
                Cow::Owned(o) if o == s => Ok(t),
                other => Err(other.into_owned()),
            },
            Text::Own(k) => {
                let s = self.owned.get(k as usize).map_or("", String::as_str);
                match tr.apply(s) {
                    Cow::Borrowed(x) if x.len() == s.len() => Ok(t),
                    Cow::Owned(o) if o == s => Ok(t),
                    other => Err(other.into_owned()),
                }
            }
        };
        match next {
            Ok(t) => (t, c),
            Err(o) => {
                let c = classes(&o);
                self.owned.push(o);
                (Text::Own((self.owned.len() - 1) as u32), c)
            }
        }
    }

    fn bit(&self, i: usize) -> bool {
        self.bits[i / 64] & (1 << (i % 64)) != 0
    }

    fn set_bit(&mut self, i: usize) {
        self.bits[i / 64] |= 1 << (i % 64);
    }

    /// The rules of set `si` that can match this request, as a bit set over rule indices:
    /// the ungated ones, and those with a pattern the scan found (scanning the set's fields
    /// first). Evaluating only these keeps the cost flat in the number of rules.
    pub(crate) fn candidates(&mut self, si: usize, out: &mut Vec<u64>) {
        let plan = &self.engine.plans[si];
        for &r in &plan.roots {
            self.ensure_scanned(r);
        }
        out.clear();
        out.extend_from_slice(&plan.always);
        let (first, n) = (plan.first as usize, plan.gates.len());
        let mut p = first;
        while p < first + n {
            let w = self.bits[p / 64];
            if w == 0 {
                p = (p / 64 + 1) * 64;
                continue;
            }
            if w & (1 << (p % 64)) != 0 {
                let r = plan.gates[p - first];
                if r != u32::MAX {
                    out[r as usize / 64] |= 1 << (r % 64);
                }
            }
            p += 1;
        }
    }

    fn ensure_scanned(&mut self, root: u32) {
        let scanned = (self.engine.patterns as usize).div_ceil(64) * 64 + root as usize;
        if !self.bit(scanned) {
            self.set_bit(scanned);
            self.scan(root);
        }
    }

    /// Whether any value of engine source `u` matches global pattern `p` (scanning the
    /// source's field for all its patterns on first use).
    pub(crate) fn hit(&mut self, u: u32, p: u32) -> bool {
        self.ensure_scanned(self.engine.sources[u as usize].root);
        self.bit(p as usize)
    }

    /// Scans every value of a field under every chain used on it: each distinct text once,
    /// against the patterns of the sources that produced that text.
    fn scan(&mut self, root: u32) {
        let engine = self.engine;
        let r = &engine.roots[root as usize];
        if r.labels {
            return;
        }
        let mut starts = std::mem::take(&mut self.starts);
        let mut groups = std::mem::take(&mut self.groups);
        let mut checked = std::mem::take(&mut self.checked);
        starts.clear();
        let mut n = 0;
        for &u in &r.sources {
            let range = self.values(u);
            n = range.len();
            starts.push(range.start);
        }
        let words = r.sources.len().div_ceil(64);
        let mut found: Vec<u32> = Vec::new();
        for j in 0..n {
            // Group the sources by the text they have for value j (most chains change nothing).
            let mut used = 0;
            for (l, &start) in starts.iter().enumerate() {
                let t = self.texts[start + j].1;
                let g = match groups[..used].iter().position(|(x, _)| same(*x, t)) {
                    Some(g) => g,
                    None => {
                        if used == groups.len() {
                            groups.push((t, vec![0; words]));
                        } else {
                            groups[used].0 = t;
                            groups[used].1.iter_mut().for_each(|w| *w = 0);
                        }
                        used += 1;
                        used - 1
                    }
                };
                groups[g].1[l / 64] |= 1 << (l % 64);
            }
            for (t, mask) in &groups[..used] {
                let text = self.text(*t);
                let has = |l: u32| mask[l as usize / 64] & (1 << (l % 64)) != 0;
                checked.clear();
                let mut check = |id: u32, c: u32, found: &mut Vec<u32>| {
                    if checked.contains(&id) {
                        return;
                    }
                    checked.push(id);
                    let ok = match &engine.checks[c as usize] {
                        Check::Exact => true,
                        Check::Regex(re) => re.is_match(text),
                        Check::Contains(s) => text.contains(s.as_str()),
                    };
                    if ok {
                        found.push(id);
                    }
                };
                let sc = &r.scanner;
                if let Some(ac) = &sc.ac {
                    // Literals spell `(?i)k` and `(?i)s` in ASCII only: a text with the Kelvin
                    // sign or the long s is also scanned with them folded (see `literals`).
                    let folded = fold_ascii_variants(text);
                    let views = std::iter::once(text).chain(folded.as_deref());
                    for view in views {
                        for m in ac.find_overlapping_iter(view) {
                            let (a, b) = sc.lit_targets[m.pattern().as_usize()];
                            for &(id, c, l) in &sc.targets[a as usize..b as usize] {
                                if has(l) && !self.bit(id as usize) {
                                    check(id, c, &mut found);
                                }
                            }
                        }
                    }
                }
                for &(id, c, l) in &sc.always {
                    if has(l) && !self.bit(id as usize) {
                        check(id, c, &mut found);
                    }
                }
                if let Some(rs) = &sc.rest {
                    if rs.is_match(text) {
                        for k in rs.matches(text).iter() {
                            let (id, l) = sc.rest_ids[k];
                            if has(l) {
                                found.push(id);
                            }
                        }
                    }
                }
                for &id in &found {
                    self.bits[id as usize / 64] |= 1 << (id % 64);
                }
                found.clear();
            }
        }
        self.starts = starts;
        self.groups = groups;
        self.checked = checked;
    }
}

/// Whether two texts are the same value (a transform that changed nothing passes its input
/// through): compared by identity, not content.
fn same(a: Text<'_>, b: Text<'_>) -> bool {
    match (a, b) {
        (Text::Req(x), Text::Req(y)) => std::ptr::eq(x, y),
        (Text::Own(x), Text::Own(y)) => x == y,
        _ => false,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use super::*;
    use crate::rules::eval::Tracer;

    /// Makes `evaluate` take the reference path: every rule evaluated, every value tested
    /// with the rule's own operators (explanations need that), lines discarded.
    struct Reference;
    impl Tracer for Reference {
        fn enabled(&self) -> bool {
            true
        }
        fn line(&mut self, _: String) {}
    }

    /// The engine (shared scan, prefilters, gates, byte-class skips, caches) decides every
    /// request exactly as the reference evaluation does, with the managed rule sets, on
    /// random requests built from attack and benign fragments, encoded several ways and
    /// placed in the query, a JSON body, cookies and headers.
    #[test]
    fn engine_agrees_with_reference_on_random_requests() {
        let sets: Vec<AttachedRuleSet> = crate::rules::compile::load_managed(&BTreeMap::new())
            .into_iter()
            .map(|r| AttachedRuleSet::plain(Arc::new(r.unwrap())))
            .collect();
        let engine = Engine::new(sets);
        let fragments = [
            "select",
            "union",
            " ",
            "'",
            "\"",
            "1",
            "=",
            "or",
            "--",
            "/*",
            "*/",
            "(",
            ")",
            "<",
            ">",
            "script",
            "svg",
            "onload",
            "alert",
            "javascript:",
            "../",
            "..\\",
            "etc",
            "passwd",
            ";",
            "|",
            "cat",
            "$(",
            "`",
            "${",
            "jndi:",
            "ldap",
            "%27",
            "%3C",
            "&lt;",
            "&#x3c;",
            "\\x3c",
            "\u{212A}",
            "\u{17F}",
            "SLEEP",
            "Mozilla",
            "run",
            "the river",
            "&",
            "+",
            "\t",
            "  ",
            "é",
            "ＳＥＬＥＣＴ",
            "$ne",
            "{{",
            "}}",
            "7*7",
            "php://",
            "/bin/sh",
            "cmd.exe",
            "wget",
            "http://",
            "__proto__",
            "\0",
            "%00",
            "drop table",
        ];
        let mut seed = 0x853c_49e6_748f_ea9b_u64;
        let mut rnd = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        let mut disagreements = Vec::new();
        for _ in 0..1500 {
            let mut text = String::new();
            for _ in 0..1 + rnd(6) {
                text.push_str(fragments[rnd(fragments.len())]);
            }
            let query = format!(
                "q={}&limit=25",
                percent_encoding::utf8_percent_encode(&text, percent_encoding::NON_ALPHANUMERIC)
            );
            let body = serde_json::json!({"note": text, "n": 1}).to_string();
            let mut headers = http::HeaderMap::new();
            headers.insert("content-type", "application/json".parse().unwrap());
            if let Ok(v) = http::HeaderValue::from_str(&text) {
                headers.insert("x-custom", v.clone());
                headers.insert("user-agent", v);
            }
            for (q, b) in [(query.as_str(), ""), ("", body.as_str())] {
                let input = crate::request::Request::new(
                    "POST",
                    "/api/items",
                    q,
                    &headers,
                    b.as_bytes(),
                    None,
                    None,
                    None,
                );
                let fast = engine.evaluate(&input.fresh(), &mut ());
                let reference = engine.evaluate(&input.fresh(), &mut Reference);
                if fast.verdict != reference.verdict || fast.matches != reference.matches {
                    disagreements.push(format!("{text:?}: {fast:?} vs {reference:?}"));
                }
            }
        }
        assert!(disagreements.is_empty(), "{disagreements:#?}");
    }
}
