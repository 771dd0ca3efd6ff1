/* maps.h: map definitions of the ambit kernel programs; layouts come from ambit_maps.h. */
#ifndef AMB_MAPS_H
#define AMB_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "../include/ambit_maps.h"

/* Every map is pinned by name under the agent's per-instance bpffs directory, so that the
 * programs keep capturing (and fail closed) across an agent restart and the new agent finds
 * the state of connections already open.
 *
 * Every compilation unit (*.bpf.c) includes this header, so each definition is __weak: libbpf's
 * static linker (`bpftool gen object`, agent/build.rs) keeps one map per name in the object the
 * agent embeds, and refuses to link definitions that differ. */

/* netns cookie -> amb_pod. Writer: agent (enroll). Readers: connect4/6. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, AMB_MAX_PODS);
	__type(key, __u64);
	__type(value, struct amb_pod);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} amb_pods SEC(".maps") __weak;

/* netns cookie -> amb_pod_stats. Writer: agent (create/delete), every hook (atomic adds). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, AMB_MAX_PODS);
	__type(key, __u64);
	__type(value, struct amb_pod_stats);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} amb_pod_stats SEC(".maps") __weak;

/* cgroup id -> the pid of the agent that added it (for `bpftool map dump`). The cgroups whose
 * tasks are the agent: an agent mark (SO_MARK) exempts a socket from capture only when the task
 * connecting it is in one of them, and only they may bind the agent's ports in a pod. A map, not
 * a load-time constant: during a restart hand-over the old agent's pinned programs run beside
 * the new agent's, and in Kubernetes the new agent lives in another cgroup. Writers: each agent
 * (adds itself at start; removes entries whose cgroup is gone or empty). Readers: connect4/6,
 * bind4/6. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, AMB_MAX_AGENT_CGROUPS);
	__type(key, __u64);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} amb_agent_cgs SEC(".maps") __weak;

/* destination address -> AMB_MESH_DST_*: where mesh-only pods' connects must go through the
 * agent. Writer: agent (every inventory change). Readers: connect4/6. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, AMB_MAX_MESH_DSTS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct amb_addr_key);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} amb_mesh_dsts SEC(".maps") __weak;

/* socket cookie -> original destination. Writer: connect4/6. Readers: sockops (re-key),
 * getpeername4/6. Deleted by sockops when the socket closes; LRU as a backstop. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, AMB_MAX_CONNS);
	__type(key, __u64);
	__type(value, struct amb_orig_dst);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} amb_orig_dst SEC(".maps") __weak;

/* captured client tuple -> original destination. Writer: sockops (established; deleted on
 * close). Readers: the agent, cgroup/getsockopt. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, AMB_MAX_CONNS);
	__type(key, struct amb_conn_key);
	__type(value, struct amb_orig_dst);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} amb_conns SEC(".maps") __weak;

/* (netns cookie, family) -> the pod's inbound plaintext listener. Writer: agent. Reader: sk_lookup. */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, AMB_MAX_PODS * 2);
	__type(key, struct amb_listener_key);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} amb_listeners SEC(".maps") __weak;

/* the agent's own delivery connections. Writer: agent. Reader: sk_lookup. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, AMB_MAX_CONNS);
	__type(key, struct amb_bypass_key);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} amb_bypass SEC(".maps") __weak;

/* enum amb_stat -> count. Writers: every hook. Reader: agent (sums the CPUs). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, AMB_STAT_COUNT);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} amb_stats SEC(".maps") __weak;

/* notable events (struct amb_event). Writers: every hook. Reader: agent -> tracing. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 16);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} amb_events SEC(".maps") __weak;

#endif /* AMB_MAPS_H */
