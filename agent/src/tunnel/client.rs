//! HBONE client: TLS 1.3 + h2 to a peer's 15008, then one CONNECT stream per tunnelled connection.
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use h2::client::SendRequest;
use http::{Method, Request, StatusCode, Uri};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::expiry::{self, Presented};
use super::flow::{self, Flow, MAX_FRAME, STREAM_WINDOW};
use super::headers::ConnectHeaders;
use super::pool::DEFAULT_MAX_STREAMS;
use super::stream::H2Stream;
use super::{Error, ALPN_H2, HANDSHAKE_TIMEOUT};
use crate::identity as tls;
use crate::reason::Reason;

/// An established HBONE connection to one peer, able to carry many CONNECT streams.
#[derive(Clone)]
pub struct Tunnel {
    peer: SocketAddr,
    send: SendRequest<Bytes>,
    not_after: Option<SystemTime>,
    /// The server refused a stream because a certificate of the connection expired (by its
    /// clock): shared by the clones, so that the pool stops using the connection.
    stale: Arc<AtomicBool>,
    /// Whether new streams find send window (shared with the connection's streams).
    flow: Arc<Flow>,
}

impl Tunnel {
    /// Runs the TLS handshake (the config's verifier checks the peer's identity) and the
    /// HTTP/2 preface over `tcp`; the connection task runs on the current runtime.
    pub async fn handshake(
        tcp: TcpStream,
        peer: SocketAddr,
        tls: Arc<rustls::ClientConfig>,
    ) -> Result<Self, Error> {
        let name = || peer.to_string();
        // The server name is not used for verification (identities are checked on the URI
        // SAN); an IP name keeps rustls from sending SNI.
        let server_name = tls::server_name();
        // Learn which certificate we present: rustls does not say after the handshake.
        let mut config = (*tls).clone();
        let presented = Presented::new(config.client_auth_cert_resolver.clone());
        config.client_auth_cert_resolver = presented.clone();
        let tls_stream = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            TlsConnector::from(Arc::new(config)).connect(server_name, tcp),
        )
        .await
        .map_err(|_| Error::HandshakeTimeout { peer: name() })?
        .map_err(|source| Error::Tls {
            peer: name(),
            source,
        })?;
        let session = tls_stream.get_ref().1;
        if session.alpn_protocol() != Some(ALPN_H2) {
            return Err(Error::Alpn { peer: name() });
        }
        let not_after = expiry::connection_not_after(session, presented.not_after());
        // The pool puts at most DEFAULT_MAX_STREAMS streams on a connection.
        let max_streams = u32::try_from(DEFAULT_MAX_STREAMS).unwrap_or(u32::MAX);
        let (send, conn) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(flow::connection_window(max_streams))
            .max_frame_size(MAX_FRAME)
            .handshake(tls_stream)
            .await
            .map_err(|source| Error::H2 {
                peer: name(),
                source,
            })?;
        let peer_str = name();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(peer.addr = %peer_str, error = %e, "hbone connection closed");
            }
        });
        Ok(Self {
            peer,
            send,
            not_after,
            stale: Arc::new(AtomicBool::new(false)),
            flow: Arc::new(Flow::default()),
        })
    }

    /// What the connection's streams saw of its send window.
    pub fn flow(&self) -> &Flow {
        &self.flow
    }

    /// When the connection stops being backed by valid certificates: the earliest `notAfter`
    /// of the server's chain and of the chain we presented.
    pub fn not_after(&self) -> Option<SystemTime> {
        self.not_after
    }

    /// Whether a certificate of the connection has expired at `now`: it must carry no new
    /// stream (the server would refuse it), streams already open go on.
    pub fn is_expired(&self, now: SystemTime) -> bool {
        self.stale.load(Ordering::Relaxed) || expiry::expired(self.not_after, now)
    }

    /// The peer this tunnel goes to.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Whether the connection can still open streams.
    pub fn is_open(&mut self) -> bool {
        futures_ready(&mut self.send)
    }

    /// Opens a CONNECT stream to `authority` (`ip:port`; IPv6 in brackets) with no headers
    /// besides the authority.
    pub async fn connect(&mut self, authority: SocketAddr) -> Result<H2Stream, Error> {
        self.connect_with(authority, &ConnectHeaders::default())
            .await
    }

    /// Opens a CONNECT stream to `authority` carrying `headers` (ztunnel's `baggage`,
    /// `traceparent`, `forwarded`).
    pub async fn connect_with(
        &mut self,
        authority: SocketAddr,
        headers: &ConnectHeaders,
    ) -> Result<H2Stream, Error> {
        let peer = self.peer.to_string();
        let auth = authority.to_string();
        let uri = Uri::builder()
            .authority(auth.as_str())
            .build()
            .map_err(|_| Error::Authority {
                authority: auth.clone(),
            })?;
        let mut req = Request::builder()
            .method(Method::CONNECT)
            .uri(uri)
            .version(http::Version::HTTP_2)
            .body(())
            .map_err(|_| Error::Authority {
                authority: auth.clone(),
            })?;
        headers.apply(req.headers_mut());
        let mut send = self
            .send
            .clone()
            .ready()
            .await
            .map_err(|source| Error::H2 {
                peer: peer.clone(),
                source,
            })?;
        let (response, stream) = send.send_request(req, false).map_err(|source| Error::H2 {
            peer: peer.clone(),
            source,
        })?;
        let response = response.await.map_err(|source| Error::H2 {
            peer: peer.clone(),
            source,
        })?;
        if response.status() != StatusCode::OK {
            let reason = response
                .headers()
                .get(super::server::REFUSAL_HEADER)
                .and_then(|r| Reason::from_label(r.as_bytes()))
                .unwrap_or_else(|| Reason::of_status(response.status()));
            if reason == Reason::CertificateExpired {
                self.stale.store(true, Ordering::Relaxed);
            }
            return Err(Error::Status {
                peer,
                authority: auth,
                status: response.status(),
                reason,
            });
        }
        Ok(H2Stream::new(stream, response.into_body()).with_flow(self.flow.clone()))
    }
}

fn futures_ready(send: &mut SendRequest<Bytes>) -> bool {
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    !matches!(send.poll_ready(&mut cx), std::task::Poll::Ready(Err(_)))
}
