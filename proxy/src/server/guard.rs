//! The connection guard: what a hardened nginx or Envoy enforces below HTTP, which pingora
//! 0.9 does not offer.
//!
//! - **A deadline for the whole request head** (`http.head_timeout`, from its first byte):
//!   pingora only times out each read, so a client dripping one header byte a second holds a
//!   connection and its buffers for as long as it likes. On expiry the client gets a 408 with
//!   Palisade's JSON body and the connection is closed.
//! - **A limit on the head size** (`http.max_head_size`) enforced while it arrives (pingora
//!   buffers up to 1 MiB before it looks): 431.
//! - **Connections per client address** (`http.max_connections_per_ip`): more are closed at
//!   accept. Trusted proxies (`client_ip.trusted_proxies`) are not limited: behind a load
//!   balancer every connection comes from a few addresses.
//! - **Pingora's own error answers** (a 400 for an unparsable head, a 405 for `CONNECT`)
//!   carry `Server: Pingora` and no body; they are rewritten into Palisade's JSON answers.
//!
//! It works on the byte stream (a wrapper around pingora's `Stream`) because pingora reads
//! the head before any hook of `ProxyHttp` runs. HTTP/2 connections (the prior-knowledge
//! preface) pass through untouched: h2 has its own limits on header lists.
//!
//! The first head of a connection is read here, before pingora sees the connection, and
//! replayed to it: pingora allocates its per-request state (tens of KiB per connection) up
//! front, so a flood of clients that never finish a head costs only this small buffer each
//! (see `benches/flood.py`). Later heads on a kept-alive connection are read by pingora
//! through the same wrapper, which then enforces the deadline and size as they stream by.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::{SslDigest, TlsRef};
use pingora::protocols::Stream;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl,
    TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

use super::accept::{self, Bound};
use super::ctx::RequestId;
use crate::snapshot::Snapshot;

/// The limits the guard enforces, read from the live snapshot for each new connection.
#[derive(Debug, Clone, Copy)]
struct Limits {
    head_timeout: Duration,
    max_head_size: usize,
    /// How long a new connection may stay silent before its first byte.
    first_byte: Duration,
}

/// Open connections per client address.
#[derive(Default)]
pub struct ConnectionTable {
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One open connection in `palisade_connections_active`; uncounted when dropped.
struct Active(prometheus::IntGauge);

impl Active {
    fn new(gauge: &prometheus::IntGauge) -> Active {
        gauge.inc();
        Active(gauge.clone())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// One counted connection; uncounted when dropped.
struct Permit {
    table: Arc<ConnectionTable>,
    ip: IpAddr,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Ok(mut open) = self.table.open.lock() {
            if let Some(n) = open.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    open.remove(&self.ip);
                }
            }
        }
    }
}

impl ConnectionTable {
    fn acquire(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<Permit> {
        let mut open = self.open.lock().ok()?;
        let n = open.entry(ip).or_insert(0);
        if max > 0 && *n >= max {
            return None;
        }
        *n += 1;
        Some(Permit {
            table: Arc::clone(self),
            ip,
        })
    }
}

/// A [`ServerApp`] (the pingora HTTP proxy) behind the guard.
pub struct GuardedApp<A> {
    inner: Arc<A>,
    snapshot: Arc<ArcSwap<Snapshot>>,
    table: Arc<ConnectionTable>,
    metrics: Arc<crate::metrics::Metrics>,
    /// The client listeners this app serves.
    bound: Vec<Bound>,
}

impl<A> GuardedApp<A> {
    /// Guards `inner` on the `bound` listeners, with limits from the live snapshot.
    pub fn new(
        inner: A,
        snapshot: Arc<ArcSwap<Snapshot>>,
        metrics: Arc<crate::metrics::Metrics>,
        bound: Vec<Bound>,
    ) -> Self {
        GuardedApp {
            inner: Arc::new(inner),
            snapshot,
            table: Arc::default(),
            metrics,
            bound,
        }
    }

    /// The listener a connection arrived on, by its local address.
    fn listener_of(&self, stream: &Stream) -> Option<&Bound> {
        let local = stream
            .get_socket_digest()
            .and_then(|d| d.local_addr().and_then(|a| a.as_inet()).copied())?;
        self.bound.iter().find(|b| b.address == local).or_else(|| {
            self.bound
                .iter()
                .find(|b| b.address.port() == local.port() && b.address.ip().is_unspecified())
        })
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for GuardedApp<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        // A kept-alive connection comes back already guarded.
        let stream: Stream = if stream.as_any().is::<GuardedStream>() {
            stream
        } else {
            // Held across the preamble and the first head (awaits): a full Arc, not a guard.
            let snapshot = self.snapshot.load_full();
            let active = Active::new(&self.metrics.ops.connections_active);
            let stream = match self.listener_of(&stream) {
                Some(bound) => accept::preamble(stream, bound, &snapshot, &self.metrics).await?,
                None => stream,
            };
            if let Some(d) = stream.get_ssl_digest() {
                let alpn = match stream.selected_alpn_proto() {
                    Some(ALPN::H2) => "h2",
                    Some(ALPN::H1) => "http/1.1",
                    Some(_) => "other",
                    None => "none",
                };
                self.metrics.count_tls_handshake(&d.version, alpn);
            }
            let http = &snapshot.config.http;
            let limits = Limits {
                head_timeout: http.head_timeout,
                max_head_size: http.max_head_size,
                // Silence before a first byte costs only the guard's small state (pingora has
                // not been handed the connection yet); load balancers keep idle connections
                // open for a while, so this is the read timeout, not the head deadline.
                first_byte: snapshot.config.timeouts.client_read,
            };
            let peer = stream
                .get_socket_digest()
                .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()));
            // Trusted proxies (load balancers in front) carry many clients' connections: they
            // are not limited per address.
            let permit = match peer.map(|ip| ip.to_canonical()) {
                Some(ip) if snapshot.client_ip.is_trusted(ip) => None,
                Some(ip) => match self.table.acquire(ip, http.max_connections_per_ip) {
                    Some(p) => Some(p),
                    None => {
                        tracing::info!(client = %ip, limit = http.max_connections_per_ip,
                                "connection refused: too many open connections from this address");
                        return None;
                    }
                },
                None => None,
            };
            let mut guarded = GuardedStream::new(
                stream,
                limits,
                permit,
                self.metrics.http2_rapid_reset.clone(),
            );
            guarded._active = Some(active);
            if !guarded.read_first_head().await {
                return None;
            }
            Box::new(guarded)
        };
        self.inner.process_new(stream, shutdown).await
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Between requests: the next byte read starts a head.
    Idle,
    /// Reading a head: `read` bytes so far, the last bytes kept to find `\r\n\r\n` across reads.
    Head { read: usize, tail: [u8; 3] },
    /// The head is complete (body, waiting for the response).
    Request,
    /// An HTTP/2 connection: not guarded here.
    H2,
    /// An answer of ours is being written; then the connection ends with `error`.
    Failing(std::io::ErrorKind),
}

/// A client connection behind the guard.
pub struct GuardedStream {
    inner: Stream,
    limits: Limits,
    state: State,
    deadline: Option<Pin<Box<Sleep>>>,
    /// Bytes of an answer of ours still to write, and how far.
    out: Option<(Vec<u8>, usize)>,
    /// Bytes read ahead by [`GuardedStream::read_first_head`], replayed to pingora first.
    pre: Vec<u8>,
    /// How much of `pre` was replayed.
    pre_at: usize,
    /// Frames of an HTTP/2 connection, counted for rapid-reset detection.
    h2: H2Monitor,
    /// `palisade_http2_rapid_reset_total`, counted when a connection is cut.
    rapid_reset: prometheus::IntCounter,
    _permit: Option<Permit>,
    /// Counted in `palisade_connections_active` while open.
    _active: Option<Active>,
}

/// Watches the frames an HTTP/2 client sends, for the rapid-reset attack (CVE-2023-44487):
/// streams opened and cancelled at once, so the server does work for each while the
/// concurrency limit never binds. The h2 crate only counts resets of streams not yet handed
/// to the application, and pingora takes each stream at once, so the count is kept here, as
/// Envoy does: a connection whose client has reset at least [`H2Monitor::MIN_RESETS`]
/// streams, and at least half of those it opened, is closed.
#[derive(Debug)]
struct H2Monitor {
    /// Bytes of the client preface still to skip.
    preface_left: usize,
    /// A frame header being read.
    header: [u8; 9],
    header_len: usize,
    /// Payload bytes of the current frame still to skip.
    payload_left: usize,
    /// HEADERS frames (new streams, and the odd trailer block).
    streams: u32,
    /// RST_STREAM frames.
    resets: u32,
}

impl H2Monitor {
    const MIN_RESETS: u32 = 100;

    fn new() -> H2Monitor {
        H2Monitor {
            preface_left: 24,
            header: [0; 9],
            header_len: 0,
            payload_left: 0,
            streams: 0,
            resets: 0,
        }
    }

    /// Reads client bytes; `true` when the connection is to be cut.
    fn feed(&mut self, mut data: &[u8]) -> bool {
        let n = self.preface_left.min(data.len());
        self.preface_left -= n;
        data = &data[n..];
        while !data.is_empty() {
            if self.payload_left > 0 {
                let n = self.payload_left.min(data.len());
                self.payload_left -= n;
                data = &data[n..];
                continue;
            }
            let n = (9 - self.header_len).min(data.len());
            self.header[self.header_len..self.header_len + n].copy_from_slice(&data[..n]);
            self.header_len += n;
            data = &data[n..];
            if self.header_len == 9 {
                let h = self.header;
                match h[3] {
                    1 => self.streams += 1,
                    3 => self.resets += 1,
                    _ => {}
                }
                self.payload_left = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
                self.header_len = 0;
            }
        }
        self.resets >= Self::MIN_RESETS && self.resets.saturating_mul(2) >= self.streams
    }
}

impl std::fmt::Debug for GuardedStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuardedStream")
            .field("inner", &self.inner)
            .field("state", &self.state)
            .finish()
    }
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

/// A complete HTTP/1.1 answer with Palisade's JSON error body; the connection closes after.
fn answer(status: u16, reason: &str) -> Vec<u8> {
    let text = match status {
        400 => "Bad Request",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        414 => "URI Too Long",
        431 => "Request Header Fields Too Large",
        501 => "Not Implemented",
        505 => "HTTP Version Not Supported",
        _ => "Error",
    };
    let body = serde_json::json!({"error": reason, "request_id": RequestId::next().to_string()})
        .to_string();
    format!(
        "HTTP/1.1 {status} {text}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// If `buf` is one of pingora's own error answers (`Server: Pingora`, no body), its status.
fn pingora_error_status(buf: &[u8]) -> Option<u16> {
    if buf.len() < 12 || !buf.starts_with(b"HTTP/1.") {
        return None;
    }
    // Pingora's error answers are a few short header lines.
    let buf = &buf[..buf.len().min(256)];
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = &buf[..head_end];
    let pingora = head
        .windows(17)
        .any(|w| w.eq_ignore_ascii_case(b"\r\nserver: pingora"));
    if !pingora {
        return None;
    }
    std::str::from_utf8(&buf[9..12]).ok()?.parse().ok()
}

impl GuardedStream {
    fn new(
        inner: Stream,
        limits: Limits,
        permit: Option<Permit>,
        rapid_reset: prometheus::IntCounter,
    ) -> Self {
        GuardedStream {
            inner,
            limits,
            state: State::Idle,
            deadline: None,
            out: None,
            pre: Vec::new(),
            pre_at: 0,
            h2: H2Monitor::new(),
            rapid_reset,
            _permit: permit,
            _active: None,
        }
    }

    /// Watches bytes handed to pingora on an HTTP/2 connection; an error when the client is
    /// resetting streams as fast as it opens them.
    fn watch_h2(&mut self, data: &[u8]) -> std::io::Result<()> {
        if self.state == State::H2 && self.h2.feed(data) {
            self.rapid_reset.inc();
            tracing::info!(streams = self.h2.streams, resets = self.h2.resets,
                "HTTP/2 connection closed: the client resets streams as fast as it opens them (rapid reset)");
            self.state = State::Failing(std::io::ErrorKind::ConnectionAborted);
            return Err(std::io::ErrorKind::ConnectionAborted.into());
        }
        Ok(())
    }

    /// Reads the connection's first request head (or the HTTP/2 preface) ahead of pingora,
    /// within the deadlines; `false` when the connection is to be dropped (closed by the
    /// client, silent, over a limit or too slow: answered first where HTTP allows).
    ///
    /// A graceful shutdown does not cut this short: a connection accepted before it gets its
    /// answer (pingora then closes it), within the deadlines.
    async fn read_first_head(&mut self) -> bool {
        use tokio::io::AsyncReadExt;
        let mut chunk = [0u8; 4096];
        loop {
            let wait = match (self.state, &self.deadline) {
                (State::Idle, _) => self.limits.first_byte,
                (State::Head { .. }, Some(d)) => d
                    .deadline()
                    .saturating_duration_since(tokio::time::Instant::now()),
                (State::Request | State::H2, _) => return true,
                _ => return false,
            };
            let read = tokio::time::timeout(wait, self.inner.read(&mut chunk)).await;
            match read {
                Ok(Ok(0)) | Ok(Err(_)) => return false,
                Ok(Ok(n)) => {
                    self.saw(&chunk[..n]);
                    if let State::Failing(_) = self.state {
                        let _ = std::future::poll_fn(|cx| self.poll_out(cx)).await;
                        return false;
                    }
                    self.pre.extend_from_slice(&chunk[..n]);
                }
                Err(_) if self.state == State::Idle => return false,
                Err(_) => {
                    self.fail(408, "client_timeout", std::io::ErrorKind::TimedOut);
                    let _ = std::future::poll_fn(|cx| self.poll_out(cx)).await;
                    return false;
                }
            }
        }
    }

    /// Starts writing an answer of ours, after which reads fail with `kind`.
    fn fail(&mut self, status: u16, reason: &str, kind: std::io::ErrorKind) {
        tracing::info!(status, reason, "request refused while reading its head");
        self.out = Some((answer(status, reason), 0));
        self.state = State::Failing(kind);
        self.deadline = None;
    }

    /// Writes what is left of an answer of ours.
    fn poll_out(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while let Some((bytes, at)) = &mut self.out {
            if *at >= bytes.len() {
                self.out = None;
                break;
            }
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &bytes[*at..]))?;
            if n == 0 {
                self.out = None;
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            *at += n;
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    /// Tracks the head in freshly read bytes.
    fn saw(&mut self, new: &[u8]) {
        if new.is_empty() {
            return;
        }
        if self.state == State::Idle {
            if new.starts_with(H2_PREFACE) {
                self.state = State::H2;
                return;
            }
            self.state = State::Head {
                read: 0,
                tail: [0; 3],
            };
            self.deadline = Some(Box::pin(tokio::time::sleep(self.limits.head_timeout)));
        }
        let State::Head { read, tail } = self.state else {
            return;
        };
        // Look for the end of the head (`\r\n\r\n`, or `\n\n` as lenient parsers accept) in
        // the last bytes of earlier reads followed by the new ones.
        let mut window = [tail[0], tail[1], tail[2], 0];
        let mut end = None;
        for (i, &b) in new.iter().enumerate() {
            window = [window[1], window[2], window[3], b];
            if window == *b"\r\n\r\n" || window[2..] == *b"\n\n" {
                end = Some(i + 1);
                break;
            }
        }
        match end {
            Some(at) if read + at <= self.limits.max_head_size => {
                self.state = State::Request;
                self.deadline = None;
            }
            _ if read + new.len() > self.limits.max_head_size => {
                self.fail(431, "header_too_large", std::io::ErrorKind::InvalidData);
            }
            _ => {
                self.state = State::Head {
                    read: read + new.len(),
                    tail: [window[1], window[2], window[3]],
                };
            }
        }
    }
}

impl AsyncRead for GuardedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.pre_at < this.pre.len() {
            let n = buf.remaining().min(this.pre.len() - this.pre_at);
            let (from, to) = (this.pre_at, this.pre_at + n);
            buf.put_slice(&this.pre[from..to]);
            this.pre_at += n;
            let pre = std::mem::take(&mut this.pre);
            let watched = this.watch_h2(&pre[from..to]);
            this.pre = pre;
            if this.pre_at == this.pre.len() {
                this.pre = Vec::new();
                this.pre_at = 0;
            }
            return Poll::Ready(watched);
        }
        if let State::Failing(kind) = this.state {
            ready!(this.poll_out(cx))?;
            return Poll::Ready(Err(kind.into()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if matches!(this.state, State::Idle | State::Head { .. }) {
                    this.saw(&buf.filled()[before..]);
                }
                if let State::Failing(kind) = this.state {
                    // Do not hand pingora a head that broke a limit.
                    buf.set_filled(before);
                    ready!(this.poll_out(cx))?;
                    return Poll::Ready(Err(kind.into()));
                }
                if this.state == State::H2 {
                    if let Err(e) = this.watch_h2(&buf.filled()[before..]) {
                        buf.set_filled(before);
                        return Poll::Ready(Err(e));
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if let Some(d) = this.deadline.as_mut() {
                    if d.as_mut().poll(cx).is_ready() {
                        this.fail(408, "client_timeout", std::io::ErrorKind::TimedOut);
                        ready!(this.poll_out(cx))?;
                        return Poll::Ready(Err(std::io::ErrorKind::TimedOut.into()));
                    }
                }
                Poll::Pending
            }
        }
    }
}

impl AsyncWrite for GuardedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if this.out.is_some() {
            ready!(this.poll_out(cx))?;
        }
        if this.state != State::H2 {
            if let Some(status) = pingora_error_status(buf) {
                // Pingora's own answer to a request it could not take: ours instead.
                let reason = match status {
                    405 => "method_not_allowed",
                    408 => "client_timeout",
                    _ => "bad_request",
                };
                this.out = Some((answer(status, reason), 0));
                ready!(this.poll_out(cx))?;
                return Poll::Ready(Ok(buf.len()));
            }
            // A final response starts: the next byte read begins the next request's head.
            let informational = buf.len() > 9 && buf.starts_with(b"HTTP/1.") && buf[9] == b'1';
            if buf.starts_with(b"HTTP/1.") && !informational && this.state == State::Request {
                this.state = State::Idle;
            }
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.out.is_some() {
            ready!(this.poll_out(cx))?;
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.out.is_some() {
            ready!(this.poll_out(cx))?;
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[async_trait]
impl Shutdown for GuardedStream {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await
    }
}

impl UniqueID for GuardedStream {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for GuardedStream {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }
    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }
    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for GuardedStream {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }
    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }
    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for GuardedStream {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for GuardedStream {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }
    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[async_trait]
impl Peek for GuardedStream {
    /// Peeks at what [`GuardedStream::read_first_head`] read ahead (pingora looks for the
    /// HTTP/2 preface this way), reading a little more if the preface is still incomplete.
    async fn try_peek(&mut self, buf: &mut [u8]) -> std::io::Result<bool> {
        use tokio::io::AsyncReadExt;
        if self.pre_at >= self.pre.len() {
            return self.inner.try_peek(buf).await;
        }
        let mut chunk = [0u8; 64];
        while self.pre.len() - self.pre_at < buf.len() && self.state == State::H2 {
            let n = self.inner.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            self.pre.extend_from_slice(&chunk[..n]);
        }
        let avail = &self.pre[self.pre_at..];
        let n = avail.len().min(buf.len());
        buf[..n].copy_from_slice(&avail[..n]);
        buf[n..].fill(0);
        Ok(true)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn rapid_reset_is_half_the_streams_reset_after_a_hundred() {
        let frame = |kind: u8, id: u32| {
            let mut f = vec![0, 0, 4, kind, 0];
            f.extend_from_slice(&id.to_be_bytes());
            f.extend_from_slice(&[0, 0, 0, 8]);
            f
        };
        let mut busy = H2Monitor::new();
        assert!(!busy.feed(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"));
        // A browser that cancels one stream in three is fine, however long it stays.
        for i in 0..3000u32 {
            let mut bytes = frame(1, 2 * i + 1);
            if i % 3 == 0 {
                bytes.extend(frame(3, 2 * i + 1));
            }
            // Fed a byte at a time: frames split across reads are counted the same.
            for b in bytes {
                assert!(!busy.feed(&[b]), "{i}");
            }
        }
        let mut attack = H2Monitor::new();
        attack.feed(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        let cut = (0..1000u32).position(|i| {
            let mut bytes = frame(1, 2 * i + 1);
            bytes.extend(frame(3, 2 * i + 1));
            attack.feed(&bytes)
        });
        assert_eq!(cut, Some(99));
    }

    #[test]
    fn pingora_answers_are_recognized() {
        let p = b"HTTP/1.1 400 Bad Request\r\nServer: Pingora\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(pingora_error_status(p), Some(400));
        let ours = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n\r\n";
        assert_eq!(pingora_error_status(ours), None);
        let a = String::from_utf8(answer(408, "client_timeout")).unwrap();
        assert!(a.starts_with("HTTP/1.1 408 Request Timeout\r\n"), "{a}");
        assert!(a.contains("\"error\":\"client_timeout\""), "{a}");
    }
}
