//! Bidirectional copy with half-close and live byte counts, holding no buffer while a connection idles.
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{ready, Context, Poll};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;

use super::conns::ByteCounts;
use crate::tunnel::stream::H2Stream;

/// The first read buffer of a direction: most connections carry small requests and answers.
const MIN_READ: usize = 4 * 1024;
/// The largest read buffer; a read that fills its buffer makes the next one 4x bigger up to
/// this (bulk transfers reach it after two reads).
const MAX_READ: usize = 64 * 1024;

/// Bytes moved by one proxied connection.
#[derive(Debug, Clone, Copy, Default)]
pub struct Transferred {
    /// From the connecting side to the accepting side.
    pub sent: u64,
    /// From the accepting side back.
    pub received: u64,
}

/// Reads one direction of a TCP socket into buffers that exist only while bytes move: it waits
/// for readability holding no buffer (an idle connection costs none), allocates one sized by
/// the traffic so far, and keeps it for the next read only while reads fill it.
struct Reader {
    /// Capacity of the next buffer.
    size: usize,
    /// A buffer handed back by [`Reader::recycle`] after a read that filled it.
    spare: BytesMut,
    /// Whether the last read filled its buffer (more is likely waiting).
    filled: bool,
}

impl Reader {
    fn new() -> Self {
        Self {
            size: MIN_READ,
            spare: BytesMut::new(),
            filled: false,
        }
    }

    /// The next bytes from `r` in a buffer of their own; empty at EOF.
    async fn next(&mut self, r: &mut ReadHalf<'_>) -> io::Result<BytesMut> {
        std::future::poll_fn(|cx| self.poll_next(cx, r)).await
    }

    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut ReadHalf<'_>,
    ) -> Poll<io::Result<BytesMut>> {
        if self.spare.capacity() == 0 {
            ready!(r.as_ref().poll_read_ready(cx))?;
        }
        let mut buf = std::mem::take(&mut self.spare);
        if buf.capacity() < self.size {
            buf = BytesMut::with_capacity(self.size);
        }
        let room = buf.capacity() - buf.len();
        // tokio's poll_read forgets the readiness after a short read, which saves the read
        // that would only say EAGAIN. Pending (drained, or out of budget and woken again at
        // once) drops the buffer, so an idle connection holds none.
        let n = ready!(std::pin::pin!(r.read_buf(&mut buf)).poll(cx))?;
        self.filled = n == room;
        if self.filled {
            self.size = (self.size * 4).min(MAX_READ);
        }
        Poll::Ready(Ok(buf))
    }

    /// Hands back a buffer whose bytes were written, to be reused while reads fill buffers;
    /// after a short read the socket is drained and the buffer is freed instead.
    fn recycle(&mut self, mut buf: BytesMut) {
        if self.filled && buf.capacity() >= self.size {
            buf.clear();
            self.spare = buf;
        }
    }

    /// Bytes of buffer held between reads.
    #[cfg(test)]
    fn held(&self) -> usize {
        self.spare.capacity()
    }
}

/// Copies both ways until both directions are closed; a FIN in one direction is passed on as
/// a shutdown of the other side's write half (half-close). `counts` is updated as bytes move.
pub async fn copy_both(
    a: &mut TcpStream,
    b: &mut TcpStream,
    counts: &ByteCounts,
) -> io::Result<Transferred> {
    let (mut a_r, mut a_w) = a.split();
    let (mut b_r, mut b_w) = b.split();
    let (sent, received) = tokio::try_join!(
        one_way(&mut a_r, &mut b_w, &counts.sent),
        one_way(&mut b_r, &mut a_w, &counts.received)
    )?;
    Ok(Transferred { sent, received })
}

/// Copies `r` to `w` until EOF, then shuts `w` down; returns the bytes copied.
async fn one_way(
    r: &mut ReadHalf<'_>,
    w: &mut WriteHalf<'_>,
    count: &AtomicU64,
) -> io::Result<u64> {
    let mut reader = Reader::new();
    let mut total = 0u64;
    loop {
        let buf = reader.next(r).await?;
        if buf.is_empty() {
            w.shutdown().await?;
            return Ok(total);
        }
        total += buf.len() as u64;
        count.fetch_add(buf.len() as u64, Ordering::Relaxed);
        w.write_all(&buf).await?;
        reader.recycle(buf);
    }
}

/// Which end of the proxied connection the TCP socket is (for the byte counts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpSide {
    /// The connecting side (outbound: the app's captured connection).
    Source,
    /// The accepting side (inbound: the delivery to the app).
    Destination,
}

/// [`copy_both`] between a TCP socket and an HBONE stream without the copy into h2: what the
/// TCP side read goes to h2 as owned `Bytes` (its buffer is freed once h2 wrote it), and what
/// h2 received is written to the socket from h2's own buffers.
pub async fn copy_tcp_h2(
    tcp: &mut TcpStream,
    h2: &mut H2Stream,
    tcp_side: TcpSide,
    counts: &ByteCounts,
) -> io::Result<Transferred> {
    let (from_tcp, from_h2) = match tcp_side {
        TcpSide::Source => (&counts.sent, &counts.received),
        TcpSide::Destination => (&counts.received, &counts.sent),
    };
    let (mut tcp_r, mut tcp_w) = tcp.split();
    let (mut h2_send, mut h2_recv) = h2.halves();
    let to_h2 = async {
        let mut reader = Reader::new();
        let mut total = 0u64;
        loop {
            let buf = reader.next(&mut tcp_r).await?;
            if buf.is_empty() {
                h2_send.finish()?;
                return Ok::<_, io::Error>(total);
            }
            total += buf.len() as u64;
            from_tcp.fetch_add(buf.len() as u64, Ordering::Relaxed);
            h2_send.send(buf.freeze()).await?;
        }
    };
    let to_tcp = async {
        let mut total = 0u64;
        while let Some(chunk) = h2_recv.recv().await? {
            total += chunk.len() as u64;
            from_h2.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            tcp_w.write_all(&chunk).await?;
        }
        tcp_w.shutdown().await?;
        Ok(total)
    };
    let (t, h) = tokio::try_join!(to_h2, to_tcp)?;
    Ok(match tcp_side {
        TcpSide::Source => Transferred {
            sent: t,
            received: h,
        },
        TcpSide::Destination => Transferred {
            sent: h,
            received: t,
        },
    })
}

/// Runs a copy until it ends or `closer` is notified (then with an error).
pub async fn until_closed(
    copy: impl std::future::Future<Output = io::Result<Transferred>>,
    closer: &tokio::sync::Notify,
) -> io::Result<Transferred> {
    tokio::select! {
        r = copy => r,
        () = closer.notified() => Err(io::Error::new(io::ErrorKind::ConnectionAborted, "closed: no longer allowed by policy")),
    }
}

/// [`copy_both`] that stops early (with an error) when `closer` is notified.
pub async fn copy_until_closed(
    a: &mut TcpStream,
    b: &mut TcpStream,
    counts: &ByteCounts,
    closer: &tokio::sync::Notify,
) -> io::Result<Transferred> {
    until_closed(copy_both(a, b, counts), closer).await
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpSocket};

    use super::*;

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

    /// Both ends of one HTTP/2 CONNECT stream over an in-memory pipe: (client, server).
    async fn h2_pair() -> (H2Stream, H2Stream) {
        let (c_io, s_io) = tokio::io::duplex(1 << 20);
        let (client, server) =
            tokio::join!(h2::client::handshake(c_io), h2::server::handshake(s_io));
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

    #[tokio::test]
    async fn tcp_h2_copies_both_ways_with_half_close_and_counts() {
        let (mut app, mut down) = pair(None).await;
        let (mut up, mut remote) = h2_pair().await;
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
}
