//! Loopback: the client against the fake istiod over TLS + gRPC on 127.0.0.1.
use std::path::Path;
use std::time::Duration;

use super::*;
use crate::inventory::istiod::fake_istiod::{FakeIstiod, Recorded, SERVER_NAME};
use crate::inventory::istiod::memory_sink::MemorySink;
use crate::inventory::istiod::status::{StreamState, XdsMetrics};

const WAIT: Duration = Duration::from_secs(10);

struct Running {
    fake: FakeIstiod,
    sink: MemorySink,
    status: StatusHandle,
    dir: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn temp_dir() -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "ambit-xds-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn config(fake: &FakeIstiod, dir: &Path) -> XdsClientConfig {
    std::fs::write(dir.join("root.pem"), fake.root_pem()).unwrap();
    std::fs::write(dir.join("token"), "token-1\n").unwrap();
    XdsClientConfig {
        address: format!("127.0.0.1:{}", fake.addr().port()),
        root_cert: dir.join("root.pem"),
        token_file: dir.join("token"),
        server_name: Some(SERVER_NAME.to_owned()),
        cluster_id: Some("cluster-1".to_owned()),
        node: NodeInfo {
            ip: "10.0.0.9".into(),
            pod_name: "ambit-abc".into(),
            namespace: "ambit-system".into(),
            node_name: "node1".into(),
            ..NodeInfo::default()
        },
        connect_timeout: Duration::from_secs(5),
        backoff: Backoff {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(400),
        },
    }
}

async fn start_with(fake: FakeIstiod, edit: impl FnOnce(&mut XdsClientConfig)) -> Running {
    let dir = temp_dir();
    let mut cfg = config(&fake, &dir);
    edit(&mut cfg);
    let sink = MemorySink::default();
    let status = StatusHandle::new(&cfg.address, XdsMetrics::default());
    let client = XdsClient::new(cfg, sink.clone(), status.clone()).unwrap();
    let task = tokio::spawn(client.run());
    Running {
        fake,
        sink,
        status,
        dir,
        task,
    }
}

fn acks_on(stream: u64, type_url: &'static str) -> impl Fn(&[Recorded]) -> bool {
    move |r| {
        r.iter()
            .any(|r| r.stream == stream && r.type_url == type_url && r.is_ack())
    }
}

/// Waits for `cond` on the sink or status, polling.
async fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn subscribes_with_token_and_node_applies_the_first_push_and_acks_it() {
    let fake = FakeIstiod::start().await;
    fake.push(
        ADDRESS_TYPE,
        &[("w1", b"one".to_vec()), ("w2", b"two".to_vec())],
        &[],
    );
    let r = start_with(fake, |_| {}).await;
    let requests = r
        .fake
        .wait_for(WAIT, |q| {
            acks_on(1, ADDRESS_TYPE)(q) && acks_on(1, AUTHORIZATION_TYPE)(q)
        })
        .await;
    let subs: Vec<&Recorded> = requests
        .iter()
        .filter(|q| q.response_nonce.is_empty())
        .collect();
    assert_eq!(subs.len(), 2, "{requests:#?}");
    for sub in &subs {
        assert_eq!(sub.authorization.as_deref(), Some("Bearer token-1"));
        assert_eq!(sub.cluster_id.as_deref(), Some("cluster-1"));
        assert_eq!(
            sub.node_id.as_deref(),
            Some("ztunnel~10.0.0.9~ambit-abc.ambit-system~ambit-system.svc.cluster.local")
        );
        assert!(sub.subscribe.is_empty() && sub.initial_resource_versions.is_empty());
    }
    assert!(
        requests
            .iter()
            .any(|q| q.type_url == ADDRESS_TYPE && q.is_ack()),
        "{requests:#?}"
    );
    assert_eq!(r.sink.get(ADDRESS_TYPE, "w2").as_deref(), Some(&b"two"[..]));
    assert_eq!(r.sink.snapshot().synced.len(), 2);
    let s = r.status.snapshot();
    assert_eq!(s.state, StreamState::Connected);
    assert_eq!((s.pushes, s.acks, s.nacks, s.reconnects), (2, 2, 0, 0));
    let a = &s.types[ADDRESS_TYPE];
    assert_eq!(a.resources, 2);
    assert!(a.synced);
    let ack = requests
        .iter()
        .find(|q| q.type_url == ADDRESS_TYPE && q.is_ack())
        .unwrap();
    assert_eq!(
        a.last_ack_nonce.as_deref(),
        Some(ack.response_nonce.as_str())
    );
    assert_eq!(a.last_ack_version.as_deref(), Some("v1"));
}

#[tokio::test]
async fn a_push_with_a_bad_resource_is_nacked_with_its_error_and_the_rest_applies() {
    let fake = FakeIstiod::start().await;
    fake.push(ADDRESS_TYPE, &[("w1", b"one".to_vec())], &[]);
    let r = start_with(fake, |_| {}).await;
    r.fake.wait_for(WAIT, acks_on(1, ADDRESS_TYPE)).await;
    let nonce = r.fake.push(
        ADDRESS_TYPE,
        &[("w1", b"bad one".to_vec()), ("w2", b"two".to_vec())],
        &[],
    );
    let requests = r
        .fake
        .wait_for(WAIT, |q| q.iter().any(Recorded::is_nack))
        .await;
    let nack = requests.iter().find(|q| q.is_nack()).expect("a nack");
    assert_eq!(vec![nack.response_nonce.clone()], nonce);
    assert_eq!(nack.error.as_deref(), Some("w1: cannot decode \"bad one\""));
    assert_eq!(r.sink.get(ADDRESS_TYPE, "w2").as_deref(), Some(&b"two"[..]));
    assert_eq!(r.sink.get(ADDRESS_TYPE, "w1").as_deref(), Some(&b"one"[..]));
    let s = r.status.snapshot();
    assert_eq!(s.nacks, 1);
    let a = &s.types[ADDRESS_TYPE];
    assert_eq!(
        a.last_nack.as_deref(),
        Some("w1: cannot decode \"bad one\"")
    );
    assert_eq!(
        a.last_ack_version.as_deref(),
        Some("v1"),
        "the last ACKed stays"
    );
    assert_eq!(
        r.status
            .metrics()
            .nacks
            .get_or_create(&super::super::status::TypeLabel {
                resource_type: "istio.workload.Address".into()
            })
            .get(),
        1
    );
    // A removal next is ACKed.
    let nonce = r.fake.push(ADDRESS_TYPE, &[], &["w2"]);
    r.fake
        .wait_for(WAIT, |q| {
            q.iter().any(|q| q.is_ack() && q.response_nonce == nonce[0])
        })
        .await;
    assert_eq!(r.sink.get(ADDRESS_TYPE, "w2"), None);
    assert_eq!(r.status.snapshot().types[ADDRESS_TYPE].resources, 1);
}

#[tokio::test]
async fn after_istiod_restarts_the_client_resumes_keeps_its_state_until_resync_then_drops_the_stale(
) {
    let fake = FakeIstiod::start().await;
    fake.push(
        ADDRESS_TYPE,
        &[("w1", b"one".to_vec()), ("w2", b"two".to_vec())],
        &[],
    );
    let r = start_with(fake, |_| {}).await;
    r.fake.wait_for(WAIT, acks_on(1, ADDRESS_TYPE)).await;
    // istiod restarts; while it is down w2 goes away and the token is rotated.
    r.fake.hold();
    r.fake.drop_streams();
    r.fake.push(ADDRESS_TYPE, &[], &["w2"]);
    std::fs::write(r.dir.join("token"), "token-2").unwrap();
    let requests = r
        .fake
        .wait_for(WAIT, |q| {
            q.iter()
                .filter(|q| q.stream == 2 && q.response_nonce.is_empty())
                .count()
                == 2
        })
        .await;
    let sub = requests
        .iter()
        .find(|q| q.stream == 2 && q.type_url == ADDRESS_TYPE)
        .expect("resubscribed");
    assert_eq!(sub.authorization.as_deref(), Some("Bearer token-2"));
    assert_eq!(
        sub.initial_resource_versions,
        [
            ("w1".to_owned(), "v1".to_owned()),
            ("w2".to_owned(), "v1".to_owned())
        ]
        .into()
    );
    // Connected but not synced: everything is kept.
    eventually("connected again", || {
        r.status.snapshot().state == StreamState::Connected
    })
    .await;
    let s = r.status.snapshot();
    assert_eq!(s.reconnects, 1);
    assert!(!s.types[ADDRESS_TYPE].synced);
    assert!(
        s.last_error
            .as_deref()
            .unwrap()
            .contains("fake istiod restarting"),
        "{s:?}"
    );
    assert!(r.sink.get(ADDRESS_TYPE, "w2").is_some());
    // The first push of the new stream omits w2: it is removed then.
    r.fake.release();
    r.fake.wait_for(WAIT, acks_on(2, ADDRESS_TYPE)).await;
    assert_eq!(r.sink.get(ADDRESS_TYPE, "w2"), None);
    assert_eq!(r.sink.get(ADDRESS_TYPE, "w1").as_deref(), Some(&b"one"[..]));
    assert!(r.status.snapshot().types[ADDRESS_TYPE].synced);
}

#[tokio::test]
async fn an_unreachable_istiod_is_retried_with_growing_pauses() {
    let fake = FakeIstiod::start().await;
    // A port nothing listens on.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let r = start_with(fake, |c| c.address = format!("127.0.0.1:{port}")).await;
    tokio::time::sleep(Duration::from_millis(900)).await;
    let s = r.status.snapshot();
    // Pauses of 25-50, 50-100, 100-200, 200-400, 200-400 ms: 3 to 6 attempts fit in 900 ms;
    // without backoff there would be hundreds.
    assert!((3..=7).contains(&s.reconnects), "{s:?}");
    assert!(
        s.last_error
            .as_deref()
            .unwrap()
            .contains(&format!("istiod 127.0.0.1:{port}")),
        "{s:?}"
    );
    assert_ne!(s.state, StreamState::Connected);
    // Both subscribed types are listed, with nothing held.
    assert_eq!(
        s.types.keys().map(String::as_str).collect::<Vec<_>>(),
        [AUTHORIZATION_TYPE, ADDRESS_TYPE]
    );
    assert!(s.types.values().all(|t| t.resources == 0 && !t.synced));
}

#[tokio::test]
async fn an_istiod_certificate_that_does_not_chain_to_the_root_is_refused() {
    let fake = FakeIstiod::start().await;
    let other = FakeIstiod::start().await;
    let r = start_with(fake, |_| {}).await;
    r.fake.wait_for(WAIT, acks_on(1, ADDRESS_TYPE)).await;
    std::fs::write(r.dir.join("root.pem"), other.root_pem()).unwrap();
    r.fake.drop_streams();
    eventually("a failed stream after the root changed", || {
        r.status.snapshot().reconnects >= 2
    })
    .await;
    let s = r.status.snapshot();
    assert_ne!(s.state, StreamState::Connected);
    let streams = r.fake.requests().iter().map(|q| q.stream).max();
    assert_eq!(
        streams,
        Some(1),
        "no request reached the server over the untrusted tls"
    );
    assert!(
        s.last_error.as_deref().unwrap().contains("UnknownIssuer")
            || s.last_error.as_deref().unwrap().contains("certificate"),
        "{s:?}"
    );
}

#[test]
fn jitter_stays_between_half_and_all_of_the_pause() {
    let pause = Duration::from_millis(1000);
    for _ in 0..100 {
        let j = jittered(pause);
        assert!(j >= pause / 2 && j <= pause, "{j:?}");
    }
}
