//! Loopback tests of flow control on pooled tunnels (real TLS, HTTP/2, TCP): stalled streams, and peers that run out of window.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::client::Tunnel;
use super::flow::{STARVED_AFTER, STREAM_WINDOW};
use super::pool::{Pool, DEFAULT_MAX_STREAMS};
use super::server::{accept_tls, serve_connection, PendingConnect, ServerLimits};
use super::stream::H2Stream;
use super::tests::pool_key;
use crate::identity::testing::TestCa;
use crate::identity::{client_config, server_config, TrustDomain};

const CLIENT: &str = "spiffe://cluster.local/ns/default/sa/client";
const SERVER: &str = "spiffe://cluster.local/ns/default/sa/server";
/// The servers never read streams to this port (an app that stopped reading).
const SINK: u16 = 9100;

fn tds() -> Arc<[TrustDomain]> {
    Arc::from(vec!["cluster.local".parse::<TrustDomain>().unwrap()])
}

fn tls_server(ca: &TestCa) -> Arc<rustls::ServerConfig> {
    Arc::new(server_config(&ca.svid(SERVER), Arc::new(ca.bundle()), tds()).unwrap())
}

/// Echoes `s` once the peer half-closes; holds it unread for a minute when it goes to [`SINK`].
async fn serve_stream(mut s: H2Stream, port: u16) {
    if port == SINK {
        tokio::time::sleep(Duration::from_secs(60)).await;
        return;
    }
    let mut buf = Vec::new();
    if s.read_to_end(&mut buf).await.is_ok() {
        let _ = s.write_all(&buf).await;
        let _ = s.shutdown().await;
    }
}

/// An ambit HBONE server (its own window sizes).
async fn ambit_server(ca: &TestCa) -> SocketAddr {
    let tls = tls_server(ca);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let drain_tx = crate::drain::Trigger::new();
    let drain_rx = drain_tx.signal();
    tokio::spawn(async move {
        let _keep = drain_tx;
        loop {
            let (tcp, peer) = listener.accept().await.unwrap();
            let handle = |p: PendingConnect| async move {
                let port = p.connect.authority.port();
                serve_stream(p.accept().unwrap(), port).await;
            };
            let limits = ServerLimits::default();
            tokio::spawn(serve_connection(
                tcp,
                peer,
                tls.clone(),
                limits,
                drain_rx.clone(),
                handle,
            ));
        }
    });
    addr
}

/// A peer that sizes its windows as ztunnel does (a connection window of a few stream
/// windows), scaled down: two stalled streams use up its connection window.
async fn foreign_server(ca: &TestCa, stream_window: u32) -> SocketAddr {
    let tls = tls_server(ca);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = listener.accept().await.unwrap();
            let tls = tls.clone();
            tokio::spawn(async move {
                let (io, _) = accept_tls(tcp, peer, tls, Duration::from_secs(10))
                    .await
                    .unwrap();
                let mut conn = h2::server::Builder::new()
                    .initial_window_size(stream_window)
                    .initial_connection_window_size(2 * stream_window)
                    .handshake(io)
                    .await
                    .unwrap();
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    let port = req
                        .uri()
                        .authority()
                        .and_then(|a| a.port_u16())
                        .unwrap_or(0);
                    let send = respond
                        .send_response(http::Response::new(()), false)
                        .unwrap();
                    tokio::spawn(serve_stream(H2Stream::new(send, req.into_body()), port));
                }
            });
        }
    });
    addr
}

async fn dial(ca: &TestCa, addr: SocketAddr) -> Result<Tunnel, super::Error> {
    let tls = client_config(
        &ca.svid(CLIENT),
        Arc::new(ca.bundle()),
        tds(),
        SERVER.parse().unwrap(),
    );
    let tcp = TcpStream::connect(addr).await.unwrap();
    Tunnel::handshake(tcp, addr, Arc::new(tls.unwrap())).await
}

/// Writes to `s` until a write has not gone through for 300 ms; returns the bytes written.
async fn fill(s: &mut H2Stream) -> usize {
    let chunk = vec![3u8; 64 * 1024];
    let mut total = 0;
    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(300), s.write(&chunk)).await {
        total += n;
    }
    total
}

async fn roundtrip(s: &mut H2Stream, msg: &[u8]) -> Vec<u8> {
    s.write_all(msg).await.unwrap();
    s.shutdown().await.unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).await.unwrap();
    got
}

fn target(port: u16) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, 1], port))
}

#[tokio::test]
async fn stalled_streams_hold_one_window_each_and_leave_the_connection_to_the_others() {
    // More stalled streams than four: four stream windows of 4 MiB used to fill a 16 MiB
    // connection window and stop every stream on it.
    const STALLED: usize = 20;
    let ca = TestCa::new("cluster.local");
    let addr = ambit_server(&ca).await;
    let pool = Pool::new(DEFAULT_MAX_STREAMS, Duration::from_secs(60)).with_spread(1);
    let key = pool_key(addr);
    let mut fills = Vec::new();
    for _ in 0..STALLED {
        let (mut s, guard) = pool
            .stream(&key, target(SINK), || dial(&ca, addr))
            .await
            .unwrap();
        fills.push(tokio::spawn(async move { (fill(&mut s).await, s, guard) }));
    }
    let mut stalled = Vec::new();
    for f in fills {
        let (n, s, guard) = f.await.unwrap();
        assert_eq!(
            n, STREAM_WINDOW as usize,
            "a stalled stream takes one window"
        );
        stalled.push((s, guard));
    }
    assert_eq!(pool.stats().connections, 1, "all on one connection");

    let started = Instant::now();
    let (mut s, _guard) = pool
        .stream(&key, target(80), || dial(&ca, addr))
        .await
        .unwrap();
    let echoed = tokio::time::timeout(Duration::from_secs(5), roundtrip(&mut s, b"ping")).await;
    assert_eq!(echoed.expect("the echo is not stalled"), b"ping");
    assert_eq!(pool.stats().connections, 1, "on the same connection");
    eprintln!(
        "echo beside {STALLED} stalled streams: {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_connection_the_peer_left_without_window_gets_no_new_streams() {
    const WINDOW: u32 = 128 * 1024;
    let ca = TestCa::new("cluster.local");
    let addr = foreign_server(&ca, WINDOW).await;
    let pool = Pool::new(DEFAULT_MAX_STREAMS, Duration::from_secs(60)).with_spread(1);
    let key = pool_key(addr);
    let mut stalled = Vec::new();
    for _ in 0..2 {
        let (mut s, guard) = pool
            .stream(&key, target(SINK), || dial(&ca, addr))
            .await
            .unwrap();
        assert_eq!(fill(&mut s).await, WINDOW as usize);
        stalled.push((s, guard));
    }
    // The peer's connection window is used up: a new stream on that connection cannot send.
    let (mut stuck, _guard) = pool
        .stream(&key, target(80), || dial(&ca, addr))
        .await
        .unwrap();
    assert_eq!(pool.stats().connections, 1);
    let waited = STARVED_AFTER * 2;
    let sent = tokio::time::timeout(waited, stuck.write_all(b"ping")).await;
    assert!(sent.is_err(), "the connection still had window");

    // The next stream goes to a new connection, and moves.
    let (mut s, _guard) = pool
        .stream(&key, target(80), || dial(&ca, addr))
        .await
        .unwrap();
    assert_eq!(pool.stats().connections, 2, "dialed another connection");
    let echoed = tokio::time::timeout(Duration::from_secs(5), roundtrip(&mut s, b"ping")).await;
    assert_eq!(echoed.expect("the new stream moves"), b"ping");
}
