//! The manager against a real in-process CA: prefetch, sharing, renewal, outage and recovery.
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use super::*;
use crate::ca::client::CaClient;
use crate::ca::testing::{spiffe, Fixture};

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
    assert!(m.roots().is_some());
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
