//! Wires the agent together; owns startup and shutdown order.
use crate::cli::RunArgs;

/// `ambit run`.
pub fn run(_args: RunArgs) -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}
