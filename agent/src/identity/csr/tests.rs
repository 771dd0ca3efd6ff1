use rcgen::{BasicConstraints, CertificateParams, CustomExtension, KeyPair};

use super::*;
use crate::identity::testing::spiffe;

const ID: &str = "spiffe://cluster.local/ns/shop/sa/client";

/// A CSR for `ID` with its parameters changed by `edit`, signed by a fresh P-256 key.
fn csr_with(edit: impl FnOnce(&mut CertificateParams)) -> Vec<u8> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(ID.try_into().unwrap())];
    edit(&mut params);
    let key = KeyPair::generate().unwrap();
    params.serialize_request(&key).unwrap().der().to_vec()
}

#[test]
fn new_csr_parses_back_for_its_identity() {
    let id = spiffe(ID);
    let request = new_csr(&id).unwrap();
    let csr = Csr::from_der(&request.csr).unwrap();
    csr.check_sans(&id).unwrap();
    assert_eq!(csr.public_key().algorithm(), &rcgen::PKCS_ECDSA_P256_SHA256);
    assert!(matches!(request.key, PrivateKeyDer::Pkcs8(_)));
}

#[test]
fn new_csr_debug_hides_the_key() {
    let request = new_csr(&spiffe(ID)).unwrap();
    let shown = format!("{request:?}");
    assert!(shown.starts_with("NewCsr"), "{shown}");
    assert!(!shown.contains("key"), "{shown}");
}

#[test]
fn parses_pem() {
    let request = new_csr(&spiffe(ID)).unwrap();
    let pem = crate::identity::pem_block("CERTIFICATE REQUEST", &request.csr);
    Csr::from_pem(&pem)
        .unwrap()
        .check_sans(&spiffe(ID))
        .unwrap();
}

#[test]
fn accepts_csr_without_sans() {
    let der = csr_with(|p| p.subject_alt_names.clear());
    Csr::from_der(&der)
        .unwrap()
        .check_sans(&spiffe(ID))
        .unwrap();
}

#[test]
fn refuses_oversized_csr() {
    let der = vec![0u8; MAX_CSR_BYTES + 1];
    assert!(matches!(
        Csr::from_der(&der),
        Err(CsrError::Oversized { .. })
    ));
    let pem = "A".repeat(MAX_CSR_BYTES + 1);
    assert!(matches!(
        Csr::from_pem(&pem),
        Err(CsrError::Oversized { .. })
    ));
}

#[test]
fn refuses_garbage() {
    assert!(matches!(Csr::from_der(b"hello"), Err(CsrError::Malformed)));
    assert!(matches!(Csr::from_der(&[]), Err(CsrError::Malformed)));
    assert!(matches!(
        Csr::from_pem("not pem"),
        Err(CsrError::Pem { .. })
    ));
    let mut trailing = csr_with(|_| {});
    trailing.push(0);
    assert!(matches!(Csr::from_der(&trailing), Err(CsrError::Malformed)));
}

#[test]
fn refuses_csr_with_bad_signature() {
    let mut der = csr_with(|_| {});
    let last = der.len() - 1;
    der[last] ^= 0x01;
    assert!(matches!(Csr::from_der(&der), Err(CsrError::BadSignature)));
}

#[test]
fn refuses_csr_asking_for_a_ca() {
    let der = csr_with(|p| p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained));
    assert!(matches!(
        Csr::from_der(&der),
        Err(CsrError::CaRequested { .. })
    ));
    let der = csr_with(|p| p.key_usages = vec![KeyUsagePurpose::KeyCertSign]);
    assert!(matches!(
        Csr::from_der(&der),
        Err(CsrError::CaRequested {
            what: "keyCertSign"
        })
    ));
    let der = csr_with(|p| p.key_usages = vec![KeyUsagePurpose::CrlSign]);
    assert!(matches!(
        Csr::from_der(&der),
        Err(CsrError::CaRequested { what: "cRLSign" })
    ));
}

#[test]
fn refuses_unknown_extensions() {
    let der = csr_with(|p| {
        p.custom_extensions = vec![CustomExtension::from_oid_content(
            &[1, 3, 6, 1, 4, 1, 99],
            vec![5, 0],
        )];
    });
    assert!(matches!(
        Csr::from_der(&der),
        Err(CsrError::UnsupportedExtension)
    ));
}

#[test]
fn refuses_sans_other_than_the_identity() {
    let id = spiffe(ID);
    let other_uri = csr_with(|p| {
        p.subject_alt_names.push(SanType::URI(
            "spiffe://cluster.local/ns/shop/sa/admin"
                .try_into()
                .unwrap(),
        ));
    });
    let err = Csr::from_der(&other_uri)
        .unwrap()
        .check_sans(&id)
        .unwrap_err();
    assert!(matches!(err, CsrError::ForeignSan { .. }), "{err:?}");
    assert!(err.to_string().contains("sa/admin"), "{err}");

    let dns = csr_with(|p| {
        p.subject_alt_names
            .push(SanType::DnsName("shop".try_into().unwrap()))
    });
    let err = Csr::from_der(&dns).unwrap().check_sans(&id).unwrap_err();
    assert!(err.to_string().contains("dns:\"shop\""), "{err}");

    let ip = csr_with(|p| p.subject_alt_names = vec![SanType::IpAddress([10, 0, 0, 1].into())]);
    assert!(Csr::from_der(&ip).unwrap().check_sans(&id).is_err());
}
