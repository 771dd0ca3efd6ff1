//! The testbed: two node namespaces, pods behind them, test servers and one agent per node.
//!
//! Everything global is named after a unique run id (`ambit-<id>-*` namespaces, the
//! `<cgroup2>/ambit-<id>` cgroup tree, `/sys/fs/bpf/ambit-<id>-<node>` pin dirs), and the state
//! file is written before each resource is created, so `teardown` (on drop, or `cargo xtask
//! testbed down` after a crash) can always remove exactly what this instance made.
mod build;

use std::path::{Path, PathBuf};
use std::process::{Child, Output};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::Signal;

use crate::agent::{self, Status};
use crate::ca;
use crate::cgroup;
use crate::config;
use crate::kubelet::CgroupDriver;
use crate::process;
use crate::scope::Scope;
use crate::state::{self, Applied, Node, Pod, PodSpec, Process, State};
use crate::teardown;

pub use build::default_agent_bin;

/// How long agents get to report every local enrolled pod as enrolled.
pub const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long servers get to listen.
pub const SERVER_READY_TIMEOUT: Duration = Duration::from_secs(15);
/// Certificate lifetime the agents ask for unless a test says otherwise (Istio's default).
pub const DEFAULT_CERT_TTL_SECS: u64 = 24 * 3600;

/// How to build a testbed.
#[derive(Debug, Clone)]
pub struct Options {
    /// Pods to create (default: [`PodSpec::defaults`]).
    pub pods: Vec<PodSpec>,
    /// Start one agent per node and wait until it serves its enrolled pods.
    pub agents: bool,
    /// The `ambit` binary (default: [`default_agent_bin`]).
    pub agent_bin: Option<PathBuf>,
    /// Keep the instance when the `Testbed` is dropped (CLI `up`); `down` removes it.
    pub persistent: bool,
    /// Print progress lines to stderr.
    pub progress: bool,
    /// Run a CA (`ambit ca`, with the testbed as token issuer) and give the agents a `ca:`
    /// section, so enrolled pods talk mTLS (HBONE). Without it the agents only capture:
    /// enrolled pods talk plaintext through them. Needs `agents`.
    pub ca: bool,
    /// Certificate lifetime the agents ask the CA for, in seconds.
    pub cert_ttl_secs: u64,
    /// Audience of the agents' tokens, required by the CA (default [`ca::AUDIENCE`]; istiod
    /// requires `istio-ca`).
    pub ca_audience: String,
    /// A cluster ID the CA serves and requires, and the agents send as `ClusterID` metadata
    /// (as with a multi-cluster istiod); `None`: neither.
    pub cluster_id: Option<String>,
    /// Lay the pods' and agents' cgroups out as kubelet does with this driver, below each
    /// node's cgroup (which the agent then takes as its `cgroupRoot`): the agents find the
    /// pods' root themselves (`podsCgroup: auto`) and stay in their own pod's cgroup.
    pub kubelet_cgroups: Option<CgroupDriver>,
    /// Give the agents a `cni:` section (socket and pod map in the instance dir), so pods set
    /// up through the CNI chain (`Testbed::add_cni_pod`) get their netns from the plugin.
    pub cni: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            pods: PodSpec::defaults(),
            agents: true,
            agent_bin: None,
            persistent: false,
            progress: true,
            ca: true,
            cert_ttl_secs: DEFAULT_CERT_TTL_SECS,
            ca_audience: ca::AUDIENCE.to_string(),
            cluster_id: None,
            kubelet_cgroups: None,
            cni: false,
        }
    }
}

impl Options {
    /// The default testbed with agents but no CA: capture only, plaintext between agents.
    pub fn capture_only() -> Self {
        Self {
            ca: false,
            ..Self::default()
        }
    }

    /// The default testbed with certificates of `secs` seconds (renewed at about half that).
    pub fn cert_ttl(secs: u64) -> Self {
        Self {
            cert_ttl_secs: secs,
            ..Self::default()
        }
    }
}

/// A running testbed instance. Dropping it tears everything down unless it is persistent.
#[derive(Debug)]
pub struct Testbed {
    state: State,
    children: Vec<Child>,
    persistent: bool,
    progress: bool,
    torn_down: bool,
    started: Instant,
}

impl Testbed {
    /// Builds a new instance. On error, what was built so far is removed again.
    pub fn up(opts: Options) -> Result<Self> {
        crate::require_root_result()?;
        let mut tb = Self::create_state(&opts)?;
        if let Err(e) = tb.build(&opts) {
            if let Err(cleanup) = tb.teardown() {
                eprintln!(
                    "testbed {}: cleanup after failed build: {cleanup:#}",
                    tb.state.id
                );
            }
            return Err(e);
        }
        Ok(tb)
    }

    /// Takes over an existing instance from its state file (CLI commands). The result is
    /// persistent: dropping it leaves the instance running.
    pub fn attach(state_file: &Path) -> Result<Self> {
        let state = State::load(state_file)?;
        Ok(Self {
            state,
            children: Vec::new(),
            persistent: true,
            progress: true,
            torn_down: false,
            started: Instant::now(),
        })
    }

    /// The instance `scope`'s CLI commands act on, if any.
    pub fn cli_instance(scope: &Scope) -> Result<Option<Self>> {
        let Some(id) = scope.instance_id() else {
            return Ok(None);
        };
        let file = teardown::instance_dir(&id).join("state.json");
        if !file.exists() {
            return Ok(None);
        }
        Self::attach(&file).map(Some)
    }

    /// Makes this instance the one `scope`'s CLI commands act on.
    pub fn make_cli_instance(&self, scope: &Scope) -> Result<()> {
        scope.point_at(&self.state.id)
    }

    /// Keeps the instance after drop (or not).
    pub fn set_persistent(&mut self, persistent: bool) {
        self.persistent = persistent;
        self.state.owner_pid = if persistent {
            None
        } else {
            Some(std::process::id())
        };
    }

    /// The recorded state.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// Pod `name`; panics if the testbed has no such pod (a test bug).
    pub fn pod(&self, name: &str) -> &Pod {
        self.state
            .pod(name)
            .expect("the test names a pod of its testbed")
    }

    /// Node `name`; panics if the testbed has no such node (a test bug).
    pub fn node(&self, name: &str) -> &Node {
        self.state
            .node(name)
            .expect("the test names a node of its testbed")
    }

    /// Runs `argv` in pod `pod`'s netns and cgroup, killed at `timeout`.
    pub fn exec<S: AsRef<std::ffi::OsStr>>(
        &self,
        pod: &str,
        argv: &[S],
        timeout: Duration,
    ) -> Result<Output> {
        let pod = self.state.pod(pod)?;
        process::exec_in(&pod.cgroup, &pod.netns_path(), argv, timeout)
    }

    /// Runs `argv` in `node`'s own network namespace (where its agent and, on a real node, its
    /// kubelet run), in the instance's `host` cgroup, killed at `timeout`.
    pub fn exec_on_node<S: AsRef<std::ffi::OsStr>>(
        &self,
        node: &str,
        argv: &[S],
        timeout: Duration,
    ) -> Result<Output> {
        let node = self.state.node(node)?;
        let cg = self.state.cgroup_root.join("host");
        cgroup::create(&cg)?;
        process::exec_in(&cg, &node.netns_path(), argv, timeout)
    }

    /// The `ambit` binary the agents run.
    pub fn agent_bin(&self) -> Result<&Path> {
        self.state
            .agent_bin
            .as_deref()
            .context("testbed was built without an agent binary")
    }

    /// `ambit status --json` of `node`'s agent.
    pub fn status(&self, node: &str) -> Result<Status> {
        agent::status(self.agent_bin()?, self.state.node(node)?)
    }

    /// PID of `node`'s agent, if we started one that is still recorded.
    pub fn agent_pid(&self, node: &str) -> Option<i32> {
        self.pid_of(&format!("agent {node}"))
    }

    /// Whether `node`'s agent process is alive.
    pub fn agent_running(&self, node: &str) -> bool {
        self.agent_pid(node).is_some_and(|pid| {
            cgroup::pid_in(pid, &self.state.cgroup_root, &self.state.cgroup_mount)
        })
    }

    /// Starts `node`'s agent (again).
    pub fn start_agent(&mut self, node: &str) -> Result<()> {
        let bin = self.agent_bin()?.to_path_buf();
        let node = self.state.node(node)?.clone();
        self.forget_process(&format!("agent {}", node.name));
        let child = agent::start(&self.state, &node, &bin)?;
        self.record(format!("agent {}", node.name), child)
    }

    /// Sends `signal` to `node`'s agent and waits (bounded) until it has exited.
    pub fn stop_agent(&mut self, node: &str, signal: Signal) -> Result<()> {
        self.stop_role(&format!("agent {node}"), signal)
    }

    /// Sends `signal` to our process with `role` and waits (bounded) until it has exited.
    fn stop_role(&mut self, role: &str, signal: Signal) -> Result<()> {
        let pid = self
            .pid_of(role)
            .with_context(|| format!("no process `{role}` recorded"))?;
        let (root, mount) = (
            self.state.cgroup_root.clone(),
            self.state.cgroup_mount.clone(),
        );
        process::signal_ours(pid, signal, &root, &mount);
        if !process::wait_gone(pid, Duration::from_secs(10), &root, &mount) {
            bail!("{role} (pid {pid}) still running 10s after {signal}");
        }
        for child in self.children.iter_mut().filter(|c| c.id() as i32 == pid) {
            process::reap(child, Duration::from_secs(1));
        }
        self.children.retain(|c| c.id() as i32 != pid);
        self.forget_process(role);
        Ok(())
    }

    /// PID of our process with `role`, if recorded.
    fn pid_of(&self, role: &str) -> Option<i32> {
        self.state
            .processes
            .iter()
            .find(|p| p.role == role)
            .map(|p| p.pid)
    }

    /// Whether the CA process is alive.
    pub fn ca_running(&self) -> bool {
        self.pid_of(ca::ROLE).is_some_and(|pid| {
            cgroup::pid_in(pid, &self.state.cgroup_root, &self.state.cgroup_mount)
        })
    }

    /// Starts the CA (again) and waits until it listens. Its root material stays in `certDir`
    /// across restarts, so the agents' trust does not change.
    pub fn start_ca(&mut self) -> Result<()> {
        let bin = self.agent_bin()?.to_path_buf();
        cgroup::create(&self.state.ca()?.cgroup)?;
        self.forget_process(ca::ROLE);
        let child = ca::start(&self.state, &bin)?;
        self.record(ca::ROLE.to_string(), child)?;
        let pid = self.pid_of(ca::ROLE);
        let (root, mount) = (
            self.state.cgroup_root.clone(),
            self.state.cgroup_mount.clone(),
        );
        let alive = || pid.is_some_and(|pid| cgroup::pid_in(pid, &root, &mount));
        ca::wait_ready(&self.state, ca::CA_READY_TIMEOUT, alive)
    }

    /// Sends `signal` to the CA and waits (bounded) until it has exited.
    pub fn stop_ca(&mut self, signal: Signal) -> Result<()> {
        self.stop_role(ca::ROLE, signal)
    }

    /// Waits until every agent reports each enrolled local pod as `enrolled` and, with a CA,
    /// each such pod's identity as having a certificate (`available` in `/certs`).
    pub fn wait_agents_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        for node in self.state.nodes.clone() {
            if !self.agent_running(&node.name) && self.agent_pid(&node.name).is_none() {
                continue;
            }
            let want: Vec<String> = self
                .state
                .pods_on(&node.name)
                .filter(|p| p.enrolled)
                .map(|p| p.name.clone())
                .collect();
            loop {
                if !self.agent_running(&node.name) {
                    bail!(
                        "agent of {} exited during startup; log {}:\n{}",
                        node.name,
                        node.log.display(),
                        agent::log_tail(&node.log, 40)
                    );
                }
                let last = match self.status(&node.name) {
                    Ok(st) if want.iter().all(|p| st.pod_state(p) == Some("enrolled")) => {
                        match self.missing_certs(&node.name, &want) {
                            Ok(missing) if missing.is_empty() => break,
                            Ok(missing) => format!("no certificate yet for {missing:?}"),
                            Err(e) => format!("{e:#}"),
                        }
                    }
                    Ok(st) => format!("status: {}", st.0),
                    Err(e) => format!("{e:#}"),
                };
                if Instant::now() >= deadline {
                    bail!(
                        "agent of {} not ready after {timeout:?} (want {want:?} enrolled); last {last}; log:\n{}",
                        node.name,
                        agent::log_tail(&node.log, 40)
                    );
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(())
    }

    /// Identities of `pods` that `node`'s agent has no valid certificate for (none without a CA).
    fn missing_certs(&self, node: &str, pods: &[String]) -> Result<Vec<String>> {
        if self.state.ca.is_none() {
            return Ok(Vec::new());
        }
        let certs = self.certs(node)?;
        let mut missing = Vec::new();
        for pod in pods {
            let id = self.state.pod(pod)?.identity();
            if certs.get(&id).is_none_or(|c| c.state != "available") {
                missing.push(id);
            }
        }
        Ok(missing)
    }

    /// Enrolls or unenrolls `pod` by rewriting the inventory (agents poll it).
    pub fn set_enrolled(&mut self, pod: &str, enrolled: bool) -> Result<()> {
        let p = self
            .state
            .pods
            .iter_mut()
            .find(|p| p.name == pod)
            .with_context(|| format!("no pod `{pod}`"))?;
        p.enrolled = enrolled;
        self.state.save()?;
        self.write_inventory()
    }

    /// Replaces `pod`'s extra inventory labels (not `app`, not `ambit.io/mode`) by `labels`,
    /// rewriting the inventory (agents poll it).
    pub fn set_pod_labels(&mut self, pod: &str, labels: &[(&str, &str)]) -> Result<()> {
        let p = self
            .state
            .pods
            .iter_mut()
            .find(|p| p.name == pod)
            .with_context(|| format!("no pod `{pod}`"))?;
        p.labels = labels
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect();
        self.state.save()?;
        self.write_inventory()
    }

    /// Log tails of every agent and the CA, for failure messages.
    pub fn agent_logs(&self, lines: usize) -> String {
        let mut out = String::new();
        if let Some(ca) = &self.state.ca {
            out.push_str(&format!("----- ca ({}) -----\n", ca.log.display()));
            out.push_str(&agent::log_tail(&ca.log, lines));
            out.push('\n');
        }
        for n in &self.state.nodes {
            out.push_str(&format!(
                "----- agent {} ({}) -----\n",
                n.name,
                n.log.display()
            ));
            out.push_str(&agent::log_tail(&n.log, lines));
            out.push('\n');
        }
        out
    }

    /// Removes the instance now (also done on drop for non-persistent instances).
    pub fn down(mut self) -> Result<()> {
        self.teardown()
    }

    /// What of this instance still exists (for checking `down`).
    pub fn leftovers(&self) -> Vec<String> {
        teardown::leftovers(&self.state)
    }

    fn teardown(&mut self) -> Result<()> {
        if self.torn_down {
            return Ok(());
        }
        self.torn_down = true;
        self.progress("tearing down");
        teardown::teardown(&self.state, &mut self.children)
    }

    pub(crate) fn write_inventory(&self) -> Result<()> {
        state::write_atomic(
            &self.state.inventory,
            config::inventory(&self.state).as_bytes(),
        )
    }

    /// The recorded state, for this crate's helpers that add to it (the caller saves it).
    pub(crate) fn state_mut(&mut self) -> &mut State {
        &mut self.state
    }

    /// Replaces the applied objects in the state (the caller writes the inventory).
    pub(crate) fn set_applied(&mut self, applied: Vec<Applied>) -> Result<()> {
        self.state.applied = applied;
        self.state.save()
    }

    pub(crate) fn record(&mut self, role: String, child: Child) -> Result<()> {
        let pid = i32::try_from(child.id())?;
        self.state.processes.push(Process { pid, role });
        self.children.push(child);
        self.state.save()
    }

    pub(crate) fn forget_process(&mut self, role: &str) {
        self.state.processes.retain(|p| p.role != role);
        let _ = self.state.save();
    }

    fn progress(&self, msg: &str) {
        if self.progress {
            let t = self.started.elapsed().as_secs_f32();
            eprintln!("testbed {} [{t:5.1}s]: {msg}", self.state.id);
        }
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        if self.persistent || self.torn_down {
            return;
        }
        if std::thread::panicking() {
            eprintln!("{}", self.agent_logs(60));
        }
        if let Err(e) = self.teardown() {
            eprintln!("testbed {}: teardown failed: {e:#}", self.state.id);
        }
    }
}
