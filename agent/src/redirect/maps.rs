//! Rust mirrors of the map layouts in `agent-ebpf/include/ambit_maps.h`, their `Pod` impls and conversions.
//!
//! The mirror is written here (with derives, docs and conversions the header cannot carry) and
//! checked against the header by a unit test (`maps/tests.rs`) that reads the BTF of the object
//! the agent embeds: every struct declared in `mirror_structs!` must match its C struct member
//! by member (name, offset, size, and byte order: `__be32`/`__be16` are [`Be32`]/[`Be16`] here),
//! every constant in `mirror_enums!` its C enumerator, [`STAT_NAMES`] the order of
//! `enum amb_stat`, and [`EventKind`] `enum amb_event_kind`; and the object may hold no shared
//! struct or enum that the mirror lacks.
#![expect(unsafe_code, reason = "aya::Pod impls for the kernel map layouts")]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;

/// A `u32` holding a network-order value (`__be32` in the header).
pub type Be32 = u32;
/// A `u16` holding a network-order value (`__be16` in the header).
pub type Be16 = u16;

/// Declares constants that mirror the enumerators of C enums in the header, each named as its
/// enumerator without the `AMB_` prefix, and (for the test) the table of each enum.
macro_rules! mirror_enums {
    ($(
        $c_enum:literal: $ty:ty {
            $( $(#[$doc:meta])* $name:ident = $value:expr, )*
        }
    )*) => {
        $( $( $(#[$doc])* pub const $name: $ty = $value; )* )*

        /// The C enums mirrored above: name, then each enumerator's name and value.
        #[cfg(test)]
        const MIRROR_ENUMS: &[tests::CEnum] = &[$(
            tests::CEnum {
                name: $c_enum,
                values: &[$( (concat!("AMB_", stringify!($name)), $name as i64), )*],
            },
        )*];
    };
}

/// Declares `repr(C)` mirrors of C structs in the header and (for the test) the layout of each:
/// its C name, size, and every field's name, offset, size and declared type, in order.
macro_rules! mirror_structs {
    ($(
        $(#[$meta:meta])*
        pub struct $name:ident = $c_struct:literal {
            $( $(#[$field_doc:meta])* pub $field:ident: $ty:ty, )*
        }
    )*) => {
        $(
            $(#[$meta])*
            #[repr(C)]
            pub struct $name {
                $( $(#[$field_doc])* pub $field: $ty, )*
            }
        )*

        /// The C structs mirrored above, as Rust lays them out.
        #[cfg(test)]
        const MIRROR_STRUCTS: &[tests::CStruct] = &[$(
            tests::CStruct {
                name: $c_struct,
                rust: stringify!($name),
                size: size_of::<$name>(),
                fields: &[$(
                    tests::CField {
                        name: stringify!($field),
                        offset: std::mem::offset_of!($name, $field),
                        size: size_of::<$ty>(),
                        ty: stringify!($ty),
                    },
                )*],
            },
        )*];
    };
}

mirror_enums! {
    // Address families as stored in map structs.
    "amb_family": u8 {
        /// `AF_INET`.
        AF_INET = 2,
        /// `AF_INET6`.
        AF_INET6 = 10,
    }
    // `AmbPod::flags` bits.
    "amb_pod_flag": u32 {
        /// connect4/6 redirect this pod's outbound TCP.
        POD_F_CAPTURE_OUT = 0x1,
        /// sk_lookup steers inbound TCP in this pod's netns.
        POD_F_CAPTURE_IN = 0x2,
        /// connect4/6 redirect only destinations listed in `amb_mesh_dsts`.
        POD_F_MESH_ONLY = 0x4,
    }
    // `amb_mesh_dsts` values (bits): why a destination goes through the agent.
    "amb_mesh_dst": u32 {
        /// An enrolled pod's address.
        MESH_DST_POD = 0x1,
        /// A Service virtual IP.
        MESH_DST_VIP = 0x2,
        /// The wildcard entry (all-zero key): every destination is captured.
        MESH_DST_ALL = 0x4,
    }
}

/// `AMB_MAX_SKIP_PORTS`: entries of `AmbPod::skip_ports` (checked through the struct's layout).
pub const MAX_SKIP_PORTS: usize = 16;
/// `AMB_MAX_SKIP_CIDRS`: entries of `AmbPod::skip_cidrs` (checked through the struct's layout).
pub const MAX_SKIP_CIDRS: usize = 8;
/// `AMB_MAX_MESH_DSTS`: capacity of `amb_mesh_dsts` (checked against the object's map).
pub const MAX_MESH_DSTS: usize = 65536;
/// `AMB_MAX_AGENT_CGROUPS`: capacity of `amb_agent_cgs` (checked against the object's map).
pub const MAX_AGENT_CGROUPS: usize = 64;

/// Names of the `amb_stats` counters, by index: `enum amb_stat` in order, each enumerator
/// `AMB_STAT_<NAME>` (`AMB_STAT_COUNT` entries).
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

/// `enum amb_event_kind`: what an `AmbEvent` reports. Each variant is the enumerator
/// `AMB_EVENT_<VARIANT>` (in upper snake case) with the value [`From<u8>`] maps from.
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

mirror_structs! {
    /// `struct amb_cidr`: a CIDR in a pod's skip list.
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub struct AmbCidr = "amb_cidr" {
        pub addr: [Be32; 4],
        pub family: u8,
        pub prefix_len: u8,
        pub _pad: u16,
    }

    /// `struct amb_pod`: an enrolled pod, the value of `amb_pods`.
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub struct AmbPod = "amb_pod" {
        pub id: u32,
        pub flags: u32,
        pub skip_ports: [Be16; MAX_SKIP_PORTS],
        pub skip_cidrs: [AmbCidr; MAX_SKIP_CIDRS],
    }

    /// `struct amb_pod_stats`: a pod's counters.
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
    pub struct AmbPodStats = "amb_pod_stats" {
        pub redirected: u64,
        pub exempted: u64,
        pub steered: u64,
        pub bypassed: u64,
        pub dropped: u64,
        pub bind_denied: u64,
        pub passthrough: u64,
        pub forged_mark: u64,
    }

    /// `struct amb_orig_dst`: where a captured app connected.
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub struct AmbOrigDst = "amb_orig_dst" {
        pub addr: [Be32; 4],
        pub port: Be16,
        pub family: u8,
        pub _pad: u8,
    }

    /// `struct amb_conn_key`: a captured client socket, the key of `amb_conns`.
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub struct AmbConnKey = "amb_conn_key" {
        pub netns_cookie: u64,
        pub addr: [Be32; 4],
        pub port: Be16,
        pub family: u8,
        pub _pad: u8,
        pub _pad2: u32,
    }

    /// `struct amb_addr_key`: a destination address, the key of `amb_mesh_dsts`.
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
    pub struct AmbAddrKey = "amb_addr_key" {
        pub addr: [Be32; 4],
        pub family: u8,
        pub _pad: [u8; 3],
    }

    /// `struct amb_listener_key`: a pod's inbound listener, the key of `amb_listeners`.
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub struct AmbListenerKey = "amb_listener_key" {
        pub netns_cookie: u64,
        pub family: u32,
        pub _pad: u32,
    }

    /// `struct amb_bypass_key`: a delivery connection of the agent, the key of `amb_bypass`.
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
    pub struct AmbBypassKey = "amb_bypass_key" {
        pub remote: [Be32; 4],
        pub local: [Be32; 4],
        pub remote_port: Be16,
        pub local_port: Be16,
        pub family: u8,
        pub _pad: [u8; 3],
    }

    /// `struct amb_event`: a record of the `amb_events` ring buffer.
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub struct AmbEvent = "amb_event" {
        pub netns_cookie: u64,
        pub addr: [Be32; 4],
        pub port: Be16,
        pub family: u8,
        pub kind: u8,
        pub pod_id: u32,
    }
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
pub fn addr_words(ip: IpAddr) -> (u8, [Be32; 4]) {
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
pub fn words_addr(family: u8, words: [Be32; 4]) -> Option<IpAddr> {
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
            port: client.port().to_be(),
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
            remote_port: remote.port().to_be(),
            local_port: local.port().to_be(),
            family,
            _pad: [0; 3],
        }
    }
}

impl AmbPod {
    /// The kernel view of an enrolled pod (`skip_ports` in host order).
    pub fn new(id: u32, flags: u32, skip_ports: &[u16], skip_cidrs: &[IpNet]) -> Self {
        let mut pod = Self {
            id,
            flags,
            ..Default::default()
        };
        for (slot, port) in pod.skip_ports.iter_mut().zip(skip_ports) {
            *slot = port.to_be();
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
        let b = b.get(..size_of::<Self>())?;
        // SAFETY: `b` holds `size_of::<Self>()` bytes (sliced above), read unaligned; `Self` is
        // `repr(C)` of fixed-width integers with explicit padding, so any bytes are a valid value.
        Some(unsafe { std::ptr::read_unaligned(b.as_ptr().cast::<Self>()) })
    }

    /// The event's destination address, if the family is known.
    pub fn dst(&self) -> Option<SocketAddr> {
        words_addr(self.family, self.addr).map(|ip| SocketAddr::new(ip, u16::from_be(self.port)))
    }
}

#[cfg(test)]
mod tests;
