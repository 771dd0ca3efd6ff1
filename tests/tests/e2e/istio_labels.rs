//! Istio's enrollment labels with traffic: pods of a namespace labelled
//! `istio.io/dataplane-mode=ambient` and a pod labelled so in an unlabelled namespace are
//! captured and tunnelled over mTLS; a pod labelled `none` in the ambient namespace (and an
//! unlabelled pod) sends plaintext that STRICT refuses, until its opt-out is removed; and
//! `ambit explain` names the label that decided.
#![allow(
    clippy::unwrap_used,
    reason = "test bodies panic with a line number (STYLE.md §7)"
)]
use std::net::{IpAddr, SocketAddr};

use ambit_e2e::policy::PeerAuthentication as Pa;
use ambit_e2e::{
    assert_eventually, testbed_with, unique_marker, Options, PodSpec, Testbed, ECHO_PORT,
};
use serde_json::Value;

const ISTIO_LABEL: &str = "istio.io/dataplane-mode";

/// node1: `nsclient` (enrolled by its namespace `mesh`), `podlab` (enrolled by its own label
/// in the unlabelled namespace `plain`), `optout` (`none` in `mesh`), `bystander` (unlabelled,
/// in `plain`); node2: `server` in `mesh`, running the test servers. No pod carries
/// `ambit.io/mode`.
fn pods() -> Vec<PodSpec> {
    vec![
        PodSpec::new("nsclient", "node1", false, false).in_namespace("mesh"),
        PodSpec::new("podlab", "node1", false, false)
            .in_namespace("plain")
            .labelled(ISTIO_LABEL, "ambient"),
        PodSpec::new("optout", "node1", false, false)
            .in_namespace("mesh")
            .labelled(ISTIO_LABEL, "none"),
        PodSpec::new("bystander", "node1", false, false).in_namespace("plain"),
        PodSpec::new("server", "node2", false, true).in_namespace("mesh"),
    ]
}

const NAMESPACES: &str =
    "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: mesh\n  labels:\n    \
     kubernetes.io/metadata.name: mesh\n    istio.io/dataplane-mode: ambient\n\
     ---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: plain\n  labels:\n    \
     kubernetes.io/metadata.name: plain\n";

/// Whether `node`'s agent serves `pod` as enrolled and holds an available certificate for it.
fn served(tb: &Testbed, node: &str, pod: &str) -> bool {
    let id = tb.pod(pod).identity();
    tb.status(node)
        .is_ok_and(|st| st.pod_state(pod) == Some("enrolled"))
        && tb
            .certs(node)
            .is_ok_and(|c| c.get(&id).is_some_and(|c| c.state == "available"))
}

fn server_addr(tb: &Testbed) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(tb.pod("server").ipv4), ECHO_PORT)
}

/// Holds an echo connection from `pod` to the server open and asserts that node2's agent lists
/// it as inbound mTLS from `pod`'s identity (and node1's as outbound mTLS from `pod`).
fn assert_tunnelled(tb: &Testbed, pod: &str) {
    let marker = unique_marker();
    let to = server_addr(tb);
    let held = tb.hold(pod, to.ip(), to.port(), &marker).unwrap();
    assert_eq!(held.reply.data(), marker, "{pod}: {:?}", held.reply);
    let me = tb.pod(pod).clone();
    let (id, key) = (me.identity(), format!("{}/{}", me.namespace, me.name));
    assert_eventually!(
        tb.connections("node1")
            .unwrap()
            .iter()
            .any(|c| { c.direction == "outbound" && c.pod == key && c.security == "mutual_tls" }),
        "node1 lists no outbound mTLS connection of {key}: {:?}",
        tb.connections("node1")
    );
    assert_eventually!(
        tb.connections("node2").unwrap().iter().any(|c| {
            c.direction == "inbound"
                && c.pod == "mesh/server"
                && c.security == "mutual_tls"
                && c.src_identity.as_deref() == Some(id.as_str())
                && c.src.starts_with(&me.ipv4.to_string())
        }),
        "node2 lists no inbound mTLS connection from {id}: {:?}",
        tb.connections("node2")
    );
    drop(held);
}

/// Asserts that `pod` is not captured: node1 does not serve it, and its plaintext to the
/// server is refused by STRICT (counted as `inbound_denied` on the server).
fn assert_refused_plaintext(tb: &Testbed, pod: &str) {
    let st = tb.status("node1").unwrap();
    assert!(st.pod(pod).is_none(), "node1 serves {pod}: {}", st.0);
    let denied = tb.proxy_counter("node2", "server", "inbound_denied");
    let to = server_addr(tb);
    let r = tb.request(pod, to.ip(), to.port(), Some("plain")).unwrap();
    assert!(r.error().is_some() || r.data().is_empty(), "{pod}: {r:?}");
    assert_eq!(
        tb.proxy_counter("node2", "server", "inbound_denied"),
        denied + 1,
        "{pod}'s plaintext was not refused by the server's agent"
    );
}

/// The `reason` of `role` (`source`, `destination`) in an explanation.
fn reason<'a>(why: &'a Value, role: &str) -> &'a str {
    why["enrollment"]
        .as_array()
        .and_then(|e| e.iter().find(|e| e["role"] == role))
        .and_then(|e| e["reason"].as_str())
        .unwrap_or_else(|| panic!("no {role} enrollment in {why}"))
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn istio_labels_enroll_by_namespace_and_pod_and_none_opts_out() {
    let mut tb = testbed_with(Options {
        pods: pods(),
        ..Options::default()
    });
    tb.apply(NAMESPACES).unwrap();
    tb.apply(&Pa::new("mesh", "default").mode("STRICT").yaml())
        .unwrap();
    for (node, pod) in [
        ("node1", "nsclient"),
        ("node1", "podlab"),
        ("node2", "server"),
    ] {
        assert_eventually!(
            served(&tb, node, pod),
            "{node} does not serve {pod}: {:?}\n{}",
            tb.status(node).map(|s| s.0),
            tb.agent_logs(30)
        );
    }

    // Enrolled by the namespace label, and by the pod label: captured and tunnelled.
    assert_tunnelled(&tb, "nsclient");
    assert_tunnelled(&tb, "podlab");
    // Opted out by `none` in the ambient namespace, and unlabelled in the unlabelled one:
    // plaintext, which the server's STRICT refuses.
    assert_refused_plaintext(&tb, "optout");
    assert_refused_plaintext(&tb, "bystander");

    // `ambit explain` names the deciding label, in JSON and in words.
    let to = server_addr(&tb);
    let why = tb.explain("node1", "mesh/nsclient", to).unwrap();
    let by_ns = "enrolled by namespace label istio.io/dataplane-mode=ambient";
    assert_eq!(reason(&why, "source"), by_ns, "{why}");
    assert_eq!(reason(&why, "destination"), by_ns, "{why}");
    let why = tb.explain("node1", "plain/podlab", to).unwrap();
    assert_eq!(
        reason(&why, "source"),
        "enrolled by pod label istio.io/dataplane-mode=ambient",
        "{why}"
    );
    let why = tb.explain("node1", "mesh/optout", to).unwrap();
    let opted_out = "not enrolled: pod label istio.io/dataplane-mode=none \
                     (overrides namespace label istio.io/dataplane-mode=ambient)";
    assert_eq!(reason(&why, "source"), opted_out, "{why}");
    let out = tb
        .ambit_cli(
            "node1",
            &["explain", "--from", "mesh/optout", "--to", &to.to_string()],
        )
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("- source mesh/optout: {opted_out}")),
        "{text}"
    );

    // The opt-out removed, the same pod is enrolled by its namespace and tunnelled.
    tb.set_pod_labels("optout", &[]).unwrap();
    assert_eventually!(
        served(&tb, "node1", "optout"),
        "node1 does not serve optout once its opt-out is gone: {:?}",
        tb.status("node1").map(|s| s.0)
    );
    assert_tunnelled(&tb, "optout");
    let why = tb.explain("node1", "mesh/optout", to).unwrap();
    assert_eq!(reason(&why, "source"), by_ns, "{why}");
}
