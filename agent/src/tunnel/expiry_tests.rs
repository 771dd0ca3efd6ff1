//! Loopback tests of certificate expiry on open tunnels: real TLS 1.3 with short-lived SVIDs.
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{Method, Request, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::client::Tunnel;
use super::pool::Pool;
use super::server::{
    accept_tls, serve_connection, serve_h2, Authenticated, PendingConnect, ServerLimits,
    REFUSAL_HEADER,
};
use super::stream::H2Stream;
use crate::identity::testing::{TestCa, DAY};
use crate::identity::{client_config, server_config, TrustDomain, WorkloadCertificate};
use crate::reason::Reason;

const CLIENT: &str = "spiffe://cluster.local/ns/default/sa/client";
const SERVER: &str = "spiffe://cluster.local/ns/default/sa/server";
/// Lifetime of the short-lived certificates: long enough to set up a tunnel on a busy host.
const SHORT: Duration = Duration::from_secs(4);

/// Serializes the tests that count `certificate_expired` (the counter is process-wide).
static COUNTED: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn tds() -> Arc<[TrustDomain]> {
    Arc::from(vec!["cluster.local".parse::<TrustDomain>().unwrap()])
}

async fn echo(p: PendingConnect) {
    let mut s = p.accept().unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    s.write_all(&buf).await.unwrap();
    s.shutdown().await.unwrap();
}

/// An echoing HBONE server presenting `cert`. With `enforce` false it ignores certificate
/// expiry on open connections (as a peer that does not check would).
async fn server(ca: &TestCa, cert: WorkloadCertificate, enforce: bool) -> SocketAddr {
    let tls = Arc::new(server_config(&cert, Arc::new(ca.bundle()), tds()).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let drain_tx = crate::drain::Trigger::new();
    let drain_rx = drain_tx.signal();
    tokio::spawn(async move {
        let _keep = drain_tx;
        loop {
            let (tcp, peer) = listener.accept().await.unwrap();
            let (tls, drain) = (tls.clone(), drain_rx.clone());
            tokio::spawn(async move {
                let limits = ServerLimits::default();
                if enforce {
                    let _ = serve_connection(tcp, peer, tls, limits, drain, echo).await;
                } else if let Ok((s, auth)) =
                    accept_tls(tcp, peer, tls, limits.handshake_timeout).await
                {
                    let _ = serve_h2(s, peer, auth.id, limits, drain, echo).await;
                }
            });
        }
    });
    addr
}

async fn dial(ca: &TestCa, addr: SocketAddr, cert: &WorkloadCertificate) -> Tunnel {
    let tls = client_config(cert, Arc::new(ca.bundle()), tds(), SERVER.parse().unwrap());
    let tcp = TcpStream::connect(addr).await.unwrap();
    Tunnel::handshake(tcp, addr, Arc::new(tls.unwrap()))
        .await
        .unwrap()
}

async fn roundtrip(s: &mut H2Stream, msg: &[u8]) -> Vec<u8> {
    s.write_all(msg).await.unwrap();
    s.shutdown().await.unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).await.unwrap();
    got
}

/// Sleeps until `t` has passed on the wall clock, plus a margin.
async fn sleep_past(t: SystemTime) {
    let left = t.duration_since(SystemTime::now()).unwrap_or_default();
    tokio::time::sleep(left + Duration::from_millis(500)).await;
}

/// One side's certificate is short-lived: before it expires the connection carries streams;
/// after, a new stream is refused (503 or GOAWAY) while the stream opened before goes on.
async fn expiry_refuses_new_streams(client_short: bool) {
    let _counted = COUNTED.lock().await;
    let ca = TestCa::new("cluster.local");
    let (client_ttl, server_ttl) = if client_short {
        (SHORT, DAY)
    } else {
        (DAY, SHORT)
    };
    let client_cert = ca.svid_valid_for(CLIENT, client_ttl);
    let server_cert = ca.svid_valid_for(SERVER, server_ttl);
    let short_end = if client_short {
        client_cert.not_after()
    } else {
        server_cert.not_after()
    };
    let addr = server(&ca, server_cert, true).await;
    let mut t = dial(&ca, addr, &client_cert).await;
    assert_eq!(
        t.not_after(),
        Some(short_end),
        "client knows when the connection expires"
    );
    let mut before = t.connect("10.0.0.1:80".parse().unwrap()).await.unwrap();
    sleep_past(short_end).await;
    assert!(t.is_expired(SystemTime::now()));
    let after = t.connect("10.0.0.1:81".parse().unwrap()).await;
    match after {
        Err(super::Error::Status { status, .. }) => {
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE)
        }
        Err(super::Error::H2 { .. }) => {} // GOAWAY reached the client first
        Err(e) => panic!("new stream failed for another reason: {e}"),
        Ok(_) => panic!("a new stream was accepted after the certificate expired"),
    }
    assert_eq!(
        roundtrip(&mut before, b"still here").await,
        b"still here",
        "a stream opened before expiry goes on"
    );
}

#[tokio::test]
async fn server_refuses_new_streams_once_the_client_certificate_expired() {
    expiry_refuses_new_streams(true).await;
}

#[tokio::test]
async fn server_refuses_new_streams_once_its_own_certificate_expired() {
    expiry_refuses_new_streams(false).await;
}

#[tokio::test]
async fn stream_on_an_expired_connection_gets_503_with_reason_and_is_counted() {
    let _counted = COUNTED.lock().await;
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let (mut send, conn) = h2::client::handshake(client_io).await.unwrap();
    tokio::spawn(conn);
    // The request is on the wire before the server starts, so it is not stopped by GOAWAY.
    let req = Request::builder()
        .method(Method::CONNECT)
        .uri("10.0.0.1:80")
        .body(())
        .unwrap();
    let (response, _body) = send.send_request(req, false).unwrap();
    // The server's own counters: nothing else counts into them.
    let limits = ServerLimits::default();
    let rejections = limits.rejections.clone();
    let handled = Arc::new(AtomicUsize::new(0));
    let h = handled.clone();
    let auth = Authenticated {
        id: CLIENT.parse().unwrap(),
        not_after: Some(SystemTime::now() - Duration::from_secs(1)),
    };
    let _drain_tx = crate::drain::Trigger::new();
    let drain_rx = _drain_tx.signal();
    let peer: SocketAddr = "10.0.0.9:40000".parse().unwrap();
    let served = tokio::spawn(serve_h2(
        server_io,
        peer,
        auth,
        limits,
        drain_rx,
        move |_p: PendingConnect| {
            h.fetch_add(1, Ordering::Relaxed);
            async {}
        },
    ));
    let response = tokio::time::timeout(Duration::from_secs(10), response)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        response.headers().get(REFUSAL_HEADER).unwrap(),
        Reason::CertificateExpired.label()
    );
    assert_eq!(
        handled.load(Ordering::Relaxed),
        0,
        "never reached the handler"
    );
    assert_eq!(rejections.value(Reason::CertificateExpired), 1);
    // Drained: the connection ends by itself (GOAWAY, then close).
    drop(send);
    let ended = tokio::time::timeout(Duration::from_secs(15), served).await;
    assert!(ended.is_ok(), "the expired connection was not drained");
}

#[tokio::test]
async fn pool_evicts_a_connection_whose_certificate_expired_and_dials_fresh() {
    let ca = TestCa::new("cluster.local");
    // A server that does not enforce expiry: only the pool's own check can avoid reuse.
    let addr = server(&ca, ca.svid(SERVER), false).await;
    let pool = Pool::new(10, Duration::from_secs(60)).with_spread(1);
    let key = super::tests::pool_key(addr);
    let short = ca.svid_valid_for(CLIENT, SHORT);
    let fresh = ca.svid(CLIENT);
    let dials = AtomicUsize::new(0);
    let open = || async {
        let n = dials.fetch_add(1, Ordering::Relaxed);
        Ok(dial(&ca, addr, if n == 0 { &short } else { &fresh }).await)
    };
    let target: SocketAddr = "10.0.0.1:80".parse().unwrap();
    let (mut first, g1) = pool.stream(&key, target, open).await.unwrap();
    let (mut second, g2) = pool.stream(&key, target, open).await.unwrap();
    assert_eq!(dials.load(Ordering::Relaxed), 1, "reused before expiry");
    assert_eq!(roundtrip(&mut second, b"two").await, b"two");
    drop(g2);
    sleep_past(short.not_after()).await;
    let (mut third, _g3) = pool.stream(&key, target, open).await.unwrap();
    assert_eq!(
        dials.load(Ordering::Relaxed),
        2,
        "expired connection not reused"
    );
    assert_eq!(
        pool.stats().connections,
        1,
        "the expired connection left the pool"
    );
    assert_eq!(roundtrip(&mut third, b"three").await, b"three");
    assert_eq!(
        roundtrip(&mut first, b"one").await,
        b"one",
        "its open stream goes on"
    );
    drop(g1);
    pool.reap();
    assert_eq!(pool.stats().connections, 1);
}
