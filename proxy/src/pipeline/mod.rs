//! The request inspection pipeline: one ordered list of stages that every request of a route
//! passes before it may reach the upstream.
//!
//! ```text
//!   request head ─▶ access ─▶ ip ─▶ geo ─▶ ratelimit ─▶ [body] ─▶ rules ─▶ validate ─▶ upstream
//!                                          (may await     │
//!                                           Redis)        └─ pre-read, only if a later stage
//!                                                            needs the body or oversize: block
//! ```
//!
//! The order is written once, in [`StageKind`]; [`Pipeline::new`] sorts a route's stages by
//! it. Each stage declares what it [`Needs`] (the body, geo data), so the pipeline — not the
//! pingora glue — decides whether and where the body is read: [`Pipeline::resume`] stops with
//! [`Step::ReadBody`] before the first stage after the body step, and with [`Step::Await`] on a
//! stage that must wait (the Redis rate limit); the caller does the I/O and resumes.
//!
//! Each stage returns a [`Decision`]: `Continue` to the next stage, `Allow` (skip the remaining
//! stages and forward) or `Block` (answer the client, never reach the upstream); count matches
//! and response headers go to [`Notes`]. Stages are compiled per route at load time and are
//! immutable: evaluation takes no lock.

mod access;
mod geo;
mod ip;

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

pub use access::{AccessPolicy, AccessStage};
pub use geo::{AsnPolicy, GeoPolicy, GeoStage, ListMode};
pub use ip::{IpPolicy, IpStage};

pub use crate::config::OversizePolicy;
use crate::request::Request;

/// Position of a stage in the pipeline: stages always run in this order. This enum is the one
/// place the order is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum StageKind {
    /// Route-level method allow-list and route-wide deny.
    Access,
    /// Client IP allow/deny sets.
    Ip,
    /// Country/ASN allow/deny.
    Geo,
    /// Bearer tokens (JWT) checked against the route's issuers and scopes.
    Auth,
    /// Rate limits (asynchronous with Redis).
    RateLimit,
    /// The body pre-read: not a stage of its own but the point where the body is read, and
    /// the stage named when a body is refused as too large.
    Body,
    /// JSON-RPC messages of MCP routes: tool arguments and Cedar per message.
    Mcp,
    /// Rate limits whose keys need the body (`mcp.tool`, `mcp.method`).
    McpRateLimit,
    /// Rule sets (WAF rules).
    Rules,
    /// JSON-schema request validation.
    Validate,
    /// Cedar authorization (`policy.authorize`).
    Authorize,
}

impl StageKind {
    /// Stable name used in logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            StageKind::Access => "access",
            StageKind::Ip => "ip",
            StageKind::Geo => "geo",
            StageKind::Auth => "auth",
            StageKind::RateLimit => "ratelimit",
            StageKind::Body => "body",
            StageKind::Mcp => "mcp",
            StageKind::McpRateLimit => "mcp_ratelimit",
            StageKind::Rules => "rules",
            StageKind::Validate => "validate",
            StageKind::Authorize => "authorize",
        }
    }

    /// Every kind, in pipeline order.
    pub const ALL: [StageKind; 11] = [
        StageKind::Access,
        StageKind::Ip,
        StageKind::Geo,
        StageKind::Auth,
        StageKind::RateLimit,
        StageKind::Body,
        StageKind::Mcp,
        StageKind::McpRateLimit,
        StageKind::Rules,
        StageKind::Validate,
        StageKind::Authorize,
    ];
}

/// What a stage needs from the request beyond its head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Needs {
    /// The body (forces the pre-read; only stages after [`StageKind::Body`] may ask).
    pub body: bool,
    /// The client's country or ASN (looked up once per request, only when asked).
    pub geo: bool,
}

impl Needs {
    /// Nothing beyond the head.
    pub const NONE: Needs = Needs {
        body: false,
        geo: false,
    };

    /// Either's needs.
    pub fn union(self, other: Needs) -> Needs {
        Needs {
            body: self.body || other.body,
            geo: self.geo || other.geo,
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

impl Block {
    /// A block with only a status and a reason.
    pub fn new(status: u16, reason: impl Into<Cow<'static, str>>) -> Block {
        Block {
            status,
            reason: reason.into(),
            headers: Vec::new(),
            details: None,
        }
    }
}

/// Details of a block beyond its reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDetails {
    /// Fields added to the JSON error body next to `error` and `request_id`.
    pub fields: serde_json::Map<String, serde_json::Value>,
    /// Whether the client sees them (otherwise they are only logged).
    pub expose: bool,
    /// The whole response body instead of Palisade's JSON error (the JSON-RPC error of an
    /// MCP route).
    pub body: Option<serde_json::Value>,
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
}

/// What stages record besides their decision: count matches (dry-run blocks, count rules) and
/// headers for the response of a forwarded request. Empty vectors do not allocate.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Notes {
    /// Labels of count matches (`rule:ID`, `ratelimit:NAME`, `validate:…`).
    pub counted: Vec<Cow<'static, str>>,
    /// Headers added to a forwarded request's response (`RateLimit`, `RateLimit-Policy`).
    pub response_headers: Vec<(&'static str, String)>,
    /// What matched, for the decision log (rules with where they matched, rate limits with
    /// a hash of the key). Filled only when a decision log is configured.
    pub matches: Vec<MatchNote>,
    /// Nanoseconds spent in each stage that ran, by [`StageKind::ALL`] index (`None`: did
    /// not run), for `palisade_inspection_duration_seconds`.
    pub stage_ns: [Option<u64>; StageKind::ALL.len()],
    /// Verified token claims from a stage that waited (the auth stage after a JWKS fetch);
    /// the proxy records them in the request's cache.
    pub claims: Option<std::sync::Arc<serde_json::Map<String, serde_json::Value>>>,
}

/// One match, as the decision log shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MatchNote {
    /// `rule` or `rate_limit`.
    pub kind: &'static str,
    /// Rule set (empty for a rate limit).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub set: String,
    /// Rule id or rate-limit rule name.
    pub rule: String,
    /// `block`, `count`, `log` or `allow`.
    pub action: &'static str,
    /// Where it matched (`json:/user/bio`, `query:q`, `body`).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub field: String,
    /// Transforms applied before the match.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub transforms: Vec<&'static str>,
    /// The start of the matched value, after the transforms.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub snippet: String,
    /// A rate limit's key, hashed (SHA-256, first 16 hex digits): the same client shows the
    /// same hash without its address or token being logged.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub key_hash: String,
}

impl Notes {
    /// Adds another stage's notes.
    pub fn merge(&mut self, other: Notes) {
        self.counted.extend(other.counted);
        self.response_headers.extend(other.response_headers);
        self.matches.extend(other.matches);
        if other.claims.is_some() {
            self.claims = other.claims;
        }
        for (mine, theirs) in self.stage_ns.iter_mut().zip(other.stage_ns) {
            if let Some(t) = theirs {
                *mine = Some(mine.unwrap_or(0) + t);
            }
        }
    }

    /// Adds time spent in a stage.
    pub fn time(&mut self, kind: StageKind, since: std::time::Instant) {
        let ns = since.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64;
        if let Some(slot) = StageKind::ALL
            .iter()
            .position(|k| *k == kind)
            .and_then(|i| self.stage_ns.get_mut(i))
        {
            *slot = Some(slot.unwrap_or(0) + ns);
        }
    }
}

/// A stage's evaluation still waiting for I/O; it owns what it needs from the request.
pub type Pending<'s> = Pin<Box<dyn Future<Output = (Decision, Notes)> + Send + 's>>;

/// The result of evaluating one stage.
pub enum Eval<'s> {
    /// Decided now (every stage but a rate limit with Redis rules).
    Done(Decision),
    /// Must wait: the caller awaits the future and resumes after the stage.
    Pending(Pending<'s>),
}

/// One inspection stage, compiled for a route.
pub trait Stage: Send + Sync {
    /// Where the stage sits in the pipeline.
    fn kind(&self) -> StageKind;
    /// What it needs beyond the request head.
    fn needs(&self) -> Needs {
        Needs::NONE
    }
    /// Evaluates one request. Must not block or take locks; what must wait (a Redis round
    /// trip) is returned as [`Eval::Pending`], which borrows only the stage.
    fn evaluate<'s>(&'s self, req: &Request<'_>, notes: &mut Notes) -> Eval<'s>;
}

/// A route's body pre-read settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyPolicy {
    /// Bytes buffered for inspection.
    pub inspect_limit: usize,
    /// Bodies over the limit.
    pub oversize: OversizePolicy,
}

/// The outcome of running a route's pipeline to its end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every stage let it through: forward it.
    Forward,
    /// A stage allowed the request explicitly: the remaining stages were skipped.
    Allow,
    /// Block it, with the stage that decided.
    Block(StageKind, Block),
}

/// Where [`Pipeline::resume`] stopped.
pub enum Step<'s> {
    /// The pipeline ran to its end (or a stage decided).
    Done(Verdict),
    /// Read the body (within [`Pipeline::body`]), then resume at `next`.
    ReadBody {
        /// Index to resume at.
        next: usize,
    },
    /// Await `pending`, apply its decision with [`Pipeline::settle`], then resume at `next`.
    Await {
        /// The stage waited on.
        kind: StageKind,
        /// Its evaluation.
        pending: Pending<'s>,
        /// Index to resume at.
        next: usize,
    },
}

/// A route's compiled pipeline: its stages in [`StageKind`] order and where the body is read.
pub struct Pipeline {
    stages: Vec<Box<dyn Stage>>,
    /// Index of the first stage after the body step, when the body must be read there.
    body_at: Option<usize>,
    body: BodyPolicy,
    needs: Needs,
}

impl Pipeline {
    /// Builds a route's pipeline from its stages (in any order: they are sorted into pipeline
    /// order) and its body settings. The body is read before the first stage after
    /// [`StageKind::Body`] when a stage needs it, or at the end when an oversize body must be
    /// refused anyway.
    pub fn new(mut stages: Vec<Box<dyn Stage>>, body: BodyPolicy) -> Pipeline {
        stages.sort_by_key(|s| s.kind());
        let needs = stages.iter().fold(Needs::NONE, |n, s| n.union(s.needs()));
        let after_body = stages
            .iter()
            .position(|s| s.kind() > StageKind::Body)
            .unwrap_or(stages.len());
        let body_at = (needs.body || body.oversize == OversizePolicy::Block).then_some(after_body);
        Pipeline {
            stages,
            body_at,
            body,
            needs,
        }
    }

    /// What the route's stages need together.
    pub fn needs(&self) -> Needs {
        self.needs
    }

    /// The body pre-read settings.
    pub fn body(&self) -> BodyPolicy {
        self.body
    }

    /// Runs stages from index `at` (0 to start) until the end, a decision, the body step or a
    /// stage that must wait. `body_read` says whether the body step already happened.
    pub fn resume<'s>(
        &'s self,
        at: usize,
        body_read: bool,
        req: &Request<'_>,
        notes: &mut Notes,
    ) -> Step<'s> {
        let mut i = at;
        loop {
            if !body_read && self.body_at == Some(i) {
                return Step::ReadBody { next: i };
            }
            let Some(stage) = self.stages.get(i) else {
                return Step::Done(Verdict::Forward);
            };
            i += 1;
            let started = std::time::Instant::now();
            let eval = stage.evaluate(req, notes);
            notes.time(stage.kind(), started);
            match eval {
                Eval::Done(d) => {
                    if let Some(v) = settle(stage.kind(), d) {
                        return Step::Done(v);
                    }
                }
                Eval::Pending(pending) => {
                    return Step::Await {
                        kind: stage.kind(),
                        pending,
                        next: i,
                    }
                }
            }
        }
    }

    /// Runs the whole pipeline synchronously on a request whose body is already in the view
    /// (`palisade explain`, tests, benches). A stage that would wait is awaited in place.
    pub fn run_blocking(&self, req: &Request<'_>, notes: &mut Notes) -> Verdict {
        let mut at = 0;
        loop {
            match self.resume(at, true, req, notes) {
                Step::Done(v) => return v,
                Step::ReadBody { next } => at = next,
                Step::Await {
                    kind,
                    pending,
                    next,
                } => {
                    let (d, n) = futures_executor::block_on(pending);
                    notes.merge(n);
                    if let Some(v) = settle(kind, d) {
                        return v;
                    }
                    at = next;
                }
            }
        }
    }
}

/// Turns a stage's decision into the pipeline's: `None` to go on.
pub fn settle(kind: StageKind, d: Decision) -> Option<Verdict> {
    match d {
        Decision::Continue => None,
        Decision::Allow => Some(Verdict::Allow),
        Decision::Block(b) => Some(Verdict::Block(kind, b)),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic, reason = "tests")]
mod tests {
    use super::*;

    struct Fixed(StageKind, Decision, bool, Option<&'static str>);
    impl Stage for Fixed {
        fn kind(&self) -> StageKind {
            self.0
        }
        fn needs(&self) -> Needs {
            Needs {
                body: self.2,
                geo: false,
            }
        }
        fn evaluate<'s>(&'s self, _: &Request<'_>, notes: &mut Notes) -> Eval<'s> {
            if let Some(l) = self.3 {
                notes.counted.push(l.into());
            }
            Eval::Done(self.1.clone())
        }
    }

    const NO_BODY: BodyPolicy = BodyPolicy {
        inspect_limit: 1024,
        oversize: OversizePolicy::Continue,
    };

    fn run(p: &Pipeline) -> (Vec<String>, Verdict) {
        let headers = http::HeaderMap::new();
        let req = Request::new("GET", "/", "", &headers, b"", None, None, None);
        let mut notes = Notes::default();
        let mut events = vec![];
        let mut at = 0;
        let mut read = false;
        let v = loop {
            match p.resume(at, read, &req, &mut notes) {
                Step::Done(v) => break v,
                Step::ReadBody { next } => {
                    events.push(format!("read body before {next}"));
                    read = true;
                    at = next;
                }
                Step::Await { .. } => panic!("no async stage here"),
            }
        };
        events.extend(notes.counted.iter().map(|c| c.to_string()));
        (events, v)
    }

    #[test]
    fn stages_run_in_pipeline_order_and_first_block_wins() {
        let p = Pipeline::new(
            vec![
                Box::new(Fixed(
                    StageKind::Rules,
                    Decision::Block(Block::new(403, "rules")),
                    false,
                    None,
                )),
                Box::new(Fixed(
                    StageKind::Ip,
                    Decision::Continue,
                    false,
                    Some("ip-count"),
                )),
                Box::new(Fixed(
                    StageKind::Geo,
                    Decision::Block(Block::new(403, "geo")),
                    false,
                    None,
                )),
            ],
            NO_BODY,
        );
        let (events, v) = run(&p);
        match v {
            Verdict::Block(StageKind::Geo, b) => assert_eq!(b.reason, "geo"),
            v => panic!("unexpected {v:?}"),
        }
        assert_eq!(events, ["ip-count"]);
    }

    #[test]
    fn the_pipeline_reads_the_body_before_the_first_stage_after_the_body_step() {
        let p = Pipeline::new(
            vec![
                Box::new(Fixed(
                    StageKind::Validate,
                    Decision::Continue,
                    true,
                    Some("validate"),
                )),
                Box::new(Fixed(
                    StageKind::Rules,
                    Decision::Continue,
                    false,
                    Some("rules"),
                )),
                Box::new(Fixed(StageKind::Ip, Decision::Continue, false, Some("ip"))),
            ],
            NO_BODY,
        );
        assert!(p.needs().body);
        let (events, v) = run(&p);
        assert_eq!(v, Verdict::Forward);
        // Counted labels are listed after the events; the read happened before index 1 (rules).
        assert_eq!(events, ["read body before 1", "ip", "rules", "validate"]);
    }

    #[test]
    fn allow_skips_the_rest_and_no_stage_needing_the_body_reads_none() {
        let p = Pipeline::new(
            vec![
                Box::new(Fixed(
                    StageKind::Validate,
                    Decision::Block(Block::new(400, "v")),
                    false,
                    None,
                )),
                Box::new(Fixed(StageKind::Ip, Decision::Allow, false, None)),
            ],
            NO_BODY,
        );
        let (events, v) = run(&p);
        assert_eq!(v, Verdict::Allow);
        assert!(events.is_empty());
        // An oversize policy of block reads (and so measures) the body at the end.
        let p = Pipeline::new(
            vec![],
            BodyPolicy {
                inspect_limit: 10,
                oversize: OversizePolicy::Block,
            },
        );
        assert_eq!(run(&p).0, ["read body before 0"]);
    }
}
