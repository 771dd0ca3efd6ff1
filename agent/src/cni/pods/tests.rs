//! Tests of the persisted pod map, its resync, and the standard handler.
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::{Error, PodMap};
use crate::cni::handler::{handler, Confirm};
use crate::cni::plugin::tests::TempDir;
use crate::cni::{CniCommand, CniEvent, CniReply, NetnsId, PodRef};
use crate::inventory::enrollment::Enrollment;
use crate::inventory::sandboxes::{newest_by_pod, pod_views};
use crate::inventory::{Snapshot, Workload};

fn event(command: CniCommand, container: &str, name: &str, netns: &Path) -> CniEvent {
    let md = std::fs::metadata(netns).ok();
    CniEvent {
        command,
        container_id: container.into(),
        netns: Some(netns.to_path_buf()),
        ifname: "eth0".into(),
        pod: PodRef {
            namespace: "shop".into(),
            name: name.into(),
            uid: format!("uid-{name}"),
        },
        ips: vec!["10.244.1.7".parse().unwrap()],
        netns_id: md.map(|m| NetnsId {
            dev: m.dev(),
            ino: m.ino(),
        }),
    }
}

fn netns_file(dir: &TempDir, name: &str) -> PathBuf {
    // Any file stands in for a netns bind mount: the map only checks it still exists as recorded.
    let p = dir.0.join(name);
    std::fs::write(&p, b"").unwrap();
    p
}

#[test]
fn add_and_del_persist_across_reload() {
    let dir = TempDir::new("pods");
    let path = dir.0.join("state/cni-pods.json");
    let ns = netns_file(&dir, "cni-1");
    let map = PodMap::load(&path).unwrap();
    assert!(map.pods().is_empty(), "missing file is an empty map");
    assert!(map
        .apply(&event(CniCommand::Add, "c1", "client", &ns))
        .unwrap());
    assert!(
        !map.apply(&event(CniCommand::Add, "c1", "client", &ns))
            .unwrap(),
        "repeat ADD is a no-op"
    );
    let reloaded = PodMap::load(&path).unwrap();
    assert_eq!(reloaded.pods(), map.pods());
    assert_eq!(reloaded.pods()[0].pod.key(), "shop/client");
    assert!(map
        .apply(&event(CniCommand::Del, "c1", "client", &ns))
        .unwrap());
    assert!(
        !map.apply(&event(CniCommand::Del, "c1", "client", &ns))
            .unwrap(),
        "DEL is idempotent"
    );
    assert!(PodMap::load(&path).unwrap().pods().is_empty());
}

#[test]
fn check_never_creates_entries() {
    let dir = TempDir::new("pods");
    let ns = netns_file(&dir, "cni-1");
    let map = PodMap::load(&dir.0.join("m.json")).unwrap();
    assert!(!map
        .apply(&event(CniCommand::Check, "c1", "client", &ns))
        .unwrap());
    assert!(map.pods().is_empty());
}

#[test]
fn resync_drops_pods_whose_netns_is_gone_or_replaced() {
    let dir = TempDir::new("pods");
    let path = dir.0.join("m.json");
    let (a, b, c) = (
        netns_file(&dir, "a"),
        netns_file(&dir, "b"),
        netns_file(&dir, "c"),
    );
    let map = PodMap::load(&path).unwrap();
    map.apply(&event(CniCommand::Add, "c1", "alive", &a))
        .unwrap();
    map.apply(&event(CniCommand::Add, "c2", "gone", &b))
        .unwrap();
    // Recorded with another identity than the file now at that path: a namespace the
    // runtime made after ours was destroyed.
    let mut replaced = event(CniCommand::Add, "c3", "replaced", &c);
    replaced.netns_id = replaced.netns_id.map(|id| NetnsId {
        dev: id.dev,
        ino: id.ino + 1,
    });
    map.apply(&replaced).unwrap();
    drop(map);
    std::fs::remove_file(&b).unwrap();
    let map = PodMap::load(&path).unwrap();
    let r = map.resync().unwrap();
    assert_eq!(r.kept, 1);
    assert!(r.removed.iter().any(|s| s == "shop/gone (c2)"), "{r:?}");
    assert!(r.removed.iter().any(|s| s == "shop/replaced (c3)"), "{r:?}");
    let reloaded = PodMap::load(&path).unwrap();
    let pods = reloaded.pods();
    let names: Vec<&str> = pods.iter().map(|p| p.pod.name.as_str()).collect();
    assert_eq!(names, ["alive"]);
}

#[test]
fn newest_sandbox_wins() {
    let dir = TempDir::new("pods");
    let (a, b) = (netns_file(&dir, "a"), netns_file(&dir, "b"));
    let map = PodMap::load(&dir.0.join("m.json")).unwrap();
    map.apply(&event(CniCommand::Add, "old", "client", &a))
        .unwrap();
    map.apply(&event(CniCommand::Add, "new", "client", &b))
        .unwrap();
    let pods = map.pods();
    let newest = newest_by_pod(&pods);
    assert_eq!(newest["shop/client"].container_id, "new");
    map.apply(&event(CniCommand::Del, "old", "client", &a))
        .unwrap();
    assert_eq!(newest_by_pod(&map.pods())["shop/client"].netns, b);
}

#[test]
fn corrupt_map_is_an_error_naming_the_file() {
    let dir = TempDir::new("pods");
    let path = dir.0.join("m.json");
    std::fs::write(&path, b"{not json").unwrap();
    let err = PodMap::load(&path).err().unwrap();
    assert!(matches!(err, Error::Parse { .. }));
    assert!(err.to_string().contains("m.json"), "{err}");
    std::fs::write(&path, br#"{"version": 9, "pods": []}"#).unwrap();
    assert!(matches!(
        PodMap::load(&path),
        Err(Error::Version { found: 9, .. })
    ));
}

fn workload(name: &str, enrolled: bool, netns: Option<&Path>) -> Workload {
    Workload {
        name: name.into(),
        namespace: "shop".into(),
        service_account: "default".into(),
        node: "node1".into(),
        ips: Vec::new(),
        labels: Default::default(),
        enrolled,
        enrollment: Enrollment::by_mode_label(enrolled),
        netns: netns.map(Path::to_path_buf),
        cgroup: None,
        skip_ports: Vec::new(),
        skip_cidrs: Vec::new(),
        host_network: false,
        deleting: false,
        created: None,
    }
}

fn snapshot(ws: Vec<Workload>) -> Arc<Snapshot> {
    let mut s = Snapshot::default();
    for w in ws {
        s.workloads.insert(w.key(), w.into());
    }
    Arc::new(s)
}

#[test]
fn handler_answers_from_inventory_and_confirmation() {
    let dir = TempDir::new("pods");
    let ns = netns_file(&dir, "cni-1");
    let map = Arc::new(PodMap::load(&dir.0.join("m.json")).unwrap());
    let (tx, rx) = watch::channel(snapshot(vec![workload("outside", false, None)]));
    let wait = Duration::from_millis(300);
    let h = handler(map.clone(), pod_views(rx.clone()), None, wait);
    assert_eq!(
        h(event(CniCommand::Add, "c0", "outside", &ns)),
        CniReply::NotInMesh
    );
    // Unknown pod: fails after the wait, naming the pod; but the map still records it.
    let reply = h(event(CniCommand::Add, "c1", "client", &ns));
    assert!(
        matches!(&reply, CniReply::Failed { message } if message.contains("shop/client")),
        "{reply:?}"
    );
    assert!(map.pods().iter().any(|p| p.container_id == "c1"));
    // The inventory takes the netns while the handler waits.
    let updater = std::thread::spawn({
        let ns = ns.clone();
        move || {
            std::thread::sleep(Duration::from_millis(50));
            tx.send_replace(snapshot(vec![workload("client", true, Some(&ns))]));
            tx
        }
    });
    let confirmed = Arc::new(AtomicBool::new(false));
    let c = confirmed.clone();
    let confirm: Confirm = Arc::new(move |key: &str| {
        assert_eq!(key, "shop/client");
        c.swap(true, Ordering::Relaxed).then_some(Ok(()))
    });
    let h = handler(
        map.clone(),
        pod_views(rx),
        Some(confirm),
        Duration::from_secs(5),
    );
    assert_eq!(
        h(event(CniCommand::Add, "c1", "client", &ns)),
        CniReply::Enrolled
    );
    let _tx = updater.join().unwrap();
    assert_eq!(
        h(event(CniCommand::Del, "c1", "client", &ns)),
        CniReply::NotInMesh
    );
    assert!(!map.pods().iter().any(|p| p.container_id == "c1"));
}
