//! Pipeline stage `access` (header phase): a route's method allow-list and route-wide deny.

use super::{Block, Decision, RequestView, Stage, StageKind};
use crate::config::RoutePolicy;

/// Method allow-list and route-wide block, compiled from a route's policy.
pub struct AccessStage {
    methods: Option<Vec<http::Method>>,
    /// Precomputed `Allow` header value for 405 answers.
    allow_header: String,
    deny: Option<(u16, String)>,
}

impl AccessStage {
    /// Returns `None` when the policy restricts nothing (no stage is added to the pipeline).
    pub fn new(policy: &RoutePolicy) -> Option<AccessStage> {
        if policy.methods.is_none() && policy.deny.is_none() {
            return None;
        }
        let allow_header = policy
            .methods
            .as_ref()
            .map(|m| m.iter().map(|m| m.as_str()).collect::<Vec<_>>().join(", "))
            .unwrap_or_default();
        Some(AccessStage {
            methods: policy.methods.clone(),
            allow_header,
            deny: policy.deny.clone(),
        })
    }
}

impl Stage for AccessStage {
    fn kind(&self) -> StageKind {
        StageKind::Access
    }

    fn evaluate(&self, req: &RequestView<'_>) -> Decision {
        if let Some((status, reason)) = &self.deny {
            return Decision::Block(Block {
                status: *status,
                reason: reason.clone().into(),
                headers: vec![],
                details: None,
            });
        }
        if let Some(methods) = &self.methods {
            // O(n) over a handful of methods; cheaper than hashing.
            if !methods.contains(&req.head.method) {
                return Decision::Block(Block {
                    status: 405,
                    reason: "method_not_allowed".into(),
                    headers: vec![("allow", self.allow_header.clone())],
                    details: None,
                });
            }
        }
        Decision::Continue
    }
}
