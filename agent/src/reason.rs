//! Why a connection was refused or failed: one typed reason for every path, with its label, response flags and HBONE status.
//!
//! Every refusal and failure on the data path (outbound, the tunnel listener and its CONNECT
//! streams, inbound plaintext, the connection caps) is one [`Reason`]. What the operator sees
//! follows from it alone: the `reason` of the access log and of
//! `ambit_tunnel_rejections_total` ([`Reason::label`]), Istio's `response_flags`
//! ([`Reason::response_flags`]), the `ambit_policy_denials_total` label when it is a policy
//! decision ([`Reason::denial`]), and the status a CONNECT is answered with
//! ([`Reason::status`]). A peer's answer comes back through `ambit-refusal-reason`
//! ([`Reason::from_label`]), so the client does not have to guess from the status.
use http::StatusCode;

/// Why a connection was refused or failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum Reason {
    // Outbound (15001).
    /// Neither `SO_ORIGINAL_DST` nor the kernel's tuple map knows where the app was going.
    #[error("original destination unknown")]
    NoOrigDst,
    /// The destination is this agent's own port in the pod.
    #[error("the destination is the agent itself")]
    Loop,
    /// The routing rules refuse it (no such Service port, no endpoint, mTLS required, ...).
    #[error("refused by the routing rules")]
    Route,
    /// Several pods claim the destination address and no rule decides which one holds it.
    #[error("the destination address is claimed by several pods")]
    AmbiguousAddress,
    /// The destination uses a waypoint that cannot be reached (never gone around).
    #[error("the destination's waypoint cannot be reached")]
    WaypointUnavailable,
    /// The destination's identity cannot be parsed.
    #[error("the destination identity is not a SPIFFE ID")]
    BadDestinationIdentity,
    /// The plaintext connection to the destination failed.
    #[error("the destination refused or was unreachable")]
    Upstream,
    /// The plaintext connection to the destination timed out.
    #[error("the destination did not answer in time")]
    UpstreamTimeout,
    /// The HBONE dial or CONNECT failed.
    #[error("the tunnel to the destination failed")]
    Tunnel,

    // Tunnel listener (15008), per TCP connection.
    /// The local pod has no valid identity to serve with.
    #[error("the pod has no valid identity")]
    NoLocalIdentity,
    /// The agent runs without a CA: no identities.
    #[error("the agent runs without identities")]
    NoCa,
    /// The local pod's certificate cannot be used.
    #[error("the pod has no usable certificate")]
    NoCertificate,
    /// One source holds its cap of tunnel connections.
    #[error("the source holds its cap of tunnel connections")]
    SourceLimit,
    /// One source holds its cap of TLS handshakes in progress.
    #[error("the source holds its cap of handshakes")]
    SourceHandshakeLimit,
    /// The pod holds its cap of TLS handshakes in progress.
    #[error("the pod holds its cap of handshakes")]
    HandshakeLimit,
    /// The TLS handshake failed (bad or missing client certificate, not TLS at all, ...).
    #[error("the TLS handshake failed")]
    TlsHandshake,
    /// The TLS handshake did not finish in time.
    #[error("the TLS handshake timed out")]
    HandshakeTimeout,
    /// The client did not negotiate ALPN `h2`.
    #[error("the client did not negotiate h2")]
    Alpn,
    /// The client's certificate carried no usable SPIFFE identity.
    #[error("the client certificate has no usable identity")]
    PeerIdentity,
    /// The client broke the HTTP/2 protocol.
    #[error("HTTP/2 protocol error")]
    Http2,

    // Tunnel listener, per CONNECT stream.
    /// A request that is not CONNECT.
    #[error("not a CONNECT")]
    Method,
    /// A CONNECT whose `:authority` is not an `ip:port`.
    #[error("the CONNECT authority is not ip:port")]
    BadAuthority,
    /// A new stream on a connection whose certificate (the client's or ours) has expired.
    #[error("a certificate of the connection has expired")]
    CertificateExpired,
    /// A stream past the per-connection stream cap (refused by h2 itself).
    #[error("the connection holds its cap of streams")]
    StreamLimit,
    /// A CONNECT to an address that is not this pod's.
    #[error("the target is not this pod")]
    ForeignTarget,
    /// A connection to one of the agent's own ports in the pod.
    #[error("agent ports are not application targets")]
    AgentPort,
    /// A CONNECT to a pod behind a waypoint from an identity other than the waypoint's.
    #[error("the pod takes mesh traffic only from its waypoint")]
    NotFromWaypoint,

    // Policy, both inbound paths.
    /// An AuthorizationPolicy denies it.
    #[error("denied by AuthorizationPolicy")]
    PolicyDenied,
    /// Plaintext to a port whose PeerAuthentication is STRICT.
    #[error("plaintext under STRICT")]
    StrictPlaintext,

    // Delivery to the app, both inbound paths.
    /// The delivery socket could not be made.
    #[error("the delivery socket could not be made")]
    DeliverySocket,
    /// The delivery could not be registered in the kernel's bypass map.
    #[error("the delivery could not be registered in the bypass map")]
    BypassMap,
    /// The app refused the delivery (nothing listens).
    #[error("the app refused the connection")]
    AppUnreachable,
    /// The app did not accept the delivery in time.
    #[error("the app did not accept in time")]
    AppTimeout,

    // Answers of a peer that named no reason of ours.
    /// The peer's destination was unavailable (502, 503, 504).
    #[error("the peer's destination is unavailable")]
    DestinationUnavailable,
    /// Any other refusal status from a peer.
    #[error("refused by the peer")]
    Refused,

    // Caps.
    /// The pod holds its cap of open connections on this listener.
    #[error("the pod holds its cap of open connections")]
    PodConnectionLimit,
}

/// Every reason, for tests and for reading a peer's `ambit-refusal-reason`.
pub const ALL: [Reason; 36] = [
    Reason::NoOrigDst,
    Reason::Loop,
    Reason::Route,
    Reason::AmbiguousAddress,
    Reason::WaypointUnavailable,
    Reason::BadDestinationIdentity,
    Reason::Upstream,
    Reason::UpstreamTimeout,
    Reason::Tunnel,
    Reason::NoLocalIdentity,
    Reason::NoCa,
    Reason::NoCertificate,
    Reason::SourceLimit,
    Reason::SourceHandshakeLimit,
    Reason::HandshakeLimit,
    Reason::TlsHandshake,
    Reason::HandshakeTimeout,
    Reason::Alpn,
    Reason::PeerIdentity,
    Reason::Http2,
    Reason::Method,
    Reason::BadAuthority,
    Reason::CertificateExpired,
    Reason::StreamLimit,
    Reason::ForeignTarget,
    Reason::AgentPort,
    Reason::NotFromWaypoint,
    Reason::PolicyDenied,
    Reason::StrictPlaintext,
    Reason::DeliverySocket,
    Reason::BypassMap,
    Reason::AppUnreachable,
    Reason::AppTimeout,
    Reason::DestinationUnavailable,
    Reason::Refused,
    Reason::PodConnectionLimit,
];

impl Reason {
    /// The `reason` of the access log, of `ambit_tunnel_rejections_total` and of the
    /// `ambit-refusal-reason` header: one stable snake_case word per reason.
    pub fn label(self) -> &'static str {
        match self {
            Self::NoOrigDst => "no_orig_dst",
            Self::Loop => "loop",
            Self::Route => "route",
            Self::AmbiguousAddress => "ambiguous_address",
            Self::WaypointUnavailable => "waypoint_unavailable",
            Self::BadDestinationIdentity => "bad_destination_identity",
            Self::Upstream => "upstream",
            Self::UpstreamTimeout => "upstream_timeout",
            Self::Tunnel => "tunnel",
            Self::NoLocalIdentity => "no_identity",
            Self::NoCa => "no_ca",
            Self::NoCertificate => "no_certificate",
            Self::SourceLimit => "source_limit",
            Self::SourceHandshakeLimit => "source_handshake_limit",
            Self::HandshakeLimit => "handshake_limit",
            Self::TlsHandshake => "tls_handshake",
            Self::HandshakeTimeout => "handshake_timeout",
            Self::Alpn => "alpn",
            Self::PeerIdentity => "peer_identity",
            Self::Http2 => "http2",
            Self::Method => "method",
            Self::BadAuthority => "bad_authority",
            Self::CertificateExpired => "certificate_expired",
            Self::StreamLimit => "stream_limit",
            Self::ForeignTarget => "foreign_target",
            Self::AgentPort => "agent_port",
            Self::NotFromWaypoint => "not_from_waypoint",
            Self::PolicyDenied => "policy_denied",
            Self::StrictPlaintext => "policy_strict",
            Self::DeliverySocket => "local",
            Self::BypassMap => "bypass_map",
            Self::AppUnreachable => "app_unreachable",
            Self::AppTimeout => "app_timeout",
            Self::DestinationUnavailable => "destination_unavailable",
            Self::Refused => "refused",
            Self::PodConnectionLimit => "pod_connection_limit",
        }
    }

    /// The reason whose [`Reason::label`] is `label` (a peer's `ambit-refusal-reason`).
    pub fn from_label(label: &[u8]) -> Option<Self> {
        ALL.into_iter().find(|r| r.label().as_bytes() == label)
    }

    /// Istio's `response_flags`: `NR` (no route: nothing to carry it to), `UF` (upstream
    /// failure), `DENY` (policy), `UO` (overflow: a cap).
    pub fn response_flags(self) -> &'static str {
        match self {
            Self::NoOrigDst
            | Self::Loop
            | Self::Route
            | Self::AmbiguousAddress
            | Self::WaypointUnavailable
            | Self::BadDestinationIdentity
            | Self::ForeignTarget
            | Self::AgentPort
            | Self::Method
            | Self::BadAuthority => "NR",
            Self::PolicyDenied | Self::StrictPlaintext | Self::NotFromWaypoint => "DENY",
            Self::SourceLimit
            | Self::SourceHandshakeLimit
            | Self::HandshakeLimit
            | Self::StreamLimit
            | Self::PodConnectionLimit => "UO",
            Self::Upstream
            | Self::UpstreamTimeout
            | Self::Tunnel
            | Self::NoLocalIdentity
            | Self::NoCa
            | Self::NoCertificate
            | Self::TlsHandshake
            | Self::HandshakeTimeout
            | Self::Alpn
            | Self::PeerIdentity
            | Self::Http2
            | Self::CertificateExpired
            | Self::DeliverySocket
            | Self::BypassMap
            | Self::AppUnreachable
            | Self::AppTimeout
            | Self::DestinationUnavailable
            | Self::Refused => "UF",
        }
    }

    /// The `reason` of `ambit_policy_denials_total`, when this is a policy's decision.
    pub fn denial(self) -> Option<&'static str> {
        match self {
            Self::PolicyDenied => Some("authorization"),
            Self::StrictPlaintext => Some("strict_plaintext"),
            Self::Route => Some("route"),
            Self::AmbiguousAddress => Some("ambiguous_address"),
            Self::WaypointUnavailable => Some("waypoint_unavailable"),
            _ => None,
        }
    }

    /// The status a CONNECT refused for this reason is answered with.
    pub fn status(self) -> StatusCode {
        match self {
            Self::Method => StatusCode::METHOD_NOT_ALLOWED,
            Self::BadAuthority | Self::ForeignTarget | Self::AgentPort => StatusCode::BAD_REQUEST,
            Self::PolicyDenied | Self::StrictPlaintext | Self::NotFromWaypoint => {
                StatusCode::UNAUTHORIZED
            }
            _ => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// What a peer's refusal `status` without a reason of ours says.
    pub fn of_status(status: StatusCode) -> Self {
        match status {
            StatusCode::BAD_REQUEST => Self::ForeignTarget,
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Self::PolicyDenied,
            StatusCode::METHOD_NOT_ALLOWED => Self::Method,
            StatusCode::BAD_GATEWAY
            | StatusCode::SERVICE_UNAVAILABLE
            | StatusCode::GATEWAY_TIMEOUT => Self::DestinationUnavailable,
            _ => Self::Refused,
        }
    }
}

#[cfg(test)]
mod tests;
