//! TLS termination: the certificates of each TLS listener, loaded by the compile step into
//! the snapshot and picked per handshake by the client's SNI (the listener's resolver,
//! `server::tls`, reads the live snapshot). A reload, or a changed certificate file, serves
//! new handshakes with the new certificates while open connections keep theirs; a
//! certificate that cannot be loaded fails the reload with its file name, and the old
//! snapshot keeps serving.

pub mod fingerprint;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use rustls::crypto::ring::sign::any_supported_type;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{
    ClientHello, ProducesTickets, ResolvesServerCert, ServerConfig, ServerSessionMemoryCache,
    StoresServerSessions, WebPkiClientVerifier,
};
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;

pub use fingerprint::Fingerprint;

/// What the proxy knows of a client's TLS connection: set at the handshake, read by rules
/// (`tls.ja3`, `tls.ja4`, `tls.client_subject`, `tls.client_sans`), rate-limit keys and the
/// logs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsConnection {
    /// MD5 of the JA3 text, hex.
    pub ja3: String,
    /// JA4.
    pub ja4: String,
    /// The SNI the client sent.
    pub sni: Option<String>,
    /// The negotiated version (`TLSv1_3`).
    pub version: String,
    /// The verified client certificate's subject (`CN=alice, O=Example`), under mTLS.
    pub client_subject: Option<String>,
    /// Its subjectAltName entries (DNS names, e-mail addresses, URIs, IP addresses).
    pub client_sans: Vec<String>,
}

/// The subjectAltName entries of a certificate (empty when it has none).
fn general_names<'a>(
    x509: &'a x509_parser::certificate::X509Certificate<'_>,
) -> Vec<&'a x509_parser::extensions::GeneralName<'a>> {
    x509.subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| san.value.general_names.iter().collect())
        .unwrap_or_default()
}

/// The subject and subjectAltName entries of a (verified) client certificate.
pub fn client_identity(der: &[u8]) -> Option<(String, Vec<String>)> {
    use x509_parser::extensions::GeneralName;
    let (_, x509) = x509_parser::parse_x509_certificate(der).ok()?;
    let subject = x509.subject().to_string();
    let sans = general_names(&x509)
        .into_iter()
        .filter_map(|g| match g {
            GeneralName::DNSName(n) => Some(format!("DNS:{n}")),
            GeneralName::RFC822Name(n) => Some(format!("email:{n}")),
            GeneralName::URI(n) => Some(format!("URI:{n}")),
            GeneralName::IPAddress(b) => match b.len() {
                4 => <[u8; 4]>::try_from(*b)
                    .ok()
                    .map(|a| format!("IP:{}", std::net::Ipv4Addr::from(a))),
                16 => <[u8; 16]>::try_from(*b)
                    .ok()
                    .map(|a| format!("IP:{}", std::net::Ipv6Addr::from(a))),
                _ => None,
            },
            _ => None,
        })
        .collect();
    Some((subject, sans))
}

/// A TLS listener as compiled: its certificates and the rustls configuration built on them
/// (versions, cipher suites, ALPN, client certificates, session resumption).
#[derive(Debug)]
pub struct TlsListener {
    /// The certificates (also the configuration's resolver).
    pub store: Arc<CertStore>,
    /// What each handshake on the listener uses.
    pub config: Arc<ServerConfig>,
}

/// How TLS sessions resume: the session-id cache and the ticket keys.
type Resumption = (
    Arc<dyn StoresServerSessions>,
    Option<Arc<dyn ProducesTickets>>,
);

/// Session resumption state shared by every TLS listener and kept across reloads: a client
/// that resumes after a reload still gets the abbreviated handshake.
fn resumption() -> &'static Resumption {
    static STATE: OnceLock<Resumption> = OnceLock::new();
    STATE.get_or_init(|| {
        // Tickets (stateless, keys rotated every 6 hours) for TLS 1.2 and 1.3; the cache
        // serves clients that ask for session ids.
        let ticketer = rustls::crypto::ring::Ticketer::new().ok();
        (ServerSessionMemoryCache::new(20_000), ticketer)
    })
}

/// Builds the rustls configuration of a TLS listener. Errors say which setting is wrong.
pub fn server_config(
    store: Arc<CertStore>,
    tls13_only: bool,
    cipher_suites: &[String],
) -> Result<Arc<ServerConfig>, String> {
    let mut provider = rustls::crypto::ring::default_provider();
    if !cipher_suites.is_empty() {
        let known: Vec<String> = provider
            .cipher_suites
            .iter()
            .map(|s| format!("{:?}", s.suite()))
            .collect();
        for name in cipher_suites {
            if !known.iter().any(|k| k == name) {
                return Err(format!(
                    "unknown cipher suite {name:?}; the available ones are {}",
                    known.join(", ")
                ));
            }
        }
        provider
            .cipher_suites
            .retain(|s| cipher_suites.contains(&format!("{:?}", s.suite())));
    }
    let versions: &[&rustls::SupportedProtocolVersion] = if tls13_only {
        &[&rustls::version::TLS13]
    } else {
        &[&rustls::version::TLS12, &rustls::version::TLS13]
    };
    let builder = ServerConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(versions)
        .map_err(|e| format!("no usable TLS version with these cipher suites: {e}"))?;
    let builder = match &store.client_auth {
        Some(c) => builder.with_client_cert_verifier(Arc::clone(&c.verifier)),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(store);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let (sessions, ticketer) = resumption();
    config.session_storage = Arc::clone(sessions);
    if let Some(t) = ticketer {
        config.ticketer = Arc::clone(t);
    }
    Ok(Arc::new(config))
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.pick(hello.server_name()))
    }
}

/// The certificates of one TLS listener, indexed by the names they serve.
#[derive(Debug)]
pub struct CertStore {
    /// Exact names (lower case).
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// Wildcards by the suffix after `*.` (lower case).
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    /// For clients without SNI or with a name no certificate serves.
    default: Arc<CertifiedKey>,
    /// Per certificate, its first name and its notAfter (Unix time), for the expiry metric.
    pub expiries: Vec<(String, i64)>,
    /// Client certificates asked for (mTLS), when configured.
    pub client_auth: Option<Arc<ClientAuth>>,
}

/// Client certificates a TLS listener asks for (mTLS).
pub struct ClientAuth {
    /// Verifies a client's chain against the configured CA bundle.
    pub verifier: Arc<dyn ClientCertVerifier>,
    /// Whether a client without a certificate is refused.
    pub required: bool,
}

impl std::fmt::Debug for ClientAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientAuth")
            .field("required", &self.required)
            .finish_non_exhaustive()
    }
}

/// Loads the CA bundle that signs accepted client certificates. Errors name the file.
pub fn load_client_auth(ca: &Path, required: bool) -> Result<ClientAuth, String> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca)
        .map_err(|e| format!("{}: cannot read CA certificates: {e}", ca.display()))?
    {
        let c = c.map_err(|e| format!("{}: not a PEM certificate bundle: {e}", ca.display()))?;
        roots
            .add(c)
            .map_err(|e| format!("{}: unusable CA certificate: {e}", ca.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("{}: no CA certificate in the file", ca.display()));
    }
    let mut builder = WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    );
    if !required {
        builder = builder.allow_unauthenticated();
    }
    let verifier = builder
        .build()
        .map_err(|e| format!("{}: {e}", ca.display()))?;
    Ok(ClientAuth { verifier, required })
}

/// A certificate as loaded: its key pair and the names it serves.
pub struct LoadedCert {
    key: Arc<CertifiedKey>,
    names: Vec<String>,
    not_after: i64,
}

/// Reads a PEM certificate chain (leaf first, at least one certificate). Errors name the
/// file.
pub fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: cannot read certificates: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: not a PEM certificate chain: {e}", path.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no certificate in the file", path.display()));
    }
    Ok(chain)
}

/// Loads a certificate chain and its private key, checked to belong together (the
/// listeners' certificates and the client certificates presented to upstreams). Errors
/// name the file and say what is wrong.
pub fn key_pair(cert: &Path, key: &Path) -> Result<(CertifiedKey, PrivateKeyDer<'static>), String> {
    let chain = read_chain(cert)?;
    let der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("{}: no usable private key: {e}", key.display()))?;
    let signer = any_supported_type(&der)
        .map_err(|e| format!("{}: unsupported private key: {e}", key.display()))?;
    let certified = CertifiedKey::new(chain, signer);
    certified.keys_match().map_err(|e| {
        format!(
            "{} does not belong to {}: {e}",
            key.display(),
            cert.display()
        )
    })?;
    Ok((certified, der))
}

/// Loads a certificate chain and its key. Errors name the file and say what is wrong.
pub fn load_cert(cert: &Path, key: &Path, names: &[String]) -> Result<LoadedCert, String> {
    let (certified, _) = key_pair(cert, key)?;
    let leaf = certified
        .end_entity_cert()
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    let (_, x509) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| format!("{}: cannot parse the certificate: {e}", cert.display()))?;
    let not_after = x509.validity().not_after.timestamp();
    let names = if names.is_empty() {
        san_names(&x509).map_err(|e| format!("{}: {e}", cert.display()))?
    } else {
        names.iter().map(|n| n.to_ascii_lowercase()).collect()
    };
    Ok(LoadedCert {
        key: Arc::new(certified),
        names,
        not_after,
    })
}

/// The DNS names of a certificate's subjectAltName.
fn san_names(x509: &x509_parser::certificate::X509Certificate<'_>) -> Result<Vec<String>, String> {
    let names: Vec<String> = general_names(x509)
        .into_iter()
        .filter_map(|g| match g {
            x509_parser::extensions::GeneralName::DNSName(n) => Some(n.to_ascii_lowercase()),
            _ => None,
        })
        .collect();
    if names.is_empty() {
        return Err(
            "the certificate has no DNS name in subjectAltName: list them in `names`".into(),
        );
    }
    Ok(names)
}

impl CertStore {
    /// A store over loaded certificates; the first is the default. `None` when empty.
    pub fn new(certs: Vec<LoadedCert>) -> Option<CertStore> {
        let default = Arc::clone(&certs.first()?.key);
        let mut store = CertStore {
            exact: HashMap::new(),
            wildcard: HashMap::new(),
            default,
            expiries: Vec::new(),
            client_auth: None,
        };
        for c in certs {
            if let Some(first) = c.names.first() {
                store.expiries.push((first.clone(), c.not_after));
            }
            for n in c.names {
                // The first certificate that names a host serves it.
                match n.strip_prefix("*.") {
                    Some(suffix) => {
                        store
                            .wildcard
                            .entry(suffix.to_string())
                            .or_insert_with(|| Arc::clone(&c.key));
                    }
                    None => {
                        store.exact.entry(n).or_insert_with(|| Arc::clone(&c.key));
                    }
                }
            }
        }
        Some(store)
    }

    /// The certificate for a client's SNI (names compare case-insensitively).
    pub fn pick(&self, sni: Option<&str>) -> Arc<CertifiedKey> {
        let Some(name) = sni else {
            return Arc::clone(&self.default);
        };
        let lowered;
        let name = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            lowered = name.to_ascii_lowercase();
            lowered.as_str()
        } else {
            name
        };
        if let Some(k) = self.exact.get(name) {
            return Arc::clone(k);
        }
        // A wildcard covers exactly one label.
        if let Some((_, suffix)) = name.split_once('.') {
            if let Some(k) = self.wildcard.get(suffix) {
                return Arc::clone(k);
            }
        }
        Arc::clone(&self.default)
    }
}
