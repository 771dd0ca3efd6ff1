use super::*;

fn parse(s: &str) -> Result<SpiffeId, SpiffeIdError> {
    s.parse()
}

#[test]
fn parses_and_prints_workload_identity() {
    let id = parse("spiffe://cluster.local/ns/shop/sa/client").unwrap();
    assert_eq!(id.trust_domain(), "cluster.local");
    assert_eq!(id.namespace(), "shop");
    assert_eq!(id.service_account(), "client");
    assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/client");
}

#[test]
fn accepts_every_allowed_character() {
    let s = "spiffe://a-b_c.9/ns/Az09.-_/sa/x.y-z_W";
    assert_eq!(parse(s).unwrap().to_string(), s);
}

#[test]
fn new_builds_the_same_id_as_parsing() {
    let td: TrustDomain = "example.org".parse().unwrap();
    let id = SpiffeId::new(td, "default", "web").unwrap();
    assert_eq!(id, parse("spiffe://example.org/ns/default/sa/web").unwrap());
}

#[test]
fn new_rejects_bad_segments() {
    let td: TrustDomain = "example.org".parse().unwrap();
    assert!(matches!(
        SpiffeId::new(td.clone(), "a/b", "web"),
        Err(SpiffeIdError::PathChar { ch: '/', .. })
    ));
    assert!(matches!(
        SpiffeId::new(td.clone(), "", "web"),
        Err(SpiffeIdError::EmptySegment { .. })
    ));
    assert!(matches!(
        SpiffeId::new(td, "ns", ".."),
        Err(SpiffeIdError::DotSegment { .. })
    ));
}

#[test]
fn rejects_wrong_scheme() {
    for s in [
        "https://cluster.local/ns/a/sa/b",
        "SPIFFE://cluster.local/ns/a/sa/b",
        "spiffe:/cluster.local/ns/a/sa/b",
        "cluster.local/ns/a/sa/b",
        "",
    ] {
        assert!(
            matches!(parse(s), Err(SpiffeIdError::WrongScheme { .. })),
            "{s}"
        );
    }
}

#[test]
fn rejects_bad_trust_domains() {
    assert!(matches!(
        parse("spiffe:///ns/a/sa/b"),
        Err(SpiffeIdError::EmptyTrustDomain { .. })
    ));
    assert!(matches!(
        parse("spiffe://"),
        Err(SpiffeIdError::EmptyTrustDomain { .. })
    ));
    assert!(matches!(
        parse("spiffe://Cluster.local/ns/a/sa/b"),
        Err(SpiffeIdError::TrustDomainChar { ch: 'C', .. })
    ));
    assert!(matches!(
        parse("spiffe://clu%73ter/ns/a/sa/b"),
        Err(SpiffeIdError::TrustDomainChar { ch: '%', .. })
    ));
    assert!(matches!(
        parse("spiffe://user@cluster.local/ns/a/sa/b"),
        Err(SpiffeIdError::UserInfo { .. })
    ));
    assert!(matches!(
        parse("spiffe://cluster.local:443/ns/a/sa/b"),
        Err(SpiffeIdError::Port { .. })
    ));
    let long = format!("spiffe://{}/ns/a/sa/b", "a".repeat(256));
    assert!(matches!(
        parse(&long),
        Err(SpiffeIdError::TooLong { max: 255, .. })
    ));
}

#[test]
fn rejects_query_and_fragment() {
    assert!(matches!(
        parse("spiffe://td/ns/a/sa/b?x=1"),
        Err(SpiffeIdError::Query { .. })
    ));
    assert!(matches!(
        parse("spiffe://td/ns/a/sa/b#frag"),
        Err(SpiffeIdError::Fragment { .. })
    ));
    assert!(matches!(
        parse("spiffe://td?x/ns/a/sa/b"),
        Err(SpiffeIdError::Query { .. })
    ));
}

/// A predicate on the error a case must produce.
type Expect = fn(&SpiffeIdError) -> bool;

#[test]
fn rejects_bad_paths() {
    let cases: &[(&str, Expect)] = &[
        ("spiffe://td/ns/a/sa/b/", |e| {
            matches!(e, SpiffeIdError::TrailingSlash { .. })
        }),
        ("spiffe://td/", |e| {
            matches!(e, SpiffeIdError::TrailingSlash { .. })
        }),
        ("spiffe://td/ns//sa/b", |e| {
            matches!(e, SpiffeIdError::EmptySegment { .. })
        }),
        ("spiffe://td/ns/./sa/b", |e| {
            matches!(e, SpiffeIdError::DotSegment { segment: ".", .. })
        }),
        ("spiffe://td/ns/../sa/b", |e| {
            matches!(e, SpiffeIdError::DotSegment { segment: "..", .. })
        }),
        ("spiffe://td/ns/a%20b/sa/b", |e| {
            matches!(e, SpiffeIdError::PathChar { ch: '%', .. })
        }),
        ("spiffe://td/ns/a b/sa/b", |e| {
            matches!(e, SpiffeIdError::PathChar { ch: ' ', .. })
        }),
        ("spiffe://td/ns/é/sa/b", |e| {
            matches!(e, SpiffeIdError::PathChar { ch: 'é', .. })
        }),
    ];
    for (s, is_expected) in cases {
        let err = parse(s).unwrap_err();
        assert!(is_expected(&err), "{s}: {err:?}");
    }
}

#[test]
fn rejects_ids_that_are_not_workload_identities() {
    for s in [
        "spiffe://td",
        "spiffe://td/ns/a",
        "spiffe://td/ns/a/sa",
        "spiffe://td/ns/a/sa/b/c",
        "spiffe://td/sa/b/ns/a",
        "spiffe://td/NS/a/sa/b",
        "spiffe://td/workload",
    ] {
        assert!(
            matches!(parse(s), Err(SpiffeIdError::NotWorkload { .. })),
            "{s}"
        );
    }
}

#[test]
fn rejects_overlong_ids_without_echoing_them_whole() {
    let s = format!("spiffe://td/ns/{}/sa/b", "a".repeat(2100));
    let err = parse(&s).unwrap_err();
    assert!(matches!(err, SpiffeIdError::TooLong { max: 2048, .. }));
    assert!(err.to_string().len() < 200, "{err}");
}

#[test]
fn error_messages_name_the_input() {
    let err = parse("spiffe://td/ns/a/sa/b?x").unwrap_err();
    assert_eq!(
        err.to_string(),
        r#"invalid spiffe id "spiffe://td/ns/a/sa/b?x": query is not allowed"#
    );
}

#[test]
fn trust_domain_parses_alone() {
    assert_eq!(
        "cluster.local".parse::<TrustDomain>().unwrap().to_string(),
        "cluster.local"
    );
    assert!("Cluster.local".parse::<TrustDomain>().is_err());
    assert!("".parse::<TrustDomain>().is_err());
    assert!("td/x".parse::<TrustDomain>().is_err());
}

#[test]
fn accessors_split_the_id_at_the_right_places() {
    let id = parse("spiffe://a.b/ns/n-1/sa/s_2").unwrap();
    assert_eq!(
        (id.trust_domain(), id.namespace(), id.service_account()),
        ("a.b", "n-1", "s_2")
    );
    assert_eq!(id.as_str(), "spiffe://a.b/ns/n-1/sa/s_2");
    assert_eq!(
        format!("{id:?}"),
        r#"SpiffeId("spiffe://a.b/ns/n-1/sa/s_2")"#
    );
    let built = SpiffeId::new("a.b".parse().unwrap(), "n-1", "s_2").unwrap();
    assert_eq!(
        (
            built.trust_domain(),
            built.namespace(),
            built.service_account()
        ),
        ("a.b", "n-1", "s_2")
    );
}
