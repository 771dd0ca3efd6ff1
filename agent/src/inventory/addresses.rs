//! Who owns each pod address of a snapshot: one owner, or an ambiguity the routing refuses.
//!
//! Several Pod objects can list one address: a finished or stale object after the address was
//! handed to a new pod, a pod being deleted while its successor starts, host-network pods (the
//! node's own address). The index is built once per snapshot; the rules, in order:
//! 1. Finished pods (`Succeeded`, `Failed`) are not in the snapshot at all (both sources drop
//!    them), and host-network pods never own an address.
//! 2. A pod being deleted yields to any live claimant. Alone it keeps its address: its sandbox
//!    still holds it while it terminates, and peers must keep tunnelling to it.
//! 3. A claimant on a node whose pod ranges (Node `spec.podCIDRs`) contain the address beats
//!    the others; a claimant on a node whose ranges are known and do not contain it loses.
//! 4. The newest pod (creation time) wins, when every remaining claimant has one and one is
//!    strictly newer than the rest.
//! 5. Otherwise no pod owns the address: it is ambiguous. The routing refuses connections to
//!    it when any claimant is enrolled (its identity cannot be decided, and plaintext could be a
//!    downgrade); the kernel keeps capturing it (an enrolled claimant lists it).
//!
//! Each rule only narrows the claimants when it leaves at least one.
use std::collections::HashMap;
use std::net::IpAddr;

use serde::Serialize;

use super::{Snapshot, Workload};

/// Which rule decided a contested address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    /// The only claimant not being deleted.
    LiveOverDeleting,
    /// The only claimant on a node routing the address.
    RoutingNode,
    /// The newest claimant.
    Newest,
    /// No rule decides: the address has no owner.
    Undecided,
}

impl Rule {
    /// How the rule reads in logs and `explain`.
    pub fn describe(self) -> &'static str {
        match self {
            Self::LiveOverDeleting => "the others are being deleted",
            Self::RoutingNode => "it is on the node whose pod range holds the address",
            Self::Newest => "it is the newest",
            Self::Undecided => {
                "none is being deleted, on another node's pod range, or older than the others"
            }
        }
    }
}

/// An address several pods claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Conflict {
    /// The address.
    pub ip: IpAddr,
    /// Every pod listing it (`namespace/name`), sorted.
    pub claimants: Vec<String>,
    /// The pod that owns it, or `None` when the claims cannot be decided.
    pub owner: Option<String>,
    /// The rule that decided (or [`Rule::Undecided`]).
    pub rule: Rule,
}

impl Conflict {
    /// One line for logs and routing steps.
    pub fn describe(&self) -> String {
        let who = self.claimants.join(" and ");
        match &self.owner {
            Some(o) => format!(
                "{} is claimed by {who}: {o} owns it ({})",
                self.ip,
                self.rule.describe()
            ),
            None => format!(
                "{} is claimed by {who} and no rule decides which pod holds it ({})",
                self.ip,
                self.rule.describe()
            ),
        }
    }
}

/// What a snapshot says about one address.
#[derive(Debug, Clone, Copy)]
pub enum Claim<'a> {
    /// One pod owns it (alone, or by a rule).
    Owner(&'a Workload),
    /// Several pods claim it and no rule decides.
    Ambiguous(&'a Conflict),
    /// No pod claims it.
    Unclaimed,
}

/// Who owns each address of one snapshot. Persistent maps: a copy shares them, and
/// [`AddressIndex::update`] changes only the addresses one workload touches.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddressIndex {
    /// Address → owner (`namespace/name`), for addresses with one claimant or a decided one.
    owners: imbl::HashMap<IpAddr, String>,
    /// Addresses with several claimants.
    conflicts: imbl::OrdMap<IpAddr, Conflict>,
}

impl AddressIndex {
    /// Indexes the addresses of `snap`'s workloads.
    pub fn build(snap: &Snapshot) -> Self {
        let mut claims: HashMap<IpAddr, Vec<&str>> = HashMap::with_capacity(snap.workloads.len());
        for (key, w) in &snap.workloads {
            for ip in claimed(w) {
                claims.entry(*ip).or_default().push(key);
            }
        }
        let mut index = Self::default();
        for (ip, keys) in claims {
            index.settle(snap, ip, keys.into_iter().map(str::to_owned).collect());
        }
        index
    }

    /// Re-decides the addresses workload `key` claimed as `old` and claims in `snap` (which
    /// already holds its new version, or none when it was removed).
    pub fn update(&mut self, snap: &Snapshot, key: &str, old: Option<&Workload>) {
        let new = snap.workloads.get(key).map(AsRef::as_ref);
        let mut touched: Vec<IpAddr> = old.map(claimed).unwrap_or_default().to_vec();
        touched.extend(new.map(claimed).unwrap_or_default());
        touched.sort_unstable();
        touched.dedup();
        for ip in touched {
            let mut keys: Vec<String> = match self.conflicts.get(&ip) {
                Some(c) => c.claimants.clone(),
                None => self.owners.get(&ip).cloned().into_iter().collect(),
            };
            keys.retain(|k| k != key);
            if new.is_some_and(|w| claimed(w).contains(&ip)) {
                keys.push(key.to_owned());
            }
            self.settle(snap, ip, keys);
        }
    }

    /// Records `ip`'s owner among `keys` (its claimants in `snap`).
    fn settle(&mut self, snap: &Snapshot, ip: IpAddr, mut keys: Vec<String>) {
        self.conflicts.remove(&ip);
        match keys.len() {
            0 => {
                self.owners.remove(&ip);
            }
            1 => {
                self.owners.insert(ip, keys.remove(0));
            }
            _ => {
                keys.sort();
                let claimants: Vec<&Workload> = keys
                    .iter()
                    .filter_map(|k| snap.workloads.get(k).map(AsRef::as_ref))
                    .collect();
                let (owner, rule) = decide(snap, ip, &claimants);
                match &owner {
                    Some(o) => self.owners.insert(ip, o.clone()),
                    None => self.owners.remove(&ip),
                };
                let conflict = Conflict {
                    ip,
                    claimants: keys,
                    owner,
                    rule,
                };
                self.conflicts.insert(ip, conflict);
            }
        }
    }

    /// The owner (`namespace/name`) of `ip`, if one pod owns it.
    pub fn owner(&self, ip: IpAddr) -> Option<&str> {
        self.owners.get(&ip).map(String::as_str)
    }

    /// The conflict over `ip`, if several pods claim it (decided or not).
    pub fn conflict(&self, ip: IpAddr) -> Option<&Conflict> {
        self.conflicts.get(&ip)
    }

    /// Every contested address, in address order.
    pub fn conflicts(&self) -> impl Iterator<Item = &Conflict> {
        self.conflicts.values()
    }

    /// The contested addresses no rule decides.
    pub fn ambiguous(&self) -> impl Iterator<Item = &Conflict> {
        self.conflicts.values().filter(|c| c.owner.is_none())
    }
}

/// The addresses `w` claims (none for a host-network pod).
fn claimed(w: &Workload) -> &[IpAddr] {
    if w.host_network {
        &[]
    } else {
        &w.ips
    }
}

/// Applies rules 2-4 to the claimants of `ip`.
fn decide(snap: &Snapshot, ip: IpAddr, claimants: &[&Workload]) -> (Option<String>, Rule) {
    let mut left: Vec<&Workload> = claimants.to_vec();
    let mut rule = Rule::Undecided;
    let mut narrow = |left: &mut Vec<&Workload>, keep: &dyn Fn(&Workload) -> bool, by: Rule| {
        let kept: Vec<&Workload> = left.iter().copied().filter(|w| keep(w)).collect();
        if !kept.is_empty() && kept.len() < left.len() {
            *left = kept;
            rule = by;
        }
    };
    narrow(&mut left, &|w| !w.deleting, Rule::LiveOverDeleting);
    let routes = |w: &Workload| -> Option<bool> {
        let ranges = snap.nodes.get(&w.node).filter(|r| !r.is_empty())?;
        Some(ranges.iter().any(|r| r.contains(&ip)))
    };
    if left.iter().any(|w| routes(w) == Some(true)) {
        narrow(&mut left, &|w| routes(w) == Some(true), Rule::RoutingNode);
    } else {
        narrow(&mut left, &|w| routes(w) != Some(false), Rule::RoutingNode);
    }
    if left.len() > 1 {
        if let Some(created) = left.iter().map(|w| w.created).collect::<Option<Vec<_>>>() {
            let newest = created.iter().max().copied();
            if created.iter().filter(|c| Some(**c) == newest).count() == 1 {
                narrow(&mut left, &|w| w.created == newest, Rule::Newest);
            }
        }
    }
    match left.as_slice() {
        [one] => (Some(one.key()), rule),
        _ => (None, Rule::Undecided),
    }
}

#[cfg(test)]
mod tests;
