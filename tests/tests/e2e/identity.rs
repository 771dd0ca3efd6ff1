//! Identity: each agent gets an X.509-SVID for every enrolled local pod from `ambit ca` (which
//! signs only identities of pods on the asking node), renews it before it expires, keeps
//! serving a valid one while the CA is down, and recovers when the CA returns.
#![allow(
    clippy::unwrap_used,
    reason = "test bodies panic with a line number (STYLE.md §7)"
)]
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use ambit_e2e::hbone::{in_netns, Issue as _};
use ambit_e2e::issuer::{ServiceAccountClaims, TokenIssuer};
use ambit_e2e::{assert_eventually, testbed, testbed_with, Cert, Options, Testbed, ECHO_PORT};
use nix::sys::signal::Signal;

/// `node`'s certificate for `pod`'s identity; panics if it has none.
fn cert_of(tb: &Testbed, node: &str, pod: &str) -> Cert {
    let id = tb.pod(pod).identity();
    tb.cert(node, &id)
        .unwrap_or_else(|| panic!("{node} has no certificate for {id}: {:?}", tb.certs(node)))
}

/// An echo from client to server works (over mTLS: both certificates are in use).
fn assert_echo(tb: &Testbed, text: &str) {
    let server = IpAddr::V4(tb.pod("server").ipv4);
    let r = tb.request("client", server, ECHO_PORT, Some(text)).unwrap();
    assert_eq!(r.data(), text, "{r:?}\n{}", tb.agent_logs(20));
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn agents_obtain_certificates_for_their_enrolled_pods() {
    let mut tb = testbed();
    for (node, pod) in [("node1", "client"), ("node2", "server")] {
        let certs = tb.certs(node).unwrap();
        let want = tb.pod(pod).identity();
        assert_eq!(
            certs
                .0
                .iter()
                .map(|c| c.identity.as_str())
                .collect::<Vec<_>>(),
            [want.as_str()],
            "{node} should hold exactly {pod}'s identity: {certs:?}"
        );
        let c = &certs.0[0];
        assert_eq!(c.state, "available", "{c:?}");
        assert_eq!(c.pods, 1, "{c:?}");
        assert!(c.serial.as_ref().is_some_and(|s| !s.is_empty()), "{c:?}");
        assert!(c.not_after.is_some() && c.next_renewal.is_some(), "{c:?}");
        assert_eq!(
            (c.failures, c.renewals, c.last_error.as_deref()),
            (0, 0, None)
        );
    }
    assert_echo(&tb, "with certificates");

    // Enrolling a pod fetches its certificate at once; unenrolling forgets it.
    let outsider = tb.pod("outsider").identity();
    tb.set_enrolled("outsider", true).unwrap();
    assert_eventually!(
        timeout = Duration::from_secs(15),
        tb.cert("node1", &outsider)
            .is_some_and(|c| c.state == "available"),
        "node1 has no certificate for {outsider}: {:?}",
        tb.certs("node1")
    );
    tb.set_enrolled("outsider", false).unwrap();
    assert_eventually!(
        timeout = Duration::from_secs(15),
        tb.cert("node1", &outsider).is_none(),
        "node1 still holds {outsider} after unenrolling it: {:?}",
        tb.certs("node1")
    );
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn the_ca_signs_only_identities_of_pods_on_the_asking_node() {
    let tb = testbed();
    // node2 runs `server`: its token gets server's identity, as its agent's did.
    let svid = tb.issue("node2", "default", "server").unwrap();
    assert_eq!(svid.cert.id().to_string(), tb.pod("server").identity());
    // node1 does not: the same request with node1's token is refused, and says why.
    let err = format!(
        "{:#}",
        tb.issue("node1", "default", "server").err().unwrap()
    );
    assert!(
        err.contains("node1") && err.contains("sa/server"),
        "unexpected refusal: {err}"
    );
    // A pod that is on node1 but not enrolled still has an identity node1 may ask for.
    let svid = tb.issue("node1", "default", "outsider").unwrap();
    assert_eq!(svid.cert.id().to_string(), tb.pod("outsider").identity());
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn short_lived_certificates_are_renewed_before_they_expire() {
    // 20 s certificates: renewed at about half life (10 s ± 1 s).
    let tb = testbed_with(Options::cert_ttl(20));
    let first = cert_of(&tb, "node2", "server");
    assert_eventually!(
        timeout = Duration::from_secs(25),
        cert_of(&tb, "node2", "server").renewals > first.renewals,
        "no renewal within 25 s of a 20 s certificate: {:?}\n{}",
        tb.certs("node2"),
        tb.agent_logs(20)
    );
    let renewed = cert_of(&tb, "node2", "server");
    assert_eq!(renewed.state, "available");
    assert_ne!(renewed.serial, first.serial, "renewal kept the serial");
    assert!(
        renewed.not_after > first.not_after,
        "{renewed:?} does not outlive {first:?}"
    );
    // The client's renewed too (same lifetime), and traffic keeps flowing over the new ones.
    assert_eventually!(
        timeout = Duration::from_secs(15),
        cert_of(&tb, "node1", "client").renewals >= 1
    );
    assert_echo(&tb, "after renewal");
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn a_valid_certificate_outlives_a_ca_outage_and_renewal_resumes_after_it() {
    // 30 s certificates: the first renewal falls due ~15 s in, while the CA is down, and the
    // certificate stays valid until ~30 s, long enough to bring the CA back.
    let mut tb = testbed_with(Options::cert_ttl(30));
    let before = cert_of(&tb, "node2", "server");
    tb.stop_ca(Signal::SIGTERM).unwrap();

    assert_eventually!(
        timeout = Duration::from_secs(25),
        cert_of(&tb, "node2", "server").failures >= 2,
        "no failed renewal while the CA is down: {:?}",
        tb.certs("node2")
    );
    let during = cert_of(&tb, "node2", "server");
    assert_eq!(
        during.state, "available",
        "the still-valid certificate was dropped: {during:?}"
    );
    assert_eq!(during.serial, before.serial, "{during:?}");
    assert!(
        during.last_error.as_deref().is_some_and(|e| !e.is_empty()),
        "no lastError while the CA is down: {during:?}"
    );
    assert!(
        during.next_renewal.is_some(),
        "no retry scheduled: {during:?}"
    );
    // The valid certificate still works for traffic.
    assert_echo(&tb, "during the outage");

    tb.start_ca().unwrap();
    assert_eventually!(
        timeout = Duration::from_secs(20),
        {
            let c = cert_of(&tb, "node2", "server");
            c.state == "available" && c.failures == 0 && c.serial != before.serial
        },
        "no recovery after the CA returned: {:?}\n{}",
        tb.certs("node2"),
        tb.agent_logs(20)
    );
    let after = cert_of(&tb, "node2", "server");
    assert_eq!(after.last_error, None, "{after:?}");
    assert!(after.renewals > before.renewals, "{after:?}");
    assert_echo(&tb, "after the outage");
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn the_ca_refuses_foreign_tokens_and_garbage_and_keeps_serving() {
    let tb = testbed();
    let ca = tb.state().ca().unwrap().clone();
    let dir = tb.state().dir.clone();
    let write = |name: &str, token: &str| {
        let path = dir.join(name);
        std::fs::write(&path, token).unwrap();
        path
    };
    // A token for node2 signed by another issuer key (same issuer URL, claims and audience).
    let forger = TokenIssuer::generate(&ca.issuer).unwrap();
    let forged = write(
        "forged.token",
        &ambit_e2e::ca::node_token(&forger, "node2", Duration::from_secs(600)).unwrap(),
    );
    // The real key, but the token has expired.
    let issuer = ambit_e2e::ca::issuer(&ca).unwrap();
    let expired = issuer
        .token(&ServiceAccountClaims {
            namespace: ambit_e2e::ca::AGENT_NAMESPACE.into(),
            service_account: ambit_e2e::ca::AGENT_SERVICE_ACCOUNT.into(),
            node: "node2".into(),
            audiences: vec![ambit_e2e::ca::AUDIENCE.into()],
            issued_at: SystemTime::now() - Duration::from_secs(7200),
            ttl: Duration::from_secs(600),
        })
        .unwrap();
    let expired = write("expired.token", &expired);
    // The real key and node, but a pod's service account instead of the node agent's.
    let pod_sa = issuer
        .token(&ServiceAccountClaims {
            namespace: "default".into(),
            service_account: "server".into(),
            node: "node2".into(),
            audiences: vec![ambit_e2e::ca::AUDIENCE.into()],
            issued_at: SystemTime::now(),
            ttl: Duration::from_secs(600),
        })
        .unwrap();
    let pod_sa = write("pod-sa.token", &pod_sa);
    // Each refusal says why.
    for (what, token, why) in [
        ("forged", &forged, "no issuer key"),
        ("expired", &expired, "expired"),
        ("pod's", &pod_sa, "not an allowed node agent"),
    ] {
        let err = match tb.issue_with_token("node2", token, "default", "server") {
            Ok(_) => panic!("the CA signed with a {what} token"),
            Err(e) => format!("{e:#}"),
        };
        assert!(
            err.contains(why),
            "{what} token refused without saying {why:?}: {err}"
        );
    }

    // Bytes that are not TLS on the CA port: closed, and the CA keeps serving.
    let node1 = tb.node("node1").netns_path();
    let (back, ended) = in_netns(&node1, move || async move {
        ambit_e2e::hbone::raw_exchange(ca.addr, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n garbage").await
    })
    .unwrap()
    .unwrap();
    assert_ne!(ended, "timed out", "the CA kept a garbage connection open");
    assert!(back.is_empty() || back[0] == 21, "{back:?}");
    let svid = tb.issue("node2", "default", "server").unwrap();
    assert_eq!(svid.cert.id().to_string(), tb.pod("server").identity());
}
