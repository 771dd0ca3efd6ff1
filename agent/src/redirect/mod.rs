//! The eBPF datapath: load, pin and attach the kernel programs; enroll pods; read counters.
//!
//! Invariants:
//! - Maps and links are pinned under the instance's bpffs directory, so the programs stay
//!   attached when the agent exits: captured pods then fail closed (connect to a closed
//!   listener, inbound SYNs dropped by sk_lookup) instead of bypassing the mesh.
//! - A pod is enrolled in the kernel only after its listeners exist: listener sockets first,
//!   then the capture flags, then the pod's own sk_lookup program and link (`lookup.rs`).
//!   Unenrollment reverses it.
//! - A socket is the agent's own only if it carries an agent mark *and* was connected by a task
//!   in an agent cgroup (`agents.rs`); the agent registers its cgroup before any socket exists.
//! - On restart, new links are attached before the old pins are replaced, so capture never lapses.
//! - Of several agents sharing the pin directory only the current one writes shared kernel
//!   state (map entries, pins); see [`handover`].
pub mod agents;
pub mod events;
pub mod handover;
pub mod lookup;
pub mod maps;
pub mod mesh;

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use aya::maps::{HashMap as BpfHashMap, MapData, MapError, PerCpuArray, RingBuf, SockHash};
use aya::programs::links::FdLink;
use aya::programs::{CgroupAttachMode, CgroupSockAddr, CgroupSockopt, ProgramError, SockOps};
use aya::Ebpf;

use crate::addr::{ClientAddr, OrigDstAddr};
use crate::config::Config;
use crate::sys::{self, Netns};
use handover::{pin_link, remove_pin};
use maps::{AmbBypassKey, AmbConnKey, AmbListenerKey, AmbOrigDst, AmbPod, AmbPodStats, STAT_NAMES};

/// The kernel programs, compiled from agent-ebpf by build.rs.
pub static BPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ambit.bpf.o"));

/// Program (C function) names in the object.
pub const PROGRAMS: &[&str] = &[
    "connect4",
    "connect6",
    "getpeername4",
    "getpeername6",
    "sockops_est",
    "getsockopt_orig",
    "lookup_steer",
    "bind4",
    "bind6",
];

/// `BPF_NOEXIST` for map inserts.
const BPF_NOEXIST: u64 = 1;

/// Errors of the datapath; each names the program, map, cgroup or pod involved.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The object failed to load (verifier, BTF, map creation or pinning).
    #[error("failed to load the kernel programs (pin dir {})", pin_dir.display())]
    Load {
        pin_dir: PathBuf,
        #[source]
        source: Box<aya::EbpfError>,
    },
    /// A program is missing or has an unexpected type.
    #[error("program {program} is missing or has the wrong type")]
    Program { program: &'static str },
    /// Loading one program into the kernel failed.
    #[error("failed to load program {program}")]
    ProgramLoad {
        program: &'static str,
        #[source]
        source: ProgramError,
    },
    /// Attaching a program failed.
    #[error("failed to attach {program} to {}", target.display())]
    Attach {
        program: &'static str,
        target: PathBuf,
        #[source]
        source: ProgramError,
    },
    /// A link could not be turned into a pinnable fd link.
    #[error("link of {program} cannot be pinned")]
    Link {
        program: &'static str,
        #[source]
        source: aya::programs::links::LinkError,
    },
    /// Pinning or unpinning a link failed.
    #[error("failed to pin link {}", path.display())]
    Pin {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A map is missing or has an unexpected layout.
    #[error("map {map} is missing or its layout differs from the agent's")]
    Map {
        map: &'static str,
        #[source]
        source: Option<Box<MapError>>,
    },
    /// A map operation failed.
    #[error("map {map}: {op} failed for pod {pod}")]
    MapOp {
        map: &'static str,
        op: &'static str,
        pod: String,
        #[source]
        source: Box<MapError>,
    },
    /// A cgroup or bpffs path could not be used.
    #[error(transparent)]
    Sys(#[from] sys::Error),
    /// Opening a cgroup directory failed.
    #[error("cannot open cgroup {}", path.display())]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The hand-over directory (which agent is current) failed.
    #[error(transparent)]
    Handover(#[from] handover::Error),
    /// A socket to read a pod's netns cookie could not be made in it.
    #[error("cannot make a socket in the network namespace {}", path.display())]
    NetnsSocket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A pod's sk_lookup program was loaded for another network namespace than the one it is
    /// enrolled with (the namespace was replaced in between).
    #[error("sk_lookup program of pod {pod} was loaded for netns cookie {loaded}, the pod's is {enrolled}")]
    LookupNetns {
        pod: String,
        loaded: u64,
        enrolled: u64,
    },
    /// The agent's cgroup could not be registered in the kernel.
    #[error(transparent)]
    AgentCgroup(#[from] agents::Error),
}

/// A pod as the kernel programs know it.
#[derive(Debug, Clone)]
pub struct PodEntry {
    /// `namespace/name`, for errors and logs.
    pub key: String,
    /// Network-namespace cookie.
    pub netns_cookie: u64,
    /// The kernel-side pod record (id, flags, skip lists).
    pub pod: AmbPod,
}

struct Maps {
    pods: BpfHashMap<MapData, u64, AmbPod>,
    pod_stats: BpfHashMap<MapData, u64, AmbPodStats>,
    listeners: SockHash<MapData, AmbListenerKey>,
    conns: BpfHashMap<MapData, AmbConnKey, AmbOrigDst>,
    stats: PerCpuArray<MapData, u64>,
}

/// The loaded and attached kernel programs of one agent instance.
pub struct Datapath {
    // Held: it owns the programs and getsockopt_orig's (unpinnable) links.
    _bpf: Ebpf,
    maps: Mutex<Maps>,
    bypass: Mutex<BpfHashMap<MapData, AmbBypassKey, u32>>,
    mesh: Mutex<mesh::MeshDsts>,
    agents: Mutex<agents::AgentCgroups>,
    /// The settings every load of the object gets (the per-pod sk_lookup copies too).
    globals: lookup::Globals,
    /// `capture.meshOnly`: enrolled pods get `POD_F_MESH_ONLY`.
    mesh_only: bool,
    links_dir: PathBuf,
    lookup_links: Mutex<HashMap<u64, FdLink>>,
    /// This agent's cgroup links with their pin paths, held so they stay attached while it
    /// runs even after a newer agent replaced the pins, and re-pinned when it takes the node
    /// back (`None` once a re-pin failed).
    cgroup_links: Mutex<Vec<(PathBuf, Option<FdLink>)>>,
    /// Which agent sharing the pin directory is current.
    handover: handover::Handover,
}

/// Loads the cgroup program `$name` of type `$ty`, attaches it at the cgroup `$cg` (an open
/// `File`, and its path for errors) and pins the link under `$dir`. A macro because aya's
/// program and link types share no trait for `load`, `attach` and `take_link`.
macro_rules! attach_pinned {
    ($bpf:expr, $ty:ty, $name:expr, ($cg:expr, $path:expr), $dir:expr) => {{
        let name: &'static str = $name;
        let prog: &mut $ty = program(&mut $bpf, name)?;
        prog.load().map_err(|source| Error::ProgramLoad {
            program: name,
            source,
        })?;
        let attach_err = |source| Error::Attach {
            program: name,
            target: $path.into(),
            source,
        };
        let id = prog
            .attach($cg, CgroupAttachMode::Single)
            .map_err(attach_err)?;
        let link = prog.take_link(id).map_err(attach_err)?;
        let fd = FdLink::try_from(link).map_err(|source| Error::Link {
            program: name,
            source,
        })?;
        pin_link(fd, &$dir.join(name))?
    }};
}

impl Datapath {
    /// Loads the programs with `cfg`'s marks and ports, pins maps under `cfg.bpf_pin_dir`
    /// (reusing maps pinned by a previous agent), registers `agent_cgroup` as an agent's (its
    /// tasks' sockets may use the agent's marks and ports), and attaches the cgroup programs at
    /// `pods_cgroup` (and `getsockopt_orig` also at `agent_cgroup` if it is outside it).
    /// `cgroup_root` is the cgroup2 tree the agents live in. Returns the datapath and the event
    /// ring buffer.
    pub fn load(
        cfg: &Config,
        cgroup_root: &Path,
        pods_cgroup: &Path,
        agent_cgroup: &Path,
    ) -> Result<(Self, RingBuf<MapData>), Error> {
        let pin_dir = &cfg.bpf_pin_dir;
        if pin_dir.starts_with("/sys/fs/bpf") {
            sys::ensure_bpffs(Path::new("/sys/fs/bpf"))?;
        }
        // Before anything is pinned or written: the agent that was current stops writing.
        let handover = handover::Handover::claim(pin_dir)?;
        let links_dir = pin_dir.join("links");
        std::fs::create_dir_all(&links_dir).map_err(|source| Error::Pin {
            path: links_dir.clone(),
            source,
        })?;
        let agent_cgroup_id = crate::cgroups::id(agent_cgroup).map_err(|source| Error::Cgroup {
            path: agent_cgroup.into(),
            source,
        })?;
        let globals = lookup::Globals::new(cfg);
        let mut bpf = globals
            .loader()
            .load(BPF_OBJECT)
            .map_err(|source| Error::Load {
                pin_dir: pin_dir.clone(),
                source: Box::new(source),
            })?;
        // Before any program is attached: the old agent's programs (if any) already read the
        // pinned map, and this agent's sockets must pass both.
        let agents = agents::AgentCgroups::register(
            take_map(&mut bpf, "amb_agent_cgs")?,
            cgroup_root.to_path_buf(),
            agent_cgroup.to_path_buf(),
            agent_cgroup_id,
        )?;

        let pods_cg = File::open(pods_cgroup).map_err(|source| Error::Cgroup {
            path: pods_cgroup.into(),
            source,
        })?;
        let mut links = Vec::new();
        for name in [
            "connect4",
            "connect6",
            "getpeername4",
            "getpeername6",
            "bind4",
            "bind6",
        ] {
            let link = attach_pinned!(
                bpf,
                CgroupSockAddr,
                name,
                (&pods_cg, pods_cgroup),
                links_dir
            );
            links.push((links_dir.join(name), Some(link)));
        }
        let link = attach_pinned!(
            bpf,
            SockOps,
            "sockops_est",
            (&pods_cg, pods_cgroup),
            links_dir
        );
        links.push((links_dir.join("sockops_est"), Some(link)));
        {
            let name = "getsockopt_orig";
            let prog: &mut CgroupSockopt = program(&mut bpf, name)?;
            prog.load().map_err(|source| Error::ProgramLoad {
                program: name,
                source,
            })?;
            let mut targets = vec![pods_cgroup.to_path_buf()];
            if !agent_cgroup.starts_with(pods_cgroup) {
                targets.push(agent_cgroup.to_path_buf());
            }
            // aya 0.14 cannot pin this link type; it stays owned by the Ebpf object and
            // detaches when the agent exits, which is harmless: only the agent asks for
            // SO_ORIGINAL_DST.
            for target in &targets {
                let cg = File::open(target).map_err(|source| Error::Cgroup {
                    path: target.clone(),
                    source,
                })?;
                prog.attach(&cg, CgroupAttachMode::Single)
                    .map_err(|source| Error::Attach {
                        program: name,
                        target: target.clone(),
                        source,
                    })?;
            }
        }
        let maps = Maps {
            pods: take_map(&mut bpf, "amb_pods")?,
            pod_stats: take_map(&mut bpf, "amb_pod_stats")?,
            listeners: take_map(&mut bpf, "amb_listeners")?,
            conns: take_map(&mut bpf, "amb_conns")?,
            stats: take_map(&mut bpf, "amb_stats")?,
        };
        let bypass = take_map(&mut bpf, "amb_bypass")?;
        let mesh = mesh::MeshDsts::new(take_map(&mut bpf, "amb_mesh_dsts")?);
        let events: RingBuf<MapData> = take_map(&mut bpf, "amb_events")?;
        let dp = Self {
            _bpf: bpf,
            maps: Mutex::new(maps),
            bypass: Mutex::new(bypass),
            mesh: Mutex::new(mesh),
            agents: Mutex::new(agents),
            globals,
            mesh_only: cfg.capture.mesh_only,
            links_dir,
            lookup_links: Mutex::new(HashMap::new()),
            cgroup_links: Mutex::new(links),
            handover,
        };
        Ok((dp, events))
    }

    /// Registers a pod's inbound listener for `family` (AF_INET or AF_INET6) in the SOCKHASH
    /// (only while this agent is current; otherwise nothing happens).
    pub fn add_listener(
        &self,
        key: &str,
        netns_cookie: u64,
        family: u8,
        listener: &impl AsRawFd,
    ) -> Result<(), Error> {
        let k = AmbListenerKey {
            netns_cookie,
            family: u32::from(family),
            _pad: 0,
        };
        let insert = || {
            lock(&self.maps)
                .listeners
                .insert(k, listener.as_raw_fd(), 0)
        };
        match self.handover.with_current(insert) {
            None | Some(Ok(())) => Ok(()),
            Some(Err(source)) => Err(Error::MapOp {
                map: "amb_listeners",
                op: "insert",
                pod: key.to_string(),
                source: Box::new(source),
            }),
        }
    }

    /// Loads a pod's own copy of sk_lookup for its namespace `netns` (the slow part of
    /// enrolling: call it before the pod's listeners exist, which receive connections at once
    /// during a restart hand-over).
    pub fn load_lookup(&self, netns: &Netns) -> Result<lookup::LookupProgram, Error> {
        self.globals.load_lookup(netns)
    }

    /// Enrolls a pod in the kernel (its listeners must already be registered) and attaches
    /// its copy of sk_lookup (from [`Datapath::load_lookup`]) to its network namespace; only
    /// while this agent is current (otherwise the current agent does, or this one when it
    /// takes the node back).
    pub fn enroll(
        &self,
        entry: &PodEntry,
        netns: &Netns,
        lookup: lookup::LookupProgram,
    ) -> Result<(), Error> {
        self.handover
            .with_current(|| self.enroll_now(entry, netns, lookup))
            .unwrap_or(Ok(()))
    }

    fn enroll_now(
        &self,
        entry: &PodEntry,
        netns: &Netns,
        lookup: lookup::LookupProgram,
    ) -> Result<(), Error> {
        if lookup.netns_cookie() != entry.netns_cookie {
            return Err(Error::LookupNetns {
                pod: entry.key.clone(),
                loaded: lookup.netns_cookie(),
                enrolled: entry.netns_cookie,
            });
        }
        let op_err = |map, op| {
            move |source: MapError| Error::MapOp {
                map,
                op,
                pod: entry.key.clone(),
                source: Box::new(source),
            }
        };
        {
            let mut m = lock(&self.maps);
            // Keep counters across agent restarts: only create the entry if missing.
            match m
                .pod_stats
                .insert(entry.netns_cookie, AmbPodStats::default(), BPF_NOEXIST)
            {
                Ok(()) => {}
                Err(MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => return Err(op_err("amb_pod_stats", "insert")(e)),
            }
            let mut pod = entry.pod;
            if self.mesh_only && pod.flags & maps::POD_F_CAPTURE_OUT != 0 {
                pod.flags |= maps::POD_F_MESH_ONLY;
            }
            m.pods
                .insert(entry.netns_cookie, pod, 0)
                .map_err(op_err("amb_pods", "insert"))?;
        }
        let pin = self
            .links_dir
            .join(format!("lookup-{}", entry.netns_cookie));
        let pinned = lookup.attach(netns, &pin)?;
        lock(&self.lookup_links).insert(entry.netns_cookie, pinned);
        Ok(())
    }

    /// Removes a pod from the kernel: capture stops, sk_lookup detaches, map entries go. An
    /// agent that is not current only lets go of its own sk_lookup link.
    pub fn unenroll(&self, entry: &PodEntry) -> Result<(), Error> {
        self.handover
            .with_current(|| self.unenroll_now(entry))
            .unwrap_or_else(|| {
                lock(&self.lookup_links).remove(&entry.netns_cookie);
                Ok(())
            })
    }

    fn unenroll_now(&self, entry: &PodEntry) -> Result<(), Error> {
        let op_err = |map, op| {
            move |source: MapError| Error::MapOp {
                map,
                op,
                pod: entry.key.clone(),
                source: Box::new(source),
            }
        };
        let mut first_err = None;
        {
            let mut m = lock(&self.maps);
            if let Err(e) = ignore_missing(m.pods.remove(&entry.netns_cookie)) {
                first_err.get_or_insert(op_err("amb_pods", "remove")(e));
            }
            for family in [maps::AF_INET, maps::AF_INET6] {
                let k = AmbListenerKey {
                    netns_cookie: entry.netns_cookie,
                    family: u32::from(family),
                    _pad: 0,
                };
                let _ = m.listeners.remove(&k); // absent once the socket closed: fine
            }
            let _ = m.pod_stats.remove(&entry.netns_cookie);
        }
        let link = lock(&self.lookup_links).remove(&entry.netns_cookie);
        remove_pin(
            &self
                .links_dir
                .join(format!("lookup-{}", entry.netns_cookie)),
        )?;
        drop(link);
        first_err.map_or(Ok(()), Err)
    }

    /// Removes other agents' cgroups that are gone or empty from the kernel's agent set (see
    /// `agents.rs`); logs what it removed. A draining agent must not call it.
    pub fn sweep_agent_cgroups(&self) {
        let removed = lock(&self.agents).sweep();
        if !removed.is_empty() {
            tracing::info!(cgroup.ids = ?removed, "removed cgroups of agents that are gone from the agent set");
        }
    }

    /// The original destination of a captured connection, from the tuple sockops recorded.
    pub fn orig_dst(&self, netns_cookie: u64, client: ClientAddr) -> Option<OrigDstAddr> {
        let key = AmbConnKey::new(netns_cookie, client.0);
        let od = lock(&self.maps).conns.get(&key, 0).ok()?;
        od.socket_addr().map(OrigDstAddr)
    }

    /// Marks a delivery connection so sk_lookup leaves its SYN to the app.
    pub fn add_bypass(&self, key: &AmbBypassKey) -> Result<(), MapError> {
        lock(&self.bypass).insert(*key, 1, 0)
    }

    /// Forgets a delivery connection.
    pub fn remove_bypass(&self, key: &AmbBypassKey) {
        let _ = lock(&self.bypass).remove(key);
    }

    /// Global per-hook counters, by name.
    pub fn stats(&self) -> Vec<(&'static str, u64)> {
        let m = lock(&self.maps);
        STAT_NAMES
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let sum = m
                    .stats
                    .get(&(i as u32), 0)
                    .map(|v| v.iter().sum())
                    .unwrap_or(0);
                (*name, sum)
            })
            .collect()
    }

    /// Per-pod counters.
    pub fn pod_stats(&self, netns_cookie: u64) -> Option<AmbPodStats> {
        lock(&self.maps).pod_stats.get(&netns_cookie, 0).ok()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding a map lock leaves the map itself consistent (kernel-side state).
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn program<'a, T>(bpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, Error>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program>,
{
    bpf.program_mut(name)
        .and_then(|p| p.try_into().ok())
        .ok_or(Error::Program { program: name })
}

fn take_map<T>(bpf: &mut Ebpf, name: &'static str) -> Result<T, Error>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = bpf.take_map(name).ok_or(Error::Map {
        map: name,
        source: None,
    })?;
    T::try_from(map).map_err(|e| Error::Map {
        map: name,
        source: Some(Box::new(e)),
    })
}

fn ignore_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}
