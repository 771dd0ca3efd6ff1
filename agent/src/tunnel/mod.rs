//! HBONE: HTTP/2 CONNECT over mutual TLS 1.3 on port 15008, wire-compatible with Istio ztunnel.
pub mod client;
mod expiry;
pub mod flow;
pub mod headers;
pub mod pool;
mod refusals;
pub mod reject;
pub mod server;
pub mod stream;

use std::time::Duration;

/// ALPN protocol of HBONE.
pub const ALPN_H2: &[u8] = b"h2";
/// TLS handshake deadline, both sides.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of the HBONE client and server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// TCP or TLS failed.
    #[error("tls handshake with {peer} failed")]
    Tls {
        peer: String,
        #[source]
        source: std::io::Error,
    },
    /// The TLS handshake did not finish in time.
    #[error("tls handshake with {peer} timed out")]
    HandshakeTimeout { peer: String },
    /// The peer did not negotiate `h2`.
    #[error("peer {peer} did not negotiate ALPN h2")]
    Alpn { peer: String },
    /// HTTP/2 failed.
    #[error("http/2 with {peer} failed")]
    H2 {
        peer: String,
        #[source]
        source: h2::Error,
    },
    /// The peer answered the CONNECT with a non-200 status.
    #[error("CONNECT {authority} via {peer} answered {status} ({})", reason.label())]
    Status {
        peer: String,
        authority: String,
        status: http::StatusCode,
        /// The peer's `ambit-refusal-reason`, else what the status says.
        reason: crate::reason::Reason,
    },
    /// The client's certificate carries no usable identity.
    #[error("peer {peer} presented no usable SPIFFE identity")]
    PeerIdentity {
        peer: String,
        #[source]
        source: crate::identity::SvidError,
    },
    /// The request could not be built.
    #[error("bad CONNECT authority {authority}")]
    Authority { authority: String },
}

#[cfg(test)]
mod alert_tests;
#[cfg(test)]
mod expiry_tests;
#[cfg(test)]
mod flow_tests;
#[cfg(test)]
pub(crate) mod stream_tests;
#[cfg(test)]
mod tests;
