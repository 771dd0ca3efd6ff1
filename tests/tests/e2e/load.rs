//! Load: 10,000 concurrent tunnelled connections from `client` (node1) to `server` (node2),
//! every one established end to end (a byte echoed), held at once, then closed. Both agents'
//! RSS and open fds are reported at baseline, while held and after close; after close the
//! fds must be back to baseline (+ a few), and RSS within the bound explained at
//! `PER_CONNECTION_KIB`.
#![allow(
    clippy::unwrap_used,
    reason = "test bodies panic with a line number (STYLE.md §7)"
)]
use std::net::IpAddr;
use std::time::{Duration, Instant};

use ambit_e2e::leaks::{raise_nofile, Usage};
use ambit_e2e::{eventually, testbed, Testbed};

/// Connections held at once.
const CONNECTIONS: usize = 10_000;
/// Connections being set up at once by the client.
const PARALLEL: usize = 200;
/// Echo port of `many.py serve` in the server pod.
const PORT: u16 = 9100;
/// fds an agent may hold above its baseline once everything closed: the tunnel pool may keep
/// a connection to the peer (or the peer one to us) until its idle timeout, a few for timers;
/// and the socket factory keeps what is left of its last batch of pre-made sockets in the pod
/// netns the connections came from or went to (fewer than `SPARE_BATCH` = 32, one family
/// here: the baseline, taken before any connection, has none).
const FD_SLACK: usize = 8 + 31;
/// RSS one held connection may cost an agent, KiB. Each proxied connection has two 64 KiB
/// copy buffers (one per direction) in each agent, allocated zeroed: on a fresh heap those
/// pages stay untouched until data needs them (a first run measures ~26 KiB per connection),
/// but on reused heap calloc must zero them, so a second run of 10,000 reaches ~130 KiB per
/// connection (measured: 1.37 GB). Add ~25 KiB of socket, HTTP/2 stream and task state.
const PER_CONNECTION_KIB: u64 = 160;
/// RSS an agent may keep after close: freed heap goes back to glibc's arenas, not always to
/// the kernel (the agent never calls malloc_trim), so it may stay at what the held
/// connections cost, but never above it.
fn rss_bound(base: Usage) -> u64 {
    base.rss_kib + CONNECTIONS as u64 * PER_CONNECTION_KIB
}
/// Idle timeout of tunnel connections (node2's `limits.idleTimeoutMs`): pooled HBONE
/// connections are closed this long after their last stream, instead of after 5 minutes.
const IDLE_MS: u64 = 2000;

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn ten_thousand_tunnelled_connections_are_all_released_after_close() {
    // Agents and pods' processes inherit this process's limit: 10,000 connections need about
    // as many fds in the client, the server and each agent.
    let nofile = raise_nofile(std::process::id(), 65_536).unwrap();
    assert!(
        nofile >= CONNECTIONS as u64 + 1024,
        "RLIMIT_NOFILE hard limit {nofile} is too low for {CONNECTIONS} connections; raise it \
         (ulimit -Hn) before running the tests"
    );
    let mut tb = testbed();
    for node in ["node1", "node2"] {
        tb.restart_agent_with(node, &format!("limits:\n  idleTimeoutMs: {IDLE_MS}\n"))
            .unwrap();
    }
    let server = IpAddr::V4(tb.pod("server").ipv4);
    let _echo = tb.start_many_server("server", PORT).unwrap();
    // Warm up (certificates, first tunnel), then let the pooled connection idle out.
    let r = tb.request("client", server, PORT, Some("warm")).unwrap();
    assert_eq!(r.data(), "warm", "{r:?}");
    let base = settled(&tb, Duration::from_millis(IDLE_MS * 3));

    let (report, held, after) = hold_and_release(&tb, server, base);
    eprintln!("{report}");
    for (i, node) in ["node1", "node2"].iter().enumerate() {
        for (when, u) in [("while held", held[i]), ("after close", after[i])] {
            assert!(
                u.rss_kib <= rss_bound(base[i]),
                "{node}: RSS {when} above {} KiB (baseline + {PER_CONNECTION_KIB} KiB per \
                 connection)\n{report}",
                rss_bound(base[i])
            );
        }
    }
    // Still serving.
    let r = tb.request("client", server, PORT, Some("after")).unwrap();
    assert_eq!(r.data(), "after", "{r:?}");
}

/// Both agents' usage once their fd counts stop changing (at most `quiet` after the last
/// change, and 30 s in all).
fn settled(tb: &Testbed, quiet: Duration) -> [Usage; 2] {
    let read = || {
        [
            tb.agent_usage("node1").unwrap(),
            tb.agent_usage("node2").unwrap(),
        ]
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = read();
    let mut since = Instant::now();
    while Instant::now() < deadline && since.elapsed() < quiet {
        std::thread::sleep(Duration::from_millis(250));
        let now = read();
        if now[0].fds != last[0].fds || now[1].fds != last[1].fds {
            since = Instant::now();
        }
        last = now;
    }
    last
}

/// Holds and releases `CONNECTIONS`; checks fds come back to `base`. Returns a report and
/// the usage while held and after close.
fn hold_and_release(
    tb: &Testbed,
    server: IpAddr,
    base: [Usage; 2],
) -> (String, [Usage; 2], [Usage; 2]) {
    let t0 = Instant::now();
    let mut holder = tb
        .hold_many("client", server, PORT, CONNECTIONS, PARALLEL)
        .unwrap();
    let open = holder.wait_for("open", Duration::from_secs(150)).unwrap();
    let setup = t0.elapsed();
    assert_eq!(open["open"], CONNECTIONS, "{open}");
    assert_eq!(open["failed"], 0, "{open}");
    let held = [
        tb.agent_usage("node1").unwrap(),
        tb.agent_usage("node2").unwrap(),
    ];
    assert_eq!(
        tb.proxy_counter("node1", "client", "outbound_active"),
        CONNECTIONS as u64,
        "node1 outbound_active"
    );
    assert_eq!(
        tb.proxy_counter("node2", "server", "inbound_active"),
        CONNECTIONS as u64,
        "node2 inbound_active"
    );
    holder.release(Duration::from_secs(60)).unwrap();
    let t1 = Instant::now();
    assert!(
        eventually(Duration::from_secs(60), || {
            (tb.proxy_counter("node1", "client", "outbound_active") == 0
                && tb.proxy_counter("node2", "server", "inbound_active") == 0)
                .then_some(())
        })
        .is_some(),
        "connections still counted as open 60 s after the client closed them"
    );
    // fds come back once the tunnel pool's connections idle out.
    let after = eventually(Duration::from_secs(60), || {
        let now = [tb.agent_usage("node1").ok()?, tb.agent_usage("node2").ok()?];
        (0..2)
            .all(|i| now[i].fds <= base[i].fds + FD_SLACK)
            .then_some(now)
    });
    let closed_in = t1.elapsed();
    let after = after.unwrap_or_else(|| {
        [
            tb.agent_usage("node1").unwrap(),
            tb.agent_usage("node2").unwrap(),
        ]
    });
    let report = format!(
        "{CONNECTIONS} tunnelled connections set up in {:.1} s ({:.0}/s), \
         released in {:.1} s\n  node1 agent: baseline {} | held {} | after close {}\n  \
         node2 agent: baseline {} | held {} | after close {}",
        setup.as_secs_f64(),
        CONNECTIONS as f64 / setup.as_secs_f64(),
        closed_in.as_secs_f64(),
        base[0],
        held[0],
        after[0],
        base[1],
        held[1],
        after[1],
    );
    for (i, node) in ["node1", "node2"].iter().enumerate() {
        assert!(
            held[i].fds >= base[i].fds + CONNECTIONS,
            "{node}: fewer fds while held than connections: the test did not hold them\n{report}"
        );
        assert!(
            after[i].fds <= base[i].fds + FD_SLACK,
            "{node}: fds not back to baseline (+{FD_SLACK}) after close\n{report}"
        );
    }
    (report, held, after)
}
