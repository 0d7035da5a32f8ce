//! The admin listener: `/healthz` (process is up), `/readyz` (every upstream group has a usable
//! server), `/metrics` (Prometheus text), `GET /config` (generation, source files with their
//! hashes, last reload error) and `POST /reload`. Served on its own port, loopback by default.
//! `POST /reload` changes state: without `admin.token` it answers only loopback clients; with
//! one, only requests carrying `Authorization: Bearer <token>` (compared in constant time).

use std::sync::Arc;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use super::reload::{reload_off_thread, Reloader};
use super::reply;
use crate::metrics::Metrics;
use crate::snapshot::Snapshot;

/// The admin HTTP app.
pub struct AdminApp {
    snapshot: Arc<ArcSwap<Snapshot>>,
    metrics: Arc<Metrics>,
    reloader: Arc<Reloader>,
}

/// Compares in time independent of where the inputs differ (for the bearer token).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl AdminApp {
    /// An admin app over the live snapshot.
    pub fn new(
        snapshot: Arc<ArcSwap<Snapshot>>,
        metrics: Arc<Metrics>,
        reloader: Arc<Reloader>,
    ) -> Self {
        AdminApp {
            snapshot,
            metrics,
            reloader,
        }
    }

    /// Whether a state-changing request may proceed: `None` if so, else the refusal.
    fn authorize(&self, session: &ServerSession) -> Option<Response<Vec<u8>>> {
        let snapshot = self.snapshot.load();
        match &snapshot.config.admin_token {
            Some(token) => {
                let given = session
                    .req_header()
                    .headers
                    .get(http::header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    // The scheme is case-insensitive (RFC 9110 §11.1).
                    .and_then(|v| v.split_once(' '))
                    .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                    .map(|(_, t)| t)
                    .unwrap_or("");
                (!constant_time_eq(given.trim().as_bytes(), token.as_bytes())).then(|| {
                    reply(
                        401,
                        "application/json",
                        br#"{"error":"unauthorized"}"#.to_vec(),
                    )
                })
            }
            None => {
                let loopback = session
                    .client_addr()
                    .and_then(|a| a.as_inet())
                    .is_some_and(|a| a.ip().to_canonical().is_loopback());
                (!loopback).then(|| {
                    reply(
                        403,
                        "application/json",
                        br#"{"error":"forbidden","message":"POST /reload is accepted from loopback only unless admin.token is set"}"#.to_vec(),
                    )
                })
            }
        }
    }

    fn config_report(&self) -> serde_json::Value {
        let snapshot = self.snapshot.load();
        let status = self.reloader.status();
        serde_json::json!({
            "generation": snapshot.generation,
            "source": &*snapshot.config.source,
            "config_hash": snapshot.config.text_hash,
            "files": snapshot.sources.iter().map(|f| serde_json::json!({
                "path": f.path.display().to_string(), "kind": f.kind, "hash": f.hash,
            })).collect::<Vec<_>>(),
            "routes": snapshot.routes.len(),
            "rule_sets": snapshot.rule_sets.keys().collect::<Vec<_>>(),
            "watch": snapshot.config.watch,
            "last_reload": {
                "trigger": status.last_trigger,
                "attempt_unix": status.last_attempt,
                "success_unix": status.last_success,
            },
            "last_error": status.last_error.as_ref().map(|p| p.0.iter().map(|x| x.to_json()).collect::<Vec<_>>()),
            "restart_required": status.restart_required,
        })
    }

    fn refresh_upstream_gauges(&self, snapshot: &Snapshot) -> Vec<(String, usize, usize)> {
        snapshot
            .upstreams
            .iter()
            .map(|g| {
                let (total, usable) = g.availability();
                let set = |state: &str, v: usize| {
                    self.metrics
                        .upstream_servers
                        .with_label_values(&[g.name.as_str(), state])
                        .set(v as i64)
                };
                set("total", total);
                set("usable", usable);
                (g.name.clone(), total, usable)
            })
            .collect()
    }
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_string();
        let method = session.req_header().method.clone();
        if path == "/reload" {
            if method != http::Method::POST {
                return reply(
                    405,
                    "application/json",
                    br#"{"error":"method_not_allowed"}"#.to_vec(),
                );
            }
            if let Some(refusal) = self.authorize(session) {
                return refusal;
            }
            return match reload_off_thread(&self.reloader, "admin").await {
                Ok(generation) => reply(
                    200,
                    "application/json",
                    serde_json::json!({"status": "reloaded", "generation": generation})
                        .to_string()
                        .into_bytes(),
                ),
                Err(problems) => reply(
                    422,
                    "application/json",
                    serde_json::json!({
                        "status": "rejected",
                        "generation": self.snapshot.load().generation,
                        "errors": problems.0.iter().map(|p| p.to_json()).collect::<Vec<_>>(),
                    })
                    .to_string()
                    .into_bytes(),
                ),
            };
        }
        let known = matches!(
            path.as_str(),
            "/config" | "/healthz" | "/readyz" | "/metrics"
        );
        if known && method != http::Method::GET && method != http::Method::HEAD {
            // Read endpoints only read: anything else is refused, never treated as a GET.
            let mut r = reply(
                405,
                "application/json",
                br#"{"error":"method_not_allowed"}"#.to_vec(),
            );
            r.headers_mut().insert(
                http::header::ALLOW,
                http::HeaderValue::from_static("GET, HEAD"),
            );
            return r;
        }
        match path.as_str() {
            "/config" => reply(
                200,
                "application/json",
                self.config_report().to_string().into_bytes(),
            ),
            "/healthz" => reply(200, "application/json", br#"{"status":"ok"}"#.to_vec()),
            "/readyz" => {
                let snapshot = self.snapshot.load();
                let groups = self.refresh_upstream_gauges(&snapshot);
                let ready = groups.iter().all(|(_, _, usable)| *usable > 0);
                let body = serde_json::json!({
                    "status": if ready { "ready" } else { "not_ready" },
                    "upstreams": groups.iter().map(|(name, total, usable)| serde_json::json!({
                        "name": name, "servers": total, "usable": usable
                    })).collect::<Vec<_>>(),
                });
                reply(
                    if ready { 200 } else { 503 },
                    "application/json",
                    body.to_string().into_bytes(),
                )
            }
            "/metrics" => {
                let snapshot = self.snapshot.load();
                self.refresh_upstream_gauges(&snapshot);
                reply(200, "text/plain; version=0.0.4", self.metrics.render())
            }
            _ => reply(
                404,
                "application/json",
                br#"{"error":"not_found"}"#.to_vec(),
            ),
        }
    }
}
