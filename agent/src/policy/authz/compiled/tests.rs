use std::collections::BTreeMap;

use super::*;
use crate::policy::authz::{unsupported, validate};

fn policy(ns: &str, name: &str, spec: serde_json::Value) -> AuthorizationPolicy {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }))
    .unwrap()
}

fn from(sa: &str, ns: &str, src: &str, port: u16) -> ConnAttrs {
    ConnAttrs {
        peer: Some(
            format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")
                .parse()
                .unwrap(),
        ),
        src_ip: src.parse().unwrap(),
        dst_port: port,
        dst_ip: "10.2.0.2".parse().unwrap(),
    }
}

/// The mesh of these tests: `cluster.local`, no aliases.
const MESH: Mesh<'static> = Mesh::new("istio-system", "cluster.local");

fn eval(ps: &[AuthorizationPolicy], c: &ConnAttrs) -> Decision {
    let labels = BTreeMap::from([("app".to_string(), "server".to_string())]);
    Policies::compile(ps).evaluate(&MESH, "shop", &labels, c)
}

/// Istio's string match on the joined value, read as istiod reads it (a leading `*` first).
fn reference_match(pattern: &str, value: &str) -> bool {
    if pattern == "*" {
        return !value.is_empty();
    }
    if let Some(suffix) = pattern.strip_prefix('*') {
        return value.ends_with(suffix);
    }
    if let Some(prefix) = pattern.strip_suffix('*') {
        return value.starts_with(prefix);
    }
    pattern == value
}

#[test]
fn patterns_match_pairs_as_istio_matches_the_joined_string() {
    let patterns = [
        "*",
        "**",
        "shop/client",
        "shop/*",
        "sh*",
        "shop/",
        "shop",
        "*/client",
        "*client",
        "*t",
        "*/",
        "/*",
        "a*b",
        "shop/client*",
        "*shop/client",
        "",
        "/",
        "shop/clientx",
        "xshop/client",
        "é*",
        "*é",
        "*p/*",
        "*/*",
    ];
    let pairs = [
        ("shop", "client"),
        ("", ""),
        ("", "client"),
        ("shop", ""),
        ("sh", "op/client"),
        ("é", "é"),
        // Tells a leading `*` read first from a trailing one: `*p/*` matches `shop/*`.
        ("shop", "*"),
    ];
    for p in patterns {
        let compiled = Pattern::new(p);
        for (a, b) in pairs {
            let joined = format!("{a}/{b}");
            assert_eq!(
                compiled.matches_pair(a, b),
                reference_match(p, &joined),
                "pattern {p:?} on {joined:?}"
            );
            assert_eq!(
                compiled.matches(&joined),
                reference_match(p, &joined),
                "pattern {p:?} on {joined:?}"
            );
        }
    }
}

#[test]
fn when_conditions_on_l4_keys_are_compiled_and_checked() {
    let p = policy(
        "shop",
        "when",
        serde_json::json!({"rules": [{"when": [
            {"key": "source.ip", "values": ["10.1.0.0/16"], "notValues": ["10.1.0.9"]},
            {"key": "destination.ip", "values": ["10.2.0.2"]},
            {"key": "destination.port", "values": ["8080", "8443"]},
            {"key": "source.principal", "values": ["cluster.local/ns/shop/*"]},
            {"key": "source.namespace", "notValues": ["attic-*"]},
        ]}]}),
    );
    let ok = from("client", "shop", "10.1.0.2", 8080);
    assert!(eval(std::slice::from_ref(&p), &ok).allowed());
    let cases = [
        ("client", "shop", "10.1.0.9", 8080, "source.ip notValues"),
        ("client", "shop", "10.3.0.2", 8080, "source.ip values"),
        ("client", "shop", "10.1.0.2", 9000, "destination.port"),
        ("client", "billing", "10.1.0.2", 8080, "source.principal"),
    ];
    for (sa, ns, src, port, what) in cases {
        assert_eq!(
            eval(std::slice::from_ref(&p), &from(sa, ns, src, port)),
            Decision::NotAllowed,
            "{what}"
        );
    }
    let mut elsewhere = ok.clone();
    elsewhere.dst_ip = "10.2.0.3".parse().unwrap();
    assert_eq!(
        eval(std::slice::from_ref(&p), &elsewhere),
        Decision::NotAllowed
    );
    let attic = policy(
        "shop",
        "ns",
        serde_json::json!({"rules": [{"when": [{"key": "source.namespace", "notValues": ["attic-*"]}]}]}),
    );
    assert!(eval(
        std::slice::from_ref(&attic),
        &from("x", "shop", "10.1.0.2", 80)
    )
    .allowed());
    assert!(!eval(&[attic], &from("x", "attic-1", "10.1.0.2", 80)).allowed());
}

#[test]
fn values_that_do_not_compile_are_rejected_at_load_naming_the_field() {
    let cases = [
        (
            serde_json::json!({"rules": [{"to": [{"operation": {"notPorts": ["0"]}}]}]}),
            "spec.rules[0].to[0].operation.notPorts",
            "`0` is not a port",
        ),
        (
            serde_json::json!({"rules": [{}, {"from": [{"source": {"namespaces": ["a"]}}, {"source": {"notRemoteIpBlocks": ["10.0.0.0/33"]}}]}]}),
            "spec.rules[1].from[1].source.notRemoteIpBlocks",
            "`10.0.0.0/33` is not an IP or CIDR",
        ),
        (
            serde_json::json!({"action": "DENY", "rules": [{"when": [{"key": "source.ip", "values": ["bogus"]}]}]}),
            "spec.rules[0].when[0].values",
            "`bogus` is not an IP or CIDR",
        ),
        (
            serde_json::json!({"rules": [{"when": [{"key": "destination.port", "notValues": ["http"]}]}]}),
            "spec.rules[0].when[0].notValues",
            "`http` is not a port",
        ),
        // A rule ambit cannot check still has its L4 values checked.
        (
            serde_json::json!({"rules": [{"to": [{"operation": {"paths": ["/a"], "ports": ["99999"]}}]}]}),
            "spec.rules[0].to[0].operation.ports",
            "`99999` is not a port",
        ),
    ];
    for (spec, field, message) in cases {
        let p = policy("shop", "bad", spec);
        assert_eq!(
            validate(&p),
            Err((field.to_string(), message.to_string())),
            "{p:?}"
        );
        let compiled = Policies::compile(std::slice::from_ref(&p));
        assert_eq!(compiled.failures().len(), 1);
        assert_eq!(compiled.failures()[0].policy, "shop/bad");
        assert_eq!(compiled.failures()[0].error.field(), field);
    }
    // The same policies with good values compile.
    let good = policy(
        "shop",
        "good",
        serde_json::json!({"rules": [{"to": [{"operation": {"notPorts": ["1"]}}], "when": [{"key": "source.ip", "values": ["fd00::1", "10.0.0.0/8"]}]}]}),
    );
    assert_eq!(validate(&good), Ok(()));
    assert!(Policies::compile(&[good]).failures().is_empty());
}

#[test]
fn policies_that_cannot_be_compiled_fail_closed() {
    let mut deny = policy(
        "shop",
        "deny",
        serde_json::json!({"action": "DENY", "rules": [{"when": [{"key": "source.ip", "values": ["bogus"]}]}]}),
    );
    let allow = policy("shop", "allow-all", serde_json::json!({"rules": [{}]}));
    let c = from("client", "shop", "10.1.0.2", 8080);
    assert!(eval(std::slice::from_ref(&allow), &c).allowed());
    // Before it was compiled, a DENY whose value did not parse never matched.
    assert_eq!(
        eval(&[allow.clone(), deny.clone()], &c),
        Decision::Denied {
            policy: "shop/deny".into()
        }
    );
    // An object the Kubernetes source could not read at all: the same.
    deny.spec.rules.clear();
    deny.unreadable = Some("field `spec.rules[0].to`: invalid type".into());
    assert_eq!(
        eval(&[allow.clone(), deny.clone()], &c),
        Decision::Denied {
            policy: "shop/deny".into()
        }
    );
    assert_eq!(
        unsupported(&deny),
        ["spec: unreadable (field `spec.rules[0].to`: invalid type)"]
    );
    // An ALLOW that cannot be read never matches, so other ALLOWs still decide.
    let mut unreadable_allow = policy("shop", "broken", serde_json::json!({}));
    unreadable_allow.unreadable = Some("bad".into());
    assert_eq!(
        eval(std::slice::from_ref(&unreadable_allow), &c),
        Decision::NotAllowed
    );
    assert_eq!(
        eval(&[unreadable_allow, allow], &c),
        Decision::Allow {
            policy: Some("shop/allow-all".into())
        }
    );
}

#[test]
fn the_first_matching_policy_in_snapshot_order_is_named_across_namespaces() {
    let allow = |ns: &str, name: &str| policy(ns, name, serde_json::json!({"rules": [{}]}));
    let deny = |ns: &str, name: &str| {
        policy(
            ns,
            name,
            serde_json::json!({"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["evil"]}}]}]}),
        )
    };
    let list = [
        allow("billing", "a"),
        deny("istio-system", "mesh-deny"),
        allow("istio-system", "mesh-allow"),
        deny("shop", "shop-deny"),
        allow("shop", "shop-allow"),
    ];
    assert_eq!(
        eval(&list, &from("x", "evil", "10.1.0.2", 80)),
        Decision::Denied {
            policy: "istio-system/mesh-deny".into()
        }
    );
    assert_eq!(
        eval(&list, &from("x", "shop", "10.1.0.2", 80)),
        Decision::Allow {
            policy: Some("istio-system/mesh-allow".into())
        }
    );
    let reordered = [
        list[4].clone(),
        list[3].clone(),
        list[2].clone(),
        list[1].clone(),
    ];
    assert_eq!(
        eval(&reordered, &from("x", "evil", "10.1.0.2", 80)),
        Decision::Denied {
            policy: "shop/shop-deny".into()
        }
    );
    assert_eq!(
        eval(&reordered, &from("x", "shop", "10.1.0.2", 80)),
        Decision::Allow {
            policy: Some("shop/shop-allow".into())
        }
    );
    // A workload in the root namespace sees its policies once.
    let labels = BTreeMap::new();
    let root = Policies::compile(&list).evaluate(
        &MESH,
        "istio-system",
        &labels,
        &from("x", "shop", "10.1.0.2", 80),
    );
    assert_eq!(
        root,
        Decision::Allow {
            policy: Some("istio-system/mesh-allow".into())
        }
    );
}

#[test]
fn merged_walk_is_ascending_and_complete() {
    let cases: [(&[usize], &[usize]); 4] = [
        (&[], &[]),
        (&[0, 3, 4], &[1, 2, 9]),
        (&[5], &[]),
        (&[], &[1, 7]),
    ];
    for (a, b) in cases {
        let walked: Vec<usize> = Merged { a, b }.collect();
        let mut want: Vec<usize> = a.iter().chain(b).copied().collect();
        want.sort_unstable();
        assert_eq!(walked, want);
    }
}

#[test]
fn principals_not_principals_and_when_source_principal_follow_trust_domain_aliases() {
    // The mesh migrated from old.example to cluster.local: a policy still written with the old
    // trust domain names the same workloads, and one written with the new names old certificates.
    let aliases = ["old.example".to_string()];
    let migrated = Mesh {
        trust_domain_aliases: &aliases,
        ..MESH
    };
    let labels = BTreeMap::from([("app".to_string(), "server".to_string())]);
    let old_cert = ConnAttrs {
        peer: Some("spiffe://old.example/ns/shop/sa/client".parse().unwrap()),
        ..from("client", "shop", "10.1.0.2", 80)
    };
    let new_cert = from("client", "shop", "10.1.0.2", 80);
    let foreign = ConnAttrs {
        peer: Some("spiffe://other.example/ns/shop/sa/client".parse().unwrap()),
        ..new_cert.clone()
    };
    let allow_old = policy(
        "shop",
        "allow-old",
        serde_json::json!({"rules": [{"from": [{"source": {"principals": ["old.example/ns/shop/sa/client"]}}]}]}),
    );
    let deny_not_new = policy(
        "shop",
        "deny-others",
        serde_json::json!({"action": "DENY", "rules": [{"from": [{"source": {"notPrincipals": ["cluster.local/ns/shop/sa/client"]}}]}]}),
    );
    let allow_when = policy(
        "shop",
        "allow-when",
        serde_json::json!({"rules": [{"when": [{"key": "source.principal", "values": ["old.example/ns/shop/sa/client"]}]}]}),
    );
    for p in [&allow_old, &deny_not_new, &allow_when] {
        validate(p).unwrap();
        let ps = Policies::compile(std::slice::from_ref(p));
        let decide =
            |mesh: &Mesh<'_>, c: &ConnAttrs| ps.evaluate(mesh, "shop", &labels, c).allowed();
        let name = p.key();
        // With the alias, both certificates are the client; a foreign trust domain is not.
        assert!(decide(&migrated, &old_cert), "{name}: old certificate");
        assert!(decide(&migrated, &new_cert), "{name}: new certificate");
        assert!(!decide(&migrated, &foreign), "{name}: foreign trust domain");
        // Without it, only the trust domain as written is (the test can see a refusal).
        let written_allows_old = name != "shop/deny-others";
        assert_eq!(decide(&MESH, &old_cert), written_allows_old, "{name}");
        assert_eq!(decide(&MESH, &new_cert), !written_allows_old, "{name}");
    }
}
