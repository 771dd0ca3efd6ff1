//! Tests of the stream adapter's flow control over an in-memory HTTP/2 connection, and the pair of streams other tests use.
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;

use super::stream::H2Stream;

/// Both ends of one HTTP/2 CONNECT stream over an in-memory pipe, each receiving with a stream
/// window of `window` bytes (and room for it on the connection): (client, server).
pub(crate) async fn h2_pair(window: u32) -> (H2Stream, H2Stream) {
    let (c_io, s_io) = tokio::io::duplex(1 << 20);
    let (client, server) = tokio::join!(
        h2::client::Builder::new()
            .initial_window_size(window)
            .initial_connection_window_size(window * 4)
            .handshake(c_io),
        h2::server::Builder::new()
            .initial_window_size(window)
            .initial_connection_window_size(window * 4)
            .handshake(s_io)
    );
    let ((client, c_conn), mut server) = (client.unwrap(), server.unwrap());
    tokio::spawn(c_conn);
    let mut client = client.ready().await.unwrap();
    let req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri("10.0.0.1:80")
        .body(())
        .unwrap();
    let (resp, c_send) = client.send_request(req, false).unwrap();
    let (req, mut respond) = server.accept().await.unwrap().unwrap();
    let s_send = respond
        .send_response(http::Response::new(()), false)
        .unwrap();
    tokio::spawn(async move { while server.accept().await.is_some() {} });
    let c_recv = resp.await.unwrap().into_body();
    (
        H2Stream::new(c_send, c_recv),
        H2Stream::new(s_send, req.into_body()),
    )
}

/// Writes to `s` for as long as it takes bytes, counting them in `sent`.
async fn push(mut s: H2Stream, sent: Arc<AtomicUsize>) {
    let chunk = vec![7u8; 16 * 1024];
    loop {
        match s.write(&chunk).await {
            Ok(n) => sent.fetch_add(n, Ordering::Relaxed),
            Err(_) => return,
        };
    }
}

/// `sent` once it has not moved for 200 ms.
async fn settled(sent: &AtomicUsize) -> usize {
    let mut last = usize::MAX;
    loop {
        let now = sent.load(Ordering::Relaxed);
        if now == last {
            return now;
        }
        last = now;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_chunk_handed_out_keeps_its_window_until_the_next_is_asked_for() {
    const WINDOW: u32 = 64 * 1024;
    let (client, mut server) = h2_pair(WINDOW).await;
    let sent = Arc::new(AtomicUsize::new(0));
    let pusher = tokio::spawn(push(client, sent.clone()));

    let (_, mut recv) = server.halves();
    let first = recv.recv().await.unwrap().unwrap();
    // The chunk is out (being written on, say), the next not asked for: the peer may have
    // sent one window in all, no more.
    assert_eq!(
        settled(&sent).await,
        WINDOW as usize,
        "one window in flight"
    );

    // Asking for the next chunk gives the first one's window back: the peer goes on.
    let mut got = first.len();
    while got < 4 * WINDOW as usize {
        got += recv.recv().await.unwrap().unwrap().len();
    }
    assert!(settled(&sent).await > 4 * WINDOW as usize);
    pusher.abort();
}

#[tokio::test]
async fn a_reader_that_stops_holds_one_window() {
    const WINDOW: u32 = 64 * 1024;
    let (client, mut server) = h2_pair(WINDOW).await;
    let sent = Arc::new(AtomicUsize::new(0));
    let pusher = tokio::spawn(push(client, sent.clone()));
    // Read (and so give back) 100 KiB through AsyncRead, then stop.
    let mut buf = vec![0u8; 100 * 1024];
    tokio::io::AsyncReadExt::read_exact(&mut server, &mut buf)
        .await
        .unwrap();
    assert_eq!(
        settled(&sent).await,
        buf.len() + WINDOW as usize,
        "what was read plus one window"
    );
    pusher.abort();
}
