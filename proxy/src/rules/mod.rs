//! The rules engine: YAML rule sets (`file`) compiled once (`compile`) into immutable
//! matchers evaluated per request without locks (`eval`), on fields (`fields`) after text
//! transformations (`transforms`). Pipeline stage `rules` (body phase when any attached rule
//! reads the body).

pub mod compile;
pub mod engine;
pub mod eval;
pub mod fields;
pub mod file;
pub mod literals;
pub mod managed;
pub mod testing;
pub mod transforms;

use std::borrow::Cow;
use std::sync::Arc;

use crate::pipeline::{Block, Decision, Eval, Needs, Notes, Stage, StageKind};
use crate::request::Request;
use engine::Engine;
use eval::{AttachedRuleSet, RulesVerdict};

/// The rule sets attached to one route, in priority order, compiled into one engine.
pub struct RulesStage {
    engine: Engine,
    needs_body: bool,
    needs_geo: bool,
    /// Record where matches matched (for the decision log).
    evidence: bool,
    /// `palisade_rule_matches_total` handles.
    matches_metric: Option<Arc<crate::metrics::LabelCache>>,
}

impl RulesStage {
    /// The stage for a route, `None` without rule sets.
    pub fn new(sets: Vec<AttachedRuleSet>) -> Option<RulesStage> {
        if sets.is_empty() {
            return None;
        }
        let needs_body = sets.iter().any(|s| s.set.needs_body);
        let needs_geo = sets.iter().any(|s| s.set.needs_geo);
        Some(RulesStage {
            engine: Engine::new(sets),
            needs_body,
            needs_geo,
            evidence: false,
            matches_metric: None,
        })
    }

    /// Whether any attached rule reads the client's country or ASN.
    pub fn needs_geo(&self) -> bool {
        self.needs_geo
    }

    /// The route's inspection engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }
}

/// The JSON Schema (draft 2020-12) of rule-set files, generated from the parsing structs.
/// Committed as `schemas/palisade-ruleset.schema.json` (a test checks it is current).
pub fn ruleset_json_schema() -> String {
    let mut schema = schemars::schema_for!(file::RuleSetFile);
    schema.insert(
        "$id".into(),
        "https://palisade.dev/schemas/palisade-ruleset.schema.json".into(),
    );
    schema.insert("title".into(), "Palisade rule set".into());
    let mut text = serde_json::to_string_pretty(&schema).unwrap_or_default();
    text.push('\n');
    text
}

impl RulesStage {
    /// Records, for each block and count, the field, transforms and value that matched (the
    /// decision log's evidence): the matched rules are evaluated again with a collector.
    pub fn with_evidence(mut self, on: bool) -> RulesStage {
        self.evidence = on;
        self
    }

    /// Counts matches in `palisade_rule_matches_total{rule_set, rule, action}`.
    pub fn with_metrics(mut self, m: Arc<crate::metrics::LabelCache>) -> RulesStage {
        self.matches_metric = Some(m);
        self
    }

    /// The attached rule sets, in priority order.
    pub fn sets(&self) -> &[AttachedRuleSet] {
        &self.engine.sets
    }
}

impl Stage for RulesStage {
    fn kind(&self) -> StageKind {
        StageKind::Rules
    }

    fn needs(&self) -> Needs {
        Needs {
            body: self.needs_body,
            geo: self.needs_geo(),
        }
    }

    fn evaluate<'s>(&'s self, req: &Request<'_>, notes: &mut Notes) -> Eval<'s> {
        let outcome = self.engine.evaluate(req, &mut ());
        if let Some(metric) = &self.matches_metric {
            for m in &outcome.matches {
                let action = match m.action {
                    file::RuleAction::Block => "block",
                    file::RuleAction::Count => "count",
                    file::RuleAction::Log => "log",
                    file::RuleAction::Allow => "allow",
                };
                metric.get(&[m.set.as_str(), m.rule.as_str(), action]).inc();
            }
        }
        for m in &outcome.matches {
            match m.action {
                file::RuleAction::Log => {
                    tracing::info!(target: "palisade::rules", rule_set = %m.set, rule = %m.rule,
                        method = %req.method, path = %req.path(), client = ?req.client_ip, "rule matched (log)");
                    notes.counted.push(Cow::Owned(format!("rule:{}", m.rule)));
                }
                file::RuleAction::Count => {
                    notes.counted.push(Cow::Owned(format!("rule:{}", m.rule)));
                }
                _ => {}
            }
        }
        if self.evidence && !outcome.matches.is_empty() {
            for e in self.engine.evidence(req, &outcome.matches, &outcome.labels) {
                let action = outcome
                    .matches
                    .iter()
                    .find(|m| m.set == e.set && m.rule == e.rule)
                    .map_or("block", |m| match m.action {
                        file::RuleAction::Block => "block",
                        file::RuleAction::Count => "count",
                        file::RuleAction::Log => "log",
                        file::RuleAction::Allow => "allow",
                    });
                notes.matches.push(crate::pipeline::MatchNote {
                    kind: "rule",
                    set: e.set,
                    rule: e.rule,
                    action,
                    field: e.field,
                    transforms: e.transforms,
                    snippet: e.snippet,
                    key_hash: String::new(),
                });
            }
        }
        Eval::Done(match outcome.verdict {
            RulesVerdict::Block { status, reason } => Decision::Block(Block::new(status, reason)),
            RulesVerdict::Allow { .. } => Decision::Allow,
            RulesVerdict::Pass => Decision::Continue,
        })
    }
}
