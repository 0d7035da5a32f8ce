//! What a client connection goes through before HTTP: the PROXY protocol header of a trusted
//! load balancer, then the TLS handshake.
//!
//! TLS listeners are bound as plain TCP listeners and the handshake is done here, not by
//! pingora's listener, for three reasons pingora's listener cannot serve:
//!
//! - **JA3/JA4** need the raw ClientHello, which rustls does not expose: it is read off the
//!   socket, fingerprinted (`crate::tls::fingerprint`) and replayed to rustls (pingora's
//!   stream `rewind`).
//! - **The PROXY protocol header comes first**, from a trusted peer only; the client address
//!   it carries replaces the socket's peer address for everything after (client IP, limits
//!   per address, logs).
//! - **The rustls configuration of the live snapshot** (certificates, versions, cipher
//!   suites, client certificates) is used for each handshake, so all of it reloads; and the
//!   whole preamble runs under one deadline (`http.head_timeout`), which pingora's listener
//!   does not put on handshakes.
//!
//! The result of the handshake (fingerprints, SNI, the verified client certificate) travels
//! to the request phases as the TLS digest's extension ([`TlsConnection`]).

use std::any::Any;
use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use pingora::listeners::tls::Acceptor;
use pingora::listeners::TlsAccept;
use pingora::protocols::l4::socket::SocketAddr as PeerAddr;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::tls::TlsRef;
use pingora::protocols::{GetSocketDigest, SocketDigest, Stream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::metrics::Metrics;
use crate::snapshot::Snapshot;
use crate::tls::fingerprint::{read_client_hello, Fingerprint, Hello, MAX_HELLO};
use crate::tls::TlsConnection;

/// A client listener as bound at start-up (whether it terminates TLS cannot change without
/// a restart; its certificates and PROXY protocol setting reload).
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    /// The address.
    pub address: SocketAddr,
    /// Whether it terminates TLS.
    pub tls: bool,
}

/// The PROXY protocol v2 signature.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// The longest PROXY protocol v1 line.
const V1_MAX: usize = 107;

/// Why a connection was dropped before HTTP.
enum Dropped {
    /// The client closed.
    Closed,
    /// Counted and logged already.
    Refused,
}

/// The preamble of a new connection on `bound`. `None`: drop it (counted and logged).
pub(crate) async fn preamble(
    stream: Stream,
    bound: &Bound,
    snapshot: &Snapshot,
    metrics: &Metrics,
) -> Option<Stream> {
    let live = snapshot
        .config
        .listeners
        .iter()
        .position(|l| l.address == bound.address);
    let proxy_protocol = live.is_some_and(|i| snapshot.config.listeners[i].proxy_protocol);
    let tls = if bound.tls {
        match live.and_then(|i| snapshot.tls.get(i).cloned().flatten()) {
            Some(t) => Some(t),
            None => {
                tracing::warn!(listener = %bound.address,
                    "connection closed: this TLS listener has no certificates in the running configuration (restart to serve it without TLS)");
                return None;
            }
        }
    } else {
        None
    };
    if !proxy_protocol && tls.is_none() {
        return Some(stream);
    }
    let Ok(mut l4) = stream.into_any().downcast::<L4Stream>() else {
        tracing::warn!("connection closed: not a TCP stream");
        return None;
    };
    let deadline = tokio::time::Instant::now() + snapshot.config.http.head_timeout;
    let mut buf = Vec::new();
    if proxy_protocol {
        let read = tokio::time::timeout_at(
            deadline,
            read_proxy_header(&mut l4, &mut buf, snapshot, metrics),
        )
        .await;
        match read {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return None,
            Err(_) => {
                metrics.count_proxy_protocol("timeout");
                return None;
            }
        }
    }
    let Some(tls) = tls else {
        if !buf.is_empty() {
            l4.rewind(&buf);
        }
        return Some(l4);
    };
    let handshake = async {
        let fingerprint = match read_hello(&mut l4, &mut buf, metrics).await {
            Ok(f) => f,
            Err(Dropped::Closed) => {
                metrics.count_tls_failure("closed");
                return None;
            }
            Err(Dropped::Refused) => return None,
        };
        l4.rewind(&buf);
        let acceptor = Acceptor::from_server_config(Arc::clone(&tls.config));
        let done = Handshake { fingerprint };
        match pingora::protocols::tls::server::handshake_with_callback(&acceptor, *l4, &done).await
        {
            Ok(s) => Some(Box::new(s) as Stream),
            Err(e) => {
                let reason = failure_reason(&e);
                metrics.count_tls_failure(reason);
                tracing::debug!(reason, error = %e, "TLS handshake failed");
                None
            }
        }
    };
    match tokio::time::timeout_at(deadline, handshake).await {
        Ok(s) => s,
        Err(_) => {
            metrics.count_tls_failure("timeout");
            None
        }
    }
}

/// Reads more bytes into `buf`; `Closed` at the end of the stream.
async fn read_more(l4: &mut L4Stream, buf: &mut Vec<u8>) -> Result<(), Dropped> {
    let mut chunk = [0u8; 4096];
    match l4.read(&mut chunk).await {
        Ok(0) | Err(_) => Err(Dropped::Closed),
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            Ok(())
        }
    }
}

/// Reads and removes the PROXY protocol header at the start of the connection, from a
/// trusted peer only, and makes the address it carries the connection's peer address.
async fn read_proxy_header(
    l4: &mut L4Stream,
    buf: &mut Vec<u8>,
    snapshot: &Snapshot,
    metrics: &Metrics,
) -> Result<(), Dropped> {
    let peer = l4
        .get_socket_digest()
        .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).copied());
    let Some(peer) = peer else {
        return Err(Dropped::Refused);
    };
    if !snapshot.client_ip.is_trusted(peer.ip().to_canonical()) {
        metrics.count_proxy_protocol("untrusted_peer");
        tracing::info!(peer = %peer,
            "connection closed: PROXY protocol listener, and the peer is not in client_ip.trusted_proxies");
        return Err(Dropped::Refused);
    }
    let malformed = |why: &str| {
        metrics.count_proxy_protocol("malformed");
        tracing::info!(peer = %peer, why, "connection closed: no valid PROXY protocol header");
        Dropped::Refused
    };
    // Wait for a whole header before parsing: a v1 line cut short would parse as another
    // port.
    let (len, source) = loop {
        let n = buf.len();
        if n > 0 && buf[..n.min(12)] == V2_SIGNATURE[..n.min(12)] {
            if n >= 16 {
                let total = 16 + usize::from(u16::from_be_bytes([buf[14], buf[15]]));
                if n >= total {
                    let h = ppp::v2::Header::try_from(&buf[..total])
                        .map_err(|e| malformed(&e.to_string()))?;
                    let source = match (h.command, h.addresses) {
                        (ppp::v2::Command::Local, _) => None,
                        (_, ppp::v2::Addresses::IPv4(a)) => {
                            Some(SocketAddr::from((a.source_address, a.source_port)))
                        }
                        (_, ppp::v2::Addresses::IPv6(a)) => {
                            Some(SocketAddr::from((a.source_address, a.source_port)))
                        }
                        _ => None,
                    };
                    break (total, source);
                }
            }
        } else if n > 0 && buf[..n.min(6)] == b"PROXY "[..n.min(6)] {
            if let Some(lf) = buf[..n.min(V1_MAX)].iter().position(|&b| b == b'\n') {
                let h = ppp::v1::Header::try_from(&buf[..=lf])
                    .map_err(|e| malformed(&e.to_string()))?;
                let source = match h.addresses {
                    ppp::v1::Addresses::Tcp4(a) => {
                        Some(SocketAddr::from((a.source_address, a.source_port)))
                    }
                    ppp::v1::Addresses::Tcp6(a) => {
                        Some(SocketAddr::from((a.source_address, a.source_port)))
                    }
                    ppp::v1::Addresses::Unknown => None,
                };
                break (lf + 1, source);
            }
            if n >= V1_MAX {
                return Err(malformed("PROXY v1 line too long"));
            }
        } else if n > 0 {
            return Err(malformed(
                "the connection does not start with a PROXY header",
            ));
        }
        read_more(l4, buf).await?;
    };
    buf.drain(..len);
    metrics.count_proxy_protocol("accepted");
    if let Some(source) = source {
        use std::os::fd::AsRawFd;
        let digest = SocketDigest::from_raw_fd(l4.as_raw_fd());
        let _ = digest.peer_addr.set(Some(PeerAddr::Inet(source)));
        l4.set_socket_digest(digest);
    }
    Ok(())
}

/// Reads the ClientHello (kept in `buf` for rustls) and fingerprints it.
async fn read_hello(
    l4: &mut L4Stream,
    buf: &mut Vec<u8>,
    metrics: &Metrics,
) -> Result<Fingerprint, Dropped> {
    loop {
        match read_client_hello(buf) {
            Hello::Complete(f) => return Ok(f),
            Hello::Incomplete if buf.len() <= MAX_HELLO => read_more(l4, buf).await?,
            Hello::NotTls => {
                metrics.count_tls_failure("not_tls");
                if buf.first().is_some_and(|b| b.is_ascii_uppercase()) {
                    // Cleartext HTTP on the TLS port: say so, as nginx does.
                    let body = br#"{"error":"tls_required","message":"this port speaks HTTPS"}"#;
                    let answer = format!(
                        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = l4.write_all(answer.as_bytes()).await;
                    let _ = l4.write_all(body).await;
                    let _ = l4.flush().await;
                }
                return Err(Dropped::Refused);
            }
            Hello::Malformed | Hello::Incomplete => {
                metrics.count_tls_failure("malformed_hello");
                return Err(Dropped::Refused);
            }
        }
    }
}

/// Attaches what the handshake learned to the connection's TLS digest.
struct Handshake {
    fingerprint: Fingerprint,
}

#[async_trait]
impl TlsAccept for Handshake {
    async fn handshake_complete_callback(
        &self,
        ssl: &TlsRef,
    ) -> Option<Arc<dyn Any + Send + Sync>> {
        let (client_subject, client_sans) = ssl
            .peer_certificate_der()
            .and_then(crate::tls::client_identity)
            .map_or((None, Vec::new()), |(s, sans)| (Some(s), sans));
        Some(Arc::new(TlsConnection {
            ja3: self.fingerprint.ja3.clone(),
            ja4: self.fingerprint.ja4.clone(),
            sni: ssl.server_name().map(str::to_string),
            version: ssl.version().unwrap_or_default().to_string(),
            client_subject,
            client_sans,
        }))
    }
}

/// The `palisade_tls_handshake_failures_total` reason of a failed handshake. Pingora keeps
/// only the text of the TLS library's error (`explain_err`), so the reason is read from the
/// words rustls uses for each `rustls::Error` variant.
fn failure_reason(e: &pingora::Error) -> &'static str {
    let text = e.to_string();
    if text.contains("peer is incompatible") {
        "no_shared_parameters"
    } else if text.contains("peer sent no certificates") {
        "client_certificate_missing"
    } else if text.contains("invalid peer certificate") {
        "client_certificate_rejected"
    } else if text.contains("received fatal alert") {
        "alert"
    } else if text.contains("eof")
        || text.contains("end of file")
        || text.contains("reset by peer")
        || text.contains("Broken pipe")
    {
        "closed"
    } else {
        "protocol_error"
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn failure_reasons_follow_rustls_messages() {
        use super::failure_reason;
        use pingora::{Error, ErrorType};
        let reason = |m: String| {
            failure_reason(&Error::explain(
                ErrorType::TLSHandshakeFailure,
                format!("tls connect error: {m}"),
            ))
        };
        let incompatible =
            rustls::Error::PeerIncompatible(rustls::PeerIncompatible::NoCipherSuitesInCommon);
        assert_eq!(reason(incompatible.to_string()), "no_shared_parameters");
        assert_eq!(
            reason(rustls::Error::NoCertificatesPresented.to_string()),
            "client_certificate_missing"
        );
        let bad = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        assert_eq!(reason(bad.to_string()), "client_certificate_rejected");
        let alert = rustls::Error::AlertReceived(rustls::AlertDescription::BadCertificate);
        assert_eq!(reason(alert.to_string()), "alert");
        let eof = std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
        assert_eq!(reason(eof.to_string()), "closed");
    }
}
