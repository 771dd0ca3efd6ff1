//! A truncated inventory file (a non-atomic writer caught mid-write) under STRICT: the agents
//! hold the reload back (last good inventory in force, `/status`, `ambit status` and a metric
//! say so), the outsider's plaintext is still refused and the client's bytes still tunnelled;
//! the held content applies once the same content has been seen again after the settle time.
#![allow(
    clippy::unwrap_used,
    reason = "test bodies panic with a line number (STYLE.md §7)"
)]
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ambit_e2e::capture::UNDERLAY;
use ambit_e2e::policy::PeerAuthentication as Pa;
use ambit_e2e::{
    assert_eventually, config, state, testbed, unique_marker, Testbed, ECHO_PORT, TUNNEL_PORT,
};

/// Settle time the agents get here: long enough to probe the held state at leisure.
const SETTLE_MS: u64 = 8000;

/// Whether `node`'s agent reports a held reload.
fn held(tb: &Testbed, node: &str) -> bool {
    tb.status(node).unwrap().0["inventory"]["held"].is_object()
}

fn loads(tb: &Testbed, node: &str) -> u64 {
    tb.status(node).unwrap().0["inventory"]["loads"]
        .as_u64()
        .unwrap()
}

/// Whether the outsider's plaintext echo reaches the server app.
fn outsider_reaches(tb: &Testbed, server: IpAddr) -> bool {
    let r = tb
        .request("outsider", server, ECHO_PORT, Some("plain"))
        .unwrap();
    r.data() == "plain"
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn a_truncated_inventory_is_held_back_until_confirmed() {
    let mut tb = testbed();
    for node in ["node1", "node2"] {
        tb.restart_agent_with(node, &format!("inventoryGuard:\n  settleMs: {SETTLE_MS}\n"))
            .unwrap();
    }
    let server = IpAddr::V4(tb.pod("server").ipv4);
    let client = IpAddr::V4(tb.pod("client").ipv4);
    tb.apply(&Pa::new("default", "default").mode("STRICT").yaml())
        .unwrap();
    assert!(!outsider_reaches(&tb, server), "STRICT refuses plaintext");
    let before = loads(&tb, "node2");
    let held_metric = |tb: &Testbed| {
        tb.metrics("node2")
            .unwrap()
            .sum("ambit_inventory_held_reloads_total", &[])
    };
    let held_before = held_metric(&tb);

    let secret = unique_marker();
    let cap = tb.capture("node1", UNDERLAY).unwrap();
    // `: > inventory.yaml`: truncated in place, as a writer does before it writes.
    std::fs::File::create(&tb.state().inventory).unwrap();
    assert_eventually!(
        held(&tb, "node1") && held(&tb, "node2"),
        "the agents did not hold the empty inventory back: {:?}",
        tb.status("node2").map(|s| s.0["inventory"].clone())
    );
    // During the hold the last good inventory is in force on both sides.
    assert!(
        !outsider_reaches(&tb, server),
        "the outsider's plaintext reached the server during the hold"
    );
    let echo = tb
        .request("client", server, ECHO_PORT, Some(&secret))
        .unwrap();
    assert_eq!(echo.data(), secret, "{echo:?}");
    let out = tb.ambit_cli("node2", &["status"]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("held back"), "ambit status: {text}");
    assert_eq!(held_metric(&tb) - held_before, 1.0, "the hold is counted");
    assert!(
        held(&tb, "node2"),
        "the probes above outlasted the settle time"
    );
    let captured = cap.stop().unwrap();
    assert_eq!(
        captured.count(secret.as_bytes()),
        0,
        "the client's bytes crossed in plaintext during the hold:\n{}",
        captured.summary()
    );
    assert!(
        captured
            .with_payload()
            .any(|f| f.src.ip() == client && f.dst == SocketAddr::new(server, TUNNEL_PORT)),
        "the echo was not tunnelled:\n{}",
        captured.summary()
    );

    // The same (empty) content seen again after the settle time: it applies. The server is
    // no longer enrolled, so the outsider's plaintext reaches it.
    assert_eventually!(
        timeout = Duration::from_millis(SETTLE_MS * 2 + 5000),
        !held(&tb, "node2") && loads(&tb, "node2") > before,
        "the confirmed content never applied: {:?}",
        tb.status("node2").map(|s| s.0["inventory"].clone())
    );
    assert_eventually!(outsider_reaches(&tb, server));

    // The writer finishes: nothing is unenrolled by it, so it applies at once.
    let text = config::inventory(tb.state());
    state::write_atomic(&tb.state().inventory, text.as_bytes()).unwrap();
    assert_eventually!(
        timeout = Duration::from_secs(5),
        !outsider_reaches(&tb, server),
        "STRICT back in force"
    );
}
