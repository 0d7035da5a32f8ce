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
use pingora::http::authority::{raw_target_authority, RawTargetAuthority};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::proxy::FailToProxy;
use pingora::{Error, ErrorSource, ErrorType};

use super::ctx::{BodyState, Outcome, RequestCtx, RequestId};
use crate::config::file::{ContentEncodingPolicy, EncodedSlashConfig, ForwardPath};
use crate::metrics::Metrics;
use crate::pipeline::{settle, Block, BodyPolicy, OversizePolicy, StageKind, Step, Verdict};
use crate::request::canon::{self, EncodedSlash, Refusal};
use crate::request::Request;
use crate::snapshot::Snapshot;

/// The Palisade proxy service.
pub struct PalisadeProxy {
    snapshot: Arc<ArcSwap<Snapshot>>,
    metrics: Arc<Metrics>,
    decisions: Option<Arc<crate::decisions::DecisionSink>>,
}

impl PalisadeProxy {
    /// A proxy over a swappable snapshot, writing decision-log lines to `decisions`.
    pub fn new(
        snapshot: Arc<ArcSwap<Snapshot>>,
        metrics: Arc<Metrics>,
        decisions: Option<Arc<crate::decisions::DecisionSink>>,
    ) -> Self {
        PalisadeProxy {
            snapshot,
            metrics,
            decisions,
        }
    }
}

/// Result of the body pre-read.
enum BodyRead {
    /// Go on (body buffered, not needed, or forwarded uninspected per policy).
    Proceed,
    /// Larger than the limit under `oversize: block`, or unreplayable: answer 413.
    TooLarge,
    /// The body did not arrive within `http.body_timeout`: answer 408.
    TimedOut,
}

/// Inflates a `gzip`/`deflate` body, at most `limit` bytes of output (a decompression bomb
/// stops there). `None` for codings other than these; the flag tells whether the whole body
/// fit.
fn inflate(coding: &[u8], body: &[u8], limit: usize) -> Option<std::io::Result<(Vec<u8>, bool)>> {
    use std::io::Read;
    let reader: Box<dyn Read + '_> = match coding {
        b"gzip" | b"x-gzip" => Box::new(flate2::read::MultiGzDecoder::new(body)),
        b"deflate" => Box::new(flate2::read::ZlibDecoder::new(body)),
        _ => return None,
    };
    let mut out = Vec::with_capacity(body.len().saturating_mul(4).min(limit + 1));
    Some(
        reader
            .take(limit as u64 + 1)
            .read_to_end(&mut out)
            .map(|_| {
                let complete = out.len() <= limit;
                out.truncate(limit);
                (out, complete)
            }),
    )
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
    respond_json(session, request_id, status, extra_headers, body).await
}

/// Writes a JSON answer of Palisade's own and ends the response.
pub async fn respond_json(
    session: &mut Session,
    request_id: &str,
    status: u16,
    extra_headers: &[(&'static str, String)],
    body: String,
) -> Result<()> {
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
        if let Some(body) = block.details.as_deref().and_then(|d| d.body.as_ref()) {
            // An MCP route's JSON-RPC error, with the request id where clients show data.
            let mut body = body.clone();
            let objects = match &mut body {
                serde_json::Value::Array(a) => a.iter_mut().collect::<Vec<_>>(),
                one => vec![one],
            };
            for e in objects {
                if let Some(err) = e.get_mut("error").and_then(|x| x.as_object_mut()) {
                    let data = err.entry("data").or_insert(serde_json::Value::Null);
                    if data.is_null() {
                        *data = serde_json::Value::Object(serde_json::Map::new());
                    }
                    if let Some(d) = data.as_object_mut() {
                        d.insert("request_id".into(), id.clone().into());
                    }
                }
            }
            respond_json(session, &id, block.status, &block.headers, body.to_string()).await?;
        } else {
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
        }
        ctx.outcome = Outcome::Blocked {
            stage,
            status: block.status,
            reason: block.reason,
            details: block.details,
        };
        Ok(true)
    }

    /// Answers a request refused before or outside the pipeline (malformed, ambiguous, over a
    /// limit): always a 4xx with Palisade's JSON body, logged as a client error.
    async fn refuse(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        r: Refusal,
    ) -> Result<bool> {
        let id = ctx.request_id.to_string();
        tracing::info!(request_id = %id, status = r.status, reason = r.reason, detail = r.detail,
            client = ?ctx.client_ip, "request refused");
        respond_json_error(session, &id, r.status, r.reason, &[], None).await?;
        ctx.outcome = Outcome::Refused {
            status: r.status,
            reason: r.reason,
        };
        Ok(true)
    }

    /// Reads the canonical head (framing, limits, authority, path) before routing, after
    /// removing the headers only trusted proxies may set. See `request::canon`.
    fn canonical_head(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<(), Refusal> {
        let http = &ctx.snapshot.config.http;
        if !ctx.peer_trusted {
            // Usually none is present: look before removing (one pass over a few headers).
            let present = session
                .req_header()
                .headers
                .keys()
                .any(|k| http.untrusted_headers.iter().any(|u| u == k.as_str()));
            if present {
                let req = session.req_header_mut();
                for name in &http.untrusted_headers {
                    req.remove_header(name.as_str());
                }
            }
        }
        let req = session.req_header();
        ctx.framing = canon::framing(&req.headers)?;
        for name in [http::header::CONTENT_TYPE, http::header::CONTENT_ENCODING] {
            // Parsers pick the first or the last of several: the body would be read two ways.
            if req.headers.get_all(&name).iter().nth(1).is_some() {
                return Err(Refusal {
                    status: 400,
                    reason: "ambiguous_content_type",
                    detail: "more than one Content-Type or Content-Encoding field",
                });
            }
        }
        if req.headers.len() > http.max_headers {
            return Err(Refusal {
                status: 431,
                reason: "too_many_headers",
                detail: "more header fields than http.max_headers",
            });
        }
        let mut head = req.raw_path().len() + 16;
        for (name, value) in &req.headers {
            if value.len() > http.max_header_size {
                return Err(Refusal {
                    status: 431,
                    reason: "header_too_large",
                    detail: "a header value longer than http.max_header_size",
                });
            }
            head += name.as_str().len() + value.len() + 4;
        }
        if head > http.max_head_size {
            return Err(Refusal {
                status: 431,
                reason: "header_too_large",
                detail: "a request head larger than http.max_head_size",
            });
        }
        // Absolute-form targets keep their authority in the raw target (pingora leaves it off
        // the URI); HTTP/2's `:authority` is on the URI.
        const BAD_TARGET: Refusal = Refusal {
            status: 400,
            reason: "bad_request_target",
            detail: "a request target that is not an http(s) URL or path",
        };
        if !req.raw_path_is_utf8() {
            return Err(BAD_TARGET);
        }
        let target = match raw_target_authority(req.raw_path()) {
            RawTargetAuthority::Absolute {
                scheme, authority, ..
            } => {
                if !(scheme.eq_ignore_ascii_case(b"http") || scheme.eq_ignore_ascii_case(b"https"))
                {
                    return Err(BAD_TARGET);
                }
                Some(authority)
            }
            RawTargetAuthority::AmbiguousAuthority => return Err(BAD_TARGET),
            RawTargetAuthority::None => req.uri.authority().map(|a| a.as_str().as_bytes()),
        };
        ctx.authority = canon::authority(target, &req.headers)?;
        if !req.headers.contains_key(http::header::HOST) {
            // Named only by the target: the rules see it as `Host`, as the backend will.
            let host = ctx.authority.to_header();
            if let Ok(v) = http::HeaderValue::from_str(&host) {
                session
                    .req_header_mut()
                    .insert_header(http::header::HOST, v)
                    .ok();
            }
        }
        let req = session.req_header();
        let slash = match http.encoded_slash {
            EncodedSlashConfig::Decode => EncodedSlash::Decode,
            EncodedSlashConfig::Reject => EncodedSlash::Reject,
            EncodedSlashConfig::Keep => EncodedSlash::Keep,
        };
        let raw = req.uri.path();
        if canon::is_plain(raw) {
            // Already normal: forwarded as it came (`normal_path` empty means "the raw one").
            ctx.normal_path.clear();
            ctx.cache.set_path(raw.to_string());
        } else {
            let path = canon::normalize_path(raw, slash)?;
            ctx.normal_path = path.encoded();
            ctx.cache.set_path(path.decoded());
        }
        Ok(())
    }

    /// After the body pre-read: inflates a compressed body for inspection (by policy) and
    /// refuses bodies that cannot be inspected as the backend will read them.
    fn check_body(
        &self,
        session: &Session,
        ctx: &mut RequestCtx,
        policy: BodyPolicy,
    ) -> Result<(), Refusal> {
        let req = session.req_header();
        let coding = req
            .headers
            .get(http::header::CONTENT_ENCODING)
            .map(|v| v.as_bytes().trim_ascii().to_ascii_lowercase())
            .filter(|c| !c.is_empty() && c != b"identity");
        if let (Some(coding), Some(body)) = (coding, ctx.body.as_ref()) {
            let unsupported = Refusal {
                status: 415,
                reason: "unsupported_content_encoding",
                detail: "a request body with a content coding Palisade does not inspect",
            };
            if ctx.snapshot.config.http.content_encoding == ContentEncodingPolicy::Refuse {
                return Err(unsupported);
            }
            if ctx.body_state != BodyState::Complete {
                // A compressed prefix cannot be inflated reliably: refuse rather than guess.
                return Err(Refusal {
                    status: 413,
                    reason: "body_too_large",
                    detail: "a compressed body larger than the inspection limit",
                });
            }
            let (plain, complete) = inflate(&coding, body, policy.inspect_limit)
                .ok_or(unsupported)?
                .map_err(|_| Refusal {
                    status: 400,
                    reason: "bad_content_encoding",
                    detail: "the body does not decode with its Content-Encoding",
                })?;
            if !complete {
                match policy.oversize {
                    OversizePolicy::Block => {
                        return Err(Refusal {
                            status: 413,
                            reason: "body_too_large",
                            detail: "the decoded body is larger than the inspection limit",
                        })
                    }
                    OversizePolicy::Continue => ctx.body_state = BodyState::Partial,
                }
            }
            ctx.body = Some(Bytes::from(plain));
        }
        let view = Request::of_head(req, &ctx.cache)
            .with_body(ctx.body.as_deref(), ctx.body_state == BodyState::Complete);
        match view.body_refusal() {
            Some(r) => Err(r),
            None => Ok(()),
        }
    }

    /// The block for a body refusal; for JSON that does not parse, with where (as request
    /// validation answers it: the client's own body, so shown).
    fn body_block(&self, session: &Session, ctx: &RequestCtx, r: Refusal) -> Block {
        let mut b = Block::new(r.status, r.reason);
        if r.reason == "invalid_json" {
            let view = Request::of_head(session.req_header(), &ctx.cache)
                .with_body(ctx.body.as_deref(), ctx.body_state == BodyState::Complete);
            if let Err(e) = view.json_document() {
                let mut fields = serde_json::Map::new();
                fields.insert(
                    "position".into(),
                    serde_json::json!({"line": e.line, "column": e.column}),
                );
                let message: String = e.message.chars().take(200).collect();
                fields.insert("message".into(), message.into());
                b.details = Some(Arc::new(crate::pipeline::BlockDetails {
                    body: None,
                    fields,
                    expose: true,
                }));
            }
        }
        b
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
        let length = ctx.framing.length;
        // HTTP/2 frames bodies itself: without `content-length` the length is unknown until
        // the stream ends, as with chunked HTTP/1.1.
        let chunked = ctx.framing.chunked
            || (length.is_none() && session.is_http2() && !session.is_body_empty());
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
        // A client that asked to be told before sending its body is told now: the body is
        // read here, not by the upstream (whose own `100` would come too late).
        let expects = session
            .req_header()
            .headers
            .get(http::header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        if expects && !session.is_http2() {
            session
                .as_downstream_mut()
                .write_continue_response()
                .await?;
            ctx.continued = true;
        }
        let mut buf = BytesMut::with_capacity(length.map_or(8192, |n| n as usize).min(limit + 1));
        let deadline = ctx.snapshot.config.http.body_timeout;
        let read = tokio::time::timeout(deadline, async {
            while buf.len() <= limit {
                match session.read_request_body().await {
                    Ok(Some(chunk)) => buf.extend_from_slice(&chunk),
                    Ok(None) => break,
                    Err(mut e) => {
                        // Malformed chunks, resets and read timeouts are the client's doing.
                        e.as_down();
                        return Err(e);
                    }
                }
            }
            Ok(())
        })
        .await;
        match read {
            Ok(r) => r?,
            Err(_) => return Ok(BodyRead::TimedOut),
        }
        if buf.len() > limit {
            match policy.oversize {
                OversizePolicy::Block => return Ok(BodyRead::TooLarge),
                OversizePolicy::Continue => {
                    if session.as_ref().retry_buffer_truncated() {
                        // One read overran pingora's replay buffer: the bytes read are sent
                        // ahead of the rest of the body by `request_body_filter`. If the body
                        // also ended there, pingora would not call that filter again: refuse.
                        if session.is_body_done() {
                            return Ok(BodyRead::TooLarge);
                        }
                        ctx.replay = Some(Bytes::copy_from_slice(&buf));
                    }
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

/// Headers the upstream gets on TLS connections: the client's JA3 and JA4 fingerprints and,
/// under mTLS, its verified certificate's subject. Client-sent copies are removed.
const TLS_HEADERS: [&str; 3] = [
    "x-palisade-ja3",
    "x-palisade-ja4",
    "x-palisade-client-subject",
];

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
        ctx.ssl = session.digest().and_then(|d| d.ssl_digest.clone());
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

        if let Err(r) = self.canonical_head(session, ctx) {
            return self.refuse(session, ctx, r).await;
        }
        if ctx
            .cache
            .path()
            .starts_with("/.well-known/oauth-protected-resource")
        {
            if let Some(doc) = snapshot.protected_resource_metadata(ctx.cache.path()) {
                let id = ctx.request_id.to_string();
                let body = String::from_utf8_lossy(doc).into_owned();
                // Browser-based MCP clients read it cross-origin.
                let headers = [
                    ("access-control-allow-origin", "*".to_string()),
                    ("cache-control", "max-age=300".to_string()),
                ];
                respond_json(session, &id, 200, &headers, body).await?;
                ctx.outcome = Outcome::NoRoute;
                return Ok(true);
            }
        }
        let Some(ri) = snapshot.route_for(&ctx.authority.host, ctx.cache.path()) else {
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
                    .with_tls(
                        ctx.ssl
                            .as_ref()
                            .and_then(|d| d.extension.get::<crate::tls::TlsConnection>()),
                    )
                    .with_body(ctx.body.as_deref(), ctx.body_state == BodyState::Complete);
                route.pipeline.resume(at, body_read, &req, &mut ctx.notes)
            };
            let verdict = match step {
                Step::Done(v) => v,
                Step::ReadBody { next } => {
                    let policy = route.pipeline.body();
                    match self.pre_read_body(session, ctx, policy, needs.body).await? {
                        BodyRead::TooLarge => {
                            let b = Block::new(413, "body_too_large");
                            return self.block(session, ctx, StageKind::Body, b).await;
                        }
                        BodyRead::TimedOut => {
                            let b = Block::new(408, "client_timeout");
                            return self.block(session, ctx, StageKind::Body, b).await;
                        }
                        BodyRead::Proceed => {}
                    }
                    if let Err(r) = self.check_body(session, ctx, policy) {
                        let b = self.body_block(session, ctx, r);
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
                    if let Some(claims) = ctx.notes.claims.take() {
                        Request::of_head(session.req_header(), &ctx.cache).set_claims(claims);
                    }
                    match settle(kind, decision) {
                        Some(v) => v,
                        None => {
                            at = next;
                            continue;
                        }
                    }
                }
            };
            ctx.inspection = Some(ctx.start.elapsed());
            return match verdict {
                Verdict::Block(stage, b) => self.block(session, ctx, stage, b).await,
                Verdict::Forward | Verdict::Allow => {
                    if let Some(m) = &route.mcp {
                        if m.filter_tools_list || m.advertised {
                            let req = Request::of_head(session.req_header(), &ctx.cache)
                                .with_body(ctx.body.as_deref(), true);
                            ctx.mcp_tools_list = matches!(req.mcp(), Some(Ok(msgs))
                                if msgs.methods().any(|x| x == "tools/list"));
                        }
                    }
                    Ok(false)
                }
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
        ctx.upstream_started = Some(std::time::Instant::now());
        let t = snapshot.config.timeouts;
        let mut peer = group.peer(addr);
        peer.options.connection_timeout = Some(t.upstream_connect);
        peer.options.read_timeout = Some(t.upstream_read);
        peer.options.write_timeout = Some(t.upstream_write);
        peer.options.idle_timeout = Some(t.upstream_idle);
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        // The scheme the client used: TLS terminated here is `https` to the upstream.
        let tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
        let snapshot = &ctx.snapshot;
        if let Some(route) = ctx.route.and_then(|i| snapshot.routes.get(i)) {
            // The backend gets the request line in origin form, with the path the route
            // forwards: the normalized one that was routed and inspected, or the original.
            let path = match route.forward_path {
                ForwardPath::Normalized if !ctx.normal_path.is_empty() => ctx.normal_path.as_str(),
                _ => upstream_request.uri.path(),
            };
            let origin_form = upstream_request.raw_path().first() == Some(&b'/');
            // Rebuilt only when it changes (the common request is already canonical).
            if !origin_form || path != upstream_request.uri.path() {
                let target = match upstream_request.uri.query() {
                    Some(q) => format!("{path}?{q}"),
                    None => path.to_string(),
                };
                let uri = http::Uri::try_from(target).map_err(|e| {
                    Error::because(ErrorType::InternalError, "rebuilding the request target", e)
                })?;
                upstream_request.set_uri(uri);
            }
            // ... and the host that was routed on, whatever form the client named it in.
            match &snapshot.upstreams[route.upstream].host_header {
                Some(host) => upstream_request.insert_header(http::header::HOST, host.as_str())?,
                None => {
                    let host = ctx.authority.to_header();
                    let same = upstream_request
                        .headers
                        .get(http::header::HOST)
                        .is_some_and(|h| h.as_bytes() == host.as_bytes());
                    if !same {
                        upstream_request.insert_header(http::header::HOST, host)?;
                    }
                }
            }
        }
        // Set from what the proxy saw, unless a trusted proxy in front already said it.
        for (name, value) in [
            (
                "x-forwarded-proto",
                if tls { "https" } else { "http" }.to_string(),
            ),
            ("x-forwarded-host", ctx.authority.to_header()),
        ] {
            if !(ctx.peer_trusted && upstream_request.headers.contains_key(name)) {
                upstream_request.insert_header(name, value)?;
            }
        }
        if ctx.continued {
            // The client got its `100 Continue` and sent the body already.
            upstream_request.remove_header(&http::header::EXPECT);
        }
        upstream_request.insert_header("x-request-id", ctx.request_id.to_string())?;
        // Verified token claims the route forwards (client-sent copies removed first).
        if let Some(auth) = ctx
            .route
            .and_then(|i| ctx.snapshot.config.routes.get(i))
            .and_then(|r| r.policy.auth.as_ref())
        {
            // An MCP server never sees the client's token unless the route says so.
            let strip = ctx
                .route
                .and_then(|i| ctx.snapshot.routes.get(i))
                .and_then(|r| r.mcp.as_ref())
                .and_then(|m| m.strip_token.as_ref());
            match strip {
                None => {}
                Some(crate::auth::TokenSource::Authorization) => {
                    upstream_request.remove_header(&http::header::AUTHORIZATION);
                }
                Some(crate::auth::TokenSource::Header(h)) => {
                    upstream_request.remove_header(h.as_str());
                }
                Some(crate::auth::TokenSource::Cookie(name)) => {
                    match crate::request::without_cookie(&upstream_request.headers, name) {
                        Some(rest) => {
                            upstream_request.insert_header(http::header::COOKIE, rest)?;
                        }
                        None => {
                            upstream_request.remove_header(&http::header::COOKIE);
                        }
                    }
                }
            }
            let view = Request::of_head(session.req_header(), &ctx.cache);
            for (claim, header) in &auth.forward_claims {
                upstream_request.remove_header(header.as_str());
                if let Some(v) = view.claim(claim) {
                    if let Ok(v) = http::HeaderValue::from_str(&v) {
                        upstream_request.insert_header(header.clone(), v)?;
                    }
                }
            }
        }
        // What the TLS handshake learned, for the backend (as CloudFront's viewer headers):
        // only Palisade sets these, whoever the client is.
        for name in TLS_HEADERS {
            upstream_request.remove_header(name);
        }
        if let Some(t) = ctx.tls() {
            let subject = t.client_subject.as_deref().unwrap_or("");
            for (name, value) in TLS_HEADERS.iter().zip([t.ja3.as_str(), &t.ja4, subject]) {
                if let Ok(v) = http::HeaderValue::from_str(value) {
                    if !value.is_empty() {
                        upstream_request.insert_header(*name, v)?;
                    }
                }
            }
        }
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

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        // Bytes read for inspection past pingora's replay buffer go out first.
        if let Some(first) = ctx.replay.take() {
            let mut joined =
                BytesMut::with_capacity(first.len() + body.as_ref().map_or(0, |b| b.len()));
            joined.extend_from_slice(&first);
            if let Some(rest) = body.as_ref() {
                joined.extend_from_slice(rest);
            }
            *body = Some(joined.freeze());
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        upstream_response.insert_header("x-request-id", ctx.request_id.to_string())?;
        for (name, value) in ctx.notes.response_headers.drain(..) {
            upstream_response.insert_header(name, value)?;
        }
        if ctx.mcp_tools_list && upstream_response.status.is_success() {
            let media = upstream_response
                .headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_ascii_lowercase();
            let sse = media.starts_with("text/event-stream");
            let encoded = upstream_response
                .headers
                .get(http::header::CONTENT_ENCODING)
                .is_some_and(|v| v.as_bytes() != b"identity");
            if (sse || media.starts_with("application/json")) && !encoded {
                ctx.tools_filter = Some(crate::mcp::ToolsListFilter {
                    sse,
                    ..Default::default()
                });
                // The filtered body's length is not known yet.
                upstream_response.remove_header(&http::header::CONTENT_LENGTH);
                if !session.is_http2() {
                    upstream_response.insert_header(http::header::TRANSFER_ENCODING, "chunked")?;
                }
            }
        }
        Ok(())
    }

    fn response_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<std::time::Duration>> {
        let Some(filter) = ctx.tools_filter.as_mut() else {
            return Ok(None);
        };
        let Some(mcp) = ctx
            .route
            .and_then(|i| ctx.snapshot.routes.get(i))
            .and_then(|r| r.mcp.as_ref())
        else {
            return Ok(None);
        };
        let req =
            Request::of_head(session.req_header(), &ctx.cache).with_body(ctx.body.as_deref(), true);
        let empty = serde_json::Map::new();
        let claims = req.claims().unwrap_or(&empty);
        let keep = |tool: &str| mcp.may_call(tool, claims, &req);
        let chunk = body.as_deref().unwrap_or(&[]);
        let out = filter.push(mcp, chunk, end_of_stream, &keep);
        *body = (!out.is_empty() || end_of_stream).then(|| Bytes::from(out));
        Ok(None)
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
                group.ops.retries.inc();
            }
        }
        e
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(route) = ctx.route.and_then(|i| ctx.snapshot.routes.get(i)) {
            let ops = &ctx.snapshot.upstreams[route.upstream].ops;
            let class = (upstream_response.status.as_u16() / 100).wrapping_sub(1) as usize;
            if let Some(c) = ops.responses.get(class) {
                c.inc();
            }
            if let Some(t) = ctx.upstream_started {
                ops.latency.observe(t.elapsed().as_secs_f64());
            }
        }
        Ok(())
    }

    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        reused: bool,
        peer: &HttpPeer,
        #[cfg(unix)] _fd: std::os::unix::io::RawFd,
        #[cfg(windows)] _sock: std::os::windows::io::RawSocket,
        _digest: Option<&pingora::protocols::Digest>,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(route) = ctx.route.and_then(|i| ctx.snapshot.routes.get(i)) {
            let group = &ctx.snapshot.upstreams[route.upstream];
            if let Some(addr) = peer._address.as_inet() {
                group.record_success(*addr);
            }
            if let (false, Some(t)) = (reused, ctx.upstream_started) {
                group.ops.connect.observe(t.elapsed().as_secs_f64());
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
        } else if status < 500 {
            tracing::info!(request_id = %ctx.request_id, status, reason, error = %e,
                "client error");
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
        if let (Some(sink), Some(log)) = (&self.decisions, &ctx.snapshot.config.decision_log) {
            if let Some(action) = super::decision_log::action(ctx, log.allowed_sample) {
                sink.send(super::decision_log::line(session, ctx, log, action, status));
            }
        }
        let Some(route) = ctx.route.and_then(|i| ctx.snapshot.routes.get(i)) else {
            match ctx.outcome {
                Outcome::NoRoute => self.metrics.no_route(),
                Outcome::Refused { reason, .. } => self.metrics.refused(reason),
                _ => {}
            }
            return;
        };
        let m = &route.metrics;
        m.duration.observe(ctx.start.elapsed().as_secs_f64());
        m.response(status);
        if let Some(c) = m.methods.get(crate::metrics::method_class(
            session.req_header().method.as_str(),
        )) {
            c.inc();
        }
        if let Some(b) = &ctx.body {
            m.inspected_bytes.inc_by(b.len() as u64);
        }
        for (h, ns) in self.metrics.ops.inspection.iter().zip(ctx.notes.stage_ns) {
            if let Some(ns) = ns {
                h.observe(ns as f64 / 1e9);
            }
        }
        if let Outcome::Blocked {
            stage: crate::pipeline::StageKind::Geo,
            reason,
            ..
        } = &ctx.outcome
        {
            if reason == "geo_denied" {
                // Only countries the config names become labels.
                let named = |c: &str| {
                    let cfg = ctx.route.and_then(|i| ctx.snapshot.config.routes.get(i));
                    cfg.and_then(|r| r.policy.geo.as_ref()).is_some_and(|g| {
                        g.allow
                            .iter()
                            .chain(g.deny.iter())
                            .flatten()
                            .any(|x| x.value.eq_ignore_ascii_case(c))
                    })
                };
                let label = match &ctx.geo.country {
                    Some(c) if named(c.as_str()) => c.as_str(),
                    Some(_) => "other",
                    None => "unknown",
                };
                self.metrics.ops.geo_blocked.get(&[label]).inc();
            }
        }
        for label in &ctx.notes.counted {
            m.counts.get(&[route.name.as_str(), label]).inc();
        }
        match &ctx.outcome {
            Outcome::Forwarded => m.forwarded.inc(),
            Outcome::Error { .. } | Outcome::NoRoute | Outcome::Refused { .. } => m.error.inc(),
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
                    ja4 = ctx.tls().map(|t| t.ja4.as_str()),
                    tls_client = ctx.tls().and_then(|t| t.client_subject.as_deref()),
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
