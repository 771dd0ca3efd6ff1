//! Tells istiod which of this node's pods are captured: the `ambient.istio.io/redirection` annotation.
//!
//! istiod gives a pod the HBONE tunnel protocol (every ztunnel then sends it HBONE) only while
//! the pod carries `ambient.istio.io/redirection: enabled`; istio-cni sets it once capture is in
//! place and removes it when the pod leaves the mesh. The [`run`] loop does the same, level
//! triggered: it watches this node's pods (field selector `spec.nodeName`, checked again here)
//! and the set of pods the pod manager has captured ([`CapturedPods`], published only after a
//! pod's kernel enrollment), and patches every pod whose annotation disagrees. So the
//! annotation is set after capture and never before, removed on unenrollment, and on start
//! both ways at once: an annotation a crashed agent left on a pod no longer captured goes, a
//! captured pod without it gets it. Nothing happens before the pod manager's first reconcile.
//!
//! Each patch is a JSON merge patch of `metadata.annotations` with the pod's UID as
//! precondition (a pod re-created under the same name is never annotated for its predecessor's
//! capture), under the field manager [`FIELD_MANAGER`]. A failed patch is logged with the pod
//! and the error, counted, and retried after [`Settings::retry`]; enrollment never waits on it.
//! A draining agent stops patching and leaves every annotation as it is.
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, ResourceExt};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde_json::{json, Value};
use tokio::sync::{watch, Notify};

use crate::error::error_chain;

/// The annotation istiod reads to give a pod the HBONE tunnel protocol.
pub const REDIRECTION_ANNOTATION: &str = "ambient.istio.io/redirection";
/// Its value while the pod is captured.
pub const REDIRECTION_ENABLED: &str = "enabled";
/// The field manager of the agent's patches.
pub const FIELD_MANAGER: &str = "ambit-agent";

/// The pods the pod manager has captured: `namespace/name` → `metadata.creationTimestamp` of
/// the captured pod (a pod re-created under the same name is another pod).
pub type CapturedPods = BTreeMap<String, Option<Timestamp>>;

/// Settings of the annotation loop.
#[derive(Debug, Clone)]
pub struct Settings {
    /// This node's name: only its pods are ever patched.
    pub node: String,
    /// How long after a failed patch the same patch of the same pod is sent again (and after
    /// a successful one, once the watch shows a newer version of the pod that still disagrees).
    pub retry: Duration,
}

impl Settings {
    /// Defaults for `node`: retry after 5 s.
    pub fn new(node: impl Into<String>) -> Self {
        Self {
            node: node.into(),
            retry: Duration::from_secs(5),
        }
    }
}

/// Labels of `ambit_redirection_annotation_patches_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PatchLabels {
    /// `set` or `remove`.
    pub op: &'static str,
    /// `ok` or `error`.
    pub result: &'static str,
}

/// Patches sent, by operation and result (registered as
/// `ambit_redirection_annotation_patches_total`).
pub type PatchCounter = Family<PatchLabels, Counter>;

/// A patch of one pod's annotation failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot {op} annotation {REDIRECTION_ANNOTATION} of pod {pod}")]
pub struct PatchError {
    /// `set` or `remove`.
    pub op: &'static str,
    /// `namespace/name`.
    pub pod: String,
    /// What the API server (or the connection) said.
    #[source]
    pub source: kube::Error,
}

/// What one pod's annotation needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Set,
    Remove,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Set => "set",
            Op::Remove => "remove",
        }
    }
}

/// Keeps the annotation of this node's pods in line with `captured` until `captured`'s sender
/// goes away or `stop` is signaled. `captured` holds `None` until the pod manager's first
/// reconcile. `stop` is the agent's draining: a draining agent's captured set no longer moves
/// (its successor's does), so it must not undo the successor's patches.
pub async fn run(
    client: Client,
    settings: Settings,
    mut captured: watch::Receiver<Option<Arc<CapturedPods>>>,
    mut stop: crate::drain::Signal,
    patches: PatchCounter,
) {
    let changed = Arc::new(Notify::new());
    let (synced_tx, mut synced) = watch::channel(false);
    let (store, writer) = reflector::store::<Pod>();
    let selector = format!("spec.nodeName={}", settings.node);
    let stream = watcher(
        Api::<Pod>::all(client.clone()),
        watcher::Config::default().fields(&selector),
    )
    .default_backoff()
    .reflect(writer);
    let notify = changed.clone();
    let node = settings.node.clone();
    let reflector = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(watcher::Event::InitDone) => {
                    synced_tx.send_replace(true);
                    notify.notify_one();
                }
                Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => notify.notify_one(),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(node = %node, error = %error_chain(&e), "watch of this node's pods (redirection annotation) failed; retrying with backoff");
                }
            }
        }
    });
    let mut loop_ = Annotator {
        client,
        settings,
        store,
        patches,
        sent: HashMap::new(),
    };
    let ready = async {
        synced.wait_for(|s| *s).await.is_ok() && captured.wait_for(Option::is_some).await.is_ok()
    };
    let ready = tokio::select! {
        r = ready => r,
        () = stop.signaled() => false,
    };
    if ready {
        tracing::info!(node = %loop_.settings.node, "redirection annotation: reconciling this node's pods");
        while !stop.is_signaled() {
            let now = captured.borrow_and_update().clone().unwrap_or_default();
            loop_.pass(&now).await;
            tokio::select! {
                r = captured.changed() => if r.is_err() { break },
                _ = changed.notified() => {}
                () = stop.signaled() => {}
                _ = tokio::time::sleep(loop_.settings.retry) => {}
            }
        }
    }
    tracing::info!(node = %loop_.settings.node, "redirection annotation: stopped (annotations stay as they are)");
    reflector.abort();
}

struct Sent {
    op: Op,
    at: Instant,
    done_on: Option<String>,
}

struct Annotator {
    client: Client,
    settings: Settings,
    store: Store<Pod>,
    patches: PatchCounter,
    /// Pod UID → the last patch sent, when, and (if it succeeded) the pod's resourceVersion
    /// it was sent against: not sent again before `retry`, nor while the watch still shows
    /// that version (the patch is done; the watch has not caught up).
    sent: HashMap<String, Sent>,
}

impl Annotator {
    /// Patches every pod of this node whose annotation disagrees with `captured`.
    async fn pass(&mut self, captured: &CapturedPods) {
        let pods = self.store.state();
        let mut seen = HashSet::with_capacity(pods.len());
        for pod in pods {
            let (Some(uid), Some(ns)) = (pod.uid(), pod.namespace()) else {
                continue;
            };
            if pod.spec.as_ref().map(|s| s.node_name.as_deref()) != Some(Some(&self.settings.node))
            {
                continue;
            }
            seen.insert(uid.clone());
            let key = format!("{ns}/{}", pod.name_any());
            let created = pod.metadata.creation_timestamp.as_ref().map(|t| t.0);
            let want = captured.get(&key).is_some_and(|c| *c == created);
            let has = pod.annotations().get(REDIRECTION_ANNOTATION);
            let op = match (want, has.map(String::as_str)) {
                (true, Some(REDIRECTION_ENABLED)) | (false, None) => {
                    self.sent.remove(&uid);
                    continue;
                }
                (true, _) => Op::Set,
                (false, Some(_)) => Op::Remove,
            };
            let rv = pod.resource_version();
            if self.sent.get(&uid).is_some_and(|s| {
                s.op == op
                    && (s.at.elapsed() < self.settings.retry
                        || s.done_on.is_some() && s.done_on == rv)
            }) {
                continue;
            }
            let (result, done_on) = match self.patch(&ns, &pod.name_any(), &uid, op).await {
                Ok(()) => {
                    tracing::info!(pod = %key, op = op.name(), "redirection annotation patched");
                    ("ok", rv)
                }
                Err(e) => {
                    tracing::warn!(pod = %key, error = %error_chain(&e), "redirection annotation patch failed; will retry");
                    ("error", None)
                }
            };
            let at = Instant::now();
            self.sent.insert(uid.clone(), Sent { op, at, done_on });
            self.patches
                .get_or_create(&PatchLabels {
                    op: op.name(),
                    result,
                })
                .inc();
        }
        self.sent.retain(|uid, _| seen.contains(uid));
    }

    /// One merge patch of pod `ns/name`, with its UID as precondition. A pod that is gone
    /// needs nothing.
    async fn patch(&self, ns: &str, name: &str, uid: &str, op: Op) -> Result<(), PatchError> {
        let value = match op {
            Op::Set => Value::from(REDIRECTION_ENABLED),
            Op::Remove => Value::Null,
        };
        let body = json!({
            "metadata": {"uid": uid, "annotations": {REDIRECTION_ANNOTATION: value}},
        });
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.to_string()),
            ..PatchParams::default()
        };
        let api = Api::<Pod>::namespaced(self.client.clone(), ns);
        match api.patch(name, &params, &Patch::Merge(&body)).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(source) => Err(PatchError {
                op: op.name(),
                pod: format!("{ns}/{name}"),
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests;
