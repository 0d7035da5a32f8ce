//! Config step 2 (validate): cross-field checks and defaults, turning [`FileConfig`] into
//! [`Config`]. Every problem is collected with its location so one run reports them all.

use std::collections::{BTreeMap, HashSet};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_saphyr::{Location, Spanned};

use super::file::{
    AsnPolicyConfig, BodyConfig, ClientIpConfig, FileConfig, GeoIpConfig, GeoPolicyConfig,
    HealthCheckKind, IpPolicyConfig, IpSetConfig, OversizePolicy, UnknownPolicy, UpstreamConfig,
};
use super::file::{
    RateLimitConfig, RateLimitHeadersConfig, RateLimitStoreConfig, RedisConfig, RedisOnErrorConfig,
    RuleActionConfig,
};
use super::{AsnPolicy, GeoPolicy, IpPolicy, ListMode};
use super::{
    Config, ConfigError, ConfigIssue, HealthCheck, HostMatch, Listener, Overrides, PassiveHealth,
    Route, RoutePolicy, Timeouts, Upstream, UpstreamTargets, MAX_INSPECT_LIMIT,
};
use crate::identity::client_ip::{ClientIpResolver, ForwardedHeader};
use crate::identity::geo::{CountryCode, GeoDb};
use crate::identity::ipset::{parse_cidr, IpSet, IpSetBuilder};
use crate::ratelimit::key::KeyPart;
use crate::ratelimit::rule::{
    Rate, RateLimitAction, RateLimitRule, RateLimitScope, RateLimitStore, RedisOnError,
    RedisSettings, RedisTarget,
};
use crate::rules::compile::CompiledRuleSet;
use crate::rules::eval::{AttachedRuleSet, ExclusionTarget};

/// Default body inspection limit (64 KiB).
const DEFAULT_INSPECT_LIMIT: u64 = 64 * 1024;
/// Name of the upstream created by `--upstream`.
const CLI_UPSTREAM: &str = "cli-upstream";

struct Issues(Vec<ConfigIssue>);

impl Issues {
    fn at(&mut self, loc: &Location, message: String) {
        self.0.push(ConfigIssue {
            line: loc.line(),
            column: loc.column(),
            message,
        });
    }
    fn global(&mut self, message: String) {
        self.0.push(ConfigIssue {
            line: 0,
            column: 0,
            message,
        });
    }
}

/// Validates parsed config shapes, applies command-line overrides and fills defaults.
pub fn validate(
    source_name: &str,
    file: FileConfig,
    overrides: &Overrides,
    base_dir: &Path,
) -> Result<Config, ConfigError> {
    let mut issues = Issues(Vec::new());

    let ip_sets = ip_sets(&file.ip_sets, base_dir, &mut issues);
    let client_ip = client_ip(file.client_ip.as_ref(), &ip_sets, &mut issues);
    let geo = geo_db(file.geoip.as_ref(), base_dir, &mut issues);
    let redis = file
        .redis
        .as_ref()
        .and_then(|r| redis_settings(r, &mut issues));
    let rule_sets = rule_sets(&file.rulesets, base_dir, &ip_sets, &mut issues);
    // Schema documents are read once per load, whichever routes refer to them.
    let schema_store = crate::schema::DocumentStore::new();

    let listeners: Vec<Listener> = if overrides.listen.is_empty() {
        file.listeners
            .iter()
            .map(|l| Listener { address: l.address })
            .collect()
    } else {
        overrides
            .listen
            .iter()
            .map(|a| Listener { address: *a })
            .collect()
    };
    if listeners.is_empty() {
        issues.global(
            "no listener: add `listeners: [{address: \"127.0.0.1:8080\"}]` or pass --listen".into(),
        );
    }
    let admin = overrides.admin.unwrap_or(file.admin.address);
    if listeners.iter().any(|l| l.address == admin) {
        issues.global(format!(
            "the admin listener {admin} is also a client listener: give it its own port"
        ));
    }

    let threads = match overrides.threads.or(file.threads) {
        None | Some(0) => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        Some(n) => n,
    };

    let t = &file.timeouts;
    let d = Timeouts::default();
    let pick = |v: &Option<super::file::HumanDuration>, default: Duration| {
        v.map(|h| h.0).unwrap_or(default)
    };
    let timeouts = Timeouts {
        client_read: pick(&t.client_read, d.client_read),
        client_write: pick(&t.client_write, d.client_write),
        client_keepalive: pick(&t.client_keepalive, d.client_keepalive),
        upstream_connect: pick(&t.upstream_connect, d.upstream_connect),
        upstream_read: pick(&t.upstream_read, d.upstream_read),
        upstream_write: pick(&t.upstream_write, d.upstream_write),
        upstream_idle: pick(&t.upstream_idle, d.upstream_idle),
    };
    for (name, v) in [
        ("client_read", timeouts.client_read),
        ("client_write", timeouts.client_write),
        ("upstream_connect", timeouts.upstream_connect),
        ("upstream_read", timeouts.upstream_read),
        ("upstream_write", timeouts.upstream_write),
    ] {
        if v.is_zero() {
            issues.global(format!(
                "timeouts.{name} is zero: every request would time out; use e.g. `5s`"
            ));
        }
    }

    let default_body = body_settings(&file.body, None, &mut issues);

    // Upstreams: index by name in file order (BTreeMap: sorted by name).
    let mut upstreams: Vec<Upstream> = Vec::new();
    for (name, up) in &file.upstreams {
        upstreams.push(upstream(name, up, &mut issues));
    }
    if let Some(url) = &overrides.upstream {
        match parse_upstream_url(url) {
            Ok(addrs) => upstreams.push(Upstream {
                name: CLI_UPSTREAM.into(),
                targets: UpstreamTargets::Servers(addrs),
                host_header: None,
                health_check: None,
                passive: PassiveHealth::default(),
            }),
            Err(m) => issues.global(format!("--upstream {url:?}: {m}")),
        }
    }

    let mut routes = Vec::new();
    let mut names = HashSet::new();
    let mut keys = HashSet::new();
    for r in &file.routes {
        let name = r.name.value.clone();
        if name.is_empty() {
            issues.at(&r.name.referenced, "route name is empty".into());
        }
        if !names.insert(name.clone()) {
            issues.at(
                &r.name.referenced,
                format!("duplicate route name {name:?}: route names must be unique"),
            );
        }
        let host = match r.host.as_deref() {
            None | Some("") | Some("*") => HostMatch::Any,
            Some(h) => {
                let h = h.to_ascii_lowercase();
                match h.strip_prefix("*.") {
                    Some(rest) if !rest.is_empty() && !rest.contains('*') => {
                        HostMatch::Suffix(format!(".{rest}"))
                    }
                    _ if h.contains('*') || h.contains('/') || h.contains(' ') => {
                        issues.at(
                            &r.name.referenced,
                            format!(
                                "route {name:?}: host {h:?} is not valid; use an exact host \
                                 (`api.example.com`) or a leading wildcard (`*.example.com`)"
                            ),
                        );
                        HostMatch::Any
                    }
                    _ => HostMatch::Exact(h),
                }
            }
        };
        let path_prefix = r.path_prefix.clone().unwrap_or_else(|| "/".into());
        if !path_prefix.starts_with('/') {
            issues.at(
                &r.name.referenced,
                format!("route {name:?}: path_prefix {path_prefix:?} must start with `/`"),
            );
        }
        if !keys.insert((host.clone(), path_prefix.clone())) {
            issues.at(
                &r.name.referenced,
                format!(
                    "route {name:?}: another route already matches the same host and \
                     path_prefix {path_prefix:?}; one of them could never be used"
                ),
            );
        }
        let upstream = if overrides.upstream.is_some() {
            upstreams.len().saturating_sub(1)
        } else {
            match upstreams.iter().position(|u| u.name == r.upstream.value) {
                Some(i) => i,
                None => {
                    let known: Vec<&str> = upstreams.iter().map(|u| u.name.as_str()).collect();
                    issues.at(
                        &r.upstream.referenced,
                        format!(
                            "route {name:?}: unknown upstream {:?}; defined upstreams: [{}]",
                            r.upstream.value,
                            known.join(", ")
                        ),
                    );
                    0
                }
            }
        };
        let p = &r.policy;
        let (inspect_limit, oversize) = body_settings(
            p.body.as_ref().unwrap_or(&BodyConfig::default()),
            Some(default_body),
            &mut issues,
        );
        let ip =
            p.ip.as_ref()
                .map(|c| ip_policy(&name, c, &ip_sets, &mut issues));
        let geo_policy = p
            .geo
            .as_ref()
            .and_then(|c| geo_policy(&name, &r.name.referenced, c, geo.as_deref(), &mut issues));
        let attached = attach_rulesets(&name, p, &rule_sets, &mut issues);
        let asn = p
            .asn
            .as_ref()
            .and_then(|c| asn_policy(&name, &r.name.referenced, c, geo.as_deref(), &mut issues));
        let validation = p.validate.as_ref().and_then(|c| {
            validation(
                &name,
                &r.name.referenced,
                c,
                inspect_limit,
                base_dir,
                &schema_store,
                &mut issues,
            )
        });
        if let Some(v) = &validation {
            let outside = v.outside_prefix(&path_prefix);
            if let Some(first) = outside.first() {
                issues.at(
                    &r.name.referenced,
                    format!(
                        "route {name:?}: {} validated operation(s) can never match under \
                         path_prefix {path_prefix:?} (first: {first}); operation paths are full \
                         request paths: set validate.base_path for an OpenAPI document or fix \
                         the paths",
                        outside.len()
                    ),
                );
            }
        }
        routes.push(Route {
            name,
            host,
            path_prefix,
            upstream,
            policy: RoutePolicy {
                methods: p
                    .methods
                    .as_ref()
                    .map(|m| m.iter().map(|m| m.0.clone()).collect()),
                deny: p.deny.as_ref().map(|d| {
                    (
                        d.status.map(|s| s.0).unwrap_or(403),
                        d.reason.clone().unwrap_or_else(|| "route_denied".into()),
                    )
                }),
                inspect_limit,
                oversize,
                ip,
                geo: geo_policy,
                asn,
                rulesets: attached,
                validation,
            },
        });
    }
    let rate_limits = rate_limits(
        &file.rate_limits,
        &routes,
        redis.is_some(),
        geo.as_deref(),
        &mut issues,
    );
    if routes.is_empty() {
        issues.global(
            "no route: add `routes: [{name: default, upstream: <name>}]` so requests go somewhere"
                .into(),
        );
    }

    // With --upstream, file upstreams that no route uses any more are dropped so that neither
    // the demo backend nor their health checks start for nothing.
    if overrides.upstream.is_some() {
        let keep = upstreams.len().saturating_sub(1);
        upstreams.drain(..keep);
        for r in &mut routes {
            r.upstream = 0;
        }
    }

    if !issues.0.is_empty() {
        issues.0.sort_by_key(|i| (i.line == 0, i.line, i.column));
        return Err(ConfigError {
            source_name: source_name.to_string(),
            issues: issues.0,
        });
    }
    Ok(Config {
        source: source_name.to_string(),
        listeners,
        admin,
        h2c: file.h2c,
        threads,
        log_format: file.logging.format,
        log_level: file.logging.level.unwrap_or_else(|| "info".into()),
        timeouts,
        upstreams,
        routes,
        ip_sets,
        client_ip,
        geo,
        rate_limits,
        redis,
        rule_sets,
    })
}

fn rule_sets(
    paths: &[Spanned<String>],
    base_dir: &Path,
    ip_sets: &BTreeMap<String, Arc<IpSet>>,
    issues: &mut Issues,
) -> BTreeMap<String, Arc<CompiledRuleSet>> {
    let mut out: BTreeMap<String, Arc<CompiledRuleSet>> = BTreeMap::new();
    for p in paths {
        let loaded = if p.value == crate::rules::managed::BUILTIN_MANAGED {
            crate::rules::compile::load_managed(ip_sets)
        } else if p.value.starts_with("builtin:") {
            issues.at(
                &p.referenced,
                format!(
                    "rulesets: unknown built-in {:?}; the built-in rule sets are `{}`",
                    p.value,
                    crate::rules::managed::BUILTIN_MANAGED
                ),
            );
            continue;
        } else {
            let path = resolve_path(base_dir, &p.value);
            match crate::rules::compile::rule_files(&path) {
                Ok(files) => files
                    .iter()
                    .map(|f| crate::rules::compile::load(f, ip_sets))
                    .collect(),
                Err(e) => {
                    issues.at(
                        &p.referenced,
                        format!("rulesets: cannot read {}: {e}", path.display()),
                    );
                    continue;
                }
            }
        };
        for result in loaded {
            match result {
                Ok(set) => {
                    if let Some(prev) = out.get(&set.name) {
                        issues.at(
                            &p.referenced,
                            format!(
                                "rule set name {:?} is used by both {} and {}",
                                set.name,
                                prev.path.display(),
                                set.path.display()
                            ),
                        );
                    } else {
                        out.insert(set.name.clone(), Arc::new(set));
                    }
                }
                Err(e) => {
                    for line in e.to_string().lines() {
                        issues.at(&p.referenced, line.to_string());
                    }
                }
            }
        }
    }
    out
}

fn attach_rulesets(
    route: &str,
    p: &super::file::PolicyConfig,
    sets: &BTreeMap<String, Arc<CompiledRuleSet>>,
    issues: &mut Issues,
) -> Vec<AttachedRuleSet> {
    let mut out = Vec::new();
    for r in &p.rulesets {
        let Some(set) = sets.get(&r.name.value) else {
            let known: Vec<&str> = sets.keys().map(String::as_str).collect();
            issues.at(
                &r.name.referenced,
                format!(
                    "route {route:?}: unknown rule set {:?}; loaded rule sets: [{}]",
                    r.name.value,
                    known.join(", ")
                ),
            );
            continue;
        };
        let mut att = AttachedRuleSet::plain(Arc::clone(set));
        att.action_override = r.action_override;
        for d in &r.disabled_rules {
            match set.rules.iter().position(|x| x.id == d.value) {
                Some(i) => att.tuning[i].disabled = true,
                None => issues.at(
                    &d.referenced,
                    format!(
                        "route {route:?}: rule set {:?} has no rule {:?}",
                        set.name, d.value
                    ),
                ),
            }
        }
        for (id, action) in &r.rule_overrides {
            match set.rules.iter().position(|x| &x.id == id) {
                Some(i) => att.tuning[i].action = Some(*action),
                None => issues.at(
                    &r.name.referenced,
                    format!(
                        "route {route:?}: rule_overrides: rule set {:?} has no rule {id:?}",
                        set.name
                    ),
                ),
            }
        }
        out.push(att);
    }
    for ex in &p.exclusions {
        let mut targets = Vec::new();
        for f in &ex.fields {
            match ExclusionTarget::parse(&f.value) {
                Ok(t) => targets.push(t),
                Err(e) => issues.at(&f.referenced, format!("route {route:?}: {e}")),
            }
        }
        for sel in &ex.rules {
            let mut hits = 0;
            for att in &mut out {
                for (i, rule) in att.set.rules.iter().enumerate() {
                    let selected = match sel.value.strip_prefix("label:") {
                        Some(label) => rule.labels.iter().any(|l| l == label),
                        None => rule.id == sel.value,
                    };
                    if selected {
                        hits += 1;
                        att.tuning[i].exclusions.extend(targets.iter().cloned());
                    }
                }
            }
            if hits == 0 {
                issues.at(&sel.referenced, format!(
                    "route {route:?}: exclusion names {:?}, which matches no rule of the route's rule sets",
                    sel.value
                ));
            }
        }
    }
    out
}

fn redis_settings(cfg: &RedisConfig, issues: &mut Issues) -> Option<RedisSettings> {
    let check_url = |u: &Spanned<String>, issues: &mut Issues| {
        if let Err(e) = redis::Client::open(u.value.as_str()) {
            issues.at(
                &u.referenced,
                format!(
                    "redis: invalid URL {:?}: {e}; write it like `redis://127.0.0.1:6379/0`",
                    u.value
                ),
            );
        }
    };
    let target = match (&cfg.url, &cfg.cluster) {
        (Some(u), None) => {
            check_url(u, issues);
            RedisTarget::Single(u.value.clone())
        }
        (None, Some(nodes)) if !nodes.is_empty() => {
            for n in nodes {
                check_url(n, issues);
            }
            RedisTarget::Cluster(nodes.iter().map(|n| n.value.clone()).collect())
        }
        _ => {
            issues.global(
                "redis: give exactly one of `url` (standalone) or `cluster` (seed nodes)".into(),
            );
            return None;
        }
    };
    Some(RedisSettings {
        target,
        timeout: cfg
            .timeout
            .map(|d| d.0)
            .unwrap_or(Duration::from_millis(50)),
        on_error: match cfg.on_error {
            None | Some(RedisOnErrorConfig::Local) => RedisOnError::Local,
            Some(RedisOnErrorConfig::Allow) => RedisOnError::Allow,
            Some(RedisOnErrorConfig::Block) => RedisOnError::Block,
        },
        retry_after: cfg
            .retry_after
            .map(|d| d.0)
            .unwrap_or(Duration::from_secs(1)),
    })
}

fn rate_limits(
    cfgs: &[RateLimitConfig],
    routes: &[Route],
    have_redis: bool,
    geo: Option<&GeoDb>,
    issues: &mut Issues,
) -> Vec<RateLimitRule> {
    let mut names = HashSet::new();
    let mut out = Vec::new();
    for c in cfgs {
        let name = c.name.value.clone();
        let at = &c.name.referenced;
        if name.is_empty()
            || !name
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '-' | '_' | '.'))
        {
            issues.at(
                at,
                format!("rate limit name {name:?}: use letters, digits, `-`, `_`, `.`"),
            );
        }
        if !names.insert(name.clone()) {
            issues.at(at, format!("duplicate rate limit name {name:?}"));
        }
        let mut key = Vec::new();
        for k in &c.key {
            match KeyPart::parse(&k.value) {
                Ok(p) => {
                    if p.needs_geo() && geo.is_none() {
                        issues.at(
                            &k.referenced,
                            format!(
                                "rate limit {name:?}: key {:?} needs `geoip` databases",
                                k.value
                            ),
                        );
                    }
                    key.push(p);
                }
                Err(e) => issues.at(&k.referenced, format!("rate limit {name:?}: {e}")),
            }
        }
        let rate = match Rate::parse(&c.rate.value) {
            Ok(r) => r,
            Err(e) => {
                issues.at(&c.rate.referenced, format!("rate limit {name:?}: {e}"));
                continue;
            }
        };
        if rate.interval().is_zero() {
            issues.at(
                &c.rate.referenced,
                format!("rate limit {name:?}: rate too high (more than one per nanosecond)"),
            );
        }
        let burst = c.burst.unwrap_or(rate.count);
        if burst == 0 {
            issues.at(at, format!("rate limit {name:?}: burst must be at least 1"));
        }
        let mut scope = RateLimitScope::default();
        if let Some(s) = &c.scope {
            if let Some(rs) = &s.routes {
                for r in rs {
                    if !routes.iter().any(|x| x.name == r.value) {
                        issues.at(
                            &r.referenced,
                            format!(
                                "rate limit {name:?}: scope names unknown route {:?}",
                                r.value
                            ),
                        );
                    }
                }
                scope.routes = Some(rs.iter().map(|r| r.value.clone()).collect());
            }
            scope.methods = s
                .methods
                .as_ref()
                .map(|m| m.iter().map(|m| m.0.clone()).collect());
            if let Some(p) = &s.path {
                match regex::RegexBuilder::new(&p.value)
                    .size_limit(1 << 20)
                    .build()
                {
                    Ok(r) => scope.path = Some(r),
                    Err(e) => issues.at(
                        &p.referenced,
                        format!("rate limit {name:?}: invalid path regex: {e}"),
                    ),
                }
            }
        }
        let store = match c.store {
            Some(RateLimitStoreConfig::Redis) => {
                if !have_redis {
                    issues.at(
                        at,
                        format!("rate limit {name:?}: `store: redis` needs a `redis:` section"),
                    );
                }
                RateLimitStore::Redis
            }
            _ => RateLimitStore::Local,
        };
        out.push(RateLimitRule {
            name,
            key,
            rate,
            burst: burst.max(1),
            scope,
            action: match c.action {
                Some(RuleActionConfig::Count) => RateLimitAction::Count,
                _ => RateLimitAction::Block,
            },
            store,
            headers_always: c.headers == Some(RateLimitHeadersConfig::Always),
            max_keys: c.max_keys.unwrap_or(100_000),
        });
    }
    out
}

fn resolve_path(base_dir: &Path, p: &str) -> PathBuf {
    let path = Path::new(p);
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        base_dir.join(path)
    }
}

fn ip_sets(
    sets: &BTreeMap<String, IpSetConfig>,
    base_dir: &Path,
    issues: &mut Issues,
) -> BTreeMap<String, Arc<IpSet>> {
    let mut out = BTreeMap::new();
    for (name, cfg) in sets {
        let mut b = IpSetBuilder::new();
        for c in &cfg.cidrs {
            match parse_cidr(&c.value) {
                Some(n) => b.add(n),
                None => issues.at(
                    &c.referenced,
                    format!(
                        "ip set {name:?}: invalid IP or CIDR {:?}; write it like `10.0.0.0/8`, `2001:db8::/32` or `192.0.2.7`",
                        c.value
                    ),
                ),
            }
        }
        if let Some(f) = &cfg.file {
            let path = resolve_path(base_dir, &f.value);
            if let Err(e) = b.add_file(&path) {
                issues.at(&f.referenced, format!("ip set {name:?}: {e}"));
            }
        }
        if cfg.cidrs.is_empty() && cfg.file.is_none() {
            issues.global(format!(
                "ip set {name:?} is empty: give `cidrs` and/or `file`"
            ));
        }
        out.insert(name.clone(), Arc::new(b.build()));
    }
    out
}

fn set_ref(
    what: &str,
    r: &Spanned<String>,
    sets: &BTreeMap<String, Arc<IpSet>>,
    issues: &mut Issues,
) -> Option<(String, Arc<IpSet>)> {
    match sets.get(&r.value) {
        Some(s) => Some((r.value.clone(), Arc::clone(s))),
        None => {
            let known: Vec<&str> = sets.keys().map(String::as_str).collect();
            issues.at(
                &r.referenced,
                format!(
                    "{what}: unknown ip set {:?}; defined ip_sets: [{}]",
                    r.value,
                    known.join(", ")
                ),
            );
            None
        }
    }
}

fn client_ip(
    cfg: Option<&ClientIpConfig>,
    sets: &BTreeMap<String, Arc<IpSet>>,
    issues: &mut Issues,
) -> ClientIpResolver {
    let Some(cfg) = cfg else {
        return ClientIpResolver::default();
    };
    let mut trusted = IpSetBuilder::new();
    for t in &cfg.trusted_proxies {
        if let Some(n) = parse_cidr(&t.value) {
            trusted.add(n);
        } else if let Some((_, set)) = set_ref("client_ip.trusted_proxies", t, sets, issues) {
            trusted.add_set(&set);
        }
    }
    let header = match cfg.header.as_ref() {
        None => ForwardedHeader::XForwardedFor,
        Some(h) => match h.value.to_ascii_lowercase().as_str() {
            "x-forwarded-for" => ForwardedHeader::XForwardedFor,
            "forwarded" => ForwardedHeader::Forwarded,
            other => match http::header::HeaderName::from_bytes(other.as_bytes()) {
                Ok(name) => ForwardedHeader::Single(name),
                Err(_) => {
                    issues.at(
                        &h.referenced,
                        format!("client_ip.header {:?} is not a valid header name", h.value),
                    );
                    ForwardedHeader::XForwardedFor
                }
            },
        },
    };
    if cfg.trusted_proxies.is_empty() {
        issues.global(
            "client_ip has no trusted_proxies: the forwarding header would never be believed; \
             list your load balancers' CIDRs, or remove the client_ip section"
                .into(),
        );
    }
    ClientIpResolver::new(Arc::new(trusted.build()), header)
}

fn geo_db(cfg: Option<&GeoIpConfig>, base_dir: &Path, issues: &mut Issues) -> Option<Arc<GeoDb>> {
    let cfg = cfg?;
    let country = cfg
        .country_db
        .as_ref()
        .map(|p| (resolve_path(base_dir, &p.value), &p.referenced));
    let asn = cfg
        .asn_db
        .as_ref()
        .map(|p| (resolve_path(base_dir, &p.value), &p.referenced));
    // Open each separately so each error points at its own line.
    let mut ok = true;
    for (path, loc) in country.iter().chain(asn.iter()) {
        if let Err(e) = GeoDb::open(Some(path), None) {
            issues.at(loc, e.to_string());
            ok = false;
        }
    }
    if !ok {
        return None;
    }
    match GeoDb::open(
        country.as_ref().map(|c| c.0.as_path()),
        asn.as_ref().map(|a| a.0.as_path()),
    ) {
        Ok(db) => Some(Arc::new(db)),
        Err(e) => {
            issues.global(e.to_string());
            None
        }
    }
}

fn ip_policy(
    route: &str,
    cfg: &IpPolicyConfig,
    sets: &BTreeMap<String, Arc<IpSet>>,
    issues: &mut Issues,
) -> IpPolicy {
    let what = format!("route {route:?}: policy.ip");
    IpPolicy {
        allow: cfg
            .allow
            .iter()
            .filter_map(|r| set_ref(&what, r, sets, issues))
            .collect(),
        deny: cfg
            .deny
            .iter()
            .filter_map(|r| set_ref(&what, r, sets, issues))
            .collect(),
    }
}

fn countries(route: &str, list: &[Spanned<String>], issues: &mut Issues) -> Vec<CountryCode> {
    list.iter()
        .filter_map(|c| {
            let cc = CountryCode::parse(&c.value);
            if cc.is_none() {
                issues.at(
                    &c.referenced,
                    format!(
                        "route {route:?}: policy.geo: {:?} is not an ISO 3166-1 alpha-2 country code (e.g. US, DE)",
                        c.value
                    ),
                );
            }
            cc
        })
        .collect()
}

fn geo_policy(
    route: &str,
    at: &Location,
    cfg: &GeoPolicyConfig,
    db: Option<&GeoDb>,
    issues: &mut Issues,
) -> Option<GeoPolicy> {
    if !db.is_some_and(GeoDb::has_country) {
        issues.at(
            at,
            format!("route {route:?}: policy.geo needs a country database: set `geoip.country_db`"),
        );
    }
    let countries = match (&cfg.allow, &cfg.deny) {
        (Some(a), None) => ListMode::Allow(countries(route, a, issues)),
        (None, Some(d)) => ListMode::Deny(countries(route, d, issues)),
        _ => {
            issues.at(
                at,
                format!("route {route:?}: policy.geo takes exactly one of `allow` or `deny`"),
            );
            return None;
        }
    };
    let block_unknown = unknown_blocks(cfg.unknown, &countries);
    Some(GeoPolicy {
        countries,
        block_unknown,
    })
}

fn asn_policy(
    route: &str,
    at: &Location,
    cfg: &AsnPolicyConfig,
    db: Option<&GeoDb>,
    issues: &mut Issues,
) -> Option<AsnPolicy> {
    if !db.is_some_and(GeoDb::has_asn) {
        issues.at(
            at,
            format!("route {route:?}: policy.asn needs an ASN database: set `geoip.asn_db`"),
        );
    }
    let asns = match (&cfg.allow, &cfg.deny) {
        (Some(a), None) => ListMode::Allow(a.clone()),
        (None, Some(d)) => ListMode::Deny(d.clone()),
        _ => {
            issues.at(
                at,
                format!("route {route:?}: policy.asn takes exactly one of `allow` or `deny`"),
            );
            return None;
        }
    };
    let block_unknown = unknown_blocks(cfg.unknown, &asns);
    Some(AsnPolicy {
        asns,
        block_unknown,
    })
}

/// An allow-list admits only what is on it, so by default it turns away clients the database
/// does not know; a deny-list lets them through. `unknown:` overrides either default.
/// Compiles a route's `validate:` section; problems become config issues at the item they
/// concern (the route name when the schema library cannot say more).
fn validation(
    route: &str,
    route_at: &Location,
    cfg: &super::file::ValidateConfig,
    inspect_limit: usize,
    base_dir: &Path,
    store: &crate::schema::DocumentStore,
    issues: &mut Issues,
) -> Option<Arc<crate::schema::RouteValidation>> {
    match crate::schema::compile(cfg, base_dir, store) {
        Ok(v) => {
            if v.needs_body() && v.max_body().is_some_and(|m| m > inspect_limit) {
                issues.at(
                    route_at,
                    format!(
                        "route {route:?}: validate.max_body is above body.inspect_limit \
                         ({inspect_limit} bytes): bodies in between could not be checked against \
                         their schema; raise inspect_limit (up to 64KiB) or lower max_body"
                    ),
                );
            }
            Some(Arc::new(v))
        }
        Err(errors) => {
            for e in errors {
                let at = e.at.unwrap_or(*route_at);
                issues.at(&at, format!("route {route:?}: {}", e.message));
            }
            None
        }
    }
}

fn unknown_blocks<T>(unknown: Option<UnknownPolicy>, list: &ListMode<T>) -> bool {
    match unknown {
        Some(u) => u == UnknownPolicy::Block,
        None => matches!(list, ListMode::Allow(_)),
    }
}

fn body_settings(
    body: &BodyConfig,
    inherited: Option<(usize, OversizePolicy)>,
    issues: &mut Issues,
) -> (usize, OversizePolicy) {
    let (default_limit, default_policy) =
        inherited.unwrap_or((DEFAULT_INSPECT_LIMIT as usize, OversizePolicy::Block));
    let limit = match body.inspect_limit {
        None => default_limit,
        Some(s) if s.0 > MAX_INSPECT_LIMIT => {
            issues.global(format!(
                "body.inspect_limit {} is above the maximum of 65536 bytes (64KiB): a pre-read body \
                 is replayed to the upstream from pingora's fixed 64 KiB buffer",
                s.0
            ));
            MAX_INSPECT_LIMIT as usize
        }
        // Bounded by MAX_INSPECT_LIMIT above, so the cast cannot truncate.
        Some(s) => s.0 as usize,
    };
    (limit, body.oversize.unwrap_or(default_policy))
}

fn upstream(name: &str, up: &UpstreamConfig, issues: &mut Issues) -> Upstream {
    let demo = up.demo.as_ref().map(|d| d.value).unwrap_or(false);
    let targets = if demo {
        if let (Some(d), false) = (&up.demo, up.targets.is_empty()) {
            issues.at(
                &d.referenced,
                format!("upstream {name:?}: use either `demo: true` or `targets`, not both"),
            );
        }
        UpstreamTargets::Demo
    } else {
        if up.targets.is_empty() {
            issues.global(format!(
                "upstream {name:?} has no targets: add `targets: [\"127.0.0.1:3000\"]` or `demo: true`"
            ));
        }
        let mut addrs = Vec::new();
        for t in &up.targets {
            match resolve(&t.value) {
                Ok(a) => addrs.extend(a),
                Err(m) => issues.at(&t.referenced, format!("upstream {name:?}: {m}")),
            }
        }
        UpstreamTargets::Servers(addrs)
    };
    let health_check = up.health_check.as_ref().map(|h| HealthCheck {
        kind: h.kind,
        path: h.path.clone().unwrap_or_else(|| "/".into()),
        interval: h.interval.map(|d| d.0).unwrap_or(Duration::from_secs(5)),
        healthy_after: h.healthy_after.unwrap_or(1).max(1),
        unhealthy_after: h.unhealthy_after.unwrap_or(1).max(1),
    });
    if let Some(h) = &health_check {
        if h.kind == HealthCheckKind::Http && !h.path.starts_with('/') {
            issues.global(format!(
                "upstream {name:?}: health_check.path {:?} must start with `/`",
                h.path
            ));
        }
    }
    let passive = up
        .passive
        .as_ref()
        .map(|p| PassiveHealth {
            failures: p.failures.unwrap_or(3).max(1),
            ejection: p.ejection.map(|d| d.0).unwrap_or(Duration::from_secs(10)),
        })
        .unwrap_or_default();
    Upstream {
        name: name.to_string(),
        targets,
        host_header: up.host_header.clone(),
        health_check,
        passive,
    }
}

fn resolve(target: &str) -> Result<Vec<SocketAddr>, String> {
    if let Ok(a) = target.parse::<SocketAddr>() {
        return Ok(vec![a]);
    }
    if target.contains("://") {
        return Err(format!(
            "target {target:?} must be `host:port` without a scheme (e.g. `127.0.0.1:3000`)"
        ));
    }
    match target.to_socket_addrs() {
        Ok(a) => {
            let v: Vec<SocketAddr> = a.collect();
            if v.is_empty() {
                Err(format!("target {target:?} resolved to no address"))
            } else {
                Ok(v)
            }
        }
        Err(e) => Err(format!(
            "target {target:?} is not a valid `host:port` or does not resolve: {e}"
        )),
    }
}

/// Parses `--upstream http://host:port` into addresses.
fn parse_upstream_url(url: &str) -> Result<Vec<SocketAddr>, String> {
    let rest = match url.split_once("://") {
        Some(("http", rest)) => rest,
        Some((scheme, _)) => {
            return Err(format!(
                "scheme {scheme:?} is not supported for upstreams yet; use http://host:port"
            ))
        }
        None => url,
    };
    let hostport = rest.trim_end_matches('/');
    if hostport.contains('/') {
        return Err("give only scheme, host and port (no path)".into());
    }
    let with_port = if hostport.rsplit_once(':').is_some_and(|(h, p)| {
        !h.is_empty() && p.chars().all(|c| c.is_ascii_digit()) && !hostport.ends_with(']')
    }) {
        hostport.to_string()
    } else {
        format!("{hostport}:80")
    };
    resolve(&with_port)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]
mod tests {
    use super::super::{load_str, Overrides};

    fn err(text: &str) -> String {
        load_str("t.yaml", text, &Overrides::default())
            .expect_err("config should be rejected")
            .to_string()
    }

    const OK: &str = "listeners: [{address: \"127.0.0.1:8080\"}]\nupstreams:\n  app:\n    targets: [\"127.0.0.1:3000\"]\nroutes:\n  - name: api\n    upstream: app\n";

    #[test]
    fn minimal_config_loads() {
        let c = load_str("t.yaml", OK, &Overrides::default()).unwrap();
        assert_eq!(c.routes.len(), 1);
        assert_eq!(c.routes[0].policy.inspect_limit, 65536);
    }

    #[test]
    fn unknown_key_has_line_and_column() {
        let e = err(&OK.replace("    targets:", "    tragets:"));
        assert!(e.starts_with("t.yaml:4:5: unknown field `tragets`"), "{e}");
    }

    #[test]
    fn unknown_upstream_points_at_the_reference() {
        let e = err(&OK.replace("upstream: app", "upstream: nope"));
        assert!(
            e.starts_with("t.yaml:7:15: route \"api\": unknown upstream \"nope\""),
            "{e}"
        );
    }

    #[test]
    fn bad_duration_and_size_are_located() {
        let e = err(&format!("{OK}timeouts:\n  upstream_read: 5 parsecs\n"));
        assert!(e.starts_with("t.yaml:9:18: invalid duration"), "{e}");
        let e = err(&format!("{OK}body:\n  inspect_limit: lots\n"));
        assert!(e.starts_with("t.yaml:9:18: invalid size"), "{e}");
    }

    #[test]
    fn all_validation_errors_are_listed() {
        let text = OK.replace("upstream: app", "upstream: nope")
            + "  - name: api\n    upstream: app\n    policy: {body: {inspect_limit: 1MiB}}\n";
        let e = err(&text);
        assert_eq!(e.lines().count(), 4, "{e}");
        assert!(e.contains("duplicate route name"), "{e}");
        assert!(e.contains("above the maximum"), "{e}");
    }

    #[test]
    fn committed_json_schema_is_current() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../schemas/palisade-config.schema.json"
        );
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            committed == super::super::json_schema(),
            "schemas/palisade-config.schema.json is stale: run `palisade schema > schemas/palisade-config.schema.json`"
        );
    }

    #[test]
    fn committed_ruleset_schema_is_current() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../schemas/palisade-ruleset.schema.json"
        );
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            committed == crate::rules::ruleset_json_schema(),
            "schemas/palisade-ruleset.schema.json is stale: run `palisade schema --ruleset > schemas/palisade-ruleset.schema.json`"
        );
    }

    #[test]
    fn embedded_default_loads() {
        super::super::load_default(&Overrides::default()).unwrap();
    }
}
