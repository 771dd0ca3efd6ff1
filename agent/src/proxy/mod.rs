//! The data plane: per-pod outbound, inbound-plaintext and tunnel listeners, and the pod manager.
pub mod caps;
pub mod conns;
pub mod copy;
pub mod delivery_route;
pub mod explain;
pub mod inbound;
pub mod manager;
pub mod outbound;
#[cfg(test)]
mod path_tests;
pub mod plaintext;
pub mod pods;
pub mod route;
pub mod seam;
pub mod shards;
pub mod socket;
#[cfg(test)]
mod testing;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use std::net::{IpAddr, SocketAddr};

use serde::Serialize;
use tokio::net::TcpStream;

use crate::addr::ClientAddr;
use crate::config::Ports;
use crate::identity::SpiffeId;
use crate::inventory::Workload;
use crate::metrics::TcpLabels;
use crate::policy::authz::{ConnAttrs, Decision};
use crate::reason::Reason;
use crate::tunnel::headers::Baggage;
use seam::Kernel;

/// How long the agent waits for a TCP handshake to a destination or app.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What the connections of every pod share: built once by the manager (agent-wide settings,
/// certificates, the pool, caps, counters of open connections, data-plane threads).
pub struct AgentContext {
    /// Agent ports.
    pub ports: Ports,
    /// The latest inventory (destinations, policies).
    pub inventory: tokio::sync::watch::Receiver<Arc<crate::inventory::Snapshot>>,
    /// Agent-wide settings the paths need.
    pub cfg: Arc<crate::config::Config>,
    /// Certificates and trust for HBONE; `None` when the agent runs without a CA (capture
    /// only: enrolled pods talk plaintext through the agents).
    pub tls: Option<Arc<crate::identity::source::TlsSource>>,
    /// The agent's HBONE connection pool.
    pub pool: Arc<crate::tunnel::pool::Pool>,
    /// The certificate manager, to wait for a certificate that is still being fetched (a
    /// restarting agent serves before its first certificates arrive).
    pub certs: Option<Arc<crate::identity::manager::CertManager>>,
    /// Agent-wide caps of the tunnel ports.
    pub gate: Arc<inbound::Gate>,
    /// Round-robin state of Service endpoints.
    pub lb: Arc<route::RoundRobin>,
    /// Open connections of the whole agent.
    pub conns: Arc<conns::ConnTable>,
    /// The data-plane threads connections are spread over.
    pub shards: Arc<shards::Shards>,
}

/// Everything a connection task needs about the pod it serves: its own data, and the
/// [`AgentContext`] all pods share.
pub struct PodContext {
    /// What every pod shares.
    pub agent: Arc<AgentContext>,
    /// The workload.
    pub workload: Workload,
    /// Netns cookie of the pod.
    pub netns_cookie: u64,
    /// What the paths ask of the kernel (original destinations, sockets in the pod, bypass
    /// entries): the pod's namespace and the programs' maps, or loopback in unit tests.
    pub kernel: Arc<dyn Kernel>,
    /// The `baggage` value of this pod's CONNECTs ([`baggage_of`]), made at enrollment.
    pub baggage: Option<http::HeaderValue>,
    /// The pod's drain (it leaves, or the agent drains): tunnel servers send GOAWAY; every
    /// connection holds a watch of it from accept to close.
    pub drain: crate::drain::Signal,
    /// Counters.
    pub stats: ProxyStats,
}

/// How long a connection waits for a certificate still being fetched.
pub(crate) const CERT_WAIT: Duration = Duration::from_secs(5);

impl PodContext {
    /// Checks that `id` has a valid certificate for a new connection, when a CA is
    /// configured: waits (bounded) for one still being fetched; refuses (and counts) when
    /// it expired or the CA refused it. Also guards pooled tunnels, which were set up with
    /// a certificate that may have expired since.
    pub(crate) async fn await_certificate(
        &self,
        id: &SpiffeId,
    ) -> Result<(), crate::identity::manager::CertWaitError> {
        match &self.agent.certs {
            Some(certs) => certs.for_connection(id, CERT_WAIT).await.map(drop),
            None => Ok(()),
        }
    }

    /// The pod's SPIFFE identity; `None` (logged) if its namespace or service account cannot
    /// form one.
    pub fn identity(&self) -> Option<SpiffeId> {
        let raw = self.workload.spiffe_id(&self.agent.cfg.trust_domain);
        raw.parse()
            .map_err(|e| tracing::warn!(pod = %self.workload.key(), identity = %raw, error = %e, "pod has no valid SPIFFE identity"))
            .ok()
    }
}

impl PodContext {
    /// Decides an inbound connection to this pod with its AuthorizationPolicies.
    pub fn authorize(&self, attrs: &ConnAttrs) -> Decision {
        let snap = self.agent.inventory.borrow().clone();
        let w = snap
            .workloads
            .get(&self.workload.key())
            .map(AsRef::as_ref)
            .unwrap_or(&self.workload);
        snap.authz()
            .evaluate(&self.agent.cfg.authz_mesh(), &w.namespace, &w.labels, attrs)
    }
}

impl PodContext {
    /// Istio metric labels for a connection between `src_ip` and `dst_ip` as this side sees it.
    #[expect(
        clippy::too_many_arguments,
        reason = "mirrors the label set; called once per path"
    )]
    pub(crate) fn labels(
        &self,
        reporter: &'static str,
        src_ip: IpAddr,
        dst_ip: IpAddr,
        src_id: Option<&str>,
        dst_id: Option<&str>,
        service: Option<&str>,
        mtls: bool,
        response_flags: &'static str,
    ) -> TcpLabels {
        let snap = self.agent.inventory.borrow().clone();
        let who = |ip: IpAddr| {
            snap.by_ip(ip).map_or_else(
                || ("unknown".to_string(), "unknown".to_string()),
                |w| (workload_name(w), w.namespace.clone()),
            )
        };
        let (sw, sns) = who(src_ip);
        // Reported by the destination, the destination is this pod (whichever of its addresses
        // was dialled: an unlisted one, such as its link-local, names no workload).
        let (dw, dns) = if reporter == "destination" {
            (
                workload_name(&self.workload),
                self.workload.namespace.clone(),
            )
        } else {
            who(dst_ip)
        };
        let unknown = || "unknown".to_string();
        TcpLabels {
            reporter,
            source_workload: sw,
            source_workload_namespace: sns,
            source_principal: src_id.map_or_else(unknown, str::to_string),
            destination_workload: dw,
            destination_workload_namespace: dns,
            destination_principal: dst_id.map_or_else(unknown, str::to_string),
            destination_service: service.map_or_else(unknown, str::to_string),
            connection_security_policy: if mtls { "mutual_tls" } else { "none" },
            response_flags,
        }
    }
}

/// Pod `w` as the `baggage` of its CONNECTs names it, in cluster `cluster` (made once, when
/// the pod is enrolled).
pub(crate) fn baggage_of(cluster: &str, w: &Workload) -> Baggage {
    let label = |keys: &[&str]| keys.iter().find_map(|k| w.labels.get(*k)).cloned();
    Baggage {
        cluster: cluster.to_string(),
        namespace: w.namespace.clone(),
        pod: w.name.clone(),
        // Istio's canonical service and revision, from the same labels in the same order.
        service: label(&[
            "service.istio.io/canonical-name",
            "app.kubernetes.io/name",
            "app",
        ])
        .unwrap_or_else(|| w.name.clone()),
        version: label(&[
            "service.istio.io/canonical-revision",
            "app.kubernetes.io/version",
            "version",
        ])
        .unwrap_or_else(|| "latest".to_string()),
    }
}

/// The workload name of a pod for metrics: its `app` label (as Istio's canonical name), else its name.
fn workload_name(w: &crate::inventory::Workload) -> String {
    w.labels
        .get("app.kubernetes.io/name")
        .or_else(|| w.labels.get("app"))
        .cloned()
        .unwrap_or_else(|| w.name.clone())
}

/// Connects to the app at `target` inside the pod from the client's own address (transparent
/// socket, delivery mark, sk_lookup bypass); `client`'s port is not used, its IPv6 scope is: a
/// link-local client is bound on the interface it came in on. `target` keeps its scope too (a
/// connection to the pod's link-local address).
pub(crate) async fn deliver(
    pod: &PodContext,
    client: ClientAddr,
    target: SocketAddr,
) -> Result<TcpStream, Reason> {
    let (sock, bound) = pod.kernel.delivery_socket(client).map_err(|e| {
        tracing::warn!(dst.orig = %target, error = %e, "cannot create delivery socket");
        Reason::DeliverySocket
    })?;
    // The bypass must exist before the SYN leaves, and is needed only until the handshake is
    // done: established sockets are found without sk_lookup.
    pod.kernel.add_bypass(bound, target).map_err(|e| {
        tracing::warn!(dst.orig = %target, error = %crate::error::error_chain(&e), "cannot register delivery in the bypass map");
        Reason::BypassMap
    })?;
    let connected = tokio::time::timeout(CONNECT_TIMEOUT, sock.connect(target)).await;
    pod.kernel.remove_bypass(bound, target);
    match connected {
        Ok(Ok(up)) => {
            let _ = up.set_nodelay(true);
            Ok(up)
        }
        Ok(Err(e)) => {
            tracing::debug!(dst.orig = %target, error = %e, "app refused");
            Err(Reason::AppUnreachable)
        }
        Err(_) => Err(Reason::AppTimeout),
    }
}

/// Per-pod proxy counters.
#[derive(Debug, Default)]
pub struct ProxyStats {
    /// Outbound connections accepted on the outbound listener.
    pub outbound_accepted: AtomicU64,
    /// Outbound connections open now.
    pub outbound_active: AtomicU64,
    /// Outbound connections that failed (no original destination, loop, upstream refused).
    pub outbound_failed: AtomicU64,
    /// Inbound plaintext connections accepted.
    pub inbound_accepted: AtomicU64,
    /// Inbound connections open now (plaintext and tunnelled).
    pub inbound_active: AtomicU64,
    /// Connections open now on the inbound plaintext listener (15006).
    pub plaintext_active: AtomicU64,
    /// Outbound connections reset at once: the pod held `limits.maxConnectionsPerPod`.
    pub outbound_limited: AtomicU64,
    /// Inbound plaintext connections reset at once: the pod held `limits.maxConnectionsPerPod`.
    pub inbound_limited: AtomicU64,
    /// Rate of the refusal log lines, per capped listener.
    pub limit_log: [caps::LogLimiter; 2],
    /// Inbound plaintext connections that failed (app unreachable, agent port, bypass map).
    pub inbound_failed: AtomicU64,
    /// Inbound plaintext connections refused by PeerAuthentication STRICT.
    pub inbound_denied: AtomicU64,
    /// Inbound connections refused or closed by AuthorizationPolicy.
    pub authz_denied: AtomicU64,
    /// Connections on the tunnel port refused (HBONE arrives with the tunnel issue).
    pub tunnel_refused: AtomicU64,
    /// Bytes from apps in this pod to their destinations (outbound) and from clients to the app (inbound).
    pub bytes_sent: AtomicU64,
    /// Bytes in the other direction.
    pub bytes_received: AtomicU64,
}

/// A serializable copy of [`ProxyStats`].
#[derive(Debug, Clone, Serialize)]
pub struct ProxyStatsSnapshot {
    /// See [`ProxyStats::outbound_accepted`].
    pub outbound_accepted: u64,
    /// See [`ProxyStats::outbound_active`].
    pub outbound_active: u64,
    /// See [`ProxyStats::outbound_failed`].
    pub outbound_failed: u64,
    /// See [`ProxyStats::inbound_accepted`].
    pub inbound_accepted: u64,
    /// See [`ProxyStats::inbound_active`].
    pub inbound_active: u64,
    /// See [`ProxyStats::plaintext_active`].
    pub plaintext_active: u64,
    /// See [`ProxyStats::outbound_limited`].
    pub outbound_limited: u64,
    /// See [`ProxyStats::inbound_limited`].
    pub inbound_limited: u64,
    /// See [`ProxyStats::inbound_failed`].
    pub inbound_failed: u64,
    /// See [`ProxyStats::inbound_denied`].
    pub inbound_denied: u64,
    /// See [`ProxyStats::authz_denied`].
    pub authz_denied: u64,
    /// See [`ProxyStats::tunnel_refused`].
    pub tunnel_refused: u64,
    /// See [`ProxyStats::bytes_sent`].
    pub bytes_sent: u64,
    /// See [`ProxyStats::bytes_received`].
    pub bytes_received: u64,
}

impl ProxyStats {
    /// Reads every counter.
    pub fn snapshot(&self) -> ProxyStatsSnapshot {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ProxyStatsSnapshot {
            outbound_accepted: r(&self.outbound_accepted),
            outbound_active: r(&self.outbound_active),
            outbound_failed: r(&self.outbound_failed),
            inbound_accepted: r(&self.inbound_accepted),
            inbound_active: r(&self.inbound_active),
            plaintext_active: r(&self.plaintext_active),
            outbound_limited: r(&self.outbound_limited),
            inbound_limited: r(&self.inbound_limited),
            inbound_failed: r(&self.inbound_failed),
            inbound_denied: r(&self.inbound_denied),
            authz_denied: r(&self.authz_denied),
            tunnel_refused: r(&self.tunnel_refused),
            bytes_sent: r(&self.bytes_sent),
            bytes_received: r(&self.bytes_received),
        }
    }
}

/// Increments a gauge now and decrements it when dropped.
pub(crate) struct ActiveGuard<'a>(&'a AtomicU64);

impl<'a> ActiveGuard<'a> {
    pub(crate) fn new(c: &'a AtomicU64) -> Self {
        c.fetch_add(1, Ordering::Relaxed);
        Self(c)
    }

    /// Like [`ActiveGuard::new`], unless the gauge already reads `max` or more.
    pub(crate) fn try_new(c: &'a AtomicU64, max: u64) -> Option<Self> {
        c.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
            (n < max).then_some(n + 1)
        })
        .ok()
        .map(|_| Self(c))
    }
}

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Closes `stream` with a reset, so the peer sees a refusal rather than a clean end.
pub(crate) fn reset(stream: tokio::net::TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

/// Accept loop shared by the listeners: hands every accepted stream to `serve` on the shard
/// [`shards::Shards::place`] picks (re-registered with that shard's reactor), backing off on errors such as
/// EMFILE instead of spinning.
pub(crate) async fn accept_loop<F, Fut>(
    listener: tokio::net::TcpListener,
    component: &'static str,
    shards: Arc<shards::Shards>,
    serve: F,
) where
    F: Fn(tokio::net::TcpStream, std::net::SocketAddr) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let local = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    tracing::debug!(listen.addr = %local, component, "listener established");
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let shard = shards.place(peer.ip());
                if shard == shards::current() {
                    tokio::spawn(serve(stream, peer));
                    continue;
                }
                let std = match stream.into_std() {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(listen.addr = %local, component, peer.addr = %peer, error = %e, "cannot hand the connection to a shard");
                        continue;
                    }
                };
                let serve = serve.clone();
                shards.handle(shard).spawn(async move {
                    match tokio::net::TcpStream::from_std(std) {
                        Ok(stream) => serve(stream, peer).await,
                        Err(e) => {
                            tracing::warn!(component, peer.addr = %peer, error = %e, "cannot register the connection with its shard");
                        }
                    }
                });
            }
            Err(e) => {
                tracing::warn!(listen.addr = %local, component, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::mem::size_of;
    use std::time::Duration;

    /// The size of the future an async fn of two arguments returns, without calling it.
    fn size2<A, B, F: Future>(_: impl Fn(A, B) -> F) -> usize {
        size_of::<F>()
    }

    /// The same for three arguments.
    fn size3<A, B, C, F: Future>(_: impl Fn(A, B, C) -> F) -> usize {
        size_of::<F>()
    }

    #[test]
    fn connection_futures_stay_small() {
        // A connection's task is one allocation of its future, held while the connection is
        // open; what only the setup needs (the tunnel dial: 5.5 KB unoptimized) is boxed apart.
        let sizes = [
            ("outbound", size3(super::outbound::serve)),
            ("plaintext", size3(super::plaintext::serve)),
            ("inbound stream", size2(super::inbound::handle)),
        ];
        eprintln!("connection futures (bytes): {sizes:?}");
        for (what, size) in sizes {
            assert!(size <= 3072, "the {what} future is {size} B");
        }
    }

    #[test]
    fn accept_loop_hands_connections_round_the_shards_and_they_still_work() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let shards = std::sync::Arc::new(super::shards::Shards::start(2).expect("shards"));
        let std = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        std.set_nonblocking(true).expect("nonblocking");
        let addr = std.local_addr().expect("addr");
        let (tx, rx) = std::sync::mpsc::channel();
        let s = shards.clone();
        shards.handle(0).spawn(async move {
            let listener = tokio::net::TcpListener::from_std(std).expect("register");
            super::accept_loop(listener, "test", s, move |mut stream, _peer| {
                let tx = tx.clone();
                async move {
                    // Served on its shard, with the stream registered with that shard's reactor.
                    let mut buf = [0u8; 4];
                    stream.read_exact(&mut buf).await.expect("read");
                    stream.write_all(&buf).await.expect("echo");
                    tx.send(super::shards::current()).expect("send");
                }
            })
            .await;
        });
        let mut served = Vec::new();
        for i in 0..4u32 {
            let mut c = std::net::TcpStream::connect(addr).expect("connect");
            c.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            std::io::Write::write_all(&mut c, &i.to_be_bytes()).expect("write");
            let mut back = [0u8; 4];
            std::io::Read::read_exact(&mut c, &mut back).expect("echo back");
            assert_eq!(u32::from_be_bytes(back), i);
            served.push(rx.recv_timeout(Duration::from_secs(5)).expect("served"));
        }
        assert_eq!(served, vec![0, 1, 0, 1], "connections go round the shards");
        shards.shutdown(Duration::from_secs(2));
    }
}
