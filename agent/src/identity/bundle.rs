//! The trust bundle: the root certificates peers' SVIDs must chain to (several during rotation).
use std::fmt;

use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, TrustAnchor};

/// A set of trusted root certificates for our trust domain (and its aliases).
///
/// Holding several roots lets a root rotate: peers whose certificates chain to either the old
/// or the new root are accepted while both are in the bundle.
#[derive(Clone)]
pub struct TrustBundle {
    roots: Vec<CertificateDer<'static>>,
    // Parallel to `roots`: the parts of each root webpki needs, extracted once.
    anchors: Vec<TrustAnchor<'static>>,
}

/// Why a trust bundle could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// The PEM text could not be read.
    #[error("trust bundle: invalid pem")]
    Pem {
        #[source]
        source: pem::Error,
    },
    /// No certificate at all.
    #[error("trust bundle holds no certificate")]
    Empty,
    /// A certificate webpki cannot use as a trust anchor.
    #[error("trust bundle: root certificate #{index} is not a usable trust anchor")]
    Anchor {
        index: usize,
        #[source]
        source: webpki::Error,
    },
}

impl TrustBundle {
    /// Builds a bundle from DER root certificates (at least one).
    pub fn new(roots: Vec<CertificateDer<'static>>) -> Result<Self, BundleError> {
        if roots.is_empty() {
            return Err(BundleError::Empty);
        }
        let anchors = roots
            .iter()
            .enumerate()
            .map(|(index, root)| {
                webpki::anchor_from_trusted_cert(root)
                    .map(|anchor| anchor.to_owned())
                    .map_err(|source| BundleError::Anchor { index, source })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { roots, anchors })
    }

    /// Parses a bundle from concatenated PEM `CERTIFICATE` blocks (other blocks are skipped).
    pub fn from_pem(pem: &str) -> Result<Self, BundleError> {
        let roots = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| BundleError::Pem { source })?;
        Self::new(roots)
    }

    /// Returns a bundle holding the roots of `self` and then those of `other` not already in it.
    pub fn merged(&self, other: &TrustBundle) -> TrustBundle {
        let mut merged = self.clone();
        for (root, anchor) in other.roots.iter().zip(&other.anchors) {
            if !merged.roots.contains(root) {
                merged.roots.push(root.clone());
                merged.anchors.push(anchor.clone());
            }
        }
        merged
    }

    /// The root certificates, in the order given.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// The roots as PEM, e.g. for the `root-cert.pem` an agent loads.
    pub fn to_pem(&self) -> String {
        self.roots
            .iter()
            .map(|root| pem_block("CERTIFICATE", root))
            .collect()
    }

    /// The roots as webpki trust anchors.
    pub(crate) fn anchors(&self) -> &[TrustAnchor<'static>] {
        &self.anchors
    }
}

impl fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustBundle")
            .field("roots", &self.roots.len())
            .finish()
    }
}

/// Encodes `der` as one PEM block with the given label (LF line endings).
pub fn pem_block(label: &str, der: &[u8]) -> String {
    let config = ::pem::EncodeConfig::new().set_line_ending(::pem::LineEnding::LF);
    ::pem::encode_config(&::pem::Pem::new(label, der), config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_empty_bundle() {
        assert!(matches!(TrustBundle::from_pem(""), Err(BundleError::Empty)));
        assert!(matches!(
            TrustBundle::new(Vec::new()),
            Err(BundleError::Empty)
        ));
    }

    #[test]
    fn rejects_garbage_root() {
        let err = TrustBundle::new(vec![CertificateDer::from(vec![0x30, 0x03, 1, 2, 3])]);
        assert!(matches!(err, Err(BundleError::Anchor { index: 0, .. })));
    }
}
