//! Counts the streams h2 refuses on its own (past the per-connection stream cap) by watching the frames the tunnel server writes.
//!
//! h2 enforces `SETTINGS_MAX_CONCURRENT_STREAMS` itself: a stream opened past the cap is
//! answered with `RST_STREAM(REFUSED_STREAM)` and never reaches `accept`, so the server loop
//! cannot count it. The server's own refusals are answered with a status instead, so every
//! `REFUSED_STREAM` in its output is one of h2's cap refusals.
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const FRAME_HEADER: usize = 9;
const RST_STREAM: u8 = 0x3;
const REFUSED_STREAM: u32 = 0x7;

/// Where a scan of an outgoing HTTP/2 frame sequence is (the server writes frames from its
/// first byte: it sends no preface).
#[derive(Debug, Default)]
pub(super) struct FrameScan {
    header: [u8; FRAME_HEADER],
    have: usize,
    /// Payload bytes of the current frame still to come.
    left: usize,
    /// The error code of an RST_STREAM being read, and how many of its bytes are in.
    code: Option<([u8; 4], usize)>,
}

impl FrameScan {
    /// Feeds the next written bytes; returns how many `REFUSED_STREAM` resets they completed.
    pub(super) fn feed(&mut self, mut bytes: &[u8]) -> u64 {
        let mut refused = 0;
        while !bytes.is_empty() {
            if self.left == 0 {
                let k = (FRAME_HEADER - self.have).min(bytes.len());
                self.header[self.have..self.have + k].copy_from_slice(&bytes[..k]);
                self.have += k;
                bytes = &bytes[k..];
                if self.have < FRAME_HEADER {
                    break;
                }
                self.have = 0;
                let h = self.header;
                self.left = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
                self.code = (h[3] == RST_STREAM && self.left == 4).then_some(([0; 4], 0));
                continue;
            }
            let k = self.left.min(bytes.len());
            if let Some((code, got)) = &mut self.code {
                // `left` is the code's missing bytes here, so `k` fits.
                code[*got..*got + k].copy_from_slice(&bytes[..k]);
                *got += k;
            }
            self.left -= k;
            bytes = &bytes[k..];
            if self.left == 0 {
                if let Some((code, _)) = self.code.take() {
                    refused += u64::from(u32::from_be_bytes(code) == REFUSED_STREAM);
                }
            }
        }
        refused
    }
}

/// A server connection's byte stream that reports the `REFUSED_STREAM` resets written to it.
pub(super) struct Watched<IO, F> {
    inner: IO,
    scan: FrameScan,
    on_refused: F,
}

impl<IO, F: FnMut(u64)> Watched<IO, F> {
    /// Wraps `inner`; `on_refused(n)` runs whenever a write completes `n` refusals.
    pub(super) fn new(inner: IO, on_refused: F) -> Self {
        Self {
            inner,
            scan: FrameScan::default(),
            on_refused,
        }
    }

    fn saw(&mut self, bytes: &[u8]) {
        let n = self.scan.feed(bytes);
        if n > 0 {
            (self.on_refused)(n);
        }
    }
}

impl<IO: AsyncRead + Unpin, F: Unpin> AsyncRead for Watched<IO, F> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin, F: FnMut(u64) + Unpin> AsyncWrite for Watched<IO, F> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.saw(&buf[..n]);
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            let mut left = n;
            for b in bufs {
                if left == 0 {
                    break;
                }
                let k = left.min(b.len());
                self.saw(&b[..k]);
                left -= k;
            }
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(ty: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = len.to_be_bytes()[1..].to_vec();
        f.push(ty);
        f.push(0);
        f.extend(stream.to_be_bytes());
        f.extend(payload);
        f
    }

    fn output() -> Vec<u8> {
        let mut out = frame(0x4, 0, &[0, 3, 0, 0, 0, 50]); // SETTINGS
        out.extend(frame(0x1, 1, b"headers")); // HEADERS
        out.extend(frame(RST_STREAM, 3, &7u32.to_be_bytes())); // REFUSED_STREAM
        out.extend(frame(0x0, 1, &[RST_STREAM; 4])); // DATA that looks like a reset
        out.extend(frame(RST_STREAM, 5, &8u32.to_be_bytes())); // CANCEL: not a refusal
        out.extend(frame(0x0, 1, &[])); // empty DATA
        out.extend(frame(RST_STREAM, 7, &7u32.to_be_bytes()));
        out.extend(frame(0x6, 0, &[0; 8])); // PING
        out
    }

    #[test]
    fn counts_only_refused_stream_resets() {
        assert_eq!(FrameScan::default().feed(&output()), 2);
    }

    #[test]
    fn counts_the_same_however_the_writes_are_split() {
        let out = output();
        for size in 1..out.len() {
            let mut scan = FrameScan::default();
            let n: u64 = out.chunks(size).map(|c| scan.feed(c)).sum();
            assert_eq!(n, 2, "writes of {size} bytes");
        }
    }

    #[tokio::test]
    async fn the_wrapper_reports_what_was_written_and_passes_bytes_on() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (a, mut b) = tokio::io::duplex(4096);
        let mut seen = 0;
        let mut w = Watched::new(a, |n| seen += n);
        let out = output();
        let (head, tail) = out.split_at(20);
        let bufs = [io::IoSlice::new(head), io::IoSlice::new(tail)];
        let mut written = 0;
        while written < out.len() {
            written += if written == 0 {
                w.write_vectored(&bufs).await.unwrap()
            } else {
                w.write(&out[written..]).await.unwrap()
            };
        }
        drop(w);
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, out);
        assert_eq!(seen, 2);
    }
}
