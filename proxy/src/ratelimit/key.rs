//! Rate-limit keys: which parts of a request identify a bucket (`ip`, `ip/24`, a header, a
//! cookie, a query argument, the route, the method, the country…).

use std::fmt::Write as _;
use std::net::IpAddr;

use http::header::HeaderName;

use crate::request::Request;

/// One component of a rate-limit key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyPart {
    /// The client IP, or its network with these prefix lengths (IPv4, IPv6).
    Ip {
        /// Prefix length for IPv4 clients (32 = the address itself).
        v4_prefix: u8,
        /// Prefix length for IPv6 clients (128 = the address itself).
        v6_prefix: u8,
    },
    /// A request header's value.
    Header(HeaderName),
    /// A cookie's value.
    Cookie(String),
    /// A query argument's (first) value.
    Query(String),
    /// The matched route's name.
    Route,
    /// The HTTP method.
    Method,
    /// The client's country (needs geo data for the route).
    Country,
    /// The client's ASN.
    Asn,
    /// The JA3 fingerprint of the client's TLS hello (TLS listeners).
    Ja3,
    /// The JA4 fingerprint of the client's TLS hello.
    Ja4,
    /// The subject of the verified client certificate (mTLS).
    ClientSubject,
    /// A claim of the verified bearer token (`claim:sub`, `claim:client_id`).
    Claim(String),
    /// The tool of an MCP `tools/call` message: one key per call of a batch.
    McpTool,
    /// The method of an MCP message: one key per message of a batch.
    McpMethod,
}

/// Why a key spec is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid rate-limit key part {spec:?}: {why}")]
pub struct KeyPartError {
    /// The text.
    pub spec: String,
    /// What is wrong.
    pub why: &'static str,
}

impl KeyPart {
    /// Parses `ip`, `ip/24`, `ip/24/48`, `header:x-api-key`, `cookie:session`, `query:key`,
    /// `route`, `method`, `country`, `asn`, `tls.ja3`, `tls.ja4`, `tls.client_subject`.
    pub fn parse(spec: &str) -> Result<KeyPart, KeyPartError> {
        let err = |why| KeyPartError {
            spec: spec.to_string(),
            why,
        };
        let s = spec.trim();
        if let Some(rest) = s.strip_prefix("ip") {
            if rest.is_empty() {
                return Ok(KeyPart::Ip {
                    v4_prefix: 32,
                    v6_prefix: 128,
                });
            }
            let rest = rest
                .strip_prefix('/')
                .ok_or_else(|| err("write `ip`, `ip/24` or `ip/24/64`"))?;
            let (v4, v6) = match rest.split_once('/') {
                Some((a, b)) => (a, Some(b)),
                None => (rest, None),
            };
            let v4_prefix: u8 = v4
                .parse()
                .ok()
                .filter(|n| *n <= 32)
                .ok_or_else(|| err("IPv4 prefix must be 0..=32"))?;
            let v6_prefix: u8 = match v6 {
                Some(b) => b
                    .parse()
                    .ok()
                    .filter(|n| *n <= 128)
                    .ok_or_else(|| err("IPv6 prefix must be 0..=128"))?,
                // The customary size of one IPv6 end site.
                None => 64,
            };
            return Ok(KeyPart::Ip {
                v4_prefix,
                v6_prefix,
            });
        }
        if let Some((kind, name)) = s.split_once(':') {
            let name = name.trim();
            if name.is_empty() {
                return Err(err("the name after `:` is empty"));
            }
            return match kind {
                "header" => HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
                    .map(KeyPart::Header)
                    .map_err(|_| err("not a valid header name")),
                "cookie" => Ok(KeyPart::Cookie(name.to_string())),
                "query" => Ok(KeyPart::Query(name.to_string())),
                "claim" => Ok(KeyPart::Claim(name.to_string())),
                _ => Err(err("known kinds are header:, cookie:, query:, claim:")),
            };
        }
        match s {
            "route" => Ok(KeyPart::Route),
            "method" => Ok(KeyPart::Method),
            "country" => Ok(KeyPart::Country),
            "asn" => Ok(KeyPart::Asn),
            "tls.ja3" => Ok(KeyPart::Ja3),
            "tls.ja4" => Ok(KeyPart::Ja4),
            "tls.client_subject" => Ok(KeyPart::ClientSubject),
            "mcp.tool" => Ok(KeyPart::McpTool),
            "mcp.method" => Ok(KeyPart::McpMethod),
            _ => Err(err("use ip, ip/N, ip/N/M, header:NAME, cookie:NAME, query:NAME, route, method, country, asn, \
                          tls.ja3, tls.ja4, tls.client_subject, mcp.tool or mcp.method")),
        }
    }

    /// Whether this part needs the request body (the MCP parts): such rules run after the
    /// body is read.
    pub fn needs_body(&self) -> bool {
        matches!(self, KeyPart::McpTool | KeyPart::McpMethod)
    }

    /// Whether this part needs the client's geo data.
    pub fn needs_geo(&self) -> bool {
        matches!(self, KeyPart::Country | KeyPart::Asn)
    }
}

fn mask(ip: IpAddr, v4_prefix: u8, v6_prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(a) => {
            let bits = u32::from(a);
            let m = if v4_prefix == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(v4_prefix))
            };
            IpAddr::V4((bits & m).into())
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            let m = if v6_prefix == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(v6_prefix))
            };
            IpAddr::V6((bits & m).into())
        }
    }
}

/// How many keys `parts` make for `req`: one per `tools/call` message with `mcp.tool`, one
/// per request message with `mcp.method` (so a batch counts each message), else one.
pub fn key_count(parts: &[KeyPart], req: &Request<'_>) -> usize {
    let messages = || match req.mcp() {
        Some(Ok(m)) => Some(m),
        _ => None,
    };
    if parts.contains(&KeyPart::McpTool) {
        messages().map_or(0, |m| m.tools().count())
    } else if parts.contains(&KeyPart::McpMethod) {
        messages().map_or(0, |m| m.methods().count())
    } else {
        1
    }
}

/// Writes the key of `req` into `out` (cleared first). Returns `false` when a header, cookie
/// or query part is missing: like AWS WAF, such a request is not counted by the rule.
///
/// Headers, cookies and query arguments are read from the one request model, decoded as the
/// rules and validation see them (`?user=%61lice` and `?user=alice` share a bucket).
///
/// `index` chooses the message for the MCP parts (see [`key_count`]).
pub fn build_key(
    parts: &[KeyPart],
    route: &str,
    req: &Request<'_>,
    index: usize,
    out: &mut String,
) -> bool {
    out.clear();
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            out.push('|');
        }
        // Writing to a String cannot fail.
        let _ = match p {
            KeyPart::Ip {
                v4_prefix,
                v6_prefix,
            } => match req.client_ip {
                Some(ip) => write!(out, "{}", mask(ip, *v4_prefix, *v6_prefix)),
                None => return false,
            },
            KeyPart::Header(h) => match req.headers.get(h) {
                Some(v) => {
                    out.push_str(&String::from_utf8_lossy(v.as_bytes()));
                    Ok(())
                }
                None => return false,
            },
            KeyPart::Cookie(c) => match req.cookie(c) {
                Some(v) => {
                    out.push_str(v);
                    Ok(())
                }
                None => return false,
            },
            KeyPart::Query(q) => match req.query_arg(q) {
                Some(v) => {
                    out.push_str(v);
                    Ok(())
                }
                None => return false,
            },
            KeyPart::Route => {
                out.push_str(route);
                Ok(())
            }
            KeyPart::Method => {
                out.push_str(req.method);
                Ok(())
            }
            KeyPart::Country => {
                out.push_str(req.country.as_ref().map_or("-", |c| c.as_str()));
                Ok(())
            }
            KeyPart::Ja3 | KeyPart::Ja4 | KeyPart::ClientSubject => {
                // Like a missing header: a request without TLS (or without a client
                // certificate) is not counted by the rule.
                let v = req.tls.and_then(|t| match p {
                    KeyPart::Ja3 => Some(t.ja3.as_str()),
                    KeyPart::Ja4 => Some(t.ja4.as_str()),
                    _ => t.client_subject.as_deref(),
                });
                match v {
                    Some(v) => {
                        out.push_str(v);
                        Ok(())
                    }
                    None => return false,
                }
            }
            KeyPart::Claim(c) => match req.claim(c) {
                Some(v) => {
                    out.push_str(&v);
                    Ok(())
                }
                None => return false,
            },
            KeyPart::McpTool | KeyPart::McpMethod => {
                let v = match req.mcp() {
                    Some(Ok(m)) if *p == KeyPart::McpTool => m.tools().nth(index),
                    Some(Ok(m)) => m.methods().nth(index),
                    _ => None,
                };
                match v {
                    Some(v) => {
                        out.push_str(v);
                        Ok(())
                    }
                    None => return false,
                }
            }
            KeyPart::Asn => match req.asn {
                Some(a) => write!(out, "{a}"),
                None => {
                    out.push('-');
                    Ok(())
                }
            },
        };
    }
    true
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    fn view<'a>(
        parts: &'a http::request::Parts,
        cache: &'a crate::request::RequestCache,
        ip: &str,
    ) -> Request<'a> {
        Request::of_head(parts, cache).with_client(Some(ip.parse().unwrap()), None, None)
    }

    #[test]
    fn parses_and_builds_keys() {
        let req = http::Request::get("/login?user=b%6fb&x")
            .header("x-api-key", "k1")
            .header("cookie", "a=1; session=s9")
            .body(())
            .unwrap();
        let (parts, ()) = req.into_parts();
        let specs = [
            "ip/24",
            "header:X-Api-Key",
            "cookie:session",
            "query:user",
            "route",
            "method",
        ];
        let parts_k: Vec<KeyPart> = specs.iter().map(|s| KeyPart::parse(s).unwrap()).collect();
        let mut out = String::new();
        assert!(build_key(
            &parts_k,
            "login",
            &view(&parts, &Default::default(), "192.0.2.77"),
            0,
            &mut out
        ));
        assert_eq!(out, "192.0.2.0|k1|s9|bob|login|GET");
        let v6 = [KeyPart::parse("ip/24").unwrap()];
        assert!(build_key(
            &v6,
            "r",
            &view(&parts, &Default::default(), "2001:db8:1:2:3::9"),
            0,
            &mut out
        ));
        assert_eq!(out, "2001:db8:1:2::");
        let missing = [KeyPart::parse("header:authorization").unwrap()];
        assert!(!build_key(
            &missing,
            "r",
            &view(&parts, &Default::default(), "192.0.2.1"),
            0,
            &mut out
        ));
        assert!(KeyPart::parse("ip/33").is_err());
        assert!(KeyPart::parse("bogus").is_err());
        assert!(KeyPart::parse("header:").is_err());
    }
}
