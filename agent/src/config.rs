//! Agent configuration: parsed once from a YAML file into typed values.
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Default SO_MARK of the agent's outbound sockets (as Istio's 1337).
pub const DEFAULT_OUTBOUND_MARK: u32 = 0x539;
/// Default SO_MARK of the agent's delivery sockets (routed back to the agent in the pod).
pub const DEFAULT_DELIVER_MARK: u32 = 0x53a;
/// Default routing table of the pods' `local default dev lo` route for delivery-marked packets.
pub const DEFAULT_DELIVER_TABLE: u32 = 100;

/// Errors reading or parsing the configuration file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be read.
    #[error("cannot read config file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The YAML did not parse or a field had a bad value.
    #[error("config file {}: {field}: {message} (line {line}, column {column})", path.display())]
    Parse {
        path: PathBuf,
        field: String,
        message: String,
        line: usize,
        column: usize,
    },
    /// A value parsed but is not usable.
    #[error("config file {}: {field}: {message}", path.display())]
    Invalid {
        path: PathBuf,
        field: &'static str,
        message: String,
    },
}

/// The agent's ports inside every enrolled pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Ports {
    /// Outbound capture listener (127.0.0.1 and ::1).
    pub outbound: u16,
    /// Inbound plaintext capture listener.
    pub inbound_plaintext: u16,
    /// Inbound HBONE (mTLS) listener.
    pub tunnel: u16,
}

impl Default for Ports {
    fn default() -> Self {
        Self {
            outbound: 15001,
            inbound_plaintext: 15006,
            tunnel: 15008,
        }
    }
}

impl Ports {
    /// Whether `port` is one of the agent's own ports (never a valid application target).
    pub fn is_agent_port(&self, port: u16) -> bool {
        port == self.outbound || port == self.inbound_plaintext || port == self.tunnel
    }
}

/// Resource caps of the data plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Limits {
    /// TLS handshakes in progress at once on the tunnel ports, agent-wide.
    pub max_handshakes: usize,
    /// TLS handshakes in progress at once from one source address, agent-wide, so that one
    /// source cannot take every handshake slot (per-source fairness).
    pub max_handshakes_per_source: usize,
    /// Open tunnel connections from one source address, agent-wide.
    pub max_connections_per_source: usize,
    /// CONNECT streams at once on one tunnel connection (at most 1022: the connection's
    /// HTTP/2 window holds a stream window for each, see `tunnel::flow`).
    pub max_streams_per_connection: u32,
    /// Deadline of a TLS handshake.
    pub handshake_timeout_ms: u64,
    /// A tunnel connection with no stream for this long is closed (GOAWAY).
    pub idle_timeout_ms: u64,
    /// Connections open at once on one pod's outbound (15001) listener, and separately on its
    /// inbound plaintext (15006) listener; past it a new connection is reset at once, so one
    /// pod cannot take the agent's sockets and memory from the others.
    pub max_connections_per_pod: u64,
    /// Admin socket (and metrics listener) connections open at once; past it a new
    /// connection is closed at once and counted.
    pub max_admin_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_handshakes: 256,
            max_handshakes_per_source: 64,
            max_connections_per_source: 1024,
            max_streams_per_connection: 1000,
            handshake_timeout_ms: 10_000,
            idle_timeout_ms: 300_000,
            max_connections_per_pod: 32_768,
            max_admin_connections: 256,
        }
    }
}

/// The inventory source.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum InventorySource {
    /// A YAML file, polled for changes.
    File(PathBuf),
    /// The Kubernetes API server.
    Kubernetes(KubeSource),
    /// istiod's workload discovery (delta xDS), as ztunnel reads it.
    Istiod(IstiodSource),
}

/// Where the CA learns which pod (identity) runs on which node: the agent's sources but istiod
/// (the CA is what istiod replaces).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaInventory {
    /// A YAML file, polled for changes.
    File(PathBuf),
    /// The Kubernetes API server.
    Kubernetes(KubeSource),
}

/// `inventory: {kind: istiod}`: istiod's delta ADS stream of workloads, services and L4
/// authorization policies. It connects as the `ca:` section does (same root certificate,
/// token and cluster id), so a `ca:` section is required.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IstiodSource {
    /// Must be `istiod`.
    pub kind: IstiodKind,
    /// istiod's xDS address, `host:port` (port 15012 when omitted); default: the `ca:` address.
    #[serde(default)]
    pub address: Option<String>,
}

/// The istiod source's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IstiodKind {
    /// Delta xDS from istiod.
    Istiod,
}

/// `inventory: {kind: kubernetes}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KubeSource {
    /// Must be `kubernetes`.
    pub kind: KubeKind,
    /// Kubeconfig file; in-cluster configuration when absent.
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
}

/// The one kind of non-file source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KubeKind {
    /// kube-rs reflectors.
    Kubernetes,
}

impl std::fmt::Display for InventorySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(p) => write!(f, "{}", p.display()),
            Self::Kubernetes(k) => match &k.kubeconfig {
                Some(p) => write!(f, "kubernetes ({})", p.display()),
                None => f.write_str("kubernetes (in-cluster)"),
            },
            Self::Istiod(i) => match &i.address {
                Some(a) => write!(f, "istiod ({a})"),
                None => f.write_str("istiod (the ca: address)"),
            },
        }
    }
}

/// `cni:` — where the CNI plugin reaches the agent.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CniConfig {
    /// Unix socket the plugin connects to.
    #[serde(default = "default_cni_socket")]
    pub socket: PathBuf,
    /// Where the pods the plugin reported are kept across agent restarts.
    #[serde(default = "default_pod_map")]
    pub pod_map: PathBuf,
    /// How long an ADD waits for the pod to be enrolled before answering.
    #[serde(default = "default_cni_wait_ms")]
    pub wait_ms: u64,
}

fn default_cni_socket() -> PathBuf {
    PathBuf::from(crate::cni::DEFAULT_SOCKET)
}
fn default_pod_map() -> PathBuf {
    PathBuf::from(crate::cni::DEFAULT_POD_MAP)
}
fn default_cni_wait_ms() -> u64 {
    10_000
}

/// `inventoryGuard:` — when a reload is held back instead of applied (see ARCHITECTURE.md,
/// "Inventory reloads"): one that empties the inventory, or unenrolls more than
/// `maxUnenrollPercent` of this node's enrolled pods at once, applies only once the same
/// content has stayed for `settleMs`. Writers should replace the file atomically (write a
/// temporary file, then rename it over the inventory) so that readers never see half a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct InventoryGuard {
    /// A reload unenrolling more than this share of the node's enrolled pods is held (0-100;
    /// 100: only an emptied inventory is held).
    pub max_unenroll_percent: u8,
    /// How long held content must stay unchanged before it applies (1-600000 ms).
    pub settle_ms: u64,
}

impl Default for InventoryGuard {
    fn default() -> Self {
        Self {
            max_unenroll_percent: 50,
            settle_ms: 2000,
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `capture:` — which outbound connections of enrolled pods the kernel sends to the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Capture {
    /// Only connects to mesh destinations (enrolled pods' addresses on any node, Service
    /// virtual IPs) go through the agent; anything else goes straight out of the pod, as the
    /// agent's plaintext pass-through would have sent it. `false`: every connect is captured.
    pub mesh_only: bool,
}

impl Default for Capture {
    fn default() -> Self {
        Self { mesh_only: true }
    }
}

/// The agent's configuration (`ambit run --config FILE`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    /// Name of the node this agent serves; only pods with this `spec.nodeName` are enrolled.
    /// The environment variable `AMBIT_NODE_NAME` (the DaemonSet's downward API) overrides it.
    #[serde(default)]
    pub node: String,
    /// SPIFFE trust domain.
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    /// Where workloads and policies come from: a file path (Kubernetes-shaped multi-document
    /// YAML), or `{kind: kubernetes, kubeconfig: PATH?}` for the API server.
    pub inventory: InventorySource,
    /// The chained CNI plugin's socket and pod map: pods' netns arrive from it (required with
    /// `kind: kubernetes`; with a file inventory, for pods without an `ambit.io/netns` annotation).
    #[serde(default)]
    pub cni: Option<CniConfig>,
    /// How often the inventory file is checked for changes.
    #[serde(default = "default_poll_ms")]
    pub inventory_poll_ms: u64,
    /// When an inventory reload is held back (both sources).
    #[serde(default)]
    pub inventory_guard: InventoryGuard,
    /// Admin unix socket.
    #[serde(default = "default_admin_socket")]
    pub admin_socket: PathBuf,
    /// Per-instance bpffs directory for pinned maps and links.
    #[serde(default = "default_pin_dir")]
    pub bpf_pin_dir: PathBuf,
    /// The node's cgroup2 hierarchy (default: the cgroup2 mount in /proc/self/mountinfo). In a
    /// DaemonSet it is the host's /sys/fs/cgroup mounted into the agent's container.
    #[serde(default)]
    pub cgroup_root: Option<PathBuf>,
    /// Cgroup v2 directory that holds every pod's cgroup: the kernel programs are attached
    /// here once. `auto` (the default) finds kubelet's `kubepods.slice` or `kubepods`;
    /// relative paths are taken under `cgroupRoot`.
    #[serde(default)]
    pub pods_cgroup: Option<PathBuf>,
    /// Cgroup v2 directory the agent joins before opening any socket (relative paths under
    /// `cgroupRoot`). Unset: the agent stays in the cgroup it was started in (a pod's, in
    /// Kubernetes).
    #[serde(default)]
    pub agent_cgroup: Option<PathBuf>,
    /// SO_MARK of the agent's outbound sockets.
    #[serde(default = "default_outbound_mark")]
    pub outbound_mark: u32,
    /// SO_MARK of the agent's delivery sockets.
    #[serde(default = "default_deliver_mark")]
    pub deliver_mark: u32,
    /// Routing table, inside each enrolled pod, that sends packets carrying `deliver_mark` to
    /// `lo` (the agent installs it; docs/inbound-delivery.md).
    #[serde(default = "default_deliver_table")]
    pub deliver_table: u32,
    /// Where the agent finds the host's `/proc/sys/net` to set the pods' delivery sysctls (each
    /// file resolves to the namespace of the thread opening it). A container's own `/proc/sys`
    /// is read-only: the DaemonSet mounts the host's elsewhere.
    #[serde(default = "default_proc_sys_net")]
    pub proc_sys_net: PathBuf,
    /// Agent ports inside each pod.
    #[serde(default)]
    pub ports: Ports,
    /// What the kernel captures (`meshOnly`).
    #[serde(default)]
    pub capture: Capture,
    /// Log output format.
    #[serde(default)]
    pub log_format: LogFormat,
    /// Istio root namespace: its selector-less policies apply mesh-wide.
    #[serde(default = "default_root_namespace")]
    pub root_namespace: String,
    /// Source addresses admitted in plaintext even under STRICT (kubelet health probes).
    #[serde(default)]
    pub probe_sources: Vec<std::net::IpAddr>,
    /// Other trust domains whose identities are accepted as ours (in handshakes, and in
    /// AuthorizationPolicy principals as Istio matches them).
    #[serde(default)]
    pub trust_domain_aliases: Vec<String>,
    /// The cluster's name (Istio's `CLUSTER_ID`): sent in every CONNECT's `baggage` as
    /// `k8s.cluster.name`.
    #[serde(default = "default_cluster_id")]
    pub cluster_id: String,
    /// With `inventory: {kind: kubernetes}`: annotate this node's captured pods
    /// `ambient.istio.io/redirection: enabled` (istiod then gives them HBONE), and remove it
    /// from pods no longer captured. Ignored with a file inventory (no API server).
    #[serde(default = "default_true")]
    pub redirection_annotation: bool,
    /// Optional TCP listener for `GET /metrics` (e.g. `0.0.0.0:15020`).
    #[serde(default)]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Caps that keep one client from starving the others.
    #[serde(default)]
    pub limits: Limits,
    /// How long open connections may finish after SIGTERM before they are cut.
    #[serde(default = "default_drain_ms")]
    pub drain_deadline_ms: u64,
    /// The CA that issues the pods' certificates. Without it the agent only captures:
    /// enrolled pods talk plaintext through the agents (no mTLS).
    #[serde(default)]
    pub ca: Option<crate::identity::CaClientConfig>,
}

fn default_trust_domain() -> String {
    "cluster.local".to_string()
}
fn default_true() -> bool {
    true
}
fn default_cluster_id() -> String {
    "Kubernetes".to_string()
}
fn default_drain_ms() -> u64 {
    5000
}
fn default_root_namespace() -> String {
    crate::policy::peer_auth::DEFAULT_ROOT_NAMESPACE.to_string()
}
fn default_poll_ms() -> u64 {
    500
}
fn default_admin_socket() -> PathBuf {
    PathBuf::from("/run/ambit/admin.sock")
}
fn default_pin_dir() -> PathBuf {
    PathBuf::from("/sys/fs/bpf/ambit")
}
fn default_outbound_mark() -> u32 {
    DEFAULT_OUTBOUND_MARK
}
fn default_deliver_mark() -> u32 {
    DEFAULT_DELIVER_MARK
}
fn default_deliver_table() -> u32 {
    DEFAULT_DELIVER_TABLE
}
fn default_proc_sys_net() -> PathBuf {
    PathBuf::from("/proc/sys/net")
}

impl Config {
    /// What an AuthorizationPolicy decision needs from this config: the root namespace, the
    /// trust domain and its aliases.
    pub fn authz_mesh(&self) -> crate::policy::authz::Mesh<'_> {
        crate::policy::authz::Mesh {
            root_namespace: &self.root_namespace,
            trust_domain: &self.trust_domain,
            trust_domain_aliases: &self.trust_domain_aliases,
        }
    }

    /// Reads and parses the configuration file.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse_with_node(
            path,
            &text,
            std::env::var("AMBIT_NODE_NAME")
                .ok()
                .filter(|n| !n.is_empty()),
        )
    }

    /// Parses configuration text; `path` is used in error messages only.
    pub fn parse(path: &Path, text: &str) -> Result<Self, Error> {
        Self::parse_with_node(path, text, None)
    }

    /// Parses configuration text, with the node name from the environment when given.
    pub fn parse_with_node(path: &Path, text: &str, node: Option<String>) -> Result<Self, Error> {
        let cfg: Config = crate::yaml::from_str(text).map_err(|e| Error::Parse {
            path: path.to_path_buf(),
            field: e.field,
            message: e.message,
            line: e.line,
            column: e.column,
        })?;
        let invalid = |field, message: &str| Error::Invalid {
            path: path.to_path_buf(),
            field,
            message: message.to_string(),
        };
        let mut cfg = cfg;
        if let Some(node) = node {
            cfg.node = node;
        }
        if cfg.node.is_empty() {
            return Err(invalid(
                "node",
                "must not be empty (or set AMBIT_NODE_NAME)",
            ));
        }
        if cfg.outbound_mark == 0 || cfg.deliver_mark == 0 || cfg.outbound_mark == cfg.deliver_mark
        {
            return Err(invalid(
                "outboundMark",
                "marks must be non-zero and differ from deliverMark",
            ));
        }
        if cfg.inventory_guard.max_unenroll_percent > 100 {
            return Err(invalid(
                "inventoryGuard.maxUnenrollPercent",
                "must be a share in percent, 0 to 100",
            ));
        }
        if !(1..=600_000).contains(&cfg.inventory_guard.settle_ms) {
            return Err(invalid(
                "inventoryGuard.settleMs",
                "must be 1 to 600000 (10 minutes)",
            ));
        }
        if matches!(cfg.inventory, InventorySource::Istiod(_)) && cfg.ca.is_none() {
            return Err(invalid(
                "inventory.kind",
                "istiod needs a ca: section (its root certificate and token authenticate the xDS stream)",
            ));
        }
        // 0 is "unspecified"; 253, 254 and 255 are the kernel's default, main and local tables.
        if matches!(cfg.deliver_table, 0 | 253..=255) {
            return Err(invalid(
                "deliverTable",
                "must not be 0 or a kernel table (253 default, 254 main, 255 local)",
            ));
        }
        let p = cfg.ports;
        if p.outbound == p.inbound_plaintext
            || p.outbound == p.tunnel
            || p.inbound_plaintext == p.tunnel
        {
            return Err(invalid(
                "ports",
                "outbound, inboundPlaintext and tunnel must differ",
            ));
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod doc_tests;
#[cfg(test)]
mod fields;
#[cfg(test)]
mod tests;
