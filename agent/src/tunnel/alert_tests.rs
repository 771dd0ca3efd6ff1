//! Loopback tests: the tunnel server keeps the TLS alert a client ended the handshake with.
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use super::client::Tunnel;
use super::server::{accept_tls, ServerLimits};
use super::Error;
use crate::error::error_chain;
use crate::identity::testing::TestCa;
use crate::identity::{client_config, server_config, SpiffeId, TrustDomain};

const CLIENT: &str = "spiffe://cluster.local/ns/default/sa/client";
const SERVER: &str = "spiffe://cluster.local/ns/default/sa/server";

/// Accepts one connection on a tunnel server with `SERVER`'s SVID while `client` runs against
/// it; returns the server's handshake error.
async fn server_error<F, Fut>(ca: &TestCa, client: F) -> Error
where
    F: FnOnce(std::net::SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let tds: Arc<[TrustDomain]> = Arc::from(vec!["cluster.local".parse::<TrustDomain>().unwrap()]);
    let tls = Arc::new(server_config(&ca.svid(SERVER), Arc::new(ca.bundle()), tds).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (tcp, peer) = listener.accept().await.unwrap();
        accept_tls(tcp, peer, tls, ServerLimits::default().handshake_timeout).await
    });
    client(addr).await;
    match server.await.unwrap() {
        Ok(_) => panic!("the server accepted the handshake"),
        Err(e) => e,
    }
}

#[tokio::test]
async fn a_client_refusing_the_server_certificate_leaves_its_alert_in_the_server_error() {
    let ca = TestCa::new("cluster.local");
    let tds: Arc<[TrustDomain]> = Arc::from(vec!["cluster.local".parse::<TrustDomain>().unwrap()]);
    // The client expects another identity than the server proves: it refuses the certificate.
    let wrong: SpiffeId = "spiffe://cluster.local/ns/default/sa/someone-else"
        .parse()
        .unwrap();
    let cfg = Arc::new(client_config(&ca.svid(CLIENT), Arc::new(ca.bundle()), tds, wrong).unwrap());
    let e = server_error(&ca, |addr| async move {
        let tcp = TcpStream::connect(addr).await.unwrap();
        assert!(Tunnel::handshake(tcp, addr, cfg).await.is_err());
    })
    .await;
    assert_eq!(e.reason(), crate::reason::Reason::TlsHandshake, "{e}");
    assert_eq!(
        e.peer_alert(),
        Some(rustls::AlertDescription::CertificateUnknown),
        "{}",
        error_chain(&e)
    );
    let chain = error_chain(&e);
    assert!(
        chain.ends_with("received fatal alert: CertificateUnknown"),
        "{chain}"
    );

    // A client that is not TLS at all sends no alert: none is reported.
    let e = server_error(&ca, |addr| async move {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let _ = tcp.shutdown().await;
    })
    .await;
    assert_eq!(e.reason(), crate::reason::Reason::TlsHandshake, "{e}");
    assert_eq!(e.peer_alert(), None, "{}", error_chain(&e));
}
