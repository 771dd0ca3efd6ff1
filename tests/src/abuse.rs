//! Hostile clients for the abuse tests: floods of raw connections (random bytes, half-open TLS
//! handshakes, full handshakes), HTTP/2 written frame by frame over mTLS (tiny-frame floods,
//! oversized header blocks, CONNECT storms past the stream cap), and a probe that times
//! `GET /status` on an admin socket while they run.
//!
//! The async helpers run inside [`crate::hbone::in_netns`]; each returns counts, never panics.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::ops::{parse_response, unix_exchange};

/// How each connection of a flood ended.
#[derive(Debug, Clone, Default)]
pub struct Flood {
    /// Connections attempted.
    pub attempts: usize,
    /// Connect failed (refused, reset during connect).
    pub connect_failed: usize,
    /// The server closed the connection (EOF) or reset it.
    pub closed: usize,
    /// Of those, closed within 200 ms of our last write (refused at once).
    pub closed_at_once: usize,
    /// Still open when we gave up waiting.
    pub still_open: usize,
    /// The TLS handshake completed (handshake floods).
    pub handshakes: usize,
    /// Latest close, counted from the start of the flood.
    pub last_close: Duration,
    /// Wall time of the whole flood.
    pub elapsed: Duration,
}

impl Flood {
    /// Connections per second over the flood.
    pub fn rate(&self) -> f64 {
        self.attempts as f64 / self.elapsed.as_secs_f64().max(1e-3)
    }
}

enum End {
    ConnectFailed,
    Closed { at_once: bool, at: Duration },
    Open,
}

/// `n` connections to `peer`, `parallel` at a time; each writes `bytes()` and then waits (up to
/// `wait`) for the server to close it. Half-open handshakes are `bytes` = the start of a TLS
/// record that never completes.
pub async fn raw_flood(
    peer: SocketAddr,
    n: usize,
    parallel: usize,
    wait: Duration,
    bytes: impl Fn(usize) -> Vec<u8>,
) -> Flood {
    let t0 = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(parallel.max(1)));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let payload = bytes(i);
        let permit = sem.clone().acquire_owned().await;
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let Ok(Ok(mut tcp)) =
                tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(peer)).await
            else {
                return End::ConnectFailed;
            };
            if !payload.is_empty() && tcp.write_all(&payload).await.is_err() {
                return End::Closed {
                    at_once: true,
                    at: t0.elapsed(),
                };
            }
            let wrote = Instant::now();
            let mut buf = [0u8; 4096];
            let deadline = tokio::time::Instant::now() + wait;
            loop {
                match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
                    Ok(Ok(0) | Err(_)) => {
                        return End::Closed {
                            at_once: wrote.elapsed() < Duration::from_millis(200),
                            at: t0.elapsed(),
                        }
                    }
                    Ok(Ok(_)) => {}
                    Err(_) => return End::Open,
                }
            }
        }));
    }
    let mut f = Flood {
        attempts: n,
        ..Flood::default()
    };
    for t in tasks {
        match t.await {
            Ok(End::ConnectFailed) | Err(_) => f.connect_failed += 1,
            Ok(End::Closed { at_once, at }) => {
                f.closed += 1;
                f.closed_at_once += usize::from(at_once);
                f.last_close = f.last_close.max(at);
            }
            Ok(End::Open) => f.still_open += 1,
        }
    }
    f.elapsed = t0.elapsed();
    f
}

/// `n` full TLS handshakes with `tls`, `parallel` at a time; each connection is closed right
/// after (a handshake flood costs the server its public-key operations).
pub async fn handshake_flood(
    peer: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    n: usize,
    parallel: usize,
) -> Flood {
    let t0 = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(parallel.max(1)));
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let permit = sem.clone().acquire_owned().await;
        let tls = tls.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let Ok(Ok(tcp)) =
                tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(peer)).await
            else {
                return None;
            };
            let hs =
                tokio_rustls::TlsConnector::from(tls).connect(ambit::identity::server_name(), tcp);
            Some(matches!(
                tokio::time::timeout(Duration::from_secs(10), hs).await,
                Ok(Ok(_))
            ))
        }));
    }
    let mut f = Flood {
        attempts: n,
        ..Flood::default()
    };
    for t in tasks {
        match t.await {
            Ok(Some(true)) => f.handshakes += 1,
            Ok(Some(false)) => f.closed += 1,
            _ => f.connect_failed += 1,
        }
    }
    f.elapsed = t0.elapsed();
    f
}

/// An HTTP/2 connection driven frame by frame over mutual TLS.
pub struct RawH2 {
    tls: tokio_rustls::client::TlsStream<TcpStream>,
}

/// Frame types used here.
pub mod frame {
    /// DATA.
    pub const DATA: u8 = 0;
    /// HEADERS.
    pub const HEADERS: u8 = 1;
    /// RST_STREAM.
    pub const RST_STREAM: u8 = 3;
    /// SETTINGS.
    pub const SETTINGS: u8 = 4;
    /// PING.
    pub const PING: u8 = 6;
    /// GOAWAY.
    pub const GOAWAY: u8 = 7;
    /// CONTINUATION.
    pub const CONTINUATION: u8 = 9;
    /// END_HEADERS flag.
    pub const END_HEADERS: u8 = 0x4;
    /// ACK flag (SETTINGS, PING).
    pub const ACK: u8 = 0x1;
}

/// Encodes one frame.
pub fn encode(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// An HPACK integer with an `n`-bit prefix whose high bits are `first`.
fn hpack_int(first: u8, n: u32, mut v: usize, out: &mut Vec<u8>) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

/// A header block for `CONNECT authority` (literals without indexing, no Huffman), plus an
/// extra header `x-pad` of `pad` bytes when `pad > 0`.
pub fn connect_block(authority: &str, pad: usize) -> Vec<u8> {
    let mut b = Vec::new();
    // :method (static index 2) = CONNECT
    hpack_int(0x00, 4, 2, &mut b);
    hpack_int(0x00, 7, 7, &mut b);
    b.extend_from_slice(b"CONNECT");
    // :authority (static index 1)
    hpack_int(0x00, 4, 1, &mut b);
    hpack_int(0x00, 7, authority.len(), &mut b);
    b.extend_from_slice(authority.as_bytes());
    if pad > 0 {
        b.push(0x00);
        hpack_int(0x00, 7, 5, &mut b);
        b.extend_from_slice(b"x-pad");
        hpack_int(0x00, 7, pad, &mut b);
        b.resize(b.len() + pad, b'a');
    }
    b
}

/// Frames the server sent, by type, and how the connection ended.
#[derive(Debug, Clone, Default)]
pub struct Seen {
    /// HEADERS frames whose block starts with the static `:status 200`.
    pub ok: usize,
    /// Other HEADERS frames (another status).
    pub other_status: usize,
    /// RST_STREAM frames, with the error codes seen.
    pub resets: usize,
    /// Error codes of RST_STREAM frames (distinct).
    pub reset_codes: Vec<u32>,
    /// RST_STREAM frames with REFUSED_STREAM (7).
    pub refused: usize,
    /// PING acknowledgements.
    pub ping_acks: usize,
    /// DATA payload bytes.
    pub data_bytes: usize,
    /// GOAWAY error code, if one came.
    pub goaway: Option<u32>,
    /// The connection was closed (EOF or error).
    pub closed: bool,
}

impl RawH2 {
    /// TLS (client certificate in `tls`, ALPN h2) to `peer`, the connection preface, an empty
    /// SETTINGS and an ACK of the server's.
    pub async fn connect(peer: SocketAddr, tls: Arc<rustls::ClientConfig>) -> Result<Self> {
        let tcp = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(peer))
            .await
            .map_err(|_| anyhow!("connect to {peer} timed out"))??;
        let mut tls = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_rustls::TlsConnector::from(tls).connect(ambit::identity::server_name(), tcp),
        )
        .await
        .map_err(|_| anyhow!("tls to {peer} timed out"))??;
        let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        hello.extend(encode(frame::SETTINGS, 0, 0, &[]));
        hello.extend(encode(frame::SETTINGS, frame::ACK, 0, &[]));
        tls.write_all(&hello).await?;
        Ok(Self { tls })
    }

    /// Writes raw bytes (frames).
    pub async fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.tls.write_all(bytes).await?;
        Ok(())
    }

    /// Splits into a reader task counting what the server sends (until it closes, or
    /// `until` says stop) and the writer.
    pub fn split(
        self,
    ) -> (
        tokio::io::WriteHalf<tokio_rustls::client::TlsStream<TcpStream>>,
        tokio::task::JoinHandle<Seen>,
        Arc<std::sync::Mutex<Seen>>,
    ) {
        let (mut r, w) = tokio::io::split(self.tls);
        let live = Arc::new(std::sync::Mutex::new(Seen::default()));
        let shared = live.clone();
        let task = tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut chunk = vec![0u8; 65536];
            loop {
                match r.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
                let mut at = 0;
                let mut s = shared
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                while buf.len() >= at + 9 {
                    let len = usize::from(buf[at]) << 16
                        | usize::from(buf[at + 1]) << 8
                        | usize::from(buf[at + 2]);
                    if buf.len() < at + 9 + len {
                        break;
                    }
                    let (kind, flags) = (buf[at + 3], buf[at + 4]);
                    let p = &buf[at + 9..at + 9 + len];
                    match kind {
                        frame::HEADERS if p.first() == Some(&0x88) => s.ok += 1,
                        frame::HEADERS => s.other_status += 1,
                        frame::RST_STREAM if p.len() >= 4 => {
                            s.resets += 1;
                            let code = u32::from_be_bytes([p[0], p[1], p[2], p[3]]);
                            s.refused += usize::from(code == 7);
                            if !s.reset_codes.contains(&code) {
                                s.reset_codes.push(code);
                            }
                        }
                        frame::PING if flags & frame::ACK != 0 => s.ping_acks += 1,
                        frame::DATA => s.data_bytes += len,
                        frame::GOAWAY if p.len() >= 8 => {
                            s.goaway = Some(u32::from_be_bytes([p[4], p[5], p[6], p[7]]));
                        }
                        _ => {}
                    }
                    at += 9 + len;
                }
                drop(s);
                buf.drain(..at);
            }
            let mut s = shared
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            s.closed = true;
            s.clone()
        });
        (w, task, live)
    }
}

/// Times `GET /status` on an admin socket in a background thread until stopped.
pub struct StatusProbe {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<ProbeReport>>,
}

/// What the probe measured.
#[derive(Debug, Clone, Default)]
pub struct ProbeReport {
    /// Requests answered 200.
    pub answered: usize,
    /// Requests that failed or did not answer 200, with the first error.
    pub failed: usize,
    /// First failure.
    pub first_error: Option<String>,
    /// Slowest answer.
    pub max: Duration,
    /// Median answer.
    pub p50: Duration,
    /// 99th percentile.
    pub p99: Duration,
}

impl StatusProbe {
    /// Starts polling `socket` every `every`.
    pub fn start(socket: PathBuf, every: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            // At the agent admin thread's priority: what is measured is how fast the agent
            // answers, not how long this thread waits for a CPU beside the flood's threads.
            let _ = ambit::sys::set_thread_nice(ambit::admin::server::ADMIN_NICE);
            let mut r = ProbeReport::default();
            let mut times = Vec::new();
            let req = b"GET /status HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
            while !flag.load(Ordering::Relaxed) {
                let t = Instant::now();
                let got = unix_exchange(&socket, req, Duration::from_secs(5))
                    .and_then(|raw| parse_response(&raw));
                let took = t.elapsed();
                match got {
                    Ok(resp) if resp.status == 200 => {
                        r.answered += 1;
                        times.push(took);
                    }
                    Ok(resp) => {
                        r.failed += 1;
                        r.first_error
                            .get_or_insert(format!("status {}", resp.status));
                    }
                    Err(e) => {
                        r.failed += 1;
                        r.first_error.get_or_insert(format!("{e:#}"));
                    }
                }
                std::thread::sleep(every);
            }
            times.sort();
            r.max = times.last().copied().unwrap_or_default();
            r.p50 = times.get(times.len() / 2).copied().unwrap_or_default();
            r.p99 = times
                .get(times.len() * 99 / 100)
                .copied()
                .unwrap_or_default();
            r
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops and reports.
    pub fn finish(mut self) -> ProbeReport {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for StatusProbe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The first bytes of a TLS 1.3 ClientHello record that announces more than it sends: the
/// server waits for the rest (a slowloris handshake).
pub fn partial_client_hello() -> Vec<u8> {
    // Record: handshake (22), TLS 1.0 legacy version, length 512; then a ClientHello header
    // announcing 508 bytes, and only the legacy version and part of the random.
    let mut b = vec![22, 3, 1, 2, 0, 1, 0, 1, 252, 3, 3];
    b.extend_from_slice(&[0x42; 16]);
    b
}

/// `n` pseudo-random bytes from `seed` (xorshift).
pub fn noise(n: usize, seed: u64) -> Vec<u8> {
    crate::servers::pseudo_random(n, seed)
}
