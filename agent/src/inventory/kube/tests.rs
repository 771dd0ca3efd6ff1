//! Tests of the Kubernetes source: conversion of `kubectl -o yaml` objects, and the reflectors
//! end to end against the MOCK API server in `fake_api.rs` (kube-rs's real client and watcher).
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::DynamicObject;
use serde_json::{json, Value};
use tokio::sync::watch;

use super::fake_api::FakeApi;
use super::{Builder, Objects, Options, Stats};
use crate::cni::pods::CniPod;
use crate::cni::PodRef;
use crate::inventory::Snapshot;
use crate::policy::authz::Action;
use crate::policy::destination_rule::TlsMode;
use crate::policy::peer_auth::{self, Effective};

const CLUSTER: &str = include_str!("fixtures/cluster.yaml");

/// Every document of a multi-document YAML text, as JSON values.
fn documents(text: &str) -> Vec<Value> {
    crate::yaml::from_multiple::<Value>(text)
        .unwrap()
        .into_iter()
        .filter(|v| !v.is_null())
        .collect()
}

#[derive(Default)]
struct Loaded {
    pods: Vec<Arc<Pod>>,
    namespaces: Vec<Arc<Namespace>>,
    services: Vec<Arc<Service>>,
    slices: Vec<Arc<EndpointSlice>>,
    pa: Vec<Arc<DynamicObject>>,
    ap: Vec<Arc<DynamicObject>>,
    dr: Vec<Arc<DynamicObject>>,
    nodes: Vec<Arc<Node>>,
}

fn load(docs: &[Value]) -> Loaded {
    let mut l = Loaded::default();
    for d in docs {
        let v = d.clone();
        match d["kind"].as_str().unwrap() {
            "Pod" => l.pods.push(Arc::new(serde_json::from_value(v).unwrap())),
            "Namespace" => l
                .namespaces
                .push(Arc::new(serde_json::from_value(v).unwrap())),
            "Service" => l
                .services
                .push(Arc::new(serde_json::from_value(v).unwrap())),
            "EndpointSlice" => l.slices.push(Arc::new(serde_json::from_value(v).unwrap())),
            "PeerAuthentication" => l.pa.push(Arc::new(serde_json::from_value(v).unwrap())),
            "AuthorizationPolicy" => l.ap.push(Arc::new(serde_json::from_value(v).unwrap())),
            "DestinationRule" => l.dr.push(Arc::new(serde_json::from_value(v).unwrap())),
            "Node" => l.nodes.push(Arc::new(serde_json::from_value(v).unwrap())),
            other => panic!("fixture has unexpected kind {other}"),
        }
    }
    l
}

fn build(b: &mut Builder, l: &Loaded, cni: &[CniPod]) -> Snapshot {
    b.build(&Objects {
        pods: &l.pods,
        namespaces: &l.namespaces,
        services: &l.services,
        endpoint_slices: &l.slices,
        peer_authentications: &l.pa,
        authorization_policies: &l.ap,
        destination_rules: &l.dr,
        nodes: &l.nodes,
        cni_pods: cni,
    })
}

fn cni_pod(ns: &str, name: &str, uid: &str, netns: &str, seq: u64) -> CniPod {
    CniPod {
        container_id: format!("sandbox-{name}-{seq}"),
        pod: PodRef {
            namespace: ns.into(),
            name: name.into(),
            uid: uid.into(),
        },
        netns: PathBuf::from(netns),
        ips: vec!["10.244.1.30".parse().unwrap()],
        netns_id: None,
        seq,
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn converts_kubectl_objects_into_the_snapshot() {
    let l = load(&documents(CLUSTER));
    let mut b = Builder::new("node1".into());
    let snap = build(&mut b, &l, &[]);
    assert!(b.problems().is_empty(), "{:?}", b.problems());

    let client = &snap.workloads["shop/client"];
    assert!(client.enrolled, "namespace label enrolls");
    assert_eq!(client.ips, [ip("10.244.1.7"), ip("fd00:10:244:1::7")]);
    assert_eq!(client.service_account, "client");
    assert_eq!(client.node, "node1");
    assert_eq!(client.skip_ports, [2379]);
    assert_eq!(client.netns, None, "no CNI report yet");
    assert!(snap.workloads["shop/server-7c9d8f6b5-x2k4q"].enrolled);
    assert!(
        !snap.workloads["shop/opted-out"].enrolled,
        "pod label opts out"
    );
    let web = &snap.workloads["legacy/web"];
    assert!(web.enrolled, "pod label enrolls in an unlabelled namespace");
    assert!(web.ips.is_empty(), "pending pod has no IPs yet");
    assert_eq!(
        web.netns, None,
        "netns annotations are ignored in Kubernetes mode"
    );
    assert!(
        !snap.workloads.contains_key("legacy/batch-done"),
        "finished pods are dropped"
    );
    assert_eq!(snap.by_ip(ip("10.244.1.7")).unwrap().name, "client");
    assert_eq!(snap.namespaces["shop"]["ambit.io/mode"], "enabled");

    let svc = &snap.services["shop/server"];
    assert_eq!(svc.vips, [ip("10.96.120.15"), ip("fd00:10:96::7d2")]);
    assert_eq!(svc.ports[&80].target_port, None, "named target port");
    assert_eq!(svc.ports[&9000].target_port, Some(9000));
    assert_eq!(svc.endpoints.len(), 2);
    let ready = &svc.endpoints[0];
    assert!(ready.ready);
    assert_eq!(ready.ip, ip("10.244.2.5"));
    assert_eq!(
        svc.target_port(80, ready),
        Some(8080),
        "named port resolved by the slice"
    );
    assert!(!svc.endpoints[1].ready);
    assert!(snap.services["shop/headless"].vips.is_empty());
    assert_eq!(
        snap.service_by_vip(ip("fd00:10:96::7d2")).unwrap().name,
        "server"
    );

    assert_eq!(snap.peer_authentications.len(), 2);
    let labels = &snap.workloads["shop/server-7c9d8f6b5-x2k4q"].labels;
    let r = peer_auth::resolve(
        &snap.peer_authentications,
        "istio-system",
        "shop",
        labels,
        9090,
    );
    assert_eq!(r.mode, Effective::Permissive);
    let r = peer_auth::resolve(
        &snap.peer_authentications,
        "istio-system",
        "shop",
        labels,
        8080,
    );
    assert_eq!((r.mode, r.level), (Effective::Strict, "mesh"));
    let ap = &snap.authorization_policies[0];
    assert_eq!(ap.spec.action, Action::Allow);
    assert_eq!(
        ap.spec.rules[0].from[0].source.principals,
        ["cluster.local/ns/shop/sa/client"]
    );
    let dr = &snap.destination_rules[0];
    let tp = dr.spec.traffic_policy.as_ref().unwrap();
    assert_eq!(tp.tls.as_ref().unwrap().mode, TlsMode::IstioMutual);
    assert_eq!(
        tp.port_level_settings[0].tls.as_ref().unwrap().mode,
        TlsMode::Disable
    );
}

#[test]
fn cni_reports_give_local_pods_their_netns() {
    let l = load(&documents(CLUSTER));
    let mut b = Builder::new("node1".into());
    let cni = [
        cni_pod(
            "shop",
            "client",
            "8d1c5a6e-1111-2222-3333-444455556666",
            "/run/netns/old",
            1,
        ),
        cni_pod("shop", "client", "", "/run/netns/cni-client", 2),
        // The pending pod has no IPs in the API yet: the plugin's prevResult fills them in.
        cni_pod(
            "legacy",
            "web",
            "3c3c3c3c-1111-2222-3333-444455556666",
            "/run/netns/cni-web",
            3,
        ),
        // Same name, another pod (a recreated one): the UID does not match.
        cni_pod(
            "shop",
            "opted-out",
            "00000000-dead-beef-0000-000000000000",
            "/run/netns/x",
            4,
        ),
        // Reported here but scheduled elsewhere: never trusted.
        cni_pod("shop", "server-7c9d8f6b5-x2k4q", "", "/run/netns/y", 5),
    ];
    let snap = build(&mut b, &l, &cni);
    let client = &snap.workloads["shop/client"];
    assert_eq!(
        client.netns.as_deref(),
        Some("/run/netns/cni-client".as_ref())
    );
    assert_eq!(client.ips[0], ip("10.244.1.7"), "API IPs win when present");
    let web = &snap.workloads["legacy/web"];
    assert_eq!(web.netns.as_deref(), Some("/run/netns/cni-web".as_ref()));
    assert_eq!(web.ips, [ip("10.244.1.30")]);
    assert_eq!(snap.workloads["shop/opted-out"].netns, None);
    assert_eq!(snap.workloads["shop/server-7c9d8f6b5-x2k4q"].netns, None);
    let local: Vec<String> = snap
        .on_node("node1")
        .filter(|w| w.enrolled && w.netns.is_some())
        .map(|w| w.key())
        .collect();
    assert_eq!(local, ["legacy/web", "shop/client"]);
}

#[test]
fn bad_updates_keep_the_last_good_object_and_name_it() {
    let docs = documents(CLUSTER);
    let mut b = Builder::new("node1".into());
    let good = build(&mut b, &load(&docs), &[]);
    let mut bad = docs.clone();
    for d in &mut bad {
        match (
            d["kind"].as_str().unwrap(),
            d["metadata"]["name"].as_str().unwrap(),
        ) {
            ("Pod", "client") => d["status"]["podIPs"][1]["ip"] = json!("fd00::zz"),
            ("PeerAuthentication", "default") => d["spec"]["mtls"]["mode"] = json!("STRICTEST"),
            ("PeerAuthentication", "server-metrics") => {
                d["spec"].as_object_mut().unwrap().remove("selector");
            }
            ("Service", "server") => d["spec"]["ports"][0]["port"] = json!(70000),
            _ => {}
        }
    }
    let snap = build(&mut b, &load(&bad), &[]);
    assert_eq!(
        snap, good,
        "every rejected object keeps its last good version"
    );
    let problems: Vec<&String> = b.problems().iter().collect();
    assert_eq!(problems.len(), 4, "{problems:?}");
    let all = problems
        .iter()
        .map(|p| p.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        all.contains("Pod shop/client: field `status.podIPs[1].ip`"),
        "{all}"
    );
    assert!(
        all.contains("PeerAuthentication istio-system/default: field `spec.mtls.mode`"),
        "{all}"
    );
    assert!(
        all.contains("PeerAuthentication shop/server-metrics: field `spec.portLevelMtls`"),
        "{all}"
    );
    assert!(
        all.contains("Service shop/server: field `spec.ports[0].port`"),
        "{all}"
    );
    // A bad object never seen good is simply absent.
    let mut fresh = Builder::new("node1".into());
    let snap = build(&mut fresh, &load(&bad), &[]);
    assert!(!snap.workloads.contains_key("shop/client"));
    assert!(snap.workloads.contains_key("shop/opted-out"));
}

#[test]
fn pods_claiming_one_ip_are_a_conflict_the_address_index_decides() {
    let with_opted_out = |f: &dyn Fn(&mut Value)| {
        let mut docs = documents(CLUSTER);
        for d in &mut docs {
            if d["metadata"]["name"] == "opted-out" {
                d["status"]["podIPs"][0]["ip"] = json!("10.244.1.7");
                d["status"]["podIP"] = json!("10.244.1.7");
                f(d);
            }
        }
        let mut b = Builder::new("node1".into());
        let snap = build(&mut b, &load(&docs), &[]);
        assert!(
            b.problems().is_empty(),
            "not an object problem: {:?}",
            b.problems()
        );
        snap
    };
    // Both live, one without a creation time: undecided, no owner.
    let snap = with_opted_out(&|_| {});
    let c = snap.addresses().conflict(ip("10.244.1.7")).unwrap().clone();
    assert_eq!(c.claimants, ["shop/client", "shop/opted-out"]);
    assert_eq!(c.owner, None);
    assert!(snap.by_ip(ip("10.244.1.7")).is_none());
    // The rival is terminating (metadata.deletionTimestamp, as the API server sets it).
    let snap = with_opted_out(&|d| {
        d["metadata"]["deletionTimestamp"] = json!("2026-11-20T12:00:00Z");
    });
    assert!(snap.workloads["shop/opted-out"].deleting);
    assert_eq!(snap.by_ip(ip("10.244.1.7")).unwrap().name, "client");
    // The rival runs in the host's network namespace: never an owner, never enrolled.
    let snap = with_opted_out(&|d| {
        d["spec"]["hostNetwork"] = json!(true);
        d["metadata"]["labels"]["ambit.io/mode"] = json!("enabled");
    });
    assert!(!snap.workloads["shop/opted-out"].enrolled);
    assert!(snap.addresses().conflict(ip("10.244.1.7")).is_none());
    assert_eq!(snap.by_ip(ip("10.244.1.7")).unwrap().name, "client");
    // The rival is newer: the address was handed on.
    let snap = with_opted_out(&|d| {
        d["metadata"]["creationTimestamp"] = json!("2026-11-21T00:00:00Z");
    });
    assert_eq!(snap.by_ip(ip("10.244.1.7")).unwrap().name, "opted-out");
    // Node objects: the rival's node does not route the address (node1's range holds it).
    let mut docs = documents(CLUSTER);
    for d in &mut docs {
        if d["metadata"]["name"] == "server-7c9d8f6b5-x2k4q" {
            d["status"]["podIPs"][0]["ip"] = json!("10.244.1.7");
            d["metadata"]["creationTimestamp"] = json!("2026-11-22T00:00:00Z");
        }
    }
    docs.push(
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node1"},
        "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24", "fd00:10:244:1::/64"]},
        "status": {"capacity": {"pods": "110"}}}),
    );
    docs.push(
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node2"},
        "spec": {"podCIDRs": ["10.244.2.0/24"]}}),
    );
    let mut b = Builder::new("node1".into());
    let snap = build(&mut b, &load(&docs), &[]);
    assert_eq!(snap.nodes["node1"].len(), 2);
    assert_eq!(snap.by_ip(ip("10.244.1.7")).unwrap().name, "client");
}

struct Running {
    api: FakeApi,
    rx: watch::Receiver<Arc<Snapshot>>,
    ready: watch::Receiver<bool>,
    cni: watch::Sender<Arc<Vec<CniPod>>>,
    stats: Arc<Stats>,
}

async fn start(api: FakeApi) -> Running {
    start_with(api, Options::new("node1")).await
}

async fn start_with(api: FakeApi, mut opts: Options) -> Running {
    let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
    let (ready_tx, ready) = watch::channel(false);
    let (cni, cni_rx) = watch::channel(Arc::new(Vec::new()));
    let stats = Arc::new(Stats::default());
    opts.debounce = Duration::from_millis(10);
    tokio::spawn(super::watch(
        api.client(),
        opts,
        cni_rx,
        tx,
        ready_tx,
        stats.clone(),
    ));
    Running {
        api,
        rx,
        ready,
        cni,
        stats,
    }
}

/// Waits (bounded) until the published snapshot satisfies `f`.
async fn until(rx: &mut watch::Receiver<Arc<Snapshot>>, what: &str, f: impl Fn(&Snapshot) -> bool) {
    let r = tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|s| f(s))).await;
    assert!(matches!(r, Ok(Ok(_))), "timed out waiting for: {what}");
}

#[tokio::test]
async fn reflectors_follow_the_api_server() {
    let api = FakeApi::start().await;
    for d in documents(CLUSTER) {
        api.apply(d);
    }
    let mut r = start(api).await;
    tokio::time::timeout(Duration::from_secs(10), r.ready.wait_for(|v| *v))
        .await
        .expect("ready after the first full sync")
        .unwrap();
    let snap = r.rx.borrow().clone();
    assert_eq!(snap.workloads.len(), 4);
    assert_eq!(snap.services.len(), 2);
    assert_eq!(snap.peer_authentications.len(), 2);
    assert_eq!(snap.authorization_policies.len(), 1);
    assert_eq!(snap.destination_rules.len(), 1);

    // The CNI plugin reports the client's sandbox.
    r.cni.send_replace(Arc::new(vec![cni_pod(
        "shop",
        "client",
        "",
        "/run/netns/cni-1",
        1,
    )]));
    until(&mut r.rx, "netns merged", |s| {
        s.workloads["shop/client"].netns.is_some()
    })
    .await;

    // A label change on the namespace unenrolls its pods.
    let mut docs = documents(CLUSTER);
    let ns = docs
        .iter_mut()
        .find(|d| d["metadata"]["name"] == "shop")
        .unwrap();
    ns["metadata"]["labels"]["ambit.io/mode"] = json!("disabled");
    r.api.apply(ns.clone());
    until(&mut r.rx, "namespace unenrolled", |s| {
        !s.workloads["shop/client"].enrolled
    })
    .await;

    // New pods, deletions and policy changes arrive through the watch.
    let pod = docs
        .iter()
        .find(|d| d["metadata"]["name"] == "client")
        .unwrap()
        .clone();
    r.api.delete(pod);
    let mut extra = docs
        .iter()
        .find(|d| d["metadata"]["name"] == "web")
        .unwrap()
        .clone();
    extra["metadata"]["name"] = json!("web-2");
    extra["status"] = json!({"phase": "Running", "podIPs": [{"ip": "10.244.1.40"}]});
    r.api.apply(extra);
    until(&mut r.rx, "pod deleted and added", |s| {
        !s.workloads.contains_key("shop/client") && s.workloads.contains_key("legacy/web-2")
    })
    .await;
    let mut pa = docs
        .iter()
        .find(|d| d["metadata"]["name"] == "default")
        .unwrap()
        .clone();
    pa["spec"]["mtls"]["mode"] = json!("BOGUS");
    r.api.apply(pa);
    // The rejected update is counted, and the STRICT mesh policy stays.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while r.stats.rejected.load(Ordering::Relaxed) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "rejection not counted"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let snap = r.rx.borrow().clone();
    let mesh = snap
        .peer_authentications
        .iter()
        .find(|p| p.metadata.name == "default")
        .unwrap();
    assert_eq!(
        mesh.spec.mtls.as_ref().unwrap().mode,
        peer_auth::Mode::Strict
    );
    assert_eq!(
        r.api.list_requests("Pod"),
        1,
        "no re-list while the watch is healthy"
    );
}

#[tokio::test]
async fn missing_istio_crds_count_as_empty() {
    let api = FakeApi::start().await;
    for kind in [
        "PeerAuthentication",
        "AuthorizationPolicy",
        "DestinationRule",
    ] {
        api.set_missing(kind);
    }
    for d in documents(CLUSTER)
        .into_iter()
        .filter(|d| d["apiVersion"] == "v1")
    {
        api.apply(d);
    }
    let mut r = start(api).await;
    tokio::time::timeout(Duration::from_secs(10), r.ready.wait_for(|v| *v))
        .await
        .expect("ready without the Istio CRDs")
        .unwrap();
    let snap = r.rx.borrow_and_update().clone();
    assert_eq!(snap.workloads.len(), 4);
    assert!(snap.peer_authentications.is_empty());
    assert!(r.stats.watch_errors.load(Ordering::Relaxed) >= 3);
}

#[tokio::test]
async fn nodes_the_agent_may_not_list_count_as_absent_but_policies_do_not() {
    let api = FakeApi::start().await;
    api.set_forbidden("Node");
    for d in documents(CLUSTER) {
        api.apply(d);
    }
    let mut r = start(api).await;
    tokio::time::timeout(Duration::from_secs(10), r.ready.wait_for(|v| *v))
        .await
        .expect("ready without the right to list nodes")
        .unwrap();
    assert_eq!(r.rx.borrow_and_update().workloads.len(), 4);
    assert!(r.rx.borrow().nodes.is_empty());

    // Control: a policy kind the agent may not list keeps it from becoming ready (treating it
    // as empty would drop STRICT).
    let api = FakeApi::start().await;
    api.set_forbidden("PeerAuthentication");
    for d in documents(CLUSTER) {
        api.apply(d);
    }
    let r = start(api).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!*r.ready.borrow(), "a forbidden policy kind is not empty");
}

#[tokio::test]
async fn readiness_waits_for_a_failing_list_to_succeed() {
    let api = FakeApi::start().await;
    for d in documents(CLUSTER) {
        api.apply(d);
    }
    api.fail_lists("Pod", 2);
    let mut r = start(api).await;
    // While pods cannot be listed nothing is published and the agent is not ready.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!*r.ready.borrow());
    assert!(r.rx.borrow().workloads.is_empty());
    tokio::time::timeout(Duration::from_secs(20), r.ready.wait_for(|v| *v))
        .await
        .expect("ready once the list succeeds (backoff retries)")
        .unwrap();
    assert_eq!(r.api.list_requests("Pod"), 3);
    assert!(r.stats.watch_errors.load(Ordering::Relaxed) >= 2);
    until(&mut r.rx, "all pods", |s| s.workloads.len() == 4).await;
}

mod istio_labels;
mod relist;
mod unreadable;
