//! Workload identity: SPIFFE IDs and X.509-SVIDs (issue and verify).
//!
//! - [`SpiffeId`]: the identity of a workload, parsed at the edge.
//! - [`new_csr`] (agent) and [`Csr`] + [`CertificateAuthority`] (CA): issuance.
//! - [`verify_svid`] and [`TrustBundle`]: peer verification by the X.509-SVID rules.
//! - [`WorkloadCertificate`], [`server_config`], [`client_config`]: the rustls side.
mod authority;
mod bundle;
mod certificate;
mod csr;
pub mod manager;
mod spiffe;
mod tls;
mod verify;

#[cfg(test)]
pub(crate) mod testing;

pub use authority::{CaError, CertificateAuthority};
pub use bundle::{BundleError, TrustBundle};
pub use certificate::{WorkloadCertError, WorkloadCertificate};
pub use csr::{new_csr, Csr, CsrError, NewCsr, MAX_CSR_BYTES};
pub use spiffe::{SpiffeId, SpiffeIdError, TrustDomain};
pub use tls::{
    chain_not_after, client_config, peer_identity, server_config, server_name, ClientSvidVerifier,
    ServerSvidVerifier, TlsError, ALPN_H2,
};
pub use verify::{verify_svid, CertName, PeerRole, SvidError, Timestamp};
