//! The synthetic mesh the bench's fake istiod serves: workloads, Services and Authorizations as istiod encodes them, named deterministically from an id.
//!
//! Workload `i` is pod `pod-<i>` in namespace `ns-<i % namespaces>`, on node
//! `node-<i % nodes>`, member of Service `svc-<i % services>` (whose namespace is the same,
//! because `services` is a multiple of `namespaces`), HBONE, with one unique IPv4 address.
use std::net::Ipv4Addr;

use ambit_proto::istio::security as sec;
use ambit_proto::istio::workload as wl;
use prost::Message as _;

/// The shape of the mesh.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Shape {
    /// Workloads at the start.
    pub(crate) workloads: u32,
    /// Nodes they are spread over.
    pub(crate) nodes: u32,
    /// Namespaces (one per 300 workloads, at least 1).
    pub(crate) namespaces: u32,
    /// Services (one per 30 workloads, a multiple of `namespaces`).
    pub(crate) services: u32,
    /// Namespace-scoped ALLOW Authorizations.
    pub(crate) authorizations: u32,
}

impl Shape {
    /// `workloads` on `nodes`, with the bench's ratios.
    pub(crate) fn new(workloads: u32, nodes: u32) -> Self {
        let namespaces = (workloads / 300).max(1);
        let services = (workloads / 30).max(1).div_ceil(namespaces) * namespaces;
        Self {
            workloads,
            nodes: nodes.max(1),
            namespaces,
            services,
            authorizations: 100,
        }
    }

    /// The node this bench's agent serves.
    pub(crate) fn local_node() -> &'static str {
        "node-0"
    }

    fn namespace(&self, id: u32) -> String {
        format!("ns-{}", id % self.namespaces)
    }

    /// The inventory key of workload `id` (`namespace/name`, as the snapshot keys it).
    pub(crate) fn key(&self, id: u32) -> String {
        format!("{}/pod-{id}", self.namespace(id))
    }

    /// istiod's uid of workload `id`, its resource name.
    pub(crate) fn uid(&self, id: u32) -> String {
        format!("Kubernetes//Pod/{}/pod-{id}", self.namespace(id))
    }

    /// The Address resource of workload `id` at `ip`.
    pub(crate) fn workload(&self, id: u32, ip: Ipv4Addr) -> Vec<u8> {
        let ns = self.namespace(id);
        let svc = id % self.services;
        let mut services = std::collections::HashMap::new();
        services.insert(
            format!("{ns}/{}", hostname(svc, &ns)),
            wl::PortList {
                ports: vec![wl::Port {
                    service_port: 80,
                    target_port: 8080,
                    app_protocol: 0,
                }],
            },
        );
        let w = wl::Workload {
            uid: self.uid(id),
            name: format!("pod-{id}"),
            namespace: ns,
            addresses: vec![ip.octets().to_vec()],
            tunnel_protocol: wl::TunnelProtocol::Hbone.into(),
            service_account: format!("sa-{svc}"),
            node: format!("node-{}", id % self.nodes),
            canonical_name: format!("app-{svc}"),
            canonical_revision: "v1".into(),
            workload_name: format!("app-{svc}"),
            cluster_id: "Kubernetes".into(),
            services,
            ..wl::Workload::default()
        };
        wl::Address {
            r#type: Some(wl::address::Type::Workload(w)),
        }
        .encode_to_vec()
    }

    /// The Services: resource name (`namespace/hostname`) and Address, each with one VIP
    /// (172.16.0.0/12) and port 80 → 8080.
    pub(crate) fn services(&self) -> Vec<(String, Vec<u8>)> {
        (0..self.services)
            .map(|s| {
                let ns = format!("ns-{}", s % self.namespaces);
                let host = hostname(s, &ns);
                let vip = Ipv4Addr::from(u32::from(Ipv4Addr::new(172, 16, 0, 0)) + s);
                let svc = wl::Service {
                    name: format!("svc-{s}"),
                    namespace: ns.clone(),
                    hostname: host.clone(),
                    addresses: vec![wl::NetworkAddress {
                        network: String::new(),
                        address: vip.octets().to_vec(),
                        length: None,
                    }],
                    ports: vec![wl::Port {
                        service_port: 80,
                        target_port: 8080,
                        app_protocol: 0,
                    }],
                    ..wl::Service::default()
                };
                let value = wl::Address {
                    r#type: Some(wl::address::Type::Service(svc)),
                }
                .encode_to_vec();
                (format!("{ns}/{host}"), value)
            })
            .collect()
    }

    /// The Authorizations: resource name (`namespace/name`) and message; each ALLOWs its
    /// namespace's workloads from two service accounts of the same namespace.
    pub(crate) fn authorizations(&self) -> Vec<(String, Vec<u8>)> {
        (0..self.authorizations)
            .map(|a| {
                let ns_id = a % self.namespaces;
                let ns = format!("ns-{ns_id}");
                let principal = |k: u32| sec::StringMatch {
                    match_type: Some(sec::string_match::MatchType::Exact(format!(
                        "cluster.local/ns/{ns}/sa/sa-{}",
                        ns_id + k * self.namespaces
                    ))),
                };
                let p = sec::Authorization {
                    name: format!("allow-{a}"),
                    namespace: ns.clone(),
                    scope: sec::Scope::Namespace.into(),
                    action: sec::Action::Allow.into(),
                    rules: vec![sec::Rule {
                        clauses: vec![sec::Clause {
                            matches: vec![sec::Match {
                                principals: vec![principal(0), principal(1)],
                                ..sec::Match::default()
                            }],
                        }],
                    }],
                    ..sec::Authorization::default()
                };
                (format!("{ns}/allow-{a}"), p.encode_to_vec())
            })
            .collect()
    }
}

/// The `n`-th unique workload address (10.0.0.0/8 from 10.0.0.1 on).
pub(crate) fn workload_ip(n: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 0, 0, 0)) + 1 + n)
}

fn hostname(svc: u32, ns: &str) -> String {
    format!("svc-{svc}.{ns}.svc.cluster.local")
}

/// A small deterministic generator (xorshift64*): the same run gets the same changes.
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    /// Seeded with `seed` (not zero).
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    /// A number below `n` (`n` > 0).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}
