//! An app that stops reading (`stall.py sink`) and a client pushing into it until blocked (`stall.py push`).
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;

use super::Proc;
use crate::testbed::Testbed;
use crate::{process, servers};

/// The script (see its docstring), written to `<dir>/stall.py`.
const STALL_PY: &str = include_str!("../scripts/stall.py");

/// A `stall.py push` process: connections blocked on an application that does not read.
#[derive(Debug)]
pub struct Pusher {
    /// The process.
    pub proc: Proc,
    release: PathBuf,
}

impl Pusher {
    /// Waits (up to `timeout`) until every connection is blocked; returns the report
    /// (`stalled`, `bytes` per connection, `failed`, `errors`).
    pub fn wait_stalled(&mut self, timeout: Duration) -> Result<Value> {
        self.proc
            .wait_line(timeout, |v| v.get("stalled").is_some().then(|| v.clone()))
    }

    /// Resets (RST) the first connections (as many as the `abort` it was started with).
    pub fn abort_first(&mut self) -> Result<u64> {
        std::fs::write(&self.release, b"").context("writing the release file")?;
        self.proc.wait_line(Duration::from_secs(20), |v| {
            v.get("aborted").and_then(Value::as_u64)
        })
    }

    /// Resets the remaining connections; the process then exits.
    pub fn abort_rest(&mut self) -> Result<u64> {
        let second = PathBuf::from(format!("{}.2", self.release.display()));
        std::fs::write(second, b"").context("writing the second release file")?;
        self.proc.wait_line(Duration::from_secs(20), |v| {
            v.get("closed").and_then(Value::as_u64)
        })
    }
}

impl Testbed {
    fn start_stall_script(&self, pod: &str, args: &[String]) -> Result<(Proc, PathBuf)> {
        let st = self.state();
        let script = st.dir.join("stall.py");
        if !script.exists() {
            std::fs::write(&script, STALL_PY).context("writing stall.py")?;
        }
        let p = st.pod(pod)?;
        let k = std::fs::read_dir(&st.dir).map_or(0, |d| d.count());
        let log = st.dir.join(format!("stall-{pod}-{}-{k}.log", args[0]));
        let release = st.dir.join(format!("stall-{pod}-{k}.release"));
        let mut argv = vec![
            servers::python().to_string_lossy().into_owned(),
            script.to_string_lossy().into_owned(),
        ];
        argv.extend(args.iter().cloned());
        if args[0] == "push" {
            argv.push(format!("--release={}", release.display()));
        }
        let child = process::spawn_in(&p.cgroup, &p.netns_path(), &argv, &log, &[])?;
        let proc = Proc {
            pid: i32::try_from(child.id())?,
            log,
            child: Some(child),
            cgroup: p.cgroup.clone(),
            mount: st.cgroup_mount.clone(),
        };
        Ok((proc, release))
    }

    /// Starts an application in `pod` that accepts on `port` (IPv4 and IPv6) and never reads;
    /// waits until it listens. It runs until killed (dropping the [`Proc`] kills it).
    pub fn start_sink(&self, pod: &str, port: u16) -> Result<Proc> {
        let (mut p, _) = self.start_stall_script(pod, &["sink".into(), port.to_string()])?;
        p.wait_line(Duration::from_secs(20), |v| v.get("listening").cloned())?;
        Ok(p)
    }

    /// Starts `k` connections from `pod` to `port`, round-robin over `hosts`, each writing
    /// until it is blocked; [`Pusher::abort_first`] resets the first `abort` of them,
    /// [`Pusher::abort_rest`] the others.
    pub fn push_until_stalled(
        &self,
        pod: &str,
        port: u16,
        k: usize,
        hosts: &[IpAddr],
        abort: usize,
    ) -> Result<Pusher> {
        let mut args = vec!["push".to_string(), port.to_string(), k.to_string()];
        args.extend(hosts.iter().map(IpAddr::to_string));
        args.push(format!("--abort={abort}"));
        let (proc, release) = self.start_stall_script(pod, &args)?;
        Ok(Pusher { proc, release })
    }
}
