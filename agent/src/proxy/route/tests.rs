use std::path::Path;

use super::*;
use crate::inventory::file::parse;

const BASE: &str = r#"
kind: Namespace
metadata: {name: shop, labels: {ambit.io/mode: enabled}}
---
kind: Pod
metadata: {name: server-a, namespace: shop, labels: {app: server}}
spec: {nodeName: node2, serviceAccountName: server}
status: {podIPs: [{ip: 10.2.0.2}]}
---
kind: Pod
metadata: {name: server-b, namespace: shop, labels: {app: server}}
spec: {nodeName: node2, serviceAccountName: server}
status: {podIPs: [{ip: 10.2.0.3}]}
---
kind: Pod
metadata: {name: legacy, namespace: plain}
spec: {nodeName: node2}
status: {podIPs: [{ip: 10.2.0.9}]}
---
kind: Service
metadata: {name: server, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: http}]
---
kind: EndpointSlice
apiVersion: discovery.k8s.io/v1
metadata: {name: server-x1, namespace: shop, labels: {kubernetes.io/service-name: server}}
addressType: IPv4
endpoints:
- addresses: [10.2.0.2]
  conditions: {ready: true}
- addresses: [10.2.0.3]
  conditions: {ready: true}
- addresses: [10.2.0.4]
  conditions: {ready: false}
ports: [{name: http, port: 8080}]
---
kind: Service
metadata: {name: legacy, namespace: plain}
spec:
  clusterIP: 10.96.0.20
  ports: [{name: tcp, port: 9000, targetPort: 9000}]
---
kind: EndpointSlice
metadata: {name: legacy-1, namespace: plain, labels: {kubernetes.io/service-name: legacy}}
endpoints: [{addresses: [10.2.0.9]}]
ports: [{name: tcp, port: 9000}]
"#;

fn snap(extra: &str) -> Snapshot {
    parse(Path::new("t.yaml"), &format!("{BASE}\n---\n{extra}")).unwrap()
}

fn decide_on(s: &Snapshot, to: &str, mtls: bool) -> Decision {
    let ctx = RouteCtx {
        snap: s,
        trust_domain: "cluster.local",
        root_namespace: "istio-system",
        tunnel_port: 15008,
        mtls,
    };
    decide(&ctx, to.parse().unwrap(), Steps::Record, |_, _| 0)
}

#[test]
fn service_vip_resolves_to_ready_endpoint_and_named_target_port() {
    let s = snap("");
    let d = decide_on(&s, "10.96.0.10:80", true);
    assert_eq!(
        d.route,
        Route::Tunnel {
            peer: "10.2.0.2:15008".parse().unwrap(),
            target: "10.2.0.2:8080".parse().unwrap(),
            dst_id: "spiffe://cluster.local/ns/shop/sa/server".into()
        },
        "{:?}",
        d.steps
    );
}

#[test]
fn round_robin_skips_unready_endpoints() {
    let s = snap("");
    let rr = RoundRobin::default();
    let ctx = RouteCtx {
        snap: &s,
        trust_domain: "cluster.local",
        root_namespace: "istio-system",
        tunnel_port: 15008,
        mtls: true,
    };
    let mut seen = Vec::new();
    for _ in 0..4 {
        match decide(
            &ctx,
            "10.96.0.10:80".parse().unwrap(),
            Steps::Record,
            |k, n| rr.next(k, n),
        )
        .route
        {
            Route::Tunnel { target, .. } => seen.push(target.ip().to_string()),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(seen, ["10.2.0.2", "10.2.0.3", "10.2.0.2", "10.2.0.3"]);
}

#[test]
fn unknown_service_port_and_unenrolled_destinations() {
    let s = snap("");
    assert!(matches!(
        decide_on(&s, "10.96.0.10:81", true).route,
        Route::Refuse { .. }
    ));
    assert_eq!(
        decide_on(&s, "10.96.0.20:9000", true).route,
        Route::Plaintext {
            target: "10.2.0.9:9000".parse().unwrap()
        }
    );
    assert_eq!(
        decide_on(&s, "192.0.2.1:443", true).route,
        Route::Plaintext {
            target: "192.0.2.1:443".parse().unwrap()
        }
    );
}

#[test]
fn destination_rule_istio_mutual_refuses_unenrolled_and_disable_sends_plaintext() {
    let s = snap(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: mtls, namespace: plain}\nspec:\n  host: legacy\n  trafficPolicy:\n    tls: {mode: ISTIO_MUTUAL}\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: off, namespace: shop}\nspec:\n  host: server.shop.svc.cluster.local\n  trafficPolicy:\n    tls: {mode: DISABLE}\n",
    );
    assert!(matches!(
        decide_on(&s, "10.96.0.20:9000", true).route,
        Route::Refuse { .. }
    ));
    assert_eq!(
        decide_on(&s, "10.96.0.10:80", true).route,
        Route::Plaintext {
            target: "10.2.0.2:8080".parse().unwrap()
        }
    );
}

#[test]
fn peer_authentication_disable_makes_clients_send_plaintext() {
    let s = snap("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: off, namespace: shop}\nspec:\n  mtls: {mode: DISABLE}\n");
    assert_eq!(
        decide_on(&s, "10.2.0.2:8080", true).route,
        Route::Plaintext {
            target: "10.2.0.2:8080".parse().unwrap()
        }
    );
}

#[test]
fn without_a_ca_enrolled_pods_talk_plaintext() {
    let s = snap("");
    assert_eq!(
        decide_on(&s, "10.2.0.2:8080", false).route,
        Route::Plaintext {
            target: "10.2.0.2:8080".parse().unwrap()
        }
    );
}

#[test]
fn dual_stack_vip_keeps_the_family() {
    let s = snap(
        "kind: Service\nmetadata: {name: ds, namespace: shop}\nspec:\n  clusterIPs: [10.96.0.30, \"fd00:96::30\"]\n  ports: [{name: http, port: 80, targetPort: 8080}]\n---\nkind: EndpointSlice\nmetadata: {name: ds-4, namespace: shop, labels: {kubernetes.io/service-name: ds}}\naddressType: IPv4\nendpoints: [{addresses: [10.2.0.2]}]\nports: [{name: http, port: 8080}]\n---\nkind: EndpointSlice\nmetadata: {name: ds-6, namespace: shop, labels: {kubernetes.io/service-name: ds}}\naddressType: IPv6\nendpoints: [{addresses: [\"fd00:2::2\"]}]\nports: [{name: http, port: 8080}]\n",
    );
    let ctx = RouteCtx {
        snap: &s,
        trust_domain: "cluster.local",
        root_namespace: "istio-system",
        tunnel_port: 15008,
        mtls: false,
    };
    for (vip, want) in [
        ("10.96.0.30:80", "10.2.0.2:8080"),
        ("[fd00:96::30]:80", "[fd00:2::2]:8080"),
    ] {
        for i in 0..2 {
            let d = decide(&ctx, vip.parse().unwrap(), Steps::Record, |_, n| i % n);
            assert_eq!(
                d.route,
                Route::Plaintext {
                    target: want.parse().unwrap()
                },
                "{vip}"
            );
        }
    }
}

#[test]
fn skipping_the_steps_decides_the_same_routes_and_formats_none() {
    let s = snap("kind: DestinationRule\napiVersion: networking.istio.io/v1\nmetadata: {name: legacy-plain, namespace: plain}\nspec:\n  host: legacy\n  trafficPolicy: {tls: {mode: DISABLE}}\n");
    let destinations = [
        "10.96.0.10:80",   // Service VIP -> tunnel
        "10.96.0.10:81",   // no such Service port -> refused
        "10.96.0.20:9000", // Service with a DestinationRule -> plaintext
        "10.2.0.2:8080",   // enrolled pod -> tunnel
        "10.2.0.9:80",     // not enrolled -> plaintext
        "192.0.2.1:443",   // outside the mesh -> plaintext
    ];
    for mtls in [true, false] {
        let ctx = RouteCtx {
            snap: &s,
            trust_domain: "cluster.local",
            root_namespace: "istio-system",
            tunnel_port: 15008,
            mtls,
        };
        for to in destinations {
            let recorded = decide(&ctx, to.parse().unwrap(), Steps::Record, |_, _| 0);
            let skipped = decide(&ctx, to.parse().unwrap(), Steps::Skip, |_, _| 0);
            assert_eq!(skipped.route, recorded.route, "{to}");
            assert!(skipped.steps.is_empty(), "{to}: {:?}", skipped.steps);
            assert!(!recorded.steps.is_empty(), "{to}: nothing recorded");
        }
    }
}
