//! Operating the agents as an operator does: raw HTTP on the admin socket, the `ambit` CLI as
//! printed, Prometheus metrics, log files (JSON access lines), extra config keys, a second
//! agent for a node (zero-downtime restart), signals by PID, and a steady-load client.
mod http;
mod metrics;
mod pod_server;
mod stall;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::Signal;
use serde_json::Value;

use crate::state::{write_atomic, Node};
use crate::testbed::Testbed;
use crate::{agent, cmd, config, process, servers};

pub use http::{parse_response, unix_exchange, HttpReply};
pub use metrics::{Metrics, Sample};
pub use stall::Pusher;

/// How long one admin request may take before the test calls it a hang.
pub const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);
/// The steady-load script (see its docstring), written to `<dir>/load.py`.
pub const LOAD_PY: &str = include_str!("scripts/load.py");

/// A process this module started: a second agent, a load client, a pinger, a server.
#[derive(Debug)]
pub struct Proc {
    /// Its PID (a session and process group of its own).
    pub pid: i32,
    /// Where its stdout and stderr go.
    pub log: PathBuf,
    child: Option<Child>,
    cgroup: PathBuf,
    mount: PathBuf,
}

impl Proc {
    /// Takes over `child`, logging to `log`, started in `cgroup` (or below it) of the cgroup2
    /// `mount`.
    pub(crate) fn new(child: Child, log: PathBuf, cgroup: PathBuf, mount: PathBuf) -> Result<Self> {
        Ok(Self {
            pid: i32::try_from(child.id())?,
            log,
            child: Some(child),
            cgroup,
            mount,
        })
    }

    /// Whether it is still running (and ours).
    pub fn running(&self) -> bool {
        crate::cgroup::pid_in(self.pid, &self.cgroup, &self.mount)
    }

    /// Sends `signal` (only while it is still ours); true if sent.
    pub fn signal(&self, signal: Signal) -> bool {
        process::signal_ours(self.pid, signal, &self.cgroup, &self.mount)
    }

    /// Waits up to `timeout` for it to exit; true if it did (reaped when we hold it).
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let gone = process::wait_gone(self.pid, timeout, &self.cgroup, &self.mount);
        if gone {
            if let Some(c) = self.child.as_mut() {
                process::reap(c, Duration::from_secs(1));
            }
        }
        gone
    }

    /// Its log so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The JSON lines of its log so far (other lines skipped).
    pub fn json_lines(&self) -> Vec<Value> {
        json_lines(&self.output())
    }

    /// Waits until a JSON line satisfies `pick` (its result), for at most `timeout`.
    pub fn wait_line<T>(
        &mut self,
        timeout: Duration,
        mut pick: impl FnMut(&Value) -> Option<T>,
    ) -> Result<T> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = self.json_lines().iter().find_map(&mut pick) {
                return Ok(v);
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} (pid {}) did not print the expected line within {timeout:?}; log:\n{}",
                    self.log.display(),
                    self.pid,
                    tail(&self.output(), 30)
                );
            }
            if !self.running() {
                // One more read: the line may have been written just before it exited.
                if let Some(v) = self.json_lines().iter().find_map(&mut pick) {
                    return Ok(v);
                }
                bail!(
                    "{} (pid {}) exited without the expected line; log:\n{}",
                    self.log.display(),
                    self.pid,
                    tail(&self.output(), 30)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if crate::cgroup::pid_in(self.pid, &self.cgroup, &self.mount) {
                process::signal_ours(self.pid, Signal::SIGKILL, &self.cgroup, &self.mount);
            }
            process::reap(&mut child, Duration::from_secs(2));
        }
    }
}

/// The JSON objects among `text`'s lines.
pub fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| l.trim_start().starts_with('{'))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The last JSON line a finished probe (`what`) printed on stdout; an error with its exit status
/// and stderr when it printed none.
pub fn last_json(out: &Output, what: &str) -> Result<Value> {
    let text = String::from_utf8_lossy(&out.stdout);
    json_lines(&text).pop().with_context(|| {
        format!(
            "{what} printed no JSON report ({}): {text} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(n)..].join("\n")
}

/// Size of a file (0 when missing): a log offset to read from later.
pub fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// What was appended to `path` after `offset`.
pub fn read_from(path: &Path, offset: u64) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let start = usize::try_from(offset)
        .unwrap_or(usize::MAX)
        .min(text.len());
    String::from_utf8_lossy(&text[start..]).into_owned()
}

/// `base` with each top-level key of `extra` replaced by (or added as) `extra`'s value.
pub fn merge_config(base: &str, extra: &str) -> String {
    let key = |l: &str| {
        (!l.starts_with([' ', '\t', '#', '-']))
            .then(|| l.split_once(':').map(|(k, _)| k.trim().to_string()))
            .flatten()
    };
    let replaced: Vec<String> = extra.lines().filter_map(key).collect();
    let mut out = String::new();
    let mut skipping = false;
    for line in base.lines() {
        match key(line) {
            Some(k) => skipping = replaced.contains(&k),
            None if line.starts_with([' ', '\t', '-']) => {}
            None => skipping = false,
        }
        if !skipping {
            out.push_str(line);
            out.push('\n');
        }
    }
    out.push_str(extra.trim_end());
    out.push('\n');
    out
}

impl Testbed {
    /// `node`'s admin socket path.
    pub fn admin_socket(&self, node: &str) -> PathBuf {
        self.node(node).admin_socket.clone()
    }

    /// Sends `METHOD TARGET` (HTTP/1.1, `Connection: close`) to `node`'s admin socket and
    /// parses the response; an error when it does not answer within [`ADMIN_TIMEOUT`].
    pub fn admin_http(&self, node: &str, method: &str, target: &str) -> Result<HttpReply> {
        let req = format!(
            "{method} {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
             Content-Length: 0\r\n\r\n"
        );
        let raw = unix_exchange(&self.admin_socket(node), req.as_bytes(), ADMIN_TIMEOUT)
            .with_context(|| format!("{method} {target} on {node}'s admin socket"))?;
        parse_response(&raw).with_context(|| format!("{method} {target} on {node}"))
    }

    /// `GET target` on `node`'s admin socket; requires 200 and a JSON body.
    pub fn admin_get(&self, node: &str, target: &str) -> Result<Value> {
        let r = self.admin_http(node, "GET", target)?;
        if r.status != 200 {
            bail!("GET {target} on {node}: {}: {}", r.status, r.text());
        }
        r.json()
    }

    /// `GET /metrics` of `node`, parsed.
    pub fn metrics(&self, node: &str) -> Result<Metrics> {
        let r = self.admin_http(node, "GET", "/metrics")?;
        if r.status != 200 {
            bail!("GET /metrics on {node}: {}: {}", r.status, r.text());
        }
        Metrics::parse(&r.text())
    }

    /// Runs `ambit ARGS --admin-socket <node's socket>` as an operator would (no `--json`
    /// unless given), with a deadline.
    pub fn ambit_cli(&self, node: &str, args: &[&str]) -> Result<Output> {
        let bin = self.agent_bin()?.to_path_buf();
        cmd::run(
            Command::new(bin)
                .args(args)
                .arg("--admin-socket")
                .arg(self.admin_socket(node)),
            ADMIN_TIMEOUT,
        )
    }

    /// Stops `node`'s agent (SIGTERM) and starts it again with `extra` (YAML, top-level keys,
    /// e.g. `logFormat: json`) merged into its config; waits until the agents are ready.
    pub fn restart_agent_with(&mut self, node: &str, extra: &str) -> Result<()> {
        self.stop_agent(node, Signal::SIGTERM)?;
        self.start_agent_with(node, extra)?;
        self.wait_agents_ready(crate::testbed::AGENT_READY_TIMEOUT)
    }

    /// Starts `node`'s agent (stopped, e.g. killed) with `extra` merged into its config, as
    /// [`Testbed::restart_agent_with`] does, without waiting until it serves its pods.
    pub fn start_agent_with(&mut self, node: &str, extra: &str) -> Result<()> {
        let n = self.node(node).clone();
        let text = merge_config(&config::agent_config(self.state(), &n), extra);
        write_atomic(&n.config, text.as_bytes())?;
        let child = spawn_agent(self, &n, &n.log)?;
        self.record(format!("agent {node}"), child)
    }

    /// Starts a second agent for `node` with the node's config file as it is (the same
    /// admin socket, pin dir and ports: a zero-downtime restart), logging to its own file.
    /// The first agent keeps running; the caller stops it by PID.
    pub fn start_successor(&mut self, node: &str) -> Result<Proc> {
        let n = self.node(node).clone();
        let k = std::fs::read_dir(&self.state().dir).map_or(0, |d| d.count());
        let log = self.state().dir.join(format!("{node}-successor-{k}.log"));
        let child = spawn_agent(self, &n, &log)?;
        let pid = i32::try_from(child.id())?;
        Ok(Proc {
            pid,
            log,
            child: Some(child),
            cgroup: self.state().cgroup_root.clone(),
            mount: self.state().cgroup_mount.clone(),
        })
    }

    /// Sends `signal` to `pid` if it is a live process of this testbed; true if sent.
    pub fn signal_pid(&self, pid: i32, signal: Signal) -> bool {
        let st = self.state();
        process::signal_ours(pid, signal, &st.cgroup_root, &st.cgroup_mount)
    }

    /// Waits up to `timeout` for our process `pid` to exit; true if it did.
    pub fn wait_pid_exit(&self, pid: i32, timeout: Duration) -> bool {
        let st = self.state();
        process::wait_gone(pid, timeout, &st.cgroup_root, &st.cgroup_mount)
    }

    /// Forgets the recorded agent of `node` once it has exited (its successor serves now).
    pub fn forget_agent(&mut self, node: &str) {
        self.forget_process(&format!("agent {node}"));
    }

    /// Starts `load.py ARGS` in `pod` (netns and cgroup, so its connections are captured).
    pub fn start_load_script(&self, pod: &str, args: &[String]) -> Result<Proc> {
        let st = self.state();
        let script = st.dir.join("load.py");
        if !script.exists() {
            std::fs::write(&script, LOAD_PY).context("writing load.py")?;
        }
        let p = st.pod(pod)?;
        let k = std::fs::read_dir(&st.dir).map_or(0, |d| d.count());
        let log = st.dir.join(format!("load-{pod}-{}-{k}.log", args[0]));
        let mut argv = vec![
            servers::python().to_string_lossy().into_owned(),
            script.to_string_lossy().into_owned(),
        ];
        argv.extend(args.iter().cloned());
        let child = process::spawn_in(&p.cgroup, &p.netns_path(), &argv, &log, &[])?;
        Ok(Proc {
            pid: i32::try_from(child.id())?,
            log,
            child: Some(child),
            cgroup: p.cgroup.clone(),
            mount: st.cgroup_mount.clone(),
        })
    }

    /// Starts the asyncio echo server of `load.py` in `pod` on `port` and waits until it
    /// listens.
    pub fn start_echo_server(&self, pod: &str, port: u16) -> Result<Proc> {
        let mut p = self.start_load_script(pod, &["serve".into(), port.to_string()])?;
        p.wait_line(Duration::from_secs(20), |v| v.get("listening").cloned())?;
        Ok(p)
    }
}

/// Starts `ambit run` for `node` in the instance's root cgroup without rewriting its config
/// (see [`agent::spawn`]), logging to `log`.
fn spawn_agent(tb: &Testbed, node: &Node, log: &Path) -> Result<Child> {
    agent::spawn(node, tb.agent_bin()?, &tb.state().cgroup_root, log)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "unit tests")]
    use super::*;

    #[test]
    fn merge_config_replaces_and_adds_keys() {
        let base = "node: n1\nlogFormat: text\nca:\n  addr: x\n  ttl: 1\nadminSocket: /s\n";
        let merged = merge_config(base, "logFormat: json\nmetricsListen: 127.0.0.1:1\n");
        assert_eq!(
            merged,
            "node: n1\nca:\n  addr: x\n  ttl: 1\nadminSocket: /s\nlogFormat: json\nmetricsListen: 127.0.0.1:1\n"
        );
        let merged = merge_config(base, "ca:\n  addr: y\n");
        assert_eq!(
            merged,
            "node: n1\nlogFormat: text\nadminSocket: /s\nca:\n  addr: y\n"
        );
    }
}
