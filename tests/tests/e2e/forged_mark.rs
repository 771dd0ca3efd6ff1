//! The agent's socket marks are not a way out of capture: a process in the enrolled client pod
//! running as nobody with only CAP_NET_RAW (what containers get by default) sets SO_MARK to the
//! agent's outbound or delivery mark and connects. It is captured and tunnelled like any other
//! socket of the pod (nothing of it crosses the underlay in plaintext), counted as a forged
//! mark, and a DENY AuthorizationPolicy on the client's principal still holds.
#![allow(
    clippy::unwrap_used,
    reason = "test bodies panic with a line number (STYLE.md §7)"
)]
use std::net::IpAddr;
use std::time::Duration;

use ambit_e2e::capture::UNDERLAY;
use ambit_e2e::{testbed, unique_marker, Testbed, ECHO_PORT};
use serde_json::Value;

/// The agent's outbound and delivery marks (the defaults of `outboundMark` / `deliverMark`).
const MARKS: [u32; 2] = [0x539, 0x53a];
/// CAP_NET_RAW as a bit of /proc/self/status `CapEff`.
const CAP_NET_RAW: u64 = 1 << 13;

/// Sets SO_MARK (if not 0), connects, sends, half-closes and reads to EOF; prints one JSON line
/// with who it ran as and what it got.
const PROBE: &str = r#"
import json, os, socket, sys
host, port, mark, send = sys.argv[1], int(sys.argv[2]), int(sys.argv[3], 0), sys.argv[4]
status = dict(l.split(":\t", 1) for l in open("/proc/self/status").read().splitlines() if ":\t" in l)
out = {"uid": os.getuid(), "cap_eff": int(status["CapEff"], 16)}
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
s.settimeout(5)
try:
    if mark:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
    out["mark"] = s.getsockopt(socket.SOL_SOCKET, socket.SO_MARK)
    s.connect((host, port))
    s.sendall(send.encode())
    s.shutdown(socket.SHUT_WR)
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    out["data"] = data.decode(errors="replace")
except OSError as e:
    out["error"] = f"{type(e).__name__}: {e}"
print(json.dumps(out), flush=True)
"#;

/// Runs [`PROBE`] in `pod` as uid/gid 65534 with CAP_NET_RAW its only capability.
fn probe(tb: &Testbed, pod: &str, ip: IpAddr, port: u16, mark: u32, send: &str) -> Value {
    let python = ambit_e2e::servers::python();
    let argv = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all,+net_raw",
        "--ambient-caps=+net_raw",
        "--bounding-set=-all,+net_raw",
        "--",
        &python.to_string_lossy(),
        "-c",
        PROBE,
        &ip.to_string(),
        &port.to_string(),
        &format!("{mark:#x}"),
        send,
    ];
    let out = tb.exec(pod, &argv, Duration::from_secs(30)).unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().rev().find(|l| l.starts_with('{'));
    let report: Value = line
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| {
            panic!(
                "probe printed no report ({}): {stdout} {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        });
    // The premise: an unprivileged process with only CAP_NET_RAW can set the agent's mark.
    assert_eq!(report["uid"], 65534, "{report}");
    assert_eq!(report["cap_eff"], CAP_NET_RAW, "{report}");
    assert_eq!(report["mark"], mark, "SO_MARK was not set: {report}");
    report
}

/// An AuthorizationPolicy denying the client's principal at the server.
fn deny_client(tb: &Testbed) -> String {
    let principal = tb.pod("client").identity();
    let principal = principal.trim_start_matches("spiffe://");
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-client\n  \
         namespace: default\nspec:\n  selector:\n    matchLabels:\n      app: server\n  \
         action: DENY\n  rules:\n  - from:\n    - source:\n        principals: [\"{principal}\"]\n"
    )
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn a_pod_socket_with_the_agents_mark_is_captured_and_tunnelled() {
    let mut tb = testbed();
    let server = IpAddr::V4(tb.pod("server").ipv4);
    let legacy = IpAddr::V4(tb.pod("legacy").ipv4);
    // Read from a snapshot: an agent without the counter shows the bug below, not a panic here.
    let counter = |tb: &Testbed| {
        tb.kernel_snapshot("node1")
            .get("connect_forged_mark")
            .copied()
    };
    let forged = counter(&tb).unwrap_or(0);
    let accepted = tb.proxy_counter("node1", "client", "outbound_accepted");
    let markers: Vec<String> = MARKS.iter().map(|_| unique_marker()).collect();
    let control = unique_marker();

    let cap = tb.capture("node1", UNDERLAY).unwrap();
    let replies: Vec<Value> = MARKS
        .iter()
        .zip(&markers)
        .map(|(mark, marker)| probe(&tb, "client", server, ECHO_PORT, *mark, marker))
        .collect();
    // Control: plaintext between unenrolled pods is visible to this capture.
    let plain = tb
        .request("outsider", legacy, ECHO_PORT, Some(&control))
        .unwrap();
    assert_eq!(plain.data(), control);
    let seen = cap.stop().unwrap();
    for marker in &markers {
        assert_eq!(
            seen.count(marker.as_bytes()),
            0,
            "a forged-mark socket's bytes crossed the underlay in plaintext:\n{}",
            seen.summary()
        );
    }
    assert!(
        seen.count(control.as_bytes()) >= 2,
        "the capture missed the plaintext control:\n{}",
        seen.summary()
    );
    // Both were carried (through the client's agent), and the kernel counted the forged marks.
    for ((mark, marker), r) in MARKS.iter().zip(&markers).zip(&replies) {
        assert_eq!(r["data"], marker.as_str(), "mark {mark:#x}: {r}");
    }
    assert_eq!(
        tb.proxy_counter("node1", "client", "outbound_accepted") - accepted,
        MARKS.len() as u64
    );
    assert_eq!(
        counter(&tb).map(|n| n - forged),
        Some(MARKS.len() as u64),
        "connect_forged_mark"
    );
    assert_eq!(
        tb.pod_counter("node1", "client", "forged_mark"),
        MARKS.len() as u64
    );

    // A DENY on the client's principal holds for a forged-mark socket too.
    tb.apply(&deny_client(&tb)).unwrap();
    let denied = tb.proxy_counter("node2", "server", "authz_denied");
    for mark in MARKS {
        let r = probe(&tb, "client", server, ECHO_PORT, mark, "DENY-ESCAPED");
        assert!(
            !r["data"].as_str().unwrap_or("").contains("DENY-ESCAPED"),
            "mark {mark:#x} escaped the DENY: {r}"
        );
    }
    assert_eq!(
        tb.proxy_counter("node2", "server", "authz_denied") - denied,
        MARKS.len() as u64,
        "the server's agent refused them by policy"
    );
}
