//! Bidirectional copy with half-close and live byte counts, holding no buffer while a connection idles.
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::task::{ready, Context, Poll};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
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
/// A reset (or timeout) of either socket ends the copy also while it waits on the other one;
/// a socket then left with bytes it did not take (its app stopped reading) is closed with a
/// reset, so that the cut stream does not pass for a complete one (see [`copy_tcp_h2`]).
pub async fn copy_both(
    a: &mut TcpStream,
    b: &mut TcpStream,
    counts: &ByteCounts,
) -> io::Result<Transferred> {
    let (mut a_r, mut a_w) = a.split();
    let (mut b_r, mut b_w) = b.split();
    let (a_done, b_done) = (AtomicBool::new(false), AtomicBool::new(false));
    let (a_writing, b_writing) = (AtomicBool::new(false), AtomicBool::new(false));
    let result = tokio::try_join!(
        one_way(
            &mut a_r,
            &mut b_w,
            &counts.sent,
            (&a_done, &b_done),
            &b_writing
        ),
        one_way(
            &mut b_r,
            &mut a_w,
            &counts.received,
            (&b_done, &a_done),
            &a_writing
        )
    );
    for (writing, tcp) in [(&a_writing, &*a), (&b_writing, &*b)] {
        if result.is_err() && writing.load(Ordering::Relaxed) {
            // Best effort: without it the socket closes with a FIN.
            let _ = tcp.set_zero_linger();
        }
    }
    let (sent, received) = result?;
    Ok(Transferred { sent, received })
}

/// Copies `r` to `w` until EOF, then shuts `w` down; returns the bytes copied. It watches `r`
/// for an error while it waits to write (`writing` says when), and once it is done until the
/// other direction is (`done`: this direction's flag, the other's): with the other direction
/// doing the same, a reset of either socket ends the copy whatever the two directions wait for.
async fn one_way(
    r: &mut ReadHalf<'_>,
    w: &mut WriteHalf<'_>,
    count: &AtomicU64,
    done: (&AtomicBool, &AtomicBool),
    writing: &AtomicBool,
) -> io::Result<u64> {
    let mut reader = Reader::new();
    let mut total = 0u64;
    loop {
        let buf = reader.next(r).await?;
        if buf.is_empty() {
            w.shutdown().await?;
            mark_done(done.0).await;
            watch_until(done.1, r.as_ref()).await?;
            return Ok(total);
        }
        total += buf.len() as u64;
        count.fetch_add(buf.len() as u64, Ordering::Relaxed);
        writing.store(true, Ordering::Relaxed);
        tokio::select! {
            biased;
            written = w.write_all(&buf) => written?,
            e = r.as_ref().ready(Interest::ERROR) => return Err(socket_error(r.as_ref(), e)),
        }
        writing.store(false, Ordering::Relaxed);
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
/// h2 received is written to the socket from h2's own buffers, its window given back once
/// written (a socket that is not read stops the peer after one stream window).
///
/// A reset of the socket or of the stream ends the copy, also while it waits on the other one
/// (an app or a peer that stopped reading). The stream, once the caller drops it, ends with a
/// reset after what was queued (RST_STREAM: the peer agent frees its window and passes the
/// reset on). The socket closes as usual (a FIN, or a reset when bytes from the app were left
/// unread), except when the stream was reset while bytes for the app were still waiting to be
/// written: then with a reset, so that the cut stream does not pass for a complete one.
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
    let (h2_send, mut h2_recv) = h2.halves();
    // Shared by the two directions: one sends on it, both watch it for a reset. Locked only
    // inside a poll, never across an await (so never contended: both run on this task).
    let h2_send = Mutex::new(h2_send);
    let send_half = || h2_send.lock().unwrap_or_else(PoisonError::into_inner);
    let reset = || std::future::poll_fn(|cx| send_half().poll_reset(cx));
    let (answered, writing) = (AtomicBool::new(false), AtomicBool::new(false));
    let to_h2 = async {
        let mut reader = Reader::new();
        let mut total = 0u64;
        loop {
            // Reading the socket sees its errors; the stream may be reset meanwhile.
            let buf = tokio::select! {
                biased;
                buf = reader.next(&mut tcp_r) => buf?,
                e = reset() => return Err(e),
            };
            if buf.is_empty() {
                send_half().finish()?;
                // The app half-closed; it may still reset while the answer is on its way.
                watch_until(&answered, tcp_r.as_ref()).await?;
                return Ok::<_, io::Error>(total);
            }
            total += buf.len() as u64;
            from_tcp.fetch_add(buf.len() as u64, Ordering::Relaxed);
            let mut chunk = buf.freeze();
            tokio::select! {
                biased;
                sent = std::future::poll_fn(|cx| send_half().poll_send(cx, &mut chunk)) => sent?,
                e = tcp_r.as_ref().ready(Interest::ERROR) => return Err(socket_error(tcp_r.as_ref(), e)),
            }
        }
    };
    let to_tcp = async {
        let mut total = 0u64;
        // Receiving sees the stream's resets; the socket's errors are `to_h2`'s to watch.
        while let Some(chunk) = h2_recv.recv().await? {
            total += chunk.len() as u64;
            from_h2.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            writing.store(true, Ordering::Relaxed);
            tokio::select! {
                biased;
                written = tcp_w.write_all(&chunk) => written?,
                e = reset() => return Err(e),
            }
            writing.store(false, Ordering::Relaxed);
        }
        tcp_w.shutdown().await?;
        mark_done(&answered).await;
        Ok(total)
    };
    let result = tokio::try_join!(to_h2, to_tcp);
    if result.is_err() && writing.load(Ordering::Relaxed) {
        // Best effort: without it the socket closes with a FIN.
        let _ = tcp.set_zero_linger();
    }
    let (t, h) = result?;
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

/// The error `tcp` reports, once [`TcpStream::ready`] for [`Interest::ERROR`] returned `ready`
/// (the peer reset it, a keepalive or user timeout).
fn socket_error(tcp: &TcpStream, ready: io::Result<tokio::io::Ready>) -> io::Error {
    match ready.and_then(|_| tcp.take_error()) {
        Ok(Some(e)) => e,
        Ok(None) => io::Error::new(io::ErrorKind::ConnectionReset, "socket error"),
        Err(e) => e,
    }
}

/// One direction of a copy is done: flags it in `done` and has the task polled again, so
/// that the other direction's [`watch_until`] sees the flag.
async fn mark_done(done: &AtomicBool) {
    done.store(true, Ordering::Relaxed);
    std::future::poll_fn(|cx| {
        cx.waker().wake_by_ref();
        std::task::Poll::Ready(())
    })
    .await;
}

/// Waits until the other direction of the copy is done (`other`), failing with `tcp`'s error
/// if it reports one first (a direction that is done no longer reads its socket).
async fn watch_until(other: &AtomicBool, tcp: &TcpStream) -> io::Result<()> {
    let mut error = std::pin::pin!(tcp.ready(Interest::ERROR));
    std::future::poll_fn(|cx| {
        if other.load(Ordering::Relaxed) {
            return std::task::Poll::Ready(Ok(()));
        }
        error.as_mut().poll(cx).map(|e| Err(socket_error(tcp, e)))
    })
    .await
}

/// [`copy_tcp_h2`] that stops early (with an error) when `closer` is notified.
pub async fn copy_tcp_h2_until_closed(
    tcp: &mut TcpStream,
    h2: &mut H2Stream,
    tcp_side: TcpSide,
    counts: &ByteCounts,
    closer: &tokio::sync::Notify,
) -> io::Result<Transferred> {
    // Not a copy future passed to a combinator: a future passed by value is stored twice.
    tokio::select! {
        r = copy_tcp_h2(tcp, h2, tcp_side, counts) => r,
        () = closer.notified() => Err(closed_by_policy()),
    }
}

/// [`copy_both`] that stops early (with an error) when `closer` is notified.
pub async fn copy_until_closed(
    a: &mut TcpStream,
    b: &mut TcpStream,
    counts: &ByteCounts,
    closer: &tokio::sync::Notify,
) -> io::Result<Transferred> {
    // Not `until_closed(copy_both(..))`: a future passed by value is stored twice.
    tokio::select! {
        r = copy_both(a, b, counts) => r,
        () = closer.notified() => Err(closed_by_policy()),
    }
}

fn closed_by_policy() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "closed: no longer allowed by policy",
    )
}

#[cfg(test)]
mod tests;
