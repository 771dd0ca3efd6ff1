/* common.h: kernel-only constants, load-time settings and small helpers shared by the hooks. */
#ifndef AMB_COMMON_H
#define AMB_COMMON_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "maps.h"

#define IPPROTO_TCP 6
#define SOL_IP 0
#define SOL_IPV6 41
#define SO_ORIGINAL_DST 80 /* also IP6T_SO_ORIGINAL_DST at SOL_IPV6 */

/* cgroup sock_addr verdicts */
#define AMB_PROCEED 1
#define AMB_REFUSE 0

/* Load-time settings, rewritten by the agent through aya's EbpfLoader::override_global. Defined
 * (with their defaults) once, in ambit.bpf.c; the linker resolves these declarations to it. */
extern const volatile __u32 cfg_out_mark;     /* SO_MARK of the agent's outbound sockets */
extern const volatile __u32 cfg_deliver_mark; /* SO_MARK of the agent's delivery sockets */
extern const volatile __u16 cfg_outbound_port;
extern const volatile __u16 cfg_inbound_port;
extern const volatile __u16 cfg_tunnel_port;
/* sk_lookup only: the netns cookie of the one pod this copy of lookup_steer is attached to. The
 * kernel has no bpf_get_netns_cookie for sk_lookup (6.1 to 6.18), so the agent loads one copy of
 * the program per enrolled pod with its cookie set here. */
extern const volatile __u64 cfg_netns_cookie;

/* Addresses, host order (compare with bpf_htonl()). Captured connects go to the agent's outbound
 * listener on 127.0.0.1 (connect4; connect6 as ::ffff:127.0.0.1 for a v4-mapped destination) or
 * on ::1 (connect6): three zero words, then AMB_IP6_LOOPBACK_LAST. */
#define AMB_IP4_LOOPBACK 0x7f000001      /* 127.0.0.1 */
#define AMB_IP4_LOOPBACK_NET 0x7f000000  /* 127.0.0.0/8 ... */
#define AMB_IP4_LOOPBACK_MASK 0xff000000 /* ... */
#define AMB_IP6_LOOPBACK_LAST 0x00000001 /* last word of ::1 */
#define AMB_IP6_V4_MAPPED 0x0000ffff     /* word 2 of ::ffff:a.b.c.d (a.b.c.d in word 3) */

static __always_inline void stat_inc(enum amb_stat stat)
{
	__u32 idx = stat;
	__u64 *v = bpf_map_lookup_elem(&amb_stats, &idx);

	if (v)
		*v += 1; /* per-CPU slot: no atomics needed */
}

static __always_inline struct amb_pod_stats *pod_stats(__u64 netns_cookie)
{
	return bpf_map_lookup_elem(&amb_pod_stats, &netns_cookie);
}

#define POD_STAT_ADD(ps, field)                                                                    \
	do {                                                                                       \
		if (ps)                                                                            \
			__sync_fetch_and_add(&(ps)->field, 1);                                     \
	} while (0)

static __always_inline void emit_event(enum amb_event_kind kind, __u64 netns_cookie, __u32 pod_id,
				       __u8 family, const __be32 addr[4], __be16 port)
{
	struct amb_event *e = bpf_ringbuf_reserve(&amb_events, sizeof(*e), 0);

	if (!e) {
		stat_inc(AMB_STAT_EVENTS_LOST);
		return;
	}
	e->netns_cookie = netns_cookie;
	e->addr[0] = addr[0];
	e->addr[1] = addr[1];
	e->addr[2] = addr[2];
	e->addr[3] = addr[3];
	e->port = port;
	e->family = family;
	e->kind = kind;
	e->pod_id = pod_id;
	bpf_ringbuf_submit(e, 0);
}

/* Is the calling task one of the agents (its cgroup listed in amb_agent_cgs)? A pod cannot move
 * its processes into an agent's cgroup, unlike SO_MARK, which needs only CAP_NET_RAW. */
static __always_inline int is_agent_task(void)
{
	__u64 cg = bpf_get_current_cgroup_id();

	return bpf_map_lookup_elem(&amb_agent_cgs, &cg) != 0;
}

static __always_inline int is_agent_port(__u16 port)
{
	return port == cfg_outbound_port || port == cfg_inbound_port || port == cfg_tunnel_port;
}

static __always_inline int is_v4_mapped(const __be32 a[4])
{
	return a[0] == 0 && a[1] == 0 && a[2] == bpf_htonl(AMB_IP6_V4_MAPPED);
}

/* 127.0.0.0/8. */
static __always_inline int is_loopback4(__be32 a)
{
	return (a & bpf_htonl(AMB_IP4_LOOPBACK_MASK)) == bpf_htonl(AMB_IP4_LOOPBACK_NET);
}

/* ::1, or a v4-mapped 127.0.0.0/8 address. */
static __always_inline int is_loopback6(const __be32 a[4])
{
	if (is_v4_mapped(a))
		return is_loopback4(a[3]);
	return a[0] == 0 && a[1] == 0 && a[2] == 0 && a[3] == bpf_htonl(AMB_IP6_LOOPBACK_LAST);
}

/* 0.0.0.0 */
static __always_inline int is_unspecified4(__be32 a)
{
	return a == 0;
}

/* :: */
static __always_inline int is_unspecified6(const __be32 a[4])
{
	return a[0] == 0 && a[1] == 0 && a[2] == 0 && a[3] == 0;
}

#endif /* AMB_COMMON_H */
