/* connect.bpf.c: cgroup/connect4+6 capture enrolled pods' outbound TCP; getpeername4+6 hide it. */
#include "common.h"

static __always_inline __be32 prefix_mask(int bits)
{
	if (bits <= 0)
		return 0;
	if (bits >= 32)
		return 0xffffffff;
	return bpf_htonl(0xffffffffu << (32 - bits));
}

/* A connect that stays in the pod's own stack: to a loopback address, or to the unspecified
 * address, which Linux connects to the local host (0.0.0.0 as 127.0.0.1, :: as ::1). */
static __always_inline int stays_local4(__be32 a)
{
	return is_loopback4(a) || is_unspecified4(a);
}

static __always_inline int stays_local6(const __be32 a[4])
{
	return is_loopback6(a) || is_unspecified6(a);
}

/* Is the destination in the pod's skip lists? `a` holds an IPv4 address in a[0] for AF_INET. */
static __always_inline int skipped(const struct amb_pod *pod, __u8 family, const __be32 a[4],
				   __be16 port, int *by_cidr)
{
	int i, w;

#pragma unroll
	for (i = 0; i < AMB_MAX_SKIP_PORTS; i++)
		if (pod->skip_ports[i] && pod->skip_ports[i] == port)
			return 1;
#pragma unroll
	for (i = 0; i < AMB_MAX_SKIP_CIDRS; i++) {
		const struct amb_cidr *c = &pod->skip_cidrs[i];
		int match = 1, words = family == AMB_AF_INET ? 1 : 4;

		if (c->family != family)
			continue;
#pragma unroll
		for (w = 0; w < 4; w++) {
			__be32 m = prefix_mask((int)c->prefix_len - 32 * w);

			if (w < words && (a[w] & m) != (c->addr[w] & m))
				match = 0;
		}
		if (match) {
			*by_cidr = 1;
			return 1;
		}
	}
	return 0;
}

/* Must a connect to this destination go through the agent? Yes if it is listed, or if the
 * wildcard entry (all-zero key) says the list is incomplete. */
static __always_inline int mesh_dst(__u8 family, const __be32 a[4])
{
	struct amb_addr_key k = {};

	k.family = family;
	k.addr[0] = a[0];
	k.addr[1] = a[1];
	k.addr[2] = a[2];
	k.addr[3] = a[3];
	if (bpf_map_lookup_elem(&amb_mesh_dsts, &k))
		return 1;
	__builtin_memset(&k, 0, sizeof(k));
	return bpf_map_lookup_elem(&amb_mesh_dsts, &k) != 0;
}

/* Decide for one connect(); on AMB_PROCEED with *redirect set, the caller rewrites the address. */
static __always_inline int capture(struct bpf_sock_addr *ctx, __u8 family, const __be32 dst[4],
				   __be16 dst_port_be, int local, int *redirect)
{
	__u64 ns = bpf_get_netns_cookie(ctx);
	struct amb_pod *pod = bpf_map_lookup_elem(&amb_pods, &ns);
	struct amb_pod_stats *ps;
	struct bpf_sock *sk = ctx->sk;
	__u16 port = bpf_ntohs(dst_port_be);
	int by_cidr = 0;
	__u64 cookie;
	struct amb_orig_dst od = {};

	*redirect = 0;
	if (!pod || !(pod->flags & AMB_POD_F_CAPTURE_OUT) || !sk)
		return AMB_PROCEED; /* not enrolled: untouched and not counted */
	ps = pod_stats(ns);
	if (sk->mark == cfg_out_mark || sk->mark == cfg_deliver_mark) {
		/* The agent's own sockets in the pod (tunnel dials, passthrough, deliveries). The mark
		 * alone proves nothing: any process with CAP_NET_RAW (a container default) can set
		 * it, so the connecting task must be in an agent's cgroup too. */
		if (is_agent_task()) {
			stat_inc(AMB_STAT_CONNECT_EXEMPT_MARK);
			POD_STAT_ADD(ps, exempted);
			return AMB_PROCEED;
		}
		/* A pod socket wearing the agent's mark: captured like any other, and reported. */
		stat_inc(AMB_STAT_CONNECT_FORGED_MARK);
		POD_STAT_ADD(ps, forged_mark);
		emit_event(AMB_EVENT_FORGED_MARK, ns, pod->id, family, dst, dst_port_be);
	}
	if (local) {
		stat_inc(AMB_STAT_CONNECT_EXEMPT_LOOPBACK);
		POD_STAT_ADD(ps, exempted);
		return AMB_PROCEED;
	}
	if (is_agent_port(port)) {
		stat_inc(AMB_STAT_CONNECT_EXEMPT_AGENT_PORT);
		POD_STAT_ADD(ps, exempted);
		emit_event(AMB_EVENT_AGENT_PORT, ns, pod->id, family, dst, dst_port_be);
		return AMB_PROCEED;
	}
	if (skipped(pod, family, dst, dst_port_be, &by_cidr)) {
		stat_inc(by_cidr ? AMB_STAT_CONNECT_EXEMPT_SKIP_CIDR : AMB_STAT_CONNECT_EXEMPT_SKIP_PORT);
		POD_STAT_ADD(ps, exempted);
		return AMB_PROCEED;
	}
	if ((pod->flags & AMB_POD_F_MESH_ONLY) && !mesh_dst(family, dst)) {
		/* Outside the mesh: the agent would only pass it through in plaintext from the
		 * pod's own address; the kernel does the same without the detour. */
		stat_inc(AMB_STAT_CONNECT_PASSTHROUGH);
		POD_STAT_ADD(ps, passthrough);
		return AMB_PROCEED;
	}
	cookie = bpf_get_socket_cookie(ctx);
	od.addr[0] = dst[0];
	od.addr[1] = dst[1];
	od.addr[2] = dst[2];
	od.addr[3] = dst[3];
	od.port = dst_port_be;
	od.family = family;
	if (bpf_map_update_elem(&amb_orig_dst, &cookie, &od, BPF_ANY)) {
		/* Fail closed: an enrolled pod never leaves uncaptured. */
		stat_inc(AMB_STAT_CONNECT_MAP_FULL);
		POD_STAT_ADD(ps, dropped);
		emit_event(AMB_EVENT_MAP_FULL, ns, pod->id, family, dst, dst_port_be);
		return AMB_REFUSE;
	}
	POD_STAT_ADD(ps, redirected);
	*redirect = 1;
	return AMB_PROCEED;
}

SEC("cgroup/connect4")
int connect4(struct bpf_sock_addr *ctx)
{
	__be32 dst[4] = {ctx->user_ip4, 0, 0, 0};
	int redirect, verdict;

	if (ctx->protocol != IPPROTO_TCP)
		return AMB_PROCEED;
	verdict = capture(ctx, AMB_AF_INET, dst, (__be16)ctx->user_port, stays_local4(dst[0]),
			  &redirect);
	if (redirect) {
		ctx->user_ip4 = bpf_htonl(AMB_IP4_LOOPBACK);
		ctx->user_port = bpf_htons(cfg_outbound_port);
		stat_inc(AMB_STAT_CONNECT4_REDIRECT);
	}
	return verdict;
}

SEC("cgroup/connect6")
int connect6(struct bpf_sock_addr *ctx)
{
	__be32 dst[4] = {ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3]};
	int redirect, verdict;

	if (ctx->protocol != IPPROTO_TCP)
		return AMB_PROCEED;
	if (is_v4_mapped(dst)) {
		/* A dual-stack socket dialling IPv4: record it as IPv4, the agent accepts it on the
		 * IPv4 listener. */
		__be32 dst4[4] = {dst[3], 0, 0, 0};

		verdict = capture(ctx, AMB_AF_INET, dst4, (__be16)ctx->user_port,
				  stays_local4(dst4[0]), &redirect);
		if (redirect) {
			ctx->user_ip6[3] = bpf_htonl(AMB_IP4_LOOPBACK);
			ctx->user_port = bpf_htons(cfg_outbound_port);
			stat_inc(AMB_STAT_CONNECT4_REDIRECT);
		}
		return verdict;
	}
	verdict = capture(ctx, AMB_AF_INET6, dst, (__be16)ctx->user_port, stays_local6(dst),
			  &redirect);
	if (redirect) {
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = 0;
		ctx->user_ip6[3] = bpf_htonl(AMB_IP6_LOOPBACK_LAST);
		ctx->user_port = bpf_htons(cfg_outbound_port);
		stat_inc(AMB_STAT_CONNECT6_REDIRECT);
	}
	return verdict;
}

SEC("cgroup/getpeername4")
int getpeername4(struct bpf_sock_addr *ctx)
{
	__u64 cookie;
	struct amb_orig_dst *od;

	if (ctx->user_ip4 != bpf_htonl(AMB_IP4_LOOPBACK) ||
	    ctx->user_port != bpf_htons(cfg_outbound_port))
		return 1;
	cookie = bpf_get_socket_cookie(ctx);
	od = bpf_map_lookup_elem(&amb_orig_dst, &cookie);
	if (!od || od->family != AMB_AF_INET)
		return 1;
	ctx->user_ip4 = od->addr[0];
	ctx->user_port = od->port;
	stat_inc(AMB_STAT_GETPEERNAME_REWRITE);
	return 1;
}

SEC("cgroup/getpeername6")
int getpeername6(struct bpf_sock_addr *ctx)
{
	__be32 a0 = ctx->user_ip6[0], a1 = ctx->user_ip6[1], a2 = ctx->user_ip6[2];
	__be32 a3 = ctx->user_ip6[3];
	__u64 cookie;
	struct amb_orig_dst *od;

	if (ctx->user_port != bpf_htons(cfg_outbound_port) || a0 || a1)
		return 1;
	if (!((a2 == 0 && a3 == bpf_htonl(AMB_IP6_LOOPBACK_LAST)) ||
	      (a2 == bpf_htonl(AMB_IP6_V4_MAPPED) && a3 == bpf_htonl(AMB_IP4_LOOPBACK))))
		return 1;
	cookie = bpf_get_socket_cookie(ctx);
	od = bpf_map_lookup_elem(&amb_orig_dst, &cookie);
	if (!od)
		return 1;
	if (od->family == AMB_AF_INET) {
		ctx->user_ip6[2] = bpf_htonl(AMB_IP6_V4_MAPPED);
		ctx->user_ip6[3] = od->addr[0];
	} else {
		ctx->user_ip6[0] = od->addr[0];
		ctx->user_ip6[1] = od->addr[1];
		ctx->user_ip6[2] = od->addr[2];
		ctx->user_ip6[3] = od->addr[3];
	}
	ctx->user_port = od->port;
	stat_inc(AMB_STAT_GETPEERNAME_REWRITE);
	return 1;
}
