//! Removing a testbed instance from its state alone (works after a crash), and finding leftovers.
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;

use anyhow::Result;

use crate::cgroup;
use crate::net;
use crate::process;
use crate::state::{State, BASE_DIR};

/// Grace period between SIGTERM and SIGKILL for our processes.
pub const STOP_GRACE: Duration = Duration::from_secs(3);

/// Removes everything `state` records, in dependency order: our processes (SIGTERM, then
/// SIGKILL; then anything left in our cgroups), bpffs pin dirs, cgroups (children first),
/// network namespaces, and the state directory. Missing pieces are skipped; every step runs
/// even when an earlier one failed, and the first error is returned.
pub fn teardown(state: &State, children: &mut Vec<Child>) -> Result<()> {
    let mut first_err: Option<anyhow::Error> = None;
    let mut note = |r: Result<()>| {
        if let Err(e) = r {
            eprintln!("testbed {}: cleanup: {e:#}", state.id);
            first_err.get_or_insert(e);
        }
    };
    let mount = state.cgroup_mount.as_path();
    // Agents first (they hold the pods' listeners), then servers.
    let mut procs = state.processes.clone();
    procs.sort_by_key(|p| !p.role.starts_with("agent"));
    for p in &procs {
        note(process::stop(p.pid, STOP_GRACE, &state.cgroup_root, mount));
    }
    note(cgroup::kill_all(&state.cgroup_root, Duration::from_secs(5)));
    for child in children.iter_mut() {
        process::reap(child, Duration::from_secs(1));
    }
    children.clear();
    for p in &procs {
        // Reaps zombies of processes we started without keeping a handle; ECHILD otherwise.
        let _ = nix::sys::wait::waitpid(
            nix::unistd::Pid::from_raw(p.pid),
            Some(nix::sys::wait::WaitPidFlag::WNOHANG),
        );
    }
    for node in &state.nodes {
        note(remove_dir_all(&node.pin_dir));
    }
    note(cgroup::remove_tree(&state.cgroup_root));
    for pod in &state.pods {
        note(net::delete_netns(&pod.netns));
    }
    for node in &state.nodes {
        note(net::delete_netns(&node.netns));
    }
    note(remove_dir_all(&state.dir));
    note(crate::scope::forget_instance(&state.id));
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// What of `state` still exists: namespaces, cgroups, pin dirs, processes, files.
pub fn leftovers(state: &State) -> Vec<String> {
    let mut out = Vec::new();
    let netns = state
        .pods
        .iter()
        .map(|p| &p.netns)
        .chain(state.nodes.iter().map(|n| &n.netns));
    for name in netns {
        if crate::state::netns_path(name).exists() {
            out.push(format!("netns {name}"));
        }
    }
    if state.cgroup_root.exists() {
        out.push(format!("cgroup {}", state.cgroup_root.display()));
    }
    for node in &state.nodes {
        if node.pin_dir.exists() {
            out.push(format!("pin dir {}", node.pin_dir.display()));
        }
    }
    for p in &state.processes {
        if alive(p.pid) && cmdline_mentions(p.pid, &state.id) {
            out.push(format!("process {} ({})", p.pid, p.role));
        }
    }
    if state.dir.exists() {
        out.push(format!("dir {}", state.dir.display()));
    }
    out.extend(processes_mentioning(&format!("ambit-{}", state.id)));
    out.extend(processes_mentioning(&state.dir.to_string_lossy()));
    out.sort();
    out.dedup();
    out
}

/// States of instances whose owner process is gone (crashed tests). CLI instances (no owner)
/// are not stale.
pub fn stale_instances() -> Vec<State> {
    all_instances()
        .into_iter()
        .filter(|s| s.owner_pid.is_some_and(|pid| !alive(pid as i32)))
        .collect()
}

/// Every instance with a state file under [`BASE_DIR`].
pub fn all_instances() -> Vec<State> {
    let Ok(entries) = fs::read_dir(BASE_DIR) else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|e| e.path().join("state.json"))
        .filter(|p| p.exists())
        .filter_map(|p| State::load(&p).ok())
        .collect()
}

fn remove_dir_all(path: &Path) -> Result<()> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(anyhow::Error::new(e).context(format!("removing {}", path.display()))),
    }
}

/// Whether `pid` exists and is not a zombie.
fn alive(pid: i32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        != Some("Z")
}

fn cmdline_mentions(pid: i32, needle: &str) -> bool {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains(needle))
        .unwrap_or(false)
}

/// Live processes whose command line mentions `needle` (e.g. our netns or state dir names).
fn processes_mentioning(needle: &str) -> Vec<String> {
    let me = std::process::id();
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid as u32 != me && alive(pid) && cmdline_mentions(pid, needle))
        .map(|pid| {
            let cmd = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            format!("process {pid}: {}", cmd.trim())
        })
        .collect()
}

/// `<BASE_DIR>/<id>`.
pub fn instance_dir(id: &str) -> PathBuf {
    Path::new(BASE_DIR).join(id)
}
