//! The request inspection pipeline: an explicit, ordered list of stages that every request of a
//! route passes before it may reach the upstream.
//!
//! ```text
//!   request headers ─▶ access ─▶ ip ─▶ geo ─▶ ratelimit ─┐   (header stages, no body read)
//!                                                        ▼
//!            body pre-read (only if a later stage needs it, ≤ inspect_limit)
//!                                                        ▼
//!                                     rules ─▶ validate ─┴─▶ upstream
//! ```
//!
//! Each stage returns a [`Decision`]: `Continue` to the next stage, `Allow` (skip the remaining
//! stages and forward), `Block` (answer the client, never reach the upstream) or `Count`
//! (record a label, as a dry-run block would, and continue). Stages are compiled per route at
//! load time and are immutable: evaluation takes no lock.

mod access;
pub mod ctx;
mod geo;
mod ip;

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;

pub use access::AccessStage;
pub use ctx::{BodyState, RequestCtx, RequestId};
pub use geo::GeoStage;
pub use ip::IpStage;

use crate::config::RoutePolicy;
use crate::identity::geo::ClientGeo;

/// Position of a stage in the pipeline; stages always run in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum StageKind {
    /// Route-level method allow-list and route-wide deny.
    Access,
    /// Client IP allow/deny sets.
    Ip,
    /// Country/ASN allow/deny.
    Geo,
    /// Rate limits.
    RateLimit,
    /// Rule sets (WAF rules).
    Rules,
    /// JSON-schema request validation.
    Validate,
}

impl StageKind {
    /// Stable name used in logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            StageKind::Access => "access",
            StageKind::Ip => "ip",
            StageKind::Geo => "geo",
            StageKind::RateLimit => "ratelimit",
            StageKind::Rules => "rules",
            StageKind::Validate => "validate",
        }
    }
}

/// A request blocked by a stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    /// HTTP status sent to the client.
    pub status: u16,
    /// Machine-readable reason (`route_denied`, `method_not_allowed`, …): JSON body, logs,
    /// metric label. Must come from a bounded set (config or code), never from the request.
    pub reason: Cow<'static, str>,
    /// Extra response headers (e.g. `Allow`, `Retry-After`).
    pub headers: Vec<(&'static str, String)>,
    /// Structured details (validation violations …), logged, and sent when `expose` is set.
    pub details: Option<Arc<BlockDetails>>,
}

/// Details of a block beyond its reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDetails {
    /// Fields added to the JSON error body next to `error` and `request_id`.
    pub fields: serde_json::Map<String, serde_json::Value>,
    /// Whether the client sees them (otherwise they are only logged).
    pub expose: bool,
}

/// What a stage decided about a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Go on with the next stage.
    Continue,
    /// Skip the remaining stages and forward the request.
    Allow,
    /// Answer the client with an error; the upstream never sees the request.
    Block(Block),
    /// Would have blocked (dry-run) or matched a count rule: record and continue.
    Count(Cow<'static, str>),
    /// Several count matches at once (a rule set with several count rules).
    Counted(Vec<Cow<'static, str>>),
}

/// The parts of a request a stage may inspect.
pub struct RequestView<'a> {
    /// Method, URI, headers.
    pub head: &'a http::request::Parts,
    /// The client address (behind trusted proxies, the one they vouch for).
    pub client_ip: Option<IpAddr>,
    /// Country and ASN of the client, when the route needs them and databases are loaded.
    pub geo: ClientGeo,
    /// The buffered body, when a body stage asked for it.
    pub body: Option<&'a [u8]>,
    /// Whether `body` is the whole body (false when it was cut at the inspection limit).
    pub body_complete: bool,
}

/// One inspection stage, compiled for a route.
pub trait Stage: Send + Sync {
    /// Where the stage sits in the pipeline.
    fn kind(&self) -> StageKind;
    /// Whether this stage inspects the request body (forces the body pre-read).
    fn needs_body(&self) -> bool {
        false
    }
    /// Evaluates one request. Must not block or take locks.
    fn evaluate(&self, req: &RequestView<'_>) -> Decision;
}

/// The outcome of running a group of stages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Go on: the next group of stages (if any) runs, then the request is forwarded.
    Forward,
    /// A stage allowed the request explicitly: skip every remaining stage and forward.
    Allow,
    /// Block it, with the stage that decided.
    Block(StageKind, Block),
}

/// A route's compiled pipeline: header stages, then body stages, each in [`StageKind`] order.
pub struct Pipeline {
    header_stages: Vec<Box<dyn Stage>>,
    body_stages: Vec<Box<dyn Stage>>,
}

impl Pipeline {
    /// Builds a route's pipeline from its policy, its attached rule sets and its validator.
    pub fn for_route(
        policy: &RoutePolicy,
        rules: Option<crate::rules::RulesStage>,
        validate: Option<crate::schema::ValidateStage>,
    ) -> Pipeline {
        let mut stages: Vec<Box<dyn Stage>> = Vec::new();
        if let Some(r) = rules {
            stages.push(Box::new(r));
        }
        if let Some(v) = validate {
            stages.push(Box::new(v));
        }
        if let Some(access) = AccessStage::new(policy) {
            stages.push(Box::new(access));
        }
        if let Some(ip) = &policy.ip {
            stages.push(Box::new(IpStage::new(ip.clone())));
        }
        if let Some(geo) = GeoStage::new(policy.geo.clone(), policy.asn.clone()) {
            stages.push(Box::new(geo));
        }
        Pipeline::from_stages(stages)
    }

    /// Builds a pipeline from stages in any order; they are sorted into pipeline order. Stages
    /// before the rate limit (access, ip, geo) run on the request head; the rest (rules,
    /// validate) run after the rate limit and, when one of them reads the body, after the body
    /// pre-read.
    pub fn from_stages(mut stages: Vec<Box<dyn Stage>>) -> Pipeline {
        stages.sort_by_key(|s| s.kind());
        let split = stages
            .iter()
            .position(|s| s.kind() > StageKind::RateLimit)
            .unwrap_or(stages.len());
        let body_stages = stages.split_off(split);
        Pipeline {
            header_stages: stages,
            body_stages,
        }
    }

    /// Whether any stage needs the request body.
    pub fn needs_body(&self) -> bool {
        self.body_stages.iter().any(|s| s.needs_body())
    }

    /// Whether there are stages after the rate limit.
    pub fn has_late_stages(&self) -> bool {
        !self.body_stages.is_empty()
    }

    /// Runs the stages that need only the request head.
    pub fn run_header_stages(
        &self,
        req: &RequestView<'_>,
        counted: &mut Vec<Cow<'static, str>>,
    ) -> Verdict {
        run(&self.header_stages, req, counted)
    }

    /// Runs the stages that inspect the body (after the pre-read).
    pub fn run_body_stages(
        &self,
        req: &RequestView<'_>,
        counted: &mut Vec<Cow<'static, str>>,
    ) -> Verdict {
        run(&self.body_stages, req, counted)
    }
}

fn run(
    stages: &[Box<dyn Stage>],
    req: &RequestView<'_>,
    counted: &mut Vec<Cow<'static, str>>,
) -> Verdict {
    for stage in stages {
        match stage.evaluate(req) {
            Decision::Continue => {}
            Decision::Allow => return Verdict::Allow,
            Decision::Count(label) => counted.push(label),
            Decision::Counted(labels) => counted.extend(labels),
            Decision::Block(b) => return Verdict::Block(stage.kind(), b),
        }
    }
    Verdict::Forward
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic, reason = "tests")]
mod tests {
    use super::*;

    struct Fixed(StageKind, Decision, bool);
    impl Stage for Fixed {
        fn kind(&self) -> StageKind {
            self.0
        }
        fn needs_body(&self) -> bool {
            self.2
        }
        fn evaluate(&self, _: &RequestView<'_>) -> Decision {
            self.1.clone()
        }
    }

    fn block(reason: &'static str) -> Decision {
        Decision::Block(Block {
            status: 403,
            reason: reason.into(),
            headers: vec![],
            details: None,
        })
    }

    fn view(parts: &http::request::Parts) -> RequestView<'_> {
        RequestView {
            head: parts,
            client_ip: None,
            geo: ClientGeo::default(),
            body: None,
            body_complete: true,
        }
    }

    #[test]
    fn stages_run_in_pipeline_order_and_first_block_wins() {
        let (parts, ()) = http::Request::new(()).into_parts();
        let p = Pipeline::from_stages(vec![
            Box::new(Fixed(StageKind::Rules, block("rules"), false)),
            Box::new(Fixed(
                StageKind::Ip,
                Decision::Count("ip-count".into()),
                false,
            )),
            Box::new(Fixed(StageKind::Geo, block("geo"), false)),
        ]);
        let mut counted = vec![];
        match p.run_header_stages(&view(&parts), &mut counted) {
            Verdict::Block(StageKind::Geo, b) => assert_eq!(b.reason, "geo"),
            v => panic!("unexpected {v:?}"),
        }
        assert_eq!(counted, vec![Cow::Borrowed("ip-count")]);
    }

    #[test]
    fn allow_skips_later_stages_and_body_stages_are_split() {
        let (parts, ()) = http::Request::new(()).into_parts();
        let p = Pipeline::from_stages(vec![
            Box::new(Fixed(StageKind::Validate, block("validate"), true)),
            Box::new(Fixed(StageKind::Ip, Decision::Allow, false)),
            Box::new(Fixed(StageKind::RateLimit, block("rl"), false)),
        ]);
        assert!(p.needs_body());
        let mut counted = vec![];
        assert_eq!(
            p.run_header_stages(&view(&parts), &mut counted),
            Verdict::Allow
        );
        assert!(matches!(
            p.run_body_stages(&view(&parts), &mut counted),
            Verdict::Block(StageKind::Validate, _)
        ));
    }
}
