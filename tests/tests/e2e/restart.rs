//! Agent lifecycle: `POST /drain` (and SIGTERM) stop new connections at once, let open ones
//! finish up to `drainDeadlineMs`, then the agent exits with its programs still pinned (the
//! pods fail closed); and a zero-downtime restart of both agents under steady cross-node load
//! (a second agent per node takes over through SO_REUSEPORT and the SOCKHASH, the first is
//! terminated and drains) loses no request.
//!
//! Long-lived connections across a restart: they stay on the agents that accepted them and are
//! carried for up to `drainDeadlineMs` after SIGTERM, then closed (EOF or reset, never a hang);
//! clients reconnect to the new agents.
#![allow(
    clippy::unwrap_used,
    reason = "test bodies panic with a line number (STYLE.md §7)"
)]
use std::net::IpAddr;
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ambit_e2e::ops::{tail, Proc};
use ambit_e2e::{assert_eventually, both_modes, testbed, Testbed, ECHO_PORT, PEER_PORT};
use nix::sys::signal::Signal;
use serde_json::Value;

/// Port of the load script's asyncio echo server in the server pod.
const LOAD_PORT: u16 = 9100;
/// Steady load: new connections per second (`AMBIT_E2E_RESTART_RATE` overrides it: under qemu's
/// TCG every process start costs 30-250 ms and the python client cannot open 200 per second),
/// and for how long.
const RATE: u32 = 200;
const SECONDS: u32 = 30;

fn rate() -> u32 {
    std::env::var("AMBIT_E2E_RESTART_RATE")
        .ok()
        .and_then(|r| r.parse().ok())
        .filter(|r| *r > 0)
        .unwrap_or(RATE)
}

fn wall() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// `drainDeadlineMs` of `node`'s agent, from `/config_dump`.
fn drain_deadline(tb: &Testbed, node: &str) -> Duration {
    let d = tb.admin_get(node, "/config_dump").unwrap();
    Duration::from_millis(d["config"]["drainDeadlineMs"].as_u64().unwrap())
}

fn pins_present(tb: &Testbed, node: &str) -> bool {
    std::fs::read_dir(&tb.node(node).pin_dir).is_ok_and(|mut d| d.next().is_some())
}

/// A ping client in `pod` on one connection to `ip:port`, once its first echo came back.
fn start_pinger(tb: &Testbed, pod: &str, ip: IpAddr, port: u16, seconds: u32) -> Proc {
    let args = [
        "ping".to_string(),
        ip.to_string(),
        port.to_string(),
        "--interval".into(),
        "0.2".into(),
        "--seconds".into(),
        seconds.to_string(),
    ];
    let mut p = tb.start_load_script(pod, &args).unwrap();
    p.wait_line(Duration::from_secs(30), |v| v.get("ping").cloned())
        .unwrap();
    p
}

/// The pinger's last successful ping (wall time) and its `end` line, once it ended.
fn pinger_end(p: &mut Proc, timeout: Duration) -> (f64, Value) {
    let end = p
        .wait_line(timeout, |v| v.get("end").map(|_| v.clone()))
        .unwrap();
    let last = p
        .json_lines()
        .iter()
        .filter(|v| v.get("ping").is_some())
        .filter_map(|v| v["wall"].as_f64())
        .fold(0.0, f64::max);
    (last, end)
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn drain_refuses_new_connections_lets_open_ones_finish_then_exits_fail_closed() {
    let mut tb = testbed();
    let server = IpAddr::V4(tb.pod("server").ipv4);

    // Without open connections a drained agent exits at once.
    let pid2 = tb.agent_pid("node2").unwrap();
    let t = Instant::now();
    let r = tb.admin_http("node2", "POST", "/drain").unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json().unwrap()["draining"], true);
    assert!(
        tb.wait_pid_exit(pid2, Duration::from_secs(10)),
        "node2's agent still runs 10 s after POST /drain with nothing open"
    );
    let idle_exit = t.elapsed();
    assert!(idle_exit < Duration::from_secs(3), "took {idle_exit:?}");
    assert!(
        !tb.admin_socket("node2").exists(),
        "the exited agent left its admin socket behind"
    );
    tb.start_agent("node2").unwrap();
    tb.wait_agents_ready(Duration::from_secs(60)).unwrap();

    // A long-lived connection through node1's agent, pinging every 200 ms.
    let mut pinger = start_pinger(&tb, "client", server, ECHO_PORT, 60);
    let deadline = drain_deadline(&tb, "node1");
    let pid1 = tb.agent_pid("node1").unwrap();
    let log = tb.node("node1").log.clone();
    let seen = tb.peer_log("server").len();

    let t_drain = wall();
    let t = Instant::now();
    let r = tb.admin_http("node1", "POST", "/drain").unwrap();
    assert_eq!(r.status, 200, "{}", r.text());

    // While draining: not ready, and new connections fail fast without reaching the app.
    let ready = tb.admin_http("node1", "GET", "/healthz/ready").unwrap();
    assert_eq!(ready.status, 503, "{}", ready.text());
    assert!(ready.text().contains("draining"), "{}", ready.text());
    let t_new = Instant::now();
    let new = tb.request("client", server, PEER_PORT, None).unwrap();
    assert!(
        new.error().is_some() && !new.data().contains("peer="),
        "a new connection during the drain: {new:?}"
    );
    assert!(
        t_new.elapsed() < Duration::from_secs(3),
        "a new connection during the drain took {:?} to fail",
        t_new.elapsed()
    );
    assert!(
        t.elapsed() < deadline,
        "the checks above outlasted the drain deadline ({:?}); the test proves nothing",
        t.elapsed()
    );

    // The open connection keeps working until the deadline, then the agent exits.
    assert!(
        tb.wait_pid_exit(pid1, deadline + Duration::from_secs(10)),
        "node1's agent still runs {:?} after POST /drain",
        deadline + Duration::from_secs(10)
    );
    let exited = t.elapsed();
    let t_exit = wall();
    assert!(
        exited + Duration::from_millis(300) >= deadline,
        "the agent exited after {exited:?}, before the {deadline:?} drain deadline, with a connection open"
    );
    let (last_ping, end) = pinger_end(&mut pinger, Duration::from_secs(15));
    assert!(
        last_ping > t_drain + deadline.as_secs_f64() * 0.8,
        "the open connection stopped carrying data {:.1} s into a {deadline:?} drain: {end}",
        last_ping - t_drain
    );
    assert!(
        end["end"] == "eof" || end["end"] == "reset",
        "the open connection did not end cleanly when the agent exited: {end}"
    );
    let end_wall = end["wall"].as_f64().unwrap();
    assert!(
        end_wall < t_exit + 3.0,
        "the open connection ended {:.1} s after the agent exited",
        end_wall - t_exit
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("drain started"), "{}", tail(&text, 20));
    assert!(
        text.contains("drain deadline reached"),
        "{}",
        tail(&text, 20)
    );

    // Gone, but the programs stay: the pod fails closed instead of bypassing.
    assert!(pins_present(&tb, "node1"), "pins went away with the agent");
    let r = tb.request("client", server, PEER_PORT, None).unwrap();
    assert!(!r.data().contains("peer="), "bypass after the drain: {r:?}");
    assert_eq!(
        tb.peer_log("server").len(),
        seen,
        "the server app saw a connection during or after the drain"
    );

    // A new agent serves again.
    tb.start_agent("node1").unwrap();
    tb.wait_agents_ready(Duration::from_secs(60)).unwrap();
    let client = tb.pod("client").ipv4;
    assert_eventually!(
        timeout = Duration::from_secs(20),
        tb.request("client", server, PEER_PORT, None)
            .is_ok_and(|r| r.data().starts_with(&format!("peer={client}:"))),
        "the restarted agent does not serve:\n{}",
        tb.agent_logs(30)
    );
}

/// Something the test did, with its wall time, for the failure report.
struct Timeline(Vec<(f64, String)>);

impl Timeline {
    fn note(&mut self, what: impl Into<String>) -> f64 {
        let t = wall();
        let what = what.into();
        eprintln!("restart: {what}");
        self.0.push((t, what));
        t
    }

    fn show(&self, since: f64) -> String {
        self.0
            .iter()
            .map(|(t, w)| format!("  {:7.3} s  {w}", t - since))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Replaces `node`'s agent without downtime: starts a second agent with the same config,
/// waits until it owns the admin socket and is ready (its listeners bound beside the old
/// ones), then SIGTERMs the old one by PID and waits for it to drain and exit.
fn replace_agent(tb: &mut Testbed, node: &str, events: &mut Timeline) -> Proc {
    let old = tb.agent_pid(node).unwrap();
    let sock = tb.admin_socket(node);
    let ino = std::fs::metadata(&sock).unwrap().ino();
    let deadline = drain_deadline(tb, node);
    let redirects = tb.status(node).unwrap().kernel("connect4_redirect");
    let new = tb.start_successor(node).unwrap();
    events.note(format!("{node}: second agent started (pid {})", new.pid));
    let ready = ambit_e2e::eventually(Duration::from_secs(60), || {
        let ours = std::fs::metadata(&sock).is_ok_and(|m| m.ino() != ino);
        let ready = ours
            && tb
                .admin_http(node, "GET", "/healthz/ready")
                .is_ok_and(|r| r.status == 200);
        ready.then_some(())
    });
    assert!(
        ready.is_some() && new.running(),
        "{node}'s second agent never became ready:\n{}",
        tail(&new.output(), 40)
    );
    events.note(format!("{node}: second agent ready"));
    let after = tb.status(node).unwrap().kernel("connect4_redirect");
    assert!(
        after >= redirects,
        "{node}: kernel counters restarted ({redirects:?} -> {after:?}): pinned maps not reused"
    );
    assert!(
        tb.signal_pid(old, Signal::SIGTERM),
        "{node}: old agent gone"
    );
    let t = Instant::now();
    events.note(format!("{node}: SIGTERM to the old agent (pid {old})"));
    assert!(
        tb.wait_pid_exit(old, deadline + Duration::from_secs(15)),
        "{node}'s old agent still runs {:?} after SIGTERM",
        deadline + Duration::from_secs(15)
    );
    events.note(format!(
        "{node}: old agent exited after {:.2} s",
        t.elapsed().as_secs_f64()
    ));
    tb.forget_agent(node);
    assert!(
        new.running(),
        "{node}'s second agent died:\n{}",
        tail(&new.output(), 40)
    );
    new
}

both_modes!(restart_under_load_loses_no_request);
fn restart_under_load_loses_no_request(mut tb: Testbed) {
    let server = IpAddr::V4(tb.pod("server").ipv4);
    let _echo = tb.start_echo_server("server", LOAD_PORT).unwrap();
    let hi = tb.request("client", server, LOAD_PORT, Some("hi")).unwrap();
    assert_eq!(hi.data(), "hi", "{hi:?}");
    let deadline = drain_deadline(&tb, "node2");
    let mut events = Timeline(Vec::new());

    let rate_wanted = rate();
    let mut pinger = start_pinger(&tb, "client", server, LOAD_PORT, SECONDS + 30);
    let args = [
        "load".to_string(),
        server.to_string(),
        LOAD_PORT.to_string(),
        "--rate".into(),
        rate_wanted.to_string(),
        "--seconds".into(),
        SECONDS.to_string(),
        "--timeout".into(),
        "5".into(),
    ];
    let mut load = tb.start_load_script("client", &args).unwrap();
    let t0 = events.note("load started");
    let progressed = |load: &mut Proc, secs: f64| {
        load.wait_line(Duration::from_secs(60), |v| {
            v["progress"]["t"].as_f64().filter(|t| *t >= secs)
        })
        .unwrap()
    };
    progressed(&mut load, 5.0);
    events.note("5 s of load");

    let old_node2_log = tb.node("node2").log.clone();
    let new2 = replace_agent(&mut tb, "node2", &mut events);
    let t_sig2 = events
        .0
        .iter()
        .find(|(_, w)| w.starts_with("node2: SIGTERM"))
        .unwrap()
        .0;
    let now = wall() - t0;
    progressed(&mut load, now + 3.0);
    let old_node1_log = tb.node("node1").log.clone();
    let new1 = replace_agent(&mut tb, "node1", &mut events);

    let summary = load
        .wait_line(Duration::from_secs(u64::from(SECONDS) + 60), |v| {
            v.get("summary").cloned()
        })
        .unwrap();
    events.note("load finished");
    eprintln!("restart: load summary {summary}");
    let logs = || {
        let pick = |path: &std::path::Path| {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            text.lines()
                .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("drain"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        format!(
            "old node1 agent:\n{}\nold node2 agent:\n{}\nnew node1 agent:\n{}\nnew node2 agent:\n{}",
            tail(&pick(&old_node1_log), 30),
            tail(&pick(&old_node2_log), 30),
            tail(&pick(&new1.log), 30),
            tail(&pick(&new2.log), 30),
        )
    };
    // The long-lived connection: carried by the old agents through node2's drain, then
    // closed cleanly at the deadline.
    let (last_ping, end) = pinger_end(&mut pinger, Duration::from_secs(60));
    eprintln!(
        "restart: long-lived connection: last echo {:.2} s after node2's SIGTERM, then {end}",
        last_ping - t_sig2
    );
    let total = u64::from(rate_wanted * SECONDS);
    assert_eq!(summary["requests"], total, "{summary}");
    assert_eq!(
        summary["failed"],
        0,
        "requests failed across the restart:\n{summary:#}\ntimeline:\n{}\n{}",
        events.show(t0),
        logs()
    );
    assert_eq!(summary["ok"], total, "{summary}");
    let rate = summary["rate"].as_f64().unwrap();
    assert!(
        rate >= f64::from(rate_wanted) * 0.75,
        "the load ran at {rate} req/s, not the steady {rate_wanted} req/s the test is about: \
         {summary}"
    );

    assert!(
        last_ping > t_sig2 + deadline.as_secs_f64() * 0.5,
        "the long-lived connection stopped {:.2} s after node2's SIGTERM, well before the \
         {deadline:?} drain deadline: {end}\ntimeline:\n{}",
        last_ping - t_sig2,
        events.show(t0)
    );
    assert!(
        end["end"] == "eof" || end["end"] == "reset" || end["end"] == "done",
        "the long-lived connection did not end cleanly: {end}\ntimeline:\n{}",
        events.show(t0)
    );

    // The new agents serve on their own: fresh connections and a new long-lived one.
    assert!(new1.running() && new2.running());
    assert!(pins_present(&tb, "node1") && pins_present(&tb, "node2"));
    let echo = tb
        .request("client", server, LOAD_PORT, Some("after"))
        .unwrap();
    assert_eq!(echo.data(), "after", "{echo:?}");
    let conns = tb.admin_get("node2", "/status").unwrap();
    assert_eq!(conns["node"], "node2");
    eprintln!("restart: timeline\n{}", events.show(t0));
}
