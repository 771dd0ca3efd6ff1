//! The bench's testbed: five pods, per-netns limits, the servers, and the agents' processes.
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ambit_testbed::state::{Pod, PodSpec};
use ambit_testbed::{cgroup, net, servers, Options, Testbed};
use anyhow::{bail, Context, Result};

use super::procs::{AgentProc, Proc};

/// iperf3 server port in every server pod.
pub(crate) const IPERF_PORT: u16 = 5201;
/// `sockperf sr --tcp` port in every server pod.
pub(crate) const SOCKPERF_PORT: u16 = 11111;
/// nginx port in every server pod.
pub(crate) const NGINX_PORT: u16 = 8088;
/// The holder's echo port (in `server` only).
pub(crate) const HOLD_PORT: u16 = 7100;
/// The file wrk fetches.
pub(crate) const TINY_FILE: &str = "/tiny.txt";

/// Per-netns limits for connection churn, set in every pod and node namespace alike, so the
/// direct path and ambit run under the same settings.
pub(crate) const SYSCTLS: &[&str] = &[
    "net.ipv4.ip_local_port_range=1024 65535",
    "net.ipv4.tcp_tw_reuse=1",
    "net.core.somaxconn=65535",
    "net.ipv4.tcp_max_syn_backlog=65535",
];

/// One measured path: the client pod and the server pod.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Route {
    /// Column key in the results ([`super::results::PATHS`]).
    pub(crate) key: &'static str,
    pub(crate) client: &'static str,
    pub(crate) server: &'static str,
}

/// The paths, in table order. `direct`: two unenrolled pods (no capture anywhere). `ambit`:
/// enrolled to enrolled across the underlay (HBONE). `same_node`: enrolled to enrolled on
/// node1 (one agent on both ends). `capture`: enrolled client, unenrolled server (captured and
/// passed through in plaintext).
pub(crate) const ROUTES: [Route; 4] = [
    Route {
        key: "direct",
        client: "outsider",
        server: "legacy",
    },
    Route {
        key: "ambit",
        client: "client",
        server: "server",
    },
    Route {
        key: "same_node",
        client: "client",
        server: "local",
    },
    Route {
        key: "capture",
        client: "client",
        server: "legacy",
    },
];

/// Pods that run the servers.
const SERVER_PODS: [&str; 3] = ["server", "legacy", "local"];

/// The testbed and the bench's processes. Fields drop in order: servers stop before the
/// testbed (whose drop removes everything, also after an error).
pub(crate) struct Bed {
    servers: Vec<Proc>,
    pub(crate) tb: Testbed,
    /// Scratch dir inside the instance dir (logs, configs, outputs of runs).
    pub(crate) dir: PathBuf,
    pub(crate) node1: AgentProc,
    pub(crate) node2: AgentProc,
}

impl Bed {
    /// Builds the testbed with a CA (HBONE between enrolled pods), applies [`SYSCTLS`], starts
    /// the servers and waits until they listen.
    pub(crate) fn up(agent_bin: &Path) -> Result<Self> {
        let opts = Options {
            pods: vec![
                PodSpec::new("client", "node1", true, false),
                PodSpec::new("outsider", "node1", false, false),
                PodSpec::new("local", "node1", true, false),
                PodSpec::new("server", "node2", true, false),
                PodSpec::new("legacy", "node2", false, false),
            ],
            agent_bin: Some(agent_bin.to_path_buf()),
            ca: true,
            ..Options::default()
        };
        let tb = Testbed::up(opts)?;
        let dir = tb.state().dir.join("bench");
        fs::create_dir_all(dir.join("www"))?;
        let node1 = agent_proc(&tb, "node1")?;
        let node2 = agent_proc(&tb, "node2")?;
        let mut bed = Self {
            servers: Vec::new(),
            tb,
            dir,
            node1,
            node2,
        };
        bed.limits()?;
        bed.start_servers()?;
        Ok(bed)
    }

    /// Pod `name`.
    pub(crate) fn pod(&self, name: &str) -> &Pod {
        self.tb.pod(name)
    }

    /// Both agents with their column keys.
    pub(crate) fn agents(&self) -> [(&'static str, AgentProc); 2] {
        [("node1", self.node1), ("node2", self.node2)]
    }

    /// Fails when a server has exited (a run against it would measure nothing).
    pub(crate) fn check_servers(&mut self) -> Result<()> {
        for s in &mut self.servers {
            if !s.running() {
                bail!("{} exited; see {}", s.role, self.dir.display());
            }
        }
        Ok(())
    }

    fn limits(&self) -> Result<()> {
        let st = self.tb.state();
        let namespaces = st
            .pods
            .iter()
            .map(Pod::netns_path)
            .chain(st.nodes.iter().map(|n| n.netns_path()));
        for ns in namespaces {
            net::sysctl(&ns, SYSCTLS).with_context(|| format!("sysctls in {}", ns.display()))?;
        }
        Ok(())
    }

    fn start_servers(&mut self) -> Result<()> {
        let www = self.dir.join("www");
        fs::write(www.join(TINY_FILE.trim_start_matches('/')), "ambit bench\n")?;
        // The holder: the tests' `many.py` (`serve` in the server pod, `steps` in the client).
        let hold_py = self.dir.join("many.py");
        fs::write(&hold_py, ambit_testbed::leaks::MANY_PY)?;
        let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .context("nginx not found (Debian package nginx-light)")?;
        let mount = self.tb.state().cgroup_mount.clone();
        for name in SERVER_PODS {
            let pod = self.tb.pod(name).clone();
            let conf = self.dir.join(format!("nginx-{name}.conf"));
            fs::write(&conf, nginx_conf(&self.dir, name, &www))?;
            let err = self.dir.join(format!("nginx-{name}.err"));
            let mut list: Vec<(String, Vec<String>)> = vec![
                (
                    "iperf3".into(),
                    strings(&["iperf3", "-s", "-p", &IPERF_PORT.to_string()]),
                ),
                (
                    "sockperf".into(),
                    strings(&[
                        "sockperf",
                        "sr",
                        "--tcp",
                        "-i",
                        "0.0.0.0",
                        "-p",
                        &SOCKPERF_PORT.to_string(),
                    ]),
                ),
                (
                    "nginx".into(),
                    strings(&[nginx, "-e", &path(&err), "-c", &path(&conf)]),
                ),
            ];
            if name == "server" {
                let py = servers::python();
                list.push((
                    "holder".into(),
                    strings(&[&path(&py), &path(&hold_py), "serve", &HOLD_PORT.to_string()]),
                ));
            }
            for (what, argv) in list {
                let log = self.dir.join(format!("{what}-{name}.log"));
                let role = format!("{what} in {name}");
                self.servers
                    .push(Proc::spawn(&pod, &mount, &role, &argv, &log)?);
            }
        }
        self.wait_listening()
    }

    fn wait_listening(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        for name in SERVER_PODS {
            let ns = self.tb.pod(name).netns_path();
            let mut want = vec![IPERF_PORT, SOCKPERF_PORT, NGINX_PORT];
            if name == "server" {
                want.push(HOLD_PORT);
            }
            loop {
                self.check_servers()?;
                let ports = net::listening_ports(&ns)?;
                if want.iter().all(|p| ports.contains(p)) {
                    break;
                }
                if Instant::now() >= deadline {
                    bail!(
                        "servers in {name} not listening after 15s: want {want:?}, have {ports:?}"
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }
}

/// `node`'s agent: the PID the testbed recorded, else the one process in its agent cgroup.
fn agent_proc(tb: &Testbed, node: &str) -> Result<AgentProc> {
    if let Some(pid) = tb.agent_pid(node) {
        if let Ok(agent) = AgentProc::new(pid) {
            return Ok(agent);
        }
    }
    let cg = &tb.node(node).agent_cgroup;
    let pids = cgroup::procs(cg);
    match pids[..] {
        [pid] => AgentProc::new(pid),
        _ => bail!(
            "cannot tell {node}'s agent: cgroup {} holds {pids:?}",
            cg.display()
        ),
    }
}

/// nginx in the foreground with one worker, no access log, a large listen backlog.
fn nginx_conf(dir: &Path, pod: &str, www: &Path) -> String {
    let mut c = String::new();
    let _ = write!(
        c,
        "daemon off;\nmaster_process on;\nworker_processes 1;\nuser root;\n\
         pid {dir}/nginx-{pod}.pid;\nerror_log {dir}/nginx-{pod}.err warn;\n\
         events {{ worker_connections 16384; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {dir}/nginx-{pod}-body;\n  \
         server {{\n    listen {NGINX_PORT} backlog=4096;\n    listen [::]:{NGINX_PORT} backlog=4096;\n    \
         root {www};\n  }}\n}}\n",
        dir = dir.display(),
        www = www.display(),
    );
    c
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_string()).collect()
}

fn path(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}
