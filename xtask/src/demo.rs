//! `cargo xtask demo`: a testbed with agents, traffic from `client` to `server`, the agents' view.
use std::net::IpAddr;
use std::process::{Command as Proc, ExitCode};

use anyhow::Result;
use clap::Args as ClapArgs;

use ambit_e2e::{Options, Testbed, ECHO_PORT, HTTP_PORT, PEER_PORT};

use crate::{cargo, prereq};

/// `cargo xtask demo` options.
#[derive(Debug, ClapArgs)]
pub(crate) struct Args {
    /// Keep the testbed running afterwards (then: `cargo xtask testbed exec|ambit|down`).
    #[arg(long)]
    keep: bool,
}

/// Runs the demo.
pub(crate) fn run(args: &Args) -> Result<ExitCode> {
    ambit_e2e::require_root_result()?;
    eprintln!("==> [1/5] prerequisites");
    prereq::ensure(true)?;
    eprintln!("==> [2/5] build");
    let bin = cargo::build_agent()?;
    eprintln!("==> [3/5] testbed: 2 nodes, pods client+outsider on node1, server+legacy on node2, one agent per node");
    let tb = Testbed::up(Options {
        agent_bin: Some(bin),
        persistent: args.keep,
        ..Options::default()
    })?;
    let server = tb.pod("server").clone();
    let client = tb.pod("client").clone();
    println!(
        "\nclient {} / {} (node1, enrolled)  ->  server {} / {} (node2, enrolled)\n",
        client.ipv4, client.ipv6, server.ipv4, server.ipv6
    );
    eprintln!(
        "==> [4/5] traffic from client to server (every connection is captured on both sides)"
    );
    let mut failures = 0;
    let v4 = IpAddr::V4(server.ipv4);
    let v6 = IpAddr::V6(server.ipv6);
    failures += show(
        &format!("HTTP   GET http://{v4}:{HTTP_PORT}/hello.txt"),
        || {
            tb.http_get("client", v4, HTTP_PORT, "/hello.txt")
                .map(|b| b.trim().to_string())
        },
    );
    failures += show(
        &format!("HTTP   GET http://[{v6}]:{HTTP_PORT}/hello.txt"),
        || {
            tb.http_get("client", v6, HTTP_PORT, "/hello.txt")
                .map(|b| b.trim().to_string())
        },
    );
    failures += show(&format!("echo   {v4}:{ECHO_PORT}"), || {
        let r = tb.request("client", v4, ECHO_PORT, Some("ping through ambit"))?;
        Ok(describe(&r))
    });
    failures += show(
        &format!("peer   {v4}:{PEER_PORT} (what the server app saw)"),
        || {
            let r = tb.request("client", v4, PEER_PORT, None)?;
            Ok(describe(&r))
        },
    );
    failures += show(&format!("peer   [{v6}]:{PEER_PORT}"), || {
        let r = tb.request("client", v6, PEER_PORT, None)?;
        Ok(describe(&r))
    });
    eprintln!("==> [5/5] what each agent saw (`ambit status`)");
    let bin = tb.agent_bin()?.to_path_buf();
    for node in &tb.state().nodes {
        println!("\n$ cargo xtask testbed ambit {} -- status", node.name);
        let _ = Proc::new(&bin)
            .arg("status")
            .arg("--admin-socket")
            .arg(&node.admin_socket)
            .status();
    }
    if args.keep {
        tb.make_cli_instance()?;
        println!(
            "\ntestbed {} kept. Try:\n  cargo xtask testbed exec client -- curl -s http://{v4}:{HTTP_PORT}/hello.txt\n  \
             cargo xtask testbed ambit node2 -- status --json\n  cargo xtask testbed down",
            tb.state().id
        );
    } else {
        eprintln!("==> tearing down (use --keep to keep the testbed)");
        tb.down()?;
    }
    if failures > 0 {
        eprintln!("==> {failures} demo request(s) failed");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn describe(r: &ambit_e2e::Reply) -> String {
    match r.error() {
        Some(e) => format!("error {e}"),
        None => format!("{} (client's getpeername: {})", r.data().trim(), r.peer()),
    }
}

fn show(what: &str, f: impl FnOnce() -> Result<String>) -> u32 {
    match f() {
        Ok(s) if !s.starts_with("error") => {
            println!("  ok    {what}\n        -> {s}");
            0
        }
        Ok(s) => {
            println!("  FAIL  {what}\n        -> {s}");
            1
        }
        Err(e) => {
            println!("  FAIL  {what}\n        -> {e:#}");
            1
        }
    }
}
