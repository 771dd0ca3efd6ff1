//! The agents' own sockets are exempt from capture: one kernel redirect, one agent dial and one
//! bypassed delivery per application connection, and nothing more.
use std::net::IpAddr;
use std::time::Duration;

use ambit_e2e::counters::changed;
use ambit_e2e::{assert_eventually, testbed, ECHO_PORT};

const CONNECTIONS: u64 = 20;

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn agent_sockets_never_loop_back_into_capture() {
    let tb = testbed();
    let server = IpAddr::V4(tb.pod("server").ipv4);
    let n1 = tb.kernel_snapshot("node1");
    let n2 = tb.kernel_snapshot("node2");
    let delta = |node: &str, before: &ambit_e2e::counters::KernelSnapshot, name: &str| {
        tb.kernel_counter(node, name) - before.get(name).copied().unwrap_or(0)
    };

    let report = tb
        .concurrent("client", server, ECHO_PORT, CONNECTIONS as usize)
        .unwrap();
    assert_eq!(report["ok"], CONNECTIONS, "{report}");
    assert_eventually!(tb.proxy_counter("node2", "server", "inbound_accepted") >= CONNECTIONS);

    // node1: each app connect is redirected once; the agent's dial to the real destination is
    // exempt by its mark (and is not redirected again).
    assert_eq!(
        delta("node1", &n1, "connect4_redirect"),
        CONNECTIONS,
        "node1: {:?}",
        tb.kernel_snapshot("node1")
    );
    assert_eq!(
        delta("node1", &n1, "connect_exempt_mark"),
        CONNECTIONS,
        "node1: {:?}",
        tb.kernel_snapshot("node1")
    );
    assert_eq!(
        tb.proxy_counter("node1", "client", "outbound_accepted"),
        CONNECTIONS
    );
    // node2: each inbound SYN is steered once, each delivery is exempt by mark and bypasses
    // sk_lookup exactly once, so lookup_bypass equals deliveries.
    assert_eq!(
        delta("node2", &n2, "lookup_steer"),
        CONNECTIONS,
        "node2: {:?}",
        tb.kernel_snapshot("node2")
    );
    assert_eq!(
        delta("node2", &n2, "lookup_bypass"),
        CONNECTIONS,
        "node2: {:?}",
        tb.kernel_snapshot("node2")
    );
    assert_eq!(
        delta("node2", &n2, "connect_exempt_mark"),
        CONNECTIONS,
        "node2: {:?}",
        tb.kernel_snapshot("node2")
    );
    assert_eq!(
        tb.proxy_counter("node2", "server", "inbound_accepted"),
        CONNECTIONS
    );
    assert_eq!(
        delta("node2", &n2, "connect4_redirect"),
        0,
        "a delivery socket was redirected"
    );

    // Quiet afterwards: no self-sustaining connection churn.
    let settled = [tb.kernel_snapshot("node1"), tb.kernel_snapshot("node2")];
    std::thread::sleep(Duration::from_millis(700));
    let later = [tb.kernel_snapshot("node1"), tb.kernel_snapshot("node2")];
    // Close-time counters may still tick as sockets finish; connection-creating ones may not.
    for (b, a) in settled.iter().zip(later.iter()) {
        let moved: Vec<String> = changed(b, a)
            .into_iter()
            .filter(|c| c.starts_with("connect") || c.starts_with("lookup"))
            .collect();
        assert!(
            moved.is_empty(),
            "counters still moving with no traffic: {moved:?}"
        );
    }
}
