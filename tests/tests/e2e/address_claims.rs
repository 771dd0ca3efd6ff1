//! Two Pods claiming one address (a stale or finished Pod object after IP reuse): the client's
//! agent never downgrades to plaintext. An undecidable claim is refused (`ambiguous_address`,
//! counted, warned once, both claimants in `explain`), with no byte of the client's on the
//! underlay; once the stale Pod is finished the server owns its address again and the client's
//! bytes are tunnelled.
#![allow(
    clippy::unwrap_used,
    reason = "test bodies panic with a line number (STYLE.md §7)"
)]
use std::net::{IpAddr, SocketAddr};

use ambit_e2e::capture::{Captured, UNDERLAY};
use ambit_e2e::{testbed, unique_marker, Testbed, ECHO_PORT, TUNNEL_PORT};

/// `aaa/stale` on node2 claiming `ip`, not enrolled, with `status.phase` = `phase`.
fn stale_pod(ip: IpAddr, phase: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: stale\n  namespace: aaa\n\
         spec:\n  nodeName: node2\n  serviceAccountName: stale\n\
         status:\n  phase: {phase}\n  podIP: {ip}\n  podIPs:\n  - ip: {ip}\n"
    )
}

/// How many times node1's agent logged the conflict over `ip`.
fn conflict_warnings(tb: &Testbed, ip: IpAddr) -> usize {
    let log = std::fs::read_to_string(&tb.node("node1").log).unwrap();
    log.lines()
        .filter(|l| {
            l.contains("WARN") && l.contains("address claimed by") && l.contains(&format!("{ip}"))
        })
        .count()
}

fn denials(tb: &Testbed) -> f64 {
    tb.metrics("node1").unwrap().sum(
        "ambit_policy_denials_total",
        &[("reason", "ambiguous_address")],
    )
}

/// Streams between the client and the server on the underlay that carried bytes.
fn tunnel_flows(cap: &Captured, client: IpAddr, server: IpAddr) -> usize {
    cap.with_payload()
        .filter(|f| {
            (f.src.ip() == client && f.dst == SocketAddr::new(server, TUNNEL_PORT))
                || (f.dst.ip() == client && f.src == SocketAddr::new(server, TUNNEL_PORT))
        })
        .count()
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn a_stale_pod_with_the_servers_address_never_downgrades_to_plaintext() {
    let mut tb = testbed();
    let server = IpAddr::V4(tb.pod("server").ipv4);
    let client = IpAddr::V4(tb.pod("client").ipv4);
    let legacy = IpAddr::V4(tb.pod("legacy").ipv4);
    let to = SocketAddr::new(server, ECHO_PORT);

    tb.apply(&stale_pod(server, "Running")).unwrap();
    let before = denials(&tb);
    let secret = unique_marker();
    let control = unique_marker();
    let cap = tb.capture("node1", UNDERLAY).unwrap();
    for _ in 0..3 {
        let r = tb
            .request("client", server, ECHO_PORT, Some(&secret))
            .unwrap();
        assert!(
            r.error().is_some() || r.data().is_empty(),
            "a connection to an address two pods claim was carried: {r:?}"
        );
    }
    // Control, same capture: plaintext between unenrolled pods is visible on this link.
    let plain = tb
        .request("outsider", legacy, ECHO_PORT, Some(&control))
        .unwrap();
    assert_eq!(plain.data(), control);
    let captured = cap.stop().unwrap();
    assert_eq!(
        captured.count(secret.as_bytes()),
        0,
        "the client's bytes crossed the underlay in plaintext:\n{}",
        captured.summary()
    );
    assert!(
        captured.count(control.as_bytes()) >= 2,
        "the capture missed the plaintext control:\n{}",
        captured.summary()
    );
    assert_eq!(denials(&tb) - before, 3.0, "each refusal is counted");

    let why = tb.explain("node1", "default/client", to).unwrap();
    assert_eq!(why["outbound"]["route"], "refuse", "{why:#}");
    let text = why.to_string();
    assert!(
        text.contains("ambiguous_address")
            && text.contains("\"aaa/stale\"")
            && text.contains("\"default/server\""),
        "explain shows both claimants: {why:#}"
    );
    // One warning for the conflict: not one per connection, not one per reload.
    tb.apply("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: unrelated\n")
        .unwrap();
    assert_eq!(conflict_warnings(&tb, server), 1, "{}", tb.agent_logs(40));

    // The stale pod is finished: it owns nothing, the server's address is the server's again.
    tb.apply(&stale_pod(server, "Failed")).unwrap();
    let secret = unique_marker();
    let cap = tb.capture("node1", UNDERLAY).unwrap();
    let r = tb
        .request("client", server, ECHO_PORT, Some(&secret))
        .unwrap();
    assert_eq!(r.data(), secret, "{r:?}");
    let captured = cap.stop().unwrap();
    assert_eq!(
        captured.count(secret.as_bytes()),
        0,
        "{}",
        captured.summary()
    );
    assert!(
        tunnel_flows(&captured, client, server) > 0,
        "the echo was not tunnelled:\n{}",
        captured.summary()
    );
    let why = tb.explain("node1", "default/client", to).unwrap();
    assert_eq!(why["outbound"]["route"], "tunnel", "{why:#}");
}
