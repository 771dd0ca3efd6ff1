//! Admin API: HTTP/1.1 + JSON on a local unix socket, and its CLI clients.
pub mod client;
