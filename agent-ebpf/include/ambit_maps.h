/* ambit_maps.h: the one definition of every map key/value shared by the kernel programs and the agent. */
/*
 * The agent mirrors these structs and enums in agent/src/redirect/maps.rs; a unit test there reads
 * the BTF of the object the agent embeds and compares every struct's members (names, offsets,
 * sizes, byte order) and every enum's names and values with the mirror. Types reach the BTF
 * through the maps that use them, or through the amb_abi anchor (ambit.bpf.c): add a new type to
 * one of them. Rules: fixed-width types only, no bool/pointers/enum-typed fields (enums name
 * values; fields holding them are __u8/__u32), explicit padding, and a _Static_assert per struct.
 * Byte order: addresses and ports are network order (__be32/__be16) everywhere, as on the wire and
 * in the socket addresses the kernel hands to the programs; everything else is host order.
 */
#ifndef AMBIT_MAPS_H
#define AMBIT_MAPS_H

#include <linux/types.h>

/* Address families as stored in the structs below (Linux's AF_INET and AF_INET6). */
enum amb_family {
	AMB_AF_INET = 2,
	AMB_AF_INET6 = 10,
};

/* Capacity of the maps (entries). */
#define AMB_MAX_PODS 4096
#define AMB_MAX_CONNS 65536
#define AMB_MAX_SKIP_PORTS 16
#define AMB_MAX_SKIP_CIDRS 8
#define AMB_MAX_MESH_DSTS 65536
#define AMB_MAX_AGENT_CGROUPS 64

/* amb_pod.flags bits. */
enum amb_pod_flag {
	AMB_POD_F_CAPTURE_OUT = 0x1, /* connect4/6 redirect this pod's outbound TCP */
	AMB_POD_F_CAPTURE_IN = 0x2,  /* sk_lookup steers inbound TCP in this pod's netns */
	AMB_POD_F_MESH_ONLY = 0x4,   /* connect4/6 redirect only destinations in amb_mesh_dsts */
};

/* amb_mesh_dsts values (bits): why a destination goes through the agent. The all-zero key
 * (family 0) with AMB_MESH_DST_ALL means "every destination": the agent sets it while its list
 * is incomplete (map full), so that mesh-only pods fall back to capturing everything. */
enum amb_mesh_dst {
	AMB_MESH_DST_POD = 0x1, /* an enrolled pod's address, on any node */
	AMB_MESH_DST_VIP = 0x2, /* a Service virtual IP (only the agent resolves it) */
	AMB_MESH_DST_ALL = 0x4, /* the wildcard entry */
};

/* Indices of amb_stats (per-CPU u64 counters). Append only; retired numbers stay reserved. The
 * agent names them in this order (redirect/maps.rs STAT_NAMES, checked against this enum). */
enum amb_stat {
	AMB_STAT_CONNECT4_REDIRECT = 0,
	AMB_STAT_CONNECT6_REDIRECT = 1,
	AMB_STAT_CONNECT_EXEMPT_MARK = 2,
	AMB_STAT_CONNECT_EXEMPT_LOOPBACK = 3, /* loopback or unspecified destination */
	AMB_STAT_CONNECT_EXEMPT_AGENT_PORT = 4,
	AMB_STAT_CONNECT_EXEMPT_SKIP_PORT = 5,
	AMB_STAT_CONNECT_EXEMPT_SKIP_CIDR = 6,
	AMB_STAT_CONNECT_MAP_FULL = 7,
	AMB_STAT_SOCKOPS_REKEY = 8,
	AMB_STAT_SOCKOPS_CLOSE = 9,
	AMB_STAT_SOCKOPS_MAP_FULL = 10,
	AMB_STAT_GETSOCKOPT_ANSWERED = 11,
	AMB_STAT_GETSOCKOPT_MISS = 12,
	AMB_STAT_GETPEERNAME_REWRITE = 13,
	AMB_STAT_LOOKUP_STEER = 14,
	AMB_STAT_LOOKUP_BYPASS = 15,
	AMB_STAT_LOOKUP_TUNNEL_PORT = 16,
	AMB_STAT_LOOKUP_NO_LISTENER = 17,
	AMB_STAT_LOOKUP_ASSIGN_FAIL = 18,
	AMB_STAT_EVENTS_LOST = 19,
	AMB_STAT_BIND_DENIED = 20,
	AMB_STAT_CONNECT_PASSTHROUGH = 21,
	AMB_STAT_CONNECT_FORGED_MARK = 22, /* a pod socket carried an agent mark: captured anyway */
	AMB_STAT_COUNT = 23,               /* entries of amb_stats; not a counter */
};

/* amb_event.kind: notable events sent through the amb_events ring buffer. */
enum amb_event_kind {
	AMB_EVENT_MAP_FULL = 1,    /* an enrolled pod's connect could not be recorded: refused */
	AMB_EVENT_AGENT_PORT = 2,  /* an enrolled pod dialled an agent port directly: exempted */
	AMB_EVENT_NO_LISTENER = 3, /* inbound SYN to an enrolled pod with no agent listener: dropped */
	AMB_EVENT_ASSIGN_FAIL = 4, /* bpf_sk_assign failed: dropped */
	AMB_EVENT_BIND_DENIED = 5, /* an enrolled pod tried to bind an agent port: refused */
	AMB_EVENT_FORGED_MARK = 6, /* a pod socket carried an agent mark: captured like any other */
};

/* A CIDR in a pod's skip list. */
struct amb_cidr {
	__be32 addr[4]; /* IPv4 in addr[0]; IPv6 uses all four */
	__u8 family;    /* AMB_AF_INET or AMB_AF_INET6; 0 = unused slot */
	__u8 prefix_len;
	__u16 _pad;
};
_Static_assert(sizeof(struct amb_cidr) == 20, "amb_cidr ABI changed");

/* amb_pods: netns cookie (u64) -> amb_pod. Written by the agent at enrollment; read by connect4/6. */
struct amb_pod {
	__u32 id;    /* agent-assigned pod number, for events and logs */
	__u32 flags; /* enum amb_pod_flag bits */
	__be16 skip_ports[AMB_MAX_SKIP_PORTS];         /* destination ports never captured; 0 = unused */
	struct amb_cidr skip_cidrs[AMB_MAX_SKIP_CIDRS]; /* destination CIDRs never captured */
};
_Static_assert(sizeof(struct amb_pod) == 200, "amb_pod ABI changed");

/* amb_pod_stats: netns cookie -> per-pod counters (atomic adds). Created by the agent at enrollment. */
struct amb_pod_stats {
	__u64 redirected; /* outbound connects redirected to the pod's outbound listener */
	__u64 exempted;   /* outbound connects left alone (loopback, marks, agent ports, skip lists) */
	__u64 steered;    /* inbound SYNs steered to the pod's inbound listener */
	__u64 bypassed;   /* inbound SYNs of the agent's own deliveries, left to the app */
	__u64 dropped;    /* refused: map full on connect, or no listener on inbound */
	__u64 bind_denied; /* binds to an agent port refused (cgroup/bind4+6) */
	__u64 passthrough; /* mesh-only: outbound connects to non-mesh destinations, left direct */
	__u64 forged_mark; /* outbound connects of pod sockets carrying an agent mark (captured) */
};
_Static_assert(sizeof(struct amb_pod_stats) == 64, "amb_pod_stats ABI changed");

/* amb_orig_dst (value): where the app connected. Keyed by socket cookie in amb_orig_dst and by
 * connection tuple in amb_conns. */
struct amb_orig_dst {
	__be32 addr[4]; /* IPv4 in addr[0]; IPv6 uses all four */
	__be16 port;
	__u8 family; /* AMB_AF_INET or AMB_AF_INET6 */
	__u8 _pad;   /* always zero */
};
_Static_assert(sizeof(struct amb_orig_dst) == 20, "amb_orig_dst ABI changed");

/* amb_conns key: the captured client socket as the agent's accepted socket names its peer, in the
 * pod's netns. Written by sockops on active-established, deleted on close; read by the agent and by
 * cgroup/getsockopt. */
struct amb_conn_key {
	__u64 netns_cookie;
	__be32 addr[4]; /* client (local) address: 127.0.0.1 or ::1 after the redirect */
	__be16 port;    /* client (local) port */
	__u8 family;
	__u8 _pad;
	__u32 _pad2;
};
_Static_assert(sizeof(struct amb_conn_key) == 32, "amb_conn_key ABI changed");

/* amb_mesh_dsts key (value: AMB_MESH_DST_* bits): a destination address, where IPv4 (also
 * v4-mapped IPv6) is AMB_AF_INET with the address in addr[0] and addr[1..3] zero. */
struct amb_addr_key {
	__be32 addr[4];
	__u8 family;
	__u8 _pad[3];
};
_Static_assert(sizeof(struct amb_addr_key) == 20, "amb_addr_key ABI changed");

/* amb_listeners (SOCKHASH, value u32 fd): the inbound plaintext listener of a pod, per family. */
struct amb_listener_key {
	__u64 netns_cookie;
	__u32 family;
	__u32 _pad;
};
_Static_assert(sizeof(struct amb_listener_key) == 16, "amb_listener_key ABI changed");

/* amb_bypass: a delivery connection the agent itself makes to an app; sk_lookup leaves its SYN to
 * the app. Written by the agent after bind() and before connect(); removed when the connection ends. */
struct amb_bypass_key {
	__be32 remote[4];  /* the original client's address, bound by the agent's transparent socket */
	__be32 local[4];   /* the pod's address */
	__be16 remote_port; /* the port the kernel chose at bind() */
	__be16 local_port;  /* the app's port */
	__u8 family;
	__u8 _pad[3];
};
_Static_assert(sizeof(struct amb_bypass_key) == 40, "amb_bypass_key ABI changed");

/* amb_events (RINGBUF) record. */
struct amb_event {
	__u64 netns_cookie;
	__be32 addr[4];     /* destination address of the connection */
	__be16 port;        /* destination port */
	__u8 family;
	__u8 kind;          /* enum amb_event_kind */
	__u32 pod_id;
};
_Static_assert(sizeof(struct amb_event) == 32, "amb_event ABI changed");

#endif /* AMBIT_MAPS_H */
