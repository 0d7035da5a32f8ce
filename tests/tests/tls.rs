//! TLS termination through the real binary: certificates made by the test (a CA and leaf
//! certificates, `rcgen`), clients verifying them (`rustls`), requests over HTTP/1.1 and
//! HTTP/2 (`hyper`) to a real backend. SNI picks the certificate; the inspection pipeline
//! applies over TLS exactly as in cleartext; a replaced certificate is served after a reload
//! without breaking a kept-alive connection, and a broken one keeps the old.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use palisade_tests::*;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

const UA: &str = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0";

/// A test CA that issues leaf certificates.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    der: CertificateDer<'static>,
    pem: String,
}

/// A leaf certificate: PEM files' contents and its DER (what the server presents).
struct Leaf {
    pem: String,
    key: String,
    der: CertificateDer<'static>,
}

impl Ca {
    fn new() -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        Ca {
            issuer: Issuer::new(params, key),
            der: cert.der().clone(),
            pem: cert.pem(),
        }
    }

    fn pem(&self) -> &str {
        &self.pem
    }

    /// A leaf for DNS `names`, and 127.0.0.1 when `ip` (a client connecting by address sends
    /// no SNI and gets the default certificate).
    fn leaf(&self, names: &[&str], ip: bool) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        if ip {
            params
                .subject_alt_names
                .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        }
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            pem: cert.pem(),
            key: key.serialize_pem(),
            der: cert.der().clone(),
        }
    }

    fn connector(&self, alpn: &[&[u8]]) -> TlsConnector {
        self.connector_as(alpn, None)
    }

    /// A client trusting this CA, presenting `client` (a leaf and its key) when given.
    fn connector_as(&self, alpn: &[&[u8]], client: Option<&Leaf>) -> TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.der.clone()).unwrap();
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
        let mut cfg = match client {
            Some(c) => {
                use rustls::pki_types::pem::PemObject;
                let key =
                    rustls::pki_types::PrivateKeyDer::from_pem_slice(c.key.as_bytes()).unwrap();
                builder
                    .with_client_auth_cert(vec![c.der.clone()], key)
                    .unwrap()
            }
            None => builder.with_no_client_auth(),
        };
        cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        // Full handshakes only: a resumed session reports the certificate it began with.
        cfg.resumption = rustls::client::Resumption::disabled();
        TlsConnector::from(Arc::new(cfg))
    }
}

fn write(dir: &std::path::Path, name: &str, leaf: &Leaf) {
    std::fs::write(dir.join(format!("{name}.pem")), &leaf.pem).unwrap();
    std::fs::write(dir.join(format!("{name}.key")), &leaf.key).unwrap();
}

async fn connect(
    p: &Palisade,
    c: &TlsConnector,
    name: ServerName<'static>,
) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(p.addr).await.unwrap();
    c.connect(name, tcp).await.expect("TLS handshake")
}

fn dns(name: &str) -> ServerName<'static> {
    ServerName::try_from(name.to_string()).unwrap()
}

fn presented(s: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    s.get_ref().1.peer_certificates().unwrap()[0].clone()
}

fn get(host: &str, path: &str) -> hyper::Request<Empty<Bytes>> {
    hyper::Request::get(path)
        .header("host", host)
        .header("user-agent", UA)
        .body(Empty::new())
        .unwrap()
}

/// An HTTP/1.1 client on a TLS connection (kept alive until dropped).
async fn h1(s: TlsStream<TcpStream>) -> hyper::client::conn::http1::SendRequest<Empty<Bytes>> {
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

async fn status_h1(
    send: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    host: &str,
    path: &str,
) -> u16 {
    let r = send.send_request(get(host, path)).await.unwrap();
    let status = r.status().as_u16();
    r.into_body().collect().await.unwrap();
    status
}

async fn reload(p: &Palisade) -> u16 {
    raw_request(
        p.admin,
        b"POST /reload HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await
    .expect("a reload response")
    .status
}

fn body(backend: &Backend) -> String {
    format!(
        "rulesets: [builtin:managed]\nupstreams:\n  app: {{targets: [\"{}\"]}}\nroutes:\n  - name: api\n    upstream: app\n    policy:\n      rulesets: [{{name: sqli}}, {{name: xss}}]\n",
        backend.addr
    )
}

const TWO_CERTS: &str = "{certificates: [{cert: a.pem, key: a.key}, {cert: b.pem, key: b.key}]}";
const ATTACK: &str = "/items?q=1%27%20or%201%3D1--";

#[tokio::test]
async fn https_over_h1_and_h2_is_inspected_and_sni_picks_the_certificate() {
    let backend = Backend::start("api").await;
    let ca = Ca::new();
    let a = ca.leaf(&["a.example", "*.a.example"], true);
    let b = ca.leaf(&["b.example"], false);
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a", &a);
    write(dir.path(), "b", &b);
    let p = Palisade::start_tls(dir, TWO_CERTS, &body(&backend)).await;
    let http1 = ca.connector(&[b"http/1.1"]);

    // SNI: exact names, a wildcard (one label), and no SNI at all (by address) get the
    // default, the first certificate. The client verifies each against its name.
    for (name, want) in [
        (dns("a.example"), &a),
        (dns("api.a.example"), &a),
        (dns("b.example"), &b),
        (ServerName::IpAddress(Ipv4Addr::LOCALHOST.into()), &a),
    ] {
        let s = connect(&p, &http1, name.clone()).await;
        assert_eq!(presented(&s), want.der, "{name:?}");
    }
    // A name no certificate serves gets the default one, which the client refuses.
    let tcp = TcpStream::connect(p.addr).await.unwrap();
    assert!(http1.connect(dns("other.example"), tcp).await.is_err());

    // HTTP/1.1 over TLS: benign reaches the backend, marked https; an attack is refused.
    let mut send = h1(connect(&p, &http1, dns("b.example")).await).await;
    assert_eq!(
        status_h1(&mut send, "b.example", "/items?q=shoes").await,
        200
    );
    let seen = backend.seen();
    let last = seen.last().expect("the backend saw the request");
    assert_eq!(last.header("x-forwarded-proto"), Some("https"));
    assert_eq!(status_h1(&mut send, "b.example", ATTACK).await, 403);
    assert_eq!(backend.count(), 1);

    // HTTP/2 over TLS (ALPN h2): the same verdicts.
    let s = connect(&p, &ca.connector(&[b"h2"]), dns("a.example")).await;
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
            .await
            .unwrap();
    tokio::spawn(conn);
    for (path, want) in [("/items?q=shoes", 200), (ATTACK, 403)] {
        let req = hyper::Request::get(format!("https://a.example{path}"))
            .header("user-agent", UA)
            .body(Empty::<Bytes>::new())
            .unwrap();
        let r = send.send_request(req).await.unwrap();
        assert_eq!(r.status().as_u16(), want, "h2 {path}");
        assert_eq!(r.version(), hyper::Version::HTTP_2);
    }
    assert_eq!(backend.count(), 2);

    // Metrics: handshakes by version and ALPN, and each certificate's expiry by name.
    let m = p.metrics().await;
    assert!(
        metric_value(
            &m,
            r#"palisade_tls_handshakes_total{alpn="h2",version="1.3"}"#
        ) >= 1.0,
        "{m}"
    );
    assert!(
        metric_value(
            &m,
            r#"palisade_tls_handshakes_total{alpn="http/1.1",version="1.3"}"#
        ) >= 5.0,
        "{m}"
    );
    let expiry = metric_value(
        &m,
        r#"palisade_tls_certificate_expiry_timestamp_seconds{name="b.example"}"#,
    );
    assert!(
        expiry > 4.0e9,
        "rcgen's default notAfter is in 4096: {expiry}\n{m}"
    );
}

#[tokio::test]
async fn a_replaced_certificate_is_served_after_reload_and_a_broken_one_keeps_the_last() {
    let backend = Backend::start("api").await;
    let ca = Ca::new();
    let (a1, b) = (
        ca.leaf(&["a.example"], false),
        ca.leaf(&["b.example"], false),
    );
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a", &a1);
    write(dir.path(), "b", &b);
    let p = Palisade::start_tls(dir, TWO_CERTS, &body(&backend)).await;
    let http1 = ca.connector(&[b"http/1.1"]);
    let old = connect(&p, &http1, dns("a.example")).await;
    assert_eq!(presented(&old), a1.der);
    let mut kept = h1(old).await;
    assert_eq!(status_h1(&mut kept, "a.example", "/one").await, 200);

    // A new key pair for a.example: new handshakes get it, the open connection goes on.
    let a2 = ca.leaf(&["a.example"], false);
    write(&p.dir, "a", &a2);
    assert_eq!(reload(&p).await, 200, "{}", p.log());
    let s = connect(&p, &http1, dns("a.example")).await;
    assert_eq!(presented(&s), a2.der);
    assert_eq!(status_h1(&mut kept, "a.example", "/two").await, 200);

    // A key that does not belong to the certificate, then an unreadable certificate: the
    // reload fails naming the file, and a2 is still served.
    std::fs::write(p.dir.join("a.key"), &b.key).unwrap();
    assert_ne!(reload(&p).await, 200);
    std::fs::write(p.dir.join("a.pem"), "not a certificate").unwrap();
    assert_ne!(reload(&p).await, 200);
    let s = connect(&p, &http1, dns("a.example")).await;
    assert_eq!(presented(&s), a2.der);
    let log = p.log();
    assert!(
        log.contains("a.pem"),
        "the failed reload names the file:\n{log}"
    );
    assert_eq!(status_h1(&mut kept, "a.example", "/three").await, 200);
}

/// Whether a GET over a fresh connection gets through: with TLS 1.3 a refused client
/// certificate shows as an alert on the first read, after the client's handshake is done.
async fn gets_through(p: &Palisade, c: &TlsConnector) -> bool {
    let Ok(tcp) = TcpStream::connect(p.addr).await else {
        return false;
    };
    let Ok(s) = c.connect(dns("a.example"), tcp).await else {
        return false;
    };
    let Ok((mut send, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await else {
        return false;
    };
    tokio::spawn(conn);
    match send.send_request(get("a.example", "/items")).await {
        Ok(r) => r.status().as_u16() == 200,
        Err(_) => false,
    }
}

#[tokio::test]
async fn client_certificates_signed_by_the_configured_ca_are_required_or_optional() {
    let backend = Backend::start("api").await;
    let ca = Ca::new();
    let a = ca.leaf(&["a.example"], false);
    let clients = Ca::new();
    let good = clients.leaf(&["client-1"], false);
    let stranger = Ca::new().leaf(&["client-1"], false);
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a", &a);
    std::fs::write(dir.path().join("clients.pem"), clients.pem()).unwrap();
    let p = Palisade::start_tls(
        dir,
        "{certificates: [{cert: a.pem, key: a.key}], client_auth: {ca: clients.pem}}",
        &body(&backend),
    )
    .await;
    let h1 = [&b"http/1.1"[..]];
    assert!(gets_through(&p, &ca.connector_as(&h1, Some(&good))).await);
    let subject = backend.seen()[0]
        .header("x-palisade-client-subject")
        .map(str::to_string);
    assert!(
        subject.as_deref().is_some_and(|s| s.starts_with("CN=")),
        "the verified subject goes upstream: {subject:?}"
    );
    assert!(
        !gets_through(&p, &ca.connector_as(&h1, None)).await,
        "no certificate"
    );
    assert!(
        !gets_through(&p, &ca.connector_as(&h1, Some(&stranger))).await,
        "a certificate of another CA"
    );

    // Optional after a reload: no certificate passes, a bad one still does not.
    let cfg = p.dir.join("palisade.yaml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace("{ca: clients.pem}", "{ca: clients.pem, required: false}"),
    )
    .unwrap();
    assert_eq!(reload(&p).await, 200, "{}", p.log());
    assert!(gets_through(&p, &ca.connector_as(&h1, None)).await);
    assert_eq!(
        backend.seen()[1].header("x-palisade-client-subject"),
        None,
        "no certificate, no subject"
    );
    assert!(gets_through(&p, &ca.connector_as(&h1, Some(&good))).await);
    assert!(!gets_through(&p, &ca.connector_as(&h1, Some(&stranger))).await);
    assert_eq!(backend.count(), 3);
}

#[tokio::test]
async fn a_redirect_listener_sends_clients_to_https() {
    let backend = Backend::start("api").await;
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a", &ca.leaf(&["a.example"], false));
    let port = free_port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // The redirect listener follows the TLS one in `listeners`.
    let tls = format!(
        "{{certificates: [{{cert: a.pem, key: a.key}}]}}\n  - address: \"{addr}\"\n    redirect_to_https: 8443"
    );
    let p = Palisade::start_tls(dir, &tls, &body(&backend)).await;
    let mut got = None;
    for _ in 0..100 {
        if let Some(r) = raw_request(
            addr,
            b"GET /items?q=1 HTTP/1.1\r\nHost: a.example:8080\r\nConnection: close\r\n\r\n",
        )
        .await
        {
            got = Some(r);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let r = got.expect("the redirect listener answers");
    assert_eq!(r.status, 301);
    assert_eq!(
        r.header("location"),
        Some("https://a.example:8443/items?q=1")
    );
    let r = raw_request(
        addr,
        b"POST /items HTTP/1.1\r\nHost: a.example\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 308, "a POST keeps its method");
    // A Host that is not a host name gets no redirect built from it.
    let r = raw_request(
        addr,
        b"GET / HTTP/1.1\r\nHost: evil.example/x\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 400);
    assert_eq!(r.header("location"), None);
    assert_eq!(
        backend.count(),
        0,
        "nothing is proxied from a redirect listener"
    );
    drop(p);
}

/// One HTTPS GET with `curl` (`-k`: the fingerprint, not the certificate, is under test) by
/// the name `a.example`, as a new connection; its status. Run off the test's runtime, which
/// serves the backend meanwhile.
async fn curl_get(p: &Palisade, path: &str) -> u16 {
    let port = p.addr.port();
    let path = path.to_string();
    tokio::task::spawn_blocking(move || curl_blocking(port, &path))
        .await
        .unwrap()
}

fn curl_blocking(port: u16, path: &str) -> u16 {
    let out = std::process::Command::new("curl")
        .args([
            "-sk",
            "--max-time",
            "10",
            "--resolve",
            &format!("a.example:{port}:127.0.0.1"),
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("https://a.example:{port}{path}"),
        ])
        .output()
        .expect("curl (installed by scripts/ensure-deps.sh)");
    String::from_utf8_lossy(&out.stdout).parse().unwrap_or(0)
}

/// The rustls client of these tests: a GET by the name `a.example` on a new connection.
async fn rustls_get(p: &Palisade, ca: &Ca, path: &str) -> u16 {
    let s = connect(p, &ca.connector(&[b"http/1.1"]), dns("a.example")).await;
    status_h1(&mut h1(s).await, "a.example", path).await
}

#[tokio::test]
async fn ja3_and_ja4_of_a_curl_handshake_are_stable_and_match_rules_and_rate_limit_keys() {
    let backend = Backend::start("api").await;
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a", &ca.leaf(&["a.example"], true));
    let tls = "{certificates: [{cert: a.pem, key: a.key}]}";
    let p = Palisade::start_tls(dir, tls, &body(&backend)).await;

    // Two curl connections, then the rustls client: the backend is told each fingerprint.
    assert_eq!(curl_get(&p, "/one").await, 200, "{}", p.log());
    assert_eq!(curl_get(&p, "/two").await, 200);
    assert_eq!(rustls_get(&p, &ca, "/three").await, 200);
    let seen = backend.seen();
    let fp = |i: usize, h: &str| seen[i].header(h).unwrap_or_default().to_string();
    let (ja3, ja4) = (fp(0, "x-palisade-ja3"), fp(0, "x-palisade-ja4"));
    assert_eq!(ja3.len(), 32, "JA3 is an MD5: {ja3:?}");
    assert!(
        ja4.starts_with("t13d") && ja4.len() == 36,
        "JA4 of a TLS 1.3 hello with SNI: {ja4:?}"
    );
    assert_eq!(fp(1, "x-palisade-ja3"), ja3, "stable across connections");
    assert_eq!(fp(1, "x-palisade-ja4"), ja4, "stable across connections");
    assert_ne!(fp(2, "x-palisade-ja4"), ja4, "another client, another JA4");
    assert_ne!(fp(2, "x-palisade-ja3"), ja3);
    drop(p);

    // A rule on curl's JA4 and a rate limit keyed by JA3: curl is refused and has a bucket
    // of its own; the rustls client passes.
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a", &ca.leaf(&["a.example"], true));
    std::fs::write(
        dir.path().join("bots.yaml"),
        format!(
            "name: bots\nversion: \"1\"\nrules:\n  - id: scripted-client\n    description: the JA4 of a scripted client\n    match: {{field: tls.ja4, equals: \"{ja4}\"}}\n"
        ),
    )
    .unwrap();
    let config = format!(
        "rulesets: [bots.yaml]\nupstreams:\n  app: {{targets: [\"{}\"]}}\nrate_limits:\n  - name: per-fingerprint\n    key: [tls.ja3]\n    rate: 2/min\n    burst: 2\nroutes:\n  - name: api\n    upstream: app\n    policy:\n      rulesets: [{{name: bots}}]\n",
        backend.addr
    );
    let p = Palisade::start_tls(dir, tls, &config).await;
    assert_eq!(curl_get(&p, "/a").await, 403, "{}", p.log());
    assert_eq!(curl_get(&p, "/b").await, 403);
    assert_eq!(curl_get(&p, "/c").await, 429, "curl's JA3 bucket is empty");
    assert_eq!(rustls_get(&p, &ca, "/d").await, 200);
    assert_eq!(rustls_get(&p, &ca, "/e").await, 200);
    assert!(p.log().contains(&ja4), "the block is logged with the JA4");
}

/// A PROXY protocol v2 header (TCP over IPv4) naming `src` as the client.
fn proxy_v2(src: std::net::SocketAddrV4, dst: std::net::SocketAddrV4) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0, 12]);
    h.extend_from_slice(&src.ip().octets());
    h.extend_from_slice(&dst.ip().octets());
    h.extend_from_slice(&src.port().to_be_bytes());
    h.extend_from_slice(&dst.port().to_be_bytes());
    h
}

/// A TLS GET after `preamble` on a connection from `src`; the status, or `None` when the
/// connection is refused.
async fn get_after(p: &Palisade, ca: &Ca, src: &str, preamble: &[u8]) -> Option<u16> {
    use tokio::io::AsyncWriteExt;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{src}:0").parse().unwrap()).unwrap();
    let mut tcp = socket.connect(p.addr).await.ok()?;
    tcp.write_all(preamble).await.ok()?;
    let s = ca
        .connector(&[b"http/1.1"])
        .connect(dns("a.example"), tcp)
        .await
        .ok()?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .ok()?;
    tokio::spawn(conn);
    let r = send.send_request(get("a.example", "/pp")).await.ok()?;
    Some(r.status().as_u16())
}

#[tokio::test]
async fn proxy_protocol_from_a_trusted_peer_sets_the_client_ip_and_is_refused_from_others() {
    let backend = Backend::start("api").await;
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a", &ca.leaf(&["a.example"], false));
    // TLS behind a TCP load balancer: the PROXY header comes first, then the handshake. A
    // second, cleartext listener takes PROXY headers too.
    let plain = free_port();
    let tls = format!(
        "{{certificates: [{{cert: a.pem, key: a.key}}]}}\n    proxy_protocol: true\n  - address: \"127.0.0.1:{plain}\"\n    proxy_protocol: true"
    );
    let tls = tls.as_str();
    let config = format!(
        "client_ip: {{trusted_proxies: [127.0.0.1/32]}}\n{}",
        body(&backend)
    );
    let p = Palisade::start_tls(dir, tls, &config).await;
    let dst = std::net::SocketAddrV4::new(Ipv4Addr::LOCALHOST, p.addr.port());

    let v2 = proxy_v2("203.0.113.7:5555".parse().unwrap(), dst);
    assert_eq!(
        get_after(&p, &ca, "127.0.0.1", &v2).await,
        Some(200),
        "{}",
        p.log()
    );
    let v1 = format!("PROXY TCP4 198.51.100.9 127.0.0.1 4444 {}\r\n", dst.port());
    assert_eq!(
        get_after(&p, &ca, "127.0.0.1", v1.as_bytes()).await,
        Some(200)
    );
    let seen = backend.seen();
    assert_eq!(seen[0].header("x-real-ip"), Some("203.0.113.7"));
    assert_eq!(seen[0].header("x-forwarded-for"), Some("203.0.113.7"));
    assert_eq!(seen[1].header("x-real-ip"), Some("198.51.100.9"));

    // From an address that is not a trusted proxy, a header is refused; from a trusted one,
    // a connection without a header is too.
    assert_eq!(get_after(&p, &ca, "127.0.0.2", &v2).await, None);
    assert_eq!(get_after(&p, &ca, "127.0.0.1", b"").await, None);
    assert_eq!(backend.count(), 2);

    // On the cleartext listener: the header, then the request.
    let plain: std::net::SocketAddr = format!("127.0.0.1:{plain}").parse().unwrap();
    let req = format!(
        "PROXY TCP4 192.0.2.44 127.0.0.1 4444 {}\r\nGET /items HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n",
        plain.port()
    );
    let r = raw_request(plain, req.as_bytes()).await.expect("an answer");
    assert_eq!(r.status, 200);
    assert_eq!(backend.seen()[2].header("x-real-ip"), Some("192.0.2.44"));
    p.expect_metric("palisade_proxy_protocol_total{result=\"accepted\"}", 3.0)
        .await;
    p.expect_metric(
        "palisade_proxy_protocol_total{result=\"untrusted_peer\"}",
        1.0,
    )
    .await;
    p.expect_metric("palisade_proxy_protocol_total{result=\"malformed\"}", 1.0)
        .await;
}

/// What a TLS backend saw: per request, the HTTP version and whether the client presented a
/// certificate.
type TlsSeen = Arc<std::sync::Mutex<Vec<(hyper::Version, bool)>>>;

/// A TLS backend on loopback serving `leaf` with ALPN h2 and http/1.1; it asks for (and
/// verifies, without requiring) client certificates of `clients` when given. Answers every
/// request with 200.
async fn tls_backend(leaf: &Leaf, clients: Option<&Ca>) -> (std::net::SocketAddr, TlsSeen) {
    use rustls::pki_types::pem::PemObject;
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(leaf.key.as_bytes()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match clients {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(ca.der.clone()).unwrap();
            let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .allow_unauthenticated()
            .build()
            .unwrap();
            builder.with_client_cert_verifier(v)
        }
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder
        .with_single_cert(vec![leaf.der.clone()], key)
        .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: TlsSeen = Arc::default();
    let log = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, log) = (acceptor.clone(), Arc::clone(&log));
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let client_cert = tls.get_ref().1.peer_certificates().is_some();
                let service = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        log.lock().unwrap().push((req.version(), client_cert));
                        async move {
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                http_body_util::Full::new(Bytes::from_static(b"tls backend")),
                            ))
                        }
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (addr, seen)
}

#[tokio::test]
async fn an_upstream_over_tls_is_verified_against_its_ca_and_can_speak_h2_with_a_client_cert() {
    let ca = Ca::new();
    let backend_ca = Ca::new();
    let proxies = Ca::new();
    let (addr, seen) = tls_backend(
        &backend_ca.leaf(&["backend.internal"], true),
        Some(&proxies),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a", &ca.leaf(&["a.example"], true));
    std::fs::write(dir.path().join("backend-ca.pem"), backend_ca.pem()).unwrap();
    write(dir.path(), "client", &proxies.leaf(&["palisade"], false));
    // Verified against the system roots, the self-signed backend is refused.
    let upstream = |tls: &str| {
        format!(
            "upstreams:\n  app: {{targets: [\"{addr}\"], tls: {tls}}}\nroutes:\n  - name: api\n    upstream: app\n"
        )
    };
    let p = Palisade::start_tls(
        dir,
        "{certificates: [{cert: a.pem, key: a.key}]}",
        &upstream("{}"),
    )
    .await;
    assert_eq!(rustls_get(&p, &ca, "/one").await, 502, "{}", p.log());
    assert!(seen.lock().unwrap().is_empty());

    // With its CA (the target is an IP: its certificate's IP address is checked), over h2.
    let cfg = p.dir.join("palisade.yaml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace("tls: {}", "tls: {ca: backend-ca.pem, h2: true}"),
    )
    .unwrap();
    assert_eq!(reload(&p).await, 200, "{}", p.log());
    assert_eq!(rustls_get(&p, &ca, "/two").await, 200, "{}", p.log());
    assert_eq!(
        seen.lock().unwrap().last().copied(),
        Some((hyper::Version::HTTP_2, false))
    );

    // A wrong SNI fails verification; the name in the certificate passes.
    std::fs::write(
        &cfg,
        text.replace("tls: {}", "tls: {ca: backend-ca.pem, sni: other.internal}"),
    )
    .unwrap();
    assert_eq!(reload(&p).await, 200, "{}", p.log());
    assert_eq!(rustls_get(&p, &ca, "/three").await, 502);
    std::fs::write(
        &cfg,
        text.replace(
            "tls: {}",
            "tls: {ca: backend-ca.pem, sni: backend.internal, client_cert: {cert: client.pem, key: client.key}}",
        ),
    )
    .unwrap();
    assert_eq!(reload(&p).await, 200, "{}", p.log());
    assert_eq!(rustls_get(&p, &ca, "/four").await, 200, "{}", p.log());
    assert_eq!(
        seen.lock().unwrap().last().copied(),
        Some((hyper::Version::HTTP_11, true)),
        "HTTP/1.1 unless h2 is offered; the client certificate was presented"
    );
    assert_eq!(seen.lock().unwrap().len(), 2);
}

/// An HTTP/2 frame.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    f.extend_from_slice(&[kind, flags]);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// The client preface and an empty SETTINGS frame.
fn preface() -> Vec<u8> {
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(4, 0, 0, &[]));
    out
}

/// HPACK for `GET https://a.example/`.
fn get_block() -> Vec<u8> {
    let mut b = vec![0x82, 0x87, 0x84, 0x01, 9];
    b.extend_from_slice(b"a.example");
    b
}

/// Writes `writes` on a new h2 connection (stopping at the first failed write) and returns
/// what the server sent until it closed the connection (within 10 s).
async fn exchange_h2(p: &Palisade, ca: &Ca, writes: &[Vec<u8>]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = connect(p, &ca.connector(&[b"h2"]), dns("a.example")).await;
    let (mut rd, mut wr) = tokio::io::split(s);
    let reader = tokio::spawn(async move {
        let mut all = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = rd.read(&mut buf).await {
            if n == 0 {
                break;
            }
            all.extend_from_slice(&buf[..n]);
        }
        all
    });
    for w in writes {
        if wr.write_all(w).await.is_err() {
            break;
        }
    }
    let _ = wr.flush().await;
    tokio::time::timeout(std::time::Duration::from_secs(10), reader)
        .await
        .expect("the server closes the connection")
        .unwrap()
}

/// The error code of the first GOAWAY frame among `frames`.
fn goaway_code(frames: &[u8]) -> Option<u32> {
    let mut at = 0;
    while at + 9 <= frames.len() {
        let len = u32::from_be_bytes([0, frames[at], frames[at + 1], frames[at + 2]]) as usize;
        if frames[at + 3] == 7 && at + 17 <= frames.len() {
            let c = &frames[at + 13..at + 17];
            return Some(u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
        }
        at += 9 + len;
    }
    None
}

/// An HTTP/2 client (the h2 crate) on a new TLS connection.
async fn h2_client(
    p: &Palisade,
    ca: &Ca,
) -> (
    h2::client::SendRequest<Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let s = connect(p, &ca.connector(&[b"h2"]), dns("a.example")).await;
    let (send, conn) = h2::client::handshake(s).await.unwrap();
    (send, tokio::spawn(conn))
}

fn h2_get(path: &str) -> http::Request<()> {
    http::Request::get(format!("https://a.example{path}"))
        .header("user-agent", UA)
        .body(())
        .unwrap()
}

#[tokio::test]
async fn http2_streams_are_limited_and_rapid_reset_and_continuation_floods_lose_the_connection() {
    let backend = Backend::start("api").await;
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a", &ca.leaf(&["a.example"], false));
    let config = format!(
        "http: {{h2_max_concurrent_streams: 16}}\n{}",
        body(&backend)
    );
    let p = Palisade::start_tls(dir, "{certificates: [{cert: a.pem, key: a.key}]}", &config).await;

    // The stream limit is advertised, and a request is served.
    let (send, conn) = h2_client(&p, &ca).await;
    let mut send = send.ready().await.unwrap();
    let (resp, _) = send.send_request(h2_get("/items"), true).unwrap();
    assert_eq!(resp.await.unwrap().status(), 200);
    assert_eq!(send.current_max_send_streams(), 16);
    drop(send);
    let _ = conn.await;

    // Rapid reset: 1000 requests, each cancelled in the same write. The connection is cut:
    // by the h2 crate (GOAWAY ENHANCE_YOUR_CALM for streams reset before they were taken)
    // or by the guard (100 resets, at least half of the streams opened).
    let mut frames = preface();
    for i in 0..1000u32 {
        let id = 2 * i + 1;
        frames.extend(frame(1, 0x5, id, &get_block()));
        frames.extend(frame(3, 0, id, &8u32.to_be_bytes()));
    }
    let got = exchange_h2(&p, &ca, &[frames]).await;
    let goaway = goaway_code(&got);
    let cut = p.metric("palisade_http2_rapid_reset_total").await;
    assert!(
        goaway == Some(0xb) || cut == 1.0,
        "GOAWAY {goaway:?}, guard cuts {cut}"
    );
    assert!(
        backend.count() < 200,
        "{} requests reached the backend",
        backend.count()
    );
    let after_reset = backend.count();

    // CONTINUATION flood: one header block that never ends (150 literal headers of 100
    // bytes per frame, never END_HEADERS): GOAWAY once it passes the head size limit.
    let mut block = Vec::new();
    for _ in 0..150 {
        block.extend_from_slice(&[0x00, 0x01, b'a', 100]);
        block.extend_from_slice(&[b'v'; 100]);
    }
    let mut first = preface();
    first.extend(frame(1, 0x1, 1, &get_block()));
    let mut writes = vec![first];
    writes.extend((0..400).map(|_| frame(9, 0, 1, &block)));
    let got = exchange_h2(&p, &ca, &writes).await;
    assert!(goaway_code(&got).is_some(), "GOAWAY before 6 MB of headers");
    assert_eq!(
        backend.count(),
        after_reset,
        "nothing of the flood reached the backend"
    );
    // The server is fine.
    assert_eq!(rustls_get(&p, &ca, "/items").await, 200);
}

#[tokio::test]
async fn sessions_resume_across_connections_and_reloads() {
    let backend = Backend::start("api").await;
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a", &ca.leaf(&["a.example"], false));
    let p = Palisade::start_tls(
        dir,
        "{certificates: [{cert: a.pem, key: a.key}]}",
        &body(&backend),
    )
    .await;
    // A client that keeps its session (tickets) between connections.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der.clone()).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = TlsConnector::from(Arc::new(cfg));
    let kind = |s: &TlsStream<TcpStream>| s.get_ref().1.handshake_kind();
    let mut kinds = Vec::new();
    for round in 0..3 {
        if round == 2 {
            assert_eq!(reload(&p).await, 200);
        }
        let s = connect(&p, &connector, dns("a.example")).await;
        kinds.push(kind(&s));
        // The ticket arrives after the handshake: read a response before the next connection.
        assert_eq!(
            status_h1(&mut h1(s).await, "a.example", "/items").await,
            200
        );
    }
    use rustls::HandshakeKind::{Full, Resumed};
    assert_eq!(
        kinds,
        [Some(Full), Some(Resumed), Some(Resumed)],
        "the third after a reload"
    );
}
