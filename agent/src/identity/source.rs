//! Where the proxy gets certificates and trust: the pods' SVIDs and the trust bundle.
use std::sync::{Arc, RwLock};

use crate::identity::{
    client_config, server_config, SpiffeId, TlsError, TrustBundle, TrustDomain, WorkloadCertificate,
};

/// Looks up the current certificate of a local identity.
pub type CertLookup = dyn Fn(&SpiffeId) -> Option<Arc<WorkloadCertificate>> + Send + Sync;

/// Certificates and trust for the tunnel paths.
pub struct TlsSource {
    certs: Arc<CertLookup>,
    roots: RwLock<Arc<TrustBundle>>,
    trust_domains: Arc<[TrustDomain]>,
}

/// Why a tunnel could not get its TLS settings.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No valid certificate for the identity (yet).
    #[error("no certificate for {id} yet")]
    NoCertificate { id: SpiffeId },
    /// rustls rejected the settings.
    #[error(transparent)]
    Config(#[from] TlsError),
}

impl TlsSource {
    /// A source backed by `certs`, trusting `roots` for `trust_domains`.
    pub fn new(
        certs: Arc<CertLookup>,
        roots: TrustBundle,
        trust_domains: Vec<TrustDomain>,
    ) -> Self {
        Self {
            certs,
            roots: RwLock::new(Arc::new(roots)),
            trust_domains: Arc::from(trust_domains),
        }
    }

    /// Replaces the trust bundle (root rotation).
    pub fn set_roots(&self, roots: TrustBundle) {
        *self
            .roots
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(roots);
    }

    /// Adds roots (from CA responses) to the configured ones; a no-op when all are known.
    pub fn add_roots(&self, extra: &TrustBundle) {
        let mut cur = self
            .roots
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let known = |r: &rustls::pki_types::CertificateDer<'_>| cur.roots().iter().any(|c| c == r);
        if extra.roots().iter().all(known) {
            return;
        }
        *cur = Arc::new(cur.merged(extra));
    }

    fn roots(&self) -> Arc<TrustBundle> {
        self.roots
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Client settings presenting `src`'s certificate and requiring the server to prove `dst`.
    pub fn client(&self, src: &SpiffeId, dst: &SpiffeId) -> Result<rustls::ClientConfig, Error> {
        let cert = (self.certs)(src).ok_or_else(|| Error::NoCertificate { id: src.clone() })?;
        Ok(client_config(
            &cert,
            self.roots(),
            self.trust_domains.clone(),
            dst.clone(),
        )?)
    }

    /// Server settings presenting `id`'s certificate and requiring a client SVID.
    pub fn server(&self, id: &SpiffeId) -> Result<rustls::ServerConfig, Error> {
        let cert = (self.certs)(id).ok_or_else(|| Error::NoCertificate { id: id.clone() })?;
        Ok(server_config(
            &cert,
            self.roots(),
            self.trust_domains.clone(),
        )?)
    }
}
