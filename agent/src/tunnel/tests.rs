//! Loopback tests of HBONE: real TLS 1.3 with SVIDs, real HTTP/2 CONNECT, real TCP.
use std::net::SocketAddr;
use std::sync::Arc;

use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::client::Tunnel;
use super::pool::{Pool, PoolKey};
use super::server::{serve_connection, PendingConnect, ServerLimits};
use super::Error;
use crate::identity::testing::TestCa;
use crate::identity::{client_config, server_config, SpiffeId, TrustDomain};

const CLIENT: &str = "spiffe://cluster.local/ns/default/sa/client";
const SERVER: &str = "spiffe://cluster.local/ns/default/sa/server";

/// The pool key of `CLIENT` (netns 1, shard 0) tunnelling to `SERVER` at `peer`.
pub(super) fn pool_key(peer: SocketAddr) -> PoolKey {
    PoolKey {
        shard: 0,
        src_netns: 1,
        src_id: CLIENT.parse().unwrap(),
        peer,
        dst_id: SERVER.parse().unwrap(),
    }
}

fn tds() -> Arc<[TrustDomain]> {
    Arc::from(vec!["cluster.local".parse::<TrustDomain>().unwrap()])
}

/// Starts an HBONE server whose handler echoes every stream; CONNECT to port 1 is refused 401.
async fn echo_server(ca: &TestCa) -> SocketAddr {
    let cert = ca.svid(SERVER);
    let tls = Arc::new(server_config(&cert, Arc::new(ca.bundle()), tds()).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let drain_tx = crate::drain::Trigger::new();
    let drain_rx = drain_tx.signal();
    tokio::spawn(async move {
        let _keep = drain_tx;
        loop {
            let (tcp, peer) = listener.accept().await.unwrap();
            let tls = tls.clone();
            tokio::spawn(serve_connection(
                tcp,
                peer,
                tls,
                ServerLimits::default(),
                drain_rx.clone(),
                |p: PendingConnect| async move {
                    assert_eq!(p.connect.peer_id.to_string(), CLIENT);
                    if p.connect.authority.port() == 1 {
                        p.refuse(crate::reason::Reason::PolicyDenied);
                        return;
                    }
                    let mut s = p.accept().unwrap();
                    let mut buf = Vec::new();
                    s.read_to_end(&mut buf).await.unwrap(); // until the client half-closes
                    s.write_all(&buf).await.unwrap();
                    s.shutdown().await.unwrap();
                },
            ));
        }
    });
    addr
}

async fn tunnel(ca: &TestCa, addr: SocketAddr, expected: &str) -> Result<Tunnel, Error> {
    let cert = ca.svid(CLIENT);
    let expected: SpiffeId = expected.parse().unwrap();
    let tls = Arc::new(client_config(&cert, Arc::new(ca.bundle()), tds(), expected).unwrap());
    Tunnel::handshake(TcpStream::connect(addr).await.unwrap(), addr, tls).await
}

#[tokio::test]
async fn connect_stream_carries_bytes_with_half_close() {
    let ca = TestCa::new("cluster.local");
    let addr = echo_server(&ca).await;
    let mut t = tunnel(&ca, addr, SERVER).await.unwrap();
    let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let mut s = t.connect("10.0.0.1:8080".parse().unwrap()).await.unwrap();
    let (mut r, mut w) = tokio::io::split(&mut s);
    let send = async {
        w.write_all(&payload).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let mut got = Vec::new();
    let recv = r.read_to_end(&mut got);
    let (_, n) = tokio::join!(send, recv);
    assert_eq!(n.unwrap(), payload.len());
    assert!(got == payload, "echoed bytes differ");
}

#[tokio::test]
async fn refused_connect_reports_status() {
    let ca = TestCa::new("cluster.local");
    let addr = echo_server(&ca).await;
    let mut t = tunnel(&ca, addr, SERVER).await.unwrap();
    match t.connect("10.0.0.1:1".parse().unwrap()).await {
        Err(Error::Status { status, .. }) => assert_eq!(status, StatusCode::UNAUTHORIZED),
        other => panic!("expected 401, got {:?}", other.err()),
    }
    // The connection survives a refused stream.
    assert!(t.connect("[fd00::1]:80".parse().unwrap()).await.is_ok());
}

#[tokio::test]
async fn server_with_wrong_identity_is_refused_by_client() {
    let ca = TestCa::new("cluster.local");
    let addr = echo_server(&ca).await;
    let wrong = "spiffe://cluster.local/ns/default/sa/someone-else";
    assert!(matches!(
        tunnel(&ca, addr, wrong).await,
        Err(Error::Tls { .. })
    ));
}

#[tokio::test]
async fn client_from_foreign_ca_is_refused_by_server() {
    let ca = TestCa::new("cluster.local");
    let addr = echo_server(&ca).await;
    let rogue = TestCa::new("cluster.local");
    let cert = rogue.svid(CLIENT);
    let tls = Arc::new(
        client_config(&cert, Arc::new(ca.bundle()), tds(), SERVER.parse().unwrap()).unwrap(),
    );
    // TLS 1.3: the client may finish its handshake before the server rejects the certificate;
    // the first stream must fail either way.
    let r = match Tunnel::handshake(TcpStream::connect(addr).await.unwrap(), addr, tls).await {
        Ok(mut t) => t.connect("10.0.0.1:80".parse().unwrap()).await.map(|_| ()),
        Err(e) => Err(e),
    };
    assert!(r.is_err());
}

#[tokio::test]
async fn pool_reuses_one_connection_and_bounds_streams() {
    let ca = TestCa::new("cluster.local");
    let addr = echo_server(&ca).await;
    let pool = Pool::new(2, std::time::Duration::from_secs(60)).with_spread(1);
    let key = pool_key(addr);
    let mut held = Vec::new();
    for _ in 0..3 {
        let (s, g) = pool
            .stream(&key, "10.0.0.1:80".parse().unwrap(), || {
                tunnel(&ca, addr, SERVER)
            })
            .await
            .unwrap();
        held.push((s, g));
    }
    let st = pool.stats();
    assert_eq!(
        (st.connections, st.streams),
        (2, 3),
        "2 streams per connection, 3 streams"
    );
    held.clear();
    assert_eq!(pool.stats().streams, 0);
    let (_s, _g) = pool
        .stream(&key, "10.0.0.1:80".parse().unwrap(), || {
            tunnel(&ca, addr, SERVER)
        })
        .await
        .unwrap();
    assert_eq!(pool.stats().connections, 2, "reused, not redialed");
}

#[tokio::test]
async fn pool_spreads_concurrent_streams_up_to_the_cap_then_shares() {
    let ca = TestCa::new("cluster.local");
    let addr = echo_server(&ca).await;
    let key = pool_key(addr);
    let target: SocketAddr = "10.0.0.1:80".parse().unwrap();
    for (spread, want) in [(2, [1, 2, 2]), (1, [1, 1, 1])] {
        let pool = Pool::new(100, std::time::Duration::from_secs(60)).with_spread(spread);
        let dials = std::sync::atomic::AtomicUsize::new(0);
        let open = || async {
            dials.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tunnel(&ca, addr, SERVER).await
        };
        let mut held = Vec::new();
        let mut got = Vec::new();
        for _ in 0..3 {
            held.push(pool.stream(&key, target, open).await.unwrap());
            got.push(dials.load(std::sync::atomic::Ordering::Relaxed));
        }
        assert_eq!(
            got, want,
            "dials after each concurrent stream, spread {spread}"
        );
        let st = pool.stats();
        assert_eq!(
            (st.connections, st.streams),
            (want[2], 3),
            "spread {spread}"
        );
        for (s, _) in held.iter_mut() {
            s.write_all(b"ping").await.unwrap();
            s.shutdown().await.unwrap(); // the echo server answers once we half-close
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).await.unwrap();
            assert_eq!(buf, b"ping");
        }
        // Idle connections are reused, not redialed, once the streams ended.
        held.clear();
        let a = pool.stream(&key, target, open).await.unwrap();
        let b = pool.stream(&key, target, open).await.unwrap();
        assert_eq!(dials.load(std::sync::atomic::Ordering::Relaxed), want[2]);
        drop((a, b));
    }
}

#[tokio::test]
async fn drain_sends_goaway_but_lets_open_streams_finish() {
    let ca = TestCa::new("cluster.local");
    let cert = ca.svid(SERVER);
    let tls = Arc::new(server_config(&cert, Arc::new(ca.bundle()), tds()).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let drain_tx = crate::drain::Trigger::new();
    let drain_rx = drain_tx.signal();
    tokio::spawn(async move {
        let (tcp, peer) = listener.accept().await.unwrap();
        serve_connection(
            tcp,
            peer,
            tls,
            ServerLimits::default(),
            drain_rx,
            |p: PendingConnect| async move {
                let mut s = p.accept().unwrap();
                let mut buf = Vec::new();
                s.read_to_end(&mut buf).await.unwrap();
                s.write_all(&buf).await.unwrap();
                s.shutdown().await.unwrap();
            },
        )
        .await
        .unwrap();
    });
    let mut t = tunnel(&ca, addr, SERVER).await.unwrap();
    let mut open = t.connect("10.0.0.1:80".parse().unwrap()).await.unwrap();
    drain_tx.start();
    // The open stream still carries bytes after GOAWAY...
    open.write_all(b"still here").await.unwrap();
    open.shutdown().await.unwrap();
    let mut got = Vec::new();
    open.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"still here");
    // ...but no new stream is accepted.
    assert!(t.connect("10.0.0.1:81".parse().unwrap()).await.is_err());
}

#[tokio::test]
async fn idle_connection_gets_goaway() {
    let ca = TestCa::new("cluster.local");
    let cert = ca.svid(SERVER);
    let tls = Arc::new(server_config(&cert, Arc::new(ca.bundle()), tds()).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let _drain_tx = crate::drain::Trigger::new();
    let drain_rx = _drain_tx.signal();
    let limits = ServerLimits {
        idle_timeout: std::time::Duration::from_millis(300),
        ..ServerLimits::default()
    };
    let server = tokio::spawn(async move {
        let (tcp, peer) = listener.accept().await.unwrap();
        serve_connection(
            tcp,
            peer,
            tls,
            limits,
            drain_rx,
            |p: PendingConnect| async move {
                p.refuse(crate::reason::Reason::PolicyDenied);
            },
        )
        .await
    });
    let mut t = tunnel(&ca, addr, SERVER).await.unwrap();
    // The connection ends by itself once idle.
    let ended = tokio::time::timeout(std::time::Duration::from_secs(5), server).await;
    assert!(
        ended.is_ok(),
        "server connection did not end after the idle timeout"
    );
    assert!(t.connect("10.0.0.1:80".parse().unwrap()).await.is_err());
}

#[tokio::test]
async fn connect_headers_reach_the_server_and_a_pooled_stream_sends_its_own() {
    use super::headers::{Baggage, ConnectHeaders, Received};
    let ca = TestCa::new("cluster.local");
    let cert = ca.svid(SERVER);
    let tls = Arc::new(server_config(&cert, Arc::new(ca.bundle()), tds()).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel::<Received>();
    let drain_tx = crate::drain::Trigger::new();
    let drain_rx = drain_tx.signal();
    tokio::spawn(async move {
        let _keep = drain_tx;
        let (tcp, peer) = listener.accept().await.unwrap();
        serve_connection(
            tcp,
            peer,
            tls,
            ServerLimits::default(),
            drain_rx,
            move |p| {
                let seen = seen_tx.clone();
                async move {
                    seen.send(p.connect.received.clone()).unwrap();
                    drop(p.accept());
                }
            },
        )
        .await
        .unwrap();
    });
    let source = Baggage {
        cluster: "Kubernetes".into(),
        namespace: "default".into(),
        pod: "client".into(),
        service: "client".into(),
        version: "latest".into(),
    };
    let client: SocketAddr = "10.0.0.9:41000".parse().unwrap();
    let pool = Pool::new(8, std::time::Duration::from_secs(60));
    let key = pool_key(addr);
    let mut traces = Vec::new();
    for _ in 0..2 {
        let h = ConnectHeaders::new(&source, client, Some("echo.default.svc.cluster.local"));
        let (_s, _g) = pool
            .stream_with(&key, "10.0.0.1:80".parse().unwrap(), &h, || {
                tunnel(&ca, addr, SERVER)
            })
            .await
            .unwrap();
        let got = seen.recv().await.unwrap();
        assert_eq!(got.baggage(), source);
        assert_eq!(got.trace, h.traceparent);
        assert_eq!(
            got.forwarded(),
            Some("for=\"10.0.0.9:41000\";host=echo.default.svc.cluster.local")
        );
        traces.push(got.trace.unwrap().trace_id);
    }
    assert_eq!(pool.stats().connections, 1, "the second stream was pooled");
    assert_ne!(traces[0], traces[1], "each connection is its own trace");
}
