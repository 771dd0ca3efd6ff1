//! Workload identity: SPIFFE IDs and X.509-SVIDs (issue and verify).
//!
//! - [`SpiffeId`]: the identity of a workload, parsed at the edge.
//! - [`new_csr`] (agent) and [`Csr`] + [`CertificateAuthority`] (CA): issuance.
//! - [`verify_svid`] and [`TrustBundle`]: peer verification by the X.509-SVID rules.
//! - [`WorkloadCertificate`], [`server_config`], [`client_config`]: the rustls side;
//!   [`source::TlsSource`]: the certificates and trust the data path's tunnels use, with
//!   [`trust`] following the CA root file and the CA's roots into it (root rotation).
//! - [`channel`]: the TLS gRPC channel to istiod (root file, bearer token) both clients use.
//! - [`ca_client`] (the agent's client of Istio's CA API, [`ca_api`]) and [`manager`]
//!   (certificate cache and rotation): where the agent's certificates come from.
mod authority;
mod bundle;
pub mod ca_api;
pub mod ca_client;
mod certificate;
pub mod channel;
mod csr;
pub mod manager;
pub mod source;
mod spiffe;
mod tls;
pub mod trust;
mod verify;

#[cfg(test)]
pub(crate) mod testing;

pub use authority::{CaError, CertificateAuthority};
pub use bundle::{pem_block, BundleError, TrustBundle};
pub use ca_client::{CaClient, CaClientConfig, ClientError};
pub use certificate::{WorkloadCertError, WorkloadCertificate};
pub use csr::{new_csr, Csr, CsrError, NewCsr, MAX_CSR_BYTES};
pub use spiffe::{SpiffeId, SpiffeIdError, TrustDomain};
pub use tls::{
    chain_not_after, client_config, peer_identity, server_config, server_name, ClientSvidVerifier,
    ServerSvidVerifier, TlsError, ALPN_H2,
};
pub use verify::{verify_svid, CertName, PeerRole, SvidError, Timestamp};
