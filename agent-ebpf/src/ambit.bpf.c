/* ambit.bpf.c: the one compilation unit of ambit's kernel programs (one object, shared maps). */
/*
 * Each hook lives in its own file; they are included here so that all programs share one set of
 * maps and load-time settings (cfg_*) in a single ELF object that the agent embeds.
 */
#include "common.h"

#include "connect.bpf.c"
#include "sockops.bpf.c"
#include "sockopt.bpf.c"
#include "lookup.bpf.c"
#include "bind.bpf.c"

char LICENSE[] SEC("license") = "GPL";
