//! The inventory snapshot istiod's resources make, kept up to date resource by resource: a pushed Workload changes its own entry, its index entries and the endpoints of its Services, not the whole snapshot.
//!
//! [`Built::full`] maps every resource (see [`super::model`] for the mapping);
//! [`Built::workload_changed`] redoes only what one Workload touches: its inventory workload
//! (through [`Snapshot::put_workload`], which updates the address, identity and node indexes),
//! the endpoints of the Services it was and is part of, the namespaces with istiod's static
//! STRICT policy, and its warnings. Service and Authorization changes rebuild in full (they
//! can rename Services and so change other resources' waypoint labels; istiod sends them far
//! less often than Workloads).
use std::collections::BTreeMap;
use std::sync::Arc;

use super::authorization::{self, Policy, SELECTED, STATIC_STRICT};
use super::model::{enrollment, sanitize, waypoint_labels, ServiceNames, Store};
use super::workloads::{ServiceEntry, WorkloadEntry};
use crate::inventory::services::{Endpoint, Service, ServicePort};
use crate::inventory::{Snapshot, Workload};
use crate::meta::ObjectMeta;
use crate::policy::peer_auth::{
    Mode, MtlsSpec, PeerAuthentication, PeerAuthenticationSpec, Selector,
};

/// The snapshot of the resources held, and what keeps it up to date.
#[derive(Debug, Clone, Default)]
pub struct Built {
    /// The snapshot (its index built, so copies made with [`Snapshot::edit`] keep it).
    pub snap: Snapshot,
    /// Inventory key (`namespace/name`) of each Workload, by uid.
    keys: BTreeMap<String, String>,
    /// Pod UID of each inventory key, for Workloads named by a plain UID (see
    /// [`super::model::Mesh::uid_of`]).
    uids: BTreeMap<String, String>,
    /// `(namespace, name)` of each Service, by resource key (fixed until the next full build).
    names: ServiceNames,
    /// Warnings of each Workload, by uid.
    workload_warnings: BTreeMap<String, Vec<String>>,
    /// Warnings of the Services and Authorizations (fixed until the next full build).
    other_warnings: Vec<String>,
    /// Namespaces with istiod's static STRICT policy: how many workloads name it.
    strict: BTreeMap<String, usize>,
}

impl Built {
    /// Maps every resource of `r`.
    pub fn full(r: &Store) -> Self {
        let mut b = Self {
            names: r.service_names(),
            ..Self::default()
        };
        for (uid, w) in &r.workloads {
            b.add_workload(r, uid, w);
        }
        for key in r.services.keys() {
            if let Some(svc) = b.service(r, key) {
                b.snap.services.insert(svc.key(), svc.into());
            }
        }
        for (key, s) in &r.services {
            if let Some(wp) = &s.waypoint {
                let what = format!("Service {key}");
                waypoint_labels(r, wp, &b.names, &what, &mut b.other_warnings);
            }
            b.other_warnings.extend(s.warnings.iter().cloned());
        }
        let mut policies = Vec::new();
        for (key, p) in &r.policies {
            match p {
                Policy::Enforced(p) => policies.push(p.clone()),
                Policy::DryRun(_) => b.other_warnings.push(format!(
                    "Authorization {key} is a dry run: not enforced (ambit does not log dry-run \
                     matches)"
                )),
                Policy::StaticStrict => {}
            }
        }
        b.snap.authorization_policies = Arc::new(policies);
        b.peer_authentications(r);
        b.warnings();
        b.snap.index();
        b
    }

    /// Updates the snapshot after Workload `uid` changed from `old` to what `r` holds now.
    pub fn workload_changed(&mut self, r: &Store, uid: &str, old: Option<&WorkloadEntry>) {
        let strict_before = self.strict.len();
        if let Some(key) = self.keys.remove(uid) {
            self.snap.remove_workload(&key);
            self.uids.remove(&key);
        }
        self.workload_warnings.remove(uid);
        if let Some(old) = old {
            self.count_strict(r, old, false);
        }
        let new = r.workloads.get(uid);
        if let Some(w) = new {
            self.add_workload(r, uid, w);
        }
        let mut touched: Vec<&String> = old.iter().flat_map(|w| w.services.keys()).collect();
        touched.extend(new.iter().flat_map(|w| w.services.keys()));
        touched.sort_unstable();
        touched.dedup();
        for key in touched {
            let Some((namespace, name)) = self.names.get(key) else {
                continue;
            };
            let inventory_key = format!("{namespace}/{name}");
            match self.service(r, key) {
                Some(svc) => self.snap.put_service(svc),
                None => self.snap.remove_service(&inventory_key),
            };
        }
        if self.strict.len() != strict_before {
            self.peer_authentications(r);
        }
        self.warnings();
    }

    /// The pod UID of inventory workload `key`, when istiod names it by one.
    pub fn uid_of(&self, key: &str) -> Option<&str> {
        self.uids.get(key).map(String::as_str)
    }

    /// Maps Workload `uid` into the snapshot (the index, when built, follows).
    fn add_workload(&mut self, r: &Store, uid: &str, w: &WorkloadEntry) {
        let mut warnings = Vec::new();
        let base = if w.name.is_empty() {
            sanitize(uid)
        } else {
            w.name.clone()
        };
        let mut name = base.clone();
        if self
            .snap
            .workloads
            .contains_key(&format!("{}/{name}", w.namespace))
        {
            name = format!("{base}@{}", sanitize(uid));
            warnings.push(format!(
                "Workload {uid}: {}/{base} is another workload's name: listed as {name}",
                w.namespace
            ));
        }
        let mut labels = BTreeMap::new();
        for p in &w.policies {
            labels.insert(authorization::selected_label(p), SELECTED.to_string());
        }
        self.count_strict(r, w, true);
        if let Some(wp) = &w.waypoint {
            let what = format!("Workload {uid}");
            labels.extend(waypoint_labels(r, wp, &self.names, &what, &mut warnings));
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
        let key = workload.key();
        // istiod names a pod's workload `cluster//Pod/namespace/name`, not by the pod's
        // Kubernetes UID (which the CNI plugin reports): only a plain UID can be compared.
        if !uid.contains('/') {
            self.uids.insert(key.clone(), uid.to_owned());
        }
        if !warnings.is_empty() {
            self.workload_warnings.insert(uid.to_owned(), warnings);
        }
        self.keys.insert(uid.to_owned(), key);
        self.snap.put_workload(workload);
    }

    /// Counts (or uncounts) the namespace of `w` when it names istiod's static STRICT policy.
    fn count_strict(&mut self, r: &Store, w: &WorkloadEntry, add: bool) {
        let strict = w
            .policies
            .iter()
            .any(|p| authorization::is_static_strict(p, &r.root_namespace));
        if !strict {
            return;
        }
        if add {
            *self.strict.entry(w.namespace.clone()).or_default() += 1;
        } else if let Some(n) = self.strict.get_mut(&w.namespace) {
            *n -= 1;
            if *n == 0 {
                self.strict.remove(&w.namespace);
            }
        }
    }

    /// Service `key` of `r` with every address of every workload naming it as an endpoint.
    fn service(&self, r: &Store, key: &str) -> Option<Service> {
        let s: &ServiceEntry = r.services.get(key)?;
        let (namespace, name) = self.names.get(key).cloned().unwrap_or_default();
        let mut endpoints = Vec::new();
        for w in r
            .endpoints
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|uid| r.workloads.get(uid))
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
            labels.extend(waypoint_labels(r, wp, &self.names, &what, &mut Vec::new()));
        }
        Some(Service {
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
        })
    }

    /// The PeerAuthentication (STRICT, selecting the workloads that name it) of each namespace
    /// with istiod's static STRICT policy.
    fn peer_authentications(&mut self, r: &Store) {
        let strict_label =
            authorization::selected_label(&format!("{}/{STATIC_STRICT}", r.root_namespace));
        let list = self
            .strict
            .keys()
            .map(|namespace| PeerAuthentication {
                metadata: ObjectMeta {
                    name: STATIC_STRICT.to_string(),
                    namespace: namespace.clone(),
                    ..ObjectMeta::default()
                },
                spec: PeerAuthenticationSpec {
                    selector: Some(Selector {
                        match_labels: [(strict_label.clone(), SELECTED.to_string())].into(),
                    }),
                    mtls: Some(MtlsSpec { mode: Mode::Strict }),
                    port_level_mtls: BTreeMap::new(),
                },
            })
            .collect();
        self.snap.peer_authentications = Arc::new(list);
    }

    /// The snapshot's warnings: the Workloads' (by uid), then the Services' and Authorizations'.
    fn warnings(&mut self) {
        let mut all: Vec<String> = self.workload_warnings.values().flatten().cloned().collect();
        all.extend(self.other_warnings.iter().cloned());
        self.snap.warnings = all;
    }
}
