//! The agents' telemetry after known traffic: Istio TCP metrics equal to the bytes and
//! connections sent (denials counted), the JSON access log (one line per connection with its
//! fields), and metrics on the `metricsListen` TCP listener.
#![allow(
    clippy::unwrap_used,
    reason = "test bodies panic with a line number (STYLE.md §7)"
)]
use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ambit_e2e::ops::{file_len, json_lines, read_from, Metrics};
use ambit_e2e::policy::PeerAuthentication as Pa;
use ambit_e2e::{
    assert_eventually, testbed, testbed_with, unique_marker, Options, Testbed, ECHO_PORT, PEER_PORT,
};
use serde_json::Value;

use crate::admin::SETTLE;

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
pub(crate) fn access_lines(text: &str) -> Vec<Value> {
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
            // The outbound source is the client pod's address with the app socket's port (the
            // socket as accepted is 127.0.0.1:PORT after the connect4 rewrite).
            assert_eq!(
                addr,
                format!("{}:{}", client.ipv4, port_of(src)),
                "outbound src.addr: {l:#}"
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
