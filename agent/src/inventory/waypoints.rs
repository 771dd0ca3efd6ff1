//! Waypoints: which waypoint a pod or Service uses (Istio's `istio.io/use-waypoint` labels) and the waypoint's endpoints and identities.
//!
//! As istiod binds them (`pilot/pkg/serviceregistry/kube/controller/ambient/waypoints.go`): a
//! pod's or Service's own `istio.io/use-waypoint` label wins over its namespace's; the value
//! `none` on the object means "no waypoint", whatever the namespace says; the waypoint's
//! namespace is `istio.io/use-waypoint-namespace` of the same object, else the object's own.
//! The waypoint is the Service of that name; its endpoints are the waypoint's pods, and their
//! service accounts are the identities a tunnel to it requires and the only ones a pod behind
//! it accepts mesh traffic from. A waypoint's own pods never use a waypoint (that would be a
//! loop). Istio's `istio.io/waypoint-for` (which kinds of traffic a waypoint takes) is not read:
//! every binding is followed, which errs on the side of the waypoint enforcing policy.
use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::Serialize;

use super::services::{Endpoint, Service};
use super::{Snapshot, Workload};

/// The label naming the waypoint a pod, Service or namespace uses (`none`: no waypoint).
pub const USE_WAYPOINT_LABEL: &str = "istio.io/use-waypoint";
/// The label naming the namespace of that waypoint (default: the object's own namespace).
pub const USE_WAYPOINT_NAMESPACE_LABEL: &str = "istio.io/use-waypoint-namespace";
/// The value of [`USE_WAYPOINT_LABEL`] that opts an object out of its namespace's waypoint.
pub const NO_WAYPOINT: &str = "none";

/// A waypoint an object uses, and the label that bound it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WaypointRef {
    /// Namespace of the waypoint's Service.
    pub namespace: String,
    /// Name of the waypoint's Service.
    pub name: String,
    /// Which object's label bound it: `pod`, `service` or `namespace`.
    pub bound_by: &'static str,
}

impl WaypointRef {
    /// `namespace/name`, the waypoint Service's key.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Why a waypoint cannot be reached (the route refuses: never around the waypoint).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unavailable {
    /// No Service of the waypoint's name.
    #[error("waypoint {waypoint} has no Service")]
    NoService {
        /// `namespace/name` of the waypoint.
        waypoint: String,
    },
    /// The waypoint has no ready endpoint of the destination's address family.
    #[error("waypoint {waypoint} has no ready endpoint of the family of {like}")]
    NoReadyEndpoint {
        /// `namespace/name` of the waypoint.
        waypoint: String,
        /// The destination address whose family is needed.
        like: IpAddr,
    },
    /// An endpoint of the waypoint is no pod the inventory knows: its identity is unknown.
    #[error("waypoint {waypoint} endpoint {ip} is no known pod: its identity cannot be decided")]
    UnknownEndpoint {
        /// `namespace/name` of the waypoint.
        waypoint: String,
        /// The endpoint's address.
        ip: IpAddr,
    },
}

/// One waypoint pod a tunnel may go to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaypointEndpoint {
    /// The pod's address.
    pub ip: IpAddr,
    /// The pod's identity in the trust domain asked for.
    pub identity: String,
}

impl Snapshot {
    /// The waypoint `w` uses: its own label, else its namespace's; `None` when neither binds
    /// one, when the pod says `none`, or when `w` is a pod of that waypoint itself.
    pub fn waypoint_of_workload(&self, w: &Workload) -> Option<WaypointRef> {
        let wp = self.bound(&w.labels, &w.namespace, "pod")?;
        let is_itself = self
            .services
            .get(&wp.key())
            .is_some_and(|svc| svc.endpoints.iter().any(|e| w.ips.contains(&e.ip)));
        (!is_itself).then_some(wp)
    }

    /// The waypoint Service `svc` uses: its own label, else its namespace's.
    pub fn waypoint_of_service(&self, svc: &Service) -> Option<WaypointRef> {
        self.bound(&svc.labels, &svc.namespace, "service")
    }

    /// One ready endpoint of waypoint `wp` of `like`'s family, the `pick(key, count)`-th, with
    /// the identity (in `trust_domain`) a tunnel to it requires.
    pub fn waypoint_endpoint(
        &self,
        wp: &WaypointRef,
        like: IpAddr,
        trust_domain: &str,
        pick: impl FnOnce(&str, usize) -> usize,
    ) -> Result<WaypointEndpoint, Unavailable> {
        let key = wp.key();
        let svc = self
            .services
            .get(&key)
            .ok_or_else(|| Unavailable::NoService {
                waypoint: key.clone(),
            })?;
        let ready: Vec<&Endpoint> = svc
            .endpoints
            .iter()
            .filter(|e| e.ready && e.ip.is_ipv4() == like.is_ipv4())
            .collect();
        if ready.is_empty() {
            return Err(Unavailable::NoReadyEndpoint {
                waypoint: key,
                like,
            });
        }
        let n = ready.len();
        // `n` is not zero and the index is taken modulo it: the endpoint exists.
        let Some(ep) = ready.get(pick(&key, n) % n) else {
            return Err(Unavailable::NoReadyEndpoint {
                waypoint: key,
                like,
            });
        };
        let pod = self
            .by_ip(ep.ip)
            .ok_or_else(|| Unavailable::UnknownEndpoint {
                waypoint: key.clone(),
                ip: ep.ip,
            })?;
        Ok(WaypointEndpoint {
            ip: ep.ip,
            identity: pod.spiffe_id(trust_domain),
        })
    }

    /// The identities (in `trust_domain`) of every pod behind waypoint `wp`'s endpoints, ready
    /// or not (a pod that just turned unready may still carry streams).
    pub fn waypoint_identities(&self, wp: &WaypointRef, trust_domain: &str) -> Vec<String> {
        let Some(svc) = self.services.get(&wp.key()) else {
            return Vec::new();
        };
        let mut ids: Vec<String> = svc
            .endpoints
            .iter()
            .filter_map(|e| self.by_ip(e.ip))
            .map(|w| w.spiffe_id(trust_domain))
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }

    fn bound(
        &self,
        labels: &BTreeMap<String, String>,
        namespace: &str,
        on: &'static str,
    ) -> Option<WaypointRef> {
        if let Some(name) = labels.get(USE_WAYPOINT_LABEL) {
            return named(name, labels, namespace, on);
        }
        let ns_labels = self.namespaces.get(namespace)?;
        let name = ns_labels.get(USE_WAYPOINT_LABEL)?;
        named(name, ns_labels, namespace, "namespace")
    }
}

fn named(
    name: &str,
    labels: &BTreeMap<String, String>,
    namespace: &str,
    bound_by: &'static str,
) -> Option<WaypointRef> {
    if name.is_empty() || name == NO_WAYPOINT {
        return None;
    }
    let namespace = labels
        .get(USE_WAYPOINT_NAMESPACE_LABEL)
        .filter(|ns| !ns.is_empty())
        .map_or(namespace, String::as_str);
    Some(WaypointRef {
        namespace: namespace.to_string(),
        name: name.to_string(),
        bound_by,
    })
}
