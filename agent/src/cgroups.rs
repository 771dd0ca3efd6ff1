//! Where the kernel programs attach on a node: the kubelet's pod cgroup root and the agent's own cgroup.
//!
//! kubelet puts every pod under one cgroup: `kubepods.slice` with the systemd driver,
//! `kubepods` with cgroupfs (both at the top of the cgroup2 hierarchy). The agent attaches
//! there once (`podsCgroup: auto`, the default) and recognises enrolled pods by netns cookie.
//! The agent itself is a hostNetwork pod below that root: it stays in the cgroup its runtime
//! gave it (a private cgroup namespace forbids moving out of it) and is exempt because its
//! netns is never enrolled, and its sockets in pod netns carry its marks *and* are made by a
//! task in a cgroup listed in the kernel's `amb_agent_cgs` (a mark alone can be forged). Outside
//! Kubernetes (`agentCgroup` set) it joins the cgroup it is told to.
use std::path::{Path, PathBuf};

/// The pod roots kubelet creates, in the order they are tried: systemd driver, cgroupfs driver.
pub const KUBELET_POD_ROOTS: &[&str] = &["kubepods.slice", "kubepods"];

/// How deep below the pods' root the agent looks for its own cgroup
/// (`kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice/<container>.scope`
/// is 4 levels; cgroupfs and nested runtimes add a few).
const MAX_SEARCH_DEPTH: usize = 8;

/// Errors locating the cgroups; each names the directory or file involved.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `podsCgroup: auto` and no kubelet pod root exists.
    #[error(
        "no kubelet pod cgroup under {}: looked for kubepods.slice (systemd cgroup driver) and \
         kubepods (cgroupfs driver); set podsCgroup to the pods' parent cgroup",
        root.display()
    )]
    NoKubeletRoot {
        /// The cgroup2 hierarchy searched.
        root: PathBuf,
    },
    /// The configured pods' cgroup does not exist.
    #[error("podsCgroup {} is not a cgroup directory", path.display())]
    NoPodsCgroup {
        /// The resolved path.
        path: PathBuf,
    },
    /// `/proc/self/cgroup` could not be read or has no cgroup v2 line.
    #[error("cannot read the agent's cgroup from /proc/self/cgroup")]
    ProcSelf(#[source] std::io::Error),
    /// `/proc/self/cgroup` has no `0::` (cgroup v2) line.
    #[error("/proc/self/cgroup has no cgroup v2 (\"0::\") line: {text:?}")]
    NotCgroup2 {
        /// What the file said.
        text: String,
    },
    /// The agent's cgroup is neither at its `/proc/self/cgroup` path nor below the pods' root.
    #[error(
        "cannot find the agent's cgroup (pid {pid}): {} does not list it and no cgroup under {} \
         does (a private cgroup namespace whose root is outside the pods' cgroup?); set \
         agentCgroup",
        candidate.display(),
        pods.display()
    )]
    SelfNotFound {
        /// The agent's pid as it sees itself.
        pid: u32,
        /// The path `/proc/self/cgroup` names, under the cgroup2 root.
        candidate: PathBuf,
        /// The pods' root that was searched.
        pods: PathBuf,
    },
}

/// Resolves `podsCgroup`: a path (relative ones under `root`) that must exist, or, when
/// `configured` is `None` or `auto`, the first kubelet pod root under `root`.
pub fn pods_root(root: &Path, configured: Option<&Path>) -> Result<PathBuf, Error> {
    match configured.filter(|p| *p != Path::new("auto")) {
        Some(p) => {
            let path = if p.is_absolute() {
                p.to_path_buf()
            } else {
                root.join(p)
            };
            if is_cgroup_dir(&path) {
                Ok(path)
            } else {
                Err(Error::NoPodsCgroup { path })
            }
        }
        None => KUBELET_POD_ROOTS
            .iter()
            .map(|name| root.join(name))
            .find(|p| is_cgroup_dir(p))
            .ok_or_else(|| Error::NoKubeletRoot {
                root: root.to_path_buf(),
            }),
    }
}

/// The agent's own cgroup directory under `root`: the path `/proc/self/cgroup` names if that
/// cgroup lists this process, else (in a cgroup namespace, where that path is relative to the
/// namespace's root) the cgroup below `pods` that lists it.
pub fn own_cgroup(root: &Path, pods: &Path) -> Result<PathBuf, Error> {
    let text = std::fs::read_to_string("/proc/self/cgroup").map_err(Error::ProcSelf)?;
    locate(root, pods, &text, std::process::id())
}

/// [`own_cgroup`] on given `/proc/self/cgroup` text and pid.
pub fn locate(
    root: &Path,
    pods: &Path,
    proc_self_cgroup: &str,
    pid: u32,
) -> Result<PathBuf, Error> {
    let relative = proc_self_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| Error::NotCgroup2 {
            text: proc_self_cgroup.trim().to_string(),
        })?;
    let candidate = root.join(relative.trim().trim_start_matches('/'));
    if lists_pid(&candidate, pid) {
        return Ok(candidate);
    }
    search(pods, pid, MAX_SEARCH_DEPTH).ok_or_else(|| Error::SelfNotFound {
        pid,
        candidate,
        pods: pods.to_path_buf(),
    })
}

/// Depth-first search below `dir` for the cgroup whose `cgroup.procs` lists `pid`.
fn search(dir: &Path, pid: u32, depth: usize) -> Option<PathBuf> {
    if lists_pid(dir, pid) {
        return Some(dir.to_path_buf());
    }
    if depth == 0 {
        return None;
    }
    let entries = std::fs::read_dir(dir).ok()?;
    entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .find_map(|e| search(&e.path(), pid, depth - 1))
}

/// The id of the cgroup2 directory `dir`: its inode number, which is what
/// `bpf_get_current_cgroup_id()` returns for a task in it.
pub fn id(dir: &Path) -> std::io::Result<u64> {
    std::fs::metadata(dir).map(|m| std::os::unix::fs::MetadataExt::ino(&m))
}

/// Whether a cgroup, found by id, still holds processes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Liveness {
    /// It exists and it or a cgroup below it has a process (`cgroup.events`: `populated 1`).
    Populated(PathBuf),
    /// It exists and has no process.
    Empty(PathBuf),
    /// No cgroup below the root has this id. Cgroup ids are never reused, so it never returns.
    Gone,
}

/// How deep [`liveness`] searches below the root (a guard; real trees are under 10 levels).
const MAX_ID_DEPTH: usize = 32;

/// Finds the cgroup with `id` below `root` (the whole cgroup2 tree the agents live in) and says
/// whether it still holds processes. An error only if `root` itself cannot be read;
/// directories vanishing during the walk are skipped.
pub fn liveness(root: &Path, id: u64) -> std::io::Result<Liveness> {
    let mut stack = vec![(std::fs::read_dir(root)?, 0usize)];
    while let Some((mut entries, depth)) = stack.pop() {
        let Some(entry) = entries.next() else {
            continue;
        };
        stack.push((entries, depth));
        let Ok(entry) = entry else { continue };
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let path = entry.path();
        // kernfs reports each directory's id as its inode number, also in readdir.
        if std::os::unix::fs::DirEntryExt::ino(&entry) == id {
            return Ok(if populated(&path) {
                Liveness::Populated(path)
            } else {
                Liveness::Empty(path)
            });
        }
        if depth < MAX_ID_DEPTH {
            if let Ok(below) = std::fs::read_dir(&path) {
                stack.push((below, depth + 1));
            }
        }
    }
    Ok(Liveness::Gone)
}

/// `cgroup.events` of `dir` says `populated 1`.
fn populated(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("cgroup.events"))
        .is_ok_and(|text| text.lines().any(|l| l.trim() == "populated 1"))
}

fn lists_pid(dir: &Path, pid: u32) -> bool {
    std::fs::read_to_string(dir.join("cgroup.procs")).is_ok_and(|procs| {
        procs
            .lines()
            .any(|l| l.trim().parse::<u32>().is_ok_and(|p| p == pid))
    })
}

fn is_cgroup_dir(dir: &Path) -> bool {
    dir.join("cgroup.procs").is_file()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    /// A fake cgroup tree in a fresh temporary directory, removed on drop.
    struct Tree(PathBuf);

    impl Tree {
        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// Each listed directory gets a `cgroup.procs` with `procs`.
    fn tree(dirs: &[(&str, &str)]) -> Tree {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let root = Tree(
            std::env::temp_dir().join(format!("ambit-cgroups-test-{}-{n}", std::process::id())),
        );
        fs::create_dir_all(root.path()).unwrap();
        fs::write(root.path().join("cgroup.procs"), "").unwrap();
        for (dir, procs) in dirs {
            let d = root.path().join(dir);
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("cgroup.procs"), procs).unwrap();
        }
        root
    }

    #[test]
    fn auto_finds_the_systemd_root_first_then_cgroupfs() {
        let both = tree(&[("kubepods", ""), ("kubepods.slice", "")]);
        assert_eq!(
            pods_root(both.path(), None).unwrap(),
            both.path().join("kubepods.slice")
        );
        let cgroupfs = tree(&[("kubepods", ""), ("kubepods/besteffort", "")]);
        assert_eq!(
            pods_root(cgroupfs.path(), Some(Path::new("auto"))).unwrap(),
            cgroupfs.path().join("kubepods")
        );
    }

    #[test]
    fn auto_without_kubelet_names_what_it_looked_for() {
        let none = tree(&[("system.slice", ""), ("kubepods-not", "")]);
        let err = pods_root(none.path(), None).unwrap_err().to_string();
        assert!(
            err.contains("kubepods.slice") && err.contains("kubepods (cgroupfs"),
            "{err}"
        );
        assert!(err.contains(&none.path().display().to_string()), "{err}");
    }

    #[test]
    fn configured_paths_resolve_under_the_root_and_must_exist() {
        let t = tree(&[("pods", "")]);
        assert_eq!(
            pods_root(t.path(), Some(Path::new("pods"))).unwrap(),
            t.path().join("pods")
        );
        let abs = t.path().join("pods");
        assert_eq!(pods_root(t.path(), Some(&abs)).unwrap(), abs);
        // A plain directory without cgroup files is not a cgroup.
        fs::create_dir(t.path().join("plain")).unwrap();
        let err = pods_root(t.path(), Some(Path::new("plain"))).unwrap_err();
        assert!(matches!(err, Error::NoPodsCgroup { .. }), "{err}");
    }

    #[test]
    fn own_cgroup_is_the_proc_self_path_when_it_lists_us() {
        let t = tree(&[("kubepods.slice/a/agent.scope", "7\n42\n")]);
        let pods = t.path().join("kubepods.slice");
        let got = locate(t.path(), &pods, "0::/kubepods.slice/a/agent.scope\n", 42).unwrap();
        assert_eq!(got, t.path().join("kubepods.slice/a/agent.scope"));
    }

    #[test]
    fn in_a_cgroup_namespace_the_agent_is_found_below_the_pods_root() {
        // In a private cgroup namespace /proc/self/cgroup says "0::/".
        let t = tree(&[
            ("kubepods.slice/burstable/pod1/c1.scope", "5\n"),
            ("kubepods.slice/burstable/pod2/c2.scope", "42\n"),
        ]);
        let pods = t.path().join("kubepods.slice");
        let got = locate(t.path(), &pods, "0::/\n", 42).unwrap();
        assert_eq!(got, pods.join("burstable/pod2/c2.scope"));
    }

    #[test]
    fn liveness_finds_a_cgroup_by_id_and_reads_whether_it_is_populated() {
        let t = tree(&[
            ("a/b/agent.scope", "42\n"),
            ("a/c/old.scope", ""),
            ("x", ""),
        ]);
        let agent = t.path().join("a/b/agent.scope");
        let old = t.path().join("a/c/old.scope");
        fs::write(agent.join("cgroup.events"), "populated 1\nfrozen 0\n").unwrap();
        fs::write(old.join("cgroup.events"), "populated 0\nfrozen 0\n").unwrap();
        assert_eq!(
            liveness(t.path(), id(&agent).unwrap()).unwrap(),
            Liveness::Populated(agent.clone())
        );
        assert_eq!(
            liveness(t.path(), id(&old).unwrap()).unwrap(),
            Liveness::Empty(old.clone())
        );
        // A removed directory's id is gone.
        let gone = id(&old).unwrap();
        fs::remove_dir_all(&old).unwrap();
        assert_eq!(liveness(t.path(), gone).unwrap(), Liveness::Gone);
        // An unreadable root is an error, not "gone".
        assert!(liveness(&t.path().join("missing"), 1).is_err());
    }

    #[test]
    fn an_agent_nowhere_to_be_found_is_an_error_naming_the_places() {
        let t = tree(&[("kubepods.slice/x", "5\n"), ("other", "")]);
        let pods = t.path().join("kubepods.slice");
        let err = locate(t.path(), &pods, "0::/other\n", 42).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("pid 42") && text.contains("agentCgroup"),
            "{text}"
        );
        let v1_only = locate(t.path(), &pods, "1:name=systemd:/\n", 42).unwrap_err();
        assert!(matches!(v1_only, Error::NotCgroup2 { .. }), "{v1_only}");
    }
}
