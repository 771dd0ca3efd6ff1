//! Abuse on every listener: the tunnel port (15008), the capture ports (15001, 15006), the
//! CA's port (15012) and the admin socket get random bytes, half-open TLS handshakes
//! (slowloris), handshake floods, floods of tiny HTTP/2 frames, oversized header blocks and
//! CONNECT storms. Required: handshake and idle timeouts close what hangs, the caps on
//! handshakes, connections per source and streams per connection hold (set low here through
//! `limits`), one source cannot starve another, `GET /status` on the admin socket keeps
//! answering (every answer within 100 ms), and a
//! real client → server echo succeeds during every flood. The per-pod caps of the capture
//! ports and the admin socket's cap are in [`caps`].
#![allow(
    clippy::unwrap_used,
    reason = "test bodies panic with a line number (STYLE.md §7)"
)]
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use ambit_e2e::abuse::{
    connect_block, encode, frame, handshake_flood, noise, partial_client_hello, raw_flood, Flood,
    ProbeReport, RawH2, StatusProbe,
};
use ambit_e2e::hbone::{anonymous_client_config, client_config, in_netns, Issue as _};
use ambit_e2e::{testbed, Testbed, ECHO_PORT, TUNNEL_PORT};
use tokio::io::AsyncWriteExt;

mod caps;

/// `/status` answers during a flood within 100 ms, every time. The admin socket has its own
/// thread and runtime at nice −10 (the probe too), so floods on the data plane cannot queue
/// it: before the priority, the slowest answer waited ~220 ms for a CPU with a compiler
/// running beside the floods; with it, 12 ms under the same load.
const STATUS_MAX: Duration = Duration::from_millis(100);
/// node2's caps for these tests: low, so that one test process can reach them.
const LIMITS: &str = "limits:\n  maxHandshakes: 32\n  maxHandshakesPerSource: 8\n  \
                      maxConnectionsPerSource: 64\n  \
                      maxStreamsPerConnection: 50\n  handshakeTimeoutMs: 1500\n  \
                      idleTimeoutMs: 3000\n";
const MAX_PER_SOURCE: usize = 64;
const MAX_HANDSHAKES_PER_SOURCE: usize = 8;
const MAX_STREAMS: usize = 50;
/// The CA's cap of handshakes in progress from one source.
const MAX_CA_HANDSHAKES_PER_SOURCE: usize = ambit::ca::server::MAX_HANDSHAKES_PER_SOURCE;
/// PING frames in the tiny-frame flood: a million. The debug agent acknowledged them at
/// 147,000-474,000 a second on quiet runs here and ~14,000 on a loaded one; the flood is
/// bounded by a 60 s deadline and needs no full count.
const TINY_FRAMES: usize = 1_000_000;
/// 1-byte DATA frames on one CONNECT stream after the PINGs.
const DATA_FRAMES: usize = 1_000_000;

/// Runs `flood` in the outsider pod's namespace on another thread while the main thread
/// checks that a real client → server echo succeeds; returns the flood's result.
fn during<T: Send + 'static, Fut: std::future::Future<Output = T>>(
    tb: &Testbed,
    what: &str,
    flood: impl FnOnce() -> Fut + Send + 'static,
) -> T {
    during_in(tb, "outsider", what, flood, legit_echo)
}

/// A real client → server echo through both agents.
fn legit_echo(tb: &Testbed, what: &str) {
    let server = IpAddr::V4(tb.pod("server").ipv4);
    let msg = format!("legit during {what}");
    let t0 = Instant::now();
    let r = tb.request("client", server, ECHO_PORT, Some(&msg)).unwrap();
    assert_eq!(
        r.data(),
        msg,
        "legitimate echo failed during {what} ({:?}): {r:?}",
        t0.elapsed()
    );
}

/// Runs `flood` in `pod`'s namespace on another thread; after a head start, `legit` runs on
/// this one, during the flood.
fn during_in<T: Send + 'static, Fut: std::future::Future<Output = T>>(
    tb: &Testbed,
    pod: &str,
    what: &str,
    flood: impl FnOnce() -> Fut + Send + 'static,
    legit: impl FnOnce(&Testbed, &str),
) -> T {
    let ns = tb.pod(pod).netns_path();
    let t = std::thread::spawn(move || in_netns(&ns, flood).unwrap());
    std::thread::sleep(Duration::from_millis(300));
    legit(tb, what);
    t.join().unwrap()
}

fn check_probe(what: &str, r: &ProbeReport) {
    eprintln!(
        "{what}: /status answered {} times, p50 {:?}, p99 {:?}, max {:?}, failed {}",
        r.answered, r.p50, r.p99, r.max, r.failed
    );
    assert_eq!(r.failed, 0, "{what}: /status failed: {:?}", r.first_error);
    assert!(r.answered > 0, "{what}: /status never answered");
    assert!(
        r.max <= STATUS_MAX,
        "{what}: /status took {:?} (> {STATUS_MAX:?})",
        r.max
    );
}

fn show(what: &str, f: &Flood) {
    eprintln!(
        "{what}: {} connections in {:.2} s ({:.0}/s): {} closed ({} at once, last at {:.2} s), \
         {} still open, {} handshakes, {} connect failures",
        f.attempts,
        f.elapsed.as_secs_f64(),
        f.rate(),
        f.closed,
        f.closed_at_once,
        f.last_close.as_secs_f64(),
        f.still_open,
        f.handshakes,
        f.connect_failed
    );
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn tunnel_port_floods_hit_timeouts_and_caps_and_legit_traffic_flows() {
    let mut tb = testbed();
    tb.restart_agent_with("node2", LIMITS).unwrap();
    let server = tb.pod("server").clone();
    let s_ip = IpAddr::V4(server.ipv4);
    let peer = SocketAddr::new(s_ip, TUNNEL_PORT);
    let echo = SocketAddr::new(s_ip, ECHO_PORT);
    // A genuine client identity (node1's `client`), used from the outsider pod.
    let svid = tb.issue("node1", "default", "client").unwrap();
    let tls = client_config(&svid, &server.identity()).unwrap();
    let refused0 = tb.proxy_counter("node2", "server", "tunnel_refused");
    let probe = StatusProbe::start(tb.admin_socket("node2"), Duration::from_millis(20));

    // Random bytes: every connection closed at once.
    let f = during(&tb, "random bytes on 15008", move || {
        raw_flood(peer, 400, 100, Duration::from_secs(5), |i| {
            noise(1024, i as u64 + 1)
        })
    });
    show("15008 random bytes", &f);
    assert_eq!(f.still_open, 0, "connections with random bytes left open");
    assert_eq!(f.closed + f.connect_failed, f.attempts);

    // Slowloris: half a ClientHello, held. At most `maxHandshakesPerSource` wait for the
    // handshake timeout (1.5 s); the rest are reset at once, and the client's own new
    // handshake (its pooled connection idled out) still gets a slot.
    // Let the client's pooled tunnel idle out (3 s), so its request below needs a handshake.
    std::thread::sleep(Duration::from_secs(4));
    let f = during(&tb, "slowloris on 15008", move || {
        raw_flood(peer, 300, 300, Duration::from_secs(8), |_| {
            partial_client_hello()
        })
    });
    show("15008 slowloris", &f);
    assert_eq!(f.still_open, 0, "half-open handshakes outlived the timeout");
    assert!(
        f.closed_at_once >= f.attempts - MAX_HANDSHAKES_PER_SOURCE - f.connect_failed,
        "fewer refusals at once than the caps allow"
    );
    assert!(
        f.last_close < Duration::from_secs(6),
        "the last half-open handshake was closed only after {:?}",
        f.last_close
    );

    // Handshake floods: without a client certificate, and with a valid one.
    let anon = anonymous_client_config();
    let f = during(&tb, "anonymous handshake flood on 15008", move || {
        handshake_flood(peer, anon, 300, 32)
    });
    show("15008 anonymous handshake flood", &f);
    let t = tls.clone();
    let f = during(&tb, "mTLS handshake flood on 15008", move || {
        handshake_flood(peer, t, 300, 32)
    });
    show("15008 mTLS handshake flood", &f);
    assert!(f.handshakes > 0, "no valid handshake completed");

    // Per-source cap and idle timeout: hold 100 idle mTLS connections from one source.
    let t = tls.clone();
    let (held, closed_by_idle) = during(&tb, "100 idle connections", move || async move {
        let mut conns = Vec::new();
        for _ in 0..100 {
            if let Ok(c) = RawH2::connect(peer, t.clone()).await {
                conns.push(c.split());
            }
        }
        let held = conns.len();
        // Idle (no stream): GOAWAY after idleTimeoutMs (3 s); this client never answers the
        // GOAWAY's PING, so the agent closes the connection itself 5 s later.
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut closed = 0;
        for (_, reader, _) in conns {
            let left = deadline.saturating_duration_since(Instant::now());
            if let Ok(Ok(seen)) = tokio::time::timeout(left, reader).await {
                closed += usize::from(seen.closed || seen.goaway.is_some());
            }
        }
        (held, closed)
    });
    eprintln!("15008: {held} of 100 idle connections from one source admitted, {closed_by_idle} closed by the idle timeout");
    assert!(
        held <= MAX_PER_SOURCE,
        "{held} connections admitted from one source (cap {MAX_PER_SOURCE})"
    );
    assert!(held > 0);
    assert_eq!(closed_by_idle, held, "idle connections not closed");

    // Tiny frames: PINGs, then 1-byte DATA frames on a CONNECT stream to the echo server.
    let t = tls.clone();
    let (pings, ping_time, seen, data_time) = during(&tb, "tiny frames", move || async move {
        let h2 = RawH2::connect(peer, t.clone()).await.unwrap();
        let (mut w, reader, live) = h2.split();
        let t0 = Instant::now();
        let mut batch = Vec::new();
        for i in 0..TINY_FRAMES {
            batch.extend(encode(frame::PING, 0, 0, &(i as u64).to_be_bytes()));
            if batch.len() >= 64 * 1024 {
                w.write_all(&batch).await.unwrap();
                batch.clear();
            }
        }
        w.write_all(&batch).await.unwrap();
        // Until all are acknowledged, or none more for 2 s: h2 keeps one pending PONG, so
        // under a flood a few acknowledgements are coalesced away and never come.
        let deadline = Instant::now() + Duration::from_secs(60);
        let (mut pings, mut ping_time) = (0, Duration::ZERO);
        while pings < TINY_FRAMES && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let now = live.lock().unwrap().ping_acks;
            if now > pings {
                (pings, ping_time) = (now, t0.elapsed());
            } else if t0.elapsed() > ping_time + Duration::from_secs(2) {
                break;
            }
        }
        drop(w);
        reader.abort();
        // 1-byte DATA frames on one CONNECT stream of a new connection, once it is accepted.
        let h2 = RawH2::connect(peer, t).await.unwrap();
        let (mut w, reader, live) = h2.split();
        let block = connect_block(&echo.to_string(), 0);
        w.write_all(&encode(frame::HEADERS, frame::END_HEADERS, 1, &block))
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while live.lock().unwrap().ok == 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let t1 = Instant::now();
        let mut batch = Vec::new();
        for _ in 0..DATA_FRAMES {
            batch.extend(encode(frame::DATA, 0, 1, b"x"));
            if batch.len() >= 64 * 1024 {
                if w.write_all(&batch).await.is_err() || live.lock().unwrap().closed {
                    break;
                }
                batch.clear();
            }
        }
        let _ = w.write_all(&batch).await;
        // The echo comes back within our 64 KiB receive window (we never open it further).
        let deadline = Instant::now() + Duration::from_secs(60);
        while live.lock().unwrap().data_bytes < 65_535
            && !live.lock().unwrap().closed
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let seen = live.lock().unwrap().clone();
        let data_time = t1.elapsed();
        drop(w);
        reader.abort();
        (pings, ping_time, seen, data_time)
    });
    eprintln!(
        "15008 tiny frames: {pings} of {TINY_FRAMES} PINGs acknowledged in {:.2} s ({:.0} frames/s); \
         {DATA_FRAMES} 1-byte DATA frames: {:.2} s, {} bytes echoed, GOAWAY {:?}",
        ping_time.as_secs_f64(),
        pings as f64 / ping_time.as_secs_f64(),
        data_time.as_secs_f64(),
        seen.data_bytes,
        seen.goaway
    );
    // The rate is what the flood measures: on this shared machine it ranged from ~147,000 to
    // ~3,300 acknowledgements a second between runs, so a full count within the deadline is
    // not required, only that the flooded connection was served while the checks above held.
    assert!(pings > 0, "no PING acknowledged");
    // Either the stream echoes through, or the agent cuts the flooding connection off with
    // GOAWAY ENHANCE_YOUR_CALM (h2's own flood defence); both leave the agent serving.
    assert!(
        seen.data_bytes >= 65_535 || seen.goaway == Some(0xb),
        "the DATA-frame stream neither echoed nor was cut off: {seen:?}"
    );

    // Oversized header blocks: one 64 KiB HEADERS frame, then CONTINUATION without end.
    let t = tls.clone();
    let (big, cont_closed, cont_sent) = during(&tb, "oversized headers", move || async move {
        let h2 = RawH2::connect(peer, t.clone()).await.unwrap();
        let (mut w, reader, _) = h2.split();
        let block = connect_block(&echo.to_string(), 64 * 1024);
        let _ = w
            .write_all(&encode(frame::HEADERS, frame::END_HEADERS, 1, &block))
            .await;
        let big = tokio::time::timeout(Duration::from_secs(10), reader).await;
        let h2 = RawH2::connect(peer, t).await.unwrap();
        let (mut w, reader, live) = h2.split();
        let block = connect_block(&echo.to_string(), 0);
        let mut sent = 0usize;
        let _ = w.write_all(&encode(frame::HEADERS, 0, 1, &block)).await;
        let chunk = vec![0u8; 16 * 1024];
        while sent < 8 << 20 && !live.lock().unwrap().closed {
            let w = tokio::time::timeout(
                Duration::from_secs(5),
                w.write_all(&encode(frame::CONTINUATION, 0, 1, &chunk)),
            )
            .await;
            if !matches!(w, Ok(Ok(()))) {
                break;
            }
            sent += chunk.len();
        }
        let closed = tokio::time::timeout(Duration::from_secs(10), reader)
            .await
            .is_ok_and(|s| s.is_ok_and(|s| s.closed || s.goaway.is_some()));
        (big, closed, sent)
    });
    let big = big
        .expect("no answer to an oversized header block")
        .unwrap();
    eprintln!("15008 oversized headers: {big:?}; CONTINUATION flood: closed {cont_closed} after {cont_sent} bytes");
    assert_eq!(big.ok, 0, "a 64 KiB header block was accepted");
    assert!(
        big.resets > 0 || big.goaway.is_some() || big.closed || big.other_status > 0,
        "no refusal of the oversized header block: {big:?}"
    );
    assert!(
        cont_closed,
        "an endless CONTINUATION sequence was not cut off"
    );

    // CONNECT storm: 500 streams at once on one connection; at most 50 are served.
    let stream_limit = |tb: &Testbed| {
        tb.metrics("node2").unwrap().sum(
            "ambit_tunnel_rejections_total",
            &[("reason", "stream_limit")],
        )
    };
    let limited0 = stream_limit(&tb);
    let t = tls.clone();
    let storm = during(&tb, "CONNECT storm", move || async move {
        let h2 = RawH2::connect(peer, t).await.unwrap();
        let (mut w, reader, live) = h2.split();
        let block = connect_block(&echo.to_string(), 0);
        let mut frames = Vec::new();
        for i in 0..500u32 {
            frames.extend(encode(
                frame::HEADERS,
                frame::END_HEADERS,
                2 * i + 1,
                &block,
            ));
        }
        w.write_all(&frames).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let s = live.lock().unwrap().clone();
            if s.ok + s.resets + s.other_status >= 500 || s.closed || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let s = live.lock().unwrap().clone();
        drop(w);
        reader.abort();
        s
    });
    eprintln!("15008 CONNECT storm: {storm:?}");
    assert!(
        storm.ok <= MAX_STREAMS,
        "{} streams served at once (cap {MAX_STREAMS})",
        storm.ok
    );
    assert!(storm.ok > 0, "no stream served");
    assert!(
        storm.resets >= 500 - MAX_STREAMS,
        "streams past the cap not refused: {storm:?}"
    );
    assert!(
        storm.reset_codes.contains(&7),
        "no REFUSED_STREAM: {storm:?}"
    );
    // Every stream h2 refused past the cap is counted (h2 refuses them on its own).
    let limited = stream_limit(&tb) - limited0;
    eprintln!("node2 stream_limit rejections rose by {limited}");
    assert!(
        limited >= storm.refused as f64 && limited <= 500.0,
        "stream_limit rejections rose by {limited}, the client saw {} REFUSED_STREAM",
        storm.refused
    );

    let r = probe.finish();
    check_probe("node2 during the 15008 floods", &r);
    let refused = tb.proxy_counter("node2", "server", "tunnel_refused") - refused0;
    eprintln!("node2 tunnel_refused rose by {refused}");
    assert!(refused > 0);
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn capture_port_floods_are_refused_and_legit_traffic_flows() {
    let tb = testbed();
    let server = IpAddr::V4(tb.pod("server").ipv4);
    let probes = [
        StatusProbe::start(tb.admin_socket("node1"), Duration::from_millis(20)),
        StatusProbe::start(tb.admin_socket("node2"), Duration::from_millis(20)),
    ];
    let failed0 = tb.proxy_counter("node1", "client", "outbound_failed");
    let in_failed0 = tb.proxy_counter("node2", "server", "inbound_failed");

    // 15001 straight from inside the client pod (no original destination): reset at once.
    let lo = SocketAddr::from(([127, 0, 0, 1], 15001));
    let f = during_in(
        &tb,
        "client",
        "random bytes on 15001",
        move || {
            raw_flood(lo, 400, 100, Duration::from_secs(5), |i| {
                noise(512, i as u64 + 7)
            })
        },
        legit_echo,
    );
    show("15001 random bytes (direct)", &f);
    assert_eq!(f.still_open, 0);
    assert_eq!(f.closed, f.attempts - f.connect_failed);
    // Captured connections to a port nobody listens on, from the client app itself (to a mesh
    // pod: mesh-only capture leaves connects outside the mesh to the kernel).
    let mut storm = tb.hold_many("client", server, 9999, 400, 100).unwrap();
    let t0 = Instant::now();
    legit_echo(&tb, "a captured connection storm on 15001");
    let report = storm.wait_for("open", Duration::from_secs(60)).unwrap();
    eprintln!(
        "15001 captured storm to a closed port: {report} in {:.2} s",
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(report["open"], 0, "{report}");
    assert_eq!(report["failed"], 400, "{report}");
    drop(storm);

    // 15006: plaintext to a closed port of an enrolled pod, and straight to 15006.
    for (what, port) in [("closed port", 9999u16), ("15006 itself", 15006)] {
        let target = SocketAddr::new(server, port);
        let f = during(&tb, &format!("random bytes to {what}"), move || {
            raw_flood(target, 300, 100, Duration::from_secs(12), |i| {
                noise(512, i as u64 + 99)
            })
        });
        show(&format!("15006 random bytes to {what}"), &f);
        assert_eq!(f.still_open, 0, "{what}: connections left open");
    }
    assert!(tb.proxy_counter("node1", "client", "outbound_failed") >= failed0 + 400);
    assert!(tb.proxy_counter("node2", "server", "inbound_failed") > in_failed0);
    let [p1, p2] = probes;
    check_probe("node1 during the 15001 floods", &p1.finish());
    check_probe("node2 during the 15006 floods", &p2.finish());
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn ca_port_and_admin_socket_survive_floods() {
    let tb = testbed();
    let ca = tb.state().ca.clone().unwrap().addr;
    let probe = StatusProbe::start(tb.admin_socket("node1"), Duration::from_millis(20));
    let f = ca_flood(&tb, "CA random bytes", move || {
        raw_flood(ca, 300, 100, Duration::from_secs(12), |i| {
            noise(1024, i as u64 + 3)
        })
    });
    assert_eq!(f.still_open, 0);
    let anon = anonymous_client_config();
    ca_flood(&tb, "CA handshake flood", move || {
        handshake_flood(ca, anon, 300, 32)
    });
    // More half-open handshakes from one source than the CA's agent-wide handshake slots:
    // past its per-source share they are closed at once, so the slots stay free for node2's
    // legitimate request (5 s deadline; the CA's handshake timeout is 10 s).
    let f = ca_flood(&tb, "CA slowloris (300 half-open handshakes)", move || {
        raw_flood(ca, 300, 300, Duration::from_secs(15), |_| {
            partial_client_hello()
        })
    });
    assert_eq!(
        f.still_open, 0,
        "half-open handshakes outlived the CA's timeout"
    );
    assert!(
        f.closed_at_once + MAX_CA_HANDSHAKES_PER_SOURCE + f.connect_failed >= f.attempts,
        "more half-open handshakes from one source held than its share \
         ({MAX_CA_HANDSHAKES_PER_SOURCE})"
    );

    // The admin socket (root only): garbage, half-sent requests, huge headers, a burst.
    let sock = tb.admin_socket("node1");
    let t0 = Instant::now();
    let mut threads = Vec::new();
    for k in 0..4u64 {
        let sock = sock.clone();
        threads.push(std::thread::spawn(move || {
            let mut n = [0usize; 4];
            let answered = |bytes: &[u8]| {
                usize::from(
                    ambit_e2e::ops::unix_exchange(&sock, bytes, Duration::from_secs(10)).is_ok(),
                )
            };
            let huge = format!(
                "GET /status HTTP/1.1\r\nConnection: close\r\nX-Big: {}\r\n\r\n",
                "a".repeat(1 << 20)
            );
            let req = b"GET /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
            for i in 0..50u64 {
                n[0] += answered(&noise(2048, k * 1000 + i + 1));
                n[1] += answered(huge.as_bytes());
                n[2] += answered(req);
            }
            n
        }));
    }
    // Slowloris: 200 connections that never finish their request line.
    let mut held = Vec::new();
    for _ in 0..200 {
        let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        use std::io::Write;
        let _ = s.write_all(b"GET /status HTTP/1.1\r\nX-Slow: ");
        held.push(s);
    }
    let mut done = [0usize; 4];
    for t in threads {
        let n = t.join().unwrap();
        for i in 0..4 {
            done[i] += n[i];
        }
    }
    let burst = t0.elapsed();
    // hyper's header read timeout (5 s) closes the slow ones.
    let closed = held
        .iter_mut()
        .map(|s| {
            use std::io::Read;
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut buf = [0u8; 1024];
            let t = Instant::now();
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break t.elapsed() < Duration::from_secs(10),
                    Ok(_) => {}
                }
            }
        })
        .filter(|c| *c)
        .count();
    eprintln!(
        "admin socket: 200 garbage, 200 oversized and 200 valid requests in {:.2} s \
         (answered: {done:?}); {closed} of 200 slowloris connections closed by the server",
        burst.as_secs_f64()
    );
    assert_eq!(done[2], 200, "valid admin requests failed during the flood");
    assert_eq!(closed, 200, "half-sent admin requests left open");
    check_probe("node1 during the CA and admin floods", &probe.finish());
    // Still a working agent and CA.
    legit_echo(&tb, "after the floods");
    issue_cert(&tb, "after the floods");
}

/// A legitimate certificate request from node2's namespace (another source than the floods).
fn issue_cert(tb: &Testbed, what: &str) {
    let t0 = Instant::now();
    let r = tb.issue("node2", "default", "server");
    assert!(
        r.is_ok(),
        "a legitimate certificate request failed during {what} after {:?}: {:#}",
        t0.elapsed(),
        r.err().unwrap()
    );
}

/// Runs `flood` against the CA from the outsider pod while node2 requests a certificate;
/// shows and returns the flood's result.
fn ca_flood<Fut: std::future::Future<Output = Flood>>(
    tb: &Testbed,
    what: &str,
    flood: impl FnOnce() -> Fut + Send + 'static,
) -> Flood {
    let f = during_in(tb, "outsider", what, flood, issue_cert);
    show(what, &f);
    f
}
