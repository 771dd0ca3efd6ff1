//! The operator's view of an agent through its real admin socket (raw HTTP/1.1 on a unix
//! socket): every endpoint's content while known traffic flows, run-time log levels, bad
//! requests (404/405/400, never a hang) and the socket's root-only access. The CLI is in
//! `admin_cli`, metrics and the access log in `admin_metrics`.
#![allow(
    clippy::unwrap_used,
    reason = "test bodies panic with a line number (STYLE.md §7)"
)]
use std::net::IpAddr;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::time::Duration;

use ambit_e2e::ops::{file_len, read_from, unix_exchange, Metrics, ADMIN_TIMEOUT};
use ambit_e2e::peer::{admin_peer, NOBODY, NOBODY_DAC_OVERRIDE};
use ambit_e2e::{
    assert_eventually, eventually, testbed, testbed_with, unique_marker, Options, Testbed,
    ECHO_PORT,
};
use serde_json::Value;

/// How long counters and log lines get to show a connection that has closed.
pub(crate) const SETTLE: Duration = Duration::from_secs(15);

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
    // The source is the client pod's address with the app socket's port (the socket itself
    // is 127.0.0.1:PORT after the connect4 rewrite).
    let sock = held.reply.0["sock"].as_str().unwrap();
    let app_port = sock.rsplit(':').next().unwrap();
    assert_eq!(
        outbound["src"].as_str().unwrap(),
        format!("{}:{app_port}", tb.pod("client").ipv4),
        "{outbound:#} (app socket {sock})"
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
    let root = admin_peer(&sock, &[]).unwrap();
    assert_eq!(root["uid"], 0);
    assert!(
        root["reply"]
            .as_str()
            .is_some_and(|r| r.starts_with("HTTP/1.1 200")),
        "{root}"
    );

    // Another user cannot even connect: the file mode refuses it.
    let other = admin_peer(&sock, &NOBODY).unwrap();
    assert_eq!(other["uid"], 65534, "{other}");
    assert_eq!(other["connect"], "PermissionError", "{other}");

    // Another user that can pass the file mode (CAP_DAC_OVERRIDE) connects, and the agent's
    // peer-credential check closes the connection without an answer.
    let log = tb.node("node2").log.clone();
    let off = file_len(&log);
    let capped = admin_peer(&sock, &NOBODY_DAC_OVERRIDE).unwrap();
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
