//! The operator's view of an agent, through its real admin socket (raw HTTP/1.1 on a unix
//! socket) and the `ambit` CLI: every endpoint's content while known traffic flows, run-time
//! log levels, bad requests (404/405/400, never a hang), the socket's root-only access, the
//! Prometheus figures after known traffic (bytes counted = bytes sent), and the JSON access log.
#![allow(
    clippy::unwrap_used,
    reason = "test bodies panic with a line number (STYLE.md §7)"
)]
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ambit_e2e::ops::{file_len, json_lines, read_from, unix_exchange, Metrics, ADMIN_TIMEOUT};
use ambit_e2e::policy::PeerAuthentication as Pa;
use ambit_e2e::{
    assert_eventually, eventually, testbed, testbed_with, unique_marker, Options, Testbed,
    ECHO_PORT, PEER_PORT,
};
use serde_json::Value;

/// How long counters and log lines get to show a connection that has closed.
const SETTLE: Duration = Duration::from_secs(15);

fn rows<'a>(v: &'a Value, key: &str) -> &'a Vec<Value> {
    v[key]
        .as_array()
        .unwrap_or_else(|| panic!("no array `{key}` in {v:#}"))
}

/// The first row of `/connections` on `node` matching `pred`.
fn connection(tb: &Testbed, node: &str, pred: impl Fn(&Value) -> bool) -> Option<Value> {
    let v = tb.admin_get(node, "/connections").unwrap();
    rows(&v, "connections").iter().find(|c| pred(c)).cloned()
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn every_endpoint_reports_what_the_agent_knows() {
    let tb = testbed();
    let (client, server) = (tb.pod("client").clone(), tb.pod("server").clone());
    let s_ip = IpAddr::V4(server.ipv4);
    let (client_id, server_id) = (client.identity(), server.identity());

    // /status: the node, its enrolled pod, the inventory it reads, kernel counters.
    let st = tb.admin_get("node2", "/status").unwrap();
    assert_eq!(st["node"], "node2", "{st:#}");
    let pod = rows(&st, "pods")
        .iter()
        .find(|p| p["name"] == "server" || p["name"] == "default/server")
        .unwrap_or_else(|| panic!("/status lists no server pod: {st:#}"));
    assert_eq!(pod["state"], "enrolled", "{st:#}");
    assert_eq!(
        st["inventory"]["source"],
        tb.state().inventory.display().to_string(),
        "{st:#}"
    );
    assert!(st["inventory"]["loads"].as_u64() >= Some(1), "{st:#}");
    assert!(
        st["kernel"]["connect4_redirect"].is_u64() && st["kernel"]["lookup_steer"].is_u64(),
        "no kernel counters in /status: {st:#}"
    );

    // /workloads: every pod of the inventory, with which one this agent serves.
    let w = tb.admin_get("node2", "/workloads").unwrap();
    let find = |name: &str| {
        rows(&w, "workloads")
            .iter()
            .find(|x| x["name"] == name)
            .unwrap_or_else(|| panic!("/workloads has no {name}: {w:#}"))
            .clone()
    };
    let (ws, wc, wl) = (find("server"), find("client"), find("legacy"));
    assert_eq!(
        (&ws["local"], &ws["enrolled"], &ws["node"]),
        (
            &Value::Bool(true),
            &Value::Bool(true),
            &Value::from("node2")
        )
    );
    assert_eq!(ws["identity"], server_id.as_str());
    assert!(
        rows(&ws, "ips")
            .iter()
            .any(|i| *i == server.ipv4.to_string().as_str()),
        "{ws:#}"
    );
    assert_eq!(
        (&wc["local"], &wc["node"]),
        (&Value::Bool(false), &Value::from("node1"))
    );
    assert_eq!(wl["enrolled"], false);
    assert_eq!(rows(&w, "workloads").len(), tb.state().pods.len(), "{w:#}");

    // /certs: exactly the local enrolled identity, available.
    let certs = tb.admin_get("node2", "/certs").unwrap();
    let ids: Vec<&str> = rows(&certs, "certs")
        .iter()
        .filter_map(|c| c["identity"].as_str())
        .collect();
    assert_eq!(ids, [server_id.as_str()], "{certs:#}");
    let cert = &rows(&certs, "certs")[0];
    assert_eq!(cert["state"], "available", "{cert:#}");
    assert!(
        cert["notAfter"].is_string() && cert["serial"].is_string(),
        "{cert:#}"
    );

    // /connections: a connection held open shows on both sides with identities and bytes.
    let marker = unique_marker();
    let held = tb.hold("client", s_ip, ECHO_PORT, &marker).unwrap();
    let n = marker.len() as u64;
    let client_ip = client.ipv4.to_string();
    let is_held = |c: &Value| {
        c["direction"] == "inbound"
            && c["src"].as_str().is_some_and(|s| s.starts_with(&client_ip))
            && c["dst"] == format!("{s_ip}:{ECHO_PORT}").as_str()
    };
    let inbound = eventually(SETTLE, || {
        connection(&tb, "node2", is_held)
            .filter(|c| c["bytes_sent"] == n && c["bytes_received"] == n)
    })
    .unwrap_or_else(|| {
        panic!(
            "node2 never listed the held connection with {n} bytes each way: {:#}",
            tb.admin_get("node2", "/connections").unwrap()
        )
    });
    assert_eq!(inbound["pod"], "default/server", "{inbound:#}");
    assert_eq!(inbound["security"], "mutual_tls", "{inbound:#}");
    assert_eq!(inbound["src_identity"], client_id.as_str(), "{inbound:#}");
    assert_eq!(inbound["dst_identity"], server_id.as_str(), "{inbound:#}");
    assert!(
        inbound["age_s"].as_f64().is_some_and(|a| a >= 0.0),
        "{inbound:#}"
    );
    let outbound = eventually(SETTLE, || {
        connection(&tb, "node1", |c| {
            c["direction"] == "outbound" && c["dst"] == format!("{s_ip}:{ECHO_PORT}").as_str()
        })
        .filter(|c| c["bytes_sent"] == n && c["bytes_received"] == n)
    })
    .unwrap_or_else(|| {
        panic!(
            "node1 never listed the held connection: {:#}",
            tb.admin_get("node1", "/connections").unwrap()
        )
    });
    assert_eq!(outbound["pod"], "default/client", "{outbound:#}");
    assert_eq!(outbound["security"], "mutual_tls", "{outbound:#}");
    assert_eq!(outbound["src_identity"], client_id.as_str(), "{outbound:#}");
    assert_eq!(outbound["dst_identity"], server_id.as_str(), "{outbound:#}");
    assert_eq!(
        outbound["src"].as_str().unwrap(),
        held.reply.0["sock"].as_str().unwrap(),
        "{outbound:#}"
    );

    // /config_dump: everything above plus the effective config, in one document.
    let dump = tb.admin_get("node2", "/config_dump").unwrap();
    for key in [
        "config",
        "status",
        "workloads",
        "certs",
        "connections",
        "policies",
    ] {
        assert!(!dump[key].is_null(), "config_dump has no `{key}`: {dump:#}");
    }
    assert_eq!(dump["config"]["node"], "node2");
    assert_eq!(
        dump["config"]["adminSocket"],
        tb.admin_socket("node2").display().to_string()
    );
    assert_eq!(
        dump["config"]["inventory"],
        tb.state().inventory.display().to_string()
    );
    assert_eq!(dump["status"]["node"], "node2");
    assert!(
        rows(&dump, "connections").iter().any(is_held),
        "config_dump misses the open connection: {:#}",
        dump["connections"]
    );
    assert_eq!(dump["certs"][0]["identity"], server_id.as_str());
    assert_eq!(rows(&dump, "workloads").len(), tb.state().pods.len());
    assert_eq!(dump["policies"][0]["pod"], "default/server");

    drop(held);
    assert_eventually!(
        timeout = SETTLE,
        connection(&tb, "node2", is_held).is_none(),
        "the closed connection stays in node2's table"
    );

    // /policies: the enrolled pod's effective PeerAuthentication (nothing applied).
    let p = tb.admin_get("node2", "/policies").unwrap();
    let sp = rows(&p, "policies")
        .iter()
        .find(|x| x["pod"] == "default/server")
        .unwrap_or_else(|| panic!("{p:#}"));
    assert_eq!(
        sp["peer_authentication"]["default"]["mode"], "PERMISSIVE",
        "{p:#}"
    );

    // /explain, also with an IPv6 destination (brackets percent-encoded).
    let e = tb
        .admin_get(
            "node1",
            &format!("/explain?from=default/client&to={s_ip}:{ECHO_PORT}"),
        )
        .unwrap();
    assert_eq!(e["outbound"]["route"], "tunnel", "{e:#}");
    assert_eq!(e["inbound"]["pod"], "default/server", "{e:#}");
    assert!(
        e["verdict"]
            .as_str()
            .is_some_and(|v| v.contains("tunnelled")),
        "{e:#}"
    );
    let e6 = tb
        .admin_get(
            "node1",
            &format!(
                "/explain?from=default%2Fclient&to=%5B{}%5D:{ECHO_PORT}",
                server.ipv6
            ),
        )
        .unwrap();
    assert_eq!(e6["to"], format!("[{}]:{ECHO_PORT}", server.ipv6), "{e6:#}");
    assert_eq!(e6["outbound"]["route"], "tunnel", "{e6:#}");

    // /metrics: Prometheus text with Istio's families.
    let m = tb.admin_http("node2", "GET", "/metrics").unwrap();
    assert_eq!(m.status, 200);
    let ct = m.header("content-type").unwrap_or_default().to_string();
    assert!(
        ct.contains("openmetrics") || ct.contains("text/plain"),
        "content-type {ct}"
    );
    let parsed = Metrics::parse(&m.text()).unwrap();
    for name in [
        "istio_tcp_connections_opened_total",
        "istio_tcp_connections_closed_total",
        "istio_tcp_sent_bytes_total",
        "istio_tcp_received_bytes_total",
        "ambit_datapath_total",
        "ambit_certificate_expiry_timestamp_seconds",
    ] {
        assert!(parsed.has(name), "no {name} in /metrics:\n{}", m.text());
    }

    // /healthz/ready: 200 once programs, inventory and certificates are in place.
    for node in ["node1", "node2"] {
        let r = tb.admin_http(node, "GET", "/healthz/ready").unwrap();
        let v = r.json().unwrap();
        assert_eq!(r.status, 200, "{node}: {v:#}");
        assert_eq!(v["ready"], true, "{node}: {v:#}");
        assert_eq!(v["waiting_for"], serde_json::json!([]), "{node}: {v:#}");
    }
}

/// Whether `text` (log lines) has the outbound path's debug line `route decided`.
fn has_debug_route_line(text: &str) -> bool {
    text.lines()
        .any(|l| l.contains("DEBUG") && l.contains("route decided"))
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn the_log_level_changes_at_run_time() {
    let tb = testbed_with(Options::capture_only());
    let server = IpAddr::V4(tb.pod("server").ipv4);
    let log = tb.node("node1").log.clone();
    let echo = |tb: &Testbed| {
        let r = tb
            .request("client", server, ECHO_PORT, Some("lvl"))
            .unwrap();
        assert_eq!(r.data(), "lvl", "{r:?}");
    };

    let level = |tb: &Testbed| tb.admin_get("node1", "/logging").unwrap()["level"].clone();
    assert_eq!(level(&tb), "info");
    // Control: at info, a connection writes no debug line.
    let off = file_len(&log);
    echo(&tb);
    assert!(!has_debug_route_line(&read_from(&log, off)));

    let r = tb
        .admin_http("node1", "POST", "/logging?level=debug")
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json().unwrap()["level"], "debug");
    assert_eq!(level(&tb), "debug");
    let off = file_len(&log);
    echo(&tb);
    assert_eventually!(
        has_debug_route_line(&read_from(&log, off)),
        "no debug line after POST /logging?level=debug:\n{}",
        read_from(&log, off)
    );

    // A filter that does not parse is refused and changes nothing; so is a POST without one.
    for bad in [
        "/logging?level=info,ambit%3Dloud",
        "/logging",
        "/logging?lvl=debug",
    ] {
        let r = tb.admin_http("node1", "POST", bad).unwrap();
        assert_eq!(r.status, 400, "POST {bad}: {}", r.text());
        assert!(r.json().unwrap()["error"].is_string(), "{}", r.text());
    }
    assert_eq!(level(&tb), "debug");

    // Back to info, through the CLI this time: the debug lines stop.
    let out = tb.ambit_cli("node1", &["logging", "info"]).unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "info");
    assert_eq!(level(&tb), "info");
    let off = file_len(&log);
    echo(&tb);
    assert!(
        !has_debug_route_line(&read_from(&log, off)),
        "debug lines after going back to info:\n{}",
        read_from(&log, off)
    );
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn bad_requests_get_4xx_and_never_hang() {
    let tb = testbed_with(Options::capture_only());
    let node = "node2";
    let bad_before = tb.admin_get(node, "/status").unwrap()["admin"]["bad_requests"]
        .as_u64()
        .unwrap();
    let expect = |method: &str, target: &str, code: u16| {
        let r = tb.admin_http(node, method, target).unwrap();
        assert_eq!(r.status, code, "{method} {target}: {}", r.text());
        assert!(
            r.json().unwrap()["error"].is_string(),
            "{method} {target}: no JSON error: {}",
            r.text()
        );
    };
    expect("GET", "/nope", 404);
    expect("GET", "/status/extra", 404);
    expect("POST", "/nope", 404);
    expect("POST", "/status", 405);
    expect("DELETE", "/logging", 405);
    expect("PUT", "/metrics", 405);
    expect("GET", "/drain", 405);
    expect("POST", "/healthz/ready", 405);
    expect("GET", "/explain?to=x", 400);
    expect("GET", "/explain?from=default/client", 400);
    expect("GET", "/explain?from=default/client&to=not-an-address", 400);
    expect("GET", "/explain?from=default/client&to=10.2.0.2", 400);
    // A well-formed question about a pod that does not exist: not found.
    expect("GET", "/explain?from=default/nosuch&to=10.2.0.2:80", 404);
    let counted_400s = 4;

    let sock = tb.admin_socket(node);
    let raw = |bytes: &[u8]| unix_exchange(&sock, bytes, ADMIN_TIMEOUT);
    // Garbage (a TLS ClientHello start, NULs) and a broken request line: 400, then closed.
    for junk in [
        &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n"[..],
        b"\0\0\0\0\0\0\0\0\r\n\r\n",
        b"GET\r\n\r\n",
        b"GET /status HTTP/1.1\r\nHost: x\r\nBad Header Line\r\n\r\n",
    ] {
        let got = raw(junk).unwrap_or_else(|e| panic!("{junk:?}: {e:#}"));
        let text = String::from_utf8_lossy(&got);
        assert!(
            text.starts_with("HTTP/1.1 400"),
            "{junk:?} was answered with {text:?}, not 400"
        );
    }
    // Headers that never end, and a client that sends nothing: the agent closes (408/400 or
    // silently) instead of holding the connection forever; bounded by ADMIN_TIMEOUT.
    for stall in [&b"GET /status HTTP/1.1\r\nHost: x\r\n"[..], b""] {
        let got = raw(stall).unwrap_or_else(|e| {
            panic!("the admin socket held a stalled request open: {stall:?}: {e:#}")
        });
        let text = String::from_utf8_lossy(&got);
        assert!(
            text.is_empty() || text.starts_with("HTTP/1.1 4"),
            "{stall:?}: {text:?}"
        );
    }
    // An oversized header: refused, not buffered without end.
    let mut huge = b"GET /status HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 1 << 20));
    huge.extend_from_slice(b"\r\n\r\n");
    let got = raw(&huge).unwrap();
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 4"),
        "{text:?}"
    );

    // The agent keeps answering, and counted what it refused as malformed.
    let st = tb.admin_get(node, "/status").unwrap();
    assert_eq!(st["node"], node);
    let bad_after = st["admin"]["bad_requests"].as_u64().unwrap();
    assert!(
        bad_after >= bad_before + counted_400s,
        "bad_requests {bad_before} -> {bad_after}"
    );
    assert_eq!(
        tb.admin_http(node, "GET", "/healthz/ready").unwrap().status,
        200
    );
}

/// Connects to the admin socket from a Python client, as root or through `setpriv`, sends
/// `GET /status` and reports what happened as JSON (`uid`, `connect`, `reply`).
fn python_peer(socket: &std::path::Path, setpriv: &[&str]) -> Value {
    const PEER: &str = r#"
import json, os, socket, sys
out = {"uid": os.getuid()}
s = socket.socket(socket.AF_UNIX)
s.settimeout(8)
try:
    s.connect(sys.argv[1])
except OSError as e:
    out["connect"] = type(e).__name__
    print(json.dumps(out)); sys.exit(0)
out["connect"] = "ok"
try:
    s.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    data = b""
    while True:
        c = s.recv(65536)
        if not c:
            break
        data += c
    out["reply"] = data[:40].decode(errors="replace")
except OSError as e:
    out["io"] = type(e).__name__
print(json.dumps(out))
"#;
    // The system interpreter: one under root's home (pyenv) is out of another user's reach.
    let python = ambit_e2e::servers::python();
    let mut c = if setpriv.is_empty() {
        Command::new(&python)
    } else {
        let mut c = Command::new("setpriv");
        c.args(setpriv).arg(&python);
        c
    };
    c.arg("-c").arg(PEER).arg(socket).current_dir("/");
    let out = ambit_e2e::cmd::run(&mut c, Duration::from_secs(20)).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    json_lines(&text).pop().unwrap_or_else(|| {
        panic!(
            "peer printed no report ({}): {text} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn only_root_may_use_the_admin_socket() {
    let tb = testbed_with(Options::capture_only());
    let sock = tb.admin_socket("node2");
    let meta = std::fs::metadata(&sock).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600, "socket mode");
    assert_eq!(meta.uid(), 0, "socket owner");
    // The directory lets anyone through, so the socket's own mode is what keeps others out.
    let dir = std::fs::metadata(sock.parent().unwrap()).unwrap();
    assert_eq!(
        dir.permissions().mode() & 0o001,
        0o001,
        "testbed dir not o+x"
    );

    // Control: root gets an answer.
    let root = python_peer(&sock, &[]);
    assert_eq!(root["uid"], 0);
    assert!(
        root["reply"]
            .as_str()
            .is_some_and(|r| r.starts_with("HTTP/1.1 200")),
        "{root}"
    );

    // Another user cannot even connect: the file mode refuses it.
    let nobody = ["--reuid=65534", "--regid=65534", "--clear-groups"];
    let other = python_peer(&sock, &nobody);
    assert_eq!(other["uid"], 65534, "{other}");
    assert_eq!(other["connect"], "PermissionError", "{other}");

    // Another user that can pass the file mode (CAP_DAC_OVERRIDE) connects, and the agent's
    // peer-credential check closes the connection without an answer.
    let log = tb.node("node2").log.clone();
    let off = file_len(&log);
    let mut with_cap = nobody.to_vec();
    with_cap.extend(["--inh-caps=+dac_override", "--ambient-caps=+dac_override"]);
    let capped = python_peer(&sock, &with_cap);
    assert_eq!(capped["uid"], 65534, "{capped}");
    assert_eq!(
        capped["connect"], "ok",
        "CAP_DAC_OVERRIDE should pass the file mode: {capped}"
    );
    // Closed unanswered: EOF, or a reset / broken pipe when the close beat the request.
    assert!(
        capped.get("reply").is_none_or(|r| r == ""),
        "a non-root peer got an answer: {capped}"
    );
    assert_eventually!(
        read_from(&log, off).contains("non-root peer refused"),
        "node2 did not log the refused peer:\n{}",
        read_from(&log, off)
    );

    // The agent still answers root afterwards.
    assert_eq!(tb.admin_get("node2", "/status").unwrap()["node"], "node2");
}

/// `ambit ARGS` on `node` as an operator runs it: (exit code, stdout, stderr).
fn cli(tb: &Testbed, node: &str, args: &[&str]) -> (i32, String, String) {
    let out = tb.ambit_cli(node, args).unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn the_cli_prints_tables_json_and_exit_codes_scripts_can_use() {
    let mut tb = testbed();
    let (client, server) = (tb.pod("client").clone(), tb.pod("server").clone());
    let s_ip = IpAddr::V4(server.ipv4);
    let to = SocketAddr::new(s_ip, ECHO_PORT).to_string();
    let held = tb.hold("client", s_ip, ECHO_PORT, "cli").unwrap();
    assert_eventually!(!tb.connections("node2").unwrap().is_empty());

    // Readable output: what each command is for, exit code 0.
    let inventory = tb.state().inventory.display().to_string();
    let (cid, sid) = (client.identity(), server.identity());
    let cases: [(&[&str], Vec<&str>); 7] = [
        (
            &["status"],
            vec!["node node2", "default/server", "enrolled"],
        ),
        (
            &["workloads"],
            vec!["default/server", "default/client", &sid],
        ),
        (&["certs"], vec![&sid, "available"]),
        (&["connections"], vec!["inbound", "mutual_tls", &cid]),
        (&["policy"], vec!["default/server", "PERMISSIVE"]),
        (&["logging"], vec!["info"]),
        (&["metrics"], vec!["istio_tcp_connections_opened_total"]),
    ];
    for (args, want) in &cases {
        let (code, out, err) = cli(&tb, "node2", args);
        assert_eq!(code, 0, "ambit {args:?}: {out}{err}");
        for w in want {
            assert!(
                out.contains(w),
                "`ambit {}` does not show {w:?}:\n{out}",
                args.join(" ")
            );
        }
    }
    let (code, out, err) = cli(&tb, "node1", &["explain", "default/client", &to]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("tunnelled"), "{out}");

    // --json: one parseable document each.
    for args in [
        &["status"][..],
        &["workloads"],
        &["certs"],
        &["connections"],
        &["policy"],
        &["logging"],
        &["explain", "--from", "default/client", "--to", &to],
    ] {
        let mut a = args.to_vec();
        a.push("--json");
        let node = if args[0] == "explain" {
            "node1"
        } else {
            "node2"
        };
        let (code, out, err) = cli(&tb, node, &a);
        assert_eq!(code, 0, "ambit {a:?}: {err}");
        let v: Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("`ambit {}` is not JSON: {e}\n{out}", a.join(" ")));
        assert!(v.is_object(), "{v}");
    }
    drop(held);

    // Exit code 1: the connection would be refused (an AuthorizationPolicy denies the
    // client's principal on the server).
    tb.apply(&format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  \
         name: deny-client\n  namespace: default\nspec:\n  selector:\n    matchLabels:\n      \
         app: server\n  action: DENY\n  rules:\n  - from:\n    - source:\n        \
         principals: [\"{}\"]\n",
        cid.trim_start_matches("spiffe://")
    ))
    .unwrap();
    let (code, out, _) = cli(&tb, "node1", &["explain", "default/client", &to]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("refused") && out.contains("deny-client"),
        "{out}"
    );

    // Exit code 2: no agent behind the socket, for every command.
    let missing = tb.state().dir.join("no-such-agent.sock");
    let missing = missing.to_str().unwrap();
    for args in [
        &["status"][..],
        &["workloads"],
        &["certs"],
        &["connections"],
        &["policy"],
        &["logging"],
        &["logging", "debug"],
        &["metrics"],
        &["explain", "default/client", &to],
    ] {
        let out = ambit_e2e::cmd::run(
            Command::new(tb.agent_bin().unwrap())
                .args(args)
                .args(["--admin-socket", missing]),
            ADMIN_TIMEOUT,
        )
        .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "ambit {args:?}: {err}");
        assert!(
            err.contains(missing),
            "ambit {args:?} does not name the socket: {err}"
        );
    }

    // `ambit status` names the inventory it reads (checked last: see target/agent-bugs.md).
    let (_, out, _) = cli(&tb, "node2", &["status"]);
    assert!(
        out.contains(&inventory),
        "`ambit status` does not name the inventory {inventory}:\n{out}"
    );
}

/// Istio's labels of client → server over mTLS as `reporter` sees them.
fn mtls_labels<'a>(reporter: &'a str, client: &'a str, server: &'a str) -> [(&'a str, &'a str); 7] {
    [
        ("reporter", reporter),
        ("source_workload", "client"),
        ("source_principal", client),
        ("destination_workload", "server"),
        ("destination_principal", server),
        ("connection_security_policy", "mutual_tls"),
        ("response_flags", "-"),
    ]
}

/// How much `name` (summed over samples with `labels`) grew on `node` since `before`.
fn delta(tb: &Testbed, node: &str, before: &Metrics, name: &str, labels: &[(&str, &str)]) -> f64 {
    tb.metrics(node).unwrap().sum(name, labels) - before.sum(name, labels)
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn metrics_count_the_bytes_and_connections_of_known_traffic() {
    let mut tb = testbed();
    let (client, server) = (tb.pod("client").clone(), tb.pod("server").clone());
    let s_ip = IpAddr::V4(server.ipv4);
    let (client_id, server_id) = (client.identity(), server.identity());
    let src = mtls_labels("source", &client_id, &server_id);
    let dst = mtls_labels("destination", &client_id, &server_id);
    let m1 = tb.metrics("node1").unwrap();
    let m2 = tb.metrics("node2").unwrap();
    let redirects =
        |m: &Metrics| m.sum("ambit_datapath_total", &[("counter", "connect4_redirect")]);

    // Three connections: 123457 random bytes echoed, a marker echoed, and the peer report
    // (nothing sent, one line received).
    const BIG: u64 = 123_457;
    let t = tb
        .transfer("client", s_ip, ECHO_PORT, BIG as usize)
        .unwrap();
    assert_eq!(
        (t["sent"].as_u64(), t["recv"].as_u64()),
        (Some(BIG), Some(BIG)),
        "{t}"
    );
    let marker = unique_marker();
    let r = tb
        .request("client", s_ip, ECHO_PORT, Some(&marker))
        .unwrap();
    assert_eq!(r.data(), marker);
    let peer = tb.request("client", s_ip, PEER_PORT, None).unwrap();
    assert!(peer.data().starts_with("peer="), "{peer:?}");
    let (sent, recv) = (
        BIG + marker.len() as u64,
        BIG + marker.len() as u64 + peer.data().len() as u64,
    );

    for (node, before, labels) in [("node1", &m1, &src[..]), ("node2", &m2, &dst[..])] {
        assert_eventually!(
            timeout = SETTLE,
            delta(
                &tb,
                node,
                before,
                "istio_tcp_connections_closed_total",
                labels
            ) >= 3.0,
            "{node}: closed connections not counted:\n{:?}",
            tb.metrics(node)
                .unwrap()
                .select("istio_tcp_connections_closed_total", &[])
        );
        let now = tb.metrics(node).unwrap();
        let d = |name: &str| now.sum(name, labels) - before.sum(name, labels);
        let all = now.select("istio_tcp_sent_bytes_total", &[]);
        assert_eq!(
            d("istio_tcp_connections_opened_total"),
            3.0,
            "{node}: {all:#?}"
        );
        assert_eq!(
            d("istio_tcp_connections_closed_total"),
            3.0,
            "{node}: {all:#?}"
        );
        assert_eq!(
            d("istio_tcp_sent_bytes_total"),
            sent as f64,
            "{node}: {all:#?}"
        );
        assert_eq!(
            d("istio_tcp_received_bytes_total"),
            recv as f64,
            "{node}: {all:#?}"
        );
    }
    let m1_now = tb.metrics("node1").unwrap();
    assert_eq!(
        redirects(&m1_now) - redirects(&m1),
        3.0,
        "connect4_redirect should count exactly the client's three connections"
    );

    // Certificate expiry per local identity: in the future, within the certificate lifetime.
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    for (node, id, other) in [
        ("node1", &client_id, &server_id),
        ("node2", &server_id, &client_id),
    ] {
        let m = tb.metrics(node).unwrap();
        let exp = m.select(
            "ambit_certificate_expiry_timestamp_seconds",
            &[("identity", id.as_str())],
        );
        assert_eq!(exp.len(), 1, "{node}: {exp:?}");
        let left = exp[0].value - now;
        assert!(
            left > 0.0 && left <= 24.0 * 3600.0 + 300.0,
            "{node}: {id} expires in {left} s"
        );
        assert!(
            m.select(
                "ambit_certificate_expiry_timestamp_seconds",
                &[("identity", other.as_str())]
            )
            .is_empty(),
            "{node} reports a certificate it does not hold"
        );
    }

    // A STRICT refusal: counted with response_flags DENY and as a policy denial.
    tb.apply(&Pa::new("default", "default").mode("STRICT").yaml())
        .unwrap();
    let before = tb.metrics("node2").unwrap();
    let deny = [
        ("reporter", "destination"),
        ("destination_workload", "server"),
        ("connection_security_policy", "none"),
        ("response_flags", "DENY"),
    ];
    let strict = [("reason", "strict_plaintext")];
    let refused = tb.request("outsider", s_ip, ECHO_PORT, Some("x")).unwrap();
    assert_eq!(refused.data(), "", "{refused:?}");
    assert_eventually!(
        timeout = SETTLE,
        delta(&tb, "node2", &before, "ambit_policy_denials_total", &strict) == 1.0,
        "no strict_plaintext denial counted: {:?}",
        tb.metrics("node2")
            .unwrap()
            .select("ambit_policy_denials_total", &[])
    );
    let after = tb.metrics("node2").unwrap();
    let d = |name: &str, l: &[(&str, &str)]| after.sum(name, l) - before.sum(name, l);
    assert_eq!(
        d("istio_tcp_connections_opened_total", &deny),
        1.0,
        "{:#?}",
        after.select("istio_tcp_connections_opened_total", &[])
    );
    assert_eq!(d("istio_tcp_connections_closed_total", &deny), 1.0);
    assert_eq!(d("istio_tcp_sent_bytes_total", &deny), 0.0);
    assert_eq!(d("istio_tcp_connections_opened_total", &dst), 0.0);
}

/// The `"target":"access"` lines of a JSON log, with their fields flattened.
fn access_lines(text: &str) -> Vec<Value> {
    json_lines(text)
        .into_iter()
        .filter(|v| v["target"] == "access")
        .map(|v| {
            let mut flat = v["fields"].as_object().cloned().unwrap_or_default();
            for (k, x) in v.as_object().unwrap() {
                if k != "fields" {
                    flat.entry(k.clone()).or_insert(x.clone());
                }
            }
            Value::Object(flat)
        })
        .collect()
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn the_json_access_log_has_one_line_per_connection_with_its_fields() {
    let mut tb = testbed();
    tb.restart_agent_with("node1", "logFormat: json").unwrap();
    tb.restart_agent_with("node2", "logFormat: json").unwrap();
    let (client, server) = (tb.pod("client").clone(), tb.pod("server").clone());
    let s_ip = IpAddr::V4(server.ipv4);
    let logs = [tb.node("node1").log.clone(), tb.node("node2").log.clone()];
    let offs = [file_len(&logs[0]), file_len(&logs[1])];

    let payload = format!("{}{}", unique_marker(), "x".repeat(4000));
    let echo = tb
        .request("client", s_ip, ECHO_PORT, Some(&payload))
        .unwrap();
    assert_eq!(echo.data(), payload);
    let peer = tb.request("client", s_ip, PEER_PORT, None).unwrap();
    assert!(peer.data().starts_with("peer="), "{peer:?}");
    let n = payload.len() as u64;
    let echo_src = echo.0["sock"].as_str().unwrap().to_string();
    let peer_src = peer.0["sock"].as_str().unwrap().to_string();

    // One line per connection and side, once both have closed. node1 sees the app's socket
    // (its port identifies the connection); node2 sees the tunnel's peer, so its lines are
    // told apart by destination port.
    let port_of = |a: &str| a.rsplit(':').next().unwrap_or_default().to_string();
    let lines_for = |i: usize, dst_port: u16, src: &str| -> Vec<Value> {
        access_lines(&read_from(&logs[i], offs[i]))
            .into_iter()
            .filter(|l| l["dst.orig"] == format!("{s_ip}:{dst_port}").as_str())
            .filter(|l| {
                let a = l["src.addr"].as_str().unwrap_or_default();
                if i == 0 {
                    port_of(a) == port_of(src)
                } else {
                    a.starts_with(&format!("{}:", client.ipv4))
                }
            })
            .collect()
    };
    for (i, node) in ["node1", "node2"].iter().enumerate() {
        assert_eventually!(
            timeout = SETTLE,
            lines_for(i, ECHO_PORT, &echo_src).len() == 1
                && lines_for(i, PEER_PORT, &peer_src).len() == 1,
            "{node}: want one access line per connection ({echo_src}, {peer_src}):\n{}",
            read_from(&logs[i], offs[i])
        );
        // Every line after the restart is JSON.
        let text = read_from(&logs[i], offs[i]);
        assert!(
            text.lines()
                .all(|l| serde_json::from_str::<Value>(l).is_ok()),
            "{node}: non-JSON lines with logFormat json:\n{text}"
        );
    }
    let check = |i: usize, src: &str, direction: &str, dst_port: u16, sent: u64, recv: u64| {
        let l = lines_for(i, dst_port, src).pop().unwrap();
        let addr = l["src.addr"].as_str().unwrap_or_default();
        if i == 0 {
            // TODO(#7): the outbound source is the app's socket as accepted, 127.0.0.1:PORT
            // after the connect4 rewrite; the pod's IP would serve operators better
            // (target/agent-bugs.md). Accept either address, require the app's port.
            let ip = addr.rsplit_once(':').map(|(ip, _)| ip).unwrap_or_default();
            assert!(
                ip == client.ipv4.to_string() || ip == "127.0.0.1",
                "outbound src.addr {addr}: {l:#}"
            );
        }
        let want_dst = format!("{s_ip}:{dst_port}");
        assert_eq!(l["message"], "connection closed", "{l:#}");
        assert_eq!(l["direction"], direction, "{l:#}");
        let pod = if direction == "outbound" {
            "default/client"
        } else {
            "default/server"
        };
        assert_eq!(l["pod"], pod, "{l:#}");
        assert_eq!(l["src.id"], client.identity().as_str(), "{l:#}");
        assert_eq!(l["dst.id"], server.identity().as_str(), "{l:#}");
        assert_eq!(l["dst.orig"], want_dst.as_str(), "{l:#}");
        assert_eq!(l["dst.target"], want_dst.as_str(), "{l:#}");
        assert_eq!(l["security"], "mutual_tls", "{l:#}");
        assert_eq!(l["bytes.sent"], sent, "{l:#}");
        assert_eq!(l["bytes.recv"], recv, "{l:#}");
        assert!(l["dur_ms"].as_u64().is_some_and(|d| d < 60_000), "{l:#}");
        assert_eq!(l["result"], "ok", "{l:#}");
        assert_eq!(l["level"], "INFO", "{l:#}");
    };
    let p = peer.data().len() as u64;
    check(0, &echo_src, "outbound", ECHO_PORT, n, n);
    check(0, &peer_src, "outbound", PEER_PORT, 0, p);
    check(1, &echo_src, "inbound", ECHO_PORT, n, n);
    check(1, &peer_src, "inbound", PEER_PORT, 0, p);
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn metrics_are_also_served_on_the_configured_tcp_listener() {
    let mut tb = testbed_with(Options::capture_only());
    let addr = "127.0.0.1:15020";
    // Control: nothing listens there before the key is set.
    let curl = |tb: &Testbed, path: &str| {
        let url = format!("http://{addr}{path}");
        let argv = [
            "curl",
            "-sS",
            "-m",
            "10",
            "-w",
            "\n%{http_code}",
            url.as_str(),
        ];
        let out = tb
            .exec_on_node("node1", &argv, Duration::from_secs(20))
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", ""));
        (out.status.success(), code.to_string(), body.to_string())
    };
    assert!(!curl(&tb, "/metrics").0, "something already serves {addr}");

    tb.restart_agent_with("node1", &format!("metricsListen: {addr}"))
        .unwrap();
    let server = IpAddr::V4(tb.pod("server").ipv4);
    let r = tb
        .request("client", server, ECHO_PORT, Some("tcp"))
        .unwrap();
    assert_eq!(r.data(), "tcp");
    let opened = [("reporter", "source"), ("destination_workload", "server")];
    assert_eventually!(
        timeout = SETTLE,
        tb.metrics("node1")
            .unwrap()
            .sum("istio_tcp_connections_closed_total", &opened)
            >= 1.0
    );
    let (ok, code, body) = curl(&tb, "/metrics");
    assert!(ok && code == "200", "{code}: {body}");
    let over_tcp = Metrics::parse(&body).unwrap();
    let over_socket = tb.metrics("node1").unwrap();
    assert_eq!(
        over_tcp.sum("istio_tcp_connections_opened_total", &opened),
        over_socket.sum("istio_tcp_connections_opened_total", &opened),
        "{body}"
    );
    assert!(over_tcp.sum("istio_tcp_connections_opened_total", &opened) >= 1.0);
    // Only metrics there: the admin API stays on the root-only socket.
    for path in ["/status", "/config_dump", "/logging"] {
        let (_, code, body) = curl(&tb, path);
        assert_eq!(code, "404", "{path} over TCP: {body}");
    }
}
