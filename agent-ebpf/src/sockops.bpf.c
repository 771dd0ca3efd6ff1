/* sockops.bpf.c: re-key a captured socket's original destination by its tuple; clean up on close. */
#include "common.h"

#define AMB_TCP_CLOSE 7 /* BPF_TCP_CLOSE */

/* The client socket's local address, as the agent's accepted socket sees its peer. */
static __always_inline void conn_key(struct bpf_sock_ops *skops, struct amb_conn_key *k)
{
	__u32 family = skops->family;
	__be32 l4 = skops->local_ip4;
	__be32 a[4] = {skops->local_ip6[0], skops->local_ip6[1], skops->local_ip6[2],
		       skops->local_ip6[3]};

	k->netns_cookie = bpf_get_netns_cookie(skops);
	k->port = bpf_htons((__u16)skops->local_port); /* sock_ops has the local port in host order */
	if (family == AMB_AF_INET || is_v4_mapped(a)) {
		k->family = AMB_AF_INET;
		k->addr[0] = family == AMB_AF_INET ? l4 : a[3];
	} else {
		k->family = AMB_AF_INET6;
		k->addr[0] = a[0];
		k->addr[1] = a[1];
		k->addr[2] = a[2];
		k->addr[3] = a[3];
	}
}

SEC("sockops")
int sockops_est(struct bpf_sock_ops *skops)
{
	__u32 op = skops->op;
	__u64 cookie;
	struct amb_orig_dst *od;
	struct amb_conn_key k = {};

	if (op != BPF_SOCK_OPS_TCP_CONNECT_CB && op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB &&
	    op != BPF_SOCK_OPS_STATE_CB)
		return 1;
	cookie = bpf_get_socket_cookie(skops);
	od = bpf_map_lookup_elem(&amb_orig_dst, &cookie);
	if (!od)
		return 1;
	switch (op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		/* Ask for state callbacks so that the entries go when the socket closes, even if
		 * the handshake never completes. */
		bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags |
							 BPF_SOCK_OPS_STATE_CB_FLAG);
		break;
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB: {
		struct amb_orig_dst v = *od;

		conn_key(skops, &k);
		if (bpf_map_update_elem(&amb_conns, &k, &v, BPF_ANY))
			stat_inc(AMB_STAT_SOCKOPS_MAP_FULL);
		else
			stat_inc(AMB_STAT_SOCKOPS_REKEY);
		break;
	}
	case BPF_SOCK_OPS_STATE_CB:
		if (skops->args[1] != AMB_TCP_CLOSE)
			break;
		conn_key(skops, &k);
		bpf_map_delete_elem(&amb_conns, &k);
		bpf_map_delete_elem(&amb_orig_dst, &cookie);
		stat_inc(AMB_STAT_SOCKOPS_CLOSE);
		break;
	}
	return 1;
}
