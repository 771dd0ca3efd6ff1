//! Debian prerequisites of the build and the testbed: check, and install the missing ones as root.
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Debian packages the build (clang-19, libbpf headers) and the testbed (ip, nsenter, socat,
/// python3, curl, ...) need.
pub(crate) const PACKAGES: &[&str] = &[
    "clang-19",
    "llvm-19",
    "libbpf-dev",
    "bpftool",
    "gcc-multilib",
    "iproute2",
    "socat",
    "python3",
    "curl",
    "tcpdump",
    "netcat-openbsd",
    "util-linux",
    // the CNI chain test: the reference `bridge` and `host-local` plugins before `ambit-cni`
    "containernetworking-plugins",
];

/// Installs missing [`PACKAGES`] with apt-get when running as root on Debian and `install` is
/// set; otherwise lists what is missing.
pub(crate) fn ensure(install: bool) -> Result<()> {
    if !Path::new("/usr/bin/dpkg-query").exists() {
        eprintln!(
            "==> not a Debian system: make sure these (or equivalents) are installed: {}",
            PACKAGES.join(" ")
        );
        return Ok(());
    }
    let missing = missing()?;
    if missing.is_empty() {
        eprintln!("==> prerequisites present: {}", PACKAGES.join(" "));
        return Ok(());
    }
    if !install || !ambit_testbed::is_root() {
        eprintln!(
            "==> missing Debian packages (install them as root): {}",
            missing.join(" ")
        );
        return Ok(());
    }
    eprintln!(
        "==> installing missing prerequisites: {}",
        missing.join(" ")
    );
    install_packages(&missing.iter().map(String::as_str).collect::<Vec<_>>())?;
    let still = self::missing()?;
    if !still.is_empty() {
        bail!("still missing after apt-get install: {}", still.join(" "));
    }
    Ok(())
}

fn missing() -> Result<Vec<String>> {
    let mut out = Vec::new();
    for pkg in PACKAGES {
        let status = Command::new("dpkg-query")
            .args(["-W", "-f=${db:Status-Status}", pkg])
            .output()
            .context("running dpkg-query")?;
        if String::from_utf8_lossy(&status.stdout).trim() != "installed" {
            out.push((*pkg).to_string());
        }
    }
    Ok(out)
}

/// `apt-get update`, then `apt-get install` of `packages` without recommends (needs root).
pub(crate) fn install_packages(packages: &[&str]) -> Result<()> {
    apt(&["update"])?;
    let mut args = vec!["install", "-y", "--no-install-recommends"];
    args.extend(packages);
    apt(&args)
}

fn apt(args: &[&str]) -> Result<()> {
    let status = Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("starting apt-get")?;
    if !status.success() {
        bail!("`apt-get {}` failed ({status})", args.join(" "));
    }
    Ok(())
}
