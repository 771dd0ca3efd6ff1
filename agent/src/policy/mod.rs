//! Policy: Istio PeerAuthentication resolution (and, later, L4 AuthorizationPolicy and DestinationRule).
pub mod authz;
pub mod destination_rule;
pub mod peer_auth;
