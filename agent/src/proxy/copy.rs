//! Bidirectional copy with half-close and live byte counts.
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use super::conns::ByteCounts;
use crate::tunnel::stream::H2Stream;

/// What the TCP side is read into before it goes to an HBONE stream as one owned chunk.
const H2_CHUNK: usize = 64 * 1024;

/// Bytes moved by one proxied connection.
#[derive(Debug, Clone, Copy, Default)]
pub struct Transferred {
    /// From the connecting side to the accepting side.
    pub sent: u64,
    /// From the accepting side back.
    pub received: u64,
}

/// Copies both ways until both directions are closed; a FIN in one direction is passed on as
/// a shutdown of the other side's write half (half-close). `counts` is updated as bytes move.
pub async fn copy_both<A, B>(a: &mut A, b: &mut B, counts: &ByteCounts) -> io::Result<Transferred>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut a = Counted {
        inner: a,
        read: &counts.sent,
    };
    let mut b = Counted {
        inner: b,
        read: &counts.received,
    };
    let (sent, received) =
        tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, 64 * 1024, 64 * 1024).await?;
    Ok(Transferred { sent, received })
}

/// Which end of the proxied connection the TCP socket is (for the byte counts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpSide {
    /// The connecting side (outbound: the app's captured connection).
    Source,
    /// The accepting side (inbound: the delivery to the app).
    Destination,
}

/// [`copy_both`] between a TCP socket and an HBONE stream without the copy into h2: the TCP
/// side is read into a `BytesMut` whose filled part goes to h2 as owned `Bytes`, and what h2
/// received is written to the socket from h2's own buffers.
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
        let mut total = 0u64;
        let mut buf = BytesMut::new();
        loop {
            if buf.capacity() < H2_CHUNK / 4 {
                buf.reserve(H2_CHUNK);
            }
            let n = tcp_r.read_buf(&mut buf).await?;
            if n == 0 {
                h2_send.finish()?;
                return Ok::<_, io::Error>(total);
            }
            total += n as u64;
            from_tcp.fetch_add(n as u64, Ordering::Relaxed);
            h2_send.send(buf.split().freeze()).await?;
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
pub async fn copy_until_closed<A, B>(
    a: &mut A,
    b: &mut B,
    counts: &ByteCounts,
    closer: &tokio::sync::Notify,
) -> io::Result<Transferred>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    until_closed(copy_both(a, b, counts), closer).await
}

/// Counts the bytes read from `inner`.
struct Counted<'a, S: ?Sized> {
    inner: &'a mut S,
    read: &'a AtomicU64,
}

impl<S: AsyncRead + Unpin + ?Sized> AsyncRead for Counted<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut *self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.read.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin + ?Sized> AsyncWrite for Counted<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn copies_both_ways_with_half_close_and_counts() {
        let (mut client, mut a) = tokio::io::duplex(1024);
        let (mut b, mut server) = tokio::io::duplex(1024);
        let counts = ByteCounts::default();
        let proxy = async { copy_both(&mut a, &mut b, &counts).await.unwrap() };
        let peer = async {
            client.write_all(&[7u8; 5000]).await.unwrap();
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
        };
        let (t, echoed, ()) = tokio::join!(proxy, peer, srv);
        assert_eq!((t.sent, t.received, echoed), (5000, 1000, 1000));
        assert_eq!(counts.sent.load(Ordering::Relaxed), 5000);
        assert_eq!(counts.received.load(Ordering::Relaxed), 1000);
    }
}
