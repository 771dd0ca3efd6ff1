//! CLI clients of the admin socket (`ambit status`).
use crate::cli::AdminArgs;

/// `ambit status`.
pub fn status(_args: AdminArgs) -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}
