//! Pods' reports for the admin socket: pods' status and the policies that apply to them.
use std::path::PathBuf;

use serde::Serialize;

use super::{lock, Pods};
use crate::policy::{authz, peer_auth};
use crate::proxy::ProxyStatsSnapshot;
use crate::redirect::maps::AmbPodStats;

/// One pod in `GET /policies`.
#[derive(Debug, Serialize)]
pub struct PodPolicy {
    /// `namespace/name`.
    pub pod: String,
    /// AuthorizationPolicies that apply to the pod.
    pub authorization: Vec<AppliedAuthz>,
    /// Effective PeerAuthentication for all ports and for ports with their own mode.
    pub peer_authentication: peer_auth::Explained,
}

/// An AuthorizationPolicy in a pod's scope (its namespace or the root namespace, its selector
/// matching), applied by the node proxy or not.
#[derive(Debug, Serialize)]
pub struct AppliedAuthz {
    /// `namespace/name`.
    pub policy: String,
    /// ALLOW, DENY, AUDIT or CUSTOM.
    pub action: authz::Action,
    /// Fields ambit cannot check at L4 (the rule fails safe); empty when not applied.
    pub unsupported: Vec<String>,
    /// Why the node proxy does not apply it (`targetRefs: Gateway/waypoint`), if it does not.
    pub not_for_node_proxy: Option<String>,
}

impl AppliedAuthz {
    /// How `p` is reported.
    pub fn of(p: &authz::AuthorizationPolicy) -> Self {
        let not_for_node_proxy = p.not_for_node_proxy();
        Self {
            policy: p.key(),
            action: p.spec.action,
            unsupported: if not_for_node_proxy.is_none() {
                authz::unsupported(p)
            } else {
                Vec::new()
            },
            not_for_node_proxy: not_for_node_proxy.map(|n| n.to_string()),
        }
    }
}

/// One pod in the status report.
#[derive(Debug, Serialize)]
pub struct PodStatus {
    /// Pod name.
    pub name: String,
    /// Kubernetes namespace.
    pub namespace: String,
    /// SPIFFE identity.
    pub identity: String,
    /// Pod addresses.
    pub ips: Vec<String>,
    /// `enrolled` or `failed`.
    pub state: &'static str,
    /// Why enrollment failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Network namespace path.
    pub netns: Option<PathBuf>,
    /// Network namespace cookie.
    pub netns_cookie: Option<u64>,
    /// Listener addresses inside the pod.
    pub listeners: Vec<String>,
    /// Kernel per-pod counters.
    pub counters: Option<AmbPodStats>,
    /// Proxy counters.
    pub proxy: Option<ProxyStatsSnapshot>,
}

impl Pods {
    /// Effective PeerAuthentication of every enrolled pod.
    pub fn policies(&self) -> Vec<PodPolicy> {
        let snap = self.agent.inventory.borrow().clone();
        lock(&self.enrolled)
            .values()
            .map(|e| {
                let w = snap
                    .workloads
                    .get(&e.ctx.workload.key())
                    .map(AsRef::as_ref)
                    .unwrap_or(&e.ctx.workload);
                let authorization = snap
                    .authorization_policies
                    .iter()
                    .filter(|p| {
                        p.applies_to(&self.agent.cfg.root_namespace, &w.namespace, &w.labels)
                    })
                    .map(AppliedAuthz::of)
                    .collect();
                PodPolicy {
                    authorization,
                    pod: w.key(),
                    peer_authentication: peer_auth::explain(
                        &snap.peer_authentications,
                        &self.agent.cfg.root_namespace,
                        &w.namespace,
                        &w.labels,
                    ),
                }
            })
            .collect()
    }

    /// Status of every pod this agent serves or tried to serve.
    pub fn status(&self) -> Vec<PodStatus> {
        let td = &self.agent.cfg.trust_domain;
        let mut out: Vec<PodStatus> = lock(&self.enrolled)
            .values()
            .map(|e| {
                let w = &e.ctx.workload;
                PodStatus {
                    name: w.name.clone(),
                    namespace: w.namespace.clone(),
                    identity: w.spiffe_id(td),
                    ips: w.ips.iter().map(ToString::to_string).collect(),
                    state: "enrolled",
                    error: None,
                    netns: w.netns.clone(),
                    netns_cookie: Some(e.entry.netns_cookie),
                    listeners: e.listeners.clone(),
                    counters: self.datapath.pod_stats(e.entry.netns_cookie),
                    proxy: Some(e.ctx.stats.snapshot()),
                }
            })
            .collect();
        out.extend(lock(&self.failed).values().map(|f| PodStatus {
            name: f.workload.name.clone(),
            namespace: f.workload.namespace.clone(),
            identity: f.workload.spiffe_id(td),
            ips: f.workload.ips.iter().map(ToString::to_string).collect(),
            state: "failed",
            error: Some(f.error.clone()),
            netns: f.workload.netns.clone(),
            netns_cookie: None,
            listeners: Vec::new(),
            counters: None,
            proxy: None,
        }));
        out
    }
}
