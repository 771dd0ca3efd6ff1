//! Where the proxy gets certificates and trust: the pods' SVIDs and the trust bundle.
use std::sync::{Arc, RwLock};

use crate::identity::{
    client_config, server_config, SpiffeId, TlsError, TrustBundle, TrustDomain, WorkloadCertificate,
};

/// Looks up the current certificate of a local identity.
pub type CertLookup = dyn Fn(&SpiffeId) -> Option<Arc<WorkloadCertificate>> + Send + Sync;

/// Certificates and trust for the tunnel paths.
///
/// The trust bundle is the union of two sources, each replaced as a whole when it changes: the
/// roots of the CA root file (`ca.rootCert`, followed by [`crate::identity::trust`]) and the
/// roots the CA sent with its latest certificate. Dropping a root from both (the last step of a
/// root rotation) stops trusting it; connections already open are not affected, new handshakes
/// are verified against the bundle current when they start.
pub struct TlsSource {
    certs: Arc<CertLookup>,
    trust: RwLock<Trust>,
    trust_domains: Arc<[TrustDomain]>,
}

/// Both sources of trust and their union.
struct Trust {
    file: TrustBundle,
    ca: Option<TrustBundle>,
    merged: Arc<TrustBundle>,
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
    /// A source backed by `certs`, trusting the root file's `roots` for `trust_domains`.
    pub fn new(
        certs: Arc<CertLookup>,
        roots: TrustBundle,
        trust_domains: Vec<TrustDomain>,
    ) -> Self {
        Self {
            certs,
            trust: RwLock::new(Trust {
                merged: Arc::new(roots.clone()),
                file: roots,
                ca: None,
            }),
            trust_domains: Arc::from(trust_domains),
        }
    }

    /// Replaces the roots of the CA root file (it changed); returns whether the bundle changed.
    pub fn set_file_roots(&self, roots: TrustBundle) -> bool {
        self.update(|t| t.file = roots)
    }

    /// Replaces the roots the CA sent last (`None`: no certificate yet); returns whether the
    /// bundle changed.
    pub fn set_ca_roots(&self, roots: Option<TrustBundle>) -> bool {
        self.update(|t| t.ca = roots)
    }

    /// The trust bundle new handshakes verify peers against.
    pub fn roots(&self) -> Arc<TrustBundle> {
        self.trust
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .merged
            .clone()
    }

    fn update(&self, edit: impl FnOnce(&mut Trust)) -> bool {
        // A poisoned lock only means a holder panicked; every field is replaced whole.
        let mut trust = self
            .trust
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        edit(&mut trust);
        let merged = match &trust.ca {
            Some(ca) => trust.file.merged(ca),
            None => trust.file.clone(),
        };
        let changed = merged.roots() != trust.merged.roots();
        if changed {
            trust.merged = Arc::new(merged);
        }
        changed
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
