//! DestinationRule (issue 5): `tls.mode: DISABLE` makes the client's agent send plaintext to a
//! Service (accepted by a PERMISSIVE destination, refused by a STRICT one), and
//! `ISTIO_MUTUAL` refuses a destination outside the mesh instead of falling back to plaintext;
//! `ambit explain` gives the same verdicts.
#![allow(
    clippy::unwrap_used,
    reason = "test bodies panic with a line number (STYLE.md §7)"
)]
use std::net::{IpAddr, SocketAddr};

use ambit_e2e::policy::PeerAuthentication;
use ambit_e2e::{testbed, Testbed, ECHO_PORT};

/// Service `name` with VIP `vip`, port 9000 -> 9000, endpoint `pod`.
fn service(tb: &Testbed, name: &str, vip: &str, pod: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\n\
         spec:\n  clusterIP: {vip}\n  ports:\n  - name: echo\n    port: {ECHO_PORT}\n    \
         targetPort: {ECHO_PORT}\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  \
         namespace: default\n  labels:\n    kubernetes.io/service-name: {name}\n\
         addressType: IPv4\nports:\n- name: echo\n  port: {ECHO_PORT}\n\
         endpoints:\n- addresses: [\"{}\"]\n",
        tb.pod(pod).ipv4
    )
}

/// A DestinationRule for Service `host` (short name) with `tls.mode`.
fn destination_rule(name: &str, host: &str, mode: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: {name}\n  \
         namespace: default\nspec:\n  host: {host}\n  trafficPolicy:\n    tls:\n      mode: {mode}\n"
    )
}

fn echo(tb: &Testbed, to: IpAddr, text: &str) -> String {
    tb.request("client", to, ECHO_PORT, Some(text))
        .unwrap()
        .data()
        .to_string()
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn disable_sends_plaintext_and_strict_destinations_refuse_it() {
    let mut tb = testbed();
    let vip: IpAddr = "10.96.0.20".parse().unwrap();
    let to = SocketAddr::new(vip, ECHO_PORT);
    tb.apply(&service(&tb, "web", "10.96.0.20", "server"))
        .unwrap();
    assert_eq!(echo(&tb, vip, "tunnelled"), "tunnelled");

    tb.apply(&destination_rule("web-plain", "web", "DISABLE"))
        .unwrap();
    let why = tb.explain("node1", "default/client", to).unwrap();
    assert_eq!(why["outbound"]["route"], "plaintext", "{why:#}");
    // Plaintext now arrives at the server's plaintext listener, and PERMISSIVE admits it.
    let steered = tb.kernel_counter("node2", "lookup_steer");
    assert_eq!(echo(&tb, vip, "plaintext"), "plaintext");
    assert!(tb.kernel_counter("node2", "lookup_steer") > steered);

    tb.apply(
        &PeerAuthentication::new("default", "default")
            .mode("STRICT")
            .yaml(),
    )
    .unwrap();
    let why = tb.explain("node1", "default/client", to).unwrap();
    let verdict = why["verdict"].as_str().unwrap();
    assert!(verdict.contains("STRICT"), "{why:#}");
    let denied = tb.proxy_counter("node2", "server", "inbound_denied");
    assert_eq!(
        echo(&tb, vip, "refused"),
        "",
        "STRICT admitted DISABLE's plaintext"
    );
    assert_eq!(
        tb.proxy_counter("node2", "server", "inbound_denied"),
        denied + 1
    );

    // Without the DestinationRule the client tunnels again, which STRICT accepts.
    tb.delete("DestinationRule", "default", "web-plain")
        .unwrap();
    assert_eq!(echo(&tb, vip, "mtls again"), "mtls again");
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn istio_mutual_refuses_a_destination_outside_the_mesh() {
    let mut tb = testbed();
    let vip: IpAddr = "10.96.0.30".parse().unwrap();
    let to = SocketAddr::new(vip, ECHO_PORT);
    // `legacy` is not enrolled: without a rule the client sends it plaintext.
    tb.apply(&service(&tb, "old", "10.96.0.30", "legacy"))
        .unwrap();
    assert_eq!(echo(&tb, vip, "plaintext ok"), "plaintext ok");

    tb.apply(&destination_rule(
        "old-mtls",
        "old.default.svc.cluster.local",
        "ISTIO_MUTUAL",
    ))
    .unwrap();
    let why = tb.explain("node1", "default/client", to).unwrap();
    assert_eq!(why["outbound"]["route"], "refuse", "{why:#}");
    assert!(
        why["verdict"]
            .as_str()
            .unwrap()
            .contains("refused by the source agent"),
        "{why:#}"
    );
    let failed = tb.proxy_counter("node1", "client", "outbound_failed");
    let r = tb
        .request("client", vip, ECHO_PORT, Some("must not leave"))
        .unwrap();
    assert_eq!(r.data(), "", "ISTIO_MUTUAL fell back to plaintext: {r:?}");
    assert_eq!(
        tb.proxy_counter("node1", "client", "outbound_failed"),
        failed + 1
    );
}
