//! The istiod source end to end in-process: the fake istiod over TLS, the real xDS client, the mesh model and the publishing loop.
use std::net::IpAddr;
use std::path::PathBuf;

use ambit_proto::istio::security as sec;
use ambit_proto::istio::workload as wl;
use prost::Message;

use super::*;
use crate::inventory::istiod::fake_istiod::{FakeIstiod, SERVER_NAME};
use crate::inventory::istiod::node::NodeInfo;
use crate::inventory::istiod::status::{StatusHandle, XdsMetrics};
use crate::inventory::istiod::stream::{Backoff, XdsClient, XdsClientConfig};
use crate::policy::authz::{ConnAttrs, Decision, Mesh as AuthzMesh};

const WAIT: Duration = Duration::from_secs(10);
const TD: &str = "cluster.local";
const ROOT: &str = "istio-system";

struct Running {
    fake: FakeIstiod,
    rx: watch::Receiver<Arc<Snapshot>>,
    ready: watch::Receiver<bool>,
    dir: PathBuf,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn start(fake: FakeIstiod) -> Running {
    let dir = std::env::temp_dir().join(format!(
        "ambit-xds-source-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("root.pem"), fake.root_pem()).unwrap();
    std::fs::write(dir.join("token"), "token\n").unwrap();
    let cfg = XdsClientConfig {
        address: format!("127.0.0.1:{}", fake.addr().port()),
        root_cert: dir.join("root.pem"),
        token_file: dir.join("token"),
        server_name: Some(SERVER_NAME.to_owned()),
        cluster_id: None,
        node: NodeInfo {
            node_name: "node1".into(),
            ..NodeInfo::default()
        },
        connect_timeout: Duration::from_secs(5),
        backoff: Backoff {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(200),
        },
    };
    let sink = MeshSink::new(Mesh::new(TD, ROOT));
    let status = StatusHandle::new(&cfg.address, XdsMetrics::default());
    let client = XdsClient::new(cfg, sink.clone(), status).unwrap();
    let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
    let (ready_tx, ready) = watch::channel(false);
    let opts = Options {
        node: "node1".into(),
        debounce: Duration::from_millis(5),
        guard: GuardSettings::new(Some("node1".into())),
        reloads: Arc::default(),
    };
    let tasks = vec![
        tokio::spawn(client.run()),
        tokio::spawn(publish(sink, opts, None, tx, ready_tx)),
    ];
    Running {
        fake,
        rx,
        ready,
        dir,
        tasks,
    }
}

fn workload(uid: &str, name: &str, ip: [u8; 4]) -> Vec<u8> {
    let w = wl::Workload {
        uid: uid.into(),
        name: name.into(),
        namespace: "default".into(),
        addresses: vec![ip.to_vec()],
        tunnel_protocol: wl::TunnelProtocol::Hbone.into(),
        service_account: format!("{name}-sa"),
        node: "node2".into(),
        ..wl::Workload::default()
    };
    wl::Address {
        r#type: Some(wl::address::Type::Workload(w)),
    }
    .encode_to_vec()
}

fn deny_from(sa: &str) -> Vec<u8> {
    sec::Authorization {
        name: "deny".into(),
        namespace: "default".into(),
        scope: sec::Scope::Namespace.into(),
        action: sec::Action::Deny.into(),
        rules: vec![sec::Rule {
            clauses: vec![sec::Clause {
                matches: vec![sec::Match {
                    principals: vec![sec::StringMatch {
                        match_type: Some(sec::string_match::MatchType::Exact(format!(
                            "{TD}/ns/default/sa/{sa}"
                        ))),
                    }],
                    ..sec::Match::default()
                }],
            }],
        }],
        ..sec::Authorization::default()
    }
    .encode_to_vec()
}

/// Waits until the published snapshot satisfies `cond`.
async fn until_published(r: &mut Running, what: &str, cond: impl Fn(&Snapshot) -> bool) {
    let waited = tokio::time::timeout(WAIT, r.rx.wait_for(|s| cond(s)))
        .await
        .is_ok_and(|r| r.is_ok());
    assert!(
        waited,
        "timed out waiting for {what}: {:#?}",
        r.rx.borrow().workloads.keys().collect::<Vec<_>>()
    );
}

fn decide(snap: &Snapshot, key: &str, sa: &str) -> Decision {
    let w = &snap.workloads[key];
    let conn = ConnAttrs {
        peer: Some(format!("spiffe://{TD}/ns/default/sa/{sa}").parse().unwrap()),
        src_ip: IpAddr::from([10, 9, 0, 9]),
        dst_port: 80,
        dst_ip: IpAddr::from([10, 1, 0, 2]),
    };
    snap.index()
        .authz()
        .evaluate(&AuthzMesh::new(ROOT, TD), &w.namespace, &w.labels, &conn)
}

#[tokio::test]
async fn istiod_resources_become_the_published_inventory_and_follow_pushes_nacks_and_restarts() {
    let fake = FakeIstiod::start().await;
    fake.push(
        ADDRESS_TYPE,
        &[("uid-a", workload("uid-a", "a", [10, 1, 0, 2]))],
        &[],
    );
    fake.hold();
    let mut r = start(fake).await;
    // Nothing is published before both types' first push.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!*r.ready.borrow(), "ready before the first push");
    r.fake.release();
    tokio::time::timeout(WAIT, r.ready.wait_for(|r| *r))
        .await
        .unwrap()
        .unwrap();
    until_published(&mut r, "workload a", |s| {
        s.workloads
            .get("default/a")
            .is_some_and(|w| w.enrolled && w.ips == [IpAddr::from([10, 1, 0, 2])])
    })
    .await;
    assert!(matches!(
        decide(&r.rx.borrow(), "default/a", "b-sa"),
        Decision::Allow { .. }
    ));

    // A DENY pushed later takes effect in the next snapshot.
    r.fake.push(
        AUTHORIZATION_TYPE,
        &[("default/deny", deny_from("b-sa"))],
        &[],
    );
    until_published(&mut r, "the DENY", |s| !s.authorization_policies.is_empty()).await;
    assert!(matches!(
        decide(&r.rx.borrow(), "default/a", "b-sa"),
        Decision::Denied { .. }
    ));
    assert!(matches!(
        decide(&r.rx.borrow(), "default/a", "c-sa"),
        Decision::Allow { .. }
    ));

    // A malformed workload is NACKed; the good one of the same push applies, the old stays.
    r.fake.push(
        ADDRESS_TYPE,
        &[
            ("uid-bad", b"\xff\xff garbage".to_vec()),
            ("uid-b", workload("uid-b", "b", [10, 1, 0, 3])),
        ],
        &[],
    );
    until_published(&mut r, "workload b", |s| {
        s.workloads.contains_key("default/b")
    })
    .await;
    let nack = r
        .fake
        .wait_for(WAIT, |q| q.iter().any(|q| q.is_nack()))
        .await;
    let text = nack.iter().find_map(|q| q.error.clone()).unwrap();
    assert!(text.contains("uid-bad"), "{text}");
    assert!(r.rx.borrow().workloads.contains_key("default/a"));

    // istiod restarts and has lost workload b: the inventory stays as it was until the new
    // stream's first push, then b goes.
    r.fake.hold();
    r.fake.drop_streams();
    r.fake.push(ADDRESS_TYPE, &[], &["uid-b"]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(r.rx.borrow().workloads.contains_key("default/b"));
    r.fake.release();
    until_published(&mut r, "b removed after the resync", |s| {
        !s.workloads.contains_key("default/b") && s.workloads.contains_key("default/a")
    })
    .await;
}
