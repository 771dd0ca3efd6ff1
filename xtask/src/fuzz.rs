//! `cargo xtask fuzz`: runs each cargo-fuzz (libFuzzer) target for a given time on its committed seed corpus.
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::cargo::workspace_root;

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
    /// Targets to run (default: all).
    targets: Vec<String>,
}

/// Installs cargo-fuzz if missing (needs the nightly toolchain, present on these machines),
/// then runs each target; a crash fails the command and leaves the input in fuzz/artifacts.
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
    ensure_cargo_fuzz()?;
    eprintln!("==> building fuzz targets (cargo +nightly fuzz build)");
    let status = Command::new("cargo")
        .args(["+nightly", "fuzz", "build", "-O"])
        .current_dir(&fuzz_dir)
        .status()?;
    if !status.success() {
        bail!("cargo +nightly fuzz build failed ({status})");
    }
    let mut report = Vec::new();
    for t in targets {
        let corpus: PathBuf = fuzz_dir.join("corpus").join(t);
        std::fs::create_dir_all(&corpus)?;
        // Work on a copy so new inputs found in CI do not dirty the committed seeds.
        let work = fuzz_dir.join("target").join("corpus-work").join(t);
        std::fs::create_dir_all(&work)?;
        eprintln!("==> fuzzing {t} for {} s", args.seconds);
        let start = Instant::now();
        let status = Command::new("cargo")
            .args(["+nightly", "fuzz", "run", "-O", t])
            .arg(&work)
            .arg(&corpus)
            .args([
                "--",
                &format!("-max_total_time={}", args.seconds),
                "-rss_limit_mb=2048",
                "-timeout=10",
            ])
            .current_dir(&fuzz_dir)
            .status()
            .with_context(|| format!("starting cargo fuzz run {t}"))?;
        report.push((t, status.success(), start.elapsed().as_secs()));
        if !status.success() {
            eprintln!(
                "xtask: fuzz target {t} failed; the crashing input is under fuzz/artifacts/{t}/"
            );
        }
    }
    eprintln!();
    for (t, ok, secs) in &report {
        eprintln!(
            "  {t:<16} {:<8} {secs} s",
            if *ok { "ok" } else { "CRASHED" }
        );
    }
    let failed = report.iter().filter(|r| !r.1).count();
    println!("{} passed, {failed} failed", report.len() - failed);
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn ensure_cargo_fuzz() -> Result<()> {
    let present = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if present {
        return Ok(());
    }
    eprintln!("==> installing cargo-fuzz from crates.io (cargo install cargo-fuzz --locked)");
    let status = Command::new("cargo")
        .args(["install", "cargo-fuzz", "--locked"])
        .status()?;
    if !status.success() {
        bail!("cargo install cargo-fuzz failed ({status})");
    }
    Ok(())
}
