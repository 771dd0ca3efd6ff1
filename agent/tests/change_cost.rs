//! What one istiod Workload change costs on a large mesh (20,000 workloads on 200 nodes, 500 Services): heap allocations (counted by the global allocator) and time, against a full build of the same snapshot.
//!
//! Run it with `cargo test -p ambit-agent --release --test change_cost -- --nocapture` (debug
//! builds count the same allocations, only slower). The test binary holds this one test, so the
//! allocator's counters see nothing but the code measured. A change (decode, apply, the kept
//! snapshot and its index updated, a copy published through the [`Publisher`]) must allocate
//! far less than a rebuild: it fails if it allocates more than 1 % of a full build's
//! allocations or bytes, which a change that copied or rescanned the inventory would.
use std::alloc::System;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Instant;

use prost::Message;
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};
use tokio::sync::watch;

use ambit::inventory::istiod::model::{Mesh, ADDRESS_TYPE};
use ambit::inventory::publish::{Publisher, ReloadStats};
use ambit::inventory::Snapshot;
use ambit_proto::istio::workload as wl;

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const WORKLOADS: u32 = 20_000;
const NODES: u32 = 200;
const SERVICES: u32 = 500;
const CHANGES: u32 = 1_000;

fn v4(base: u32, i: u32) -> Vec<u8> {
    Ipv4Addr::from(base + i).octets().to_vec()
}

fn service_key(s: u32) -> String {
    format!("ns-{}/svc-{s}.ns-{}.svc.cluster.local", s % 100, s % 100)
}

/// Workload `i` (at address generation `g`): namespace `ns-(i % 100)`, in Service `i % 500`.
fn workload(i: u32, g: u32) -> Vec<u8> {
    let mut w = wl::Workload {
        uid: format!("uid-{i}"),
        name: format!("pod-{i}"),
        namespace: format!("ns-{}", i % 100),
        service_account: format!("sa-{}", i % 30),
        node: format!("node-{}", i % NODES),
        addresses: vec![v4(0x0a00_0000 + (g << 20), i)],
        tunnel_protocol: wl::TunnelProtocol::Hbone.into(),
        canonical_name: format!("app-{}", i % 300),
        canonical_revision: "v1".into(),
        ..wl::Workload::default()
    };
    w.services.insert(
        service_key(i % SERVICES),
        wl::PortList {
            ports: vec![wl::Port {
                service_port: 80,
                target_port: 8080,
                app_protocol: 0,
            }],
        },
    );
    let t = wl::address::Type::Workload(w);
    wl::Address { r#type: Some(t) }.encode_to_vec()
}

fn service(s: u32) -> Vec<u8> {
    let svc = wl::Service {
        name: format!("svc-{s}"),
        namespace: format!("ns-{}", s % 100),
        hostname: format!("svc-{s}.ns-{}.svc.cluster.local", s % 100),
        addresses: vec![wl::NetworkAddress {
            network: String::new(),
            address: v4(0x0a60_0000, s),
            length: None,
        }],
        ports: vec![wl::Port {
            service_port: 80,
            target_port: 8080,
            app_protocol: 0,
        }],
        ..wl::Service::default()
    };
    let t = wl::address::Type::Service(svc);
    wl::Address { r#type: Some(t) }.encode_to_vec()
}

#[test]
fn a_workload_change_costs_a_small_fraction_of_a_rebuild() {
    let mut m = Mesh::new("cluster.local", "istio-system");
    for s in 0..SERVICES {
        m.apply(ADDRESS_TYPE, &service_key(s), &service(s)).unwrap();
    }
    for i in 0..WORKLOADS {
        m.apply(ADDRESS_TYPE, &format!("uid-{i}"), &workload(i, 0))
            .unwrap();
    }
    let (tx, _rx) = watch::channel(Arc::new(Snapshot::default()));
    let mut publisher = Publisher::new(tx, Arc::new(ReloadStats::default()));

    let region = Region::new(GLOBAL);
    let started = Instant::now();
    let snap = m.snapshot();
    let full_time = started.elapsed();
    let full = region.change();
    assert_eq!(snap.workloads.len(), WORKLOADS as usize);
    publisher.publish(snap, true);

    let changes: Vec<(String, Vec<u8>)> = (0..CHANGES)
        .map(|c| {
            let i = c.wrapping_mul(7919) % WORKLOADS;
            (format!("uid-{i}"), workload(i, 1 + c % 7))
        })
        .collect();
    let region = Region::new(GLOBAL);
    let started = Instant::now();
    for (uid, value) in &changes {
        m.apply(ADDRESS_TYPE, uid, value).unwrap();
        assert!(publisher.publish(m.snapshot(), false));
    }
    let change_time = started.elapsed() / CHANGES;
    let change = region.change();
    let per_change = change.allocations as f64 / f64::from(CHANGES);
    let bytes_per_change = change.bytes_allocated as f64 / f64::from(CHANGES);
    println!(
        "full build of {WORKLOADS} workloads: {} allocations, {:.1} MiB, {full_time:?}",
        full.allocations,
        full.bytes_allocated as f64 / 1_048_576.0
    );
    println!(
        "one workload change applied and published: {per_change:.0} allocations, \
         {:.1} KiB, {change_time:?}",
        bytes_per_change / 1024.0
    );
    // The last change is in force, and the address it left is free.
    let snap = publisher.current();
    let (uid, _) = changes.last().unwrap();
    let i: u32 = uid.trim_start_matches("uid-").parse().unwrap();
    let moved = IpAddr::V4(Ipv4Addr::from(
        0x0a00_0000 + ((1 + (CHANGES - 1) % 7) << 20) + i,
    ));
    assert_eq!(
        snap.by_ip(moved).map(|w| w.key()),
        Some(format!("ns-{}/pod-{i}", i % 100))
    );
    assert!(snap
        .by_ip(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)))
        .is_none());
    assert!(
        per_change < full.allocations as f64 / 100.0,
        "a change allocates {per_change:.0} times, a full build {}",
        full.allocations
    );
    assert!(
        bytes_per_change < full.bytes_allocated as f64 / 100.0,
        "a change allocates {bytes_per_change:.0} bytes, a full build {}",
        full.bytes_allocated
    );
}
