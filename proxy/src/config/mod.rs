//! Configuration, steps 1 and 2 of parse → check → compile → snapshot → swap: `palisade.yaml`
//! is parsed into [`file::FileConfig`] (serde shapes), then checked into [`Config`], plain data
//! the compile step (`crate::compile`) turns into a running snapshot.
//!
//! This module has no side effects beyond reading the one config file: it opens no database,
//! reads no rule set or schema, resolves no address and compiles nothing, and it imports no
//! stage. Errors always name the file, line and column and say how to fix the problem; checking
//! collects every problem rather than stopping at the first, so `palisade check` lists them all.

mod check;
pub mod file;
pub mod located;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_saphyr::{Location, Spanned};

pub use check::{check, check_all};
pub use file::{HealthCheckKind, LogFormat, OversizePolicy, RuleAction};
pub use located::{yaml_error_parts, Problem, Problems};

/// The embedded default configuration used by `palisade run` without `--config`.
pub const DEFAULT_CONFIG_YAML: &str = include_str!("default.yaml");
/// Name under which the embedded default config is reported in errors.
pub const DEFAULT_CONFIG_NAME: &str = "<embedded default config>";

/// Largest body inspection limit: pingora replays a pre-read body to the upstream from a fixed
/// 64 KiB retry buffer; bytes read past it could not be forwarded (see
/// `shared/notes/pingora-body-inspection.md`).
pub const MAX_INSPECT_LIMIT: u64 = 64 * 1024;

pub use crate::files::{read_text_file, MAX_TEXT_FILE};

/// A checked configuration: plain data, nothing opened or compiled.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the configuration came from (a path or [`DEFAULT_CONFIG_NAME`]), as errors name it.
    pub source: Arc<str>,
    /// The config file, when it came from one (watched for reloads).
    pub path: Option<PathBuf>,
    /// Directory that relative paths in the config are resolved against.
    pub base_dir: PathBuf,
    /// Hash of the config text (`GET /config`).
    pub text_hash: String,
    /// Client-facing listeners.
    pub listeners: Vec<Listener>,
    /// Admin listener address.
    pub admin: SocketAddr,
    /// Bearer token of the state-changing admin endpoints.
    pub admin_token: Option<String>,
    /// Whether cleartext HTTP/2 (prior knowledge) is accepted on client listeners.
    pub h2c: bool,
    /// Worker threads of the proxy service.
    pub threads: usize,
    /// Logging settings.
    pub log_format: LogFormat,
    /// `tracing` filter directive.
    pub log_level: String,
    /// Whether files are watched for reloads.
    pub watch: bool,
    /// Quiet period before a watched change is reloaded.
    pub watch_debounce: Duration,
    /// Timeouts.
    pub timeouts: Timeouts,
    /// How client requests are read.
    pub http: Http,
    /// Upstream groups; routes refer to them by index.
    pub upstreams: Vec<Upstream>,
    /// Routes, in the order written (matching picks the most specific).
    pub routes: Vec<Route>,
    /// Named IP sets (CIDRs checked; files are read by the compile step).
    pub ip_sets: BTreeMap<String, file::IpSetConfig>,
    /// Client IP resolution (trusted proxies and header).
    pub client_ip: Option<file::ClientIpConfig>,
    /// Geo databases.
    pub geoip: Option<file::GeoIpConfig>,
    /// Token issuers.
    pub auth: Option<file::AuthConfig>,
    /// Cedar policies.
    pub authorization: Option<file::AuthorizationConfig>,
    /// Rate-limit rules, in order.
    pub rate_limits: Vec<file::RateLimitConfig>,
    /// Redis for `store: redis` rules.
    pub redis: Option<file::RedisConfig>,
    /// Rule-set files, directories or `builtin:managed`, as written.
    pub rulesets: Vec<Spanned<String>>,
    /// The decision log, when configured.
    pub decision_log: Option<DecisionLog>,
}

/// Headers the decision log redacts by default.
pub const DEFAULT_REDACTED_HEADERS: &[&str] = &[
    "authorization",
    "cookie",
    "set-cookie",
    "x-api-key",
    "proxy-authorization",
];

/// The decision log, checked (see [`file::DecisionLogConfig`]).
#[derive(Debug, Clone, PartialEq)]
pub struct DecisionLog {
    /// Lines to stdout.
    pub stdout: bool,
    /// Lines appended to this file.
    pub file: Option<PathBuf>,
    /// Fraction of allowed requests logged.
    pub allowed_sample: f64,
    /// Lower-case header names logged as `[redacted]`.
    pub redact_headers: Vec<String>,
    /// Query parameter names logged as `[redacted]`.
    pub redact_query: Vec<String>,
    /// Queue length.
    pub queue: usize,
}

impl Config {
    /// A path of the config, resolved against its directory.
    pub fn resolve(&self, p: &str) -> PathBuf {
        resolve_path(&self.base_dir, p)
    }
}

/// Resolves a path written in a config file against the file's directory.
pub fn resolve_path(base_dir: &Path, p: &str) -> PathBuf {
    let path = Path::new(p);
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        base_dir.join(path)
    }
}

/// A client-facing listener.
#[derive(Debug, Clone)]
pub struct Listener {
    /// Bound address.
    pub address: SocketAddr,
    /// TLS termination, when configured.
    pub tls: Option<file::TlsConfig>,
    /// Redirect every request to `https://` on this port instead of proxying.
    pub redirect_to_https: Option<u16>,
    /// Read a PROXY protocol header from trusted peers.
    pub proxy_protocol: bool,
}

/// How client requests are read, defaults applied (see [`file::HttpConfig`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Http {
    /// Meaning of `%2F` in paths.
    pub encoded_slash: file::EncodedSlashConfig,
    /// Default forwarded path.
    pub forward_path: file::ForwardPath,
    /// Largest request head in bytes.
    pub max_head_size: usize,
    /// Most header fields.
    pub max_headers: usize,
    /// Longest header value in bytes.
    pub max_header_size: usize,
    /// Deadline for the request head.
    pub head_timeout: Duration,
    /// Deadline for an inspected body.
    pub body_timeout: Duration,
    /// Connections per client address (0 = no limit).
    pub max_connections_per_ip: usize,
    /// Concurrent HTTP/2 streams per connection.
    pub h2_max_concurrent_streams: u32,
    /// Request bodies with a content coding.
    pub content_encoding: file::ContentEncodingPolicy,
    /// Lower-case names of the headers only trusted proxies may send.
    pub untrusted_headers: Vec<String>,
}

/// Headers only a trusted proxy may set (identity, routing and method overrides).
pub const DEFAULT_UNTRUSTED_HEADERS: &[&str] = &[
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-forwarded-server",
    "x-forwarded-scheme",
    "x-forwarded-ssl",
    "x-real-ip",
    "true-client-ip",
    "cf-connecting-ip",
    "x-client-ip",
    "x-cluster-client-ip",
    "fastly-client-ip",
    "x-original-url",
    "x-rewrite-url",
    "x-original-host",
    "x-host",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

impl Default for Http {
    fn default() -> Self {
        Http {
            encoded_slash: file::EncodedSlashConfig::Decode,
            forward_path: file::ForwardPath::Normalized,
            max_head_size: 32 * 1024,
            max_headers: 100,
            max_header_size: 8 * 1024,
            head_timeout: Duration::from_secs(15),
            body_timeout: Duration::from_secs(30),
            max_connections_per_ip: 256,
            h2_max_concurrent_streams: 100,
            content_encoding: file::ContentEncodingPolicy::Refuse,
            untrusted_headers: DEFAULT_UNTRUSTED_HEADERS
                .iter()
                .map(|s| s.to_string())
                .collect(),
        }
    }
}

/// Concrete timeouts with defaults applied.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Client read timeout.
    pub client_read: Duration,
    /// Client write timeout.
    pub client_write: Duration,
    /// Client keep-alive idle timeout.
    pub client_keepalive: Duration,
    /// Upstream connect timeout.
    pub upstream_connect: Duration,
    /// Upstream read timeout.
    pub upstream_read: Duration,
    /// Upstream write timeout.
    pub upstream_write: Duration,
    /// Upstream idle pooled-connection timeout.
    pub upstream_idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            client_read: Duration::from_secs(60),
            client_write: Duration::from_secs(60),
            client_keepalive: Duration::from_secs(60),
            upstream_connect: Duration::from_secs(5),
            upstream_read: Duration::from_secs(60),
            upstream_write: Duration::from_secs(60),
            upstream_idle: Duration::from_secs(60),
        }
    }
}

/// Where an upstream group's servers are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamTargets {
    /// Real servers: `host:port` as written (resolved by the compile step), with where.
    Servers(Vec<Target>),
    /// The built-in demo backend, started on an ephemeral loopback port.
    Demo,
}

/// One `host:port` target and where it is written (`None` for `--upstream`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `host:port`.
    pub address: String,
    /// Location in the config file.
    pub at: Option<Location>,
}

/// A checked upstream group.
#[derive(Debug, Clone, PartialEq)]
pub struct Upstream {
    /// Name from the config.
    pub name: String,
    /// Its servers.
    pub targets: UpstreamTargets,
    /// `Host` header override.
    pub host_header: Option<String>,
    /// Active health check, if any.
    pub health_check: Option<HealthCheck>,
    /// Passive health settings (always on; defaults apply).
    pub passive: PassiveHealth,
    /// TLS to the servers, when configured.
    pub tls: Option<UpstreamTls>,
}

/// TLS to the servers of an upstream group (see [`file::UpstreamTlsConfig`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTls {
    /// SNI and verified name; `None`: each target's host.
    pub sni: Option<String>,
    /// CA bundle file and where it is named; `None`: the system roots.
    pub ca: Option<(String, Location)>,
    /// Verify the certificate and name.
    pub verify: bool,
    /// Client certificate and key files, and where they are named.
    pub client_cert: Option<(String, String, Location)>,
    /// Offer HTTP/2.
    pub h2: bool,
}

/// Active health check settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// Protocol.
    pub kind: HealthCheckKind,
    /// HTTP path (for `http`).
    pub path: String,
    /// Interval between rounds.
    pub interval: Duration,
    /// Successes needed to go up.
    pub healthy_after: usize,
    /// Failures needed to go down.
    pub unhealthy_after: usize,
}

/// Passive health settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PassiveHealth {
    /// Consecutive connect failures before ejection.
    pub failures: u32,
    /// Ejection duration.
    pub ejection: Duration,
}

impl Default for PassiveHealth {
    fn default() -> Self {
        PassiveHealth {
            failures: 3,
            ejection: Duration::from_secs(10),
        }
    }
}

/// How a route matches the `Host` header.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostMatch {
    /// Any host.
    Any,
    /// Exactly this host (lower-case, no port).
    Exact(String),
    /// Any sub-domain of this suffix (stored with its leading dot, e.g. `.example.com`).
    Suffix(String),
}

/// A checked route.
#[derive(Debug, Clone)]
pub struct Route {
    /// Unique name.
    pub name: String,
    /// Where the route is written (errors of the compile step about the route point here).
    pub at: Location,
    /// Host match.
    pub host: HostMatch,
    /// Path prefix (starts with `/`).
    pub path_prefix: String,
    /// Index into [`Config::upstreams`].
    pub upstream: usize,
    /// Security policy.
    pub policy: RoutePolicy,
}

/// A paranoia level as written on a rule or a route: 1 to 4 (as in the OWASP CRS).
pub fn paranoia_level(level: u8) -> Result<u8, String> {
    if (1..=4).contains(&level) {
        Ok(level)
    } else {
        Err(format!("invalid paranoia level {level}: use 1, 2, 3 or 4"))
    }
}

/// A route's security policy, checked; each stage builds its own policy type from its part.
#[derive(Debug, Clone)]
pub struct RoutePolicy {
    /// Allowed methods (`None` = all).
    pub methods: Option<Vec<http::Method>>,
    /// Route-wide block: status and reason.
    pub deny: Option<(u16, String)>,
    /// Body inspection limit in bytes (≤ [`MAX_INSPECT_LIMIT`]).
    pub inspect_limit: usize,
    /// Oversize policy.
    pub oversize: OversizePolicy,
    /// Which path the backend receives.
    pub forward_path: file::ForwardPath,
    /// Client IP allow/deny by set name (names checked).
    pub ip: Option<file::IpPolicyConfig>,
    /// Country allow/deny (codes checked, exactly one list).
    pub geo: Option<file::GeoPolicyConfig>,
    /// ASN allow/deny (exactly one list).
    pub asn: Option<file::AsnPolicyConfig>,
    /// Paranoia level (1–4): rules above it are off on this route.
    pub paranoia: u8,
    /// Rule sets attached, with this route's tuning.
    pub rulesets: Vec<file::RuleSetRefConfig>,
    /// Per-route exclusions.
    pub exclusions: Vec<file::ExclusionConfig>,
    /// Request validation.
    pub validate: Option<file::ValidateConfig>,
    /// Bearer-token requirement.
    pub auth: Option<file::RouteAuthConfig>,
    /// Cedar authorization.
    pub authorize: Option<file::RouteAuthorizeConfig>,
    /// MCP server settings (the route's bodies are JSON-RPC).
    pub mcp: Option<file::McpConfig>,
}

/// Overrides given on the command line; they win over the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// Replace all listeners with these addresses.
    pub listen: Vec<SocketAddr>,
    /// Replace the admin address.
    pub admin: Option<SocketAddr>,
    /// Send every route to this one upstream (`http://host:port`).
    pub upstream: Option<String>,
    /// Worker threads.
    pub threads: Option<usize>,
}

/// The YAML options of every file Palisade reads (config, rule sets, schemas): YAML 1.2
/// booleans only, so `enum: [yes, no]`, `name: n` or the country `NO` stay strings instead of
/// silently becoming `true`/`false` as YAML 1.1 would have it.
pub fn yaml_options() -> serde_saphyr::Options {
    serde_saphyr::options! { strict_booleans: true }
}

/// Parses YAML text into the file shapes; the error carries line and column.
pub fn parse(source: &Arc<str>, text: &str) -> Result<file::FileConfig, Problems> {
    serde_saphyr::from_str_with_options::<file::FileConfig>(text, yaml_options())
        .map_err(|e| Problem::yaml(source, &e).into())
}

/// Reads, parses and checks a configuration file, applying overrides.
pub fn load_file(path: &Path, overrides: &Overrides) -> Result<Config, Problems> {
    let name: Arc<str> = path.display().to_string().into();
    let text = read_text_file(path, MAX_TEXT_FILE)
        .map_err(|e| Problem::file(&name, format!("cannot read the config file: {e}")))?;
    let parsed = parse(&name, &text)?;
    let mut config = check(&name, parsed, overrides, &base_dir(Some(path)))?;
    config.path = Some(path.to_path_buf());
    config.text_hash = content_hash(text.as_bytes());
    Ok(config)
}

/// Parses and checks configuration text, applying overrides; relative paths in it are
/// resolved against the current directory.
pub fn load_str(name: &str, text: &str, overrides: &Overrides) -> Result<Config, Problems> {
    let name: Arc<str> = name.into();
    let parsed = parse(&name, text)?;
    let mut config = check(&name, parsed, overrides, Path::new("."))?;
    config.text_hash = content_hash(text.as_bytes());
    Ok(config)
}

/// Loads the embedded default configuration, applying overrides.
pub fn load_default(overrides: &Overrides) -> Result<Config, Problems> {
    load_str(DEFAULT_CONFIG_NAME, DEFAULT_CONFIG_YAML, overrides)
}

/// Loads `path`, or the embedded default without one.
pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Config, Problems> {
    match path {
        Some(p) => load_file(p, overrides),
        None => load_default(overrides),
    }
}

/// Reads, parses and checks `path` (or the embedded default), returning the config together
/// with the problems the check found: `Err` only when the file cannot be read or parsed.
pub fn load_all(
    path: Option<&Path>,
    overrides: &Overrides,
) -> Result<(Config, Problems), Problems> {
    let (name, text, dir): (Arc<str>, String, PathBuf) = match path {
        Some(p) => {
            let name: Arc<str> = p.display().to_string().into();
            let text = read_text_file(p, MAX_TEXT_FILE)
                .map_err(|e| Problem::file(&name, format!("cannot read the config file: {e}")))?;
            (name, text, base_dir(Some(p)))
        }
        None => (
            DEFAULT_CONFIG_NAME.into(),
            DEFAULT_CONFIG_YAML.into(),
            PathBuf::from("."),
        ),
    };
    let parsed = parse(&name, &text)?;
    let (mut config, problems) = check_all(&name, parsed, overrides, &dir);
    config.path = path.map(Path::to_path_buf);
    config.text_hash = content_hash(text.as_bytes());
    Ok((config, problems))
}

/// A short content hash (FNV-1a, 64 bit, hex) identifying a file's version in `GET /config`:
/// not a security boundary, only "did this file change".
pub fn content_hash(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// The JSON Schema (draft 2020-12) of `palisade.yaml`, generated from the parsing structs so
/// it cannot drift from what the loader accepts. Committed as
/// `schemas/palisade-config.schema.json` (a test checks it is current).
pub fn json_schema() -> String {
    let mut schema = schemars::schema_for!(file::FileConfig);
    schema.insert(
        "$id".into(),
        "https://palisade.dev/schemas/palisade-config.schema.json".into(),
    );
    schema.insert(
        "title".into(),
        "Palisade configuration (palisade.yaml)".into(),
    );
    let mut text = serde_json::to_string_pretty(&schema).unwrap_or_default();
    text.push('\n');
    text
}

/// The directory relative paths in a config file are resolved against.
pub fn base_dir(config_path: Option<&Path>) -> PathBuf {
    config_path
        .and_then(Path::parent)
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}
