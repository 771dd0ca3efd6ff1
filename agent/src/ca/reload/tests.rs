//! A root rotation through `certDir` on a running CA, over real TLS and gRPC.
use std::future::Future;
use std::net::SocketAddr;

use rustls_pki_types::UnixTime;

use super::*;
use crate::ca::testing::{spiffe, Fixture, TestDir};
use crate::identity::{verify_svid, CaClient, ClientError, PeerRole, TrustBundle};

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";

fn write(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn eventually<F: FnMut() -> Fut, Fut: Future<Output = bool>>(what: &str, mut check: F) {
    for _ in 0..200 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for {what}");
}

fn signed_under(issued: &crate::identity::ca_client::Issued, roots: &TrustBundle) -> bool {
    verify_svid(
        issued.certificate.chain(),
        roots,
        UnixTime::now(),
        &["cluster.local".parse().unwrap()],
        PeerRole::Client,
    )
    .is_ok()
}

#[tokio::test]
async fn a_root_rotates_through_cert_dir_without_a_restart() {
    let f = Fixture::new(Duration::from_secs(3600));
    let ca = f.start(SocketAddr::from(([127, 0, 0, 1], 0))).await;
    let certs = f.dir.path().join("certs");
    let names = ServingNames {
        dns: vec!["ambit-ca".into()],
        ips: vec!["127.0.0.1".parse().unwrap()],
    };
    let reload = Reload {
        dir: certs.clone(),
        trust_domain: "cluster.local".parse().unwrap(),
        names: names.clone(),
    };
    let task = tokio::spawn(reload.follow(
        Files::read(&certs),
        Duration::from_millis(50),
        f.service.clone(),
        ca.serving(),
    ));
    // The new root, generated elsewhere in the same layout.
    let next = TestDir::new("ca-next");
    Material::load(
        next.path(),
        Some(Duration::from_secs(3600)),
        "cluster.local".parse().unwrap(),
        &names,
        SystemTime::now(),
    )
    .unwrap();
    let read = |dir: &Path, name: &str| std::fs::read(dir.join(name)).unwrap();
    let old_pem = read(&certs, ROOT_CERT);
    let new_pem = read(next.path(), ROOT_CERT);
    let old = TrustBundle::from_pem(std::str::from_utf8(&old_pem).unwrap()).unwrap();
    let new = TrustBundle::from_pem(std::str::from_utf8(&new_pem).unwrap()).unwrap();
    let both_pem = [old_pem.clone(), new_pem.clone()].concat();
    let stats = || f.service.stats().snapshot();
    let reloaded = |n: u64| move || async move { stats().material_reloaded == n };
    // The agent side trusts the CA's root-cert.pem, as on the testbed.
    let client = CaClient::new(f.client_config(ca.local_addr(), "node1")).unwrap();

    // 1. Both roots published: sent with every certificate; the old root still signs.
    write(&certs.join(ROOT_CERT), &both_pem);
    eventually("the first reload", reloaded(1)).await;
    let issued = client.fetch(&spiffe(WEB)).await.unwrap();
    assert_eq!(issued.roots.roots(), old.merged(&new).roots());
    assert!(signed_under(&issued, &old) && !signed_under(&issued, &new));

    // A half-done switch (new certificate, old key) is refused; the old material signs on.
    write(&certs.join(CA_CERT), &read(next.path(), CA_CERT));
    eventually("the rejection", || async { stats().material_rejected == 1 }).await;
    let issued = client.fetch(&spiffe(WEB)).await.unwrap();
    assert!(signed_under(&issued, &old));

    // 2. The new key and chain: the new root signs, and the CA serves under it (a client
    // trusting only the new root reaches it).
    write(&certs.join(CERT_CHAIN), &read(next.path(), CERT_CHAIN));
    write(&certs.join(CA_KEY), &read(next.path(), CA_KEY));
    eventually("the second reload", reloaded(2)).await;
    let issued = client.fetch(&spiffe(WEB)).await.unwrap();
    assert!(signed_under(&issued, &new) && !signed_under(&issued, &old));
    let only_new = next.path().join("trust-new.pem");
    std::fs::write(&only_new, &new_pem).unwrap();
    let mut cfg = f.client_config(ca.local_addr(), "node2");
    cfg.root_cert = only_new;
    let strict = CaClient::new(cfg).unwrap();
    let err = strict.fetch(&spiffe(WEB)).await.unwrap_err();
    assert!(
        matches!(err, ClientError::Refused { .. }),
        "the tls channel under the new root works (refusal is node authorization): {err}"
    );

    // 3. The old root removed: only the new one is sent.
    write(&certs.join(ROOT_CERT), &new_pem);
    eventually("the third reload", reloaded(3)).await;
    let issued = client.fetch(&spiffe(WEB)).await.unwrap();
    assert_eq!(issued.roots.roots(), new.roots());
    assert_eq!(stats().material_rejected, 1);
    task.abort();
}
