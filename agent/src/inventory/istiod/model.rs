//! The current istiod resources by name (`Mesh`), and the inventory `Snapshot` they make: workloads, Services with their endpoints, AuthorizationPolicies and the STRICT PeerAuthentication istiod implies.
//!
//! Each resource is checked when it arrives ([`Mesh::apply`]) and kept in its own map entry,
//! so a bad one is refused (NACKed) while the previous version stays, and one change touches
//! only its own entries (plus, for a Workload, its entries in the Service → endpoints index).
//! [`Mesh::snapshot`] builds ambit's model from all of them once and then keeps it up to date
//! resource by resource ([`super::built`]); the mapping:
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

use super::authorization::{self, Policy};
use super::built::Built;
use super::workloads::{self, Resource, ServiceEntry, Tunnel, Waypoint, WorkloadEntry};
use crate::inventory::enrollment::{Enrollment, LabelRef, Scope, DATAPLANE_MODE_LABEL};
use crate::inventory::waypoints::{USE_WAYPOINT_LABEL, USE_WAYPOINT_NAMESPACE_LABEL};
use crate::inventory::Snapshot;

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

/// The istiod resources currently accepted, by resource name, and the snapshot they make.
#[derive(Debug, Clone, Default)]
pub struct Mesh {
    trust_domain: String,
    store: Store,
    /// The snapshot, kept up to date resource by resource; `None` until the first snapshot
    /// and after a change that needs a full build.
    built: Option<Built>,
}

/// The accepted resources.
#[derive(Debug, Clone, Default)]
pub struct Store {
    pub(super) root_namespace: String,
    /// Workloads by uid.
    pub(super) workloads: BTreeMap<String, WorkloadEntry>,
    /// Services by `namespace/hostname`.
    pub(super) services: BTreeMap<String, ServiceEntry>,
    /// Authorizations by `namespace/name`.
    pub(super) policies: BTreeMap<String, Policy>,
    /// Service `namespace/hostname` → uids of the workloads naming it (its endpoints).
    pub(super) endpoints: BTreeMap<String, BTreeSet<String>>,
}

/// `(namespace, name)` of each Service in the inventory, by resource name.
pub type ServiceNames = BTreeMap<String, (String, String)>;

impl Mesh {
    /// An empty mesh of `trust_domain` whose root namespace is `root_namespace` (both as
    /// istiod's mesh config has them).
    pub fn new(trust_domain: &str, root_namespace: &str) -> Self {
        Self {
            trust_domain: trust_domain.to_string(),
            store: Store {
                root_namespace: root_namespace.to_string(),
                ..Store::default()
            },
            built: None,
        }
    }

    /// Decodes, checks and stores resource `name` of `type_url`; on error nothing changes.
    pub fn apply(&mut self, type_url: &str, name: &str, value: &[u8]) -> Result<(), ModelError> {
        let store = &mut self.store;
        match type_url {
            ADDRESS_TYPE => {
                let a = wl::Address::decode(value).map_err(|source| ModelError::Decode {
                    kind: "Address",
                    name: name.to_string(),
                    source,
                })?;
                match workloads::check(name, &a, &self.trust_domain, &store.root_namespace)? {
                    Resource::Workload(w) => {
                        if store.services.remove(name).is_some() {
                            self.built = None;
                        }
                        store.unindex(name);
                        for svc in w.services.keys() {
                            store
                                .endpoints
                                .entry(svc.clone())
                                .or_default()
                                .insert(name.to_string());
                        }
                        let old = store.workloads.insert(name.to_string(), w);
                        if let Some(b) = &mut self.built {
                            b.workload_changed(store, name, old.as_ref());
                        }
                    }
                    Resource::Service(s) => {
                        store.unindex(name);
                        store.workloads.remove(name);
                        store.services.insert(name.to_string(), s);
                        self.built = None;
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
                let p = authorization::convert(name, &a, &store.root_namespace)?;
                store.policies.insert(name.to_string(), p);
                self.built = None;
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
        let store = &mut self.store;
        match type_url {
            ADDRESS_TYPE => {
                store.unindex(name);
                if let Some(old) = store.workloads.remove(name) {
                    if let Some(b) = &mut self.built {
                        b.workload_changed(store, name, Some(&old));
                    }
                    return true;
                }
                let removed = store.services.remove(name).is_some();
                if removed {
                    self.built = None;
                }
                removed
            }
            AUTHORIZATION_TYPE => {
                let removed = store.policies.remove(name).is_some();
                if removed {
                    self.built = None;
                }
                removed
            }
            _ => false,
        }
    }

    /// How many workloads, services and authorizations are held.
    pub fn counts(&self) -> (usize, usize, usize) {
        (
            self.store.workloads.len(),
            self.store.services.len(),
            self.store.policies.len(),
        )
    }

    /// ambit's inventory snapshot of the resources held (see the module comment), its index
    /// built. Cheap after the first: the snapshot is kept up to date as resources change, and
    /// this is a copy sharing its maps ([`Snapshot::edit`]).
    pub fn snapshot(&mut self) -> Snapshot {
        let store = &self.store;
        self.built
            .get_or_insert_with(|| Built::full(store))
            .snap
            .edit()
    }

    /// The snapshot built from scratch, ignoring the one kept up to date (for tests comparing
    /// the two).
    pub fn full_snapshot(&self) -> Snapshot {
        Built::full(&self.store).snap
    }

    /// The pod UID of the inventory workload `key` (the CNI plugin's reports are matched on
    /// it), unless istiod names it in its `cluster//Pod/namespace/name` form, which no report
    /// can match. Valid for the last [`Mesh::snapshot`].
    pub fn uid_of(&self, key: &str) -> Option<&str> {
        self.built.as_ref()?.uid_of(key)
    }
}

impl Store {
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

    /// `(namespace, name)` of each Service in the inventory, by resource name: its name, or
    /// its hostname when the name is empty or another Service of the namespace has it too.
    pub(super) fn service_names(&self) -> ServiceNames {
        let mut seen: BTreeMap<(&str, &str), usize> = BTreeMap::new();
        for s in self.services.values().filter(|s| !s.name.is_empty()) {
            *seen.entry((&s.namespace, &s.name)).or_default() += 1;
        }
        self.services
            .iter()
            .map(|(key, s)| {
                let unique = seen.get(&(s.namespace.as_str(), s.name.as_str())) == Some(&1);
                let name = if unique { &s.name } else { &s.hostname };
                (key.clone(), (s.namespace.clone(), name.clone()))
            })
            .collect()
    }

    fn service_with_vip(&self, ip: IpAddr) -> Option<&str> {
        self.services
            .iter()
            .find(|(_, s)| s.vips.contains(&ip))
            .map(|(k, _)| k.as_str())
    }
}

/// The labels binding waypoint `wp` to `what`. A waypoint not known is still named (by its
/// hostname or address): ambit finds no Service of that name and refuses the route.
pub(super) fn waypoint_labels(
    store: &Store,
    wp: &Waypoint,
    names: &ServiceNames,
    what: &str,
    warnings: &mut Vec<String>,
) -> [(String, String); 2] {
    let known = match wp {
        Waypoint::Hostname {
            namespace,
            hostname,
        } => names.get(&format!("{namespace}/{hostname}")).cloned(),
        Waypoint::Address(ip) => store
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

/// Enrollment (which also makes a workload a mesh destination), from what istiod derived.
pub(super) fn enrollment(w: &WorkloadEntry) -> (bool, Enrollment) {
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
pub(super) fn sanitize(uid: &str) -> String {
    uid.replace('/', "_")
}

#[cfg(test)]
mod tests;
