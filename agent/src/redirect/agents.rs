//! The agents' cgroups in the kernel (`amb_agent_cgs`): who may use the agent's marks and ports.
//!
//! An agent mark (SO_MARK) exempts a socket from capture only when the task connecting it is in
//! a cgroup listed here: SO_MARK needs only CAP_NET_RAW, which containers have by default, while
//! a pod cannot put its processes into another cgroup. The map is pinned and shared: during a
//! restart hand-over the old agent's programs run beside the new agent's, and in Kubernetes the
//! new agent's pod has another cgroup, so each agent adds its own cgroup at start and removes
//! entries whose cgroup is gone or empty (a former agent's). It never removes its own, nor an
//! entry it cannot decide about.
use std::path::PathBuf;

use aya::maps::{HashMap as BpfHashMap, MapData, MapError};

use crate::cgroups::{self, Liveness};

/// Errors registering the agent's cgroup.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The agent's cgroup id cannot be added: its own sockets would be captured, so it must
    /// not run.
    #[error(
        "cannot add the agent's cgroup {} (id {id}) to amb_agent_cgs ({entries} entries)",
        path.display()
    )]
    Register {
        path: PathBuf,
        id: u64,
        entries: usize,
        #[source]
        source: Box<MapError>,
    },
}

/// This agent's entry in `amb_agent_cgs` and the upkeep of the others.
pub struct AgentCgroups {
    map: BpfHashMap<MapData, u64, u32>,
    /// This agent's cgroup id.
    own: u64,
    /// The cgroup2 tree the agents live in, searched for other entries' cgroups.
    root: PathBuf,
}

impl AgentCgroups {
    /// Removes entries of agents that are gone, then adds this agent's cgroup `path` (id `own`).
    pub fn register(
        map: BpfHashMap<MapData, u64, u32>,
        root: PathBuf,
        path: PathBuf,
        own: u64,
    ) -> Result<Self, Error> {
        let mut me = Self { map, own, root };
        me.sweep();
        if let Err(e) = me.map.insert(own, std::process::id(), 0) {
            return Err(Error::Register {
                path,
                id: own,
                entries: me.ids().len(),
                source: Box::new(e),
            });
        }
        Ok(me)
    }

    /// Removes the entries of other agents whose cgroup no longer exists or holds no process;
    /// returns their ids. Cheap when this agent is the only one (no tree walk).
    pub fn sweep(&mut self) -> Vec<u64> {
        let others: Vec<u64> = self.ids().into_iter().filter(|i| *i != self.own).collect();
        let mut removed = Vec::new();
        for id in others {
            match cgroups::liveness(&self.root, id) {
                Ok(Liveness::Populated(_)) => {}
                Ok(Liveness::Empty(_) | Liveness::Gone) => {
                    if self.map.remove(&id).is_ok() {
                        removed.push(id);
                    }
                }
                Err(e) => {
                    // Undecided: keep it. A stale entry names a cgroup no pod runs in.
                    tracing::warn!(cgroup.id = id, cgroup.root = %self.root.display(), error = %e, "cannot check an agent cgroup; kept");
                }
            }
        }
        removed
    }

    /// Every cgroup id in the map.
    fn ids(&self) -> Vec<u64> {
        self.map.keys().filter_map(Result::ok).collect()
    }
}
