//! Step 4 of parse → check → compile → snapshot → swap: the immutable, compiled runtime form
//! of a configuration. The proxy holds it behind an `ArcSwap`; `new_ctx()` loads it once so
//! every phase of a request sees the same snapshot from start to end, and a reload builds a
//! new one off the request path (`crate::compile`) and swaps it whole (`crate::server::reload`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use crate::config::{Config, HostMatch};
use crate::identity::client_ip::ClientIpResolver;
use crate::identity::geo::GeoDb;
use crate::identity::ipset::IpSet;
use crate::metrics::RouteMetrics;
use crate::pipeline::Pipeline;
use crate::ratelimit::redis::RedisStore;
use crate::ratelimit::CompiledRateLimit;
use crate::rules::compile::CompiledRuleSet;
use crate::rules::eval::AttachedRuleSet;
use crate::schema::RouteValidation;
use crate::upstream::UpstreamGroup;

/// A route compiled for the request path.
pub struct CompiledRoute {
    /// Route name (logs, metrics).
    pub name: String,
    host: HostMatch,
    prefix: String,
    /// Index into [`Snapshot::upstreams`].
    pub upstream: usize,
    /// Which path the backend receives.
    pub forward_path: crate::config::file::ForwardPath,
    /// The inspection stages, in pipeline order, with the body step.
    pub pipeline: Pipeline,
    /// Pre-resolved metric handles (no label hashing per request).
    pub metrics: RouteMetrics,
    /// The rule sets attached (`palisade explain`).
    pub rulesets: Vec<AttachedRuleSet>,
    /// The route's request validation (`palisade explain`, `palisade check`).
    pub validation: Option<Arc<RouteValidation>>,
    /// The route's MCP settings (JSON-RPC bodies, `tools/list` filtering, metadata).
    pub mcp: Option<Arc<crate::mcp::McpRoute>>,
    /// The route's Cedar authorization (`palisade explain`, benchmarks).
    pub authz: Option<Arc<crate::authz::RouteAuthz>>,
}

impl CompiledRoute {
    /// Builds a route.
    pub fn new(
        route: &crate::config::Route,
        pipeline: Pipeline,
        metrics: RouteMetrics,
        rulesets: Vec<AttachedRuleSet>,
        validation: Option<Arc<RouteValidation>>,
        mcp: Option<Arc<crate::mcp::McpRoute>>,
        authz: Option<Arc<crate::authz::RouteAuthz>>,
    ) -> CompiledRoute {
        CompiledRoute {
            name: route.name.clone(),
            host: route.host.clone(),
            prefix: route.path_prefix.clone(),
            upstream: route.upstream,
            forward_path: route.policy.forward_path,
            pipeline,
            metrics,
            rulesets,
            validation,
            mcp,
            authz,
        }
    }

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

/// A file a snapshot was built from, with the hash of the content that was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceFile {
    /// Its path.
    pub path: PathBuf,
    /// What it is: `config`, `ruleset`, `schema`, `ip_list`, `geoip`, `ruleset_dir`, `tls`.
    pub kind: &'static str,
    /// Content hash (FNV-1a 64; for a directory, of its sorted entry names).
    pub hash: String,
}

/// The compiled configuration.
pub struct Snapshot {
    /// 1 for the start-up load, then +1 for each successful reload.
    pub generation: u64,
    /// The checked configuration it was built from.
    pub config: Arc<Config>,
    /// Routes, in config order, with their matching order.
    pub routes: RouteTable,
    /// Upstream groups, as in [`Config::upstreams`].
    pub upstreams: Vec<Arc<UpstreamGroup>>,
    /// Client IP resolution.
    pub client_ip: ClientIpResolver,
    /// Geo databases.
    pub geo: Option<Arc<GeoDb>>,
    /// Named IP sets.
    pub ip_sets: BTreeMap<String, Arc<IpSet>>,
    /// Loaded rule sets by name.
    pub rule_sets: BTreeMap<String, Arc<CompiledRuleSet>>,
    /// Rate-limit rules with their state (kept across reloads when unchanged).
    pub rate_limits: Vec<Arc<CompiledRateLimit>>,
    /// The Redis store (kept across reloads when its settings are unchanged).
    pub redis: Option<Arc<RedisStore>>,
    /// Every file read to build it.
    pub sources: Vec<SourceFile>,
    /// Where the demo backend listens, if one runs.
    pub demo_addr: Option<SocketAddr>,
    /// Per client listener (config order), its certificates when it terminates TLS.
    pub tls: Vec<Option<Arc<crate::tls::TlsListener>>>,
    /// Token issuers by name (their keys; fetched JWKS are refreshed in the background).
    pub issuers: std::collections::BTreeMap<String, Arc<crate::auth::Issuer>>,
}

/// Routes in config order (index them like a slice), and the order they are matched in.
pub struct RouteTable {
    routes: Vec<CompiledRoute>,
    /// Route indices, most specific first: exact host, then wildcard (longer first), then any;
    /// within each, longest prefix first. Matching takes the first hit: O(routes).
    order: Vec<usize>,
}

impl RouteTable {
    /// Orders `routes` for matching.
    pub fn new(routes: Vec<CompiledRoute>) -> RouteTable {
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
        RouteTable { routes, order }
    }
}

impl std::ops::Deref for RouteTable {
    type Target = [CompiledRoute];
    fn deref(&self) -> &[CompiledRoute] {
        &self.routes
    }
}

impl Snapshot {
    /// The protected-resource metadata (RFC 9728) served at `path`: the document of the MCP
    /// route whose resource it names, or at the bare well-known path the only one.
    pub fn protected_resource_metadata(&self, path: &str) -> Option<&[u8]> {
        let mut all = self
            .routes
            .iter()
            .filter_map(|r| r.mcp.as_ref()?.metadata.as_ref());
        if let Some(m) = all.clone().find(|m| m.path == path) {
            return Some(&m.document);
        }
        let only = all.next().filter(|_| all.next().is_none())?;
        (path.trim_end_matches('/') == "/.well-known/oauth-protected-resource")
            .then_some(&only.document[..])
    }

    /// Finds the route for a host (lower-case, without port) and path.
    pub fn route_for(&self, host: &str, path: &str) -> Option<usize> {
        let t = &self.routes;
        t.order
            .iter()
            .copied()
            .find(|&i| t.routes[i].matches(host, path))
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
