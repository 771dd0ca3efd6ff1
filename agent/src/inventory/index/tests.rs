use std::path::Path;
use std::sync::Arc;

use tokio::sync::watch;

use crate::inventory::file::parse;
use crate::inventory::index::Index;
use crate::inventory::publish::{Publisher, ReloadStats};
use crate::inventory::Snapshot;

const INV: &str = r#"
kind: Pod
metadata: {name: a, namespace: shop}
spec: {nodeName: node1, serviceAccountName: web}
status: {podIPs: [{ip: 10.1.0.2}, {ip: "fd00:1::2"}]}
---
kind: Pod
metadata: {name: b, namespace: shop}
spec: {nodeName: node2, serviceAccountName: web}
status: {podIPs: [{ip: 10.2.0.2}]}
---
kind: Pod
metadata: {name: c, namespace: billing}
spec: {nodeName: node1, serviceAccountName: web}
status: {podIPs: [{ip: 10.1.0.3}]}
---
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIPs: [10.96.0.10, "fd00:96::10"]
  ports: [{name: http, port: 80, targetPort: 8080}]
---
kind: EndpointSlice
metadata: {name: web-4, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints:
- addresses: [10.1.0.2]
- addresses: [10.2.0.2]
  conditions: {ready: false}
ports: [{name: http, port: 8080}]
---
kind: EndpointSlice
metadata: {name: web-6, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv6
endpoints: [{addresses: ["fd00:1::2"]}]
ports: [{name: http, port: 8080}]
---
kind: Service
metadata: {name: web-copy, namespace: zoo}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 81}]
---
kind: Service
metadata: {name: db, namespace: billing}
spec:
  clusterIP: 10.96.0.20
  ports: [{name: sql, port: 5432}]
"#;

fn snap() -> Snapshot {
    parse(Path::new("t.yaml"), INV).unwrap()
}

#[test]
fn vips_name_their_service_and_its_ready_endpoints_of_the_family() {
    let s = snap();
    let v4 = s.vip("10.96.0.10".parse().unwrap()).unwrap();
    assert_eq!(
        v4.name, "shop/web",
        "of two Services claiming a VIP the first by key wins"
    );
    assert_eq!(v4.ready_count(), 1, "the unready endpoint is left out");
    assert_eq!(v4.ready(0).unwrap().ip.to_string(), "10.1.0.2");
    assert!(v4.ready(1).is_none());
    let v6 = s.vip("fd00:96::10".parse().unwrap()).unwrap();
    assert_eq!(v6.name, "shop/web");
    assert_eq!(v6.ready_count(), 1);
    assert_eq!(v6.ready(0).unwrap().ip.to_string(), "fd00:1::2");
    let db = s.vip("10.96.0.20".parse().unwrap()).unwrap();
    assert_eq!((db.name, db.ready_count()), ("billing/db", 0));
    assert!(
        s.vip("10.1.0.2".parse().unwrap()).is_none(),
        "a pod address"
    );
    assert_eq!(
        s.service_by_vip("fd00:96::10".parse().unwrap())
            .map(|svc| svc.key()),
        Some("shop/web".to_string())
    );
}

#[test]
fn workloads_are_found_by_identity_on_every_node() {
    let s = snap();
    let mut web: Vec<(String, String)> = s
        .with_identity("shop", "web")
        .map(|w| (w.key(), w.node.clone()))
        .collect();
    web.sort();
    assert_eq!(
        web,
        [
            ("shop/a".to_string(), "node1".to_string()),
            ("shop/b".to_string(), "node2".to_string())
        ]
    );
    assert_eq!(
        s.with_identity("billing", "web")
            .map(|w| w.key())
            .collect::<Vec<_>>(),
        ["billing/c"]
    );
    assert_eq!(s.with_identity("shop", "db").count(), 0);
    assert_eq!(s.with_identity("zoo", "web").count(), 0);
    // Pods without a service account run as `default`.
    let mut d = snap();
    let mut w = (*d.workloads["shop/a"]).clone();
    w.name = "plain".into();
    w.service_account = "default".into();
    d.workloads.insert(w.key(), w.into());
    assert_eq!(d.with_identity("shop", "default").count(), 1);
}

#[test]
fn the_publisher_builds_the_index_before_readers_see_the_snapshot() {
    let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
    let mut publisher = Publisher::new(tx, Arc::new(ReloadStats::default()));
    let s = snap();
    assert!(format!("{s:?}").contains("IndexCell(not built)"));
    assert!(publisher.publish(s, false));
    let published = rx.borrow().clone();
    assert!(
        format!("{published:?}").contains("IndexCell(built)"),
        "{published:?}"
    );
    // A clone is changed before it is published: it indexes itself again.
    let mut changed = (*published).clone();
    assert!(format!("{changed:?}").contains("IndexCell(not built)"));
    changed.workloads.remove("shop/a");
    assert!(changed.vip("10.96.0.10".parse().unwrap()).is_some());
    assert_eq!(changed.with_identity("shop", "web").count(), 1);
    assert_eq!(published.with_identity("shop", "web").count(), 2);
}

#[test]
fn the_publisher_counts_policies_that_fail_closed() {
    let (tx, _rx) = watch::channel(Arc::new(Snapshot::default()));
    let stats = Arc::new(ReloadStats::default());
    let mut publisher = Publisher::new(tx, stats.clone());
    let mut s = snap();
    let policy = |name: &str| -> crate::policy::authz::AuthorizationPolicy {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {"action": "DENY", "rules": [{}]},
        }))
        .unwrap()
    };
    std::sync::Arc::make_mut(&mut s.authorization_policies).push(policy("fine"));
    publisher.publish(s.clone(), false);
    assert_eq!(
        stats
            .failed_closed_policies
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    let mut broken = policy("broken");
    broken.unreadable = Some("spec.rules: invalid type".into());
    std::sync::Arc::make_mut(&mut s.authorization_policies).push(broken);
    publisher.publish(s, false);
    assert_eq!(
        stats
            .failed_closed_policies
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

/// The index `s` carries answers every lookup as one built from scratch.
fn assert_index_is_rebuilt(s: &Snapshot) {
    let rebuilt = Index::build(s);
    assert!(
        s.index().same_lookups(&rebuilt),
        "kept: {:#?}\nrebuilt: {rebuilt:#?}",
        s.index()
    );
}

#[test]
fn changes_through_an_edit_keep_the_index_as_a_rebuild_would_make_it() {
    let base = snap();
    base.index();
    let mut s = base.edit();
    // A second pod takes a's address while a is being deleted, then a goes.
    let mut a = (*s.workloads["shop/a"]).clone();
    a.deleting = true;
    s.put_workload(a);
    let mut a2 = (*s.workloads["shop/b"]).clone();
    a2.name = "a2".into();
    a2.ips = vec!["10.1.0.2".parse().unwrap()];
    s.put_workload(a2);
    assert_index_is_rebuilt(&s);
    assert_eq!(
        s.by_ip("10.1.0.2".parse().unwrap()).map(|w| w.key()),
        Some("shop/a2".to_string()),
        "the live claimant owns the address"
    );
    assert_eq!(s.addresses().conflicts().count(), 1);
    s.remove_workload("shop/a");
    assert_index_is_rebuilt(&s);
    assert_eq!(s.addresses().conflicts().count(), 0);
    // Two live pods on one address, undecided; one moves away.
    let mut c2 = (*s.workloads["billing/c"]).clone();
    c2.name = "c2".into();
    s.put_workload(c2.clone());
    assert!(s.by_ip("10.1.0.3".parse().unwrap()).is_none(), "ambiguous");
    c2.ips = vec!["10.1.0.9".parse().unwrap()];
    c2.node = "node9".into();
    s.put_workload(c2);
    assert_index_is_rebuilt(&s);
    assert_eq!(s.on_node("node9").count(), 1);
    assert_eq!(s.with_identity("billing", "web").count(), 2);
    // The winning Service of a shared VIP goes: the other takes the VIP.
    s.remove_service("shop/web");
    assert_index_is_rebuilt(&s);
    assert_eq!(
        s.vip("10.96.0.10".parse().unwrap()).map(|v| v.name),
        Some("zoo/web-copy")
    );
    let mut db = (*s.services["billing/db"]).clone();
    db.vips = vec!["10.96.0.21".parse().unwrap()];
    s.put_service(db);
    assert_index_is_rebuilt(&s);
    assert!(s.vip("10.96.0.20".parse().unwrap()).is_none());
    // The snapshot the edit started from is untouched.
    assert_index_is_rebuilt(&base);
    assert_eq!(base.workloads.len(), 3);
    assert!(base.vip("10.96.0.20".parse().unwrap()).is_some());
}

#[test]
fn a_plain_clone_rebuilds_its_index_so_direct_field_changes_are_seen() {
    let s = snap();
    s.index();
    let mut c = s.clone();
    c.workloads.remove("shop/a");
    assert!(c.by_ip("10.1.0.2".parse().unwrap()).is_none());
    assert!(s.by_ip("10.1.0.2".parse().unwrap()).is_some());
}
