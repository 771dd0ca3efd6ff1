//! Admin API: HTTP/1.1 + JSON on a local unix socket (mode 0600), and its CLI clients.
pub mod client;
pub mod handler;
pub mod logging;
pub mod metrics;
pub mod render;
pub mod server;
