/* bind.bpf.c: cgroup/bind4+6 keep enrolled pods off the agent's ports inside their netns. */
#include "common.h"

/*
 * The agent listens on its ports (outbound, inbound plaintext, tunnel) inside every enrolled
 * pod's network namespace. A pod process that bound one of them first (or while the agent is
 * down) would receive connections meant for the agent: captured app traffic on 15001/15006, or
 * other agents' HBONE on 15008. So a TCP bind to an agent port in an enrolled pod's netns is
 * refused with EPERM, on any address, unless the binding task is in an agent's cgroup
 * (amb_agent_cgs, shared by the old and the new agent during a restart). The link is pinned like
 * the others: the guard stays while the agent restarts.
 */
static __always_inline int bind_guard(struct bpf_sock_addr *ctx, __u8 family, const __be32 a[4])
{
	__u64 ns = bpf_get_netns_cookie(ctx);
	__u16 port = bpf_ntohs((__u16)ctx->user_port);
	struct amb_pod_stats *ps;
	struct amb_pod *pod;

	if (ctx->protocol != IPPROTO_TCP || !is_agent_port(port))
		return AMB_PROCEED;
	pod = bpf_map_lookup_elem(&amb_pods, &ns);
	if (!pod)
		return AMB_PROCEED; /* not enrolled: the pod owns every port */
	/* The agent's own listeners: it is in its cgroup before it opens any socket. */
	if (is_agent_task())
		return AMB_PROCEED;
	stat_inc(AMB_STAT_BIND_DENIED);
	ps = pod_stats(ns);
	POD_STAT_ADD(ps, bind_denied);
	emit_event(AMB_EVENT_BIND_DENIED, ns, pod->id, family, a, (__be16)ctx->user_port);
	return AMB_REFUSE; /* bind() fails with EPERM */
}

SEC("cgroup/bind4")
int bind4(struct bpf_sock_addr *ctx)
{
	__be32 a[4] = {ctx->user_ip4, 0, 0, 0};

	return bind_guard(ctx, AMB_AF_INET, a);
}

SEC("cgroup/bind6")
int bind6(struct bpf_sock_addr *ctx)
{
	__be32 a[4] = {ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3]};

	return bind_guard(ctx, AMB_AF_INET6, a);
}
