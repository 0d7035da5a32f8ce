//! TLS termination: the certificates of each TLS listener, loaded by the compile step into
//! the snapshot and picked per handshake by the client's SNI (the listener's resolver,
//! `server::tls`, reads the live snapshot). A reload, or a changed certificate file, serves
//! new handshakes with the new certificates while open connections keep theirs; a
//! certificate that cannot be loaded fails the reload with its file name, and the old
//! snapshot keeps serving.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use rustls::crypto::ring::sign::any_supported_type;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;

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

/// Loads a certificate chain and its key. Errors name the file and say what is wrong.
pub fn load_cert(cert: &Path, key: &Path, names: &[String]) -> Result<LoadedCert, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("{}: cannot read certificates: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: not a PEM certificate chain: {e}", cert.display()))?;
    let Some(leaf) = chain.first() else {
        return Err(format!("{}: no certificate in the file", cert.display()));
    };
    let der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("{}: no usable private key: {e}", key.display()))?;
    let signer = any_supported_type(&der)
        .map_err(|e| format!("{}: unsupported private key: {e}", key.display()))?;
    let (_, x509) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| format!("{}: cannot parse the certificate: {e}", cert.display()))?;
    let not_after = x509.validity().not_after.timestamp();
    let names = if names.is_empty() {
        san_names(&x509).map_err(|e| format!("{}: {e}", cert.display()))?
    } else {
        names.iter().map(|n| n.to_ascii_lowercase()).collect()
    };
    let certified = CertifiedKey::new(chain, signer);
    certified.keys_match().map_err(|e| {
        format!(
            "{} does not belong to {}: {e}",
            key.display(),
            cert.display()
        )
    })?;
    Ok(LoadedCert {
        key: Arc::new(certified),
        names,
        not_after,
    })
}

/// The DNS names of a certificate's subjectAltName.
fn san_names(x509: &x509_parser::certificate::X509Certificate<'_>) -> Result<Vec<String>, String> {
    let names: Vec<String> = x509
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|g| match g {
                    x509_parser::extensions::GeneralName::DNSName(n) => {
                        Some(n.to_ascii_lowercase())
                    }
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
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
