//! Pipeline stage `ratelimit` (header phase, after ip and geo): GCRA rate limits per key,
//! local (`governor`) or fleet-wide (Redis), with standard 429 answers.
//!
//! The one stage that may wait (a Redis round trip): keys are built synchronously from the
//! request model, then, when a Redis rule applies, the pipeline awaits the checks.

pub mod key;
pub mod local;
pub mod redis;
pub mod rule;

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::metrics::Metrics;
use crate::pipeline::{Block, Decision, Eval, Needs, Notes, Stage, StageKind};
use crate::request::Request;
use key::{build_key, key_count, KeyPart};
use local::{LocalLimiter, Outcome};
use redis::RedisStore;
use rule::{RateLimitAction, RateLimitRule, RateLimitStore, RedisOnError};

/// A rule with its runtime state (shared by every route it applies to).
pub struct CompiledRateLimit {
    /// The rule.
    pub rule: RateLimitRule,
    /// Local limiter: the store for `store: local`, the fallback for `store: redis`.
    pub local: LocalLimiter,
    redis: Option<Arc<RedisStore>>,
    policy_header: String,
    /// Metric handles: limited (blocked) and counted (dry run) requests.
    limited: prometheus::IntCounter,
    counted: prometheus::IntCounter,
    fallback: prometheus::IntCounter,
}

impl CompiledRateLimit {
    /// Builds the runtime state of a rule.
    pub fn new(
        rule: RateLimitRule,
        redis: Option<Arc<RedisStore>>,
        metrics: &Metrics,
    ) -> CompiledRateLimit {
        let mode = redis
            .as_ref()
            .map_or(RedisOnError::Local, |r| r.settings().on_error);
        CompiledRateLimit {
            local: LocalLimiter::new(&rule),
            redis: if rule.store == RateLimitStore::Redis {
                redis
            } else {
                None
            },
            policy_header: rule.policy_header(),
            limited: metrics
                .ratelimit_limited
                .with_label_values(&[rule.name.as_str(), "block"]),
            counted: metrics
                .ratelimit_limited
                .with_label_values(&[rule.name.as_str(), "count"]),
            fallback: metrics
                .ratelimit_fallback
                .with_label_values(&[rule.name.as_str(), on_error_label(mode)]),
            rule,
        }
    }

    fn applies(&self, req: &Request<'_>) -> bool {
        let s = &self.rule.scope;
        s.methods
            .as_ref()
            .is_none_or(|m| m.iter().any(|m| m.as_str() == req.method))
            && s.path.as_ref().is_none_or(|r| r.0.is_match(req.path()))
    }

    /// Whether two rules are the same rule with the same settings, so that a reload can keep
    /// the state of the old one (its buckets) for the new snapshot.
    pub fn same_rule(&self, rule: &RateLimitRule, redis: Option<&Arc<RedisStore>>) -> bool {
        self.rule == *rule
            && match (&self.redis, redis) {
                (None, _) if rule.store == RateLimitStore::Local => true,
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                _ => false,
            }
    }

    /// `Ok(None)`: not counted (Redis down, fail open); `Err(())`: Redis down, fail closed.
    async fn check(&self, key: &str, metrics: &Metrics) -> Result<Option<Outcome>, ()> {
        let Some(redis) = &self.redis else {
            return Ok(Some(self.local.check(key)));
        };
        let bucket = format!("palisade:rl:{}:{}", self.rule.name, key);
        match redis
            .check(&bucket, self.rule.rate.interval(), self.rule.burst, metrics)
            .await
        {
            Ok(o) => Ok(Some(o)),
            Err(_) => {
                let mode = redis.settings().on_error;
                self.fallback.inc();
                match mode {
                    RedisOnError::Local => Ok(Some(self.local.check(key))),
                    RedisOnError::Allow => Ok(None),
                    RedisOnError::Block => Err(()),
                }
            }
        }
    }
}

fn on_error_label(m: RedisOnError) -> &'static str {
    match m {
        RedisOnError::Local => "local",
        RedisOnError::Allow => "allow",
        RedisOnError::Block => "block",
    }
}

/// `RateLimit` header value (draft-ietf-httpapi-ratelimit-headers): `"name";r=R;t=T`.
fn state_header(name: &str, remaining: u32, reset: Duration) -> String {
    format!("\"{name}\";r={remaining};t={}", ceil_secs(reset))
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// The rate-limit rules that apply to one route, in config order.
pub struct RateLimitStage {
    /// [`StageKind::RateLimit`], or [`StageKind::McpRateLimit`] for rules whose keys need
    /// the body.
    kind: StageKind,
    route: String,
    rules: Vec<Arc<CompiledRateLimit>>,
    metrics: Arc<Metrics>,
    any_redis: bool,
    /// Record limited keys (hashed) for the decision log.
    evidence: bool,
}

/// Where evaluation of a route's rules stands.
#[derive(Default)]
struct Tally {
    /// Lowest `remaining` among `headers: always` rules, with its header values.
    headers: Option<(u32, String, String)>,
    counted: Option<Cow<'static, str>>,
    /// Limited rules with their key hashes (when recording evidence).
    matches: Vec<crate::pipeline::MatchNote>,
    evidence: bool,
}

/// The first 16 hex digits of the SHA-256 of a rate-limit key.
fn key_hash(key: &str) -> String {
    use sha2::Digest as _;
    let d = sha2::Sha256::digest(key.as_bytes());
    d.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

impl Tally {
    /// Applies one rule's outcome; `Some` when the request is blocked.
    fn apply(&mut self, r: &CompiledRateLimit, outcome: Outcome, key: &str) -> Option<Decision> {
        if self.evidence && matches!(outcome, Outcome::Limited { .. }) {
            self.matches.push(crate::pipeline::MatchNote {
                kind: "rate_limit",
                set: String::new(),
                rule: r.rule.name.clone(),
                action: match r.rule.action {
                    RateLimitAction::Count => "count",
                    RateLimitAction::Block => "block",
                },
                field: String::new(),
                transforms: Vec::new(),
                snippet: String::new(),
                key_hash: key_hash(key),
            });
        }
        match outcome {
            Outcome::Allowed { remaining, reset } => {
                if r.rule.headers_always
                    && self
                        .headers
                        .as_ref()
                        .is_none_or(|(rem, _, _)| remaining < *rem)
                {
                    self.headers = Some((
                        remaining,
                        r.policy_header.clone(),
                        state_header(&r.rule.name, remaining, reset),
                    ));
                }
                None
            }
            Outcome::Limited { retry_after } => match r.rule.action {
                RateLimitAction::Count => {
                    r.counted.inc();
                    self.counted
                        .get_or_insert_with(|| format!("ratelimit:{}", r.rule.name).into());
                    None
                }
                RateLimitAction::Block => {
                    r.limited.inc();
                    let mut b = Block::new(429, "rate_limited");
                    b.headers = vec![
                        ("retry-after", ceil_secs(retry_after).max(1).to_string()),
                        ("ratelimit-policy", r.policy_header.clone()),
                        ("ratelimit", state_header(&r.rule.name, 0, retry_after)),
                    ];
                    Some(Decision::Block(b))
                }
            },
        }
    }

    fn finish(self, notes: &mut Notes) -> Decision {
        notes.matches.extend(self.matches);
        if let Some(c) = self.counted {
            notes.counted.push(c);
        }
        if let Some((_, policy, state)) = self.headers {
            notes.response_headers.push(("ratelimit-policy", policy));
            notes.response_headers.push(("ratelimit", state));
        }
        Decision::Continue
    }
}

fn unavailable(r: &CompiledRateLimit) -> Decision {
    r.limited.inc();
    let mut b = Block::new(503, "rate_limit_unavailable");
    b.headers.push(("retry-after", "1".into()));
    Decision::Block(b)
}

impl RateLimitStage {
    /// The stage for `route`, or `None` when no rule applies to it: the rules whose keys
    /// need the body (`mcp.tool`, `mcp.method`) when `body` is set, the others otherwise.
    pub fn for_route(
        route: &str,
        all: &[Arc<CompiledRateLimit>],
        metrics: &Arc<Metrics>,
        body: bool,
    ) -> Option<RateLimitStage> {
        let rules: Vec<_> = all
            .iter()
            .filter(|r| r.rule.applies_to_route(route))
            .filter(|r| r.rule.key.iter().any(KeyPart::needs_body) == body)
            .cloned()
            .collect();
        let any_redis = rules.iter().any(|r| r.redis.is_some());
        (!rules.is_empty()).then(|| RateLimitStage {
            kind: if body {
                StageKind::McpRateLimit
            } else {
                StageKind::RateLimit
            },
            route: route.to_string(),
            rules,
            metrics: Arc::clone(metrics),
            any_redis,
            evidence: false,
        })
    }

    /// Records limited keys, hashed, for the decision log.
    pub fn with_evidence(mut self, on: bool) -> RateLimitStage {
        self.evidence = on;
        self
    }
}

impl Stage for RateLimitStage {
    fn kind(&self) -> StageKind {
        self.kind
    }

    fn needs(&self) -> Needs {
        Needs {
            body: self.kind == StageKind::McpRateLimit,
            geo: self
                .rules
                .iter()
                .any(|r| r.rule.key.iter().any(|k| k.needs_geo())),
        }
    }

    fn evaluate<'s>(&'s self, req: &Request<'_>, notes: &mut Notes) -> Eval<'s> {
        if !self.any_redis {
            // Local limiters only: decided now, one key buffer for all rules.
            let mut key = String::with_capacity(64);
            let mut tally = Tally {
                evidence: self.evidence,
                ..Tally::default()
            };
            for r in &self.rules {
                if !r.applies(req) {
                    continue;
                }
                for i in 0..key_count(&r.rule.key, req) {
                    if !build_key(&r.rule.key, &self.route, req, i, &mut key) {
                        continue;
                    }
                    if let Some(d) = tally.apply(r, r.local.check(&key), &key) {
                        notes.matches.extend(tally.matches);
                        return Eval::Done(d);
                    }
                }
            }
            return Eval::Done(tally.finish(notes));
        }
        // Some rule asks Redis: build every key now (the request model is not shared across
        // the wait), then check them in order.
        let mut keys: Vec<(&'s CompiledRateLimit, String)> = Vec::with_capacity(self.rules.len());
        for r in self.rules.iter().filter(|r| r.applies(req)) {
            for i in 0..key_count(&r.rule.key, req) {
                let mut key = String::new();
                if build_key(&r.rule.key, &self.route, req, i, &mut key) {
                    keys.push((r, key));
                }
            }
        }
        let evidence = self.evidence;
        Eval::Pending(Box::pin(async move {
            let mut tally = Tally {
                evidence,
                ..Tally::default()
            };
            for (r, key) in keys {
                match r.check(&key, &self.metrics).await {
                    Ok(Some(o)) => {
                        if let Some(d) = tally.apply(r, o, &key) {
                            let notes = Notes {
                                matches: tally.matches,
                                ..Notes::default()
                            };
                            return (d, notes);
                        }
                    }
                    Ok(None) => {} // Redis down, fail open
                    Err(()) => return (unavailable(r), Notes::default()),
                }
            }
            let mut notes = Notes::default();
            let d = tally.finish(&mut notes);
            (d, notes)
        }))
    }
}

/// The rate-limit rules in force now (they change with each reload).
pub type RuleSource = Arc<dyn Fn() -> Vec<Arc<CompiledRateLimit>> + Send + Sync>;

/// Background service: sweeps stale keys from every local limiter, publishes key counts.
pub struct Sweeper {
    rules: RuleSource,
    metrics: Arc<Metrics>,
    interval: Duration,
}

impl Sweeper {
    /// A sweeper over the rules `rules` returns at each tick, running a full sweep every
    /// `interval` (and sooner for a limiter whose key cap was reached).
    pub fn new(rules: RuleSource, metrics: Arc<Metrics>, interval: Duration) -> Sweeper {
        Sweeper {
            rules,
            metrics,
            interval,
        }
    }
}

#[async_trait]
impl pingora::services::background::BackgroundService for Sweeper {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        let tick = Duration::from_millis(250);
        let mut since_full = Duration::ZERO;
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(tick) => {}
            }
            since_full += tick;
            let full = since_full >= self.interval;
            if full {
                since_full = Duration::ZERO;
            }
            for r in (self.rules)() {
                if full || r.local.sweep_requested() {
                    let n = r.local.sweep();
                    self.metrics
                        .ratelimit_keys
                        .with_label_values(&[r.rule.name.as_str()])
                        .set(n as i64);
                }
            }
        }
    }
}
