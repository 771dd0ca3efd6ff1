use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::{parse, parse_file, watch_with_cni, CniReports, ReloadStats, WatchSettings};
use crate::cni::plugin::tests::TempDir;
use crate::cni::pods::PodMap;
use crate::cni::{CniCommand, CniEvent, PodRef};
use crate::inventory::guard::GuardSettings;
use crate::inventory::Snapshot;

const GOOD: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels:
    ambit.io/mode: enabled
---
apiVersion: v1
kind: Pod
metadata:
  name: client
  namespace: shop
  annotations:
    ambit.io/netns: /run/netns/client
    traffic.sidecar.istio.io/excludeOutboundPorts: "22, 2379"
    traffic.sidecar.istio.io/excludeOutboundIPRanges: "10.96.0.0/12,fd00::1"
spec:
  nodeName: node1
  serviceAccountName: client
status:
  podIP: 10.0.1.2
  podIPs:
  - ip: 10.0.1.2
  - ip: fd00:1::2
---
apiVersion: v1
kind: Pod
metadata:
  name: opted-out
  namespace: shop
  labels:
    ambit.io/mode: disabled
spec:
  nodeName: node1
---
apiVersion: v1
kind: Pod
metadata:
  name: plain
spec:
  nodeName: node2
"#;

#[test]
fn parses_pods_namespaces_and_enrollment() {
    let snap = parse(Path::new("inv.yaml"), GOOD).unwrap();
    let client = &snap.workloads["shop/client"];
    assert!(client.enrolled, "namespace label enrolls");
    assert_eq!(client.ips.len(), 2, "podIP duplicates podIPs[0]");
    assert_eq!(client.skip_ports, vec![22, 2379]);
    assert_eq!(client.skip_cidrs.len(), 2);
    assert_eq!(
        client.spiffe_id("cluster.local"),
        "spiffe://cluster.local/ns/shop/sa/client"
    );
    assert!(
        !snap.workloads["shop/opted-out"].enrolled,
        "pod label opts out"
    );
    let plain = &snap.workloads["default/plain"];
    assert!(!plain.enrolled);
    assert_eq!(plain.service_account, "default");
    assert_eq!(snap.on_node("node1").count(), 2);
}

#[test]
fn bad_ip_names_document_field_and_line() {
    let text = "kind: Pod\nmetadata:\n  name: a\n---\nkind: Pod\nmetadata:\n  name: b\nstatus:\n  podIPs:\n  - ip: 10.0.0.999\n";
    let err = parse(Path::new("inv.yaml"), text).unwrap_err().to_string();
    assert!(err.contains("inv.yaml"), "{err}");
    assert!(err.contains("document 2"), "{err}");
    assert!(err.contains("Pod b"), "{err}");
    assert!(err.contains("status.podIPs[0].ip"), "{err}");
}

#[test]
fn type_error_reports_absolute_line() {
    let text = "kind: Namespace\nmetadata:\n  name: x\n---\nkind: Pod\nmetadata:\n  name: b\n  labels: 7\n";
    let err = parse(Path::new("inv.yaml"), text).unwrap_err().to_string();
    assert!(err.contains("metadata.labels"), "{err}");
    assert!(err.contains("line 8"), "{err}");
}

#[test]
fn broken_yaml_is_an_error_not_a_panic() {
    for text in [
        "kind: Pod\nmetadata: [",
        "- - -\n  :",
        "kind: [1,2]\n",
        "kind: Pod\n",
    ] {
        assert!(parse(Path::new("x"), text).is_err(), "{text:?}");
    }
}

#[test]
fn yaml_errors_name_document_object_field_value_and_file_line_once() {
    let head = "kind: Namespace\nmetadata:\n  name: shop\n---\n";
    let pa = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: default\n  namespace: shop\nspec:\n  mtls:\n    mode: SRTICT\n";
    let err = parse(Path::new("inv.yaml"), &format!("{head}{pa}"))
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "inventory inv.yaml: document 2 (PeerAuthentication default): field `spec.mtls.mode`: \
         unknown variant `SRTICT`, expected one of UNSET, PERMISSIVE, STRICT, DISABLE (line 12)"
    );
    let pod = "kind: Pod\nmetadata:\n  name: b\nspec:\n  hostNetwork: yes\n";
    let err = parse(Path::new("inv.yaml"), &format!("{head}{pod}"))
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "inventory inv.yaml: document 2 (Pod b): field `spec.hostNetwork`: \
         invalid boolean (true or false expected): found `yes` (line 9)"
    );
}

#[test]
fn duplicate_keys_are_refused_not_resolved() {
    // Which `ambit.io/mode` would win is not for the parser to guess: the file is refused.
    let text = "kind: Pod\nmetadata:\n  name: a\n  labels:\n    ambit.io/mode: enabled\n    ambit.io/mode: disabled\n";
    let err = parse(Path::new("inv.yaml"), text).unwrap_err().to_string();
    assert!(
        err.contains("duplicate mapping key `ambit.io/mode`"),
        "{err}"
    );
    assert!(err.ends_with("(line 6)"), "{err}");
    let one = text.replace("    ambit.io/mode: disabled\n", "");
    assert!(parse(Path::new("inv.yaml"), &one).unwrap().workloads["default/a"].enrolled);
}

#[test]
fn hostile_nesting_is_refused_in_bounded_time() {
    // 256 KB of unclosed flow mappings: a libyaml-based parser (serde_yaml) scans it in time
    // quadratic in its length (12 s for half of it in a debug build, 23 s for all of it in a
    // release build); the limits here stop it at depth, in milliseconds.
    let text = format!(
        "kind: Pod\nmetadata:\n  name: a\n  labels: {}",
        "{a: ".repeat(64_000)
    );
    let start = Instant::now();
    let err = parse(Path::new("inv.yaml"), &text).unwrap_err().to_string();
    let took = start.elapsed();
    assert!(
        err.contains("document 1") && err.contains("(line 4)"),
        "{err}"
    );
    assert!(took < Duration::from_secs(10), "took {took:?}");
}

#[test]
fn bad_skip_annotations_are_rejected() {
    let text = "kind: Pod\nmetadata:\n  name: a\n  annotations:\n    traffic.sidecar.istio.io/excludeOutboundPorts: \"http\"\n";
    let err = parse(Path::new("x"), text).unwrap_err().to_string();
    assert!(err.contains("excludeOutboundPorts"), "{err}");
}

#[test]
fn parses_peer_authentication_and_rejects_bad_ones() {
    let text = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: strict\n  namespace: shop\nspec:\n  mtls:\n    mode: STRICT\n";
    let snap = parse(Path::new("x"), text).unwrap();
    assert_eq!(snap.peer_authentications.len(), 1);
    let bad_mode = text.replace("STRICT", "SRTICT");
    let err = parse(Path::new("x"), &bad_mode).unwrap_err().to_string();
    assert!(
        err.contains("PeerAuthentication strict") && err.contains("spec.mtls.mode"),
        "{err}"
    );
    let bad_api = text.replace("security.istio.io/v1", "security.istio.io/v2");
    assert!(parse(Path::new("x"), &bad_api)
        .unwrap_err()
        .to_string()
        .contains("apiVersion"));
    let no_selector = "apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata:\n  name: p\nspec:\n  portLevelMtls:\n    80:\n      mode: STRICT\n";
    assert!(parse(Path::new("x"), no_selector)
        .unwrap_err()
        .to_string()
        .contains("selector"));
}

/// Pods for the CNI merge: local without annotation (with UID), local annotated, remote, and a
/// local pod whose UID differs from the one the plugin reported (an earlier pod of that name).
const CNI_INVENTORY: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels:
    ambit.io/mode: enabled
---
apiVersion: v1
kind: Pod
metadata:
  name: web
  namespace: shop
  uid: u-web
spec:
  nodeName: node1
---
apiVersion: v1
kind: Pod
metadata:
  name: annotated
  namespace: shop
  annotations:
    ambit.io/netns: /run/netns/annotated
spec:
  nodeName: node1
---
apiVersion: v1
kind: Pod
metadata:
  name: remote
  namespace: shop
spec:
  nodeName: node2
---
apiVersion: v1
kind: Pod
metadata:
  name: recreated
  namespace: shop
  uid: u-new
spec:
  nodeName: node1
"#;

fn cni_event(command: CniCommand, name: &str, uid: &str, netns: &str) -> CniEvent {
    CniEvent {
        command,
        container_id: format!("sandbox-{name}"),
        netns: Some(netns.into()),
        ifname: "eth0".into(),
        pod: PodRef {
            namespace: "shop".into(),
            name: name.into(),
            uid: uid.into(),
        },
        ips: vec!["10.1.0.200".parse().unwrap()],
        netns_id: None,
    }
}

fn netns_of(snap: &Snapshot, pod: &str) -> Option<PathBuf> {
    snap.workloads[&format!("shop/{pod}")].netns.clone()
}

#[test]
fn cni_reports_give_unannotated_local_pods_their_netns() {
    let dir = TempDir::new("file-cni");
    let map = PodMap::load(&dir.0.join("pods.json")).unwrap();
    for (name, uid) in [
        ("web", "u-web"),
        ("annotated", ""),
        ("remote", ""),
        ("recreated", "u-old"),
    ] {
        let ev = cni_event(
            CniCommand::Add,
            name,
            uid,
            &format!("/run/netns/cni-{name}"),
        );
        assert!(map.apply(&ev).unwrap());
    }
    let parsed = parse_file(Path::new("i.yaml"), CNI_INVENTORY).unwrap();
    assert_eq!(parsed.uids["shop/web"], "u-web");
    assert_eq!(netns_of(&parsed.merged(None), "web"), None);
    let reports = CniReports {
        node: "node1".into(),
        pods: map.subscribe(),
    };
    let snap = parsed.merged(Some(&reports));
    let web = &snap.workloads["shop/web"];
    assert_eq!(web.netns.as_deref(), Some(Path::new("/run/netns/cni-web")));
    assert_eq!(web.ips, ["10.1.0.200".parse::<IpAddr>().unwrap()]);
    assert_eq!(
        netns_of(&snap, "annotated").as_deref(),
        Some(Path::new("/run/netns/annotated")),
        "the annotation wins"
    );
    assert_eq!(netns_of(&snap, "remote"), None, "another node's pod");
    assert_eq!(
        netns_of(&snap, "recreated"),
        None,
        "a report of another UID"
    );
}

#[tokio::test]
async fn the_watcher_republishes_when_the_pod_map_changes() {
    let dir = TempDir::new("file-cni-watch");
    let path = dir.0.join("inventory.yaml");
    std::fs::write(&path, CNI_INVENTORY).unwrap();
    let map = PodMap::load(&dir.0.join("pods.json")).unwrap();
    let (tx, mut rx) = watch::channel(Arc::new(Snapshot::default()));
    let reports = CniReports {
        node: "node1".into(),
        pods: map.subscribe(),
    };
    // A poll interval of an hour: after the first load only the pod map can cause a publish.
    let settings = WatchSettings {
        interval: Duration::from_secs(3600),
        guard: GuardSettings::new(Some("node1".into())),
    };
    let task = tokio::spawn(watch_with_cni(
        path,
        settings,
        tx,
        Arc::new(ReloadStats::default()),
        Some(reports),
    ));
    let wait = |rx: &mut watch::Receiver<Arc<Snapshot>>, want: Option<&'static str>| {
        let mut rx = rx.clone();
        async move {
            let f = rx.wait_for(|s| {
                s.workloads.contains_key("shop/web")
                    && netns_of(s, "web").as_deref() == want.map(Path::new)
            });
            tokio::time::timeout(Duration::from_secs(5), f)
                .await
                .expect("snapshot not published in time")
                .map(drop)
                .unwrap();
        }
    };
    wait(&mut rx, None).await;
    let add = cni_event(CniCommand::Add, "web", "u-web", "/run/netns/cni-web");
    map.apply(&add).unwrap();
    wait(&mut rx, Some("/run/netns/cni-web")).await;
    let del = CniEvent {
        command: CniCommand::Del,
        ..add
    };
    map.apply(&del).unwrap();
    wait(&mut rx, None).await;
    task.abort();
}
