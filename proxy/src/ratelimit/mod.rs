//! Pipeline stage `ratelimit` (header phase, after ip and geo): GCRA rate limits per key,
//! local (`governor`) or fleet-wide (Redis), with standard 429 answers.
//!
//! This is the one asynchronous stage (a Redis round trip), so the pipeline runs it between
//! the synchronous header stages and the body pre-read.

pub mod key;
pub mod local;
pub mod redis;
pub mod rule;

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::metrics::Metrics;
use crate::pipeline::{Block, Decision, RequestView};
use key::build_key;
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
}

impl CompiledRateLimit {
    /// Builds the runtime state of a rule.
    pub fn new(
        rule: RateLimitRule,
        redis: Option<Arc<RedisStore>>,
        metrics: &Metrics,
    ) -> CompiledRateLimit {
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
            rule,
        }
    }

    fn applies(&self, req: &RequestView<'_>) -> bool {
        let s = &self.rule.scope;
        s.methods
            .as_ref()
            .is_none_or(|m| m.contains(&req.head.method))
            && s.path
                .as_ref()
                .is_none_or(|r| r.is_match(req.head.uri.path()))
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
                metrics
                    .ratelimit_fallback
                    .with_label_values(&[self.rule.name.as_str(), on_error_label(mode)])
                    .inc();
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

/// What the stage decided, plus headers for an allowed response.
pub struct RateLimitVerdict {
    /// The decision.
    pub decision: Decision,
    /// `RateLimit-Policy` and `RateLimit` values for allowed responses (`headers: always`).
    pub headers: Option<(String, String)>,
}

/// The rate-limit rules that apply to one route, in config order.
pub struct RateLimitStage {
    route: String,
    rules: Vec<Arc<CompiledRateLimit>>,
    metrics: Arc<Metrics>,
}

/// An asynchronous pipeline stage.
#[async_trait]
pub trait AsyncStage: Send + Sync {
    /// Evaluates one request.
    async fn evaluate(&self, req: &RequestView<'_>) -> RateLimitVerdict;
}

impl RateLimitStage {
    /// The stage for `route`, or `None` when no rule applies to it.
    pub fn for_route(
        route: &str,
        all: &[Arc<CompiledRateLimit>],
        metrics: &Arc<Metrics>,
    ) -> Option<RateLimitStage> {
        let rules: Vec<_> = all
            .iter()
            .filter(|r| r.rule.applies_to_route(route))
            .cloned()
            .collect();
        (!rules.is_empty()).then(|| RateLimitStage {
            route: route.to_string(),
            rules,
            metrics: Arc::clone(metrics),
        })
    }

    /// Whether any rule keys on the client's country or ASN.
    pub fn needs_geo(&self) -> bool {
        self.rules
            .iter()
            .any(|r| r.rule.key.iter().any(|k| k.needs_geo()))
    }
}

#[async_trait]
impl AsyncStage for RateLimitStage {
    async fn evaluate(&self, req: &RequestView<'_>) -> RateLimitVerdict {
        let mut key = String::with_capacity(64);
        let mut headers: Option<(u32, String, String)> = None;
        let mut counted: Option<Cow<'static, str>> = None;
        for r in &self.rules {
            if !r.applies(req) || !build_key(&r.rule.key, &self.route, req, &mut key) {
                continue;
            }
            let outcome = match r.check(&key, &self.metrics).await {
                Ok(Some(o)) => o,
                Ok(None) => continue, // Redis down, fail open
                Err(()) => {
                    r.limited.inc();
                    return RateLimitVerdict {
                        decision: Decision::Block(Block {
                            status: 503,
                            reason: "rate_limit_unavailable".into(),
                            headers: vec![("retry-after", "1".into())],
                            details: None,
                        }),
                        headers: None,
                    };
                }
            };
            match outcome {
                Outcome::Allowed { remaining, reset } => {
                    if r.rule.headers_always
                        && headers.as_ref().is_none_or(|(rem, _, _)| remaining < *rem)
                    {
                        headers = Some((
                            remaining,
                            r.policy_header.clone(),
                            state_header(&r.rule.name, remaining, reset),
                        ));
                    }
                }
                Outcome::Limited { retry_after } => match r.rule.action {
                    RateLimitAction::Count => {
                        r.counted.inc();
                        counted.get_or_insert_with(|| format!("ratelimit:{}", r.rule.name).into());
                    }
                    RateLimitAction::Block => {
                        r.limited.inc();
                        return RateLimitVerdict {
                            decision: Decision::Block(Block {
                                status: 429,
                                reason: "rate_limited".into(),
                                headers: vec![
                                    ("retry-after", ceil_secs(retry_after).max(1).to_string()),
                                    ("ratelimit-policy", r.policy_header.clone()),
                                    ("ratelimit", state_header(&r.rule.name, 0, retry_after)),
                                ],
                                details: None,
                            }),
                            headers: None,
                        };
                    }
                },
            }
        }
        RateLimitVerdict {
            decision: counted.map_or(Decision::Continue, Decision::Count),
            headers: headers.map(|(_, p, s)| (p, s)),
        }
    }
}

/// Background service: sweeps stale keys from every local limiter, publishes key counts.
pub struct Sweeper {
    rules: Vec<Arc<CompiledRateLimit>>,
    metrics: Arc<Metrics>,
    interval: Duration,
}

impl Sweeper {
    /// A sweeper over `rules`, running a full sweep every `interval` (and sooner for a limiter
    /// whose key cap was reached).
    pub fn new(
        rules: Vec<Arc<CompiledRateLimit>>,
        metrics: Arc<Metrics>,
        interval: Duration,
    ) -> Sweeper {
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
            for r in &self.rules {
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
