//! `cargo xtask testbed up|down|status|exec|ambit|apply|delete`: the testbed by hand.
use std::io::Read as _;
use std::path::PathBuf;
use std::process::{Command as Proc, ExitCode};

use anyhow::{Context, Result};
use clap::{Args as ClapArgs, Subcommand};

use ambit_testbed::scope::{self, Scope};
use ambit_testbed::{process, teardown, Options, Testbed};

use crate::cargo;

/// `cargo xtask testbed [--name NAME] COMMAND`.
#[derive(Debug, ClapArgs)]
pub(crate) struct Args {
    #[command(flatten)]
    pub(crate) scope: ScopeArgs,
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// Which testbed to act on.
#[derive(Debug, Clone, ClapArgs)]
pub(crate) struct ScopeArgs {
    /// The testbed to act on; by default the one of this checkout (its directory name and a
    /// hash of its path), so two checkouts on one machine never share a testbed.
    #[arg(long, global = true, env = "AMBIT_TESTBED")]
    pub(crate) name: Option<String>,
}

impl ScopeArgs {
    /// The scope these arguments name.
    pub(crate) fn scope(&self) -> Result<Scope> {
        match &self.name {
            Some(name) => Scope::named(name),
            None => Ok(Scope::of_checkout(&cargo::workspace_root())),
        }
    }
}

/// Testbed subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Create the testbed (idempotent: an intact one is kept) and print its state file.
    Up {
        /// Only build the network and servers; start no agents.
        #[arg(long)]
        no_agents: bool,
        /// Use the existing `ambit` binary instead of running `cargo build -p ambit-agent`.
        #[arg(long)]
        no_build: bool,
        /// Run no CA: the agents only capture, enrolled pods talk plaintext through them.
        #[arg(long)]
        no_ca: bool,
        /// Lifetime of the pods' certificates, in seconds (renewed at about half of it).
        #[arg(long, default_value_t = ambit_testbed::testbed::DEFAULT_CERT_TTL_SECS)]
        cert_ttl: u64,
    },
    /// Remove the testbed, and any left behind by crashed test runs.
    Down {
        /// Also remove instances whose owning test process still runs.
        #[arg(long)]
        all: bool,
    },
    /// Show the testbed: pods, addresses, processes, and each agent's status.
    Status,
    /// Run a command inside a pod's network namespace and cgroup.
    Exec {
        /// Pod name (client, outsider, server, legacy).
        pod: String,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Add Kubernetes-shaped objects (PeerAuthentication, AuthorizationPolicy, Service, ...) to
    /// the testbed's inventory, replacing ones with the same kind, namespace and name; returns
    /// once every agent has loaded them.
    Apply {
        /// Multi-document YAML file, or `-` for stdin.
        file: PathBuf,
    },
    /// Remove an object added with `apply`.
    Delete {
        /// Its kind, e.g. PeerAuthentication.
        kind: String,
        /// NAMESPACE/NAME (or NAME in `default`; cluster-scoped kinds: NAME).
        name: String,
    },
    /// Run the `ambit` CLI against a node's agent (its admin socket).
    Ambit {
        /// Node name (node1, node2).
        node: String,
        /// Arguments for `ambit`, e.g. `status --json`.
        #[arg(last = true)]
        args: Vec<String>,
    },
}

/// Runs a testbed subcommand.
pub(crate) fn run(args: Args) -> Result<ExitCode> {
    ambit_testbed::require_root_result()?;
    let scope = args.scope.scope()?;
    let scope = &scope;
    match args.command {
        Command::Up {
            no_agents,
            no_build,
            no_ca,
            cert_ttl,
        } => {
            let opts = Options {
                agents: !no_agents,
                ca: !no_ca,
                cert_ttl_secs: cert_ttl,
                ..Options::default()
            };
            up(scope, opts, no_build).map(|_| ExitCode::SUCCESS)
        }
        Command::Apply { file } => apply(scope, &file).map(|()| ExitCode::SUCCESS),
        Command::Delete { kind, name } => delete(scope, &kind, &name).map(|()| ExitCode::SUCCESS),
        Command::Down { all } => down(scope, all).map(|()| ExitCode::SUCCESS),
        Command::Status => status(scope).map(|()| ExitCode::SUCCESS),
        Command::Exec { pod, cmd } => exec(scope, &pod, &cmd),
        Command::Ambit { node, args } => ambit(scope, &node, &args),
    }
}

/// The testbed `scope` points at, or an error telling how to make one.
fn current(scope: &Scope) -> Result<Testbed> {
    Testbed::cli_instance(scope)?.with_context(|| {
        format!(
            "no testbed for {} ({}); run `cargo xtask testbed up` first",
            scope.name(),
            scope.origin()
        )
    })
}

/// Brings `scope`'s testbed up with `opts` (made persistent) unless an intact one exists;
/// returns it.
pub(crate) fn up(scope: &Scope, opts: Options, no_build: bool) -> Result<Testbed> {
    let agents = opts.agents;
    if let Some(tb) = Testbed::cli_instance(scope)? {
        let problems = health(&tb, agents);
        if problems.is_empty() {
            eprintln!(
                "==> testbed {} ({}) is already up",
                tb.state().id,
                scope.name()
            );
            print_state(&tb)?;
            return Ok(tb);
        }
        eprintln!(
            "==> testbed {} is broken ({}); recreating it",
            tb.state().id,
            problems.join("; ")
        );
        tb.down()?;
    }
    let agent_bin = if agents && !no_build {
        Some(cargo::build_agent()?)
    } else {
        None
    };
    let opts = Options {
        agent_bin,
        persistent: true,
        ..opts
    };
    let tb = Testbed::up(opts)?;
    tb.make_cli_instance(scope)?;
    eprintln!(
        "==> testbed {} is up for {} ({})",
        tb.state().id,
        scope.name(),
        scope.origin()
    );
    print_state(&tb)?;
    Ok(tb)
}

fn apply(scope: &Scope, file: &std::path::Path) -> Result<()> {
    let mut tb = current(scope)?;
    let mut text = String::new();
    if file.as_os_str() == "-" {
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading stdin")?;
    } else {
        text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    }
    let report = tb.apply(&text)?;
    for (what, verb) in &report.objects {
        println!("{what} {verb}");
    }
    for (node, loads) in &report.reloaded {
        eprintln!("==> {node}: agent loaded the inventory (load #{loads})");
    }
    Ok(())
}

fn delete(scope: &Scope, kind: &str, name: &str) -> Result<()> {
    let mut tb = current(scope)?;
    let scoped = ["Namespace", "Node", "ClusterRole", "ClusterRoleBinding"].contains(&kind);
    let (ns, name) = match name.split_once('/') {
        Some((ns, name)) => (ns, name),
        None if scoped => ("", name),
        None => ("default", name),
    };
    tb.delete(kind, ns, name)?;
    println!(
        "{kind} {}{name} deleted",
        if ns.is_empty() {
            String::new()
        } else {
            format!("{ns}/")
        }
    );
    Ok(())
}

fn down(scope: &Scope, all: bool) -> Result<()> {
    let mut removed = Vec::new();
    if let Some(tb) = Testbed::cli_instance(scope)? {
        removed.push(tb.state().id.clone());
        tb.down()?;
    }
    let others = if all {
        teardown::all_instances()
    } else {
        teardown::stale_instances()
    };
    for state in others {
        removed.push(format!("{} (owner {:?})", state.id, state.owner_pid));
        teardown::teardown(&state, &mut Vec::new())?;
    }
    if removed.is_empty() {
        eprintln!("==> no testbed to remove");
    } else {
        eprintln!("==> removed testbed {}", removed.join(", "));
    }
    Ok(())
}

fn status(scope: &Scope) -> Result<()> {
    let others: Vec<String> = scope::all_pointers()
        .into_iter()
        .filter(|(name, _)| name != scope.name())
        .map(|(name, id)| format!("{name} -> {id}"))
        .collect();
    let Some(tb) = Testbed::cli_instance(scope)? else {
        eprintln!(
            "no testbed for {} ({}); create one with `cargo xtask testbed up`",
            scope.name(),
            scope.origin()
        );
        if !others.is_empty() {
            eprintln!(
                "other testbeds on this machine (--name): {}",
                others.join(", ")
            );
        }
        return Ok(());
    };
    let st = tb.state();
    println!(
        "testbed {} for {} ({}), state {}",
        st.id,
        scope.name(),
        scope.origin(),
        st.state_file().display()
    );
    if !others.is_empty() {
        println!(
            "  other testbeds on this machine (--name): {}",
            others.join(", ")
        );
    }
    match &st.ca {
        Some(ca) => println!(
            "  ca {} in {}'s namespace, root {}, certificates {} s",
            ca.addr,
            ca.node,
            ca.cert_dir.join("root-cert.pem").display(),
            ca.cert_ttl_secs
        ),
        None => println!("  no ca: the agents only capture (plaintext between them)"),
    }
    for obj in &st.applied {
        println!("  applied {}", ambit_testbed::apply::describe(obj));
    }
    for node in &st.nodes {
        println!(
            "  {} netns {} underlay {} / {}",
            node.name, node.netns, node.underlay_v4, node.underlay_v6
        );
        for pod in st.pods_on(&node.name) {
            println!(
                "    pod {:<9} {:<10} {:<12} netns {}",
                pod.name,
                if pod.enrolled { "enrolled" } else { "-" },
                pod.ipv4,
                pod.netns
            );
        }
    }
    for p in &st.processes {
        let alive = ambit_testbed::cgroup::pid_in(p.pid, &st.cgroup_root, &st.cgroup_mount);
        println!(
            "  pid {:>7} {:<24} {}",
            p.pid,
            p.role,
            if alive { "running" } else { "GONE" }
        );
    }
    let problems = health(&tb, true);
    if !problems.is_empty() {
        println!("  problems: {}", problems.join("; "));
    }
    for node in &st.nodes {
        if tb.agent_running(&node.name) {
            println!("\n$ ambit status   # {}", node.name);
            let bin = tb.agent_bin()?;
            let _ = Proc::new(bin)
                .arg("status")
                .arg("--admin-socket")
                .arg(&node.admin_socket)
                .status();
        }
    }
    Ok(())
}

fn exec(scope: &Scope, pod: &str, cmd: &[String]) -> Result<ExitCode> {
    let tb = current(scope)?;
    let pod = tb.state().pod(pod)?;
    let status = process::command_in(&pod.cgroup, &pod.netns_path(), cmd)
        .status()
        .with_context(|| format!("running {cmd:?} in {}", pod.name))?;
    Ok(exit_code(status.code()))
}

fn ambit(scope: &Scope, node: &str, args: &[String]) -> Result<ExitCode> {
    let tb = current(scope)?;
    let node = tb.state().node(node)?;
    let bin = tb.agent_bin()?;
    let mut c = Proc::new(bin);
    c.args(args).env("AMBIT_ADMIN_SOCKET", &node.admin_socket);
    let first = args.first().map(String::as_str).unwrap_or("");
    let takes_socket = !matches!(
        first,
        "" | "run" | "help" | "-h" | "--help" | "-V" | "--version"
    );
    if takes_socket && !args.iter().any(|a| a.starts_with("--admin-socket")) {
        c.arg("--admin-socket").arg(&node.admin_socket);
    }
    let status = c
        .status()
        .with_context(|| format!("running {}", bin.display()))?;
    Ok(exit_code(status.code()))
}

/// Why the testbed is not intact (missing namespaces, dead processes); empty when fine.
fn health(tb: &Testbed, agents: bool) -> Vec<String> {
    let st = tb.state();
    let mut out = Vec::new();
    for ns in st
        .nodes
        .iter()
        .map(|n| &n.netns)
        .chain(st.pods.iter().map(|p| &p.netns))
    {
        if !ambit_testbed::state::netns_path(ns).exists() {
            out.push(format!("netns {ns} missing"));
        }
    }
    for p in &st.processes {
        if !ambit_testbed::cgroup::pid_in(p.pid, &st.cgroup_root, &st.cgroup_mount) {
            out.push(format!("{} (pid {}) not running", p.role, p.pid));
        }
    }
    if agents && !st.processes.iter().any(|p| p.role.starts_with("agent")) {
        out.push("no agents".into());
    }
    out
}

fn print_state(tb: &Testbed) -> Result<()> {
    let file = tb.state().state_file();
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    println!("{text}");
    eprintln!("==> state file: {}", file.display());
    Ok(())
}

fn exit_code(code: Option<i32>) -> ExitCode {
    match code {
        Some(0) => ExitCode::SUCCESS,
        Some(c) => ExitCode::from(u8::try_from(c).unwrap_or(1)),
        None => ExitCode::FAILURE,
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        command: Command,
    }

    #[test]
    fn apply_takes_a_file_or_stdin() {
        let cli = Cli::try_parse_from(["t", "apply", "-"]).unwrap();
        let Command::Apply { file } = cli.command else {
            panic!("{cli:?}")
        };
        assert_eq!(file, PathBuf::from("-"));
    }

    #[test]
    fn up_has_ca_by_default() {
        let cli = Cli::try_parse_from(["t", "up"]).unwrap();
        let Command::Up {
            no_ca, cert_ttl, ..
        } = cli.command
        else {
            panic!("{cli:?}")
        };
        assert!(!no_ca);
        assert_eq!(cert_ttl, 86400);
        let cli = Cli::try_parse_from(["t", "up", "--no-ca", "--cert-ttl", "60"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Up {
                no_ca: true,
                cert_ttl: 60,
                ..
            }
        ));
    }
}
