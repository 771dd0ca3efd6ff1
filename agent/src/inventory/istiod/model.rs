//! The current istiod resources by name (`Mesh`), and the inventory `Snapshot` they make: workloads, Services with their endpoints, AuthorizationPolicies and the STRICT PeerAuthentication istiod implies.
//!
//! Each resource is checked when it arrives ([`Mesh::apply`]) and kept in its own map entry,
//! so a bad one is refused (NACKed) while the previous version stays, and one change touches
//! only its own entries (plus, for a Workload, its entries in the Service → endpoints index).
//! [`Mesh::snapshot`] then builds ambit's model from all of them; the mapping:
//!
//! - Workload → inventory workload keyed `namespace/name` (the uid when istiod elided the
//!   name; `name@uid` for a second workload of the same `namespace/name`, with a warning).
//!   Enrollment, which also makes a workload a mesh destination: HBONE enrolled (as Istio's
//!   `istio.io/dataplane-mode=ambient`, the label istiod derived it from); a native-tunnel
//!   workload (waypoint, gateway) not enrolled (as Istio's `none`, the label istiod puts on
//!   them); Istio sidecar mTLS as a sidecar pod; host network as a host-network pod; no tunnel
//!   unlabelled.
//! - The waypoint of a Workload or Service → the `istio.io/use-waypoint(-namespace)` labels
//!   ambit's waypoint routing reads. A waypoint not known (yet) is still named, so routes to
//!   the workload are refused rather than sent around the waypoint.
//! - Service → Service keyed `namespace/name` (the hostname when the name is empty or shared
//!   by two Services): VIPs, ports named by their number, and as endpoints every address of
//!   every workload whose `services` names it, with its own target ports.
//! - Authorization → see [`super::authorization`].
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ambit_proto::istio::{security as sec, workload as wl};
use prost::Message;

use super::authorization::{self, Policy, SELECTED, STATIC_STRICT};
use super::workloads::{self, Resource, ServiceEntry, Tunnel, Waypoint, WorkloadEntry};
use crate::inventory::enrollment::{Enrollment, LabelRef, Scope, DATAPLANE_MODE_LABEL};
use crate::inventory::services::{Endpoint, Service, ServicePort};
use crate::inventory::waypoints::{USE_WAYPOINT_LABEL, USE_WAYPOINT_NAMESPACE_LABEL};
use crate::inventory::{Snapshot, Workload};
use crate::meta::ObjectMeta;
use crate::policy::peer_auth::{
    Mode, MtlsSpec, PeerAuthentication, PeerAuthenticationSpec, Selector,
};

/// The type URL of Workloads and Services.
pub const ADDRESS_TYPE: &str = "type.googleapis.com/istio.workload.Address";
/// The type URL of L4 authorization policies.
pub const AUTHORIZATION_TYPE: &str = "type.googleapis.com/istio.security.Authorization";

/// Why a resource was refused (the text goes into the NACK).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// A type ambit did not subscribe to.
    #[error("resource {name}: type {type_url} is not one ambit subscribes to")]
    UnknownType {
        /// The type URL.
        type_url: String,
        /// The resource name.
        name: String,
    },
    /// The bytes are not the message.
    #[error("{kind} {name}: cannot decode: {source}")]
    Decode {
        /// `Address` or `Authorization`.
        kind: &'static str,
        /// The resource name.
        name: String,
        /// The decoder's error.
        #[source]
        source: prost::DecodeError,
    },
    /// A value the API does not allow (a 5-byte address, an empty uid, an unknown enum value).
    #[error("{kind} {name}: {field}: {problem}")]
    Invalid {
        /// `Workload`, `Service` or `Authorization`.
        kind: &'static str,
        /// The resource name.
        name: String,
        /// The field at fault.
        field: String,
        /// What is wrong.
        problem: String,
    },
    /// A valid value beyond what ambit's model expresses (refused, never approximated).
    #[error("{kind} {name}: {field}: {problem}: ambit's model cannot express it")]
    Unsupported {
        /// `Workload`, `Service` or `Authorization`.
        kind: &'static str,
        /// The resource name.
        name: String,
        /// The field at fault.
        field: String,
        /// What it asks for.
        problem: String,
    },
}

impl ModelError {
    /// [`ModelError::Invalid`]: field `field` of the `kind` resource `name` holds a value the
    /// API does not allow.
    pub fn invalid(
        kind: &'static str,
        name: &str,
        field: impl Into<String>,
        problem: impl Into<String>,
    ) -> Self {
        Self::Invalid {
            kind,
            name: name.to_string(),
            field: field.into(),
            problem: problem.into(),
        }
    }

    /// [`ModelError::Unsupported`]: field `field` of the `kind` resource `name` holds a value
    /// beyond what ambit's model expresses.
    pub fn unsupported(
        kind: &'static str,
        name: &str,
        field: impl Into<String>,
        problem: impl Into<String>,
    ) -> Self {
        Self::Unsupported {
            kind,
            name: name.to_string(),
            field: field.into(),
            problem: problem.into(),
        }
    }
}

/// The istiod resources currently accepted, by resource name.
#[derive(Debug, Clone, Default)]
pub struct Mesh {
    trust_domain: String,
    root_namespace: String,
    /// Workloads by uid.
    workloads: BTreeMap<String, WorkloadEntry>,
    /// Services by `namespace/hostname`.
    services: BTreeMap<String, ServiceEntry>,
    /// Authorizations by `namespace/name`.
    policies: BTreeMap<String, Policy>,
    /// Service `namespace/hostname` → uids of the workloads naming it (its endpoints).
    endpoints: BTreeMap<String, BTreeSet<String>>,
}

impl Mesh {
    /// An empty mesh of `trust_domain` whose root namespace is `root_namespace` (both as
    /// istiod's mesh config has them).
    pub fn new(trust_domain: &str, root_namespace: &str) -> Self {
        Self {
            trust_domain: trust_domain.to_string(),
            root_namespace: root_namespace.to_string(),
            ..Self::default()
        }
    }

    /// Decodes, checks and stores resource `name` of `type_url`; on error nothing changes.
    pub fn apply(&mut self, type_url: &str, name: &str, value: &[u8]) -> Result<(), ModelError> {
        match type_url {
            ADDRESS_TYPE => {
                let a = wl::Address::decode(value).map_err(|source| ModelError::Decode {
                    kind: "Address",
                    name: name.to_string(),
                    source,
                })?;
                match workloads::check(name, &a, &self.trust_domain, &self.root_namespace)? {
                    Resource::Workload(w) => {
                        self.services.remove(name);
                        self.unindex(name);
                        for svc in w.services.keys() {
                            self.endpoints
                                .entry(svc.clone())
                                .or_default()
                                .insert(name.to_string());
                        }
                        self.workloads.insert(name.to_string(), w);
                    }
                    Resource::Service(s) => {
                        self.unindex(name);
                        self.workloads.remove(name);
                        self.services.insert(name.to_string(), s);
                    }
                }
                Ok(())
            }
            AUTHORIZATION_TYPE => {
                let a = sec::Authorization::decode(value).map_err(|source| ModelError::Decode {
                    kind: "Authorization",
                    name: name.to_string(),
                    source,
                })?;
                let p = authorization::convert(name, &a, &self.root_namespace)?;
                self.policies.insert(name.to_string(), p);
                Ok(())
            }
            _ => Err(ModelError::UnknownType {
                type_url: type_url.to_string(),
                name: name.to_string(),
            }),
        }
    }

    /// Removes resource `name` of `type_url`; whether it was there.
    pub fn remove(&mut self, type_url: &str, name: &str) -> bool {
        match type_url {
            ADDRESS_TYPE => {
                self.unindex(name);
                self.workloads.remove(name).is_some() | self.services.remove(name).is_some()
            }
            AUTHORIZATION_TYPE => self.policies.remove(name).is_some(),
            _ => false,
        }
    }

    /// How many workloads, services and authorizations are held.
    pub fn counts(&self) -> (usize, usize, usize) {
        (
            self.workloads.len(),
            self.services.len(),
            self.policies.len(),
        )
    }

    /// Drops workload `uid` from the endpoints index.
    fn unindex(&mut self, uid: &str) {
        let Some(w) = self.workloads.get(uid) else {
            return;
        };
        for svc in w.services.keys() {
            if let Some(set) = self.endpoints.get_mut(svc) {
                set.remove(uid);
                if set.is_empty() {
                    self.endpoints.remove(svc);
                }
            }
        }
    }

    /// ambit's inventory snapshot of the resources held (see the module comment).
    pub fn snapshot(&self) -> Snapshot {
        self.snapshot_with_uids().0
    }

    /// [`Mesh::snapshot`], and the uid of each of its workloads by `namespace/name` (the CNI
    /// plugin's reports are matched on it) unless it is istiod's `cluster//Pod/namespace/name`
    /// form, which no report can match.
    pub fn snapshot_with_uids(&self) -> (Snapshot, BTreeMap<String, String>) {
        let mut uids = BTreeMap::new();
        let mut snap = Snapshot::default();
        let names = self.service_names();
        let mut strict_namespaces = BTreeSet::new();
        // The inventory name of each workload, by uid (Service endpoints are found by uid).
        for (uid, w) in &self.workloads {
            let base = if w.name.is_empty() {
                sanitize(uid)
            } else {
                w.name.clone()
            };
            let mut name = base.clone();
            if snap
                .workloads
                .contains_key(&format!("{}/{name}", w.namespace))
            {
                name = format!("{base}@{}", sanitize(uid));
                snap.warnings.push(format!(
                    "Workload {uid}: {}/{base} is another workload's name: listed as {name}",
                    w.namespace
                ));
            }
            let mut labels = BTreeMap::new();
            for p in &w.policies {
                labels.insert(authorization::selected_label(p), SELECTED.to_string());
                if authorization::is_static_strict(p, &self.root_namespace) {
                    strict_namespaces.insert(w.namespace.clone());
                }
            }
            if let Some(wp) = &w.waypoint {
                let what = format!("Workload {uid}");
                labels.extend(self.waypoint_labels(wp, &names, &what, &mut snap.warnings));
            }
            let (enrolled, enrollment) = enrollment(w);
            let workload = Workload {
                name,
                namespace: w.namespace.clone(),
                service_account: w.service_account.clone(),
                node: w.node.clone(),
                ips: w.ips.clone(),
                labels,
                enrolled,
                enrollment,
                netns: None,
                cgroup: None,
                skip_ports: Vec::new(),
                skip_cidrs: Vec::new(),
                host_network: w.host_network,
                deleting: false,
                created: None,
            };
            // istiod names a pod's workload `cluster//Pod/namespace/name`, not by the pod's
            // Kubernetes UID (which the CNI plugin reports): only a plain UID can be compared.
            if !uid.contains('/') {
                uids.insert(workload.key(), uid.clone());
            }
            snap.workloads.insert(workload.key(), workload);
        }
        for (key, s) in &self.services {
            let (namespace, name) = names.get(key.as_str()).cloned().unwrap_or_default();
            let mut endpoints = Vec::new();
            for w in self
                .endpoints
                .get(key)
                .into_iter()
                .flatten()
                .filter_map(|uid| self.workloads.get(uid))
            {
                let ports: BTreeMap<String, u16> = w
                    .services
                    .get(key)
                    .into_iter()
                    .flatten()
                    .filter_map(|(svc, target)| Some((svc.to_string(), (*target)?)))
                    .collect();
                endpoints.extend(w.ips.iter().map(|ip| Endpoint {
                    ip: *ip,
                    ready: w.healthy,
                    ports: ports.clone(),
                }));
            }
            let mut labels = BTreeMap::new();
            if let Some(wp) = &s.waypoint {
                let what = format!("Service {key}");
                labels.extend(self.waypoint_labels(wp, &names, &what, &mut snap.warnings));
            }
            snap.warnings.extend(s.warnings.iter().cloned());
            let svc = Service {
                name,
                namespace,
                labels,
                vips: s.vips.clone(),
                ports: s
                    .ports
                    .iter()
                    .map(|(port, target)| {
                        let sp = ServicePort {
                            name: port.to_string(),
                            target_port: *target,
                        };
                        (*port, sp)
                    })
                    .collect(),
                endpoints,
            };
            snap.services.insert(svc.key(), svc);
        }
        for (key, p) in &self.policies {
            match p {
                Policy::Enforced(p) => snap.authorization_policies.push(p.clone()),
                Policy::DryRun(_) => snap.warnings.push(format!(
                    "Authorization {key} is a dry run: not enforced (ambit does not log dry-run \
                     matches)"
                )),
                Policy::StaticStrict => {}
            }
        }
        let strict_label =
            authorization::selected_label(&format!("{}/{STATIC_STRICT}", self.root_namespace));
        for namespace in strict_namespaces {
            snap.peer_authentications.push(PeerAuthentication {
                metadata: ObjectMeta {
                    name: STATIC_STRICT.to_string(),
                    namespace,
                    ..ObjectMeta::default()
                },
                spec: PeerAuthenticationSpec {
                    selector: Some(Selector {
                        match_labels: [(strict_label.clone(), SELECTED.to_string())].into(),
                    }),
                    mtls: Some(MtlsSpec { mode: Mode::Strict }),
                    port_level_mtls: BTreeMap::new(),
                },
            });
        }
        (snap, uids)
    }

    /// `(namespace, name)` of each Service in the inventory, by resource name: its name, or
    /// its hostname when the name is empty or another Service of the namespace has it too.
    fn service_names(&self) -> BTreeMap<&str, (String, String)> {
        let mut seen: BTreeMap<(&str, &str), usize> = BTreeMap::new();
        for s in self.services.values().filter(|s| !s.name.is_empty()) {
            *seen.entry((&s.namespace, &s.name)).or_default() += 1;
        }
        self.services
            .iter()
            .map(|(key, s)| {
                let unique = seen.get(&(s.namespace.as_str(), s.name.as_str())) == Some(&1);
                let name = if unique { &s.name } else { &s.hostname };
                (key.as_str(), (s.namespace.clone(), name.clone()))
            })
            .collect()
    }

    /// The labels binding waypoint `wp` to `what`. A waypoint not known is still named (by its
    /// hostname or address): ambit finds no Service of that name and refuses the route.
    fn waypoint_labels(
        &self,
        wp: &Waypoint,
        names: &BTreeMap<&str, (String, String)>,
        what: &str,
        warnings: &mut Vec<String>,
    ) -> [(String, String); 2] {
        let known = match wp {
            Waypoint::Hostname {
                namespace,
                hostname,
            } => names
                .get(format!("{namespace}/{hostname}").as_str())
                .cloned(),
            Waypoint::Address(ip) => self
                .service_with_vip(*ip)
                .and_then(|key| names.get(key).cloned()),
        };
        let (namespace, name) = known.unwrap_or_else(|| {
            let named = match wp {
                Waypoint::Hostname {
                    namespace,
                    hostname,
                } => (namespace.clone(), hostname.clone()),
                Waypoint::Address(ip) => (String::new(), format!("address-{ip}")),
            };
            warnings.push(format!(
                "{what}: waypoint {wp:?} is no Service istiod sent: connections through it are \
                 refused until it is"
            ));
            named
        });
        [
            (USE_WAYPOINT_LABEL.to_string(), name),
            (USE_WAYPOINT_NAMESPACE_LABEL.to_string(), namespace),
        ]
    }

    fn service_with_vip(&self, ip: IpAddr) -> Option<&str> {
        self.services
            .iter()
            .find(|(_, s)| s.vips.contains(&ip))
            .map(|(k, _)| k.as_str())
    }
}

/// Enrollment (which also makes a workload a mesh destination), from what istiod derived.
fn enrollment(w: &WorkloadEntry) -> (bool, Enrollment) {
    let dataplane_mode = |value: &'static str, enrolled: bool| Enrollment::Label {
        label: LabelRef {
            on: Scope::Pod,
            key: DATAPLANE_MODE_LABEL,
            value,
        },
        enrolled,
        overrides: None,
    };
    if w.host_network {
        return (false, Enrollment::HostNetwork);
    }
    if w.native_tunnel {
        return (false, dataplane_mode("none", false));
    }
    match w.tunnel {
        Tunnel::Hbone => (true, dataplane_mode("ambient", true)),
        Tunnel::LegacyIstioMtls => (false, Enrollment::Sidecar),
        Tunnel::None => (false, Enrollment::Unlabelled),
    }
}

/// A uid as a name: `/` (which `namespace/name` keys split on) becomes `_`.
fn sanitize(uid: &str) -> String {
    uid.replace('/', "_")
}

#[cfg(test)]
mod tests;
