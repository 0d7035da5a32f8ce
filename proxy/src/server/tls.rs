//! The TLS listeners' certificate resolver: picks, at each handshake, the certificate of
//! the live snapshot's store for the client's SNI (`crate::tls`).

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::snapshot::Snapshot;

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
