//! `cargo xtask test`: prerequisites, unit tests, then the privileged end-to-end suite.
use std::process::ExitCode;

use anyhow::Result;
use clap::Args as ClapArgs;

use crate::{cargo, prereq};

/// End-to-end tests left out of `cargo xtask test` until the failure they show is understood,
/// each with what was seen (run them by name with `cargo test -p ambit-e2e`). Empty: keep it so.
const KNOWN_FLAKY: &[(&str, &str)] = &[];

/// `cargo xtask test` options.
#[derive(Debug, ClapArgs)]
pub(crate) struct Args {
    /// Only the unprivileged tests (`cargo test --workspace`).
    #[arg(long, conflicts_with = "e2e_only")]
    unit_only: bool,
    /// Only the privileged end-to-end suite.
    #[arg(long)]
    e2e_only: bool,
    /// Do not install missing Debian packages.
    #[arg(long)]
    no_install: bool,
    /// Test name filters, passed to the test binaries.
    pub(crate) filters: Vec<String>,
}

/// Runs the test tiers in order; stops at the first failing one.
pub(crate) fn run(args: &Args) -> Result<ExitCode> {
    prereq::ensure(!args.no_install)?;
    let filters: Vec<&str> = args.filters.iter().map(String::as_str).collect();
    if !args.e2e_only {
        eprintln!("==> unit tests: cargo test --workspace");
        let mut a = vec!["test", "--workspace", "--"];
        a.extend(&filters);
        cargo::run(&a)?;
    }
    if args.unit_only {
        return Ok(ExitCode::SUCCESS);
    }
    if !ambit_testbed::is_root() {
        eprintln!("==> the end-to-end suite needs root; its tests will fail (not skip) without it");
    }
    let bin = cargo::build_agent()?;
    for state in ambit_testbed::teardown::stale_instances() {
        eprintln!("==> removing testbed {} left by a crashed run", state.id);
        ambit_testbed::teardown::teardown(&state, &mut Vec::new())?;
    }
    eprintln!(
        "==> end-to-end tests: cargo test -p ambit-e2e --no-fail-fast -- --include-ignored --test-threads=1"
    );
    let mut c = cargo::command();
    // --no-fail-fast: one failing file must not hide the results of the others.
    c.args([
        "test",
        "-p",
        "ambit-e2e",
        "--no-fail-fast",
        "--",
        "--include-ignored",
        "--test-threads=1",
    ])
    .args(&filters);
    for (name, why) in KNOWN_FLAKY {
        eprintln!("==> skipping {name}: {why}");
        c.args(["--skip", name]);
    }
    c.env("AMBIT_BIN", &bin);
    let status = c.status()?;
    // The agent crate's privileged test: the CNI chain (reference plugins, then `ambit-cni`)
    // on real namespaces. Run even when the suite above failed, for the same reason.
    eprintln!("==> CNI chain: cargo test -p ambit-agent --test cni_chain -- --include-ignored");
    let chain = cargo::command()
        .args(["test", "-p", "ambit-agent", "--test", "cni_chain", "--"])
        .arg("--include-ignored")
        .args(&filters)
        .status()?;
    if !status.success() {
        anyhow::bail!("end-to-end tests failed ({status})");
    }
    if !chain.success() {
        anyhow::bail!("the CNI chain test failed ({chain})");
    }
    eprintln!("==> all tests passed");
    Ok(ExitCode::SUCCESS)
}
