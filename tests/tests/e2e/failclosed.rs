//! A stopped agent leaves its pods captured but unserved: connections fail, never bypass the
//! agent; a new agent serves them again.
#![allow(
    clippy::unwrap_used,
    reason = "test bodies, also those `both_modes!` runs, panic with a line number (STYLE.md §7)"
)]
use std::net::IpAddr;
use std::time::Duration;

use ambit_e2e::{assert_eventually, both_modes, Testbed, ECHO_PORT, PEER_PORT};
use nix::sys::signal::Signal;

/// Asserts a captured connection from `from` to the server's peer port failed and that the
/// server app never saw it.
fn assert_fails_closed(tb: &Testbed, from: &str) {
    let server = IpAddr::V4(tb.pod("server").ipv4);
    let seen = tb.peer_log("server").len();
    let reply = tb
        .request(from, server, PEER_PORT, None)
        .expect("client runs and reports");
    assert!(
        !reply.data().contains("peer="),
        "{from} reached the server app without an agent: {reply:?}"
    );
    let echo = tb
        .request(from, server, ECHO_PORT, Some("must not pass"))
        .expect("client runs and reports");
    assert_eq!(
        echo.data(),
        "",
        "{from} got an echo without an agent: {echo:?}"
    );
    assert_eq!(
        tb.peer_log("server").len(),
        seen,
        "the server app accepted a connection: bypass"
    );
}

fn pins_present(tb: &Testbed, node: &str) -> bool {
    std::fs::read_dir(&tb.node(node).pin_dir).is_ok_and(|mut d| d.next().is_some())
}

both_modes!(killed_agent_fails_outbound_closed);
fn killed_agent_fails_outbound_closed(mut tb: Testbed) {
    tb.stop_agent("node1", Signal::SIGKILL).unwrap();
    assert!(
        pins_present(&tb, "node1"),
        "pinned programs went away with the agent"
    );
    assert_fails_closed(&tb, "client");
    // The network itself is fine: unenrolled pods still talk.
    let legacy = IpAddr::V4(tb.pod("legacy").ipv4);
    assert_eq!(
        tb.request("outsider", legacy, ECHO_PORT, Some("ok"))
            .unwrap()
            .data(),
        "ok"
    );
}

both_modes!(terminated_agent_fails_outbound_closed);
fn terminated_agent_fails_outbound_closed(mut tb: Testbed) {
    tb.stop_agent("node1", Signal::SIGTERM).unwrap();
    assert!(
        pins_present(&tb, "node1"),
        "pinned programs went away with the agent"
    );
    assert_fails_closed(&tb, "client");
}

both_modes!(killed_agent_fails_inbound_closed);
fn killed_agent_fails_inbound_closed(mut tb: Testbed) {
    tb.stop_agent("node2", Signal::SIGKILL).unwrap();
    assert!(
        pins_present(&tb, "node2"),
        "pinned programs went away with the agent"
    );
    // Unenrolled senders: only the server's inbound capture is in the way.
    assert_fails_closed(&tb, "outsider");
    assert_fails_closed(&tb, "legacy");
}

both_modes!(terminated_agent_fails_inbound_closed);
fn terminated_agent_fails_inbound_closed(mut tb: Testbed) {
    tb.stop_agent("node2", Signal::SIGTERM).unwrap();
    assert_fails_closed(&tb, "outsider");
}

both_modes!(restarted_agents_serve_captured_pods_again);
fn restarted_agents_serve_captured_pods_again(mut tb: Testbed) {
    tb.stop_agent("node1", Signal::SIGKILL).unwrap();
    tb.stop_agent("node2", Signal::SIGKILL).unwrap();
    assert_fails_closed(&tb, "client");
    tb.start_agent("node1").unwrap();
    tb.start_agent("node2").unwrap();
    tb.wait_agents_ready(Duration::from_secs(30)).unwrap();
    let server = IpAddr::V4(tb.pod("server").ipv4);
    let client = tb.pod("client").ipv4;
    assert_eventually!(
        timeout = Duration::from_secs(15),
        tb.request("client", server, PEER_PORT, None)
            .is_ok_and(|r| r.data().starts_with(&format!("peer={client}:"))),
        "client never reached the server through the restarted agents:\n{}",
        tb.agent_logs(30)
    );
    let echo = tb
        .request("client", server, ECHO_PORT, Some("back"))
        .unwrap();
    assert_eq!(echo.data(), "back", "{echo:?}");
}
