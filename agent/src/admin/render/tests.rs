//! Exact output of the CLI's tables and sentences, from documents shaped as the admin API
//! answers (the `explain` ones built by the real `explain` over a parsed inventory).
use std::path::Path;

use serde_json::{json, Value};

use super::*;
use crate::inventory::file::parse;
use crate::proxy::explain;

const INV: &str = r#"
kind: Namespace
metadata: {name: shop, labels: {ambit.io/mode: enabled}}
---
kind: Pod
metadata: {name: client, namespace: shop}
spec: {nodeName: node1, serviceAccountName: client}
status: {podIPs: [{ip: 10.1.0.2}]}
---
kind: Pod
metadata: {name: server, namespace: shop, labels: {app: server}}
spec: {nodeName: node2, serviceAccountName: server}
status: {podIPs: [{ip: 10.2.0.2}]}
"#;

/// `ambit explain shop/client 10.2.0.2:8080 --json` over `INV` plus `extra` YAML documents.
fn explained(extra: &str) -> Value {
    let snap = parse(Path::new("x"), &format!("{INV}{extra}")).unwrap();
    let e = explain::explain(
        &snap,
        &crate::policy::authz::Mesh::new("istio-system", "cluster.local"),
        15008,
        true,
        "shop/client",
        "10.2.0.2:8080".parse().unwrap(),
    )
    .unwrap();
    serde_json::to_value(e).unwrap()
}

fn authz(name: &str, action: &str, principal: &str) -> String {
    format!(
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: shop}}\n\
         spec:\n  selector: {{matchLabels: {{app: server}}}}\n  action: {action}\n  rules:\n  - from:\n    \
         - source: {{principals: [\"{principal}\"]}}\n"
    )
}

const CLIENT_PRINCIPAL: &str = "cluster.local/ns/shop/sa/client";

/// The line of `explain` that tells the AuthorizationPolicy decision.
fn authz_line(v: &Value) -> String {
    explain(v)
        .lines()
        .find(|l| l.starts_with("  - AuthorizationPolicy: "))
        .unwrap_or_else(|| panic!("no AuthorizationPolicy line:\n{}", explain(v)))
        .to_string()
}

#[test]
fn explain_tells_a_tunnelled_connection_without_policies_in_words() {
    let out = explain(&explained(""));
    assert_eq!(
        out,
        "shop/client -> 10.2.0.2:8080: tunnelled over mTLS (HBONE)\n\
         \n\
         enrollment:\n  \
         - source shop/client: enrolled by namespace label ambit.io/mode=enabled\n  \
         - destination shop/server: enrolled by namespace label ambit.io/mode=enabled\n\
         \n\
         source agent:\n  \
         - 10.2.0.2 is enrolled pod shop/server\n  \
         - destination PeerAuthentication on port 8080: PERMISSIVE (default, nothing set)\n  \
         - HBONE to 10.2.0.2:15008 requiring spiffe://cluster.local/ns/shop/sa/server\n\
         \n\
         destination agent (shop/server):\n  \
         - PeerAuthentication: PERMISSIVE (no PeerAuthentication applies: the default)\n  \
         - AuthorizationPolicy: ALLOW (no AuthorizationPolicy selects shop/server)\n"
    );
}

#[test]
fn explain_tells_a_denied_connection_and_the_policy_that_denies_it() {
    let strict = "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
                  metadata: {name: strict, namespace: shop}\nspec: {mtls: {mode: STRICT}}\n";
    let v = explained(&format!(
        "{strict}{}",
        authz("deny-client", "DENY", CLIENT_PRINCIPAL)
    ));
    assert_eq!(
        explain(&v),
        "shop/client -> 10.2.0.2:8080: refused by the destination: AuthorizationPolicy shop/deny-client denies it\n\
         \n\
         enrollment:\n  \
         - source shop/client: enrolled by namespace label ambit.io/mode=enabled\n  \
         - destination shop/server: enrolled by namespace label ambit.io/mode=enabled\n\
         \n\
         source agent:\n  \
         - 10.2.0.2 is enrolled pod shop/server\n  \
         - destination PeerAuthentication on port 8080: STRICT (namespace, shop/strict)\n  \
         - HBONE to 10.2.0.2:15008 requiring spiffe://cluster.local/ns/shop/sa/server\n\
         \n\
         destination agent (shop/server):\n  \
         - PeerAuthentication: STRICT (shop/strict, namespace-wide)\n  \
         - AuthorizationPolicy: DENY (by shop/deny-client)\n"
    );
}

#[test]
fn every_authorization_decision_is_told_in_words_with_the_policies_that_select_the_pod() {
    let other = "cluster.local/ns/shop/sa/other";
    let cases = [
        (
            authz("allow-client", "ALLOW", CLIENT_PRINCIPAL),
            "ALLOW (by shop/allow-client)",
        ),
        (
            authz("only-other", "ALLOW", other),
            "DENY (no ALLOW policy matches: shop/only-other)",
        ),
        (
            authz("deny-other", "DENY", other),
            "ALLOW (no ALLOW policy selects shop/server; no DENY policy matches: shop/deny-other)",
        ),
    ];
    for (yaml, want) in cases {
        let v = explained(&yaml);
        assert_eq!(
            authz_line(&v),
            format!("  - AuthorizationPolicy: {want}"),
            "{yaml}"
        );
        let rendered = explain(&v);
        assert!(
            !rendered.contains('{') && !rendered.contains("Allow") && !rendered.contains("null"),
            "a JSON or debug form in:\n{rendered}"
        );
    }
    // The refusal verdict says it in words too.
    let v = explained(&authz("only-other", "ALLOW", other));
    assert_eq!(
        v["verdict"],
        "refused by the destination: no ALLOW AuthorizationPolicy matches it"
    );
}

#[test]
fn explain_lists_the_policies_the_node_proxy_leaves_to_others_and_why() {
    let doc = |name: &str, spec: &str| {
        format!(
            "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
             metadata: {{name: {name}, namespace: shop}}\nspec:\n{spec}"
        )
    };
    let targeted = doc(
        "deny-all",
        "  targetRefs: [{kind: Service, name: server}]\n  action: DENY\n  rules: [{}]\n",
    );
    let audit = doc("audit", "  action: AUDIT\n  rules: [{}]\n");
    let custom = doc(
        "ext",
        "  action: CUSTOM\n  provider: {name: ext}\n  rules: [{}]\n",
    );
    let v = explained(&format!("{targeted}{audit}{custom}"));
    assert_eq!(v["verdict"], "tunnelled over mTLS (HBONE)");
    assert_eq!(
        authz_line(&v),
        "  - AuthorizationPolicy: ALLOW (no AuthorizationPolicy for the node proxy selects \
         shop/server); not for the node proxy: shop/deny-all (targetRefs: Service/server), \
         shop/audit (action AUDIT: ztunnel does not apply it either; sidecars and waypoints \
         audit), shop/ext (action CUSTOM: ztunnel does not apply it either; sidecars and \
         waypoints call the external authorizer)"
    );
    // Beside a DENY the node proxy applies, that DENY decides and the others are still named.
    let v = explained(&format!(
        "{targeted}{}",
        authz("deny-client", "DENY", CLIENT_PRINCIPAL)
    ));
    assert_eq!(
        authz_line(&v),
        "  - AuthorizationPolicy: DENY (by shop/deny-client); not for the node proxy: \
         shop/deny-all (targetRefs: Service/server)"
    );
}

#[test]
fn a_decision_this_cli_does_not_know_is_shown_as_the_agent_sent_it() {
    let v = json!({
        "from": "a/b", "to": "10.0.0.1:80", "verdict": "x",
        "outbound": {"route": "tunnel", "steps": []},
        "inbound": {"pod": "a/c", "peer_authentication": {"mode": "STRICT", "policy": "a/p", "level": "mesh"},
                    "authorization": {"Future": {"why": 1}}},
        "warnings": ["look out"],
    });
    assert_eq!(
        explain(&v),
        "a/b -> 10.0.0.1:80: x\n\nsource agent:\n\ndestination agent (a/c):\n  \
         - PeerAuthentication: STRICT (a/p, mesh-wide)\n  \
         - AuthorizationPolicy: {\"Future\":{\"why\":1}}\n\nwarnings:\n  ! look out\n"
    );
}

#[test]
fn explain_of_a_refused_route_names_the_reason() {
    let v = json!({
        "from": "shop/client", "to": "10.96.0.9:81",
        "verdict": "refused by the source agent: Service shop/web has no port 81",
        "outbound": {"route": "refuse", "reason": "Service shop/web has no port 81",
                     "steps": ["10.96.0.9 is a virtual IP of Service shop/web"]},
        "inbound": null, "warnings": [],
        "enrollment": [{"role": "source", "pod": "shop/client", "enrolled": true,
                        "reason": "enrolled by namespace label ambit.io/mode=enabled"}],
    });
    assert_eq!(
        explain(&v),
        "shop/client -> 10.96.0.9:81: refused by the source agent: Service shop/web has no port 81\n\
         \n\
         enrollment:\n  \
         - source shop/client: enrolled by namespace label ambit.io/mode=enabled\n\
         \n\
         source agent:\n  \
         - 10.96.0.9 is a virtual IP of Service shop/web\n  \
         refused: Service shop/web has no port 81\n"
    );
}

#[test]
fn an_error_answer_prints_its_message_not_its_json_body() {
    // The body exactly as the admin server writes it (pretty JSON and a newline).
    let msg = explain::Error::UnknownSource("client".into()).to_string();
    let mut body = serde_json::to_vec_pretty(&json!({ "error": msg })).unwrap();
    body.push(b'\n');
    let path = "/explain?from=client&to=10.2.0.2:8080";
    assert_eq!(
        error_message("GET", path, http::StatusCode::NOT_FOUND, &body),
        "no pod \"client\" in the inventory (use namespace/name)"
    );
    // Not JSON, or JSON without a message: the request, the status and what came back.
    assert_eq!(
        error_message(
            "GET",
            "/x",
            http::StatusCode::BAD_GATEWAY,
            b"upstream gone\n"
        ),
        "GET /x: 502 Bad Gateway: upstream gone"
    );
    assert_eq!(
        error_message(
            "POST",
            "/drain",
            http::StatusCode::NOT_FOUND,
            b"{\"other\": 1}"
        ),
        "POST /drain: 404 Not Found: {\"other\": 1}"
    );
    assert_eq!(
        error_message("GET", "/x", http::StatusCode::INTERNAL_SERVER_ERROR, b""),
        "GET /x: 500 Internal Server Error"
    );
}

#[test]
fn tables_show_words_and_dashes_never_json() {
    let w = json!({"workloads": [
        {"namespace": "shop", "name": "client", "node": "node1", "local": true, "enrolled": true,
         "ips": ["10.1.0.2", "fd00::2"], "identity": "spiffe://cluster.local/ns/shop/sa/client"},
        {"namespace": "shop", "name": "ghost", "node": null, "local": false, "enrolled": false,
         "ips": [], "identity": "spiffe://cluster.local/ns/shop/sa/default"},
    ]});
    assert_eq!(
        workloads(&w),
        "POD                              NODE     LOCAL  ENROLLED  IPS                            IDENTITY\n\
         shop/client                      node1    yes    yes       10.1.0.2,fd00::2               spiffe://cluster.local/ns/shop/sa/client\n\
         shop/ghost                       -        no     no                                       spiffe://cluster.local/ns/shop/sa/default\n"
    );

    let c = json!({"connections": [
        {"direction": "outbound", "pod": "shop/client", "src": "10.1.0.2:40000",
         "dst": "10.2.0.2:8080", "security": "mutual_tls", "age_s": 1.25, "bytes_sent": 5,
         "bytes_received": 7, "src_identity": "spiffe://cluster.local/ns/shop/sa/client",
         "dst_identity": "spiffe://cluster.local/ns/shop/sa/server"},
        {"direction": "outbound", "pod": "shop/client", "src": "10.1.0.2:40001",
         "dst": "1.1.1.1:443", "security": "plaintext", "age_s": 0.0, "bytes_sent": 0,
         "bytes_received": 0, "src_identity": null, "dst_identity": null},
    ]});
    assert_eq!(
        connections(&c),
        "DIRECTION POD                  SOURCE                   DESTINATION              SECURITY     AGE(s)       SENT   RECEIVED  PEER IDENTITY\n\
         outbound  shop/client          10.1.0.2:40000           10.2.0.2:8080            mutual_tls      1.2          5          7  spiffe://cluster.local/ns/shop/sa/server\n\
         outbound  shop/client          10.1.0.2:40001           1.1.1.1:443              plaintext       0.0          0          0  -\n"
    );

    let certs_doc = json!({"certs": [
        {"identity": "spiffe://cluster.local/ns/shop/sa/client", "state": "initializing",
         "pods": 1, "serial": null, "notAfter": null, "nextRenewal": null, "lastError": null},
    ]});
    assert_eq!(
        certs(&certs_doc),
        "IDENTITY                                         STATE         PODS  NOT AFTER              NEXT RENEWAL           LAST ERROR             SERIAL\n\
         spiffe://cluster.local/ns/shop/sa/client         initializing  1     -                      -                      -                      -\n"
    );
}

#[test]
fn status_shows_pods_counters_and_failures() {
    let v = json!({
        "node": "node1", "version": "0.1.0", "uptime_s": 42,
        "inventory": {"source": "file /etc/ambit/inventory.yaml", "loads": 3, "errors": 0},
        "mesh": {"mesh_only": true, "destinations": 4, "capacity": 65536, "capture_everything": false},
        "pods": [
            {"namespace": "shop", "name": "client", "state": "enrolled", "ips": ["10.1.0.2"],
             "counters": {"redirected": 9, "exempted": 1, "steered": 0, "bypassed": 0, "dropped": 0},
             "proxy": {"outbound_accepted": 9, "inbound_accepted": 0}},
            {"namespace": "shop", "name": "broken", "state": "failed", "ips": ["10.1.0.3"],
             "error": "no network namespace", "counters": null, "proxy": null},
        ],
        "kernel": {"connect4_redirect": 9},
    });
    assert_eq!(
        status(&v),
        "node node1  version 0.1.0  up 42s\n\
         inventory file /etc/ambit/inventory.yaml  loads 3  errors 0\n\
         capture mesh-only: 4 of 65536 destinations listed\n\
         \n\
         POD                      STATE     IPS                           REDIR EXEMPT  STEER BYPASS   DROP    OUT     IN\n\
         shop/client              enrolled  10.1.0.2                          9      1      0      0      0      9      0\n\
         shop/broken              failed    10.1.0.3                          -      -      -      -      -      -      -\n    \
         error: no network namespace\n\
         \n\
         kernel counters:\n  \
         connect4_redirect            9\n"
    );
}

#[test]
fn policy_lists_peer_authentication_then_the_authorization_policies_of_each_pod() {
    let v = json!({"policies": [{
        "pod": "shop/server",
        "peer_authentication": {
            "default": {"mode": "STRICT", "policy": "shop/strict", "level": "namespace"},
            "ports": {"9000": {"mode": "PERMISSIVE", "policy": "shop/metrics", "level": "port"}},
        },
        "authorization": [
            {"policy": "shop/deny-client", "action": "DENY", "unsupported": [], "not_for_node_proxy": null},
            {"policy": "shop/paths", "action": "ALLOW", "unsupported": ["spec.rules[0].to.operation.paths"], "not_for_node_proxy": null},
            {"policy": "shop/waypoint-only", "action": "ALLOW", "unsupported": [], "not_for_node_proxy": "targetRefs: Gateway/waypoint"},
        ],
    }]});
    assert_eq!(
        policy(&v),
        "POD                          PORT     MODE         LEVEL      DECIDED BY\n\
         shop/server                  *        STRICT       namespace  shop/strict\n\
         shop/server                  9000     PERMISSIVE   port       shop/metrics\n\
         \n\
         POD                          AUTHORIZATIONPOLICY                  ACTION  NOTES\n\
         shop/server                  shop/deny-client                     DENY    -\n\
         shop/server                  shop/paths                           ALLOW   not checked at L4, fails safe: spec.rules[0].to.operation.paths\n\
         shop/server                  shop/waypoint-only                   ALLOW   not for the node proxy (targetRefs: Gateway/waypoint)\n"
    );
    let none = json!({"policies": [{
        "pod": "shop/server",
        "peer_authentication": {"default": {"mode": "PERMISSIVE", "policy": null, "level": "default"}, "ports": {}},
        "authorization": [],
    }]});
    assert_eq!(
        policy(&none),
        "POD                          PORT     MODE         LEVEL      DECIDED BY\n\
         shop/server                  *        PERMISSIVE   default    (default: nothing set)\n\
         \n\
         no AuthorizationPolicy selects an enrolled pod: every connection that passes \
         PeerAuthentication is allowed\n"
    );
}

#[test]
fn explain_tells_a_connection_through_a_waypoint_in_words() {
    let inv = r#"
kind: Namespace
metadata: {name: shop, labels: {ambit.io/mode: enabled}}
---
kind: Pod
metadata: {name: client, namespace: shop}
spec: {nodeName: node1, serviceAccountName: client}
status: {podIPs: [{ip: 10.1.0.2}]}
---
kind: Pod
metadata: {name: server, namespace: shop, labels: {istio.io/use-waypoint: wp}}
spec: {nodeName: node2, serviceAccountName: server}
status: {podIPs: [{ip: 10.2.0.2}]}
---
kind: Pod
metadata: {name: wp-0, namespace: shop}
spec: {nodeName: node3, serviceAccountName: wp}
status: {podIPs: [{ip: 10.3.0.5}]}
---
kind: Service
metadata: {name: wp, namespace: shop}
spec: {clusterIP: 10.96.0.50, ports: [{name: mesh, port: 15008}]}
---
kind: EndpointSlice
metadata: {name: wp-1, namespace: shop, labels: {kubernetes.io/service-name: wp}}
endpoints: [{addresses: [10.3.0.5]}]
ports: [{name: mesh, port: 15008}]
"#;
    let snap = parse(Path::new("x"), inv).unwrap();
    let e = explain::explain(
        &snap,
        &crate::policy::authz::Mesh::new("istio-system", "cluster.local"),
        15008,
        true,
        "shop/client",
        "10.2.0.2:8080".parse().unwrap(),
    )
    .unwrap();
    assert_eq!(
        explain(&serde_json::to_value(e).unwrap()),
        "shop/client -> 10.2.0.2:8080: tunnelled over mTLS (HBONE) through waypoint shop/wp \
         (10.3.0.5:15008, CONNECT 10.2.0.2:8080): the waypoint applies the destination's policy\n\
         \n\
         enrollment:\n  \
         - source shop/client: enrolled by namespace label ambit.io/mode=enabled\n  \
         - destination shop/server: enrolled by namespace label ambit.io/mode=enabled\n\
         \n\
         source agent:\n  \
         - 10.2.0.2 is enrolled pod shop/server\n  \
         - pod shop/server uses waypoint shop/wp (pod label istio.io/use-waypoint)\n  \
         - HBONE to waypoint shop/wp at 10.3.0.5:15008 requiring \
         spiffe://cluster.local/ns/shop/sa/wp, CONNECT 10.2.0.2:8080\n"
    );
}

#[test]
fn status_shows_the_istiod_stream_and_each_resource_type() {
    let v = json!({
        "node": "node1", "version": "0.1.0", "uptime_s": 5,
        "inventory": {"source": "istiod (the ca: address)", "loads": 2, "errors": 0, "istiod": {
            "address": "istiod.istio-system.svc:15012", "state": "connected", "last_error": "istiod x: delta ads stream ended",
            "pushes": 4, "acks": 3, "nacks": 1, "reconnects": 1,
            "types": {
                "type.googleapis.com/istio.security.Authorization": {"resources": 0, "last_ack_version": "v1", "synced": true, "last_nack": null},
                "type.googleapis.com/istio.workload.Address": {"resources": 7, "last_ack_version": "v3", "synced": true, "last_nack": "uid-x: cannot decode"},
            },
        }},
        "mesh": {"mesh_only": false},
        "pods": [],
        "kernel": {},
    });
    let text = status(&v);
    assert!(
        text.starts_with(
            "node node1  version 0.1.0  up 5s\n\
             inventory istiod (the ca: address)  loads 2  errors 0\n\
             istiod istiod.istio-system.svc:15012  connected  pushes 4  acks 3  nacks 1  reconnects 1\n  \
             last error: istiod x: delta ads stream ended\n  \
             istio.security.Authorization 0 resources  acked version v1\n  \
             istio.workload.Address       7 resources  acked version v3  last NACK: uid-x: cannot decode\n"
        ),
        "{text}"
    );
}
