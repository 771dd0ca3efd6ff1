//! The CA's gRPC server: TLS accept, the generated `IstioCertificateService` server, shutdown.
//!
//! TLS handshakes run in their own tasks with a deadline, outside tonic: a client sending
//! garbage, plaintext or nothing at all costs one task for at most the handshake timeout, is
//! logged and counted, and never holds up other clients. Only completed TLS connections reach
//! the HTTP/2 server.
//!
//! Per-source fairness: one source address may have `maxHandshakesPerSource` handshakes in
//! progress and `maxConnectionsPerSource` connections open at once ([`CaLimits`], the
//! config's `limits`); past either cap a
//! new connection from it is closed at once and counted (`source_handshake_limit`,
//! `source_connection_limit`), so one flooding source cannot take the agent-wide handshake
//! slots from the others.
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tonic::Status;

use crate::ca::service::CaService;
use crate::identity::ca_api::{
    IstioCertificateRequest, IstioCertificateResponse, IstioCertificateService,
    IstioCertificateServiceServer,
};

/// Default deadline for a client to complete the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest gRPC request decoded; CSRs are refused above `identity::MAX_CSR_BYTES` with a
/// precise message, larger messages by tonic ("message length too large").
pub const MAX_REQUEST_BYTES: usize = 128 * 1024;
/// Deadline for one request, and for open requests at shutdown.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Default cap of handshakes in progress at once; more connections wait in the accept queue.
pub const MAX_HANDSHAKES: usize = 256;
/// Default cap of handshakes in progress at once from one source address (a node agent
/// needs a few).
pub const MAX_HANDSHAKES_PER_SOURCE: usize = 16;
/// Default cap of connections open at once from one source address.
pub const MAX_CONNECTIONS_PER_SOURCE: usize = 128;

/// The caps and deadline of the CA's listener (the CA config's `limits`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CaLimits {
    /// Handshakes in progress at once; more connections wait in the accept queue.
    pub max_handshakes: usize,
    /// Handshakes in progress at once from one source address.
    pub max_handshakes_per_source: usize,
    /// Connections open at once from one source address.
    pub max_connections_per_source: usize,
    /// Deadline for a client to complete the TLS handshake.
    pub handshake_timeout: Duration,
}

impl Default for CaLimits {
    fn default() -> Self {
        Self {
            max_handshakes: MAX_HANDSHAKES,
            max_handshakes_per_source: MAX_HANDSHAKES_PER_SOURCE,
            max_connections_per_source: MAX_CONNECTIONS_PER_SOURCE,
            handshake_timeout: HANDSHAKE_TIMEOUT,
        }
    }
}

/// A CA server running on a bound listener; dropping it stops it (abruptly).
#[derive(Debug)]
pub struct RunningCa {
    addr: SocketAddr,
    /// The serving certificate, replaced when the root material is reloaded.
    serving: Arc<Serving>,
    stop: crate::drain::Trigger,
    /// `None` only after [`RunningCa::stop`] took it.
    task: Option<JoinHandle<()>>,
}

/// Replaces the certificate a [`RunningCa`] presents.
#[derive(Debug, Clone)]
pub struct ServingCert(Arc<Serving>);

impl ServingCert {
    /// Presents `serving` to every new connection from now on (connections already open keep
    /// the certificate they were shown).
    pub fn set(&self, serving: Arc<CertifiedKey>) {
        // A poisoned lock only means a holder panicked; the value is replaced whole.
        *self
            .0
             .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = serving;
    }
}

/// Why the server stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The listen socket could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    /// rustls refused the TLS settings.
    #[error("failed to build the ca tls config")]
    Tls {
        #[source]
        source: rustls::Error,
    },
}

impl RunningCa {
    /// Starts serving `service` on `listener` with the serving certificate `serving`.
    pub fn spawn(
        listener: TcpListener,
        service: Arc<CaService>,
        serving: Arc<CertifiedKey>,
        limits: CaLimits,
    ) -> Result<Self, ServerError> {
        Self::spawn_grpc(listener, CaGrpc::new(service), serving, limits)
    }

    /// Like [`RunningCa::spawn`], but every response passes through `tamper` before it is
    /// sent: a misbehaving CA over real TLS and gRPC, for the agent's own tests only.
    #[cfg(test)]
    pub(crate) fn spawn_tampered(
        listener: TcpListener,
        service: Arc<CaService>,
        serving: Arc<CertifiedKey>,
        tamper: Tamper,
    ) -> Result<Self, ServerError> {
        let mut grpc = CaGrpc::new(service);
        grpc.tamper = Some(tamper);
        Self::spawn_grpc(listener, grpc, serving, CaLimits::default())
    }

    fn spawn_grpc(
        listener: TcpListener,
        grpc: CaGrpc,
        serving: Arc<CertifiedKey>,
        limits: CaLimits,
    ) -> Result<Self, ServerError> {
        let addr = listener.local_addr().map_err(|source| ServerError::Bind {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            source,
        })?;
        let serving = Arc::new(Serving(RwLock::new(serving)));
        let tls = tls_config(serving.clone())?;
        let stop = crate::drain::Trigger::new();
        let stopped = stop.signal();
        let task = tokio::spawn(serve(listener, grpc, tls, limits, stopped));
        Ok(Self {
            addr,
            serving,
            stop,
            task: Some(task),
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// A handle to replace the serving certificate (root material reloads).
    pub fn serving(&self) -> ServingCert {
        ServingCert(self.serving.clone())
    }

    /// Stops accepting, tells connected clients to go away (HTTP/2 GOAWAY), waits for open
    /// requests up to the request deadline, then closes every connection.
    pub async fn stop(mut self) {
        self.stop.start();
        if let Some(task) = self.task.take() {
            let abort = task.abort_handle();
            if tokio::time::timeout(REQUEST_TIMEOUT, task).await.is_err() {
                abort.abort();
            }
        }
    }

    /// Waits until the server stops by itself (it does not, unless its task panics).
    pub async fn wait(&mut self) {
        if let Some(task) = self.task.as_mut() {
            let _ = task.await;
        }
    }
}

impl Drop for RunningCa {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// The rustls server config: the ring provider, TLS 1.3 and 1.2 (istiod offers both), ALPN h2.
fn tls_config(serving: Arc<Serving>) -> Result<Arc<ServerConfig>, ServerError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|source| ServerError::Tls { source })?
        .with_no_client_auth()
        .with_cert_resolver(serving);
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

async fn serve(
    listener: TcpListener,
    grpc: CaGrpc,
    tls: Arc<ServerConfig>,
    limits: CaLimits,
    stopped: crate::drain::Signal,
) {
    let (conns_tx, conns_rx) = mpsc::channel(limits.max_handshakes.max(1));
    let accept = tokio::spawn(accept_loop(
        listener,
        grpc.service.clone(),
        tls,
        limits,
        conns_tx,
        stopped.clone(),
    ));
    let mut stopping = stopped;
    let shutdown = async move { stopping.signaled().await };
    let result = tonic::transport::Server::builder()
        .timeout(REQUEST_TIMEOUT)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .serve_with_incoming_shutdown(grpc.into_grpc(), ReceiverStream::new(conns_rx), shutdown)
        .await;
    accept.abort();
    if let Err(error) = result {
        tracing::error!(error = %crate::ca::service::chain(&error), "ca grpc server failed");
    }
}

async fn accept_loop(
    listener: TcpListener,
    service: Arc<CaService>,
    tls: Arc<ServerConfig>,
    limits: CaLimits,
    conns: mpsc::Sender<io::Result<TlsConn>>,
    mut stopped: crate::drain::Signal,
) {
    let acceptor = TlsAcceptor::from(tls);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(limits.max_handshakes));
    let open = PerSource::default();
    let handshaking = PerSource::default();
    while !stopped.is_signaled() {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(%error, "ca accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = stopped.signaled() => continue,
        };
        // Per-source caps first: a source over its share never waits for a global slot.
        let Some(slot) = open.admit(peer.ip(), limits.max_connections_per_source) else {
            service.stats().count("source_connection_limit");
            tracing::debug!(peer.addr = %peer, "ca connection closed: source holds its cap of connections");
            continue;
        };
        let Some(handshake) = handshaking.admit(peer.ip(), limits.max_handshakes_per_source) else {
            service.stats().count("source_handshake_limit");
            tracing::debug!(peer.addr = %peer, "ca connection closed: source has its cap of handshakes in progress");
            continue;
        };
        let Ok(permit) = handshakes.clone().acquire_owned().await else {
            return;
        };
        let acceptor = acceptor.clone();
        let conns = conns.clone();
        let service = service.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let accepted =
                tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await;
            drop(handshake);
            match accepted {
                Ok(Ok(tls)) => {
                    let _ = conns
                        .send(Ok(TlsConn {
                            tls,
                            peer,
                            _slot: slot,
                        }))
                        .await;
                }
                Ok(Err(error)) => {
                    service.stats().count("tls_handshake_failed");
                    tracing::warn!(peer.addr = %peer, %error, "ca tls handshake failed");
                }
                Err(_) => {
                    service.stats().count("tls_handshake_timeout");
                    tracing::warn!(peer.addr = %peer, "ca tls handshake timed out");
                }
            }
        });
    }
}

/// The server's one certificate, handed to every client (no SNI-based choice).
#[derive(Debug)]
struct Serving(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Serving {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.0
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
        )
    }
}

/// The client's address, in each request's extensions.
#[derive(Debug, Clone, Copy)]
struct PeerAddr(SocketAddr);

/// A TLS connection whose handshake completed.
struct TlsConn {
    tls: TlsStream<TcpStream>,
    peer: SocketAddr,
    /// The source's connection slot, freed when tonic drops the connection.
    _slot: SourceSlot,
}

/// Counts per source address (connections open, or handshakes in progress).
#[derive(Debug, Default, Clone)]
struct PerSource(Arc<Mutex<HashMap<IpAddr, usize>>>);

impl PerSource {
    /// A slot for `ip`, unless it already holds `max`.
    fn admit(&self, ip: IpAddr, max: usize) -> Option<SourceSlot> {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(SourceSlot {
            counts: self.clone(),
            ip,
        })
    }
}

/// One of a source's slots; dropping it frees the slot.
#[derive(Debug)]
struct SourceSlot {
    counts: PerSource,
    ip: IpAddr,
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut m = self.counts.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

impl Connected for TlsConn {
    type ConnectInfo = PeerAddr;

    fn connect_info(&self) -> PeerAddr {
        PeerAddr(self.peer)
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_shutdown(cx)
    }
}

/// Rewrites a CA response (test builds only; see [`RunningCa::spawn_tampered`]).
#[cfg(test)]
pub(crate) type Tamper = Arc<
    dyn Fn(&IstioCertificateRequest, IstioCertificateResponse) -> IstioCertificateResponse
        + Send
        + Sync,
>;

/// `istio.v1.auth.IstioCertificateService` (the server tonic-prost-build generated from
/// `proto/ca.proto`, around [`CaService`]).
type GrpcService = IstioCertificateServiceServer<CaGrpc>;

/// What `CreateCertificate` calls: the signing service, and in tests a response rewriter.
#[derive(Clone)]
struct CaGrpc {
    service: Arc<CaService>,
    #[cfg(test)]
    tamper: Option<Tamper>,
}

impl CaGrpc {
    fn new(service: Arc<CaService>) -> Self {
        Self {
            service,
            #[cfg(test)]
            tamper: None,
        }
    }

    /// The gRPC service: requests over [`MAX_REQUEST_BYTES`] are refused by tonic.
    fn into_grpc(self) -> GrpcService {
        IstioCertificateServiceServer::new(self).max_decoding_message_size(MAX_REQUEST_BYTES)
    }
}

#[tonic::async_trait]
impl IstioCertificateService for CaGrpc {
    async fn create_certificate(
        &self,
        request: tonic::Request<IstioCertificateRequest>,
    ) -> Result<tonic::Response<IstioCertificateResponse>, Status> {
        let peer = request.extensions().get::<PeerAddr>().map(|p| p.0);
        let result = self
            .service
            .handle(peer, request.metadata(), request.get_ref());
        #[cfg(test)]
        let result = match &self.tamper {
            Some(tamper) => result.map(|r| tamper(request.get_ref(), r)),
            None => result,
        };
        result.map(tonic::Response::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_source_caps_one_source_and_not_the_others() {
        let counts = PerSource::default();
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        let held: Vec<_> = (0..3).map(|_| counts.admit(a, 3).unwrap()).collect();
        assert!(counts.admit(a, 3).is_none(), "a fourth slot for one source");
        let other = counts.admit(b, 3);
        assert!(other.is_some(), "another source starved");
        drop(held);
        assert!(counts.admit(a, 3).is_some(), "slots not freed");
        drop(other);
        assert!(counts.0.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn configured_caps_and_handshake_timeout_hold_on_a_real_listener() {
        let f = crate::ca::testing::Fixture::new(Duration::from_secs(3600));
        let limits = CaLimits {
            max_handshakes_per_source: 2,
            handshake_timeout: Duration::from_millis(1500),
            ..CaLimits::default()
        };
        let ca = f
            .start_with(SocketAddr::from(([127, 0, 0, 1], 0)), limits)
            .await;
        // Five silent connections from one source: two wait for their handshake, the other
        // three are closed at once.
        let mut conns = Vec::new();
        for _ in 0..5 {
            conns.push(TcpStream::connect(ca.local_addr()).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let closed = |conns: &[TcpStream]| {
            conns
                .iter()
                .filter(|c| !matches!(c.try_read(&mut [0u8; 1]), Err(e) if e.kind() == io::ErrorKind::WouldBlock))
                .count()
        };
        assert_eq!(
            closed(&conns),
            3,
            "closed at once past a cap of 2 handshakes"
        );
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(
            closed(&conns),
            5,
            "half-open handshakes outlived the 1.5 s timeout"
        );
        let refused = f.service.stats().snapshot().refused;
        assert_eq!(
            refused.get("source_handshake_limit"),
            Some(&3),
            "{refused:?}"
        );
    }
}
