//! A rogue pod that holds a valid certificate for a different identity cannot pose as the
//! workload the inventory puts at its address: the client's agent requires the destination's
//! identity in the TLS handshake and refuses anything else, before a byte is sent.
#![allow(
    clippy::unwrap_used,
    reason = "test bodies panic with a line number (STYLE.md §7)"
)]
use std::net::{IpAddr, SocketAddr};

use ambit_e2e::hbone::{FakeHbone, Issue as _};
use ambit_e2e::policy::foreign_pod;
use ambit_e2e::state::identity;
use ambit_e2e::{testbed_with, Options, PodSpec, Testbed, ECHO_PORT};

/// The inventory says `ips` belong to enrolled pod `impostor` with `service_account`, on a
/// node that runs no agent (so nobody enrolls or serves it).
fn claim(tb: &mut Testbed, ips: &[IpAddr], service_account: &str) {
    tb.apply(&foreign_pod("impostor", "node3", service_account, ips))
        .unwrap();
}

/// The identity node1's agent will require from `dst`.
fn required_identity(tb: &Testbed, dst: SocketAddr) -> String {
    let why = tb.explain("node1", "default/client", dst).unwrap();
    assert_eq!(why["outbound"]["route"], "tunnel", "{why:#}");
    why["outbound"]["dst_id"].as_str().unwrap().to_string()
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn a_valid_certificate_for_another_identity_is_refused_by_the_client() {
    let mut pods = PodSpec::defaults();
    pods.push(PodSpec::unlisted("rogue", "node2"));
    let mut tb = testbed_with(Options {
        pods,
        ..Options::default()
    });
    let rogue = tb.pod("rogue").clone();
    let ips = [IpAddr::V4(rogue.ipv4), IpAddr::V6(rogue.ipv6)];

    // The rogue serves HBONE with a genuine certificate from the mesh CA, for `legacy` (which
    // the CA signs for node2, where legacy runs).
    let svid = tb.issue("node2", "default", "legacy").unwrap();
    let fake = FakeHbone::start(&rogue.netns_path(), &svid).unwrap();

    // The inventory says the rogue's addresses are `payments`'s.
    claim(&mut tb, &ips, "payments");
    let failed = tb.proxy_counter("node1", "client", "outbound_failed");
    for ip in ips {
        let dst = SocketAddr::new(ip, ECHO_PORT);
        assert_eq!(required_identity(&tb, dst), identity("default", "payments"));
        let r = tb
            .request("client", ip, ECHO_PORT, Some("for payments only"))
            .unwrap();
        assert_eq!(r.data(), "", "the client talked to the rogue: {r:?}");
    }
    assert!(
        fake.connections() >= 2,
        "the client's agent never dialled the rogue ({} connections)",
        fake.connections()
    );
    assert_eq!(fake.connects(), 0, "a CONNECT reached the rogue");
    assert!(
        tb.proxy_counter("node1", "client", "outbound_failed") >= failed + 2,
        "refusals not counted"
    );

    // Control: the same server, certificate and path, now with the identity the inventory
    // expects. The only thing that changed is the identity, and the connection goes through.
    claim(&mut tb, &ips, "legacy");
    for ip in ips {
        let dst = SocketAddr::new(ip, ECHO_PORT);
        assert_eq!(required_identity(&tb, dst), identity("default", "legacy"));
        let r = tb
            .request("client", ip, ECHO_PORT, Some("identity matches"))
            .unwrap();
        assert_eq!(r.data(), "identity matches", "{r:?}");
    }
    assert_eq!(fake.connects(), 2);
}
