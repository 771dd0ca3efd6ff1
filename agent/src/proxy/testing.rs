//! Loopback stand-ins for the kernel and an agent's pods: pods at 127.0.0.x, real listeners on ephemeral ports, kernel calls recorded.
use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;

use super::conns::ConnTable;
use super::seam::{BypassError, Connecting, Kernel};
use super::shards::Shards;
use super::socket;
use super::{inbound, outbound, plaintext, route, AgentContext, PodContext, ProxyStats};
use crate::addr::{ClientAddr, OrigDstAddr};
use crate::config::Config;
use crate::identity::source::TlsSource;
use crate::identity::testing::TestCa;
use crate::identity::{SpiffeId, TrustDomain, WorkloadCertificate};
use crate::inventory::Snapshot;
use crate::metrics::ProxyMetrics;
use crate::tunnel::pool::Pool;

/// A call a path made on the loopback kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Call {
    /// `connect_outbound(dst)` from the pod at `from`.
    Outbound { from: IpAddr, dst: SocketAddr },
    /// `add_bypass(bound, target)`.
    AddBypass {
        bound: SocketAddr,
        target: SocketAddr,
    },
    /// `remove_bypass(bound, target)`.
    RemoveBypass {
        bound: SocketAddr,
        target: SocketAddr,
    },
}

/// Where the loopback "kernel" steers connections to one pod, as sk_lookup and connect4 do.
#[derive(Debug, Clone, Copy)]
struct Steer {
    outbound: SocketAddr,
    plaintext: SocketAddr,
    tunnel: SocketAddr,
}

/// The node as the loopback kernel sees it: pods, captured sockets, bypass entries, calls.
#[derive(Default)]
pub(crate) struct LoopbackNet {
    pods: Mutex<HashMap<IpAddr, Steer>>,
    /// App socket → where it connected (what connect4 remembers for SO_ORIGINAL_DST).
    redirected: Mutex<HashMap<SocketAddr, SocketAddr>>,
    /// Client socket steered to a plaintext listener → where it was going.
    steered: Mutex<HashMap<SocketAddr, SocketAddr>>,
    bypass: Mutex<HashSet<(SocketAddr, SocketAddr)>>,
    calls: Mutex<Vec<Call>>,
    tunnel_port: u16,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl LoopbackNet {
    /// The calls made so far.
    pub(crate) fn calls(&self) -> Vec<Call> {
        lock(&self.calls).clone()
    }

    /// The bypass entries in place now.
    pub(crate) fn bypass_entries(&self) -> usize {
        lock(&self.bypass).len()
    }

    /// A connection from `from` to `dst` as the kernel would make it: to an enrolled pod's
    /// tunnel port it reaches that pod's tunnel listener, to any other port of the pod its
    /// plaintext listener (remembering `dst`), anywhere else `dst` itself.
    pub(crate) async fn dial(&self, from: IpAddr, dst: SocketAddr) -> io::Result<TcpStream> {
        let steer = lock(&self.pods).get(&dst.ip()).copied();
        let sock = TcpSocket::new_v4()?;
        sock.bind(SocketAddr::new(from, 0))?;
        let to = match steer {
            Some(s) if dst.port() == self.tunnel_port => s.tunnel,
            Some(s) => {
                lock(&self.steered).insert(sock.local_addr()?, dst);
                s.plaintext
            }
            None => dst,
        };
        sock.connect(to).await
    }

    /// An app in the pod at `from` connecting to `orig`: connect4 sends it to the pod's
    /// outbound listener and remembers `orig`.
    pub(crate) async fn app_connect(&self, from: IpAddr, orig: SocketAddr) -> TcpStream {
        let steer = lock(&self.pods)[&from];
        let sock = TcpSocket::new_v4().expect("socket");
        sock.bind(SocketAddr::new(from, 0))
            .expect("bind app socket");
        lock(&self.redirected).insert(sock.local_addr().expect("local"), orig);
        sock.connect(steer.outbound)
            .await
            .expect("connect to the outbound listener")
    }
}

/// The loopback seam of the pod at `ip`.
pub(crate) struct LoopbackKernel {
    net: Arc<LoopbackNet>,
    ip: IpAddr,
}

impl Kernel for LoopbackKernel {
    fn orig_dst(&self, _stream: &TcpStream, client: ClientAddr) -> Option<OrigDstAddr> {
        lock(&self.net.redirected)
            .get(&client.0)
            .copied()
            .map(OrigDstAddr)
    }

    fn inbound_dst(&self, stream: &TcpStream) -> io::Result<OrigDstAddr> {
        let peer = stream.peer_addr()?;
        lock(&self.net.steered)
            .get(&peer)
            .copied()
            .map(OrigDstAddr)
            .ok_or_else(|| io::Error::other(format!("{peer} was not steered")))
    }

    fn connect_outbound(&self, dst: SocketAddr) -> Connecting<'_> {
        lock(&self.net.calls).push(Call::Outbound { from: self.ip, dst });
        Box::pin(async move {
            self.net
                .dial(self.ip, dst)
                .await
                .map_err(|source| socket::Error::Socket {
                    op: "connect",
                    addr: dst,
                    netns: "loopback".into(),
                    source,
                })
        })
    }

    fn delivery_socket(
        &self,
        client: ClientAddr,
    ) -> Result<(TcpSocket, SocketAddr), socket::Error> {
        let bind = SocketAddr::new(client.0.ip(), 0);
        let err = |op| {
            move |source| socket::Error::Socket {
                op,
                addr: bind,
                netns: "loopback".into(),
                source,
            }
        };
        let sock = TcpSocket::new_v4().map_err(err("socket"))?;
        sock.bind(bind).map_err(err("bind"))?;
        let local = sock.local_addr().map_err(err("getsockname"))?;
        Ok((sock, local))
    }

    fn add_bypass(&self, bound: SocketAddr, target: SocketAddr) -> Result<(), BypassError> {
        lock(&self.net.bypass).insert((bound, target));
        lock(&self.net.calls).push(Call::AddBypass { bound, target });
        Ok(())
    }

    fn remove_bypass(&self, bound: SocketAddr, target: SocketAddr) {
        lock(&self.net.bypass).remove(&(bound, target));
        lock(&self.net.calls).push(Call::RemoveBypass { bound, target });
    }
}

/// One agent's pods on loopback: the inventory, the CA, the agent-wide parts of a context.
pub(crate) struct Node {
    pub(crate) net: Arc<LoopbackNet>,
    pub(crate) metrics: Arc<ProxyMetrics>,
    _inventory_tx: watch::Sender<Arc<Snapshot>>,
    agent: Arc<AgentContext>,
    tls: Arc<TlsSource>,
    /// The agent's drain (every pod's here).
    pub(crate) drain: crate::drain::Trigger,
}

impl Node {
    /// A node serving the pods of `inventory` (YAML), with SVIDs from a fresh test CA for
    /// every pod of it.
    pub(crate) fn new(inventory: &str) -> Self {
        let cfg = Arc::new(
            Config::parse(
                Path::new("t.yaml"),
                "node: node1\ninventory: /nonexistent/inventory.yaml\n",
            )
            .expect("config"),
        );
        let snap = crate::inventory::file::parse(Path::new("inventory.yaml"), inventory)
            .expect("inventory");
        let ca = TestCa::new(&cfg.trust_domain);
        let certs: HashMap<SpiffeId, Arc<WorkloadCertificate>> = snap
            .workloads
            .values()
            .map(|w| {
                let id = w.spiffe_id(&cfg.trust_domain);
                (id.parse().expect("pod identity"), Arc::new(ca.svid(&id)))
            })
            .collect();
        let td: TrustDomain = cfg.trust_domain.parse().expect("trust domain");
        let tls = TlsSource::new(
            Arc::new(move |id: &SpiffeId| certs.get(id).cloned()),
            ca.bundle(),
            vec![td],
        );
        let metrics = Arc::new(ProxyMetrics::default());
        let (tx, rx) = watch::channel(Arc::new(snap));
        let net = LoopbackNet {
            tunnel_port: cfg.ports.tunnel,
            ..LoopbackNet::default()
        };
        let tls = Arc::new(tls);
        let agent = AgentContext {
            ports: cfg.ports,
            gate: Arc::new(inbound::Gate::new(&cfg.limits, metrics.rejections.clone())),
            conns: Arc::new(ConnTable::new(metrics.clone())),
            inventory: rx,
            tls: Some(tls.clone()),
            pool: Arc::new(Pool::new(100, Duration::from_secs(30))),
            certs: None,
            lb: Arc::new(route::RoundRobin::default()),
            shards: Arc::new(Shards::start(1).expect("shards")),
            cfg,
        };
        Self {
            net: Arc::new(net),
            metrics,
            _inventory_tx: tx,
            agent: Arc::new(agent),
            tls,
            drain: crate::drain::Trigger::new(),
        }
    }

    /// Enrolls pod `ns/name` of the inventory: its three listeners on its address, served by
    /// the real outbound, plaintext and tunnel paths over the loopback kernel.
    pub(crate) async fn enroll(&self, key: &str) -> Arc<PodContext> {
        let workload = (*self.agent.inventory.borrow().workloads[key]).clone();
        let ip = workload.ips[0];
        let listen = || async move {
            TcpListener::bind(SocketAddr::new(ip, 0))
                .await
                .expect("bind")
        };
        let (out, plain, tun) = (listen().await, listen().await, listen().await);
        let addr = |l: &TcpListener| l.local_addr().expect("local");
        let steer = Steer {
            outbound: addr(&out),
            plaintext: addr(&plain),
            tunnel: addr(&tun),
        };
        lock(&self.net.pods).insert(ip, steer);
        let pod = Arc::new(PodContext {
            agent: self.agent.clone(),
            baggage: super::baggage_of(&self.agent.cfg.cluster_id, &workload).value(),
            workload,
            netns_cookie: u64::from(lock(&self.net.pods).len() as u32),
            kernel: Arc::new(LoopbackKernel {
                net: self.net.clone(),
                ip,
            }),
            drain: self.drain.signal(),
            stats: ProxyStats::default(),
        });
        tokio::spawn(outbound::run(out, pod.clone()));
        tokio::spawn(plaintext::run(plain, pod.clone()));
        tokio::spawn(inbound::run(tun, pod.clone()));
        pod
    }
}

impl Node {
    /// Open connections in the agent's tunnel pool.
    pub(crate) fn pool_connections(&self) -> usize {
        self.agent.pool.stats().connections
    }

    /// The TLS settings a tunnel from `src` requiring `dst` is made with.
    pub(crate) fn client_tls(&self, src: &str, dst: &str) -> Arc<rustls::ClientConfig> {
        let src = src.parse().expect("source identity");
        let dst = dst.parse().expect("destination identity");
        Arc::new(self.tls.client(&src, &dst).expect("client tls"))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.agent.shards.shutdown(Duration::from_millis(200));
    }
}

/// An app listening at `ip` (ephemeral port) that answers each connection with its peer's
/// address and a newline, then echoes until the client half-closes.
pub(crate) async fn echo_app(ip: IpAddr) -> SocketAddr {
    let listener = TcpListener::bind(SocketAddr::new(ip, 0))
        .await
        .expect("bind app");
    let addr = listener.local_addr().expect("local");
    tokio::spawn(async move {
        while let Ok((mut s, peer)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(format!("{peer}\n").as_bytes()).await;
                let mut buf = Vec::new();
                let _ = s.read_to_end(&mut buf).await;
                let _ = s.write_all(&buf).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

/// Sends `msg` on `s`, half-closes, and reads all of the answer (empty when reset or refused).
pub(crate) async fn exchange(mut s: TcpStream, msg: &str) -> String {
    let _ = s.write_all(msg.as_bytes()).await;
    let _ = s.shutdown().await;
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    assert!(read.is_ok(), "no answer within 10 s");
    String::from_utf8_lossy(&out).into_owned()
}
