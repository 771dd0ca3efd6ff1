//! L4 AuthorizationPolicy (issue 5), enforced by the server's agent with the identity the
//! handshake proved (plaintext has none): ALLOW by principal, DENY by namespace, ALLOW by
//! ipBlock, DENY by port; an open connection is closed when a new policy denies it; and
//! `ambit explain` reports the same decisions.
#![allow(
    clippy::unwrap_used,
    reason = "test bodies panic with a line number (STYLE.md §7)"
)]
use std::net::{IpAddr, SocketAddr};

use ambit_e2e::{assert_eventually, testbed, Testbed, ECHO_PORT, PEER_PORT};
use serde_json::{json, Value};

/// An AuthorizationPolicy on the server pod: `action` with one rule of `from` / `to` YAML
/// (each already indented as a list item body, or empty).
fn policy(name: &str, action: &str, from: &str, to: &str) -> String {
    let mut y = format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n  \
         namespace: default\nspec:\n  selector:\n    matchLabels:\n      app: server\n  \
         action: {action}\n  rules:\n  -"
    );
    let mut first = true;
    for (key, body) in [("from", from), ("to", to)] {
        if body.is_empty() {
            continue;
        }
        y.push_str(if first { " " } else { "    " });
        first = false;
        y.push_str(&format!("{key}:\n    - {body}\n"));
    }
    y
}

/// Whether `pod` gets an echo back from the server on `port` (7000 answers without input).
fn reaches(tb: &Testbed, pod: &str, port: u16) -> bool {
    let server = IpAddr::V4(tb.pod("server").ipv4);
    let r = tb.request(pod, server, port, Some("hi")).unwrap();
    if port == PEER_PORT {
        r.data().starts_with("peer=")
    } else {
        r.data() == "hi"
    }
}

/// The server agent's authorization decision for `pod` -> server:`port`, per `ambit explain`:
/// `{"Allow": {"policy": ...}}`, `{"Denied": {"policy": ...}}` or `"NotAllowed"`.
fn explained(tb: &Testbed, pod: &str, port: u16) -> Value {
    let to = SocketAddr::new(IpAddr::V4(tb.pod("server").ipv4), port);
    let why = tb.explain("node1", &format!("default/{pod}"), to).unwrap();
    why["inbound"]["authorization"].clone()
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn allow_and_deny_by_principal_namespace_ip_block_and_port() {
    let mut tb = testbed();
    let client = tb.pod("client").identity();
    let principal = client.trim_start_matches("spiffe://");

    // ALLOW only the client's principal: mTLS from client passes, the outsider's plaintext
    // (no principal) does not.
    tb.apply(&policy(
        "only-client",
        "ALLOW",
        &format!("source:\n        principals: [\"{principal}\"]"),
        "",
    ))
    .unwrap();
    let denied = tb.proxy_counter("node2", "server", "authz_denied");
    assert!(reaches(&tb, "client", ECHO_PORT));
    assert!(!reaches(&tb, "outsider", ECHO_PORT));
    assert_eq!(
        tb.proxy_counter("node2", "server", "authz_denied"),
        denied + 1
    );
    assert_eq!(
        explained(&tb, "client", ECHO_PORT),
        json!({"Allow": {"policy": "default/only-client"}})
    );
    assert_eq!(explained(&tb, "outsider", ECHO_PORT), json!("NotAllowed"));
    tb.delete("AuthorizationPolicy", "default", "only-client")
        .unwrap();

    // DENY the namespace `default`: the client (proved ns default) is refused; plaintext has
    // no namespace, so the outsider passes.
    tb.apply(&policy(
        "no-default",
        "DENY",
        "source:\n        namespaces: [default]",
        "",
    ))
    .unwrap();
    assert!(!reaches(&tb, "client", ECHO_PORT));
    assert!(reaches(&tb, "outsider", ECHO_PORT));
    tb.delete("AuthorizationPolicy", "default", "no-default")
        .unwrap();

    // ALLOW by source address: only the outsider's.
    let outsider = tb.pod("outsider").ipv4;
    tb.apply(&policy(
        "outsider-ip",
        "ALLOW",
        &format!("source:\n        ipBlocks: [\"{outsider}/32\"]"),
        "",
    ))
    .unwrap();
    assert!(reaches(&tb, "outsider", ECHO_PORT));
    assert!(!reaches(&tb, "client", ECHO_PORT));
    tb.delete("AuthorizationPolicy", "default", "outsider-ip")
        .unwrap();

    // DENY one port: 9000 refused, 7000 open.
    tb.apply(&policy(
        "no-echo",
        "DENY",
        "",
        &format!("operation:\n        ports: [\"{ECHO_PORT}\"]"),
    ))
    .unwrap();
    assert!(!reaches(&tb, "client", ECHO_PORT));
    assert!(reaches(&tb, "client", PEER_PORT));
    assert_eq!(
        explained(&tb, "client", ECHO_PORT),
        json!({"Denied": {"policy": "default/no-echo"}})
    );
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn an_open_connection_is_closed_when_a_new_policy_denies_it() {
    let mut tb = testbed();
    let server = IpAddr::V4(tb.pod("server").ipv4);
    let held = tb.hold("client", server, ECHO_PORT, "open").unwrap();
    let listed = |tb: &Testbed| {
        tb.connections("node2")
            .unwrap()
            .iter()
            .any(|c| c.direction == "inbound" && c.dst.ends_with(&format!(":{ECHO_PORT}")))
    };
    assert_eventually!(listed(&tb), "node2 does not list the held connection");

    let principal = tb.pod("client").identity();
    let principal = principal.trim_start_matches("spiffe://").to_string();
    tb.apply(&policy(
        "cut-client",
        "DENY",
        &format!("source:\n        principals: [\"{principal}\"]"),
        "",
    ))
    .unwrap();
    assert_eventually!(
        !listed(&tb),
        "the denied connection is still open: {:?}",
        tb.connections("node2")
    );
    drop(held);
    assert!(
        !reaches(&tb, "client", ECHO_PORT),
        "new connections must be refused too"
    );
}
