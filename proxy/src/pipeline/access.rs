//! Pipeline stage `access` (header phase): a route's method allow-list and route-wide deny.

use super::{Block, Decision, Eval, Notes, Stage, StageKind};
use crate::request::Request;

/// A route's access policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccessPolicy {
    /// Allowed methods (`None` = all).
    pub methods: Option<Vec<http::Method>>,
    /// Route-wide block: status and reason.
    pub deny: Option<(u16, String)>,
}

/// Method allow-list and route-wide deny.
pub struct AccessStage {
    methods: Option<Vec<http::Method>>,
    allow_header: String,
    deny: Option<(u16, String)>,
}

impl AccessStage {
    /// The stage of a policy, `None` when it allows everything.
    pub fn new(policy: AccessPolicy) -> Option<AccessStage> {
        if policy.methods.is_none() && policy.deny.is_none() {
            return None;
        }
        let allow_header = policy
            .methods
            .as_ref()
            .map(|m| m.iter().map(|m| m.as_str()).collect::<Vec<_>>().join(", "))
            .unwrap_or_default();
        Some(AccessStage {
            methods: policy.methods,
            allow_header,
            deny: policy.deny,
        })
    }
}

impl Stage for AccessStage {
    fn kind(&self) -> StageKind {
        StageKind::Access
    }

    fn evaluate<'s>(&'s self, req: &Request<'_>, _: &mut Notes) -> Eval<'s> {
        if let Some((status, reason)) = &self.deny {
            return Eval::Done(Decision::Block(Block::new(*status, reason.clone())));
        }
        if let Some(methods) = &self.methods {
            // O(n) over a handful of methods; cheaper than hashing.
            if !methods.iter().any(|m| m.as_str() == req.method) {
                let mut b = Block::new(405, "method_not_allowed");
                b.headers.push(("allow", self.allow_header.clone()));
                return Eval::Done(Decision::Block(b));
            }
        }
        Eval::Done(Decision::Continue)
    }
}
