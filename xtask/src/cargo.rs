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

/// A `cargo` command (the one running us, if known) in the workspace root.
pub(crate) fn command() -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut c = Command::new(cargo);
    c.current_dir(workspace_root());
    c
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
