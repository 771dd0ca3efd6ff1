//! Tests of the istiod model's policies: Authorizations applied and decided by ambit's own evaluation, istiod's STRICT forms, dry runs.
use super::*;
use crate::inventory::istiod::authorization::STATIC_STRICT;

#[test]
fn a_namespace_deny_denies_the_named_principal_and_no_other() {
    let mut m = mesh();
    apply_workload(&mut m, workload("uid-s", "shop", "server", &["10.1.0.2"]));
    let deny = policy(
        "shop",
        "deny-bad",
        sec::Scope::Namespace,
        sec::Action::Deny,
        vec![rule(vec![sec::Match {
            principals: vec![exact("cluster.local/ns/bad/sa/x")],
            ..sec::Match::default()
        }])],
    );
    apply_policy(&mut m, &deny).unwrap();
    let snap = m.snapshot();
    assert_eq!(
        decide(&snap, "shop/server", &conn(Some(("bad", "x")), 8080)),
        Decision::Denied {
            policy: "shop/deny-bad".into()
        }
    );
    assert_eq!(
        decide(&snap, "shop/server", &conn(Some(("good", "x")), 8080)),
        Decision::Allow { policy: None }
    );
    // Removed: the principal is allowed again.
    assert!(m.remove(AUTHORIZATION_TYPE, "shop/deny-bad"));
    let snap = m.snapshot();
    assert!(decide(&snap, "shop/server", &conn(Some(("bad", "x")), 8080)).allowed());
}

#[test]
fn a_selector_allow_applies_to_the_workloads_listing_it_only() {
    let mut m = mesh();
    let mut selected = workload("uid-s", "shop", "server", &["10.1.0.2"]);
    selected.authorization_policies = vec!["shop/allow-front".into()];
    apply_workload(&mut m, selected);
    apply_workload(&mut m, workload("uid-o", "shop", "other", &["10.1.0.3"]));
    let allow = policy(
        "shop",
        "allow-front",
        sec::Scope::WorkloadSelector,
        sec::Action::Allow,
        vec![rule(vec![
            sec::Match {
                namespaces: vec![sec::StringMatch {
                    match_type: Some(sec::string_match::MatchType::Prefix("front".into())),
                }],
                ..sec::Match::default()
            },
            sec::Match {
                destination_ports: vec![8080],
                ..sec::Match::default()
            },
        ])],
    );
    apply_policy(&mut m, &allow).unwrap();
    let snap = m.snapshot();
    let from_front = conn(Some(("frontend", "web")), 8080);
    assert_eq!(
        decide(&snap, "shop/server", &from_front),
        Decision::Allow {
            policy: Some("shop/allow-front".into())
        }
    );
    assert_eq!(
        decide(&snap, "shop/server", &conn(Some(("batch", "job")), 8080)),
        Decision::NotAllowed
    );
    assert_eq!(
        decide(&snap, "shop/server", &conn(Some(("frontend", "web")), 9090)),
        Decision::NotAllowed
    );
    assert_eq!(
        decide(&snap, "shop/server", &conn(None, 8080)),
        Decision::NotAllowed
    );
    assert_eq!(
        decide(&snap, "shop/other", &conn(Some(("batch", "job")), 8080)),
        Decision::Allow { policy: None },
        "the policy does not select a workload that does not list it"
    );
}

#[test]
fn the_static_strict_policy_is_ambits_strict_on_the_workloads_listing_it() {
    let mut m = mesh();
    let strict = policy(
        ROOT,
        STATIC_STRICT,
        sec::Scope::WorkloadSelector,
        sec::Action::Deny,
        vec![rule(vec![sec::Match {
            not_principals: vec![presence()],
            ..sec::Match::default()
        }])],
    );
    apply_policy(&mut m, &strict).unwrap();
    let mut s = workload("uid-s", "shop", "server", &["10.1.0.2"]);
    s.authorization_policies = vec![format!("{ROOT}/{STATIC_STRICT}")];
    apply_workload(&mut m, s);
    apply_workload(&mut m, workload("uid-o", "shop", "open", &["10.1.0.3"]));
    let snap = m.snapshot();
    let mode = |key: &str| {
        let w = &snap.workloads[key];
        peer_auth::resolve(
            &snap.peer_authentications,
            ROOT,
            &w.namespace,
            &w.labels,
            8080,
        )
    };
    let r = mode("shop/server");
    assert_eq!(
        (r.mode, r.policy.as_deref()),
        (
            Effective::Strict,
            Some("shop/istio_converted_static_strict")
        )
    );
    assert_eq!(mode("shop/open").mode, Effective::Permissive);
    assert!(
        snap.authorization_policies.is_empty(),
        "STRICT, not also a DENY policy"
    );

    // A policy of that name but another shape is refused, not taken for STRICT.
    let mut odd = strict.clone();
    odd.action = sec::Action::Allow.into();
    let err = apply_policy(&mut m, &odd).unwrap_err();
    assert!(
        err.to_string()
            .contains("is not istiod's static STRICT policy"),
        "{err}"
    );
}

#[test]
fn a_converted_port_level_peer_authentication_denies_plaintext_except_on_its_ports() {
    // istiod's form of "STRICT, but PERMISSIVE on 8080 and 8081": deny when there is no
    // principal and the port is neither.
    let mut m = mesh();
    let mut s = workload("uid-s", "shop", "server", &["10.1.0.2"]);
    s.authorization_policies = vec!["shop/converted_peer_authentication_pa".into()];
    apply_workload(&mut m, s);
    let pa = policy(
        "shop",
        "converted_peer_authentication_pa",
        sec::Scope::WorkloadSelector,
        sec::Action::Deny,
        vec![rule(vec![
            sec::Match {
                not_principals: vec![presence()],
                ..sec::Match::default()
            },
            sec::Match {
                not_destination_ports: vec![8080],
                ..sec::Match::default()
            },
            sec::Match {
                not_destination_ports: vec![8081],
                ..sec::Match::default()
            },
        ])],
    );
    apply_policy(&mut m, &pa).unwrap();
    let snap = m.snapshot();
    assert!(!decide(&snap, "shop/server", &conn(None, 9090)).allowed());
    assert!(decide(&snap, "shop/server", &conn(None, 8080)).allowed());
    assert!(decide(&snap, "shop/server", &conn(None, 8081)).allowed());
    assert!(decide(&snap, "shop/server", &conn(Some(("any", "one")), 9090)).allowed());
}

#[test]
fn a_dry_run_policy_is_not_enforced_and_says_so() {
    let mut m = mesh();
    apply_workload(&mut m, workload("uid-s", "shop", "server", &["10.1.0.2"]));
    let mut p = policy(
        "shop",
        "deny-all",
        sec::Scope::Namespace,
        sec::Action::Deny,
        vec![sec::Rule::default()],
    );
    p.dry_run = true;
    apply_policy(&mut m, &p).unwrap();
    let snap = m.snapshot();
    assert!(decide(&snap, "shop/server", &conn(None, 80)).allowed());
    assert!(
        snap.warnings
            .iter()
            .any(|w| w.contains("shop/deny-all is a dry run")),
        "{:?}",
        snap.warnings
    );
    // Enforced, the same empty rule denies everything.
    p.dry_run = false;
    apply_policy(&mut m, &p).unwrap();
    assert!(!decide(&m.snapshot(), "shop/server", &conn(None, 80)).allowed());
}

#[test]
fn a_clause_of_alternative_sources_is_the_rules_from_list_and_a_second_source_clause_its_conditions(
) {
    // (namespace front OR service account ops/admin) AND principal not .../sa/blocked
    let mut m = mesh();
    apply_workload(&mut m, workload("uid-s", "shop", "server", &["10.1.0.2"]));
    let allow = policy(
        "shop",
        "allow",
        sec::Scope::Namespace,
        sec::Action::Allow,
        vec![sec::Rule {
            clauses: vec![
                sec::Clause {
                    matches: vec![sec::Match {
                        not_principals: vec![exact("cluster.local/ns/front/sa/blocked")],
                        ..sec::Match::default()
                    }],
                },
                sec::Clause {
                    matches: vec![
                        sec::Match {
                            namespaces: vec![exact("front")],
                            ..sec::Match::default()
                        },
                        sec::Match {
                            service_accounts: vec![sec::ServiceAccountMatch {
                                namespace: "ops".into(),
                                service_account: "admin".into(),
                            }],
                            ..sec::Match::default()
                        },
                    ],
                },
            ],
        }],
    );
    apply_policy(&mut m, &allow).unwrap();
    let snap = m.snapshot();
    let allowed = |ns, sa| decide(&snap, "shop/server", &conn(Some((ns, sa)), 80)).allowed();
    assert!(allowed("front", "web"));
    assert!(allowed("ops", "admin"));
    assert!(!allowed("ops", "other"));
    assert!(!allowed("front", "blocked"));
}
