//! Principals across trust-domain aliases, case by case as Istio's trust-domain bundle
//! expands them (istio/istio `pilot/pkg/security/trustdomain/bundle_test.go`), and Istio's
//! order of reading a pattern's `*`.
use super::super::super::Mesh;
use super::{Pattern, Principal};

fn mesh<'a>(trust_domain: &'a str, aliases: &'a [String]) -> Mesh<'a> {
    Mesh {
        root_namespace: "istio-system",
        trust_domain,
        trust_domain_aliases: aliases,
    }
}

/// Which of `peers` the principal `written` matches in the mesh of `td` and `aliases`.
fn matched(td: &str, aliases: &[&str], written: &str, peers: &[&str]) -> Vec<String> {
    let aliases: Vec<String> = aliases.iter().map(|a| a.to_string()).collect();
    let m = mesh(td, &aliases);
    let p = Principal::new(written);
    peers
        .iter()
        .filter(|v| p.matches(&m, v))
        .map(|v| v.to_string())
        .collect()
}

const FOO_BAR: [&str; 6] = [
    "td1/ns/foo/sa/bar",
    "td2/ns/foo/sa/bar",
    "td3/ns/foo/sa/bar",
    "cluster.local/ns/foo/sa/bar",
    "foo-td1/ns/foo/sa/bar",
    "td1/ns/foo/sa/other",
];

#[test]
fn a_principal_in_an_alias_stands_for_every_trust_domain_of_the_mesh() {
    // trustDomain td2, alias td1: td1/... is td2/... and td1/..., nothing else.
    assert_eq!(
        matched("td2", &["td1"], "td1/ns/foo/sa/bar", &FOO_BAR),
        ["td1/ns/foo/sa/bar", "td2/ns/foo/sa/bar"]
    );
    // Written with the mesh's own trust domain: the aliases too.
    assert_eq!(
        matched("td2", &["td1"], "td2/ns/foo/sa/bar", &FOO_BAR),
        ["td1/ns/foo/sa/bar", "td2/ns/foo/sa/bar"]
    );
    // Without aliases: as written (the test above can tell td1 from td2).
    assert_eq!(
        matched("td2", &[], "td2/ns/foo/sa/bar", &FOO_BAR),
        ["td2/ns/foo/sa/bar"]
    );
    assert_eq!(
        matched("td2", &[], "td1/ns/foo/sa/bar", &FOO_BAR),
        ["td1/ns/foo/sa/bar"]
    );
}

#[test]
fn cluster_local_stands_for_the_mesh_and_only_the_mesh() {
    // `cluster.local` is Istio's name for the local trust domain, alias or not.
    assert_eq!(
        matched("td1", &[], "cluster.local/ns/foo/sa/bar", &FOO_BAR),
        ["td1/ns/foo/sa/bar"]
    );
    assert_eq!(
        matched(
            "td2",
            &["td1", "cluster.local"],
            "cluster.local/ns/foo/sa/bar",
            &FOO_BAR
        ),
        [
            "td1/ns/foo/sa/bar",
            "td2/ns/foo/sa/bar",
            "cluster.local/ns/foo/sa/bar"
        ]
    );
    // The default mesh: unchanged.
    assert_eq!(
        matched(
            "cluster.local",
            &[],
            "cluster.local/ns/foo/sa/bar",
            &FOO_BAR
        ),
        ["cluster.local/ns/foo/sa/bar"]
    );
}

#[test]
fn a_foreign_trust_domain_and_patterns_without_one_are_matched_as_written() {
    assert_eq!(
        matched("td1", &["td2"], "td3/ns/foo/sa/bar", &FOO_BAR),
        ["td3/ns/foo/sa/bar"]
    );
    // `*/ns/foo/sa/bar`: any trust domain already.
    assert_eq!(
        matched("td1", &["td2"], "*/ns/foo/sa/bar", &FOO_BAR).len(),
        5
    );
    // Fewer than five parts: no trust domain to replace.
    assert_eq!(matched("td1", &["td2"], "*sa/bar", &FOO_BAR).len(), 5);
    assert_eq!(matched("td1", &["td2"], "*", &FOO_BAR).len(), 6);
}

#[test]
fn a_wildcard_trust_domain_is_kept_for_the_domains_it_covers_and_replaced_for_the_others() {
    // Istio: td2 with aliases foo-td1 and cluster.local, `*-td1/ns/foo/sa/bar` becomes
    // td2/..., `*-td1/...` (kept: it covers foo-td1) and cluster.local/....
    let peers = [
        "td2/ns/foo/sa/bar",
        "foo-td1/ns/foo/sa/bar",
        "bar-td1/ns/foo/sa/bar",
        "cluster.local/ns/foo/sa/bar",
        "td3/ns/foo/sa/bar",
    ];
    assert_eq!(
        matched(
            "td2",
            &["foo-td1", "cluster.local"],
            "*-td1/ns/foo/sa/bar",
            &peers
        ),
        [
            "td2/ns/foo/sa/bar",
            "foo-td1/ns/foo/sa/bar",
            "bar-td1/ns/foo/sa/bar",
            "cluster.local/ns/foo/sa/bar"
        ]
    );
    // A prefix in the rest carries over to each trust domain.
    assert_eq!(
        matched("td2", &["td1"], "td1/ns/foo/sa/b*", &FOO_BAR),
        ["td1/ns/foo/sa/bar", "td2/ns/foo/sa/bar"]
    );
}

#[test]
fn a_leading_star_is_read_first_as_istiod_reads_it() {
    // `*a*` is "ends with `a*`", not "starts with `*a`".
    let p = Pattern::new("*a*");
    assert!(p.matches("xa*"));
    assert!(!p.matches("*abc"));
    assert!(!p.matches("xab"));
    assert_eq!(Pattern::new("ab*"), Pattern::Prefix("ab".into()));
    assert_eq!(Pattern::new("*"), Pattern::Present);
    assert!(!Pattern::Present.matches(""));
}
