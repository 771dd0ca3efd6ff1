//! The agent's standard CNI handler: record the pod in the map, then answer from the inventory.
//!
//! ADD waits (up to `wait`) until the inventory shows the pod with the reported namespace, which
//! means the inventory source (Kubernetes, or a file without a netns annotation for the pod)
//! merged the CNI report; then a pod that is not enrolled gets
//! `NotInMesh` at once, and an enrolled one gets `Enrolled` once `confirm` (the pod manager)
//! says its capture is in place. The plugin holds the pod's start until then, so an enrolled
//! pod's first connection is already captured.
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::path::PathBuf;

use super::pods::PodMap;
use super::server::Handler;
use super::{CniCommand, CniEvent, CniReply};

/// Whether the pod manager has set a pod (`namespace/name`) up: `None` while pending,
/// `Some(Err(reason))` when it gave up.
pub type Confirm = Arc<dyn Fn(&str) -> Option<Result<(), String>> + Send + Sync>;

/// What the inventory says now of a pod (`namespace/name`): `None` while it does not list it
/// (the inventory's side is `inventory::pod_views`).
pub type Lookup = Arc<dyn Fn(&str) -> Option<PodView> + Send + Sync>;

/// A pod as the inventory shows it, as far as an ADD needs to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodView {
    /// Whether the pod is enrolled.
    pub enrolled: bool,
    /// Its node.
    pub node: String,
    /// The network namespace the inventory took for it.
    pub netns: Option<PathBuf>,
}

/// How often a waiting ADD looks at the inventory and the manager again.
const POLL: Duration = Duration::from_millis(25);

/// Builds the handler for [`super::server::serve`].
pub fn handler(
    map: Arc<PodMap>,
    inventory: Lookup,
    confirm: Option<Confirm>,
    wait: Duration,
) -> Handler {
    Arc::new(move |event: CniEvent| handle(&map, &inventory, confirm.as_ref(), wait, &event))
}

fn handle(
    map: &PodMap,
    inventory: &Lookup,
    confirm: Option<&Confirm>,
    wait: Duration,
    event: &CniEvent,
) -> CniReply {
    let key = event.pod.key();
    if let Err(e) = map.apply(event) {
        tracing::error!(error = %e, "cannot record CNI pod");
        return CniReply::Failed {
            message: format!("agent cannot record pod {key}: {e}"),
        };
    }
    if event.command == CniCommand::Del {
        tracing::info!("pod sandbox removed");
        return CniReply::NotInMesh;
    }
    let deadline = Instant::now() + wait;
    let mut last = String::from(
        "not in the agent's inventory yet (is the API watch or the inventory file behind?)",
    );
    loop {
        match inventory(&key) {
            Some(w) if !w.enrolled => {
                tracing::info!("pod not in the mesh");
                return CniReply::NotInMesh;
            }
            Some(w) if w.netns.is_some() && w.netns == event.netns => {
                match confirm
                    .and_then(|c| c(&key))
                    .or(confirm.is_none().then_some(Ok(())))
                {
                    Some(Ok(())) => {
                        tracing::info!(netns = ?event.netns, "pod enrolled");
                        return CniReply::Enrolled;
                    }
                    Some(Err(reason)) => {
                        return CniReply::Failed {
                            message: format!("pod {key}: {reason}"),
                        }
                    }
                    None => last = "capture not in place yet".into(),
                }
            }
            Some(w) => {
                last = format!(
                    "inventory has not taken the reported netns yet (pod is on node `{}`)",
                    w.node
                );
            }
            None => {}
        }
        if Instant::now() >= deadline {
            tracing::warn!(reason = %last, "pod not ready in time; the runtime will retry");
            return CniReply::Failed {
                message: format!("pod {key}: {last}"),
            };
        }
        std::thread::sleep(POLL);
    }
}
