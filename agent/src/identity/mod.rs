//! Workload identity: SPIFFE IDs and X.509-SVIDs (issue and verify).
mod spiffe;

pub use spiffe::{SpiffeId, SpiffeIdError, TrustDomain};
