//! Test-only CA: good SVIDs, and leaves that break exactly one rule, all generated per test.
use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, KeyPair};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};

use crate::identity::authority::leaf_params;
use crate::identity::{
    new_csr, CertificateAuthority, Csr, SpiffeId, TrustBundle, TrustDomain, WorkloadCertificate,
};

/// Lifetime of test CAs and leaves unless a test says otherwise.
pub(crate) const DAY: Duration = Duration::from_secs(24 * 3600);

/// A generated root (and optionally an intermediate signing under it).
pub(crate) struct TestCa {
    pub(crate) ca: CertificateAuthority,
}

/// A leaf chain with its private key.
pub(crate) struct TestLeaf {
    pub(crate) chain: Vec<CertificateDer<'static>>,
    pub(crate) key: PrivateKeyDer<'static>,
}

impl TestCa {
    /// A root CA for `trust_domain`, valid from now for a day.
    pub(crate) fn new(trust_domain: &str) -> Self {
        let ca = CertificateAuthority::generate_root(td(trust_domain), DAY, SystemTime::now())
            .expect("generate test root");
        Self { ca }
    }

    /// An intermediate under this CA's root.
    pub(crate) fn intermediate(&self) -> Self {
        let ca = self
            .ca
            .generate_intermediate(DAY, SystemTime::now())
            .expect("intermediate");
        Self { ca }
    }

    /// The roots to trust.
    pub(crate) fn bundle(&self) -> TrustBundle {
        self.ca.roots().clone()
    }

    /// A good SVID for `id`, issued through the CSR path.
    pub(crate) fn svid(&self, id: &str) -> WorkloadCertificate {
        self.svid_valid_for(id, DAY)
    }

    /// A good SVID for `id` that expires `ttl` from now (for expiry tests).
    pub(crate) fn svid_valid_for(&self, id: &str, ttl: Duration) -> WorkloadCertificate {
        let id = spiffe(id);
        let request = new_csr(&id).expect("csr");
        let csr = Csr::from_der(&request.csr).expect("parse csr");
        let chain = self
            .ca
            .sign(&csr, &id, ttl, SystemTime::now())
            .expect("sign");
        WorkloadCertificate::new(chain, request.key).expect("workload certificate")
    }

    /// A leaf for `id` with the SVID profile changed by `edit`, signed by this CA.
    pub(crate) fn leaf(&self, id: &str, edit: impl FnOnce(&mut CertificateParams)) -> TestLeaf {
        let mut params = leaf_params(&spiffe(id), DAY, SystemTime::now()).expect("params");
        edit(&mut params);
        let key = KeyPair::generate().expect("leaf key");
        let leaf = params.signed_by(&key, self.ca.issuer()).expect("sign leaf");
        let mut chain = vec![leaf.der().clone()];
        chain.extend(self.ca.chain().iter().cloned());
        TestLeaf {
            chain,
            key: key.into(),
        }
    }
}

/// Parses a trust domain or panics.
pub(crate) fn td(s: &str) -> TrustDomain {
    s.parse().expect("test trust domain")
}

/// Parses a SPIFFE ID or panics.
pub(crate) fn spiffe(s: &str) -> SpiffeId {
    s.parse().expect("test spiffe id")
}

/// The current time, as rustls and webpki take it.
pub(crate) fn unix_now() -> UnixTime {
    UnixTime::now()
}
