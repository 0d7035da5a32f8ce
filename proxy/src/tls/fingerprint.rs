//! TLS client fingerprints, JA3 and JA4, computed from a connection's ClientHello before the
//! handshake (rustls does not expose the raw hello, so the proxy reads it off the socket,
//! fingerprints it here and hands the same bytes to rustls).
//!
//! The records and the handshake message are parsed with `tls-parser`; what is written here
//! is the two fingerprint formats, which no maintained crate implements:
//!
//! - **JA3** (Salesforce): `version,ciphers,extensions,groups,point_formats`, decimal values
//!   joined by `-`, GREASE values left out; the fingerprint is the MD5 of that text, in hex.
//! - **JA4** (FoxIO, `JA4` part of JA4+): `t13d1516h2_8daaf6152771_e5627efa2ab1` — protocol,
//!   highest offered version, SNI or not, cipher and extension counts, first and last
//!   character of the first ALPN value; then the first 12 hex digits of the SHA-256 of the
//!   sorted cipher list, and of the sorted extension list (without SNI and ALPN) followed by
//!   the signature algorithms in the order offered.

use std::fmt::Write as _;

use md5::{Digest as _, Md5};
use sha2::Sha256;
use tls_parser::{TlsExtension, TlsMessage, TlsMessageHandshake};

/// Largest ClientHello read before the handshake (post-quantum key shares make them a few
/// KiB; more is not a browser, SDK or bot).
pub const MAX_HELLO: usize = 64 * 1024;

/// The fingerprints of one ClientHello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    /// The JA3 text (`771,4865-4866-…,0-23-…,29-23-24,0`).
    pub ja3_text: String,
    /// MD5 of the JA3 text, 32 hex digits: what `tls.ja3` rules and keys match.
    pub ja3: String,
    /// The JA4 fingerprint.
    pub ja4: String,
}

/// What the first bytes of a connection are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hello {
    /// More bytes are needed.
    Incomplete,
    /// Not a TLS handshake record (a cleartext HTTP request on a TLS port, say).
    NotTls,
    /// TLS records, but not a ClientHello that parses (or larger than [`MAX_HELLO`]).
    Malformed,
    /// A ClientHello, fingerprinted.
    Complete(Fingerprint),
}

/// GREASE values (RFC 8701): `0x?a?a` with both bytes equal; left out of every fingerprint.
fn grease(v: u16) -> bool {
    v & 0x0f0f == 0x0a0a && v >> 8 == v & 0xff
}

/// Reads the ClientHello at the start of `buf` (one or more handshake records).
pub fn read_client_hello(buf: &[u8]) -> Hello {
    if buf.is_empty() {
        return Hello::Incomplete;
    }
    if buf[0] != 0x16 {
        return Hello::NotTls;
    }
    // The handshake message may span records: gather their payloads until it is whole.
    let mut payload: Vec<u8> = Vec::new();
    let mut at = 0;
    loop {
        let Some(header) = buf.get(at..at + 5) else {
            return if buf.len() > MAX_HELLO {
                Hello::Malformed
            } else {
                Hello::Incomplete
            };
        };
        if header[0] != 0x16 || header[1] != 3 {
            return if at == 0 {
                Hello::NotTls
            } else {
                Hello::Malformed
            };
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len == 0 || len > 16384 + 2048 {
            return Hello::Malformed;
        }
        let Some(fragment) = buf.get(at + 5..at + 5 + len) else {
            return if at + 5 + len > MAX_HELLO {
                Hello::Malformed
            } else {
                Hello::Incomplete
            };
        };
        payload.extend_from_slice(fragment);
        at += 5 + len;
        if payload.len() >= 4 {
            if payload[0] != 1 {
                return Hello::Malformed;
            }
            let need = 4
                + ((usize::from(payload[1]) << 16)
                    | (usize::from(payload[2]) << 8)
                    | usize::from(payload[3]));
            if need > MAX_HELLO {
                return Hello::Malformed;
            }
            if payload.len() >= need {
                return match fingerprint(&payload[..need]) {
                    Some(f) => Hello::Complete(f),
                    None => Hello::Malformed,
                };
            }
        }
    }
}

/// The fingerprints of a ClientHello handshake message (type, length, body).
fn fingerprint(message: &[u8]) -> Option<Fingerprint> {
    let (_, msg) = tls_parser::parse_tls_message_handshake(message).ok()?;
    let TlsMessage::Handshake(TlsMessageHandshake::ClientHello(ch)) = msg else {
        return None;
    };
    let raw_ext = ch.ext.unwrap_or(&[]);
    // Extension types in the order sent, from the framing itself: an extension whose body
    // tls-parser cannot read still counts.
    let mut ext_types = Vec::new();
    let mut rest = raw_ext;
    while rest.len() >= 4 {
        let t = u16::from_be_bytes([rest[0], rest[1]]);
        let l = usize::from(u16::from_be_bytes([rest[2], rest[3]]));
        if rest.len() < 4 + l {
            return None;
        }
        ext_types.push(t);
        rest = &rest[4 + l..];
    }
    let extensions = tls_parser::parse_tls_client_hello_extensions(raw_ext)
        .map(|(_, e)| e)
        .unwrap_or_default();
    let mut groups: Vec<u16> = Vec::new();
    let mut point_formats: Vec<u8> = Vec::new();
    let mut sig_algs: Vec<u16> = Vec::new();
    let mut versions: Vec<u16> = Vec::new();
    let mut alpn: Option<&[u8]> = None;
    for e in &extensions {
        match e {
            TlsExtension::EllipticCurves(g) => groups = g.iter().map(|g| g.0).collect(),
            TlsExtension::EcPointFormats(p) => point_formats = p.to_vec(),
            TlsExtension::SignatureAlgorithms(s) => sig_algs.clone_from(s),
            TlsExtension::SupportedVersions(v) => versions = v.iter().map(|v| v.0).collect(),
            TlsExtension::ALPN(a) => alpn = Some(a.first().copied().unwrap_or(&[])),
            _ => {}
        }
    }
    let ciphers: Vec<u16> = ch
        .ciphers
        .iter()
        .map(|c| c.0)
        .filter(|c| !grease(*c))
        .collect();
    let exts: Vec<u16> = ext_types.iter().copied().filter(|t| !grease(*t)).collect();
    let groups: Vec<u16> = groups.into_iter().filter(|g| !grease(*g)).collect();

    let ja3_text = format!(
        "{},{},{},{},{}",
        ch.version.0,
        join_dec(&ciphers),
        join_dec(&exts),
        join_dec(&groups),
        join_dec(
            &point_formats
                .iter()
                .map(|p| u16::from(*p))
                .collect::<Vec<_>>()
        )
    );
    let ja3 = hex(&Md5::digest(ja3_text.as_bytes()));

    let version = versions
        .iter()
        .copied()
        .filter(|v| !grease(*v))
        .max()
        .unwrap_or(ch.version.0);
    let version = match version {
        0x0304 => "13",
        0x0303 => "12",
        0x0302 => "11",
        0x0301 => "10",
        0x0300 => "s3",
        0x0002 => "s2",
        0xfeff => "d1",
        0xfefd => "d2",
        0xfefc => "d3",
        _ => "00",
    };
    let sni = if exts.contains(&0x0000) { 'd' } else { 'i' };
    let alpn = match alpn {
        Some(a) if !a.is_empty() => {
            let (first, last) = (a[0], a[a.len() - 1]);
            if first.is_ascii_alphanumeric() && last.is_ascii_alphanumeric() {
                format!("{}{}", first as char, last as char)
            } else {
                let h = hex(a);
                let b = h.as_bytes();
                format!("{}{}", b[0] as char, b[b.len() - 1] as char)
            }
        }
        _ => "00".to_string(),
    };
    let mut sorted_ciphers = ciphers.clone();
    sorted_ciphers.sort_unstable();
    let cipher_hash = if sorted_ciphers.is_empty() {
        "000000000000".to_string()
    } else {
        hash12(&join_hex(&sorted_ciphers))
    };
    let mut sorted_exts: Vec<u16> = exts
        .iter()
        .copied()
        .filter(|t| *t != 0x0000 && *t != 0x0010)
        .collect();
    sorted_exts.sort_unstable();
    let sig_algs: Vec<u16> = sig_algs.into_iter().filter(|s| !grease(*s)).collect();
    let ext_hash = if sorted_exts.is_empty() {
        "000000000000".to_string()
    } else if sig_algs.is_empty() {
        hash12(&join_hex(&sorted_exts))
    } else {
        hash12(&format!(
            "{}_{}",
            join_hex(&sorted_exts),
            join_hex(&sig_algs)
        ))
    };
    let ja4 = format!(
        "t{version}{sni}{:02}{:02}{alpn}_{cipher_hash}_{ext_hash}",
        ciphers.len().min(99),
        exts.len().min(99)
    );
    Some(Fingerprint { ja3_text, ja3, ja4 })
}

fn join_dec(v: &[u16]) -> String {
    let mut s = String::new();
    for (i, x) in v.iter().enumerate() {
        if i > 0 {
            s.push('-');
        }
        let _ = write!(s, "{x}");
    }
    s
}

fn join_hex(v: &[u16]) -> String {
    let mut s = String::new();
    for (i, x) in v.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        let _ = write!(s, "{x:04x}");
    }
    s
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// The first 12 hex digits of the SHA-256 of `text`.
fn hash12(text: &str) -> String {
    let mut h = hex(&Sha256::digest(text.as_bytes()));
    h.truncate(12);
    h
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    /// Builds a ClientHello record from its parts.
    fn hello(version: u16, ciphers: &[u16], exts: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&version.to_be_bytes());
        body.extend_from_slice(&[7u8; 32]);
        body.push(0); // session id
        body.extend_from_slice(&((ciphers.len() * 2) as u16).to_be_bytes());
        for c in ciphers {
            body.extend_from_slice(&c.to_be_bytes());
        }
        body.extend_from_slice(&[1, 0]); // null compression
        let mut e = Vec::new();
        for (t, d) in exts {
            e.extend_from_slice(&t.to_be_bytes());
            e.extend_from_slice(&(d.len() as u16).to_be_bytes());
            e.extend_from_slice(d);
        }
        body.extend_from_slice(&(e.len() as u16).to_be_bytes());
        body.extend_from_slice(&e);
        let mut msg = vec![1, 0, (body.len() >> 8) as u8, body.len() as u8];
        msg.extend_from_slice(&body);
        let mut rec = vec![0x16, 3, 1, (msg.len() >> 8) as u8, msg.len() as u8];
        rec.extend_from_slice(&msg);
        rec
    }

    fn u16s(prefix_len: usize, v: &[u16]) -> Vec<u8> {
        let mut out = Vec::new();
        let n = v.len() * 2;
        if prefix_len == 2 {
            out.extend_from_slice(&(n as u16).to_be_bytes());
        } else {
            out.push(n as u8);
        }
        for x in v {
            out.extend_from_slice(&x.to_be_bytes());
        }
        out
    }

    #[test]
    fn ja4_hashes_follow_the_spec_example() {
        // The cipher and extension lists of the worked example in FoxIO's JA4 technical
        // details, whose published hashes are 8daaf6152771 and e5627efa2ab1.
        assert_eq!(
            hash12("002f,0035,009c,009d,1301,1302,1303,c013,c014,c02b,c02c,c02f,c030,cca8,cca9"),
            "8daaf6152771"
        );
        assert_eq!(
            hash12("0005,000a,000b,000d,0012,0015,0017,001b,0023,002b,002d,0033,4469,ff01_0403,0804,0401,0503,0805,0501,0806,0601"),
            "e5627efa2ab1"
        );
    }

    #[test]
    fn fingerprints_a_client_hello() {
        let sni = {
            let name = b"api.example.com";
            let mut d = Vec::new();
            d.extend_from_slice(&((name.len() + 3) as u16).to_be_bytes());
            d.push(0);
            d.extend_from_slice(&(name.len() as u16).to_be_bytes());
            d.extend_from_slice(name);
            d
        };
        let alpn = {
            let mut d = vec![0, 12, 2];
            d.extend_from_slice(b"h2");
            d.push(8);
            d.extend_from_slice(b"http/1.1");
            d
        };
        let rec = hello(
            0x0303,
            &[0x0a0a, 0x1301, 0x1302, 0xc02b],
            &[
                (0x1a1a, vec![]),
                (0x0000, sni),
                (0x000a, u16s(2, &[0x2a2a, 0x001d, 0x0017])),
                (0x000b, vec![1, 0]),
                (0x000d, u16s(2, &[0x0403, 0x0804])),
                (0x0010, alpn),
                (0x002b, u16s(1, &[0x3a3a, 0x0304, 0x0303])),
            ],
        );
        let hello = read_client_hello(&rec);
        let Hello::Complete(f) = hello.clone() else {
            unreachable!("not complete: {hello:?}")
        };
        assert_eq!(f.ja3_text, "771,4865-4866-49195,0-10-11-13-16-43,29-23,0");
        assert_eq!(f.ja3.len(), 32);
        assert!(f.ja4.starts_with("t13d0306h2_"), "{}", f.ja4);
        assert_eq!(
            f.ja4,
            format!(
                "t13d0306h2_{}_{}",
                hash12("1301,1302,c02b"),
                hash12("000a,000b,000d,002b_0403,0804")
            )
        );
        // Every prefix is incomplete; the same bytes split over two records give the same.
        for n in 0..rec.len() {
            assert_eq!(read_client_hello(&rec[..n]), Hello::Incomplete, "{n}");
        }
        let msg = &rec[5..];
        let mut split = vec![0x16, 3, 1, 0, 10];
        split.extend_from_slice(&msg[..10]);
        split.extend_from_slice(&[
            0x16,
            3,
            1,
            ((msg.len() - 10) >> 8) as u8,
            (msg.len() - 10) as u8,
        ]);
        split.extend_from_slice(&msg[10..]);
        assert_eq!(read_client_hello(&split), Hello::Complete(f));
    }

    #[test]
    fn other_bytes_are_not_tls() {
        assert_eq!(read_client_hello(b"GET / HTTP/1.1\r\n"), Hello::NotTls);
        assert_eq!(
            read_client_hello(&[0x16, 3, 1, 0, 4, 2, 0, 0, 0]),
            Hello::Malformed
        );
        assert_eq!(read_client_hello(&[0x16, 3, 1, 0, 0]), Hello::Malformed);
    }
}
