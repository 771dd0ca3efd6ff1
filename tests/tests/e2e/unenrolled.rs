//! Pods that are not enrolled are left alone: no capture, no counters, and enrollment follows
//! the inventory at runtime.
#![allow(
    clippy::unwrap_used,
    reason = "test bodies, also those `both_modes!` runs, panic with a line number (STYLE.md §7)"
)]
use std::net::IpAddr;
use std::time::Duration;

use ambit_e2e::counters::changed;
use ambit_e2e::Testbed;
use ambit_e2e::{assert_eventually, both_modes, ECHO_PORT, HELLO, HTTP_PORT, PEER_PORT};
use serde_json::Value;

/// Each listed pod's kernel counters and proxy statistics, by name.
fn pod_counters(tb: &Testbed, node: &str) -> Vec<(String, Value, Value)> {
    let st = tb.status(node).expect("agent answers status");
    let pods = st.0["pods"].as_array().cloned().unwrap_or_default();
    pods.iter()
        .map(|p| {
            (
                p["name"].to_string(),
                p["counters"].clone(),
                p["proxy"].clone(),
            )
        })
        .collect()
}

both_modes!(traffic_between_unenrolled_pods_is_untouched);
fn traffic_between_unenrolled_pods_is_untouched(tb: Testbed) {
    let legacy = IpAddr::V4(tb.pod("legacy").ipv4);
    let outsider = tb.pod("outsider").ipv4;
    let before = [tb.kernel_snapshot("node1"), tb.kernel_snapshot("node2")];
    let pods_before = [pod_counters(&tb, "node1"), pod_counters(&tb, "node2")];

    assert_eq!(
        tb.http_get("outsider", legacy, HTTP_PORT, "/hello.txt")
            .unwrap(),
        HELLO
    );
    let echo = tb
        .request("outsider", legacy, ECHO_PORT, Some("plain"))
        .unwrap();
    assert_eq!(echo.data(), "plain", "{echo:?}");
    // Not redirected: the client's own socket is bound to its pod address, not loopback.
    assert!(
        echo.0["sock"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{outsider}:")),
        "{echo:?}"
    );
    let peer = tb.request("outsider", legacy, PEER_PORT, None).unwrap();
    assert!(
        peer.data().starts_with(&format!("peer={outsider}:")),
        "{peer:?}"
    );
    let v6 = tb
        .request(
            "outsider",
            IpAddr::V6(tb.pod("legacy").ipv6),
            ECHO_PORT,
            Some("plain6"),
        )
        .unwrap();
    assert_eq!(v6.data(), "plain6", "{v6:?}");

    let after = [tb.kernel_snapshot("node1"), tb.kernel_snapshot("node2")];
    for (node, (b, a)) in ["node1", "node2"]
        .iter()
        .zip(before.iter().zip(after.iter()))
    {
        assert!(
            changed(b, a).is_empty(),
            "{node} kernel counters moved: {:?}",
            changed(b, a)
        );
    }
    let pods_after = [pod_counters(&tb, "node1"), pod_counters(&tb, "node2")];
    for (b, a) in pods_before.iter().zip(pods_after.iter()) {
        assert_eq!(b, a, "enrolled pods' counters moved");
    }
    for (node, pod) in [("node1", "outsider"), ("node2", "legacy")] {
        let st = tb.status(node).unwrap();
        assert_ne!(
            st.pod_state(pod),
            Some("enrolled"),
            "{node} lists {pod}: {}",
            st.0["pods"]
        );
    }
}

both_modes!(enrollment_follows_inventory_changes_without_restart);
fn enrollment_follows_inventory_changes_without_restart(mut tb: Testbed) {
    let legacy = IpAddr::V4(tb.pod("legacy").ipv4);
    let outsider = tb.pod("outsider").ipv4;

    tb.set_enrolled("outsider", true).unwrap();
    assert_eventually!(
        timeout = Duration::from_secs(15),
        tb.status("node1").unwrap().pod_state("outsider") == Some("enrolled"),
        "node1 never enrolled outsider: {}",
        tb.status("node1").unwrap().0["pods"]
    );
    // Mesh-only capture: the enrolled outsider's connects to a mesh pod are captured...
    let server = IpAddr::V4(tb.pod("server").ipv4);
    let redirects = tb.kernel_counter("node1", "connect4_redirect");
    let echo = tb
        .request("outsider", server, ECHO_PORT, Some("now captured"))
        .unwrap();
    assert_eq!(echo.data(), "now captured", "{echo:?}");
    assert_eq!(
        tb.kernel_counter("node1", "connect4_redirect"),
        redirects + 1
    );
    assert_eq!(tb.pod_counter("node1", "outsider", "redirected"), 1);
    let peer = tb.request("outsider", server, PEER_PORT, None).unwrap();
    assert!(
        peer.data().starts_with(&format!("peer={outsider}:")),
        "{peer:?}"
    );
    // ... and those to the unenrolled legacy pass the kernel straight through, counted.
    let redirects = tb.kernel_counter("node1", "connect4_redirect");
    let passed = tb.kernel_counter("node1", "connect_passthrough");
    let peer = tb.request("outsider", legacy, PEER_PORT, None).unwrap();
    assert!(
        peer.data().starts_with(&format!("peer={outsider}:")),
        "{peer:?}"
    );
    assert_eq!(tb.kernel_counter("node1", "connect4_redirect"), redirects);
    assert_eq!(
        tb.kernel_counter("node1", "connect_passthrough"),
        passed + 1
    );
    assert_eq!(tb.pod_counter("node1", "outsider", "passthrough"), 1);

    tb.set_enrolled("outsider", false).unwrap();
    assert_eventually!(
        timeout = Duration::from_secs(15),
        tb.status("node1").unwrap().pod("outsider").is_none(),
        "node1 still lists outsider: {}",
        tb.status("node1").unwrap().0["pods"]
    );
    let redirects = tb.kernel_counter("node1", "connect4_redirect");
    let passed = tb.kernel_counter("node1", "connect_passthrough");
    let echo = tb
        .request("outsider", server, ECHO_PORT, Some("plain again"))
        .unwrap();
    assert_eq!(echo.data(), "plain again", "{echo:?}");
    assert_eq!(
        tb.kernel_counter("node1", "connect4_redirect"),
        redirects,
        "unenrolled pod still captured"
    );
    assert_eq!(
        tb.kernel_counter("node1", "connect_passthrough"),
        passed,
        "unenrolled pod still counted"
    );
}
