//! `CreateCertificate` decisions: node authentication and authorization, CSR abuse, signing.
use std::path::Path;
use std::time::{Duration, SystemTime};

use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, IsCa, KeyPair, SanType};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, UnixTime};

use super::*;
use crate::ca::testing::{spiffe, Fixture, AGENT_NS};
use crate::identity::{new_csr, verify_svid, PeerRole};
use ambit_testbed::issuer::ServiceAccountClaims;

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const DB: &str = "spiffe://cluster.local/ns/shop/sa/db";

fn fixture() -> Fixture {
    Fixture::new(Duration::from_secs(3600))
}

fn csr_pem(id: &str) -> String {
    let generated = new_csr(&spiffe(id)).unwrap();
    pem_block("CERTIFICATE REQUEST", generated.csr.as_ref())
}

/// A CSR for `id` edited by `edit` (extra SANs, CA bits).
fn crafted_csr(id: &str, edit: impl FnOnce(&mut CertificateParams)) -> String {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(id.to_owned().try_into().unwrap())];
    edit(&mut params);
    params.serialize_request(&key).unwrap().pem().unwrap()
}

fn request(csr: String, id: &str) -> IstioCertificateRequest {
    IstioCertificateRequest::impersonating(csr, 600, id)
}

fn ask(f: &Fixture, node: &str, request: &IstioCertificateRequest) -> Result<Signed, Refusal> {
    let bearer = format!("Bearer {}", f.token(node));
    f.service.create_certificate(
        None,
        Some(&bearer),
        ClusterHeader::Absent,
        request,
        SystemTime::now(),
    )
}

fn unix_now() -> UnixTime {
    UnixTime::since_unix_epoch(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap(),
    )
}

#[test]
fn signs_identity_of_pod_on_callers_node_with_that_san() {
    let f = fixture();
    let issued = ask(&f, "node1", &request(csr_pem(WEB), WEB)).unwrap();
    let entries = &issued.response.cert_chain;
    assert_eq!(
        entries.len(),
        2,
        "leaf, then roots (the root signs directly)"
    );
    let chain: Vec<CertificateDer<'static>> = entries[..1]
        .iter()
        .map(|pem| CertificateDer::from_pem_slice(pem.as_bytes()).unwrap())
        .collect();
    let roots = TrustBundle::from_pem(entries.last().unwrap()).unwrap();
    assert_eq!(roots.roots(), f.roots.roots());
    let domains = ["cluster.local".parse().unwrap()];
    for role in [PeerRole::Client, PeerRole::Server] {
        let id = verify_svid(&chain, &roots, unix_now(), &domains, role).unwrap();
        assert_eq!(id, spiffe(WEB));
    }
    assert_eq!(issued.ttl, Duration::from_secs(600));
    assert_eq!(f.service.stats().snapshot().issued, 1);
}

#[test]
fn refuses_identity_that_lives_only_on_another_node() {
    let f = fixture();
    let err = ask(&f, "node1", &request(csr_pem(DB), DB)).unwrap_err();
    assert!(matches!(err, Refusal::NotOnNode { .. }), "{err}");
    assert_eq!(err.code(), Code::PermissionDenied);
    let message = chain(&err);
    assert!(
        message.contains("node1") && message.contains(DB),
        "{message}"
    );
    // The node that hosts it may.
    ask(&f, "node2", &request(csr_pem(DB), DB)).unwrap();
    assert_eq!(
        f.service.stats().snapshot().refused.get("not_on_node"),
        Some(&1)
    );
}

#[test]
fn follows_the_inventory_when_a_pod_moves() {
    let f = fixture();
    assert!(ask(&f, "node3", &request(csr_pem(DB), DB)).is_err());
    let moved = crate::ca::testing::INVENTORY.replace("nodeName: node2", "nodeName: node3");
    let snapshot = crate::inventory::file::parse(Path::new("i.yaml"), &moved).unwrap();
    f.inventory.send_replace(Arc::new(snapshot));
    ask(&f, "node3", &request(csr_pem(DB), DB)).unwrap();
    assert!(ask(&f, "node2", &request(csr_pem(DB), DB)).is_err());
}

#[test]
fn refuses_missing_or_bad_token_as_unauthenticated() {
    let f = fixture();
    let req = request(csr_pem(WEB), WEB);
    for header in [
        None,
        Some("Basic abc"),
        Some("Bearer "),
        Some("Bearer not.a.jwt"),
    ] {
        let err = f
            .service
            .create_certificate(None, header, ClusterHeader::Absent, &req, SystemTime::now())
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{header:?}: {err}");
    }
    let stats = f.service.stats().snapshot();
    assert_eq!(stats.refused.get("missing_token"), Some(&3));
    assert_eq!(stats.refused.get("bad_token"), Some(&1));
    assert_eq!(stats.issued, 0);
}

#[test]
fn refuses_token_of_another_service_account_as_permission_denied() {
    let f = fixture();
    let token = f
        .issuer
        .token(&ServiceAccountClaims {
            namespace: "shop".into(),
            service_account: "web".into(),
            node: "node1".into(),
            audiences: vec!["ambit-ca".into()],
            issued_at: SystemTime::now(),
            ttl: Duration::from_secs(600),
        })
        .unwrap();
    let bearer = format!("Bearer {token}");
    let err = f
        .service
        .create_certificate(
            None,
            Some(&bearer),
            ClusterHeader::Absent,
            &request(csr_pem(WEB), WEB),
            SystemTime::now(),
        )
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    assert!(
        chain(&err).contains("system:serviceaccount:shop:web"),
        "{}",
        chain(&err)
    );
    assert_ne!(AGENT_NS, "shop");
}

#[test]
fn refuses_request_without_impersonated_identity() {
    let f = fixture();
    let req = IstioCertificateRequest {
        csr: csr_pem(WEB),
        validity_duration: 0,
        metadata: None,
    };
    let err = ask(&f, "node1", &req).unwrap_err();
    assert!(matches!(err, Refusal::NoImpersonation { .. }), "{err}");
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[test]
fn refuses_malformed_or_foreign_identity() {
    let f = fixture();
    let err = ask(
        &f,
        "node1",
        &request(csr_pem(WEB), "spiffe://cluster.local/ns/shop"),
    )
    .unwrap_err();
    assert!(matches!(err, Refusal::BadIdentity { .. }), "{err}");
    let foreign = "spiffe://other.domain/ns/shop/sa/web";
    let err = ask(&f, "node1", &request(csr_pem(foreign), foreign)).unwrap_err();
    assert!(matches!(err, Refusal::ForeignTrustDomain { .. }), "{err}");
    assert_eq!(err.code(), Code::PermissionDenied);
}

#[test]
fn refuses_csr_with_extra_sans() {
    let f = fixture();
    let cases = [
        crafted_csr(WEB, |p| {
            p.subject_alt_names
                .push(SanType::DnsName("evil.example".try_into().unwrap()))
        }),
        crafted_csr(WEB, |p| {
            p.subject_alt_names
                .push(SanType::URI(DB.try_into().unwrap()))
        }),
        crafted_csr(DB, |_| {}),
        crafted_csr(WEB, |p| {
            p.subject_alt_names
                .push(SanType::IpAddress("10.0.2.5".parse().unwrap()))
        }),
    ];
    for csr in cases {
        let err = ask(&f, "node1", &request(csr, WEB)).unwrap_err();
        assert!(
            matches!(&err, Refusal::Csr { source, .. } if matches!(**source, CsrError::ForeignSan { .. })),
            "{err}"
        );
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(chain(&err).contains("san"), "{}", chain(&err));
    }
    assert_eq!(
        f.service.stats().snapshot().refused.get("bad_csr"),
        Some(&4)
    );
}

#[test]
fn refuses_csr_asking_for_ca_powers() {
    let f = fixture();
    let csr = crafted_csr(WEB, |p| p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained));
    let err = ask(&f, "node1", &request(csr, WEB)).unwrap_err();
    assert!(
        matches!(&err, Refusal::Csr { source, .. } if matches!(**source, CsrError::CaRequested { .. })),
        "{err}"
    );
    let csr = crafted_csr(WEB, |p| {
        p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign]
    });
    let err = ask(&f, "node1", &request(csr, WEB)).unwrap_err();
    assert!(
        matches!(&err, Refusal::Csr { source, .. } if matches!(**source, CsrError::CaRequested { .. })),
        "{err}"
    );
}

#[test]
fn refuses_garbage_and_oversized_csrs() {
    let f = fixture();
    let oversized = format!(
        "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
        "QUFB".repeat(17 * 1024)
    );
    assert!(oversized.len() > 64 * 1024);
    let truncated = {
        let pem = csr_pem(WEB);
        pem[..pem.len() / 2].to_owned()
    };
    for csr in [String::new(), "garbage".into(), truncated, oversized] {
        let err = ask(&f, "node1", &request(csr, WEB)).unwrap_err();
        assert!(matches!(err, Refusal::Csr { .. }), "{err}");
        assert_eq!(err.code(), Code::InvalidArgument);
    }
    let err = ask(&f, "node1", &request("x".repeat(70 * 1024), WEB)).unwrap_err();
    assert!(chain(&err).contains("bytes, at most"), "{}", chain(&err));
}

#[test]
fn caps_ttl_and_refuses_negative_ttl() {
    let f = Fixture::new(Duration::from_secs(120));
    let long = IstioCertificateRequest::impersonating(csr_pem(WEB), 86_400, WEB);
    assert_eq!(
        ask(&f, "node1", &long).unwrap().ttl,
        Duration::from_secs(120)
    );
    let negative = IstioCertificateRequest::impersonating(csr_pem(WEB), -5, WEB);
    let err = ask(&f, "node1", &negative).unwrap_err();
    assert!(matches!(err, Refusal::NegativeTtl { .. }), "{err}");
}

#[test]
fn checks_cluster_id_as_istiod_does() {
    let ask_in = |f: &Fixture, cluster: ClusterHeader<'_>| {
        let bearer = format!("Bearer {}", f.token("node1"));
        f.service.create_certificate(
            None,
            Some(&bearer),
            cluster,
            &request(csr_pem(WEB), WEB),
            SystemTime::now(),
        )
    };
    // Default, as istiod: its own cluster (`Kubernetes`) or none at all.
    let f = fixture();
    ask_in(&f, ClusterHeader::Absent).unwrap();
    ask_in(&f, ClusterHeader::Value(DEFAULT_CLUSTER_ID)).unwrap();
    let err = ask_in(&f, ClusterHeader::Value("west")).unwrap_err();
    assert!(matches!(err, Refusal::ForeignCluster { .. }), "{err}");
    assert_eq!(err.code(), Code::Unauthenticated);

    // Configured to require it.
    let f = Fixture::in_cluster(
        Duration::from_secs(3600),
        ClusterPolicy {
            id: "east".into(),
            required: true,
        },
    );
    ask_in(&f, ClusterHeader::Value("east")).unwrap();
    let err = ask_in(&f, ClusterHeader::Absent).unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(
        chain(&err),
        "node node1 (system:serviceaccount:ambit-system:ambit): request has no ClusterID \
         metadata; this ca requires cluster id \"east\""
    );
    let err = ask_in(&f, ClusterHeader::Value("west")).unwrap_err();
    assert!(
        chain(&err).contains("sent ClusterID \"west\": this ca serves cluster \"east\" only"),
        "{}",
        chain(&err)
    );
    let err = ask_in(&f, ClusterHeader::Unreadable).unwrap_err();
    assert!(matches!(err, Refusal::BadClusterId { .. }), "{err}");
    // An unauthenticated caller learns nothing about clusters.
    let err = f
        .service
        .create_certificate(
            None,
            None,
            ClusterHeader::Value("west"),
            &request(csr_pem(WEB), WEB),
            SystemTime::now(),
        )
        .unwrap_err();
    assert!(matches!(err, Refusal::MissingToken), "{err}");
    let stats = f.service.stats().snapshot();
    for reason in ["missing_cluster_id", "foreign_cluster", "bad_cluster_id"] {
        assert_eq!(stats.refused.get(reason), Some(&1), "{reason}: {stats:?}");
    }
    assert_eq!(stats.issued, 1);
}

#[test]
fn reads_cluster_id_from_grpc_metadata_like_istiod() {
    let mut metadata = MetadataMap::new();
    assert_eq!(
        ClusterHeader::from_metadata(&metadata),
        ClusterHeader::Absent
    );
    // ztunnel writes `ClusterID`; header names travel lowercase.
    let key = tonic::metadata::MetadataKey::from_bytes(b"ClusterID").unwrap();
    metadata.insert(key.clone(), "east".parse().unwrap());
    assert_eq!(
        ClusterHeader::from_metadata(&metadata),
        ClusterHeader::Value("east")
    );
    metadata.append(key, "west".parse().unwrap());
    assert_eq!(
        ClusterHeader::from_metadata(&metadata),
        ClusterHeader::Unreadable
    );
}

#[test]
fn new_material_signs_the_next_request_and_its_roots_are_sent() {
    let f = fixture();
    let before = ask(&f, "node1", &request(csr_pem(WEB), WEB)).unwrap();
    let new_root = CertificateAuthority::generate_root(
        "cluster.local".parse().unwrap(),
        Duration::from_secs(3600),
        SystemTime::now(),
    )
    .unwrap();
    // Both roots sent, the new one signs.
    let both = new_root.roots().merged(&f.roots);
    let new_roots = new_root.roots().clone();
    f.service.set_material(new_root, &both);
    let after = ask(&f, "node1", &request(csr_pem(WEB), WEB)).unwrap();
    let leaf =
        |s: &Signed| CertificateDer::from_pem_slice(s.response.cert_chain[0].as_bytes()).unwrap();
    let verifies = |s: &Signed, roots: &TrustBundle| {
        verify_svid(
            &[leaf(s)],
            roots,
            unix_now(),
            &["cluster.local".parse().unwrap()],
            PeerRole::Client,
        )
        .is_ok()
    };
    assert!(verifies(&before, &f.roots) && !verifies(&before, &new_roots));
    assert!(verifies(&after, &new_roots) && !verifies(&after, &f.roots));
    let sent = TrustBundle::from_pem(after.response.cert_chain.last().unwrap()).unwrap();
    assert_eq!(sent.roots(), both.roots());
}
