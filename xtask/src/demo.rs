//! `cargo xtask demo`: a testbed with a CA and agents, traffic from `client` to `server`, proof
//! that it crossed the wire in mutual TLS, STRICT mTLS applied at run time, the agents' view.
use std::net::{IpAddr, SocketAddr};
use std::process::{Command as Proc, ExitCode};

use anyhow::Result;
use clap::Args as ClapArgs;

use ambit_testbed::capture::{Capture, UNDERLAY};
use ambit_testbed::pcap::tls_records;
use ambit_testbed::policy::PeerAuthentication;
use ambit_testbed::{
    unique_marker, Options, Testbed, ECHO_PORT, HTTP_PORT, PEER_PORT, TUNNEL_PORT,
};

use crate::{cargo, prereq};

/// `cargo xtask demo` options.
#[derive(Debug, ClapArgs)]
pub(crate) struct Args {
    /// Keep the testbed running afterwards (then: `cargo xtask testbed exec|ambit|apply|down`).
    #[arg(long)]
    keep: bool,
    /// With `--keep`: the name the kept testbed gets (default: this checkout's).
    #[command(flatten)]
    scope: crate::testbed::ScopeArgs,
}

/// Runs the demo.
pub(crate) fn run(args: &Args) -> Result<ExitCode> {
    ambit_testbed::require_root_result()?;
    eprintln!("==> [1/7] prerequisites");
    prereq::ensure(true)?;
    eprintln!("==> [2/7] build");
    let bin = cargo::build_agent()?;
    eprintln!(
        "==> [3/7] testbed: 2 nodes, pods client+outsider on node1, server+legacy on node2, \
         ambit ca on node1's underlay address, one agent per node"
    );
    let mut tb = Testbed::up(Options {
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
    for node in ["node1", "node2"] {
        ambit(&tb, node, &["certs"]);
    }
    let mut failures = 0;

    eprintln!(
        "==> [4/7] traffic from client to server (captured on both sides, carried over mTLS), \
         with tcpdump on node1's underlay link"
    );
    let v4 = IpAddr::V4(server.ipv4);
    let v6 = IpAddr::V6(server.ipv6);
    let cap = tb.capture("node1", UNDERLAY)?;
    let (secret, plain) = (unique_marker(), unique_marker());
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
        let r = tb.request("client", v4, ECHO_PORT, Some(&secret))?;
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
    let legacy = IpAddr::V4(tb.pod("legacy").ipv4);
    failures += show(
        &format!("echo   outsider -> legacy {legacy}:{ECHO_PORT} (neither enrolled: plaintext)"),
        || {
            let r = tb.request("outsider", legacy, ECHO_PORT, Some(&plain))?;
            Ok(describe(&r))
        },
    );

    eprintln!("==> [5/7] what crossed the underlay");
    failures += show_capture(&tb, cap, &secret, &plain);
    eprintln!("==> [6/7] a connection held open, as node2's agent sees it");
    match tb.hold("client", v4, ECHO_PORT, "held open") {
        Ok(held) => {
            ambit(&tb, "node2", &["connections"]);
            drop(held);
        }
        Err(e) => {
            println!("  FAIL  hold a connection open\n        -> {e:#}");
            failures += 1;
        }
    }

    eprintln!("==> [7/7] STRICT mTLS for namespace default, applied to the running testbed");
    let strict = PeerAuthentication::new("default", "default").mode("STRICT");
    println!(
        "\n$ cargo xtask testbed apply - <<EOF\n{}EOF",
        strict.yaml()
    );
    tb.apply(&strict.yaml())?;
    ambit(&tb, "node2", &["policy"]);
    failures += show(
        &format!("outsider (not enrolled, plaintext) -> {v4}:{ECHO_PORT}"),
        || {
            let r = tb.request("outsider", v4, ECHO_PORT, Some("plaintext"))?;
            Ok(match r.error() {
                Some(e) => format!("refused as it should be ({e})"),
                None if r.data().is_empty() => "refused as it should be (closed)".to_string(),
                None => format!("error: plaintext got through: {}", r.data()),
            })
        },
    );
    failures += show(&format!("client (mTLS) -> {v4}:{ECHO_PORT}"), || {
        let r = tb.request("client", v4, ECHO_PORT, Some("mtls still works"))?;
        Ok(describe(&r))
    });
    let to = SocketAddr::new(v4, ECHO_PORT).to_string();
    ambit(
        &tb,
        "node1",
        &["explain", "--from", "default/outsider", "--to", &to],
    );
    tb.delete("PeerAuthentication", "default", "default")?;
    println!(
        "\n(policy deleted again: cargo xtask testbed delete PeerAuthentication default/default)"
    );

    for node in ["node1", "node2"] {
        ambit(&tb, node, &["status"]);
    }
    if args.keep {
        let scope = args.scope.scope()?;
        tb.make_cli_instance(&scope)?;
        let t = match &args.scope.name {
            Some(name) => format!("cargo xtask testbed --name {name}"),
            None => "cargo xtask testbed".to_string(),
        };
        println!(
            "\ntestbed {} kept for {} ({}). Try:\n  {t} exec client -- curl -s http://{v4}:{HTTP_PORT}/hello.txt\n  \
             {t} ambit node2 -- connections\n  {t} apply my-policy.yaml\n  {t} down",
            tb.state().id,
            scope.name(),
            scope.origin(),
        );
    } else {
        eprintln!("==> tearing down (use --keep to keep the testbed)");
        tb.down()?;
    }
    if failures > 0 {
        eprintln!("==> {failures} demo step(s) failed");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// Stops the capture and shows each stream it saw, and how often each marker crossed the wire:
/// `secret` went client -> server (tunnelled), `plain` outsider -> legacy. 1 on failure.
fn show_capture(tb: &Testbed, cap: Capture, secret: &str, plain: &str) -> u32 {
    let result = (|| -> Result<String> {
        let seen = cap.stop()?;
        let client = tb.pod("client");
        let pods = [IpAddr::V4(client.ipv4), IpAddr::V6(client.ipv6)];
        let mut out = String::new();
        for f in seen.with_payload() {
            let tunnel = f.src.port() == TUNNEL_PORT || f.dst.port() == TUNNEL_PORT;
            let kind = match tls_records(&f.bytes) {
                Ok(r) => format!("TLS ({} records)", r.len()),
                Err(_) => "plaintext".to_string(),
            };
            let hbone = tunnel && (pods.contains(&f.src.ip()) || pods.contains(&f.dst.ip()));
            out.push_str(&format!(
                "\n          {:<24} -> {:<24} {:>6} bytes  {kind}{}",
                f.src.to_string(),
                f.dst.to_string(),
                f.bytes.len(),
                if hbone { "  HBONE" } else { "" }
            ));
        }
        let (s, p) = (seen.count(secret.as_bytes()), seen.count(plain.as_bytes()));
        let verdict = if s == 0 && p > 0 { "" } else { "error: " };
        Ok(format!(
            "{verdict}client's echo marker seen {s} times on the wire, outsider's {p} times{out}"
        ))
    })();
    show("tcpdump -i ul0 in node1's namespace", || result)
}

/// Runs the `ambit` CLI (text output) against `node`'s agent.
fn ambit(tb: &Testbed, node: &str, args: &[&str]) {
    let (Ok(bin), Ok(n)) = (tb.agent_bin(), tb.state().node(node)) else {
        return;
    };
    println!("\n$ cargo xtask testbed ambit {node} -- {}", args.join(" "));
    let _ = Proc::new(bin)
        .args(args)
        .arg("--admin-socket")
        .arg(&n.admin_socket)
        .status();
}

fn describe(r: &ambit_testbed::Reply) -> String {
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
