//! The manager against a real in-process CA: prefetch, sharing, renewal, outage and recovery.
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use super::*;
use crate::ca::material::{Material, ServingNames};
use crate::ca::server::{RunningCa, Tamper};
use crate::ca::testing::{spiffe, Fixture};
use crate::identity::ca_api::IstioCertificateResponse;
use crate::identity::ca_client::CaClient;
use crate::identity::pem_block;
use crate::identity::{CertificateAuthority, Csr};

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const DB: &str = "spiffe://cluster.local/ns/shop/sa/db";

fn fast() -> ManagerSettings {
    ManagerSettings {
        initial_backoff: Duration::from_millis(200),
        max_backoff: Duration::from_millis(800),
        min_renewal: Duration::from_millis(500),
    }
}

async fn manager(f: &Fixture, addr: SocketAddr, settings: ManagerSettings) -> CertManager {
    let client = CaClient::new(f.client_config(addr, "node1")).unwrap();
    CertManager::new(client, Handle::current(), settings)
}

/// Polls `check` every 50 ms until it holds, failing after `within`.
async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn status(m: &CertManager, id: &str) -> CertStatus {
    m.snapshot()
        .into_iter()
        .find(|s| s.identity == id)
        .expect("tracked identity")
}

#[tokio::test]
async fn prefetches_on_track_and_shares_one_certificate_per_identity() {
    let f = Fixture::new(Duration::from_secs(3600));
    let ca = f.start(SocketAddr::from(([127, 0, 0, 1], 0))).await;
    let m = manager(&f, ca.local_addr(), fast()).await;
    let web = spiffe(WEB);
    assert!(matches!(
        m.wait(&web, Duration::from_secs(1)).await,
        Err(CertWaitError::NotTracked { .. })
    ));

    m.track(&web);
    m.track(&web); // a second pod with the same service account
    let cert = m.wait(&web, Duration::from_secs(10)).await.unwrap();
    assert_eq!(cert.id(), &web);
    assert_eq!(m.get(&web).unwrap().serial(), cert.serial());
    assert_eq!(
        m.watch_roots()
            .borrow()
            .as_ref()
            .map(|r| r.roots().to_vec()),
        Some(f.roots.roots().to_vec()),
        "the ca's roots are published"
    );
    let s = status(&m, WEB);
    assert_eq!((s.state, s.pods, s.failures), (CertState::Available, 2, 0));
    assert_eq!(s.serial.as_deref(), Some(cert.serial()));
    assert!(s.not_after.is_some() && s.next_renewal.is_some() && s.last_error.is_none());
    assert_eq!(
        f.service.stats().snapshot().issued,
        1,
        "one certificate for both pods"
    );

    m.forget(&web);
    assert!(m.get(&web).is_some(), "one pod still uses it");
    m.forget(&web);
    assert!(m.get(&web).is_none());
    assert!(m.snapshot().is_empty());
}

#[tokio::test]
async fn reports_refusal_as_unavailable_with_the_reason() {
    let f = Fixture::new(Duration::from_secs(3600));
    let ca = f.start(SocketAddr::from(([127, 0, 0, 1], 0))).await;
    let m = manager(&f, ca.local_addr(), fast()).await;
    let db = spiffe(DB); // lives on node2; we are node1
    m.track(&db);
    let err = m.wait(&db, Duration::from_millis(600)).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("no pod with that identity runs on node node1"),
        "{err}"
    );
    let s = status(&m, DB);
    assert_eq!(s.state, CertState::Unavailable);
    assert!(s.failures >= 1 && s.serial.is_none());
}

#[tokio::test]
async fn renews_at_half_life() {
    // Certificates live 4 s: renewal is due about 2 s after issue.
    let f = Fixture::new(Duration::from_secs(4));
    let ca = f.start(SocketAddr::from(([127, 0, 0, 1], 0))).await;
    let m = manager(&f, ca.local_addr(), fast()).await;
    let web = spiffe(WEB);
    m.track(&web);
    let first = m.wait(&web, Duration::from_secs(10)).await.unwrap();
    eventually(Duration::from_secs(10), "a renewal", || async {
        status(&m, WEB).renewals >= 1
    })
    .await;
    let renewed = m.get(&web).unwrap();
    assert_ne!(renewed.serial(), first.serial());
    assert!(renewed.not_after() > first.not_after());
    // Renewed before the first one expired: there was no gap.
    assert!(renewed.not_before() < first.not_after());
    assert_eq!(status(&m, WEB).state, CertState::Available);
}

#[tokio::test]
async fn keeps_valid_certificate_while_ca_is_down_and_recovers() {
    let f = Fixture::new(Duration::from_secs(8));
    let ca = f.start(SocketAddr::from(([127, 0, 0, 1], 0))).await;
    let addr = ca.local_addr();
    let m = manager(&f, addr, fast()).await;
    let web = spiffe(WEB);
    m.track(&web);
    let first = m.wait(&web, Duration::from_secs(10)).await.unwrap();
    ca.stop().await;

    // Renewal (at ~4 s) fails; retries back off; the first certificate is still served.
    eventually(Duration::from_secs(10), "failed renewals", || async {
        status(&m, WEB).failures >= 2
    })
    .await;
    let s = status(&m, WEB);
    assert_eq!(s.state, CertState::Available);
    assert!(s.last_error.is_some());
    assert_eq!(m.get(&web).unwrap().serial(), first.serial());

    // The CA returns on the same address; the next retry succeeds.
    let _ca = f.start(addr).await;
    eventually(Duration::from_secs(10), "recovery", || async {
        let s = status(&m, WEB);
        s.failures == 0 && s.serial.as_deref() != Some(first.serial())
    })
    .await;
    let s = status(&m, WEB);
    assert_eq!(s.state, CertState::Available);
    assert!(s.last_error.is_none() && s.renewals >= 1);
}

/// What the tampering CA does to its answers.
const HONEST: u8 = 0;
/// Certifies `shop/db` under the real root instead of `shop/web`.
const WRONG_IDENTITY: u8 = 1;
/// Signs the CSR for the identity asked for, under a root nobody configured.
const FOREIGN_ROOT: u8 = 2;

/// A CA answering over real TLS and gRPC whose answers `mode` rewrites.
async fn tampering_ca(f: &Fixture, mode: Arc<std::sync::atomic::AtomicU8>) -> RunningCa {
    use std::sync::atomic::Ordering;
    let domain: crate::identity::TrustDomain = "cluster.local".parse().unwrap();
    let names = ServingNames {
        dns: vec!["ambit-ca".into()],
        ips: vec!["127.0.0.1".parse().unwrap()],
    };
    // The fixture's own root and key, loaded again from its directory.
    let real = Material::load(
        &f.dir.path().join("certs"),
        Some(Duration::from_secs(3600)),
        domain.clone(),
        &names,
        SystemTime::now(),
    )
    .unwrap()
    .authority;
    let foreign =
        CertificateAuthority::generate_root(domain, Duration::from_secs(3600), SystemTime::now())
            .unwrap();
    let tamper: Tamper = Arc::new(move |request, honest| {
        let (authority, id) = match mode.load(Ordering::SeqCst) {
            HONEST => return honest,
            WRONG_IDENTITY => (&real, spiffe(DB)),
            _ => (&foreign, spiffe(WEB)),
        };
        // The authority signs only what a CSR asks for: for another name, a CSR of its own
        // (the client compares names before it looks at the key).
        let csr = if id == spiffe(WEB) {
            Csr::from_pem(&request.csr).unwrap()
        } else {
            Csr::from_der(crate::identity::new_csr(&id).unwrap().csr.as_ref()).unwrap()
        };
        let chain = authority
            .sign(&csr, &id, Duration::from_secs(4), SystemTime::now())
            .unwrap();
        let mut cert_chain: Vec<String> =
            chain.iter().map(|c| pem_block("CERTIFICATE", c)).collect();
        cert_chain.push(authority.roots().to_pem());
        IstioCertificateResponse { cert_chain }
    });
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap();
    RunningCa::spawn_tampered(listener, f.service.clone(), f.serving.clone(), tamper).unwrap()
}

#[tokio::test]
async fn refuses_certificates_for_another_identity_or_root_and_keeps_the_previous_one() {
    use std::sync::atomic::{AtomicU8, Ordering};
    // Certificates live 4 s: the first renewal is due about 2 s after issue.
    let f = Fixture::new(Duration::from_secs(4));
    let mode = Arc::new(AtomicU8::new(HONEST));
    let ca = tampering_ca(&f, mode.clone()).await;
    let m = manager(&f, ca.local_addr(), fast()).await;
    let web = spiffe(WEB);
    m.track(&web);
    let first = m.wait(&web, Duration::from_secs(10)).await.unwrap();

    // The CA now certifies our key as shop/db: refused, counted, the first one still served.
    mode.store(WRONG_IDENTITY, Ordering::SeqCst);
    eventually(Duration::from_secs(10), "rejected answers", || async {
        status(&m, WEB).rejected >= 2
    })
    .await;
    let s = status(&m, WEB);
    let error = s.last_error.clone().unwrap_or_default();
    assert!(
        error.contains("issued spiffe://cluster.local/ns/shop/sa/db when spiffe://cluster.local/ns/shop/sa/web was asked for"),
        "{error}"
    );
    assert_eq!(s.serial.as_deref(), Some(first.serial()), "kept the first");
    assert_eq!(s.renewals, 0);
    assert!(s.failures >= 2, "{s:?}");
    if first.is_valid_at(SystemTime::now()) {
        assert_eq!(m.get(&web).unwrap().serial(), first.serial());
    }

    // The right name under a root nobody configured: refused as well.
    mode.store(FOREIGN_ROOT, Ordering::SeqCst);
    let before = status(&m, WEB).rejected;
    eventually(
        Duration::from_secs(10),
        "untrusted roots refused",
        || async {
            let s = status(&m, WEB);
            s.rejected > before
                && s.last_error
                    .as_deref()
                    .is_some_and(|e| e.contains("roots the agent does not trust"))
        },
    )
    .await;
    assert_eq!(status(&m, WEB).serial.as_deref(), Some(first.serial()));

    // Once the first certificate expired, a connection is refused at once, and counted.
    eventually(Duration::from_secs(10), "expiry", || async {
        !first.is_valid_at(SystemTime::now())
    })
    .await;
    let started = std::time::Instant::now();
    let err = m
        .for_connection(&web, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "waited {:?}",
        started.elapsed()
    );
    assert!(matches!(err, CertWaitError::Unavailable { .. }), "{err}");
    assert!(err.to_string().contains(WEB), "{err}");
    let s = status(&m, WEB);
    assert_eq!((s.state, s.refused), (CertState::Unavailable, 1), "{s:?}");

    // An honest CA again: a new certificate; the refusals stay counted.
    mode.store(HONEST, Ordering::SeqCst);
    eventually(Duration::from_secs(10), "recovery", || async {
        let s = status(&m, WEB);
        s.state == CertState::Available && s.serial.as_deref() != Some(first.serial())
    })
    .await;
    let s = status(&m, WEB);
    assert!(s.rejected >= 3 && s.failures == 0, "{s:?}");
    assert_eq!(
        m.for_connection(&web, Duration::from_secs(1))
            .await
            .unwrap()
            .id(),
        &web
    );
}

#[test]
fn renewal_is_due_at_half_life_within_five_percent() {
    let cert = crate::identity::testing::TestCa::new("cluster.local").svid(WEB);
    let lifetime = cert.not_after().duration_since(cert.not_before()).unwrap();
    let at_issue = |random| renewal_delay(&cert, cert.not_before(), random);
    assert_eq!(at_issue(0.5), lifetime / 2);
    assert!(at_issue(0.0) >= lifetime.mul_f64(0.449) && at_issue(0.0) < lifetime / 2);
    assert!(at_issue(0.999) > lifetime / 2 && at_issue(0.999) <= lifetime.mul_f64(0.551));
    // Past the renewal point: due now.
    assert_eq!(renewal_delay(&cert, cert.not_after(), 0.5), Duration::ZERO);
}

#[test]
fn backoff_jitter_and_renewal_stay_in_bounds() {
    let base = Duration::from_secs(10);
    assert_eq!(jittered(base, 0.0), Duration::from_secs(8));
    assert!(jittered(base, 0.999) < Duration::from_secs(12));
    let r = unit_random();
    assert!((0.0..1.0).contains(&r));
}
