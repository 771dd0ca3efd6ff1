//! The istiod inventory source: the xDS stream's resources applied to a [`Mesh`], published as snapshots (with the CNI plugin's network namespaces) once both types have synced.
//!
//! The stream's task owns a [`MeshSink`]; every accepted resource and removal goes into the
//! shared [`Mesh`] (which keeps its snapshot up to date) and wakes the publishing loop, which takes the snapshot, gives
//! this node's workloads the network namespace the CNI plugin reported, passes it through the
//! same [`Guard`] as the other sources and publishes it. Nothing is published, and `ready`
//! stays false, until Workloads/Services and Authorizations have each had their first full
//! push. After a reconnect the last snapshot stays in force; the new stream's first push
//! replaces it (the stream removes what it no longer lists only then).
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{watch, Notify};

use super::model::{Mesh, ADDRESS_TYPE, AUTHORIZATION_TYPE};
use super::state::Sink;
use crate::cni::pods::CniPod;
use crate::inventory::guard::GuardSettings;
use crate::inventory::publish::{until, GuardedPublisher, ReloadStats};
use crate::inventory::sandboxes::merge_netns_local;
use crate::inventory::Snapshot;

/// How the source publishes.
#[derive(Debug, Clone)]
pub struct Options {
    /// The node this agent serves (its workloads take their netns from the CNI plugin).
    pub node: String,
    /// Wait this long after a change before publishing (zero: publish what has been applied
    /// as soon as the loop runs; a snapshot is a cheap copy, see [`Mesh::snapshot`]).
    pub debounce: Duration,
    /// When a rebuild is held back.
    pub guard: GuardSettings,
    /// Loads, held rebuilds and address conflicts, shared with `/status` and metrics.
    pub reloads: Arc<ReloadStats>,
}

/// What the stream's task and the publishing loop share.
#[derive(Debug)]
struct Shared {
    mesh: Mutex<Mesh>,
    synced: Mutex<BTreeSet<String>>,
    changed: Notify,
}

/// The [`Sink`] of the xDS client: applies to the shared [`Mesh`] and wakes the publisher.
#[derive(Debug, Clone)]
pub struct MeshSink {
    shared: Arc<Shared>,
}

impl MeshSink {
    /// A sink over an empty `mesh`.
    pub fn new(mesh: Mesh) -> Self {
        Self {
            shared: Arc::new(Shared {
                mesh: Mutex::new(mesh),
                synced: Mutex::new(BTreeSet::new()),
                changed: Notify::new(),
            }),
        }
    }

    fn mesh(&self) -> std::sync::MutexGuard<'_, Mesh> {
        self.shared
            .mesh
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether both types have had their first full push.
    fn synced(&self) -> bool {
        let synced = self
            .shared
            .synced
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        synced.contains(ADDRESS_TYPE) && synced.contains(AUTHORIZATION_TYPE)
    }
}

impl Sink for MeshSink {
    fn apply(&mut self, type_url: &str, name: &str, value: &[u8]) -> Result<(), String> {
        let applied = self.mesh().apply(type_url, name, value);
        match applied {
            Ok(()) => {
                self.shared.changed.notify_one();
                Ok(())
            }
            Err(e) => {
                tracing::warn!(type_url, resource = name, error = %e, "istiod resource refused (NACKed); its last good version stays");
                Err(e.to_string())
            }
        }
    }

    fn remove(&mut self, type_url: &str, name: &str) {
        if self.mesh().remove(type_url, name) {
            self.shared.changed.notify_one();
        }
    }

    fn synced(&mut self, type_url: &str) {
        self.shared
            .synced
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(type_url.to_owned());
        self.shared.changed.notify_one();
    }
}

/// Publishes the sink's mesh to `tx` until `tx` has no receivers left; `ready` turns true with
/// the first snapshot, after both types' first full push.
pub async fn publish(
    sink: MeshSink,
    opts: Options,
    mut cni: Option<watch::Receiver<Arc<Vec<CniPod>>>>,
    tx: watch::Sender<Arc<Snapshot>>,
    ready: watch::Sender<bool>,
) {
    let mut publisher = GuardedPublisher::new(
        tx,
        opts.reloads.clone(),
        opts.guard.clone(),
        ready,
        "istiod",
    );
    loop {
        let due = publisher.deadline();
        tokio::select! {
            () = sink.shared.changed.notified() => {}
            r = cni_changed(&mut cni) => if r.is_err() { break },
            () = until(due) => {}
            () = publisher.closed() => break,
        }
        if !opts.debounce.is_zero() {
            tokio::time::sleep(opts.debounce).await;
        }
        if !sink.synced() {
            continue;
        }
        let snap = {
            let mut mesh = sink.mesh();
            let mut snap = mesh.snapshot();
            if let Some(cni) = &mut cni {
                let pods = cni.borrow_and_update().clone();
                merge_netns_local(&mut snap, &opts.node, |key| mesh.uid_of(key), &pods);
            }
            snap
        };
        publisher.offer(snap);
    }
}

/// The CNI pod map changed (never, without one).
async fn cni_changed(
    cni: &mut Option<watch::Receiver<Arc<Vec<CniPod>>>>,
) -> Result<(), watch::error::RecvError> {
    match cni {
        Some(rx) => rx.changed().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests;
