//! The testbed's persisted state: names, addresses, paths and PIDs, enough to clean up after a crash.
use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// Directory holding one sub-directory (state, configs, logs, sockets) per testbed instance.
pub const BASE_DIR: &str = "/run/ambit-testbed";
/// Prefix of the files (in [`BASE_DIR`]) naming the instance that `cargo xtask testbed` commands
/// act on, one per scope: `cli-instance.<scope>` (see [`crate::scope`]).
pub const CLI_POINTER: &str = "cli-instance";
/// HTTP server port (python3 -m http.server) in server pods.
pub const HTTP_PORT: u16 = 8080;
/// TCP echo port (socat + cat) in server pods.
pub const ECHO_PORT: u16 = 9000;
/// Port of the server that writes back `peer=<ip>:<port>` of each connection.
pub const PEER_PORT: u16 = 7000;
/// The agents' HBONE (mTLS tunnel) port inside every enrolled pod.
pub const TUNNEL_PORT: u16 = 15008;
/// The CA's gRPC port (istiod's).
pub const CA_PORT: u16 = 15012;
/// The testbed's SPIFFE trust domain.
pub const TRUST_DOMAIN: &str = "cluster.local";

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
    /// Long-running processes we started (servers, agents, the CA, captures).
    pub processes: Vec<Process>,
    /// The CA and token issuer; `None` when the agents run capture-only (no mTLS).
    #[serde(default)]
    pub ca: Option<Ca>,
    /// Objects added with `apply`, written to the inventory after the testbed's own.
    #[serde(default)]
    pub applied: Vec<Applied>,
    /// Cgroups laid out as kubelet does with this driver (see `Options::kubelet_cgroups`).
    #[serde(default)]
    pub kubelet_cgroups: Option<crate::kubelet::CgroupDriver>,
    /// The agents have a `cni:` section (see `Options::cni`).
    #[serde(default)]
    pub cni: bool,
}

/// The testbed's CA (`ambit ca`) and the token issuer that plays the Kubernetes API server.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ca {
    /// Node whose network namespace the CA runs in.
    pub node: String,
    /// gRPC (TLS) listen address: that node's underlay IPv4 address, port [`CA_PORT`].
    pub addr: SocketAddr,
    /// `certDir`: the root material (`root-cert.pem`, ...), generated at first start.
    pub cert_dir: PathBuf,
    /// The CA's config file.
    pub config: PathBuf,
    /// The CA's log file.
    pub log: PathBuf,
    /// The CA process's cgroup.
    pub cgroup: PathBuf,
    /// Token issuer URL (`iss`).
    pub issuer: String,
    /// The issuer's private key (PKCS#8 DER, mode 0600), so tests and xtask can mint tokens.
    pub issuer_key: PathBuf,
    /// The issuer's public keys: the CA's `tokens.jwksFile`.
    pub jwks: PathBuf,
    /// Certificate lifetime the agents ask for, in seconds.
    pub cert_ttl_secs: u64,
    /// Audience of the node agents' tokens, which the CA requires (`ambit-ca`; `istio-ca`
    /// where the testbed's CA plays istiod).
    #[serde(default = "default_audience")]
    pub audience: String,
    /// The cluster ID the CA serves and requires, which the agents send (`ClusterID`
    /// metadata); `None`: neither.
    #[serde(default)]
    pub cluster_id: Option<String>,
}

fn default_audience() -> String {
    crate::ca::AUDIENCE.to_string()
}

/// An object added with `apply`; a later object with the same key replaces it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// `kind`.
    pub kind: String,
    /// `metadata.namespace` (empty for cluster-scoped kinds).
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// The document, as given.
    pub yaml: String,
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
    /// The node's cgroup: `podsCgroup` of its agent (parent of its pods' cgroups and of the
    /// agent's), or with kubelet's layout the agent's `cgroupRoot`.
    pub cgroup: PathBuf,
    /// `agentCgroup` of the node's agent, or with kubelet's layout its pod's container cgroup.
    pub agent_cgroup: PathBuf,
    /// The agent's config file.
    pub config: PathBuf,
    /// The agent's admin socket.
    pub admin_socket: PathBuf,
    /// The agent's bpffs pin directory.
    pub pin_dir: PathBuf,
    /// The agent's log file (stdout and stderr).
    pub log: PathBuf,
    /// The agent's service-account token for the CA (node claim = this node).
    #[serde(default)]
    pub token_file: PathBuf,
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
    /// Whether the testbed lists it in the inventory (a pod the cluster does not know about,
    /// e.g. a rogue one, is not).
    #[serde(default = "yes")]
    pub in_inventory: bool,
    /// Extra `metadata.annotations` the inventory gives it (key, value).
    #[serde(default)]
    pub annotations: Vec<(String, String)>,
    /// Extra `metadata.labels` the inventory gives it (key, value), besides `app` and
    /// `ambit.io/mode`.
    #[serde(default)]
    pub labels: Vec<(String, String)>,
}

fn yes() -> bool {
    true
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
    /// Kubernetes namespace (default `default`).
    pub namespace: String,
    /// Node name (`node1`, `node2`).
    pub node: String,
    /// Labelled `ambit.io/mode: enabled` (and waited for by [`crate::Testbed::up`]).
    pub enrolled: bool,
    /// Runs the test servers.
    pub servers: bool,
    /// Listed in the inventory (default true).
    pub in_inventory: bool,
    /// Extra `metadata.annotations` in the inventory (key, value).
    pub annotations: Vec<(String, String)>,
    /// Extra `metadata.labels` in the inventory (key, value).
    pub labels: Vec<(String, String)>,
}

impl PodSpec {
    /// A pod spec.
    pub fn new(name: &str, node: &str, enrolled: bool, servers: bool) -> Self {
        Self {
            name: name.into(),
            namespace: "default".into(),
            node: node.into(),
            enrolled,
            servers,
            in_inventory: true,
            annotations: Vec::new(),
            labels: Vec::new(),
        }
    }

    /// This spec in Kubernetes namespace `namespace` (the testbed lists no Namespace object
    /// for it: apply one to label it).
    pub fn in_namespace(mut self, namespace: &str) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// This spec with the inventory label `key: value` added.
    pub fn labelled(mut self, key: &str, value: &str) -> Self {
        self.labels.push((key.into(), value.into()));
        self
    }

    /// This spec with the inventory annotation `key: value` added.
    pub fn annotated(mut self, key: &str, value: &str) -> Self {
        self.annotations.push((key.into(), value.into()));
        self
    }

    /// A pod that exists on `node` but that the inventory does not list (nothing about it is
    /// known to the agents or the CA); it runs no servers.
    pub fn unlisted(name: &str, node: &str) -> Self {
        Self {
            in_inventory: false,
            ..Self::new(name, node, false, false)
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

    /// The CA, if the testbed runs one.
    pub fn ca(&self) -> Result<&Ca> {
        self.ca
            .as_ref()
            .context("this testbed runs without a CA (capture only)")
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

    /// The pod's SPIFFE identity: its namespace and service account (named after the pod).
    pub fn identity(&self) -> String {
        identity(&self.namespace, &self.name)
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

/// `spiffe://cluster.local/ns/<namespace>/sa/<service_account>`.
pub fn identity(namespace: &str, service_account: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/{namespace}/sa/{service_account}")
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
