/* layout_probe.c: prints size and field offsets of ambit_maps.h for the Rust mirror test. */
#include <stddef.h>
#include <stdio.h>

#include "ambit_maps.h"

#define S(t) printf("%s size %zu\n", #t, sizeof(struct t))
#define F(t, f) printf("%s.%s %zu %zu\n", #t, #f, offsetof(struct t, f), sizeof(((struct t *)0)->f))

int main(void)
{
	S(amb_cidr);
	F(amb_cidr, addr);
	F(amb_cidr, family);
	F(amb_cidr, prefix_len);
	S(amb_pod);
	F(amb_pod, id);
	F(amb_pod, flags);
	F(amb_pod, skip_ports);
	F(amb_pod, skip_cidrs);
	S(amb_pod_stats);
	F(amb_pod_stats, redirected);
	F(amb_pod_stats, exempted);
	F(amb_pod_stats, steered);
	F(amb_pod_stats, bypassed);
	F(amb_pod_stats, dropped);
	F(amb_pod_stats, bind_denied);
	F(amb_pod_stats, passthrough);
	F(amb_pod_stats, forged_mark);
	S(amb_orig_dst);
	F(amb_orig_dst, addr);
	F(amb_orig_dst, port);
	F(amb_orig_dst, family);
	S(amb_conn_key);
	F(amb_conn_key, netns_cookie);
	F(amb_conn_key, addr);
	F(amb_conn_key, port);
	F(amb_conn_key, family);
	S(amb_addr_key);
	F(amb_addr_key, addr);
	F(amb_addr_key, family);
	S(amb_listener_key);
	F(amb_listener_key, netns_cookie);
	F(amb_listener_key, family);
	S(amb_bypass_key);
	F(amb_bypass_key, remote);
	F(amb_bypass_key, local);
	F(amb_bypass_key, remote_port);
	F(amb_bypass_key, local_port);
	F(amb_bypass_key, family);
	S(amb_event);
	F(amb_event, netns_cookie);
	F(amb_event, addr);
	F(amb_event, port);
	F(amb_event, family);
	F(amb_event, kind);
	F(amb_event, pod_id);
	printf("AMB_STAT_MAX %d\n", AMB_STAT_MAX);
	printf("AMB_MAX_SKIP_PORTS %d\n", AMB_MAX_SKIP_PORTS);
	printf("AMB_MAX_SKIP_CIDRS %d\n", AMB_MAX_SKIP_CIDRS);
	printf("AMB_MAX_MESH_DSTS %d\n", AMB_MAX_MESH_DSTS);
	printf("AMB_MAX_AGENT_CGROUPS %d\n", AMB_MAX_AGENT_CGROUPS);
	printf("AMB_POD_F_MESH_ONLY %d\n", AMB_POD_F_MESH_ONLY);
	printf("AMB_MESH_DST_POD %d\n", AMB_MESH_DST_POD);
	printf("AMB_MESH_DST_VIP %d\n", AMB_MESH_DST_VIP);
	printf("AMB_MESH_DST_ALL %d\n", AMB_MESH_DST_ALL);
	return 0;
}
