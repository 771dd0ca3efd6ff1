//! The host-built pieces of the VM: the e2e test binaries, the static init, stripped copies.
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::cargo;

/// The Rust target the init is built for (statically, with glibc's `crt-static`).
const INIT_TARGET: &str = "x86_64-unknown-linux-gnu";

/// One test executable of the `ambit-e2e` package.
#[derive(Debug, Clone)]
pub(crate) struct TestBinary {
    /// The test target's name: `e2e` (tests/tests/e2e), or `ambit_testbed` for the library's unit tests.
    pub(crate) name: String,
    pub(crate) path: PathBuf,
}

/// Builds the `ambit-e2e` tests the way `cargo xtask test` does (so CI reuses that build) and
/// returns their executables.
pub(crate) fn e2e_tests() -> Result<Vec<TestBinary>> {
    eprintln!("==> building the end-to-end tests (cargo test -p ambit-e2e --no-run)");
    let out = cargo::command()
        .args([
            "test",
            "-p",
            "ambit-e2e",
            "--no-run",
            "--message-format=json",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("starting cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the end-to-end tests failed ({})", out.status);
    }
    let mut tests = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" || msg["profile"]["test"] != true {
            continue;
        }
        let (Some(exe), Some(name)) = (msg["executable"].as_str(), msg["target"]["name"].as_str())
        else {
            continue;
        };
        tests.push(TestBinary {
            name: name.to_string(),
            path: PathBuf::from(exe),
        });
    }
    if tests.is_empty() {
        bail!("cargo built no test executables for ambit-e2e");
    }
    tests.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(tests)
}

/// How many tests of `bin` the libtest arguments `args` select (`--list`, run on the host).
pub(crate) fn count_selected(bin: &TestBinary, args: &[String]) -> Result<usize> {
    let out = Command::new(&bin.path)
        .args(["--list", "--format", "terse"])
        .args(args)
        .output()
        .with_context(|| format!("running {} --list", bin.path.display()))?;
    if !out.status.success() {
        bail!(
            "{} --list {}: {}",
            bin.name,
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.ends_with(": test"))
        .count())
}

/// Builds the agent with `--release` and returns the path of its `ambit` binary.
pub(crate) fn release_agent() -> Result<PathBuf> {
    eprintln!("==> building the agent (cargo build --release -p ambit-agent)");
    cargo::run(&["build", "--release", "-p", "ambit-agent"])?;
    Ok(cargo::target_dir().join("release").join("ambit"))
}

/// Builds the VM's init (`xtask/vm-init`) as a static executable and returns its path.
pub(crate) fn init() -> Result<PathBuf> {
    eprintln!("==> building the VM init (static, {INIT_TARGET})");
    // `--target` keeps the flags away from build scripts and proc macros; crt-static links
    // glibc statically (no musl target needed).
    let status = cargo::command()
        .args([
            "build",
            "--quiet",
            "--release",
            "-p",
            "ambit-vm-init",
            "--target",
            INIT_TARGET,
        ])
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .status()
        .context("starting cargo build -p ambit-vm-init")?;
    if !status.success() {
        bail!("building the VM init failed ({status})");
    }
    let bin = cargo::target_dir()
        .join(INIT_TARGET)
        .join("release")
        .join("ambit-vm-init");
    if !super::initramfs::ldd(&bin)?.is_empty() {
        bail!("{} is not statically linked", bin.display());
    }
    Ok(bin)
}

/// A copy of `src` without debug info in `dir` (the e2e binaries are ~230 MB with it, ~40 MB
/// without), reused while it is newer than `src`. Symbols stay, so backtraces name functions.
pub(crate) fn stripped(src: &Path, dir: &Path) -> Result<PathBuf> {
    let name = src.file_name().context("binary path without a file name")?;
    let out = dir.join(name);
    let fresh = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).ok();
    if let (Some(have), Some(want)) = (fresh(&out), fresh(src)) {
        if have >= want {
            return Ok(out);
        }
    }
    fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    let status = Command::new("objcopy")
        .arg("--strip-debug")
        .arg(src)
        .arg(&tmp)
        .status()
        .context("running objcopy (Debian package binutils)")?;
    if !status.success() {
        bail!("objcopy --strip-debug {} failed ({status})", src.display());
    }
    fs::rename(&tmp, &out)?;
    Ok(out)
}
