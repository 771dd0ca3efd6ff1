//! ambit's end-to-end test library: the testbed (re-exported from `ambit-testbed`) plus the
//! peers that need the agent's own code: rogue HBONE servers, certificates from the testbed's
//! CA, raw HTTP/2 and TLS floods.
//!
//! The privileged tests in `tests/tests/e2e/*.rs` build a [`Testbed`] each (unique names,
//! removed on drop even when the test panics).
pub mod abuse;
pub mod hbone;
pub mod netns;

pub use ambit_testbed::*;

/// `e` and its sources, `: `-separated (the agent's own [`ambit::error::error_chain`]).
pub use ambit::error::error_chain;

#[cfg(test)]
mod tests {
    use ambit_testbed::policy::{foreign_pod, PeerAuthentication};

    /// The objects the testbed renders are what the agent's inventory parser reads.
    #[test]
    fn testbed_objects_parse_as_the_agent_parses_them() {
        let pa = PeerAuthentication::new("default", "server")
            .selector("server")
            .mode("UNSET")
            .port(9000, "STRICT")
            .created("2024-01-01T00:00:00Z")
            .yaml();
        let pod = foreign_pod("x", "node3", "payments", &["10.2.0.9".parse().unwrap()]);
        let text = format!("{pa}---\n{pod}");
        let snap = ambit::inventory::file::parse(std::path::Path::new("t.yaml"), &text).unwrap();
        assert_eq!(snap.peer_authentications.len(), 1);
        assert_eq!(snap.workloads.len(), 1);
    }
}
