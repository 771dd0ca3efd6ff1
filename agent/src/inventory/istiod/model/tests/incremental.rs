//! Tests of the snapshot kept up to date resource by resource: after every change it equals (index included) the snapshot built from scratch.
use super::*;
use crate::inventory::index::Index;

/// The kept snapshot equals a full build of the same resources, and its index answers as a
/// rebuilt one.
fn assert_kept_equals_full(m: &mut Mesh, step: &str) {
    let kept = m.snapshot();
    let full = m.full_snapshot();
    assert_eq!(kept, full, "after {step}");
    assert!(
        kept.index().same_lookups(&Index::build(&kept)),
        "index after {step}"
    );
}

/// Workload `i` of a small mesh: three namespaces, two Services, some in istiod's STRICT
/// policy, some behind a waypoint, addresses that sometimes collide.
fn nth(i: u32, generation: u32) -> wl::Workload {
    let ns = ["shop", "billing", "zoo"][(i % 3) as usize];
    let ip = format!("10.1.{}.{}", generation % 3, i % 40 + 1);
    let mut w = workload(&format!("uid-{i}"), ns, &format!("pod-{i}"), &[&ip]);
    w.node = format!("node{}", (i + generation) % 4);
    if (i + generation).is_multiple_of(2) {
        w.services.insert(
            "shop/web.shop.svc.cluster.local".into(),
            wl::PortList::default(),
        );
    }
    if i % 5 == generation % 5 {
        w.services.insert(
            "zoo/api.zoo.svc.cluster.local".into(),
            wl::PortList::default(),
        );
        w.status = wl::WorkloadStatus::Unhealthy.into();
    }
    if (i + generation).is_multiple_of(3) {
        w.authorization_policies = vec![format!("{ROOT}/istio_converted_static_strict")];
    }
    if i.is_multiple_of(7) {
        w.waypoint = Some(wl::GatewayAddress {
            destination: Some(wl::gateway_address::Destination::Address(
                wl::NetworkAddress {
                    network: String::new(),
                    address: ip_bytes("10.96.0.30"),
                    length: None,
                },
            )),
            hbone_mtls_port: 15008,
        });
    }
    w
}

#[test]
fn each_workload_change_keeps_the_snapshot_equal_to_a_full_build() {
    let mut m = mesh();
    apply_service(&mut m, service("shop", "web", "10.96.0.10", 80, 8080));
    apply_service(&mut m, service("zoo", "api", "10.96.0.20", 80, 8080));
    apply_service(&mut m, service("zoo", "wp", "10.96.0.30", 15008, 15008));
    for i in 0..60 {
        apply_workload(&mut m, nth(i, 0));
    }
    assert_kept_equals_full(&mut m, "the first push");
    // Changes in a fixed pseudo-random order: new versions (address, node, Services, STRICT
    // and health move), removals and re-creations.
    let mut x: u32 = 7;
    for step in 0..300 {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let i = (x >> 8) % 70;
        let what = (x >> 4) % 4;
        if what == 0 {
            m.remove(ADDRESS_TYPE, &format!("uid-{i}"));
        } else {
            apply_workload(&mut m, nth(i, step));
        }
        assert_kept_equals_full(&mut m, &format!("step {step} (workload {i}, {what})"));
    }
    let snap = m.snapshot();
    assert!(
        snap.addresses().conflicts().count() > 0,
        "the changes exercised contested addresses"
    );
    assert!(!snap.peer_authentications.is_empty());
    // A Service change rebuilds in full; Workload changes are incremental again after it.
    apply_service(&mut m, service("shop", "web", "10.96.0.11", 80, 8080));
    assert_kept_equals_full(&mut m, "a Service change");
    apply_workload(&mut m, nth(3, 1000));
    assert_kept_equals_full(&mut m, "a workload change after the Service change");
}

#[test]
fn a_snapshot_taken_earlier_does_not_change_when_the_mesh_does() {
    let mut m = mesh();
    apply_workload(&mut m, workload("uid-a", "shop", "a", &["10.1.0.2"]));
    let before = m.snapshot();
    apply_workload(&mut m, workload("uid-a", "shop", "a", &["10.1.0.3"]));
    apply_workload(&mut m, workload("uid-b", "shop", "b", &["10.1.0.2"]));
    assert_eq!(before.workloads.len(), 1);
    assert_eq!(
        before.by_ip(ip("10.1.0.2")).map(|w| w.key()),
        Some("shop/a".to_string())
    );
    let after = m.snapshot();
    assert_eq!(
        after.by_ip(ip("10.1.0.2")).map(|w| w.key()),
        Some("shop/b".to_string())
    );
}
