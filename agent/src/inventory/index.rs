//! Lookups derived from one snapshot, built once before any connection uses it: address owners, Service VIPs, workloads by identity, compiled AuthorizationPolicies.
//!
//! Both sources publish through [`super::publish::Publisher`], which builds the index before
//! the snapshot is sent, so per-connection code only looks up (hash maps, B-tree maps); it
//! never scans the inventory. A snapshot made elsewhere (tests, a first load handed over
//! directly) builds its index on first use, once.
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::OnceLock;

use super::addresses::AddressIndex;
use super::services::{Endpoint, Service};
use super::{Snapshot, Workload};
use crate::policy::authz::Policies;

/// The derived lookups of one snapshot.
#[derive(Debug, Default)]
pub struct Index {
    addresses: AddressIndex,
    /// Service virtual IP → its Service.
    vips: HashMap<IpAddr, Vip>,
    /// Namespace → service account → workloads (`namespace/name`) running as that identity.
    identities: HashMap<String, HashMap<String, Vec<String>>>,
    authz: Policies,
}

/// One virtual IP of a Service.
#[derive(Debug)]
struct Vip {
    /// Key of the Service in [`Snapshot::services`].
    service: String,
    /// `namespace/name` of the Service (its round-robin key).
    name: String,
    /// Positions in the Service's endpoints of the ready ones of this address's family (a VIP
    /// of one family balances over endpoints of that family, as kube-proxy does).
    ready: Vec<usize>,
}

impl Index {
    /// Indexes `snap`.
    pub fn build(snap: &Snapshot) -> Self {
        let mut vips = HashMap::new();
        // In key order, so that of two Services claiming one VIP the first by key wins.
        for (key, svc) in &snap.services {
            for ip in &svc.vips {
                vips.entry(*ip).or_insert_with(|| Vip {
                    service: key.clone(),
                    name: svc.key(),
                    ready: ready_of_family(svc, ip.is_ipv4()),
                });
            }
        }
        let mut identities: HashMap<String, HashMap<String, Vec<String>>> = HashMap::new();
        for (key, w) in &snap.workloads {
            identities
                .entry(w.namespace.clone())
                .or_default()
                .entry(w.service_account.clone())
                .or_default()
                .push(key.clone());
        }
        Self {
            addresses: AddressIndex::build(snap),
            vips,
            identities,
            authz: Policies::compile(&snap.authorization_policies),
        }
    }

    /// Who owns each address.
    pub fn addresses(&self) -> &AddressIndex {
        &self.addresses
    }

    /// The compiled AuthorizationPolicies.
    pub fn authz(&self) -> &Policies {
        &self.authz
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
        let service = self.services.get(&vip.service)?;
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
            .filter_map(|key| self.workloads.get(key))
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
