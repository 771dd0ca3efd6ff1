//! An app that stops reading stalls nothing else between two pods: HBONE flow control, resets, memory.
#![allow(
    clippy::unwrap_used,
    reason = "test bodies panic with a line number (STYLE.md §7)"
)]
use std::net::IpAddr;
use std::time::{Duration, Instant};

use ambit_e2e::{assert_eventually, Testbed, ECHO_PORT, HTTP_PORT};
use nix::sys::signal::Signal;

/// Where the application that never reads listens, on the server pod.
const SINK_PORT: u16 = 9100;
/// Connections the client pushes into it (half over IPv4, half over IPv6).
const K: usize = 32;
/// What one stalled stream may cost an agent: the receiving one holds its HTTP/2 stream
/// window (2 MiB, what the peer may send before the app reads), plus the buffers around it.
/// Unbounded, it would be what the client pushed (several MiB each).
const MAX_BYTES_PER_STALLED_STREAM: u64 = 2560 * 1024;
/// How much slower than before the stall a request may be while it lasts.
const SLACK: Duration = Duration::from_millis(1500);

/// Echo and HTTP from the client to the server over both families; each one's duration.
fn other_traffic(tb: &Testbed) -> Vec<(String, Duration)> {
    let server = tb.pod("server");
    let mut took = Vec::new();
    for ip in [IpAddr::V4(server.ipv4), IpAddr::V6(server.ipv6)] {
        let t = Instant::now();
        let r = tb
            .request("client", ip, ECHO_PORT, Some("still-moving"))
            .unwrap();
        assert!(r.ok(), "echo to {ip} failed: {:?}", r.error());
        assert_eq!(r.data(), "still-moving", "echo to {ip}");
        took.push((format!("echo {ip}"), t.elapsed()));
        let t = Instant::now();
        let body = tb.http_get("client", ip, HTTP_PORT, "/").unwrap();
        assert!(!body.is_empty(), "HTTP from {ip} returned nothing");
        took.push((format!("http {ip}"), t.elapsed()));
    }
    took
}

/// Rows of `node`'s connection table whose destination is the sink.
fn sink_rows(tb: &Testbed, node: &str) -> usize {
    tb.connections(node)
        .unwrap()
        .iter()
        .filter(|c| c.dst.ends_with(&format!(":{SINK_PORT}")))
        .count()
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn an_application_that_stops_reading_stalls_only_its_own_connections() {
    let tb = ambit_e2e::testbed();
    let server = tb.pod("server");
    let (v4, v6) = (IpAddr::V4(server.ipv4), IpAddr::V6(server.ipv6));

    // Before: how long the other traffic takes (this also opens the pooled tunnels, so the
    // memory baseline below has them).
    let before = other_traffic(&tb);
    let rss0 = (
        tb.agent_usage("node1").unwrap(),
        tb.agent_usage("node2").unwrap(),
    );

    let mut sink = tb.start_sink("server", SINK_PORT).unwrap();
    let mut push = tb
        .push_until_stalled("client", SINK_PORT, K, &[v4, v6], K / 2)
        .unwrap();
    let report = push.wait_stalled(Duration::from_secs(240)).unwrap();
    println!("pusher: {report}");
    assert_eq!(report["failed"], 0, "{report}");
    assert_eq!(
        report["stalled"], K,
        "every connection moved bytes: {report}"
    );
    assert!(
        report["quiet"].as_f64().unwrap() >= 3.0,
        "the pusher stopped at its deadline, not because every connection blocked: {report}"
    );
    // Both agents carry all K (the tables see the stalled connections).
    assert_eventually!(sink_rows(&tb, "node1") == K && sink_rows(&tb, "node2") == K);

    // While they are stalled, everything else between the two pods moves as before.
    let during = other_traffic(&tb);
    for ((what, b), (_, d)) in before.iter().zip(&during) {
        println!("{what}: {b:?} before the stall, {d:?} during it");
        assert!(
            *d <= *b + SLACK,
            "{what} took {d:?} during the stall ({b:?} before)"
        );
    }

    // What the stalled streams cost each agent.
    let rss1 = (
        tb.agent_usage("node1").unwrap(),
        tb.agent_usage("node2").unwrap(),
    );
    for (node, a, b) in [("node1", rss0.0, rss1.0), ("node2", rss0.1, rss1.1)] {
        let per = (b.rss_kib.saturating_sub(a.rss_kib) * 1024) / K as u64;
        println!(
            "{node} agent: {a} before, {b} with {K} stalled streams: {:.0} KiB per stalled stream",
            per as f64 / 1024.0
        );
        assert!(
            per <= MAX_BYTES_PER_STALLED_STREAM,
            "{node}: {per} bytes per stalled stream ({a} -> {b})"
        );
    }

    // The client resets half of them: those streams are reset and leave both tables.
    assert_eq!(push.abort_first().unwrap(), (K / 2) as u64);
    assert_eventually!(
        sink_rows(&tb, "node1") == K / 2 && sink_rows(&tb, "node2") == K / 2,
        "node1 {} node2 {} rows to the sink after the client reset {} of {K}",
        sink_rows(&tb, "node1"),
        sink_rows(&tb, "node2"),
        K / 2
    );
    // The application exits: the rest are reset and leave both tables.
    assert!(sink.signal(Signal::SIGKILL));
    assert!(sink.wait_exit(Duration::from_secs(10)));
    assert_eventually!(
        sink_rows(&tb, "node1") == 0 && sink_rows(&tb, "node2") == 0,
        "node1 {} node2 {} rows to the sink after it exited",
        sink_rows(&tb, "node1"),
        sink_rows(&tb, "node2")
    );
    push.abort_rest().unwrap();
    other_traffic(&tb);
}
