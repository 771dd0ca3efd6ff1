//! TEST xDS server: istiod's delta ADS over TLS on 127.0.0.1, recording every request.
//!
//! For tests only (unit tests here, and other crates' tests with the `fake-istiod` feature; the
//! release binary does not contain it). It keeps a store of resources per type URL; a stream's
//! first request of a type gets the whole store of that type in one response (as istiod does;
//! unless [`FakeIstiod::hold`] defers it), and [`FakeIstiod::push`] updates the store and sends
//! the change to every stream subscribed to the type. It never sends removals for names a
//! resumed stream lists in `initial_resource_versions`: the client must drop those itself after
//! the first push. [`FakeIstiod::drop_streams`] ends every stream (an istiod restart).
#![allow(
    clippy::unwrap_used,
    reason = "a test server: a broken invariant panics the test (STYLE.md §7)"
)]
use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt as _;
use tonic::transport::server::Connected;
use tonic::{Request, Response, Status, Streaming};

use ambit_proto::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use ambit_proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};

/// The name in the fake's serving certificate (and `localhost`, `127.0.0.1`).
pub const SERVER_NAME: &str = "istiod.istio-system.svc";

/// One request the server received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    /// Which stream (1, 2, ... in the order they opened).
    pub stream: u64,
    /// The `authorization` header of the stream.
    pub authorization: Option<String>,
    /// The `clusterid` header of the stream.
    pub cluster_id: Option<String>,
    /// The node id, when the request carried a node.
    pub node_id: Option<String>,
    /// The request's type URL.
    pub type_url: String,
    /// Its `response_nonce` (empty on a subscription).
    pub response_nonce: String,
    /// The NACK's error text.
    pub error: Option<String>,
    /// `resource_names_subscribe`.
    pub subscribe: Vec<String>,
    /// `initial_resource_versions`.
    pub initial_resource_versions: BTreeMap<String, String>,
}

impl Recorded {
    /// An ACK: answers a nonce without an error.
    pub fn is_ack(&self) -> bool {
        !self.response_nonce.is_empty() && self.error.is_none()
    }

    /// A NACK: answers a nonce with an error.
    pub fn is_nack(&self) -> bool {
        !self.response_nonce.is_empty() && self.error.is_some()
    }
}

/// An open stream.
struct OpenStream {
    id: u64,
    tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    subscribed: BTreeSet<String>,
    /// Types whose full state was sent.
    sent: BTreeSet<String>,
}

#[derive(Default)]
struct State {
    /// type URL → name → (version, encoded message).
    store: BTreeMap<String, BTreeMap<String, (String, Vec<u8>)>>,
    streams: Vec<OpenStream>,
    requests: Vec<Recorded>,
    next_stream: u64,
    next_nonce: u64,
    next_version: u64,
    held: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    changed: Notify,
}

impl State {
    fn nonce(&mut self) -> String {
        self.next_nonce += 1;
        format!("nonce-{}", self.next_nonce)
    }

    /// The full state of `type_url`, as one response.
    fn full(&mut self, type_url: &str) -> DeltaDiscoveryResponse {
        let resources = self
            .store
            .get(type_url)
            .into_iter()
            .flatten()
            .map(|(name, (version, value))| resource(type_url, name, version, value.clone()))
            .collect();
        DeltaDiscoveryResponse {
            system_version_info: format!("v{}", self.next_version),
            resources,
            type_url: type_url.to_owned(),
            removed_resources: Vec::new(),
            nonce: self.nonce(),
        }
    }

    /// Sends the full state of every subscribed type not yet sent (unless held).
    fn send_pending(&mut self) {
        if self.held {
            return;
        }
        let mut out = Vec::new();
        for i in 0..self.streams.len() {
            let pending: Vec<String> = self.streams[i]
                .subscribed
                .difference(&self.streams[i].sent)
                .cloned()
                .collect();
            for t in pending {
                let response = self.full(&t);
                self.streams[i].sent.insert(t);
                out.push((self.streams[i].tx.clone(), response));
            }
        }
        for (tx, response) in out {
            let _ = tx.try_send(Ok(response));
        }
    }

    /// Stores `resources` of `type_url` and drops `removed` under a new version; returns the
    /// change as a response (without a nonce).
    fn change(
        &mut self,
        type_url: &str,
        resources: &[(&str, Vec<u8>)],
        removed: &[&str],
    ) -> DeltaDiscoveryResponse {
        self.next_version += 1;
        let version = format!("v{}", self.next_version);
        let store = self.store.entry(type_url.to_owned()).or_default();
        for (name, value) in resources {
            store.insert((*name).to_owned(), (version.clone(), value.clone()));
        }
        for name in removed {
            store.remove(*name);
        }
        DeltaDiscoveryResponse {
            system_version_info: version.clone(),
            resources: resources
                .iter()
                .map(|(name, value)| resource(type_url, name, &version, value.clone()))
                .collect(),
            type_url: type_url.to_owned(),
            removed_resources: removed.iter().map(|n| (*n).to_owned()).collect(),
            nonce: String::new(),
        }
    }

    /// `response` with a fresh nonce for every stream that has the full state of `type_url`.
    fn addressed(
        &mut self,
        type_url: &str,
        response: DeltaDiscoveryResponse,
    ) -> Vec<(
        mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
        DeltaDiscoveryResponse,
    )> {
        let targets: Vec<_> = self
            .streams
            .iter()
            .filter(|s| s.sent.contains(type_url))
            .map(|s| s.tx.clone())
            .collect();
        targets
            .into_iter()
            .map(|tx| {
                let mut response = response.clone();
                response.nonce = self.nonce();
                (tx, response)
            })
            .collect()
    }
}

/// A resource of `type_url` whose `Any` carries `value`.
pub fn resource(type_url: &str, name: &str, version: &str, value: Vec<u8>) -> Resource {
    Resource {
        name: name.to_owned(),
        version: version.to_owned(),
        resource: Some(prost_types::Any {
            type_url: type_url.to_owned(),
            value,
        }),
        ..Resource::default()
    }
}

/// The running server; stops when dropped.
pub struct FakeIstiod {
    addr: SocketAddr,
    root_pem: String,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl FakeIstiod {
    /// Starts on 127.0.0.1 (a free port) with a fresh CA and serving certificate.
    pub async fn start() -> Self {
        let (root_pem, chain, key) = certificates();
        Self::serve(root_pem, chain, key).await
    }

    /// Starts on 127.0.0.1 (a free port; in the caller's network namespace) with a serving
    /// certificate for `names` (DNS names or IP addresses) issued by the CA whose certificate
    /// and PKCS#8 key are `ca_cert_pem` and `ca_key_pem`, as istiod's is by the mesh's CA; its
    /// [`FakeIstiod::root_pem`] is then `ca_cert_pem`.
    pub async fn start_with_ca(ca_cert_pem: &str, ca_key_pem: &str, names: &[&str]) -> Self {
        let ca_key = KeyPair::from_pem(ca_key_pem).unwrap();
        let issuer = Issuer::from_ca_cert_pem(ca_cert_pem, ca_key).unwrap();
        let ca_der = CertificateDer::pem_slice_iter(ca_cert_pem.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        let (cert, key) = serving(&issuer, names);
        Self::serve(ca_cert_pem.to_owned(), vec![cert, ca_der], key).await
    }

    async fn serve(
        root_pem: String,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Self {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared::default());
        let service = AggregatedDiscoveryServiceServer::new(Ads {
            shared: shared.clone(),
        });
        let (conns_tx, conns_rx) = mpsc::channel(16);
        let acceptor = TlsAcceptor::from(Arc::new(tls));
        let task = tokio::spawn(async move {
            let accept = tokio::spawn(async move {
                while let Ok((tcp, _)) = listener.accept().await {
                    let acceptor = acceptor.clone();
                    let conns_tx = conns_tx.clone();
                    tokio::spawn(async move {
                        if let Ok(tls) = acceptor.accept(tcp).await {
                            let _ = conns_tx.send(Ok::<_, io::Error>(Conn(tls))).await;
                        }
                    });
                }
            });
            let _ = tonic::transport::Server::builder()
                .serve_with_incoming(service, ReceiverStream::new(conns_rx))
                .await;
            accept.abort();
        });
        Self {
            addr,
            root_pem,
            shared,
            task,
        }
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// PEM of the root the serving certificate chains to (write it to the client's root file).
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.state.lock().unwrap()
    }

    /// Adds or replaces `resources` (name, encoded message) of `type_url` and removes
    /// `removed`, then sends the change as one response to every stream that has its full
    /// state of the type. Returns the nonces sent.
    pub fn push(
        &self,
        type_url: &str,
        resources: &[(&str, Vec<u8>)],
        removed: &[&str],
    ) -> Vec<String> {
        let mut state = self.state();
        let response = state.change(type_url, resources, removed);
        self.send(&mut state, type_url, response)
    }

    /// As [`FakeIstiod::push`], but waits for room in each stream's queue where `push` would
    /// drop the response (a client that let 64 responses pile up): for load generators, whose
    /// changes must all arrive however slow the client is.
    pub async fn push_wait(
        &self,
        type_url: &str,
        resources: &[(&str, Vec<u8>)],
        removed: &[&str],
    ) -> Vec<String> {
        let sends = {
            let mut state = self.state();
            let response = state.change(type_url, resources, removed);
            state.addressed(type_url, response)
        };
        let mut nonces = Vec::new();
        for (tx, response) in sends {
            nonces.push(response.nonce.clone());
            let _ = tx.send(Ok(response)).await;
        }
        nonces
    }

    /// Sends `response` as it is (a nonce is filled in) to every stream that has the full
    /// state of its type, without touching the store (malformed pushes).
    pub fn push_raw(&self, response: DeltaDiscoveryResponse) -> Vec<String> {
        let mut state = self.state();
        let type_url = response.type_url.clone();
        self.send(&mut state, &type_url, response)
    }

    fn send(
        &self,
        state: &mut State,
        type_url: &str,
        response: DeltaDiscoveryResponse,
    ) -> Vec<String> {
        let mut nonces = Vec::new();
        for (tx, response) in state.addressed(type_url, response) {
            nonces.push(response.nonce.clone());
            let _ = tx.try_send(Ok(response));
        }
        nonces
    }

    /// While held, new subscriptions get no first push; [`FakeIstiod::release`] sends them.
    pub fn hold(&self) {
        self.state().held = true;
    }

    /// Sends the first pushes deferred by [`FakeIstiod::hold`].
    pub fn release(&self) {
        let mut state = self.state();
        state.held = false;
        state.send_pending();
    }

    /// Ends every open stream with `UNAVAILABLE` (an istiod restart); the store is kept.
    pub fn drop_streams(&self) {
        let streams = std::mem::take(&mut self.state().streams);
        for s in streams {
            let _ =
                s.tx.try_send(Err(Status::unavailable("fake istiod restarting")));
        }
    }

    /// Streams open now.
    pub fn open_streams(&self) -> usize {
        self.state().streams.len()
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state().requests.clone()
    }

    /// Waits up to `timeout` for the requests to satisfy `done`; returns them either way.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        done: impl Fn(&[Recorded]) -> bool,
    ) -> Vec<Recorded> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.shared.changed.notified();
            let requests = self.requests();
            if done(&requests) || tokio::time::Instant::now() >= deadline {
                return requests;
            }
            let _ = tokio::time::timeout_at(deadline, changed).await;
        }
    }
}

impl Drop for FakeIstiod {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Ads {
    shared: Arc<Shared>,
}

type DeltaStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;
type SotwStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type StreamAggregatedResourcesStream = SotwStream;
    type DeltaAggregatedResourcesStream = DeltaStream;

    async fn stream_aggregated_resources(
        &self,
        _: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<SotwStream>, Status> {
        Err(Status::unimplemented(
            "the fake istiod speaks delta xDS only",
        ))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<DeltaStream>, Status> {
        let header = |name: &str| {
            request
                .metadata()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let authorization = header("authorization");
        let cluster_id = header("clusterid");
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let id = {
            let mut state = self.shared.state.lock().unwrap();
            state.next_stream += 1;
            let id = state.next_stream;
            state.streams.push(OpenStream {
                id,
                tx,
                subscribed: BTreeSet::new(),
                sent: BTreeSet::new(),
            });
            id
        };
        let shared = self.shared.clone();
        tokio::spawn(async move {
            while let Some(Ok(request)) = inbound.next().await {
                let mut state = shared.state.lock().unwrap();
                state.requests.push(Recorded {
                    stream: id,
                    authorization: authorization.clone(),
                    cluster_id: cluster_id.clone(),
                    node_id: request.node.as_ref().map(|n| n.id.clone()),
                    type_url: request.type_url.clone(),
                    response_nonce: request.response_nonce.clone(),
                    error: request.error_detail.as_ref().map(|e| e.message.clone()),
                    subscribe: request.resource_names_subscribe.clone(),
                    initial_resource_versions: request
                        .initial_resource_versions
                        .clone()
                        .into_iter()
                        .collect(),
                });
                if request.response_nonce.is_empty() {
                    if let Some(s) = state.streams.iter_mut().find(|s| s.id == id) {
                        s.subscribed.insert(request.type_url.clone());
                    }
                    state.send_pending();
                }
                drop(state);
                shared.changed.notify_waiters();
            }
            let mut state = shared.state.lock().unwrap();
            state.streams.retain(|s| s.id != id);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// A root, and a serving chain and key for `SERVER_NAME`, `localhost` and `127.0.0.1`.
fn certificates() -> (String, Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let now = SystemTime::now();
    let day = Duration::from_secs(24 * 3600);
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.not_before = (now - day).into();
    ca.not_after = (now + day).into();
    let ca_key = KeyPair::generate().unwrap();
    let root = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let (cert, key) = serving(&issuer, &[SERVER_NAME, "localhost", "127.0.0.1"]);
    (root.pem(), vec![cert, root.der().clone()], key)
}

/// A serving certificate for `names` (rcgen makes IP SANs of addresses) signed by `issuer`,
/// valid from a day ago for a day, and its key.
fn serving(
    issuer: &Issuer<'_, KeyPair>,
    names: &[&str],
) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    let now = SystemTime::now();
    let day = Duration::from_secs(24 * 3600);
    let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let mut leaf = CertificateParams::new(names).unwrap();
    leaf.not_before = (now - day).into();
    leaf.not_after = (now + day).into();
    let leaf_key = KeyPair::generate().unwrap();
    let cert = leaf.signed_by(&leaf_key, issuer).unwrap();
    (
        cert.der().clone(),
        PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
    )
}

/// A TLS connection for tonic's server.
struct Conn(TlsStream<TcpStream>);

impl Connected for Conn {
    type ConnectInfo = ();

    fn connect_info(&self) {}
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}
