//! CA faults: a CA down for longer than a renewal interval. The certificate keeps being served
//! until it expires; then new connections are refused, with an error that names the identity
//! and the cause and a counter per identity; the CA back, certificates and traffic recover.
//! (A CA answering with a certificate for another identity or under a foreign root: the agent's
//! `identity::manager` tests, over real TLS and gRPC.)
#![allow(
    clippy::unwrap_used,
    reason = "test bodies panic with a line number (STYLE.md §7)"
)]
use std::net::IpAddr;
use std::time::{Duration, Instant};

use ambit_e2e::ops::{file_len, read_from};
use ambit_e2e::{assert_eventually, testbed_with, Options, Testbed, ECHO_PORT};
use nix::sys::signal::Signal;

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
    // Traffic before the outage leaves a pooled HBONE connection that outlives the certificate.
    assert_eq!(echo(&tb, "before"), "before");

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
