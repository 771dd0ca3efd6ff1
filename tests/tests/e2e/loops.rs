//! The agents' own sockets are exempt from capture: one kernel redirect and one bypassed
//! delivery per application connection, never more agent dials than app connections, and no
//! activity once the traffic stops.
#![allow(
    clippy::unwrap_used,
    reason = "test bodies, also those `both_modes!` runs, panic with a line number (STYLE.md §7)"
)]
use std::net::IpAddr;
use std::time::Duration;

use ambit_e2e::counters::{changed, KernelSnapshot};
use ambit_e2e::{assert_eventually, both_modes, Testbed, ECHO_PORT};

const CONNECTIONS: u64 = 20;

fn delta(tb: &Testbed, node: &str, before: &KernelSnapshot, name: &str) -> u64 {
    tb.kernel_counter(node, name) - before.get(name).copied().unwrap_or(0)
}

/// Connection-creating counters (connect*, lookup*) do not move for a while.
fn assert_quiet(tb: &Testbed) {
    let settled = [tb.kernel_snapshot("node1"), tb.kernel_snapshot("node2")];
    std::thread::sleep(Duration::from_millis(700));
    let later = [tb.kernel_snapshot("node1"), tb.kernel_snapshot("node2")];
    for (b, a) in settled.iter().zip(later.iter()) {
        // Close-time counters (sockops_close) may still tick as sockets finish.
        let moved: Vec<String> = changed(b, a)
            .into_iter()
            .filter(|c| c.starts_with("connect") || c.starts_with("lookup"))
            .collect();
        assert!(
            moved.is_empty(),
            "counters moving with no traffic: {moved:?}"
        );
    }
}

both_modes!(agent_sockets_never_loop_back_into_capture);
fn agent_sockets_never_loop_back_into_capture(tb: Testbed) {
    let server = IpAddr::V4(tb.pod("server").ipv4);
    let (n1, n2) = (tb.kernel_snapshot("node1"), tb.kernel_snapshot("node2"));

    let report = tb
        .concurrent("client", server, ECHO_PORT, CONNECTIONS as usize)
        .unwrap();
    assert_eq!(report["ok"], CONNECTIONS, "{report}");
    assert_eventually!(delta(&tb, "node2", &n2, "lookup_bypass") >= CONNECTIONS);
    let (k1, k2) = (tb.kernel_snapshot("node1"), tb.kernel_snapshot("node2"));

    // node1: each app connect is redirected exactly once. The agent's own dials are exempt by
    // their mark, and there is at most one per app connection (fewer if it pools tunnels).
    assert_eq!(
        delta(&tb, "node1", &n1, "connect4_redirect"),
        CONNECTIONS,
        "node1: {k1:?}"
    );
    let dials = delta(&tb, "node1", &n1, "connect_exempt_mark");
    assert!(
        (1..=CONNECTIONS).contains(&dials),
        "node1 agent dials: {dials}; {k1:?}"
    );
    assert_eq!(
        tb.proxy_counter("node1", "client", "outbound_accepted"),
        CONNECTIONS
    );
    // node2: each app connection is delivered by one marked socket whose SYN bypasses sk_lookup
    // exactly once: lookup_bypass equals deliveries; nothing of the agent's is redirected.
    assert_eq!(
        delta(&tb, "node2", &n2, "lookup_bypass"),
        CONNECTIONS,
        "node2: {k2:?}"
    );
    assert_eq!(
        delta(&tb, "node2", &n2, "connect_exempt_mark"),
        CONNECTIONS,
        "node2: {k2:?}"
    );
    let arrivals =
        delta(&tb, "node2", &n2, "lookup_steer") + delta(&tb, "node2", &n2, "lookup_tunnel_port");
    assert!(
        (1..=CONNECTIONS).contains(&arrivals),
        "node2 inbound arrivals: {arrivals}; {k2:?}"
    );
    assert_eq!(
        delta(&tb, "node2", &n2, "connect4_redirect"),
        0,
        "a delivery socket was redirected"
    );
    assert_quiet(&tb);
}

both_modes!(plaintext_inbound_is_steered_once_and_delivered_once);
fn plaintext_inbound_is_steered_once_and_delivered_once(tb: Testbed) {
    let server = IpAddr::V4(tb.pod("server").ipv4);
    let n2 = tb.kernel_snapshot("node2");
    let retrans_before = syn_retransmits(&tb, "legacy");

    // `legacy` is not enrolled: its connections arrive at the server in plaintext.
    let report = tb
        .concurrent("legacy", server, ECHO_PORT, CONNECTIONS as usize)
        .unwrap();
    assert_eq!(report["ok"], CONNECTIONS, "{report}");
    assert_eventually!(delta(&tb, "node2", &n2, "lookup_bypass") >= CONNECTIONS);
    let k2 = tb.kernel_snapshot("node2");
    // Each SYN that reaches node2 is steered once. A SYN the client retransmits (a slow host:
    // qemu TCG drops SYNs while the agent's accept queue is full) is steered again, so the
    // client's TcpExt TCPSynRetrans bounds the extra steers; on an idle host it is 0.
    let retrans = syn_retransmits(&tb, "legacy") - retrans_before;
    let steers = delta(&tb, "node2", &n2, "lookup_steer");
    assert!(
        (CONNECTIONS..=CONNECTIONS + retrans).contains(&steers),
        "node2: {steers} steers for {CONNECTIONS} connections and {retrans} retransmitted SYNs: \
         {k2:?}"
    );
    assert_eq!(
        delta(&tb, "node2", &n2, "lookup_bypass"),
        CONNECTIONS,
        "node2: {k2:?}"
    );
    assert_eq!(
        delta(&tb, "node2", &n2, "connect_exempt_mark"),
        CONNECTIONS,
        "node2: {k2:?}"
    );
    assert_eq!(
        tb.proxy_counter("node2", "server", "inbound_accepted"),
        CONNECTIONS
    );
    assert_quiet(&tb);
}

/// SYNs the kernel of `pod`'s netns has retransmitted so far (`TcpExt: TCPSynRetrans` of
/// /proc/net/netstat read inside the pod).
fn syn_retransmits(tb: &Testbed, pod: &str) -> u64 {
    let out = tb
        .exec(pod, &["cat", "/proc/net/netstat"], Duration::from_secs(10))
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut tcp_ext = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (tcp_ext.next().unwrap(), tcp_ext.next().unwrap());
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "TCPSynRetrans")
        .and_then(|(_, value)| value.parse().ok())
        .unwrap()
}
