//! CA faults: a CA down for longer than a renewal interval. The certificate keeps being served
//! until it expires; then new connections are refused, with an error that names the identity
//! and the cause and a counter per identity; the CA back, certificates and traffic recover.
//! A tunnel opened before the destination's certificate expired takes no new stream after
//! (503 or GOAWAY), while the stream it already carries goes on.
//! (A CA answering with a certificate for another identity or under a foreign root: the agent's
//! `identity::manager` tests, over real TLS and gRPC.)
#![allow(
    clippy::unwrap_used,
    reason = "test bodies panic with a line number (STYLE.md §7)"
)]
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambit::tunnel::client::Tunnel;
use ambit::tunnel::Error as TunnelError;
use ambit_e2e::hbone::{client_config, in_netns, Issue as _};
use ambit_e2e::ops::{file_len, read_from};
use ambit_e2e::{assert_eventually, testbed_with, Options, Testbed, ECHO_PORT, TUNNEL_PORT};
use nix::sys::signal::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

/// What the long-lived tunnel saw: the new stream's outcome after expiry, and what the stream
/// opened before expiry echoed.
struct LongTunnel {
    after_expiry: Result<(), String>,
    refused_503: bool,
    echoed: Result<Vec<u8>, String>,
}

/// From the `outsider` pod, with the `client` identity: opens a tunnel to `server` and one
/// stream to its echo port, reports `opened`, waits for `go`, then tries a new stream on the
/// same connection and finishes the first one.
fn long_tunnel(
    tb: &Testbed,
    opened: oneshot::Sender<Result<(), String>>,
    go: oneshot::Receiver<()>,
) -> std::thread::JoinHandle<LongTunnel> {
    let server = tb.pod("server").clone();
    let svid = tb.issue("node1", "default", "client").unwrap();
    let tls: Arc<rustls::ClientConfig> = client_config(&svid, &server.identity()).unwrap();
    let peer = SocketAddr::new(IpAddr::V4(server.ipv4), TUNNEL_PORT);
    let echo_at = SocketAddr::new(IpAddr::V4(server.ipv4), ECHO_PORT);
    let netns = tb.pod("outsider").netns_path();
    std::thread::spawn(move || {
        in_netns(&netns, move || async move {
            let setup = async {
                let tcp = tokio::net::TcpStream::connect(peer).await?;
                let mut t = Tunnel::handshake(tcp, peer, tls).await?;
                let s = t.connect(echo_at).await?;
                Ok::<_, anyhow::Error>((t, s))
            };
            let (mut t, mut first) = match setup.await {
                Ok(x) => {
                    let _ = opened.send(Ok(()));
                    x
                }
                Err(e) => {
                    let _ = opened.send(Err(format!("{e:#}")));
                    panic!("long-lived tunnel: {e:#}");
                }
            };
            let _ = go.await;
            let after = t.connect(echo_at).await;
            let refused_503 = matches!(
                &after,
                Err(TunnelError::Status { status, .. }) if status.as_u16() == 503
            );
            let echoed = async {
                first.write_all(b"opened before expiry").await?;
                first.shutdown().await?;
                let mut got = Vec::new();
                first.read_to_end(&mut got).await?;
                Ok::<_, std::io::Error>(got)
            };
            let echoed = tokio::time::timeout(Duration::from_secs(10), echoed).await;
            LongTunnel {
                after_expiry: after.map(drop).map_err(|e| e.to_string()),
                refused_503,
                echoed: match echoed {
                    Ok(r) => r.map_err(|e| e.to_string()),
                    Err(_) => Err("timed out".into()),
                },
            }
        })
        .unwrap()
    })
}

/// `ambit_tunnel_rejections_total{reason="certificate_expired"}` on `node`.
fn expired_rejections(tb: &Testbed, node: &str) -> f64 {
    tb.metrics(node).unwrap().sum(
        "ambit_tunnel_rejections_total",
        &[("reason", "certificate_expired")],
    )
}

/// An echo from client to server over HBONE.
fn echo(tb: &Testbed, text: &str) -> String {
    let server = IpAddr::V4(tb.pod("server").ipv4);
    match tb.request("client", server, ECHO_PORT, Some(text)) {
        Ok(r) => r.data().to_string(),
        Err(e) => format!("client failed: {e:#}"),
    }
}

/// `ambit_certificate_refused_connections_total` of `identity` on `node`.
fn refused(tb: &Testbed, node: &str, identity: &str) -> f64 {
    tb.metrics(node).unwrap().sum(
        "ambit_certificate_refused_connections_total",
        &[("identity", identity)],
    )
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn expired_certificates_refuse_connections_until_the_ca_returns() {
    // 12 s certificates: renewal due after about 6 s.
    let mut tb = testbed_with(Options::cert_ttl(12));
    let id = tb.pod("client").identity();
    let server_id = tb.pod("server").identity();
    // Traffic before the outage leaves a pooled HBONE connection that outlives the certificate.
    assert_eq!(echo(&tb, "before"), "before");
    // And a tunnel of our own to the server, with one stream open across the expiry.
    let (opened_tx, opened_rx) = oneshot::channel();
    let (go_tx, go_rx) = oneshot::channel();
    let long = long_tunnel(&tb, opened_tx, go_rx);
    opened_rx.blocking_recv().unwrap().unwrap();
    let expired0 = expired_rejections(&tb, "node2");

    tb.stop_ca(Signal::SIGKILL).unwrap();
    let down = Instant::now();
    let first = tb.cert("node1", &id).unwrap();
    assert_eq!(first.state, "available", "{first:?}");

    // Renewal fails; the current certificate is still served and traffic flows on it.
    assert_eventually!(
        timeout = Duration::from_secs(20),
        tb.cert("node1", &id).is_some_and(|c| c.failures >= 1),
        "no failed renewal: {:?}",
        tb.cert("node1", &id)
    );
    let during = tb.cert("node1", &id).unwrap();
    if during.state == "available" {
        assert_eq!(during.serial, first.serial, "{during:?}");
        assert_eq!(echo(&tb, "during"), "during", "{}", tb.agent_logs(20));
    }

    // Expired: state unavailable, connections refused at once with a clear error, counted.
    assert_eventually!(
        timeout = Duration::from_secs(20),
        tb.cert("node1", &id)
            .is_some_and(|c| c.state == "unavailable"),
        "certificate never expired: {:?}",
        tb.cert("node1", &id)
    );
    let expired_after = down.elapsed();

    // The server's certificate (node2) expires too; the tunnel opened before takes no new
    // stream, its open stream goes on.
    assert_eventually!(
        timeout = Duration::from_secs(20),
        tb.cert("node2", &server_id)
            .is_some_and(|c| c.state == "unavailable"),
        "server certificate never expired: {:?}",
        tb.cert("node2", &server_id)
    );
    go_tx.send(()).unwrap();
    let seen = long.join().unwrap();
    assert!(
        seen.after_expiry.is_err(),
        "a new stream was carried on a tunnel whose certificate expired"
    );
    assert_eq!(
        seen.echoed.as_deref().map_err(String::as_str),
        Ok(&b"opened before expiry"[..]),
        "the stream opened before expiry did not go on"
    );
    // Refused by the server (503, counted) or drained before it was sent (GOAWAY, not a stream).
    assert_eq!(
        expired_rejections(&tb, "node2") - expired0,
        if seen.refused_503 { 1.0 } else { 0.0 },
        "new stream after expiry: {:?}",
        seen.after_expiry
    );
    eprintln!(
        "tunnel opened before expiry: new stream refused ({:?})",
        seen.after_expiry
    );
    let log = tb.node("node1").log.clone();
    let off = file_len(&log);
    let refused0 = refused(&tb, "node1", &id);
    let started = Instant::now();
    // A client patient enough (12 s) to tell a refusal from a slow carry.
    let (server, port) = (tb.pod("server").ipv4.to_string(), ECHO_PORT.to_string());
    let args: Vec<String> = [
        "--timeout",
        "12",
        "request",
        &server,
        &port,
        "--send=after expiry",
    ]
    .map(String::from)
    .to_vec();
    let report = tb.client("client", &args, Duration::from_secs(30)).unwrap();
    let reply = report["data"].as_str().unwrap_or_default().to_string();
    let took = started.elapsed();
    assert_ne!(
        reply, "after expiry",
        "carried without a valid certificate: {report}"
    );
    assert!(took < Duration::from_secs(3), "refusal took {took:?}");
    assert_eq!(refused(&tb, "node1", &id) - refused0, 1.0);
    let want = format!("no valid certificate for {id}");
    assert_eventually!(
        read_from(&log, off).contains(&want),
        "node1 did not log `{want}`:\n{}",
        read_from(&log, off)
    );
    let text = read_from(&log, off);
    let line = text.lines().find(|l| l.contains(&want)).unwrap();
    assert!(line.contains("connection refused"), "{line}");
    assert!(
        line.contains("last error: ca "),
        "the cause is named: {line}"
    );

    // The CA returns: a new certificate (after the retry backoff) and traffic again.
    tb.start_ca().unwrap();
    let back = Instant::now();
    assert_eventually!(
        timeout = Duration::from_secs(60),
        tb.cert("node1", &id)
            .is_some_and(|c| c.state == "available" && c.serial != first.serial),
        "no new certificate: {:?}",
        tb.cert("node1", &id)
    );
    let recovered = back.elapsed();
    assert_eventually!(
        timeout = Duration::from_secs(30),
        echo(&tb, "recovered") == "recovered",
        "{}",
        tb.agent_logs(20)
    );
    eprintln!(
        "ca down: certificate served {expired_after:?} into the outage, then refused in {took:?}; \
         new certificate {recovered:?} after the CA returned"
    );
}
