//! Probing the agent's own-socket exemption: marked connections, agents in other cgroups.
//!
//! Connections made with the agent's socket marks (from a pod as nobody with only CAP_NET_RAW,
//! or as root from a given cgroup), a second agent started in a cgroup of its own, and the
//! kernel's list of agent cgroups.
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;

use crate::ops::{self, Proc};
use crate::state::write_atomic;
use crate::testbed::Testbed;
use crate::{agent, cgroup, config, leaks, process, servers};

/// The agent's outbound and delivery marks (the defaults of `outboundMark` / `deliverMark`).
pub const AGENT_MARKS: [u32; 2] = [0x539, 0x53a];
/// CAP_NET_RAW as a bit of /proc/self/status `CapEff`.
pub const CAP_NET_RAW: u64 = 1 << 13;

/// Sets SO_MARK (unless 0), connects, sends, half-closes and reads to EOF; prints one JSON line:
/// uid, effective capabilities, the mark the socket carries, and the data or the error.
const PROBE: &str = r#"
import json, os, socket, sys
host, port, mark, send = sys.argv[1], int(sys.argv[2]), int(sys.argv[3], 0), sys.argv[4]
status = dict(l.split(":\t", 1) for l in open("/proc/self/status").read().splitlines() if ":\t" in l)
out = {"uid": os.getuid(), "cap_eff": int(status["CapEff"], 16)}
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
s.settimeout(5)
try:
    if mark:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
    out["mark"] = s.getsockopt(socket.SOL_SOCKET, socket.SO_MARK)
    s.connect((host, port))
    s.sendall(send.encode())
    s.shutdown(socket.SHUT_WR)
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    out["data"] = data.decode(errors="replace")
except OSError as e:
    out["error"] = f"{type(e).__name__}: {e}"
print(json.dumps(out), flush=True)
"#;

/// `setpriv` arguments: uid/gid 65534, no groups, CAP_NET_RAW the only capability (effective,
/// permitted, inheritable, ambient and bounding), as a container's non-root process has it.
const NOBODY_WITH_NET_RAW: &[&str] = &[
    "setpriv",
    "--reuid=65534",
    "--regid=65534",
    "--clear-groups",
    "--inh-caps=-all,+net_raw",
    "--ambient-caps=+net_raw",
    "--bounding-set=-all,+net_raw",
    "--",
];

impl Testbed {
    /// Connects from `pod` (its netns and cgroup) to `ip:port` as nobody with only CAP_NET_RAW,
    /// with SO_MARK `mark` set first, sends `send` and reads to EOF: the probe's JSON report.
    pub fn marked_request(
        &self,
        pod: &str,
        ip: IpAddr,
        port: u16,
        mark: u32,
        send: &str,
    ) -> Result<Value> {
        let p = self.state().pod(pod)?;
        probe(
            &p.cgroup,
            &p.netns_path(),
            NOBODY_WITH_NET_RAW,
            (ip, port),
            mark,
            send,
        )
    }

    /// Like [`Testbed::marked_request`], but as root from the cgroup `cgroup` (an agent's, say)
    /// inside `pod`'s netns.
    pub fn marked_request_from(
        &self,
        cgroup: &Path,
        pod: &str,
        to: (IpAddr, u16),
        mark: u32,
        send: &str,
    ) -> Result<Value> {
        let p = self.state().pod(pod)?;
        probe(cgroup, &p.netns_path(), &[], to, mark, send)
    }

    /// Starts a second agent for `node` (a restart hand-over, as [`Testbed::start_successor`])
    /// that joins `agent_cgroup` instead of the node's agent cgroup: a new agent pod in
    /// Kubernetes lives in another cgroup than the old one. Its config is a copy of the node's.
    pub fn start_successor_in(&mut self, node: &str, agent_cgroup: &Path) -> Result<Proc> {
        let mut n = self.node(node).clone();
        let name = agent_cgroup
            .file_name()
            .context("agent cgroup has no name")?
            .to_string_lossy()
            .into_owned();
        let dir = self.state().dir.clone();
        n.config = dir.join(format!("{node}-{name}.yaml"));
        let text = ops::merge_config(
            &config::agent_config(self.state(), &n),
            &format!("agentCgroup: {}", agent_cgroup.display()),
        );
        write_atomic(&n.config, text.as_bytes())?;
        cgroup::create(agent_cgroup)?;
        let log = dir.join(format!("{node}-{name}.log"));
        let root = self.state().cgroup_root.clone();
        let child = agent::spawn(&n, self.agent_bin()?, &root, &log)?;
        Proc::new(child, log, root, self.state().cgroup_mount.clone())
    }

    /// The cgroup ids in `node`'s pinned `amb_agent_cgs`: the cgroups the kernel takes for
    /// agents' (sorted).
    pub fn agent_cgroup_ids(&self, node: &str) -> Result<Vec<u64>> {
        let pin = self.node(node).pin_dir.join("amb_agent_cgs");
        let mut ids: Vec<u64> = leaks::map_dump(&pin)?
            .iter()
            .map(|e| {
                e["formatted"]["key"]
                    .as_u64()
                    .with_context(|| format!("amb_agent_cgs entry without a u64 key: {e}"))
            })
            .collect::<Result<_>>()?;
        ids.sort_unstable();
        Ok(ids)
    }
}

/// The cgroup id of the cgroup directory `dir` (its inode number).
pub fn cgroup_id(dir: &Path) -> Result<u64> {
    std::fs::metadata(dir)
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .with_context(|| format!("stat {}", dir.display()))
}

/// Runs [`PROBE`] in `cgroup` and the netns at `netns`, behind `wrapper` (e.g. setpriv).
fn probe(
    cgroup: &Path,
    netns: &Path,
    wrapper: &[&str],
    to: (IpAddr, u16),
    mark: u32,
    send: &str,
) -> Result<Value> {
    let python: PathBuf = servers::python();
    let mut argv: Vec<String> = wrapper.iter().map(|s| s.to_string()).collect();
    argv.extend([
        python.to_string_lossy().into_owned(),
        "-c".into(),
        PROBE.into(),
        to.0.to_string(),
        to.1.to_string(),
        format!("{mark:#x}"),
        send.into(),
    ]);
    let out = process::exec_in(cgroup, netns, &argv, Duration::from_secs(30))?;
    ops::last_json(&out, "mark probe")
}
