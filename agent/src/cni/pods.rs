//! The pods the CNI plugin reported on this node, persisted so a restarted agent finds them again.
//!
//! The map is keyed by sandbox (container) id: a pod whose sandbox is recreated has two entries
//! until the old sandbox's DEL, and the newest ADD wins. It is rewritten (temp file + rename)
//! on every change, so a crash leaves either the old or the new map, never half of one.
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{CniCommand, CniEvent, NetnsId, PodRef};

/// Format version of the map file.
const VERSION: u32 = 1;

/// Errors reading or writing the pod map.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The map file exists but could not be read.
    #[error("cannot read CNI pod map {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The map file is not a map this agent understands.
    #[error("CNI pod map {} is malformed", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// The map file has a newer format.
    #[error("CNI pod map {} has format version {found}, this agent reads {VERSION}", path.display())]
    Version { path: PathBuf, found: u32 },
    /// The map could not be saved.
    #[error("cannot write CNI pod map {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One pod sandbox reported by the plugin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CniPod {
    /// Sandbox (container) id.
    pub container_id: String,
    /// The pod.
    pub pod: PodRef,
    /// Network namespace path.
    pub netns: PathBuf,
    /// Addresses the interface plugin assigned.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    /// The namespace's identity when it was reported, to notice a path reused by another one.
    #[serde(default)]
    pub netns_id: Option<NetnsId>,
    /// Order of ADDs: the highest wins when a pod has several sandboxes.
    pub seq: u64,
}

/// What [`PodMap::resync`] found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Resync {
    /// Entries whose namespace still exists.
    pub kept: usize,
    /// `namespace/name (container id)` of entries dropped because their namespace is gone.
    pub removed: Vec<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct File {
    version: u32,
    pods: Vec<CniPod>,
}

/// The persisted map of CNI-reported pods, with a watch channel of its contents.
pub struct PodMap {
    path: PathBuf,
    pods: Mutex<BTreeMap<String, CniPod>>,
    tx: watch::Sender<Arc<Vec<CniPod>>>,
}

impl PodMap {
    /// Loads the map at `path`; a missing file is an empty map.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let pods = match std::fs::read(path) {
            Ok(bytes) => {
                let file: File = serde_json::from_slice(&bytes).map_err(|source| Error::Parse {
                    path: path.to_path_buf(),
                    source,
                })?;
                if file.version > VERSION {
                    return Err(Error::Version {
                        path: path.to_path_buf(),
                        found: file.version,
                    });
                }
                file.pods
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source) => {
                return Err(Error::Read {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        let pods: BTreeMap<String, CniPod> = pods
            .into_iter()
            .map(|p| (p.container_id.clone(), p))
            .collect();
        let (tx, _) = watch::channel(Arc::new(pods.values().cloned().collect()));
        Ok(Self {
            path: path.to_path_buf(),
            pods: Mutex::new(pods),
            tx,
        })
    }

    /// Drops entries whose namespace is gone (or is now another namespace) and saves the map.
    /// Run once at startup: pods that lived on through an agent restart stay known.
    pub fn resync(&self) -> Result<Resync, Error> {
        let mut pods = self.lock();
        let mut out = Resync::default();
        pods.retain(|_, p| {
            let alive = match std::fs::metadata(&p.netns) {
                Ok(md) => p
                    .netns_id
                    .is_none_or(|id| (id.dev, id.ino) == (md.dev(), md.ino())),
                Err(_) => false,
            };
            if !alive {
                out.removed
                    .push(format!("{} ({})", p.pod.key(), p.container_id));
            }
            alive
        });
        out.kept = pods.len();
        self.save(&pods)?;
        Ok(out)
    }

    /// Records an ADD or CHECK (the sandbox exists) or a DEL (it is gone) and saves the map.
    /// Returns whether the map changed. Events without a netns path record nothing on ADD.
    pub fn apply(&self, event: &CniEvent) -> Result<bool, Error> {
        let mut pods = self.lock();
        let changed = match event.command {
            CniCommand::Del => pods.remove(&event.container_id).is_some(),
            CniCommand::Add | CniCommand::Check => {
                let Some(netns) = event.netns.clone() else {
                    return Ok(false);
                };
                let existing = pods.get(&event.container_id);
                let unchanged = existing.is_some_and(|p| {
                    p.pod == event.pod
                        && p.netns == netns
                        && p.ips == event.ips
                        && p.netns_id == event.netns_id
                });
                // CHECK confirms what ADD recorded; it never creates or reorders entries.
                if unchanged || (event.command == CniCommand::Check && existing.is_none()) {
                    false
                } else {
                    let seq = match existing {
                        Some(p) => p.seq,
                        None => pods.values().map(|p| p.seq).max().unwrap_or(0) + 1,
                    };
                    pods.insert(
                        event.container_id.clone(),
                        CniPod {
                            container_id: event.container_id.clone(),
                            pod: event.pod.clone(),
                            netns,
                            ips: event.ips.clone(),
                            netns_id: event.netns_id,
                            seq,
                        },
                    );
                    true
                }
            }
        };
        if changed {
            self.save(&pods)?;
        }
        Ok(changed)
    }

    /// The current entries.
    pub fn pods(&self) -> Arc<Vec<CniPod>> {
        self.tx.borrow().clone()
    }

    /// Follows the entries as they change.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Vec<CniPod>>> {
        self.tx.subscribe()
    }

    /// The map file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn save(&self, pods: &BTreeMap<String, CniPod>) -> Result<(), Error> {
        let list: Vec<CniPod> = pods.values().cloned().collect();
        let file = File {
            version: VERSION,
            pods: list.clone(),
        };
        // Serializing plain structs of strings and numbers cannot fail.
        let bytes = serde_json::to_vec_pretty(&file).unwrap_or_default();
        let err = |source| Error::Write {
            path: self.path.clone(),
            source,
        };
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let mut tmp = self.path.clone().into_os_string();
        tmp.push(".tmp");
        std::fs::write(&tmp, bytes).map_err(err)?;
        std::fs::rename(&tmp, &self.path).map_err(err)?;
        self.tx.send_if_modified(|cur| {
            let changed = **cur != list;
            if changed {
                *cur = Arc::new(list);
            }
            changed
        });
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, CniPod>> {
        self.pods.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests;
