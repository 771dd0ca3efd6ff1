//! Bad input on the HBONE port (15008): bytes that are not TLS, TLS without a client
//! certificate, requests that are not CONNECT, CONNECT to another pod's address or to the
//! agent's own ports. Each is refused and counted (`ambit_tunnel_rejections_total`, by
//! reason), nothing reaches the app, and the agent keeps serving: the same client's valid
//! CONNECT right after works.
#![allow(
    clippy::unwrap_used,
    reason = "test bodies panic with a line number (STYLE.md §7)"
)]
use std::net::{IpAddr, SocketAddr};

use ambit_e2e::hbone::{
    self, anonymous_client_config, client_config, in_netns, Issue as _, Outcome,
};
use ambit_e2e::{testbed, Testbed, ECHO_PORT, PEER_PORT, TUNNEL_PORT};
use http::{Method, StatusCode};

/// Reasons of `ambit_tunnel_rejections_total` this test provokes.
const REASONS: [&str; 5] = [
    "tls_handshake",
    "method",
    "foreign_target",
    "agent_port",
    "bad_authority",
];

/// `ambit_tunnel_rejections_total` of `node` for each of [`REASONS`].
fn rejections(tb: &Testbed, node: &str) -> [f64; 5] {
    let m = tb.metrics(node).unwrap();
    REASONS.map(|r| m.sum("ambit_tunnel_rejections_total", &[("reason", r)]))
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn bad_input_on_the_tunnel_port_is_refused_and_the_agent_keeps_serving() {
    let tb = testbed();
    let server = tb.pod("server").clone();
    let s_ip = IpAddr::V4(server.ipv4);
    let legacy = IpAddr::V4(tb.pod("legacy").ipv4);
    let peer = SocketAddr::new(s_ip, TUNNEL_PORT);
    // A genuine client identity, from node1 (where `client` runs), used from the outsider pod
    // (not enrolled, so its connections to 15008 are its own).
    let svid = tb.issue("node1", "default", "client").unwrap();
    let tls = client_config(&svid, &server.identity()).unwrap();
    let refused = tb.proxy_counter("node2", "server", "tunnel_refused");
    let delivered = tb.pod_counter("node2", "server", "bypassed");
    let peers_seen = tb.peer_log("server").len();
    let rejected = rejections(&tb, "node2");

    let outsider = tb.pod("outsider").netns_path();
    let r = in_netns(&outsider, move || async move {
        let http = hbone::raw_exchange(peer, b"GET / HTTP/1.1\r\nHost: server\r\n\r\n").await;
        let zeros = hbone::raw_exchange(peer, &[0u8; 512]).await;
        let anon = anonymous_client_config();
        let no_cert = hbone::hbone_request(
            peer,
            anon,
            Method::CONNECT,
            SocketAddr::new(s_ip, PEER_PORT),
            b"",
        )
        .await;
        let get = hbone::hbone_request(
            peer,
            tls.clone(),
            Method::GET,
            SocketAddr::new(s_ip, PEER_PORT),
            b"",
        )
        .await;
        let foreign = hbone::hbone_request(
            peer,
            tls.clone(),
            Method::CONNECT,
            SocketAddr::new(legacy, PEER_PORT),
            b"",
        )
        .await;
        let mut agent_ports = Vec::new();
        for port in [15001, 15006, TUNNEL_PORT] {
            agent_ports.push(
                hbone::hbone_request(
                    peer,
                    tls.clone(),
                    Method::CONNECT,
                    SocketAddr::new(s_ip, port),
                    b"",
                )
                .await,
            );
        }
        let good = hbone::hbone_request(
            peer,
            tls.clone(),
            Method::CONNECT,
            SocketAddr::new(s_ip, ECHO_PORT),
            b"still serving",
        )
        .await;
        (http, zeros, no_cert, get, foreign, agent_ports, good)
    })
    .unwrap();
    let (http, zeros, no_cert, get, foreign, agent_ports, good) = r;

    // Not TLS: the agent closes the connection (at most a TLS alert comes back), promptly.
    for (what, res) in [("HTTP/1.1", http), ("zeros", zeros)] {
        let (back, ended) = res.unwrap();
        assert_ne!(
            ended, "timed out",
            "{what}: the agent kept the connection open"
        );
        assert!(
            back.is_empty() || back[0] == 21,
            "{what}: the agent answered with something other than a TLS alert: {:?}",
            String::from_utf8_lossy(&back)
        );
    }
    // TLS without a client certificate never gets to HTTP/2.
    assert!(
        matches!(no_cert.0, Outcome::Failed(_)),
        "a client without a certificate got {:?}",
        no_cert.0
    );
    assert_eq!(get.0, Outcome::Status(StatusCode::METHOD_NOT_ALLOWED));
    assert_eq!(
        foreign.0,
        Outcome::Status(StatusCode::BAD_REQUEST),
        "CONNECT to another pod's address"
    );
    for (port, (outcome, _)) in [15001, 15006, TUNNEL_PORT].iter().zip(&agent_ports) {
        assert_eq!(
            *outcome,
            Outcome::Status(StatusCode::BAD_REQUEST),
            "CONNECT to the agent's port {port}"
        );
    }
    // The same client, a valid CONNECT: served.
    assert!(good.0.accepted(), "{:?}", good.0);
    assert_eq!(good.1, b"still serving");

    // Each refusal is counted once under its reason: 2 not TLS + 1 without a certificate fail
    // the handshake, 1 GET, 1 CONNECT to another pod and 3 to an agent port, each under its
    // own reason; no bad authority.
    let now = rejections(&tb, "node2");
    let rose: Vec<(&str, f64)> = REASONS
        .iter()
        .zip(now.iter().zip(rejected))
        .map(|(r, (n, b))| (*r, n - b))
        .collect();
    assert_eq!(
        rose,
        vec![
            ("tls_handshake", 3.0),
            ("method", 1.0),
            ("foreign_target", 1.0),
            ("agent_port", 3.0),
            ("bad_authority", 0.0)
        ],
        "ambit_tunnel_rejections_total by reason, increase"
    );

    // Refusals are counted; only the valid CONNECT was delivered to the app.
    let counted = tb.proxy_counter("node2", "server", "tunnel_refused") - refused;
    assert!(
        counted >= 7,
        "tunnel_refused rose by {counted}, want at least 7 (2 not TLS, 1 no certificate, 4 targets)"
    );
    assert_eq!(
        tb.pod_counter("node2", "server", "bypassed") - delivered,
        1,
        "something besides the valid CONNECT reached the app"
    );
    assert_eq!(
        tb.peer_log("server").len(),
        peers_seen,
        "the peer server got a connection"
    );

    // And the pods' own traffic is unaffected.
    let r = tb
        .request("client", s_ip, ECHO_PORT, Some("after"))
        .unwrap();
    assert_eq!(r.data(), "after", "{r:?}");
}
