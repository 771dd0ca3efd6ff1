//! AuthorizationPolicies the Kubernetes source cannot read: a bad update keeps the last good
//! version; one never seen good stays in the snapshot to fail closed instead of vanishing.
use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::{build, documents, load, Builder, CLUSTER};
use crate::policy::authz::{ConnAttrs, Decision};

fn policy(name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}")},
        "spec": spec,
    })
}

/// Authorizes a connection from `shop/client` to the server pod (`app: server` in `shop`).
fn to_server(snap: &crate::inventory::Snapshot) -> Decision {
    let labels = BTreeMap::from([("app".to_string(), "server".to_string())]);
    let c = ConnAttrs {
        peer: Some("spiffe://cluster.local/ns/shop/sa/client".parse().unwrap()),
        src_ip: "10.244.1.7".parse().unwrap(),
        dst_port: 8080,
        dst_ip: "10.244.2.9".parse().unwrap(),
    };
    snap.authz().evaluate(
        &crate::policy::authz::Mesh::new("istio-system", "cluster.local"),
        "shop",
        &labels,
        &c,
    )
}

#[test]
fn a_deny_never_seen_good_fails_closed_and_is_replaced_once_it_reads() {
    let base = documents(CLUSTER);
    let allowed = build(&mut Builder::new("node1".into()), &load(&base), &[]);
    assert_eq!(
        to_server(&allowed),
        Decision::Allow {
            policy: Some("shop/allow-client".into())
        },
        "the fixture's ALLOW policy admits the client"
    );

    let mut docs = base.clone();
    docs.push(policy(
        "deny-broken",
        json!({"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["http"]}}]}]}),
    ));
    docs.push(policy(
        "deny-shapeless",
        json!({"action": "DENY", "rules": "oops"}),
    ));
    let mut b = Builder::new("node1".into());
    let snap = build(&mut b, &load(&docs), &[]);
    let problems = b.problems().iter().cloned().collect::<Vec<_>>().join("\n");
    assert!(
        problems.contains("AuthorizationPolicy shop/deny-broken: field `spec.rules[0].to[0].operation.ports`: `http` is not a port"),
        "{problems}"
    );
    assert!(
        problems.contains("AuthorizationPolicy shop/deny-shapeless"),
        "{problems}"
    );
    let kept: Vec<(String, bool)> = snap
        .authorization_policies
        .iter()
        .map(|p| (p.key(), p.unreadable.is_some()))
        .collect();
    assert_eq!(
        kept,
        [
            ("shop/allow-client".to_string(), false),
            ("shop/deny-broken".to_string(), true),
            ("shop/deny-shapeless".to_string(), true),
        ]
    );
    assert_eq!(
        to_server(&snap),
        Decision::Denied {
            policy: "shop/deny-broken".into()
        }
    );
    assert_eq!(snap.authz().failures().len(), 2);

    // Fixed: the good version replaces the placeholder, and is remembered as good.
    let fixed = policy(
        "deny-broken",
        json!({"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["9999"]}}]}]}),
    );
    docs.retain(|d| d["metadata"]["name"] != "deny-shapeless");
    let at = docs
        .iter()
        .position(|d| d["metadata"]["name"] == "deny-broken")
        .unwrap();
    docs[at] = fixed;
    let snap = build(&mut b, &load(&docs), &[]);
    assert!(snap.authz().failures().is_empty());
    assert!(to_server(&snap).allowed());

    // Broken again: the last good version stays in force (as for every other kind).
    docs[at]["spec"]["rules"] = json!("oops");
    let again = build(&mut b, &load(&docs), &[]);
    assert_eq!(again.authorization_policies, snap.authorization_policies);
    assert!(to_server(&again).allowed());
}

#[test]
fn an_allow_never_seen_good_never_matches_and_an_unreadable_action_is_a_deny() {
    let mut docs = documents(CLUSTER);
    docs.push(policy(
        "allow-broken",
        json!({"selector": {"matchLabels": {"app": "server"}}, "rules": [{"from": [{"source": {"ipBlocks": ["nope"]}}]}]}),
    ));
    let snap = build(&mut Builder::new("node1".into()), &load(&docs), &[]);
    // The other ALLOW still admits the client: a broken ALLOW only never matches.
    assert_eq!(
        to_server(&snap),
        Decision::Allow {
            policy: Some("shop/allow-client".into())
        }
    );
    docs.retain(|d| d["kind"] != "AuthorizationPolicy");
    docs.push(policy(
        "allow-broken",
        json!({"rules": [{"from": [{"source": {"ipBlocks": ["nope"]}}]}]}),
    ));
    let snap = build(&mut Builder::new("node1".into()), &load(&docs), &[]);
    assert_eq!(to_server(&snap), Decision::NotAllowed);
    docs.push(policy("typo", json!({"action": "DENNY", "rules": [{}]})));
    let snap = build(&mut Builder::new("node1".into()), &load(&docs), &[]);
    assert_eq!(
        to_server(&snap),
        Decision::Denied {
            policy: "shop/typo".into()
        }
    );
}
