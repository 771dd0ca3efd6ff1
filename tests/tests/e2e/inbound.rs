//! Inbound capture: every TCP connection to an enrolled pod, on any port, is steered to its
//! node's agent, which delivers it to the app with the original client address.
#![allow(
    clippy::unwrap_used,
    reason = "test bodies, also those `both_modes!` runs, panic with a line number (STYLE.md §7)"
)]
use std::net::IpAddr;

use ambit_e2e::{assert_eventually, both_modes, Testbed, ECHO_PORT, HELLO, HTTP_PORT, PEER_PORT};

both_modes!(inbound_connections_to_arbitrary_ports_are_steered_through_the_agent);
fn inbound_connections_to_arbitrary_ports_are_steered_through_the_agent(tb: Testbed) {
    let server = IpAddr::V4(tb.pod("server").ipv4);
    let steers = tb.kernel_counter("node2", "lookup_steer");
    let steered = tb.pod_counter("node2", "server", "steered");
    let accepted = tb.proxy_counter("node2", "server", "inbound_accepted");

    // Senders that are not enrolled, so only the inbound side captures: one on the same node,
    // one across the underlay.
    assert_eq!(
        tb.http_get("legacy", server, HTTP_PORT, "/hello.txt")
            .unwrap(),
        HELLO
    );
    let echo = tb
        .request("legacy", server, ECHO_PORT, Some("inbound"))
        .unwrap();
    assert_eq!(echo.data(), "inbound", "{echo:?}");
    let peer = tb.request("outsider", server, PEER_PORT, None).unwrap();
    assert!(peer.data().starts_with("peer=10.1.0.3:"), "{peer:?}");

    assert_eventually!(
        tb.kernel_counter("node2", "lookup_steer") >= steers + 3,
        "node2 kernel: {:?}",
        tb.kernel_snapshot("node2")
    );
    assert_eventually!(tb.pod_counter("node2", "server", "steered") >= steered + 3);
    assert_eventually!(tb.proxy_counter("node2", "server", "inbound_accepted") >= accepted + 3);
}

both_modes!(the_app_sees_the_original_client_ip);
fn the_app_sees_the_original_client_ip(tb: Testbed) {
    let server = tb.pod("server");
    let (client4, client6) = (tb.pod("client").ipv4, tb.pod("client").ipv6);

    let v4 = tb
        .request("client", IpAddr::V4(server.ipv4), PEER_PORT, None)
        .unwrap();
    assert!(
        v4.data().starts_with(&format!("peer={client4}:")),
        "server app saw {:?}",
        v4.data()
    );
    let v6 = tb
        .request("client", IpAddr::V6(server.ipv6), PEER_PORT, None)
        .unwrap();
    assert!(
        v6.data().starts_with(&format!("peer=[{client6}]:")),
        "server app saw {:?}",
        v6.data()
    );
    let legacy = tb
        .request("legacy", IpAddr::V4(server.ipv4), PEER_PORT, None)
        .unwrap();
    let legacy_ip = tb.pod("legacy").ipv4;
    assert!(
        legacy.data().starts_with(&format!("peer={legacy_ip}:")),
        "server app saw {:?}",
        legacy.data()
    );
    // All three were delivered by node2's agent (bypassed sk_lookup), not connected directly.
    assert!(tb.pod_counter("node2", "server", "bypassed") >= 3);
}
