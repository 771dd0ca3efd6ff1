//! cargo xtask: developer and CI commands for ambit (testbed, demo, test).
mod bench;
mod cargo;
mod demo;
mod fuzz;
mod prereq;
mod test;
mod testbed;
mod vm_test;

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
    Testbed(testbed::Args),
    /// Build, bring a testbed up, send traffic from `client` to `server`, show what the agents saw.
    Demo(demo::Args),
    /// Install missing Debian prerequisites (as root), run the unit tests and the privileged
    /// end-to-end suite.
    Test(test::Args),
    /// Run the privileged end-to-end suite inside qemu on Debian kernels (default: bookworm's
    /// cloud kernel, 6.1).
    VmTest(vm_test::Args),
    /// Measure throughput, latency, connection rate, agent memory and CPU against the direct
    /// path on the testbed (as root); table on stdout, optional JSON, SVG chart and documents.
    Bench(bench::Args),
    /// Build the libFuzzer targets in fuzz/ (nightly with AddressSanitizer if installed, else
    /// the stable toolchain without a sanitizer) and run each for a while on its seed corpus.
    Fuzz(fuzz::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Testbed(args) => testbed::run(args),
        Command::Demo(args) => demo::run(&args),
        Command::Test(args) => test::run(&args),
        Command::VmTest(args) => vm_test::run(&args),
        Command::Bench(args) => bench::run(&args),
        Command::Fuzz(args) => fuzz::run(&args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn exec_takes_the_command_after_double_dash() {
        let cli = Cli::try_parse_from([
            "xtask", "testbed", "exec", "client", "--", "curl", "-s", "x",
        ])
        .unwrap();
        let Command::Testbed(testbed::Args {
            command: testbed::Command::Exec { pod, cmd },
            ..
        }) = cli.command
        else {
            panic!("{cli:?}")
        };
        assert_eq!(pod, "client");
        assert_eq!(cmd, ["curl", "-s", "x"]);
    }

    #[test]
    fn test_passes_filters_through() {
        let cli =
            Cli::try_parse_from(["xtask", "test", "--e2e-only", "fails_closed", "ipv6"]).unwrap();
        let Command::Test(args) = cli.command else {
            panic!("{cli:?}")
        };
        assert_eq!(args.filters, ["fails_closed", "ipv6"]);
    }
}
