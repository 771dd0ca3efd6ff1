//! Inventory from istiod: the workload discovery (xDS) resources and their mapping onto ambit's inventory model.
pub mod authorization;
pub mod model;
pub mod workloads;
