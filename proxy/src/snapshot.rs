//! The immutable, compiled runtime form of a configuration: routes with their pipelines,
//! upstream groups and per-route metric handles. The proxy holds it behind an `ArcSwap`;
//! `new_ctx()` loads it once so every phase of a request sees the same snapshot, and a reload
//! builds a new one off the request path and swaps it whole.

use std::sync::Arc;

use crate::config::{Config, HostMatch, OversizePolicy};
use crate::metrics::{Metrics, RouteMetrics};
use crate::pipeline::Pipeline;
use crate::ratelimit::{CompiledRateLimit, RateLimitStage};
use crate::rules::RulesStage;
use crate::schema::ValidateStage;
use crate::server::upstreams::UpstreamGroup;

/// A route compiled for the request path.
pub struct CompiledRoute {
    /// Route name (logs, metrics).
    pub name: String,
    host: HostMatch,
    prefix: String,
    /// Index into [`Snapshot::upstreams`].
    pub upstream: usize,
    /// The inspection stages.
    pub pipeline: Pipeline,
    /// Body inspection limit in bytes.
    pub inspect_limit: usize,
    /// What to do with bodies over the limit.
    pub oversize: OversizePolicy,
    /// Pre-resolved metric handles (no label hashing per request).
    pub metrics: RouteMetrics,
    /// Whether the client's country/ASN must be looked up for this route.
    pub needs_geo: bool,
    /// The rate-limit rules that apply to this route (the asynchronous stage).
    pub rate_limit: Option<RateLimitStage>,
}

impl CompiledRoute {
    fn matches(&self, host: &str, path: &str) -> bool {
        let host_ok = match &self.host {
            HostMatch::Any => true,
            HostMatch::Exact(h) => host.eq_ignore_ascii_case(h),
            HostMatch::Suffix(s) => {
                host.len() > s.len()
                    && host.is_char_boundary(host.len() - s.len())
                    && host[host.len() - s.len()..].eq_ignore_ascii_case(s)
            }
        };
        host_ok && prefix_matches(&self.prefix, path)
    }
}

/// Segment-aware prefix match: `/api` matches `/api`, `/api/x` and `/api?q`, not `/apix`.
/// A prefix ending in `/` matches plainly.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        None => false,
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
    }
}

/// The compiled configuration.
pub struct Snapshot {
    /// The validated configuration it was built from.
    pub config: Arc<Config>,
    /// Routes, in config order.
    pub routes: Vec<CompiledRoute>,
    /// Route indices, most specific first: exact host, then wildcard (longer first), then any;
    /// within each, longest prefix first. Matching takes the first hit: O(routes).
    order: Vec<usize>,
    /// Upstream groups, as in [`Config::upstreams`].
    pub upstreams: Vec<Arc<UpstreamGroup>>,
}

impl Snapshot {
    /// Compiles a validated config with already-built upstream groups.
    pub fn build(
        config: Arc<Config>,
        upstreams: Vec<Arc<UpstreamGroup>>,
        rate_limits: &[Arc<CompiledRateLimit>],
        metrics: &Arc<Metrics>,
    ) -> Snapshot {
        let routes: Vec<CompiledRoute> = config
            .routes
            .iter()
            .map(|r| {
                let rate_limit = RateLimitStage::for_route(&r.name, rate_limits, metrics);
                let rules = RulesStage::new(r.policy.rulesets.clone());
                let rules_need_geo = rules.as_ref().is_some_and(RulesStage::needs_geo);
                let validate = r.policy.validation.as_ref().map(|v| {
                    ValidateStage::new(Arc::clone(v), &r.name, metrics.validation_failures.clone())
                });
                CompiledRoute {
                    name: r.name.clone(),
                    host: r.host.clone(),
                    prefix: r.path_prefix.clone(),
                    upstream: r.upstream,
                    pipeline: Pipeline::for_route(&r.policy, rules, validate),
                    inspect_limit: r.policy.inspect_limit,
                    oversize: r.policy.oversize,
                    metrics: metrics.route(&r.name),
                    needs_geo: r.policy.geo.is_some()
                        || r.policy.asn.is_some()
                        || rules_need_geo
                        || rate_limit.as_ref().is_some_and(RateLimitStage::needs_geo),
                    rate_limit,
                }
            })
            .collect();
        let mut order: Vec<usize> = (0..routes.len()).collect();
        order.sort_by_key(|&i| {
            let r = &routes[i];
            let host_rank = match &r.host {
                HostMatch::Exact(_) => (0, 0),
                HostMatch::Suffix(s) => (1, usize::MAX - s.len()),
                HostMatch::Any => (2, 0),
            };
            (host_rank, usize::MAX - r.prefix.len())
        });
        Snapshot {
            config,
            routes,
            order,
            upstreams,
        }
    }

    /// Finds the route for a host (lower-case, without port) and path.
    pub fn route_for(&self, host: &str, path: &str) -> Option<usize> {
        self.order
            .iter()
            .copied()
            .find(|&i| self.routes[i].matches(host, path))
    }
}

#[cfg(test)]
mod tests {
    use super::prefix_matches;

    #[test]
    fn prefix_is_segment_aware() {
        assert!(prefix_matches("/api", "/api"));
        assert!(prefix_matches("/api", "/api/users"));
        assert!(!prefix_matches("/api", "/apix"));
        assert!(prefix_matches("/api/", "/api/x"));
        assert!(prefix_matches("/", "/anything"));
        assert!(!prefix_matches("/api", "/"));
    }
}
