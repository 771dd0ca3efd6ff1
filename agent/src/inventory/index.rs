//! Lookups derived from one snapshot, built once before any connection uses it and then kept up to date change by change: address owners, Service VIPs, workloads by identity and by node, compiled AuthorizationPolicies.
//!
//! Both sources publish through [`super::publish::Publisher`], which builds the index before
//! the snapshot is sent, so per-connection code only looks up (hash maps, B-tree maps); it
//! never scans the inventory. A snapshot made elsewhere (tests, a first load handed over
//! directly) builds its index on first use, once. The maps are persistent (`imbl`): a copy
//! made with [`Snapshot::edit`] shares them, and [`Snapshot::put_workload`] and its siblings
//! change only the entries one object touches, so a change costs O(log n), not a rebuild.
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, OnceLock};

use super::addresses::AddressIndex;
use super::services::{Endpoint, Service};
use super::{Snapshot, Workload};
use crate::policy::authz::Policies;

/// Keys (`namespace/name`) of a group of workloads, in key order.
type Keys = imbl::OrdSet<String>;

/// The derived lookups of one snapshot.
#[derive(Debug, Default, Clone)]
pub struct Index {
    addresses: AddressIndex,
    /// Service virtual IP → the Services claiming it.
    vips: imbl::HashMap<IpAddr, Vip>,
    /// Namespace → service account → workloads running as that identity.
    identities: imbl::HashMap<String, imbl::HashMap<String, Keys>>,
    /// Node → workloads scheduled on it.
    nodes: imbl::HashMap<String, Keys>,
    authz: Arc<Policies>,
}

/// One virtual IP and the Services claiming it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Vip {
    /// Keys in [`Snapshot::services`] of the Services listing the address, in key order: of
    /// two Services claiming one VIP the first by key wins.
    claimants: Vec<String>,
    /// `namespace/name` of the winner (its round-robin key).
    name: String,
    /// Positions in the winner's endpoints of the ready ones of this address's family (a VIP
    /// of one family balances over endpoints of that family, as kube-proxy does).
    ready: Vec<usize>,
}

impl Index {
    /// Indexes `snap`.
    pub fn build(snap: &Snapshot) -> Self {
        let mut index = Self {
            addresses: AddressIndex::build(snap),
            authz: Arc::new(Policies::compile(&snap.authorization_policies)),
            ..Self::default()
        };
        let mut claims: HashMap<IpAddr, Vec<String>> = HashMap::new();
        for (key, svc) in &snap.services {
            for ip in &svc.vips {
                claims.entry(*ip).or_default().push(key.clone());
            }
        }
        for (ip, claimants) in claims {
            index.settle_vip(snap, ip, claimants);
        }
        for (key, w) in &snap.workloads {
            index.add_workload(key, w);
        }
        index
    }

    /// Who owns each address.
    pub fn addresses(&self) -> &AddressIndex {
        &self.addresses
    }

    /// The compiled AuthorizationPolicies.
    pub fn authz(&self) -> &Policies {
        &self.authz
    }

    /// Whether `self` answers every lookup as `other` does (a test of the incremental updates
    /// against a rebuild).
    #[cfg(test)]
    pub(crate) fn same_lookups(&self, other: &Self) -> bool {
        self.addresses == other.addresses
            && self.vips == other.vips
            && self.identities == other.identities
            && self.nodes == other.nodes
            && self.authz.failures() == other.authz.failures()
    }

    /// Updates the entries of workload `key`, which was `old` and is now as in `snap`.
    fn workload_changed(&mut self, snap: &Snapshot, key: &str, old: Option<&Workload>) {
        self.addresses.update(snap, key, old);
        if let Some(old) = old {
            self.remove_workload(key, old);
        }
        if let Some(new) = snap.workloads.get(key) {
            self.add_workload(key, new);
        }
    }

    fn add_workload(&mut self, key: &str, w: &Workload) {
        self.identities
            .entry(w.namespace.clone())
            .or_default()
            .entry(w.service_account.clone())
            .or_default()
            .insert(key.to_owned());
        self.nodes
            .entry(w.node.clone())
            .or_default()
            .insert(key.to_owned());
    }

    fn remove_workload(&mut self, key: &str, w: &Workload) {
        if let Some(by_sa) = self.identities.get_mut(&w.namespace) {
            if let Some(keys) = by_sa.get_mut(&w.service_account) {
                keys.remove(key);
                if keys.is_empty() {
                    by_sa.remove(&w.service_account);
                }
            }
            if by_sa.is_empty() {
                self.identities.remove(&w.namespace);
            }
        }
        if let Some(keys) = self.nodes.get_mut(&w.node) {
            keys.remove(key);
            if keys.is_empty() {
                self.nodes.remove(&w.node);
            }
        }
    }

    /// Updates the VIPs of Service `key`, which was `old` and is now as in `snap`.
    fn service_changed(&mut self, snap: &Snapshot, key: &str, old: Option<&Service>) {
        let new = snap.services.get(key).map(AsRef::as_ref);
        let mut touched: Vec<IpAddr> = old.map(|s| s.vips.clone()).unwrap_or_default();
        touched.extend(new.iter().flat_map(|s| s.vips.iter()));
        touched.sort_unstable();
        touched.dedup();
        for ip in touched {
            let mut claimants = self
                .vips
                .get(&ip)
                .map(|v| v.claimants.clone())
                .unwrap_or_default();
            claimants.retain(|k| k != key);
            if new.is_some_and(|s| s.vips.contains(&ip)) {
                claimants.push(key.to_owned());
            }
            self.settle_vip(snap, ip, claimants);
        }
    }

    /// Records which of `claimants` (Service keys in `snap`) VIP `ip` reaches.
    fn settle_vip(&mut self, snap: &Snapshot, ip: IpAddr, mut claimants: Vec<String>) {
        claimants.sort();
        let Some(svc) = claimants.first().and_then(|k| snap.services.get(k)) else {
            self.vips.remove(&ip);
            return;
        };
        let vip = Vip {
            name: svc.key(),
            ready: ready_of_family(svc, ip.is_ipv4()),
            claimants,
        };
        self.vips.insert(ip, vip);
    }
}

/// A Service reached through one of its virtual IPs.
#[derive(Debug, Clone, Copy)]
pub struct VipService<'a> {
    /// The Service.
    pub service: &'a Service,
    /// `namespace/name` (the key its endpoints are balanced under).
    pub name: &'a str,
    ready: &'a [usize],
}

impl<'a> VipService<'a> {
    /// How many endpoints of the VIP's family are ready.
    pub fn ready_count(&self) -> usize {
        self.ready.len()
    }

    /// The `i`-th ready endpoint of the VIP's family (`i` below [`VipService::ready_count`]).
    pub fn ready(&self, i: usize) -> Option<&'a Endpoint> {
        self.ready
            .get(i)
            .and_then(|at| self.service.endpoints.get(*at))
    }
}

/// The snapshot's lazily built [`Index`]: derived data, so it never makes two snapshots differ.
#[derive(Default)]
pub(super) struct IndexCell(OnceLock<Index>);

impl IndexCell {
    pub(super) fn get_or_build(&self, snap: &Snapshot) -> &Index {
        self.0.get_or_init(|| Index::build(snap))
    }

    /// A copy of the index, when it is built (cheap: the maps are shared).
    fn copy(&self) -> Self {
        let cell = Self::default();
        if let Some(index) = self.0.get() {
            let _ = cell.0.set(index.clone());
        }
        cell
    }
}

impl Clone for IndexCell {
    fn clone(&self) -> Self {
        // A clone is usually changed before it is published: let it index itself.
        Self::default()
    }
}

impl PartialEq for IndexCell {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for IndexCell {}

impl std::fmt::Debug for IndexCell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() {
            "IndexCell(built)"
        } else {
            "IndexCell(not built)"
        })
    }
}

impl Snapshot {
    /// The snapshot's lookups (built once per snapshot, on first use; the publisher builds
    /// them before any reader sees the snapshot).
    pub fn index(&self) -> &Index {
        self.index.get_or_build(self)
    }

    /// The Service with virtual IP `ip`, if any.
    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&Service> {
        self.vip(ip).map(|v| v.service)
    }

    /// The Service with virtual IP `ip` and its ready endpoints of `ip`'s family.
    pub fn vip(&self, ip: IpAddr) -> Option<VipService<'_>> {
        let vip = self.index().vips.get(&ip)?;
        let service = self.services.get(vip.claimants.first()?)?;
        Some(VipService {
            service,
            name: &vip.name,
            ready: &vip.ready,
        })
    }

    /// Workloads (on any node) running as service account `service_account` of `namespace`.
    pub fn with_identity<'a>(
        &'a self,
        namespace: &str,
        service_account: &str,
    ) -> impl Iterator<Item = &'a Workload> + 'a {
        self.index()
            .identities
            .get(namespace)
            .and_then(|by_sa| by_sa.get(service_account))
            .into_iter()
            .flatten()
            .filter_map(|key| self.workloads.get(key).map(AsRef::as_ref))
    }

    /// Workloads scheduled on `node`, in key order.
    pub fn on_node<'a>(&'a self, node: &str) -> impl Iterator<Item = &'a Workload> + 'a {
        self.index()
            .nodes
            .get(node)
            .into_iter()
            .flatten()
            .filter_map(|key| self.workloads.get(key).map(AsRef::as_ref))
    }

    /// A copy to change with [`Snapshot::put_workload`], [`Snapshot::put_service`] and their
    /// siblings, which keep the index built (a plain clone drops it, because its fields may be
    /// changed directly). Cheap: the large maps are shared until changed.
    pub fn edit(&self) -> Self {
        Self {
            workloads: self.workloads.clone(),
            namespaces: self.namespaces.clone(),
            peer_authentications: self.peer_authentications.clone(),
            authorization_policies: self.authorization_policies.clone(),
            services: self.services.clone(),
            destination_rules: self.destination_rules.clone(),
            nodes: self.nodes.clone(),
            warnings: self.warnings.clone(),
            index: self.index.copy(),
        }
    }

    /// Adds or replaces the workload keyed `w.key()`, updating the built index; the previous
    /// version, if any.
    pub fn put_workload(&mut self, w: Workload) -> Option<Arc<Workload>> {
        let key = w.key();
        let old = self.workloads.insert(key.clone(), Arc::new(w));
        self.reindex(|index, snap| index.workload_changed(snap, &key, old.as_deref()));
        old
    }

    /// Removes workload `key`, updating the built index.
    pub fn remove_workload(&mut self, key: &str) -> Option<Arc<Workload>> {
        let old = self.workloads.remove(key)?;
        self.reindex(|index, snap| index.workload_changed(snap, key, Some(&old)));
        Some(old)
    }

    /// Adds or replaces the Service keyed `s.key()`, updating the built index.
    pub fn put_service(&mut self, s: Service) -> Option<Arc<Service>> {
        let key = s.key();
        let old = self.services.insert(key.clone(), Arc::new(s));
        self.reindex(|index, snap| index.service_changed(snap, &key, old.as_deref()));
        old
    }

    /// Removes Service `key`, updating the built index.
    pub fn remove_service(&mut self, key: &str) -> Option<Arc<Service>> {
        let old = self.services.remove(key)?;
        self.reindex(|index, snap| index.service_changed(snap, key, Some(&old)));
        Some(old)
    }

    /// Replaces the AuthorizationPolicies, recompiling them in the built index.
    pub fn set_authorization_policies(
        &mut self,
        policies: Vec<crate::policy::authz::AuthorizationPolicy>,
    ) {
        self.authorization_policies = Arc::new(policies);
        self.reindex(|index, snap| {
            index.authz = Arc::new(Policies::compile(&snap.authorization_policies));
        });
    }

    /// Runs `update` on the index, if it is built (else it is built on first use).
    fn reindex(&mut self, update: impl FnOnce(&mut Index, &Snapshot)) {
        if let Some(mut index) = self.index.0.take() {
            update(&mut index, self);
            let _ = self.index.0.set(index);
        }
    }

    /// The compiled AuthorizationPolicies.
    pub fn authz(&self) -> &Policies {
        self.index().authz()
    }
}

fn ready_of_family(svc: &Service, v4: bool) -> Vec<usize> {
    svc.endpoints
        .iter()
        .enumerate()
        .filter(|(_, e)| e.ready && e.ip.is_ipv4() == v4)
        .map(|(i, _)| i)
        .collect()
}

#[cfg(test)]
mod tests;
