/* lookup.bpf.c: sk_lookup steers all inbound TCP in an enrolled pod's netns to the agent. */
#include "common.h"

/*
 * Attached to one pod's network namespace, with that namespace's cookie in cfg_netns_cookie (one
 * copy of the program per pod). Every new inbound TCP connection to any local address of the
 * namespace (the pod IPs, but also its link-local and any address added at run time, which no
 * inventory lists) goes to the agent: the tunnel port to the agent's HBONE listener by the normal
 * lookup, everything else to the pod's 15006 plaintext listener, where PeerAuthentication and
 * AuthorizationPolicy decide. Left alone: loopback (the pod talking to itself) and the agent's
 * own deliveries to the app (amb_bypass, exact tuples the agent registers). No listener: drop.
 */
SEC("sk_lookup")
int lookup_steer(struct bpf_sk_lookup *ctx)
{
	/* Read every ctx field up front: clang merges per-branch loads of "the same" field into
	 * one variable-offset ctx load, which the verifier rejects (seen on 6.18). */
	__u32 protocol = ctx->protocol, family = ctx->family, lport = ctx->local_port;
	__be32 r4 = ctx->remote_ip4, l4 = ctx->local_ip4;
	__be32 r6a = ctx->remote_ip6[0], r6b = ctx->remote_ip6[1], r6c = ctx->remote_ip6[2],
	       r6d = ctx->remote_ip6[3];
	__be32 l6a = ctx->local_ip6[0], l6b = ctx->local_ip6[1], l6c = ctx->local_ip6[2],
	       l6d = ctx->local_ip6[3];
	__be16 rport = (__be16)ctx->remote_port; /* network order; local_port is host order */
	__u64 ns = cfg_netns_cookie;
	__be32 local[4] = {};
	struct amb_bypass_key bk = {};
	struct amb_listener_key lk = {};
	struct amb_pod_stats *ps;
	struct bpf_sock *sk;
	long err;

	if (protocol != IPPROTO_TCP)
		return SK_PASS;
	/* Loopback only: a SYN's local address is never unspecified (a connect to 0.0.0.0 or ::
	 * leaves as 127.0.0.1 or ::1), and one that were would be steered, not left alone. */
	if (family == AMB_AF_INET) {
		if (is_loopback4(l4))
			return SK_PASS;
		local[0] = l4;
		bk.remote[0] = r4;
	} else if (family == AMB_AF_INET6) {
		__be32 l6[4] = {l6a, l6b, l6c, l6d};

		if (is_loopback6(l6))
			return SK_PASS;
		local[0] = l6a;
		local[1] = l6b;
		local[2] = l6c;
		local[3] = l6d;
		bk.remote[0] = r6a;
		bk.remote[1] = r6b;
		bk.remote[2] = r6c;
		bk.remote[3] = r6d;
	} else {
		return SK_PASS;
	}
	ps = pod_stats(ns);
	if (lport == cfg_tunnel_port) {
		stat_inc(AMB_STAT_LOOKUP_TUNNEL_PORT);
		return SK_PASS;
	}
	bk.local[0] = local[0];
	bk.local[1] = local[1];
	bk.local[2] = local[2];
	bk.local[3] = local[3];
	bk.remote_port = rport;
	bk.local_port = bpf_htons(lport);
	bk.family = family;
	if (bpf_map_lookup_elem(&amb_bypass, &bk)) {
		stat_inc(AMB_STAT_LOOKUP_BYPASS);
		POD_STAT_ADD(ps, bypassed);
		return SK_PASS;
	}
	lk.netns_cookie = ns;
	lk.family = family;
	sk = bpf_map_lookup_elem(&amb_listeners, &lk);
	if (!sk) {
		/* Enrolled but the agent is not listening (stopped, restarting): fail closed. */
		stat_inc(AMB_STAT_LOOKUP_NO_LISTENER);
		POD_STAT_ADD(ps, dropped);
		emit_event(AMB_EVENT_NO_LISTENER, ns, 0, family, local, bpf_htons(lport));
		return SK_DROP;
	}
	/* REPLACE: during an agent restart two sk_lookup programs (old and new link) run on the
	 * netns; the second would otherwise fail with -EEXIST and drop the SYN. */
	err = bpf_sk_assign(ctx, sk, BPF_SK_LOOKUP_F_REPLACE);
	bpf_sk_release(sk);
	if (err) {
		stat_inc(AMB_STAT_LOOKUP_ASSIGN_FAIL);
		POD_STAT_ADD(ps, dropped);
		emit_event(AMB_EVENT_ASSIGN_FAIL, ns, 0, family, local, bpf_htons(lport));
		return SK_DROP;
	}
	stat_inc(AMB_STAT_LOOKUP_STEER);
	POD_STAT_ADD(ps, steered);
	return SK_PASS;
}
