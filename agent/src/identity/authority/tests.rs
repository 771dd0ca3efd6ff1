use rcgen::{CertificateParams, KeyPair};
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry;

use super::*;
use crate::identity::testing::{spiffe, td, unix_now, TestCa, DAY};
use crate::identity::verify_svid;

const ID: &str = "spiffe://cluster.local/ns/shop/sa/client";

fn csr_for(id: &str) -> Csr {
    Csr::from_der(&new_csr(&spiffe(id)).unwrap().csr).unwrap()
}

fn issue(ca: &CertificateAuthority, ttl: Duration) -> Vec<CertificateDer<'static>> {
    ca.sign(&csr_for(ID), &spiffe(ID), ttl, SystemTime::now())
        .unwrap()
}

#[test]
fn issues_the_svid_profile() {
    let ca = TestCa::new("cluster.local");
    let now = SystemTime::now();
    let chain = ca.ca.sign(&csr_for(ID), &spiffe(ID), DAY, now).unwrap();
    assert_eq!(chain.len(), 1, "a root signs directly; roots are not sent");
    let x509 = verify::parse_certificate(&chain[0]).unwrap();

    let mut seen = Vec::new();
    for ext in x509.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => {
                assert!(ext.critical, "empty subject makes the san critical");
                assert_eq!(san.general_names, vec![GeneralName::URI(ID)]);
                seen.push("san");
            }
            ParsedExtension::BasicConstraints(bc) => {
                assert!(ext.critical);
                assert!(!bc.ca);
                seen.push("bc");
            }
            ParsedExtension::KeyUsage(ku) => {
                assert!(ext.critical);
                assert!(ku.digital_signature());
                assert_eq!(ku.flags, 1, "digitalSignature only");
                seen.push("ku");
            }
            ParsedExtension::ExtendedKeyUsage(eku) => {
                assert!(eku.server_auth && eku.client_auth);
                assert!(!eku.any && eku.other.is_empty());
                seen.push("eku");
            }
            _ => {}
        }
    }
    seen.sort_unstable();
    assert_eq!(seen, ["bc", "eku", "ku", "san"]);
    assert!(x509.subject().as_raw().len() <= 2, "empty subject");
    assert!(x509.public_key().algorithm.algorithm == oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY);

    let serial = x509.raw_serial();
    assert_eq!(serial.len(), 16);
    assert!(serial[0] & 0x80 == 0, "positive serial");

    let validity = x509.validity();
    let expected_end = OffsetDateTime::from(now) + DAY;
    assert!((validity.not_after.to_datetime() - expected_end).abs() < time::Duration::seconds(2));
    assert!(validity.not_before.to_datetime() < OffsetDateTime::from(now));

    let domains = [td("cluster.local")];
    let id = verify_svid(
        &chain,
        ca.ca.roots(),
        unix_now(),
        &domains,
        PeerRole::Client,
    )
    .unwrap();
    assert_eq!(id, spiffe(ID));
}

#[test]
fn serials_are_random() {
    let ca = TestCa::new("cluster.local");
    let a = verify::parse_certificate(&issue(&ca.ca, DAY)[0])
        .unwrap()
        .raw_serial()
        .to_vec();
    let b = verify::parse_certificate(&issue(&ca.ca, DAY)[0])
        .unwrap()
        .raw_serial()
        .to_vec();
    assert_ne!(a, b);
}

#[test]
fn leaf_never_outlives_the_ca() {
    let ca = TestCa::new("cluster.local");
    let chain = issue(&ca.ca, 30 * DAY);
    let leaf = verify::parse_certificate(&chain[0])
        .unwrap()
        .validity()
        .not_after
        .to_datetime();
    assert!(leaf <= ca.ca.not_after);
}

#[test]
fn refuses_zero_ttl() {
    let ca = TestCa::new("cluster.local");
    let err = ca
        .ca
        .sign(&csr_for(ID), &spiffe(ID), Duration::ZERO, SystemTime::now());
    assert!(matches!(err, Err(CaError::Ttl { .. })));
}

#[test]
fn refuses_identity_of_another_trust_domain() {
    let ca = TestCa::new("cluster.local");
    let other = "spiffe://other.example/ns/shop/sa/client";
    let err = ca
        .ca
        .sign(&csr_for(other), &spiffe(other), DAY, SystemTime::now());
    assert!(matches!(err, Err(CaError::ForeignTrustDomain { .. })));
}

#[test]
fn refuses_csr_naming_another_identity() {
    let ca = TestCa::new("cluster.local");
    let csr = csr_for("spiffe://cluster.local/ns/shop/sa/admin");
    let err = ca
        .ca
        .sign(&csr, &spiffe(ID), DAY, SystemTime::now())
        .unwrap_err();
    assert!(
        matches!(
            err,
            CaError::Csr {
                source: CsrError::ForeignSan { .. },
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.is_bad_request());
}

#[test]
fn intermediate_sends_its_certificate_with_each_leaf() {
    let root = TestCa::new("cluster.local");
    let intermediate = root.intermediate();
    let chain = issue(&intermediate.ca, DAY);
    assert_eq!(chain.len(), 2);
    assert_eq!(chain[1], intermediate.ca.chain()[0]);
    let domains = [td("cluster.local")];
    verify_svid(
        &chain,
        root.ca.roots(),
        unix_now(),
        &domains,
        PeerRole::Server,
    )
    .unwrap();
}

/// Operator material made with rcgen: (root cert, intermediate cert, intermediate key) PEM.
fn operator_material(now: SystemTime) -> (String, String, String) {
    let td = td("cluster.local");
    let root_key = KeyPair::generate().unwrap();
    let root_params = ca_params(&td, "root", BasicConstraints::Unconstrained, DAY, now).unwrap();
    let root = root_params.self_signed(&root_key).unwrap();
    let root_issuer = Issuer::new(root_params, root_key);
    let key = KeyPair::generate().unwrap();
    let mut params = ca_params(
        &td,
        "intermediate",
        BasicConstraints::Constrained(0),
        DAY,
        now,
    )
    .unwrap();
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, &root_issuer).unwrap();
    (root.pem(), cert.pem(), key.serialize_pem())
}

#[test]
fn loads_operator_material_and_issues() {
    let now = SystemTime::now();
    let (root, cert, key) = operator_material(now);
    let ca = CertificateAuthority::from_pem(td("cluster.local"), &cert, &key, &root, now).unwrap();
    assert_eq!(ca.roots().roots().len(), 1);
    assert_eq!(ca.chain().len(), 1);
    let chain = issue(&ca, DAY);
    let roots = TrustBundle::from_pem(&root).unwrap();
    verify_svid(
        &chain,
        &roots,
        unix_now(),
        &[td("cluster.local")],
        PeerRole::Client,
    )
    .unwrap();
}

#[test]
fn loads_a_root_alone() {
    let now = SystemTime::now();
    let key = KeyPair::generate().unwrap();
    let params = ca_params(
        &td("cluster.local"),
        "root",
        BasicConstraints::Unconstrained,
        DAY,
        now,
    )
    .unwrap();
    let cert = params.self_signed(&key).unwrap();
    let ca = CertificateAuthority::from_pem(
        td("cluster.local"),
        &cert.pem(),
        &key.serialize_pem(),
        "",
        now,
    )
    .unwrap();
    assert!(ca.chain().is_empty());
    assert_eq!(issue(&ca, DAY).len(), 1);
}

#[test]
fn refuses_material_without_its_root() {
    let now = SystemTime::now();
    let (_, cert, key) = operator_material(now);
    let err =
        CertificateAuthority::from_pem(td("cluster.local"), &cert, &key, "", now).unwrap_err();
    assert!(
        matches!(
            err,
            CaError::Roots {
                source: BundleError::Empty
            }
        ),
        "{err:?}"
    );
}

#[test]
fn refuses_a_key_that_does_not_match() {
    let now = SystemTime::now();
    let (root, cert, _) = operator_material(now);
    let other = KeyPair::generate().unwrap().serialize_pem();
    let err = CertificateAuthority::from_pem(td("cluster.local"), &cert, &other, &root, now);
    assert!(matches!(err, Err(CaError::KeyMismatch)));
}

#[test]
fn refuses_a_leaf_as_ca_certificate() {
    let now = SystemTime::now();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["leaf.example".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let err = CertificateAuthority::from_pem(
        td("cluster.local"),
        &cert.pem(),
        &key.serialize_pem(),
        "",
        now,
    );
    assert!(matches!(err, Err(CaError::Unusable { .. })));
}

#[test]
fn refuses_an_expired_ca() {
    let now = SystemTime::now();
    let (root, cert, key) = operator_material(now);
    let later = now + 2 * DAY;
    let err = CertificateAuthority::from_pem(td("cluster.local"), &cert, &key, &root, later);
    assert!(matches!(err, Err(CaError::NotValidNow)));
}

#[test]
fn refuses_garbage_pem() {
    let now = SystemTime::now();
    let (root, cert, _) = operator_material(now);
    let err = CertificateAuthority::from_pem(td("cluster.local"), &cert, "nope", &root, now);
    assert!(matches!(err, Err(CaError::Pem { what: "ca key", .. })));
}

#[test]
fn debug_does_not_print_the_key() {
    let ca = TestCa::new("cluster.local");
    let shown = format!("{:?}", ca.ca);
    assert!(shown.contains("cluster.local"), "{shown}");
    assert!(!shown.to_lowercase().contains("private"), "{shown}");
}
