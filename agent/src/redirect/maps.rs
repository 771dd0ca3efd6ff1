//! Rust mirrors of the map layouts in `agent-ebpf/include/ambit_maps.h`, their `Pod` impls and conversions.
#![expect(unsafe_code, reason = "aya::Pod impls for the kernel map layouts")]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;

/// `AF_INET` as stored in map structs.
pub const AF_INET: u8 = 2;
/// `AF_INET6` as stored in map structs.
pub const AF_INET6: u8 = 10;
/// `AMB_MAX_SKIP_PORTS`.
pub const MAX_SKIP_PORTS: usize = 16;
/// `AMB_MAX_SKIP_CIDRS`.
pub const MAX_SKIP_CIDRS: usize = 8;
/// `AMB_POD_F_CAPTURE_OUT`.
pub const POD_F_CAPTURE_OUT: u32 = 0x1;
/// `AMB_POD_F_CAPTURE_IN`.
pub const POD_F_CAPTURE_IN: u32 = 0x2;
/// `AMB_POD_F_MESH_ONLY`: connect4/6 redirect only destinations listed in `amb_mesh_dsts`.
pub const POD_F_MESH_ONLY: u32 = 0x4;
/// `AMB_MAX_MESH_DSTS`: capacity of `amb_mesh_dsts`.
pub const MAX_MESH_DSTS: usize = 65536;
/// `AMB_MAX_AGENT_CGROUPS`: capacity of `amb_agent_cgs`.
pub const MAX_AGENT_CGROUPS: usize = 64;
/// `AMB_MESH_DST_POD`: an enrolled pod's address.
pub const MESH_DST_POD: u32 = 0x1;
/// `AMB_MESH_DST_VIP`: a Service virtual IP.
pub const MESH_DST_VIP: u32 = 0x2;
/// `AMB_MESH_DST_ALL`: the wildcard entry (all-zero key): every destination is captured.
pub const MESH_DST_ALL: u32 = 0x4;

/// Names of the `AMB_STAT_*` counters, by index (`AMB_STAT_MAX` entries).
pub const STAT_NAMES: [&str; 23] = [
    "connect4_redirect",
    "connect6_redirect",
    "connect_exempt_mark",
    "connect_exempt_loopback",
    "connect_exempt_agent_port",
    "connect_exempt_skip_port",
    "connect_exempt_skip_cidr",
    "connect_map_full",
    "sockops_rekey",
    "sockops_close",
    "sockops_map_full",
    "getsockopt_answered",
    "getsockopt_miss",
    "getpeername_rewrite",
    "lookup_steer",
    "lookup_bypass",
    "lookup_tunnel_port",
    "lookup_no_listener",
    "lookup_assign_fail",
    "events_lost",
    "bind_denied",
    "connect_passthrough",
    "connect_forged_mark",
];

/// `AMB_EVENT_*` kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// An enrolled pod's connect could not be recorded and was refused.
    MapFull,
    /// An enrolled pod dialled an agent port directly; exempted.
    AgentPort,
    /// Inbound SYN to an enrolled pod with no listener; dropped (fail closed).
    NoListener,
    /// `bpf_sk_assign` failed; dropped.
    AssignFail,
    /// An enrolled pod tried to bind an agent port; refused.
    BindDenied,
    /// A pod socket carried an agent mark; captured like any other.
    ForgedMark,
    /// A kind this agent does not know (newer kernel object).
    Unknown(u8),
}

impl From<u8> for EventKind {
    fn from(v: u8) -> Self {
        match v {
            1 => Self::MapFull,
            2 => Self::AgentPort,
            3 => Self::NoListener,
            4 => Self::AssignFail,
            5 => Self::BindDenied,
            6 => Self::ForgedMark,
            other => Self::Unknown(other),
        }
    }
}

/// `struct amb_cidr`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AmbCidr {
    pub addr: [u32; 4],
    pub family: u8,
    pub prefix_len: u8,
    pub _pad: u16,
}

/// `struct amb_pod`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AmbPod {
    pub id: u32,
    pub flags: u32,
    pub skip_ports: [u16; MAX_SKIP_PORTS],
    pub skip_cidrs: [AmbCidr; MAX_SKIP_CIDRS],
}

/// `struct amb_pod_stats`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct AmbPodStats {
    pub redirected: u64,
    pub exempted: u64,
    pub steered: u64,
    pub bypassed: u64,
    pub dropped: u64,
    pub bind_denied: u64,
    pub passthrough: u64,
    pub forged_mark: u64,
}

/// `struct amb_orig_dst`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AmbOrigDst {
    pub addr: [u32; 4],
    pub port: u16,
    pub family: u8,
    pub _pad: u8,
}

/// `struct amb_conn_key`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AmbConnKey {
    pub netns_cookie: u64,
    pub addr: [u32; 4],
    pub port: u16,
    pub family: u8,
    pub _pad: u8,
    pub _pad2: u32,
}

/// `struct amb_addr_key`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct AmbAddrKey {
    pub addr: [u32; 4],
    pub family: u8,
    pub _pad: [u8; 3],
}

/// `struct amb_listener_key`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AmbListenerKey {
    pub netns_cookie: u64,
    pub family: u32,
    pub _pad: u32,
}

/// `struct amb_bypass_key`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct AmbBypassKey {
    pub remote: [u32; 4],
    pub local: [u32; 4],
    pub remote_port: u16,
    pub local_port: u16,
    pub family: u8,
    pub _pad: [u8; 3],
}

/// `struct amb_event`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AmbEvent {
    pub netns_cookie: u64,
    pub addr: [u32; 4],
    pub port: u16,
    pub family: u8,
    pub kind: u8,
    pub pod_id: u32,
}

const _: () = assert!(size_of::<AmbCidr>() == 20);
const _: () = assert!(size_of::<AmbPod>() == 200);
const _: () = assert!(size_of::<AmbPodStats>() == 64);
const _: () = assert!(size_of::<AmbOrigDst>() == 20);
const _: () = assert!(size_of::<AmbConnKey>() == 32);
const _: () = assert!(size_of::<AmbAddrKey>() == 20);
const _: () = assert!(size_of::<AmbListenerKey>() == 16);
const _: () = assert!(size_of::<AmbBypassKey>() == 40);
const _: () = assert!(size_of::<AmbEvent>() == 32);

// SAFETY: every type below is `repr(C)`, made only of fixed-width integers and arrays of them
// with explicit padding fields, so it has no implicit padding and any bit pattern is valid.
unsafe impl aya::Pod for AmbCidr {}
// SAFETY: as above.
unsafe impl aya::Pod for AmbPod {}
// SAFETY: as above.
unsafe impl aya::Pod for AmbPodStats {}
// SAFETY: as above.
unsafe impl aya::Pod for AmbOrigDst {}
// SAFETY: as above.
unsafe impl aya::Pod for AmbConnKey {}
// SAFETY: as above.
unsafe impl aya::Pod for AmbAddrKey {}
// SAFETY: as above.
unsafe impl aya::Pod for AmbListenerKey {}
// SAFETY: as above.
unsafe impl aya::Pod for AmbBypassKey {}

/// An address in the map form: family and four network-order words (IPv4 in word 0).
pub fn addr_words(ip: IpAddr) -> (u8, [u32; 4]) {
    match ip {
        IpAddr::V4(v4) => (AF_INET, [u32::from_ne_bytes(v4.octets()), 0, 0, 0]),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            (AF_INET6, [w(0), w(4), w(8), w(12)])
        }
    }
}

/// The inverse of [`addr_words`]; `None` for an unknown family.
pub fn words_addr(family: u8, words: [u32; 4]) -> Option<IpAddr> {
    match family {
        AF_INET => Some(IpAddr::V4(Ipv4Addr::from(words[0].to_ne_bytes()))),
        AF_INET6 => {
            let mut o = [0u8; 16];
            for (i, w) in words.iter().enumerate() {
                o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            Some(IpAddr::V6(Ipv6Addr::from(o)))
        }
        _ => None,
    }
}

impl AmbOrigDst {
    /// The original destination as a socket address; `None` if the kernel wrote a bad family.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        words_addr(self.family, self.addr).map(|ip| SocketAddr::new(ip, u16::from_be(self.port)))
    }
}

impl AmbConnKey {
    /// The key of a captured client socket named `client` in the netns with `netns_cookie`.
    pub fn new(netns_cookie: u64, client: SocketAddr) -> Self {
        let ip = match client.ip() {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        let (family, addr) = addr_words(ip);
        Self {
            netns_cookie,
            addr,
            port: client.port(),
            family,
            ..Default::default()
        }
    }
}

impl AmbAddrKey {
    /// The key of one pod address.
    pub fn new(ip: IpAddr) -> Self {
        let (family, addr) = addr_words(ip);
        Self {
            addr,
            family,
            ..Default::default()
        }
    }
}

impl AmbAddrKey {
    /// The `amb_mesh_dsts` key of a destination address, as connect4/6 build it: a v4-mapped
    /// IPv6 address is folded to IPv4 (connect6 records dual-stack dials as IPv4).
    pub fn destination(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V6(v6) => Self::new(v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)),
            v4 => Self::new(v4),
        }
    }

    /// The wildcard key of `amb_mesh_dsts` (family 0, all zero).
    pub const WILDCARD: Self = Self {
        addr: [0; 4],
        family: 0,
        _pad: [0; 3],
    };

    /// The address of this key; `None` for the wildcard or an unknown family.
    pub fn ip(&self) -> Option<IpAddr> {
        words_addr(self.family, self.addr)
    }
}

impl AmbBypassKey {
    /// The key of a delivery connection from `remote` (the original client, bound by the agent)
    /// to `local` (the app in the pod).
    pub fn new(remote: SocketAddr, local: SocketAddr) -> Self {
        let (family, remote_words) = addr_words(remote.ip());
        let (_, local_words) = addr_words(local.ip());
        Self {
            remote: remote_words,
            local: local_words,
            remote_port: remote.port(),
            local_port: local.port(),
            family,
            _pad: [0; 3],
        }
    }
}

impl AmbPod {
    /// The kernel view of an enrolled pod.
    pub fn new(id: u32, flags: u32, skip_ports: &[u16], skip_cidrs: &[IpNet]) -> Self {
        let mut pod = Self {
            id,
            flags,
            ..Default::default()
        };
        for (slot, port) in pod.skip_ports.iter_mut().zip(skip_ports) {
            *slot = *port;
        }
        for (slot, net) in pod.skip_cidrs.iter_mut().zip(skip_cidrs) {
            let (family, addr) = addr_words(net.network());
            *slot = AmbCidr {
                addr,
                family,
                prefix_len: net.prefix_len(),
                _pad: 0,
            };
        }
        pod
    }
}

impl AmbEvent {
    /// Decodes a ring-buffer record; `None` if it is too short.
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() < size_of::<Self>() {
            return None;
        }
        let u32_at = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let mut cookie = [0u8; 8];
        cookie.copy_from_slice(&b[0..8]);
        Some(Self {
            netns_cookie: u64::from_ne_bytes(cookie),
            addr: [u32_at(8), u32_at(12), u32_at(16), u32_at(20)],
            port: u16::from_ne_bytes([b[24], b[25]]),
            family: b[26],
            kind: b[27],
            pod_id: u32_at(28),
        })
    }

    /// The event's destination address, if the family is known.
    pub fn dst(&self) -> Option<SocketAddr> {
        words_addr(self.family, self.addr).map(|ip| SocketAddr::new(ip, u16::from_be(self.port)))
    }
}

#[cfg(test)]
mod tests;
