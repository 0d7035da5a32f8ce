//! Config step 1 (parse): the shapes of `palisade.yaml`, exactly as written by operators.
//!
//! Every struct denies unknown keys so a typo is an error with its line and column, never a
//! silently ignored setting. Value types that can be wrong on their own (durations, sizes,
//! socket addresses, HTTP methods) reject bad input while parsing, so `serde-saphyr` reports
//! the exact location. Cross-field checks (unknown upstream names, duplicates) happen in
//! [`super::check`], which uses the [`Spanned`] locations kept here.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Deserializer};
use serde_saphyr::Spanned;

/// The whole `palisade.yaml` file.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Addresses the proxy listens on for client traffic.
    #[serde(default)]
    pub listeners: Vec<ListenerConfig>,
    /// The admin listener (`/healthz`, `/readyz`, `/metrics`).
    #[serde(default)]
    pub admin: AdminConfig,
    /// Accept HTTP/2 over cleartext (prior knowledge) on the client listeners, besides HTTP/1.1.
    #[serde(default)]
    pub h2c: bool,
    /// Worker threads; 0 or absent means one per core.
    #[serde(default)]
    pub threads: Option<usize>,
    /// Log format and level.
    #[serde(default)]
    pub logging: LoggingConfig,
    /// Hot reload (file watching).
    #[serde(default)]
    pub reload: ReloadConfig,
    /// Client and upstream timeouts.
    #[serde(default)]
    pub timeouts: TimeoutsConfig,
    /// Request body inspection defaults (routes may override).
    #[serde(default)]
    pub body: BodyConfig,
    /// How client requests are read: path normalization, limits on the head, deadlines,
    /// connection limits, body encodings and the headers untrusted clients may not set.
    #[serde(default)]
    pub http: HttpConfig,
    /// Named upstream groups.
    #[serde(default)]
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    /// Named IP sets, used by route policies (`ip: {allow, deny}`), trusted proxies and rules.
    #[serde(default)]
    pub ip_sets: BTreeMap<String, IpSetConfig>,
    /// How the client address is found behind proxies.
    #[serde(default)]
    pub client_ip: Option<ClientIpConfig>,
    /// MaxMind databases for country and ASN.
    #[serde(default)]
    pub geoip: Option<GeoIpConfig>,
    /// Token issuers that routes accept bearer tokens (JWT) from (`policy.auth`).
    #[serde(default)]
    pub auth: Option<AuthConfig>,
    /// Cedar policies for routes with `policy.authorize` and MCP routes.
    #[serde(default)]
    pub authorization: Option<AuthorizationConfig>,
    /// Rate-limit rules, evaluated in order after the ip and geo stages.
    #[serde(default)]
    pub rate_limits: Vec<RateLimitConfig>,
    /// Redis for fleet-wide rate limits (`store: redis`).
    #[serde(default)]
    pub redis: Option<RedisConfig>,
    /// Rule-set files or directories of them (every `*.yaml`), relative to this file, or
    /// `builtin:managed` for the managed rule sets compiled into the binary.
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub rulesets: Vec<Spanned<String>>,
    /// Routes, matched by host and longest path prefix.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
}

/// One client-facing listener.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// `IP:port` to bind, e.g. `127.0.0.1:8080` or `[::1]:8080`.
    #[schemars(with = "String")]
    pub address: SocketAddr,
    /// Terminate TLS (1.2 and 1.3, ALPN `h2` and `http/1.1`) on this listener. Certificates
    /// are reloaded with the config (and when their files change); turning TLS on or off
    /// needs a restart.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Answer every request on this listener with a redirect to `https://` on this port
    /// (301 for GET and HEAD, 308 otherwise), instead of proxying: the port-80 listener of
    /// an HTTPS site. Not with `tls`.
    #[serde(default)]
    pub redirect_to_https: Option<u16>,
    /// Expect a PROXY protocol header (v1 or v2, as AWS NLB and HAProxy send) at the start
    /// of each connection, and take the client address from it. Only peers listed in
    /// `client_ip.trusted_proxies` may send one; connections from any other address, or
    /// without a header, are closed.
    #[serde(default)]
    pub proxy_protocol: bool,
}

/// TLS termination on a listener.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Certificates with their keys. The client's SNI picks one: an exact name first, then
    /// the longest matching wildcard (`*.example.com` serves `api.example.com`, not
    /// `example.com` nor `a.b.example.com`). The first certificate serves clients without
    /// SNI or with a name no certificate has.
    pub certificates: Vec<CertificateConfig>,
    /// Ask clients for certificates signed by a CA of a bundle (mTLS). Reloaded with the
    /// config like the certificates.
    #[serde(default)]
    pub client_auth: Option<ClientAuthConfig>,
    /// Lowest TLS version accepted: `"1.2"` (default) or `"1.3"`.
    #[serde(default)]
    pub min_version: TlsVersionConfig,
    /// Cipher suites offered, by their IANA names (`TLS13_AES_128_GCM_SHA256`,
    /// `TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384`, …). Default: every suite rustls ships —
    /// AEAD only (AES-GCM, ChaCha20-Poly1305) with forward secrecy; no CBC, RC4, 3DES or RSA
    /// key exchange exists to turn off.
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub cipher_suites: Vec<Spanned<String>>,
}

/// A TLS protocol version.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
pub enum TlsVersionConfig {
    /// TLS 1.2 and 1.3.
    #[default]
    #[serde(rename = "1.2")]
    Tls12,
    /// TLS 1.3 only.
    #[serde(rename = "1.3")]
    Tls13,
}

/// Client certificates (mTLS) on a TLS listener.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClientAuthConfig {
    /// PEM file with the CA certificates that sign accepted client certificates; relative to
    /// the config file.
    #[schemars(with = "String")]
    pub ca: Spanned<String>,
    /// Refuse clients without a certificate (default `true`). With `false`, a certificate is
    /// optional but, when sent, must verify.
    #[serde(default = "default_true")]
    pub required: bool,
}

/// One certificate of a TLS listener.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CertificateConfig {
    /// PEM file with the certificate chain, leaf first; relative to the config file.
    #[schemars(with = "String")]
    pub cert: Spanned<String>,
    /// PEM file with the private key (PKCS#8, PKCS#1 RSA or SEC1 EC); relative to the config
    /// file.
    #[schemars(with = "String")]
    pub key: Spanned<String>,
    /// Host names it serves (`api.example.com`, `*.example.com`). Default: the DNS names of
    /// the certificate's subjectAltName.
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub names: Vec<Spanned<String>>,
}

/// Admin listener settings.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// `IP:port` of the admin listener; keep it on loopback or a private network.
    #[serde(default = "default_admin_address")]
    #[schemars(with = "String")]
    pub address: SocketAddr,
    /// Bearer token for the endpoints that change state (`POST /reload`). Without it they
    /// answer only clients on loopback; with it, only requests carrying
    /// `Authorization: Bearer <token>`. `PALISADE_ADMIN_TOKEN` overrides it.
    #[serde(default)]
    pub token: Option<String>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            address: default_admin_address(),
            token: None,
        }
    }
}

/// Hot reload: when Palisade rebuilds its snapshot from the files on its own.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReloadConfig {
    /// Watch the config, rule sets, schema documents, IP list files and mmdb files, and reload
    /// when one changes (default true). SIGHUP and `POST /reload` work either way.
    #[serde(default)]
    pub watch: Option<bool>,
    /// How long the files must stay unchanged before a watched change is reloaded (default
    /// 100ms); a file that keeps changing is reloaded at the latest 1s after the first change.
    #[serde(default)]
    pub debounce: Option<HumanDuration>,
}

fn default_admin_address() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9090))
}

/// Logging settings.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LoggingConfig {
    /// `text` (default) or `json`.
    #[serde(default)]
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `palisade=debug`; `RUST_LOG` overrides it.
    #[serde(default)]
    pub level: Option<String>,
    /// Decision logs: one JSON line per blocked or counted request (and a sample of allowed
    /// ones), as AWS WAF logs them.
    #[serde(default)]
    pub decisions: Option<DecisionLogConfig>,
}

/// Where and what the decision log writes.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DecisionLogConfig {
    /// Write lines to stdout (default: `true` when no `file` is given).
    #[serde(default)]
    pub stdout: Option<bool>,
    /// Append lines to this file, relative to the config file; reopened on `SIGUSR1` (for
    /// logrotate's `postrotate`).
    #[serde(default)]
    pub file: Option<String>,
    /// Fraction of allowed requests logged as well, 0 to 1 (default 0).
    #[serde(default)]
    pub allowed_sample: Option<f64>,
    /// Headers whose values are never logged in clear (replaces the default list:
    /// `authorization`, `cookie`, `set-cookie`, `x-api-key`, `proxy-authorization`).
    #[serde(default)]
    pub redact_headers: Option<Vec<String>>,
    /// Query parameters whose values are never logged in clear.
    #[serde(default)]
    pub redact_query: Vec<String>,
    /// Lines waiting for the writer (default 10000). A sink that cannot keep up never slows
    /// requests: lines past this are dropped and counted
    /// (`palisade_decision_log_dropped_total`).
    #[serde(default)]
    pub queue: Option<usize>,
}

/// Log line format.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Timeouts; every value is a duration like `500ms`, `5s`, `2m`.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TimeoutsConfig {
    /// Max wait for the next bytes from the client (headers or body).
    pub client_read: Option<HumanDuration>,
    /// Max wait for the client to accept response bytes.
    pub client_write: Option<HumanDuration>,
    /// How long an idle client keep-alive connection is kept.
    pub client_keepalive: Option<HumanDuration>,
    /// Max time to establish a TCP connection to an upstream.
    pub upstream_connect: Option<HumanDuration>,
    /// Max wait for the next bytes from the upstream; expiry answers 504.
    pub upstream_read: Option<HumanDuration>,
    /// Max wait for the upstream to accept request bytes.
    pub upstream_write: Option<HumanDuration>,
    /// How long an idle pooled upstream connection is kept.
    pub upstream_idle: Option<HumanDuration>,
}

/// Body inspection settings.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BodyConfig {
    /// How many body bytes are buffered for inspection (at most 64KiB, see `config::check`).
    pub inspect_limit: Option<HumanSize>,
    /// What to do with a body larger than `inspect_limit`.
    pub oversize: Option<OversizePolicy>,
}

/// How client requests are read and what they may contain (see `SECURITY.md`).
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// What an encoded slash (`%2F`) in a path is: `decode` (a separator, default), `reject`
    /// (400) or `keep` (part of the segment; forwarded encoded).
    #[serde(default)]
    pub encoded_slash: Option<EncodedSlashConfig>,
    /// Which path the backend receives: `normalized` (default: decoded, dot segments and `;`
    /// parameters removed, slashes merged, re-encoded) or `original` (as the client sent it;
    /// routing and inspection still use the normalized path). Routes may override it.
    #[serde(default)]
    pub forward_path: Option<ForwardPath>,
    /// Largest request head (request line and headers) in bytes; larger gets 431 (default
    /// 32KiB).
    #[serde(default)]
    pub max_head_size: Option<HumanSize>,
    /// Most header fields in a request; more gets 431 (default 100).
    #[serde(default)]
    pub max_headers: Option<usize>,
    /// Longest single header field value; longer gets 431 (default 8KiB).
    #[serde(default)]
    pub max_header_size: Option<HumanSize>,
    /// Deadline for the whole request head from its first byte; expiry answers 408 (default
    /// 15s). Stops clients that drip a header byte at a time.
    #[serde(default)]
    pub head_timeout: Option<HumanDuration>,
    /// Deadline for reading an inspected body, from the end of the head; expiry answers 408
    /// (default 30s).
    #[serde(default)]
    pub body_timeout: Option<HumanDuration>,
    /// Most open client connections per client address (the TCP peer); more are closed at
    /// once (default 256; 0 = no limit). Trusted proxies (`client_ip.trusted_proxies`) are
    /// not limited.
    #[serde(default)]
    pub max_connections_per_ip: Option<usize>,
    /// HTTP/2 (over TLS, or h2c): most concurrent streams per connection, advertised to the
    /// client (default 100). Applies at start-up. A client that resets streams faster than
    /// they are served (rapid reset) or floods CONTINUATION frames past `max_head_size` loses
    /// its connection.
    #[serde(default)]
    pub h2_max_concurrent_streams: Option<u32>,
    /// Bodies with a `Content-Encoding` (gzip, deflate): `refuse` (415, default) or `decode`
    /// (inflated for inspection, at most the inspection limit, and forwarded as sent).
    #[serde(default)]
    pub content_encoding: Option<ContentEncodingPolicy>,
    /// Headers that only a trusted proxy (`client_ip.trusted_proxies`) may set: removed from
    /// requests of other clients before anything reads them. Default: `Forwarded`, the
    /// `X-Forwarded-*` family, `X-Real-IP`, `True-Client-IP`, `CF-Connecting-IP`,
    /// `X-Client-IP`, `X-Cluster-Client-IP`, `Fastly-Client-IP`, `X-Original-URL`,
    /// `X-Rewrite-URL`, `X-Original-Host`, `X-Host` and the method overrides
    /// (`X-HTTP-Method-Override`, `X-HTTP-Method`, `X-Method-Override`).
    #[serde(default)]
    pub untrusted_headers: Option<Vec<String>>,
}

/// What an encoded slash in a path means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum EncodedSlashConfig {
    /// A separator.
    Decode,
    /// 400.
    Reject,
    /// Part of the segment.
    Keep,
}

/// Which path the backend receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ForwardPath {
    /// The normalized path, re-encoded.
    Normalized,
    /// The path as received.
    Original,
}

/// What happens to a request body with a `Content-Encoding`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ContentEncodingPolicy {
    /// 415 `unsupported_content_encoding`.
    Refuse,
    /// Inflate gzip/deflate for inspection; other codings get 415.
    Decode,
}

/// What happens to a request whose body exceeds the inspection limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OversizePolicy {
    /// Reject with 413 before reading the body.
    Block,
    /// Forward the request; inspect what could be buffered (or only headers).
    Continue,
}

/// A named group of upstream servers.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// `host:port` of each server (IP literal or a name resolved at load time).
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub targets: Vec<Spanned<String>>,
    /// Use the built-in demo backend (a JSON echo on an ephemeral loopback port) instead of
    /// `targets`.
    #[serde(default)]
    #[schemars(with = "Option<bool>")]
    pub demo: Option<Spanned<bool>>,
    /// Value of the `Host` header sent upstream; default: the client's.
    #[serde(default)]
    pub host_header: Option<String>,
    /// Active health checking.
    #[serde(default)]
    pub health_check: Option<HealthCheckConfig>,
    /// Passive health: eject a server after consecutive connection failures.
    #[serde(default)]
    pub passive: Option<PassiveHealthConfig>,
    /// Connect to the servers over TLS. Reloaded with the config.
    #[serde(default)]
    pub tls: Option<UpstreamTlsConfig>,
}

/// TLS to the servers of an upstream group.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsConfig {
    /// Name sent as SNI and checked against the server's certificate. Default: the host of
    /// each target (an IP target is checked against the certificate's IP addresses).
    #[serde(default)]
    pub sni: Option<String>,
    /// PEM file with the CA certificates that sign the servers' certificates; relative to
    /// the config file. Default: the system's trusted roots.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub ca: Option<Spanned<String>>,
    /// Verify the server's certificate and name (default `true`). `false` accepts any
    /// certificate: an attacker on the path can read and change the traffic.
    #[serde(default = "default_true")]
    pub verify: bool,
    /// Client certificate presented to the servers (mTLS to the upstream).
    #[serde(default)]
    pub client_cert: Option<UpstreamClientCertConfig>,
    /// Offer HTTP/2 (ALPN `h2`, falling back to HTTP/1.1 when the server does not speak it).
    #[serde(default)]
    pub h2: bool,
}

/// A client certificate for TLS to an upstream.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpstreamClientCertConfig {
    /// PEM file with the certificate chain, leaf first; relative to the config file.
    #[schemars(with = "String")]
    pub cert: Spanned<String>,
    /// PEM file with its private key; relative to the config file.
    #[schemars(with = "String")]
    pub key: Spanned<String>,
}

/// Active health check of every target of an upstream.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckConfig {
    /// `tcp` (connect only) or `http` (GET `path`, expect 2xx).
    #[serde(default)]
    pub kind: HealthCheckKind,
    /// Path for `http` checks.
    #[serde(default)]
    pub path: Option<String>,
    /// Time between checks (default 5s).
    #[serde(default)]
    pub interval: Option<HumanDuration>,
    /// Consecutive successes to mark a target up (default 1).
    #[serde(default)]
    pub healthy_after: Option<usize>,
    /// Consecutive failures to mark a target down (default 1).
    #[serde(default)]
    pub unhealthy_after: Option<usize>,
}

/// Active health check protocol.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum HealthCheckKind {
    /// TCP connect.
    #[default]
    Tcp,
    /// HTTP GET expecting a 2xx.
    Http,
}

/// Passive health: connection failures seen by real requests.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PassiveHealthConfig {
    /// Consecutive connection failures before the target is ejected (default 3).
    #[serde(default)]
    pub failures: Option<u32>,
    /// How long an ejected target is skipped (default 10s).
    #[serde(default)]
    pub ejection: Option<HumanDuration>,
}

/// One route: which requests it takes, where they go, and the security policy applied.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Unique name, used in logs and metric labels.
    #[schemars(with = "String")]
    pub name: Spanned<String>,
    /// Host to match: exact (`api.example.com`) or wildcard (`*.example.com`); absent = any.
    #[serde(default)]
    pub host: Option<String>,
    /// Path prefix to match (default `/`); the longest matching prefix wins.
    #[serde(default)]
    pub path_prefix: Option<String>,
    /// Name of the upstream group requests are sent to.
    #[schemars(with = "String")]
    pub upstream: Spanned<String>,
    /// Security policy for this route.
    #[serde(default)]
    pub policy: PolicyConfig,
}

/// A route's security policy (later stages add their sections here).
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Only these methods are accepted; others get 405.
    #[serde(default)]
    pub methods: Option<Vec<Method>>,
    /// Block every request of the route (e.g. an internal path).
    #[serde(default)]
    pub deny: Option<DenyConfig>,
    /// Body inspection overrides for this route.
    #[serde(default)]
    pub body: Option<BodyConfig>,
    /// Which path the backend receives for this route (overrides `http.forward_path`).
    #[serde(default)]
    pub forward_path: Option<ForwardPath>,
    /// Client IP allow/deny by IP set name.
    #[serde(default)]
    pub ip: Option<IpPolicyConfig>,
    /// Country allow/deny (ISO 3166-1 alpha-2 codes); needs `geoip.country_db`.
    #[serde(default)]
    pub geo: Option<GeoPolicyConfig>,
    /// Autonomous-system allow/deny; needs `geoip.asn_db`.
    #[serde(default)]
    pub asn: Option<AsnPolicyConfig>,
    /// Paranoia level 1–4 (default 1): the route runs the rules of its rule sets whose
    /// `paranoia` is at or below it. Level 1 is tuned to stay quiet on API traffic; 2–4 add
    /// broader checks that catch more and misfire more (as in the OWASP CRS).
    #[serde(default)]
    #[schemars(with = "Option<u8>", range(min = 1, max = 4))]
    pub paranoia: Option<Spanned<u8>>,
    /// Rule sets evaluated for this route, in priority order.
    #[serde(default)]
    pub rulesets: Vec<RuleSetRefConfig>,
    /// Fields that given rules must not inspect on this route (the cure for false positives).
    #[serde(default)]
    pub exclusions: Vec<ExclusionConfig>,
    /// Request validation against JSON Schemas or an OpenAPI document (API Gateway's request
    /// validators).
    #[serde(default)]
    pub validate: Option<ValidateConfig>,
    /// Require a valid bearer token (JWT) from one of `auth.issuers`, with scopes per method.
    #[serde(default)]
    pub auth: Option<RouteAuthConfig>,
    /// Cedar authorization of each request against `authorization.policies` (needs `auth`).
    #[serde(default)]
    pub authorize: Option<RouteAuthorizeConfig>,
    /// The route serves an MCP server (Streamable HTTP): `true` or settings.
    #[serde(default)]
    pub mcp: Option<McpSetting>,
}

/// Request validation for a route: operations written here, imported from OpenAPI, or both.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ValidateConfig {
    /// What is checked: `body` (content type, size, JSON body), `params` (query, headers,
    /// path, cookies) or `all` (default).
    #[serde(default)]
    pub mode: Option<ValidateMode>,
    /// `block` (default: 400/413/415) or `count` (dry run: log and count, then forward).
    #[serde(default)]
    pub action: Option<ValidateAction>,
    /// Whether clients see the violations in the 400 body (default true). With `false` they
    /// get only `{"error", "request_id"}` and the details go to the log.
    #[serde(default)]
    pub expose_details: Option<bool>,
    /// Most violations reported per request (default 10).
    #[serde(default)]
    pub max_violations: Option<usize>,
    /// Body size limit for every operation (413 above); at most `body.inspect_limit` when a
    /// body schema must see the whole body.
    #[serde(default)]
    pub max_body: Option<HumanSize>,
    /// An OpenAPI 3.0/3.1 document (JSON or YAML) whose operations are validated.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub openapi: Option<Spanned<String>>,
    /// Path prefix of the OpenAPI paths; default: the path of the document's first server URL.
    #[serde(default)]
    pub base_path: Option<String>,
    /// Requests matching no operation: `block` (404, or 405 for a known path) or `allow`.
    /// Default `block` with `openapi`, `allow` with only hand-written operations.
    #[serde(default)]
    pub unknown_operation: Option<UnknownOperation>,
    /// Hand-written operations (checked before the OpenAPI ones on equal paths).
    #[serde(default)]
    pub operations: Vec<OperationConfig>,
}

/// What request validation checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ValidateMode {
    /// Content type, body size and the JSON body.
    Body,
    /// Query, header, path and cookie parameters.
    Params,
    /// Both.
    All,
}

/// What a validation failure does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ValidateAction {
    /// Reject the request.
    Block,
    /// Log and count it, then forward it (dry run).
    Count,
}

/// Requests that match no declared operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum UnknownOperation {
    /// 404 `unknown_operation` (405 `method_not_allowed` when only the method is unknown).
    Block,
    /// Forward unvalidated.
    Allow,
}

/// One operation: methods, a path template and what its requests must look like.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OperationConfig {
    /// Methods (default: any).
    #[serde(default)]
    pub methods: Option<Vec<Method>>,
    /// Full path template, e.g. `/v1/activities/{id}` (default: every path of the route).
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub path: Option<Spanned<String>>,
    /// Accepted `Content-Type`s (`application/json`, `application/*`, `*/*`); default
    /// `[application/json]` when `body` is set, else no check.
    #[serde(default)]
    pub content_types: Option<Vec<String>>,
    /// JSON Schema of the JSON body: inline, or a string `file.json` / `file.yaml#/$defs/X`
    /// relative to this config file.
    #[serde(default)]
    #[schemars(with = "Option<serde_json::Value>")]
    pub body: Option<Spanned<serde_json::Value>>,
    /// Whether a body is required (default true when `body` is set).
    #[serde(default)]
    pub body_required: Option<bool>,
    /// Body size limit of this operation.
    #[serde(default)]
    pub max_body: Option<HumanSize>,
    /// Query parameters by name.
    #[serde(default)]
    pub query: BTreeMap<String, ParamConfig>,
    /// Headers by name (case-insensitive).
    #[serde(default)]
    pub headers: BTreeMap<String, ParamConfig>,
    /// Path template parameters by name.
    #[serde(default)]
    pub path_params: BTreeMap<String, ParamConfig>,
    /// Cookies by name.
    #[serde(default)]
    pub cookies: BTreeMap<String, ParamConfig>,
}

/// One parameter: whether it is required and the schema of its (coerced) value.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ParamConfig {
    /// Must be present (path parameters always are).
    #[serde(default)]
    pub required: bool,
    /// JSON Schema of the value; strings are coerced to the declared `type` first
    /// (`"10"` → 10 for `type: integer`). Inline, or a string reference as for `body`.
    #[serde(default)]
    #[schemars(with = "Option<serde_json::Value>")]
    pub schema: Option<Spanned<serde_json::Value>>,
    /// Arrays: `?tags=a&tags=b` (true, default for query and cookies) or `?tags=a,b` (false).
    #[serde(default)]
    pub explode: Option<bool>,
}

/// A rule set attached to a route.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RuleSetRefConfig {
    /// The rule set's `name`.
    #[schemars(with = "String")]
    pub name: Spanned<String>,
    /// Replace every blocking/allowing action of the set: `count` runs it in dry-run mode.
    #[serde(default)]
    pub action_override: Option<RuleAction>,
    /// Rule ids to switch off on this route.
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub disabled_rules: Vec<Spanned<String>>,
    /// Per-rule action overrides (`rule-id: count`).
    #[serde(default)]
    pub rule_overrides: BTreeMap<String, RuleAction>,
}

/// "Don't inspect these fields for these rules on this route".
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExclusionConfig {
    /// Rule ids, or `label:NAME` for every rule carrying that label.
    #[schemars(with = "Vec<String>")]
    pub rules: Vec<Spanned<String>>,
    /// `query:NAME`, `form:NAME`, `json:/POINTER`, `header:NAME`, `cookie:NAME`, or a whole
    /// origin: `query`, `form`, `json`, `headers`, `cookies`, `body`, `path`, `uri`.
    #[schemars(with = "Vec<String>")]
    pub fields: Vec<Spanned<String>>,
}

/// A named set of CIDRs: inline, from a file, or both.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IpSetConfig {
    /// Addresses or CIDRs, IPv4 or IPv6 (`10.0.0.0/8`, `2001:db8::/32`, `192.0.2.7`).
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub cidrs: Vec<Spanned<String>>,
    /// A file with one address or CIDR per line (`#` comments); relative to the config file.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub file: Option<Spanned<String>>,
}

/// Client IP resolution behind proxies and load balancers.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClientIpConfig {
    /// Peers whose forwarding header is believed: CIDRs or names of IP sets.
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub trusted_proxies: Vec<Spanned<String>>,
    /// `x-forwarded-for` (default), `forwarded` (RFC 7239), or a single-address header such as
    /// `cf-connecting-ip`.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub header: Option<Spanned<String>>,
}

/// MaxMind database files (GeoLite2/GeoIP2, or built with `palisade geoip build`).
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GeoIpConfig {
    /// Country or City database; relative to the config file.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub country_db: Option<Spanned<String>>,
    /// ASN database; relative to the config file.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub asn_db: Option<Spanned<String>>,
}

/// IP allow/deny by set name: deny wins; a non-empty allow admits only its members.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IpPolicyConfig {
    /// Only clients in one of these sets are admitted.
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub allow: Vec<Spanned<String>>,
    /// Clients in any of these sets are blocked (403 `ip_denied`).
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub deny: Vec<Spanned<String>>,
}

/// Country allow- or deny-list.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GeoPolicyConfig {
    /// Only these countries are admitted.
    #[serde(default)]
    #[schemars(with = "Option<Vec<String>>")]
    pub allow: Option<Vec<Spanned<String>>>,
    /// These countries are blocked (403 `geo_denied`).
    #[serde(default)]
    #[schemars(with = "Option<Vec<String>>")]
    pub deny: Option<Vec<Spanned<String>>>,
    /// Clients whose country is unknown: `allow` or `block`; default `block` with `allow`,
    /// `allow` with `deny`.
    #[serde(default)]
    pub unknown: Option<UnknownPolicy>,
}

/// ASN allow- or deny-list.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AsnPolicyConfig {
    /// Only these autonomous systems are admitted.
    #[serde(default)]
    pub allow: Option<Vec<u32>>,
    /// These autonomous systems are blocked (403 `geo_denied`).
    #[serde(default)]
    pub deny: Option<Vec<u32>>,
    /// Clients whose ASN is unknown: `allow` or `block`; default `block` with `allow`, `allow`
    /// with `deny`.
    #[serde(default)]
    pub unknown: Option<UnknownPolicy>,
}

/// What to do when the database does not know the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum UnknownPolicy {
    /// Let it through (default).
    Allow,
    /// Block it like a denied one.
    Block,
}

/// A route-wide block.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DenyConfig {
    /// HTTP status to answer (default 403).
    #[serde(default)]
    pub status: Option<StatusCode>,
    /// Reason in the JSON error body, logs and metrics (default `route_denied`).
    #[serde(default)]
    pub reason: Option<String>,
}

/// A duration written like `250ms`, `5s`, `1m 30s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s)
            .map(HumanDuration)
            .map_err(|e| {
                serde::de::Error::custom(format!(
                    "invalid duration {s:?} ({e}); write it like `500ms`, `5s` or `2m`"
                ))
            })
    }
}

/// A byte size written like `64KiB`, `8 KB`, `1MiB` or a plain number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanSize(pub u64);

impl<'de> Deserialize<'de> for HumanSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bytes(n) => Ok(HumanSize(n)),
            Raw::Text(s) => s
                .parse::<bytesize::ByteSize>()
                .map(|b| HumanSize(b.as_u64()))
                .map_err(|e| {
                    serde::de::Error::custom(format!(
                        "invalid size {s:?} ({e}); write it like `65536`, `64KiB` or `1MiB`"
                    ))
                }),
        }
    }
}

/// An HTTP method name, validated and upper-cased.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Method(pub http::Method);

impl<'de> Deserialize<'de> for Method {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let upper = s.to_ascii_uppercase();
        http::Method::from_bytes(upper.as_bytes())
            .map(Method)
            .map_err(|_| serde::de::Error::custom(format!("invalid HTTP method {s:?}")))
    }
}

/// An HTTP status code in 100..=599.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusCode(pub u16);

impl<'de> Deserialize<'de> for StatusCode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = u16::deserialize(d)?;
        if (100..=599).contains(&n) {
            Ok(StatusCode(n))
        } else {
            Err(serde::de::Error::custom(format!(
                "invalid HTTP status {n}: use a code between 100 and 599"
            )))
        }
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl JsonSchema for HumanDuration {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "description": "A duration such as `500ms`, `5s`, `2m` or `1h 30m`.",
            "pattern": "^\\s*[0-9]+\\s*[a-zA-Zµ]+(\\s*[0-9]+\\s*[a-zA-Zµ]+)*\\s*$"
        })
    }
}

impl JsonSchema for HumanSize {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "ByteSize".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A size in bytes: a number, or text such as `64KiB`, `8 KB`, `1MiB`.",
            "oneOf": [
                {"type": "integer", "minimum": 0},
                {"type": "string", "pattern": "^\\s*[0-9.]+\\s*([kKmMgGtTpP]i?)?[bB]?\\s*$"}
            ]
        })
    }
}

impl JsonSchema for Method {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "HttpMethod".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "description": "An HTTP method (case-insensitive), e.g. GET, POST.",
            "pattern": "^[A-Za-z]+$"
        })
    }
}

impl JsonSchema for StatusCode {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "HttpStatus".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({"type": "integer", "minimum": 100, "maximum": 599})
    }
}

/// One rate-limit rule.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Unique name (metrics, logs, `RateLimit-Policy`).
    #[schemars(with = "String")]
    pub name: Spanned<String>,
    /// Key parts: `ip`, `ip/24`, `ip/24/48` (IPv4/IPv6 prefixes), `header:NAME`,
    /// `cookie:NAME`, `query:NAME`, `route`, `method`, `country`, `asn`. Empty: one aggregate
    /// bucket. A request missing a header/cookie/query part is not counted by the rule.
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub key: Vec<Spanned<String>>,
    /// `N/s`, `N/min`, `N/5m`, `N/h`: requests per window.
    #[schemars(with = "String")]
    pub rate: Spanned<String>,
    /// Requests allowed at once before the rate applies (default: N of the rate).
    #[serde(default)]
    pub burst: Option<u32>,
    /// Which requests the rule applies to (default: all).
    #[serde(default)]
    pub scope: Option<RateLimitScopeConfig>,
    /// `block` (429, default) or `count` (dry run: metrics and logs only).
    #[serde(default)]
    pub action: Option<RuleActionConfig>,
    /// `local` (this process, default) or `redis` (shared by every proxy using the Redis).
    #[serde(default)]
    pub store: Option<RateLimitStoreConfig>,
    /// `on_limit` (default): `RateLimit` headers on 429 only; `always`: on every response.
    #[serde(default)]
    pub headers: Option<RateLimitHeadersConfig>,
    /// Most keys tracked in memory (local store and Redis fallback); default 100000. Past it,
    /// new keys share 1024 overflow buckets until old keys expire.
    #[serde(default)]
    pub max_keys: Option<usize>,
}

/// Rate-limit scope.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimitScopeConfig {
    /// Route names.
    #[serde(default)]
    #[schemars(with = "Option<Vec<String>>")]
    pub routes: Option<Vec<Spanned<String>>>,
    /// Methods.
    #[serde(default)]
    pub methods: Option<Vec<Method>>,
    /// A regex the request path must match (Rust `regex` syntax).
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub path: Option<Spanned<String>>,
}

/// What a matching rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RuleActionConfig {
    /// Answer 429.
    Block,
    /// Only count (dry run).
    Count,
}

/// Where rate-limit state lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RateLimitStoreConfig {
    /// In this process.
    Local,
    /// In Redis, shared by the fleet.
    Redis,
}

/// When rate-limit headers are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RateLimitHeadersConfig {
    /// Only on 429 answers.
    OnLimit,
    /// On every response of the rule's scope.
    Always,
}

/// Redis connection for fleet-wide limits.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port/db` of a standalone Redis.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub url: Option<Spanned<String>>,
    /// Seed nodes of a Redis Cluster (instead of `url`).
    #[serde(default)]
    #[schemars(with = "Option<Vec<String>>")]
    pub cluster: Option<Vec<Spanned<String>>>,
    /// Longest wait for one check (default 50ms); past it the `on_error` policy applies.
    #[serde(default)]
    pub timeout: Option<HumanDuration>,
    /// When Redis fails or is slow: `local` (default: enforce the rule per proxy), `allow`
    /// (fail open) or `block` (fail closed, 503).
    #[serde(default)]
    pub on_error: Option<RedisOnErrorConfig>,
    /// After a failure, how long Redis is not asked again (default 1s): the fallback applies
    /// at once instead of every request waiting for the timeout.
    #[serde(default)]
    pub retry_after: Option<HumanDuration>,
}

/// Policy when Redis cannot answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RedisOnErrorConfig {
    /// Enforce the rule with a local limiter in each proxy.
    Local,
    /// Let requests through (fail open).
    Allow,
    /// Reject with 503 (fail closed).
    Block,
}

/// What a matching rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RuleAction {
    /// Stop and answer with an error.
    Block,
    /// Stop and forward (skips later rules and rule sets).
    Allow,
    /// Record (labels, metrics) and go on.
    Count,
    /// Log and go on.
    Log,
}

fn default_true() -> bool {
    true
}

/// Token issuers (`auth`).
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Issuers by name (routes list the names they accept).
    pub issuers: BTreeMap<String, IssuerConfig>,
    /// Realm named in `WWW-Authenticate` (default `palisade`).
    #[serde(default)]
    pub realm: Option<String>,
}

/// One token issuer (an OAuth 2.0 authorization server, e.g. a Cognito user pool).
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// The exact `iss` of its tokens.
    pub issuer: String,
    /// JWKS file with its public keys, relative to the config file (reloaded with it).
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub jwks_file: Option<Spanned<String>>,
    /// URL of the issuer's JWKS (`https://…/.well-known/jwks.json`): fetched in the
    /// background (every 5 minutes, and at once on a token with an unknown `kid`, at most
    /// every 10 s), kept across reloads, and served stale while the issuer is down.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub jwks_url: Option<Spanned<String>>,
    /// Find the JWKS URL by OpenID Connect discovery (`jwks_uri` of
    /// `{issuer}/.well-known/openid-configuration`), fetched like `jwks_url`.
    #[serde(default)]
    pub discovery: bool,
    /// Shared secret for HS256/384/512 (only when listed in `algorithms`); prefer
    /// `secret_env`.
    #[serde(default)]
    pub secret: Option<String>,
    /// Environment variable holding the HS* shared secret.
    #[serde(default)]
    pub secret_env: Option<String>,
    /// Accepted signature algorithms, pinned (never taken from the token): RS256, RS384,
    /// RS512, PS256, PS384, PS512, ES256, ES384, EdDSA, and HS256/384/512 with a secret.
    #[schemars(with = "Vec<String>")]
    pub algorithms: Vec<Spanned<String>>,
    /// Accepted audiences (`aud`, or the claim named by `audience_claim`). Required.
    pub audiences: Vec<String>,
    /// The claim holding the audience: `aud` (default) or e.g. `client_id` (Cognito access
    /// tokens carry no `aud`).
    #[serde(default)]
    pub audience_claim: Option<String>,
    /// Required value of Cognito's `token_use` claim (`access` or `id`).
    #[serde(default)]
    pub token_use: Option<String>,
    /// Clock skew allowed on `exp` and `nbf` (default 60s).
    #[serde(default)]
    pub leeway: Option<HumanDuration>,
}

/// A route's token requirement.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteAuthConfig {
    /// Issuers accepted (names from `auth.issuers`); default: all of them.
    #[serde(default)]
    pub issuers: Vec<String>,
    /// Scopes required per method (`GET: [activities:read]`, `"*"` for every method): every
    /// listed scope must be in the token's `scope` (space-separated) or `scp`.
    #[serde(default)]
    pub scopes: BTreeMap<String, Vec<String>>,
    /// Where the token is: `authorization` (default: `Authorization: Bearer …`), `header:NAME`
    /// or `cookie:NAME`.
    #[serde(default)]
    pub token: Option<String>,
    /// Claims sent to the upstream as headers (`{sub: X-Palisade-Sub}`); copies of these
    /// headers sent by the client are removed first.
    #[serde(default)]
    pub forward_claims: BTreeMap<String, String>,
}

/// Cedar authorization (`authorization`): the policies routes with `policy.authorize` (and
/// MCP routes) are checked against, and how the principal is made from the verified token.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AuthorizationConfig {
    /// Cedar policy files (`.cedar`), relative to this file. A policy's id is its `@id("…")`
    /// annotation, else `FILE:policyN`.
    #[schemars(with = "Vec<String>")]
    pub policies: Vec<Spanned<String>>,
    /// A Cedar schema (`.cedarschema`, or its JSON form `.json`). With one, the policies are
    /// validated in strict mode at load and every request and entity is checked against it.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub schema: Option<Spanned<String>>,
    /// The principal made from the token's claims.
    pub principal: PrincipalConfig,
    /// Entity type of actions (default: the principal type's namespace + `::Action`).
    #[serde(default)]
    pub action_type: Option<String>,
}

/// How the Cedar principal is made from the verified token.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PrincipalConfig {
    /// Entity type, e.g. `App::User`.
    #[serde(rename = "type")]
    #[schemars(with = "String")]
    pub entity_type: Spanned<String>,
    /// Entity id, a template over claims (default `{sub}`; e.g. `{iss}|{sub}`).
    #[serde(default)]
    pub id: Option<String>,
    /// Parent entities (groups) from a claim holding a list or space-separated names.
    #[serde(default)]
    pub groups: Option<GroupsConfig>,
    /// Principal attributes taken from claims: `{attribute: claim}`. Strings, integers,
    /// booleans, lists and objects become Cedar values; a missing claim omits the attribute.
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
}

/// Groups of the principal, from a claim.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GroupsConfig {
    /// Claim holding the group names (e.g. `cognito:groups`).
    pub claim: String,
    /// Entity type of the groups (e.g. `App::Group`).
    #[serde(rename = "type")]
    pub entity_type: String,
}

/// A route's Cedar authorization: which action and resource each request is.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteAuthorizeConfig {
    /// Operations by path template. A request's action is the operation's `action`, else
    /// `METHOD /path/{template}` (or the OpenAPI `operationId` when the route validates
    /// against an OpenAPI document). Requests matching no operation are refused (403).
    #[serde(default)]
    pub operations: Vec<AuthorizeOperationConfig>,
    /// The resource of operations that name none (default: type `<namespace>::Route`, id the
    /// route's name).
    #[serde(default)]
    pub resource: Option<ResourceConfig>,
    /// Request values put in the Cedar context besides `scopes` (always there: the token's
    /// scopes).
    #[serde(default)]
    pub context: AuthorizeContextConfig,
}

/// One operation of `policy.authorize`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AuthorizeOperationConfig {
    /// Full path template (`/users/{user}/activities/{id}`).
    #[schemars(with = "String")]
    pub path: Spanned<String>,
    /// Methods (default: any).
    #[serde(default)]
    pub methods: Option<Vec<Method>>,
    /// Action id (default `METHOD /path/{template}`).
    #[serde(default)]
    pub action: Option<String>,
    /// The resource, made from the path parameters.
    #[serde(default)]
    pub resource: Option<ResourceConfig>,
}

/// A Cedar resource made from a request's path parameters.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ResourceConfig {
    /// Entity type (`App::Activity`).
    #[serde(rename = "type")]
    pub entity_type: String,
    /// Entity id, a template over path parameters (`{id}`); default: the request path.
    #[serde(default)]
    pub id: Option<String>,
    /// Attributes: a template over path parameters (a string), or `{type, id}` for an entity
    /// reference (`owner: {type: App::User, id: "{user}"}`).
    #[serde(default)]
    pub attributes: BTreeMap<String, ResourceAttributeConfig>,
}

/// A resource attribute.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum ResourceAttributeConfig {
    /// A string from a template over path parameters.
    Text(String),
    /// An entity reference.
    Entity {
        /// Entity type.
        #[serde(rename = "type")]
        entity_type: String,
        /// Entity id template.
        id: String,
    },
}

/// Request values in the Cedar context.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AuthorizeContextConfig {
    /// Query parameters, as strings, in `context.query` (absent ones omitted).
    #[serde(default)]
    pub query: Vec<String>,
    /// JSON body members by JSON pointer, in `context.body`: `{amount: /amount}`.
    #[serde(default)]
    pub body: BTreeMap<String, String>,
}

/// `policy.mcp`: `true`, or the MCP settings.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum McpSetting {
    /// `mcp: true` (defaults) or `false`.
    Enabled(bool),
    /// Settings.
    Config(McpConfig),
}

/// A route in front of an MCP server (Streamable HTTP transport): JSON-RPC bodies are parsed
/// and each message is checked (tool names and arguments for rules, rate limits, Cedar and
/// schemas); the route acts as an OAuth protected resource (RFC 9728).
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct McpConfig {
    /// The MCP server's canonical URL (`https://mcp.example.com/mcp`), its resource
    /// identifier (RFC 8707): tokens must name it in `aud`, and its metadata is served at
    /// `/.well-known/oauth-protected-resource/mcp` (RFC 9728) and named in 401 answers.
    #[serde(default)]
    pub resource: Option<String>,
    /// Authorization servers listed in the metadata (default: the `iss` of the route's
    /// issuers).
    #[serde(default)]
    pub authorization_servers: Vec<String>,
    /// `scopes_supported` in the metadata.
    #[serde(default)]
    pub scopes_supported: Vec<String>,
    /// JSON Schemas of tool arguments by tool name (inline, or a file reference as in
    /// `validate`).
    #[serde(default)]
    #[schemars(with = "BTreeMap<String, serde_json::Value>")]
    pub tools: BTreeMap<String, Spanned<serde_json::Value>>,
    /// Validate arguments of tools without a schema here against the `inputSchema` the
    /// server advertised in its last `tools/list` answer (default true).
    #[serde(default)]
    pub advertised_schemas: Option<bool>,
    /// Remove from `tools/list` answers the tools Cedar would refuse to the caller (default
    /// true when the route has `authorize`).
    #[serde(default)]
    pub filter_tools_list: Option<bool>,
    /// Send the client's bearer token to the MCP server (default false: the server never
    /// sees it, as the MCP authorization spec asks of a gateway).
    #[serde(default)]
    pub forward_token: bool,
    /// Most messages in a JSON-RPC batch (default 20; 400 above).
    #[serde(default)]
    pub max_batch: Option<usize>,
}
