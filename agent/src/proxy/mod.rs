//! The data plane: outbound, inbound-plaintext and inbound-tunnel paths.
