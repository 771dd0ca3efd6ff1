//! Root rotation under load: the CA's root is replaced in three steps on the running testbed
//! (old + new root trusted, the CA signs under the new root, the old root removed), with no
//! restart of the CA or the agents, while new connections flow from `client` (node1) to
//! `server` (node2) and one long-lived connection echoes throughout. No connection may fail;
//! at the end a certificate under the old root is refused and one under the new root accepted.
//!
//! The agents' `ca.rootCert` is the CA's `certDir/root-cert.pem` (as the mounted ConfigMap in
//! a cluster), so one file change reaches both sides: the CA reloads `certDir`, the agents
//! follow the file and the roots the CA sends.
#![allow(
    clippy::unwrap_used,
    reason = "test bodies panic with a line number (STYLE.md §7)"
)]
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ambit::ca::material::{Material, ServingNames, CA_CERT, CA_KEY, CERT_CHAIN, ROOT_CERT};
use ambit::identity::{verify_svid, PeerRole, TrustBundle, TrustDomain};
use ambit_e2e::hbone::{self, client_config, in_netns, Issue as _, Svid};
use ambit_e2e::ops::{tail, Proc};
use ambit_e2e::state::{write_atomic, TRUST_DOMAIN};
use ambit_e2e::{eventually, testbed_with, Options, Testbed, ECHO_PORT, TUNNEL_PORT};
use http::Method;
use rustls_pki_types::UnixTime;

/// Port of the load script's echo server in the server pod.
const LOAD_PORT: u16 = 9100;
/// New connections per second, and for how long: longer than the whole rotation (about 25 s
/// with 20 s certificates, renewed at half life).
const RATE: u32 = 20;
const SECONDS: u32 = 60;
/// Certificate lifetime: renewals every ~10 s, so every certificate is replaced in each step.
const CERT_TTL_SECS: u64 = 20;
/// How long one step may take: a renewal (half the lifetime, ± 1 s) and the polls.
const STEP: Duration = Duration::from_secs(30);

fn bundle(pem: &[u8]) -> TrustBundle {
    TrustBundle::from_pem(std::str::from_utf8(pem).unwrap()).unwrap()
}

/// Whether `a` and `b` hold the same roots, in any order.
fn same_roots(a: &TrustBundle, b: &TrustBundle) -> bool {
    a.roots().len() == b.roots().len() && a.roots().iter().all(|r| b.roots().contains(r))
}

/// Whether `svid` chains to `roots`.
fn signed_under(svid: &Svid, roots: &TrustBundle) -> bool {
    let domains: Vec<TrustDomain> = vec![TRUST_DOMAIN.parse().unwrap()];
    verify_svid(
        svid.cert.chain(),
        roots,
        UnixTime::now(),
        &domains,
        PeerRole::Client,
    )
    .is_ok()
}

/// Whether node2's agent accepts an HBONE tunnel to `server`'s echo port from a client
/// presenting `svid`, itself trusting `trust` (so a refusal is the agent's, not the client's).
fn accepted(tb: &Testbed, svid: &Svid, trust: &TrustBundle) -> Result<(), String> {
    let server = tb.pod("server");
    let ip = IpAddr::V4(server.ipv4);
    let svid = Svid {
        cert: svid.cert.clone(),
        roots: Arc::new(trust.clone()),
    };
    let tls = client_config(&svid, &server.identity()).unwrap();
    // From the outsider pod (not enrolled: its connections to 15008 are its own).
    let netns = tb.pod("outsider").netns_path();
    let (outcome, echo) = in_netns(&netns, move || async move {
        hbone::hbone_request(
            SocketAddr::new(ip, TUNNEL_PORT),
            tls,
            Method::CONNECT,
            SocketAddr::new(ip, ECHO_PORT),
            b"probe",
        )
        .await
    })
    .unwrap();
    if outcome.accepted() && echo == b"probe" {
        Ok(())
    } else {
        Err(format!(
            "{outcome:?}, echo {:?}",
            String::from_utf8_lossy(&echo)
        ))
    }
}

/// `node`'s renewal count of `pod`'s certificate.
fn renewals(tb: &Testbed, node: &str, pod: &str) -> u64 {
    let id = tb.pod(pod).identity();
    tb.cert(node, &id).map_or(0, |c| c.renewals)
}

/// Reloads of the root file `node`'s agent applied.
fn root_reloads(tb: &Testbed, node: &str) -> f64 {
    tb.metrics(node)
        .unwrap()
        .sum("ambit_trust_reloads_total", &[("outcome", "applied")])
}

fn start_load(tb: &Testbed, server: IpAddr) -> Proc {
    let args = [
        "load".to_string(),
        server.to_string(),
        LOAD_PORT.to_string(),
        "--rate".into(),
        RATE.to_string(),
        "--seconds".into(),
        SECONDS.to_string(),
        "--timeout".into(),
        "5".into(),
    ];
    let mut p = tb.start_load_script("client", &args).unwrap();
    p.wait_line(Duration::from_secs(30), |v| {
        v["progress"]["t"].as_f64().filter(|t| *t >= 2.0)
    })
    .unwrap();
    p
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn a_root_rotation_under_load_loses_no_connection() {
    let tb = testbed_with(Options::cert_ttl(CERT_TTL_SECS));
    let ca = tb.state().ca().unwrap().clone();
    let dir = ca.cert_dir.clone();
    let read = |d: &Path, f: &str| std::fs::read(d.join(f)).unwrap();

    // The new root, generated beside the running one in the same layout.
    let next = tb.state().dir.join("ca-next");
    std::fs::create_dir_all(&next).unwrap();
    Material::load(
        &next,
        Some(Duration::from_secs(24 * 3600)),
        TRUST_DOMAIN.parse().unwrap(),
        &ServingNames {
            dns: vec!["ambit-ca".into()],
            ips: vec![ca.addr.ip()],
        },
        SystemTime::now(),
    )
    .unwrap();
    let (old_pem, new_pem) = (read(&dir, ROOT_CERT), read(&next, ROOT_CERT));
    let (old, new) = (bundle(&old_pem), bundle(&new_pem));
    let both = old.merged(&new);
    assert_ne!(old.roots(), new.roots());

    // Before: a certificate under the old root is accepted, one under the new root is not
    // (what the end of the test looks for, seen here the other way round).
    let old_svid = tb.issue("node1", "default", "client").unwrap();
    assert!(signed_under(&old_svid, &old) && !signed_under(&old_svid, &new));
    accepted(&tb, &old_svid, &both).unwrap();

    let server = IpAddr::V4(tb.pod("server").ipv4);
    let _echo = tb.start_echo_server("server", LOAD_PORT).unwrap();
    // One connection, opened under the old root, echoing every 100 ms throughout.
    let mut pinger = tb
        .start_load_script(
            "client",
            &[
                "ping".into(),
                server.to_string(),
                ECHO_PORT.to_string(),
                "--interval=0.1".into(),
                format!("--seconds={}", SECONDS + 30),
            ],
        )
        .unwrap();
    pinger
        .wait_line(Duration::from_secs(20), |v| v.get("ping").cloned())
        .unwrap();
    let mut load = start_load(&tb, server);
    let logs = || tb.agent_logs(30);

    // 1. Both roots in root-cert.pem: both agents reload it, the CA sends both.
    let reloads = [root_reloads(&tb, "node1"), root_reloads(&tb, "node2")];
    write_atomic(
        &dir.join(ROOT_CERT),
        &[old_pem.clone(), new_pem.clone()].concat(),
    )
    .unwrap();
    for (i, node) in ["node1", "node2"].iter().enumerate() {
        assert!(
            eventually(STEP, || (root_reloads(&tb, node) > reloads[i])
                .then_some(()))
            .is_some(),
            "{node} did not reload the root file\n{}",
            logs()
        );
    }
    let sent_both = eventually(STEP, || {
        let svid = tb.issue("node2", "default", "server").ok()?;
        same_roots(&svid.roots, &both).then_some(svid)
    });
    let svid = sent_both.unwrap_or_else(|| panic!("the ca never sent both roots\n{}", logs()));
    assert!(signed_under(&svid, &old), "still signed under the old root");

    // 2. The new signing material (its key last, so the CA may first refuse a half-written
    // pair and take the whole at the next poll), both roots still in root-cert.pem.
    write_atomic(&dir.join(CERT_CHAIN), &read(&next, CERT_CHAIN)).unwrap();
    write_atomic(&dir.join(CA_CERT), &read(&next, CA_CERT)).unwrap();
    write_atomic(&dir.join(CA_KEY), &read(&next, CA_KEY)).unwrap();
    let new_svid = eventually(STEP, || {
        let svid = tb.issue("node2", "default", "server").ok()?;
        (signed_under(&svid, &new) && !signed_under(&svid, &old)).then_some(svid)
    });
    assert!(
        new_svid.is_some(),
        "the ca never signed under the new root\n{}",
        logs()
    );
    // Every agent certificate renewed since, so under the new root.
    let since = [
        renewals(&tb, "node1", "client"),
        renewals(&tb, "node2", "server"),
    ];
    assert!(
        eventually(STEP, || (renewals(&tb, "node1", "client") > since[0]
            && renewals(&tb, "node2", "server") > since[1])
            .then_some(()))
        .is_some(),
        "the agents' certificates were not renewed under the new root: {:?} {:?}",
        tb.certs("node1"),
        tb.certs("node2")
    );

    // 3. The old root removed. The agents stop trusting it once the file and the CA's answers
    // (from the next renewal on) both have only the new root.
    write_atomic(&dir.join(ROOT_CERT), &new_pem).unwrap();
    let refused = eventually(STEP, || accepted(&tb, &old_svid, &both).err());
    let refused = refused.unwrap_or_else(|| {
        panic!(
            "node2 still accepts a certificate under the removed root\n{}",
            logs()
        )
    });
    eprintln!("root rotation: the old root's certificate is refused: {refused}");
    let new_client = tb.issue("node1", "default", "client").unwrap();
    assert!(signed_under(&new_client, &new));
    accepted(&tb, &new_client, &new).unwrap();

    // No connection failed: every new one echoed, the long-lived one never ended.
    let summary = load
        .wait_line(Duration::from_secs(u64::from(SECONDS) + 60), |v| {
            v.get("summary").cloned()
        })
        .unwrap();
    eprintln!("root rotation: load across it: {summary}");
    let total = u64::from(RATE * SECONDS);
    assert_eq!(summary["requests"], total, "{summary}");
    assert_eq!(
        summary["failed"],
        0,
        "connections failed across the rotation:\n{summary:#}\n{}",
        logs()
    );
    assert_eq!(summary["ok"], total, "{summary}");
    let lines = pinger.json_lines();
    assert!(
        lines.iter().all(|v| v.get("end").is_none()),
        "the long-lived connection ended: {}",
        tail(&pinger.output(), 5)
    );
    let pings = lines.iter().filter(|v| v.get("ping").is_some()).count();
    assert!(
        pings >= SECONDS as usize * 5,
        "only {pings} echoes on the long-lived connection in {SECONDS} s"
    );
}
