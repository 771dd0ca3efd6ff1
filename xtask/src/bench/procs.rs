//! Processes the bench starts in pods (servers, load clients, the holder) and the agents' /proc.
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ambit_testbed::state::Pod;
use ambit_testbed::{cmd, process};
use anyhow::{bail, Context, Result};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

/// Grace between SIGTERM and SIGKILL when stopping a server.
const STOP_GRACE: Duration = Duration::from_secs(3);

/// A long-running process in a pod; stopped by its PID (never by name) when dropped.
#[derive(Debug)]
pub(crate) struct Proc {
    pub(crate) role: String,
    child: Child,
    pid: i32,
    cgroup: PathBuf,
    mount: PathBuf,
}

impl Proc {
    /// Starts `argv` in `pod`'s netns and cgroup, output appended to `log`.
    pub(crate) fn spawn(
        pod: &Pod,
        mount: &Path,
        role: &str,
        argv: &[String],
        log: &Path,
    ) -> Result<Self> {
        let child = process::spawn_in(&pod.cgroup, &pod.netns_path(), argv, log, &[])
            .with_context(|| format!("starting {role}"))?;
        Ok(Self {
            role: role.to_string(),
            pid: i32::try_from(child.id())?,
            child,
            cgroup: pod.cgroup.clone(),
            mount: mount.to_path_buf(),
        })
    }

    /// Whether it is still running.
    pub(crate) fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Err(e) = process::stop(self.pid, STOP_GRACE, &self.cgroup, &self.mount) {
            eprintln!("bench: stopping {} (pid {}): {e:#}", self.role, self.pid);
        }
        process::reap(&mut self.child, Duration::from_secs(1));
    }
}

/// What a bounded run printed.
#[derive(Debug)]
pub(crate) struct Ran {
    pub(crate) success: bool,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

/// Runs `argv` in `pod` to completion, stdout and stderr to files under `dir` named `name`,
/// calling `sample` about every `every` while it runs; killed (its process group) at `timeout`.
pub(crate) fn run_sampled(
    pod: &Pod,
    dir: &Path,
    name: &str,
    argv: &[String],
    timeout: Duration,
    every: Duration,
    mut sample: impl FnMut(),
) -> Result<Ran> {
    let out_path = dir.join(format!("{name}.out"));
    let err_path = dir.join(format!("{name}.err"));
    let mut c = process::command_in(&pod.cgroup, &pod.netns_path(), argv);
    c.stdin(Stdio::null())
        .stdout(fs::File::create(&out_path)?)
        .stderr(fs::File::create(&err_path)?);
    std::os::unix::process::CommandExt::process_group(&mut c, 0);
    let shown = cmd::describe(&c);
    let mut child = c.spawn().with_context(|| format!("starting `{shown}`"))?;
    let deadline = Instant::now() + timeout;
    let mut next = Instant::now() + every;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            kill_group(&child);
            let _ = child.wait();
            bail!(
                "`{}` in {} timed out after {timeout:?}; stderr: {}",
                argv.join(" "),
                pod.name,
                fs::read_to_string(&err_path).unwrap_or_default().trim()
            );
        }
        if Instant::now() >= next {
            sample();
            next += every;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(Ran {
        success: status.success(),
        stdout: fs::read_to_string(&out_path).unwrap_or_default(),
        stderr: fs::read_to_string(&err_path).unwrap_or_default(),
    })
}

/// An interactive process in a pod, spoken to over stdin/stdout one line at a time (the holder).
pub(crate) struct Lines {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl Lines {
    /// Starts `argv` in `pod` with piped stdin and stdout, stderr to `log`.
    pub(crate) fn spawn(pod: &Pod, argv: &[String], log: &Path) -> Result<Self> {
        let mut c: Command = process::command_in(&pod.cgroup, &pod.netns_path(), argv);
        c.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(fs::File::create(log)?);
        std::os::unix::process::CommandExt::process_group(&mut c, 0);
        let mut child = c
            .spawn()
            .with_context(|| format!("starting `{}`", argv.join(" ")))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().context("holder stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            child,
            stdin,
            lines: rx,
        })
    }

    /// The next line it prints, waiting at most `timeout`.
    pub(crate) fn next_line(&mut self, timeout: Duration) -> Result<String> {
        self.lines
            .recv_timeout(timeout)
            .with_context(|| format!("no line from the holder within {timeout:?}"))
    }

    /// Writes one line to its stdin.
    pub(crate) fn send(&mut self, line: &str) -> Result<()> {
        let stdin = self.stdin.as_mut().context("holder stdin closed")?;
        writeln!(stdin, "{line}")?;
        stdin.flush()?;
        Ok(())
    }
}

impl Drop for Lines {
    fn drop(&mut self) {
        // EOF asks it to close its connections and exit; the kill is the bounded fallback.
        drop(self.stdin.take());
        if !matches!(
            cmd::wait_deadline(&mut self.child, Duration::from_secs(10)),
            Ok(Some(_))
        ) {
            kill_group(&self.child);
            let _ = self.child.wait();
        }
    }
}

fn kill_group(child: &Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// An agent process and the /proc figures the bench reads from it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AgentProc {
    pub(crate) pid: i32,
    /// Clock ticks per second (`getconf CLK_TCK`).
    ticks: f64,
}

impl AgentProc {
    /// The agent with `pid`; checks that it is an `ambit` process (or a renamed copy, `ambit-*`).
    pub(crate) fn new(pid: i32) -> Result<Self> {
        let comm = fs::read_to_string(format!("/proc/{pid}/comm"))
            .with_context(|| format!("agent pid {pid} is gone"))?;
        if !comm.trim().starts_with("ambit") {
            bail!("pid {pid} is `{}`, not the ambit agent", comm.trim());
        }
        let ticks = Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0);
        Ok(Self { pid, ticks })
    }

    /// `VmRSS` in KiB.
    pub(crate) fn rss_kib(&self) -> Result<u64> {
        self.status_kib("VmRSS:")
    }

    /// `RssAnon` in KiB: heap and stacks, without the binary's mapped pages (`RssFile`).
    pub(crate) fn anon_kib(&self) -> Result<u64> {
        self.status_kib("RssAnon:")
    }

    fn status_kib(&self, field: &str) -> Result<u64> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid))
            .with_context(|| format!("agent pid {} is gone", self.pid))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .with_context(|| format!("no {field} in /proc/PID/status"))
    }

    /// utime + stime of all its threads, in seconds.
    pub(crate) fn cpu_secs(&self) -> Result<f64> {
        let stat = fs::read_to_string(format!("/proc/{}/stat", self.pid))
            .with_context(|| format!("agent pid {} is gone", self.pid))?;
        parse_cpu_ticks(&stat)
            .map(|t| t as f64 / self.ticks)
            .context("malformed /proc/PID/stat")
    }
}

/// utime + stime (fields 14 and 15) from a `/proc/PID/stat` line; the name may hold spaces.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): utime is field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_skip_a_name_with_spaces() {
        let stat = "42 (am bit) S 1 42 42 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 9 0 1 2 3";
        assert_eq!(parse_cpu_ticks(stat), Some(325));
        assert_eq!(parse_cpu_ticks("garbage"), None);
    }
}
