//! Keeps the kernel's mesh-destination list (`amb_mesh_dsts`) in step with the inventory: each
//! snapshot is written to the kernel before the pod manager and the proxies see it.
use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::watch;

use imbl::ordmap::DiffItem;

use crate::inventory::services::Service;
use crate::inventory::{Snapshot, Workload};
use crate::redirect::maps::{AmbAddrKey, MESH_DST_POD, MESH_DST_VIP};
use crate::redirect::mesh::SyncReport;
use crate::redirect::Datapath;

/// Addresses that must go through the agent, with the `MESH_DST_*` bits saying why.
pub(super) fn destinations(snap: &Snapshot) -> HashMap<AmbAddrKey, u32> {
    Listed::of(snap).desired()
}

/// The mesh destinations of one snapshot, counted (how many enrolled pods list each address,
/// how many Services each VIP), so that the next snapshot's changes update them in place.
#[derive(Debug, Default)]
pub(super) struct Listed {
    pods: HashMap<AmbAddrKey, u32>,
    vips: HashMap<AmbAddrKey, u32>,
}

impl Listed {
    /// Counts the destinations of `snap`.
    pub(super) fn of(snap: &Snapshot) -> Self {
        let mut l = Self::default();
        for w in snap.workloads.values() {
            l.count_pod(w, true, &mut Vec::new());
        }
        for s in snap.services.values() {
            l.count_service(s, true, &mut Vec::new());
        }
        l
    }

    /// The list: every address with its bits.
    pub(super) fn desired(&self) -> HashMap<AmbAddrKey, u32> {
        let mut d: HashMap<AmbAddrKey, u32> = HashMap::new();
        for k in self.pods.keys() {
            *d.entry(*k).or_default() |= MESH_DST_POD;
        }
        for k in self.vips.keys() {
            *d.entry(*k).or_default() |= MESH_DST_VIP;
        }
        d
    }

    /// Moves the counts from `old` to `new` and returns the destinations whose bits changed
    /// (`None`: no longer listed). Only the workloads and Services that differ are visited:
    /// snapshots that share their maps (the istiod source's) compare in O(changes).
    pub(super) fn change(
        &mut self,
        old: &Snapshot,
        new: &Snapshot,
    ) -> Vec<(AmbAddrKey, Option<u32>)> {
        let mut touched = Vec::new();
        for d in old.workloads.diff(&new.workloads) {
            match d {
                DiffItem::Add(_, w) => self.count_pod(w, true, &mut touched),
                DiffItem::Remove(_, w) => self.count_pod(w, false, &mut touched),
                DiffItem::Update {
                    old: (_, a),
                    new: (_, b),
                } => {
                    if a.enrolled != b.enrolled || a.ips != b.ips {
                        self.count_pod(a, false, &mut touched);
                        self.count_pod(b, true, &mut touched);
                    }
                }
            }
        }
        for d in old.services.diff(&new.services) {
            match d {
                DiffItem::Add(_, s) => self.count_service(s, true, &mut touched),
                DiffItem::Remove(_, s) => self.count_service(s, false, &mut touched),
                DiffItem::Update {
                    old: (_, a),
                    new: (_, b),
                } => {
                    if a.vips != b.vips {
                        self.count_service(a, false, &mut touched);
                        self.count_service(b, true, &mut touched);
                    }
                }
            }
        }
        touched.sort_unstable_by_key(|k: &AmbAddrKey| (k.family, k.addr));
        touched.dedup();
        touched
            .into_iter()
            .map(|k| {
                let bits = if self.pods.contains_key(&k) {
                    MESH_DST_POD
                } else {
                    0
                } | if self.vips.contains_key(&k) {
                    MESH_DST_VIP
                } else {
                    0
                };
                (k, (bits != 0).then_some(bits))
            })
            .collect()
    }

    fn count_pod(&mut self, w: &Workload, add: bool, touched: &mut Vec<AmbAddrKey>) {
        if w.enrolled {
            for ip in &w.ips {
                count(&mut self.pods, AmbAddrKey::destination(*ip), add, touched);
            }
        }
    }

    fn count_service(&mut self, s: &Service, add: bool, touched: &mut Vec<AmbAddrKey>) {
        for ip in &s.vips {
            count(&mut self.vips, AmbAddrKey::destination(*ip), add, touched);
        }
    }
}

fn count(
    counts: &mut HashMap<AmbAddrKey, u32>,
    k: AmbAddrKey,
    add: bool,
    touched: &mut Vec<AmbAddrKey>,
) {
    touched.push(k);
    if add {
        *counts.entry(k).or_default() += 1;
    } else if let Some(n) = counts.get_mut(&k) {
        *n -= 1;
        if *n == 0 {
            counts.remove(&k);
        }
    }
}

/// Syncs the kernel list with the current snapshot of `raw` and returns that snapshot.
pub(super) async fn sync_current(
    dp: &Arc<Datapath>,
    raw: &mut watch::Receiver<Arc<Snapshot>>,
    last: Option<SyncReport>,
) -> (Arc<Snapshot>, SyncReport) {
    let snap = raw.borrow_and_update().clone();
    let (d, s) = (dp.clone(), snap.clone());
    let report = match tokio::task::spawn_blocking(move || d.sync_mesh(&destinations(&s))).await {
        Ok(Some(r)) => r,
        Ok(None) => {
            tracing::debug!("not the current agent: the mesh list is left to the current one");
            return (snap, last.unwrap_or_default());
        }
        Err(e) => {
            tracing::error!(error = %e, "mesh destination sync task failed");
            SyncReport {
                failed: 1,
                ..SyncReport::default()
            }
        }
    };
    log_report(&report, last, true);
    (snap, report)
}

/// Logs what a sync or update wrote (and what it could not): at info level a full sync that
/// wrote anything and a change of the wildcard, at debug level the updates of single changes.
fn log_report(report: &SyncReport, last: Option<SyncReport>, full: bool) {
    let flipped = last.is_none_or(|l| l.wildcard != report.wildcard);
    let changed = report.put + report.removed > 0 && full || flipped;
    if report.failed > 0 {
        tracing::warn!(
            listed = report.entries,
            failed = report.failed,
            capture_all = report.wildcard,
            "mesh destination list incomplete"
        );
    } else if changed {
        tracing::info!(
            listed = report.entries,
            added = report.put,
            removed = report.removed,
            capture_all = report.wildcard,
            "mesh destinations synced"
        );
    } else if report.put + report.removed > 0 {
        tracing::debug!(
            listed = report.entries,
            added = report.put,
            removed = report.removed,
            "mesh destinations updated"
        );
    }
}

/// Forwards each snapshot of `raw` to `tx` once the kernel list reflects it, until `raw`'s
/// sender goes away (then `tx` drops and its receivers see the end). `first` is the snapshot
/// [`sync_current`] wrote; each later one writes only the destinations that changed.
pub(super) async fn follow(
    dp: Arc<Datapath>,
    mut raw: watch::Receiver<Arc<Snapshot>>,
    tx: watch::Sender<Arc<Snapshot>>,
    first: Arc<Snapshot>,
    mut last: SyncReport,
) {
    let mut prev = first;
    let mut listed = Listed::of(&prev);
    while raw.changed().await.is_ok() {
        let snap = raw.borrow_and_update().clone();
        let changes = listed.change(&prev, &snap);
        if !changes.is_empty() {
            let d = dp.clone();
            let report = match tokio::task::spawn_blocking(move || d.update_mesh(&changes)).await {
                Ok(Some(r)) => Some(r),
                Ok(None) => {
                    tracing::debug!(
                        "not the current agent: the mesh list is left to the current one"
                    );
                    None
                }
                Err(e) => {
                    tracing::error!(error = %e, "mesh destination update task failed");
                    Some(SyncReport {
                        failed: 1,
                        ..SyncReport::default()
                    })
                }
            };
            if let Some(r) = report {
                log_report(&r, Some(last), false);
                last = r;
            }
        }
        prev = snap.clone();
        tx.send_replace(snap);
    }
}

#[cfg(test)]
mod tests;
