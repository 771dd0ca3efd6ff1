//! cgroup v2 helpers: find the mount, create directories, kill their processes, remove them.
use std::fs;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The cgroup2 mount point of this mount namespace, read from `/proc/self/mountinfo`.
pub fn mount_point() -> Result<PathBuf> {
    let text =
        fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    parse_mountinfo(&text).context("no cgroup2 file system is mounted (see /proc/self/mountinfo)")
}

/// The first cgroup2 mount point in mountinfo text.
pub fn parse_mountinfo(text: &str) -> Option<PathBuf> {
    text.lines().find_map(|line| {
        // `id parent maj:min root mountpoint opts [optional...] - fstype source superopts`
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let mount = left.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape(mount)))
    })
}

/// Creates `path` and its parents.
pub fn create(path: &Path) -> Result<()> {
    fs::create_dir_all(path).with_context(|| format!("creating cgroup {}", path.display()))
}

/// PIDs in `path` and every cgroup below it.
pub fn procs(path: &Path) -> Vec<i32> {
    let mut pids = Vec::new();
    for dir in subtree(path) {
        if let Ok(text) = fs::read_to_string(dir.join("cgroup.procs")) {
            pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
        }
    }
    pids
}

/// Whether any process lives in `path` or below.
pub fn populated(path: &Path) -> bool {
    match fs::read_to_string(path.join("cgroup.events")) {
        Ok(text) => text.lines().any(|l| l.trim() == "populated 1"),
        Err(_) => !procs(path).is_empty(),
    }
}

/// SIGKILLs every process in `path` and below (`cgroup.kill`, else one by one) and waits, up to
/// `timeout`, until the subtree is empty.
pub fn kill_all(path: &Path, timeout: Duration) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    if fs::write(path.join("cgroup.kill"), "1").is_err() {
        for pid in procs(path) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    let deadline = Instant::now() + timeout;
    while populated(path) {
        if Instant::now() >= deadline {
            bail!(
                "cgroup {} still has processes {:?}",
                path.display(),
                procs(path)
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Removes `path` and every cgroup below it, children first. Missing directories are fine.
pub fn remove_tree(path: &Path) -> Result<()> {
    let mut dirs = subtree(path);
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    for dir in dirs {
        match fs::remove_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing cgroup {}", dir.display())),
        }
    }
    Ok(())
}

/// Whether `pid` is a live (non-zombie) process in `cgroup` or below it.
pub fn pid_in(pid: i32, cgroup: &Path, mount: &Path) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state letter follows the last `)` (the command name may hold spaces and parens).
    if stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        == Some("Z")
    {
        return false;
    }
    let Ok(text) = fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
        return false;
    };
    let Ok(rel) = cgroup.strip_prefix(mount) else {
        return false;
    };
    let want = Path::new("/").join(rel);
    text.lines()
        .filter_map(|l| l.strip_prefix("0::"))
        .any(|p| Path::new(p.trim()).starts_with(&want))
}

/// `path` and all directories below it (parents before children).
fn subtree(path: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![path.to_path_buf()];
    while let Some(dir) = todo.pop() {
        if !dir.is_dir() {
            continue;
        }
        if let Ok(entries) = fs::read_dir(&dir) {
            todo.extend(entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
        }
        out.push(dir);
    }
    out
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let digits = std::str::from_utf8(&bytes[i + 1..i + 4]).unwrap_or("");
            if let Ok(v) = u8::from_str_radix(digits, 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_layout() {
        let text = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                    40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd\n\
                    41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_mountinfo(text),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn unescapes_spaces_in_mount_points() {
        let text = "41 31 0:38 / /mnt/my\\040cg rw - cgroup2 cgroup2 rw\n";
        assert_eq!(parse_mountinfo(text), Some(PathBuf::from("/mnt/my cg")));
    }

    #[test]
    fn no_cgroup2_is_none() {
        assert_eq!(parse_mountinfo("1 0 0:1 / / rw - ext4 /dev/sda rw\n"), None);
    }
}
