//! `ambit`: parse the command line, set up logging and hand over to the subcommand.
use clap::Parser;

use ambit::cli::{Cli, Command};

fn main() -> anyhow::Result<()> {
    // Runtimes run CNI plugins by file name, without arguments: `/opt/cni/bin/ambit-cni`.
    if ambit::cni::plugin::invoked_as_plugin() {
        std::process::exit(ambit::cni::plugin::main());
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => ambit::app::run(args),
        Command::Status(args) => ambit::admin::client::status(args),
        Command::Ca(args) => Ok(ambit::ca::run(args)?),
        Command::Certs(args) => ambit::admin::client::certs(args),
        Command::Connections(args) => ambit::admin::client::connections(args),
        Command::Policy(args) => ambit::admin::client::policy(args),
        Command::Explain(args) => ambit::admin::client::explain(args),
        Command::Workloads(args) => ambit::admin::client::workloads(args),
        Command::Logging(args) => ambit::admin::client::logging(args),
        Command::Metrics(args) => ambit::admin::client::metrics(args),
        Command::CheckInventory(args) => match ambit::inventory::check::check(&args.path) {
            Ok(summary) => {
                println!("{summary}");
                Ok(())
            }
            Err(e) => {
                eprintln!("ambit: {}", ambit::error::error_chain(&e));
                std::process::exit(1)
            }
        },
        Command::Cni => std::process::exit(ambit::cni::plugin::main()),
        Command::CniInstall(args) => Ok(ambit::cni::install::run(&args)?),
    }
}
