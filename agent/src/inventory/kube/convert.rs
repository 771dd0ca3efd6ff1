//! Converts Kubernetes API objects (typed and dynamic) into the inventory [`Snapshot`].
//!
//! Pods go through the same shapes and enrollment rules as the file source. An object that does
//! not convert is reported once (naming kind, namespace, name, field) and its last good version
//! stays in the snapshot, so a bad update never unenrolls a pod or drops a policy.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service as K8sService};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::DynamicObject;
use kube::ResourceExt;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::cni::pods::CniPod;
use crate::inventory::objects::{self, ObjectMeta, PodIp};
use crate::inventory::sandboxes::merge_netns;
use crate::inventory::services::{
    self, EndpointSliceObject, Service, ServiceObject, SERVICE_NAME_LABEL,
};
use crate::inventory::{file, Snapshot, Workload};
use crate::policy::authz::{self, Action, AuthorizationPolicy, AuthorizationPolicySpec};
use crate::policy::destination_rule::DestinationRule;
use crate::policy::peer_auth::{self, PeerAuthentication};

/// The objects one snapshot is built from.
pub struct Objects<'a> {
    /// v1 Pods.
    pub pods: &'a [Arc<Pod>],
    /// v1 Namespaces.
    pub namespaces: &'a [Arc<Namespace>],
    /// v1 Services.
    pub services: &'a [Arc<K8sService>],
    /// discovery.k8s.io/v1 EndpointSlices.
    pub endpoint_slices: &'a [Arc<EndpointSlice>],
    /// security.istio.io PeerAuthentications.
    pub peer_authentications: &'a [Arc<DynamicObject>],
    /// security.istio.io AuthorizationPolicies.
    pub authorization_policies: &'a [Arc<DynamicObject>],
    /// networking.istio.io DestinationRules.
    pub destination_rules: &'a [Arc<DynamicObject>],
    /// v1 Nodes (their pod ranges decide which of two pods claiming an address owns it).
    pub nodes: &'a [Arc<Node>],
    /// Pod sandboxes the CNI plugin reported on this node.
    pub cni_pods: &'a [CniPod],
}

/// Builds snapshots, remembering each object's last good conversion.
#[derive(Debug, Default)]
pub struct Builder {
    node: String,
    workloads: HashMap<String, Workload>,
    services: HashMap<String, Service>,
    peer_auth: HashMap<String, PeerAuthentication>,
    authz: HashMap<String, AuthorizationPolicy>,
    dest_rules: HashMap<String, DestinationRule>,
    problems: BTreeSet<String>,
}

impl Builder {
    /// A builder for the agent on `node`.
    pub fn new(node: String) -> Self {
        Self {
            node,
            ..Self::default()
        }
    }

    /// A builder for a cluster-wide reader (the CA): every node's pods, and no CNI reports to
    /// merge (no node is "this node").
    pub fn all_nodes() -> Self {
        Self::default()
    }

    /// Objects rejected in the last build, one line each.
    pub fn problems(&self) -> &BTreeSet<String> {
        &self.problems
    }

    /// Converts `o` into a snapshot; logs problems not reported by the previous build.
    pub fn build(&mut self, o: &Objects<'_>) -> Snapshot {
        let mut problems = BTreeSet::new();
        let mut snap = Snapshot::default();
        for ns in o.namespaces {
            snap.namespaces.insert(
                ns.name_any(),
                ns.metadata.labels.clone().unwrap_or_default(),
            );
        }

        for node in o.nodes {
            let shaped = objects::Node {
                metadata: meta(&node.metadata),
                spec: objects::NodeSpec {
                    pod_cidr: node.spec.as_ref().and_then(|s| s.pod_cidr.clone()),
                    pod_cidrs: node
                        .spec
                        .as_ref()
                        .and_then(|s| s.pod_cidrs.clone())
                        .unwrap_or_default(),
                },
            };
            match file::pod_cidrs(&shaped) {
                Ok(ranges) => {
                    snap.nodes.insert(node.name_any(), ranges);
                }
                Err((field, msg)) => {
                    problems.insert(problem("Node", &node.name_any(), &field, &msg));
                }
            }
        }

        let mut workloads = HashMap::new();
        let mut uids = BTreeMap::new();
        for pod in o.pods {
            let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
            // A finished pod's IPs are already handed to other pods: it owns nothing.
            if matches!(phase, Some("Succeeded" | "Failed")) {
                continue;
            }
            let key = key_of(pod.as_ref());
            let converted = pod_workload(pod, &snap.namespaces)
                .map_err(|(field, msg)| problem("Pod", &key, &field, &msg));
            if let Some(w) = keep_last_good(&self.workloads, &key, converted, &mut problems) {
                uids.insert(key.clone(), pod.metadata.uid.clone().unwrap_or_default());
                workloads.insert(key, w);
            }
        }
        self.merge_cni(&mut workloads, &uids, o.cni_pods);
        // Pods claiming one address are the address index's to decide (and to report once).
        snap.workloads = workloads
            .iter()
            .map(|(k, w)| (k.clone(), w.clone()))
            .collect();
        self.workloads = workloads;

        let mut slices: BTreeMap<String, Vec<EndpointSliceObject>> = BTreeMap::new();
        for s in o.endpoint_slices {
            let Some(svc) = s.labels().get(SERVICE_NAME_LABEL) else {
                continue;
            };
            let ns = s.namespace().unwrap_or_default();
            match shape::<EndpointSliceObject>(s.as_ref()) {
                Ok(obj) => slices.entry(format!("{ns}/{svc}")).or_default().push(obj),
                Err((field, msg)) => {
                    problems.insert(problem("EndpointSlice", &key_of(s.as_ref()), &field, &msg));
                }
            }
        }
        let mut services = HashMap::new();
        for svc in o.services {
            let key = key_of(svc.as_ref());
            let mine: Vec<&EndpointSliceObject> = slices
                .get(&key)
                .map(|v| v.iter().collect())
                .unwrap_or_default();
            let converted = shape::<ServiceObject>(svc.as_ref())
                .and_then(|obj| services::service(&obj, &mine))
                .map_err(|(field, msg)| problem("Service", &key, &field, &msg));
            if let Some(s) = keep_last_good(&self.services, &key, converted, &mut problems) {
                services.insert(key, s);
            }
        }
        snap.services = services
            .iter()
            .map(|(k, s)| (k.clone(), s.clone()))
            .collect();
        self.services = services;

        let (list, cache) = policies(
            "PeerAuthentication",
            o.peer_authentications,
            &self.peer_auth,
            &mut problems,
            |pa: &PeerAuthentication| peer_auth::validate(pa),
            |_, _| None,
        );
        snap.peer_authentications = Arc::new(list);
        self.peer_auth = cache;
        let (list, cache) = policies(
            "AuthorizationPolicy",
            o.authorization_policies,
            &self.authz,
            &mut problems,
            authz::validate,
            // Dropping an AuthorizationPolicy never seen good would fail open (a DENY not
            // enforced, or the only ALLOW gone): it is kept, to fail closed.
            |o: &DynamicObject, problem| Some(unreadable_policy(o, problem)),
        );
        snap.authorization_policies = Arc::new(list);
        self.authz = cache;
        let (list, cache) = policies(
            "DestinationRule",
            o.destination_rules,
            &self.dest_rules,
            &mut problems,
            |dr: &DestinationRule| {
                if dr.spec.host.is_empty() {
                    Err(("spec.host".into(), "must not be empty".into()))
                } else {
                    Ok(())
                }
            },
            |_, _| None,
        );
        snap.destination_rules = Arc::new(list);
        self.dest_rules = cache;

        for p in problems.difference(&self.problems) {
            tracing::warn!(error = %p, "Kubernetes object rejected; its last good version (if any) stays in force");
        }
        self.problems = problems;
        snap
    }

    /// Fills in netns paths (and IPs the API does not show yet) of this node's pods from the
    /// CNI plugin's reports. Only the plugin decides a pod's netns in Kubernetes mode: a pod
    /// annotation must never point the agent at another namespace (say, the host's).
    fn merge_cni(
        &self,
        workloads: &mut HashMap<String, Workload>,
        uids: &BTreeMap<String, String>,
        cni: &[CniPod],
    ) {
        for w in workloads.values_mut() {
            w.netns = None;
            w.cgroup = None;
        }
        merge_netns(workloads.iter_mut(), &self.node, uids, cni);
    }
}

/// `namespace/name` of any object.
fn key_of<K: ResourceExt>(o: &K) -> String {
    format!("{}/{}", o.namespace().unwrap_or_default(), o.name_any())
}

fn problem(kind: &str, key: &str, field: &str, msg: &str) -> String {
    if field.is_empty() || field == "." {
        format!("{kind} {key}: {msg}")
    } else {
        format!("{kind} {key}: field `{field}`: {msg}")
    }
}

/// The new conversion, or on error the previous good one (recording the problem).
fn keep_last_good<T: Clone>(
    last: &HashMap<String, T>,
    key: &str,
    converted: Result<T, String>,
    problems: &mut BTreeSet<String>,
) -> Option<T> {
    match converted {
        Ok(v) => Some(v),
        Err(p) => {
            problems.insert(p);
            last.get(key).cloned()
        }
    }
}

fn meta(m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> ObjectMeta {
    ObjectMeta {
        name: m.name.clone().unwrap_or_default(),
        namespace: m.namespace.clone().unwrap_or_default(),
        labels: m.labels.clone().unwrap_or_default(),
        annotations: m.annotations.clone().unwrap_or_default(),
        uid: m.uid.clone().unwrap_or_default(),
        creation_timestamp: m.creation_timestamp.as_ref().map(|t| t.0.to_string()),
        deletion_timestamp: m.deletion_timestamp.as_ref().map(|t| t.0.to_string()),
    }
}

/// A Pod through the file source's shapes and rules.
fn pod_workload(
    pod: &Pod,
    namespaces: &BTreeMap<String, BTreeMap<String, String>>,
) -> Result<Workload, (String, String)> {
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    let shaped = objects::Pod {
        metadata: meta(&pod.metadata),
        spec: objects::PodSpec {
            node_name: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
            service_account_name: spec
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_default(),
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        },
        status: objects::PodStatus {
            pod_ips: status
                .and_then(|s| s.pod_ips.as_ref())
                .map(|ips| ips.iter().map(|p| PodIp { ip: p.ip.clone() }).collect())
                .unwrap_or_default(),
            pod_ip: status.and_then(|s| s.pod_ip.clone()),
            phase: status.and_then(|s| s.phase.clone()),
        },
    };
    file::workload(shaped, namespaces)
}

/// Any API object through the JSON the API server sent, into one of the inventory's shapes.
fn shape<T: DeserializeOwned>(obj: &impl Serialize) -> Result<T, (String, String)> {
    let value = serde_json::to_value(obj).map_err(|e| (String::new(), e.to_string()))?;
    serde_path_to_error::deserialize(value)
        .map_err(|e| (e.path().to_string(), e.inner().to_string()))
}

/// Converts dynamic Istio objects into `T`, sorted by `namespace/name`, keeping last good ones.
/// An object that does not convert and was never seen good becomes `unreadable(object,
/// problem)`, if that gives one (it is not remembered as good).
fn policies<T: DeserializeOwned + Clone>(
    kind: &str,
    objs: &[Arc<DynamicObject>],
    last: &HashMap<String, T>,
    problems: &mut BTreeSet<String>,
    check: impl Fn(&T) -> Result<(), (String, String)>,
    unreadable: impl Fn(&DynamicObject, &str) -> Option<T>,
) -> (Vec<T>, HashMap<String, T>) {
    let mut cache = HashMap::new();
    let mut keyed = BTreeMap::new();
    for o in objs {
        let key = key_of(o.as_ref());
        let converted = shape::<T>(o.as_ref())
            .and_then(|t| check(&t).map(|()| t))
            .map_err(|(field, msg)| problem(kind, &key, &field, &msg));
        let failed = converted.as_ref().err().cloned();
        if let Some(t) = keep_last_good(last, &key, converted, problems) {
            cache.insert(key.clone(), t.clone());
            keyed.insert(key, t);
        } else if let Some(t) = failed.and_then(|p| unreadable(o, &p)) {
            keyed.insert(key, t);
        }
    }
    (keyed.into_values().collect(), cache)
}

/// What can be read of an AuthorizationPolicy that does not convert: its name, namespace,
/// selector (if readable; else none, selecting the whole namespace) and action (if readable;
/// else DENY), with no rules, marked unreadable so that it compiles to fail closed.
fn unreadable_policy(o: &DynamicObject, problem: &str) -> AuthorizationPolicy {
    let spec = &o.data["spec"];
    let action = spec
        .get("action")
        .map_or(Some(Action::Allow), |a| {
            serde_json::from_value(a.clone()).ok()
        })
        .unwrap_or(Action::Deny);
    let selector = spec
        .get("selector")
        .and_then(|s| serde_json::from_value(s.clone()).ok());
    AuthorizationPolicy {
        metadata: meta(&o.metadata),
        spec: AuthorizationPolicySpec {
            selector,
            action,
            ..AuthorizationPolicySpec::default()
        },
        unreadable: Some(problem.to_string()),
    }
}
