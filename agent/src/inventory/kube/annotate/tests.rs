//! The redirection annotation loop against the mock API server, observed through its PATCH calls.
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::watch;

use super::{
    run, CapturedPods, PatchCounter, PatchLabels, Settings, FIELD_MANAGER, REDIRECTION_ANNOTATION,
};
use crate::inventory::kube::fake_api::{FakeApi, PatchCall};

const NODE: &str = "node-1";
const T1: &str = "2026-01-01T00:00:00Z";
const T2: &str = "2026-01-02T00:00:00Z";

fn pod(name: &str, node: &str, created: &str, annotated: bool) -> Value {
    let mut annotations = serde_json::Map::new();
    if annotated {
        annotations.insert(REDIRECTION_ANNOTATION.into(), json!("enabled"));
    }
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": "app",
            "uid": format!("uid-{name}-{created}"),
            "creationTimestamp": created,
            "annotations": annotations,
        },
        "spec": {"nodeName": node, "containers": []},
    })
}

fn captured(pods: &[(&str, &str)]) -> Option<Arc<CapturedPods>> {
    let map: BTreeMap<_, _> = pods
        .iter()
        .map(|(name, created)| (format!("app/{name}"), Some(created.parse().unwrap())))
        .collect();
    Some(Arc::new(map))
}

struct Running {
    api: FakeApi,
    tx: watch::Sender<Option<Arc<CapturedPods>>>,
    stop: crate::drain::Trigger,
    patches: PatchCounter,
}

fn start(api: FakeApi, first: Option<Arc<CapturedPods>>) -> Running {
    let (tx, rx) = watch::channel(first);
    let stop = crate::drain::Trigger::new();
    let stop_rx = stop.signal();
    let patches = PatchCounter::default();
    let settings = Settings {
        retry: Duration::from_millis(200),
        ..Settings::new(NODE)
    };
    tokio::spawn(run(api.client(), settings, rx, stop_rx, patches.clone()));
    Running {
        api,
        tx,
        stop,
        patches,
    }
}

fn annotation(api: &FakeApi, name: &str) -> Option<String> {
    let pod = api.pod(&format!("app/{name}"))?;
    pod["metadata"]["annotations"][REDIRECTION_ANNOTATION]
        .as_str()
        .map(str::to_string)
}

/// Waits until `api` has received `n` patches; returns them.
async fn patches(api: &FakeApi, n: usize) -> Vec<PatchCall> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let p = api.patches();
        if p.len() >= n {
            return p;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{n} patches expected, got {p:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn count(c: &PatchCounter, op: &'static str, result: &'static str) -> u64 {
    c.get_or_create(&PatchLabels { op, result }).get()
}

/// [`count`] once it reaches `want` (or after 5 s): the annotator counts a patch when its
/// answer arrives, just after the API server has recorded it.
async fn counted(c: &PatchCounter, op: &'static str, result: &'static str, want: u64) -> u64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let n = count(c, op, result);
        if n >= want || tokio::time::Instant::now() >= deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn set_after_capture_only_and_removed_on_unenrollment() {
    let api = FakeApi::start().await;
    api.apply(pod("a", NODE, T1, false));
    api.apply(pod("b", NODE, T1, false));
    // Annotated by this agent before it restarted, and still captured.
    api.apply(pod("kept", NODE, T1, true));
    let r = start(api, None);
    // Before the pod manager's first reconcile nothing is patched: not even `kept`, which no
    // captured set lists yet.
    tokio::time::sleep(Duration::from_millis(500)).await;
    r.tx.send_replace(captured(&[("kept", T1)]));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(r.api.patches().is_empty(), "{:?}", r.api.patches());
    // Only this node's pods are watched.
    let watched = r.api.queries("Pod");
    assert!(
        !watched.is_empty()
            && watched
                .iter()
                .all(|q| q.contains("fieldSelector=spec.nodeName%3Dnode-1")),
        "{watched:?}"
    );
    // Captured: set, with the agent's field manager, a merge patch and the UID precondition.
    r.tx.send_replace(captured(&[("kept", T1), ("a", T1)]));
    let p = patches(&r.api, 1).await;
    assert_eq!(p[0].pod, "app/a");
    assert_eq!(p[0].status, 200);
    assert_eq!(p[0].field_manager.as_deref(), Some(FIELD_MANAGER));
    assert_eq!(p[0].content_type, "application/merge-patch+json");
    assert_eq!(
        p[0].body,
        json!({"metadata": {"uid": format!("uid-a-{T1}"), "annotations": {REDIRECTION_ANNOTATION: "enabled"}}})
    );
    assert_eq!(annotation(&r.api, "a").as_deref(), Some("enabled"));
    // Seen by the watch: not sent again (past the retry time), and b never touched.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(r.api.patches().len(), 1, "{:?}", r.api.patches());
    assert_eq!(annotation(&r.api, "b"), None);
    // Unenrolled: removed (a merge patch setting it to null).
    r.tx.send_replace(captured(&[("kept", T1)]));
    let p = patches(&r.api, 2).await;
    assert_eq!(p[1].pod, "app/a");
    assert_eq!(
        p[1].body,
        json!({"metadata": {"uid": format!("uid-a-{T1}"), "annotations": {REDIRECTION_ANNOTATION: null}}})
    );
    assert_eq!(annotation(&r.api, "a"), None);
    assert_eq!(annotation(&r.api, "kept").as_deref(), Some("enabled"));
    assert_eq!(counted(&r.patches, "set", "ok", 1).await, 1);
    assert_eq!(counted(&r.patches, "remove", "ok", 1).await, 1);
}

#[tokio::test]
async fn start_reconciles_both_ways_and_touches_only_this_node() {
    let api = FakeApi::start().await;
    // Left by a crashed agent on a pod no longer captured.
    api.apply(pod("stale", NODE, T1, true));
    // Captured, annotation missing (the agent died between enrollment and the patch).
    api.apply(pod("missing", NODE, T1, false));
    // Captured and annotated: nothing to do.
    api.apply(pod("good", NODE, T1, true));
    // Another node's pods, whatever they carry, are never patched (the mock ignores the
    // field selector, so the loop sees them).
    api.apply(pod("other-annotated", "node-2", T1, true));
    api.apply(pod("other-captured", "node-2", T1, false));
    let r = start(
        api,
        captured(&[("missing", T1), ("good", T1), ("other-captured", T1)]),
    );
    let mut p = patches(&r.api, 2).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(r.api.patches().len(), 2, "{:?}", r.api.patches());
    p.sort_by(|a, b| a.pod.cmp(&b.pod));
    assert_eq!(p[0].pod, "app/missing");
    assert_eq!(p[1].pod, "app/stale");
    assert_eq!(annotation(&r.api, "missing").as_deref(), Some("enabled"));
    assert_eq!(annotation(&r.api, "stale"), None);
    assert_eq!(annotation(&r.api, "good").as_deref(), Some("enabled"));
    assert_eq!(
        annotation(&r.api, "other-annotated").as_deref(),
        Some("enabled")
    );
    assert_eq!(annotation(&r.api, "other-captured"), None);
}

#[tokio::test]
async fn patch_failures_are_counted_and_retried() {
    let api = FakeApi::start().await;
    api.apply(pod("a", NODE, T1, false));
    api.fail_patches(2);
    let r = start(api, captured(&[("a", T1)]));
    let p = patches(&r.api, 3).await;
    let statuses: Vec<u16> = p.iter().map(|c| c.status).collect();
    assert_eq!(statuses, [500, 500, 200]);
    assert_eq!(annotation(&r.api, "a").as_deref(), Some("enabled"));
    assert_eq!(counted(&r.patches, "set", "error", 2).await, 2);
    assert_eq!(counted(&r.patches, "set", "ok", 1).await, 1);
}

#[tokio::test]
async fn a_pod_recreated_under_the_same_name_waits_for_its_own_capture() {
    let api = FakeApi::start().await;
    // The manager still holds the capture of the previous `a` (created T1); this one is T2.
    api.apply(pod("a", NODE, T2, false));
    let r = start(api, captured(&[("a", T1)]));
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(r.api.patches().is_empty(), "{:?}", r.api.patches());
    r.tx.send_replace(captured(&[("a", T2)]));
    let p = patches(&r.api, 1).await;
    assert_eq!(p[0].body["metadata"]["uid"], json!(format!("uid-a-{T2}")));
    assert_eq!(annotation(&r.api, "a").as_deref(), Some("enabled"));
}

#[tokio::test]
async fn a_draining_agent_leaves_annotations_alone() {
    let api = FakeApi::start().await;
    api.apply(pod("a", NODE, T1, false));
    let r = start(api, captured(&[("a", T1)]));
    patches(&r.api, 1).await;
    assert_eq!(annotation(&r.api, "a").as_deref(), Some("enabled"));
    // Draining: the successor holds the capture now; nothing is removed or set any more.
    r.stop.start();
    tokio::time::sleep(Duration::from_millis(100)).await;
    r.tx.send_replace(Some(Arc::default()));
    r.api.apply(pod("b", NODE, T1, false));
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(r.api.patches().len(), 1, "{:?}", r.api.patches());
    assert_eq!(annotation(&r.api, "a").as_deref(), Some("enabled"));
}

#[tokio::test]
async fn an_annotation_removed_by_someone_else_is_set_again() {
    let api = FakeApi::start().await;
    api.apply(pod("a", NODE, T1, false));
    let r = start(api, captured(&[("a", T1)]));
    patches(&r.api, 1).await;
    assert_eq!(annotation(&r.api, "a").as_deref(), Some("enabled"));
    // Another writer replaces the pod's annotations (a new resourceVersion without it).
    r.api.apply(pod("a", NODE, T1, false));
    let p = patches(&r.api, 2).await;
    assert_eq!(p[1].pod, "app/a");
    assert_eq!(annotation(&r.api, "a").as_deref(), Some("enabled"));
    assert_eq!(counted(&r.patches, "set", "ok", 2).await, 2);
}
