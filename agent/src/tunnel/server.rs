//! HBONE server: terminate mutual TLS on 15008, accept CONNECT streams, hand each to a handler.
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use h2::server::SendResponse;
use http::{Method, Request, Response, StatusCode};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use super::stream::H2Stream;
use super::{Error, ALPN_H2, CONNECTION_WINDOW, HANDSHAKE_TIMEOUT, MAX_FRAME, STREAM_WINDOW};
use crate::identity::{self as tls, SpiffeId};

/// Most concurrent CONNECT streams one client connection may hold.
pub const MAX_STREAMS: u32 = 1000;
/// Largest header list accepted from a client.
pub const MAX_HEADER_LIST: u32 = 16 * 1024;

/// A CONNECT request that passed the protocol checks.
#[derive(Debug, Clone)]
pub struct Connect {
    /// The TCP peer (the source agent, which binds the source pod's address).
    pub peer: SocketAddr,
    /// The target `ip:port` from `:authority`.
    pub authority: SocketAddr,
    /// The client's identity, proved by its verified certificate.
    pub peer_id: SpiffeId,
}

/// A CONNECT stream waiting for the handler's answer.
pub struct PendingConnect {
    /// The request.
    pub connect: Connect,
    respond: SendResponse<Bytes>,
    recv: h2::RecvStream,
}

impl PendingConnect {
    /// Answers 200 and returns the byte pipe.
    pub fn accept(mut self) -> Option<H2Stream> {
        let send = self.respond.send_response(Response::new(()), false).ok()?;
        Some(H2Stream::new(send, self.recv))
    }

    /// Answers `status` (401 denied, 503 app unreachable, ...) and ends the stream.
    pub fn refuse(mut self, status: StatusCode) {
        reply(&mut self.respond, status);
    }
}

/// Serves one accepted TCP connection on the tunnel port: TLS (client certificate required by
/// `tls`), HTTP/2, then `handle` for every CONNECT; when `draining` turns true, GOAWAY. Non-CONNECT requests get 405, malformed
/// authorities 400.
pub async fn serve_connection<H, Fut>(
    tcp: TcpStream,
    peer: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    mut draining: tokio::sync::watch::Receiver<bool>,
    handle: H,
) -> Result<(), Error>
where
    H: Fn(PendingConnect) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let name = || peer.to_string();
    let tls_stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, TlsAcceptor::from(tls).accept(tcp))
        .await
        .map_err(|_| Error::HandshakeTimeout { peer: name() })?
        .map_err(|source| Error::Tls {
            peer: name(),
            source,
        })?;
    let (_, session) = tls_stream.get_ref();
    if session.alpn_protocol() != Some(ALPN_H2) {
        return Err(Error::Alpn { peer: name() });
    }
    let peer_id = tls::peer_identity(session).map_err(|source| Error::PeerIdentity {
        peer: name(),
        source,
    })?;
    let mut conn = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_concurrent_streams(MAX_STREAMS)
        .max_header_list_size(MAX_HEADER_LIST)
        .handshake(tls_stream)
        .await
        .map_err(|source| Error::H2 {
            peer: name(),
            source,
        })?;
    let mut goaway_sent = false;
    loop {
        let next = tokio::select! {
            next = conn.accept() => next,
            // Drain: GOAWAY lets streams in flight finish and stops new ones; keep polling the
            // connection so they can.
            _ = draining.wait_for(|d| *d), if !goaway_sent => {
                goaway_sent = true;
                conn.graceful_shutdown();
                continue;
            }
        };
        let Some(next) = next else { break };
        let (req, respond) = match next {
            Ok(r) => r,
            Err(source) => {
                return Err(Error::H2 {
                    peer: name(),
                    source,
                })
            }
        };
        let handle = handle.clone();
        let peer_id = peer_id.clone();
        tokio::spawn(async move {
            if let Some(pending) = check_request(req, respond, peer, peer_id) {
                handle(pending).await;
            }
        });
    }
    Ok(())
}

/// Checks the request shape; answers 405 (not CONNECT) and 400 (bad authority) itself.
fn check_request(
    req: Request<h2::RecvStream>,
    mut respond: SendResponse<Bytes>,
    peer: SocketAddr,
    peer_id: SpiffeId,
) -> Option<PendingConnect> {
    if req.method() != Method::CONNECT {
        reply(&mut respond, StatusCode::METHOD_NOT_ALLOWED);
        return None;
    }
    let authority = req
        .uri()
        .authority()
        .and_then(|a| a.as_str().parse::<SocketAddr>().ok());
    let Some(authority) = authority else {
        reply(&mut respond, StatusCode::BAD_REQUEST);
        return None;
    };
    Some(PendingConnect {
        connect: Connect {
            peer,
            authority,
            peer_id,
        },
        respond,
        recv: req.into_body(),
    })
}

fn reply(respond: &mut SendResponse<Bytes>, status: StatusCode) {
    let mut resp = Response::new(());
    *resp.status_mut() = status;
    let _ = respond.send_response(resp, true);
}
