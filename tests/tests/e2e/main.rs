//! ambit's privileged end-to-end suite: one test binary (one link, one file on disk) with a
//! module per concern, each run on its own network-namespace testbed. `cargo xtask test` runs it
//! with `--include-ignored --test-threads=1`; a test's full name is `MODULE::TEST`.
mod abuse;
mod admin;
mod admin_cli;
mod admin_metrics;
mod authorization;
mod ca_faults;
mod churn;
mod cni_traffic;
mod concurrency;
mod destination_rule;
mod failclosed;
mod flow_control;
mod hardening_failclosed;
mod hbone;
mod identity;
mod inbound;
mod kubelet_cgroups;
mod load;
mod loops;
mod outbound;
mod passthrough;
mod peer_auth;
mod privilege;
mod restart;
mod rogue;
mod services;
mod teardown;
mod transfer;
mod tunnel_input;
mod unenrolled;
