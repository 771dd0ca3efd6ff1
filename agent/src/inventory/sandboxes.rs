//! Pod sandboxes the CNI plugin reported, as the inventory takes them: a pod's network
//! namespace (and, while the inventory shows none, its addresses), and what the CNI handler asks
//! of the inventory.
use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::watch;

use super::{Snapshot, Workload};
use crate::cni::handler::{Lookup, PodView};
use crate::cni::pods::CniPod;

/// The CNI handler's view of the latest snapshot in `inventory`.
pub fn pod_views(inventory: watch::Receiver<Arc<Snapshot>>) -> Lookup {
    Arc::new(move |key: &str| {
        let snap = inventory.borrow().clone();
        snap.workloads.get(key).map(|w| PodView {
            enrolled: w.enrolled,
            node: w.node.clone(),
            netns: w.netns.clone(),
        })
    })
}

/// Gives `node`'s workloads that have no netns yet the namespace of their newest sandbox the
/// plugin reported (and its addresses, while the inventory shows none). `uids` holds the pod
/// UIDs the inventory knows (`namespace/name` → UID): a report that names another UID is of an
/// earlier pod with the same name and is not taken. Both inventory sources merge this way
/// (a snapshot already built: [`merge_netns_local`]).
pub fn merge_netns<'a>(
    workloads: impl IntoIterator<Item = (&'a String, &'a mut Workload)>,
    node: &str,
    uids: &BTreeMap<String, String>,
    cni: &[CniPod],
) {
    let newest = newest_by_pod(cni);
    for (key, w) in workloads {
        if w.node == node {
            let uid = uids.get(key).map_or("", String::as_str);
            merge_one(&newest, key, uid, w);
        }
    }
}

/// [`merge_netns`] on a snapshot, visiting and changing only `node`'s workloads (through
/// [`Snapshot::put_workload`], so a built index stays built). `uid_of` gives the pod UID the
/// inventory knows for a `namespace/name`.
pub fn merge_netns_local<'u>(
    snap: &mut Snapshot,
    node: &str,
    uid_of: impl Fn(&str) -> Option<&'u str>,
    cni: &[CniPod],
) {
    let newest = newest_by_pod(cni);
    let mut merged = Vec::new();
    for w in snap.on_node(node) {
        let key = w.key();
        let mut w = w.clone();
        if merge_one(&newest, &key, uid_of(&key).unwrap_or(""), &mut w) {
            merged.push(w);
        }
    }
    for w in merged {
        snap.put_workload(w);
    }
}

/// Gives `w` (keyed `key`, pod UID `uid` or empty) the netns of its newest sandbox, unless it
/// has one; whether it changed.
fn merge_one(newest: &BTreeMap<String, &CniPod>, key: &str, uid: &str, w: &mut Workload) -> bool {
    if w.netns.is_some() {
        return false;
    }
    let Some(c) = newest.get(key) else {
        return false;
    };
    if !c.pod.uid.is_empty() && !uid.is_empty() && c.pod.uid != uid {
        return false;
    }
    w.netns = Some(c.netns.clone());
    if w.ips.is_empty() {
        w.ips = c.ips.clone();
    }
    true
}

/// The newest sandbox of each pod, keyed by `namespace/name`.
pub fn newest_by_pod(pods: &[CniPod]) -> BTreeMap<String, &CniPod> {
    let mut out: BTreeMap<String, &CniPod> = BTreeMap::new();
    for p in pods {
        let key = p.pod.key();
        if out.get(&key).is_none_or(|cur| cur.seq < p.seq) {
            out.insert(key, p);
        }
    }
    out
}
