//! The agent's socket marks are not a way out of capture: a process in the enrolled client pod
//! running as nobody with only CAP_NET_RAW (what containers get by default) sets SO_MARK to the
//! agent's outbound or delivery mark and connects. It is captured and tunnelled like any other
//! socket of the pod (nothing of it crosses the underlay in plaintext), counted as a forged
//! mark, and a DENY AuthorizationPolicy on the client's principal still holds.
#![allow(
    clippy::unwrap_used,
    reason = "test bodies panic with a line number (STYLE.md §7)"
)]
use std::net::IpAddr;

use ambit_e2e::capture::UNDERLAY;
use ambit_e2e::forge::{AGENT_MARKS as MARKS, CAP_NET_RAW};
use ambit_e2e::{testbed, unique_marker, Testbed, ECHO_PORT};
use serde_json::Value;

/// Runs the mark probe in `pod` as nobody with only CAP_NET_RAW, and checks the premise: such a
/// process can set the agent's mark.
fn probe(tb: &Testbed, pod: &str, ip: IpAddr, port: u16, mark: u32, send: &str) -> Value {
    let report = tb.marked_request(pod, ip, port, mark, send).unwrap();
    assert_eq!(report["uid"], 65534, "{report}");
    assert_eq!(report["cap_eff"], CAP_NET_RAW, "{report}");
    assert_eq!(report["mark"], mark, "SO_MARK was not set: {report}");
    report
}

/// An AuthorizationPolicy denying the client's principal at the server.
fn deny_client(tb: &Testbed) -> String {
    let principal = tb.pod("client").identity();
    let principal = principal.trim_start_matches("spiffe://");
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-client\n  \
         namespace: default\nspec:\n  selector:\n    matchLabels:\n      app: server\n  \
         action: DENY\n  rules:\n  - from:\n    - source:\n        principals: [\"{principal}\"]\n"
    )
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn a_pod_socket_with_the_agents_mark_is_captured_and_tunnelled() {
    let mut tb = testbed();
    let server = IpAddr::V4(tb.pod("server").ipv4);
    let legacy = IpAddr::V4(tb.pod("legacy").ipv4);
    // Read from a snapshot: an agent without the counter shows the bug below, not a panic here.
    let counter = |tb: &Testbed| {
        tb.kernel_snapshot("node1")
            .get("connect_forged_mark")
            .copied()
    };
    let forged = counter(&tb).unwrap_or(0);
    let accepted = tb.proxy_counter("node1", "client", "outbound_accepted");
    let markers: Vec<String> = MARKS.iter().map(|_| unique_marker()).collect();
    let control = unique_marker();

    let cap = tb.capture("node1", UNDERLAY).unwrap();
    let replies: Vec<Value> = MARKS
        .iter()
        .zip(&markers)
        .map(|(mark, marker)| probe(&tb, "client", server, ECHO_PORT, *mark, marker))
        .collect();
    // Control: plaintext between unenrolled pods is visible to this capture.
    let plain = tb
        .request("outsider", legacy, ECHO_PORT, Some(&control))
        .unwrap();
    assert_eq!(plain.data(), control);
    let seen = cap.stop().unwrap();
    for marker in &markers {
        assert_eq!(
            seen.count(marker.as_bytes()),
            0,
            "a forged-mark socket's bytes crossed the underlay in plaintext:\n{}",
            seen.summary()
        );
    }
    assert!(
        seen.count(control.as_bytes()) >= 2,
        "the capture missed the plaintext control:\n{}",
        seen.summary()
    );
    // Both were carried (through the client's agent), and the kernel counted the forged marks.
    for ((mark, marker), r) in MARKS.iter().zip(&markers).zip(&replies) {
        assert_eq!(r["data"], marker.as_str(), "mark {mark:#x}: {r}");
    }
    assert_eq!(
        tb.proxy_counter("node1", "client", "outbound_accepted") - accepted,
        MARKS.len() as u64
    );
    assert_eq!(
        counter(&tb).map(|n| n - forged),
        Some(MARKS.len() as u64),
        "connect_forged_mark"
    );
    assert_eq!(
        tb.pod_counter("node1", "client", "forged_mark"),
        MARKS.len() as u64
    );

    // A DENY on the client's principal holds for a forged-mark socket too.
    tb.apply(&deny_client(&tb)).unwrap();
    let denied = tb.proxy_counter("node2", "server", "authz_denied");
    for mark in MARKS {
        let r = probe(&tb, "client", server, ECHO_PORT, mark, "DENY-ESCAPED");
        assert!(
            !r["data"].as_str().unwrap_or("").contains("DENY-ESCAPED"),
            "mark {mark:#x} escaped the DENY: {r}"
        );
    }
    assert_eq!(
        tb.proxy_counter("node2", "server", "authz_denied") - denied,
        MARKS.len() as u64,
        "the server's agent refused them by policy"
    );
}
