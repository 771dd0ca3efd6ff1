//! What one per-connection decision costs on a large inventory (10,000 pods, 1,000 Services, 1,000 AuthorizationPolicies): heap allocations (counted by the global allocator) and time, printed per decision.
//!
//! Run it with `cargo test -p ambit-agent --release --test decision_cost -- --nocapture`
//! (debug builds time the same code, only slower). The test binary holds this one test, so
//! the allocator's counters see nothing but the loops measured. It fails if a lookup or an
//! authorization allocates, or a route allocates more than its answer.
use std::alloc::System;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Instant;

use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};

use ambit::inventory::enrollment::Enrollment;
use ambit::inventory::services::{Endpoint, Service, ServicePort};
use ambit::inventory::{Snapshot, Workload};
use ambit::policy::authz::{self, AuthorizationPolicy, ConnAttrs};
use ambit::proxy::route::{self, Route, RouteCtx, Steps};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const PODS: u32 = 10_000;
const SERVICES: u32 = 1_000;
const NAMESPACES: u32 = 100;
const POLICIES: u32 = 1_000;
const ROUNDS: u32 = 10_000;
const ROOT: &str = "istio-system";
const TRUST_DOMAIN: &str = "cluster.local";

fn pod_ip(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i + 1))
}

fn vip(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a60_0000 + i + 1))
}

/// Pod `i` runs in namespace `ns-(i % 100)` as service account `sa-(i % 50)` on one of 100
/// nodes; every pod is enrolled. Service `i` selects pods `i`, `i + 1000`, ... (ten endpoints).
/// Each namespace has ten policies: DENY by namespace, by IP block and by port, and ALLOW by
/// principal, namespace, service account and port; the root namespace adds two mesh-wide ones.
fn inventory() -> Snapshot {
    let mut snap = Snapshot::default();
    for i in 0..PODS {
        let w = Workload {
            name: format!("pod-{i}"),
            namespace: format!("ns-{}", i % NAMESPACES),
            service_account: format!("sa-{}", i % 50),
            node: format!("node-{}", i % 100),
            ips: vec![pod_ip(i)],
            labels: BTreeMap::from([("app".to_string(), format!("app-{}", i % 20))]),
            enrolled: true,
            enrollment: Enrollment::by_mode_label(true),
            netns: None,
            cgroup: None,
            skip_ports: Vec::new(),
            skip_cidrs: Vec::new(),
            host_network: false,
            deleting: false,
            created: None,
        };
        snap.workloads.insert(w.key(), w.into());
    }
    for i in 0..SERVICES {
        let s = Service {
            name: format!("svc-{i}"),
            namespace: format!("ns-{}", i % NAMESPACES),
            labels: BTreeMap::new(),
            vips: vec![vip(i)],
            ports: BTreeMap::from([(
                80,
                ServicePort {
                    name: "http".into(),
                    target_port: Some(8080),
                },
            )]),
            endpoints: (0..PODS / SERVICES)
                .map(|k| Endpoint {
                    ip: pod_ip(i + k * SERVICES),
                    ready: true,
                    ports: BTreeMap::from([("http".to_string(), 8080)]),
                })
                .collect(),
        };
        snap.services.insert(s.key(), s.into());
    }
    let mut policies = Vec::new();
    for i in 0..POLICIES {
        let ns = format!("ns-{}", i % NAMESPACES);
        let n = i / NAMESPACES;
        let spec = match n % 5 {
            0 => {
                serde_json::json!({"action": "DENY", "rules": [{"from": [{"source": {"namespaces": [format!("evil-{n}"), "attic-*"]}}]}]})
            }
            1 => {
                serde_json::json!({"action": "DENY", "rules": [{"from": [{"source": {"ipBlocks": [format!("192.168.{n}.0/24")], "notIpBlocks": ["192.168.0.7"]}}]}]})
            }
            2 => {
                serde_json::json!({"selector": {"matchLabels": {"app": format!("app-{}", n % 20)}}, "action": "DENY", "rules": [{"to": [{"operation": {"ports": ["9999", "9998"]}}]}]})
            }
            3 => {
                serde_json::json!({"rules": [{"from": [{"source": {"principals": [format!("{TRUST_DOMAIN}/ns/{ns}/sa/sa-{n}"), "*/sa/admin"]}}], "to": [{"operation": {"ports": ["8080"]}}]}]})
            }
            _ => {
                serde_json::json!({"rules": [{"from": [{"source": {"namespaces": [format!("ns-{}", (i + 1) % NAMESPACES)], "serviceAccounts": [format!("ns-{}/sa-1*", (i + 1) % NAMESPACES)]}}], "when": [{"key": "destination.port", "values": ["8080", "8443"]}]}]})
            }
        };
        policies.push(policy(&ns, &format!("p-{i}"), spec));
    }
    policies.push(policy(
        ROOT,
        "deny-plaintext-to-admin",
        serde_json::json!({"action": "DENY", "rules": [{"from": [{"source": {"notPrincipals": ["*"]}}], "to": [{"operation": {"ports": ["15000"]}}]}]}),
    ));
    policies.push(policy(
        ROOT,
        "deny-outside",
        serde_json::json!({"action": "DENY", "rules": [{"from": [{"source": {"notIpBlocks": ["10.0.0.0/8", "fd00::/8"]}}]}]}),
    ));
    snap.authorization_policies = policies.into();
    snap
}

fn policy(ns: &str, name: &str, spec: serde_json::Value) -> AuthorizationPolicy {
    let p: AuthorizationPolicy = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }))
    .expect("policy shape");
    authz::validate(&p).expect("valid policy");
    p
}

/// Runs `f` `ROUNDS` times; returns (allocations, ns) per call.
fn measure(mut f: impl FnMut(u32)) -> (f64, f64) {
    // Warm up (first-use indexes, lazily built state) outside the measured region.
    f(0);
    let region = Region::new(GLOBAL);
    let start = Instant::now();
    for i in 0..ROUNDS {
        f(i);
    }
    let elapsed = start.elapsed();
    let stats = region.change();
    (
        stats.allocations as f64 / f64::from(ROUNDS),
        elapsed.as_nanos() as f64 / f64::from(ROUNDS),
    )
}

fn report(what: &str, (allocs, ns): (f64, f64)) {
    println!("{what:<48} {allocs:>8.2} allocs/decision {ns:>12.0} ns/decision");
}

#[test]
fn measure_per_connection_decisions_on_a_large_inventory() {
    let snap = inventory();
    // What the publisher does once per snapshot, before any connection sees it.
    let start = Instant::now();
    let region = Region::new(GLOBAL);
    snap.index();
    println!(
        "index built once per snapshot: {} ms, {} allocations",
        start.elapsed().as_millis(),
        region.change().allocations
    );
    assert!(snap.authz().failures().is_empty());
    let ctx = RouteCtx {
        snap: &snap,
        trust_domain: TRUST_DOMAIN,
        root_namespace: ROOT,
        tunnel_port: 15008,
        mtls: true,
    };
    println!(
        "inventory: {} pods, {} Services, {} AuthorizationPolicies; {ROUNDS} rounds each",
        snap.workloads.len(),
        snap.services.len(),
        snap.authorization_policies.len()
    );

    let to_vip = measure(|i| {
        let orig = SocketAddr::new(vip(i % SERVICES), 80);
        let d = route::decide(&ctx, orig, Steps::Skip, |_, n| i as usize % n);
        assert!(matches!(d.route, Route::Tunnel { .. }), "{:?}", d.route);
    });
    report("route::decide, Service VIP -> tunnel", to_vip);

    let explained = measure(|i| {
        let orig = SocketAddr::new(vip(i % SERVICES), 80);
        let d = route::decide(&ctx, orig, Steps::Record, |_, n| i as usize % n);
        assert_eq!(d.steps.len(), 6, "{:?}", d.steps);
    });
    report("  the same, steps recorded (explain, debug log)", explained);

    let to_pod = measure(|i| {
        let orig = SocketAddr::new(pod_ip(i % PODS), 8080);
        let d = route::decide(&ctx, orig, Steps::Skip, |_, _| 0);
        assert!(matches!(d.route, Route::Tunnel { .. }), "{:?}", d.route);
    });
    report("route::decide, pod address -> tunnel", to_pod);

    let outside = measure(|i| {
        let orig = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, (i % 250) as u8)), 443);
        let d = route::decide(&ctx, orig, Steps::Skip, |_, _| 0);
        assert!(matches!(d.route, Route::Plaintext { .. }), "{:?}", d.route);
    });
    report("route::decide, outside the mesh -> plaintext", outside);

    let by_vip = measure(|i| {
        assert!(snap.service_by_vip(vip(i % SERVICES)).is_some());
    });
    report("Snapshot::service_by_vip", by_vip);

    // The inbound tunnel's check: a proven identity from another namespace to pod `dst`.
    let labels = BTreeMap::from([("app".to_string(), "app-7".to_string())]);
    let attrs: Vec<ConnAttrs> = (0..50)
        .map(|k| ConnAttrs {
            peer: Some(
                format!("spiffe://{TRUST_DOMAIN}/ns/ns-8/sa/sa-{k}")
                    .parse()
                    .expect("identity"),
            ),
            src_ip: pod_ip(8 + k * 100),
            dst_port: 8080,
            dst_ip: pod_ip(7),
        })
        .collect();
    let mut allowed = 0;
    let authorize = measure(|i| {
        let d = snap.authz().evaluate(
            &authz::Mesh::new(ROOT, TRUST_DOMAIN),
            "ns-7",
            &labels,
            &attrs[i as usize % attrs.len()],
        );
        allowed += u32::from(d.allowed());
    });
    report("AuthorizationPolicy evaluation (inbound)", authorize);
    // Some sources are allowed (by namespace and service account), some not: both paths ran.
    assert!(allowed > 0 && allowed <= ROUNDS, "{allowed}");

    // The CA's node authorization: is a pod with this identity on the asking node?
    let on_node = measure(|i| {
        let node = format!("node-{}", i % 100);
        let (ns, sa) = (format!("ns-{}", i % 100), format!("sa-{}", i % 50));
        assert!(snap.with_identity(&ns, &sa).any(|w| w.node == node));
    });
    report("CA node authorization (identity on node)", on_node);

    // What the index promises: the lookups and the authorization allocate nothing; a route
    // allocates only its answer (the tunnel's identity, formatted and parsed once).
    assert_eq!(by_vip.0, 0.0, "service_by_vip allocates");
    assert_eq!(authorize.0, 0.0, "authorization allocates");
    assert_eq!(outside.0, 0.0, "a plaintext route allocates");
    assert!(to_pod.0 <= 3.0, "a tunnel route allocates {}", to_pod.0);
    assert!(to_vip.0 <= 3.0, "a VIP route allocates {}", to_vip.0);
}
