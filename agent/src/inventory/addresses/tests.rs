//! Who owns a pod address when several Pods list it: the rules, through the routing decision
//! the client's agent takes (tunnel, plaintext or refusal) and the inventory's own lookup.
use std::path::Path;

use crate::inventory::file::parse;
use crate::inventory::Snapshot;
use crate::proxy::explain::explain;
use crate::proxy::route::{decide, Decision, Route, RouteCtx, Steps};

/// `shop` enrolls its pods; `aaa` does not. The server owns 10.2.0.2 unless a test adds a rival.
const BASE: &str = r#"
kind: Namespace
metadata: {name: shop, labels: {ambit.io/mode: enabled}}
---
kind: Namespace
metadata: {name: aaa}
---
kind: Pod
metadata: {name: client, namespace: shop}
spec: {nodeName: node1, serviceAccountName: client}
status: {phase: Running, podIPs: [{ip: 10.1.0.2}]}
---
kind: Pod
metadata: {name: server, namespace: shop, labels: {app: server}}
spec: {nodeName: node2, serviceAccountName: server}
status: {phase: Running, podIPs: [{ip: 10.2.0.2}]}
"#;

const SERVER_ID: &str = "spiffe://cluster.local/ns/shop/sa/server";

fn snap(extra: &str) -> Snapshot {
    parse(Path::new("t.yaml"), &format!("{BASE}---\n{extra}")).unwrap()
}

fn decide_on(s: &Snapshot, to: &str) -> Decision {
    let ctx = RouteCtx {
        snap: s,
        trust_domain: "cluster.local",
        root_namespace: "istio-system",
        tunnel_port: 15008,
        mtls: true,
    };
    decide(&ctx, to.parse().unwrap(), Steps::Record, |_, _| 0)
}

fn tunnel_to_server() -> Route {
    Route::Tunnel {
        peer: "10.2.0.2:15008".parse().unwrap(),
        target: "10.2.0.2:8080".parse().unwrap(),
        dst_id: SERVER_ID.into(),
    }
}

/// A rival Pod `aaa/stale` (sorted before `shop/server`, so "first listed" would pick it)
/// claiming the server's address, with extra `metadata` and `status` fields.
fn stale(meta: &str, status: &str) -> String {
    format!(
        "kind: Pod\nmetadata: {{name: stale, namespace: aaa{meta}}}\n\
         spec: {{nodeName: node2, serviceAccountName: stale}}\n\
         status: {{podIPs: [{{ip: 10.2.0.2}}]{status}}}\n"
    )
}

#[test]
fn pods_in_a_terminal_phase_never_own_an_address() {
    for phase in ["Failed", "Succeeded"] {
        let s = snap(&stale("", &format!(", phase: {phase}")));
        let d = decide_on(&s, "10.2.0.2:8080");
        assert_eq!(d.route, tunnel_to_server(), "{phase}: {:?}", d.steps);
        assert_eq!(s.by_ip("10.2.0.2".parse().unwrap()).unwrap().name, "server");
        assert!(
            !s.workloads.contains_key("aaa/stale"),
            "{phase}: a finished pod is not in the inventory at all"
        );
    }
}

#[test]
fn a_pod_being_deleted_loses_its_address_to_a_live_one_and_keeps_it_alone() {
    let s = snap(&stale(
        ", deletionTimestamp: \"2024-05-01T10:00:00Z\"",
        ", phase: Running",
    ));
    let d = decide_on(&s, "10.2.0.2:8080");
    assert_eq!(d.route, tunnel_to_server(), "{:?}", d.steps);
    assert!(
        s.workloads.contains_key("aaa/stale"),
        "a terminating pod stays (its containers may still run)"
    );

    // The server itself terminating, with no rival: its sandbox still holds the address, so
    // peers keep tunnelling to it (dropping it would send them plaintext during every rollout).
    let text = BASE.replace(
        "{name: server, namespace: shop, labels: {app: server}}",
        "{name: server, namespace: shop, labels: {app: server}, deletionTimestamp: \"2024-05-01T10:00:00Z\"}",
    );
    let s = parse(Path::new("t.yaml"), &text).unwrap();
    let d = decide_on(&s, "10.2.0.2:8080");
    assert_eq!(d.route, tunnel_to_server(), "{:?}", d.steps);
}

#[test]
fn host_network_pods_are_never_enrolled_and_never_own_the_node_address() {
    // Two host-network pods in an enrolled namespace: both list the node's address.
    let host = |name: &str| {
        format!(
            "kind: Pod\nmetadata: {{name: {name}, namespace: shop}}\n\
             spec: {{nodeName: node2, hostNetwork: true}}\n\
             status: {{phase: Running, podIPs: [{{ip: 192.168.0.2}}]}}\n"
        )
    };
    let s = snap(&format!(
        "{}---\n{}",
        host("node-exporter"),
        host("kubelet-proxy")
    ));
    for name in ["shop/node-exporter", "shop/kubelet-proxy"] {
        assert!(
            !s.workloads[name].enrolled,
            "{name}: capturing a host-network pod would capture the node"
        );
    }
    let d = decide_on(&s, "192.168.0.2:10250");
    assert_eq!(
        d.route,
        Route::Plaintext {
            target: "192.168.0.2:10250".parse().unwrap()
        },
        "the node's address is no pod's: neither tunnelled nor refused as ambiguous: {:?}",
        d.steps
    );
    assert!(s.by_ip("192.168.0.2".parse().unwrap()).is_none());
}

#[test]
fn the_newest_live_claimant_wins() {
    let created = |t: &str| format!(", creationTimestamp: \"{t}\"");
    let server_created = BASE.replace(
        "{name: server, namespace: shop, labels: {app: server}}",
        "{name: server, namespace: shop, labels: {app: server}, creationTimestamp: \"2024-06-01T00:00:00Z\"}",
    );
    // The stale object is older: the server wins.
    let text = format!(
        "{server_created}---\n{}",
        stale(&created("2024-01-01T00:00:00Z"), ", phase: Running")
    );
    let s = parse(Path::new("t.yaml"), &text).unwrap();
    let d = decide_on(&s, "10.2.0.2:8080");
    assert_eq!(d.route, tunnel_to_server(), "{:?}", d.steps);

    // The other pod is newer (the address was handed on): it wins, and it is not enrolled.
    let text = format!(
        "{server_created}---\n{}",
        stale(&created("2024-07-01T00:00:00Z"), ", phase: Running")
    );
    let s = parse(Path::new("t.yaml"), &text).unwrap();
    assert_eq!(s.by_ip("10.2.0.2".parse().unwrap()).unwrap().name, "stale");
    assert_eq!(
        decide_on(&s, "10.2.0.2:8080").route,
        Route::Plaintext {
            target: "10.2.0.2:8080".parse().unwrap()
        }
    );
}

#[test]
fn the_claimant_on_the_node_that_routes_the_address_wins() {
    let nodes = "kind: Node\nmetadata: {name: node1}\nspec: {podCIDR: 10.1.0.0/24}\n---\n\
                 kind: Node\nmetadata: {name: node2}\nspec: {podCIDRs: [10.2.0.0/24, \"fd00:2::/64\"]}\n";
    // A stale object on node1 claims an address of node2's range, and is newer.
    let rival = "kind: Pod\nmetadata: {name: stale, namespace: aaa, creationTimestamp: \"2030-01-01T00:00:00Z\"}\n\
                 spec: {nodeName: node1}\nstatus: {phase: Running, podIPs: [{ip: 10.2.0.2}]}\n";
    let s = snap(&format!("{nodes}---\n{rival}"));
    let d = decide_on(&s, "10.2.0.2:8080");
    assert_eq!(d.route, tunnel_to_server(), "{:?}", d.steps);
}

#[test]
fn an_undecidable_address_is_refused_never_sent_plaintext() {
    // Same node, both live, no creation times: nothing decides which pod holds 10.2.0.2.
    for (what, rival) in [
        ("unenrolled rival", stale("", ", phase: Running")),
        (
            "rival enrolled as another identity",
            stale(", labels: {ambit.io/mode: enabled}", ", phase: Running"),
        ),
    ] {
        let s = snap(&rival);
        let d = decide_on(&s, "10.2.0.2:8080");
        let Route::Refuse { reason, .. } = &d.route else {
            panic!("{what}: {:?} ({:?})", d.route, d.steps);
        };
        assert!(
            reason.contains("aaa/stale") && reason.contains("shop/server"),
            "{what}: the reason names both claimants: {reason}"
        );
        assert!(
            s.by_ip("10.2.0.2".parse().unwrap()).is_none(),
            "{what}: no owner"
        );
        let e = explain(
            &s,
            &crate::policy::authz::Mesh::new("istio-system", "cluster.local"),
            15008,
            true,
            "shop/client",
            "10.2.0.2:8080".parse().unwrap(),
        )
        .unwrap();
        assert!(e.verdict.starts_with("refused"), "{what}: {}", e.verdict);
        let json = serde_json::to_string(&e).unwrap();
        assert!(
            json.contains("ambiguous_address") && json.contains("\"aaa/stale\""),
            "{what}: explain shows the claimants: {json}"
        );
    }
}

#[test]
fn a_service_endpoint_with_an_undecidable_address_is_refused() {
    let svc = "kind: Service\nmetadata: {name: server, namespace: shop}\n\
               spec: {clusterIP: 10.96.0.10, ports: [{port: 80, targetPort: 8080}]}\n---\n\
               kind: EndpointSlice\nmetadata: {name: server-1, namespace: shop, labels: {kubernetes.io/service-name: server}}\n\
               endpoints: [{addresses: [10.2.0.2]}]\nports: [{port: 8080}]\n";
    let s = snap(&format!("{svc}---\n{}", stale("", "")));
    let d = decide_on(&s, "10.96.0.10:80");
    assert!(
        matches!(d.route, Route::Refuse { .. }),
        "{:?} {:?}",
        d.route,
        d.steps
    );
}

#[test]
fn rivals_that_are_all_outside_the_mesh_stay_plaintext() {
    // Neither claimant is enrolled: whichever holds the address, the answer is plaintext.
    let other = "kind: Pod\nmetadata: {name: other, namespace: aaa}\n\
                 spec: {nodeName: node2}\nstatus: {podIPs: [{ip: 10.2.0.9}]}\n";
    let s = snap(&format!(
        "{other}---\n{}",
        stale("", "").replace("10.2.0.2", "10.2.0.9")
    ));
    assert_eq!(
        decide_on(&s, "10.2.0.9:80").route,
        Route::Plaintext {
            target: "10.2.0.9:80".parse().unwrap()
        }
    );
}
