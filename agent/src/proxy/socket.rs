//! SocketFactory: every socket the proxy uses is created here, inside a pod's netns, with the agent's marks.
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::sync::{Arc, Mutex, PoisonError};

use socket2::{Domain, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::addr::ClientAddr;
use crate::sys::{self, Netns};

/// Errors creating sockets in a pod.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Entering the pod's namespace failed.
    #[error(transparent)]
    Netns(#[from] sys::Error),
    /// A socket call failed.
    #[error("{op} {addr} in {netns} failed")]
    Socket {
        op: &'static str,
        addr: SocketAddr,
        netns: String,
        #[source]
        source: io::Error,
    },
}

fn sock_err(
    op: &'static str,
    addr: SocketAddr,
    netns: &str,
) -> impl FnOnce(io::Error) -> Error + use<> {
    let netns = netns.to_string();
    move |source| Error::Socket {
        op,
        addr,
        netns,
        source,
    }
}

/// Sockets made per trip into the pod's netns. A socket belongs to the netns it was created
/// in, and entering one costs a thread (setns changes only the calling thread), so one thread
/// makes a batch and later connections take from it: the thread is paid once per batch.
const SPARE_BATCH: usize = 32;

/// Unused, non-blocking TCP sockets already created in the pod's netns, per family.
#[derive(Debug, Default)]
struct Spare {
    v4: Vec<Socket>,
    v6: Vec<Socket>,
}

impl Spare {
    fn of(&mut self, v6: bool) -> &mut Vec<Socket> {
        if v6 {
            &mut self.v6
        } else {
            &mut self.v4
        }
    }
}

/// Creates sockets inside one pod's network namespace.
#[derive(Debug, Clone)]
pub struct SocketFactory {
    netns: Arc<Netns>,
    outbound_mark: u32,
    deliver_mark: u32,
    spare: Arc<Mutex<Spare>>,
}

/// The listeners of one pod plus its netns cookie.
#[derive(Debug)]
pub struct PodListeners {
    /// Netns cookie of the pod (as the kernel programs see it).
    pub netns_cookie: u64,
    /// Outbound capture listeners (127.0.0.1 and, if IPv6 works in the pod, ::1).
    pub outbound: Vec<std::net::TcpListener>,
    /// Inbound plaintext listeners: (family, listener).
    pub inbound: Vec<(u8, std::net::TcpListener)>,
    /// HBONE listeners.
    pub tunnel: Vec<std::net::TcpListener>,
}

impl SocketFactory {
    /// A factory for the pod whose namespace is `netns`.
    pub fn new(netns: Arc<Netns>, outbound_mark: u32, deliver_mark: u32) -> Self {
        Self {
            netns,
            outbound_mark,
            deliver_mark,
            spare: Arc::default(),
        }
    }

    /// A fresh non-blocking TCP socket of `addr`'s family in the pod's netns: from the spare
    /// batch, or a new batch when it is empty. Options and bind() work from any thread once
    /// the socket exists.
    fn socket(&self, addr: SocketAddr) -> Result<Socket, Error> {
        let v6 = addr.is_ipv6();
        if let Some(s) = self.lock_spare().of(v6).pop() {
            return Ok(s);
        }
        let domain = Domain::for_address(addr);
        let ns_name = self.netns.path().display().to_string();
        let empty = sock_err("socket", addr, &ns_name);
        let mut batch = self.netns.run(move || -> Result<Vec<Socket>, Error> {
            (0..SPARE_BATCH)
                .map(|_| {
                    // SOCK_NONBLOCK at creation: no fcntl pair per connection.
                    Socket::new(domain, Type::STREAM.nonblocking(), None)
                        .map_err(sock_err("socket", addr, &ns_name))
                })
                .collect()
        })??;
        let first = batch
            .pop()
            .ok_or_else(|| empty(io::Error::other("empty socket batch")))?;
        self.lock_spare().of(v6).append(&mut batch);
        Ok(first)
    }

    fn lock_spare(&self) -> std::sync::MutexGuard<'_, Spare> {
        self.spare.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The pod's namespace.
    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// Binds the pod's listeners; IPv6 ones are skipped when the pod has no IPv6.
    pub fn listeners(
        &self,
        outbound: u16,
        inbound: u16,
        tunnel: u16,
    ) -> Result<PodListeners, Error> {
        let ns_name = self.netns.path().display().to_string();
        self.netns.run(move || -> Result<PodListeners, Error> {
            let listen = |addr: SocketAddr| -> Result<std::net::TcpListener, Error> {
                let err = |op| sock_err(op, addr, &ns_name);
                let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)
                    .map_err(err("socket"))?;
                s.set_reuse_address(true).map_err(err("SO_REUSEADDR"))?;
                // A restarting agent binds beside the old one; the kernel hands queued
                // connections of a closing listener to its sibling (tcp_migrate_req).
                s.set_reuse_port(true).map_err(err("SO_REUSEPORT"))?;
                if addr.is_ipv6() {
                    s.set_only_v6(true).map_err(err("IPV6_V6ONLY"))?;
                }
                s.set_nonblocking(true).map_err(err("O_NONBLOCK"))?;
                s.bind(&addr.into()).map_err(err("bind"))?;
                s.listen(1024).map_err(err("listen"))?;
                Ok(s.into())
            };
            let v4 = |p| SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), p);
            let v6 = |p| SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), p);
            let lo4 = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), outbound);
            let lo6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), outbound);
            // This thread is inside the pod's netns, so /proc/sys/net is the pod's. Best effort:
            // without it a restart may reset connections queued on the old listeners.
            let _ = std::fs::write("/proc/sys/net/ipv4/tcp_migrate_req", "1");
            let out4 = listen(lo4)?;
            let netns_cookie = sys::netns_cookie(&out4)?;
            let mut l = PodListeners {
                netns_cookie,
                outbound: vec![out4],
                inbound: vec![(crate::redirect::maps::AF_INET, listen(v4(inbound))?)],
                tunnel: vec![listen(v4(tunnel))?],
            };
            // IPv6 is optional in a pod: skip it when ::1 or :: cannot be bound.
            if let Ok(s) = listen(lo6) {
                l.outbound.push(s);
            }
            if let Ok(s) = listen(v6(inbound)) {
                l.inbound.push((crate::redirect::maps::AF_INET6, s));
            }
            if let Ok(s) = listen(v6(tunnel)) {
                l.tunnel.push(s);
            }
            Ok(l)
        })?
    }

    /// Connects to `dst` from inside the pod (source = the pod's address), marked as the
    /// agent's outbound socket so the kernel programs leave it alone.
    pub async fn connect_outbound(&self, dst: SocketAddr) -> Result<TcpStream, Error> {
        let mark = self.outbound_mark;
        let ns_name = self.netns.path().display().to_string();
        let sock = self.socket(dst)?;
        sock.set_mark(mark)
            .map_err(sock_err("SO_MARK", dst, &ns_name))?;
        let std: std::net::TcpStream = sock.into();
        let stream = TcpSocket::from_std_stream(std)
            .connect(dst)
            .await
            .map_err(sock_err("connect", dst, &ns_name))?;
        stream
            .set_nodelay(true)
            .map_err(sock_err("TCP_NODELAY", dst, &ns_name))?;
        Ok(stream)
    }

    /// A transparent socket inside the pod bound to the original client's address (port chosen
    /// by the kernel now, so the caller can register the bypass before connecting). An IPv6
    /// client keeps its scope: a link-local address can only be bound on an interface.
    pub fn delivery_socket(&self, client: ClientAddr) -> Result<(TcpSocket, SocketAddr), Error> {
        let mark = self.deliver_mark;
        let ns_name = self.netns.path().display().to_string();
        let bind = match client.0 {
            SocketAddr::V4(v4) => SocketAddr::new(IpAddr::V4(*v4.ip()), 0),
            SocketAddr::V6(v6) => SocketAddr::V6(SocketAddrV6::new(*v6.ip(), 0, 0, v6.scope_id())),
        };
        let err = |op| sock_err(op, bind, &ns_name);
        let sock = self.socket(bind)?;
        if bind.is_ipv4() {
            sock.set_ip_transparent_v4(true)
                .map_err(err("IP_TRANSPARENT"))?;
        } else {
            sock.set_ip_transparent_v6(true)
                .map_err(err("IPV6_TRANSPARENT"))?;
        }
        sock.set_mark(mark).map_err(err("SO_MARK"))?;
        sock.bind(&bind.into()).map_err(err("bind"))?;
        let local = sock
            .local_addr()
            .and_then(|a| {
                a.as_socket()
                    .ok_or_else(|| io::Error::other("bound address is not inet"))
            })
            .map_err(err("getsockname"))?;
        let std: std::net::TcpStream = sock.into();
        Ok((TcpSocket::from_std_stream(std), local))
    }
}

/// Converts a bound std listener into a tokio one (must be called inside the runtime).
pub fn tokio_listener(l: std::net::TcpListener) -> io::Result<TcpListener> {
    TcpListener::from_std(l)
}
