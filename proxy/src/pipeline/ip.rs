//! Pipeline stage `ip` (header phase): client IP allow/deny by IP set.

use super::{Block, Decision, RequestView, Stage, StageKind};
use crate::config::IpPolicy;

/// A route's IP allow/deny lists, compiled.
pub struct IpStage {
    policy: IpPolicy,
}

impl IpStage {
    /// The stage for a route's IP policy.
    pub fn new(policy: IpPolicy) -> IpStage {
        IpStage { policy }
    }
}

fn denied() -> Decision {
    Decision::Block(Block {
        status: 403,
        reason: "ip_denied".into(),
        headers: vec![],
        details: None,
    })
}

impl Stage for IpStage {
    fn kind(&self) -> StageKind {
        StageKind::Ip
    }

    fn evaluate(&self, req: &RequestView<'_>) -> Decision {
        // Without a client address (not TCP) nothing can be admitted by an allow-list.
        let Some(ip) = req.client_ip else {
            return if self.policy.allow.is_empty() {
                Decision::Continue
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
        Decision::Continue
    }
}
