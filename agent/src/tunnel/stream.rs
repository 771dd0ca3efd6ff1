//! An HTTP/2 CONNECT stream as a byte pipe with flow control and half-close: owned `Bytes` halves for the proxy, AsyncRead + AsyncWrite for everything else.
//!
//! Receive window is given back only for bytes that have been passed on (written by the
//! caller, or copied out by `poll_read`): a stream whose reader stopped holds at most one
//! stream window in the agent, and only its own window (see `flow.rs`).
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::flow::Flow;

/// Largest DATA frame payload we queue at once.
const MAX_CHUNK: usize = 256 * 1024;

/// One tunnelled connection: our half of a CONNECT stream.
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received bytes not yet copied out by `poll_read` (their window not yet given back).
    pending: Bytes,
    /// Bytes of the last chunk [`RecvHalf::recv`] handed out, whose window is given back at
    /// the next call (the caller has written them on by then).
    unreleased: usize,
    write_closed: bool,
    out: Outgoing,
}

/// What the sending side tells the client's connection about its window.
struct Outgoing {
    /// Bytes queued so far.
    sent: u64,
    /// The connection's shared state (client streams only).
    flow: Option<Arc<Flow>>,
    /// Counted as waiting in `flow`.
    waiting: bool,
}

impl H2Stream {
    /// Wraps both halves of a CONNECT stream.
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self {
            send,
            recv,
            pending: Bytes::new(),
            unreleased: 0,
            write_closed: false,
            out: Outgoing {
                sent: 0,
                flow: None,
                waiting: false,
            },
        }
    }

    /// Reports waits for send window to the connection's `flow` (client streams), so that the
    /// pool can tell a connection that has none left.
    pub fn with_flow(mut self, flow: Arc<Flow>) -> Self {
        self.out.flow = Some(flow);
        self
    }

    /// Ends the stream abruptly (RST_STREAM CANCEL) unless it already ended: the peer drops
    /// what it holds for it and resets its side.
    pub fn reset(&mut self) {
        self.send.send_reset(h2::Reason::CANCEL);
    }

    /// Both directions at once, as halves that move owned `Bytes` (no copy on this side).
    pub fn halves(&mut self) -> (SendHalf<'_>, RecvHalf<'_>) {
        (
            SendHalf {
                send: &mut self.send,
                write_closed: &mut self.write_closed,
                out: &mut self.out,
            },
            RecvHalf {
                recv: &mut self.recv,
                pending: &mut self.pending,
                unreleased: &mut self.unreleased,
            },
        )
    }
}

impl Drop for H2Stream {
    fn drop(&mut self) {
        self.out.stop_waiting();
    }
}

impl Outgoing {
    /// Capacity to send up to `want` bytes on `send` (0: none yet, poll again).
    fn poll_capacity(
        &mut self,
        send: &mut SendStream<Bytes>,
        cx: &mut Context<'_>,
        want: usize,
    ) -> Poll<io::Result<usize>> {
        send.reserve_capacity(want.min(MAX_CHUNK));
        match send.poll_capacity(cx) {
            Poll::Pending => {
                if let Some(flow) = &self.flow {
                    if !self.waiting {
                        self.waiting = flow.wait_begin(self.sent);
                    }
                }
                Poll::Pending
            }
            Poll::Ready(Some(Ok(n))) => {
                if n > 0 {
                    self.stop_waiting();
                    if let Some(flow) = &self.flow {
                        flow.granted();
                    }
                }
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Err(h2_io(e))),
            Poll::Ready(None) => Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
        }
    }

    fn stop_waiting(&mut self) {
        if std::mem::take(&mut self.waiting) {
            if let Some(flow) = &self.flow {
                flow.wait_end();
            }
        }
    }
}

/// The sending half of an [`H2Stream`].
pub struct SendHalf<'a> {
    send: &'a mut SendStream<Bytes>,
    write_closed: &'a mut bool,
    out: &'a mut Outgoing,
}

impl SendHalf<'_> {
    /// Queues `chunk` as DATA frames without copying it, as far as the flow-control window
    /// allows, splitting off what went; ready once `chunk` is empty (h2 bounds what it buffers
    /// per stream, so this is the back-pressure).
    pub fn poll_send(&mut self, cx: &mut Context<'_>, chunk: &mut Bytes) -> Poll<io::Result<()>> {
        while !chunk.is_empty() {
            let n = ready!(self.out.poll_capacity(self.send, cx, chunk.len()))?;
            if n == 0 {
                continue;
            }
            let part = chunk.split_to(n.min(chunk.len()));
            self.out.sent += part.len() as u64;
            self.send.send_data(part, false).map_err(h2_io)?;
        }
        Poll::Ready(Ok(()))
    }

    /// Ends our direction (END_STREAM): the peer sees a half-close.
    pub fn finish(&mut self) -> io::Result<()> {
        if !*self.write_closed {
            *self.write_closed = true;
            self.send.send_data(Bytes::new(), true).map_err(h2_io)?;
        }
        Ok(())
    }

    /// Ready with an error once the stream is reset (by the peer, or by h2 on a connection
    /// error); pending while it is open or ended normally.
    pub fn poll_reset(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        match ready!(self.send.poll_reset(cx)) {
            Ok(reason) => Poll::Ready(io::Error::new(
                io::ErrorKind::ConnectionReset,
                format!("tunnel stream reset: {reason}"),
            )),
            Err(e) => Poll::Ready(h2_io(e)),
        }
    }
}

/// The receiving half of an [`H2Stream`].
pub struct RecvHalf<'a> {
    recv: &'a mut RecvStream,
    pending: &'a mut Bytes,
    unreleased: &'a mut usize,
}

impl RecvHalf<'_> {
    /// The next chunk the peer sent, as h2 received it (no copy); `None` once the peer
    /// half-closed. The window of the chunk returned before is given back now: the caller has
    /// written it on, so a caller that stops writing stops the peer after one window.
    pub async fn recv(&mut self) -> io::Result<Option<Bytes>> {
        poll_fn(|cx| self.poll_recv(cx)).await
    }

    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        release(self.recv, std::mem::take(self.unreleased));
        let data = if self.pending.is_empty() {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => data,
                Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                None => return Poll::Ready(Ok(None)),
            }
        } else {
            std::mem::take(self.pending)
        };
        *self.unreleased = data.len();
        Poll::Ready(Ok(Some(data)))
    }
}

/// Gives back the window of `n` received bytes.
fn release(recv: &mut RecvStream, n: usize) {
    if n > 0 {
        // Fails only for more than was received, which `n` never is.
        let _ = recv.flow_control().release_capacity(n);
    }
}

fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io()
            .unwrap_or_else(|| io::Error::other("h2 i/o error"))
    } else {
        io::Error::new(io::ErrorKind::ConnectionReset, e)
    }
}

impl AsyncRead for H2Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        release(&mut this.recv, std::mem::take(&mut this.unreleased));
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending[..n]);
                this.pending.advance(n);
                // The bytes are the caller's now: their window goes back.
                release(&mut this.recv, n);
                return Poll::Ready(Ok(()));
            }
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => this.pending = data,
                Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                None => return Poll::Ready(Ok(())), // END_STREAM: the peer half-closed
            }
        }
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let this = &mut *self;
        loop {
            let n = ready!(this.out.poll_capacity(&mut this.send, cx, buf.len()))?;
            if n == 0 {
                continue;
            }
            let n = n.min(buf.len());
            this.out.sent += n as u64;
            this.send
                .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                .map_err(h2_io)?;
            return Poll::Ready(Ok(n));
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // h2 writes frames from the connection task; nothing is buffered here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.write_closed {
            self.write_closed = true;
            self.send.send_data(Bytes::new(), true).map_err(h2_io)?;
        }
        Poll::Ready(Ok(()))
    }
}
