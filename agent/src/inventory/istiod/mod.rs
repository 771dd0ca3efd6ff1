//! Inventory from istiod: the delta xDS stream of Istio's workload API (Address, Authorization) and its mapping onto ambit's inventory model.
pub mod authorization;
pub mod built;
pub mod model;
pub mod node;
pub mod source;
pub mod state;
pub mod status;
pub mod stream;
pub mod workloads;

#[cfg(any(test, feature = "fake-istiod"))]
pub mod fake_istiod;
#[cfg(any(test, feature = "fake-istiod"))]
pub mod memory_sink;
