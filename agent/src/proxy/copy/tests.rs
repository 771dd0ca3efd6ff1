//! Tests of the byte copy: half-close, counts, buffer sizing, and resets over TCP and HTTP/2.
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket};

use super::*;
use crate::tunnel::stream_tests::h2_pair;

/// A connected loopback pair (client, server); the server side gets `rcvbuf` when set.
async fn pair(rcvbuf: Option<u32>) -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let s = TcpSocket::new_v4().unwrap();
    if let Some(n) = rcvbuf {
        s.set_recv_buffer_size(n).unwrap();
    }
    let (c, a) = tokio::join!(s.connect(l.local_addr().unwrap()), l.accept());
    (c.unwrap(), a.unwrap().0)
}

#[tokio::test]
async fn copies_both_ways_with_half_close_and_counts() {
    let (mut client, mut a) = pair(None).await;
    let (mut b, mut server) = pair(None).await;
    let counts = ByteCounts::default();
    let proxy = async { copy_both(&mut a, &mut b, &counts).await.unwrap() };
    let peer = async {
        client.write_all(&[7u8; 300_000]).await.unwrap();
        client.shutdown().await.unwrap(); // half-close: the server still answers
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        got.len()
    };
    let srv = async {
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        server.write_all(&got[..1000]).await.unwrap();
        server.shutdown().await.unwrap();
        got.len()
    };
    let (t, echoed, got) = tokio::join!(proxy, peer, srv);
    assert_eq!(
        (t.sent, t.received, got, echoed),
        (300_000, 1000, 300_000, 1000)
    );
    assert_eq!(counts.sent.load(Ordering::Relaxed), 300_000);
    assert_eq!(counts.received.load(Ordering::Relaxed), 1000);
}

#[tokio::test]
async fn echo_both_ways_at_once_does_not_stall() {
    // The client writes while the echo comes back: both directions move at the same time.
    let (client, mut a) = pair(None).await;
    let (mut b, server) = pair(None).await;
    let counts = ByteCounts::default();
    let total = 20_000_000usize;
    let proxy = async { copy_both(&mut a, &mut b, &counts).await.unwrap() };
    let echo = async {
        let (mut r, mut w) = tokio::io::split(server);
        tokio::io::copy(&mut r, &mut w).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let (mut cr, mut cw) = tokio::io::split(client);
    let send = async {
        let chunk = vec![5u8; 100_000];
        for _ in 0..total / chunk.len() {
            cw.write_all(&chunk).await.unwrap();
        }
        cw.shutdown().await.unwrap();
    };
    let recv = async {
        let mut got = 0usize;
        let mut buf = vec![0u8; 65536];
        loop {
            let n = cr.read(&mut buf).await.unwrap();
            if n == 0 {
                return got;
            }
            got += n;
        }
    };
    let all = async { tokio::join!(proxy, echo, send, recv) };
    let (t, (), (), got) = tokio::time::timeout(Duration::from_secs(60), all)
        .await
        .expect("echo stalled");
    assert_eq!(
        (t.sent, t.received, got),
        (total as u64, total as u64, total)
    );
}

#[tokio::test]
async fn reader_starts_small_grows_while_reads_fill_and_idles_without_a_buffer() {
    // Everything is queued on the reading socket before the first read (loopback delivers
    // within the writer's send; the receive buffer holds it all).
    let (mut w, mut r) = pair(Some(4 << 20)).await;
    let (mut rh, _) = r.split();
    {
        let total = MIN_READ + 4 * MIN_READ + MAX_READ + MAX_READ + 10;
        w.write_all(&vec![1u8; total]).await.unwrap();
        let mut reader = Reader::new();
        let mut seen = Vec::new();
        let mut got = 0;
        while got < total {
            let buf = reader.next(&mut rh).await.unwrap();
            got += buf.len();
            seen.push((buf.len(), buf.capacity()));
            reader.recycle(buf);
        }
        assert_eq!(
            seen,
            [
                (MIN_READ, MIN_READ),
                (4 * MIN_READ, 4 * MIN_READ),
                (MAX_READ, MAX_READ),
                (MAX_READ, MAX_READ),
                (10, MAX_READ)
            ],
            "(bytes, buffer) of each read"
        );
        assert_eq!(reader.held(), 0, "a short read frees its buffer");

        // A buffer kept after a read that filled it is freed once the socket is drained.
        w.write_all(&vec![2u8; MAX_READ]).await.unwrap();
        let buf = reader.next(&mut rh).await.unwrap();
        assert_eq!(buf.len(), MAX_READ);
        reader.recycle(buf);
        assert_eq!(reader.held(), MAX_READ, "kept while reads fill it");
        let idle = tokio::time::timeout(Duration::from_millis(100), reader.next(&mut rh)).await;
        assert!(idle.is_err(), "no bytes: the read waits");
        assert_eq!(reader.held(), 0, "an idle connection holds no buffer");
        w.write_all(b"x").await.unwrap();
        assert_eq!(&reader.next(&mut rh).await.unwrap()[..], b"x");
        drop(w);
        assert!(reader.next(&mut rh).await.unwrap().is_empty(), "EOF");
    }
}

#[tokio::test]
async fn tcp_h2_copies_both_ways_with_half_close_and_counts() {
    let (mut app, mut down) = pair(None).await;
    let (mut up, mut remote) = h2_pair(65_535).await;
    let counts = ByteCounts::default();
    let data: Bytes = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let proxy = async {
        copy_tcp_h2(&mut down, &mut up, TcpSide::Source, &counts)
            .await
            .unwrap()
    };
    let client = async {
        app.write_all(&data).await.unwrap();
        app.shutdown().await.unwrap(); // half-close: the remote still answers
        let mut got = Vec::new();
        app.read_to_end(&mut got).await.unwrap();
        got
    };
    let srv = async {
        let mut got = Vec::new();
        remote.read_to_end(&mut got).await.unwrap();
        remote.write_all(&got[..1000]).await.unwrap();
        remote.shutdown().await.unwrap();
        got
    };
    let (t, echoed, got) = tokio::join!(proxy, client, srv);
    assert!(got == data, "the remote got every byte in order");
    assert_eq!(echoed, data[..1000]);
    assert_eq!((t.sent, t.received), (300_000, 1000));
    assert_eq!(counts.sent.load(Ordering::Relaxed), 300_000);
    assert_eq!(counts.received.load(Ordering::Relaxed), 1000);
}

/// Writes to `w` until a write has not gone through for 300 ms (the path is full).
async fn fill(w: &mut (impl tokio::io::AsyncWrite + Unpin)) -> usize {
    let chunk = vec![9u8; 64 * 1024];
    let mut total = 0;
    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(300), w.write(&chunk)).await {
        total += n;
    }
    total
}

/// Closes `s` with a reset (SO_LINGER 0) instead of a FIN.
fn abort(s: TcpStream) {
    s.set_zero_linger().unwrap();
    drop(s);
}

#[tokio::test]
async fn an_app_reset_ends_a_copy_stalled_on_the_stream_and_resets_the_stream() {
    // The remote end of the tunnel never reads: the copy waits for window, not on the socket.
    let (mut app, mut down) = pair(None).await;
    let (mut up, mut remote) = h2_pair(64 * 1024).await;
    let counts = ByteCounts::default();
    let copy = tokio::spawn(async move {
        let r = copy_tcp_h2(&mut down, &mut up, TcpSide::Source, &counts).await;
        (r, up)
    });
    assert!(
        fill(&mut app).await > 64 * 1024,
        "bytes went in until stalled"
    );
    assert!(!copy.is_finished(), "the copy waits for the stalled stream");
    abort(app);
    let (r, up) = tokio::time::timeout(Duration::from_secs(5), copy)
        .await
        .expect("the copy noticed the reset")
        .unwrap();
    assert_eq!(r.unwrap_err().kind(), io::ErrorKind::ConnectionReset);
    // Dropped (as the proxy does once the copy returned): the peer sees the stream reset,
    // not a clean end.
    drop(up);
    let mut sink = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), remote.read_to_end(&mut sink))
        .await
        .expect("the stream ended");
    assert!(read.is_err(), "reset, not END_STREAM: {read:?}");
}

#[tokio::test]
async fn a_stream_reset_ends_a_copy_stalled_on_the_socket_and_resets_the_socket() {
    // The app never reads (small receive buffer): the copy waits on the socket, not the stream.
    let (mut app, mut up) = pair(Some(4096)).await;
    let (mut remote, mut down) = h2_pair(64 * 1024).await;
    let counts = ByteCounts::default();
    let copy = tokio::spawn(async move {
        let r = copy_tcp_h2(&mut up, &mut down, TcpSide::Destination, &counts).await;
        (r, up)
    });
    assert!(
        fill(&mut remote).await > 64 * 1024,
        "bytes went in until stalled"
    );
    assert!(!copy.is_finished(), "the copy waits for the app");
    remote.reset();
    let (r, up) = tokio::time::timeout(Duration::from_secs(5), copy)
        .await
        .expect("the copy noticed the reset")
        .unwrap();
    assert_eq!(r.unwrap_err().kind(), io::ErrorKind::ConnectionReset);
    drop(up);
    // The app sees a reset, not a FIN that would pass what it got off as complete.
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), app.read_to_end(&mut got))
        .await
        .expect("the socket ended");
    assert_eq!(
        read.map_err(|e| e.kind()).err(),
        Some(io::ErrorKind::ConnectionReset),
        "after {} bytes",
        got.len()
    );
}

#[tokio::test]
async fn a_clean_copy_ends_with_fins_not_resets() {
    // The counterpart of the two above: nothing broke, so both ends see a normal close.
    let (mut app, mut down) = pair(None).await;
    let (mut up, mut remote) = h2_pair(64 * 1024).await;
    let counts = ByteCounts::default();
    let copy =
        tokio::spawn(
            async move { copy_tcp_h2(&mut down, &mut up, TcpSide::Source, &counts).await },
        );
    app.write_all(b"request").await.unwrap();
    app.shutdown().await.unwrap();
    let mut got = Vec::new();
    remote.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"request");
    remote.write_all(b"answer").await.unwrap();
    remote.shutdown().await.unwrap();
    let mut back = Vec::new();
    app.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"answer");
    let t = copy.await.unwrap().unwrap();
    assert_eq!((t.sent, t.received), (7, 6));
}

#[tokio::test]
async fn a_reset_ends_a_tcp_copy_stalled_on_the_other_socket_and_resets_it() {
    // The server never reads (small receive buffer): the copy waits on it, not on the client.
    let (mut client, mut a) = pair(None).await;
    let (mut server, mut b) = pair(Some(4096)).await;
    let counts = ByteCounts::default();
    let copy = tokio::spawn(async move {
        let r = copy_both(&mut a, &mut b, &counts).await;
        (r, b)
    });
    assert!(
        fill(&mut client).await > 64 * 1024,
        "bytes went in until stalled"
    );
    assert!(!copy.is_finished(), "the copy waits for the server");
    abort(client);
    let (r, b) = tokio::time::timeout(Duration::from_secs(5), copy)
        .await
        .expect("the copy noticed the reset")
        .unwrap();
    assert_eq!(r.unwrap_err().kind(), io::ErrorKind::ConnectionReset);
    drop(b);
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), server.read_to_end(&mut got))
        .await
        .expect("the socket ended");
    assert_eq!(
        read.map_err(|e| e.kind()).err(),
        Some(io::ErrorKind::ConnectionReset),
        "after {} bytes",
        got.len()
    );
}
