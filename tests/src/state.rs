//! The testbed's persisted state: names, addresses, paths and PIDs, enough to clean up after a crash.
use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// Directory holding one sub-directory (state, configs, logs, sockets) per testbed instance.
pub const BASE_DIR: &str = "/run/ambit-testbed";
/// File (in [`BASE_DIR`]) naming the instance that `cargo xtask testbed` commands act on.
pub const CLI_POINTER: &str = "cli-instance";
/// HTTP server port (python3 -m http.server) in server pods.
pub const HTTP_PORT: u16 = 8080;
/// TCP echo port (socat + cat) in server pods.
pub const ECHO_PORT: u16 = 9000;
/// Port of the server that writes back `peer=<ip>:<port>` of each connection.
pub const PEER_PORT: u16 = 7000;

/// Everything a testbed instance created, written to `<dir>/state.json` before each step.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    /// Short unique id; every global name (netns, cgroup, pin dir) contains `ambit-<id>`.
    pub id: String,
    /// `<BASE_DIR>/<id>`: state file, agent configs, inventory, sockets, logs, web root.
    pub dir: PathBuf,
    /// The cgroup2 mount point.
    pub cgroup_mount: PathBuf,
    /// `<cgroup_mount>/ambit-<id>`: every cgroup of this instance is below it.
    pub cgroup_root: PathBuf,
    /// The process that owns the instance (a test); `None` for a CLI testbed kept until `down`.
    pub owner_pid: Option<u32>,
    /// The `ambit` binary agents run from.
    pub agent_bin: Option<PathBuf>,
    /// The inventory file shared by all agents.
    pub inventory: PathBuf,
    /// Nodes, in creation order.
    pub nodes: Vec<Node>,
    /// Pods, in creation order.
    pub pods: Vec<Pod>,
    /// Long-running processes we started (servers, agents).
    pub processes: Vec<Process>,
}

/// One node: a network namespace with a bridge for its pods and an underlay link to the others.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Node {
    /// `node1`, `node2`, ...
    pub name: String,
    /// 1-based; picks the node's address ranges.
    pub index: u8,
    /// Network namespace name (under /run/netns).
    pub netns: String,
    /// Underlay IPv4 address.
    pub underlay_v4: Ipv4Addr,
    /// Underlay IPv6 address.
    pub underlay_v6: Ipv6Addr,
    /// `podsCgroup` of the node's agent: parent of its pods' cgroups and of the agent's.
    pub cgroup: PathBuf,
    /// `agentCgroup` of the node's agent.
    pub agent_cgroup: PathBuf,
    /// The agent's config file.
    pub config: PathBuf,
    /// The agent's admin socket.
    pub admin_socket: PathBuf,
    /// The agent's bpffs pin directory.
    pub pin_dir: PathBuf,
    /// The agent's log file (stdout and stderr).
    pub log: PathBuf,
}

/// One pod: its own netns and cgroup, a veth into its node's bridge, IPv4 and IPv6.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pod {
    /// Pod name (also its service account).
    pub name: String,
    /// Kubernetes namespace.
    pub namespace: String,
    /// Node name.
    pub node: String,
    /// Network namespace name (under /run/netns).
    pub netns: String,
    /// cgroup v2 directory.
    pub cgroup: PathBuf,
    /// IPv4 address.
    pub ipv4: Ipv4Addr,
    /// IPv6 address.
    pub ipv6: Ipv6Addr,
    /// Whether the inventory enrolls it (`ambit.io/mode: enabled`).
    pub enrolled: bool,
    /// Whether it runs the test servers (HTTP, echo, peer report).
    pub servers: bool,
}

/// A long-running process we started.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Process {
    /// Its PID (also its process group: it is started through `setsid`).
    pub pid: i32,
    /// What it is, e.g. `agent node1` or `server server:8080`.
    pub role: String,
}

/// What to build: pods and which node they sit on.
#[derive(Debug, Clone)]
pub struct PodSpec {
    /// Pod name (≤ 12 characters).
    pub name: String,
    /// Node name (`node1`, `node2`).
    pub node: String,
    /// Enrolled in ambit.
    pub enrolled: bool,
    /// Runs the test servers.
    pub servers: bool,
}

impl PodSpec {
    /// A pod spec.
    pub fn new(name: &str, node: &str, enrolled: bool, servers: bool) -> Self {
        Self {
            name: name.into(),
            node: node.into(),
            enrolled,
            servers,
        }
    }

    /// The default pods: node1 `client` (enrolled) and `outsider`; node2 `server` (enrolled)
    /// and `legacy`, both serving HTTP, echo and peer report.
    pub fn defaults() -> Vec<Self> {
        vec![
            Self::new("client", "node1", true, false),
            Self::new("outsider", "node1", false, false),
            Self::new("server", "node2", true, true),
            Self::new("legacy", "node2", false, true),
        ]
    }
}

impl State {
    /// Reads a state file.
    pub fn load(path: &Path) -> Result<Self> {
        let text =
            fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// Writes the state file atomically (temp file, then rename).
    pub fn save(&self) -> Result<()> {
        let text = serde_json::to_string_pretty(self).context("serializing testbed state")?;
        write_atomic(&self.state_file(), text.as_bytes())
    }

    /// `<dir>/state.json`.
    pub fn state_file(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    /// The pod called `name`.
    pub fn pod(&self, name: &str) -> Result<&Pod> {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .with_context(|| format!("no pod `{name}`"))
    }

    /// The node called `name`.
    pub fn node(&self, name: &str) -> Result<&Node> {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .with_context(|| format!("no node `{name}`"))
    }

    /// Pods scheduled on `node`.
    pub fn pods_on<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Pod> + 'a {
        self.pods.iter().filter(move |p| p.node == node)
    }
}

impl Pod {
    /// `/run/netns/<netns>`.
    pub fn netns_path(&self) -> PathBuf {
        netns_path(&self.netns)
    }

    /// The pod's address of the given family (`v6` true: IPv6).
    pub fn ip(&self, v6: bool) -> IpAddr {
        if v6 {
            IpAddr::V6(self.ipv6)
        } else {
            IpAddr::V4(self.ipv4)
        }
    }
}

impl Node {
    /// `/run/netns/<netns>`.
    pub fn netns_path(&self) -> PathBuf {
        netns_path(&self.netns)
    }
}

/// `/run/netns/<name>`, where `ip netns add` puts named namespaces.
pub fn netns_path(name: &str) -> PathBuf {
    Path::new("/run/netns").join(name)
}

/// Writes `bytes` to `path` through a temp file and a rename, so readers never see half a file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

/// `ip` rendered as it appears in URLs (`[v6]` or v4).
pub fn url_host(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}
