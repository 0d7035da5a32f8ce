//! Step 5 of parse → check → compile → snapshot → swap: hot reload. A reload reads the config
//! again, checks and compiles it off the request path, and stores the new snapshot in the
//! `ArcSwap` the proxy loads once per request: a request is served by exactly one snapshot
//! from start to end. An invalid change is rejected whole (the old snapshot keeps serving),
//! logged once, shown at `GET /config` and counted.
//!
//! Triggers: SIGHUP, `POST /reload` on the admin listener, and a change of any file the
//! snapshot was built from (config, rule sets and their directories, schema documents, IP
//! lists, mmdb files), debounced. Files are watched by polling `stat` (inode, size, mtime)
//! every 100 ms rather than with inotify: polling sees Kubernetes ConfigMap updates (a
//! `..data` symlink swapped), editors that save by rename, and network mounts, where watches
//! on the files themselves go stale; its cost is a few `stat` calls per tick.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use async_trait::async_trait;

use crate::compile::{load_and_compile, CompileContext};
use crate::config::{self, Overrides, Problems};
use crate::metrics::Metrics;
use crate::snapshot::Snapshot;

/// What `GET /config` reports about reloads.
#[derive(Debug, Clone, Default)]
pub struct ReloadStatus {
    /// Unix time of the last successful load.
    pub last_success: f64,
    /// Unix time of the last attempt.
    pub last_attempt: f64,
    /// What triggered the last attempt.
    pub last_trigger: &'static str,
    /// Problems of the last failed attempt (cleared by a success).
    pub last_error: Option<Problems>,
    /// Settings changed in the file that only a restart applies (listeners, admin, threads…).
    pub restart_required: Vec<String>,
}

/// Rebuilds and swaps the snapshot.
pub struct Reloader {
    live: Arc<ArcSwap<Snapshot>>,
    metrics: Arc<Metrics>,
    config_path: Option<PathBuf>,
    overrides: Overrides,
    demo_addr: Option<SocketAddr>,
    /// Serializes reloads (held for a whole rebuild; never taken on the request path).
    reloading: Mutex<()>,
    /// What `GET /config` shows; held only to read or write it.
    status: Mutex<ReloadStatus>,
    /// Set by the SIGHUP handler, consumed by the watcher loop.
    hangup: Arc<AtomicBool>,
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl Reloader {
    /// A reloader over the live snapshot; `config_path` is re-read at each reload (`None`: the
    /// embedded default). Registers the SIGHUP handler at once, so a SIGHUP never terminates
    /// the process (its default action).
    pub fn new(
        live: Arc<ArcSwap<Snapshot>>,
        metrics: Arc<Metrics>,
        config_path: Option<PathBuf>,
        overrides: Overrides,
        demo_addr: Option<SocketAddr>,
    ) -> Reloader {
        let hangup = Arc::new(AtomicBool::new(false));
        if let Err(e) =
            signal_hook::flag::register(signal_hook::consts::SIGHUP, Arc::clone(&hangup))
        {
            tracing::error!(error = %e, "cannot handle SIGHUP: reload through POST /reload instead");
        }
        metrics.config_generation.set(live.load().generation as i64);
        metrics.set_tls_certificates(&live.load().tls);
        metrics.config_last_success.set(now_secs());
        Reloader {
            live,
            metrics,
            config_path,
            overrides,
            demo_addr,
            reloading: Mutex::new(()),
            status: Mutex::new(ReloadStatus {
                last_success: now_secs(),
                last_attempt: now_secs(),
                last_trigger: "start",
                ..ReloadStatus::default()
            }),
            hangup,
        }
    }

    /// The snapshot in force.
    pub fn live(&self) -> Arc<Snapshot> {
        self.live.load_full()
    }

    /// The reload status.
    pub fn status(&self) -> ReloadStatus {
        self.status_mut().clone()
    }

    fn status_mut(&self) -> std::sync::MutexGuard<'_, ReloadStatus> {
        // A panic while holding it cannot leave the status half-written in a harmful way.
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads, checks and compiles the config and swaps the snapshot; on any problem the old
    /// snapshot stays. Blocking (file reads, compilation): call it off the async workers.
    pub fn reload(&self, trigger: &'static str) -> Result<u64, Problems> {
        let _one_at_a_time = self.reloading.lock().unwrap_or_else(|p| p.into_inner());
        {
            let mut status = self.status_mut();
            status.last_attempt = now_secs();
            status.last_trigger = trigger;
        }
        let old = self.live.load_full();
        let result = load_and_compile(
            self.config_path.as_deref(),
            &self.overrides,
            &CompileContext {
                metrics: &self.metrics,
                previous: Some(&old),
                demo_addr: self.demo_addr,
                generation: old.generation + 1,
            },
        );
        match result {
            Ok(new) => {
                let generation = new.generation;
                let restart = restart_required(&old.config, &new.config);
                if !restart.is_empty() {
                    tracing::warn!(settings = ?restart,
                        "these settings changed but apply only after a restart or graceful upgrade");
                }
                self.metrics.set_tls_certificates(&new.tls);
                self.live.store(Arc::new(new));
                let now = now_secs();
                {
                    let mut status = self.status_mut();
                    status.restart_required = restart;
                    status.last_success = now;
                    status.last_error = None;
                }
                self.metrics
                    .config_reloads
                    .with_label_values(&["success"])
                    .inc();
                self.metrics.config_generation.set(generation as i64);
                self.metrics.config_last_success.set(now);
                tracing::info!(generation, trigger, "configuration reloaded");
                Ok(generation)
            }
            Err(problems) => {
                self.metrics
                    .config_reloads
                    .with_label_values(&["failure"])
                    .inc();
                let mut status = self.status_mut();
                // Logged once: the same problems again (a second SIGHUP on the same broken
                // file) are not repeated at error level.
                if status.last_error.as_ref() != Some(&problems) {
                    tracing::error!(
                        trigger,
                        generation = old.generation,
                        "configuration rejected, the running one stays:\n{problems}"
                    );
                } else {
                    tracing::debug!(trigger, "configuration still rejected (same problems)");
                }
                status.last_error = Some(problems.clone());
                Err(problems)
            }
        }
    }
}

fn restart_required(old: &config::Config, new: &config::Config) -> Vec<String> {
    let mut out = Vec::new();
    // A listener's address and whether it terminates TLS; its certificates reload.
    let addrs = |c: &config::Config| {
        c.listeners
            .iter()
            .map(|l| (l.address, l.tls.is_some(), l.redirect_to_https))
            .collect::<Vec<_>>()
    };
    if addrs(old) != addrs(new) {
        out.push("listeners".into());
    }
    if old.admin != new.admin {
        out.push("admin.address".into());
    }
    if old.threads != new.threads {
        out.push("threads".into());
    }
    if old.h2c != new.h2c {
        out.push("h2c".into());
    }
    // HTTP/2 settings are the connection builder's, made once (the header-list limit follows
    // http.max_head_size, which also applies to HTTP/1.1 at once).
    if old.http.h2_max_concurrent_streams != new.http.h2_max_concurrent_streams {
        out.push("http.h2_max_concurrent_streams".into());
    }
    if old.http.max_head_size != new.http.max_head_size {
        out.push("http.max_head_size (for HTTP/2)".into());
    }
    if old.timeouts.client_keepalive != new.timeouts.client_keepalive {
        out.push("timeouts.client_keepalive (for HTTP/2)".into());
    }
    let sink = |c: &config::Config| {
        c.decision_log
            .as_ref()
            .map(|d| (d.stdout, d.file.clone(), d.queue))
    };
    if sink(old) != sink(new) {
        out.push("logging.decisions (stdout, file, queue)".into());
    }
    if old.log_format != new.log_format || old.log_level != new.log_level {
        out.push("logging".into());
    }
    out
}

/// `(inode, size, mtime)` of a path, following symlinks; `None` when it cannot be read.
fn fingerprint(path: &Path) -> Option<(u64, u64, SystemTime)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.ino(), m.len(), m.modified().ok()?))
}

type Fingerprints = BTreeMap<PathBuf, Option<(u64, u64, SystemTime)>>;

fn fingerprints(snapshot: &Snapshot) -> Fingerprints {
    snapshot
        .sources
        .iter()
        .map(|s| (s.path.clone(), fingerprint(&s.path)))
        .collect()
}

/// Background service: reloads on SIGHUP and, when watching is on, on file changes.
pub struct ReloadService {
    reloader: Arc<Reloader>,
}

impl ReloadService {
    /// The service of a reloader.
    pub fn new(reloader: Arc<Reloader>) -> ReloadService {
        ReloadService { reloader }
    }
}

/// Runs a reload on the blocking pool (compilation is CPU work).
pub async fn reload_off_thread(
    reloader: &Arc<Reloader>,
    trigger: &'static str,
) -> Result<u64, Problems> {
    let r = Arc::clone(reloader);
    match tokio::task::spawn_blocking(move || r.reload(trigger)).await {
        Ok(result) => result,
        Err(e) => Err(Problems::from(config::Problem::file(
            &"<reload>".into(),
            format!("the reload task failed: {e}"),
        ))),
    }
}

#[async_trait]
impl pingora::services::background::BackgroundService for ReloadService {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        const TICK: Duration = Duration::from_millis(100);
        // A file that keeps changing is reloaded at the latest this long after it first did.
        const MAX_DELAY: Duration = Duration::from_secs(1);
        let r = &self.reloader;
        let mut seen = fingerprints(&r.live());
        let mut first_change: Option<Instant> = None;
        let mut last_change = Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(TICK) => {}
            }
            if r.hangup.swap(false, Ordering::Relaxed) {
                let _ = reload_off_thread(r, "sighup").await;
                seen = fingerprints(&r.live());
                first_change = None;
                continue;
            }
            let live = r.live();
            if !live.config.watch {
                continue;
            }
            let now = fingerprints(&live);
            // A source list that changed with a reload is the new baseline, not a change.
            if now.keys().ne(seen.keys()) {
                seen = now;
                continue;
            }
            if now != seen {
                seen = now;
                last_change = Instant::now();
                first_change.get_or_insert(last_change);
                // No `continue`: a file that changes at every tick must still reach MAX_DELAY.
            }
            let Some(first) = first_change else {
                continue;
            };
            if last_change.elapsed() >= live.config.watch_debounce || first.elapsed() >= MAX_DELAY {
                first_change = None;
                let _ = reload_off_thread(r, "watch").await;
                // What the reload read is the baseline; a write during it shows up next tick.
                let after = fingerprints(&r.live());
                if after.keys().ne(seen.keys()) {
                    seen = after;
                }
            }
        }
    }
}
