//! Compiles the kernel programs (agent-ebpf) with clang and probes the C layout of the shared header.
use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let root =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"))
            .join("../agent-ebpf");
    let include = root.join("include");
    let src = root.join("src");
    for dir in [&include, &src] {
        println!("cargo:rerun-if-changed={}", dir.display());
    }
    println!("cargo:rerun-if-env-changed=AMBIT_CLANG");

    let clang = env::var("AMBIT_CLANG").unwrap_or_else(|_| "clang-19".to_string());
    let obj = out.join("ambit.bpf.o");
    let status = Command::new(&clang)
        .args(["-target", "bpf", "-g", "-O2", "-Wall", "-Werror"])
        .arg(format!("-I{}", include.display()))
        .arg("-c")
        .arg(src.join("ambit.bpf.c"))
        .arg("-o")
        .arg(&obj)
        .status()
        .unwrap_or_else(|e| {
            panic!("cannot run {clang} to build the kernel programs ({e}); install clang-19 (cargo xtask installs it as root)")
        });
    assert!(
        status.success(),
        "{clang} failed to compile agent-ebpf/src/ambit.bpf.c"
    );

    // Layout probe: the host C compiler prints size and offset of every field of the shared
    // structs; the `maps` unit test compares them with the Rust mirror.
    let probe_src = root.join("include/layout_probe.c");
    let probe_bin = out.join("layout_probe");
    let cc = env::var("CC").unwrap_or_else(|_| "cc".to_string());
    let status = Command::new(&cc)
        .arg(format!("-I{}", include.display()))
        .arg(&probe_src)
        .arg("-o")
        .arg(&probe_bin)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cc} for the layout probe: {e}"));
    assert!(
        status.success(),
        "{cc} failed to compile {}",
        probe_src.display()
    );
    let output = Command::new(&probe_bin).output().expect("run layout probe");
    assert!(output.status.success(), "layout probe failed");
    std::fs::write(out.join("layout.txt"), output.stdout).expect("write layout.txt");
}
