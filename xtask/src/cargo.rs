//! Running cargo from xtask: the workspace root, the target dir, building the agent.
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The workspace root (the parent of `xtask/`).
pub(crate) fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// A `cargo` command (the one running us, if known) in the workspace root, without the variables
/// `cargo run` set for this binary (`CARGO_MANIFEST_DIR`, `CARGO_PKG_*`, ...): build scripts
/// that read them (ring's) would see other values than in the outer `cargo xtask` build, and
/// every switch between the two rebuilt ring and everything above it.
pub(crate) fn command() -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut c = Command::new(cargo);
    c.current_dir(workspace_root());
    remove_cargo_run_env(&mut c);
    c
}

/// Removes from `c`'s environment the variables `cargo run` set for this binary
/// (`CARGO_MANIFEST_DIR`, `CARGO_PKG_*`, ...), which build scripts would otherwise see.
pub(crate) fn remove_cargo_run_env(c: &mut Command) {
    for (key, _) in std::env::vars_os() {
        let set_by_cargo_run = key.to_str().is_some_and(|k| {
            k.starts_with("CARGO_PKG_")
                || matches!(
                    k,
                    "CARGO_MANIFEST_DIR"
                        | "CARGO_MANIFEST_PATH"
                        | "CARGO_CRATE_NAME"
                        | "CARGO_BIN_NAME"
                        | "CARGO_PRIMARY_PACKAGE"
                )
        });
        if set_by_cargo_run {
            c.env_remove(key);
        }
    }
}

/// Runs `cargo ARGS`, streaming its output; fails on a non-zero exit.
pub(crate) fn run(args: &[&str]) -> Result<()> {
    let status = command()
        .args(args)
        .status()
        .with_context(|| format!("starting cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Builds the agent (`cargo build -p ambit-agent`) and returns the path of the `ambit` binary.
pub(crate) fn build_agent() -> Result<PathBuf> {
    eprintln!("==> building the agent (cargo build -p ambit-agent)");
    run(&["build", "-p", "ambit-agent"])?;
    let bin = target_dir().join("debug").join("ambit");
    if !bin.exists() {
        bail!(
            "cargo built ambit-agent but {} does not exist",
            bin.display()
        );
    }
    Ok(bin)
}

/// The cargo target dir: `CARGO_TARGET_DIR`, else the directory holding this xtask binary's
/// profile dir, else `<workspace>/target`.
pub(crate) fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        let dir = PathBuf::from(dir);
        return if dir.is_absolute() {
            dir
        } else {
            workspace_root().join(dir)
        };
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.to_path_buf()))
        .unwrap_or_else(|| workspace_root().join("target"))
}
