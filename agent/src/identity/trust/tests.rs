use std::collections::HashMap;
use std::io;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::*;
use crate::identity::testing::{spiffe, td, TestCa};
use crate::identity::{client_config, server_name, SpiffeId, WorkloadCertificate};

const CLIENT: &str = "spiffe://cluster.local/ns/shop/sa/client";
const SERVER: &str = "spiffe://cluster.local/ns/shop/sa/server";

fn domains() -> Arc<[crate::identity::TrustDomain]> {
    Arc::from(vec![td("cluster.local")])
}

/// A TLS source serving `certs` and trusting `roots` (the root file's).
fn source(certs: Vec<WorkloadCertificate>, roots: TrustBundle) -> TlsSource {
    let certs: HashMap<SpiffeId, Arc<WorkloadCertificate>> = certs
        .into_iter()
        .map(|c| (c.id().clone(), Arc::new(c)))
        .collect();
    TlsSource::new(
        Arc::new(move |id: &SpiffeId| certs.get(id).cloned()),
        roots,
        vec![td("cluster.local")],
    )
}

fn write(path: &Path, text: &str) {
    // Replace, as kubelet does (a new file swapped in), never a partial write.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Whether the server side of `tls` accepts a client presenting `client` (which itself trusts
/// `client_roots`): a real TLS 1.3 handshake over an in-memory pipe, one byte each way.
async fn accepts(
    tls: &TlsSource,
    client: &WorkloadCertificate,
    client_roots: &TrustBundle,
) -> bool {
    let server = tls.server(&spiffe(SERVER)).unwrap();
    let client = client_config(
        client,
        Arc::new(client_roots.clone()),
        domains(),
        spiffe(SERVER),
    )
    .unwrap();
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let acceptor = TlsAcceptor::from(Arc::new(server));
    let connector = TlsConnector::from(Arc::new(client));
    let server = async move {
        let mut tls = acceptor.accept(server_io).await?;
        let mut buf = [0u8; 1];
        tls.read_exact(&mut buf).await?;
        tls.write_all(&buf).await?;
        tls.flush().await?;
        Ok::<_, io::Error>(())
    };
    let client = async move {
        let mut tls = connector.connect(server_name(), client_io).await?;
        tls.write_all(b"x").await?;
        tls.flush().await?;
        let mut buf = [0u8; 1];
        tls.read_exact(&mut buf).await?;
        Ok::<_, io::Error>(())
    };
    let (server, client) = tokio::join!(server, client);
    server.is_ok() && client.is_ok()
}

#[test]
fn a_changed_file_replaces_the_file_roots() {
    let dir = TempDir::new("trust");
    let path = dir.0.join("root-cert.pem");
    let (a, b) = (TestCa::new("cluster.local"), TestCa::new("cluster.local"));
    let text_a = a.bundle().to_pem();
    write(&path, &text_a);
    let tls = source(Vec::new(), a.bundle());
    let reloads = Reloads::default();
    let mut file = RootFile::new(path.clone(), text_a, reloads.clone());
    assert!(matches!(file.check(), Check::Unchanged));

    let both = a.bundle().merged(&b.bundle());
    write(&path, &both.to_pem());
    file.apply(&tls);
    assert_eq!(
        tls.roots().roots(),
        both.roots(),
        "old and new root trusted"
    );
    assert!(
        matches!(file.check(), Check::Unchanged),
        "read once per change"
    );

    write(&path, &b.bundle().to_pem());
    file.apply(&tls);
    assert_eq!(
        tls.roots().roots(),
        b.bundle().roots(),
        "the old root is gone"
    );
    assert_eq!(reloads.value("applied"), 2);
    assert_eq!(reloads.value("rejected"), 0);
}

#[test]
fn a_bad_file_keeps_the_last_good_roots() {
    let dir = TempDir::new("trust");
    let path = dir.0.join("root-cert.pem");
    let (a, b) = (TestCa::new("cluster.local"), TestCa::new("cluster.local"));
    let good = a.bundle().merged(&b.bundle());
    write(&path, &good.to_pem());
    let tls = source(Vec::new(), good.clone());
    let reloads = Reloads::default();
    let mut file = RootFile::new(path.clone(), good.to_pem(), reloads.clone());

    for bad in [
        "",
        "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n",
        "-----BEGIN CERTIFICATE-----\nnot base64 at all\n",
    ] {
        write(&path, bad);
        let check = file.check();
        assert!(
            matches!(check, Check::Rejected(TrustError::Bundle { .. })),
            "{bad:?}: {check:?}"
        );
        file.apply(&tls);
        assert_eq!(
            tls.roots().roots(),
            good.roots(),
            "{bad:?} replaced the roots"
        );
    }
    // The same bad text again is not news; a missing file is, once.
    assert!(matches!(file.check(), Check::Unchanged));
    std::fs::remove_file(&path).unwrap();
    assert!(matches!(
        file.check(),
        Check::Rejected(TrustError::Read { .. })
    ));
    assert!(matches!(file.check(), Check::Unchanged));
    file.apply(&tls);
    assert_eq!(tls.roots().roots(), good.roots());

    // Back with good text: applied.
    write(&path, &b.bundle().to_pem());
    file.apply(&tls);
    assert_eq!(tls.roots().roots(), b.bundle().roots());
    assert_eq!(reloads.value("applied"), 1);

    // What `apply` finds is counted in the handle it was given.
    write(&path, "");
    file.apply(&tls);
    assert_eq!(reloads.value("rejected"), 1);
    std::fs::remove_file(&path).unwrap();
    file.apply(&tls);
    assert_eq!(reloads.value("unreadable"), 1);
    assert_eq!(tls.roots().roots(), b.bundle().roots());
}

#[tokio::test]
async fn both_roots_are_trusted_during_a_rotation_and_the_old_one_not_after() {
    let dir = TempDir::new("trust");
    let path = dir.0.join("root-cert.pem");
    let (old, new) = (TestCa::new("cluster.local"), TestCa::new("cluster.local"));
    let both = old.bundle().merged(&new.bundle());
    let (client_old, client_new) = (old.svid(CLIENT), new.svid(CLIENT));
    write(&path, &old.bundle().to_pem());
    let tls = source(vec![new.svid(SERVER)], old.bundle());
    let mut file = RootFile::new(path.clone(), old.bundle().to_pem(), Reloads::default());

    // Before: only the old root.
    assert!(accepts(&tls, &client_old, &both).await);
    assert!(
        !accepts(&tls, &client_new, &both).await,
        "a root nobody trusts yet was accepted"
    );

    // Step 1: the new root added; both trusted.
    write(&path, &both.to_pem());
    file.apply(&tls);
    assert!(accepts(&tls, &client_old, &both).await);
    assert!(accepts(&tls, &client_new, &both).await);

    // The CA sends both roots with its certificates meanwhile.
    assert!(tls.set_ca_roots(Some(both.clone())) || tls.roots().roots() == both.roots());

    // Step 3: the old root removed from the file, while the CA still sends it: still trusted
    // until the CA stops sending it.
    write(&path, &new.bundle().to_pem());
    file.apply(&tls);
    assert!(accepts(&tls, &client_old, &both).await);
    assert!(
        tls.set_ca_roots(Some(new.bundle())),
        "the ca's roots changed"
    );
    assert_eq!(tls.roots().roots(), new.bundle().roots());
    assert!(
        !accepts(&tls, &client_old, &both).await,
        "the removed root is still trusted"
    );
    assert!(accepts(&tls, &client_new, &both).await);
}

#[tokio::test]
async fn follow_applies_file_changes_and_the_cas_roots() {
    let dir = TempDir::new("trust");
    let path = dir.0.join("root-cert.pem");
    let (a, b, c) = (
        TestCa::new("cluster.local"),
        TestCa::new("cluster.local"),
        TestCa::new("cluster.local"),
    );
    write(&path, &a.bundle().to_pem());
    let tls = Arc::new(source(Vec::new(), a.bundle()));
    let (ca_tx, ca_rx) = watch::channel(None);
    let task = tokio::spawn(follow(
        RootFile::new(path.clone(), a.bundle().to_pem(), Reloads::default()),
        Duration::from_millis(20),
        tls.clone(),
        ca_rx,
    ));
    let eventually = |want: Vec<_>| {
        let tls = tls.clone();
        async move {
            for _ in 0..200 {
                if tls.roots().roots() == want.as_slice() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("trust never became {} roots: {:?}", want.len(), tls.roots());
        }
    };
    write(&path, &b.bundle().to_pem());
    eventually(b.bundle().roots().to_vec()).await;
    ca_tx.send_replace(Some(c.bundle()));
    eventually(b.bundle().merged(&c.bundle()).roots().to_vec()).await;
    drop(ca_tx);
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("follow ends with the certificate manager")
        .unwrap();
}

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ambit-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
