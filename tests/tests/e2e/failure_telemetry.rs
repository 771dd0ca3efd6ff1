//! What the agents report about connections that fail: an outbound HBONE attempt that fails is
//! counted and logged as the mTLS attempt it was (`connection_security_policy="mutual_tls"`,
//! `security="mutual_tls"`), with the pod's address as its source; the tunnel server's refusal
//! of a failed handshake keeps the TLS alert the client ended it with.
#![allow(
    clippy::unwrap_used,
    reason = "test bodies panic with a line number (STYLE.md §7)"
)]
use std::net::{IpAddr, SocketAddr};

use ambit_e2e::hbone::{self, anonymous_client_config, client_config, in_netns, Issue as _};
use ambit_e2e::ops::{file_len, read_from};
use ambit_e2e::policy::foreign_pod;
use ambit_e2e::state::identity;
use ambit_e2e::{
    assert_eventually, testbed, testbed_with, Options, PodSpec, Testbed, ECHO_PORT, TUNNEL_PORT,
};
use serde_json::Value;

use crate::admin::SETTLE;
use crate::admin_metrics::access_lines;

/// The access lines `node` logged since `offset` with `message`.
fn lines(tb: &Testbed, node: &str, offset: u64, message: &str) -> Vec<Value> {
    access_lines(&read_from(&tb.node(node).log, offset))
        .into_iter()
        .filter(|l| l["message"] == message)
        .collect()
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn a_failed_hbone_attempt_is_counted_and_logged_as_mutual_tls() {
    let mut pods = PodSpec::defaults();
    pods.push(PodSpec::unlisted("rogue", "node2"));
    let mut tb = testbed_with(Options {
        pods,
        ..Options::default()
    });
    tb.restart_agent_with("node1", "logFormat: json").unwrap();
    let client = tb.pod("client").clone();
    // The inventory puts enrolled pod `impostor` (on a node without an agent) at the rogue's
    // address, where nothing listens on the tunnel port: the client's agent tries HBONE and
    // the dial fails.
    let rogue = IpAddr::V4(tb.pod("rogue").ipv4);
    tb.apply(&foreign_pod("impostor", "node3", "payments", &[rogue]))
        .unwrap();
    let dst = SocketAddr::new(rogue, ECHO_PORT);
    assert_eventually!(
        timeout = SETTLE,
        tb.explain("node1", "default/client", dst).unwrap()["outbound"]["route"] == "tunnel"
    );
    let (client_id, payments) = (client.identity(), identity("default", "payments"));
    let attempt = [
        ("reporter", "source"),
        ("source_principal", client_id.as_str()),
        ("destination_principal", payments.as_str()),
        ("connection_security_policy", "mutual_tls"),
        ("response_flags", "UF"),
    ];
    let as_plaintext = [
        ("reporter", "source"),
        ("connection_security_policy", "none"),
        ("response_flags", "UF"),
    ];
    let before = tb.metrics("node1").unwrap();
    let offset = file_len(&tb.node("node1").log);

    let r = tb.request("client", rogue, ECHO_PORT, Some("x")).unwrap();
    assert_eq!(r.data(), "", "the connection went through: {r:?}");

    let opened = |l: &[(&str, &str)]| {
        tb.metrics("node1")
            .unwrap()
            .sum("istio_tcp_connections_opened_total", l)
            - before.sum("istio_tcp_connections_opened_total", l)
    };
    assert_eventually!(
        timeout = SETTLE,
        opened(&attempt) == 1.0,
        "the failed attempt is not counted as mutual_tls: {:#?}",
        tb.metrics("node1").unwrap().select(
            "istio_tcp_connections_opened_total",
            &[("response_flags", "UF")]
        )
    );
    assert_eq!(opened(&as_plaintext), 0.0);

    assert_eventually!(
        timeout = SETTLE,
        !lines(&tb, "node1", offset, "connection refused").is_empty()
    );
    let refused = lines(&tb, "node1", offset, "connection refused");
    assert_eq!(refused.len(), 1, "{refused:#?}");
    let l = &refused[0];
    assert_eq!(l["direction"], "outbound", "{l:#}");
    assert_eq!(l["dst.orig"], dst.to_string().as_str(), "{l:#}");
    assert_eq!(l["security"], "mutual_tls", "{l:#}");
    assert_eq!(l["reason"], "tunnel", "{l:#}");
    assert_eq!(l["response_flags"], "UF", "{l:#}");
    // The source is the client pod's address with the app socket's port. The app learns its
    // port only when connect() returns; on a loaded machine the agent's reset can reach the
    // socket first (connect fails with ECONNRESET, the reply has no `sock`): then only the
    // address can be compared.
    let src = l["src.addr"].as_str().unwrap_or_default();
    match r.0["sock"].as_str().and_then(|a| a.rsplit(':').next()) {
        Some(app_port) => assert_eq!(src, format!("{}:{app_port}", client.ipv4), "{l:#} {r:?}"),
        None => assert_eq!(
            src.rsplit_once(':').map(|(ip, _)| ip),
            Some(client.ipv4.to_string().as_str()),
            "{l:#} {r:?}"
        ),
    }
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn the_tunnel_server_logs_the_tls_alert_a_client_refused_it_with() {
    let mut tb = testbed();
    tb.restart_agent_with("node2", "logFormat: json").unwrap();
    let server = tb.pod("server").clone();
    let outsider = tb.pod("outsider").clone();
    let peer = SocketAddr::new(IpAddr::V4(server.ipv4), TUNNEL_PORT);
    // A genuine client certificate, but the client requires an identity the server does not
    // have: it refuses the server's certificate with an alert.
    let svid = tb.issue("node1", "default", "client").unwrap();
    let wrong = client_config(&svid, &identity("default", "someone-else")).unwrap();
    let offset = file_len(&tb.node("node2").log);
    let refusals = || lines(&tb, "node2", offset, "tunnel connection refused");

    let netns = outsider.netns_path();
    let r = in_netns(&netns, move || hbone::handshake(peer, wrong)).unwrap();
    assert!(r.is_err(), "the client accepted the server's certificate");
    assert_eventually!(timeout = SETTLE, refusals().len() == 1, "{:#?}", refusals());
    let l = &refusals()[0];
    assert_eq!(l["reason"], "tls_handshake", "{l:#}");
    assert_eq!(l["tls.alert"], "CertificateUnknown", "{l:#}");
    let error = l["error"].as_str().unwrap_or_default();
    assert!(
        error.ends_with("received fatal alert: CertificateUnknown"),
        "{l:#}"
    );
    assert!(
        l["src.addr"]
            .as_str()
            .is_some_and(|a| a.starts_with(&format!("{}:", outsider.ipv4))),
        "{l:#}"
    );

    // A client that sends no certificate sends no alert either (the server sends one): the
    // same refusal, without a peer alert.
    let netns = outsider.netns_path();
    // (The client's side of TLS 1.3 may finish before the server refuses: its result says
    // nothing; the server's refusal is what counts.)
    let _ = in_netns(&netns, move || {
        hbone::handshake(peer, anonymous_client_config())
    })
    .unwrap();
    assert_eventually!(timeout = SETTLE, refusals().len() == 2, "{:#?}", refusals());
    let l = &refusals()[1];
    assert_eq!(l["reason"], "tls_handshake", "{l:#}");
    assert_eq!(l["tls.alert"], "-", "{l:#}");
    assert!(
        !l["error"]
            .as_str()
            .unwrap_or_default()
            .contains("received fatal alert"),
        "{l:#}"
    );
}
