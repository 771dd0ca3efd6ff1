//! The inventory: workloads (pods) and namespaces known to the agent, from a file or Kubernetes.
pub mod addresses;
pub mod check;
pub mod enrollment;
pub mod file;
pub mod guard;
pub mod index;
pub mod istiod;
pub mod kube;
pub mod objects;
pub mod publish;
pub mod sandboxes;
pub mod services;
pub mod waypoints;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use ipnet::IpNet;
use k8s_openapi::jiff::Timestamp;

use addresses::{AddressIndex, Claim};
use index::IndexCell;

pub use enrollment::{DATAPLANE_MODE_LABEL, MODE_LABEL};
/// Annotation with the pod's network namespace path (file inventory; the CNI plugin supplies it in Kubernetes).
pub const NETNS_ANNOTATION: &str = "ambit.io/netns";
/// Annotation with the pod's cgroup v2 directory (file inventory, informational).
pub const CGROUP_ANNOTATION: &str = "ambit.io/cgroup";
/// Istio's annotation of destination ports that are never captured (comma separated).
pub const EXCLUDE_PORTS_ANNOTATION: &str = "traffic.sidecar.istio.io/excludeOutboundPorts";
/// Istio's annotation of destination CIDRs that are never captured (comma separated).
pub const EXCLUDE_CIDRS_ANNOTATION: &str = "traffic.sidecar.istio.io/excludeOutboundIPRanges";

/// A pod as the agent sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    /// Pod name.
    pub name: String,
    /// Kubernetes namespace.
    pub namespace: String,
    /// Service account.
    pub service_account: String,
    /// Node the pod runs on.
    pub node: String,
    /// Pod addresses.
    pub ips: Vec<IpAddr>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Whether ambit captures this pod's traffic.
    pub enrolled: bool,
    /// Which label (or rule) decided `enrolled` ([`enrollment::decide`]).
    pub enrollment: enrollment::Enrollment,
    /// Network namespace path, when known on this node.
    pub netns: Option<PathBuf>,
    /// Cgroup v2 directory, when known.
    pub cgroup: Option<PathBuf>,
    /// Destination ports never captured.
    pub skip_ports: Vec<u16>,
    /// Destination CIDRs never captured.
    pub skip_cidrs: Vec<IpNet>,
    /// The pod shares its node's network namespace (`spec.hostNetwork`): never enrolled (that
    /// would capture the node), never the owner of an address (its address is the node's).
    pub host_network: bool,
    /// Deletion was requested (`metadata.deletionTimestamp`): it yields its addresses to any
    /// live pod claiming them.
    pub deleting: bool,
    /// `metadata.creationTimestamp`, when set: among live pods claiming one address the newest
    /// wins.
    pub created: Option<Timestamp>,
}

impl Workload {
    /// `namespace/name`, the key used in logs and the admin API.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The workload's address of `like`'s family, if it has one.
    pub fn ip_like(&self, like: IpAddr) -> Option<IpAddr> {
        self.ips
            .iter()
            .find(|i| i.is_ipv4() == like.is_ipv4())
            .copied()
    }

    /// The SPIFFE identity string of this workload in `trust_domain`.
    pub fn spiffe_id(&self, trust_domain: &str) -> String {
        format!(
            "spiffe://{trust_domain}/ns/{}/sa/{}",
            self.namespace, self.service_account
        )
    }
}

/// Workloads by `namespace/name`.
pub type Workloads = imbl::OrdMap<String, Arc<Workload>>;
/// Services by `namespace/name`.
pub type Services = imbl::OrdMap<String, Arc<services::Service>>;

/// Everything the inventory knows at one point in time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Workloads keyed by `namespace/name` (a persistent map: copies share it; change a
    /// snapshot made with [`Snapshot::edit`] through [`Snapshot::put_workload`] and
    /// [`Snapshot::remove_workload`], which keep the index).
    pub workloads: Workloads,
    /// Namespace labels keyed by namespace name.
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    /// Istio PeerAuthentication objects.
    pub peer_authentications: Arc<Vec<crate::policy::peer_auth::PeerAuthentication>>,
    /// Istio AuthorizationPolicy objects.
    pub authorization_policies: Arc<Vec<crate::policy::authz::AuthorizationPolicy>>,
    /// Services keyed by `namespace/name` (persistent, as `workloads`).
    pub services: Services,
    /// Istio DestinationRule objects.
    pub destination_rules: Arc<Vec<crate::policy::destination_rule::DestinationRule>>,
    /// Pod address ranges of each node (`spec.podCIDRs` of Node objects), by node name.
    pub nodes: BTreeMap<String, Vec<IpNet>>,
    /// Problems that did not stop the load: ignored kinds, Services without endpoints.
    pub warnings: Vec<String>,
    /// Lookups by address, VIP and identity and the compiled policies, built once from the
    /// fields above ([`index::Index`]). A snapshot is not changed once shared (it lives behind an
    /// `Arc`); a clone builds its own index, a copy made with [`Snapshot::edit`] keeps it.
    index: IndexCell,
}

impl Snapshot {
    /// Who owns each address (built once per snapshot, with its [`index::Index`]).
    pub fn addresses(&self) -> &AddressIndex {
        self.index().addresses()
    }

    /// The workload owning `ip`: `None` when no pod claims it, or when the claims cannot be
    /// decided (see [`Snapshot::claim`]).
    pub fn by_ip(&self, ip: IpAddr) -> Option<&Workload> {
        match self.claim(ip) {
            Claim::Owner(w) => Some(w),
            Claim::Ambiguous(_) | Claim::Unclaimed => None,
        }
    }

    /// Who owns `ip`: one pod, several pods no rule decides between, or none.
    pub fn claim(&self, ip: IpAddr) -> Claim<'_> {
        let index = self.addresses();
        if let Some(c) = index.conflict(ip).filter(|c| c.owner.is_none()) {
            return Claim::Ambiguous(c);
        }
        index
            .owner(ip)
            .and_then(|key| self.workloads.get(key))
            .map_or(Claim::Unclaimed, |w| Claim::Owner(w))
    }

    /// Whether the snapshot holds no object at all (an empty inventory document or list).
    pub fn is_empty(&self) -> bool {
        self.workloads.is_empty()
            && self.namespaces.is_empty()
            && self.peer_authentications.is_empty()
            && self.authorization_policies.is_empty()
            && self.services.is_empty()
            && self.destination_rules.is_empty()
            && self.nodes.is_empty()
    }
}
