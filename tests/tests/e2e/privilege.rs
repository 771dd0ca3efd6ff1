//! Privilege boundaries: only root may use the admin socket (refusals counted), enrolled pods
//! cannot bind the agent's ports in their netns (cgroup/bind4+6, also while the agent is down),
//! and the agent's own connections from a pod's netns are never captured as the pod's.
#![allow(
    clippy::unwrap_used,
    reason = "test bodies panic with a line number (STYLE.md §7)"
)]
use std::net::IpAddr;
use std::time::Duration;

use ambit_e2e::capture::UNDERLAY;
use ambit_e2e::ops::{file_len, last_json, read_from};
use ambit_e2e::peer::{admin_peer, NOBODY_DAC_OVERRIDE};
use ambit_e2e::{
    assert_eventually, testbed, testbed_with, unique_marker, Options, Testbed, ECHO_PORT,
    TUNNEL_PORT,
};
use nix::sys::signal::Signal;
use serde_json::Value;

/// The agent's listener ports inside an enrolled pod's netns.
const AGENT_PORTS: [u16; 3] = [15001, 15006, TUNNEL_PORT];

/// Tries TCP binds in a pod and reports `{"<addr>:<port>": "ok" | "<errno name>"}`; also a UDP
/// bind of the tunnel port (the guard is about TCP listeners only).
const BINDS_PY: &str = r#"
import errno, json, socket, sys
out = {}
for port in [int(p) for p in sys.argv[1:]]:
    for fam, addr in [(socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::"), (socket.AF_INET, "127.0.0.1")]:
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((addr, port))
            s.listen(1)
            out[f"{addr}:{port}"] = "ok"
        except OSError as e:
            out[f"{addr}:{port}"] = errno.errorcode.get(e.errno, str(e.errno))
        finally:
            s.close()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    u.bind(("0.0.0.0", 15008))
    out["udp:15008"] = "ok"
except OSError as e:
    out["udp:15008"] = errno.errorcode.get(e.errno, str(e.errno))
print(json.dumps(out))
"#;

/// Runs [`BINDS_PY`] in `pod` for `ports`.
fn binds(tb: &Testbed, pod: &str, ports: &[u16]) -> Value {
    let python = ambit_e2e::servers::python();
    let mut argv = vec![
        python.to_string_lossy().into_owned(),
        "-c".into(),
        BINDS_PY.into(),
    ];
    argv.extend(ports.iter().map(u16::to_string));
    let out = tb.exec(pod, &argv, Duration::from_secs(20)).unwrap();
    last_json(&out, &format!("bind probe in {pod}")).unwrap()
}

/// Asserts every agent-port TCP bind in `report` ended with `want` (`ok` or an errno name).
fn assert_agent_ports(report: &Value, want: &str, who: &str) {
    for port in AGENT_PORTS {
        for addr in ["0.0.0.0", "::", "127.0.0.1"] {
            assert_eq!(
                report[format!("{addr}:{port}")],
                want,
                "{who}: bind {addr}:{port}: {report}"
            );
        }
    }
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn enrolled_pods_cannot_bind_the_agent_ports_unenrolled_pods_can() {
    let mut tb = testbed_with(Options::capture_only());
    let log = tb.node("node1").log.clone();
    let off = file_len(&log);
    let denied0 = tb.kernel_counter("node1", "bind_denied");
    let pod0 = tb.pod_counter("node1", "client", "bind_denied");

    // Enrolled: every TCP bind to an agent port fails with EPERM, on any address; other ports
    // and UDP are the pod's.
    let report = binds(&tb, "client", &[15001, 15006, 15008, 15009]);
    assert_agent_ports(&report, "EPERM", "enrolled client");
    for addr in ["0.0.0.0", "::", "127.0.0.1"] {
        assert_eq!(report[format!("{addr}:15009")], "ok", "{report}");
    }
    assert_eq!(report["udp:15008"], "ok", "{report}");
    let denied = AGENT_PORTS.len() as u64 * 3;
    assert_eq!(
        tb.kernel_counter("node1", "bind_denied") - denied0,
        denied,
        "kernel bind_denied"
    );
    assert_eq!(
        tb.pod_counter("node1", "client", "bind_denied") - pod0,
        denied,
        "client's bind_denied"
    );
    assert_eventually!(
        read_from(&log, off).contains("pod tried to bind an agent port; refused"),
        "node1 did not log the refused bind:\n{}",
        read_from(&log, off)
    );

    // Not enrolled: the pod owns every port; nothing is counted.
    let report = binds(&tb, "outsider", &AGENT_PORTS);
    assert_agent_ports(&report, "ok", "unenrolled outsider");
    assert_eq!(tb.kernel_counter("node1", "bind_denied") - denied0, denied);

    // The guard is pinned: with the agent dead (its listeners gone), the ports stay closed to
    // the pod, so nothing can sit where the restarted agent must listen.
    tb.stop_agent("node1", Signal::SIGKILL).unwrap();
    let report = binds(&tb, "client", &AGENT_PORTS);
    assert_agent_ports(&report, "EPERM", "enrolled client, agent dead");
    // The restarted agent's own binds in the pod netns pass (it enrolls the pod again).
    tb.start_agent("node1").unwrap();
    tb.wait_agents_ready(Duration::from_secs(30)).unwrap();
    let server = IpAddr::V4(tb.pod("server").ipv4);
    let r = tb.request("client", server, ECHO_PORT, Some("x")).unwrap();
    assert_eq!(r.data(), "x", "{r:?}");
    let report = binds(&tb, "client", &AGENT_PORTS);
    assert_agent_ports(&report, "EPERM", "enrolled client, agent restarted");
    assert!(
        tb.kernel_counter("node1", "bind_denied") >= denied * 2,
        "bind_denied survives the restart (pinned map)"
    );

    // Unenrolled at run time: the guard lets go of the pod.
    tb.set_enrolled("client", false).unwrap();
    assert_eventually!(
        tb.status("node1")
            .is_ok_and(|s| s.pod_state("client") != Some("enrolled")),
        "client still enrolled"
    );
    let report = binds(&tb, "client", &AGENT_PORTS);
    assert_agent_ports(&report, "ok", "client after unenrollment");
}

/// `ambit_admin_refused_peers_total` of `node`.
fn refused_metric(tb: &Testbed, node: &str) -> f64 {
    tb.metrics(node)
        .unwrap()
        .sum("ambit_admin_refused_peers_total", &[])
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn admin_socket_refuses_non_root_peers_and_counts_them() {
    let tb = testbed_with(Options::capture_only());
    let node = "node1";
    let sock = tb.admin_socket(node);
    let log = tb.node(node).log.clone();
    let off = file_len(&log);
    let before = tb.admin_get(node, "/status").unwrap()["admin"]["refused_peers"]
        .as_u64()
        .unwrap();
    let metric_before = refused_metric(&tb, node);

    for round in 1..=2u64 {
        let peer = admin_peer(&sock, &NOBODY_DAC_OVERRIDE).unwrap();
        assert_eq!(peer["uid"], 65534, "{peer}");
        assert_eq!(peer["connect"], "ok", "the file mode should pass: {peer}");
        assert!(
            peer.get("reply").is_none_or(|r| r == ""),
            "a non-root peer got an answer: {peer}"
        );
        assert_eventually!(
            tb.admin_get(node, "/status").unwrap()["admin"]["refused_peers"].as_u64()
                == Some(before + round),
            "refusal {round} not counted"
        );
    }
    // Root's own requests (the status reads above) are not counted.
    assert_eq!(refused_metric(&tb, node) - metric_before, 2.0);
    let text = read_from(&log, off);
    assert_eq!(
        text.matches("admin connection from a non-root peer refused")
            .count(),
        2,
        "{text}"
    );
    assert!(
        text.contains("65534"),
        "the log names the peer's uid: {text}"
    );
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn the_agents_own_connections_are_not_captured_by_the_pods() {
    let tb = testbed();
    let server = IpAddr::V4(tb.pod("server").ipv4);
    let (client_ip, server_ip) = (tb.pod("client").ipv4, tb.pod("server").ipv4);
    let k = |node: &str, name: &str| tb.kernel_counter(node, name);
    let (redirect1, mark1) = (
        k("node1", "connect4_redirect"),
        k("node1", "connect_exempt_mark"),
    );
    let (redirect2, mark2) = (
        k("node2", "connect4_redirect"),
        k("node2", "connect_exempt_mark"),
    );
    let bypass2 = k("node2", "lookup_bypass");
    let pod_redirected = tb.pod_counter("node1", "client", "redirected");

    let cap = tb.capture("node1", UNDERLAY).unwrap();
    let marker = unique_marker();
    const N: u64 = 5;
    for i in 0..N {
        let text = format!("{marker} {i}");
        let r = tb
            .request("client", server, ECHO_PORT, Some(&text))
            .unwrap();
        assert_eq!(r.data(), text, "{r:?}");
    }
    let captured = cap.stop().unwrap();

    // node1: the app's connections are redirected, one each; the agent's HBONE dial from the
    // client's netns (a socket of a captured pod's netns, in the pods' cgroup tree) is exempt
    // by its mark. Were it captured, it would count as a redirect and loop into 15001.
    assert_eq!(
        k("node1", "connect4_redirect") - redirect1,
        N,
        "node1 redirects"
    );
    assert_eq!(
        tb.pod_counter("node1", "client", "redirected") - pod_redirected,
        N
    );
    let dials = k("node1", "connect_exempt_mark") - mark1;
    assert!(
        (1..=N).contains(&dials),
        "node1 HBONE dials exempted: {dials}"
    );
    // It left the node as the pod's own connection to the server's tunnel port, encrypted.
    let tunnel_flows: Vec<_> = captured
        .with_payload()
        .filter(|f| {
            f.src.ip() == IpAddr::V4(client_ip)
                && f.dst.ip() == IpAddr::V4(server_ip)
                && f.dst.port() == TUNNEL_PORT
        })
        .collect();
    assert!(
        !tunnel_flows.is_empty(),
        "no client -> server:15008 flow on the underlay:\n{}",
        captured.summary()
    );
    assert_eq!(
        captured.count(marker.as_bytes()),
        0,
        "plaintext on the underlay"
    );

    // node2: each delivery to the app (a connect from the server's netns) is exempt by its
    // mark and its SYN is left to the app by sk_lookup, never steered back into the agent.
    assert_eq!(
        k("node2", "connect4_redirect") - redirect2,
        0,
        "node2 redirects"
    );
    assert_eq!(
        k("node2", "connect_exempt_mark") - mark2,
        N,
        "node2 deliveries"
    );
    assert_eq!(k("node2", "lookup_bypass") - bypass2, N, "node2 bypasses");
    let tunnel_bytes: usize = tunnel_flows.iter().map(|f| f.bytes.len()).sum();
    eprintln!(
        "agent traffic: {dials} HBONE dial(s) exempted, {} tunnel flow(s), {tunnel_bytes} bytes, 0 markers",
        tunnel_flows.len()
    );
}
