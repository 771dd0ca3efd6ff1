//! Resource accounting for the load, churn and abuse tests: an agent's RSS and open file
//! descriptors from /proc, many held connections from a pod (`many.py`), and the kernel state
//! an agent left behind (pinned maps and sk_lookup links, through `bpftool`).
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::Signal;
use serde_json::Value;

use crate::cmd;
use crate::ops::json_lines;
use crate::process;
use crate::servers;
use crate::testbed::Testbed;

/// The connection-holding script (see its docstring), written to `<dir>/many.py`.
pub const MANY_PY: &str = include_str!("scripts/many.py");

/// What a process holds at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// `VmRSS`, KiB.
    pub rss_kib: u64,
    /// `RssAnon`, KiB (heap and stacks; the rest of RSS is the binary's pages).
    pub anon_kib: u64,
    /// Entries of `/proc/PID/fd`.
    pub fds: usize,
}

impl fmt::Display for Usage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "RSS {:.1} MiB (anon {:.1} MiB), {} fds",
            self.rss_kib as f64 / 1024.0,
            self.anon_kib as f64 / 1024.0,
            self.fds
        )
    }
}

/// RSS and open fds of `pid`.
pub fn usage(pid: i32) -> Result<Usage> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("/proc/{pid}/status has no {name}"))
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("listing /proc/{pid}/fd"))?
        .count();
    Ok(Usage {
        rss_kib: field("VmRSS:")?,
        anon_kib: field("RssAnon:")?,
        fds,
    })
}

/// Raises the RLIMIT_NOFILE soft limit of process `pid` to `want`, or to its hard limit when
/// that is lower (raising the hard limit needs CAP_SYS_RESOURCE, which a container may lack),
/// with `prlimit`. Processes it starts afterwards inherit it. Returns the soft limit now.
pub fn raise_nofile(pid: u32, want: u64) -> Result<u64> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .with_context(|| format!("reading /proc/{pid}/limits"))?;
    let hard: u64 = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4))
        .and_then(|v| v.parse().ok())
        .context("no `Max open files` hard limit in /proc/PID/limits")?;
    let soft = want.min(hard);
    cmd::check(
        Command::new("prlimit")
            .arg("--pid")
            .arg(pid.to_string())
            .arg(format!("--nofile={soft}:{hard}")),
        Duration::from_secs(10),
    )?;
    Ok(soft)
}

/// A `many.py` process in a pod: an echo server, or a holder of many connections.
#[derive(Debug)]
pub struct Many {
    /// Its PID.
    pub pid: i32,
    /// Its output.
    pub log: PathBuf,
    release: PathBuf,
    child: Option<Child>,
    cgroup: PathBuf,
    mount: PathBuf,
}

impl Many {
    /// Its JSON lines so far.
    pub fn lines(&self) -> Vec<Value> {
        json_lines(&std::fs::read_to_string(&self.log).unwrap_or_default())
    }

    /// Waits (up to `timeout`) for a line with key `key`; returns that line.
    pub fn wait_for(&mut self, key: &str, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = self.lines().into_iter().find(|v| v.get(key).is_some()) {
                return Ok(v);
            }
            let exited = self
                .child
                .as_mut()
                .is_some_and(|c| c.try_wait().ok().flatten().is_some());
            if exited || Instant::now() >= deadline {
                bail!(
                    "many.py (pid {}) printed no `{key}` line {}; log:\n{}",
                    self.pid,
                    if exited {
                        "and exited".to_string()
                    } else {
                        format!("within {timeout:?}")
                    },
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Tells a holder to close every connection and waits for it to say so.
    pub fn release(&mut self, timeout: Duration) -> Result<Value> {
        std::fs::write(&self.release, b"").context("writing the release file")?;
        self.wait_for("closed", timeout)
    }
}

impl Drop for Many {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            process::signal_ours(self.pid, Signal::SIGKILL, &self.cgroup, &self.mount);
            process::reap(&mut child, Duration::from_secs(2));
        }
    }
}

impl Testbed {
    /// RSS and fds of `node`'s agent.
    pub fn agent_usage(&self, node: &str) -> Result<Usage> {
        let pid = self
            .agent_pid(node)
            .with_context(|| format!("no agent recorded for {node}"))?;
        usage(pid)
    }

    fn start_many(&self, pod: &str, args: &[String]) -> Result<Many> {
        let st = self.state();
        let script = st.dir.join("many.py");
        if !script.exists() {
            std::fs::write(&script, MANY_PY).context("writing many.py")?;
        }
        let p = st.pod(pod)?;
        let k = std::fs::read_dir(&st.dir).map_or(0, |d| d.count());
        let log = st.dir.join(format!("many-{pod}-{}-{k}.log", args[0]));
        let release = st.dir.join(format!("many-{pod}-{k}.release"));
        let mut argv = vec![
            servers::python().to_string_lossy().into_owned(),
            script.to_string_lossy().into_owned(),
        ];
        argv.extend(args.iter().cloned());
        if args[0] == "hold" {
            argv.push(format!("--release={}", release.display()));
        }
        let child = process::spawn_in(&p.cgroup, &p.netns_path(), &argv, &log, &[])?;
        Ok(Many {
            pid: i32::try_from(child.id())?,
            log,
            release,
            child: Some(child),
            cgroup: p.cgroup.clone(),
            mount: st.cgroup_mount.clone(),
        })
    }

    /// Starts the `many.py` echo server in `pod` on `port` and waits until it listens.
    pub fn start_many_server(&self, pod: &str, port: u16) -> Result<Many> {
        let mut m = self.start_many(pod, &["serve".into(), port.to_string()])?;
        m.wait_for("listening", Duration::from_secs(20))?;
        Ok(m)
    }

    /// Starts `many.py hold` in `pod`: `n` connections to `ip:port`, `parallel` at a time.
    /// Call [`Many::wait_for`]`("open", ..)` for its report and [`Many::release`] to close.
    pub fn hold_many(
        &self,
        pod: &str,
        ip: std::net::IpAddr,
        port: u16,
        n: usize,
        parallel: usize,
    ) -> Result<Many> {
        self.start_many(
            pod,
            &[
                "hold".into(),
                ip.to_string(),
                port.to_string(),
                n.to_string(),
                format!("--parallel={parallel}"),
            ],
        )
    }
}

/// `bpftool -j ARGS`, parsed.
pub fn bpftool(args: &[&str]) -> Result<Value> {
    let out = cmd::check(
        Command::new("bpftool").arg("-j").args(args),
        Duration::from_secs(30),
    )?;
    serde_json::from_str(&out).with_context(|| format!("bpftool {args:?} printed non-JSON"))
}

/// The entries of the map pinned at `pin` (`bpftool map dump pinned`), as bpftool prints them
/// (`formatted` keys with BTF).
pub fn map_dump(pin: &Path) -> Result<Vec<Value>> {
    let v = bpftool(&["map", "dump", "pinned", &pin.to_string_lossy()])?;
    Ok(v.as_array().cloned().unwrap_or_default())
}

/// Every BPF link of the system (`bpftool link show`).
pub fn links() -> Result<Vec<Value>> {
    let v = bpftool(&["link", "show"])?;
    Ok(v.as_array().cloned().unwrap_or_default())
}

/// The link pinned at `pin`.
pub fn pinned_link(pin: &Path) -> Result<Value> {
    bpftool(&["link", "show", "pinned", &pin.to_string_lossy()])
}
