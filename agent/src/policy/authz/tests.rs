use super::*;

fn policy(ns: &str, name: &str, spec: &str) -> AuthorizationPolicy {
    let text = format!(
        "metadata:\n  name: {name}\n  namespace: {ns}\nspec:\n{}",
        spec.lines().map(|l| format!("  {l}\n")).collect::<String>()
    );
    let p: AuthorizationPolicy = crate::yaml::from_str(&text).unwrap();
    validate(&p).unwrap();
    p
}

fn mtls(sa: &str, ns: &str, port: u16) -> ConnAttrs {
    ConnAttrs {
        peer: Some(
            format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")
                .parse()
                .unwrap(),
        ),
        src_ip: "10.1.0.2".parse().unwrap(),
        dst_port: port,
        dst_ip: "10.2.0.2".parse().unwrap(),
    }
}

fn plaintext(port: u16) -> ConnAttrs {
    ConnAttrs {
        peer: None,
        ..mtls("x", "x", port)
    }
}

fn eval(ps: &[AuthorizationPolicy], c: &ConnAttrs) -> Decision {
    Policies::compile(ps).evaluate(
        &Mesh::new("istio-system", "cluster.local"),
        "shop",
        &BTreeMap::from([("app".to_string(), "server".to_string())]),
        c,
    )
}

#[test]
fn no_policy_allows() {
    assert!(eval(&[], &plaintext(80)).allowed());
}

#[test]
fn allow_by_principal_and_port() {
    let p = policy("shop", "allow-client", "action: ALLOW\nrules:\n- from:\n  - source:\n      principals: [\"cluster.local/ns/shop/sa/client\"]\n  to:\n  - operation:\n      ports: [\"8080\"]");
    assert!(eval(std::slice::from_ref(&p), &mtls("client", "shop", 8080)).allowed());
    assert_eq!(
        eval(std::slice::from_ref(&p), &mtls("client", "shop", 9000)),
        Decision::NotAllowed
    );
    assert_eq!(
        eval(std::slice::from_ref(&p), &mtls("other", "shop", 8080)),
        Decision::NotAllowed
    );
    assert_eq!(
        eval(&[p], &plaintext(8080)),
        Decision::NotAllowed,
        "plaintext has no principal"
    );
}

#[test]
fn deny_wins_over_allow() {
    let allow = policy("shop", "allow-all", "rules:\n- {}");
    let deny = policy(
        "shop",
        "deny-ns",
        "action: DENY\nrules:\n- from:\n  - source:\n      namespaces: [\"evil\"]",
    );
    assert_eq!(
        eval(&[allow.clone(), deny.clone()], &mtls("x", "evil", 80)),
        Decision::Denied {
            policy: "shop/deny-ns".into()
        }
    );
    assert!(eval(&[allow, deny], &mtls("x", "shop", 80)).allowed());
}

#[test]
fn not_principals_presence_denies_plaintext() {
    // Istio's STRICT translation: deny anything without a proven identity.
    let p = policy(
        "istio-system",
        "strict",
        "action: DENY\nrules:\n- from:\n  - source:\n      notPrincipals: [\"*\"]",
    );
    assert!(!eval(std::slice::from_ref(&p), &plaintext(80)).allowed());
    assert!(eval(&[p], &mtls("x", "shop", 80)).allowed());
}

#[test]
fn allow_with_no_rules_denies_everything() {
    let p = policy("shop", "deny-all", "action: ALLOW");
    assert_eq!(eval(&[p], &mtls("x", "shop", 80)), Decision::NotAllowed);
}

#[test]
fn ip_blocks_and_not_forms() {
    let p = policy("shop", "ips", "rules:\n- from:\n  - source:\n      ipBlocks: [\"10.1.0.0/16\"]\n      notIpBlocks: [\"10.1.0.9\"]");
    assert!(eval(std::slice::from_ref(&p), &plaintext(80)).allowed());
    let mut c = plaintext(80);
    c.src_ip = "10.1.0.9".parse().unwrap();
    assert!(!eval(std::slice::from_ref(&p), &c).allowed());
    c.src_ip = "10.3.0.1".parse().unwrap();
    assert!(!eval(&[p], &c).allowed());
}

#[test]
fn selector_and_scope() {
    let other_ns = policy("billing", "deny", "action: DENY\nrules:\n- {}");
    let root = policy("istio-system", "deny", "action: DENY\nrules:\n- {}");
    let wrong_selector = policy(
        "shop",
        "deny",
        "selector:\n  matchLabels:\n    app: db\naction: DENY\nrules:\n- {}",
    );
    assert!(eval(&[other_ns], &plaintext(80)).allowed());
    assert!(!eval(&[root], &plaintext(80)).allowed());
    assert!(eval(&[wrong_selector], &plaintext(80)).allowed());
}

#[test]
fn l7_fields_fail_safe_and_are_reported() {
    let allow = policy(
        "shop",
        "paths",
        "rules:\n- to:\n  - operation:\n      paths: [\"/admin\"]",
    );
    let deny = policy(
        "shop",
        "methods",
        "action: DENY\nrules:\n- to:\n  - operation:\n      methods: [\"POST\"]",
    );
    assert_eq!(
        eval(std::slice::from_ref(&allow), &mtls("x", "shop", 80)),
        Decision::NotAllowed,
        "ALLOW with L7 never matches"
    );
    assert!(
        !eval(std::slice::from_ref(&deny), &mtls("x", "shop", 80)).allowed(),
        "DENY with L7 always matches"
    );
    assert_eq!(
        unsupported(&allow),
        vec!["spec.rules[0].to.operation.paths".to_string()]
    );
    assert_eq!(
        unsupported(&deny),
        vec!["spec.rules[0].to.operation.methods".to_string()]
    );
}

#[test]
fn wildcards_in_principals() {
    let p = policy(
        "shop",
        "prefix",
        "rules:\n- from:\n  - source:\n      principals: [\"cluster.local/ns/shop/*\"]",
    );
    assert!(eval(std::slice::from_ref(&p), &mtls("anything", "shop", 80)).allowed());
    assert!(!eval(&[p], &mtls("anything", "billing", 80)).allowed());
}

#[test]
fn bad_port_is_rejected_at_load() {
    let text = "metadata:\n  name: x\n  namespace: y\nspec:\n  rules:\n  - to:\n    - operation:\n        ports: [\"http\"]\n";
    let p: AuthorizationPolicy = crate::yaml::from_str(text).unwrap();
    assert!(validate(&p).is_err());
}

#[test]
fn typo_fields_are_rejected_and_service_accounts_match() {
    let typo = "metadata:\n  name: x\n  namespace: shop\nspec:\n  rules:\n  - from:\n    - source:\n        principal: [\"a\"]\n";
    let err = crate::yaml::from_str::<AuthorizationPolicy>(typo)
        .unwrap_err()
        .to_string();
    assert!(err.contains("principal"), "{err}");
    let p = policy(
        "shop",
        "sa",
        "rules:\n- from:\n  - source:\n      serviceAccounts: [\"shop/client\"]",
    );
    assert!(eval(std::slice::from_ref(&p), &mtls("client", "shop", 80)).allowed());
    assert!(!eval(&[p], &mtls("client", "other", 80)).allowed());
}
