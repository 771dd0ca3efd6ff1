//! A second agent on a node, started beside the first (the SO_REUSEPORT hand-over of a
//! zero-downtime restart), in both orders of stopping: (a) the second one is stopped again (a
//! failed rollout, an operator's test) and the first must own the node again: admin socket,
//! inbound plaintext (its listeners back in the SOCKHASH), inbound HBONE and outbound; (b) the
//! first one is stopped (a DaemonSet rolling update) and the second serves everything. Steady
//! load runs across each stop and must lose no request.
#![allow(
    clippy::unwrap_used,
    reason = "test bodies panic with a line number (STYLE.md §7)"
)]
use std::net::IpAddr;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use ambit_e2e::ops::{tail, Proc};
use ambit_e2e::{assert_eventually, testbed, Testbed, PEER_PORT};
use nix::sys::signal::Signal;
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use serde_json::Value;

/// Port of the load script's echo server in the server pod (inbound) and in the client pod
/// (the server's outbound).
const LOAD_PORT: u16 = 9100;
/// Steady load across a stop: new connections per second, and for how long.
const RATE: u32 = 40;
const SECONDS: u32 = 14;

/// PID of the process serving `path` (SO_PEERCRED of a fresh connection), if anything does.
fn socket_owner(path: &Path) -> Option<i32> {
    let s = UnixStream::connect(path).ok()?;
    getsockopt(&s, PeerCredentials).ok().map(|c| c.pid())
}

/// Starts a second agent for `node` and waits until it owns the admin socket and is ready.
fn start_second(tb: &mut Testbed, node: &str) -> Proc {
    let sock = tb.admin_socket(node);
    let second = tb.start_successor(node).unwrap();
    let ready = ambit_e2e::eventually(Duration::from_secs(60), || {
        let ours = socket_owner(&sock) == Some(second.pid);
        (ours
            && tb
                .admin_http(node, "GET", "/healthz/ready")
                .is_ok_and(|r| r.status == 200))
        .then_some(())
    });
    assert!(
        ready.is_some() && second.running(),
        "{node}'s second agent never became ready:\n{}",
        tail(&second.output(), 40)
    );
    second
}

/// Starts `load.py load` from `pod` to `ip:LOAD_PORT` and waits for its first second.
fn start_load(tb: &Testbed, pod: &str, ip: IpAddr) -> Proc {
    let args = [
        "load".to_string(),
        ip.to_string(),
        LOAD_PORT.to_string(),
        "--rate".into(),
        RATE.to_string(),
        "--seconds".into(),
        SECONDS.to_string(),
        "--timeout".into(),
        "5".into(),
    ];
    let mut p = tb.start_load_script(pod, &args).unwrap();
    p.wait_line(Duration::from_secs(30), |v| {
        v["progress"]["t"].as_f64().filter(|t| *t >= 2.0)
    })
    .unwrap();
    p
}

/// The load's summary once it ended; asserts that every request came back.
fn assert_no_failed(load: &mut Proc, what: &str, logs: &dyn Fn() -> String) {
    let summary = load
        .wait_line(Duration::from_secs(u64::from(SECONDS) + 60), |v| {
            v.get("summary").cloned()
        })
        .unwrap();
    eprintln!("handover: {what}: {summary}");
    let total = u64::from(RATE * SECONDS);
    assert_eq!(summary["requests"], total, "{what}: {summary}");
    assert_eq!(
        summary["failed"],
        0,
        "{what}: requests failed across the stop:\n{summary:#}\n{}",
        logs()
    );
    assert_eq!(summary["ok"], total, "{what}: {summary}");
}

/// Every kind of traffic node2's agent carries works: inbound HBONE (client on node1 →
/// server), inbound plaintext (outsider on node1 and legacy on node2 → server, through
/// sk_lookup and the agent's 15006 listener), and outbound (server → client's echo server,
/// through node2's 15001 and a tunnel). The app sees each client's own address, which only
/// the agent's delivery gives it (sk_lookup drops a SYN that finds no agent listener).
fn assert_node2_serves(tb: &Testbed, logs: &dyn Fn() -> String) {
    let server = IpAddr::V4(tb.pod("server").ipv4);
    for pod in ["client", "outsider", "legacy"] {
        let src = tb.pod(pod).ipv4;
        let r = tb.request(pod, server, PEER_PORT, None).unwrap();
        assert!(
            r.data().starts_with(&format!("peer={src}:")),
            "{pod} → server:{PEER_PORT} through node2's agent: {r:?}\n{}",
            logs()
        );
    }
    let client = IpAddr::V4(tb.pod("client").ipv4);
    let echo = tb
        .request("server", client, LOAD_PORT, Some("outbound"))
        .unwrap();
    assert_eq!(
        echo.data(),
        "outbound",
        "server → client:{LOAD_PORT} through node2's agent: {echo:?}\n{}",
        logs()
    );
}

/// `/status` `agent` section of whoever answers on `node`'s admin socket.
fn agent_section(tb: &Testbed, node: &str) -> Value {
    tb.admin_get(node, "/status").unwrap()["agent"].clone()
}

fn log_text(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The hand-over and drain lines of an agent's log, for the test's output.
fn handover_lines(path: &Path) -> String {
    log_text(path)
        .lines()
        .filter(|l| {
            [
                "superseded",
                "current again",
                "taken back",
                "handed",
                "drain",
                "SIGTERM",
            ]
            .iter()
            .any(|k| l.contains(k))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn a_second_agent_stopped_again_hands_the_node_back_to_the_first() {
    let mut tb = testbed();
    let server = IpAddr::V4(tb.pod("server").ipv4);
    let _server_echo = tb.start_echo_server("server", LOAD_PORT).unwrap();
    let _client_echo = tb.start_echo_server("client", LOAD_PORT).unwrap();
    let sock = tb.admin_socket("node2");
    let first = tb.agent_pid("node2").unwrap();
    let first_log = tb.node("node2").log.clone();
    assert_eq!(socket_owner(&sock), Some(first));
    let no_logs = || String::new();
    assert_node2_serves(&tb, &no_logs);

    let second = start_second(&mut tb, "node2");
    let second_log = second.log.clone();
    let logs = || {
        format!(
            "first agent (pid {first}):\n{}\nsecond agent (pid {}):\n{}",
            tail(&log_text(&first_log), 25),
            second.pid,
            tail(&log_text(&second_log), 25)
        )
    };
    // The second agent is current: it serves what the kernel steers.
    assert_node2_serves(&tb, &logs);
    let gen_second = agent_section(&tb, "node2")["generation"].as_u64();

    // Inbound plaintext (outsider, node1 → server) and HBONE (client → server) under load
    // while the second agent is stopped the way an operator stops it.
    let mut plain = start_load(&tb, "outsider", server);
    let mut hbone = start_load(&tb, "client", server);
    assert!(tb.signal_pid(second.pid, Signal::SIGTERM));
    assert!(
        tb.wait_pid_exit(second.pid, Duration::from_secs(30)),
        "the second agent still runs 30 s after SIGTERM:\n{}",
        logs()
    );
    assert!(
        tb.agent_running("node2"),
        "the first agent died:\n{}",
        logs()
    );

    // The first agent owns the admin socket again and serves everything.
    assert_eventually!(
        timeout = Duration::from_secs(3),
        socket_owner(&sock) == Some(first),
        "node2's admin socket is served by {:?}, not by the first agent (pid {first}):\n{}",
        socket_owner(&sock),
        logs()
    );
    assert_no_failed(&mut plain, "inbound plaintext outsider → server", &logs);
    assert_no_failed(&mut hbone, "inbound HBONE client → server", &logs);
    assert_node2_serves(&tb, &logs);
    let agent = agent_section(&tb, "node2");
    assert_eq!(agent["pid"], first, "{agent}");
    assert_eq!(agent["current"], true, "{agent}");
    assert!(
        agent["generation"].as_u64() > gen_second,
        "the first agent did not take a generation newer than the second's ({gen_second:?}): {agent}"
    );
    eprintln!(
        "handover: first agent:\n{}\nhandover: second agent:\n{}",
        handover_lines(&first_log),
        handover_lines(&second_log)
    );
    let text = log_text(&first_log);
    assert!(
        text.contains("superseded") && text.contains("current again"),
        "the first agent's log does not say it was superseded and took over again:\n{}",
        tail(&text, 30)
    );
    assert!(
        log_text(&second_log).contains("handed the node back"),
        "{}",
        logs()
    );

    // Once the first agent is stopped too, its socket goes and the pods fail closed.
    tb.stop_agent("node2", Signal::SIGTERM).unwrap();
    assert!(
        !sock.exists(),
        "the last agent left its admin socket behind"
    );
    let seen = tb.peer_log("server").len();
    let r = tb.request("outsider", server, PEER_PORT, None).unwrap();
    assert!(!r.data().contains("peer="), "bypass with no agent: {r:?}");
    assert_eq!(tb.peer_log("server").len(), seen);
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn the_first_agent_stopped_leaves_the_second_serving() {
    let mut tb = testbed();
    let server = IpAddr::V4(tb.pod("server").ipv4);
    let _server_echo = tb.start_echo_server("server", LOAD_PORT).unwrap();
    let _client_echo = tb.start_echo_server("client", LOAD_PORT).unwrap();
    let sock = tb.admin_socket("node2");
    let first = tb.agent_pid("node2").unwrap();
    let first_log = tb.node("node2").log.clone();

    let second = start_second(&mut tb, "node2");
    let second_log = second.log.clone();
    let logs = || {
        format!(
            "first agent (pid {first}):\n{}\nsecond agent (pid {}):\n{}",
            tail(&log_text(&first_log), 25),
            second.pid,
            tail(&log_text(&second_log), 25)
        )
    };
    let mut plain = start_load(&tb, "outsider", server);
    let mut hbone = start_load(&tb, "client", server);
    assert!(tb.signal_pid(first, Signal::SIGTERM));
    assert!(
        tb.wait_pid_exit(first, Duration::from_secs(30)),
        "the first agent still runs 30 s after SIGTERM:\n{}",
        logs()
    );
    tb.forget_agent("node2");
    assert!(second.running(), "the second agent died:\n{}", logs());

    assert_eq!(
        socket_owner(&sock),
        Some(second.pid),
        "the first agent's exit took the admin socket:\n{}",
        logs()
    );
    assert_no_failed(&mut plain, "inbound plaintext outsider → server", &logs);
    assert_no_failed(&mut hbone, "inbound HBONE client → server", &logs);
    assert_node2_serves(&tb, &logs);
    let agent = agent_section(&tb, "node2");
    assert_eq!(agent["pid"], second.pid, "{agent}");
    assert_eq!(agent["current"], true, "{agent}");
    assert!(
        !log_text(&second_log).contains("current again"),
        "the second agent had to take the node back although it never lost it:\n{}",
        logs()
    );
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn a_second_agent_killed_hands_the_node_back_to_the_first() {
    let mut tb = testbed();
    let _client_echo = tb.start_echo_server("client", LOAD_PORT).unwrap();
    let server = IpAddr::V4(tb.pod("server").ipv4);
    let outsider = tb.pod("outsider").ipv4;
    let sock = tb.admin_socket("node2");
    let first = tb.agent_pid("node2").unwrap();
    let first_log = tb.node("node2").log.clone();
    let second = start_second(&mut tb, "node2");
    let second_log = second.log.clone();
    let logs = || {
        format!(
            "first agent (pid {first}):\n{}\nsecond agent (pid {}):\n{}",
            tail(&log_text(&first_log), 25),
            second.pid,
            tail(&log_text(&second_log), 25)
        )
    };
    // Killed (an OOM kill in a rollout): no drain, no hand-back, its entry and its stale
    // admin socket stay; the first agent sees its lock go and takes the node back.
    let t = std::time::Instant::now();
    assert!(tb.signal_pid(second.pid, Signal::SIGKILL));
    assert!(tb.wait_pid_exit(second.pid, Duration::from_secs(10)));
    let served = ambit_e2e::eventually(Duration::from_secs(10), || {
        tb.request("outsider", server, PEER_PORT, None)
            .ok()
            .filter(|r| r.data().starts_with(&format!("peer={outsider}:")))
    });
    let recovered = t.elapsed();
    eprintln!(
        "handover: inbound plaintext served again {recovered:?} after SIGKILL of the second agent"
    );
    assert!(
        served.is_some(),
        "inbound plaintext not served 10 s after the second agent was killed:\n{}",
        logs()
    );
    assert_eventually!(
        timeout = Duration::from_secs(3),
        socket_owner(&sock) == Some(first),
        "node2's admin socket is served by {:?}, not by the first agent (pid {first}):\n{}",
        socket_owner(&sock),
        logs()
    );
    assert_node2_serves(&tb, &logs);
    assert_eq!(agent_section(&tb, "node2")["current"], true);
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn a_second_agent_that_cannot_start_leaves_the_first_untouched() {
    let mut tb = testbed();
    let _client_echo = tb.start_echo_server("client", LOAD_PORT).unwrap();
    // The first agent holds metricsListen; a second one with the same config cannot bind it.
    tb.restart_agent_with("node2", "metricsListen: 127.0.0.1:15020\n")
        .unwrap();
    let sock = tb.admin_socket("node2");
    let first = tb.agent_pid("node2").unwrap();
    let first_log = tb.node("node2").log.clone();
    let mut second = tb.start_successor("node2").unwrap();
    assert!(
        second.wait_exit(Duration::from_secs(60)),
        "the second agent started although metricsListen is taken:\n{}",
        tail(&second.output(), 20)
    );
    assert!(
        second.output().contains("metricsListen"),
        "{}",
        tail(&second.output(), 20)
    );
    let logs = || {
        format!(
            "first agent (pid {first}):\n{}\nsecond agent:\n{}",
            tail(&log_text(&first_log), 25),
            tail(&second.output(), 25)
        )
    };
    assert_eq!(
        socket_owner(&sock),
        Some(first),
        "the failed second agent took the admin socket:\n{}",
        logs()
    );
    assert_node2_serves(&tb, &logs);
    assert!(
        !log_text(&first_log).contains("superseded"),
        "the failed second agent claimed the node:\n{}",
        logs()
    );
}
