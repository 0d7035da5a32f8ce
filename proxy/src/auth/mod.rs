//! Bearer tokens at the edge (`policy.auth`): a route accepts only requests carrying a JWT
//! signed by one of its issuers, with the right audience, not expired, of the right kind and
//! with the scopes its method needs — what API Gateway's JWT/Cognito authorizers check.
//!
//! Signatures are verified by `jsonwebtoken` (RustCrypto backend: pure Rust, no C
//! library). What is decided here, around it:
//! - the issuer is chosen by the token's `iss` among the route's issuers, and the algorithm
//!   must be one that issuer pins: a token's `alg` never chooses (no `none`, no HS256 signed
//!   with an RSA public key);
//! - the key by `kid` from the issuer's JWKS (a JWKS with one key serves tokens without
//!   `kid`);
//! - `exp` is required and, like `nbf`, must be a number (a string `exp` is a rejection);
//! - `aud` (or the configured claim, Cognito's `client_id`), `token_use`, scopes per method.
//!
//! Failures answer as RFC 6750 says: 401 with `WWW-Authenticate: Bearer realm=…` when no
//! token was sent, 401 `error="invalid_token"` for a bad one, 403 `error="insufficient_scope"`.
//! Verified claims are kept in the request's cache for the later stages (rate-limit keys and
//! rule fields `claim:NAME`) and the logs.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub mod mint;

use arc_swap::ArcSwap;

use base64::Engine as _;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

use crate::pipeline::{Block, Decision, Eval, Needs, Notes, Stage, StageKind};
use crate::request::Request;

/// A token issuer, compiled: its keys and what its tokens must say.
pub struct Issuer {
    /// Name in the config.
    pub name: String,
    iss: String,
    algorithms: Vec<Algorithm>,
    /// The public keys: from the JWKS file, or the last JWKS fetched from `jwks_url`.
    keys: ArcSwap<Keys>,
    /// Where the JWKS is fetched from (refreshed in the background and on an unknown `kid`).
    jwks_url: Option<String>,
    /// The OpenID Connect discovery document naming the JWKS URL (`jwks_uri`), when the
    /// issuer is configured with `discovery: true`.
    discovery: Option<String>,
    /// Milliseconds since `epoch` of the last fetch attempt (0: never).
    last_fetch_ms: AtomicU64,
    /// … and of the last one an unknown `kid` asked for.
    last_miss_ms: AtomicU64,
    epoch: Instant,
    /// One fetch at a time.
    fetching: tokio::sync::Mutex<()>,
    /// Unique per build: verified-token cache entries of an older build never match.
    id: u64,
    /// The HS* shared secret.
    secret: Option<DecodingKey>,
    audiences: Vec<String>,
    audience_claim: Option<String>,
    token_use: Option<String>,
    leeway: u64,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer")
            .field("name", &self.name)
            .field("iss", &self.iss)
            .field("algorithms", &self.algorithms)
            .field("jwks_url", &self.jwks_url)
            .finish_non_exhaustive()
    }
}

/// An issuer's public keys.
#[derive(Default)]
pub struct Keys {
    /// By `kid`.
    by_kid: HashMap<String, DecodingKey>,
    /// The key of a JWKS with exactly one key (serves tokens without `kid`).
    only: Option<DecodingKey>,
}

impl Keys {
    /// Parses a JWKS document; `source` names it in errors.
    pub fn parse(text: &str, source: &str) -> Result<Keys, String> {
        let set: JwkSet =
            serde_json::from_str(text).map_err(|e| format!("{source}: not a JWKS: {e}"))?;
        if set.keys.is_empty() {
            return Err(format!("{source}: no key in the JWKS"));
        }
        let mut keys = Keys::default();
        for (i, jwk) in set.keys.iter().enumerate() {
            let key = DecodingKey::from_jwk(jwk)
                .map_err(|e| format!("{source}: key {i} is unusable: {e}"))?;
            match &jwk.common.key_id {
                Some(kid) => {
                    keys.by_kid.insert(kid.clone(), key.clone());
                }
                None if set.keys.len() > 1 => {
                    return Err(format!(
                        "{source}: key {i} has no `kid` (needed when a JWKS has several keys)"
                    ))
                }
                None => {}
            }
            if set.keys.len() == 1 {
                keys.only = Some(key);
            }
        }
        Ok(keys)
    }

    fn find(&self, kid: Option<&str>) -> Option<&DecodingKey> {
        match kid {
            Some(k) => self
                .by_kid
                .get(k)
                .or(self.only.as_ref().filter(|_| self.by_kid.is_empty())),
            None => self.only.as_ref(),
        }
    }
}

/// What an issuer is built from (paths resolved, secret read).
pub struct IssuerSpec<'a> {
    /// Name.
    pub name: &'a str,
    /// `iss`.
    pub issuer: &'a str,
    /// Algorithm names as written.
    pub algorithms: &'a [String],
    /// The JWKS file.
    pub jwks_file: Option<&'a Path>,
    /// The JWKS URL.
    pub jwks_url: Option<&'a str>,
    /// Find the JWKS URL through OpenID Connect discovery (`{issuer}/.well-known/openid-configuration`).
    pub discovery: bool,
    /// Keys fetched from the same URL by the previous snapshot (kept across reloads).
    pub previous_keys: Option<Arc<Keys>>,
    /// The HS* secret.
    pub secret: Option<&'a str>,
    /// Audiences.
    pub audiences: &'a [String],
    /// The audience claim when not `aud`.
    pub audience_claim: Option<&'a str>,
    /// Required `token_use`.
    pub token_use: Option<&'a str>,
    /// Leeway in seconds.
    pub leeway: u64,
}

/// Why an issuer cannot be built: the message, and whether it is about the JWKS file (else
/// the algorithms).
#[derive(Debug)]
pub struct IssuerError {
    /// Message.
    pub message: String,
    /// About the JWKS file.
    pub jwks: bool,
}

/// An algorithm by its JOSE name (`RS256`, `ES256`, `EdDSA`, …).
pub fn parse_alg(name: &str) -> Option<Algorithm> {
    Some(match name {
        "HS256" => Algorithm::HS256,
        "HS384" => Algorithm::HS384,
        "HS512" => Algorithm::HS512,
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        "EdDSA" => Algorithm::EdDSA,
        _ => return None,
    })
}

fn is_hmac(a: Algorithm) -> bool {
    matches!(a, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)
}

impl Issuer {
    /// Builds an issuer; errors say what is wrong (file names included).
    pub fn build(spec: &IssuerSpec<'_>) -> Result<Issuer, IssuerError> {
        let alg_err = |message: String| IssuerError {
            message,
            jwks: false,
        };
        let mut algorithms = Vec::new();
        for a in spec.algorithms {
            algorithms.push(parse_alg(a).ok_or_else(|| {
                alg_err(format!(
                    "unknown algorithm {a:?}: use RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA, HS256, HS384 or HS512"
                ))
            })?);
        }
        if algorithms.is_empty() {
            return Err(alg_err(
                "`algorithms` is empty: pin the algorithms this issuer signs with".into(),
            ));
        }
        let hmac = algorithms.iter().any(|a| is_hmac(*a));
        let asym = algorithms.iter().any(|a| !is_hmac(*a));
        if hmac && asym {
            return Err(alg_err(
                "mixing HS* with public-key algorithms invites key confusion: use two issuers"
                    .into(),
            ));
        }
        let secret = match (hmac, spec.secret) {
            (true, Some(s)) if !s.is_empty() => Some(
                DecodingKey::from_secret(s.as_bytes())
                    .map_err(|e| alg_err(format!("unusable secret: {e}")))?,
            ),
            (true, _) => {
                return Err(alg_err(
                    "HS* algorithms need an explicit `secret` or `secret_env`".into(),
                ))
            }
            (false, _) => None,
        };
        let mut keys = Keys::default();
        if asym {
            match (spec.jwks_file, spec.jwks_url.or(spec.discovery.then_some(spec.issuer))) {
                (Some(path), None) => {
                    let text = std::fs::read_to_string(path).map_err(|e| IssuerError {
                        message: format!("{}: cannot read: {e}", path.display()),
                        jwks: true,
                    })?;
                    keys = Keys::parse(&text, &path.display().to_string()).map_err(|message| {
                        IssuerError {
                            message,
                            jwks: true,
                        }
                    })?;
                }
                (None, Some(url)) => {
                    let ok = url.parse::<http::Uri>().ok().is_some_and(|u| {
                        matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some()
                    });
                    if !ok {
                        return Err(IssuerError {
                            message: if spec.discovery {
                                format!("discovery needs an http(s) issuer, not {url:?}")
                            } else {
                                format!("jwks_url {url:?} is not an http(s) URL")
                            },
                            jwks: true,
                        });
                    }
                }
                _ => {
                    return Err(alg_err(
                        "public-key algorithms need exactly one of `jwks_file`, `jwks_url` and `discovery`"
                            .into(),
                    ))
                }
            }
        }
        if spec.audiences.is_empty() {
            return Err(alg_err(
                "`audiences` is empty: list the audiences (or client ids) of this API".into(),
            ));
        }
        let keys = match (
            spec.jwks_url.is_some() || spec.discovery,
            &spec.previous_keys,
        ) {
            (true, Some(prev)) => Arc::clone(prev),
            _ => Arc::new(keys),
        };
        Ok(Issuer {
            name: spec.name.to_string(),
            iss: spec.issuer.to_string(),
            algorithms,
            keys: ArcSwap::new(keys),
            jwks_url: spec.jwks_url.map(str::to_string),
            discovery: spec.discovery.then(|| {
                format!(
                    "{}/.well-known/openid-configuration",
                    spec.issuer.trim_end_matches('/')
                )
            }),
            last_fetch_ms: AtomicU64::new(0),
            last_miss_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            fetching: tokio::sync::Mutex::new(()),
            id: {
                static NEXT: AtomicU64 = AtomicU64::new(1);
                NEXT.fetch_add(1, Ordering::Relaxed)
            },
            secret,
            audiences: spec.audiences.to_vec(),
            audience_claim: spec
                .audience_claim
                .filter(|c| *c != "aud")
                .map(str::to_string),
            token_use: spec.token_use.map(str::to_string),
            leeway: spec.leeway,
        })
    }

    /// Verifies `token`; the claims, or why not.
    fn verify(
        &self,
        token: &str,
        alg: Algorithm,
        kid: Option<&str>,
    ) -> Result<Map<String, Value>, String> {
        if !self.algorithms.contains(&alg) {
            return Err(format!("algorithm {alg:?} is not accepted"));
        }
        let keys = self.keys.load();
        let key = if is_hmac(alg) {
            self.secret.as_ref()
        } else {
            keys.find(kid)
        }
        .ok_or_else(|| UNKNOWN_KEY.to_string())?;
        let mut v = Validation::new(alg);
        v.algorithms = self.algorithms.clone();
        v.leeway = self.leeway;
        v.validate_exp = true;
        v.validate_nbf = true;
        v.set_issuer(&[&self.iss]);
        let mut required = vec!["exp", "iss"];
        match &self.audience_claim {
            None => {
                v.set_audience(&self.audiences);
                required.push("aud");
            }
            Some(_) => v.validate_aud = false,
        }
        v.set_required_spec_claims(&required);
        let data =
            jsonwebtoken::decode::<Map<String, Value>>(token, key, &v).map_err(|e| describe(&e))?;
        let claims = data.claims;
        if let Some(c) = &self.audience_claim {
            let ok = claims
                .get(c)
                .and_then(Value::as_str)
                .is_some_and(|v| self.audiences.iter().any(|a| a == v));
            if !ok {
                return Err(format!("the `{c}` claim is not an accepted audience"));
            }
        }
        if let Some(t) = &self.token_use {
            if claims.get("token_use").and_then(Value::as_str) != Some(t.as_str()) {
                return Err(format!("not an {t} token (`token_use`)"));
            }
        }
        Ok(claims)
    }
}

/// The error of a token whose key is not (yet) known.
const UNKNOWN_KEY: &str = "unknown signing key";

/// A JWKS fetch takes at most this long.
const FETCH_TIMEOUT: Duration = Duration::from_secs(3);
/// An unknown `kid` triggers a fetch at most this often per issuer.
const MISS_REFETCH_EVERY: Duration = Duration::from_secs(10);
/// How often the background refresher fetches each JWKS URL.
pub const REFRESH_EVERY: Duration = Duration::from_secs(300);
/// Largest JWKS document read.
const MAX_JWKS: usize = 1 << 20;

impl Issuer {
    /// The keys in force (a reload keeps fetched ones).
    pub fn keys(&self) -> Arc<Keys> {
        self.keys.load_full()
    }

    /// The JWKS URL, when the keys are fetched.
    pub fn jwks_url(&self) -> Option<&str> {
        self.jwks_url.as_deref().or(self.discovery.as_deref())
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// Whether a fetch is due: never tried, or the last try is older than `every`.
    pub fn due(&self, every: Duration) -> bool {
        let last = self.last_fetch_ms.load(Ordering::Relaxed);
        self.jwks_url().is_some()
            && (last == 0 || self.now_ms().saturating_sub(last) >= every.as_millis() as u64)
    }

    /// Whether a token with an unknown `kid` may trigger a fetch now (at most one per
    /// [`MISS_REFETCH_EVERY`]; the caller that gets `true` does it).
    fn claim_miss_fetch(&self) -> bool {
        let now = self.now_ms();
        let last = self.last_miss_ms.load(Ordering::Relaxed);
        let free = last == 0 || now.saturating_sub(last) >= MISS_REFETCH_EVERY.as_millis() as u64;
        free && self
            .last_miss_ms
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }

    /// Fetches the JWKS and swaps the keys in. A failure keeps the keys in force (stale keys
    /// serve while the issuer is down) and says why.
    pub async fn refresh(&self) -> Result<(), String> {
        if self.jwks_url().is_none() {
            return Ok(());
        }
        let _one = self.fetching.lock().await;
        self.last_fetch_ms.store(self.now_ms(), Ordering::Relaxed);
        let url = match (&self.jwks_url, &self.discovery) {
            (Some(u), _) => u.clone(),
            (None, Some(d)) => {
                let doc = tokio::time::timeout(FETCH_TIMEOUT, fetch(d))
                    .await
                    .map_err(|_| format!("{d}: no answer within {FETCH_TIMEOUT:?}"))??;
                let doc: Value =
                    serde_json::from_str(&doc).map_err(|e| format!("{d}: not JSON: {e}"))?;
                let uri = doc
                    .get("jwks_uri")
                    .and_then(Value::as_str)
                    .filter(|u| u.starts_with("https://") || u.starts_with("http://"))
                    .ok_or_else(|| format!("{d}: no http(s) `jwks_uri`"))?;
                uri.to_string()
            }
            (None, None) => return Ok(()),
        };
        let url = &url;
        let text = tokio::time::timeout(FETCH_TIMEOUT, fetch(url))
            .await
            .map_err(|_| format!("{url}: no answer within {FETCH_TIMEOUT:?}"))??;
        let keys = Keys::parse(&text, url)?;
        self.keys.store(Arc::new(keys));
        tracing::info!(issuer = %self.name, url = %url, "JWKS fetched");
        Ok(())
    }
}

/// GETs `url` (http, or https verified against the system roots) with pingora's client.
async fn fetch(url: &str) -> Result<String, String> {
    use pingora::upstreams::peer::HttpPeer;
    static CONNECTOR: std::sync::OnceLock<pingora::connectors::http::Connector> =
        std::sync::OnceLock::new();
    let uri: http::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
    let tls = uri.scheme_str() == Some("https");
    let host = uri
        .host()
        .ok_or_else(|| format!("{url}: no host"))?
        .to_string();
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let addr = tokio::net::lookup_host((host.as_str(), port))
        .await
        .map_err(|e| format!("{url}: cannot resolve: {e}"))?
        .next()
        .ok_or_else(|| format!("{url}: no address"))?;
    let peer = HttpPeer::new(addr, tls, host.clone());
    let connector = CONNECTOR.get_or_init(|| pingora::connectors::http::Connector::new(None));
    let (mut session, _) = connector
        .get_http_session(&peer)
        .await
        .map_err(|e| format!("{url}: cannot connect: {e}"))?;
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let io = |e: Box<pingora::Error>| format!("{url}: {e}");
    let mut req = pingora::http::RequestHeader::build("GET", path.as_bytes(), None).map_err(io)?;
    // The authority as the URL writes it (with a non-default port).
    let authority = uri.authority().map_or(host.as_str(), |a| a.as_str());
    req.insert_header("host", authority).map_err(io)?;
    req.insert_header("accept", "application/json")
        .map_err(io)?;
    session
        .write_request_header(Box::new(req))
        .await
        .map_err(io)?;
    session.finish_request_body().await.map_err(io)?;
    session.read_response_header().await.map_err(io)?;
    let status = session.response_header().map_or(0, |r| r.status.as_u16());
    if status != 200 {
        return Err(format!("{url}: status {status}"));
    }
    let mut body = Vec::new();
    while let Some(chunk) = session.read_response_body().await.map_err(io)? {
        body.extend_from_slice(&chunk);
        if body.len() > MAX_JWKS {
            return Err(format!("{url}: JWKS larger than {MAX_JWKS} bytes"));
        }
    }
    String::from_utf8(body).map_err(|_| format!("{url}: not UTF-8"))
}

/// Tokens already verified, per thread. An API client sends the same token for its whole
/// life (an hour, typically), and a signature costs tens of microseconds (RS256 ~55 µs,
/// ES256 ~200 µs with the RustCrypto backend) where a lookup costs well under one: what API
/// Gateway's authorizer cache does. Direct-mapped, bounded (256 tokens of up to 4 KiB per
/// thread), no lock. An entry holds the whole token (a hash collision is a miss, never a
/// wrong answer) and the id of the issuer build that verified it (a reload's new issuers do
/// not match); `exp` and `nbf` are checked again at each use.
mod verified {
    use std::cell::RefCell;
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    use std::sync::Arc;

    use serde_json::{Map, Value};

    use super::Issuer;

    const SLOTS: usize = 256;
    const MAX_TOKEN: usize = 4096;

    struct Entry {
        token: Box<str>,
        issuer: u64,
        claims: Arc<Map<String, Value>>,
        exp: u64,
        nbf: Option<u64>,
        leeway: u64,
    }

    thread_local! {
        static CACHE: RefCell<Vec<Option<Entry>>> =
            RefCell::new((0..SLOTS).map(|_| None).collect());
    }

    fn slot(token: &str) -> usize {
        (BuildHasherDefault::<DefaultHasher>::default().hash_one(token) % SLOTS as u64) as usize
    }

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    }

    /// The claims of `token` if one of `issuers` verified it and it is still in its time.
    pub(super) fn lookup(token: &str, issuers: &[Arc<Issuer>]) -> Option<Arc<Map<String, Value>>> {
        if token.len() > MAX_TOKEN {
            return None;
        }
        CACHE.with(|c| {
            let c = c.borrow();
            let e = c.get(slot(token))?.as_ref()?;
            let now = now();
            let fresh = &*e.token == token
                && issuers.iter().any(|i| i.id == e.issuer)
                && now <= e.exp.saturating_add(e.leeway)
                && e.nbf.is_none_or(|n| now.saturating_add(e.leeway) >= n);
            fresh.then(|| Arc::clone(&e.claims))
        })
    }

    /// Remembers a verified token.
    pub(super) fn insert(token: &str, issuer: &Issuer, claims: &Arc<Map<String, Value>>) {
        let Some(exp) = claims.get("exp").and_then(Value::as_u64) else {
            return;
        };
        if token.len() > MAX_TOKEN {
            return;
        }
        let entry = Entry {
            token: token.into(),
            issuer: issuer.id,
            claims: Arc::clone(claims),
            exp,
            nbf: claims.get("nbf").and_then(Value::as_u64),
            leeway: issuer.leeway,
        };
        CACHE.with(|c| {
            if let Some(s) = c.borrow_mut().get_mut(slot(token)) {
                *s = Some(entry);
            }
        });
    }
}

/// A short reason for `error_description` (never echoing the token).
fn describe(e: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind as K;
    match e.kind() {
        K::ExpiredSignature => "the token has expired".into(),
        K::ImmatureSignature => "the token is not valid yet".into(),
        K::InvalidIssuer => "wrong issuer".into(),
        K::InvalidAudience => "wrong audience".into(),
        K::InvalidSignature => "bad signature".into(),
        K::InvalidAlgorithm => "algorithm not accepted".into(),
        K::MissingRequiredClaim(c) => format!("missing `{c}` claim"),
        K::InvalidClaimFormat(c) => format!("malformed `{c}` claim"),
        _ => "malformed token".into(),
    }
}

/// Where a route finds its token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// `Authorization: Bearer …`.
    Authorization,
    /// A header's whole value.
    Header(http::HeaderName),
    /// A cookie.
    Cookie(String),
}

impl TokenSource {
    /// Parses `authorization`, `header:NAME`, `cookie:NAME`.
    pub fn parse(s: &str) -> Result<TokenSource, String> {
        match s.split_once(':') {
            None if s == "authorization" => Ok(TokenSource::Authorization),
            Some(("header", n)) => {
                http::HeaderName::from_bytes(n.trim().to_ascii_lowercase().as_bytes())
                    .map(TokenSource::Header)
                    .map_err(|_| format!("{n:?} is not a header name"))
            }
            Some(("cookie", n)) if !n.trim().is_empty() => {
                Ok(TokenSource::Cookie(n.trim().to_string()))
            }
            _ => Err(format!(
                "token source {s:?}: use `authorization`, `header:NAME` or `cookie:NAME`"
            )),
        }
    }
}

/// Verified claims; or an issuer whose key is unknown (`Err(Ok)`: fetch and retry), or
/// the answer to give (`Err(Err)`).
type Checked = Result<Arc<Map<String, Value>>, Result<Arc<Issuer>, Decision>>;

/// A route's token check.
pub struct AuthStage {
    issuers: Vec<Arc<Issuer>>,
    token: TokenSource,
    /// Required scopes by method (`*` applies to every method).
    scopes: Vec<(String, Vec<String>)>,
    realm: String,
    /// An MCP route's resource identifier (RFC 8707: tokens must name it in `aud`) and the
    /// URL of its metadata (RFC 9728: named in every challenge).
    resource: Option<(String, String)>,
}

impl AuthStage {
    /// The stage over `issuers`.
    pub fn new(
        issuers: Vec<Arc<Issuer>>,
        token: TokenSource,
        scopes: Vec<(String, Vec<String>)>,
        realm: String,
    ) -> AuthStage {
        AuthStage {
            issuers,
            token,
            scopes,
            realm,
            resource: None,
        }
    }

    /// Binds the route to a protected resource: its tokens must carry `resource` in `aud`,
    /// and challenges point clients to `metadata_url`.
    pub fn with_resource(mut self, resource: String, metadata_url: String) -> AuthStage {
        self.resource = Some((resource, metadata_url));
        self
    }

    fn resource_metadata(&self, value: &mut String) {
        if let Some((_, url)) = &self.resource {
            value.push_str(&format!(", resource_metadata=\"{url}\""));
        }
    }

    fn challenge(
        &self,
        status: u16,
        reason: &'static str,
        error: Option<(&str, String)>,
    ) -> Decision {
        let mut value = format!("Bearer realm=\"{}\"", self.realm);
        self.resource_metadata(&mut value);
        if let Some((code, description)) = error {
            value.push_str(&format!(", error=\"{code}\""));
            let clean: String = description
                .chars()
                .filter(|c| *c != '"' && *c != '\\' && !c.is_control())
                .collect();
            value.push_str(&format!(", error_description=\"{clean}\""));
        }
        let mut b = Block::new(status, reason);
        b.headers.push(("www-authenticate", value));
        Decision::Block(b)
    }

    fn token<'r>(&self, req: &'r Request<'_>) -> Option<&'r str> {
        match &self.token {
            TokenSource::Authorization => {
                let v = req
                    .headers
                    .get(http::header::AUTHORIZATION)?
                    .to_str()
                    .ok()?;
                let (scheme, token) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            }
            TokenSource::Header(h) => req.headers.get(h)?.to_str().ok().map(str::trim),
            TokenSource::Cookie(c) => req.cookie(c),
        }
        .filter(|t| !t.is_empty())
    }

    /// Checks the token of a request with method `method`. `Err(Ok(issuer))`: its key is
    /// not known, and the issuer fetches keys from a URL (the caller may refresh and retry).
    fn check(&self, token: Option<&str>, method: &str) -> Checked {
        let invalid =
            |d: String| Err(self.challenge(401, "invalid_token", Some(("invalid_token", d))));
        let Some(token) = token else {
            return Err(Err(self.challenge(401, "missing_token", None)));
        };
        if let Some(claims) = verified::lookup(token, &self.issuers) {
            return self.scoped(claims, method);
        }
        let header = match jsonwebtoken::decode_header(token) {
            Ok(h) => h,
            Err(e) => return Err(invalid(describe(&e))),
        };
        // The issuer by the (unverified) `iss`; the signature is checked with its keys next.
        let iss = token
            .split('.')
            .nth(1)
            .and_then(|p| {
                base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(p)
                    .ok()
            })
            .and_then(|b| serde_json::from_slice::<Map<String, Value>>(&b).ok())
            .and_then(|m| m.get("iss").and_then(Value::as_str).map(str::to_string));
        let Some(iss) = iss else {
            return Err(invalid("missing `iss` claim".into()));
        };
        let Some(issuer) = self.issuers.iter().find(|i| i.iss == iss) else {
            return Err(invalid("wrong issuer".into()));
        };
        let claims = match issuer.verify(token, header.alg, header.kid.as_deref()) {
            Ok(c) => Arc::new(c),
            Err(e) if e == UNKNOWN_KEY && issuer.jwks_url().is_some() => {
                return Err(Ok(Arc::clone(issuer)))
            }
            Err(e) => return Err(invalid(e)),
        };
        verified::insert(token, issuer, &claims);
        self.scoped(claims, method)
    }

    /// The scope check of verified claims.
    fn scoped(&self, claims: Arc<Map<String, Value>>, method: &str) -> Checked {
        if let Some((resource, _)) = &self.resource {
            let bound = match claims.get("aud") {
                Some(Value::String(a)) => a == resource,
                Some(Value::Array(a)) => a.iter().any(|x| x.as_str() == Some(resource)),
                _ => false,
            };
            if !bound {
                return Err(Err(self.challenge(
                    401,
                    "invalid_token",
                    Some((
                        "invalid_token",
                        "the token's audience is not this resource".into(),
                    )),
                )));
            }
        }
        let needed = self
            .scopes
            .iter()
            .filter(|(m, _)| m == "*" || m.eq_ignore_ascii_case(method))
            .flat_map(|(_, s)| s);
        let granted = scopes_of(&claims);
        let missing: Vec<&String> = needed.filter(|s| !granted.contains(&s.as_str())).collect();
        if !missing.is_empty() {
            let all: Vec<&str> = missing.iter().map(|s| s.as_str()).collect();
            let mut value = format!(
                "Bearer realm=\"{}\", error=\"insufficient_scope\", scope=\"{}\"",
                self.realm,
                all.join(" ")
            );
            self.resource_metadata(&mut value);
            value.retain(|c| !c.is_control());
            let mut b = Block::new(403, "insufficient_scope");
            b.headers.push(("www-authenticate", value));
            return Err(Err(Decision::Block(b)));
        }
        Ok(claims)
    }

    /// The answer to a token whose key stays unknown.
    fn unknown_key(&self) -> Decision {
        self.challenge(
            401,
            "invalid_token",
            Some(("invalid_token", UNKNOWN_KEY.to_string())),
        )
    }
}

/// The scopes a token grants: `scope` (space-separated) and `scp` (string or array).
pub fn scopes_of(claims: &Map<String, Value>) -> Vec<&str> {
    let mut out: Vec<&str> = Vec::new();
    for key in ["scope", "scp"] {
        match claims.get(key) {
            Some(Value::String(s)) => out.extend(s.split_whitespace()),
            Some(Value::Array(a)) => out.extend(a.iter().filter_map(Value::as_str)),
            _ => {}
        }
    }
    out
}

impl Stage for AuthStage {
    fn kind(&self) -> StageKind {
        StageKind::Auth
    }

    fn needs(&self) -> Needs {
        Needs::NONE
    }

    fn evaluate<'s>(&'s self, req: &Request<'_>, _notes: &mut Notes) -> Eval<'s> {
        match self.check(self.token(req), req.method) {
            Ok(claims) => {
                req.set_claims(claims);
                Eval::Done(Decision::Continue)
            }
            Err(Err(d)) => Eval::Done(d),
            // An unknown `kid` may be a rotated key: fetch the issuer's JWKS again (at most
            // every 10 s per issuer, bounded in time) and check once more.
            Err(Ok(issuer)) if issuer.claim_miss_fetch() => {
                let token = self.token(req).map(str::to_string);
                let method = req.method.to_string();
                Eval::Pending(Box::pin(async move {
                    if let Err(e) = issuer.refresh().await {
                        tracing::warn!(issuer = %issuer.name, error = %e, "JWKS refresh failed; the cached keys stay");
                    }
                    match self.check(token.as_deref(), &method) {
                        Ok(claims) => (
                            Decision::Continue,
                            Notes {
                                claims: Some(claims),
                                ..Notes::default()
                            },
                        ),
                        Err(Err(d)) => (d, Notes::default()),
                        Err(Ok(_)) => (self.unknown_key(), Notes::default()),
                    }
                }))
            }
            Err(Ok(_)) => Eval::Done(self.unknown_key()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_sources_and_scopes_parse() {
        assert_eq!(
            TokenSource::parse("authorization"),
            Ok(TokenSource::Authorization)
        );
        assert!(
            matches!(TokenSource::parse("cookie:session"), Ok(TokenSource::Cookie(c)) if c == "session")
        );
        assert!(TokenSource::parse("query:t").is_err());
        let claims: Map<String, Value> =
            serde_json::from_str(r#"{"scope":"a b","scp":["c"]}"#).unwrap_or_default();
        assert_eq!(scopes_of(&claims), ["a", "b", "c"]);
    }
}
