//! ambit: a sidecar-less mTLS data plane; the library behind the `ambit` binary.
pub mod addr;
pub mod admin;
pub mod app;
pub mod ca;
pub mod cgroups;
pub mod cli;
pub mod cni;
pub mod config;
pub mod error;
pub mod identity;
pub mod inventory;
pub mod policy;
pub mod proxy;
pub mod redirect;
pub mod signals;
pub mod sys;
pub mod tunnel;
