//! Inventory from istiod: the delta xDS stream of Istio's workload API (Address, Authorization).
pub mod node;
pub mod state;
pub mod status;
pub mod stream;

#[cfg(any(test, feature = "fake-istiod"))]
pub mod fake_istiod;
#[cfg(any(test, feature = "fake-istiod"))]
pub mod memory_sink;
