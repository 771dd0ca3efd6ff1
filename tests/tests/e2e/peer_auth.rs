//! PeerAuthentication, with Istio's YAML applied to the running testbed: STRICT refuses
//! plaintext (reset, counted) and PERMISSIVE admits it; DISABLE makes enrolled clients send
//! plaintext; workload and port-level settings override the namespace, which overrides the
//! mesh; UNSET inherits; at one level the oldest policy wins; a policy in another namespace
//! does not apply (and `ambit explain` says so); kubelet probes pass STRICT.
#![allow(
    clippy::unwrap_used,
    reason = "test bodies panic with a line number (STYLE.md §7)"
)]
use std::net::{IpAddr, SocketAddr};

use ambit_e2e::capture::UNDERLAY;
use ambit_e2e::policy::PeerAuthentication as Pa;
use ambit_e2e::{testbed, unique_marker, Testbed, ECHO_PORT, PEER_PORT, TUNNEL_PORT};

const SERVER: &str = "default/server";

/// Whether plaintext from `outsider` (not enrolled, node1) reaches the server app on `port`
/// (the peer report on 7000, the echo on 9000).
fn outsider_reaches(tb: &Testbed, port: u16) -> bool {
    let server = IpAddr::V4(tb.pod("server").ipv4);
    let outsider = tb.pod("outsider").ipv4;
    let r = tb.request("outsider", server, port, Some("plain")).unwrap();
    if port == PEER_PORT {
        r.data().starts_with(&format!("peer={outsider}:"))
    } else {
        r.data() == "plain"
    }
}

/// The server's effective mode on `port`, as node2's `/policies` reports it.
fn mode(tb: &Testbed, port: u16) -> (String, String, String) {
    tb.peer_auth_mode("node2", SERVER, port).unwrap()
}

/// Asserts the server's mode on `port` (and which level decided it), and that outsider's
/// plaintext is refused exactly when it is STRICT, with the refusal counted.
fn assert_enforced(tb: &Testbed, port: u16, want: &str, level: &str) {
    let (m, l, by) = mode(tb, port);
    assert_eq!(
        (m.as_str(), l.as_str()),
        (want, level),
        "port {port}: decided by {by}"
    );
    let denied = tb.proxy_counter("node2", "server", "inbound_denied");
    let seen = tb.peer_log("server").len();
    let reached = outsider_reaches(tb, port);
    let strict = want == "STRICT";
    assert_eq!(
        reached, !strict,
        "plaintext to port {port} under {want} ({level}, {by}): reached = {reached}"
    );
    let counted = tb.proxy_counter("node2", "server", "inbound_denied") - denied;
    assert_eq!(counted, u64::from(strict), "inbound_denied on port {port}");
    if strict && port == PEER_PORT {
        assert_eq!(
            tb.peer_log("server").len(),
            seen,
            "the app saw refused plaintext"
        );
    }
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn strict_refuses_plaintext_and_permissive_admits_it() {
    let mut tb = testbed();
    let server = IpAddr::V4(tb.pod("server").ipv4);
    // Nothing set: PERMISSIVE.
    assert_enforced(&tb, PEER_PORT, "PERMISSIVE", "default");

    tb.apply(&Pa::new("default", "default").mode("STRICT").yaml())
        .unwrap();
    assert_enforced(&tb, PEER_PORT, "STRICT", "namespace");
    assert_enforced(&tb, ECHO_PORT, "STRICT", "namespace");
    // The refusal is a reset the client sees, not a hang or an empty success.
    let r = tb
        .request("outsider", server, ECHO_PORT, Some("x"))
        .unwrap();
    assert!(r.error().is_some() || r.data().is_empty(), "{r:?}");
    // mTLS from the enrolled client still passes.
    let echo = tb
        .request("client", server, ECHO_PORT, Some("mtls"))
        .unwrap();
    assert_eq!(echo.data(), "mtls");

    // The same object, now PERMISSIVE (v1beta1 is the same API): plaintext passes again.
    tb.apply(
        &Pa::new("default", "default")
            .mode("PERMISSIVE")
            .v1beta1()
            .yaml(),
    )
    .unwrap();
    assert_enforced(&tb, PEER_PORT, "PERMISSIVE", "namespace");
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn disable_makes_enrolled_clients_send_plaintext() {
    let mut tb = testbed();
    let server = IpAddr::V4(tb.pod("server").ipv4);
    let to = SocketAddr::new(server, ECHO_PORT);
    tb.apply(
        &Pa::new("default", "server-off")
            .selector("server")
            .mode("DISABLE")
            .yaml(),
    )
    .unwrap();
    assert_eq!(mode(&tb, ECHO_PORT).0, "DISABLE");
    let why = tb.explain("node1", "default/client", to).unwrap();
    assert_eq!(why["outbound"]["route"], "plaintext", "{why:#}");

    let marker = unique_marker();
    let cap = tb.capture("node1", UNDERLAY).unwrap();
    let r = tb
        .request("client", server, ECHO_PORT, Some(&marker))
        .unwrap();
    assert_eq!(r.data(), marker);
    let seen = cap.stop().unwrap();
    assert!(
        seen.count(marker.as_bytes()) >= 2,
        "DISABLE should put the client's bytes on the wire in plaintext:\n{}",
        seen.summary()
    );
    assert!(
        seen.with_payload()
            .all(|f| f.src.port() != TUNNEL_PORT && f.dst.port() != TUNNEL_PORT),
        "{}",
        seen.summary()
    );

    // Without the policy the same connection is tunnelled again: the marker disappears.
    tb.delete("PeerAuthentication", "default", "server-off")
        .unwrap();
    let why = tb.explain("node1", "default/client", to).unwrap();
    assert_eq!(why["outbound"]["route"], "tunnel", "{why:#}");
    let cap = tb.capture("node1", UNDERLAY).unwrap();
    let r = tb
        .request("client", server, ECHO_PORT, Some(&marker))
        .unwrap();
    assert_eq!(r.data(), marker);
    let seen = cap.stop().unwrap();
    assert_eq!(seen.count(marker.as_bytes()), 0, "{}", seen.summary());
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn port_beats_workload_beats_namespace_beats_mesh_and_unset_inherits() {
    let mut tb = testbed();
    // Mesh-wide STRICT (root namespace); the namespace policy is UNSET, so it inherits STRICT.
    tb.apply(&format!(
        "{}---\n{}",
        Pa::new("istio-system", "mesh").mode("STRICT").yaml(),
        Pa::new("default", "ns").mode("UNSET").yaml()
    ))
    .unwrap();
    assert_enforced(&tb, PEER_PORT, "STRICT", "mesh");

    // The namespace says PERMISSIVE: it beats the mesh.
    tb.apply(&Pa::new("default", "ns").mode("PERMISSIVE").yaml())
        .unwrap();
    assert_enforced(&tb, PEER_PORT, "PERMISSIVE", "namespace");

    // The workload says STRICT, except port 9000 PERMISSIVE.
    tb.apply(
        &Pa::new("default", "server")
            .selector("server")
            .mode("STRICT")
            .port(ECHO_PORT, "PERMISSIVE")
            .yaml(),
    )
    .unwrap();
    assert_enforced(&tb, PEER_PORT, "STRICT", "workload");
    assert_enforced(&tb, ECHO_PORT, "PERMISSIVE", "port");

    // The workload's own mode UNSET: 7000 inherits the namespace; 9000 is STRICT by port.
    tb.apply(
        &Pa::new("default", "server")
            .selector("server")
            .mode("UNSET")
            .port(ECHO_PORT, "STRICT")
            .yaml(),
    )
    .unwrap();
    assert_enforced(&tb, PEER_PORT, "PERMISSIVE", "namespace");
    assert_enforced(&tb, ECHO_PORT, "STRICT", "port");
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn the_oldest_policy_wins_at_the_same_level() {
    let mut tb = testbed();
    // Two namespace-wide policies. The newer one comes first in the file and sorts first by
    // name, so only the creation time can make the older one win.
    let both = |strict_created: &str, permissive_created: &str| {
        format!(
            "{}---\n{}",
            Pa::new("default", "a-permissive")
                .mode("PERMISSIVE")
                .created(permissive_created)
                .yaml(),
            Pa::new("default", "b-strict")
                .mode("STRICT")
                .created(strict_created)
                .yaml()
        )
    };
    tb.apply(&both("2021-01-01T00:00:00Z", "2024-01-01T00:00:00Z"))
        .unwrap();
    assert_enforced(&tb, PEER_PORT, "STRICT", "namespace");
    assert_eq!(mode(&tb, PEER_PORT).2, "default/b-strict");

    tb.apply(&both("2024-06-01T00:00:00Z", "2021-01-01T00:00:00Z"))
        .unwrap();
    assert_enforced(&tb, PEER_PORT, "PERMISSIVE", "namespace");
    assert_eq!(mode(&tb, PEER_PORT).2, "default/a-permissive");
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn a_policy_in_another_namespace_does_not_apply_and_explain_says_so() {
    let mut tb = testbed();
    // STRICT meant for the server, but written in namespace `shop` (no pods there), and a
    // workload policy in `shop` whose selector matches the server's labels in `default`.
    tb.apply(&format!(
        "{}---\n{}",
        Pa::new("shop", "strict").mode("STRICT").yaml(),
        Pa::new("shop", "server")
            .selector("server")
            .mode("STRICT")
            .yaml()
    ))
    .unwrap();
    assert_enforced(&tb, PEER_PORT, "PERMISSIVE", "default");

    let to = SocketAddr::new(IpAddr::V4(tb.pod("server").ipv4), PEER_PORT);
    let why = tb.explain("node1", "default/outsider", to).unwrap();
    let warnings = why["warnings"].to_string();
    assert!(
        warnings.contains("shop/strict") && warnings.contains("does not apply"),
        "explain does not flag the policy in the wrong namespace: {why:#}"
    );
    assert_eq!(
        why["inbound"]["peer_authentication"]["mode"], "PERMISSIVE",
        "{why:#}"
    );

    // Moved to the right namespace, it applies.
    tb.apply(&Pa::new("default", "strict").mode("STRICT").yaml())
        .unwrap();
    assert_enforced(&tb, PEER_PORT, "STRICT", "namespace");
    let why = tb.explain("node1", "default/outsider", to).unwrap();
    assert!(
        why["inbound"]["peer_authentication"]["policy"] == "default/strict",
        "{why:#}"
    );
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn kubelet_probes_from_the_node_pass_strict() {
    let mut tb = testbed();
    tb.apply(&Pa::new("default", "default").mode("STRICT").yaml())
        .unwrap();
    assert_enforced(&tb, PEER_PORT, "STRICT", "namespace");
    // node2's own address on the pods' bridge is the agent's configured probe source.
    let server = IpAddr::V4(tb.pod("server").ipv4);
    let probe = tb
        .request_from_node("node2", server, PEER_PORT, None)
        .unwrap();
    assert!(
        probe.data().starts_with("peer=10.2.0.1:"),
        "a probe from the node was refused under STRICT: {probe:?}"
    );
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn a_malformed_policy_is_rejected_by_name_and_the_last_good_set_stays() {
    let mut tb = testbed();
    tb.apply(&Pa::new("default", "default").mode("STRICT").yaml())
        .unwrap();
    assert_enforced(&tb, PEER_PORT, "STRICT", "namespace");

    // A typo in the mode of a new policy that would make the server PERMISSIVE.
    tb.apply_rejected(
        &Pa::new("default", "server-typo")
            .selector("server")
            .mode("PERMISIVE")
            .yaml(),
    )
    .unwrap();
    let log = std::fs::read_to_string(&tb.node("node2").log).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("server-typo") && l.contains("PERMISIVE")),
        "node2's log does not name the rejected object and value"
    );
    // Still STRICT, from the last good set.
    assert_enforced(&tb, PEER_PORT, "STRICT", "namespace");
}
