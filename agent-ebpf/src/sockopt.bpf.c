/* sockopt.bpf.c: cgroup/getsockopt answers SO_ORIGINAL_DST on the agent's accepted sockets. */
#include "common.h"

struct amb_sockaddr_in {
	__u16 family;
	__be16 port;
	__be32 addr;
	__u8 zero[8];
};

struct amb_sockaddr_in6 {
	__u16 family;
	__be16 port;
	__u32 flowinfo;
	__be32 addr[4];
	__u32 scope_id;
};

SEC("cgroup/getsockopt")
int getsockopt_orig(struct bpf_sockopt *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	struct amb_conn_key k = {};
	struct amb_orig_dst *od;
	__u32 family;

	if (ctx->optname != SO_ORIGINAL_DST || (ctx->level != SOL_IP && ctx->level != SOL_IPV6))
		return 1;
	if (!sk || sk->src_port != cfg_outbound_port)
		return 1;
	family = sk->family;
	k.netns_cookie = bpf_get_netns_cookie(ctx);
	k.port = (__be16)sk->dst_port; /* the peer's port, network order like the key's */
	if (family == AMB_AF_INET) {
		k.family = AMB_AF_INET;
		k.addr[0] = sk->dst_ip4;
	} else {
		k.family = AMB_AF_INET6;
		k.addr[0] = sk->dst_ip6[0];
		k.addr[1] = sk->dst_ip6[1];
		k.addr[2] = sk->dst_ip6[2];
		k.addr[3] = sk->dst_ip6[3];
	}
	od = bpf_map_lookup_elem(&amb_conns, &k);
	if (!od) {
		stat_inc(AMB_STAT_GETSOCKOPT_MISS);
		return 1;
	}
	if (od->family == AMB_AF_INET) {
		struct amb_sockaddr_in *sin = ctx->optval;

		if ((void *)(sin + 1) > ctx->optval_end)
			return 1;
		sin->family = AMB_AF_INET;
		sin->port = od->port;
		sin->addr = od->addr[0];
		*(volatile __s32 *)&ctx->optlen = sizeof(*sin); /* volatile: the verifier rejects */
		*(volatile __s32 *)&ctx->retval = 0;            /* a merged 64-bit ctx store */
	} else {
		struct amb_sockaddr_in6 *sin6 = ctx->optval;

		if ((void *)(sin6 + 1) > ctx->optval_end)
			return 1;
		sin6->family = AMB_AF_INET6;
		sin6->port = od->port;
		sin6->flowinfo = 0;
		sin6->addr[0] = od->addr[0];
		sin6->addr[1] = od->addr[1];
		sin6->addr[2] = od->addr[2];
		sin6->addr[3] = od->addr[3];
		sin6->scope_id = 0;
		*(volatile __s32 *)&ctx->optlen = sizeof(*sin6);
		*(volatile __s32 *)&ctx->retval = 0;
	}
	stat_inc(AMB_STAT_GETSOCKOPT_ANSWERED);
	return 1;
}
