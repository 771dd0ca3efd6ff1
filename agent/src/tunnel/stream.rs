//! An HTTP/2 CONNECT stream as a byte pipe with flow control and half-close: owned `Bytes` halves for the proxy, AsyncRead + AsyncWrite for everything else.
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Largest DATA frame payload we queue at once.
const MAX_CHUNK: usize = 256 * 1024;

/// One tunnelled connection: our half of a CONNECT stream.
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    pending: Bytes,
    write_closed: bool,
}

impl H2Stream {
    /// Wraps both halves of a CONNECT stream.
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self {
            send,
            recv,
            pending: Bytes::new(),
            write_closed: false,
        }
    }

    /// Both directions at once, as halves that move owned `Bytes` (no copy on this side).
    pub fn halves(&mut self) -> (SendHalf<'_>, RecvHalf<'_>) {
        (
            SendHalf {
                send: &mut self.send,
                write_closed: &mut self.write_closed,
            },
            RecvHalf {
                recv: &mut self.recv,
                pending: &mut self.pending,
            },
        )
    }
}

/// The sending half of an [`H2Stream`].
pub struct SendHalf<'a> {
    send: &'a mut SendStream<Bytes>,
    write_closed: &'a mut bool,
}

impl SendHalf<'_> {
    /// Queues `chunk` as DATA frames without copying it, waiting for flow-control capacity
    /// (h2 bounds what it buffers per stream, so this is the back-pressure).
    pub async fn send(&mut self, mut chunk: Bytes) -> io::Result<()> {
        while !chunk.is_empty() {
            self.send.reserve_capacity(chunk.len().min(MAX_CHUNK));
            let n = poll_fn(|cx| self.send.poll_capacity(cx))
                .await
                .ok_or(io::ErrorKind::BrokenPipe)?
                .map_err(h2_io)?;
            if n == 0 {
                continue;
            }
            let part = chunk.split_to(n.min(chunk.len()));
            self.send.send_data(part, false).map_err(h2_io)?;
        }
        Ok(())
    }

    /// Ends our direction (END_STREAM): the peer sees a half-close.
    pub fn finish(&mut self) -> io::Result<()> {
        if !*self.write_closed {
            *self.write_closed = true;
            self.send.send_data(Bytes::new(), true).map_err(h2_io)?;
        }
        Ok(())
    }
}

/// The receiving half of an [`H2Stream`].
pub struct RecvHalf<'a> {
    recv: &'a mut RecvStream,
    pending: &'a mut Bytes,
}

impl RecvHalf<'_> {
    /// The next chunk the peer sent, as h2 received it (no copy); `None` once the peer
    /// half-closed. The window is given back at once: the caller's write is the back-pressure.
    pub async fn recv(&mut self) -> io::Result<Option<Bytes>> {
        if !self.pending.is_empty() {
            return Ok(Some(std::mem::take(self.pending)));
        }
        match poll_fn(|cx| self.recv.poll_data(cx)).await {
            Some(Ok(data)) => {
                let _ = self.recv.flow_control().release_capacity(data.len());
                Ok(Some(data))
            }
            Some(Err(e)) => Err(h2_io(e)),
            None => Ok(None),
        }
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
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                buf.put_slice(&self.pending[..n]);
                self.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // Give the window back as soon as the bytes are ours; the copy loop
                    // applies back-pressure through its own buffer.
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    self.pending = data;
                }
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
        self.send.reserve_capacity(buf.len().min(MAX_CHUNK));
        loop {
            match ready!(self.send.poll_capacity(cx)) {
                Some(Ok(0)) => continue,
                Some(Ok(n)) => {
                    let n = n.min(buf.len());
                    self.send
                        .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                        .map_err(h2_io)?;
                    return Poll::Ready(Ok(n));
                }
                Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            }
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
