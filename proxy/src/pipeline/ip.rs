//! Pipeline stage `ip` (header phase): client IP allow/deny by IP set.

use std::sync::Arc;

use super::{Block, Decision, Eval, Notes, Stage, StageKind};
use crate::identity::ipset::IpSet;
use crate::request::Request;

/// A route's IP policy, with the sets resolved.
#[derive(Debug, Clone, Default)]
pub struct IpPolicy {
    /// Admit only members of these sets (empty = no allow-list).
    pub allow: Vec<(String, Arc<IpSet>)>,
    /// Block members of these sets.
    pub deny: Vec<(String, Arc<IpSet>)>,
}

/// Client IP allow/deny.
pub struct IpStage {
    policy: IpPolicy,
}

impl IpStage {
    /// The stage of a policy.
    pub fn new(policy: IpPolicy) -> IpStage {
        IpStage { policy }
    }
}

fn denied() -> Eval<'static> {
    Eval::Done(Decision::Block(Block::new(403, "ip_denied")))
}

impl Stage for IpStage {
    fn kind(&self) -> StageKind {
        StageKind::Ip
    }

    fn evaluate<'s>(&'s self, req: &Request<'_>, _: &mut Notes) -> Eval<'s> {
        // Without a client address (not TCP) nothing can be admitted by an allow-list.
        let Some(ip) = req.client_ip else {
            return if self.policy.allow.is_empty() {
                Eval::Done(Decision::Continue)
            } else {
                denied()
            };
        };
        // Deny wins over allow. Each lookup is a binary search: O(log n) per set.
        if self.policy.deny.iter().any(|(_, s)| s.contains(ip)) {
            return denied();
        }
        if !self.policy.allow.is_empty() && !self.policy.allow.iter().any(|(_, s)| s.contains(ip)) {
            return denied();
        }
        Eval::Done(Decision::Continue)
    }
}
