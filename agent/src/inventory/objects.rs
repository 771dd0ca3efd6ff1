//! Kubernetes object shapes read by the inventory (the fields ambit uses, as `kubectl -o yaml` prints them).

use serde::Deserialize;

pub use crate::meta::ObjectMeta;

/// v1 Pod.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Pod {
    /// Metadata.
    pub metadata: ObjectMeta,
    /// Spec.
    #[serde(default)]
    pub spec: PodSpec,
    /// Status.
    #[serde(default)]
    pub status: PodStatus,
}

/// The parts of a PodSpec ambit reads.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    /// Node the pod is scheduled on.
    #[serde(default)]
    pub node_name: String,
    /// Service account (identity); `default` when empty.
    #[serde(default)]
    pub service_account_name: String,
    /// The pod shares its node's network namespace (and address).
    #[serde(default)]
    pub host_network: bool,
}

/// The parts of a PodStatus ambit reads.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    /// Pod IPs (IPv4 and IPv6).
    #[serde(default, rename = "podIPs")]
    pub pod_ips: Vec<PodIp>,
    /// Primary pod IP (older servers set only this).
    #[serde(default, rename = "podIP")]
    pub pod_ip: Option<String>,
    /// `Pending`, `Running`, `Succeeded`, `Failed` or `Unknown`.
    #[serde(default)]
    pub phase: Option<String>,
}

impl PodStatus {
    /// Whether the pod has finished (`Succeeded` or `Failed`): its containers are gone and its
    /// addresses may already belong to other pods.
    pub fn is_terminal(&self) -> bool {
        matches!(self.phase.as_deref(), Some("Succeeded" | "Failed"))
    }
}

/// One entry of `status.podIPs`.
#[derive(Debug, Clone, Deserialize)]
pub struct PodIp {
    /// The address.
    pub ip: String,
}

/// v1 Namespace.
#[derive(Debug, Clone, Deserialize)]
pub struct Namespace {
    /// Metadata (labels decide enrollment).
    pub metadata: ObjectMeta,
}

/// v1 Node: only the pod address ranges it routes.
#[derive(Debug, Clone, Deserialize)]
pub struct Node {
    /// Metadata (the name pods refer to in `spec.nodeName`).
    pub metadata: ObjectMeta,
    /// Spec.
    #[serde(default)]
    pub spec: NodeSpec,
}

/// The parts of a NodeSpec ambit reads.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeSpec {
    /// The node's pod range (older servers set only this).
    #[serde(default, rename = "podCIDR")]
    pub pod_cidr: Option<String>,
    /// The node's pod ranges, one per family.
    #[serde(default, rename = "podCIDRs")]
    pub pod_cidrs: Vec<String>,
}
