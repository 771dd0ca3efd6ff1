//! The Kubernetes source against relists that drop every pod: held back, then applied once
//! the same rebuild stays for the settle time.
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{documents, start, start_with, until, FakeApi, Options, CLUSTER};
use crate::inventory::guard::Suspicion;

#[tokio::test]
async fn a_relist_that_drops_every_pod_is_held_back() {
    let api = FakeApi::start().await;
    for d in documents(CLUSTER) {
        api.apply(d);
    }
    let mut r = start(api).await;
    tokio::time::timeout(Duration::from_secs(10), r.ready.wait_for(|v| *v))
        .await
        .expect("ready after the first full sync")
        .unwrap();
    until(&mut r.rx, "all pods", |s| s.workloads.len() == 4).await;
    r.api.relist_empty("Pod");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while r.api.list_requests("Pod") < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no re-list after 410 Gone"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The empty relist is in the store now; the rebuild must not act on it yet.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        r.rx.borrow().workloads.len(),
        4,
        "an empty relist is held back until confirmed"
    );
}

#[tokio::test]
async fn an_empty_relist_applies_once_it_stays_for_the_settle_time() {
    let api = FakeApi::start().await;
    for d in documents(CLUSTER) {
        api.apply(d);
    }
    let mut opts = Options::new("node1");
    opts.guard.settle = Duration::from_millis(800);
    let reloads = opts.reloads.clone();
    let mut r = start_with(api, opts).await;
    until(&mut r.rx, "all pods", |s| s.workloads.len() == 4).await;
    let loads = reloads.loads.load(Ordering::Relaxed);
    r.api.relist_empty("Pod");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while reloads.held().is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the empty relist was not held"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let held = reloads.held().unwrap();
    assert_eq!(held.reason, Suspicion::Empty { pods: 4 });
    assert_eq!(
        r.rx.borrow().workloads.len(),
        4,
        "held: the last good pods stay"
    );
    assert_eq!(reloads.holds.load(Ordering::Relaxed), 1);
    // Nothing else changes: the same (empty) rebuild after the settle time applies.
    until(&mut r.rx, "the confirmed empty relist", |s| {
        s.workloads.is_empty()
    })
    .await;
    assert!(reloads.held().is_none());
    assert_eq!(reloads.confirmed.load(Ordering::Relaxed), 1);
    assert!(reloads.loads.load(Ordering::Relaxed) > loads);
    // Pods coming back apply at once (nothing is unenrolled by that).
    for d in documents(CLUSTER)
        .into_iter()
        .filter(|d| d["kind"] == "Pod")
    {
        r.api.apply(d);
    }
    until(&mut r.rx, "pods back", |s| s.workloads.len() == 4).await;
    assert_eq!(reloads.holds.load(Ordering::Relaxed), 1);
}
