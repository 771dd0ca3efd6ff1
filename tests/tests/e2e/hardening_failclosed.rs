//! Fail closed under STRICT: agents SIGKILLed while `client` → `server` traffic runs never let
//! a plaintext byte onto the underlay, new connections fail instead of bypassing the mesh, and
//! restarted agents enroll, fetch certificates and carry the traffic again on their own.
#![allow(
    clippy::unwrap_used,
    reason = "test bodies panic with a line number (STYLE.md §7)"
)]
use std::net::IpAddr;
use std::process::Child;
use std::time::{Duration, Instant, SystemTime};

use ambit_e2e::capture::UNDERLAY;
use ambit_e2e::ops::json_lines;
use ambit_e2e::policy::PeerAuthentication as Pa;
use ambit_e2e::{testbed, unique_marker, Testbed, ECHO_PORT, PEER_PORT, TUNNEL_PORT};
use nix::sys::signal::Signal;
use serde_json::Value;

/// Continuous traffic: a new connection every `interval` seconds for `seconds` seconds, each
/// sending `MARKER i`, half-closing and expecting exactly that echo. One JSON line per
/// connection: `i`, start `t0`, end `t1` (unix seconds), `ok`, `err`.
const TRAFFIC_PY: &str = r#"
import json, socket, sys, time
host, port, marker, seconds, interval = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4]), float(sys.argv[5])
end = time.time() + seconds
i = 0
while time.time() < end:
    msg = f"{marker} {i}\n".encode()
    t0 = time.time()
    out = {"i": i, "t0": t0}
    try:
        s = socket.create_connection((host, port), timeout=3)
        s.settimeout(3)
        s.sendall(msg)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while True:
            c = s.recv(65536)
            if not c:
                break
            data += c
        s.close()
        out["ok"] = data == msg
        if not out["ok"]:
            out["err"] = f"echo {data[:60]!r}"
    except OSError as e:
        out["ok"] = False
        out["err"] = f"{type(e).__name__}: {e}"
    out["t1"] = time.time()
    print(json.dumps(out), flush=True)
    i += 1
    time.sleep(interval)
"#;

/// One connection of the traffic.
#[derive(Debug, Clone)]
struct Attempt {
    t0: f64,
    t1: f64,
    ok: bool,
    err: String,
}

/// The traffic process in the client pod and its log.
struct Traffic {
    child: Child,
    log: std::path::PathBuf,
}

impl Traffic {
    fn start(tb: &Testbed, marker: &str, seconds: u32) -> Self {
        let st = tb.state();
        let script = st.dir.join("failclosed_traffic.py");
        std::fs::write(&script, TRAFFIC_PY).unwrap();
        let log = st.dir.join("failclosed_traffic.log");
        let pod = tb.pod("client");
        let server = tb.pod("server").ipv4.to_string();
        let argv = [
            ambit_e2e::servers::python().to_string_lossy().into_owned(),
            script.to_string_lossy().into_owned(),
            server,
            ECHO_PORT.to_string(),
            marker.to_string(),
            seconds.to_string(),
            "0.05".into(),
        ];
        let child =
            ambit_e2e::process::spawn_in(&pod.cgroup, &pod.netns_path(), &argv, &log, &[]).unwrap();
        Self { child, log }
    }

    fn attempts(&self) -> Vec<Attempt> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        json_lines(&text)
            .iter()
            .filter(|v| v.get("t1").is_some())
            .map(|v: &Value| Attempt {
                t0: v["t0"].as_f64().unwrap(),
                t1: v["t1"].as_f64().unwrap(),
                ok: v["ok"].as_bool().unwrap(),
                err: v["err"].as_str().unwrap_or_default().to_string(),
            })
            .collect()
    }

    /// Waits until `n` connections that started after `since` succeeded; returns how long
    /// that took from `since`.
    fn wait_ok_after(&self, tb: &Testbed, since: f64, n: usize, timeout: Duration) -> f64 {
        let deadline = Instant::now() + timeout;
        loop {
            let ok: Vec<Attempt> = self
                .attempts()
                .into_iter()
                .filter(|a| a.ok && a.t0 >= since)
                .collect();
            if ok.len() >= n {
                return ok[n - 1].t1 - since;
            }
            if Instant::now() >= deadline {
                let tail: Vec<_> = self.attempts().into_iter().rev().take(5).collect();
                panic!(
                    "only {} good connections since {since} after {timeout:?}; last: {tail:?}\n{}",
                    ok.len(),
                    tb.agent_logs(30)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wall() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Plaintext from unenrolled `outsider` to the server must not reach the app (no listener of
/// a dead agent to refuse it, no bypass either).
fn assert_outsider_refused(tb: &Testbed) {
    let server = IpAddr::V4(tb.pod("server").ipv4);
    let seen = tb.peer_log("server").len();
    let r = tb.request("outsider", server, PEER_PORT, None).unwrap();
    assert!(
        !r.data().contains("peer="),
        "outsider reached the app: {r:?}"
    );
    assert_eq!(
        tb.peer_log("server").len(),
        seen,
        "the app accepted plaintext"
    );
}

/// Kills `node`'s agent mid-traffic, checks that connections started while it was dead all
/// failed, restarts it and waits until traffic flows again. Returns (failed attempts in the
/// dead window, seconds from restart to 5 good connections).
fn kill_and_restart(tb: &mut Testbed, traffic: &Traffic, node: &str) -> (usize, f64) {
    let pod = if node == "node1" { "client" } else { "server" };
    let id = tb.pod(pod).identity();
    let serial_before = tb.cert(node, &id).and_then(|c| c.serial).unwrap();
    traffic.wait_ok_after(tb, wall(), 5, Duration::from_secs(20));

    tb.stop_agent(node, Signal::SIGKILL).unwrap();
    let dead = wall();
    assert_outsider_refused(tb);
    std::thread::sleep(Duration::from_secs(2));
    let restart = wall();
    tb.start_agent(node).unwrap();
    tb.wait_agents_ready(Duration::from_secs(30)).unwrap();
    let recovered = traffic.wait_ok_after(tb, restart, 5, Duration::from_secs(30));

    let window: Vec<Attempt> = traffic
        .attempts()
        .into_iter()
        .filter(|a| a.t0 >= dead && a.t1 <= restart)
        .collect();
    assert!(
        window.len() >= 5,
        "too few connections while {node}'s agent was dead: {window:?}"
    );
    let passed: Vec<&Attempt> = window.iter().filter(|a| a.ok).collect();
    assert!(
        passed.is_empty(),
        "connections succeeded while {node}'s agent was dead (bypass): {passed:?}"
    );
    // Enrollment and certificates came back without anyone acting: a new agent, a new key.
    let st = tb.status(node).unwrap();
    assert_eq!(st.pod_state(pod), Some("enrolled"), "{}", st.0);
    let cert = tb.cert(node, &id).unwrap();
    assert_eq!(cert.state, "available", "{cert:?}");
    assert_ne!(
        cert.serial.unwrap(),
        serial_before,
        "{node} reused a certificate"
    );
    let errors: std::collections::BTreeSet<String> = window
        .iter()
        .map(|a| a.err.split(':').next().unwrap_or_default().to_string())
        .collect();
    eprintln!(
        "{node} killed: {} connections failed in {:.1} s dead ({errors:?}); traffic back {recovered:.2} s after restart",
        window.len(),
        restart - dead
    );
    (window.len(), recovered)
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn killed_agents_under_strict_never_leak_plaintext_and_recover_unaided() {
    let mut tb = testbed();
    tb.apply(&Pa::new("default", "default").mode("STRICT").yaml())
        .unwrap();
    let (mode, _, _) = tb
        .peer_auth_mode("node2", "default/server", ECHO_PORT)
        .unwrap();
    assert_eq!(mode, "STRICT");

    let cap = tb.capture("node1", UNDERLAY).unwrap();
    // Control: plaintext between unenrolled pods crosses the same link, and the capture sees it.
    let control = unique_marker();
    let legacy = IpAddr::V4(tb.pod("legacy").ipv4);
    let r = tb
        .request("outsider", legacy, ECHO_PORT, Some(&control))
        .unwrap();
    assert_eq!(r.data(), control);

    let marker = unique_marker();
    let traffic = Traffic::start(&tb, &marker, 120);
    // Server side first: the client's agent is alive and must not fall back to plaintext.
    let (failed2, back2) = kill_and_restart(&mut tb, &traffic, "node2");
    // Then the client side: captured connects find no listener.
    let (failed1, back1) = kill_and_restart(&mut tb, &traffic, "node1");
    let attempts = traffic.attempts();
    drop(traffic);
    let captured = cap.stop().unwrap();

    assert!(
        captured.count(control.as_bytes()) >= 1,
        "the capture missed the control plaintext:\n{}",
        captured.summary()
    );
    let ok = attempts.iter().filter(|a| a.ok).count();
    assert_eq!(
        captured.count(marker.as_bytes()),
        0,
        "plaintext of the STRICT traffic on the underlay:\n{}",
        captured.summary()
    );
    let tunnel_bytes: usize = captured
        .with_payload()
        .filter(|f| f.dst.port() == TUNNEL_PORT || f.src.port() == TUNNEL_PORT)
        .map(|f| f.bytes.len())
        .sum();
    assert!(tunnel_bytes > 0, "no HBONE traffic captured");
    let other: Vec<_> = captured
        .with_payload()
        .filter(|f| {
            f.dst.port() != TUNNEL_PORT
                && f.src.port() != TUNNEL_PORT
                && f.dst.port() != 15012
                && f.src.port() != 15012
                && !(f.src.ip() == IpAddr::V4(tb.pod("outsider").ipv4)
                    || f.dst.ip() == IpAddr::V4(tb.pod("outsider").ipv4))
        })
        .map(|f| format!("{} -> {} ({} bytes)", f.src, f.dst, f.bytes.len()))
        .collect();
    assert!(
        other.is_empty(),
        "payload outside HBONE, the CA and the control: {other:?}"
    );
    eprintln!(
        "{} connections, {ok} ok; {failed2} failed with node2 dead (back in {back2:.2} s), \
         {failed1} with node1 dead (back in {back1:.2} s); underlay: {} segments, {tunnel_bytes} \
         HBONE bytes, 0 markers",
        attempts.len(),
        captured.segments.len()
    );
}
