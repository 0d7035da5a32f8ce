//! The per-request context: created by `new_ctx`, filled by every phase, read by `logging`.

use std::borrow::Cow;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use bytes::Bytes;

use crate::identity::geo::ClientGeo;
use crate::pipeline::{BlockDetails, Notes, StageKind};
use crate::request::canon::{Authority, Framing};
use crate::request::RequestCache;
use crate::snapshot::Snapshot;

/// How much of the request body was pre-read for inspection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BodyState {
    /// Not read: no body, or no stage needed it.
    #[default]
    NotRead,
    /// The whole body is buffered.
    Complete,
    /// Only the first `inspect_limit` bytes were inspected; the rest streams uninspected.
    Partial,
    /// Larger than the limit and forwarded uninspected (`oversize: continue`).
    Uninspected,
}

/// A request id: a per-process random prefix and a counter, unique without coordination and
/// cheap to make (no syscall per request, unlike a v4 UUID from the OS RNG); or the id a
/// trusted proxy in front already gave the request, so one id follows it end to end.
#[derive(Clone, PartialEq, Eq)]
pub enum RequestId {
    /// Made by this process.
    Generated {
        /// Per-process random prefix.
        prefix: u64,
        /// Per-process counter.
        counter: u64,
    },
    /// Received from a trusted proxy (validated: 1–128 chars of `[A-Za-z0-9._-]`).
    External(Box<str>),
}

static ID_PREFIX: OnceLock<u64> = OnceLock::new();
static ID_COUNTER: AtomicU64 = AtomicU64::new(0);

impl RequestId {
    /// The next request id of this process.
    pub fn next() -> RequestId {
        let prefix = *ID_PREFIX.get_or_init(|| {
            let u = uuid::Uuid::new_v4();
            let (hi, _) = u.as_u64_pair();
            hi
        });
        RequestId::Generated {
            prefix,
            counter: ID_COUNTER.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// Accepts an incoming id if it is short and plain (it ends up in logs and headers).
    pub fn external(value: &[u8]) -> Option<RequestId> {
        let ok = !value.is_empty()
            && value.len() <= 128
            && value
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        // All bytes are ASCII, so this cannot fail.
        ok.then(|| {
            std::str::from_utf8(value)
                .ok()
                .map(|s| RequestId::External(s.into()))
        })
        .flatten()
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestId::Generated { prefix, counter } => {
                write!(f, "{:016x}{:08x}", prefix, counter & 0xffff_ffff)
            }
            RequestId::External(s) => f.write_str(s),
        }
    }
}

impl fmt::Debug for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// How the proxy answered the request, for logs and metrics.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Outcome {
    /// Forwarded to the upstream (or still in progress).
    #[default]
    Forwarded,
    /// Blocked by a stage.
    Blocked {
        /// The stage that decided.
        stage: StageKind,
        /// Status sent.
        status: u16,
        /// Reason.
        reason: Cow<'static, str>,
        /// Structured details (validation violations), for the log line.
        details: Option<std::sync::Arc<BlockDetails>>,
    },
    /// Not routed (no route matched).
    NoRoute,
    /// Refused before routing: the request has no single reading (framing, host, path) or
    /// breaks a limit of the HTTP layer.
    Refused {
        /// Status sent.
        status: u16,
        /// Reason.
        reason: &'static str,
    },
    /// The proxy answered an error itself (upstream failure, bad request, …).
    Error {
        /// Status sent.
        status: u16,
    },
}

/// Everything one request carries through the phases.
pub struct RequestCtx {
    /// The configuration snapshot this request is evaluated against (loaded once).
    pub snapshot: Arc<Snapshot>,
    /// When the request started.
    pub start: Instant,
    /// This request's id (sent upstream and to the client as `X-Request-Id`).
    pub request_id: RequestId,
    /// Index of the matched route in the snapshot.
    pub route: Option<usize>,
    /// The client address (behind trusted proxies, the one they vouch for).
    pub client_ip: Option<IpAddr>,
    /// The TCP peer address.
    pub peer_ip: Option<IpAddr>,
    /// Whether the peer is a trusted proxy.
    pub peer_trusted: bool,
    /// The connection's TLS digest (its extension holds the [`crate::tls::TlsConnection`]).
    pub ssl: Option<Arc<pingora::protocols::tls::SslDigest>>,
    /// Country/ASN of the client (resolved only for routes that need it).
    pub geo: ClientGeo,
    /// Body pre-read state.
    pub body_state: BodyState,
    /// The pre-read body (shares the bytes pingora replays upstream).
    pub body: Option<Bytes>,
    /// The request's parsed parts, shared by every phase (each parsed at most once).
    pub cache: RequestCache,
    /// Count matches and response headers recorded by the stages.
    pub notes: Notes,
    /// The outcome.
    pub outcome: Outcome,
    /// Upstream servers already tried (for retries on connection failure).
    pub tried: Vec<SocketAddr>,
    /// The upstream server currently used.
    pub upstream_addr: Option<SocketAddr>,
    /// Request framing, read once before routing.
    pub framing: Framing,
    /// The request's authority (host and port), read once before routing.
    pub authority: Authority,
    /// The normalized path, percent-encoded for the request line; empty when the received
    /// path is already normal (then it is forwarded as received).
    pub normal_path: String,
    /// Body bytes read for inspection that pingora's replay buffer could not keep; sent to
    /// the upstream ahead of the rest of the body by `request_body_filter`.
    pub replay: Option<Bytes>,
    /// Palisade answered `Expect: 100-continue` itself (to pre-read the body).
    pub continued: bool,
    /// Time from the request's start to the pipeline's verdict (inspection included).
    pub inspection: Option<std::time::Duration>,
    /// When the current upstream server was chosen (connect and response latency).
    pub upstream_started: Option<Instant>,
    /// An MCP request with a `tools/list` message: its answer is filtered.
    pub mcp_tools_list: bool,
    /// The filter of that answer, once its head said it is JSON or an event stream.
    pub tools_filter: Option<crate::mcp::ToolsListFilter>,
}

impl RequestCtx {
    /// What the handshake learned of the client's TLS connection.
    pub fn tls(&self) -> Option<&crate::tls::TlsConnection> {
        self.ssl
            .as_ref()?
            .extension
            .get::<crate::tls::TlsConnection>()
    }

    /// A fresh context bound to `snapshot`.
    pub fn new(snapshot: Arc<Snapshot>) -> RequestCtx {
        RequestCtx {
            snapshot,
            start: Instant::now(),
            request_id: RequestId::next(),
            route: None,
            client_ip: None,
            peer_ip: None,
            peer_trusted: false,
            ssl: None,
            geo: ClientGeo::default(),
            body_state: BodyState::NotRead,
            body: None,
            cache: RequestCache::default(),
            notes: Notes::default(),
            outcome: Outcome::Forwarded,
            tried: Vec::new(),
            upstream_addr: None,
            framing: Framing::default(),
            authority: Authority::default(),
            normal_path: String::new(),
            replay: None,
            continued: false,
            inspection: None,
            upstream_started: None,
            mcp_tools_list: false,
            tools_filter: None,
        }
    }
}
