//! A workload's own SVID: identity, certificate chain and private key, ready for rustls.
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::identity::tls::PROVIDER;
use crate::identity::verify::{self, CertName};
use crate::identity::{SpiffeId, SvidError};

/// An X.509-SVID with its private key: what a workload presents in the mTLS handshake.
///
/// Construction checks the leaf rules and that the key matches the leaf, but not the chain:
/// whoever accepts a certificate from the CA verifies it against the trust bundle first.
#[derive(Clone)]
pub struct WorkloadCertificate {
    id: SpiffeId,
    name: CertName,
    not_before: SystemTime,
    not_after: SystemTime,
    certified: Arc<CertifiedKey>,
}

/// Why a certificate chain and key do not make a usable workload certificate.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadCertError {
    /// The chain holds no certificate.
    #[error("workload certificate chain is empty")]
    EmptyChain,
    /// The PEM text of the chain or key could not be read.
    #[error("workload {what}: invalid pem")]
    Pem {
        what: &'static str,
        #[source]
        source: pem::Error,
    },
    /// The leaf breaks an X.509-SVID rule.
    #[error("workload certificate is not an svid")]
    Leaf {
        #[source]
        source: SvidError,
    },
    /// The key is unsupported or does not match the leaf.
    #[error("workload key for {id} is unusable")]
    Key {
        id: SpiffeId,
        #[source]
        source: rustls::Error,
    },
}

impl WorkloadCertificate {
    /// Builds a workload certificate from a chain (leaf first) and the leaf's private key.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, WorkloadCertError> {
        let leaf = chain.first().ok_or(WorkloadCertError::EmptyChain)?;
        let leaf_error = |source| WorkloadCertError::Leaf { source };
        let x509 = verify::parse_certificate(leaf).map_err(leaf_error)?;
        let name = CertName::of(&x509);
        let id = verify::leaf_identity(&x509, &name).map_err(leaf_error)?;
        let validity = x509.validity();
        let not_before = to_system_time(validity.not_before.timestamp());
        let not_after = to_system_time(validity.not_after.timestamp());
        let certified = CertifiedKey::from_der(chain, key, &PROVIDER).map_err(|source| {
            WorkloadCertError::Key {
                id: id.clone(),
                source,
            }
        })?;
        Ok(Self {
            id,
            name,
            not_before,
            not_after,
            certified: Arc::new(certified),
        })
    }

    /// Parses the chain (PEM `CERTIFICATE` blocks, leaf first) and key (PKCS#8, SEC1 or PKCS#1).
    pub fn from_pem(chain_pem: &str, key_pem: &str) -> Result<Self, WorkloadCertError> {
        let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| WorkloadCertError::Pem {
                what: "certificate chain",
                source,
            })?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|source| {
            WorkloadCertError::Pem {
                what: "key",
                source,
            }
        })?;
        Self::new(chain, key)
    }

    /// The identity the leaf certifies.
    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    /// The chain, leaf first.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.certified.cert
    }

    /// The leaf's serial number, lowercase hex.
    pub fn serial(&self) -> &str {
        self.name.serial()
    }

    /// Start of the leaf's validity.
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// End of the leaf's validity.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Whether the leaf is valid at `now`.
    pub fn is_valid_at(&self, now: SystemTime) -> bool {
        self.not_before <= now && now < self.not_after
    }

    /// The half-life point, when renewal is due (before jitter).
    pub fn refresh_at(&self) -> SystemTime {
        let lifetime = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or(Duration::ZERO);
        self.not_before + lifetime / 2
    }

    /// The chain and signing key in the form rustls resolvers hand out.
    pub(crate) fn certified_key(&self) -> Arc<CertifiedKey> {
        self.certified.clone()
    }
}

impl fmt::Debug for WorkloadCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadCertificate")
            .field("id", &self.id.to_string())
            .field("serial", &self.name.serial())
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// Converts an ASN.1 timestamp (seconds since the epoch) to `SystemTime`, clamping times
/// before 1970 to the epoch (X.509 times end in year 9999, so adding cannot overflow).
fn to_system_time(secs: i64) -> SystemTime {
    let secs = u64::try_from(secs).unwrap_or(0);
    SystemTime::UNIX_EPOCH
        .checked_add(Duration::from_secs(secs))
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::testing::{TestCa, DAY};
    use crate::identity::{bundle, new_csr};

    const ID: &str = "spiffe://cluster.local/ns/shop/sa/client";

    #[test]
    fn exposes_identity_validity_and_half_life() {
        let cert = TestCa::new("cluster.local").svid(ID);
        assert_eq!(cert.id().to_string(), ID);
        assert_eq!(cert.serial().len(), 32);
        assert!(cert.is_valid_at(SystemTime::now()));
        assert!(!cert.is_valid_at(SystemTime::now() + 2 * DAY));
        let half =
            cert.not_before() + (cert.not_after().duration_since(cert.not_before()).unwrap() / 2);
        assert_eq!(cert.refresh_at(), half);
    }

    #[test]
    fn round_trips_through_pem() {
        let ca = TestCa::new("cluster.local");
        let leaf = ca.leaf(ID, |_| {});
        let chain_pem: String = leaf
            .chain
            .iter()
            .map(|c| bundle::pem_block("CERTIFICATE", c))
            .collect();
        let key_pem = bundle::pem_block("PRIVATE KEY", leaf.key.secret_der());
        let cert = WorkloadCertificate::from_pem(&chain_pem, &key_pem).unwrap();
        assert_eq!(cert.id().to_string(), ID);
        assert_eq!(cert.chain(), leaf.chain.as_slice());
    }

    #[test]
    fn refuses_a_key_that_does_not_match_the_leaf() {
        let ca = TestCa::new("cluster.local");
        let leaf = ca.leaf(ID, |_| {});
        let other = new_csr(&ID.parse().unwrap()).unwrap().key;
        let err = WorkloadCertificate::new(leaf.chain, other).unwrap_err();
        assert!(matches!(err, WorkloadCertError::Key { .. }), "{err:?}");
    }

    #[test]
    fn refuses_empty_chain_and_non_svid_leaf() {
        let ca = TestCa::new("cluster.local");
        let key = new_csr(&ID.parse().unwrap()).unwrap().key;
        assert!(matches!(
            WorkloadCertificate::new(Vec::new(), key),
            Err(WorkloadCertError::EmptyChain)
        ));
        let leaf = ca.leaf(ID, |p| p.subject_alt_names.clear());
        let err = WorkloadCertificate::new(leaf.chain, leaf.key).unwrap_err();
        assert!(matches!(
            err,
            WorkloadCertError::Leaf {
                source: SvidError::NoUriSan { .. }
            }
        ));
    }
}
