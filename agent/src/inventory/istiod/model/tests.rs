//! Tests of the istiod model: real messages encoded with prost, applied, and the snapshot checked (policies through ambit's own evaluation).
use std::net::IpAddr;

use ambit_proto::istio::security as sec;
use ambit_proto::istio::workload as wl;
use prost::Message;

use super::*;
use crate::inventory::Workload;
use crate::policy::authz::{ConnAttrs, Decision, Mesh as AuthzMesh};
use crate::policy::peer_auth::{self, Effective};

mod incremental;
mod policies;
const TD: &str = "cluster.local";
const ROOT: &str = "istio-system";

fn mesh() -> Mesh {
    Mesh::new(TD, ROOT)
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn ip_bytes(s: &str) -> Vec<u8> {
    match ip(s) {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

fn workload(uid: &str, ns: &str, name: &str, ips: &[&str]) -> wl::Workload {
    wl::Workload {
        uid: uid.into(),
        name: name.into(),
        namespace: ns.into(),
        addresses: ips.iter().map(|i| ip_bytes(i)).collect(),
        tunnel_protocol: wl::TunnelProtocol::Hbone.into(),
        service_account: format!("{name}-sa"),
        node: "node1".into(),
        ..wl::Workload::default()
    }
}

fn address(t: wl::address::Type) -> Vec<u8> {
    wl::Address { r#type: Some(t) }.encode_to_vec()
}

/// Applies `w` under its uid, as istiod names a Workload resource.
fn try_apply_workload(m: &mut Mesh, w: wl::Workload) -> Result<(), ModelError> {
    let uid = w.uid.clone();
    m.apply(ADDRESS_TYPE, &uid, &address(wl::address::Type::Workload(w)))
}

fn apply_workload(m: &mut Mesh, w: wl::Workload) {
    try_apply_workload(m, w).unwrap();
}

fn service(ns: &str, name: &str, vip: &str, port: u32, target: u32) -> wl::Service {
    wl::Service {
        name: name.into(),
        namespace: ns.into(),
        hostname: format!("{name}.{ns}.svc.cluster.local"),
        addresses: vec![wl::NetworkAddress {
            network: String::new(),
            address: ip_bytes(vip),
            length: None,
        }],
        ports: vec![wl::Port {
            service_port: port,
            target_port: target,
            app_protocol: 0,
        }],
        ..wl::Service::default()
    }
}

fn apply_service(m: &mut Mesh, s: wl::Service) {
    let key = format!("{}/{}", s.namespace, s.hostname);
    m.apply(ADDRESS_TYPE, &key, &address(wl::address::Type::Service(s)))
        .unwrap();
}

fn exact(s: &str) -> sec::StringMatch {
    sec::StringMatch {
        match_type: Some(sec::string_match::MatchType::Exact(s.into())),
    }
}

fn presence() -> sec::StringMatch {
    sec::StringMatch {
        match_type: Some(sec::string_match::MatchType::Presence(())),
    }
}

/// A rule of one clause per match (the clauses AND-ed).
fn rule(clauses: Vec<sec::Match>) -> sec::Rule {
    sec::Rule {
        clauses: clauses
            .into_iter()
            .map(|m| sec::Clause { matches: vec![m] })
            .collect(),
    }
}

fn policy(
    ns: &str,
    name: &str,
    scope: sec::Scope,
    action: sec::Action,
    rules: Vec<sec::Rule>,
) -> sec::Authorization {
    sec::Authorization {
        name: name.into(),
        namespace: ns.into(),
        scope: scope.into(),
        action: action.into(),
        rules,
        ..sec::Authorization::default()
    }
}

fn apply_policy(m: &mut Mesh, p: &sec::Authorization) -> Result<(), ModelError> {
    let key = format!("{}/{}", p.namespace, p.name);
    m.apply(AUTHORIZATION_TYPE, &key, &p.encode_to_vec())
}

/// A connection to port `port` from `ns/sa` over mTLS, or plaintext when `None`.
fn conn(peer: Option<(&str, &str)>, port: u16) -> ConnAttrs {
    ConnAttrs {
        peer: peer.map(|(ns, sa)| format!("spiffe://{TD}/ns/{ns}/sa/{sa}").parse().unwrap()),
        src_ip: ip("10.9.0.9"),
        dst_port: port,
        dst_ip: ip("10.1.0.2"),
    }
}

/// ambit's decision for a connection to workload `key` of `snap`.
fn decide(snap: &Snapshot, key: &str, c: &ConnAttrs) -> Decision {
    let w = &snap.workloads[key];
    snap.index()
        .authz()
        .evaluate(&AuthzMesh::new(ROOT, TD), &w.namespace, &w.labels, c)
}

#[test]
fn a_workload_becomes_an_inventory_workload_and_hbone_makes_it_a_mesh_destination() {
    let mut m = mesh();
    apply_workload(
        &mut m,
        workload(
            "c1/Pod/shop/server",
            "shop",
            "server",
            &["10.1.0.2", "fd00::2"],
        ),
    );
    let mut plain = workload("c1/Pod/shop/legacy", "shop", "legacy", &["10.1.0.3"]);
    plain.tunnel_protocol = wl::TunnelProtocol::None.into();
    plain.service_account = String::new();
    apply_workload(&mut m, plain);
    let mut wp = workload("c1/Pod/shop/waypoint", "shop", "waypoint", &["10.1.0.4"]);
    wp.native_tunnel = true;
    apply_workload(&mut m, wp);
    let snap = m.snapshot();
    let w = &snap.workloads["shop/server"];
    assert_eq!((w.name.as_str(), w.namespace.as_str()), ("server", "shop"));
    assert_eq!(
        (w.service_account.as_str(), w.node.as_str()),
        ("server-sa", "node1")
    );
    assert_eq!(w.ips, [ip("10.1.0.2"), ip("fd00::2")]);
    assert!(w.enrolled);
    assert_eq!(
        w.enrollment.to_string(),
        "enrolled by pod label istio.io/dataplane-mode=ambient"
    );
    assert_eq!(
        w.spiffe_id(TD),
        "spiffe://cluster.local/ns/shop/sa/server-sa"
    );
    assert_eq!(
        snap.by_ip(ip("fd00::2")).map(Workload::key),
        Some("shop/server".into())
    );
    let legacy = &snap.workloads["shop/legacy"];
    assert!(!legacy.enrolled);
    assert_eq!(legacy.service_account, "default");
    assert!(
        !snap.workloads["shop/waypoint"].enrolled,
        "a native-tunnel workload is never captured"
    );
    assert_eq!(snap.on_node("node1").count(), 3);
}

#[test]
fn a_service_gets_its_vips_ports_and_the_workloads_naming_it_as_endpoints() {
    let mut m = mesh();
    apply_service(&mut m, service("shop", "web", "10.96.0.10", 80, 8080));
    let key = "shop/web.shop.svc.cluster.local".to_string();
    let mut a = workload("uid-a", "shop", "web-a", &["10.1.0.2"]);
    a.services.insert(
        key.clone(),
        wl::PortList {
            ports: vec![wl::Port {
                service_port: 80,
                target_port: 9090,
                app_protocol: 0,
            }],
        },
    );
    let mut b = workload("uid-b", "shop", "web-b", &["10.1.0.3"]);
    b.services.insert(key.clone(), wl::PortList::default());
    b.status = wl::WorkloadStatus::Unhealthy.into();
    apply_workload(&mut m, a);
    apply_workload(&mut m, b);
    apply_workload(&mut m, workload("uid-c", "shop", "other", &["10.1.0.4"]));
    let snap = m.snapshot();
    let svc = &snap.services["shop/web"];
    assert_eq!((svc.name.as_str(), svc.namespace.as_str()), ("web", "shop"));
    assert_eq!(svc.vips, [ip("10.96.0.10")]);
    let eps: Vec<(IpAddr, bool, Option<u16>)> = svc
        .endpoints
        .iter()
        .map(|e| (e.ip, e.ready, svc.target_port(80, e)))
        .collect();
    // a overrides the target port; b takes the Service's; c is no endpoint.
    assert_eq!(
        eps,
        [
            (ip("10.1.0.2"), true, Some(9090)),
            (ip("10.1.0.3"), false, Some(8080))
        ]
    );
    // One workload leaving takes only its endpoint with it.
    assert!(m.remove(ADDRESS_TYPE, "uid-a"));
    let snap = m.snapshot();
    let ips: Vec<IpAddr> = snap.services["shop/web"]
        .endpoints
        .iter()
        .map(|e| e.ip)
        .collect();
    assert_eq!(ips, [ip("10.1.0.3")]);
    assert!(!snap.workloads.contains_key("shop/web-a"));
    assert!(!m.remove(ADDRESS_TYPE, "uid-a"), "removed twice");
}

#[test]
fn a_malformed_resource_is_refused_with_its_field_and_the_previous_version_stays() {
    let mut m = mesh();
    apply_workload(&mut m, workload("uid-s", "shop", "server", &["10.1.0.2"]));
    let mut bad = workload("uid-s", "shop", "server", &[]);
    bad.addresses = vec![vec![10, 1, 0, 9, 9]];
    let err = try_apply_workload(&mut m, bad).unwrap_err();
    assert_eq!(
        err.to_string(),
        "Workload uid-s: addresses[0]: 5 bytes is not an IPv4 (4 bytes) or IPv6 (16 bytes) address"
    );
    let err = m
        .apply(ADDRESS_TYPE, "uid-s", b"\xff\xff\xff garbage")
        .unwrap_err();
    assert!(matches!(err, ModelError::Decode { .. }), "{err:?}");
    assert!(
        err.to_string()
            .starts_with("Address uid-s: cannot decode: "),
        "{err}"
    );
    let snap = m.snapshot();
    assert_eq!(snap.workloads["shop/server"].ips, [ip("10.1.0.2")]);

    // A policy with an address of bad length: refused, the old one still denies.
    let deny = |len: usize| {
        policy(
            "shop",
            "deny-ips",
            sec::Scope::Namespace,
            sec::Action::Deny,
            vec![rule(vec![sec::Match {
                source_ips: vec![sec::Address {
                    address: vec![10; len],
                    length: 8,
                }],
                ..sec::Match::default()
            }])],
        )
    };
    apply_policy(&mut m, &deny(4)).unwrap();
    let err = apply_policy(&mut m, &deny(3)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "Authorization shop/deny-ips: rules[0].clauses[0].matches[0].source_ips[0]: 3 bytes is \
         not an IPv4 (4 bytes) or IPv6 (16 bytes) address"
    );
    let snap = m.snapshot();
    assert!(!decide(&snap, "shop/server", &conn(Some(("a", "b")), 80)).allowed());
}

#[test]
fn an_unknown_tunnel_protocol_is_refused() {
    let mut m = mesh();
    let mut w = workload("uid-s", "shop", "server", &["10.1.0.2"]);
    w.tunnel_protocol = 7;
    let err = try_apply_workload(&mut m, w).unwrap_err();
    assert_eq!(
        err.to_string(),
        "Workload uid-s: tunnel_protocol: unknown value 7"
    );
    assert!(m.snapshot().workloads.is_empty());
}

#[test]
fn what_ambit_cannot_express_is_refused_not_widened() {
    let mut m = mesh();
    let mut dns = workload("uid-d", "shop", "ext", &[]);
    dns.hostname = "db.example.com".into();
    let err = try_apply_workload(&mut m, dns).unwrap_err();
    assert!(
        matches!(err, ModelError::Unsupported { .. }) && err.to_string().contains("hostname"),
        "{err}"
    );

    let global = policy("shop", "g", sec::Scope::Global, sec::Action::Deny, vec![]);
    let err = apply_policy(&mut m, &global).unwrap_err();
    assert!(
        err.to_string().contains("GLOBAL in namespace shop"),
        "{err}"
    );

    // Alternatives of a source or a port: no ambit rule says that.
    let mixed = policy(
        "shop",
        "mixed",
        sec::Scope::Namespace,
        sec::Action::Allow,
        vec![sec::Rule {
            clauses: vec![sec::Clause {
                matches: vec![
                    sec::Match {
                        namespaces: vec![exact("a")],
                        ..sec::Match::default()
                    },
                    sec::Match {
                        destination_ports: vec![80],
                        ..sec::Match::default()
                    },
                ],
            }],
        }],
    );
    let err = apply_policy(&mut m, &mixed).unwrap_err();
    assert_eq!(
        err.to_string(),
        "Authorization shop/mixed: rules[0].clauses[0]: alternatives mixing sources, ports and \
         destination addresses: ambit's model cannot express it"
    );
    assert!(m.snapshot().authorization_policies.is_empty());
}

#[test]
fn a_waypoint_binds_by_label_and_an_unknown_one_refuses_rather_than_bypasses() {
    let mut m = mesh();
    apply_service(&mut m, service("shop", "wp", "10.96.0.20", 15008, 15008));
    let mut w = workload("uid-s", "shop", "server", &["10.1.0.2"]);
    w.waypoint = Some(wl::GatewayAddress {
        destination: Some(wl::gateway_address::Destination::Hostname(
            wl::NamespacedHostname {
                namespace: "shop".into(),
                hostname: "wp.shop.svc.cluster.local".into(),
            },
        )),
        hbone_mtls_port: 15008,
    });
    let mut lost = w.clone();
    lost.uid = "uid-l".into();
    lost.name = "lost".into();
    lost.waypoint = Some(wl::GatewayAddress {
        destination: Some(wl::gateway_address::Destination::Hostname(
            wl::NamespacedHostname {
                namespace: "shop".into(),
                hostname: "gone.shop.svc.cluster.local".into(),
            },
        )),
        hbone_mtls_port: 0,
    });
    apply_workload(&mut m, w);
    apply_workload(&mut m, lost);
    let snap = m.snapshot();
    let wp = snap
        .waypoint_of_workload(&snap.workloads["shop/server"])
        .unwrap();
    assert_eq!(wp.key(), "shop/wp");
    let gone = snap
        .waypoint_of_workload(&snap.workloads["shop/lost"])
        .unwrap();
    let err = snap
        .waypoint_endpoint(&gone, ip("10.1.0.2"), TD, |_, _| 0)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "waypoint shop/gone.shop.svc.cluster.local has no Service"
    );
}

#[test]
fn workloads_sharing_a_name_both_stay_and_a_nameless_one_is_named_by_uid() {
    let mut m = mesh();
    apply_workload(
        &mut m,
        workload("c1/Pod/shop/web", "shop", "web", &["10.1.0.2"]),
    );
    apply_workload(
        &mut m,
        workload("c2/Pod/shop/web", "shop", "web", &["10.2.0.2"]),
    );
    apply_workload(&mut m, workload("vm-7", "shop", "", &["10.3.0.2"]));
    let snap = m.snapshot();
    let keys: Vec<&str> = snap.workloads.keys().map(String::as_str).collect();
    assert_eq!(keys, ["shop/vm-7", "shop/web", "shop/web@c2_Pod_shop_web"]);
    assert!(snap
        .warnings
        .iter()
        .any(|w| w.contains("listed as web@c2_Pod_shop_web")));
    assert_eq!(
        snap.by_ip(ip("10.2.0.2")).map(|w| w.name.as_str()),
        Some("web@c2_Pod_shop_web")
    );
}

#[test]
fn a_workload_listing_a_policy_of_a_third_namespace_is_refused() {
    let mut m = mesh();
    let mut w = workload("uid-s", "shop", "server", &["10.1.0.2"]);
    w.authorization_policies = vec!["other/p".into(), format!("{ROOT}/p")];
    let err = try_apply_workload(&mut m, w).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("Workload uid-s: authorization_policies[0]: `other/p`"),
        "{err}"
    );
}

#[test]
fn only_a_plain_kubernetes_uid_is_matched_against_the_cni_plugins_reports() {
    let mut m = mesh();
    apply_workload(
        &mut m,
        workload("3f2a-uid", "default", "plain", &["10.1.0.2"]),
    );
    let istio_form = "Kubernetes//Pod/default/named";
    apply_workload(
        &mut m,
        workload(istio_form, "default", "named", &["10.1.0.3"]),
    );
    let snap = m.snapshot();
    assert!(snap.workloads.contains_key("default/named"), "{snap:?}");
    assert_eq!(m.uid_of("default/plain"), Some("3f2a-uid"));
    assert_eq!(m.uid_of("default/named"), None);
}

#[test]
fn a_pod_whose_address_istiod_does_not_know_yet_is_kept_without_one() {
    // istiod may list a pod before kubelet reports its IP; the CNI plugin's report fills it in.
    let mut m = mesh();
    apply_workload(&mut m, workload("uid-n", "shop", "new", &[]));
    let snap = m.snapshot();
    let w = &snap.workloads["shop/new"];
    assert!(w.ips.is_empty() && w.enrolled, "{w:?}");
}
