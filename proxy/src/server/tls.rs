//! The TLS listeners' certificate resolver and client-certificate verifier: at each
//! handshake they read the live snapshot's store (`crate::tls`), so certificates, CA bundles
//! and whether client certificates are asked for all change with a reload.

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::snapshot::Snapshot;
use crate::tls::CertStore;

/// The certificate resolver of listener `index`: reads the live snapshot on every handshake.
pub struct SniResolver {
    index: usize,
    snapshot: Arc<ArcSwap<Snapshot>>,
}

impl SniResolver {
    /// The resolver of the `index`-th client listener.
    pub fn new(index: usize, snapshot: Arc<ArcSwap<Snapshot>>) -> SniResolver {
        SniResolver { index, snapshot }
    }
}

impl std::fmt::Debug for SniResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SniResolver")
            .field("listener", &self.index)
            .finish_non_exhaustive()
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let snap = self.snapshot.load();
        let store = snap.tls.get(self.index)?.as_ref()?;
        Some(store.pick(hello.server_name()))
    }
}

/// The client-certificate verifier of listener `index` (mTLS): asks for a certificate only
/// when the live snapshot's store has `client_auth`, and verifies it against that CA bundle.
pub struct ClientVerifier {
    index: usize,
    snapshot: Arc<ArcSwap<Snapshot>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientVerifier {
    /// The verifier of the `index`-th client listener.
    pub fn new(index: usize, snapshot: Arc<ArcSwap<Snapshot>>) -> ClientVerifier {
        ClientVerifier {
            index,
            snapshot,
            algorithms: rustls::crypto::ring::default_provider().signature_verification_algorithms,
        }
    }

    /// The listener's store, when it asks for client certificates.
    fn store(&self) -> Option<Arc<CertStore>> {
        let snap = self.snapshot.load();
        snap.tls
            .get(self.index)?
            .clone()
            .filter(|s| s.client_auth.is_some())
    }
}

impl std::fmt::Debug for ClientVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientVerifier")
            .field("listener", &self.index)
            .finish_non_exhaustive()
    }
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.store().is_some()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.store()
            .and_then(|s| s.client_auth.as_ref().map(|c| c.required))
            .unwrap_or(false)
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: clients send the certificate they have (curl, browsers, SDKs do).
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        match self.store().as_ref().and_then(|s| s.client_auth.as_ref()) {
            Some(c) => c
                .verifier
                .verify_client_cert(end_entity, intermediates, now),
            None => Err(rustls::Error::General(
                "this listener does not accept client certificates".into(),
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
