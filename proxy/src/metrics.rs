//! Every Prometheus metric of Palisade: names, help texts and registration in one place.
//! Label values come only from bounded sets (route names, reasons and stages from config or
//! code, status classes), never from request data, so cardinality stays bounded.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;

use arc_swap::ArcSwap;
use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// `palisade_config_reloads_total{result}`: reload attempts by result (`success`, `failure`).
pub const CONFIG_RELOADS_TOTAL: &str = "palisade_config_reloads_total";
/// `palisade_config_last_reload_success_timestamp_seconds`: Unix time of the last snapshot
/// swap (the start-up load counts).
pub const CONFIG_LAST_RELOAD_SUCCESS: &str =
    "palisade_config_last_reload_success_timestamp_seconds";
/// `palisade_config_generation`: generation of the snapshot serving requests (1 at start).
pub const CONFIG_GENERATION: &str = "palisade_config_generation";
/// `palisade_tls_certificate_expiry_timestamp_seconds{name}`: notAfter (Unix time) of each
/// served certificate, by its first name.
pub const TLS_CERT_EXPIRY: &str = "palisade_tls_certificate_expiry_timestamp_seconds";
/// `palisade_tls_handshakes_total{version, alpn}`: completed TLS handshakes by protocol
/// version (`1.2`, `1.3`) and negotiated application protocol (`h2`, `http/1.1`, `none`).
pub const TLS_HANDSHAKES_TOTAL: &str = "palisade_tls_handshakes_total";
/// `palisade_tls_handshake_failures_total{reason}`: TLS handshakes that failed, by reason
/// (see [`TLS_FAILURE_REASONS`]).
pub const TLS_HANDSHAKE_FAILURES_TOTAL: &str = "palisade_tls_handshake_failures_total";
/// `palisade_proxy_protocol_total{result}`: connections on PROXY protocol listeners by
/// result (`accepted`, `untrusted_peer`, `malformed`, `timeout`).
pub const PROXY_PROTOCOL_TOTAL: &str = "palisade_proxy_protocol_total";

/// `palisade_http2_rapid_reset_total`: HTTP/2 connections closed because the client reset
/// streams as fast as it opened them.
pub const HTTP2_RAPID_RESET_TOTAL: &str = "palisade_http2_rapid_reset_total";

/// `palisade_decision_log_lines_total`: decision-log lines written.
pub const DECISION_LOG_LINES_TOTAL: &str = "palisade_decision_log_lines_total";
/// `palisade_decision_log_dropped_total`: decision-log lines dropped (queue full).
pub const DECISION_LOG_DROPPED_TOTAL: &str = "palisade_decision_log_dropped_total";

/// The reasons of `palisade_tls_handshake_failures_total`:
/// - `not_tls`: the client spoke something else (cleartext HTTP on the TLS port),
/// - `malformed_hello`: TLS records that are not a ClientHello that parses,
/// - `timeout`: no complete handshake within `http.head_timeout`,
/// - `closed`: the client closed or reset the connection during the handshake,
/// - `no_shared_parameters`: no common version, cipher suite or signature scheme,
/// - `client_certificate_missing` / `client_certificate_rejected`: mTLS refused the client,
/// - `alert`: the client aborted with an alert (it did not trust our certificate, say),
/// - `protocol_error`: anything else the TLS library refused.
pub const TLS_FAILURE_REASONS: &[&str] = &[
    "not_tls",
    "malformed_hello",
    "timeout",
    "closed",
    "no_shared_parameters",
    "client_certificate_missing",
    "client_certificate_rejected",
    "alert",
    "protocol_error",
];

/// `palisade_requests_total{route, decision}`: requests by route and final decision.
pub const REQUESTS_TOTAL: &str = "palisade_requests_total";
/// `palisade_blocked_total{route, stage, reason}`: blocked requests by stage and reason.
pub const BLOCKED_TOTAL: &str = "palisade_blocked_total";
/// `palisade_counted_total{route, label}`: count-mode (dry-run) matches.
pub const COUNTED_TOTAL: &str = "palisade_counted_total";
/// Requests refused before routing.
pub const REFUSED_TOTAL: &str = "palisade_requests_refused_total";
/// `palisade_request_duration_seconds{route}`: time from request head to logging.
pub const REQUEST_DURATION: &str = "palisade_request_duration_seconds";
/// `palisade_upstream_errors_total{upstream, kind}`: connect failures, timeouts, …
pub const UPSTREAM_ERRORS_TOTAL: &str = "palisade_upstream_errors_total";
/// `palisade_upstream_servers{upstream, state}`: servers by state (`total`, `usable`).
pub const UPSTREAM_SERVERS: &str = "palisade_upstream_servers";
/// `palisade_responses_total{route, class}`: responses by status class (`2xx` … `5xx`).
pub const RESPONSES_TOTAL: &str = "palisade_responses_total";

/// `palisade_client_country_total{country}`: requests by client country, for routes that
/// resolve it (`unknown` when the database has no answer). At most 26×26+1 values.
pub const CLIENT_COUNTRY_TOTAL: &str = "palisade_client_country_total";

/// `palisade_ratelimit_limited_total{rule, action}`: requests over a rate limit (blocked, or
/// counted in dry-run mode).
pub const RATELIMIT_LIMITED_TOTAL: &str = "palisade_ratelimit_limited_total";
/// `palisade_ratelimit_keys{rule}`: keys tracked by a local limiter (after the last sweep).
pub const RATELIMIT_KEYS: &str = "palisade_ratelimit_keys";
/// `palisade_ratelimit_fallback_total{rule, mode}`: checks decided by the Redis failure policy.
pub const RATELIMIT_FALLBACK_TOTAL: &str = "palisade_ratelimit_fallback_total";
/// `palisade_redis_duration_seconds`: Redis rate-limit check latency.
pub const REDIS_DURATION: &str = "palisade_redis_duration_seconds";
/// `palisade_redis_errors_total{kind}`: Redis failures (`timeout`, `error`).
pub const REDIS_ERRORS_TOTAL: &str = "palisade_redis_errors_total";

/// `palisade_validation_failures_total{route, operation, reason}`: requests that failed
/// request validation (blocked, or forwarded in count mode), by operation (`METHOD /path`
/// from the config or OpenAPI document, `-` when none matched) and reason.
pub const VALIDATION_FAILURES_TOTAL: &str = "palisade_validation_failures_total";

/// Decision label values.
pub mod decision {
    /// Forwarded to the upstream.
    pub const FORWARDED: &str = "forwarded";
    /// Blocked by a pipeline stage.
    pub const BLOCKED: &str = "blocked";
    /// Answered with an error by the proxy (upstream failure, bad request).
    pub const ERROR: &str = "error";
    /// No route matched.
    pub const NO_ROUTE: &str = "no_route";
    /// Refused before routing (malformed or ambiguous request).
    pub const REFUSED: &str = "refused";
}

/// Label used for requests that matched no route.
pub const NO_ROUTE_LABEL: &str = "-";

/// The metric families and their registry.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    /// Blocked requests by route, stage, reason.
    pub blocked: IntCounterVec,
    /// Count-mode matches by route and label.
    pub counted: IntCounterVec,
    /// Requests refused before routing, by reason.
    refused: IntCounterVec,
    duration: HistogramVec,
    /// Upstream errors by upstream and kind.
    pub upstream_errors: IntCounterVec,
    /// Upstream servers by state.
    pub upstream_servers: IntGaugeVec,
    responses: IntCounterVec,
    /// Requests by client country.
    pub client_country: IntCounterVec,
    /// Requests over a rate limit.
    pub ratelimit_limited: IntCounterVec,
    /// Keys per local limiter.
    pub ratelimit_keys: IntGaugeVec,
    /// Redis fallbacks.
    pub ratelimit_fallback: IntCounterVec,
    /// Redis latency.
    pub redis_duration: Histogram,
    /// Redis failures.
    pub redis_errors: IntCounterVec,
    /// Request validation failures by route, operation and reason.
    pub validation_failures: IntCounterVec,
    /// Reloads by result.
    pub config_reloads: IntCounterVec,
    /// Time of the last successful reload.
    pub config_last_success: Gauge,
    /// Generation serving requests.
    pub config_generation: IntGauge,
    /// Certificate expiry by name.
    tls_cert_expiry: GaugeVec,
    /// TLS handshakes by version and ALPN.
    tls_handshakes: IntCounterVec,
    /// Failed TLS handshakes by reason.
    tls_handshake_failures: IntCounterVec,
    /// PROXY protocol headers by result.
    proxy_protocol: IntCounterVec,
    /// HTTP/2 connections cut for rapid reset.
    pub http2_rapid_reset: IntCounter,
    /// Decision-log lines written.
    pub decision_log_lines: IntCounter,
    /// Decision-log lines dropped (the writer was behind).
    pub decision_log_dropped: IntCounter,
    /// Country handles, resolved once per country.
    country_cache: LabelCache,
    /// The operator's metrics (dashboard and alerts).
    pub ops: OpsMetrics,
}

/// Counter handles of one metric family, resolved once per label set and then read without a
/// lock: `with_label_values` hashes the labels and takes the family's lock on every call,
/// which the request path must not. Reads are an `ArcSwap` load, one hash of the labels and a
/// bucket lookup, without allocating; a new label set (rare: labels come from bounded sets)
/// copies the map once.
pub struct LabelCache {
    family: IntCounterVec,
    hasher: RandomState,
    /// Handles by the hash of their labels; a bucket holds the (rare) colliding label sets.
    handles: ArcSwap<HashMap<u64, Bucket>>,
}

/// Label sets whose hashes are equal, with their handles.
type Bucket = Vec<(Box<[Box<str>]>, IntCounter)>;

impl LabelCache {
    /// A cache over `family`.
    pub fn new(family: IntCounterVec) -> LabelCache {
        LabelCache {
            family,
            hasher: RandomState::new(),
            handles: ArcSwap::from_pointee(HashMap::new()),
        }
    }

    /// The handle of one label set.
    pub fn get(&self, labels: &[&str]) -> IntCounter {
        let hash = self.hasher.hash_one(labels);
        let same = |k: &[Box<str>]| {
            k.len() == labels.len() && k.iter().zip(labels).all(|(a, b)| &**a == *b)
        };
        if let Some((_, c)) = self
            .handles
            .load()
            .get(&hash)
            .and_then(|bucket| bucket.iter().find(|(k, _)| same(k)))
        {
            return c.clone();
        }
        let c = self.family.with_label_values(labels);
        let key: Box<[Box<str>]> = labels.iter().map(|l| Box::<str>::from(*l)).collect();
        self.handles.rcu(|m| {
            let mut m = HashMap::clone(m);
            let bucket = m.entry(hash).or_default();
            if !bucket.iter().any(|(k, _)| same(k)) {
                bucket.push((key.clone(), c.clone()));
            }
            m
        });
        c
    }
}

/// Handles for one route, resolved once at load time so the request path does no label
/// hashing for the common counters.
#[derive(Clone)]
pub struct RouteMetrics {
    /// Forwarded requests.
    pub forwarded: IntCounter,
    /// Blocked requests.
    pub blocked: IntCounter,
    /// Proxy-generated errors.
    pub error: IntCounter,
    /// Request duration.
    pub duration: Histogram,
    /// Responses by class, index `status / 100 - 1` (1xx … 5xx).
    pub responses: [IntCounter; 5],
    /// `palisade_blocked_total` handles of this route by (stage, reason).
    pub blocks: Arc<LabelCache>,
    /// `palisade_counted_total` handles of this route by label.
    pub counts: Arc<LabelCache>,
    /// `palisade_inspected_body_bytes_total` of this route.
    pub inspected_bytes: IntCounter,
    /// `palisade_request_methods_total` of this route, by [`METHOD_CLASSES`] index.
    pub methods: Vec<IntCounter>,
}

/// Why metrics could not be registered (a programming error: duplicate names).
#[derive(Debug, thiserror::Error)]
#[error("metrics registration failed: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Result<Metrics, MetricsError> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(REQUESTS_TOTAL, "Requests by route and final decision."),
            &["route", "decision"],
        )?;
        let blocked = IntCounterVec::new(
            Opts::new(
                BLOCKED_TOTAL,
                "Requests blocked by a pipeline stage, by reason.",
            ),
            &["route", "stage", "reason"],
        )?;
        let counted = IntCounterVec::new(
            Opts::new(
                COUNTED_TOTAL,
                "Count-mode (dry-run) matches by route and label.",
            ),
            &["route", "label"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(REQUEST_DURATION, "Request duration in seconds, by route.").buckets(
                vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0,
                ],
            ),
            &["route"],
        )?;
        let upstream_errors = IntCounterVec::new(
            Opts::new(
                UPSTREAM_ERRORS_TOTAL,
                "Upstream failures by upstream and kind.",
            ),
            &["upstream", "kind"],
        )?;
        let upstream_servers = IntGaugeVec::new(
            Opts::new(
                UPSTREAM_SERVERS,
                "Upstream servers by state (total, usable).",
            ),
            &["upstream", "state"],
        )?;
        let responses = IntCounterVec::new(
            Opts::new(
                RESPONSES_TOTAL,
                "Responses sent to clients by route and status class.",
            ),
            &["route", "class"],
        )?;
        let client_country = IntCounterVec::new(
            Opts::new(
                CLIENT_COUNTRY_TOTAL,
                "Requests by client country (routes with a geo policy).",
            ),
            &["country"],
        )?;
        registry.register(Box::new(client_country.clone()))?;
        let ratelimit_limited = IntCounterVec::new(
            Opts::new(
                RATELIMIT_LIMITED_TOTAL,
                "Requests over a rate limit, by rule and action.",
            ),
            &["rule", "action"],
        )?;
        let ratelimit_keys = IntGaugeVec::new(
            Opts::new(RATELIMIT_KEYS, "Keys tracked by a local rate limiter."),
            &["rule"],
        )?;
        let ratelimit_fallback = IntCounterVec::new(
            Opts::new(
                RATELIMIT_FALLBACK_TOTAL,
                "Rate-limit checks decided by the Redis failure policy.",
            ),
            &["rule", "mode"],
        )?;
        let redis_duration = Histogram::with_opts(
            HistogramOpts::new(REDIS_DURATION, "Redis rate-limit check latency in seconds.")
                .buckets(vec![
                    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                ]),
        )?;
        let redis_errors = IntCounterVec::new(
            Opts::new(
                REDIS_ERRORS_TOTAL,
                "Redis rate-limit check failures by kind.",
            ),
            &["kind"],
        )?;
        let validation_failures = IntCounterVec::new(
            Opts::new(
                VALIDATION_FAILURES_TOTAL,
                "Requests that failed request validation, by route, operation and reason.",
            ),
            &["route", "operation", "reason"],
        )?;
        let config_reloads = IntCounterVec::new(
            Opts::new(
                CONFIG_RELOADS_TOTAL,
                "Configuration reloads by result (success, failure).",
            ),
            &["result"],
        )?;
        let config_last_success = Gauge::new(
            CONFIG_LAST_RELOAD_SUCCESS,
            "Unix time of the last successful configuration load (start-up or reload).",
        )?;
        let config_generation = IntGauge::new(
            CONFIG_GENERATION,
            "Generation of the configuration snapshot serving requests (1 at start-up).",
        )?;
        let tls_cert_expiry = GaugeVec::new(
            Opts::new(
                TLS_CERT_EXPIRY,
                "Expiry (notAfter, Unix time) of each certificate the TLS listeners serve, by its first name.",
            ),
            &["name"],
        )?;
        let tls_handshakes = IntCounterVec::new(
            Opts::new(
                TLS_HANDSHAKES_TOTAL,
                "Completed TLS handshakes by protocol version and negotiated ALPN protocol.",
            ),
            &["version", "alpn"],
        )?;
        let tls_handshake_failures = IntCounterVec::new(
            Opts::new(
                TLS_HANDSHAKE_FAILURES_TOTAL,
                "TLS handshakes that failed, by reason.",
            ),
            &["reason"],
        )?;
        for r in TLS_FAILURE_REASONS {
            tls_handshake_failures.with_label_values(&[*r]);
        }
        // The common combinations exist from the start, so dashboards show zero, not no data.
        for (v, a) in [
            ("1.3", "h2"),
            ("1.3", "http/1.1"),
            ("1.2", "h2"),
            ("1.2", "http/1.1"),
        ] {
            tls_handshakes.with_label_values(&[v, a]);
        }
        let proxy_protocol = IntCounterVec::new(
            Opts::new(
                PROXY_PROTOCOL_TOTAL,
                "Connections on PROXY protocol listeners by result (accepted, untrusted_peer, malformed, timeout).",
            ),
            &["result"],
        )?;
        for r in ["accepted", "untrusted_peer", "malformed", "timeout"] {
            proxy_protocol.with_label_values(&[r]);
        }
        registry.register(Box::new(tls_cert_expiry.clone()))?;
        registry.register(Box::new(tls_handshakes.clone()))?;
        registry.register(Box::new(tls_handshake_failures.clone()))?;
        registry.register(Box::new(proxy_protocol.clone()))?;
        let http2_rapid_reset = IntCounter::new(
            HTTP2_RAPID_RESET_TOTAL,
            "HTTP/2 connections closed because the client reset streams as fast as it opened them.",
        )?;
        registry.register(Box::new(http2_rapid_reset.clone()))?;
        let decision_log_lines =
            IntCounter::new(DECISION_LOG_LINES_TOTAL, "Decision-log lines written.")?;
        let decision_log_dropped = IntCounter::new(
            DECISION_LOG_DROPPED_TOTAL,
            "Decision-log lines dropped because the writer could not keep up.",
        )?;
        registry.register(Box::new(decision_log_lines.clone()))?;
        registry.register(Box::new(decision_log_dropped.clone()))?;
        for result in ["success", "failure"] {
            config_reloads.with_label_values(&[result]);
        }
        registry.register(Box::new(config_reloads.clone()))?;
        registry.register(Box::new(config_last_success.clone()))?;
        registry.register(Box::new(config_generation.clone()))?;
        registry.register(Box::new(validation_failures.clone()))?;
        registry.register(Box::new(ratelimit_limited.clone()))?;
        registry.register(Box::new(ratelimit_keys.clone()))?;
        registry.register(Box::new(ratelimit_fallback.clone()))?;
        registry.register(Box::new(redis_duration.clone()))?;
        registry.register(Box::new(redis_errors.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(blocked.clone()))?;
        registry.register(Box::new(counted.clone()))?;
        let refused = IntCounterVec::new(
            Opts::new(
                REFUSED_TOTAL,
                "Requests refused before routing (malformed, ambiguous or over a limit), by reason.",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(refused.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(upstream_errors.clone()))?;
        registry.register(Box::new(upstream_servers.clone()))?;
        registry.register(Box::new(responses.clone()))?;
        let ops = OpsMetrics::register(&registry)?;
        Ok(Metrics {
            ops,
            registry,
            requests,
            blocked,
            counted,
            refused,
            duration,
            upstream_errors,
            upstream_servers,
            responses,
            client_country: client_country.clone(),
            ratelimit_limited,
            ratelimit_keys,
            ratelimit_fallback,
            redis_duration,
            redis_errors,
            validation_failures,
            config_reloads,
            config_last_success,
            config_generation,
            tls_cert_expiry,
            tls_handshakes,
            tls_handshake_failures,
            proxy_protocol,
            http2_rapid_reset,
            decision_log_lines,
            decision_log_dropped,
            country_cache: LabelCache::new(client_country.clone()),
        })
    }

    /// Sets the certificate expiry gauges to the TLS listeners' certificates (after a swap).
    pub fn set_tls_certificates(&self, listeners: &[Option<Arc<crate::tls::TlsListener>>]) {
        self.tls_cert_expiry.reset();
        for listener in listeners.iter().flatten() {
            for (name, not_after) in &listener.store.expiries {
                self.tls_cert_expiry
                    .with_label_values(&[name.as_str()])
                    .set(*not_after as f64);
            }
        }
    }

    /// Counts a completed TLS handshake: `version` as the TLS library names it (normalized
    /// here to `1.2`, `1.3` or `other`), `alpn` one of `h2`, `http/1.1`, `other`, `none`.
    pub fn count_tls_handshake(&self, version: &str, alpn: &'static str) {
        let version = if version.contains("1_3") || version.contains("1.3") {
            "1.3"
        } else if version.contains("1_2") || version.contains("1.2") {
            "1.2"
        } else {
            "other"
        };
        self.tls_handshakes
            .with_label_values(&[version, alpn])
            .inc();
    }

    /// Counts a failed TLS handshake; `reason` is one of [`TLS_FAILURE_REASONS`].
    pub fn count_tls_failure(&self, reason: &'static str) {
        self.tls_handshake_failures
            .with_label_values(&[reason])
            .inc();
    }

    /// Counts a connection on a PROXY protocol listener by `result`.
    pub fn count_proxy_protocol(&self, result: &'static str) {
        self.proxy_protocol.with_label_values(&[result]).inc();
    }

    /// Counts a request of a client from `country` (`unknown` without one).
    pub fn count_country(&self, country: &str) {
        self.country_cache.get(&[country]).inc();
    }

    /// Resolves the handles of one route.
    pub fn route(&self, route: &str) -> RouteMetrics {
        let class = |c: &str| self.responses.with_label_values(&[route, c]);
        RouteMetrics {
            forwarded: self
                .requests
                .with_label_values(&[route, decision::FORWARDED]),
            blocked: self.requests.with_label_values(&[route, decision::BLOCKED]),
            error: self.requests.with_label_values(&[route, decision::ERROR]),
            duration: self.duration.with_label_values(&[route]),
            responses: [
                class("1xx"),
                class("2xx"),
                class("3xx"),
                class("4xx"),
                class("5xx"),
            ],
            blocks: Arc::new(LabelCache::new(self.blocked.clone())),
            counts: Arc::new(LabelCache::new(self.counted.clone())),
            inspected_bytes: self.ops.inspected_bytes.with_label_values(&[route]),
            methods: METHOD_CLASSES
                .iter()
                .map(|m| self.ops.methods.with_label_values(&[route, m]))
                .collect(),
        }
    }

    /// Counts a request refused before routing (reasons are constants of the code).
    pub fn refused(&self, reason: &'static str) {
        self.requests
            .with_label_values(&[NO_ROUTE_LABEL, decision::REFUSED])
            .inc();
        self.refused.with_label_values(&[reason]).inc();
    }

    /// Counts a request that matched no route.
    pub fn no_route(&self) {
        self.requests
            .with_label_values(&[NO_ROUTE_LABEL, decision::NO_ROUTE])
            .inc();
    }

    /// Renders every metric in the Prometheus text format.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8192);
        // Encoding into a Vec cannot fail on I/O; a failure would only mean a malformed metric.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "failed to encode metrics");
        }
        out
    }
}

impl RouteMetrics {
    /// Counts a response status.
    pub fn response(&self, status: u16) {
        if let Some(c) = self.responses.get((status / 100).wrapping_sub(1) as usize) {
            c.inc();
        }
    }
}

/// Method classes of `palisade_request_methods_total` (anything else is `other`).
pub const METHOD_CLASSES: [&str; 8] = [
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other",
];

/// The index of a method in [`METHOD_CLASSES`].
pub fn method_class(method: &str) -> usize {
    METHOD_CLASSES[..7]
        .iter()
        .position(|m| *m == method)
        .unwrap_or(7)
}

/// Latency buckets (seconds) of the inspection and upstream histograms.
const LATENCY_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
];

/// The operator's metrics beyond the request counters: what the shipped Grafana dashboard
/// and alert rules read (`deploy/grafana`, `deploy/prometheus`). Every label comes from the
/// config or the code.
pub struct OpsMetrics {
    /// `palisade_connections_active`: open client connections on the proxy listeners.
    pub connections_active: IntGauge,
    /// `palisade_rule_matches_total{rule_set, rule, action}`.
    pub rule_matches: Arc<LabelCache>,
    /// `palisade_inspection_duration_seconds{stage}`, by [`crate::pipeline::StageKind`] order.
    pub inspection: Vec<Histogram>,
    /// `palisade_inspected_body_bytes_total{route}`.
    pub inspected_bytes: IntCounterVec,
    /// `palisade_request_methods_total{route, method}`.
    pub methods: IntCounterVec,
    /// `palisade_geo_blocked_total{country}`: countries named in the config, else `other`.
    pub geo_blocked: Arc<LabelCache>,
    /// `palisade_upstream_responses_total{upstream, class}`.
    pub upstream_responses: IntCounterVec,
    /// `palisade_upstream_response_duration_seconds{upstream}`: request sent to response head.
    pub upstream_latency: HistogramVec,
    /// `palisade_upstream_connect_duration_seconds{upstream}`: new connections only.
    pub upstream_connect: HistogramVec,
    /// `palisade_upstream_retries_total{upstream}`: requests sent to another server after a
    /// failed connection.
    pub upstream_retries: IntCounterVec,
    /// `palisade_upstream_ejections_total{upstream}`: servers ejected by passive health.
    pub upstream_ejections: IntCounterVec,
}

impl OpsMetrics {
    fn register(registry: &Registry) -> Result<OpsMetrics, MetricsError> {
        let build = IntGaugeVec::new(
            Opts::new("palisade_build_info", "Build information; the value is 1."),
            &["version"],
        )?;
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        registry.register(Box::new(build))?;
        let connections_active = IntGauge::new(
            "palisade_connections_active",
            "Open client connections on the proxy listeners.",
        )?;
        registry.register(Box::new(connections_active.clone()))?;
        let rule_matches = IntCounterVec::new(
            Opts::new(
                "palisade_rule_matches_total",
                "Rule matches by rule set, rule and action taken (block, count, log, allow).",
            ),
            &["rule_set", "rule", "action"],
        )?;
        registry.register(Box::new(rule_matches.clone()))?;
        let inspection_vec = HistogramVec::new(
            HistogramOpts::new(
                "palisade_inspection_duration_seconds",
                "Time spent in each inspection stage per request, in seconds.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["stage"],
        )?;
        registry.register(Box::new(inspection_vec.clone()))?;
        let inspection = crate::pipeline::StageKind::ALL
            .iter()
            .map(|k| inspection_vec.with_label_values(&[k.name()]))
            .collect();
        let inspected_bytes = IntCounterVec::new(
            Opts::new(
                "palisade_inspected_body_bytes_total",
                "Request body bytes read for inspection, by route.",
            ),
            &["route"],
        )?;
        registry.register(Box::new(inspected_bytes.clone()))?;
        let methods = IntCounterVec::new(
            Opts::new(
                "palisade_request_methods_total",
                "Requests by route and method (GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS, other).",
            ),
            &["route", "method"],
        )?;
        registry.register(Box::new(methods.clone()))?;
        let geo_blocked = IntCounterVec::new(
            Opts::new(
                "palisade_geo_blocked_total",
                "Requests blocked by a geo policy, by country (countries named in the config; other ones are `other`).",
            ),
            &["country"],
        )?;
        for c in ["other", "unknown"] {
            geo_blocked.with_label_values(&[c]);
        }
        registry.register(Box::new(geo_blocked.clone()))?;
        let upstream_responses = IntCounterVec::new(
            Opts::new(
                "palisade_upstream_responses_total",
                "Responses received from upstreams by upstream and status class.",
            ),
            &["upstream", "class"],
        )?;
        registry.register(Box::new(upstream_responses.clone()))?;
        let upstream_latency = HistogramVec::new(
            HistogramOpts::new(
                "palisade_upstream_response_duration_seconds",
                "Time from choosing an upstream server to its response head, in seconds.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["upstream"],
        )?;
        registry.register(Box::new(upstream_latency.clone()))?;
        let upstream_connect = HistogramVec::new(
            HistogramOpts::new(
                "palisade_upstream_connect_duration_seconds",
                "Time to open a new upstream connection (TLS included), in seconds.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["upstream"],
        )?;
        registry.register(Box::new(upstream_connect.clone()))?;
        let upstream_retries = IntCounterVec::new(
            Opts::new(
                "palisade_upstream_retries_total",
                "Requests retried on another upstream server after a failed connection.",
            ),
            &["upstream"],
        )?;
        registry.register(Box::new(upstream_retries.clone()))?;
        let upstream_ejections = IntCounterVec::new(
            Opts::new(
                "palisade_upstream_ejections_total",
                "Upstream servers ejected by passive health checks.",
            ),
            &["upstream"],
        )?;
        registry.register(Box::new(upstream_ejections.clone()))?;
        Ok(OpsMetrics {
            connections_active,
            rule_matches: Arc::new(LabelCache::new(rule_matches)),
            inspection,
            inspected_bytes,
            methods,
            geo_blocked: Arc::new(LabelCache::new(geo_blocked)),
            upstream_responses,
            upstream_latency,
            upstream_connect,
            upstream_retries,
            upstream_ejections,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn label_cache_resolves_each_label_set_once_and_keeps_them_apart() {
        let family = IntCounterVec::new(Opts::new("t_total", "t"), &["a", "b"]).unwrap();
        let cache = LabelCache::new(family.clone());
        cache.get(&["x", "y"]).inc();
        cache.get(&["x", "y"]).inc();
        cache.get(&["y", "x"]).inc();
        assert_eq!(family.with_label_values(&["x", "y"]).get(), 2);
        assert_eq!(family.with_label_values(&["y", "x"]).get(), 1);
        assert_eq!(
            cache.handles.load().values().map(Vec::len).sum::<usize>(),
            2
        );
    }
}
