//! The admin listener: `/healthz` (process is up), `/readyz` (every upstream group has a usable
//! server) and `/metrics` (Prometheus text). Served on its own port, loopback by default.

use std::sync::Arc;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use crate::metrics::Metrics;
use crate::snapshot::Snapshot;

/// The admin HTTP app.
pub struct AdminApp {
    snapshot: Arc<ArcSwap<Snapshot>>,
    metrics: Arc<Metrics>,
}

impl AdminApp {
    /// An admin app over the live snapshot.
    pub fn new(snapshot: Arc<ArcSwap<Snapshot>>, metrics: Arc<Metrics>) -> Self {
        AdminApp { snapshot, metrics }
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

fn reply(status: u16, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    let mut r = Response::new(body);
    *r.status_mut() = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::OK);
    if let Ok(v) = http::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    let len = r.body().len();
    r.headers_mut()
        .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(len));
    r
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_string();
        match path.as_str() {
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
