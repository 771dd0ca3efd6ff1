//! Mesh destinations: the addresses that mesh-only pods' connects must take through the agent (`amb_mesh_dsts`), written as the caller lists them.
//!
//! With `capture.meshOnly` (the default), connect4/6 redirect an enrolled pod's connect only
//! when its destination is listed here; anything else goes straight to the destination, from
//! the pod's own address, as the agent's plaintext pass-through would have sent it.
//!
//! Invariants:
//! - The list is every destination for which the agent's routing can decide anything but
//!   plaintext pass-through to the address the app dialled: every enrolled pod's address on any
//!   node (tunnel, or PeerAuthentication/DestinationRule decisions) and every Service virtual
//!   IP (only the agent resolves it; there is no kube-proxy; an empty or unknown port is refused).
//! - Every snapshot is written to the kernel before the pod manager or the proxies see it
//!   (`app::mesh::follow`, which also computes the list from the inventory): a pod is never
//!   enrolled mesh-only against a list that lacks a destination the same snapshot puts in the mesh.
//! - When the list does not fit, the wildcard entry (all-zero key) makes connect4/6 capture
//!   every destination again: an incomplete list costs speed, never a bypass of the mesh.
//! - The map is pinned: after the agent dies the last list stays, so mesh destinations fail
//!   closed (the redirect meets no listener) while other destinations keep working.
//! - Only the current agent of the pin directory writes the list ([`super::handover`]); one
//!   that takes the node back re-reads the map first ([`Datapath::resync_mesh`]).
use std::collections::HashMap;

use aya::maps::{HashMap as BpfHashMap, MapData, MapError};

use super::maps::{AmbAddrKey, MAX_MESH_DSTS, MESH_DST_ALL};
use super::{ignore_missing, lock, Datapath};

/// What one sync changes in the kernel map.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Entries to write (new, or with other bits), in address order.
    pub put: Vec<(AmbAddrKey, u32)>,
    /// Entries to delete, in address order (never the wildcard: [`MeshDsts::sync`] decides it).
    pub remove: Vec<AmbAddrKey>,
}

/// The difference between the `installed` map and the `desired` list.
pub fn plan(installed: &HashMap<AmbAddrKey, u32>, desired: &HashMap<AmbAddrKey, u32>) -> Plan {
    let order = |k: &AmbAddrKey| (k.family, k.addr.map(u32::from_be));
    let mut put: Vec<(AmbAddrKey, u32)> = desired
        .iter()
        .filter(|(k, v)| installed.get(*k) != Some(*v))
        .map(|(k, v)| (*k, *v))
        .collect();
    put.sort_by_key(|(k, _)| order(k));
    let mut remove: Vec<AmbAddrKey> = installed
        .keys()
        .filter(|k| **k != AmbAddrKey::WILDCARD && !desired.contains_key(*k))
        .copied()
        .collect();
    remove.sort_by_key(order);
    Plan { put, remove }
}

/// The outcome of one sync.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SyncReport {
    /// Entries written.
    pub put: usize,
    /// Entries deleted.
    pub removed: usize,
    /// Destinations listed after the sync (without the wildcard).
    pub entries: usize,
    /// Destinations that could not be written or deleted.
    pub failed: usize,
    /// Whether the wildcard is set: mesh-only pods capture everything.
    pub wildcard: bool,
}

/// The mesh list in `/status`.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct MeshSummary {
    /// `capture.meshOnly`: enrolled pods' connects to anything else go direct.
    pub mesh_only: bool,
    /// Destinations listed (pod addresses on every node and Service VIPs).
    pub destinations: usize,
    /// Room in `amb_mesh_dsts`.
    pub capacity: usize,
    /// The capture-everything entry is set (the list is incomplete or full).
    pub capture_everything: bool,
}

/// The kernel map as [`MeshDsts`] uses it (a fake in unit tests).
pub trait DstMap: Send {
    /// Writes one entry.
    fn put(&mut self, k: AmbAddrKey, v: u32) -> Result<(), MapError>;
    /// Deletes one entry.
    fn delete(&mut self, k: &AmbAddrKey) -> Result<(), MapError>;
}

impl DstMap for BpfHashMap<MapData, AmbAddrKey, u32> {
    fn put(&mut self, k: AmbAddrKey, v: u32) -> Result<(), MapError> {
        self.insert(k, v, 0)
    }
    fn delete(&mut self, k: &AmbAddrKey) -> Result<(), MapError> {
        self.remove(k)
    }
}

/// `amb_mesh_dsts` and what this agent last wrote to it.
pub struct MeshDsts<M = BpfHashMap<MapData, AmbAddrKey, u32>> {
    map: M,
    installed: HashMap<AmbAddrKey, u32>,
    capacity: usize,
    /// Destinations of the last list that could not be written (no room, or a failed write):
    /// while any is, the wildcard stays set.
    missing: HashMap<AmbAddrKey, u32>,
}

impl MeshDsts {
    /// Wraps the (possibly pinned, non-empty) map, reading what it holds.
    pub fn new(map: BpfHashMap<MapData, AmbAddrKey, u32>) -> Self {
        let installed = map.iter().filter_map(Result::ok).collect();
        Self::with(map, installed, MAX_MESH_DSTS)
    }

    /// Reads what the map holds again (another agent may have written it).
    fn reload(&mut self) {
        self.installed = self.map.iter().filter_map(Result::ok).collect();
    }
}

impl<M: DstMap> MeshDsts<M> {
    /// A list over `map`, which holds `installed` and has room for `capacity` entries.
    pub fn with(map: M, installed: HashMap<AmbAddrKey, u32>, capacity: usize) -> Self {
        Self {
            map,
            installed,
            capacity,
            missing: HashMap::new(),
        }
    }

    /// Brings the map in line with `desired`: deletions first (they free room), then writes; the
    /// wildcard is set when anything is missing and cleared once the list is complete.
    pub fn sync(&mut self, desired: &HashMap<AmbAddrKey, u32>) -> SyncReport {
        let p = plan(&self.installed, desired);
        let mut r = SyncReport::default();
        for k in p.remove {
            match ignore_missing(self.map.delete(&k)) {
                Ok(()) => {
                    self.installed.remove(&k);
                    r.removed += 1;
                }
                Err(e) => {
                    r.failed += 1;
                    tracing::warn!(dst = ?k.ip(), error = %e, "cannot delete a mesh destination");
                }
            }
        }
        for (k, v) in p.put {
            self.put(k, v, &mut r);
        }
        self.missing = desired
            .iter()
            .filter(|(k, v)| self.installed.get(*k) != Some(*v))
            .map(|(k, v)| (*k, *v))
            .collect();
        self.finish(r)
    }

    /// Applies the changes of some destinations since the last list (`None`: no longer
    /// listed), touching only their entries; destinations missing from an incomplete list are
    /// tried again when a deletion makes room. Deletions first, then writes, as [`Self::sync`].
    pub fn apply(&mut self, changes: &[(AmbAddrKey, Option<u32>)]) -> SyncReport {
        let mut r = SyncReport::default();
        let mut puts = Vec::new();
        for (k, v) in changes.iter().filter(|(k, _)| *k != AmbAddrKey::WILDCARD) {
            self.missing.remove(k);
            match v {
                None if self.installed.contains_key(k) => {
                    match ignore_missing(self.map.delete(k)) {
                        Ok(()) => {
                            self.installed.remove(k);
                            r.removed += 1;
                        }
                        Err(e) => {
                            r.failed += 1;
                            tracing::warn!(dst = ?k.ip(), error = %e, "cannot delete a mesh destination");
                        }
                    }
                }
                None => {}
                Some(v) if self.installed.get(k) != Some(v) => puts.push((*k, *v)),
                Some(_) => {}
            }
        }
        if r.removed > 0 && !self.missing.is_empty() {
            puts.extend(self.missing.drain());
        }
        for (k, v) in puts {
            self.put(k, v, &mut r);
        }
        self.finish(r)
    }

    /// Writes one destination if there is room (one slot stays free for the wildcard); what
    /// cannot be written is counted and kept as missing.
    fn put(&mut self, k: AmbAddrKey, v: u32, r: &mut SyncReport) {
        let new = !self.installed.contains_key(&k);
        if new && self.listed() >= self.capacity.saturating_sub(1) {
            r.failed += 1;
            self.missing.insert(k, v);
            return;
        }
        match self.map.put(k, v) {
            Ok(()) => {
                self.installed.insert(k, v);
                r.put += 1;
            }
            Err(e) => {
                r.failed += 1;
                self.missing.insert(k, v);
                tracing::warn!(dst = ?k.ip(), error = %e, "cannot list a mesh destination");
            }
        }
    }

    /// Sets the wildcard while anything is missing, clears it once nothing is.
    fn finish(&mut self, mut r: SyncReport) -> SyncReport {
        r.wildcard = if self.missing.is_empty() {
            self.clear_wildcard();
            self.installed.contains_key(&AmbAddrKey::WILDCARD)
        } else {
            self.set_wildcard()
        };
        r.entries = self.listed();
        r
    }

    /// Destinations listed, without the wildcard.
    fn listed(&self) -> usize {
        self.installed.len() - usize::from(self.installed.contains_key(&AmbAddrKey::WILDCARD))
    }

    fn set_wildcard(&mut self) -> bool {
        if self.installed.contains_key(&AmbAddrKey::WILDCARD) {
            return true;
        }
        match self.map.put(AmbAddrKey::WILDCARD, MESH_DST_ALL) {
            Ok(()) => {
                self.installed.insert(AmbAddrKey::WILDCARD, MESH_DST_ALL);
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot set the capture-everything entry of amb_mesh_dsts: mesh-only pods may reach unlisted mesh destinations directly");
                false
            }
        }
    }

    fn clear_wildcard(&mut self) {
        if !self.installed.contains_key(&AmbAddrKey::WILDCARD) {
            return;
        }
        match ignore_missing(self.map.delete(&AmbAddrKey::WILDCARD)) {
            Ok(()) => {
                self.installed.remove(&AmbAddrKey::WILDCARD);
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot clear the capture-everything entry of amb_mesh_dsts")
            }
        }
    }
}

impl Datapath {
    /// Brings `amb_mesh_dsts` in line with `desired` while this agent is current (`None`, and
    /// nothing written, otherwise).
    pub fn sync_mesh(&self, desired: &HashMap<AmbAddrKey, u32>) -> Option<SyncReport> {
        self.handover
            .with_current(|| lock(&self.mesh).sync(desired))
    }

    /// Applies the changes of some destinations to `amb_mesh_dsts` ([`MeshDsts::apply`]) while
    /// this agent is current (`None`, and nothing written, otherwise).
    pub fn update_mesh(&self, changes: &[(AmbAddrKey, Option<u32>)]) -> Option<SyncReport> {
        self.handover
            .with_current(|| lock(&self.mesh).apply(changes))
    }

    /// Like [`Datapath::sync_mesh`], after reading what the map holds now: for an agent
    /// taking the node back from one that wrote it meanwhile.
    pub fn resync_mesh(&self, desired: &HashMap<AmbAddrKey, u32>) -> Option<SyncReport> {
        self.handover.with_current(|| {
            let mut m = lock(&self.mesh);
            m.reload();
            m.sync(desired)
        })
    }

    /// What `/status` shows of the mesh list: whether it is used, its size, the wildcard.
    pub fn mesh_summary(&self) -> MeshSummary {
        let m = lock(&self.mesh);
        MeshSummary {
            mesh_only: self.mesh_only,
            destinations: m.listed(),
            capacity: m.capacity,
            capture_everything: m.installed.contains_key(&AmbAddrKey::WILDCARD),
        }
    }

    /// The destinations listed in `amb_mesh_dsts` (as this agent wrote them), with their bits.
    pub fn mesh_dsts(&self) -> Vec<(AmbAddrKey, u32)> {
        let m = lock(&self.mesh);
        let mut v: Vec<_> = m.installed.iter().map(|(k, v)| (*k, *v)).collect();
        v.sort_by_key(|(k, _)| (k.family, k.addr.map(u32::from_be)));
        v
    }
}

#[cfg(test)]
mod tests;
