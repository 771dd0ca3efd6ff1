//! Compiles each kernel program unit (agent-ebpf/src/*.bpf.c) with clang and links them into one object.
use std::env;
use std::io::ErrorKind;
use std::path::PathBuf;
use std::process::{Command, ExitStatus};

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
    println!("cargo:rerun-if-env-changed=AMBIT_BPFTOOL");

    // Every `*.bpf.c` is a compilation unit of its own (the maps are `__weak` definitions in
    // maps.h, the load-time settings `extern` in common.h) and finds the shared header by a
    // relative include, so each one also compiles alone, with agent-ebpf/src/compile_flags.txt.
    let mut sources: Vec<PathBuf> = std::fs::read_dir(&src)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", src.display()))
        .map(|entry| entry.expect("read agent-ebpf/src entry").path())
        .filter(|p| p.to_str().is_some_and(|s| s.ends_with(".bpf.c")))
        .collect();
    sources.sort();
    assert!(!sources.is_empty(), "no *.bpf.c in {}", src.display());

    let clang = env::var("AMBIT_CLANG").unwrap_or_else(|_| "clang-19".to_string());
    let units_dir = out.join("units");
    std::fs::create_dir_all(&units_dir).expect("create OUT_DIR/units");
    let mut units = Vec::new();
    for source in &sources {
        let name = source.file_name().expect("a file").to_string_lossy();
        let unit = units_dir.join(name.replace(".bpf.c", ".bpf.o"));
        let status = Command::new(&clang)
            .args(["-target", "bpf", "-g", "-O2", "-Wall", "-Werror", "-c"])
            .arg(source)
            .arg("-o")
            .arg(&unit)
            .status()
            .unwrap_or_else(|e| {
                panic!("cannot run {clang} to build the kernel programs ({e}); install clang-19 (cargo xtask installs it as root)")
            });
        assert!(
            status.success(),
            "{clang} failed to compile {}",
            source.display()
        );
        units.push(unit);
    }

    // libbpf's static linker: one object, one map per name (it refuses weak definitions that
    // differ), the units' BTF merged and deduplicated. The agent embeds it.
    let obj = out.join("ambit.bpf.o");
    let (bpftool, status) = run_bpftool(|cmd| {
        cmd.args(["gen", "object"]).arg(&obj).args(&units);
    });
    assert!(
        status.success(),
        "{} gen object failed to link the kernel programs into {}",
        bpftool.display(),
        obj.display()
    );
}

/// Runs bpftool (`AMBIT_BPFTOOL`, else `bpftool` from PATH, else Debian's `/usr/sbin/bpftool`,
/// which a non-root user's PATH often lacks) with the arguments `args` adds.
fn run_bpftool(args: impl Fn(&mut Command)) -> (PathBuf, ExitStatus) {
    let candidates: Vec<PathBuf> = match env::var_os("AMBIT_BPFTOOL") {
        Some(path) => vec![path.into()],
        None => vec!["bpftool".into(), "/usr/sbin/bpftool".into()],
    };
    for tool in &candidates {
        let mut cmd = Command::new(tool);
        args(&mut cmd);
        match cmd.status() {
            Ok(status) => return (tool.clone(), status),
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(e) => panic!("cannot run {}: {e}", tool.display()),
        }
    }
    panic!(
        "cannot find bpftool (tried {}) to link the kernel programs; install bpftool (cargo xtask installs it as root) or set AMBIT_BPFTOOL",
        candidates
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
}
