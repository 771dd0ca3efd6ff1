//! The eBPF datapath: load, pin and attach the kernel programs; enroll pods; read counters.
pub mod maps;

/// The kernel programs, compiled from agent-ebpf by build.rs.
pub static BPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ambit.bpf.o"));

/// Program (C function) names in the object.
pub const PROGRAMS: &[&str] =
    &["connect4", "connect6", "getpeername4", "getpeername6", "sockops_est", "getsockopt_orig", "lookup_steer"];
