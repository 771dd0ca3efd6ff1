/* ambit.bpf.c: what the object has once, outside any hook: license, load-time settings, ABI anchor. */
/*
 * Each hook is its own compilation unit (connect, bind, sockops, sockopt, lookup .bpf.c); agent/
 * build.rs compiles every *.bpf.c here and links them with libbpf's static linker (`bpftool gen
 * object`) into the one object the agent embeds. The maps are __weak definitions in maps.h, one
 * per name after linking; the cfg_* globals are declared extern in common.h and defined here.
 */
#include "common.h"

/* Defaults of the load-time settings (the agent overrides every one of them). */
const volatile __u32 cfg_out_mark = 0x539;
const volatile __u32 cfg_deliver_mark = 0x53a;
const volatile __u16 cfg_outbound_port = 15001;
const volatile __u16 cfg_inbound_port = 15006;
const volatile __u16 cfg_tunnel_port = 15008;
const volatile __u64 cfg_netns_cookie = 0;

/*
 * The object's BTF holds only the types that a map, a global or a program signature uses, and no
 * map uses the enums of ambit_maps.h or the ring-buffer record. This read-only global (never read)
 * names them, so that the agent's unit test (redirect/maps/tests.rs) finds the whole shared ABI in
 * the embedded object and compares it with the Rust mirror. It costs the object's .rodata map
 * sizeof(amb_abi) bytes.
 */
const struct {
	enum amb_family family;
	enum amb_pod_flag pod_flag;
	enum amb_mesh_dst mesh_dst;
	enum amb_stat stat;
	enum amb_event_kind event_kind;
	struct amb_event event;
} amb_abi = {};

char LICENSE[] SEC("license") = "GPL";
