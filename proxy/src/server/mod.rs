//! Pingora glue: builds the pingora `Server` with the proxy service, the admin listener, the
//! demo backend and the background services (health checks, rate-limit sweeper, reloads),
//! then runs it. Start-up compiles the first snapshot through the same step as every reload.

pub mod accept;
pub mod admin;
pub mod ctx;
pub mod decision_log;
pub mod demo;
pub mod guard;
pub mod proxy;
pub mod redirect;
pub mod reload;

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;

use arc_swap::ArcSwap;
use pingora::apps::HttpServerOptions;
use pingora::server::configuration::ServerConf;
use pingora::server::Server;
use pingora::services::listening::Service;

use crate::compile::{compile, CompileContext};
use crate::config::{Config, Overrides, Problems, UpstreamTargets};
use crate::metrics::{Metrics, MetricsError};
use crate::ratelimit::Sweeper;
use crate::upstream::HealthChecker;

/// How often local rate limiters drop stale keys (sooner when a key cap is reached).
const RATE_LIMIT_SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Metrics registration failed.
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    /// The configuration could not be compiled.
    #[error("{0}")]
    Compile(#[from] Problems),
    /// No loopback port for the demo backend.
    #[error("cannot reserve a loopback port for the demo backend: {0}")]
    DemoPort(std::io::Error),
    /// A listener address is already in use or not bindable.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The decision log's writer could not start.
    #[error("cannot start the decision log writer: {0}")]
    DecisionLog(std::io::Error),
}

/// A response with a body, its `Content-Type` and `Content-Length` (the admin, redirect and
/// demo services' answers).
pub(crate) fn reply(status: u16, content_type: &str, body: Vec<u8>) -> http::Response<Vec<u8>> {
    let mut r = http::Response::new(body);
    *r.status_mut() = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::OK);
    if let Ok(v) = http::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    let len = r.body().len();
    r.headers_mut()
        .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(len));
    r
}

/// Checks that an address can be bound, so a taken port is a clear error at start-up instead
/// of a pingora panic in a worker thread.
fn check_bindable(addr: SocketAddr) -> Result<(), StartError> {
    TcpListener::bind(addr)
        .map(drop)
        .map_err(|source| StartError::Bind { addr, source })
}

/// How the process was started.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// The config file re-read at each reload (`None`: the embedded default).
    pub config_path: Option<std::path::PathBuf>,
    /// Command-line overrides, applied again at each reload.
    pub overrides: Overrides,
    /// Take over the listening sockets of a running Palisade (graceful upgrade).
    pub upgrade: bool,
    /// Unix socket the listening sockets are handed over on.
    pub upgrade_sock: String,
}

/// Default path of the graceful-upgrade socket.
pub const DEFAULT_UPGRADE_SOCK: &str = "/tmp/palisade_upgrade.sock";

/// Builds every service from `config` and runs until the process is signalled. Only returns
/// on a start-up error.
pub fn run(config: Config, opts: RunOptions) -> Result<(), StartError> {
    if !opts.upgrade {
        // With --upgrade the sockets come from the running process instead.
        for l in &config.listeners {
            check_bindable(l.address)?;
        }
        check_bindable(config.admin)?;
    }

    let needs_demo = config
        .upstreams
        .iter()
        .any(|u| u.targets == UpstreamTargets::Demo);
    let demo_addr = if needs_demo {
        // Reserve an ephemeral loopback port, then hand it to pingora. The tiny window between
        // drop and pingora's bind is acceptable for a demo backend.
        let l = TcpListener::bind("127.0.0.1:0").map_err(StartError::DemoPort)?;
        Some(l.local_addr().map_err(StartError::DemoPort)?)
    } else {
        None
    };

    if !config.admin.ip().is_loopback() {
        if config.admin_token.is_none() {
            tracing::warn!(address = %config.admin,
                "THE ADMIN LISTENER IS NOT ON LOOPBACK AND HAS NO TOKEN: anyone who reaches it can read \
                 /config and /metrics (POST /reload still answers loopback clients only). Bind it to \
                 127.0.0.1 or a private interface, or set admin.token / PALISADE_ADMIN_TOKEN");
        } else {
            tracing::warn!(address = %config.admin,
                "the admin listener is not on loopback: keep it off the public network");
        }
    }
    let metrics = Arc::new(Metrics::new()?);
    let threads = config.threads;
    let h2c = config.h2c;
    let decision_log = config.decision_log.clone();
    let h2_streams = config.http.h2_max_concurrent_streams;
    let max_head = config.http.max_head_size;
    let keepalive = config.timeouts.client_keepalive;
    let listeners = config.listeners.clone();
    let admin_addr = config.admin;
    let first = compile(config, &CompileContext::first(&metrics, demo_addr))?;
    let snapshot = Arc::new(ArcSwap::from_pointee(first));
    let reloader = Arc::new(reload::Reloader::new(
        Arc::clone(&snapshot),
        Arc::clone(&metrics),
        opts.config_path.clone(),
        opts.overrides.clone(),
        demo_addr,
    ));

    let conf = ServerConf {
        threads,
        // Retries happen only where `fail_to_connect` marks them (another server of the group).
        max_retries: 16,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(5),
        upgrade_sock: opts.upgrade_sock.clone(),
        ..ServerConf::default()
    };
    let opt = pingora::server::configuration::Opt {
        upgrade: opts.upgrade,
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(Some(opt), conf);
    server.bootstrap();

    // The decision log's writer (its destination is fixed at start; what it logs reloads).
    let decisions = match &decision_log {
        Some(d) => {
            let reopen = Arc::new(std::sync::atomic::AtomicBool::new(false));
            if let Err(e) =
                signal_hook::flag::register(signal_hook::consts::SIGUSR1, Arc::clone(&reopen))
            {
                tracing::warn!(error = %e, "cannot handle SIGUSR1: the decision log file will not be reopened");
            }
            let sink = crate::decisions::DecisionSink::start(
                crate::decisions::SinkConfig {
                    stdout: d.stdout,
                    file: d.file.clone(),
                    queue: d.queue,
                },
                reopen,
                metrics.decision_log_lines.clone(),
                metrics.decision_log_dropped.clone(),
            )
            .map_err(StartError::DecisionLog)?;
            Some(Arc::new(sink))
        }
        None => None,
    };
    let mut app = pingora::proxy::http_proxy(
        &server.configuration,
        proxy::PalisadeProxy::new(Arc::clone(&snapshot), Arc::clone(&metrics), decisions),
    );
    let mut opts = HttpServerOptions::default();
    opts.h2c = h2c;
    // An HTTP/2 connection with no stream open is closed like an idle keep-alive one.
    opts.h2_idle_timeout = Some(keepalive);
    app.server_options = Some(opts);
    // HTTP/2 limits (the h2 crate's): streams per connection as configured; a header block
    // (CONTINUATION frames included) no larger than an HTTP/1.1 head may be; at most 20
    // streams reset by the client before they were served, and 256 streams the server had to
    // reset for errors, before the connection is closed with ENHANCE_YOUR_CALM (HTTP/2 rapid
    // reset, CVE-2023-44487).
    let mut h2 = pingora::protocols::http::v2::server::H2Options::new();
    h2.max_concurrent_streams(h2_streams)
        .max_header_list_size(u32::try_from(max_head).unwrap_or(u32::MAX))
        .max_pending_accept_reset_streams(20)
        .max_local_error_reset_streams(Some(256));
    app.h2_options = Some(h2);
    // The listeners that proxy; TLS ones are bound as TCP: the guard reads the PROXY header
    // and does the handshake (see `accept`).
    let bound: Vec<accept::Bound> = listeners
        .iter()
        .filter(|l| l.redirect_to_https.is_none())
        .map(|l| accept::Bound {
            address: l.address,
            tls: l.tls.is_some(),
        })
        .collect();
    let mut proxy = Service::new(
        "palisade proxy".to_string(),
        guard::GuardedApp::new(app, Arc::clone(&snapshot), Arc::clone(&metrics), bound),
    );
    let mut redirect_services = Vec::new();
    for l in &listeners {
        let addr = l.address.to_string();
        if let Some(port) = l.redirect_to_https {
            let mut svc = Service::new(
                format!("palisade https redirect {addr}"),
                redirect::RedirectToHttps { port },
            );
            svc.add_tcp(&addr);
            redirect_services.push(svc);
        } else {
            proxy.add_tcp(&addr);
        }
    }

    let mut admin = Service::new(
        "palisade admin".to_string(),
        admin::AdminApp::new(
            Arc::clone(&snapshot),
            Arc::clone(&metrics),
            Arc::clone(&reloader),
        ),
    );
    admin.add_tcp(&admin_addr.to_string());
    admin.threads = Some(1);

    server.add_service(proxy);
    server.add_service(admin);
    for svc in redirect_services {
        server.add_service(svc);
    }
    if let Some(addr) = demo_addr {
        let mut demo = Service::new("palisade demo backend".to_string(), demo::DemoBackend);
        demo.add_tcp(&addr.to_string());
        demo.threads = Some(1);
        server.add_service(demo);
        tracing::info!(%addr, "demo backend listening (JSON echo)");
    }
    let live = Arc::clone(&snapshot);
    server.add_service(pingora::services::background::background_service(
        "upstream health checks",
        HealthChecker::new(Arc::new(move || live.load().upstreams.clone())),
    ));
    let live = Arc::clone(&snapshot);
    server.add_service(pingora::services::background::background_service(
        "rate-limit sweeper",
        Sweeper::new(
            Arc::new(move || live.load().rate_limits.clone()),
            Arc::clone(&metrics),
            RATE_LIMIT_SWEEP_INTERVAL,
        ),
    ));
    server.add_service(pingora::services::background::background_service(
        "JWKS refresh",
        JwksRefresher {
            snapshot: Arc::clone(&snapshot),
        },
    ));
    server.add_service(pingora::services::background::background_service(
        "config reload",
        reload::ReloadService::new(reloader),
    ));
    for l in &listeners {
        let (addr, tls) = (l.address, l.tls.is_some());
        match l.redirect_to_https {
            Some(port) => tracing::info!(%addr, port, "redirecting to https"),
            None => tracing::info!(%addr, threads, tls, "proxy listening"),
        }
    }
    tracing::info!(addr = %admin_addr, "admin listening (/healthz, /readyz, /metrics, /config, POST /reload)");
    server.run_forever()
}

/// Fetches the JWKS of issuers with `jwks_url`: at start, then every
/// [`crate::auth::REFRESH_EVERY`]; a failure keeps the cached keys (logged).
struct JwksRefresher {
    snapshot: Arc<ArcSwap<crate::snapshot::Snapshot>>,
}

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for JwksRefresher {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        loop {
            let snap = self.snapshot.load_full();
            for issuer in snap.issuers.values() {
                if issuer.due(crate::auth::REFRESH_EVERY) {
                    if let Err(e) = issuer.refresh().await {
                        tracing::warn!(issuer = %issuer.name, error = %e,
                            "JWKS fetch failed; the cached keys stay in force");
                    }
                }
            }
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(std::time::Duration::from_secs(2)) => {}
            }
        }
    }
}
