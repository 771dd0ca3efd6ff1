//! The plugin ↔ agent wire format: a 4-byte big-endian length, then JSON; the request's first
//! bytes carry the pod's netns fd (SCM_RIGHTS).
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::socket::{self, ControlMessage, ControlMessageOwned, MsgFlags};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::UnixStream;

use super::{CniEvent, CniReply};

/// Largest message either side accepts.
pub(crate) const MAX_MESSAGE: usize = 64 * 1024;
/// Most fds the server takes from one request (the protocol sends one; extras are closed).
const MAX_FDS: usize = 4;

/// Errors of one plugin → agent call.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// Nobody listens on the socket (agent down or not yet started).
    #[error("cannot connect to the ambit agent at {}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The request could not be written.
    #[error("cannot send to the ambit agent at {}", path.display())]
    Send {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// No (complete) reply arrived in time.
    #[error("no reply from the ambit agent at {}", path.display())]
    Receive {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The reply was not a valid message.
    #[error("malformed reply from the ambit agent at {}", path.display())]
    Decode {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// Sends `event` (with `netns_fd`, if any) to the agent at `path`; waits up to `timeout` for its reply.
pub(crate) fn call(
    path: &Path,
    event: &CniEvent,
    netns_fd: Option<BorrowedFd<'_>>,
    timeout: Duration,
) -> Result<CniReply, CallError> {
    let connect = |source| CallError::Connect {
        path: path.to_path_buf(),
        source,
    };
    let send = |source| CallError::Send {
        path: path.to_path_buf(),
        source,
    };
    let mut stream = StdUnixStream::connect(path).map_err(connect)?;
    stream.set_write_timeout(Some(timeout)).map_err(send)?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|source| CallError::Receive {
            path: path.to_path_buf(),
            source,
        })?;
    // Serializing our own plain struct cannot fail.
    let body = serde_json::to_vec(event).unwrap_or_default();
    let frame = frame(&body);
    let fds: Vec<RawFd> = netns_fd.iter().map(AsRawFd::as_raw_fd).collect();
    let cmsgs: Vec<ControlMessage<'_>> = if fds.is_empty() {
        Vec::new()
    } else {
        vec![ControlMessage::ScmRights(&fds)]
    };
    let sent = socket::sendmsg::<()>(
        stream.as_raw_fd(),
        &[IoSlice::new(&frame)],
        &cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(|e| send(io::Error::from(e)))?;
    stream.write_all(&frame[sent..]).map_err(send)?;
    let reply = read_frame(&mut stream).map_err(|source| CallError::Receive {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_slice(&reply).map_err(|source| CallError::Decode {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads one request and the fds that came with it. The caller owns (and must close) the fds.
pub(crate) async fn read_request(stream: &mut UnixStream) -> io::Result<(Vec<u8>, Vec<RawFd>)> {
    let fd = stream.as_raw_fd();
    let mut first = vec![0u8; 4 + MAX_MESSAGE];
    let (n, fds) = stream
        .async_io(Interest::READABLE, || {
            let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
            let mut iov = [IoSliceMut::new(&mut first)];
            let msg =
                socket::recvmsg::<()>(fd, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)
                    .map_err(io::Error::from)?;
            let mut fds = Vec::new();
            // MSG_CTRUNC: the kernel dropped the fds that did not fit; nix refuses to iterate.
            if let Ok(cmsgs) = msg.cmsgs() {
                for c in cmsgs {
                    if let ControlMessageOwned::ScmRights(received) = c {
                        fds.extend(received);
                    }
                }
            }
            Ok((msg.bytes, fds))
        })
        .await?;
    first.truncate(n);
    let mut buf = first;
    let body = async {
        while buf.len() < 4 {
            read_more(stream, &mut buf).await?;
        }
        let len = frame_len(&buf)?;
        while buf.len() < 4 + len {
            read_more(stream, &mut buf).await?;
        }
        buf.truncate(4 + len);
        buf.drain(..4);
        Ok::<_, io::Error>(buf)
    }
    .await;
    match body {
        Ok(body) => Ok((body, fds)),
        Err(e) => {
            close_all(&fds);
            Err(e)
        }
    }
}

/// Writes one reply.
pub(crate) async fn write_reply(stream: &mut UnixStream, reply: &CniReply) -> io::Result<()> {
    // Serializing our own plain enum cannot fail.
    let body = serde_json::to_vec(reply).unwrap_or_default();
    stream.write_all(&frame(&body)).await?;
    stream.shutdown().await
}

/// Closes fds received from a peer.
pub(crate) fn close_all(fds: &[RawFd]) {
    for fd in fds {
        let _ = nix::unistd::close(*fd);
    }
}

async fn read_more(stream: &mut UnixStream, buf: &mut Vec<u8>) -> io::Result<()> {
    let mut chunk = [0u8; 4096];
    let n = stream.read(&mut chunk).await?;
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "peer closed before a whole message arrived",
        ));
    }
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

fn frame(body: &[u8]) -> Vec<u8> {
    let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(body);
    out
}

fn frame_len(buf: &[u8]) -> io::Result<usize> {
    let mut len = [0u8; 4];
    len.copy_from_slice(&buf[..4]);
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_MESSAGE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("message of {len} bytes exceeds the {MAX_MESSAGE}-byte limit"),
        ));
    }
    Ok(len)
}

fn read_frame(stream: &mut StdUnixStream) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len)?;
    let len = frame_len(&len)?;
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body)?;
    Ok(body)
}
