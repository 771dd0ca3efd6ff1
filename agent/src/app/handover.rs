//! The agent's side of the hand-over between agents sharing a node (`redirect::handover`): follow, take the node back, hand it back.
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::admin::server;
use crate::cni;
use crate::config::Config;
use crate::error::error_chain;
use crate::inventory::Snapshot;
use crate::proxy::manager::Manager;
use crate::redirect::handover::Check;
use crate::redirect::Datapath;

/// How often the hand-over directory is checked.
const CHECK_EVERY: Duration = Duration::from_millis(250);
/// How long a leaving current agent waits for an older one to take the node back before its
/// own listeners close.
const HANDBACK_WAIT: Duration = Duration::from_secs(5);

/// What this agent owns on the node and must assert again when it takes the node back.
pub(super) struct Owned {
    pub cfg: Arc<Config>,
    pub datapath: Arc<Datapath>,
    pub manager: Arc<Manager>,
    /// Snapshots as the pod manager sees them.
    pub inventory: watch::Receiver<Arc<Snapshot>>,
    /// Hands a newly bound admin socket to the admin thread.
    pub admin_tx: mpsc::UnboundedSender<std::os::unix::net::UnixListener>,
    /// Inode of the admin socket this agent bound last (0: none).
    pub admin_ino: Arc<AtomicU64>,
    /// The CNI socket's handler, when there is a `cni:` section.
    pub cni: Option<cni::server::Handler>,
}

/// Inode of `path`, 0 when it is missing.
pub(super) fn inode(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map_or(0, |m| m.ino())
}

/// Follows the other agents every [`CHECK_EVERY`] until this agent drains: marks it ready once
/// its first reconcile is done, logs when a newer agent supersedes it, and takes the node back
/// when the newer agents are gone.
pub(super) async fn follow(o: Arc<Owned>, mut draining: crate::drain::Signal) {
    let mut ready = false;
    let mut superseded_by = None;
    let mut last_error = None;
    loop {
        tokio::select! {
            () = tokio::time::sleep(CHECK_EVERY) => {}
            () = draining.signaled() => {}
        }
        if draining.is_signaled() {
            return;
        }
        let dp = o.datapath.clone();
        let check = match tokio::task::spawn_blocking(move || dp.handover().check()).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                let e = error_chain(&e);
                if last_error.as_ref() != Some(&e) {
                    tracing::warn!(error = %e, "cannot check the other agents of this node");
                }
                last_error = Some(e);
                continue;
            }
            Err(e) => {
                tracing::error!(error = %e, "hand-over check task failed");
                continue;
            }
        };
        last_error = None;
        match check {
            Check::Current => {
                if !ready && o.manager.reconciled() {
                    ready = mark_ready(&o);
                }
            }
            Check::Superseded { generation, pid } => {
                if superseded_by != Some(generation) {
                    tracing::info!(
                        newer.generation = generation,
                        newer.pid = pid,
                        "superseded by a newer agent on this node: it owns the kernel state and the admin socket; this one keeps serving its open connections until it is stopped"
                    );
                    superseded_by = Some(generation);
                }
            }
            Check::Reclaimed { generation } => {
                superseded_by = None;
                let o2 = o.clone();
                let r = tokio::task::spawn_blocking(move || take_back_kernel(&o2)).await;
                if let Err(e) = r {
                    tracing::error!(error = %e, "taking the node back failed");
                }
                rebind_sockets(&o);
                ready = mark_ready(&o);
                tracing::info!(
                    generation,
                    "current again: the newer agent is gone; listeners, links, maps and the admin socket are this agent's again"
                );
            }
            Check::Left => return,
        }
    }
}

fn mark_ready(o: &Owned) -> bool {
    match o.datapath.handover().mark_ready() {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %error_chain(&e), "cannot mark this agent ready in the hand-over directory");
            false
        }
    }
}

/// The kernel side of taking the node back, in enrollment order: the mesh list (re-read,
/// another agent wrote it), the cgroup links, then every pod's listeners and sk_lookup link,
/// then kernel state of pods this agent does not serve.
fn take_back_kernel(o: &Owned) {
    let snap = o.inventory.borrow().clone();
    let mesh = o.datapath.resync_mesh(&super::mesh::destinations(&snap));
    let links = o.datapath.repin_links();
    let (pods, errors) = o.manager.pods().reassert();
    for e in &errors {
        tracing::error!(error = %e, "cannot register a pod again while taking the node back");
    }
    tracing::info!(
        mesh.listed = mesh.map(|m| m.entries),
        links = links,
        pods,
        failed = errors.len(),
        "kernel state taken back"
    );
}

/// Binds the admin socket (and the CNI socket) at their paths again, replacing the newer
/// agent's; the old listeners go on serving whoever still holds a connection.
fn rebind_sockets(o: &Owned) {
    let path = &o.cfg.admin_socket;
    match server::bind(path) {
        Ok(l) => {
            o.admin_ino.store(inode(path), Ordering::Relaxed);
            if o.admin_tx.send(l).is_err() {
                tracing::error!(admin.socket = %path.display(), "the admin thread is gone; admin socket not served");
            }
        }
        Err(e) => {
            tracing::error!(error = %error_chain(&e), "cannot bind the admin socket again")
        }
    }
    if let (Some(c), Some(handler)) = (&o.cfg.cni, &o.cni) {
        match cni::server::bind(&c.socket) {
            Ok(l) => drop(tokio::spawn(cni::server::serve(l, handler.clone()))),
            Err(e) => tracing::error!(error = %error_chain(&e), "cannot bind the cni socket again"),
        }
    }
}

/// Leaves the hand-over at shutdown, before the listeners close: when this agent was current
/// and an older one still runs, waits (at most [`HANDBACK_WAIT`]) until it has taken the node
/// back, so no SYN meets an empty `amb_listeners` entry.
pub(super) async fn hand_back(datapath: Arc<Datapath>) {
    let r = tokio::task::spawn_blocking(move || {
        let h = datapath.handover();
        match h.leave() {
            Ok(true) => Some(h.wait_successor(HANDBACK_WAIT)),
            Ok(false) => None,
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "cannot leave the hand-over directory");
                None
            }
        }
    })
    .await;
    match r {
        Ok(Some(Some(generation))) => tracing::info!(
            generation,
            "handed the node back to the older agent still running"
        ),
        Ok(Some(None)) => tracing::warn!(
            wait_ms = HANDBACK_WAIT.as_millis() as u64,
            "an older agent still runs but did not take the node back in time; closing the listeners anyway"
        ),
        Ok(None) => {}
        Err(e) => tracing::error!(error = %e, "hand-back task failed"),
    }
}
