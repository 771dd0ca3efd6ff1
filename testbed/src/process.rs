//! Starting processes inside a pod's (or node's) netns and cgroup, and stopping only our own.
use std::ffi::OsStr;
use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

use crate::cgroup;
use crate::cmd;

/// Moves the shell into the cgroup `$1`, then becomes the command in the netns `$2`. `nsenter
/// --net` (unlike `ip netns exec`) does not remount /sys, so the cgroup fs stays visible.
const ENTER: &str =
    r#"cg=$1; ns=$2; shift 2; echo $$ > "$cg/cgroup.procs" && exec nsenter --net="$ns" -- "$@""#;

/// A command that runs `argv` in `cgroup` and the netns at `netns`.
pub fn command_in<S: AsRef<OsStr>>(cgroup: &Path, netns: &Path, argv: &[S]) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg(ENTER)
        .arg("sh")
        .arg(cgroup)
        .arg(netns)
        .args(argv);
    c
}

/// Runs `argv` to completion in `cgroup` and `netns`, killed at `timeout`.
pub fn exec_in<S: AsRef<OsStr>>(
    cgroup: &Path,
    netns: &Path,
    argv: &[S],
    timeout: Duration,
) -> Result<Output> {
    cmd::run(&mut command_in(cgroup, netns, argv), timeout)
}

/// Starts a long-running `argv` in its own session (it outlives a CLI `up`), in `cgroup` and
/// `netns`, with stdout and stderr appended to `log`. Its PID is also its process group.
pub fn spawn_in<S: AsRef<OsStr>>(
    cgroup: &Path,
    netns: &Path,
    argv: &[S],
    log: &Path,
    env: &[(&str, &str)],
) -> Result<Child> {
    let out = File::options()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening log {}", log.display()))?;
    let err = out.try_clone().context("cloning log file handle")?;
    let inner = command_in(cgroup, netns, argv);
    let mut c = Command::new("setsid");
    c.arg(inner.get_program()).args(inner.get_args());
    c.envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    let shown = cmd::describe(&c);
    let mut child = c.spawn().with_context(|| format!("starting `{shown}`"))?;
    // Return once it is in its cgroup, so callers can tell "ours and running" by membership.
    let mount = cgroup::mount_point()?;
    let pid = i32::try_from(child.id())?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cgroup::pid_in(pid, cgroup, &mount) {
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("`{shown}` exited at once ({status}); see {}", log.display());
        }
        if Instant::now() >= deadline {
            anyhow::bail!(
                "`{shown}` did not join cgroup {} within 5s",
                cgroup.display()
            );
        }
        thread::sleep(Duration::from_millis(5));
    }
    Ok(child)
}

/// Sends `signal` to the process group `pid` if `pid` is a live process in `owner_cgroup`.
pub fn signal_ours(pid: i32, signal: Signal, owner_cgroup: &Path, mount: &Path) -> bool {
    if !cgroup::pid_in(pid, owner_cgroup, mount) {
        return false;
    }
    if killpg(Pid::from_raw(pid), signal).is_err() {
        let _ = kill(Pid::from_raw(pid), signal);
    }
    true
}

/// Stops our process `pid`: SIGTERM, then SIGKILL after `grace`; waits until it is gone.
pub fn stop(pid: i32, grace: Duration, owner_cgroup: &Path, mount: &Path) -> Result<()> {
    if !signal_ours(pid, Signal::SIGTERM, owner_cgroup, mount) {
        return Ok(());
    }
    if wait_gone(pid, grace, owner_cgroup, mount) {
        return Ok(());
    }
    signal_ours(pid, Signal::SIGKILL, owner_cgroup, mount);
    if wait_gone(pid, Duration::from_secs(5), owner_cgroup, mount) {
        return Ok(());
    }
    anyhow::bail!("process {pid} survived SIGKILL")
}

/// Waits up to `timeout` for `pid` to exit (or turn zombie); true if it did.
pub fn wait_gone(pid: i32, timeout: Duration, owner_cgroup: &Path, mount: &Path) -> bool {
    let deadline = Instant::now() + timeout;
    while cgroup::pid_in(pid, owner_cgroup, mount) {
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
    true
}

/// Reaps `child` if it has exited (so no zombie of ours stays behind); bounded wait.
pub fn reap(child: &mut Child, timeout: Duration) {
    let _ = cmd::wait_deadline(child, timeout);
}
