use std::collections::BTreeMap;
use std::net::IpAddr;

use super::*;
use crate::inventory::enrollment::Enrollment;
use crate::inventory::services::{Endpoint, Service};
use crate::inventory::Workload;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn key(s: &str) -> AmbAddrKey {
    AmbAddrKey::destination(ip(s))
}

fn pod(name: &str, node: &str, enrolled: bool, ips: &[&str]) -> Workload {
    Workload {
        name: name.into(),
        namespace: "default".into(),
        service_account: name.into(),
        node: node.into(),
        ips: ips.iter().map(|i| ip(i)).collect(),
        labels: BTreeMap::new(),
        enrolled,
        enrollment: Enrollment::by_mode_label(enrolled),
        netns: None,
        cgroup: None,
        skip_ports: vec![],
        skip_cidrs: vec![],
        host_network: false,
        deleting: false,
        created: None,
    }
}

fn service(name: &str, vips: &[&str], endpoints: &[&str]) -> Service {
    Service {
        name: name.into(),
        namespace: "default".into(),
        labels: BTreeMap::new(),
        vips: vips.iter().map(|i| ip(i)).collect(),
        ports: BTreeMap::new(),
        endpoints: endpoints
            .iter()
            .map(|e| Endpoint {
                ip: ip(e),
                ready: true,
                ports: BTreeMap::new(),
            })
            .collect(),
    }
}

fn snapshot(pods: Vec<Workload>, services: Vec<Service>) -> Snapshot {
    let mut snap = Snapshot::default();
    snap.workloads = pods.into_iter().map(|w| (w.key(), Arc::new(w))).collect();
    snap.services = services
        .into_iter()
        .map(|s| (s.key(), Arc::new(s)))
        .collect();
    snap
}

#[test]
fn enrolled_pods_on_every_node_and_every_vip_are_mesh_destinations() {
    let snap = snapshot(
        vec![
            pod("client", "node1", true, &["10.1.0.2", "fd00:1::2"]),
            pod("server", "node2", true, &["10.2.0.2", "fd00:2::2"]),
            pod("legacy", "node2", false, &["10.2.0.3", "fd00:2::3"]),
        ],
        vec![
            // A Service over a mesh pod, and one over an unenrolled pod only: both VIPs exist
            // only in the agent (no kube-proxy), so both must be captured.
            service("web", &["10.96.0.10", "fd00:96::10"], &["10.2.0.2"]),
            service("old", &["10.96.0.30"], &["10.2.0.3"]),
        ],
    );
    let d = destinations(&snap);
    for a in ["10.1.0.2", "fd00:1::2", "10.2.0.2", "fd00:2::2"] {
        assert_eq!(d.get(&key(a)), Some(&MESH_DST_POD), "{a}");
    }
    for a in ["10.96.0.10", "fd00:96::10", "10.96.0.30"] {
        assert_eq!(d.get(&key(a)), Some(&MESH_DST_VIP), "{a}");
    }
    for a in ["10.2.0.3", "fd00:2::3", "8.8.8.8"] {
        assert!(!d.contains_key(&key(a)), "{a} is outside the mesh");
    }
    assert_eq!(d.len(), 7);
    assert!(!d.contains_key(&AmbAddrKey::WILDCARD));
}

#[test]
fn an_address_that_is_both_pod_and_vip_carries_both_bits() {
    let snap = snapshot(
        vec![pod("a", "node1", true, &["10.1.0.9"])],
        vec![service("odd", &["10.1.0.9"], &[])],
    );
    assert_eq!(
        destinations(&snap).get(&key("10.1.0.9")),
        Some(&(MESH_DST_POD | MESH_DST_VIP))
    );
}

#[test]
fn v4_mapped_inventory_addresses_fold_to_ipv4() {
    let snap = snapshot(vec![pod("a", "node1", true, &["::ffff:10.1.0.7"])], vec![]);
    assert!(destinations(&snap).contains_key(&key("10.1.0.7")));
}

#[test]
fn counted_changes_between_snapshots_give_the_list_a_full_count_would() {
    let mut snap = snapshot(
        vec![
            pod("a", "node1", true, &["10.1.0.2", "fd00::2"]),
            pod("b", "node2", true, &["10.1.0.3"]),
            pod("c", "node2", false, &["10.1.0.4"]),
        ],
        vec![service("web", &["10.96.0.1"], &["10.1.0.2"])],
    );
    let mut listed = Listed::of(&snap);
    let mut kernel = destinations(&snap);
    let mut x: u32 = 11;
    for step in 0..200 {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let n = (x >> 8) % 6;
        let mut next = snap.edit();
        let addr = format!("10.1.0.{}", (x >> 12) % 5 + 2);
        match (x >> 4) % 4 {
            0 => {
                next.remove_workload(&format!("default/p{n}"));
            }
            1 => {
                next.put_service(service(
                    &format!("s{}", n % 2),
                    &[&format!("10.96.0.{n}")],
                    &[],
                ));
            }
            2 => {
                next.remove_service(&format!("default/s{}", n % 2));
            }
            // Two pods may list one address; enrollment flips.
            _ => {
                next.put_workload(pod(&format!("p{n}"), "node1", step % 3 != 0, &[&addr]));
            }
        }
        for (k, v) in listed.change(&snap, &next) {
            match v {
                Some(v) => kernel.insert(k, v),
                None => kernel.remove(&k),
            };
        }
        assert_eq!(kernel, destinations(&next), "step {step}");
        snap = next;
    }
}
