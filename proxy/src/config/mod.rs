//! Configuration: `palisade.yaml` is parsed into [`file::FileConfig`] (serde shapes), then
//! validated into [`Config`], the internal form the proxy is built from.
//!
//! Errors always name the file, line and column and say how to fix the problem. Validation
//! collects every problem it finds rather than stopping at the first, so `palisade check`
//! lists them all at once.

pub mod file;
mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::identity::client_ip::ClientIpResolver;
use crate::identity::geo::{CountryCode, GeoDb};
use crate::identity::ipset::IpSet;
use crate::ratelimit::rule::{RateLimitRule, RedisSettings};
use crate::rules::compile::CompiledRuleSet;
use crate::rules::eval::AttachedRuleSet;

pub use file::{HealthCheckKind, LogFormat, OversizePolicy};
pub use validate::validate;

/// The embedded default configuration used by `palisade run` without `--config`.
pub const DEFAULT_CONFIG_YAML: &str = include_str!("default.yaml");
/// Name under which the embedded default config is reported in errors.
pub const DEFAULT_CONFIG_NAME: &str = "<embedded default config>";

/// Largest body inspection limit: pingora replays a pre-read body to the upstream from a fixed
/// 64 KiB retry buffer; bytes read past it could not be forwarded (see
/// `shared/notes/pingora-body-inspection.md`).
pub const MAX_INSPECT_LIMIT: u64 = 64 * 1024;

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the configuration came from (a path or [`DEFAULT_CONFIG_NAME`]).
    pub source: String,
    /// Client-facing listeners.
    pub listeners: Vec<Listener>,
    /// Admin listener address.
    pub admin: SocketAddr,
    /// Whether cleartext HTTP/2 (prior knowledge) is accepted on client listeners.
    pub h2c: bool,
    /// Worker threads of the proxy service.
    pub threads: usize,
    /// Logging settings.
    pub log_format: LogFormat,
    /// `tracing` filter directive.
    pub log_level: String,
    /// Timeouts.
    pub timeouts: Timeouts,
    /// Upstream groups; routes refer to them by index.
    pub upstreams: Vec<Upstream>,
    /// Routes, in the order written (matching picks the most specific).
    pub routes: Vec<Route>,
    /// Named IP sets, compiled.
    pub ip_sets: BTreeMap<String, Arc<IpSet>>,
    /// Client IP resolution (trusted proxies and header).
    pub client_ip: ClientIpResolver,
    /// Geo databases, when configured.
    pub geo: Option<Arc<GeoDb>>,
    /// Rate-limit rules, in order.
    pub rate_limits: Vec<RateLimitRule>,
    /// Redis settings for `store: redis` rules.
    pub redis: Option<RedisSettings>,
    /// Loaded rule sets by name.
    pub rule_sets: BTreeMap<String, Arc<CompiledRuleSet>>,
}

/// A client-facing listener.
#[derive(Debug, Clone)]
pub struct Listener {
    /// Bound address.
    pub address: SocketAddr,
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
    /// Real servers.
    Servers(Vec<SocketAddr>),
    /// The built-in demo backend, started on an ephemeral loopback port.
    Demo,
}

/// A validated upstream group.
#[derive(Debug, Clone)]
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
}

/// Active health check settings.
#[derive(Debug, Clone)]
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
#[derive(Debug, Clone, Copy)]
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

/// A validated route.
#[derive(Debug, Clone)]
pub struct Route {
    /// Unique name.
    pub name: String,
    /// Host match.
    pub host: HostMatch,
    /// Path prefix (starts with `/`).
    pub path_prefix: String,
    /// Index into [`Config::upstreams`].
    pub upstream: usize,
    /// Security policy.
    pub policy: RoutePolicy,
}

/// A route's security policy.
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
    /// Client IP allow/deny.
    pub ip: Option<IpPolicy>,
    /// Country allow/deny.
    pub geo: Option<GeoPolicy>,
    /// ASN allow/deny.
    pub asn: Option<AsnPolicy>,
    /// Rule sets with this route's overrides and exclusions, in priority order.
    pub rulesets: Vec<AttachedRuleSet>,
    /// Request validation (JSON Schema / OpenAPI), compiled.
    pub validation: Option<Arc<crate::schema::RouteValidation>>,
}

/// A route's IP policy, with the sets resolved.
#[derive(Debug, Clone)]
pub struct IpPolicy {
    /// Admit only members of these sets (empty = no allow-list).
    pub allow: Vec<(String, Arc<IpSet>)>,
    /// Block members of these sets.
    pub deny: Vec<(String, Arc<IpSet>)>,
}

/// Whether a list admits only its members or blocks them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListMode<T> {
    /// Only these are admitted.
    Allow(Vec<T>),
    /// These are blocked.
    Deny(Vec<T>),
}

/// A route's country policy.
#[derive(Debug, Clone)]
pub struct GeoPolicy {
    /// The list.
    pub countries: ListMode<CountryCode>,
    /// Whether an unknown country is blocked.
    pub block_unknown: bool,
}

/// A route's ASN policy.
#[derive(Debug, Clone)]
pub struct AsnPolicy {
    /// The list.
    pub asns: ListMode<u32>,
    /// Whether an unknown ASN is blocked.
    pub block_unknown: bool,
}

/// One problem found in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    /// 1-based line (0 when unknown).
    pub line: u64,
    /// 1-based column (0 when unknown).
    pub column: u64,
    /// What is wrong and how to fix it.
    pub message: String,
}

/// Every problem found while loading a configuration file.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    /// The file (or [`DEFAULT_CONFIG_NAME`]).
    pub source_name: String,
    /// The problems, in file order.
    pub issues: Vec<ConfigIssue>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, issue) in self.issues.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            if issue.line > 0 {
                write!(
                    f,
                    "{}:{}:{}: {}",
                    self.source_name, issue.line, issue.column, issue.message
                )?;
            } else {
                write!(f, "{}: {}", self.source_name, issue.message)?;
            }
        }
        Ok(())
    }
}

impl ConfigError {
    fn single(source_name: &str, message: String) -> Self {
        ConfigError {
            source_name: source_name.to_string(),
            issues: vec![ConfigIssue {
                line: 0,
                column: 0,
                message,
            }],
        }
    }
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

/// Line, column (1-based, 0 when unknown) and message of a YAML error: the error's own
/// Display repeats the location and adds a snippet; keep just the message. Shared by config
/// and rule-set files.
pub fn yaml_error_parts(e: &serde_saphyr::Error) -> (u64, u64, String) {
    let (line, column) = e
        .location()
        .map(|l| (l.line(), l.column()))
        .unwrap_or((0, 0));
    let full = e.to_string();
    let first = full.lines().next().unwrap_or_default();
    let message = first
        .strip_prefix("error: ")
        .unwrap_or(first)
        .split_once(": ")
        .filter(|(loc, _)| loc.starts_with("line "))
        .map(|(_, m)| m.to_string())
        .unwrap_or_else(|| first.to_string());
    (line, column, message)
}

/// The YAML options of every file Palisade reads (config, rule sets, schemas): YAML 1.2
/// booleans only, so `enum: [yes, no]`, `name: n` or the country `NO` stay strings instead of
/// silently becoming `true`/`false` as YAML 1.1 would have it.
pub fn yaml_options() -> serde_saphyr::Options {
    serde_saphyr::options! { strict_booleans: true }
}

/// Parses YAML text into the file shapes; the error carries line and column.
pub fn parse(source_name: &str, text: &str) -> Result<file::FileConfig, ConfigError> {
    serde_saphyr::from_str_with_options::<file::FileConfig>(text, yaml_options()).map_err(|e| {
        let (line, column, message) = yaml_error_parts(&e);
        ConfigError {
            source_name: source_name.to_string(),
            issues: vec![ConfigIssue {
                line,
                column,
                message,
            }],
        }
    })
}

/// Loads, parses and validates a configuration file, applying overrides.
pub fn load_file(path: &Path, overrides: &Overrides) -> Result<Config, ConfigError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::single(&name, format!("cannot read the config file: {e}")))?;
    let parsed = parse(&name, &text)?;
    validate(&name, parsed, overrides, &base_dir(Some(path)))
}

/// Parses and validates configuration text, applying overrides; relative paths in it are
/// resolved against the current directory.
pub fn load_str(name: &str, text: &str, overrides: &Overrides) -> Result<Config, ConfigError> {
    let parsed = parse(name, text)?;
    validate(name, parsed, overrides, Path::new("."))
}

/// Loads the embedded default configuration, applying overrides.
pub fn load_default(overrides: &Overrides) -> Result<Config, ConfigError> {
    load_str(DEFAULT_CONFIG_NAME, DEFAULT_CONFIG_YAML, overrides)
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
