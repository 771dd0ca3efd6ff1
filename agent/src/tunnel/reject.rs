//! Refusals of the tunnel server by reason: the `ambit_tunnel_rejections_total` counter family.
//!
//! Every refusal on the tunnel port is counted exactly once, at the place that decides it:
//! connection-level refusals (caps, TLS, HTTP/2) by the listener with [`Error::reason`],
//! stream-level ones (method, authority, expired certificates, the handler's answers) by
//! [`super::server`], streams past the stream cap (refused by h2 itself) by
//! [`super::refusals`] watching the server's output.
use std::sync::LazyLock;

use http::StatusCode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use super::Error;
use crate::metrics::ReasonLabel;

/// The counter family, registered by the admin metrics registry.
pub static REJECTIONS: LazyLock<Family<ReasonLabel, Counter>> = LazyLock::new(Family::default);

/// The TLS handshake failed (bad or missing client certificate, not TLS at all, ...).
pub const TLS_HANDSHAKE: &str = "tls_handshake";
/// The TLS handshake did not finish in time.
pub const HANDSHAKE_TIMEOUT: &str = "handshake_timeout";
/// The client did not negotiate ALPN `h2`.
pub const ALPN: &str = "alpn";
/// The client's certificate carried no usable SPIFFE identity.
pub const PEER_IDENTITY: &str = "peer_identity";
/// The client broke the HTTP/2 protocol.
pub const HTTP2: &str = "http2";
/// A request that is not CONNECT (answered 405).
pub const METHOD: &str = "method";
/// A CONNECT whose `:authority` is not an `ip:port` (answered 400).
pub const BAD_AUTHORITY: &str = "bad_authority";
/// A new stream on a connection whose certificate (the client's or ours) has expired (503).
pub const CERTIFICATE_EXPIRED: &str = "certificate_expired";
/// A CONNECT to an address that is not the destination's, or to an agent port (400).
pub const BAD_TARGET: &str = "bad_target";
/// A CONNECT denied by authorization policy (401, 403).
pub const POLICY_DENIED: &str = "policy_denied";
/// A CONNECT to a pod behind a waypoint from an identity other than the waypoint's (401).
pub const NOT_FROM_WAYPOINT: &str = "not_from_waypoint";
/// A CONNECT whose destination app could not be reached (502, 503, 504).
pub const DESTINATION_UNAVAILABLE: &str = "destination_unavailable";
/// Any other refusal status.
pub const REFUSED: &str = "refused";
/// A stream past the per-connection stream cap (`RST_STREAM(REFUSED_STREAM)` from h2).
pub const STREAM_LIMIT: &str = "stream_limit";

/// Counts one refusal for `reason`.
pub fn count(reason: &'static str) {
    count_n(reason, 1);
}

/// Counts `n` refusals for `reason`.
pub fn count_n(reason: &'static str, n: u64) {
    REJECTIONS.get_or_create(&ReasonLabel { reason }).inc_by(n);
}

/// The current count for `reason`.
pub fn value(reason: &'static str) -> u64 {
    REJECTIONS.get_or_create(&ReasonLabel { reason }).get()
}

/// The reason a stream refused with `status` by the destination's handler is counted under.
pub fn reason_of_status(status: StatusCode) -> &'static str {
    match status {
        StatusCode::BAD_REQUEST => BAD_TARGET,
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => POLICY_DENIED,
        StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT => {
            DESTINATION_UNAVAILABLE
        }
        _ => REFUSED,
    }
}

impl Error {
    /// The rejection reason of a connection that failed with this error.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Tls { .. } => TLS_HANDSHAKE,
            Error::HandshakeTimeout { .. } => HANDSHAKE_TIMEOUT,
            Error::Alpn { .. } => ALPN,
            Error::PeerIdentity { .. } => PEER_IDENTITY,
            Error::H2 { .. } => HTTP2,
            Error::Status { status, .. } => reason_of_status(*status),
            Error::Authority { .. } => BAD_AUTHORITY,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_reasons() {
        assert_eq!(reason_of_status(StatusCode::BAD_REQUEST), BAD_TARGET);
        assert_eq!(reason_of_status(StatusCode::UNAUTHORIZED), POLICY_DENIED);
        assert_eq!(reason_of_status(StatusCode::FORBIDDEN), POLICY_DENIED);
        assert_eq!(
            reason_of_status(StatusCode::SERVICE_UNAVAILABLE),
            DESTINATION_UNAVAILABLE
        );
        assert_eq!(reason_of_status(StatusCode::IM_A_TEAPOT), REFUSED);
    }

    #[test]
    fn errors_map_to_reasons() {
        let peer = || "10.0.0.1:15008".to_string();
        let io = || std::io::Error::other("boom");
        let cases = [
            (
                Error::Tls {
                    peer: peer(),
                    source: io(),
                },
                TLS_HANDSHAKE,
            ),
            (Error::HandshakeTimeout { peer: peer() }, HANDSHAKE_TIMEOUT),
            (Error::Alpn { peer: peer() }, ALPN),
            (
                Error::H2 {
                    peer: peer(),
                    source: h2::Error::from(h2::Reason::PROTOCOL_ERROR),
                },
                HTTP2,
            ),
            (
                Error::Status {
                    peer: peer(),
                    authority: "10.0.0.2:80".into(),
                    status: StatusCode::UNAUTHORIZED,
                },
                POLICY_DENIED,
            ),
            (
                Error::Authority {
                    authority: "x".into(),
                },
                BAD_AUTHORITY,
            ),
        ];
        for (e, want) in cases {
            assert_eq!(e.reason(), want, "{e}");
        }
    }

    #[test]
    fn counting_adds_one_to_its_reason_only() {
        // A reason no other test counts under, so parallel tests cannot interfere.
        let before = value(REFUSED);
        let other = value(ALPN);
        count(REFUSED);
        assert_eq!(value(REFUSED), before + 1);
        assert_eq!(value(ALPN), other);
    }
}
