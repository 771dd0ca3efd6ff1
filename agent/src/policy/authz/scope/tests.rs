//! Which policies the node proxy applies: targeted ones, AUDIT and CUSTOM are left out (as
//! istiod leaves them out of what it sends ztunnel), each with its reason; scopes Istio refuses
//! are refused at load.
use std::collections::BTreeMap;

use super::super::{validate, AuthorizationPolicy, ConnAttrs, Decision, Mesh, Policies};
use super::{NotForNodeProxy, TargetRef};

const MESH: Mesh<'static> = Mesh::new("istio-system", "cluster.local");

/// A policy in `shop` from its spec's YAML (unvalidated).
fn policy(name: &str, spec: &str) -> AuthorizationPolicy {
    let text = format!(
        "metadata:\n  name: {name}\n  namespace: shop\nspec:\n{}",
        spec.lines().map(|l| format!("  {l}\n")).collect::<String>()
    );
    crate::yaml::from_str(&text).unwrap()
}

fn client() -> ConnAttrs {
    ConnAttrs {
        peer: Some("spiffe://cluster.local/ns/shop/sa/client".parse().unwrap()),
        src_ip: "10.1.0.2".parse().unwrap(),
        dst_port: 8080,
        dst_ip: "10.2.0.2".parse().unwrap(),
    }
}

/// The node proxy's decision for the client -> the `app: server` pod in `shop`.
fn decide(ps: &[AuthorizationPolicy]) -> Decision {
    let labels = BTreeMap::from([("app".to_string(), "server".to_string())]);
    Policies::compile(ps).evaluate(&MESH, "shop", &labels, &client())
}

const DENY_ALL: &str = "action: DENY\nrules:\n- {}";

#[test]
fn a_deny_all_with_target_refs_is_not_applied_and_the_same_with_a_selector_or_none_is() {
    let targeted = policy(
        "deny-all",
        &format!("targetRefs:\n- {{kind: Service, group: \"\", name: server}}\n{DENY_ALL}"),
    );
    validate(&targeted).unwrap();
    assert_eq!(
        targeted.not_for_node_proxy(),
        Some(NotForNodeProxy::Targeted(vec![TargetRef {
            kind: "Service".into(),
            name: "server".into(),
            ..TargetRef::default()
        }]))
    );
    assert_eq!(
        decide(std::slice::from_ref(&targeted)),
        Decision::Allow { policy: None }
    );
    let compiled = Policies::compile(std::slice::from_ref(&targeted));
    assert!(compiled.failures().is_empty(), "left out, not failed");

    // The same policy with a selector, or namespace-wide, denies: the check above can see a DENY.
    let selected = policy(
        "deny-all",
        &format!("selector:\n  matchLabels: {{app: server}}\n{DENY_ALL}"),
    );
    let namespace_wide = policy("deny-all", DENY_ALL);
    for p in [selected, namespace_wide] {
        validate(&p).unwrap();
        assert_eq!(p.not_for_node_proxy(), None);
        assert_eq!(
            decide(&[p]),
            Decision::Denied {
                policy: "shop/deny-all".into()
            }
        );
    }
}

#[test]
fn an_l7_allow_for_a_waypoint_does_not_close_the_namespace() {
    // The case that took a namespace down: an ALLOW by path written for the waypoint (no L4
    // rule could ever match it) made every connection need an ALLOW.
    let for_waypoint =
        "targetRef: {kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}\n\
                        rules:\n- to:\n  - operation:\n      paths: [\"/api\"]";
    let p = policy("paths", for_waypoint);
    validate(&p).unwrap();
    assert_eq!(
        p.not_for_node_proxy().map(|n| n.to_string()).as_deref(),
        Some("targetRefs: Gateway/waypoint")
    );
    assert!(decide(&[p]).allowed());
    // Without the target it is the node proxy's, and no L4 rule matches: not allowed.
    let p = policy(
        "paths",
        "rules:\n- to:\n  - operation:\n      paths: [\"/api\"]",
    );
    assert_eq!(decide(&[p]), Decision::NotAllowed);
}

#[test]
fn every_target_is_named_target_ref_first() {
    let p = policy(
        "two",
        "targetRefs:\n- {kind: Service, name: web}\n- {kind: ServiceEntry, group: networking.istio.io, name: ext}",
    );
    assert_eq!(
        p.not_for_node_proxy().unwrap().to_string(),
        "targetRefs: Service/web, ServiceEntry/ext"
    );
    let single = policy("one", "targetRef: {kind: Gateway, name: gw}");
    assert_eq!(
        single.not_for_node_proxy().unwrap().to_string(),
        "targetRefs: Gateway/gw"
    );
}

#[test]
fn audit_and_custom_are_not_the_node_proxys_and_an_allow_beside_them_still_decides() {
    for (action, word) in [("AUDIT", "AUDIT"), ("CUSTOM", "CUSTOM")] {
        let p = policy(
            "side",
            &format!("action: {action}\nprovider: {{name: ext}}\nrules:\n- {{}}"),
        );
        validate(&p).unwrap();
        let why = p.not_for_node_proxy().unwrap();
        assert!(why.to_string().contains(word), "{why}");
        assert!(
            why.to_string().contains("ztunnel"),
            "says what ztunnel does: {why}"
        );
        // Alone it decides nothing (CUSTOM used to deny everything here).
        assert_eq!(
            decide(std::slice::from_ref(&p)),
            Decision::Allow { policy: None },
            "{action}"
        );
        // Beside an ALLOW that does not match, the ALLOW still decides: not allowed.
        let allow_other = policy(
            "only-other",
            "rules:\n- from:\n  - source:\n      principals: [cluster.local/ns/shop/sa/other]",
        );
        assert_eq!(decide(&[p, allow_other]), Decision::NotAllowed, "{action}");
    }
}

#[test]
fn the_targets_are_named_before_the_action() {
    // As in istiod: a targeted policy is the waypoint's whatever its action.
    let p = policy(
        "custom-targeted",
        "targetRefs:\n- {kind: Gateway, name: waypoint}\naction: CUSTOM\nprovider: {name: ext}",
    );
    assert!(matches!(
        p.not_for_node_proxy(),
        Some(NotForNodeProxy::Targeted(_))
    ));
}

#[test]
fn scopes_istio_refuses_are_refused_at_load_with_the_field() {
    let cases = [
        (
            "selector:\n  matchLabels: {app: server}\ntargetRefs:\n- {kind: Service, name: server}",
            "spec",
        ),
        (
            "targetRef: {kind: Service, name: a}\ntargetRefs:\n- {kind: Service, name: b}",
            "spec",
        ),
        ("targetRefs:\n- {kind: Service}", "spec.targetRefs[0].name"),
        (
            "targetRefs:\n- {kind: Service, name: a}\n- {name: b}",
            "spec.targetRefs[1].kind",
        ),
        ("targetRef: {name: a}", "spec.targetRef.kind"),
    ];
    for (spec, field) in cases {
        let p = policy("bad", &format!("{spec}\n{DENY_ALL}"));
        let (at, message) = validate(&p).unwrap_err();
        assert_eq!(at, field, "{spec}: {message}");
    }
    // The check can pass: one target with a kind and a name loads.
    validate(&policy("good", "targetRefs:\n- {kind: Service, name: a}")).unwrap();
}

#[test]
fn the_mesh_of_a_decision_is_the_configs_trust_domain_aliases_and_root_namespace() {
    let cfg = crate::config::Config::parse(
        std::path::Path::new("a.yaml"),
        "node: n1\ninventory: /x\ntrustDomain: new.example\ntrustDomainAliases: [old.example]\nrootNamespace: mesh-root\n",
    )
    .unwrap();
    let mesh = cfg.authz_mesh();
    assert_eq!(mesh.root_namespace, "mesh-root");
    assert_eq!(
        mesh.trust_domains().collect::<Vec<_>>(),
        ["new.example", "old.example"]
    );
}
