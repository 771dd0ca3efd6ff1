use super::*;

fn pa(ns: &str, name: &str, ts: &str, yaml_spec: &str) -> PeerAuthentication {
    let text =
        format!(
        "metadata:\n  name: {name}\n  namespace: {ns}\n  creationTimestamp: \"{ts}\"\nspec:\n{}",
        yaml_spec.lines().map(|l| format!("  {l}\n")).collect::<String>()
    );
    crate::yaml::from_str(&text).unwrap()
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

const T1: &str = "2024-01-01T00:00:00Z";
const T2: &str = "2024-06-01T00:00:00Z";

#[test]
fn nothing_set_is_permissive() {
    let r = resolve(&[], "istio-system", "default", &labels(&[]), 80);
    assert_eq!(
        r,
        Resolution {
            mode: Effective::Permissive,
            policy: None,
            level: "default"
        }
    );
}

#[test]
fn precedence_table() {
    let mesh = pa("istio-system", "mesh", T1, "mtls:\n  mode: STRICT");
    let ns = pa("shop", "ns", T1, "mtls:\n  mode: PERMISSIVE");
    let wl = pa("shop", "wl", T1, "selector:\n  matchLabels:\n    app: server\nmtls:\n  mode: STRICT\nportLevelMtls:\n  8080:\n    mode: DISABLE");
    let wl_unset = pa("shop", "wl2", T1, "selector:\n  matchLabels:\n    app: other\nmtls:\n  mode: UNSET\nportLevelMtls:\n  9000:\n    mode: UNSET");
    let all = vec![mesh.clone(), ns.clone(), wl.clone(), wl_unset.clone()];
    let server = labels(&[("app", "server")]);
    let other = labels(&[("app", "other")]);
    // (policies, namespace, labels, port) -> (mode, level)
    type Case<'a> = (
        &'a [PeerAuthentication],
        &'a str,
        &'a BTreeMap<String, String>,
        u16,
        Effective,
        &'a str,
    );
    let cases: Vec<Case> = vec![
        (&all[..1], "shop", &server, 80, Effective::Strict, "mesh"),
        (
            &all[..2],
            "shop",
            &server,
            80,
            Effective::Permissive,
            "namespace",
        ),
        (
            &all[..3],
            "shop",
            &server,
            80,
            Effective::Strict,
            "workload",
        ),
        (&all[..3], "shop", &server, 8080, Effective::Disable, "port"),
        (
            &all,
            "shop",
            &other,
            9000,
            Effective::Permissive,
            "namespace",
        ), // UNSET inherits
        (&all, "elsewhere", &server, 8080, Effective::Strict, "mesh"), // other namespace: only mesh
    ];
    for (i, (pols, ns, l, port, mode, level)) in cases.into_iter().enumerate() {
        let r = resolve(pols, "istio-system", ns, l, port);
        assert_eq!((r.mode, r.level), (mode, level), "case {i}: {r:?}");
    }
}

#[test]
fn oldest_wins_at_the_same_level() {
    let young = pa("shop", "young", T2, "mtls:\n  mode: STRICT");
    let old = pa("shop", "old", T1, "mtls:\n  mode: DISABLE");
    let r = resolve(&[young, old], "istio-system", "shop", &labels(&[]), 80);
    assert_eq!(r.mode, Effective::Disable);
    assert_eq!(r.policy.as_deref(), Some("shop/old"));
}

#[test]
fn policy_in_another_namespace_does_not_apply() {
    let other = pa("billing", "strict", T1, "mtls:\n  mode: STRICT");
    let r = resolve(&[other], "istio-system", "shop", &labels(&[]), 80);
    assert_eq!(r.mode, Effective::Permissive);
}

#[test]
fn selector_that_matches_nothing_does_not_apply() {
    let p = pa(
        "shop",
        "typo",
        T1,
        "selector:\n  matchLabels:\n    app: sever\nmtls:\n  mode: STRICT",
    );
    let r = resolve(
        &[p],
        "istio-system",
        "shop",
        &labels(&[("app", "server")]),
        80,
    );
    assert_eq!(r.mode, Effective::Permissive);
}

#[test]
fn port_level_without_selector_is_invalid() {
    let p = pa("shop", "bad", T1, "portLevelMtls:\n  80:\n    mode: STRICT");
    assert!(validate(&p).is_err());
}

#[test]
fn unknown_mode_is_a_parse_error() {
    let text = "metadata:\n  name: x\n  namespace: y\nspec:\n  mtls:\n    mode: STRICTER\n";
    assert!(crate::yaml::from_str::<PeerAuthentication>(text).is_err());
}
