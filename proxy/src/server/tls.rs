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
use crate::tls::ClientAuth;

/// The TLS settings of client listener `index` as the live snapshot has them: its
/// certificate resolver (SNI) and its client-certificate verifier (mTLS: a certificate is
/// asked for only when the store has `client_auth`, and verified against that CA bundle).
pub struct LiveTls {
    index: usize,
    snapshot: Arc<ArcSwap<Snapshot>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl LiveTls {
    /// The TLS settings of the `index`-th client listener.
    pub fn new(index: usize, snapshot: Arc<ArcSwap<Snapshot>>) -> LiveTls {
        LiveTls {
            index,
            snapshot,
            algorithms: rustls::crypto::ring::default_provider().signature_verification_algorithms,
        }
    }

    /// The listener's client-certificate settings, when it asks for client certificates.
    fn client_auth(&self) -> Option<Arc<ClientAuth>> {
        self.snapshot
            .load()
            .tls
            .get(self.index)?
            .as_ref()?
            .client_auth
            .clone()
    }
}

impl std::fmt::Debug for LiveTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveTls")
            .field("listener", &self.index)
            .finish_non_exhaustive()
    }
}

impl ResolvesServerCert for LiveTls {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let snap = self.snapshot.load();
        let store = snap.tls.get(self.index)?.as_ref()?;
        Some(store.pick(hello.server_name()))
    }
}

impl ClientCertVerifier for LiveTls {
    fn offer_client_auth(&self) -> bool {
        self.client_auth().is_some()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.client_auth().is_some_and(|c| c.required)
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
        match self.client_auth() {
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
