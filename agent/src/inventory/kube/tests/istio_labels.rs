//! The Kubernetes source enrolls by Istio's `istio.io/dataplane-mode` labels as the file source
//! does: a namespace `ambient` enrolls, a pod `none` opts out, a pod `ambient` enrolls in an
//! unlabelled namespace, and label changes arrive through the watch.
use std::time::Duration;

use serde_json::{json, Value};

use super::{documents, start, until, FakeApi, CLUSTER};
use crate::inventory::{Snapshot, DATAPLANE_MODE_LABEL, MODE_LABEL};

/// The fixture cluster with every `ambit.io/mode` label replaced by Istio's equivalent.
fn istio_cluster() -> Vec<Value> {
    let mut docs = documents(CLUSTER);
    for d in &mut docs {
        let Some(labels) = d["metadata"]["labels"].as_object_mut() else {
            continue;
        };
        let Some(mode) = labels.remove(MODE_LABEL) else {
            continue;
        };
        let istio = match mode.as_str() {
            Some("enabled") => "ambient",
            Some("disabled") => "none",
            other => panic!("fixture has ambit.io/mode {other:?}"),
        };
        labels.insert(DATAPLANE_MODE_LABEL.into(), json!(istio));
    }
    docs
}

fn reason(s: &Snapshot, pod: &str) -> String {
    s.workloads[pod].enrollment.to_string()
}

#[tokio::test]
async fn the_watch_enrolls_by_istio_labels_and_follows_their_changes() {
    let docs = istio_cluster();
    assert!(
        !serde_json::to_string(&docs).unwrap().contains(MODE_LABEL),
        "the fixture still carries ambit.io/mode"
    );
    let api = FakeApi::start().await;
    for d in &docs {
        api.apply(d.clone());
    }
    let mut r = start(api).await;
    tokio::time::timeout(Duration::from_secs(10), r.ready.wait_for(|v| *v))
        .await
        .expect("ready after the first full sync")
        .unwrap();
    until(&mut r.rx, "all pods", |s| s.workloads.len() == 4).await;
    let snap = r.rx.borrow().clone();
    assert!(snap.workloads["shop/client"].enrolled);
    assert_eq!(
        reason(&snap, "shop/client"),
        "enrolled by namespace label istio.io/dataplane-mode=ambient"
    );
    assert!(!snap.workloads["shop/opted-out"].enrolled);
    assert_eq!(
        reason(&snap, "shop/opted-out"),
        "not enrolled: pod label istio.io/dataplane-mode=none \
         (overrides namespace label istio.io/dataplane-mode=ambient)"
    );
    assert!(snap.workloads["legacy/web"].enrolled);
    assert_eq!(
        reason(&snap, "legacy/web"),
        "enrolled by pod label istio.io/dataplane-mode=ambient"
    );

    // The opt-out removed: its namespace enrolls the pod.
    let mut opted_out = docs
        .iter()
        .find(|d| d["metadata"]["name"] == "opted-out")
        .unwrap()
        .clone();
    opted_out["metadata"]["labels"]
        .as_object_mut()
        .unwrap()
        .remove(DATAPLANE_MODE_LABEL);
    r.api.apply(opted_out);
    until(&mut r.rx, "opt-out removed", |s| {
        s.workloads["shop/opted-out"].enrolled
    })
    .await;

    // The namespace label removed: its pods leave the mesh; the pod-labelled one stays.
    let mut ns = docs
        .iter()
        .find(|d| d["kind"] == "Namespace" && d["metadata"]["name"] == "shop")
        .unwrap()
        .clone();
    ns["metadata"]["labels"]
        .as_object_mut()
        .unwrap()
        .remove(DATAPLANE_MODE_LABEL);
    r.api.apply(ns);
    until(&mut r.rx, "namespace unenrolled", |s| {
        !s.workloads["shop/client"].enrolled && !s.workloads["shop/opted-out"].enrolled
    })
    .await;
    assert!(r.rx.borrow().workloads["legacy/web"].enrolled);
}
