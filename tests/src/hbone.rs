//! Speaking HBONE (and not quite) from inside the testbed's namespaces, with the agent's own
//! library: certificates from the testbed's CA, a test client that opens CONNECT streams, raw
//! and half-TLS clients for bad input, and a fake HBONE server for a rogue pod.
//!
//! Every helper runs its sockets on a single-thread tokio runtime on a thread that entered the
//! target network namespace first: sockets belong to the namespace they were created in.
use std::fs::File;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use ambit::identity::{self, SpiffeId, TrustBundle, TrustDomain, WorkloadCertificate};
use ambit::identity::{CaClient, CaClientConfig};
use ambit::tunnel::client::Tunnel;
use ambit::tunnel::headers::Received;
use ambit::tunnel::server::{serve_connection, PendingConnect, ServerLimits};
use anyhow::{anyhow, Context, Result};
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use nix::sched::CloneFlags;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use crate::error_chain;
use crate::state::{TRUST_DOMAIN, TUNNEL_PORT};
use crate::testbed::Testbed;

/// Deadline of one helper operation (connect, handshake, request, read).
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs `f` on a fresh single-thread tokio runtime, on a thread inside the network namespace
/// at `netns`. A panic in `f` is re-raised here.
pub fn in_netns<F, Fut, T>(netns: &Path, f: F) -> Result<T>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T>,
    T: Send + 'static,
{
    let ns = File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
    let thread = std::thread::spawn(move || -> Result<T> {
        nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET).context("setns(CLONE_NEWNET)")?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("building a tokio runtime")?;
        Ok(rt.block_on(f()))
    });
    match thread.join() {
        Ok(r) => r,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// A certificate and key for an identity, with the roots the CA sent.
#[derive(Clone)]
pub struct Svid {
    /// The X.509-SVID and its key.
    pub cert: Arc<WorkloadCertificate>,
    /// The CA's roots.
    pub roots: Arc<TrustBundle>,
}

/// Certificates from the testbed's CA, fetched with the agent's own CA client.
pub trait Issue {
    /// Asks the testbed's CA for a certificate for `ns/sa` with `node`'s agent token, from
    /// inside `node`'s namespace, as that node's agent would. The CA signs it only if the
    /// inventory has a pod with that identity on `node`.
    fn issue(&self, node: &str, namespace: &str, service_account: &str) -> Result<Svid>;

    /// Like [`Issue::issue`], for an identity just applied to the inventory: the testbed's
    /// `apply` waits for the agents, not for the CA, which reloads the inventory on its own, so
    /// a refusal for having no pod with that identity on `node` is retried for up to `wait`.
    fn issue_when_listed(
        &self,
        node: &str,
        namespace: &str,
        service_account: &str,
        wait: std::time::Duration,
    ) -> Result<Svid> {
        let deadline = std::time::Instant::now() + wait;
        loop {
            match self.issue(node, namespace, service_account) {
                Err(e)
                    if std::time::Instant::now() < deadline
                        && e.to_string().contains("no pod with that identity") =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                issued => return issued,
            }
        }
    }

    /// Like [`Issue::issue`], from inside `node`'s namespace, but presenting the token in
    /// `token_file` (bad-token tests).
    fn issue_with_token(
        &self,
        node: &str,
        token_file: &Path,
        namespace: &str,
        service_account: &str,
    ) -> Result<Svid>;
}

impl Issue for Testbed {
    fn issue(&self, node: &str, namespace: &str, service_account: &str) -> Result<Svid> {
        let token = self.state().node(node)?.token_file.clone();
        self.issue_with_token(node, &token, namespace, service_account)
    }

    fn issue_with_token(
        &self,
        node: &str,
        token_file: &Path,
        namespace: &str,
        service_account: &str,
    ) -> Result<Svid> {
        let ca = self.state().ca()?.clone();
        let node = self.state().node(node)?.clone();
        let id: SpiffeId = crate::state::identity(namespace, service_account)
            .parse()
            .map_err(|e| anyhow!("{e}"))?;
        let cfg = CaClientConfig {
            address: ca.addr.to_string(),
            root_cert: ca.cert_dir.join("root-cert.pem"),
            root_cert_poll_ms: 2_000,
            token_file: token_file.to_path_buf(),
            cluster_id: ca.cluster_id.clone(),
            server_name: None,
            ttl_secs: 3600,
            timeout_ms: 5000,
        };
        let issued = in_netns(&node.netns_path(), move || async move {
            let client = CaClient::new(cfg).map_err(|e| anyhow!("{}", error_chain(&e)))?;
            client
                .fetch(&id)
                .await
                .map_err(|e| anyhow!("{}", error_chain(&e)))
        })??;
        Ok(Svid {
            cert: Arc::new(issued.certificate),
            roots: Arc::new(issued.roots),
        })
    }
}

/// A client config presenting `svid` and requiring the server to prove `expected` (the
/// agent's own settings).
pub fn client_config(svid: &Svid, expected: &str) -> Result<Arc<rustls::ClientConfig>> {
    let expected: SpiffeId = expected.parse().map_err(|e| anyhow!("{e}"))?;
    let config =
        identity::client_config(&svid.cert, svid.roots.clone(), trust_domains()?, expected)
            .map_err(|e| anyhow!("{}", error_chain(&e)))?;
    Ok(Arc::new(config))
}

/// A TLS 1.3 client config with ALPN h2 that presents no certificate and accepts any server.
pub fn anonymous_client_config() -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("ring supports TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// What a refused or failed attempt looked like from the client's side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The CONNECT got this status (200 only if the tunnel was accepted).
    Status(StatusCode),
    /// The connection failed before a response: where, and why.
    Failed(String),
}

impl Outcome {
    /// Whether a CONNECT was accepted.
    pub fn accepted(&self) -> bool {
        *self == Self::Status(StatusCode::OK)
    }
}

/// Opens an HBONE connection to `peer` with `tls` and sends one request (`method` with
/// `authority`); on 200 writes `send` and reads the answer until EOF. Returns the outcome and
/// what came back.
pub async fn hbone_request(
    peer: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    method: Method,
    authority: SocketAddr,
    send: &[u8],
) -> (Outcome, Vec<u8>) {
    hbone_request_with(peer, tls, method, authority, &[], send).await
}

/// [`hbone_request`] with extra request `headers` (name, value).
pub async fn hbone_request_with(
    peer: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    method: Method,
    authority: SocketAddr,
    headers: &[(&'static str, &str)],
    send: &[u8],
) -> (Outcome, Vec<u8>) {
    match tokio::time::timeout(
        IO_TIMEOUT,
        request_inner(peer, tls, method, authority, headers, send),
    )
    .await
    {
        Ok(r) => r,
        Err(_) => (
            Outcome::Failed(format!("timed out after {IO_TIMEOUT:?}")),
            Vec::new(),
        ),
    }
}

async fn request_inner(
    peer: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    method: Method,
    authority: SocketAddr,
    headers: &[(&'static str, &str)],
    send: &[u8],
) -> (Outcome, Vec<u8>) {
    let failed = |stage: &str, e: &dyn std::error::Error| {
        (
            Outcome::Failed(format!("{stage}: {}", error_chain(e))),
            Vec::new(),
        )
    };
    let tcp = match TcpStream::connect(peer).await {
        Ok(t) => t,
        Err(e) => return failed("connect", &e),
    };
    let tls_stream = match tokio_rustls::TlsConnector::from(tls)
        .connect(identity::server_name(), tcp)
        .await
    {
        Ok(s) => s,
        Err(e) => return failed("tls", &e),
    };
    let (send_req, conn) = match h2::client::handshake(tls_stream).await {
        Ok(x) => x,
        Err(e) => return failed("h2 handshake", &e),
    };
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut send_req = match send_req.ready().await {
        Ok(s) => s,
        Err(e) => return failed("h2 ready", &e),
    };
    let uri = if method == Method::CONNECT {
        http::Uri::builder()
            .authority(authority.to_string())
            .build()
    } else {
        http::Uri::builder()
            .scheme("https")
            .authority(authority.to_string())
            .path_and_query("/")
            .build()
    };
    let mut req = Request::builder()
        .method(method)
        .uri(uri.expect("a socket address is a valid authority"))
        .body(())
        .expect("a request with a valid uri builds");
    for (name, value) in headers {
        match http::HeaderValue::from_str(value) {
            Ok(v) => {
                req.headers_mut()
                    .append(http::HeaderName::from_static(name), v);
            }
            Err(e) => return failed("header value", &e),
        }
    }
    let (response, mut body_tx) = match send_req.send_request(req, false) {
        Ok(x) => x,
        Err(e) => return failed("send request", &e),
    };
    let response = match response.await {
        Ok(r) => r,
        Err(e) => return failed("response", &e),
    };
    let status = response.status();
    if status != StatusCode::OK {
        return (Outcome::Status(status), Vec::new());
    }
    let _ = body_tx.send_data(Bytes::copy_from_slice(send), true);
    let mut body = response.into_body();
    let mut got = Vec::new();
    while let Some(chunk) = body.data().await {
        match chunk {
            Ok(c) => {
                let _ = body.flow_control().release_capacity(c.len());
                got.extend_from_slice(&c);
            }
            Err(_) => break,
        }
    }
    (Outcome::Status(status), got)
}

/// Connects to `peer`, writes `bytes`, and reads until the server closes; returns what it sent
/// back, or why reading ended (`reset`, `timed out`).
pub async fn raw_exchange(peer: SocketAddr, bytes: &[u8]) -> Result<(Vec<u8>, String)> {
    let mut tcp = tokio::time::timeout(IO_TIMEOUT, TcpStream::connect(peer))
        .await
        .map_err(|_| anyhow!("connect to {peer} timed out"))??;
    tcp.write_all(bytes).await?;
    let mut got = Vec::new();
    let ended = loop {
        let mut buf = [0u8; 4096];
        match tokio::time::timeout(IO_TIMEOUT, tcp.read(&mut buf)).await {
            Ok(Ok(0)) => break "closed".to_string(),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => break format!("error: {e}"),
            Err(_) => break "timed out".to_string(),
        }
    };
    Ok((got, ended))
}

/// A TLS handshake with an HBONE tunnel client config, and nothing else: `Ok` when the server
/// proved the identity the config expects.
pub async fn handshake(peer: SocketAddr, tls: Arc<rustls::ClientConfig>) -> Result<()> {
    let tcp = tokio::time::timeout(IO_TIMEOUT, TcpStream::connect(peer))
        .await
        .map_err(|_| anyhow!("connect to {peer} timed out"))??;
    Tunnel::handshake(tcp, peer, tls)
        .await
        .map(drop)
        .map_err(|e| anyhow!("{}", error_chain(&e)))
}

/// A fake HBONE server (a rogue pod's): terminates mutual TLS with its own certificate, counts
/// TCP connections and CONNECT requests, and echoes every accepted stream.
pub struct FakeHbone {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    /// TCP connections accepted.
    pub connections: Arc<AtomicU64>,
    /// CONNECT requests that got through TLS (each is answered 200 and echoed).
    pub connects: Arc<AtomicU64>,
    /// What each CONNECT's `baggage`, `traceparent` and `forwarded` said, in order.
    pub received: Arc<std::sync::Mutex<Vec<Received>>>,
    /// Each CONNECT's `:authority` (the destination it asked for), in order.
    pub authorities: Arc<std::sync::Mutex<Vec<SocketAddr>>>,
}

impl FakeHbone {
    /// Listens on `[::]:15008` (both families) in the namespace at `netns`, presenting `svid`.
    pub fn start(netns: &Path, svid: &Svid) -> Result<Self> {
        let server = identity::server_config(&svid.cert, svid.roots.clone(), trust_domains()?)
            .map_err(|e| anyhow!("{}", error_chain(&e)))?;
        let server = Arc::new(server);
        let ns = File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
        let (stop_tx, stop_rx) = oneshot::channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let connections = Arc::new(AtomicU64::new(0));
        let connects = Arc::new(AtomicU64::new(0));
        let received = Arc::new(std::sync::Mutex::new(Vec::new()));
        let authorities = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (conns, reqs, seen) = (connections.clone(), connects.clone(), received.clone());
        let asked = authorities.clone();
        let thread = std::thread::spawn(move || {
            let ready = ready_tx.clone();
            let run = move || -> Result<()> {
                nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET)?;
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(async move {
                    let listener =
                        TcpListener::bind(SocketAddr::from(([0u16; 8], TUNNEL_PORT))).await?;
                    let _ = ready.send(Ok(()));
                    // Never drains: it serves until stopped.
                    let drain_tx = ambit::drain::Trigger::new();
                    let drain_rx = drain_tx.signal();
                    let serve = async {
                        loop {
                            let Ok((tcp, peer)) = listener.accept().await else {
                                continue;
                            };
                            conns.fetch_add(1, Ordering::Relaxed);
                            let (server, reqs, seen) = (server.clone(), reqs.clone(), seen.clone());
                            let asked = asked.clone();
                            let drain = drain_rx.clone();
                            tokio::spawn(async move {
                                let _ = serve_connection(
                                    tcp,
                                    peer,
                                    server,
                                    ServerLimits::default(),
                                    drain,
                                    move |p: PendingConnect| {
                                        let (reqs, seen) = (reqs.clone(), seen.clone());
                                        let asked = asked.clone();
                                        async move {
                                            reqs.fetch_add(1, Ordering::Relaxed);
                                            asked
                                                .lock()
                                                .unwrap_or_else(std::sync::PoisonError::into_inner)
                                                .push(p.connect.authority);
                                            seen.lock()
                                                .unwrap_or_else(std::sync::PoisonError::into_inner)
                                                .push(p.connect.received.clone());
                                            if let Some(stream) = p.accept() {
                                                let (mut r, mut w) = tokio::io::split(stream);
                                                let _ = tokio::io::copy(&mut r, &mut w).await;
                                                let _ = w.shutdown().await;
                                            }
                                        }
                                    },
                                )
                                .await;
                            });
                        }
                    };
                    tokio::select! {
                        () = serve => {}
                        _ = stop_rx => {}
                    }
                    Ok::<(), anyhow::Error>(())
                })
            };
            if let Err(e) = run() {
                let _ = ready_tx.send(Err(e));
            }
        });
        match ready_rx.recv_timeout(IO_TIMEOUT) {
            Ok(Ok(())) => Ok(Self {
                stop: Some(stop_tx),
                thread: Some(thread),
                connections,
                connects,
                received,
                authorities,
            }),
            Ok(Err(e)) => Err(e.context("fake HBONE server")),
            Err(_) => Err(anyhow!("fake HBONE server did not start")),
        }
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    /// CONNECT requests received so far.
    pub fn connects(&self) -> u64 {
        self.connects.load(Ordering::Relaxed)
    }

    /// The `:authority` of every CONNECT received so far.
    pub fn authorities(&self) -> Vec<SocketAddr> {
        self.authorities
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The headers of every CONNECT received so far.
    pub fn received(&self) -> Vec<Received> {
        self.received
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

impl Drop for FakeHbone {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn trust_domains() -> Result<Arc<[TrustDomain]>> {
    let td: TrustDomain = TRUST_DOMAIN.parse().map_err(|e| anyhow!("{e}"))?;
    Ok(Arc::from(vec![td]))
}

/// Accepts any server certificate (the bad-input client only wants to reach the server's
/// client-certificate check).
#[derive(Debug)]
struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
