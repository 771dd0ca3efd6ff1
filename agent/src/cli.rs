//! Command-line types of the `ambit` binary (clap); no side effects here.
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// ambit: sidecar-less mTLS for Kubernetes pods, with eBPF capture.
#[derive(Debug, Parser)]
#[command(name = "ambit", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node agent.
    Run(RunArgs),
    /// Show the agent's status (enrolled pods, listeners, kernel counters).
    Status(AdminArgs),
    /// Run the certificate authority (Istio CA API over gRPC + TLS).
    Ca(crate::ca::CaArgs),
    /// Show the local identities' certificates (serial, validity, next renewal, state).
    Certs(AdminArgs),
    /// List the connections the agent is carrying now.
    Connections(AdminArgs),
    /// Show the effective PeerAuthentication mode of every enrolled pod and the
    /// AuthorizationPolicies that select it.
    Policy(AdminArgs),
    /// Explain why a connection from a pod to an address is tunnelled, plaintext or refused.
    Explain(ExplainArgs),
    /// List the pods in the inventory (and which this agent serves).
    Workloads(AdminArgs),
    /// Show the log filter, or set it (`ambit logging debug`, `ambit logging ambit=trace,info`).
    Logging(LoggingArgs),
    /// Print the Prometheus metrics.
    Metrics(AdminArgs),
    /// Parse an inventory file as `ambit run` would; print what it holds, or the first error
    /// (file, document, object, field, line) and exit with status 1.
    CheckInventory(CheckInventoryArgs),
    /// Chained CNI plugin: run by the container runtime (`CNI_*` variables, config on stdin).
    Cni,
    /// Install the CNI plugin and chain it into the node's CNI config (init container).
    CniInstall(crate::cni::install::InstallArgs),
}

/// `ambit run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Configuration file (YAML).
    #[arg(long, short, env = "AMBIT_CONFIG")]
    pub config: PathBuf,
}

/// `ambit check-inventory`.
#[derive(Debug, Args)]
pub struct CheckInventoryArgs {
    /// The inventory file (Kubernetes-shaped YAML).
    pub path: PathBuf,
}

/// `ambit explain SRC_POD DST_ADDR:PORT`.
#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// Source pod as NAMESPACE/NAME.
    #[arg(value_name = "SRC_POD", required_unless_present = "from")]
    pub src: Option<String>,
    /// Destination as IP:PORT (IPv6 in brackets): a pod or a Service VIP.
    #[arg(value_name = "DST_ADDR:PORT", required_unless_present = "to")]
    pub dst: Option<String>,
    /// Source pod (alternative to the first argument).
    #[arg(long, conflicts_with = "src")]
    pub from: Option<String>,
    /// Destination (alternative to the second argument).
    #[arg(long, conflicts_with = "dst")]
    pub to: Option<String>,
    /// Admin socket and output options.
    #[command(flatten)]
    pub admin: AdminArgs,
}

/// `ambit logging [LEVEL]`.
#[derive(Debug, Args)]
pub struct LoggingArgs {
    /// New filter (EnvFilter syntax); without it, print the current one.
    pub level: Option<String>,
    /// Admin socket and output options.
    #[command(flatten)]
    pub admin: AdminArgs,
}

/// Options shared by the admin-socket clients.
#[derive(Debug, Args)]
pub struct AdminArgs {
    /// The agent's admin socket.
    #[arg(
        long,
        env = "AMBIT_ADMIN_SOCKET",
        default_value = "/run/ambit/admin.sock"
    )]
    pub admin_socket: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}
