//! Pingora glue: the `ProxyHttp` implementation that runs the inspection pipeline on every
//! request and forwards what passes.
//!
//! ```text
//!  new_ctx ─ load snapshot once, request id
//!     │
//!  request_filter ─ timeouts, client IP, route match ─▶ the route's pipeline, resumed until
//!     │              it ends: it stops to have the body pre-read and to await a Redis check
//!     │                 └─ 404 no_route        └─ block ─▶ JSON error, Ok(true): upstream never sees it
//!  upstream_peer ─ round-robin over healthy, non-ejected, untried servers
//!  upstream_request_filter ─ Host override, X-Request-Id, X-Forwarded-For
//!  fail_to_connect ─ passive health, retry on another server
//!  response_filter ─ X-Request-Id to the client
//!  fail_to_proxy ─ 502/504 JSON error, never a hang
//!  logging ─ metrics, one line per blocked request
//! ```

use std::sync::Arc;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::proxy::FailToProxy;
use pingora::{Error, ErrorSource, ErrorType};

use super::ctx::{BodyState, Outcome, RequestCtx, RequestId};
use crate::metrics::Metrics;
use crate::pipeline::{settle, Block, BodyPolicy, OversizePolicy, StageKind, Step, Verdict};
use crate::request::{content_length, Request};
use crate::snapshot::Snapshot;

/// The Palisade proxy service.
pub struct PalisadeProxy {
    snapshot: Arc<ArcSwap<Snapshot>>,
    metrics: Arc<Metrics>,
}

impl PalisadeProxy {
    /// A proxy over a swappable snapshot.
    pub fn new(snapshot: Arc<ArcSwap<Snapshot>>, metrics: Arc<Metrics>) -> Self {
        PalisadeProxy { snapshot, metrics }
    }
}

/// Result of the body pre-read.
enum BodyRead {
    /// Go on (body buffered, not needed, or forwarded uninspected per policy).
    Proceed,
    /// Larger than the limit under `oversize: block`, or unreplayable: answer 413.
    TooLarge,
}

/// The host of a request, lower-case and without port: from the URI authority (HTTP/2,
/// absolute-form) or the `Host` header.
fn request_host(req: &RequestHeader) -> &str {
    let raw = req
        .uri
        .authority()
        .map(|a| a.host())
        .or_else(|| {
            req.headers
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
        })
        .unwrap_or("");
    // Strip a port, keeping IPv6 literals (`[::1]:8080`) intact.
    if let Some(end) = raw.strip_prefix('[').and_then(|r| r.find(']')) {
        &raw[..end + 2]
    } else {
        raw.rsplit_once(':').map(|(h, _)| h).unwrap_or(raw)
    }
}

fn is_chunked(req: &RequestHeader) -> bool {
    req.headers
        .get_all(http::header::TRANSFER_ENCODING)
        .iter()
        .any(|v| {
            v.to_str()
                .map(|s| s.to_ascii_lowercase().contains("chunked"))
                .unwrap_or(true)
        })
}

/// Writes a JSON error `{"error": reason, "request_id": id, ...fields}` and ends the response.
pub async fn respond_json_error(
    session: &mut Session,
    request_id: &str,
    status: u16,
    reason: &str,
    extra_headers: &[(&'static str, String)],
    fields: Option<&serde_json::Map<String, serde_json::Value>>,
) -> Result<()> {
    let mut body = serde_json::Map::new();
    body.insert("error".into(), reason.into());
    body.insert("request_id".into(), request_id.into());
    if let Some(fields) = fields {
        for (k, v) in fields {
            body.entry(k.clone()).or_insert_with(|| v.clone());
        }
    }
    let body = serde_json::Value::Object(body).to_string();
    let mut resp = ResponseHeader::build(status, Some(4 + extra_headers.len()))?;
    resp.insert_header(http::header::CONTENT_TYPE, "application/json")?;
    resp.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
    resp.insert_header("x-request-id", request_id)?;
    for (name, value) in extra_headers {
        resp.insert_header(*name, value.as_str())?;
    }
    // An unread request body would be parsed as the next request: close the connection.
    if !session.is_body_done() {
        session.set_keepalive(None);
    }
    session.write_response_header(Box::new(resp), false).await?;
    session
        .write_response_body(Some(Bytes::from(body)), true)
        .await
}

impl PalisadeProxy {
    async fn block(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        stage: StageKind,
        block: Block,
    ) -> Result<bool> {
        let id = ctx.request_id.to_string();
        let shown = block
            .details
            .as_deref()
            .filter(|d| d.expose)
            .map(|d| &d.fields);
        respond_json_error(
            session,
            &id,
            block.status,
            &block.reason,
            &block.headers,
            shown,
        )
        .await?;
        ctx.outcome = Outcome::Blocked {
            stage,
            status: block.status,
            reason: block.reason,
            details: block.details,
        };
        Ok(true)
    }

    /// Pre-reads the body for inspection, within pingora's replay buffer (see
    /// `shared/notes/pingora-body-inspection.md`): bodies with a known length are read only if
    /// they fit the limit; chunked bodies are read until they end or pass the limit.
    async fn pre_read_body(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        policy: BodyPolicy,
        needs_body: bool,
    ) -> Result<BodyRead> {
        let limit = policy.inspect_limit;
        let req = session.req_header();
        let chunked = is_chunked(req);
        let length = content_length(&req.headers);
        if !chunked {
            match length {
                None | Some(0) => return Ok(BodyRead::Proceed),
                Some(n) if n > limit as u64 => {
                    return Ok(match policy.oversize {
                        OversizePolicy::Block => BodyRead::TooLarge,
                        OversizePolicy::Continue => {
                            ctx.body_state = BodyState::Uninspected;
                            BodyRead::Proceed
                        }
                    });
                }
                Some(_) if !needs_body => return Ok(BodyRead::Proceed),
                Some(_) => {}
            }
        }
        // Pingora enables this itself when proxying starts; it must be on before the first read
        // so that what we read here is replayed to the upstream.
        session.enable_retry_buffering();
        let mut buf = BytesMut::with_capacity(length.map_or(8192, |n| n as usize).min(limit + 1));
        while buf.len() <= limit {
            match session.read_request_body().await? {
                Some(chunk) => buf.extend_from_slice(&chunk),
                None => break,
            }
        }
        if session.as_ref().retry_buffer_truncated() {
            // One read overran the replay buffer: the bytes cannot be forwarded any more, so the
            // request cannot be proxied intact whatever the policy says.
            return Ok(BodyRead::TooLarge);
        }
        if buf.len() > limit {
            match policy.oversize {
                OversizePolicy::Block => return Ok(BodyRead::TooLarge),
                OversizePolicy::Continue => {
                    buf.truncate(limit);
                    ctx.body_state = BodyState::Partial;
                }
            }
        } else {
            ctx.body_state = BodyState::Complete;
        }
        ctx.body = Some(buf.freeze());
        Ok(BodyRead::Proceed)
    }
}

#[async_trait]
impl ProxyHttp for PalisadeProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::new(self.snapshot.load_full())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let snapshot = Arc::clone(&ctx.snapshot);
        let t = snapshot.config.timeouts;
        session.set_read_timeout(Some(t.client_read));
        session.set_write_timeout(Some(t.client_write));
        session.set_keepalive(Some(t.client_keepalive.as_secs()));
        let req = session.req_header();
        ctx.peer_ip = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip().to_canonical());
        if let Some(peer) = ctx.peer_ip {
            let resolver = &snapshot.client_ip;
            ctx.peer_trusted = resolver.is_trusted(peer);
            ctx.client_ip = Some(resolver.resolve(peer, &req.headers));
            if ctx.peer_trusted {
                if let Some(id) = req
                    .headers
                    .get("x-request-id")
                    .and_then(|v| RequestId::external(v.as_bytes()))
                {
                    ctx.request_id = id;
                }
            }
        }

        let Some(ri) = snapshot.route_for(request_host(req), req.uri.path()) else {
            ctx.outcome = Outcome::NoRoute;
            let id = ctx.request_id.to_string();
            respond_json_error(session, &id, 404, "no_route", &[], None).await?;
            return Ok(true);
        };
        ctx.route = Some(ri);
        let route = &snapshot.routes[ri];
        let needs = route.pipeline.needs();
        if needs.geo {
            if let (Some(db), Some(ip)) = (&snapshot.geo, ctx.client_ip) {
                ctx.geo = db.lookup(ip);
                self.metrics
                    .count_country(ctx.geo.country.as_ref().map_or("unknown", |c| c.as_str()));
            }
        }

        // The pipeline decides; this loop only does its I/O (body read, awaited checks). The
        // request view is rebuilt per step (a few references) and never held across an await.
        let mut at = 0;
        let mut body_read = false;
        loop {
            let step = {
                let req = Request::of_head(session.req_header(), &ctx.cache)
                    .with_client(ctx.client_ip, ctx.geo.country, ctx.geo.asn)
                    .with_body(ctx.body.as_deref(), ctx.body_state == BodyState::Complete);
                route.pipeline.resume(at, body_read, &req, &mut ctx.notes)
            };
            let verdict = match step {
                Step::Done(v) => v,
                Step::ReadBody { next } => {
                    let policy = route.pipeline.body();
                    if let BodyRead::TooLarge =
                        self.pre_read_body(session, ctx, policy, needs.body).await?
                    {
                        let b = Block::new(413, "body_too_large");
                        return self.block(session, ctx, StageKind::Body, b).await;
                    }
                    body_read = true;
                    at = next;
                    continue;
                }
                Step::Await {
                    kind,
                    pending,
                    next,
                } => {
                    let (decision, notes) = pending.await;
                    ctx.notes.merge(notes);
                    match settle(kind, decision) {
                        Some(v) => v,
                        None => {
                            at = next;
                            continue;
                        }
                    }
                }
            };
            return match verdict {
                Verdict::Block(stage, b) => self.block(session, ctx, stage, b).await,
                Verdict::Forward | Verdict::Allow => Ok(false),
            };
        }
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let snapshot = Arc::clone(&ctx.snapshot);
        let route = ctx
            .route
            .and_then(|i| snapshot.routes.get(i))
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "request has no route"))?;
        let group = &snapshot.upstreams[route.upstream];
        let addr = group.select(&ctx.tried).ok_or_else(|| {
            Error::explain(
                ErrorType::ConnectNoRoute,
                format!("no usable server in upstream {:?}", group.name),
            )
        })?;
        ctx.tried.push(addr);
        ctx.upstream_addr = Some(addr);
        let t = snapshot.config.timeouts;
        let mut peer = HttpPeer::new(addr, false, String::new());
        peer.options.connection_timeout = Some(t.upstream_connect);
        peer.options.read_timeout = Some(t.upstream_read);
        peer.options.write_timeout = Some(t.upstream_write);
        peer.options.idle_timeout = Some(t.upstream_idle);
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let snapshot = &ctx.snapshot;
        if let Some(route) = ctx.route.and_then(|i| snapshot.routes.get(i)) {
            if let Some(host) = &snapshot.upstreams[route.upstream].host_header {
                upstream_request.insert_header(http::header::HOST, host.as_str())?;
            }
        }
        upstream_request.insert_header("x-request-id", ctx.request_id.to_string())?;
        if let Some(peer) = ctx.peer_ip {
            // A trusted proxy's chain is kept and extended; an untrusted peer's is dropped, so
            // the upstream never sees a spoofed chain. Several XFF headers become one list.
            let prev = if ctx.peer_trusted {
                let parts: Vec<&str> = upstream_request
                    .headers
                    .get_all("x-forwarded-for")
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .filter(|v| !v.trim().is_empty())
                    .collect();
                parts.join(", ")
            } else {
                String::new()
            };
            let xff = if prev.is_empty() {
                peer.to_string()
            } else {
                format!("{prev}, {peer}")
            };
            upstream_request.insert_header("x-forwarded-for", xff)?;
        }
        if let Some(client) = ctx.client_ip {
            upstream_request.insert_header("x-real-ip", client.to_string())?;
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        upstream_response.insert_header("x-request-id", ctx.request_id.to_string())?;
        for (name, value) in ctx.notes.response_headers.drain(..) {
            upstream_response.insert_header(name, value)?;
        }
        Ok(())
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        if let Some(route) = ctx.route.and_then(|i| ctx.snapshot.routes.get(i)) {
            let group = &ctx.snapshot.upstreams[route.upstream];
            if let Some(addr) = peer._address.as_inet() {
                group.record_failure(*addr);
            }
            group.errors[0].inc();
            // Nothing was sent yet, so any request may go to another server.
            if ctx.tried.len() < group.len() {
                e.set_retry(true);
            }
        }
        e
    }

    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        _reused: bool,
        peer: &HttpPeer,
        #[cfg(unix)] _fd: std::os::unix::io::RawFd,
        #[cfg(windows)] _sock: std::os::windows::io::RawSocket,
        _digest: Option<&pingora::protocols::Digest>,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(route) = ctx.route.and_then(|i| ctx.snapshot.routes.get(i)) {
            if let Some(addr) = peer._address.as_inet() {
                ctx.snapshot.upstreams[route.upstream].record_success(*addr);
            }
        }
        Ok(())
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let (status, reason) = match (e.etype(), e.esource()) {
            (ErrorType::HTTPStatus(code), _) => (*code, "http_error"),
            (
                ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout,
                ErrorSource::Upstream,
            ) => (504, "upstream_timeout"),
            (ErrorType::ConnectNoRoute, _) => (502, "no_upstream_available"),
            (_, ErrorSource::Upstream) => (502, "upstream_unavailable"),
            (ErrorType::ReadTimedout, ErrorSource::Downstream) => (408, "client_timeout"),
            (
                ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed,
                ErrorSource::Downstream,
            ) => (0, "client_gone"),
            (_, ErrorSource::Downstream) => (400, "bad_request"),
            _ => (500, "internal_error"),
        };
        if status == 504 || status == 502 {
            if let Some(route) = ctx.route.and_then(|i| ctx.snapshot.routes.get(i)) {
                let kind = if status == 504 { 1 } else { 2 };
                ctx.snapshot.upstreams[route.upstream].errors[kind].inc();
            }
        }
        if status > 0 {
            let id = ctx.request_id.to_string();
            // If the response head already went out this fails; the connection is closed anyway.
            if let Err(werr) = respond_json_error(session, &id, status, reason, &[], None).await {
                tracing::debug!(error = %werr, "could not send the error response");
            }
        }
        if status == 0 {
            // The client went away: routine (e.g. a load generator stopping), not an incident.
            tracing::debug!(request_id = %ctx.request_id, error = %e, "client closed the connection");
        } else {
            tracing::warn!(request_id = %ctx.request_id, status, reason, upstream = ?ctx.upstream_addr,
                error = %e, "request failed");
        }
        ctx.outcome = Outcome::Error { status };
        FailToProxy {
            error_code: status,
            can_reuse_downstream: false,
        }
    }

    fn suppress_error_log(&self, _session: &Session, _ctx: &RequestCtx, _error: &Error) -> bool {
        // Pingora logs every failed proxy attempt at ERROR; our own line in `fail_to_proxy`
        // replaces it (with the request id), and logs client disconnects at debug only.
        true
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut RequestCtx) {
        let status = session
            .response_written()
            .map(|r| r.status.as_u16())
            .unwrap_or(0);
        let Some(route) = ctx.route.and_then(|i| ctx.snapshot.routes.get(i)) else {
            if ctx.outcome == Outcome::NoRoute {
                self.metrics.no_route();
            }
            return;
        };
        let m = &route.metrics;
        m.duration.observe(ctx.start.elapsed().as_secs_f64());
        m.response(status);
        for label in &ctx.notes.counted {
            m.counts.get(&[route.name.as_str(), label]).inc();
        }
        match &ctx.outcome {
            Outcome::Forwarded => m.forwarded.inc(),
            Outcome::Error { .. } | Outcome::NoRoute => m.error.inc(),
            Outcome::Blocked {
                stage,
                status,
                reason,
                details,
            } => {
                m.blocked.inc();
                m.blocks
                    .get(&[route.name.as_str(), stage.name(), reason])
                    .inc();
                let req = session.req_header();
                tracing::info!(
                    target: "palisade::blocked",
                    request_id = %ctx.request_id,
                    route = %route.name,
                    stage = stage.name(),
                    reason = %reason,
                    status = *status,
                    client = ?ctx.client_ip,
                    country = ?ctx.geo.country,
                    asn = ?ctx.geo.asn,
                    method = %req.method,
                    path = %req.uri.path(),
                    details = %details
                        .as_deref()
                        .map(|d| serde_json::Value::Object(d.fields.clone()).to_string())
                        .unwrap_or_default(),
                    "request blocked"
                );
            }
        }
    }
}
