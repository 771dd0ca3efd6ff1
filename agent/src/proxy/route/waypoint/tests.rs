use std::path::Path;

use crate::inventory::file::parse;
use crate::inventory::Snapshot;
use crate::proxy::explain::explain;
use crate::proxy::route::{decide, Decision, Refusal, Route, RouteCtx, Steps};

/// Namespace `shop` (enrolled) with pods `server-a`, `server-b` behind Service `server`, a
/// client, and waypoint `wp` (Service and one pod, `wp-0`, identity `sa/wp`). `{ns}`, `{a}`,
/// `{svc}` are extra labels of the namespace, server-a and the Service.
fn inventory(ns: &str, a: &str, svc: &str, extra: &str) -> Snapshot {
    let yaml = format!(
        r#"
kind: Namespace
metadata: {{name: shop, labels: {{ambit.io/mode: enabled{ns}}}}}
---
kind: Pod
metadata: {{name: client, namespace: shop}}
spec: {{nodeName: node1, serviceAccountName: client}}
status: {{podIPs: [{{ip: 10.1.0.2}}]}}
---
kind: Pod
metadata: {{name: server-a, namespace: shop, labels: {{app: server{a}}}}}
spec: {{nodeName: node2, serviceAccountName: server}}
status: {{podIPs: [{{ip: 10.2.0.2}}]}}
---
kind: Pod
metadata: {{name: server-b, namespace: shop, labels: {{app: server}}}}
spec: {{nodeName: node2, serviceAccountName: server}}
status: {{podIPs: [{{ip: 10.2.0.3}}]}}
---
kind: Service
metadata: {{name: server, namespace: shop, labels: {{app: server{svc}}}}}
spec:
  clusterIP: 10.96.0.10
  ports: [{{name: http, port: 80, targetPort: 8080}}]
---
kind: EndpointSlice
metadata: {{name: server-1, namespace: shop, labels: {{kubernetes.io/service-name: server}}}}
endpoints: [{{addresses: [10.2.0.2]}}]
ports: [{{name: http, port: 8080}}]
---
kind: Pod
metadata: {{name: wp-0, namespace: shop, labels: {{gateway.networking.k8s.io/gateway-name: wp}}}}
spec: {{nodeName: node3, serviceAccountName: wp}}
status: {{podIPs: [{{ip: 10.3.0.5}}]}}
{extra}"#
    );
    parse(Path::new("t.yaml"), &yaml).unwrap()
}

const WAYPOINT: &str = r#"---
kind: Service
metadata: {name: wp, namespace: shop}
spec: {clusterIP: 10.96.0.50, ports: [{name: mesh, port: 15008}]}
---
kind: EndpointSlice
metadata: {name: wp-1, namespace: shop, labels: {kubernetes.io/service-name: wp}}
endpoints: [{addresses: [10.3.0.5]}]
ports: [{name: mesh, port: 15008}]
"#;

const WP_ID: &str = "spiffe://cluster.local/ns/shop/sa/wp";

fn route(s: &Snapshot, to: &str, mtls: bool) -> Decision {
    let ctx = RouteCtx {
        snap: s,
        trust_domain: "cluster.local",
        root_namespace: "istio-system",
        tunnel_port: 15008,
        mtls,
    };
    decide(&ctx, to.parse().unwrap(), Steps::Record, |_, _| 0)
}

fn via_waypoint(target: &str) -> Route {
    Route::Tunnel {
        peer: "10.3.0.5:15008".parse().unwrap(),
        target: target.parse().unwrap(),
        dst_id: WP_ID.into(),
    }
}

fn direct(ip: &str, port: u16) -> Route {
    Route::Tunnel {
        peer: format!("{ip}:15008").parse().unwrap(),
        target: format!("{ip}:{port}").parse().unwrap(),
        dst_id: "spiffe://cluster.local/ns/shop/sa/server".into(),
    }
}

fn refused_for_waypoint(d: &Decision) -> String {
    let Route::Refuse { reason, code } = &d.route else {
        panic!("expected a refusal, got {:?}", d.route);
    };
    assert_eq!(*code, Refusal::WaypointUnavailable, "{reason}");
    assert_eq!(code.reason().label(), "waypoint_unavailable");
    assert!(reason.starts_with("waypoint_unavailable: "), "{reason}");
    reason.clone()
}

#[test]
fn pod_label_sends_traffic_to_the_pod_through_its_waypoint() {
    let s = inventory("", ", istio.io/use-waypoint: wp", "", WAYPOINT);
    let d = route(&s, "10.2.0.2:8080", true);
    assert_eq!(d.route, via_waypoint("10.2.0.2:8080"));
    let wp = d.waypoint.expect("the waypoint is named");
    assert_eq!((wp.key().as_str(), wp.bound_by), ("shop/wp", "pod"));
    // The same inventory without the label on server-b: straight to server-b.
    assert_eq!(
        route(&s, "10.2.0.3:8080", true).route,
        direct("10.2.0.3", 8080)
    );
    // Through the Service (which has no waypoint) to server-a: its waypoint still applies,
    // CONNECT to the endpoint chosen.
    assert_eq!(
        route(&s, "10.96.0.10:80", true).route,
        via_waypoint("10.2.0.2:8080")
    );
}

#[test]
fn namespace_label_applies_to_its_pods_and_a_pod_none_opts_out() {
    let s = inventory(", istio.io/use-waypoint: wp", "", "", WAYPOINT);
    assert_eq!(
        route(&s, "10.2.0.2:8080", true).route,
        via_waypoint("10.2.0.2:8080")
    );
    let d = route(&s, "10.2.0.3:8080", true);
    assert_eq!(d.route, via_waypoint("10.2.0.3:8080"));
    assert_eq!(d.waypoint.map(|w| w.bound_by), Some("namespace"));
    // The waypoint's own pod (in the same namespace) does not go through itself.
    let d = route(&s, "10.3.0.5:15008", true);
    assert_eq!(d.waypoint, None);
    assert!(matches!(d.route, Route::Tunnel { peer, .. } if peer.ip().to_string() == "10.3.0.5"));
    // A pod's `none` wins over its namespace's waypoint.
    let s = inventory(
        ", istio.io/use-waypoint: wp",
        ", istio.io/use-waypoint: none",
        "",
        WAYPOINT,
    );
    assert_eq!(
        route(&s, "10.2.0.2:8080", true).route,
        direct("10.2.0.2", 8080)
    );
    assert_eq!(
        route(&s, "10.2.0.3:8080", true).route,
        via_waypoint("10.2.0.3:8080")
    );
}

#[test]
fn service_label_sends_service_traffic_through_the_waypoint_to_the_service_address() {
    let s = inventory("", "", ", istio.io/use-waypoint: wp", WAYPOINT);
    let d = route(&s, "10.96.0.10:80", true);
    assert_eq!(d.route, via_waypoint("10.96.0.10:80"));
    assert_eq!(d.waypoint.map(|w| w.bound_by), Some("service"));
    // The pod itself uses none: its address directly is not sent to the Service's waypoint.
    assert_eq!(
        route(&s, "10.2.0.2:8080", true).route,
        direct("10.2.0.2", 8080)
    );
    // A Service's `none` wins over its namespace's waypoint for the Service address.
    let s = inventory(
        ", istio.io/use-waypoint: other",
        ", istio.io/use-waypoint: none",
        ", istio.io/use-waypoint: none",
        WAYPOINT,
    );
    assert_eq!(
        route(&s, "10.96.0.10:80", true).route,
        direct("10.2.0.2", 8080)
    );
}

#[test]
fn waypoint_in_another_namespace_is_named_by_the_namespace_label() {
    let other = WAYPOINT.replace("namespace: shop", "namespace: gw");
    let other = format!(
        "{other}---\nkind: Pod\nmetadata: {{name: wp-0, namespace: gw}}\n\
         spec: {{nodeName: node3, serviceAccountName: wp}}\nstatus: {{podIPs: [{{ip: 10.3.0.6}}]}}\n\
         ---\nkind: EndpointSlice\nmetadata: {{name: wp-2, namespace: gw, labels: {{kubernetes.io/service-name: wp}}}}\n\
         endpoints: [{{addresses: [10.3.0.6]}}]\n"
    )
    .replace("endpoints: [{addresses: [10.3.0.5]}]", "endpoints: []");
    let s = inventory(
        "",
        ", istio.io/use-waypoint: wp, istio.io/use-waypoint-namespace: gw",
        "",
        &other,
    );
    let d = route(&s, "10.2.0.2:8080", true);
    assert_eq!(
        d.route,
        Route::Tunnel {
            peer: "10.3.0.6:15008".parse().unwrap(),
            target: "10.2.0.2:8080".parse().unwrap(),
            dst_id: "spiffe://cluster.local/ns/gw/sa/wp".into(),
        }
    );
    assert_eq!(d.waypoint.map(|w| w.key()), Some("gw/wp".to_string()));
}

#[test]
fn an_unreachable_waypoint_refuses_and_never_goes_around_it() {
    let label = ", istio.io/use-waypoint: wp";
    // No Service of that name.
    let s = inventory("", label, "", "");
    let reason = refused_for_waypoint(&route(&s, "10.2.0.2:8080", true));
    assert!(
        reason.contains("waypoint shop/wp has no Service"),
        "{reason}"
    );
    // No ready endpoint.
    let unready = WAYPOINT.replace(
        "[{addresses: [10.3.0.5]}]",
        "[{addresses: [10.3.0.5], conditions: {ready: false}}]",
    );
    let s = inventory("", label, "", &unready);
    let reason = refused_for_waypoint(&route(&s, "10.2.0.2:8080", true));
    assert!(reason.contains("no ready endpoint"), "{reason}");
    // An endpoint that is no known pod: no identity to require.
    let unknown = WAYPOINT.replace("10.3.0.5", "10.3.0.99");
    let s = inventory("", label, "", &unknown);
    let reason = refused_for_waypoint(&route(&s, "10.2.0.2:8080", true));
    assert!(reason.contains("10.3.0.99 is no known pod"), "{reason}");
    // A Service's waypoint that does not exist refuses the Service address too.
    let s = inventory("", "", label, "");
    refused_for_waypoint(&route(&s, "10.96.0.10:80", true));
    // Without a CA the waypoint cannot be reached (HBONE): refused, not plaintext.
    let s = inventory("", label, "", WAYPOINT);
    let reason = refused_for_waypoint(&route(&s, "10.2.0.2:8080", false));
    assert!(reason.contains("no CA"), "{reason}");
    // The same inventory with the waypoint present routes (the refusals above are its absence).
    assert_eq!(
        route(&s, "10.2.0.2:8080", true).route,
        via_waypoint("10.2.0.2:8080")
    );
}

#[test]
fn explain_names_the_waypoint_in_its_steps_and_verdict() {
    let s = inventory("", ", istio.io/use-waypoint: wp", "", WAYPOINT);
    let d = route(&s, "10.2.0.2:8080", true);
    assert!(
        d.steps
            .iter()
            .any(|s| s
                == "pod shop/server-a uses waypoint shop/wp (pod label istio.io/use-waypoint)"),
        "{:?}",
        d.steps
    );
    assert!(
        d.steps.iter().any(|s| s
            == &format!(
            "HBONE to waypoint shop/wp at 10.3.0.5:15008 requiring {WP_ID}, CONNECT 10.2.0.2:8080"
        )),
        "{:?}",
        d.steps
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
    assert!(
        e.verdict.contains("through waypoint shop/wp"),
        "{}",
        e.verdict
    );
    assert!(
        e.inbound.is_none(),
        "the destination's checks are the waypoint's"
    );
    let json = serde_json::to_value(&e).unwrap();
    assert_eq!(json["outbound"]["waypoint"]["name"], "wp");
    // Unreachable: the verdict says refused, with the reason.
    let s = inventory("", ", istio.io/use-waypoint: wp", "", "");
    let e = explain(
        &s,
        &crate::policy::authz::Mesh::new("istio-system", "cluster.local"),
        15008,
        true,
        "shop/client",
        "10.2.0.2:8080".parse().unwrap(),
    )
    .unwrap();
    assert!(
        e.verdict.starts_with(
            "refused by the source agent: waypoint_unavailable: waypoint shop/wp has no Service"
        ),
        "{}",
        e.verdict
    );
}

#[test]
fn waypoint_identities_are_those_of_its_pods() {
    let s = inventory("", ", istio.io/use-waypoint: wp", "", WAYPOINT);
    let a = s.workloads.get("shop/server-a").unwrap();
    let wp = s.waypoint_of_workload(a).unwrap();
    assert_eq!(
        s.waypoint_identities(&wp, "cluster.local"),
        vec![WP_ID.to_string()]
    );
    let b = s.workloads.get("shop/server-b").unwrap();
    assert_eq!(s.waypoint_of_workload(b), None);
    // A waypoint without a Service accepts nobody (the inbound check then refuses every peer).
    let s = inventory("", ", istio.io/use-waypoint: wp", "", "");
    let a = s.workloads.get("shop/server-a").unwrap();
    let wp = s.waypoint_of_workload(a).unwrap();
    assert!(s.waypoint_identities(&wp, "cluster.local").is_empty());
}
