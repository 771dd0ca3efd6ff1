//! cargo xtask: developer and CI commands for ambit (testbed, demo, test).
mod cargo;
mod demo;
mod prereq;
mod test;
mod testbed;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// ambit's developer tasks (run as `cargo xtask ...`).
#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Manage the network-namespace testbed (two nodes, four pods, one agent per node).
    #[command(subcommand)]
    Testbed(testbed::Command),
    /// Build, bring a testbed up, send traffic from `client` to `server`, show what the agents saw.
    Demo(demo::Args),
    /// Install missing Debian prerequisites (as root), run the unit tests and the privileged
    /// end-to-end suite.
    Test(test::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Testbed(cmd) => testbed::run(cmd),
        Command::Demo(args) => demo::run(&args),
        Command::Test(args) => test::run(&args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
