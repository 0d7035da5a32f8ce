//! `palisade token`: mints signed test tokens (and prints the JWKS of the signing key) for
//! trying routes with `policy.auth` locally — the worked example's issuer. Not an
//! authorization server: there is no client, no consent, no refresh.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Map, Value};

/// What to put in a token.
#[derive(Debug, Clone, Default)]
pub struct MintSpec {
    /// `iss`.
    pub issuer: String,
    /// `sub`.
    pub subject: String,
    /// `aud` values (one: a string; several: an array).
    pub audiences: Vec<String>,
    /// `scope` (space-separated).
    pub scope: Option<String>,
    /// Groups, under `groups_claim`.
    pub groups: Vec<String>,
    /// The claim holding the groups (`cognito:groups`).
    pub groups_claim: String,
    /// More claims: `name=value`, the value JSON when it parses as JSON, else a string.
    pub claims: Vec<String>,
    /// Lifetime.
    pub ttl: Duration,
    /// `kid` header.
    pub kid: Option<String>,
    /// `token_use` (Cognito).
    pub token_use: Option<String>,
}

/// Reads a PEM private key for `alg`.
pub fn load_key(pem: &[u8], alg: Algorithm) -> Result<EncodingKey, String> {
    let key = match alg {
        Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(pem),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(pem),
        Algorithm::RS256
        | Algorithm::RS384
        | Algorithm::RS512
        | Algorithm::PS256
        | Algorithm::PS384
        | Algorithm::PS512 => EncodingKey::from_rsa_pem(pem),
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => EncodingKey::from_secret(pem),
        other => return Err(format!("cannot sign with {other:?}")),
    };
    key.map_err(|e| format!("not a {alg:?} private key in PEM: {e}"))
}

/// The claims of a token minted now.
pub fn claims(spec: &MintSpec) -> Result<Map<String, Value>, String> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_secs();
    let mut c = Map::new();
    c.insert("iss".into(), spec.issuer.clone().into());
    c.insert("sub".into(), spec.subject.clone().into());
    match spec.audiences.as_slice() {
        [] => {}
        [one] => {
            c.insert("aud".into(), one.clone().into());
        }
        many => {
            c.insert("aud".into(), many.to_vec().into());
        }
    }
    c.insert("iat".into(), now.into());
    c.insert("nbf".into(), now.into());
    c.insert("exp".into(), (now + spec.ttl.as_secs()).into());
    if let Some(s) = &spec.scope {
        c.insert("scope".into(), s.clone().into());
    }
    if let Some(t) = &spec.token_use {
        c.insert("token_use".into(), t.clone().into());
    }
    if !spec.groups.is_empty() {
        c.insert(spec.groups_claim.clone(), spec.groups.clone().into());
    }
    for kv in &spec.claims {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| format!("--claim {kv:?}: write NAME=VALUE"))?;
        let value = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_string()));
        c.insert(k.to_string(), value);
    }
    Ok(c)
}

/// A signed token.
pub fn mint(spec: &MintSpec, key: &EncodingKey, alg: Algorithm) -> Result<String, String> {
    let mut h = Header::new(alg);
    h.kid = spec.kid.clone();
    jsonwebtoken::encode(&h, &claims(spec)?, key).map_err(|e| e.to_string())
}

/// The JWKS (public part) of a private key, with `kid`.
pub fn jwks(key: &EncodingKey, alg: Algorithm, kid: Option<&str>) -> Result<Value, String> {
    let mut jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(key, alg).map_err(|e| e.to_string())?;
    jwk.common.key_id = kid.map(str::to_string);
    Ok(serde_json::json!({ "keys": [jwk] }))
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        reason = "tests"
    )]
    use super::*;

    #[test]
    fn claims_take_json_values_and_strings() {
        let spec = MintSpec {
            issuer: "https://id".into(),
            subject: "alice".into(),
            audiences: vec!["api".into()],
            groups: vec!["athletes".into()],
            groups_claim: "cognito:groups".into(),
            claims: vec!["athletes=[\"bob\"]".into(), "team=red".into()],
            ttl: Duration::from_secs(60),
            ..MintSpec::default()
        };
        let c = claims(&spec).unwrap();
        assert_eq!(c["aud"], "api");
        assert_eq!(c["cognito:groups"][0], "athletes");
        assert_eq!(c["athletes"][0], "bob");
        assert_eq!(c["team"], "red");
        assert_eq!(c["exp"].as_u64().unwrap() - c["iat"].as_u64().unwrap(), 60);
        assert!(claims(&MintSpec {
            claims: vec!["novalue".into()],
            ..spec
        })
        .is_err());
    }
}
