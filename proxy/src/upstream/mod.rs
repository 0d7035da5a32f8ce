//! Upstream groups: round-robin selection over pingora's `LoadBalancer`, with active health
//! checks (pingora's TCP/HTTP checks, run by [`HealthChecker`] for the groups of the snapshot
//! in force) and passive health (consecutive connection failures seen by real requests eject a
//! server for a while). A reload keeps the group (and so its health state) of an upstream
//! whose settings did not change.
//!
//! Passive health is written here because pingora's load balancer only knows active checks.
//! It is lock-free: one pair of atomics per server.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use pingora::lb::health_check::{
    HealthCheck as PingoraHealthCheck, HttpHealthCheck, TcpHealthCheck,
};
use pingora::lb::selection::RoundRobin;
use pingora::lb::{Backend, LoadBalancer};
use pingora::protocols::ALPN;
use pingora::upstreams::peer::HttpPeer;
use pingora::utils::tls::{CertKey, WrappedX509};

use crate::config::{HealthCheckKind, PassiveHealth, Upstream};

/// Passive-health state of one server.
struct ServerHealth {
    addr: SocketAddr,
    consecutive_failures: AtomicU32,
    /// Milliseconds since [`UpstreamGroup::epoch`] until which the server is skipped (0 = not).
    ejected_until_ms: AtomicU64,
}

/// A named group of upstream servers.
pub struct UpstreamGroup {
    /// Name from the config.
    pub name: String,
    /// `Host` header override.
    pub host_header: Option<String>,
    lb: Arc<LoadBalancer<RoundRobin>>,
    servers: Vec<ServerHealth>,
    passive: PassiveHealth,
    epoch: Instant,
    /// Active health check interval, when configured.
    check_every: Option<Duration>,
    /// Milliseconds since `epoch` when the next active check is due.
    next_check_ms: AtomicU64,
    /// The settings and addresses it was built from (a reload reuses an identical group).
    pub built_from: (Upstream, Vec<SocketAddr>),
    /// `palisade_upstream_errors_total` handles: connect, timeout, failure.
    pub errors: [prometheus::IntCounter; 3],
    /// TLS to the servers, when configured.
    pub tls: Option<UpstreamTlsLoaded>,
    /// Response, latency, retry and ejection metric handles.
    pub ops: UpstreamOps,
}

/// The metric handles of one group (resolved by the compile step).
#[derive(Clone)]
pub struct UpstreamOps {
    /// Responses by class, index `status / 100 - 1`.
    pub responses: [prometheus::IntCounter; 5],
    /// Time from choosing a server to its response head.
    pub latency: prometheus::Histogram,
    /// Time to open a new connection.
    pub connect: prometheus::Histogram,
    /// Requests sent to another server after a failed connection.
    pub retries: prometheus::IntCounter,
    /// Servers ejected by passive health.
    pub ejections: prometheus::IntCounter,
}

/// The certificates of TLS to an upstream, as read from their files (a reload compares
/// them: a changed CA or client certificate rebuilds the group).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TlsMaterial {
    /// The CA bundle (DER), when not the system roots.
    pub ca: Vec<Vec<u8>>,
    /// The client certificate chain (DER) and key (DER).
    pub client: Option<(Vec<Vec<u8>>, Vec<u8>)>,
}

/// TLS to the servers of a group, ready for connections.
pub struct UpstreamTlsLoaded {
    /// What it was loaded from.
    pub material: TlsMaterial,
    /// SNI and verified name of each server: the configured one, or the target's host.
    names: Vec<(SocketAddr, String)>,
    verify: bool,
    h2: bool,
    ca: Option<Arc<[WrappedX509]>>,
    client: Option<Arc<CertKey>>,
}

impl std::fmt::Debug for UpstreamTlsLoaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTlsLoaded")
            .field("names", &self.names)
            .field("verify", &self.verify)
            .field("h2", &self.h2)
            .finish_non_exhaustive()
    }
}

/// A certificate chain as DER, each certificate checked to parse (pingora parses them
/// again, and panics on a bad one). Errors name `path`.
fn checked_der(
    path: &std::path::Path,
    chain: &[rustls::pki_types::CertificateDer<'_>],
) -> Result<Vec<Vec<u8>>, String> {
    let certs: Vec<Vec<u8>> = chain.iter().map(|c| c.to_vec()).collect();
    for c in &certs {
        x509_parser::parse_x509_certificate(c)
            .map_err(|e| format!("{}: cannot parse a certificate: {e}", path.display()))?;
    }
    Ok(certs)
}

impl UpstreamTlsLoaded {
    /// Loads the CA bundle and client certificate files (paths already resolved). `names`
    /// gives each server's SNI when `sni` is not set.
    pub fn load(
        sni: Option<&str>,
        verify: bool,
        h2: bool,
        ca: Option<&std::path::Path>,
        client: Option<(&std::path::Path, &std::path::Path)>,
        names: Vec<(SocketAddr, String)>,
    ) -> Result<UpstreamTlsLoaded, String> {
        let mut material = TlsMaterial::default();
        if let Some(ca) = ca {
            material.ca = checked_der(ca, &crate::tls::read_chain(ca)?)?;
        }
        if let Some((cert, key)) = client {
            let (certified, der) = crate::tls::key_pair(cert, key)?;
            let chain = checked_der(cert, &certified.cert)?;
            material.client = Some((chain, der.secret_der().to_vec()));
        }
        let ca_certs = (!material.ca.is_empty()).then(|| {
            let certs: Arc<[WrappedX509]> = material
                .ca
                .iter()
                .map(|c| WrappedX509::new(c.clone(), pingora::utils::tls::parse_x509))
                .collect();
            certs
        });
        let client_key = material
            .client
            .as_ref()
            .map(|(chain, key)| Arc::new(CertKey::new(chain.clone(), key.clone())));
        let names = match sni {
            Some(s) => names.into_iter().map(|(a, _)| (a, s.to_string())).collect(),
            None => names,
        };
        Ok(UpstreamTlsLoaded {
            material,
            names,
            verify,
            h2,
            ca: ca_certs,
            client: client_key,
        })
    }

    /// The name `addr` is reached by (SNI, and the certificate's expected name).
    fn name_of(&self, addr: SocketAddr) -> String {
        self.names
            .iter()
            .find(|(a, _)| *a == addr)
            .map(|(_, n)| n.clone())
            .unwrap_or_else(|| addr.ip().to_string())
    }

    /// Applies these settings to a peer bound to `addr`.
    fn apply(&self, peer: &mut HttpPeer, addr: SocketAddr) {
        peer.sni = self.name_of(addr);
        peer.options.verify_cert = self.verify;
        peer.options.verify_hostname = self.verify;
        peer.options.ca.clone_from(&self.ca);
        peer.client_cert_key.clone_from(&self.client);
        peer.options.alpn = if self.h2 { ALPN::H2H1 } else { ALPN::H1 };
    }
}

/// Why an upstream group could not be built.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The load balancer rejected the targets.
    #[error("upstream {name:?}: {source}")]
    Targets {
        /// Upstream name.
        name: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

impl UpstreamGroup {
    /// Builds a group over `addrs` (resolved by the compile step).
    pub fn build(
        up: &Upstream,
        addrs: Vec<SocketAddr>,
        errors: [prometheus::IntCounter; 3],
        tls: Option<UpstreamTlsLoaded>,
        ops: UpstreamOps,
    ) -> Result<Arc<UpstreamGroup>, UpstreamError> {
        let mut lb =
            LoadBalancer::<RoundRobin>::try_from_iter(addrs.iter().copied()).map_err(|source| {
                UpstreamError::Targets {
                    name: up.name.clone(),
                    source,
                }
            })?;
        let servers = addrs
            .iter()
            .map(|&addr| ServerHealth {
                addr,
                consecutive_failures: AtomicU32::new(0),
                ejected_until_ms: AtomicU64::new(0),
            })
            .collect();
        if let Some(hc) = &up.health_check {
            let check: Box<dyn PingoraHealthCheck + Send + Sync> = match hc.kind {
                HealthCheckKind::Tcp => {
                    let mut c = TcpHealthCheck::new();
                    c.consecutive_success = hc.healthy_after;
                    c.consecutive_failure = hc.unhealthy_after;
                    c
                }
                HealthCheckKind::Http => {
                    let host = up.host_header.clone().unwrap_or_else(|| "localhost".into());
                    let mut c = HttpHealthCheck::new(&host, tls.is_some());
                    if let Some(t) = &tls {
                        // Checked like requests: same name, CA and client certificate.
                        let addr = addrs.first().copied().unwrap_or(([0, 0, 0, 0], 0).into());
                        t.apply(&mut c.peer_template, addr);
                    }
                    c.consecutive_success = hc.healthy_after;
                    c.consecutive_failure = hc.unhealthy_after;
                    c.req.set_uri(
                        hc.path
                            .parse::<http::Uri>()
                            .unwrap_or_else(|_| http::Uri::from_static("/")),
                    );
                    c.validator = Some(Box::new(|resp| {
                        if resp.status.is_success() {
                            Ok(())
                        } else {
                            pingora::Error::e_explain(
                                pingora::ErrorType::HTTPStatus(resp.status.as_u16()),
                                "health check expects a 2xx",
                            )
                        }
                    }));
                    Box::new(c)
                }
            };
            lb.set_health_check(check);
        }
        Ok(Arc::new(UpstreamGroup {
            name: up.name.clone(),
            host_header: up.host_header.clone(),
            lb: Arc::new(lb),
            servers,
            passive: up.passive,
            epoch: Instant::now(),
            check_every: up.health_check.as_ref().map(|h| h.interval),
            next_check_ms: AtomicU64::new(0),
            built_from: (up.clone(), addrs),
            errors,
            tls,
            ops,
        }))
    }

    /// A peer for server `addr` of this group: cleartext, or TLS with the group's settings.
    pub fn peer(&self, addr: SocketAddr) -> HttpPeer {
        match &self.tls {
            Some(t) => {
                let mut peer = HttpPeer::new(addr, true, String::new());
                t.apply(&mut peer, addr);
                peer
            }
            None => HttpPeer::new(addr, false, String::new()),
        }
    }

    /// Runs the active health check if it is due.
    async fn check_if_due(&self) {
        let Some(every) = self.check_every else {
            return;
        };
        let now = self.now_ms();
        if now < self.next_check_ms.load(Ordering::Relaxed) {
            return;
        }
        self.next_check_ms
            .store(now + every.as_millis() as u64, Ordering::Relaxed);
        self.lb.backends().run_health_check(true).await;
    }

    /// Picks a server round-robin among those that are healthy (active checks), not ejected
    /// (passive health) and not already tried by this request. If every server is ejected, an
    /// ejected one is still tried rather than failing outright. Lock-free.
    pub fn select(&self, tried: &[SocketAddr]) -> Option<SocketAddr> {
        let now = self.now_ms();
        let pick = |skip_ejected: bool| {
            self.lb
                .select_with(b"", 256, |b: &Backend, healthy: bool| {
                    let Some(addr) = b.addr.as_inet() else {
                        return false;
                    };
                    healthy
                        && !tried.contains(addr)
                        && !(skip_ejected && self.is_ejected(addr, now))
                })
                .and_then(|b| b.addr.as_inet().copied())
        };
        pick(true).or_else(|| pick(false))
    }

    /// Records a failed connection to `addr`; ejects it after the configured failure count.
    pub fn record_failure(&self, addr: SocketAddr) {
        if let Some(s) = self.server(addr) {
            let n = s.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
            if n >= self.passive.failures {
                let until = self.now_ms() + self.passive.ejection.as_millis() as u64;
                s.ejected_until_ms.store(until, Ordering::Relaxed);
                s.consecutive_failures.store(0, Ordering::Relaxed);
                self.ops.ejections.inc();
                tracing::warn!(upstream = %self.name, server = %addr, ejection = ?self.passive.ejection,
                    "upstream server ejected after consecutive connection failures");
            }
        }
    }

    /// Records a successful connection to `addr`.
    pub fn record_success(&self, addr: SocketAddr) {
        if let Some(s) = self.server(addr) {
            // Plain load first: the common case (no failures) writes nothing, so the cache line
            // stays shared between worker threads.
            if s.consecutive_failures.load(Ordering::Relaxed) != 0 {
                s.consecutive_failures.store(0, Ordering::Relaxed);
            }
        }
    }

    /// Number of servers in the group, and how many are usable now (healthy, not ejected).
    pub fn availability(&self) -> (usize, usize) {
        let now = self.now_ms();
        let backends = self.lb.backends().get_backend();
        let usable = backends
            .iter()
            .filter(|b| {
                self.lb.backends().ready(b)
                    && b.addr.as_inet().is_some_and(|a| !self.is_ejected(a, now))
            })
            .count();
        (backends.len(), usable)
    }

    /// Number of servers in the group.
    pub fn len(&self) -> usize {
        self.servers.len()
    }

    /// Whether the group has no server.
    pub fn is_empty(&self) -> bool {
        self.servers.is_empty()
    }

    fn server(&self, addr: SocketAddr) -> Option<&ServerHealth> {
        self.servers.iter().find(|s| s.addr == addr)
    }

    fn is_ejected(&self, addr: &SocketAddr, now_ms: u64) -> bool {
        self.server(*addr)
            .is_some_and(|s| s.ejected_until_ms.load(Ordering::Relaxed) > now_ms)
    }

    fn now_ms(&self) -> u64 {
        // Saturates after 584 million years.
        self.epoch.elapsed().as_millis() as u64
    }
}

/// The upstream groups in force now (they change with each reload).
pub type GroupSource = Arc<dyn Fn() -> Vec<Arc<UpstreamGroup>> + Send + Sync>;

/// Background service running the active health checks of the groups in force, each at its
/// own interval; a group that a reload replaced is no longer checked, one it kept goes on.
pub struct HealthChecker {
    groups: GroupSource,
}

impl HealthChecker {
    /// A checker over the groups `groups` returns at each tick.
    pub fn new(groups: GroupSource) -> HealthChecker {
        HealthChecker { groups }
    }
}

#[async_trait]
impl pingora::services::background::BackgroundService for HealthChecker {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        loop {
            let groups = (self.groups)();
            futures_util::future::join_all(groups.iter().map(|g| g.check_if_due())).await;
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    }
}
