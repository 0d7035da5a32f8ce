//! The rules engine: YAML rule sets (`file`) compiled once (`compile`) into immutable
//! matchers evaluated per request without locks (`eval`), on fields (`fields`) after text
//! transformations (`transforms`). Pipeline stage `rules` (body phase when any attached rule
//! reads the body).

pub mod compile;
pub mod eval;
pub mod fields;
pub mod file;
pub mod managed;
mod multipart;
pub mod testing;
pub mod transforms;

use std::borrow::Cow;

use crate::pipeline::{Block, Decision, RequestView, Stage, StageKind};
use eval::{evaluate, AttachedRuleSet, RulesVerdict};
use fields::RuleInput;

/// The rule sets attached to one route, in priority order.
pub struct RulesStage {
    sets: Vec<AttachedRuleSet>,
    needs_body: bool,
}

impl RulesStage {
    /// The stage for a route, `None` without rule sets.
    pub fn new(sets: Vec<AttachedRuleSet>) -> Option<RulesStage> {
        if sets.is_empty() {
            return None;
        }
        let needs_body = sets.iter().any(|s| s.set.needs_body);
        Some(RulesStage { sets, needs_body })
    }

    /// Whether any attached rule reads the client's country or ASN.
    pub fn needs_geo(&self) -> bool {
        self.sets.iter().any(|s| s.set.needs_geo)
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

/// Builds the rules' view of a request.
pub fn input_of<'a>(req: &'a RequestView<'a>) -> RuleInput<'a> {
    RuleInput::new(
        req.head.method.as_str(),
        req.head.uri.path(),
        req.head.uri.query().unwrap_or(""),
        &req.head.headers,
        req.body.unwrap_or(&[]),
        req.client_ip,
        req.geo.country,
        req.geo.asn,
    )
}

impl Stage for RulesStage {
    fn kind(&self) -> StageKind {
        StageKind::Rules
    }

    fn needs_body(&self) -> bool {
        self.needs_body
    }

    fn evaluate(&self, req: &RequestView<'_>) -> Decision {
        let input = input_of(req);
        let outcome = evaluate(&self.sets, &input, &mut ());
        for m in outcome
            .matches
            .iter()
            .filter(|m| m.action == file::RuleAction::Log)
        {
            tracing::info!(target: "palisade::rules", rule_set = %m.set, rule = %m.rule,
                method = %req.head.method, path = %req.head.uri.path(), client = ?req.client_ip, "rule matched (log)");
        }
        let counted: Vec<Cow<'static, str>> = outcome
            .matches
            .iter()
            .filter(|m| matches!(m.action, file::RuleAction::Count | file::RuleAction::Log))
            .map(|m| Cow::Owned(format!("rule:{}", m.rule)))
            .collect();
        match outcome.verdict {
            RulesVerdict::Block { status, reason } => Decision::Block(Block {
                status,
                reason: reason.into(),
                headers: vec![],
                details: None,
            }),
            RulesVerdict::Allow { .. } => Decision::Allow,
            RulesVerdict::Pass if !counted.is_empty() => Decision::Counted(counted),
            RulesVerdict::Pass => Decision::Continue,
        }
    }
}
