//! `cargo xtask fuzz`: builds the libFuzzer targets in fuzz/ and runs each for a given time on its committed seed corpus.
//!
//! With a nightly toolchain the targets are built with AddressSanitizer; without one (CI has only
//! the stable toolchain) they are built on the running toolchain with libFuzzer's coverage
//! instrumentation and no sanitizer. Either way the build is a plain `cargo build` with the
//! RUSTFLAGS `cargo fuzz build` uses (cargo-fuzz 0.13), so neither cargo-fuzz nor any unstable
//! flag is needed on stable; `cargo fuzz run`/`tmin` work on the same project by hand.
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::cargo::{remove_cargo_run_env, workspace_root};

/// The targets under fuzz/fuzz_targets.
pub(crate) const TARGETS: &[&str] = &[
    "inventory_yaml",
    "svid_der",
    "cni_plugin",
    "admin_query",
    "hbone_h2",
];

/// `cargo xtask fuzz`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Seconds per target.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Build on the running (stable) toolchain without AddressSanitizer even when a nightly
    /// toolchain is installed.
    #[arg(long)]
    no_sanitizer: bool,
    /// Targets to run (default: all).
    targets: Vec<String>,
}

/// How the targets are built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// `cargo +nightly build` with `-Zsanitizer=address`, into fuzz/target (cargo-fuzz's
    /// default directory, so `cargo fuzz run` reuses the build).
    NightlyAsan,
    /// The running toolchain, coverage instrumentation only, into fuzz/target/stable.
    Stable,
}

/// One target's run.
struct Outcome {
    target: String,
    ok: bool,
    secs: u64,
    /// libFuzzer's "Done N runs in S second(s)" line, when it got that far.
    runs: Option<u64>,
}

/// Builds the targets, then runs each; a crash, timeout or out-of-memory fails the command and
/// leaves the input in fuzz/artifacts/<target>/.
pub(crate) fn run(args: &Args) -> Result<ExitCode> {
    let fuzz_dir = workspace_root().join("fuzz");
    let targets: Vec<&str> = if args.targets.is_empty() {
        TARGETS.to_vec()
    } else {
        for t in &args.targets {
            if !TARGETS.contains(&t.as_str()) {
                bail!("unknown fuzz target {t} (known: {})", TARGETS.join(", "));
            }
        }
        args.targets.iter().map(String::as_str).collect()
    };
    let mode = if !args.no_sanitizer && nightly_installed() {
        eprintln!("==> nightly toolchain found: building the fuzz targets with AddressSanitizer");
        Mode::NightlyAsan
    } else {
        eprintln!(
            "==> {}: building the fuzz targets on {} without a sanitizer \
             (libFuzzer coverage instrumentation, debug assertions)",
            if args.no_sanitizer {
                "--no-sanitizer"
            } else {
                "no nightly toolchain"
            },
            rustc_version(Mode::Stable)?
        );
        Mode::Stable
    };
    let bin_dir = build(&fuzz_dir, mode)?;
    let mut report = Vec::new();
    for t in targets {
        report.push(run_target(&fuzz_dir, &bin_dir, mode, t, args.seconds)?);
    }
    eprintln!();
    eprintln!(
        "fuzzing ({}):",
        match mode {
            Mode::NightlyAsan => "nightly, AddressSanitizer",
            Mode::Stable => "stable, no sanitizer",
        }
    );
    for o in &report {
        let runs = o.runs.map_or_else(
            || "-".to_string(),
            |r| format!("{r} runs, {} exec/s", r / o.secs.max(1)),
        );
        eprintln!(
            "  {:<16} {:<8} {:>5} s  {runs}",
            o.target,
            if o.ok { "ok" } else { "FAILED" },
            o.secs
        );
    }
    let failed = report.iter().filter(|o| !o.ok).count();
    println!("{} passed, {failed} failed", report.len() - failed);
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Whether rustup has a nightly toolchain (asked without installing anything).
fn nightly_installed() -> bool {
    Command::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .is_ok_and(|o| {
            o.status.success()
                && String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .any(|l| l.starts_with("nightly"))
        })
}

/// The `+toolchain` argument for `cargo`/`rustc`, if any (stable: the one running xtask).
fn mode_toolchain(mode: Mode) -> Option<&'static str> {
    match mode {
        Mode::NightlyAsan => Some("+nightly"),
        Mode::Stable => None,
    }
}

/// A `cargo`/`rustc` command through rustup's proxy, without the variables `cargo run` set for
/// xtask (build scripts that read them would rebuild when `cargo fuzz` is used by hand).
fn tool(name: &str, mode: Mode) -> Command {
    let mut c = Command::new(name);
    c.args(mode_toolchain(mode));
    remove_cargo_run_env(&mut c);
    // fuzz/ builds into its own target directory.
    c.env_remove("CARGO_TARGET_DIR");
    c
}

/// `rustc --version` of the toolchain `mode` builds with.
fn rustc_version(mode: Mode) -> Result<String> {
    let out = tool("rustc", mode)
        .arg("-vV")
        .output()
        .context("running rustc -vV")?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text.lines().next().unwrap_or("rustc (unknown)").to_string())
}

/// The host triple: fuzz targets are built with `--target <host>` so that the instrumentation
/// flags reach only the target code, not build scripts and proc macros (as cargo-fuzz does).
fn host_triple(mode: Mode) -> Result<String> {
    let out = tool("rustc", mode)
        .arg("-vV")
        .output()
        .context("running rustc -vV")?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::to_string)
        .context("rustc -vV printed no host triple")
}

/// cargo-fuzz 0.13's RUSTFLAGS for `cargo fuzz build [-s none]` (release, debug assertions,
/// one codegen unit), in its order, so the same flags give the same build.
fn rustflags(mode: Mode) -> String {
    let mut f = String::new();
    f.push_str(" -Cpasses=sancov-module");
    f.push_str(" -Cllvm-args=-sanitizer-coverage-level=4");
    f.push_str(" -Cllvm-args=-sanitizer-coverage-inline-8bit-counters");
    f.push_str(" -Cllvm-args=-sanitizer-coverage-pc-table");
    f.push_str(" -Cllvm-args=-sanitizer-coverage-trace-compares");
    f.push_str(" --cfg fuzzing");
    f.push_str(" -Cllvm-args=-simplifycfg-branch-fold-threshold=0");
    if mode == Mode::NightlyAsan {
        f.push_str(" -Zsanitizer=address");
    }
    f.push_str(" -Cllvm-args=-sanitizer-coverage-stack-depth");
    f.push_str(" -Cdebug-assertions");
    f.push_str(" -Ccodegen-units=1");
    if let Ok(user) = std::env::var("RUSTFLAGS") {
        f.push(' ');
        f.push_str(&user);
    }
    f
}

/// Builds all targets; returns the directory holding the binaries.
fn build(fuzz_dir: &Path, mode: Mode) -> Result<PathBuf> {
    let triple = host_triple(mode)?;
    let target_dir = match mode {
        Mode::NightlyAsan => fuzz_dir.join("target"),
        Mode::Stable => fuzz_dir.join("target").join("stable"),
    };
    let flags = rustflags(mode);
    eprintln!(
        "==> cargo build --release --target {triple} --target-dir {} (fuzz/Cargo.toml)\n    RUSTFLAGS={}",
        target_dir.display(),
        flags.trim()
    );
    let start = Instant::now();
    let status = tool("cargo", mode)
        .args(["build", "--manifest-path"])
        .arg(fuzz_dir.join("Cargo.toml"))
        .args(["--target", &triple, "--release", "--bins"])
        .args(["--config", "profile.release.debug=\"line-tables-only\""])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("RUSTFLAGS", flags)
        .current_dir(fuzz_dir)
        .status()
        .context("starting cargo build for fuzz/")?;
    if !status.success() {
        bail!("building the fuzz targets failed ({status})");
    }
    eprintln!("==> fuzz targets built in {} s", start.elapsed().as_secs());
    Ok(target_dir.join(triple).join("release"))
}

/// Runs one target for `seconds` on a work copy of its corpus (new inputs found in CI do not
/// dirty the committed seeds), forwarding libFuzzer's output.
fn run_target(
    fuzz_dir: &Path,
    bin_dir: &Path,
    mode: Mode,
    target: &str,
    seconds: u64,
) -> Result<Outcome> {
    let seeds = fuzz_dir.join("corpus").join(target);
    let work = fuzz_dir.join("target").join("corpus-work").join(target);
    let artifacts = fuzz_dir.join("artifacts").join(target);
    for d in [&seeds, &work, &artifacts] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    eprintln!("==> fuzzing {target} for {seconds} s");
    let bin = bin_dir.join(target);
    let mut cmd = Command::new(&bin);
    cmd.arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg(format!("-max_total_time={seconds}"))
        .args(["-rss_limit_mb=2048", "-timeout=10"])
        .arg(&work)
        .arg(&seeds)
        .current_dir(fuzz_dir)
        .stderr(Stdio::piped());
    if mode == Mode::NightlyAsan {
        // As cargo-fuzz sets it: Rust crates trip ASan's one-definition-rule check.
        cmd.env("ASAN_OPTIONS", "detect_odr_violation=0");
    }
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting fuzz target {}", bin.display()))?;
    let mut runs = None;
    if let Some(stderr) = child.stderr.take() {
        for line in BufReader::new(stderr).lines() {
            let line = line.unwrap_or_default();
            // "Done 123456 runs in 60 second(s)"
            if let Some(rest) = line.strip_prefix("Done ") {
                runs = rest.split(' ').next().and_then(|n| n.parse().ok());
            }
            eprintln!("{line}");
        }
    }
    let status = child.wait()?;
    let secs = start.elapsed().as_secs();
    if !status.success() {
        eprintln!(
            "xtask: fuzz target {target} failed ({status}); the input is under {}",
            artifacts.display()
        );
    }
    Ok(Outcome {
        target: target.to_string(),
        ok: status.success(),
        secs,
        runs,
    })
}
