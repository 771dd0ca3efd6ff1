//! Ignored micro-measurements of the in-process data path: connection and ping-pong latency, RSS per held connection, per-connection future sizes.
//!
//! Not checks: run with `cargo test -p ambit-agent --lib measure -- --ignored --nocapture`
//! and compare before/after a change on the same machine (loopback, one process holding both
//! agents' paths and the apps, so the numbers are noisy and only their differences mean much).
use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{ip, setup, CLIENT_IP, SERVER_IP};

/// An app at the server pod's address that echoes every read at once (ping-pong).
async fn ping_pong_app() -> SocketAddr {
    let listener = TcpListener::bind(SocketAddr::new(ip(SERVER_IP), 0))
        .await
        .expect("bind app");
    let addr = listener.local_addr().expect("local");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                while let Ok(n @ 1..) = s.read(&mut buf).await {
                    if s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

async fn round_trip(s: &mut TcpStream) {
    let mut b = [0u8; 1];
    s.write_all(b"x").await.expect("write");
    s.read_exact(&mut b).await.expect("read");
}

fn percentiles(what: &str, mut t: Vec<Duration>) {
    t.sort();
    let at = |q: f64| t[((t.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e6;
    let mean = t.iter().map(Duration::as_secs_f64).sum::<f64>() / t.len() as f64 * 1e6;
    println!(
        "{what}: n={} p50={:.1}µs p99={:.1}µs mean={mean:.1}µs",
        t.len(),
        at(0.5),
        at(0.99)
    );
}

fn rss_kib() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("statm");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("rss pages");
    pages * 4
}

/// The size of the future `f` returns (its state, held for as long as the task runs).
fn future_size<A, B, R: Future>(_f: impl Fn(A, B) -> R) -> usize {
    std::mem::size_of::<R>()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement, not a check: prints numbers"]
async fn measure_the_data_path() {
    println!(
        "future sizes: outbound serve {} B, inbound handle {} B",
        future_size3(super::super::outbound::serve),
        future_size(super::super::inbound::handle),
    );
    println!(
        "type sizes: PendingConnect {} B, ConnInfo {} B",
        std::mem::size_of::<crate::tunnel::server::PendingConnect>(),
        std::mem::size_of::<super::super::conns::ConnInfo>(),
    );
    let (node, _client, _server, _echo) = setup("").await;
    let app = ping_pong_app().await;
    let connect = || async {
        let mut s = node.net.app_connect(ip(CLIENT_IP), app).await;
        round_trip(&mut s).await;
        s
    };
    for _ in 0..50 {
        drop(connect().await);
    }
    let mut setup_times = Vec::new();
    for _ in 0..1000 {
        let start = Instant::now();
        let s = connect().await;
        setup_times.push(start.elapsed());
        drop(s);
    }
    percentiles("new connection + first round trip", setup_times);
    let mut s = connect().await;
    let mut rtts = Vec::new();
    for _ in 0..5000 {
        let start = Instant::now();
        round_trip(&mut s).await;
        rtts.push(start.elapsed());
    }
    percentiles("ping-pong on a held connection", rtts);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = rss_kib();
    let mut held = Vec::new();
    const HELD: usize = 2000;
    for _ in 0..HELD {
        held.push(connect().await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = rss_kib();
    println!(
        "RSS per held connection (both agents, apps and clients in one process): {:.2} KiB",
        (after - before) as f64 / HELD as f64
    );
    drop(held);
}

/// [`future_size`] of a function of three arguments.
fn future_size3<A, B, C, R: Future>(_f: impl Fn(A, B, C) -> R) -> usize {
    std::mem::size_of::<R>()
}
