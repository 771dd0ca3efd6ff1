//! Skip lists (Istio's `excludeOutboundPorts` and `excludeOutboundIPRanges` annotations): an
//! enrolled pod's connects to a skipped port or CIDR leave the pod directly, counted by the
//! kernel, while its other connects are still captured. The agent writes the lists into
//! `amb_pods` and connect4/6 compare them with the socket address of each connect, so this also
//! checks that both sides agree on the byte order of the ports and addresses.
#![allow(
    clippy::unwrap_used,
    reason = "test bodies panic with a line number (STYLE.md §7)"
)]
use ambit_e2e::net::pod_v6;
use ambit_e2e::{assert_eventually, testbed_with, Options, PodSpec, Testbed, ECHO_PORT, PEER_PORT};

const EXCLUDE_PORTS: &str = "traffic.sidecar.istio.io/excludeOutboundPorts";
const EXCLUDE_CIDRS: &str = "traffic.sidecar.istio.io/excludeOutboundIPRanges";

/// node1's kernel counters of connects: (skipped by port, skipped by CIDR, redirected).
fn connects(tb: &Testbed) -> (u64, u64, u64) {
    let c = |name| tb.kernel_counter("node1", name);
    (
        c("connect_exempt_skip_port"),
        c("connect_exempt_skip_cidr"),
        c("connect4_redirect") + c("connect6_redirect"),
    )
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn skipped_ports_and_cidrs_leave_directly_and_the_rest_is_captured() {
    // node2's IPv6 pod range (fd00:2::<host>): `server`'s IPv6 address, never its IPv4 one.
    let node2_v6 = format!("{}/64", pod_v6(2, 0));
    let mut pods = PodSpec::defaults();
    pods[0] = PodSpec::new("client", "node1", true, false)
        .annotated(EXCLUDE_PORTS, &format!("22,{PEER_PORT}"))
        .annotated(EXCLUDE_CIDRS, &node2_v6);
    let tb = testbed_with(Options {
        pods,
        ..Options::default()
    });
    let server = tb.pod("server").clone();
    assert_eq!(
        server.ipv6.segments()[..4],
        [0xfd00, 2, 0, 0],
        "server is outside {node2_v6}"
    );
    let accepted = tb.proxy_counter("node1", "client", "outbound_accepted");
    let (by_port, by_cidr, redirected) = connects(&tb);

    // A skipped port, to an enrolled server over IPv4: the connect is left alone (what node2
    // then does with a plaintext connection is its own policy's business).
    let _ = tb.request("client", server.ip(false), PEER_PORT, None);
    assert_eq!(
        connects(&tb),
        (by_port + 1, by_cidr, redirected),
        "a connect to skipped port {PEER_PORT}: node1 kernel {:?}",
        tb.kernel_snapshot("node1")
    );

    // Another port of the same server: captured and tunnelled as usual.
    let echo = tb
        .request("client", server.ip(false), ECHO_PORT, Some("captured"))
        .unwrap();
    assert_eq!(echo.data(), "captured", "{echo:?}");
    assert_eq!(
        connects(&tb),
        (by_port + 1, by_cidr, redirected + 1),
        "a connect to port {ECHO_PORT}"
    );

    // The same port over IPv6, inside the skipped range: left alone.
    let _ = tb.request("client", server.ip(true), ECHO_PORT, Some("direct"));
    assert_eq!(
        connects(&tb),
        (by_port + 1, by_cidr + 1, redirected + 1),
        "a connect to {} in skipped range {node2_v6}",
        server.ipv6
    );

    assert_eventually!(
        tb.proxy_counter("node1", "client", "outbound_accepted") == accepted + 1,
        "node1's agent must see the captured connect and only that one"
    );
}
