//! The hand-over between agents sharing a pin directory: which one is current (only it writes shared kernel state), pins replaced in one rename, state left by others removed.
//!
//! Two agents share a node during a zero-downtime restart (a DaemonSet rolling update starts
//! the new agent beside the old one, then stops the old one), and also when an operator starts
//! a second agent by hand and stops it again. Both bind their pod listeners with SO_REUSEPORT;
//! what they must not share is the kernel state steering SYNs and connects to one of them:
//! `amb_listeners` (a closed listener's entry vanishes with it), the pinned links, the maps'
//! entries, the admin socket's path. The generation decides who owns them.
//!
//! Layout under `<bpfPinDir>/agents/` (bpffs holds directories and pins only, no dots in names):
//! - `gen-N`: the newest generation ever claimed (one directory, renamed on each claim);
//! - `agent-G-PID`, `agent-G-PID-ready` once it serves: one per running agent, with its
//!   generation G. Its agent holds an exclusive flock on it while it runs, so a dead agent's
//!   entry is recognised by its free lock (whatever PID namespace it ran in) and removed;
//! - the `agents` directory's own flock: exclusive for claims and removals, shared for checks.
//!
//! Rules:
//! - An agent claims generation N+1 when it starts, before it loads or pins anything
//!   ([`Handover::claim`]). It is current while N+1 is the newest generation and it has not
//!   left; only then do its writes to shared kernel state happen ([`Handover::with_current`]).
//! - An agent that is not current and sees no live agent newer than itself (the newer ones
//!   left or died) claims a new generation ([`Handover::check`] → [`Check::Reclaimed`]); its
//!   caller then re-asserts all it owns (listeners, links, maps, admin socket).
//! - An agent that stops removes its entry first ([`Handover::leave`]); if it was current and an
//!   older agent still runs, it waits until a newer generation is ready
//!   ([`Handover::wait_successor`]) before its own listeners close, so no SYN meets an empty
//!   `amb_listeners` entry.
//! - Pins are replaced by renaming a new pin over the old one ([`pin_link`]): the old link stays
//!   attached until the new one is, and a failed pin leaves the old one in place.
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use aya::programs::links::FdLink;

use super::{Datapath, Error as DpError};

/// Errors of the hand-over directory; each names the path.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A directory could not be created, opened, renamed or removed.
    #[error("hand-over directory {}: {op} failed", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A lock could not be taken.
    #[error("hand-over directory {}: flock failed", path.display())]
    Lock {
        path: PathBuf,
        #[source]
        source: Errno,
    },
}

/// What [`Handover::check`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// This agent is current.
    Current,
    /// A newer agent runs: it owns the shared state.
    Superseded {
        /// Its generation.
        generation: u64,
        /// Its PID (as it saw itself).
        pid: u32,
    },
    /// The newer agents left or died; this agent claimed `generation` and must re-assert
    /// everything it owns, then call [`Handover::mark_ready`].
    Reclaimed {
        /// The generation claimed.
        generation: u64,
    },
    /// This agent has left.
    Left,
}

/// This agent's place in the hand-over, for `/status`.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Summary {
    /// This process.
    pub pid: u32,
    /// The generation this agent holds (the last one it claimed).
    pub generation: u64,
    /// The newest generation claimed by any agent.
    pub newest: u64,
    /// Whether this agent owns the shared kernel state.
    pub current: bool,
}

/// One agent's entry in the directory.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    generation: u64,
    pid: u32,
    ready: bool,
    name: String,
}

impl Entry {
    fn parse(name: &str) -> Option<Self> {
        let rest = name.strip_prefix("agent-")?;
        let (rest, ready) = match rest.strip_suffix("-ready") {
            Some(r) => (r, true),
            None => (rest, false),
        };
        let (g, p) = rest.split_once('-')?;
        Some(Self {
            generation: g.parse().ok()?,
            pid: p.parse().ok()?,
            ready,
            name: name.to_string(),
        })
    }

    fn name_for(generation: u64, pid: u32, ready: bool) -> String {
        let ready = if ready { "-ready" } else { "" };
        format!("agent-{generation}-{pid}{ready}")
    }
}

/// The directory as read under its lock.
#[derive(Debug, Default)]
struct Listing {
    newest: u64,
    gen_dirs: Vec<u64>,
    entries: Vec<Entry>,
}

struct Me {
    generation: u64,
    name: String,
    ready: bool,
    /// The flock on our entry; `None` once we left.
    lock: Option<Flock<File>>,
}

/// This agent's handle on the hand-over directory.
pub struct Handover {
    dir: PathBuf,
    pid: u32,
    me: Mutex<Me>,
}

impl Handover {
    /// Claims the next generation under `pin_dir`: this agent becomes current.
    pub fn claim(pin_dir: &Path) -> Result<Self, Error> {
        Self::claim_as(pin_dir, std::process::id())
    }

    fn claim_as(pin_dir: &Path, pid: u32) -> Result<Self, Error> {
        let dir = pin_dir.join("agents");
        std::fs::create_dir_all(&dir).map_err(io("create", &dir))?;
        let _guard = lock_dir(&dir, FlockArg::LockExclusive)?;
        let listing = read(&dir)?;
        prune(&dir, &listing, None);
        let generation = listing.newest + 1;
        set_newest(&dir, &listing, generation)?;
        let name = Entry::name_for(generation, pid, false);
        let path = dir.join(&name);
        std::fs::create_dir(&path).map_err(io("create", &path))?;
        let file = File::open(&path).map_err(io("open", &path))?;
        let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock)
            .map_err(|(_, source)| Error::Lock { path, source })?;
        Ok(Self {
            dir,
            pid,
            me: Mutex::new(Me {
                generation,
                name,
                ready: false,
                lock: Some(lock),
            }),
        })
    }

    /// Runs `f` if this agent is current, holding the directory's shared lock meanwhile, so
    /// that no other agent claims the node halfway through; `None` (and `f` not run) when it is
    /// not, or has left. When the directory cannot be read (say, out of file descriptors), `f`
    /// runs: writing keeps capture on, skipping could leave a pod uncaptured.
    pub fn with_current<T>(&self, f: impl FnOnce() -> T) -> Option<T> {
        // Lock order everywhere: the directory's flock first, then `me`, never `me` while
        // waiting for a flock.
        let guard = lock_dir(&self.dir, FlockArg::LockShared);
        let generation = {
            let me = lock(&self.me);
            me.lock.as_ref()?;
            me.generation
        };
        match guard.and_then(|g| read(&self.dir).map(|l| (g, l.newest))) {
            Ok((_guard, newest)) => (newest == generation).then(f),
            Err(e) => {
                tracing::warn!(error = %crate::error::error_chain(&e), "cannot tell whether this agent is current; writing shared kernel state anyway (capture stays on)");
                Some(f())
            }
        }
    }

    /// Looks at the other agents: whether this one is current, superseded, or must take the
    /// node back (then it claims a new generation here). Removes the entries of dead agents.
    pub fn check(&self) -> Result<Check, Error> {
        let _guard = lock_dir(&self.dir, FlockArg::LockExclusive)?;
        let mut me = lock(&self.me);
        if me.lock.is_none() {
            return Ok(Check::Left);
        }
        let listing = read(&self.dir)?;
        let alive = prune(&self.dir, &listing, Some(&me.name));
        if listing.newest == me.generation {
            return Ok(Check::Current);
        }
        if let Some(newer) = alive
            .iter()
            .filter(|e| e.generation > me.generation)
            .max_by_key(|e| e.generation)
        {
            return Ok(Check::Superseded {
                generation: newer.generation,
                pid: newer.pid,
            });
        }
        let generation = listing.newest + 1;
        set_newest(&self.dir, &listing, generation)?;
        let name = Entry::name_for(generation, self.pid, false);
        rename(&self.dir.join(&me.name), &self.dir.join(&name))?;
        me.generation = generation;
        me.name = name;
        me.ready = false;
        Ok(Check::Reclaimed { generation })
    }

    /// Marks this agent's entry ready (it serves; a leaving predecessor may close its
    /// listeners now), if it is still current. True when the entry is marked.
    pub fn mark_ready(&self) -> Result<bool, Error> {
        let _guard = lock_dir(&self.dir, FlockArg::LockExclusive)?;
        let mut me = lock(&self.me);
        if me.lock.is_none() || me.ready {
            return Ok(me.ready);
        }
        if read(&self.dir)?.newest != me.generation {
            return Ok(false);
        }
        let name = Entry::name_for(me.generation, self.pid, true);
        rename(&self.dir.join(&me.name), &self.dir.join(&name))?;
        me.name = name;
        me.ready = true;
        Ok(true)
    }

    /// Removes this agent's entry: it writes no shared state any more. True when it was
    /// current and another agent still runs, which should take the node before this one's
    /// listeners close ([`Handover::wait_successor`]).
    pub fn leave(&self) -> Result<bool, Error> {
        let _guard = lock_dir(&self.dir, FlockArg::LockExclusive)?;
        let mut me = lock(&self.me);
        let Some(entry_lock) = me.lock.take() else {
            return Ok(false);
        };
        let listing = read(&self.dir)?;
        let alive = prune(&self.dir, &listing, Some(&me.name));
        let path = self.dir.join(&me.name);
        let removed = std::fs::remove_dir(&path).map_err(io("remove", &path));
        drop(entry_lock);
        removed?;
        Ok(listing.newest == me.generation && !alive.is_empty())
    }

    /// After [`Handover::leave`]: waits up to `timeout` until an agent with a newer
    /// generation than this one's last is ready; returns its generation, or `None` when none
    /// came (or no other agent runs any more).
    pub fn wait_successor(&self, timeout: Duration) -> Option<u64> {
        let mine = lock(&self.me).generation;
        let until = Instant::now() + timeout;
        loop {
            let found = {
                let _guard = lock_dir(&self.dir, FlockArg::LockShared).ok()?;
                let listing = read(&self.dir).ok()?;
                let alive: Vec<Entry> = listing
                    .entries
                    .into_iter()
                    .filter(|e| is_alive(&self.dir, e))
                    .collect();
                if alive.is_empty() {
                    return None;
                }
                alive
                    .iter()
                    .filter(|e| e.generation > mine && e.ready)
                    .map(|e| e.generation)
                    .max()
            };
            if found.is_some() || Instant::now() >= until {
                return found;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// This agent's place, for `/status`.
    pub fn summary(&self) -> Summary {
        let newest = lock_dir(&self.dir, FlockArg::LockShared)
            .and_then(|_guard| read(&self.dir))
            .map_or(0, |l| l.newest);
        let me = lock(&self.me);
        Summary {
            pid: self.pid,
            generation: me.generation,
            newest,
            current: me.lock.is_some() && newest == me.generation,
        }
    }
}

impl Datapath {
    /// This agent's place among the agents sharing the pin directory.
    pub fn handover(&self) -> &Handover {
        &self.handover
    }

    /// Pins this agent's cgroup links again over what another agent pinned there meanwhile
    /// (after [`Check::Reclaimed`]), so that agent's programs detach when it exits. Only while
    /// current; returns how many were re-pinned. A link whose re-pin fails is let go (the
    /// other agent's pin stays and keeps capture on).
    pub fn repin_links(&self) -> Option<usize> {
        self.handover.with_current(|| {
            let mut links = lock(&self.cgroup_links);
            let mut done = 0;
            for (path, slot) in links.iter_mut() {
                let Some(link) = slot.take() else { continue };
                match pin_link(link, path) {
                    Ok(l) => {
                        *slot = Some(l);
                        done += 1;
                    }
                    Err(e) => tracing::error!(
                        pin = %path.display(),
                        error = %crate::error::error_chain(&e),
                        "cannot re-pin a cgroup link; the pin in place stays"
                    ),
                }
            }
            done
        })
    }

    /// Removes sk_lookup pins of pods this agent does not serve (left by a previous run) and
    /// their kernel entries (only while this agent is current).
    pub fn remove_stale(&self, keep: &[u64]) -> Result<Vec<u64>, DpError> {
        self.handover
            .with_current(|| self.remove_stale_now(keep))
            .unwrap_or_else(|| Ok(Vec::new()))
    }

    fn remove_stale_now(&self, keep: &[u64]) -> Result<Vec<u64>, DpError> {
        let mut removed = Vec::new();
        let known: Vec<u64> = {
            let m = lock(&self.maps);
            m.pods.keys().filter_map(Result::ok).collect()
        };
        let pins = std::fs::read_dir(&self.links_dir).map_err(|source| DpError::Pin {
            path: self.links_dir.clone(),
            source,
        })?;
        let mut pinned: Vec<u64> = pins
            .filter_map(Result::ok)
            .filter_map(|e| {
                e.file_name()
                    .to_str()?
                    .strip_prefix("lookup-")?
                    .parse()
                    .ok()
            })
            .collect();
        pinned.extend(known);
        pinned.sort_unstable();
        pinned.dedup();
        for cookie in pinned.into_iter().filter(|c| !keep.contains(c)) {
            let mut m = lock(&self.maps);
            let _ = m.pods.remove(&cookie);
            let _ = m.pod_stats.remove(&cookie);
            drop(m);
            remove_pin(&self.links_dir.join(format!("lookup-{cookie}")))?;
            removed.push(cookie);
        }
        Ok(removed)
    }
}

/// Pins `link` at `path`, replacing a pin left by another agent in one rename once the new
/// link is attached (the caller attached it already), so capture never lapses; when pinning
/// fails the old pin stays.
pub(super) fn pin_link(link: FdLink, path: &Path) -> Result<FdLink, DpError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!("-new-{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    remove_pin(&tmp)?;
    let pinned = link.pin(&tmp).map_err(|e| DpError::Pin {
        path: tmp.clone(),
        source: std::io::Error::other(e.to_string()),
    })?;
    std::fs::rename(&tmp, path).map_err(|source| DpError::Pin {
        path: path.into(),
        source,
    })?;
    // Its pin is managed by path from here on (a `PinnedLink` would remember the temporary one).
    Ok(pinned.into())
}

pub(super) fn remove_pin(path: &Path) -> Result<(), DpError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(DpError::Pin {
            path: path.into(),
            source,
        }),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Io { op, path, source }
}

fn rename(from: &Path, to: &Path) -> Result<(), Error> {
    std::fs::rename(from, to).map_err(io("rename", from))
}

/// Takes `arg` on the directory itself (a fresh open file, so that threads of one process
/// exclude each other as processes do); released when the guard drops.
fn lock_dir(dir: &Path, arg: FlockArg) -> Result<Flock<File>, Error> {
    let file = File::open(dir).map_err(io("open", dir))?;
    Flock::lock(file, arg).map_err(|(_, source)| Error::Lock {
        path: dir.to_path_buf(),
        source,
    })
}

fn read(dir: &Path) -> Result<Listing, Error> {
    let mut l = Listing::default();
    for e in std::fs::read_dir(dir).map_err(io("read", dir))? {
        let e = e.map_err(io("read", dir))?;
        let Some(name) = e.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if let Some(g) = name.strip_prefix("gen-").and_then(|g| g.parse().ok()) {
            l.gen_dirs.push(g);
        } else if let Some(entry) = Entry::parse(&name) {
            l.entries.push(entry);
        }
    }
    // Entries cannot be newer than the counter, whatever happened to it.
    l.newest = l
        .gen_dirs
        .iter()
        .chain(l.entries.iter().map(|e| &e.generation))
        .copied()
        .max()
        .unwrap_or(0);
    Ok(l)
}

/// Renames the counter to `generation` (one `gen-N` directory stays).
fn set_newest(dir: &Path, l: &Listing, generation: u64) -> Result<(), Error> {
    let to = dir.join(format!("gen-{generation}"));
    let mut old = l.gen_dirs.clone();
    old.sort_unstable();
    match old.pop() {
        Some(g) => rename(&dir.join(format!("gen-{g}")), &to)?,
        None => std::fs::create_dir(&to).map_err(io("create", &to))?,
    }
    for g in old {
        let _ = std::fs::remove_dir(dir.join(format!("gen-{g}")));
    }
    Ok(())
}

/// Whether the agent of `e` still runs: it holds the lock on its entry.
fn is_alive(dir: &Path, e: &Entry) -> bool {
    let Ok(file) = File::open(dir.join(&e.name)) else {
        return false;
    };
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(_free) => false,
        Err((_, Errno::EWOULDBLOCK)) => true,
        // Cannot tell: count it as running, so its state is not taken from under it.
        Err(_) => true,
    }
}

/// Removes the entries of dead agents (the caller holds the exclusive lock) and returns the
/// live ones other than `mine`.
fn prune(dir: &Path, l: &Listing, mine: Option<&str>) -> Vec<Entry> {
    let mut alive = Vec::new();
    for e in l.entries.iter().filter(|e| Some(e.name.as_str()) != mine) {
        if is_alive(dir, e) {
            alive.push(e.clone());
        } else {
            tracing::info!(
                generation = e.generation,
                pid = e.pid,
                "removing the hand-over entry of an agent that is gone"
            );
            let _ = std::fs::remove_dir(dir.join(&e.name));
        }
    }
    alive
}

#[cfg(test)]
mod tests;
