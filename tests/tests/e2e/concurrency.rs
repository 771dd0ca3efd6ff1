//! Many simultaneous captured connections: all open at once, all echo correctly.
#![allow(
    clippy::unwrap_used,
    reason = "test bodies, also those `both_modes!` runs, panic with a line number (STYLE.md §7)"
)]
use std::net::IpAddr;

use ambit_e2e::{assert_eventually, both_modes, Testbed, ECHO_PORT};

both_modes!(hundred_concurrent_connections_all_succeed);
fn hundred_concurrent_connections_all_succeed(tb: Testbed) {
    let server = IpAddr::V4(tb.pod("server").ipv4);
    let out0 = tb.proxy_counter("node1", "client", "outbound_accepted");
    let in0 = tb.proxy_counter("node2", "server", "inbound_accepted");

    let report = tb.concurrent("client", server, ECHO_PORT, 100).unwrap();
    assert_eq!(report["ok"], 100, "{report}");
    assert_eq!(report["failed"], 0, "{report}");

    assert_eventually!(tb.proxy_counter("node1", "client", "outbound_accepted") >= out0 + 100);
    assert_eventually!(tb.proxy_counter("node2", "server", "inbound_accepted") >= in0 + 100);
    assert_eventually!(
        tb.proxy_counter("node1", "client", "outbound_active") == 0
            && tb.proxy_counter("node2", "server", "inbound_active") == 0,
        "connections still open after the clients closed"
    );
}
