//! HBONE server: terminate mutual TLS on 15008, accept CONNECT streams, hand each to a handler.
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use h2::server::SendResponse;
use http::{Method, Request, Response};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use super::expiry::{self, Presented};
use super::flow::{self, MAX_FRAME, MAX_STREAMS_FOR_WINDOW, STREAM_WINDOW};
use super::headers::Received;
use super::refusals;
use super::stream::H2Stream;
use super::{Error, ALPN_H2, HANDSHAKE_TIMEOUT};
use crate::identity::{self as tls, SpiffeId};
use crate::metrics::Rejections;
use crate::reason::Reason;

/// Per-connection limits of the tunnel server, and where it counts its refusals.
#[derive(Debug, Clone)]
pub struct ServerLimits {
    /// Deadline of the TLS handshake.
    pub handshake_timeout: std::time::Duration,
    /// Concurrent CONNECT streams one connection may hold (at most
    /// [`MAX_STREAMS_FOR_WINDOW`]: the connection window holds a stream window for each).
    pub max_streams: u32,
    /// A connection without streams for this long gets GOAWAY.
    pub idle_timeout: std::time::Duration,
    /// Where refusals are counted (`ambit_tunnel_rejections_total`; by default a family of
    /// its own).
    pub rejections: Rejections,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            handshake_timeout: HANDSHAKE_TIMEOUT,
            max_streams: 1000,
            idle_timeout: std::time::Duration::from_secs(300),
            rejections: Rejections::default(),
        }
    }
}
/// How long a connection may stay open after GOAWAY once it has no stream left: a peer that
/// never completes the shutdown (ignores the GOAWAY and its PING) is closed then.
pub const GOAWAY_GRACE: std::time::Duration = std::time::Duration::from_secs(5);
/// Largest header list accepted from a client.
pub const MAX_HEADER_LIST: u32 = 16 * 1024;

/// The client of a tunnel connection, as its TLS handshake proved it.
#[derive(Debug, Clone)]
pub struct Authenticated {
    /// The client's identity, from its verified certificate.
    pub id: SpiffeId,
    /// When the connection stops being backed by valid certificates: the earliest `notAfter`
    /// of the client's chain and of the chain this server presented (`None`: not checked).
    pub not_after: Option<SystemTime>,
}

impl From<SpiffeId> for Authenticated {
    fn from(id: SpiffeId) -> Self {
        Self {
            id,
            not_after: None,
        }
    }
}

/// Response header naming why a CONNECT was refused (as counted in
/// `ambit_tunnel_rejections_total`).
pub const REFUSAL_HEADER: &str = "ambit-refusal-reason";

/// A CONNECT request that passed the protocol checks.
#[derive(Debug, Clone)]
pub struct Connect {
    /// The TCP peer (the source agent, which binds the source pod's address).
    pub peer: SocketAddr,
    /// The target `ip:port` from `:authority`.
    pub authority: SocketAddr,
    /// The client's identity, proved by its verified certificate.
    pub peer_id: SpiffeId,
    /// What the request's `traceparent`, `baggage` and `forwarded` said: for the access log
    /// only, never for policy or delivery (a peer can write anything there).
    pub received: Received,
}

/// A CONNECT stream waiting for the handler's answer.
pub struct PendingConnect {
    /// The request.
    pub connect: Connect,
    respond: SendResponse<Bytes>,
    recv: h2::RecvStream,
    rejections: Rejections,
}

impl PendingConnect {
    /// Answers 200 and returns the byte pipe.
    pub fn accept(mut self) -> Option<H2Stream> {
        let send = self.respond.send_response(Response::new(()), false).ok()?;
        Some(H2Stream::new(send, self.recv))
    }

    /// Answers the status of `reason` (401 denied, 503 app unreachable, ...) with the reason in
    /// `ambit-refusal-reason`, and ends the stream; counted in `ambit_tunnel_rejections_total`
    /// under `reason`.
    pub fn refuse(mut self, reason: Reason) {
        self.rejections.count(reason);
        reply(&mut self.respond, reason);
    }
}

/// Serves one accepted TCP connection on the tunnel port: TLS (client certificate required by
/// `tls`), HTTP/2, then `handle` for every CONNECT; when `draining` is signaled, GOAWAY.
/// Non-CONNECT requests get 405, malformed authorities 400, new streams once a certificate of
/// the connection has expired 503 (and GOAWAY). Connection-level failures are returned, not
/// counted: the caller counts them under [`Error::reason`].
pub async fn serve_connection<H, Fut>(
    tcp: TcpStream,
    peer: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    limits: ServerLimits,
    draining: crate::drain::Signal,
    handle: H,
) -> Result<(), Error>
where
    H: Fn(PendingConnect) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (tls_stream, peer_id) = accept_tls(tcp, peer, tls, limits.handshake_timeout).await?;
    serve_h2(tls_stream, peer, peer_id, limits, draining, handle).await
}

/// The TLS half of [`serve_connection`]: handshake (client SVID required by `tls`), ALPN `h2`,
/// the peer's identity and when the certificates of the connection expire.
pub async fn accept_tls(
    tcp: TcpStream,
    peer: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    timeout: std::time::Duration,
) -> Result<(tokio_rustls::server::TlsStream<TcpStream>, Authenticated), Error> {
    let name = || peer.to_string();
    // Learn which certificate we present: rustls does not say after the handshake.
    let mut config = (*tls).clone();
    let presented = Presented::new(config.cert_resolver.clone());
    config.cert_resolver = presented.clone();
    let tls_stream = tokio::time::timeout(timeout, TlsAcceptor::from(Arc::new(config)).accept(tcp))
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
    let id = tls::peer_identity(session).map_err(|source| Error::PeerIdentity {
        peer: name(),
        source,
    })?;
    let not_after = expiry::connection_not_after(session, presented.not_after());
    Ok((tls_stream, Authenticated { id, not_after }))
}

impl Error {
    /// The TLS alert the peer sent to end the handshake (`BadCertificate` when it refused the
    /// certificate presented to it, `CertificateRequired`, ...), when that is why it failed.
    pub fn peer_alert(&self) -> Option<rustls::AlertDescription> {
        let Error::Tls { source, .. } = self else {
            return None;
        };
        match source.get_ref()?.downcast_ref::<rustls::Error>()? {
            rustls::Error::AlertReceived(alert) => Some(*alert),
            _ => None,
        }
    }
}

/// The HTTP/2 half of [`serve_connection`], over any byte stream whose peer proved `client`
/// (separate so that it can be fuzzed without TLS). A peer that vanishes mid-connection ends
/// it without an error (it was not refused).
pub async fn serve_h2<IO, H, Fut>(
    io: IO,
    peer: SocketAddr,
    client: impl Into<Authenticated>,
    limits: ServerLimits,
    mut draining: crate::drain::Signal,
    handle: H,
) -> Result<(), Error>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    H: Fn(PendingConnect) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let name = || peer.to_string();
    let Authenticated {
        id: peer_id,
        not_after,
    } = client.into();
    let rejections = limits.rejections.clone();
    let stream_limit = rejections.clone();
    let io = refusals::Watched::new(io, move |n| {
        stream_limit.count_n(Reason::StreamLimit, n);
        tracing::debug!(peer.addr = %peer, refused = n, "tunnel streams past the per-connection cap refused");
    });
    // A window for every stream the connection may carry: streams whose app stopped reading
    // cannot starve the others (tunnel/flow.rs).
    let max_streams = limits.max_streams.clamp(1, MAX_STREAMS_FOR_WINDOW);
    let mut conn = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(flow::connection_window(max_streams))
        .max_frame_size(MAX_FRAME)
        .max_concurrent_streams(max_streams)
        .max_header_list_size(MAX_HEADER_LIST)
        .handshake(io)
        .await
        .map_err(|source| Error::H2 {
            peer: name(),
            source,
        })?;
    let mut goaway_sent = false;
    let mut goaway_at: Option<tokio::time::Instant> = None;
    let active = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut idle_since = tokio::time::Instant::now();
    // Once a certificate of the connection expires, new streams are refused and the connection
    // drained, so that the client dials again with fresh certificates.
    let expires_at = not_after.map(expiry::instant_of);
    let mut expired = false;
    loop {
        let idle_deadline = idle_since + limits.idle_timeout;
        let close_deadline = goaway_at.map_or(idle_deadline, |t| t + GOAWAY_GRACE);
        let next = tokio::select! {
            next = conn.accept() => next,
            // No stream for the idle timeout: GOAWAY (a client holding a connection open with
            // nothing on it costs memory and a file descriptor).
            () = tokio::time::sleep_until(idle_deadline), if !goaway_sent => {
                if active.load(std::sync::atomic::Ordering::Relaxed) == 0 {
                    goaway_sent = true;
                    goaway_at = Some(tokio::time::Instant::now());
                    conn.graceful_shutdown();
                } else {
                    idle_since = tokio::time::Instant::now();
                }
                continue;
            }
            // Drain: GOAWAY lets streams in flight finish and stops new ones; keep polling the
            // connection so they can.
            () = draining.signaled(), if !goaway_sent => {
                goaway_sent = true;
                goaway_at = Some(tokio::time::Instant::now());
                conn.graceful_shutdown();
                continue;
            }
            () = tokio::time::sleep_until(expires_at.unwrap_or(idle_deadline)), if expires_at.is_some() && !expired => {
                expired = true;
                tracing::info!(peer.addr = %peer, peer.identity = %peer_id, "tunnel certificate expired; draining the connection");
                if !goaway_sent {
                    goaway_sent = true;
                    goaway_at = Some(tokio::time::Instant::now());
                    conn.graceful_shutdown();
                }
                continue;
            }
            // GOAWAY sent a while ago and no stream left, yet the peer keeps the connection
            // open (it ignores the GOAWAY): close it rather than hold its fd forever.
            () = tokio::time::sleep_until(close_deadline), if goaway_at.is_some() => {
                if active.load(std::sync::atomic::Ordering::Relaxed) == 0 {
                    break;
                }
                goaway_at = Some(tokio::time::Instant::now());
                continue;
            }
        };
        let Some(next) = next else { break };
        let (req, mut respond) = match next {
            Ok(r) => r,
            // The peer went away (reset, EOF without GOAWAY): not a refusal.
            Err(source) if source.is_io() => {
                tracing::debug!(peer.addr = %peer, error = %source, "tunnel peer went away");
                break;
            }
            Err(source) => {
                return Err(Error::H2 {
                    peer: name(),
                    source,
                })
            }
        };
        // Checked on the wall clock too: the timer may lag it (suspend, clock steps).
        if expired || expiry::expired(not_after, SystemTime::now()) {
            rejections.count(Reason::CertificateExpired);
            tracing::warn!(
                target: "access",
                direction = "inbound",
                src.addr = %peer,
                peer.identity = %peer_id,
                reason = Reason::CertificateExpired.label(),
                "tunnel stream refused: a certificate of the connection has expired"
            );
            reply(&mut respond, Reason::CertificateExpired);
            if !goaway_sent {
                goaway_sent = true;
                goaway_at = Some(tokio::time::Instant::now());
                conn.graceful_shutdown();
            }
            expired = true;
            continue;
        }
        idle_since = tokio::time::Instant::now();
        // The request is checked and the handler's future made before the spawn: the task
        // (alive as long as the stream) holds that future alone, not also the request and
        // the pending CONNECT it was made from (in release 2640 B a stream, now 1984 B).
        let checked = check_request(req, respond, peer, peer_id.clone(), rejections.clone());
        let Some(pending) = checked else { continue };
        let handled = handle(pending);
        let active = active.clone();
        active.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // A combinator, not an async block: that would store the handler's future twice.
        let task = futures_util::FutureExt::map(handled, move |()| {
            active.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        });
        tokio::spawn(task);
    }
    Ok(())
}

/// Checks the request shape; answers 405 (not CONNECT) and 400 (bad authority) itself, counted.
fn check_request(
    req: Request<h2::RecvStream>,
    mut respond: SendResponse<Bytes>,
    peer: SocketAddr,
    peer_id: SpiffeId,
    rejections: Rejections,
) -> Option<PendingConnect> {
    if req.method() != Method::CONNECT {
        rejections.count(Reason::Method);
        reply(&mut respond, Reason::Method);
        return None;
    }
    let authority = req
        .uri()
        .authority()
        .and_then(|a| a.as_str().parse::<SocketAddr>().ok());
    let Some(authority) = authority else {
        rejections.count(Reason::BadAuthority);
        reply(&mut respond, Reason::BadAuthority);
        return None;
    };
    let (parts, recv) = req.into_parts();
    Some(PendingConnect {
        connect: Connect {
            peer,
            authority,
            peer_id,
            received: Received::new(parts.headers),
        },
        respond,
        recv,
        rejections,
    })
}

fn reply(respond: &mut SendResponse<Bytes>, reason: Reason) {
    let mut resp = Response::new(());
    *resp.status_mut() = reason.status();
    resp.headers_mut().insert(
        REFUSAL_HEADER,
        http::HeaderValue::from_static(reason.label()),
    );
    let _ = respond.send_response(resp, true);
}
