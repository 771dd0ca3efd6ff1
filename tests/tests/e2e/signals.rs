//! Signals to the long-running processes (`ambit run`, `ambit ca`): SIGHUP (the configuration
//! file is re-read and checked; what changed is logged as needing a restart), SIGUSR1 (a state
//! summary in the log) and SIGUSR2 (ignored) leave them running and serving, each with a log
//! line; SIGTERM and SIGINT are logged and drain, as before.
#![allow(
    clippy::unwrap_used,
    reason = "test bodies panic with a line number (STYLE.md §7)"
)]
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use ambit_e2e::ops::{file_len, merge_config, read_from, tail};
use ambit_e2e::{testbed, Testbed, PEER_PORT};
use nix::sys::signal::Signal;

/// How long a handled signal may take to show in the log.
const LOG_WAIT: Duration = Duration::from_secs(5);

/// Sends `sig` to `pid` and returns the first line that `log` gains afterwards containing
/// every one of `needles`, or `None` within [`LOG_WAIT`].
fn signal_and_wait_line(
    tb: &Testbed,
    pid: i32,
    sig: Signal,
    log: &Path,
    needles: &[&str],
) -> Option<String> {
    let from = file_len(log);
    assert!(tb.signal_pid(pid, sig), "pid {pid} is not running");
    ambit_e2e::eventually(LOG_WAIT, || {
        read_from(log, from)
            .lines()
            .find(|l| needles.iter().all(|n| l.contains(n)))
            .map(str::to_string)
    })
}

/// The client's request through both agents reaches the server app with its own address.
fn assert_serves(tb: &Testbed, what: &str) {
    let server = IpAddr::V4(tb.pod("server").ipv4);
    let client = tb.pod("client").ipv4;
    let r = tb.request("client", server, PEER_PORT, None).unwrap();
    assert!(
        r.data().starts_with(&format!("peer={client}:")),
        "after {what}: {r:?}\n{}",
        tb.agent_logs(20)
    );
    for node in ["node1", "node2"] {
        let ready = tb.admin_http(node, "GET", "/healthz/ready").unwrap();
        assert_eq!(ready.status, 200, "{node} after {what}: {}", ready.text());
    }
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn hup_usr1_usr2_leave_the_agent_serving_each_with_a_log_line() {
    let tb = testbed();
    let pid = tb.agent_pid("node1").unwrap();
    let node = tb.node("node1").clone();
    let log = node.log.clone();
    let cases: [(Signal, &[&str]); 3] = [
        (Signal::SIGHUP, &["SIGHUP", "configuration unchanged"]),
        // node1 serves one enrolled pod (client).
        (Signal::SIGUSR1, &["SIGUSR1", "state summary", "enrolled=1"]),
        (Signal::SIGUSR2, &["SIGUSR2", "ignored"]),
    ];
    for (sig, needles) in cases {
        let line = signal_and_wait_line(&tb, pid, sig, &log, needles);
        assert!(
            line.is_some(),
            "no log line with {needles:?} within {LOG_WAIT:?} of {sig}; agent running: {}\n{}",
            tb.agent_running("node1"),
            tail(&std::fs::read_to_string(&log).unwrap_or_default(), 20)
        );
        assert!(tb.agent_running("node1"), "{sig} ended the agent");
        assert_serves(&tb, sig.as_str());
    }

    // SIGHUP reads the file again: a changed setting is named (it takes a restart), a broken
    // file is reported and the running configuration stays.
    let original = std::fs::read_to_string(&node.config).unwrap();
    std::fs::write(
        &node.config,
        merge_config(&original, "drainDeadlineMs: 7000\n"),
    )
    .unwrap();
    let line = signal_and_wait_line(
        &tb,
        pid,
        Signal::SIGHUP,
        &log,
        &["SIGHUP", "drainDeadlineMs", "restart"],
    );
    assert!(
        line.is_some(),
        "SIGHUP after a config change: no line naming drainDeadlineMs\n{}",
        tail(&std::fs::read_to_string(&log).unwrap_or_default(), 20)
    );
    std::fs::write(&node.config, "node: [unclosed\n").unwrap();
    let line = signal_and_wait_line(&tb, pid, Signal::SIGHUP, &log, &["SIGHUP", "cannot"]);
    assert!(
        line.is_some(),
        "SIGHUP with a broken config: no error line\n{}",
        tail(&std::fs::read_to_string(&log).unwrap_or_default(), 20)
    );
    std::fs::write(&node.config, &original).unwrap();
    assert!(tb.agent_running("node1"), "a SIGHUP ended the agent");
    let d = tb.admin_get("node1", "/config_dump").unwrap();
    assert_eq!(
        d["config"]["drainDeadlineMs"], 5000,
        "SIGHUP applied a setting that needs a restart"
    );
    assert_serves(&tb, "the SIGHUPs");
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn the_ca_keeps_serving_on_hup_usr1_usr2_and_term_int_drain_with_a_log_line() {
    let mut tb = testbed();
    let ca = tb
        .state()
        .processes
        .iter()
        .find(|p| p.role == "ca")
        .map(|p| p.pid)
        .unwrap();
    let ca_log = tb.state().ca().unwrap().log.clone();
    let cases: [(Signal, &[&str]); 3] = [
        (Signal::SIGHUP, &["SIGHUP", "configuration unchanged"]),
        (Signal::SIGUSR1, &["SIGUSR1", "state summary"]),
        (Signal::SIGUSR2, &["SIGUSR2", "ignored"]),
    ];
    for (sig, needles) in cases {
        let line = signal_and_wait_line(&tb, ca, sig, &ca_log, needles);
        assert!(
            line.is_some(),
            "no CA log line with {needles:?} within {LOG_WAIT:?} of {sig}; CA running: {}\n{}",
            tb.ca_running(),
            tail(&std::fs::read_to_string(&ca_log).unwrap_or_default(), 20)
        );
        assert!(tb.ca_running(), "{sig} ended the CA");
    }

    // SIGTERM and SIGINT to the agents: logged, then the drain as before.
    for (node, sig) in [("node1", Signal::SIGTERM), ("node2", Signal::SIGINT)] {
        let pid = tb.agent_pid(node).unwrap();
        let log = tb.node(node).log.clone();
        let from = file_len(&log);
        assert!(tb.signal_pid(pid, sig));
        assert!(
            tb.wait_pid_exit(pid, Duration::from_secs(15)),
            "{node}'s agent still runs 15 s after {sig}"
        );
        let text = read_from(&log, from);
        let signal_line = text.lines().position(|l| l.contains(sig.as_str()));
        let drain_line = text.lines().position(|l| l.contains("drain started"));
        assert!(
            signal_line.is_some() && drain_line.is_some() && signal_line < drain_line,
            "{node}: {sig} is not logged before the drain:\n{}",
            tail(&text, 20)
        );
        assert!(text.contains("agent stopped"), "{}", tail(&text, 20));
        tb.forget_agent(node);
    }

    // New agents get their certificates from the CA that took the signals above.
    tb.start_agent("node1").unwrap();
    tb.start_agent("node2").unwrap();
    tb.wait_agents_ready(Duration::from_secs(60)).unwrap();
    assert_serves(&tb, "the CA's signals and the agents' restart");

    let from = file_len(&ca_log);
    tb.stop_ca(Signal::SIGTERM).unwrap();
    let text = read_from(&ca_log, from);
    let signal_line = text.lines().position(|l| l.contains("SIGTERM"));
    let stop_line = text.lines().position(|l| l.contains("ca stopping"));
    assert!(
        signal_line.is_some() && stop_line.is_some() && signal_line < stop_line,
        "the CA's SIGTERM is not logged before it stops:\n{}",
        tail(&text, 20)
    );
}
