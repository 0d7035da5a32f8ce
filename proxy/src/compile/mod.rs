//! Step 3 of parse → check → compile → snapshot → swap: a checked [`Config`] becomes a running
//! [`Snapshot`]. This is where side effects happen: IP list files, rule sets, schema and
//! OpenAPI documents and mmdb files are read, upstream names resolved, rule sets, schemas and
//! IP sets compiled, metric handles resolved, and each route's pipeline built from the policy
//! types its stages own. Every problem keeps its file, line and column ([`Problem`]).
//!
//! Given the snapshot in force, a reload keeps what did not change: the state of a rate-limit
//! rule with the same settings (its buckets), an upstream group with the same settings and
//! addresses (its health), and the Redis connection.

use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;

use serde_saphyr::Spanned;

use crate::config::file::{
    AsnPolicyConfig, GeoPolicyConfig, RateLimitConfig, RateLimitHeadersConfig,
    RateLimitStoreConfig, RedisConfig, RedisOnErrorConfig, RuleActionConfig, UnknownPolicy,
};
use crate::config::{content_hash, Config, Problem, Problems, UpstreamTargets};
use crate::identity::client_ip::{ClientIpResolver, ForwardedHeader};
use crate::identity::geo::{CountryCode, GeoDb};
use crate::identity::ipset::{parse_cidr, IpSet, IpSetBuilder};
use crate::metrics::Metrics;
use crate::pipeline::{
    AccessPolicy, AccessStage, AsnPolicy, BodyPolicy, GeoPolicy, GeoStage, IpPolicy, IpStage,
    ListMode, Pipeline, Stage,
};
use crate::ratelimit::key::KeyPart;
use crate::ratelimit::redis::RedisStore;
use crate::ratelimit::rule::{
    PathRegex, Rate, RateLimitAction, RateLimitRule, RateLimitScope, RateLimitStore, RedisOnError,
    RedisSettings, RedisTarget,
};
use crate::ratelimit::{CompiledRateLimit, RateLimitStage};
use crate::rules::compile::CompiledRuleSet;
use crate::rules::eval::{AttachedRuleSet, ExclusionTarget};
use crate::rules::RulesStage;
use crate::schema::{ConfigSite, DocumentStore, RouteValidation, ValidateStage};
use crate::snapshot::{CompiledRoute, RouteTable, Snapshot, SourceFile};
use crate::upstream::{UpstreamGroup, UpstreamOps, UpstreamTlsLoaded};

/// What a compilation starts from besides the config.
pub struct CompileContext<'a> {
    /// The metric families (handles are resolved from them).
    pub metrics: &'a Arc<Metrics>,
    /// The snapshot in force, whose unchanged parts are kept (`None` at start-up).
    pub previous: Option<&'a Snapshot>,
    /// Where the demo backend listens, when it runs.
    pub demo_addr: Option<SocketAddr>,
    /// Generation of the new snapshot.
    pub generation: u64,
}

impl<'a> CompileContext<'a> {
    /// The context of a first compilation (start-up, `palisade check`): nothing to keep,
    /// generation 1.
    pub fn first(metrics: &'a Arc<Metrics>, demo_addr: Option<SocketAddr>) -> Self {
        CompileContext {
            metrics,
            previous: None,
            demo_addr,
            generation: 1,
        }
    }
}

struct Out {
    file: Arc<str>,
    problems: Problems,
    sources: Vec<SourceFile>,
}

impl Out {
    fn at(&mut self, loc: &serde_saphyr::Location, message: String) {
        self.problems.push(Problem::at(&self.file, loc, message));
    }
    fn global(&mut self, message: String) {
        self.problems.push(Problem::file(&self.file, message));
    }
    /// Records a file read for the snapshot, hashing its content (once per path).
    fn source(&mut self, path: &Path, kind: &'static str) {
        if self.sources.iter().any(|s| s.path == path) {
            return;
        }
        let hash = if path.is_dir() {
            let mut names: Vec<String> = std::fs::read_dir(path)
                .map(|d| {
                    d.filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
                        .collect()
                })
                .unwrap_or_default();
            names.sort();
            content_hash(names.join("\n").as_bytes())
        } else {
            // Regular files only: reading a FIFO would block the compile step.
            std::fs::metadata(path)
                .ok()
                .filter(|m| m.is_file())
                .and_then(|_| std::fs::read(path).ok())
                .map(|b| content_hash(&b))
                .unwrap_or_else(|| "unreadable".into())
        };
        self.sources.push(SourceFile {
            path: path.to_path_buf(),
            kind,
            hash,
        });
    }
}

/// Compiles a checked configuration into a snapshot, or lists every problem found.
pub fn compile(config: Config, cx: &CompileContext<'_>) -> Result<Snapshot, Problems> {
    compile_with(config, Problems::default(), cx)
}

/// Loads, checks and compiles `path` (or the embedded default): every problem of every step
/// is listed together (`palisade check`, reloads).
pub fn load_and_compile(
    path: Option<&Path>,
    overrides: &crate::config::Overrides,
    cx: &CompileContext<'_>,
) -> Result<Snapshot, Problems> {
    let (config, problems) = crate::config::load_all(path, overrides)?;
    compile_with(config, problems, cx)
}

/// Compiles a config whose check found `earlier` problems; they are reported with the
/// compile step's own.
pub fn compile_with(
    config: Config,
    earlier: Problems,
    cx: &CompileContext<'_>,
) -> Result<Snapshot, Problems> {
    let mut out = Out {
        file: Arc::clone(&config.source),
        problems: earlier,
        sources: Vec::new(),
    };
    if let Some(p) = &config.path {
        // The hash of the text the config step read, not of a second read.
        out.sources.push(SourceFile {
            path: p.clone(),
            kind: "config",
            hash: config.text_hash.clone(),
        });
    }
    let ip_sets = ip_sets(&config, &mut out);
    let client_ip = client_ip(&config, &ip_sets);
    let geo = geo_db(&config, &mut out);
    let redis = redis_store(config.redis.as_ref(), cx.previous, &mut out);
    let rule_sets = rule_sets(&config, &ip_sets, &mut out);
    let rate_limits = rate_limits(&config, redis.as_ref(), geo.is_some(), cx, &mut out);
    let upstreams = upstreams(&config, cx, &mut out);
    let tls = tls_stores(&config, &mut out);
    let issuers = issuers(&config, cx, &mut out);
    let authorizer = authorizer(&config, &mut out);

    // Schema documents are read once per load, whichever routes refer to them.
    let store = DocumentStore::new();
    let mut routes = Vec::new();
    for r in &config.routes {
        let p = &r.policy;
        let mut stages: Vec<Box<dyn Stage>> = Vec::new();
        if let Some(s) = AccessStage::new(AccessPolicy {
            methods: p.methods.clone(),
            deny: p.deny.clone(),
        }) {
            stages.push(Box::new(s));
        }
        if let Some(ip) = &p.ip {
            let resolve = |names: &[Spanned<String>]| {
                names
                    .iter()
                    .filter_map(|n| {
                        ip_sets
                            .get(&n.value)
                            .map(|s| (n.value.clone(), Arc::clone(s)))
                    })
                    .collect()
            };
            stages.push(Box::new(IpStage::new(IpPolicy {
                allow: resolve(&ip.allow),
                deny: resolve(&ip.deny),
            })));
        }
        if let Some(g) = GeoStage::new(
            p.geo.as_ref().map(geo_policy),
            p.asn.as_ref().map(asn_policy),
        ) {
            stages.push(Box::new(g));
        }
        let metadata = p.mcp.as_ref().and_then(|m| {
            let resource = m.resource.as_ref()?;
            let servers: Vec<String> = if m.authorization_servers.is_empty() {
                route_issuers(&config, p.auth.as_ref())
            } else {
                m.authorization_servers.clone()
            };
            Some(crate::mcp::ResourceMetadata::new(
                resource,
                &servers,
                &m.scopes_supported,
            ))
        });
        if let Some(a) = &p.auth {
            if let Some(mut stage) = auth_stage(&config, &r.name, a, &issuers, &mut out) {
                if let Some(md) = &metadata {
                    stage = stage.with_resource(md.resource.clone(), md.url.clone());
                }
                stages.push(Box::new(stage));
            }
        }
        // With a decision log, stages record what matched and where.
        let evidence = config.decision_log.is_some();
        for body in [false, true] {
            if let Some(rl) = RateLimitStage::for_route(&r.name, &rate_limits, cx.metrics, body) {
                stages.push(Box::new(rl.with_evidence(evidence)));
            }
        }
        let attached = attach_rulesets(r, &rule_sets, &mut out);
        if let Some(rules) = RulesStage::new(attached.clone()) {
            stages.push(Box::new(
                rules
                    .with_evidence(evidence)
                    .with_metrics(Arc::clone(&cx.metrics.ops.rule_matches)),
            ));
        }
        let validation = p
            .validate
            .as_ref()
            .and_then(|v| validation(&config, r, v, &store, &mut out));
        if let Some(v) = &validation {
            stages.push(Box::new(ValidateStage::new(
                Arc::clone(v),
                &r.name,
                cx.metrics.validation_failures.clone(),
            )));
        }
        let route_authz = match (&p.authorize, &authorizer) {
            (Some(a), Some(authorizer)) => {
                route_authz(r, a, authorizer, validation.as_deref(), &mut out).map(Arc::new)
            }
            _ => None,
        };
        if let Some(ra) = &route_authz {
            if p.mcp.is_none() {
                stages.push(Box::new(crate::authz::AuthorizeStage::new(Arc::clone(ra))));
            }
        }
        let mcp = p.mcp.as_ref().map(|m| {
            let route = Arc::new(mcp_route(
                &config,
                r,
                m,
                route_authz.clone(),
                metadata.clone(),
                &store,
                &mut out,
            ));
            // A reload keeps the input schemas the server advertised while the route still
            // talks to the same server (the same upstream group, kept as it was): otherwise
            // tool calls would go unchecked until a client lists the tools again.
            let same_server = |prev: &CompiledRoute| {
                let before = cx.previous.and_then(|p| p.upstreams.get(prev.upstream));
                let now = upstreams.get(r.upstream);
                matches!((before, now), (Some(a), Some(b)) if Arc::ptr_eq(a, b))
            };
            if let Some(prev) = cx.previous.and_then(|p| {
                p.routes
                    .iter()
                    .find(|c| c.name == r.name && same_server(c))
                    .and_then(|c| c.mcp.as_ref())
            }) {
                route.keep_learned(prev);
            }
            stages.push(Box::new(crate::mcp::McpStage::new(Arc::clone(&route))));
            route
        });
        let pipeline = Pipeline::new(
            stages,
            BodyPolicy {
                inspect_limit: p.inspect_limit,
                oversize: p.oversize,
            },
        );
        routes.push(CompiledRoute::new(
            r,
            pipeline,
            cx.metrics.route(&r.name),
            attached,
            validation,
            mcp,
            route_authz,
        ));
    }
    for f in store.files() {
        out.source(&f, "schema");
    }
    out.problems.into_result()?;
    Ok(Snapshot {
        generation: cx.generation,
        config: Arc::new(config),
        routes: RouteTable::new(routes),
        upstreams,
        client_ip,
        geo,
        ip_sets,
        rule_sets,
        rate_limits,
        redis,
        sources: out.sources,
        demo_addr: cx.demo_addr,
        tls,
        issuers,
    })
}

/// The certificates of each TLS listener. A file that cannot be loaded is a problem at its
/// `cert:` line, with the file name and the reason.
fn tls_stores(config: &Config, out: &mut Out) -> Vec<Option<Arc<crate::tls::TlsListener>>> {
    let mut stores = Vec::with_capacity(config.listeners.len());
    for l in &config.listeners {
        let Some(t) = &l.tls else {
            stores.push(None);
            continue;
        };
        let mut certs = Vec::new();
        for c in &t.certificates {
            let cert = config.resolve(&c.cert.value);
            let key = config.resolve(&c.key.value);
            out.source(&cert, "tls");
            out.source(&key, "tls");
            let names: Vec<String> = c.names.iter().map(|n| n.value.clone()).collect();
            match crate::tls::load_cert(&cert, &key, &names) {
                Ok(loaded) => certs.push(loaded),
                Err(e) => out.at(&c.cert.referenced, format!("listener {}: {e}", l.address)),
            }
        }
        let client_auth = t.client_auth.as_ref().and_then(|ca| {
            let path = config.resolve(&ca.ca.value);
            out.source(&path, "tls");
            crate::tls::load_client_auth(&path, ca.required)
                .map(Arc::new)
                .map_err(|e| out.at(&ca.ca.referenced, format!("listener {}: {e}", l.address)))
                .ok()
        });
        let Some(mut store) = crate::tls::CertStore::new(certs) else {
            stores.push(None);
            continue;
        };
        store.client_auth = client_auth;
        let store = Arc::new(store);
        let suites: Vec<String> = t.cipher_suites.iter().map(|c| c.value.clone()).collect();
        let tls13_only = t.min_version == crate::config::file::TlsVersionConfig::Tls13;
        match crate::tls::server_config(Arc::clone(&store), tls13_only, &suites) {
            Ok(config) => stores.push(Some(Arc::new(crate::tls::TlsListener { store, config }))),
            Err(e) => {
                match t.cipher_suites.first() {
                    Some(at) => out.at(&at.referenced, format!("listener {}: {e}", l.address)),
                    None => out.global(format!("listener {}: {e}", l.address)),
                }
                stores.push(None);
            }
        }
    }
    stores
}

/// The token issuers of `auth.issuers`. A problem is reported at the line it is about.
fn issuers(
    config: &Config,
    cx: &CompileContext<'_>,
    out: &mut Out,
) -> BTreeMap<String, Arc<crate::auth::Issuer>> {
    let mut map = BTreeMap::new();
    let Some(auth) = &config.auth else {
        return map;
    };
    for (name, i) in &auth.issuers {
        let jwks = i.jwks_file.as_ref().map(|f| {
            let p = config.resolve(&f.value);
            out.source(&p, "auth");
            p
        });
        let secret = match (&i.secret, &i.secret_env) {
            (Some(s), _) => Some(s.clone()),
            (None, Some(var)) => match std::env::var(var) {
                Ok(v) => Some(v),
                Err(_) => {
                    out.global(format!(
                        "auth issuer {name:?}: environment variable {var:?} (secret_env) is not set"
                    ));
                    continue;
                }
            },
            (None, None) => None,
        };
        let algorithms: Vec<String> = i.algorithms.iter().map(|a| a.value.clone()).collect();
        let spec = crate::auth::IssuerSpec {
            name,
            issuer: &i.issuer,
            algorithms: &algorithms,
            jwks_file: jwks.as_deref(),
            jwks_url: i.jwks_url.as_ref().map(|u| u.value.as_str()),
            discovery: i.discovery,
            // Keys fetched by the running snapshot from the same URL serve on at once.
            previous_keys: cx.previous.and_then(|p| {
                p.issuers
                    .get(name)
                    .filter(|old| {
                        let now = match (&i.jwks_url, i.discovery) {
                            (Some(u), _) => Some(u.value.clone()),
                            (None, true) => Some(format!(
                                "{}/.well-known/openid-configuration",
                                i.issuer.trim_end_matches('/')
                            )),
                            (None, false) => None,
                        };
                        old.jwks_url() == now.as_deref()
                    })
                    .map(|old| old.keys())
            }),
            secret: secret.as_deref(),
            audiences: &i.audiences,
            audience_claim: i.audience_claim.as_deref(),
            token_use: i.token_use.as_deref(),
            leeway: i.leeway.map_or(60, |d| d.0.as_secs()),
        };
        match crate::auth::Issuer::build(&spec) {
            Ok(issuer) => {
                map.insert(name.clone(), Arc::new(issuer));
            }
            Err(e) => {
                let m = format!("auth issuer {name:?}: {}", e.message);
                let at = if e.jwks {
                    i.jwks_file
                        .as_ref()
                        .or(i.jwks_url.as_ref())
                        .map(|f| f.referenced)
                } else {
                    i.algorithms.first().map(|a| a.referenced)
                };
                match at {
                    Some(at) => out.at(&at, m),
                    None => out.global(m),
                }
            }
        }
    }
    map
}

/// A route's token check, over the issuers it names (all by default).
fn auth_stage(
    config: &Config,
    route: &str,
    a: &crate::config::file::RouteAuthConfig,
    issuers: &BTreeMap<String, Arc<crate::auth::Issuer>>,
    out: &mut Out,
) -> Option<crate::auth::AuthStage> {
    let Some(auth) = &config.auth else {
        out.global(format!(
            "route {route:?}: `policy.auth` needs `auth.issuers` at the top of the config"
        ));
        return None;
    };
    let names: Vec<&String> = if a.issuers.is_empty() {
        auth.issuers.keys().collect()
    } else {
        a.issuers.iter().collect()
    };
    let mut chosen = Vec::new();
    for n in names {
        match issuers.get(n) {
            Some(i) => chosen.push(Arc::clone(i)),
            None if auth.issuers.contains_key(n) => {} // its own error is reported
            None => out.global(format!(
                "route {route:?}: unknown issuer {n:?} in policy.auth.issuers (known: {})",
                auth.issuers.keys().cloned().collect::<Vec<_>>().join(", ")
            )),
        }
    }
    let token = match crate::auth::TokenSource::parse(a.token.as_deref().unwrap_or("authorization"))
    {
        Ok(t) => t,
        Err(e) => {
            out.global(format!("route {route:?}: policy.auth.token: {e}"));
            return None;
        }
    };
    let scopes = a
        .scopes
        .iter()
        .map(|(m, s)| (m.clone(), s.clone()))
        .collect();
    for h in a.forward_claims.values() {
        if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
            out.global(format!(
                "route {route:?}: policy.auth.forward_claims: {h:?} is not a header name"
            ));
        }
    }
    let realm = auth.realm.clone().unwrap_or_else(|| "palisade".into());
    Some(crate::auth::AuthStage::new(chosen, token, scopes, realm))
}

/// The `iss` of the issuers a route accepts (the authorization servers of its metadata).
fn route_issuers(
    config: &Config,
    auth: Option<&crate::config::file::RouteAuthConfig>,
) -> Vec<String> {
    let Some(all) = config.auth.as_ref() else {
        return Vec::new();
    };
    all.issuers
        .iter()
        .filter(|(name, _)| auth.is_none_or(|a| a.issuers.is_empty() || a.issuers.contains(name)))
        .map(|(_, i)| i.issuer.clone())
        .collect()
}

/// An MCP route: its tool schemas (inline or file references, as in `validate`), Cedar and
/// protected-resource metadata.
fn mcp_route(
    config: &Config,
    r: &crate::config::Route,
    m: &crate::config::file::McpConfig,
    authz: Option<Arc<crate::authz::RouteAuthz>>,
    metadata: Option<crate::mcp::ResourceMetadata>,
    store: &DocumentStore,
    out: &mut Out,
) -> crate::mcp::McpRoute {
    let base_uri = crate::schema::config_base_uri(&config.base_dir);
    let mut configured = std::collections::HashMap::new();
    for (tool, schema) in &m.tools {
        let value = crate::schema::config_schema(&schema.value);
        match store.build(&value, &base_uri, None) {
            Ok(v) => {
                configured.insert(tool.clone(), v);
            }
            Err(e) => out.at(
                &schema.referenced,
                format!("route {:?}: mcp.tools.{tool}: {e}", r.name),
            ),
        }
    }
    crate::mcp::McpRoute::new(
        &r.name,
        m.max_batch.unwrap_or(20),
        (!m.forward_token)
            .then(|| {
                let at = r.policy.auth.as_ref().and_then(|a| a.token.as_deref());
                // Checked when the auth stage was built; the default is `Authorization`.
                crate::auth::TokenSource::parse(at.unwrap_or("authorization")).ok()
            })
            .flatten(),
        m.filter_tools_list.unwrap_or(authz.is_some()),
        m.advertised_schemas.unwrap_or(true),
        configured,
        authz,
        metadata,
    )
}

/// The Cedar policies and schema of `authorization`; problems in a policy or schema file are
/// reported at their line in that file.
fn authorizer(config: &Config, out: &mut Out) -> Option<Arc<crate::authz::Authorizer>> {
    let a = config.authorization.as_ref()?;
    let policy_files: Vec<std::path::PathBuf> = a
        .policies
        .iter()
        .map(|p| {
            let path = config.resolve(&p.value);
            out.source(&path, "authorization");
            path
        })
        .collect();
    let schema_file = a.schema.as_ref().map(|s| {
        let path = config.resolve(&s.value);
        out.source(&path, "authorization");
        path
    });
    let spec = crate::authz::AuthorizerSpec {
        policy_files,
        schema_file,
        principal_type: &a.principal.entity_type.value,
        principal_id: a.principal.id.as_deref(),
        groups: a
            .principal
            .groups
            .as_ref()
            .map(|g| (g.claim.as_str(), g.entity_type.as_str())),
        attributes: &a.principal.attributes,
        action_type: a.action_type.as_deref(),
    };
    match crate::authz::Authorizer::load(&spec) {
        Ok(z) => Some(Arc::new(z)),
        Err(errors) => {
            for e in errors {
                match e.file {
                    Some(f) => out.problems.push(Problem {
                        file: f.display().to_string().into(),
                        line: e.line,
                        column: e.column,
                        message: e.message,
                    }),
                    None => out.at(&a.principal.entity_type.referenced, e.message),
                }
            }
            None
        }
    }
}

/// A route's `policy.authorize`: its operations (hand-written, then those of its OpenAPI
/// document, whose action is the `operationId`), default resource and context.
fn route_authz(
    r: &crate::config::Route,
    a: &crate::config::file::RouteAuthorizeConfig,
    authorizer: &Arc<crate::authz::Authorizer>,
    validation: Option<&RouteValidation>,
    out: &mut Out,
) -> Option<crate::authz::RouteAuthz> {
    use crate::authz::{AuthzOperation, ResourceSpec};
    let route = &r.name;
    let mut ok = true;
    let mut ops = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for o in &a.operations {
        let methods: Vec<http::Method> = o
            .methods
            .as_ref()
            .map(|m| m.iter().map(|m| m.0.clone()).collect())
            .unwrap_or_default();
        for m in &methods {
            seen.insert((m.clone(), o.path.value.clone()));
        }
        match AuthzOperation::new(
            &o.path.value,
            methods,
            o.action.clone(),
            o.resource.as_ref(),
            authorizer,
        ) {
            Ok(op) => ops.push(op),
            Err(e) => {
                ok = false;
                out.at(
                    &o.path.referenced,
                    format!("route {route:?}: policy.authorize: {e}"),
                );
            }
        }
    }
    for imp in validation
        .map(|v| v.imported.as_slice())
        .unwrap_or_default()
    {
        if seen.contains(&(imp.method.clone(), imp.path.clone())) {
            continue;
        }
        match AuthzOperation::new(
            &imp.path,
            vec![imp.method.clone()],
            imp.operation_id.clone(),
            None,
            authorizer,
        ) {
            Ok(op) => ops.push(op),
            Err(e) => {
                ok = false;
                out.at(
                    &r.at,
                    format!(
                        "route {route:?}: policy.authorize (OpenAPI operation {} {}): {e}",
                        imp.method, imp.path
                    ),
                );
            }
        }
    }
    let default_resource = match &a.resource {
        Some(res) => ResourceSpec::compile(res, Some(&[]), authorizer),
        None => {
            let ty = authorizer.qualified("Route");
            let needed = r.policy.mcp.is_some() || ops.iter().any(|o| !o.has_resource());
            if !needed || authorizer.type_declared(&ty) {
                ResourceSpec::fixed(&ty, route)
            } else {
                Err(format!(
                    "the default resource type {ty:?} is not in the Cedar schema: declare it \
                     or set `resource: {{type: …}}`"
                ))
            }
        }
    };
    let default_resource = match default_resource {
        Ok(d) => d,
        Err(e) => {
            out.at(
                &r.at,
                format!("route {route:?}: policy.authorize.resource: {e}"),
            );
            return None;
        }
    };
    for ptr in a.context.body.values() {
        if !(ptr.is_empty() || ptr.starts_with('/')) {
            ok = false;
            out.at(
                &r.at,
                format!(
                    "route {route:?}: policy.authorize.context.body: {ptr:?} is not a JSON \
                     pointer (write `/member/0/name`)"
                ),
            );
        }
    }
    if ops.is_empty() && r.policy.mcp.is_none() {
        out.at(
            &r.at,
            format!(
                "route {route:?}: policy.authorize has no operations (write `operations:` or \
                 validate against an OpenAPI document)"
            ),
        );
        return None;
    }
    ok.then(|| {
        crate::authz::RouteAuthz::new(
            Arc::clone(authorizer),
            ops,
            default_resource,
            a.context.query.clone(),
            a.context
                .body
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        )
    })
}

fn ip_sets(config: &Config, out: &mut Out) -> BTreeMap<String, Arc<IpSet>> {
    let mut sets = BTreeMap::new();
    for (name, cfg) in &config.ip_sets {
        let mut b = IpSetBuilder::new();
        // CIDRs were checked by the config step.
        for c in cfg.cidrs.iter().filter_map(|c| parse_cidr(&c.value)) {
            b.add(c);
        }
        if let Some(f) = &cfg.file {
            let path = config.resolve(&f.value);
            out.source(&path, "ip_list");
            if let Err(e) = b.add_file(&path) {
                out.at(&f.referenced, format!("ip set {name:?}: {e}"));
            }
        }
        sets.insert(name.clone(), Arc::new(b.build()));
    }
    sets
}

fn client_ip(config: &Config, sets: &BTreeMap<String, Arc<IpSet>>) -> ClientIpResolver {
    let Some(cfg) = &config.client_ip else {
        return ClientIpResolver::default();
    };
    let mut trusted = IpSetBuilder::new();
    for t in &cfg.trusted_proxies {
        if let Some(n) = parse_cidr(&t.value) {
            trusted.add(n);
        } else if let Some(set) = sets.get(&t.value) {
            trusted.add_set(set);
        }
    }
    let header = match cfg.header.as_ref().map(|h| h.value.to_ascii_lowercase()) {
        None => ForwardedHeader::XForwardedFor,
        Some(h) if h == "x-forwarded-for" => ForwardedHeader::XForwardedFor,
        Some(h) if h == "forwarded" => ForwardedHeader::Forwarded,
        // Checked by the config step.
        Some(h) => http::header::HeaderName::from_bytes(h.as_bytes())
            .map(ForwardedHeader::Single)
            .unwrap_or(ForwardedHeader::XForwardedFor),
    };
    ClientIpResolver::new(Arc::new(trusted.build()), header)
}

fn geo_db(config: &Config, out: &mut Out) -> Option<Arc<GeoDb>> {
    let cfg = config.geoip.as_ref()?;
    let country = cfg
        .country_db
        .as_ref()
        .map(|p| (config.resolve(&p.value), p.referenced));
    let asn = cfg
        .asn_db
        .as_ref()
        .map(|p| (config.resolve(&p.value), p.referenced));
    // Open each separately so each error points at its own line.
    let mut ok = true;
    for (path, loc) in country.iter().chain(asn.iter()) {
        out.source(path, "geoip");
        if let Err(e) = GeoDb::open(Some(path), None) {
            out.at(loc, e.to_string());
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
            out.global(e.to_string());
            None
        }
    }
}

fn unknown_blocks<T>(unknown: Option<UnknownPolicy>, list: &ListMode<T>) -> bool {
    // An allow-list admits only what is on it, so by default it turns away clients the
    // database does not know; a deny-list lets them through. `unknown:` overrides either.
    match unknown {
        Some(u) => u == UnknownPolicy::Block,
        None => matches!(list, ListMode::Allow(_)),
    }
}

fn geo_policy(cfg: &GeoPolicyConfig) -> GeoPolicy {
    let codes = |l: &[Spanned<String>]| -> Vec<CountryCode> {
        l.iter()
            .filter_map(|c| CountryCode::parse(&c.value))
            .collect()
    };
    // Exactly one list: checked by the config step.
    let countries = match (&cfg.allow, &cfg.deny) {
        (Some(a), _) => ListMode::Allow(codes(a)),
        (None, d) => ListMode::Deny(d.as_deref().map(codes).unwrap_or_default()),
    };
    GeoPolicy {
        block_unknown: unknown_blocks(cfg.unknown, &countries),
        countries,
    }
}

fn asn_policy(cfg: &AsnPolicyConfig) -> AsnPolicy {
    let asns = match (&cfg.allow, &cfg.deny) {
        (Some(a), _) => ListMode::Allow(a.clone()),
        (None, d) => ListMode::Deny(d.clone().unwrap_or_default()),
    };
    AsnPolicy {
        block_unknown: unknown_blocks(cfg.unknown, &asns),
        asns,
    }
}

fn redis_store(
    cfg: Option<&RedisConfig>,
    previous: Option<&Snapshot>,
    out: &mut Out,
) -> Option<Arc<RedisStore>> {
    let cfg = cfg?;
    let mut check_url = |u: &Spanned<String>| {
        if let Err(e) = redis::Client::open(u.value.as_str()) {
            out.at(
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
            check_url(u);
            RedisTarget::Single(u.value.clone())
        }
        (None, Some(nodes)) => {
            nodes.iter().for_each(&mut check_url);
            RedisTarget::Cluster(nodes.iter().map(|n| n.value.clone()).collect())
        }
        // Exactly one: checked by the config step.
        _ => return None,
    };
    let settings = RedisSettings {
        target,
        timeout: cfg
            .timeout
            .map(|d| d.0)
            .unwrap_or(std::time::Duration::from_millis(50)),
        on_error: match cfg.on_error {
            None | Some(RedisOnErrorConfig::Local) => RedisOnError::Local,
            Some(RedisOnErrorConfig::Allow) => RedisOnError::Allow,
            Some(RedisOnErrorConfig::Block) => RedisOnError::Block,
        },
        retry_after: cfg
            .retry_after
            .map(|d| d.0)
            .unwrap_or(std::time::Duration::from_secs(1)),
    };
    if let Some(prev) = previous
        .and_then(|p| p.redis.as_ref())
        .filter(|r| *r.settings() == settings)
    {
        return Some(Arc::clone(prev));
    }
    Some(Arc::new(RedisStore::new(settings)))
}

fn rule_sets(
    config: &Config,
    ip_sets: &BTreeMap<String, Arc<IpSet>>,
    out: &mut Out,
) -> BTreeMap<String, Arc<CompiledRuleSet>> {
    let mut sets: BTreeMap<String, Arc<CompiledRuleSet>> = BTreeMap::new();
    for p in &config.rulesets {
        let loaded = if p.value == crate::rules::managed::BUILTIN_MANAGED {
            crate::rules::compile::load_managed(ip_sets)
        } else if p.value.starts_with("builtin:") {
            out.at(
                &p.referenced,
                format!(
                    "rulesets: unknown built-in {:?}; the built-in rule sets are `{}`",
                    p.value,
                    crate::rules::managed::BUILTIN_MANAGED
                ),
            );
            continue;
        } else {
            let path = config.resolve(&p.value);
            match crate::rules::compile::rule_files(&path) {
                Ok(files) => {
                    if path.is_dir() {
                        out.source(&path, "ruleset_dir");
                    }
                    files
                        .iter()
                        .map(|f| {
                            out.source(f, "ruleset");
                            crate::rules::compile::load(f, ip_sets)
                        })
                        .collect()
                }
                Err(e) => {
                    out.at(
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
                    if let Some(prev) = sets.get(&set.name) {
                        out.at(
                            &p.referenced,
                            format!(
                                "rule set name {:?} is used by both {} and {}",
                                set.name,
                                prev.path.display(),
                                set.path.display()
                            ),
                        );
                    } else {
                        sets.insert(set.name.clone(), Arc::new(set));
                    }
                }
                // Located in the rule file itself, kept as structure.
                Err(problems) => out.problems.0.extend(problems.0),
            }
        }
    }
    sets
}

fn attach_rulesets(
    route: &crate::config::Route,
    sets: &BTreeMap<String, Arc<CompiledRuleSet>>,
    out: &mut Out,
) -> Vec<AttachedRuleSet> {
    let name = &route.name;
    let p = &route.policy;
    let mut attached = Vec::new();
    for r in &p.rulesets {
        let Some(set) = sets.get(&r.name.value) else {
            let known: Vec<&str> = sets.keys().map(String::as_str).collect();
            out.at(
                &r.name.referenced,
                format!(
                    "route {name:?}: unknown rule set {:?}; loaded rule sets: [{}]",
                    r.name.value,
                    known.join(", ")
                ),
            );
            continue;
        };
        let mut att = AttachedRuleSet::plain(Arc::clone(set));
        att.action_override = r.action_override;
        // Rules above the route's paranoia level are off here, like disabled ones.
        for (i, rule) in set.rules.iter().enumerate() {
            if rule.paranoia > p.paranoia {
                att.tuning[i].disabled = true;
            }
        }
        for d in &r.disabled_rules {
            match set.rules.iter().position(|x| x.id == d.value) {
                Some(i) => att.tuning[i].disabled = true,
                None => out.at(
                    &d.referenced,
                    format!(
                        "route {name:?}: rule set {:?} has no rule {:?}",
                        set.name, d.value
                    ),
                ),
            }
        }
        for (id, action) in &r.rule_overrides {
            match set.rules.iter().position(|x| &x.id == id) {
                Some(i) => att.tuning[i].action = Some(*action),
                None => out.at(
                    &r.name.referenced,
                    format!(
                        "route {name:?}: rule_overrides: rule set {:?} has no rule {id:?}",
                        set.name
                    ),
                ),
            }
        }
        attached.push(att);
    }
    for ex in &p.exclusions {
        let mut targets = Vec::new();
        for f in &ex.fields {
            match ExclusionTarget::parse(&f.value) {
                Ok(t) => targets.push(t),
                Err(e) => out.at(&f.referenced, format!("route {name:?}: {e}")),
            }
        }
        for sel in &ex.rules {
            let mut hits = 0;
            for att in &mut attached {
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
                out.at(
                    &sel.referenced,
                    format!(
                        "route {name:?}: exclusion names {:?}, which matches no rule of the route's rule sets",
                        sel.value
                    ),
                );
            }
        }
    }
    attached
}

/// Compiles a route's `validate:` section; its problems are located in the config file.
fn validation(
    config: &Config,
    route: &crate::config::Route,
    cfg: &crate::config::file::ValidateConfig,
    store: &DocumentStore,
    out: &mut Out,
) -> Option<Arc<RouteValidation>> {
    let site = ConfigSite {
        file: &config.source,
        route: &route.name,
        route_at: route.at,
    };
    let inspect_limit = route.policy.inspect_limit;
    match crate::schema::compile(cfg, &config.base_dir, store, &site) {
        Ok(v) => {
            if v.needs_body() && v.max_body().is_some_and(|m| m > inspect_limit) {
                out.at(
                    &route.at,
                    format!(
                        "route {:?}: validate.max_body is above body.inspect_limit \
                         ({inspect_limit} bytes): bodies in between could not be checked against \
                         their schema; raise inspect_limit (up to 64KiB) or lower max_body",
                        route.name
                    ),
                );
            }
            let outside = v.outside_prefix(&route.path_prefix);
            if let Some(first) = outside.first() {
                out.at(
                    &route.at,
                    format!(
                        "route {:?}: {} validated operation(s) can never match under \
                         path_prefix {:?} (first: {first}); operation paths are full \
                         request paths: set validate.base_path for an OpenAPI document or fix \
                         the paths",
                        route.name,
                        outside.len(),
                        route.path_prefix
                    ),
                );
            }
            Some(Arc::new(v))
        }
        Err(problems) => {
            out.problems.0.extend(problems);
            None
        }
    }
}

fn rate_limit_rule(c: &RateLimitConfig, out: &mut Out) -> Option<RateLimitRule> {
    let name = c.name.value.clone();
    let mut key = Vec::new();
    for k in &c.key {
        match KeyPart::parse(&k.value) {
            Ok(p) => key.push(p),
            Err(e) => out.at(&k.referenced, format!("rate limit {name:?}: {e}")),
        }
    }
    let rate = match Rate::parse(&c.rate.value) {
        Ok(r) => r,
        Err(e) => {
            out.at(&c.rate.referenced, format!("rate limit {name:?}: {e}"));
            return None;
        }
    };
    if rate.interval().is_zero() {
        out.at(
            &c.rate.referenced,
            format!("rate limit {name:?}: rate too high (more than one per nanosecond)"),
        );
    }
    let burst = c.burst.unwrap_or(rate.count).max(1);
    let mut scope = RateLimitScope::default();
    if let Some(s) = &c.scope {
        scope.routes = s
            .routes
            .as_ref()
            .map(|rs| rs.iter().map(|r| r.value.clone()).collect());
        scope.methods = s
            .methods
            .as_ref()
            .map(|m| m.iter().map(|m| m.0.clone()).collect());
        if let Some(p) = &s.path {
            match regex::RegexBuilder::new(&p.value)
                .size_limit(1 << 20)
                .build()
            {
                Ok(r) => scope.path = Some(PathRegex(r)),
                Err(e) => out.at(
                    &p.referenced,
                    format!("rate limit {name:?}: invalid path regex: {e}"),
                ),
            }
        }
    }
    Some(RateLimitRule {
        name,
        key,
        rate,
        burst,
        scope,
        action: match c.action {
            Some(RuleActionConfig::Count) => RateLimitAction::Count,
            _ => RateLimitAction::Block,
        },
        store: match c.store {
            Some(RateLimitStoreConfig::Redis) => RateLimitStore::Redis,
            _ => RateLimitStore::Local,
        },
        headers_always: c.headers == Some(RateLimitHeadersConfig::Always),
        max_keys: c.max_keys.unwrap_or(100_000),
    })
}

fn rate_limits(
    config: &Config,
    redis: Option<&Arc<RedisStore>>,
    have_geo: bool,
    cx: &CompileContext<'_>,
    out: &mut Out,
) -> Vec<Arc<CompiledRateLimit>> {
    let mut rules = Vec::new();
    for c in &config.rate_limits {
        let Some(rule) = rate_limit_rule(c, out) else {
            continue;
        };
        if !have_geo && rule.key.iter().any(KeyPart::needs_geo) {
            out.at(
                &c.name.referenced,
                format!(
                    "rate limit {:?}: a country or asn key needs `geoip` databases",
                    rule.name
                ),
            );
        }
        let kept = cx.previous.and_then(|p| {
            p.rate_limits
                .iter()
                .find(|old| old.rule.name == rule.name && old.same_rule(&rule, redis))
        });
        rules.push(match kept {
            Some(old) => Arc::clone(old),
            None => Arc::new(CompiledRateLimit::new(rule, redis.cloned(), cx.metrics)),
        });
    }
    rules
}

fn resolve(target: &str) -> Result<Vec<SocketAddr>, String> {
    if let Ok(a) = target.parse::<SocketAddr>() {
        return Ok(vec![a]);
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

fn upstreams(config: &Config, cx: &CompileContext<'_>, out: &mut Out) -> Vec<Arc<UpstreamGroup>> {
    let mut groups = Vec::new();
    for up in &config.upstreams {
        // Each server's host as written (the default SNI of TLS upstreams).
        let mut names: Vec<(SocketAddr, String)> = Vec::new();
        let addrs: Vec<SocketAddr> = match &up.targets {
            UpstreamTargets::Servers(targets) => {
                let mut addrs = Vec::new();
                for t in targets {
                    match resolve(&t.address) {
                        Ok(a) => {
                            let host = t
                                .address
                                .rsplit_once(':')
                                .map_or(t.address.as_str(), |(h, _)| h)
                                .trim_start_matches('[')
                                .trim_end_matches(']')
                                .to_string();
                            names.extend(a.iter().map(|a| (*a, host.clone())));
                            addrs.extend(a);
                        }
                        Err(m) => {
                            let m = format!("upstream {:?}: {m}", up.name);
                            match &t.at {
                                Some(at) => out.at(at, m),
                                None => out.global(m),
                            }
                        }
                    }
                }
                addrs
            }
            UpstreamTargets::Demo => match cx.demo_addr {
                Some(a) => vec![a],
                None => {
                    out.global(format!(
                        "upstream {:?}: `demo: true` needs the demo backend, which starts only \
                         with a config that has it at start-up: restart Palisade",
                        up.name
                    ));
                    Vec::new()
                }
            },
        };
        let tls = match &up.tls {
            None => None,
            Some(t) => {
                let ca = t.ca.as_ref().map(|(f, at)| {
                    let path = config.resolve(f);
                    out.source(&path, "tls");
                    (path, *at)
                });
                let client = t.client_cert.as_ref().map(|(c, k, at)| {
                    let (c, k) = (config.resolve(c), config.resolve(k));
                    out.source(&c, "tls");
                    out.source(&k, "tls");
                    (c, k, *at)
                });
                let loaded = UpstreamTlsLoaded::load(
                    t.sni.as_deref(),
                    t.verify,
                    t.h2,
                    ca.as_ref().map(|(p, _)| p.as_path()),
                    client.as_ref().map(|(c, k, _)| (c.as_path(), k.as_path())),
                    names,
                );
                match loaded {
                    Ok(l) => Some(l),
                    Err(e) => {
                        let m = format!("upstream {:?}: {e}", up.name);
                        // At the line naming the file the error is about.
                        let at = match (&ca, &client) {
                            (Some((p, at)), _) if e.starts_with(&p.display().to_string()) => {
                                Some(*at)
                            }
                            (_, Some((_, _, at))) | (Some((_, at)), None) => Some(*at),
                            (None, None) => None,
                        };
                        match at {
                            Some(at) => out.at(&at, m),
                            None => out.global(m),
                        }
                        continue;
                    }
                }
            }
        };
        let kept = cx.previous.and_then(|p| {
            p.upstreams.iter().find(|g| {
                g.built_from.0 == *up
                    && g.built_from.1 == addrs
                    && g.tls.as_ref().map(|t| &t.material) == tls.as_ref().map(|t| &t.material)
            })
        });
        if let Some(g) = kept {
            groups.push(Arc::clone(g));
            continue;
        }
        let errors = ["connect", "timeout", "failure"].map(|k| {
            cx.metrics
                .upstream_errors
                .with_label_values(&[up.name.as_str(), k])
        });
        let o = &cx.metrics.ops;
        let name = up.name.as_str();
        let ops = UpstreamOps {
            responses: ["1xx", "2xx", "3xx", "4xx", "5xx"]
                .map(|c| o.upstream_responses.with_label_values(&[name, c])),
            latency: o.upstream_latency.with_label_values(&[name]),
            connect: o.upstream_connect.with_label_values(&[name]),
            retries: o.upstream_retries.with_label_values(&[name]),
            ejections: o.upstream_ejections.with_label_values(&[name]),
        };
        match UpstreamGroup::build(up, addrs, errors, tls, ops) {
            Ok(g) => groups.push(g),
            Err(e) => out.global(e.to_string()),
        }
    }
    groups
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn committed_json_schemas_are_current() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../schemas/");
        for (file, generated, command) in [
            (
                "palisade-config.schema.json",
                crate::config::json_schema(),
                "palisade schema",
            ),
            (
                "palisade-ruleset.schema.json",
                crate::rules::ruleset_json_schema(),
                "palisade schema --ruleset",
            ),
        ] {
            let committed = std::fs::read_to_string(format!("{dir}{file}")).unwrap_or_default();
            assert!(
                committed == generated,
                "schemas/{file} is stale: run `{command} > schemas/{file}`"
            );
        }
    }

    #[test]
    fn embedded_default_compiles_with_the_managed_rule_sets() {
        let config = crate::config::load_default(&crate::config::Overrides::default()).unwrap();
        let metrics = Arc::new(Metrics::new().unwrap());
        let snapshot = compile(
            config,
            &CompileContext::first(&metrics, Some(([127, 0, 0, 1], 9).into())),
        )
        .unwrap();
        assert!(!snapshot.rule_sets.is_empty());
        assert!(snapshot.routes.iter().all(|r| r.pipeline.needs().body));
    }

    #[test]
    fn a_recompile_keeps_unchanged_upstreams_and_rate_limits_and_replaces_changed_ones() {
        let yaml = |target: &str, rate: &str| {
            format!(
                "listeners: [{{address: \"127.0.0.1:1\"}}]\nupstreams:\n  a: {{targets: [\"127.0.0.1:7001\"], passive: {{failures: 1}}}}\n  b: {{targets: [\"{target}\"]}}\n\
                 rate_limits:\n  - {{name: one, key: [ip], rate: 5/s}}\n  - {{name: two, key: [ip], rate: {rate}, scope: {{path: \"^/x\"}}}}\n\
                 routes:\n  - {{name: r, upstream: a}}\n"
            )
        };
        let metrics = Arc::new(Metrics::new().unwrap());
        let build = |text: &str, previous: Option<&Snapshot>| {
            let config =
                crate::config::load_str("t.yaml", text, &crate::config::Overrides::default())
                    .unwrap();
            let cx = CompileContext {
                metrics: &metrics,
                previous,
                demo_addr: None,
                generation: previous.map_or(1, |p| p.generation + 1),
            };
            compile(config, &cx).unwrap()
        };
        let first = build(&yaml("127.0.0.1:7002", "1/s"), None);
        // Passive health state of `a`: one failure ejects its only server.
        let addr = "127.0.0.1:7001".parse().unwrap();
        first.upstreams[0].record_failure(addr);
        let second = build(&yaml("127.0.0.1:7003", "1/s"), Some(&first));
        assert!(
            Arc::ptr_eq(&first.upstreams[0], &second.upstreams[0]),
            "a unchanged"
        );
        assert!(
            !Arc::ptr_eq(&first.upstreams[1], &second.upstreams[1]),
            "b has a new target"
        );
        assert_eq!(
            second.upstreams[0].availability(),
            (1, 0),
            "a's ejection survived"
        );
        assert!(Arc::ptr_eq(&first.rate_limits[0], &second.rate_limits[0]));
        assert!(
            Arc::ptr_eq(&first.rate_limits[1], &second.rate_limits[1]),
            "same path regex"
        );
        let third = build(&yaml("127.0.0.1:7003", "2/s"), Some(&second));
        assert!(Arc::ptr_eq(&second.rate_limits[0], &third.rate_limits[0]));
        assert!(
            !Arc::ptr_eq(&second.rate_limits[1], &third.rate_limits[1]),
            "rate changed"
        );
    }
}
