//! Policy: Istio PeerAuthentication resolution (and, later, L4 AuthorizationPolicy and DestinationRule).
pub mod authz;
pub mod peer_auth;
