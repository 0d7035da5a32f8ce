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
use std::sync::Arc;

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
    /// Keys by `kid`.
    keys: HashMap<String, DecodingKey>,
    /// The key of a JWKS with exactly one key (serves tokens without `kid`).
    only_key: Option<DecodingKey>,
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
            .field("keys", &self.keys.len())
            .finish_non_exhaustive()
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

fn parse_alg(name: &str) -> Option<Algorithm> {
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
        let mut keys = HashMap::new();
        let mut only_key = None;
        if asym {
            let Some(path) = spec.jwks_file else {
                return Err(alg_err("public-key algorithms need `jwks_file`".into()));
            };
            let jwks_err = |message: String| IssuerError {
                message,
                jwks: true,
            };
            let text = std::fs::read_to_string(path)
                .map_err(|e| jwks_err(format!("{}: cannot read: {e}", path.display())))?;
            let set: JwkSet = serde_json::from_str(&text)
                .map_err(|e| jwks_err(format!("{}: not a JWKS: {e}", path.display())))?;
            if set.keys.is_empty() {
                return Err(jwks_err(format!("{}: no key in the JWKS", path.display())));
            }
            for (i, jwk) in set.keys.iter().enumerate() {
                let key = DecodingKey::from_jwk(jwk).map_err(|e| {
                    jwks_err(format!("{}: key {i} is unusable: {e}", path.display()))
                })?;
                match &jwk.common.key_id {
                    Some(kid) => {
                        keys.insert(kid.clone(), key.clone());
                    }
                    None if set.keys.len() > 1 => {
                        return Err(jwks_err(format!(
                            "{}: key {i} has no `kid` (needed when a JWKS has several keys)",
                            path.display()
                        )))
                    }
                    None => {}
                }
                if set.keys.len() == 1 {
                    only_key = Some(key);
                }
            }
        }
        if spec.audiences.is_empty() {
            return Err(alg_err(
                "`audiences` is empty: list the audiences (or client ids) of this API".into(),
            ));
        }
        Ok(Issuer {
            name: spec.name.to_string(),
            iss: spec.issuer.to_string(),
            algorithms,
            keys,
            only_key,
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
        let key = if is_hmac(alg) {
            self.secret.as_ref()
        } else {
            match kid {
                Some(k) => self
                    .keys
                    .get(k)
                    .or(self.only_key.as_ref().filter(|_| self.keys.is_empty())),
                None => self.only_key.as_ref(),
            }
        }
        .ok_or_else(|| "unknown signing key".to_string())?;
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

/// A route's token check.
pub struct AuthStage {
    issuers: Vec<Arc<Issuer>>,
    token: TokenSource,
    /// Required scopes by method (`*` applies to every method).
    scopes: Vec<(String, Vec<String>)>,
    realm: String,
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
        }
    }

    fn challenge(
        &self,
        status: u16,
        reason: &'static str,
        error: Option<(&str, String)>,
    ) -> Decision {
        let mut value = format!("Bearer realm=\"{}\"", self.realm);
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

    fn check(&self, req: &Request<'_>) -> Result<Map<String, Value>, Decision> {
        let invalid = |d: String| self.challenge(401, "invalid_token", Some(("invalid_token", d)));
        let Some(token) = self.token(req) else {
            return Err(self.challenge(401, "missing_token", None));
        };
        let header = jsonwebtoken::decode_header(token).map_err(|e| invalid(describe(&e)))?;
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
            .and_then(|m| m.get("iss").and_then(Value::as_str).map(str::to_string))
            .ok_or_else(|| invalid("missing `iss` claim".into()))?;
        let issuer = self
            .issuers
            .iter()
            .find(|i| i.iss == iss)
            .ok_or_else(|| invalid("wrong issuer".into()))?;
        let claims = issuer
            .verify(token, header.alg, header.kid.as_deref())
            .map_err(invalid)?;
        let needed = self
            .scopes
            .iter()
            .filter(|(m, _)| m == "*" || m.eq_ignore_ascii_case(req.method))
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
            value.retain(|c| !c.is_control());
            let mut b = Block::new(403, "insufficient_scope");
            b.headers.push(("www-authenticate", value));
            return Err(Decision::Block(b));
        }
        Ok(claims)
    }
}

/// The scopes a token grants: `scope` (space-separated) and `scp` (string or array).
fn scopes_of(claims: &Map<String, Value>) -> Vec<&str> {
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
        Eval::Done(match self.check(req) {
            Ok(claims) => {
                req.set_claims(Arc::new(claims));
                Decision::Continue
            }
            Err(d) => d,
        })
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
