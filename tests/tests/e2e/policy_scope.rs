//! Policy scope as a node proxy applies it (issue 19, item 4): a DENY-all AuthorizationPolicy
//! with `targetRefs` is the waypoint's or gateway's, so the server's agent lets traffic through
//! and `ambit policy` / `ambit explain` say why; the same policy with a selector, or
//! namespace-wide, blocks it.
#![allow(
    clippy::unwrap_used,
    reason = "test bodies panic with a line number (STYLE.md §7)"
)]
use std::net::{IpAddr, SocketAddr};

use ambit_e2e::{testbed, Testbed, ECHO_PORT};
use serde_json::{json, Value};

/// A DENY-all AuthorizationPolicy `deny-all` in `default`, scoped by `scope` (YAML lines under
/// `spec:`, already indented, or empty for namespace-wide).
fn deny_all(scope: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-all\n  \
         namespace: default\nspec:\n{scope}  action: DENY\n  rules:\n  - {{}}\n"
    )
}

/// Whether the client gets its echo back from the server.
fn reaches(tb: &Testbed) -> bool {
    let server = IpAddr::V4(tb.pod("server").ipv4);
    let r = tb.request("client", server, ECHO_PORT, Some("hi")).unwrap();
    r.data() == "hi"
}

/// `ambit explain default/client <server>:ECHO_PORT` on node1: (JSON, text).
fn explained(tb: &Testbed) -> (Value, String) {
    let to = SocketAddr::new(IpAddr::V4(tb.pod("server").ipv4), ECHO_PORT);
    let json = tb.explain("node1", "default/client", to).unwrap();
    let out = tb
        .ambit_cli("node1", &["explain", "default/client", &to.to_string()])
        .unwrap();
    (json, String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ambit policy` on the server's node, as an operator reads it.
fn policy_table(tb: &Testbed) -> String {
    let out = tb.ambit_cli("node2", &["policy"]).unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn a_deny_all_with_target_refs_leaves_traffic_flowing_and_the_same_with_a_selector_blocks_it() {
    let mut tb = testbed();
    let denied = tb.proxy_counter("node2", "server", "authz_denied");

    // targetRefs: the Service's waypoint enforces it, not the node proxy.
    tb.apply(&deny_all(
        "  targetRefs:\n  - kind: Service\n    group: \"\"\n    name: server\n",
    ))
    .unwrap();
    assert!(reaches(&tb), "a targeted DENY-all must not block the pod");
    assert_eq!(tb.proxy_counter("node2", "server", "authz_denied"), denied);
    let table = policy_table(&tb);
    assert!(
        table.lines().any(|l| l.contains("default/server")
            && l.contains("default/deny-all")
            && l.contains("not for the node proxy (targetRefs: Service/server)")),
        "`ambit policy` lists the policy as not for the node proxy:\n{table}"
    );
    let (json, text) = explained(&tb);
    assert_eq!(
        json["inbound"]["authorization"],
        json!({"Allow": {"policy": null}})
    );
    assert_eq!(
        json["inbound"]["authorization_policies"],
        json!([{
            "policy": "default/deny-all",
            "action": "DENY",
            "unsupported": [],
            "not_for_node_proxy": "targetRefs: Service/server",
        }])
    );
    assert!(
        text.contains(
            "AuthorizationPolicy: ALLOW (no AuthorizationPolicy for the node proxy selects \
             default/server); not for the node proxy: default/deny-all (targetRefs: Service/server)"
        ),
        "{text}"
    );

    // The same policy with a selector: the node proxy's, and it blocks.
    tb.apply(&deny_all(
        "  selector:\n    matchLabels:\n      app: server\n",
    ))
    .unwrap();
    assert!(!reaches(&tb), "a selected DENY-all must block the pod");
    assert_eq!(
        tb.proxy_counter("node2", "server", "authz_denied"),
        denied + 1
    );
    let (json, text) = explained(&tb);
    assert_eq!(
        json["inbound"]["authorization"],
        json!({"Denied": {"policy": "default/deny-all"}})
    );
    assert!(text.contains("DENY (by default/deny-all)"), "{text}");
    let table = policy_table(&tb);
    assert!(
        table
            .lines()
            .any(|l| l.contains("default/deny-all") && l.contains("DENY") && l.ends_with(" -")),
        "`ambit policy` lists it as applied:\n{table}"
    );

    // Namespace-wide (neither selector nor target): blocks as well.
    tb.apply(&deny_all("")).unwrap();
    assert!(
        !reaches(&tb),
        "a namespace-wide DENY-all must block the pod"
    );
    assert_eq!(
        tb.proxy_counter("node2", "server", "authz_denied"),
        denied + 2
    );

    // And back to targetRefs: open again (the change is applied live, both ways).
    tb.apply(&deny_all(
        "  targetRefs:\n  - kind: Gateway\n    group: gateway.networking.k8s.io\n    name: waypoint\n",
    ))
    .unwrap();
    assert!(reaches(&tb));
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn audit_and_custom_are_not_applied_by_the_node_proxy_and_explain_says_so() {
    let mut tb = testbed();
    let denied = tb.proxy_counter("node2", "server", "authz_denied");
    let selected = "  selector:\n    matchLabels:\n      app: server\n";
    for (action, extra) in [
        ("AUDIT", ""),
        ("CUSTOM", "  provider:\n    name: ext-authz\n"),
    ] {
        tb.apply(&format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  \
             name: side\n  namespace: default\nspec:\n{selected}{extra}  action: {action}\n  \
             rules:\n  - {{}}\n"
        ))
        .unwrap();
        assert!(reaches(&tb), "{action} must not block the pod");
        assert_eq!(
            tb.proxy_counter("node2", "server", "authz_denied"),
            denied,
            "{action}"
        );
        let (json, text) = explained(&tb);
        assert_eq!(
            json["inbound"]["authorization"],
            json!({"Allow": {"policy": null}}),
            "{action}"
        );
        assert!(
            text.contains(&format!(
                "not for the node proxy: default/side (action {action}: ztunnel does not apply it"
            )),
            "{text}"
        );
        let table = policy_table(&tb);
        assert!(
            table
                .lines()
                .any(|l| l.contains("default/side") && l.contains(&format!("(action {action}:"))),
            "{table}"
        );
    }
    // The same rule as a DENY is applied: the checks above can see a block.
    tb.apply(&deny_all(selected)).unwrap();
    assert!(!reaches(&tb));
}
