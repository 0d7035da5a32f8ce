//! Config step 2 (check): cross-field checks and defaults, turning [`FileConfig`] into the plain
//! [`Config`]. Only what can be checked without side effects: no file besides the config is
//! read, no address resolved, nothing compiled (that is `crate::compile`). Every problem is
//! collected with its location so one run reports them all.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_saphyr::{Location, Spanned};

use super::file::{
    AsnPolicyConfig, BodyConfig, ClientIpConfig, FileConfig, GeoIpConfig, GeoPolicyConfig,
    HealthCheckKind, IpPolicyConfig, IpSetConfig, McpConfig, McpSetting, OversizePolicy,
    RateLimitConfig, RateLimitStoreConfig, RedisConfig, UpstreamConfig,
};
use super::{
    Config, HealthCheck, HostMatch, Listener, Overrides, PassiveHealth, Problem, Problems, Route,
    RoutePolicy, Target, Timeouts, Upstream, UpstreamTargets, UpstreamTls, MAX_INSPECT_LIMIT,
};
use crate::identity::geo::CountryCode;
use crate::identity::ipset::parse_cidr;

/// Default body inspection limit (64 KiB).
const DEFAULT_INSPECT_LIMIT: u64 = 64 * 1024;
/// Name of the upstream created by `--upstream`.
const CLI_UPSTREAM: &str = "cli-upstream";
/// Environment variable that sets (and overrides) the admin token.
pub const ADMIN_TOKEN_ENV: &str = "PALISADE_ADMIN_TOKEN";

struct Issues {
    file: Arc<str>,
    found: Problems,
}

impl Issues {
    fn at(&mut self, loc: &Location, message: String) {
        self.found.push(Problem::at(&self.file, loc, message));
    }
    fn global(&mut self, message: String) {
        self.found.push(Problem::file(&self.file, message));
    }
}

/// Checks parsed config shapes, applies command-line overrides and fills defaults.
pub fn check(
    source: &Arc<str>,
    file: FileConfig,
    overrides: &Overrides,
    base_dir: &Path,
) -> Result<Config, Problems> {
    let (config, problems) = check_all(source, file, overrides, base_dir);
    problems.into_result()?;
    Ok(config)
}

/// Like [`check`], but returns the config (with defaults where a value was bad) together with
/// the problems, so that `palisade check` can also list what the compile step finds.
pub fn check_all(
    source: &Arc<str>,
    file: FileConfig,
    overrides: &Overrides,
    base_dir: &Path,
) -> (Config, Problems) {
    let mut issues = Issues {
        file: Arc::clone(source),
        found: Problems::default(),
    };

    check_ip_sets(&file.ip_sets, &mut issues);
    if let Some(c) = &file.client_ip {
        check_client_ip(c, &file.ip_sets, &mut issues);
    }
    if let Some(r) = &file.redis {
        check_redis(r, &mut issues);
    }

    let listeners: Vec<Listener> = if overrides.listen.is_empty() {
        file.listeners
            .iter()
            .map(|l| Listener {
                address: l.address,
                tls: l.tls.clone(),
                redirect_to_https: l.redirect_to_https,
                proxy_protocol: l.proxy_protocol,
            })
            .collect()
    } else {
        overrides
            .listen
            .iter()
            .map(|a| Listener {
                address: *a,
                tls: None,
                redirect_to_https: None,
                proxy_protocol: false,
            })
            .collect()
    };
    for l in &listeners {
        if l.tls.is_some() && l.redirect_to_https.is_some() {
            issues.global(format!(
                "listener {}: `redirect_to_https` answers with redirects and cannot also have `tls`",
                l.address
            ));
        }
        if l.proxy_protocol
            && file
                .client_ip
                .as_ref()
                .is_none_or(|c| c.trusted_proxies.is_empty())
        {
            issues.global(format!(
                "listener {}: `proxy_protocol` is accepted only from `client_ip.trusted_proxies`, which is empty: \
                 list the load balancers' addresses there",
                l.address
            ));
        }
        let Some(tls) = &l.tls else { continue };
        if tls.certificates.is_empty() {
            issues.global(format!(
                "listener {}: `tls` needs at least one entry in `certificates` ({{cert, key}})",
                l.address
            ));
        }
        for n in tls.certificates.iter().flat_map(|c| &c.names) {
            if !valid_tls_name(&n.value) {
                issues.at(
                    &n.referenced,
                    format!(
                        "listener {}: {:?} is not a host name (`api.example.com` or `*.example.com`)",
                        l.address, n.value
                    ),
                );
            }
        }
    }
    if !listeners.is_empty() && listeners.iter().all(|l| l.redirect_to_https.is_some()) {
        issues.global("every listener redirects to HTTPS: add one that serves requests".into());
    }
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
    let admin_token = std::env::var(ADMIN_TOKEN_ENV)
        .ok()
        .filter(|t| !t.is_empty())
        .or(file.admin.token.clone());
    if admin_token.as_ref().is_some_and(|t| t.len() < 16) {
        issues.global(
            "admin.token is shorter than 16 characters: use a long random value (e.g. `openssl rand -hex 32`)"
                .into(),
        );
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
    let http = http_settings(&file.http, &mut issues);

    // Upstreams: indexed in name order (BTreeMap).
    let mut upstreams: Vec<Upstream> = Vec::new();
    for (name, up) in &file.upstreams {
        upstreams.push(upstream(name, up, &mut issues));
    }
    if let Some(url) = &overrides.upstream {
        match parse_upstream_url(url) {
            Ok((address, tls)) => upstreams.push(Upstream {
                name: CLI_UPSTREAM.into(),
                targets: UpstreamTargets::Servers(vec![Target { address, at: None }]),
                host_header: None,
                health_check: None,
                passive: PassiveHealth::default(),
                // The system's roots, verification on, the target's host as SNI.
                tls: tls.then_some(UpstreamTls {
                    sni: None,
                    ca: None,
                    verify: true,
                    client_cert: None,
                    h2: false,
                }),
            }),
            Err(m) => issues.global(format!("--upstream {url:?}: {m}")),
        }
    }

    let mut routes = Vec::new();
    let mut names = HashSet::new();
    let mut keys = HashSet::new();
    for r in file.routes {
        let name = r.name.value.clone();
        let at = r.name.referenced;
        if name.is_empty() {
            issues.at(&at, "route name is empty".into());
        }
        if !names.insert(name.clone()) {
            issues.at(
                &at,
                format!("duplicate route name {name:?}: route names must be unique"),
            );
        }
        let host = host_match(&name, &at, r.host.as_deref(), &mut issues);
        let path_prefix = r.path_prefix.clone().unwrap_or_else(|| "/".into());
        if !path_prefix.starts_with('/') {
            issues.at(
                &at,
                format!("route {name:?}: path_prefix {path_prefix:?} must start with `/`"),
            );
        }
        if !keys.insert((host.clone(), path_prefix.clone())) {
            issues.at(
                &at,
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
        let p = r.policy;
        let (inspect_limit, oversize) = body_settings(
            p.body.as_ref().unwrap_or(&BodyConfig::default()),
            Some(default_body),
            &mut issues,
        );
        if let Some(ip) = &p.ip {
            check_ip_policy(&name, ip, &file.ip_sets, &mut issues);
        }
        let geo_ok = p
            .geo
            .as_ref()
            .is_none_or(|c| check_geo_policy(&name, &at, c, file.geoip.as_ref(), &mut issues));
        let asn_ok = p
            .asn
            .as_ref()
            .is_none_or(|c| check_asn_policy(&name, &at, c, file.geoip.as_ref(), &mut issues));
        let paranoia = match &p.paranoia {
            None => 1,
            Some(v) => super::paranoia_level(v.value).unwrap_or_else(|e| {
                issues.at(&v.referenced, format!("route {name:?}: {e}"));
                1
            }),
        };
        let mcp = match p.mcp {
            None | Some(McpSetting::Enabled(false)) => None,
            Some(McpSetting::Enabled(true)) => Some(McpConfig::default()),
            Some(McpSetting::Config(c)) => Some(c),
        };
        if (p.authorize.is_some() || mcp.is_some()) && p.auth.is_none() {
            let what = if mcp.is_some() {
                "an MCP route (`mcp`)"
            } else {
                "`policy.authorize`"
            };
            issues.at(
                &at,
                format!("route {name:?}: {what} needs `policy.auth` (a verified token)"),
            );
        }
        if p.authorize.is_some() && file.authorization.is_none() {
            issues.at(
                &at,
                format!(
                    "route {name:?}: `policy.authorize` needs `authorization` (Cedar policies) \
                     at the top of the config"
                ),
            );
        }
        if let Some(m) = &mcp {
            if let Some(r) = &m.resource {
                if !(r.starts_with("https://") || r.starts_with("http://")) || r.contains('#') {
                    issues.at(
                        &at,
                        format!(
                            "route {name:?}: mcp.resource {r:?} must be an absolute http(s) URL \
                             without a fragment (RFC 8707)"
                        ),
                    );
                }
            }
            if m.max_batch == Some(0) {
                issues.at(
                    &at,
                    format!("route {name:?}: mcp.max_batch must be at least 1"),
                );
            }
        }
        routes.push(Route {
            name,
            at,
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
                forward_path: p.forward_path.unwrap_or(http.forward_path),
                ip: p.ip,
                geo: p.geo.filter(|_| geo_ok),
                asn: p.asn.filter(|_| asn_ok),
                paranoia,
                rulesets: p.rulesets,
                exclusions: p.exclusions,
                validate: p.validate,
                auth: p.auth,
                authorize: p.authorize,
                mcp,
            },
        });
    }
    check_rate_limits(
        &file.rate_limits,
        &routes,
        file.redis.is_some(),
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

    let config = Config {
        source: Arc::clone(source),
        path: None,
        base_dir: base_dir.to_path_buf(),
        text_hash: String::new(),
        listeners,
        admin,
        admin_token,
        h2c: file.h2c,
        threads,
        decision_log: file
            .logging
            .decisions
            .as_ref()
            .map(|d| decision_log(d, base_dir, &mut issues)),
        log_format: file.logging.format,
        log_level: file.logging.level.unwrap_or_else(|| "info".into()),
        watch: file.reload.watch.unwrap_or(true),
        watch_debounce: file
            .reload
            .debounce
            .map(|d| d.0)
            .unwrap_or(Duration::from_millis(100)),
        timeouts,
        http,
        upstreams,
        routes,
        ip_sets: file.ip_sets,
        client_ip: file.client_ip,
        geoip: file.geoip,
        auth: file.auth,
        authorization: file.authorization,
        rate_limits: file.rate_limits,
        redis: file.redis,
        rulesets: file.rulesets,
    };
    (config, issues.found)
}

fn host_match(name: &str, at: &Location, host: Option<&str>, issues: &mut Issues) -> HostMatch {
    match host {
        None | Some("") | Some("*") => HostMatch::Any,
        Some(h) => {
            let h = h.to_ascii_lowercase();
            match h.strip_prefix("*.") {
                Some(rest) if !rest.is_empty() && !rest.contains('*') => {
                    HostMatch::Suffix(format!(".{rest}"))
                }
                _ if h.contains('*') || h.contains('/') || h.contains(' ') => {
                    issues.at(
                        at,
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
    }
}

fn check_redis(cfg: &RedisConfig, issues: &mut Issues) {
    match (&cfg.url, &cfg.cluster) {
        (Some(_), None) => {}
        (None, Some(nodes)) if !nodes.is_empty() => {}
        _ => issues.global(
            "redis: give exactly one of `url` (standalone) or `cluster` (seed nodes)".into(),
        ),
    }
}

fn check_rate_limits(
    cfgs: &[RateLimitConfig],
    routes: &[Route],
    have_redis: bool,
    issues: &mut Issues,
) {
    let mut names = HashSet::new();
    for c in cfgs {
        let name = &c.name.value;
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
        if c.burst == Some(0) {
            issues.at(at, format!("rate limit {name:?}: burst must be at least 1"));
        }
        if let Some(rs) = c.scope.as_ref().and_then(|s| s.routes.as_ref()) {
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
        }
        if c.store == Some(RateLimitStoreConfig::Redis) && !have_redis {
            issues.at(
                at,
                format!("rate limit {name:?}: `store: redis` needs a `redis:` section"),
            );
        }
    }
}

fn check_ip_sets(sets: &BTreeMap<String, IpSetConfig>, issues: &mut Issues) {
    for (name, cfg) in sets {
        for c in &cfg.cidrs {
            if parse_cidr(&c.value).is_none() {
                issues.at(
                    &c.referenced,
                    format!(
                        "ip set {name:?}: invalid IP or CIDR {:?}; write it like `10.0.0.0/8`, `2001:db8::/32` or `192.0.2.7`",
                        c.value
                    ),
                );
            }
        }
        if cfg.cidrs.is_empty() && cfg.file.is_none() {
            issues.global(format!(
                "ip set {name:?} is empty: give `cidrs` and/or `file`"
            ));
        }
    }
}

fn check_set_ref(
    what: &str,
    r: &Spanned<String>,
    sets: &BTreeMap<String, IpSetConfig>,
    issues: &mut Issues,
) {
    if !sets.contains_key(&r.value) {
        let known: Vec<&str> = sets.keys().map(String::as_str).collect();
        issues.at(
            &r.referenced,
            format!(
                "{what}: unknown ip set {:?}; defined ip_sets: [{}]",
                r.value,
                known.join(", ")
            ),
        );
    }
}

fn check_client_ip(
    cfg: &ClientIpConfig,
    sets: &BTreeMap<String, IpSetConfig>,
    issues: &mut Issues,
) {
    for t in &cfg.trusted_proxies {
        if parse_cidr(&t.value).is_none() {
            check_set_ref("client_ip.trusted_proxies", t, sets, issues);
        }
    }
    if let Some(h) = &cfg.header {
        if http::header::HeaderName::from_bytes(h.value.to_ascii_lowercase().as_bytes()).is_err() {
            issues.at(
                &h.referenced,
                format!("client_ip.header {:?} is not a valid header name", h.value),
            );
        }
    }
    if cfg.trusted_proxies.is_empty() {
        issues.global(
            "client_ip has no trusted_proxies: the forwarding header would never be believed; \
             list your load balancers' CIDRs, or remove the client_ip section"
                .into(),
        );
    }
}

fn check_ip_policy(
    route: &str,
    cfg: &IpPolicyConfig,
    sets: &BTreeMap<String, IpSetConfig>,
    issues: &mut Issues,
) {
    let what = format!("route {route:?}: policy.ip");
    for r in cfg.allow.iter().chain(&cfg.deny) {
        check_set_ref(&what, r, sets, issues);
    }
}

/// What the geo and ASN policies share: their database is configured and exactly one of
/// `allow`/`deny` is given. Returns that list (`None` when not exactly one).
fn one_list<'a, T>(
    route: &str,
    at: &Location,
    section: &str,
    db: (bool, &str, &str),
    allow: &'a Option<T>,
    deny: &'a Option<T>,
    issues: &mut Issues,
) -> Option<&'a T> {
    let (has_db, db_name, db_key) = db;
    if !has_db {
        issues.at(
            at,
            format!("route {route:?}: policy.{section} needs {db_name}: set `geoip.{db_key}`"),
        );
    }
    match (allow, deny) {
        (Some(list), None) | (None, Some(list)) => Some(list),
        _ => {
            issues.at(
                at,
                format!("route {route:?}: policy.{section} takes exactly one of `allow` or `deny`"),
            );
            None
        }
    }
}

/// Country policy: a country database, exactly one list, valid codes. `true` when usable.
fn check_geo_policy(
    route: &str,
    at: &Location,
    cfg: &GeoPolicyConfig,
    geoip: Option<&GeoIpConfig>,
    issues: &mut Issues,
) -> bool {
    let has_db = geoip.and_then(|g| g.country_db.as_ref()).is_some();
    let db = (has_db, "a country database", "country_db");
    let Some(list) = one_list(route, at, "geo", db, &cfg.allow, &cfg.deny, issues) else {
        return false;
    };
    for c in list {
        if CountryCode::parse(&c.value).is_none() {
            issues.at(
                &c.referenced,
                format!(
                    "route {route:?}: policy.geo: {:?} is not an ISO 3166-1 alpha-2 country code (e.g. US, DE)",
                    c.value
                ),
            );
        }
    }
    true
}

/// ASN policy: an ASN database and exactly one list. `true` when usable.
fn check_asn_policy(
    route: &str,
    at: &Location,
    cfg: &AsnPolicyConfig,
    geoip: Option<&GeoIpConfig>,
    issues: &mut Issues,
) -> bool {
    let has_db = geoip.and_then(|g| g.asn_db.as_ref()).is_some();
    let db = (has_db, "an ASN database", "asn_db");
    one_list(route, at, "asn", db, &cfg.allow, &cfg.deny, issues).is_some()
}

fn http_settings(h: &super::file::HttpConfig, issues: &mut Issues) -> super::Http {
    let d = super::Http::default();
    let size =
        |v: Option<super::file::HumanSize>, default: usize, name: &str, issues: &mut Issues| {
            match v {
                None => default,
                Some(s) if s.0 < 1024 || s.0 > 1024 * 1024 => {
                    issues.global(format!(
                        "http.{name} {} is outside 1KiB..1MiB: browsers send a few KiB of headers",
                        s.0
                    ));
                    default
                }
                // Bounded above, so the cast cannot truncate.
                Some(s) => s.0 as usize,
            }
        };
    let max_head_size = size(h.max_head_size, d.max_head_size, "max_head_size", issues);
    let max_header_size = size(
        h.max_header_size,
        d.max_header_size,
        "max_header_size",
        issues,
    );
    if max_header_size > max_head_size {
        issues.global(format!(
            "http.max_header_size ({max_header_size}) is larger than http.max_head_size \
             ({max_head_size}): one header could never be that long"
        ));
    }
    let max_headers = match h.max_headers {
        Some(n) if !(8..=1000).contains(&n) => {
            issues.global(format!("http.max_headers {n} is outside 8..1000"));
            d.max_headers
        }
        Some(n) => n,
        None => d.max_headers,
    };
    let mut deadline =
        |v: Option<super::file::HumanDuration>, default: Duration, name: &str| match v {
            Some(t) if t.0.is_zero() => {
                issues.global(format!(
                    "http.{name} is zero: every request would time out; use e.g. `15s`"
                ));
                default
            }
            Some(t) => t.0,
            None => default,
        };
    let head_timeout = deadline(h.head_timeout, d.head_timeout, "head_timeout");
    let body_timeout = deadline(h.body_timeout, d.body_timeout, "body_timeout");
    let mut untrusted_headers = d.untrusted_headers;
    if let Some(list) = &h.untrusted_headers {
        untrusted_headers.clear();
        for name in list {
            let lower = name.trim().to_ascii_lowercase();
            if http::HeaderName::from_bytes(lower.as_bytes()).is_err() {
                issues.global(format!(
                    "http.untrusted_headers: {name:?} is not a header name"
                ));
            } else if matches!(
                lower.as_str(),
                "host" | "content-length" | "transfer-encoding"
            ) {
                issues.global(format!(
                    "http.untrusted_headers: {name:?} frames or routes every request and cannot be removed"
                ));
            } else {
                untrusted_headers.push(lower);
            }
        }
    }
    super::Http {
        encoded_slash: h.encoded_slash.unwrap_or(d.encoded_slash),
        forward_path: h.forward_path.unwrap_or(d.forward_path),
        max_head_size,
        max_headers,
        max_header_size,
        head_timeout,
        body_timeout,
        max_connections_per_ip: h.max_connections_per_ip.unwrap_or(d.max_connections_per_ip),
        h2_max_concurrent_streams: h
            .h2_max_concurrent_streams
            .unwrap_or(d.h2_max_concurrent_streams)
            .max(1),
        content_encoding: h.content_encoding.unwrap_or(d.content_encoding),
        untrusted_headers,
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
        for t in &up.targets {
            if t.value.contains("://") {
                issues.at(
                    &t.referenced,
                    format!(
                        "upstream {name:?}: target {:?} must be `host:port` without a scheme (e.g. `127.0.0.1:3000`)",
                        t.value
                    ),
                );
            }
        }
        UpstreamTargets::Servers(
            up.targets
                .iter()
                .map(|t| Target {
                    address: t.value.clone(),
                    at: Some(t.referenced),
                })
                .collect(),
        )
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
    let tls = up.tls.as_ref().map(|t| {
        if let Some(sni) = &t.sni {
            if !valid_tls_name(sni) || sni.starts_with("*.") {
                issues.global(format!(
                    "upstream {name:?}: tls.sni {sni:?} is not a host name"
                ));
            }
        }
        if !t.verify {
            tracing::warn!(upstream = name,
                "tls.verify is false: the servers' certificates are not checked, so anyone on the path can impersonate them");
        }
        UpstreamTls {
            sni: t.sni.clone(),
            ca: t.ca.as_ref().map(|c| (c.value.clone(), c.referenced)),
            verify: t.verify,
            client_cert: t
                .client_cert
                .as_ref()
                .map(|c| (c.cert.value.clone(), c.key.value.clone(), c.cert.referenced)),
            h2: t.h2,
        }
    });
    Upstream {
        name: name.to_string(),
        targets,
        host_header: up.host_header.clone(),
        health_check,
        passive,
        tls,
    }
}

fn decision_log(
    d: &super::file::DecisionLogConfig,
    base_dir: &Path,
    issues: &mut Issues,
) -> super::DecisionLog {
    let sample = d.allowed_sample.unwrap_or(0.0);
    if !(0.0..=1.0).contains(&sample) {
        issues.global(format!(
            "logging.decisions.allowed_sample {sample} must be between 0 and 1"
        ));
    }
    let queue = d.queue.unwrap_or(10_000);
    if queue == 0 {
        issues.global("logging.decisions.queue must be at least 1".into());
    }
    let redact_headers: Vec<String> = match &d.redact_headers {
        Some(list) => list.iter().map(|h| h.to_ascii_lowercase()).collect(),
        None => super::DEFAULT_REDACTED_HEADERS
            .iter()
            .map(|h| h.to_string())
            .collect(),
    };
    for h in &redact_headers {
        if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
            issues.global(format!(
                "logging.decisions.redact_headers: {h:?} is not a header name"
            ));
        }
    }
    let file = d.file.as_ref().map(|f| super::resolve_path(base_dir, f));
    super::DecisionLog {
        stdout: d.stdout.unwrap_or(file.is_none()),
        file,
        allowed_sample: sample,
        redact_headers,
        redact_query: d.redact_query.clone(),
        queue: queue.max(1),
    }
}

/// Parses `--upstream http://host:port` into `host:port`.
fn parse_upstream_url(url: &str) -> Result<(String, bool), String> {
    let (rest, tls) = match url.split_once("://") {
        Some(("http", rest)) => (rest, false),
        Some(("https", rest)) => (rest, true),
        Some((scheme, _)) => {
            return Err(format!(
                "scheme {scheme:?} is not supported for upstreams; use http://host:port or https://host:port"
            ))
        }
        None => (url, false),
    };
    let hostport = rest.trim_end_matches('/');
    if hostport.contains('/') {
        return Err("give only scheme, host and port (no path)".into());
    }
    if hostport.rsplit_once(':').is_some_and(|(h, p)| {
        !h.is_empty() && p.chars().all(|c| c.is_ascii_digit()) && !hostport.ends_with(']')
    }) {
        Ok((hostport.to_string(), tls))
    } else {
        Ok((format!("{hostport}:{}", if tls { 443 } else { 80 }), tls))
    }
}

/// Whether `name` is a host name a certificate can serve: `api.example.com` or
/// `*.example.com` (one leading wildcard label).
fn valid_tls_name(name: &str) -> bool {
    let host = name.strip_prefix("*.").unwrap_or(name);
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]
mod tests {
    use super::super::{load_str, Overrides};

    #[test]
    fn tls_host_names() {
        use super::valid_tls_name;
        assert!(valid_tls_name("api.example.com"));
        assert!(valid_tls_name("*.example.com"));
        assert!(valid_tls_name("localhost"));
        assert!(!valid_tls_name("*.*.example.com"));
        assert!(!valid_tls_name("api example.com"));
        assert!(!valid_tls_name(""));
        assert!(!valid_tls_name("a..b"));
    }

    #[test]
    fn tls_listener_errors_name_the_line() {
        let base = "upstreams:\n  app:\n    targets: [\"127.0.0.1:3000\"]\nroutes:\n  - name: api\n    upstream: app\n";
        let e = err(&format!(
            "listeners:\n  - address: 127.0.0.1:8443\n    tls: {{certificates: []}}\n{base}"
        ));
        assert!(
            e.contains("needs at least one entry in `certificates`"),
            "{e}"
        );
        let e = err(&format!(
            "listeners:\n  - address: 127.0.0.1:8443\n    tls:\n      certificates:\n        - {{cert: a.pem, key: a.key, names: [\"*.*.x\"]}}\n{base}"
        ));
        assert!(
            e.contains("t.yaml:5:") && e.contains("is not a host name"),
            "{e}"
        );
        let e = err(&format!(
            "listeners:\n  - address: 127.0.0.1:8443\n    redirect_to_https: 443\n    tls: {{certificates: [{{cert: a.pem, key: a.key}}]}}\n{base}"
        ));
        assert!(e.contains("cannot also have `tls`"), "{e}");
        let e = err(&format!(
            "listeners:\n  - address: 127.0.0.1:8080\n    redirect_to_https: 443\n{base}"
        ));
        assert!(e.contains("every listener redirects to HTTPS"), "{e}");
    }

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
    fn embedded_default_loads() {
        super::super::load_default(&Overrides::default()).unwrap();
    }
}
