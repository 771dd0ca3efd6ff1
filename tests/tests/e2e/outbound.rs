//! Outbound capture: an enrolled pod's connects to any port go through its node's agent, which
//! recovers the original destination; the app's socket still names the real peer.
#![allow(
    clippy::unwrap_used,
    reason = "test bodies, also those `both_modes!` runs, panic with a line number (STYLE.md §7)"
)]
use std::net::IpAddr;

use ambit_e2e::{assert_eventually, both_modes, Testbed, ECHO_PORT, HELLO, HTTP_PORT, PEER_PORT};

both_modes!(outbound_connects_to_arbitrary_ports_reach_their_original_destination);
fn outbound_connects_to_arbitrary_ports_reach_their_original_destination(tb: Testbed) {
    let server = IpAddr::V4(tb.pod("server").ipv4);
    let redirects = tb.kernel_counter("node1", "connect4_redirect");
    let answered = tb.kernel_counter("node1", "getsockopt_answered");
    let accepted = tb.proxy_counter("node1", "client", "outbound_accepted");

    // Three ports, three different services: each answer proves the agent dialled the right one.
    let body = tb
        .http_get("client", server, HTTP_PORT, "/hello.txt")
        .unwrap();
    assert_eq!(body, HELLO);
    let echo = tb
        .request("client", server, ECHO_PORT, Some("ping through ambit"))
        .unwrap();
    assert_eq!(echo.data(), "ping through ambit", "{echo:?}");
    let peer = tb.request("client", server, PEER_PORT, None).unwrap();
    assert!(peer.data().starts_with("peer=10.1.0.2:"), "{peer:?}");

    assert_eventually!(
        tb.kernel_counter("node1", "connect4_redirect") >= redirects + 3,
        "node1 kernel: {:?}",
        tb.kernel_snapshot("node1")
    );
    assert!(tb.kernel_counter("node1", "getsockopt_answered") >= answered + 3);
    assert_eventually!(tb.proxy_counter("node1", "client", "outbound_accepted") >= accepted + 3);
    assert!(tb.pod_counter("node1", "client", "redirected") >= 3);
}

both_modes!(getpeername_in_the_app_shows_the_real_peer);
fn getpeername_in_the_app_shows_the_real_peer(tb: Testbed) {
    let server = tb.pod("server").ipv4;
    let rewrites = tb.kernel_counter("node1", "getpeername_rewrite");
    let redirects = tb.kernel_counter("node1", "connect4_redirect");

    let reply = tb
        .request("client", IpAddr::V4(server), ECHO_PORT, Some("who"))
        .unwrap();
    assert!(reply.ok(), "{reply:?}");
    assert_eq!(
        reply.peer(),
        format!("{server}:{ECHO_PORT}"),
        "getpeername must not show the agent's listener"
    );
    // The connection really was captured (else getpeername would be trivially right).
    assert_eq!(
        tb.kernel_counter("node1", "connect4_redirect"),
        redirects + 1
    );
    assert!(tb.kernel_counter("node1", "getpeername_rewrite") > rewrites);
}

both_modes!(ipv6_connects_are_captured_and_delivered);
fn ipv6_connects_are_captured_and_delivered(tb: Testbed) {
    let server = tb.pod("server").ipv6;
    let v6 = IpAddr::V6(server);
    let redirects = tb.kernel_counter("node1", "connect6_redirect");
    let deliveries = tb.kernel_counter("node2", "lookup_bypass");

    assert_eq!(
        tb.http_get("client", v6, HTTP_PORT, "/hello.txt").unwrap(),
        HELLO
    );
    let echo = tb.request("client", v6, ECHO_PORT, Some("ping6")).unwrap();
    assert_eq!(echo.data(), "ping6", "{echo:?}");
    assert_eq!(echo.peer(), format!("[{server}]:{ECHO_PORT}"));
    let peer = tb.request("client", v6, PEER_PORT, None).unwrap();
    let client = tb.pod("client").ipv6;
    assert!(
        peer.data().starts_with(&format!("peer=[{client}]:")),
        "{peer:?}"
    );

    assert_eventually!(tb.kernel_counter("node1", "connect6_redirect") >= redirects + 3);
    // node2's agent delivered each one (its delivery SYNs bypass sk_lookup).
    assert_eventually!(tb.kernel_counter("node2", "lookup_bypass") >= deliveries + 3);
}
