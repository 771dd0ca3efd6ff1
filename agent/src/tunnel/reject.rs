//! Refusals of the tunnel server by reason: what each error counts as in `ambit_tunnel_rejections_total`.
//!
//! Every refusal on the tunnel port is counted exactly once, in the server's
//! [`crate::metrics::Rejections`] handle, at the place that decides it:
//! connection-level refusals (caps, TLS, HTTP/2) by the listener with [`Error::reason`],
//! stream-level ones (method, authority, expired certificates, the handler's answers) by
//! [`super::server`], streams past the stream cap (refused by h2 itself) by
//! [`super::refusals`] watching the server's output.
use super::Error;
use crate::reason::Reason;

impl Error {
    /// Why a connection that failed with this error was refused or failed.
    pub fn reason(&self) -> Reason {
        match self {
            Error::Tls { .. } => Reason::TlsHandshake,
            Error::HandshakeTimeout { .. } => Reason::HandshakeTimeout,
            Error::Alpn { .. } => Reason::Alpn,
            Error::PeerIdentity { .. } => Reason::PeerIdentity,
            Error::H2 { .. } => Reason::Http2,
            Error::Status { reason, .. } => *reason,
            Error::Authority { .. } => Reason::BadAuthority,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
                Reason::TlsHandshake,
            ),
            (
                Error::HandshakeTimeout { peer: peer() },
                Reason::HandshakeTimeout,
            ),
            (Error::Alpn { peer: peer() }, Reason::Alpn),
            (
                Error::H2 {
                    peer: peer(),
                    source: h2::Error::from(h2::Reason::PROTOCOL_ERROR),
                },
                Reason::Http2,
            ),
            (
                Error::Status {
                    peer: peer(),
                    authority: "10.0.0.2:80".into(),
                    status: http::StatusCode::UNAUTHORIZED,
                    reason: Reason::PolicyDenied,
                },
                Reason::PolicyDenied,
            ),
            (
                Error::Authority {
                    authority: "x".into(),
                },
                Reason::BadAuthority,
            ),
        ];
        for (e, want) in cases {
            assert_eq!(e.reason(), want, "{e}");
        }
    }

    #[test]
    fn counting_adds_one_to_its_reason_only() {
        let r = crate::metrics::Rejections::default();
        r.count(Reason::Refused);
        r.count_n(Reason::StreamLimit, 3);
        assert_eq!(r.value(Reason::Refused), 1);
        assert_eq!(r.value(Reason::StreamLimit), 3);
        assert_eq!(r.value(Reason::Alpn), 0);
        // A clone is the same handle.
        r.clone().count(Reason::Refused);
        assert_eq!(r.value(Reason::Refused), 2);
    }
}
