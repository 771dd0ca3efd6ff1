//! HBONE between nodes: what an enrolled client pod sends to an enrolled server pod crosses the
//! underlay inside mutual TLS (TLS 1.3 + HTTP/2 CONNECT to the server pod's port 15008), over
//! IPv4 and IPv6; the server app still sees the client's address; and the server's agent
//! reports the identity the client proved.
#![allow(
    clippy::unwrap_used,
    reason = "test bodies, also those `both_modes!` runs, panic with a line number (STYLE.md §7)"
)]
use std::net::IpAddr;

use ambit_e2e::capture::{Captured, UNDERLAY};
use ambit_e2e::pcap::{tls_records, Flow};
use ambit_e2e::state::url_host;
use ambit_e2e::{assert_eventually, testbed, unique_marker, Testbed, ECHO_PORT, PEER_PORT};
use ambit_e2e::{HTTP_PORT, TUNNEL_PORT};

/// Streams that carried bytes between the two addresses (either direction).
fn between(cap: &Captured, a: IpAddr, b: IpAddr) -> Vec<&Flow> {
    cap.with_payload()
        .filter(|f| (f.src.ip() == a && f.dst.ip() == b) || (f.src.ip() == b && f.dst.ip() == a))
        .collect()
}

/// Every stream between `client` and `server` is on the tunnel port and TLS from its first
/// byte; the client's side opens with a ClientHello and application data follows.
fn assert_tls_only(cap: &Captured, client: IpAddr, server: IpAddr) {
    let flows = between(cap, client, server);
    assert!(
        !flows.is_empty(),
        "no traffic between {client} and {server} on the underlay:\n{}",
        cap.summary()
    );
    for f in &flows {
        assert!(
            f.src.port() == TUNNEL_PORT || f.dst.port() == TUNNEL_PORT,
            "a stream between the pods bypassed the tunnel port: {} -> {}\n{}",
            f.src,
            f.dst,
            cap.summary()
        );
        assert!(
            f.from_start,
            "capture joined {} -> {} mid-stream:\n{}",
            f.src,
            f.dst,
            cap.summary()
        );
        let records = tls_records(&f.bytes).unwrap_or_else(|e| {
            panic!("{} -> {} is not TLS: {e}\n{}", f.src, f.dst, cap.summary())
        });
        assert!(
            records.iter().any(|r| r.content_type == 23),
            "{} -> {}: no application data records: {records:?}",
            f.src,
            f.dst
        );
        if f.dst.port() == TUNNEL_PORT {
            assert_eq!(
                records.first().and_then(|r| r.handshake),
                Some(1),
                "{} -> {} does not open with a ClientHello: {records:?}",
                f.src,
                f.dst
            );
        }
    }
}

/// Client → server over HBONE in one address family, with an underlay capture, the server
/// app's view and both agents' connection tables.
fn hbone_end_to_end(v6: bool) {
    let tb = testbed();
    let (client, server) = (tb.pod("client").clone(), tb.pod("server").clone());
    let (c_ip, s_ip) = (client.ip(v6), server.ip(v6));
    let (outsider, legacy) = (tb.pod("outsider").ip(v6), tb.pod("legacy").ip(v6));
    let secret = unique_marker();
    let control = unique_marker();

    let cap = tb.capture("node1", UNDERLAY).unwrap();
    let echo = tb
        .request("client", s_ip, ECHO_PORT, Some(&secret))
        .unwrap();
    assert_eq!(echo.data(), secret, "{echo:?}");
    let body = tb
        .http_get("client", s_ip, HTTP_PORT, &format!("/{secret}"))
        .unwrap_err();
    // A 404 from the real server: the path (with the marker) reached it.
    assert!(format!("{body:#}").contains("404"), "{body:#}");
    let peer = tb.request("client", s_ip, PEER_PORT, None).unwrap();
    assert!(
        peer.data()
            .starts_with(&format!("peer={}:", url_host(c_ip))),
        "the server app saw {:?}, not the client's address",
        peer.data()
    );
    // While a connection is open, both agents list it with the proved identities.
    let held = tb.hold("client", s_ip, ECHO_PORT, &secret).unwrap();
    assert_eq!(held.reply.data(), secret);
    let inbound = |tb: &Testbed| {
        tb.connections("node2").unwrap().into_iter().find(|c| {
            c.direction == "inbound"
                && c.dst.ends_with(&format!(":{ECHO_PORT}"))
                && c.src.starts_with(&url_host(c_ip))
        })
    };
    assert_eventually!(
        inbound(&tb).is_some(),
        "node2 does not list the held connection: {:?}",
        tb.connections("node2")
    );
    let conn = inbound(&tb).unwrap();
    assert_eq!(conn.pod, "default/server");
    assert_eq!(conn.security, "mutual_tls", "{conn:?}");
    assert_eq!(
        conn.src_identity.as_deref(),
        Some(client.identity().as_str()),
        "{conn:?}"
    );
    assert_eq!(
        conn.dst_identity.as_deref(),
        Some(server.identity().as_str())
    );
    let out = tb.connections("node1").unwrap();
    assert!(
        out.iter().any(|c| c.direction == "outbound"
            && c.pod == "default/client"
            && c.security == "mutual_tls"
            && c.dst_identity.as_deref() == Some(server.identity().as_str())),
        "node1 does not list the outbound mTLS connection: {out:?}"
    );
    drop(held);
    // Control: plaintext between unenrolled pods on the same link is visible to this capture.
    let plain = tb
        .request("outsider", legacy, ECHO_PORT, Some(&control))
        .unwrap();
    assert_eq!(plain.data(), control);
    let captured = cap.stop().unwrap();

    assert_eq!(
        captured.count(secret.as_bytes()),
        0,
        "the client's bytes crossed the underlay in plaintext:\n{}",
        captured.summary()
    );
    assert!(
        captured.count(control.as_bytes()) >= 2,
        "the capture missed the plaintext control (request and echo):\n{}",
        captured.summary()
    );
    assert!(
        !between(&captured, outsider, legacy).is_empty(),
        "{}",
        captured.summary()
    );
    assert_tls_only(&captured, c_ip, s_ip);
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn enrolled_pods_talk_mutual_tls_over_ipv4() {
    hbone_end_to_end(false);
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn enrolled_pods_talk_mutual_tls_over_ipv6() {
    hbone_end_to_end(true);
}
