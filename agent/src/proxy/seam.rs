//! The seam between the proxy paths and the kernel: what outbound, inbound and plaintext ask of it, and its kernel-backed answer.
//!
//! The paths never touch a netns, a socket option or a kernel map themselves: they ask a
//! [`Kernel`] for the original destination of a captured connection, for sockets (an outbound
//! one leaving from the pod, a delivery one bound to the client's address) and for the
//! delivery bypass entry sk_lookup honours. [`PodKernel`] answers with the pod's namespace and
//! the loaded programs' maps; the loopback answer of the unit tests (`proxy/testing.rs`) maps
//! pods to 127.0.0.x addresses, so the paths run in-process without root (ztunnel's
//! `SocketFactory` draws the same line).
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use aya::maps::MapError;
use tokio::net::{TcpSocket, TcpStream};

use super::socket::{self, SocketFactory};
use crate::addr::{ClientAddr, OrigDstAddr};
use crate::redirect::maps::AmbBypassKey;
use crate::redirect::Datapath;

/// A connection being set up, as the seam returns it.
pub type Connecting<'a> =
    Pin<Box<dyn Future<Output = Result<TcpStream, socket::Error>> + Send + 'a>>;

/// Why the delivery bypass entry could not be added.
#[derive(Debug, thiserror::Error)]
#[error("cannot add the delivery bypass {bound} -> {target}")]
pub struct BypassError {
    /// The delivery socket's address.
    pub bound: SocketAddr,
    /// Where it connects.
    pub target: SocketAddr,
    /// What the map said (boxed: a map error is large and this one is rare).
    #[source]
    pub source: Box<MapError>,
}

/// What the proxy paths of one pod ask of the kernel.
pub trait Kernel: Send + Sync {
    /// Where an accepted outbound connection from the app at `client` was going.
    fn orig_dst(&self, stream: &TcpStream, client: ClientAddr) -> Option<OrigDstAddr>;
    /// Where an accepted inbound plaintext connection was going.
    fn inbound_dst(&self, stream: &TcpStream) -> io::Result<OrigDstAddr>;
    /// Connects to `dst` from the pod (source = the pod's address), past the capture.
    fn connect_outbound(&self, dst: SocketAddr) -> Connecting<'_>;
    /// A socket in the pod bound to `client`'s address (port chosen now, returned).
    fn delivery_socket(&self, client: ClientAddr)
        -> Result<(TcpSocket, SocketAddr), socket::Error>;
    /// Lets the delivery connection `bound` → `target` past inbound capture.
    fn add_bypass(&self, bound: SocketAddr, target: SocketAddr) -> Result<(), BypassError>;
    /// Removes what [`Kernel::add_bypass`] added.
    fn remove_bypass(&self, bound: SocketAddr, target: SocketAddr);
}

/// The kernel-backed seam of one enrolled pod: its namespace's sockets and the programs' maps.
pub struct PodKernel {
    sockets: SocketFactory,
    datapath: Arc<Datapath>,
    netns_cookie: u64,
}

impl PodKernel {
    /// The seam of the pod whose namespace `sockets` creates in, known to the programs as `netns_cookie`.
    pub fn new(sockets: SocketFactory, datapath: Arc<Datapath>, netns_cookie: u64) -> Self {
        Self {
            sockets,
            datapath,
            netns_cookie,
        }
    }
}

impl Kernel for PodKernel {
    /// SO_ORIGINAL_DST (answered by the cgroup/getsockopt program), else the tuple map the
    /// sockops program filled.
    fn orig_dst(&self, stream: &TcpStream, client: ClientAddr) -> Option<OrigDstAddr> {
        let sock = socket2::SockRef::from(stream);
        let via_sockopt = if client.0.is_ipv4() {
            sock.original_dst_v4()
        } else {
            sock.original_dst_v6()
        };
        via_sockopt
            .ok()
            .and_then(|a| a.as_socket())
            .map(OrigDstAddr)
            .or_else(|| self.datapath.orig_dst(self.netns_cookie, client))
    }

    /// sk_lookup assigned the connection without rewriting it: its local address is where the
    /// client was going.
    fn inbound_dst(&self, stream: &TcpStream) -> io::Result<OrigDstAddr> {
        stream.local_addr().map(OrigDstAddr)
    }

    fn connect_outbound(&self, dst: SocketAddr) -> Connecting<'_> {
        Box::pin(self.sockets.connect_outbound(dst))
    }

    fn delivery_socket(
        &self,
        client: ClientAddr,
    ) -> Result<(TcpSocket, SocketAddr), socket::Error> {
        self.sockets.delivery_socket(client)
    }

    fn add_bypass(&self, bound: SocketAddr, target: SocketAddr) -> Result<(), BypassError> {
        self.datapath
            .add_bypass(&AmbBypassKey::new(bound, target))
            .map_err(|source| BypassError {
                bound,
                target,
                source: Box::new(source),
            })
    }

    fn remove_bypass(&self, bound: SocketAddr, target: SocketAddr) {
        self.datapath
            .remove_bypass(&AmbBypassKey::new(bound, target));
    }
}
