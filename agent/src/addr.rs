//! Address newtypes: a bare `SocketAddr` never crosses a module boundary in the proxy.
use std::fmt;
use std::net::SocketAddr;

/// The app socket that called connect() (as the agent's accepted socket names its peer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientAddr(pub SocketAddr);

/// Where the app meant to go, recovered from the datapath.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OrigDstAddr(pub SocketAddr);

/// The remote ambit agent (or plaintext peer) we connect to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerAddr(pub SocketAddr);

macro_rules! display {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    )*};
}
display!(ClientAddr, OrigDstAddr, PeerAddr);
