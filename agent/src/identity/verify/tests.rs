use std::time::Duration;

use rcgen::{ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose, SanType};
use time::OffsetDateTime;

use super::*;
use crate::identity::testing::{spiffe, td, unix_now, TestCa, TestLeaf};

const CLIENT: &str = "spiffe://cluster.local/ns/shop/sa/client";

fn ours() -> Vec<TrustDomain> {
    vec![td("cluster.local")]
}

fn verify(leaf: &TestLeaf, ca: &TestCa) -> Result<SpiffeId, SvidError> {
    verify_svid(
        &leaf.chain,
        &ca.bundle(),
        unix_now(),
        &ours(),
        PeerRole::Client,
    )
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().unwrap())
}

#[test]
fn accepts_good_svid_in_both_roles() {
    let ca = TestCa::new("cluster.local");
    let leaf = ca.leaf(CLIENT, |_| {});
    for role in [PeerRole::Client, PeerRole::Server] {
        let id = verify_svid(&leaf.chain, &ca.bundle(), unix_now(), &ours(), role).unwrap();
        assert_eq!(id, spiffe(CLIENT));
    }
}

#[test]
fn accepts_svid_issued_by_an_intermediate() {
    let root = TestCa::new("cluster.local");
    let intermediate = root.intermediate();
    let leaf = intermediate.leaf(CLIENT, |_| {});
    assert_eq!(leaf.chain.len(), 2);
    assert_eq!(verify(&leaf, &root).unwrap(), spiffe(CLIENT));
}

#[test]
fn rejects_intermediate_chain_without_the_intermediate() {
    let root = TestCa::new("cluster.local");
    let mut leaf = root.intermediate().leaf(CLIENT, |_| {});
    leaf.chain.truncate(1);
    assert!(matches!(
        verify(&leaf, &root),
        Err(SvidError::UntrustedIssuer { .. })
    ));
}

#[test]
fn rejects_svid_from_another_ca() {
    let ours = TestCa::new("cluster.local");
    let theirs = TestCa::new("cluster.local");
    let leaf = theirs.leaf(CLIENT, |_| {});
    assert!(matches!(
        verify(&leaf, &ours),
        Err(SvidError::UntrustedIssuer { .. })
    ));
}

#[test]
fn accepts_both_roots_of_a_rotating_bundle() {
    let old = TestCa::new("cluster.local");
    let new = TestCa::new("cluster.local");
    let bundle = old.bundle().merged(&new.bundle());
    assert_eq!(bundle.roots().len(), 2);
    for ca in [&old, &new] {
        let leaf = ca.leaf(CLIENT, |_| {});
        verify_svid(&leaf.chain, &bundle, unix_now(), &ours(), PeerRole::Server).unwrap();
    }
}

#[test]
fn rejects_expired_svid() {
    let ca = TestCa::new("cluster.local");
    let leaf = ca.leaf(CLIENT, |p| {
        p.not_before = OffsetDateTime::now_utc() - Duration::from_secs(7200);
        p.not_after = OffsetDateTime::now_utc() - Duration::from_secs(3600);
    });
    let err = verify(&leaf, &ca).unwrap_err();
    assert!(matches!(err, SvidError::Expired { .. }), "{err:?}");
    assert!(err.to_string().contains("expired at"), "{err}");
}

#[test]
fn rejects_svid_not_yet_valid() {
    let ca = TestCa::new("cluster.local");
    let leaf = ca.leaf(CLIENT, |p| {
        p.not_before = OffsetDateTime::now_utc() + Duration::from_secs(3600);
    });
    assert!(matches!(
        verify(&leaf, &ca),
        Err(SvidError::NotYetValid { .. })
    ));
}

#[test]
fn rejects_two_uri_sans() {
    let ca = TestCa::new("cluster.local");
    let leaf = ca.leaf(CLIENT, |p| {
        p.subject_alt_names
            .push(uri("spiffe://cluster.local/ns/shop/sa/admin"));
    });
    assert!(matches!(
        verify(&leaf, &ca),
        Err(SvidError::MultipleUriSans { count: 2, .. })
    ));
}

#[test]
fn rejects_svid_without_uri_san() {
    let ca = TestCa::new("cluster.local");
    let leaf = ca.leaf(CLIENT, |p| {
        p.subject_alt_names = vec![SanType::DnsName("client.shop".try_into().unwrap())];
    });
    assert!(matches!(
        verify(&leaf, &ca),
        Err(SvidError::NoUriSan { .. })
    ));
}

#[test]
fn accepts_dns_sans_beside_the_uri_san() {
    let ca = TestCa::new("cluster.local");
    let leaf = ca.leaf(CLIENT, |p| {
        p.subject_alt_names
            .push(SanType::DnsName("client.shop".try_into().unwrap()));
    });
    assert_eq!(verify(&leaf, &ca).unwrap(), spiffe(CLIENT));
}

#[test]
fn rejects_non_spiffe_uri_san() {
    let ca = TestCa::new("cluster.local");
    let leaf = ca.leaf(CLIENT, |p| {
        p.subject_alt_names = vec![uri("https://client.shop/")]
    });
    let err = verify(&leaf, &ca).unwrap_err();
    assert!(
        matches!(
            err,
            SvidError::InvalidSpiffeId {
                source: SpiffeIdError::WrongScheme { .. },
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn rejects_spiffe_id_that_is_not_a_workload() {
    let ca = TestCa::new("cluster.local");
    let leaf = ca.leaf(CLIENT, |p| {
        p.subject_alt_names = vec![uri("spiffe://cluster.local/x")]
    });
    let err = verify(&leaf, &ca).unwrap_err();
    assert!(
        matches!(
            err,
            SvidError::InvalidSpiffeId {
                source: SpiffeIdError::NotWorkload { .. },
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn rejects_ca_leaf() {
    let ca = TestCa::new("cluster.local");
    let leaf = ca.leaf(CLIENT, |p| {
        p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    });
    assert!(matches!(
        verify(&leaf, &ca),
        Err(SvidError::LeafIsCa { .. })
    ));
}

#[test]
fn rejects_leaf_with_key_cert_sign() {
    let ca = TestCa::new("cluster.local");
    let leaf = ca.leaf(CLIENT, |p| p.key_usages.push(KeyUsagePurpose::KeyCertSign));
    let err = verify(&leaf, &ca).unwrap_err();
    assert!(
        matches!(
            err,
            SvidError::ForbiddenKeyUsage {
                usage: "keyCertSign",
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn rejects_leaf_with_crl_sign() {
    let ca = TestCa::new("cluster.local");
    let leaf = ca.leaf(CLIENT, |p| p.key_usages.push(KeyUsagePurpose::CrlSign));
    assert!(matches!(
        verify(&leaf, &ca),
        Err(SvidError::ForbiddenKeyUsage {
            usage: "cRLSign",
            ..
        })
    ));
}

#[test]
fn rejects_leaf_without_digital_signature() {
    let ca = TestCa::new("cluster.local");
    let leaf = ca.leaf(CLIENT, |p| {
        p.key_usages = vec![KeyUsagePurpose::KeyAgreement]
    });
    assert!(matches!(
        verify(&leaf, &ca),
        Err(SvidError::MissingDigitalSignature { .. })
    ));
}

#[test]
fn rejects_leaf_without_key_usage() {
    let ca = TestCa::new("cluster.local");
    let leaf = ca.leaf(CLIENT, |p| p.key_usages.clear());
    assert!(matches!(
        verify(&leaf, &ca),
        Err(SvidError::MissingKeyUsage { .. })
    ));
}

#[test]
fn rejects_leaf_whose_eku_excludes_the_role() {
    let ca = TestCa::new("cluster.local");
    let leaf = ca.leaf(CLIENT, |p| {
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    });
    let as_client = verify_svid(
        &leaf.chain,
        &ca.bundle(),
        unix_now(),
        &ours(),
        PeerRole::Client,
    );
    assert!(matches!(
        as_client,
        Err(SvidError::WrongExtendedKeyUsage {
            required: "clientAuth",
            ..
        })
    ));
    let as_server = verify_svid(
        &leaf.chain,
        &ca.bundle(),
        unix_now(),
        &ours(),
        PeerRole::Server,
    );
    assert!(as_server.is_ok());
}

#[test]
fn rejects_foreign_trust_domain() {
    let ca = TestCa::new("cluster.local");
    let leaf = ca.leaf("spiffe://evil.example/ns/shop/sa/client", |_| {});
    let err = verify(&leaf, &ca).unwrap_err();
    assert!(
        matches!(err, SvidError::ForeignTrustDomain { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("evil.example"), "{err}");
}

#[test]
fn accepts_configured_trust_domain_alias() {
    let ca = TestCa::new("cluster.local");
    let leaf = ca.leaf("spiffe://old.example/ns/shop/sa/client", |_| {});
    let domains = [td("cluster.local"), td("old.example")];
    let id = verify_svid(
        &leaf.chain,
        &ca.bundle(),
        unix_now(),
        &domains,
        PeerRole::Client,
    );
    assert_eq!(id.unwrap().trust_domain(), "old.example");
}

#[test]
fn rejects_empty_chain_and_garbage() {
    let ca = TestCa::new("cluster.local");
    let none = verify_svid(&[], &ca.bundle(), unix_now(), &ours(), PeerRole::Client);
    assert!(matches!(none, Err(SvidError::NoCertificate)));
    let garbage = [CertificateDer::from(vec![0x30, 0x82, 0xff])];
    let err = verify_svid(
        &garbage,
        &ca.bundle(),
        unix_now(),
        &ours(),
        PeerRole::Client,
    );
    assert!(matches!(err, Err(SvidError::Malformed { .. })));
}

#[test]
fn error_names_the_certificate() {
    let ca = TestCa::new("cluster.local");
    let leaf = TestCa::new("cluster.local").leaf(CLIENT, |_| {});
    let err = verify(&leaf, &ca).unwrap_err().to_string();
    assert!(err.starts_with("certificate "), "{err}");
    assert!(err.contains(CLIENT), "{err}");
}

#[test]
fn timestamp_prints_rfc3339() {
    let t = Timestamp(UnixTime::since_unix_epoch(Duration::from_secs(
        1_700_000_000,
    )));
    assert_eq!(t.to_string(), "2023-11-14T22:13:20Z");
}
