//! Keeps the kernel's mesh-destination list (`amb_mesh_dsts`) in step with the inventory: each
//! snapshot is written to the kernel before the pod manager and the proxies see it.
use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::watch;

use crate::inventory::Snapshot;
use crate::redirect::maps::{AmbAddrKey, MESH_DST_POD, MESH_DST_VIP};
use crate::redirect::mesh::SyncReport;
use crate::redirect::Datapath;

/// Addresses that must go through the agent, with the `MESH_DST_*` bits saying why.
pub(super) fn destinations(snap: &Snapshot) -> HashMap<AmbAddrKey, u32> {
    let mut d: HashMap<AmbAddrKey, u32> = HashMap::new();
    for w in snap.workloads.values().filter(|w| w.enrolled) {
        for ip in &w.ips {
            *d.entry(AmbAddrKey::destination(*ip)).or_default() |= MESH_DST_POD;
        }
    }
    for s in snap.services.values() {
        for ip in &s.vips {
            *d.entry(AmbAddrKey::destination(*ip)).or_default() |= MESH_DST_VIP;
        }
    }
    d
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
    let changed =
        report.put + report.removed > 0 || last.is_none_or(|l| l.wildcard != report.wildcard);
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
    }
    (snap, report)
}

/// Forwards each snapshot of `raw` to `tx` once the kernel list reflects it, until `raw`'s
/// sender goes away (then `tx` drops and its receivers see the end).
pub(super) async fn follow(
    dp: Arc<Datapath>,
    mut raw: watch::Receiver<Arc<Snapshot>>,
    tx: watch::Sender<Arc<Snapshot>>,
    mut last: SyncReport,
) {
    while raw.changed().await.is_ok() {
        let (snap, report) = sync_current(&dp, &mut raw, Some(last)).await;
        last = report;
        tx.send_replace(snap);
    }
}

#[cfg(test)]
mod tests;
