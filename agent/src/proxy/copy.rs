//! Bidirectional copy with half-close and live byte counts.
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::conns::ByteCounts;

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
    tokio::select! {
        r = copy_both(a, b, counts) => r,
        () = closer.notified() => Err(io::Error::new(io::ErrorKind::ConnectionAborted, "closed: no longer allowed by policy")),
    }
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
