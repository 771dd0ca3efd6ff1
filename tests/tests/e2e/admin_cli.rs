//! The `ambit` CLI as an operator runs it against a real agent: tables, `--json` for scripts,
//! exit codes 0/1/2, and what it says when the admin socket is not there.
#![allow(
    clippy::unwrap_used,
    reason = "test bodies panic with a line number (STYLE.md §7)"
)]
use std::net::{IpAddr, SocketAddr};
use std::process::Command;

use ambit_e2e::ops::ADMIN_TIMEOUT;
use ambit_e2e::{assert_eventually, testbed, Testbed, ECHO_PORT, TUNNEL_PORT};
use serde_json::Value;

/// `ambit ARGS` on `node` as an operator runs it: (exit code, stdout, stderr).
fn cli(tb: &Testbed, node: &str, args: &[&str]) -> (i32, String, String) {
    let out = tb.ambit_cli(node, args).unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn the_cli_prints_tables_json_and_exit_codes_scripts_can_use() {
    let mut tb = testbed();
    let (client, server) = (tb.pod("client").clone(), tb.pod("server").clone());
    let s_ip = IpAddr::V4(server.ipv4);
    let to = SocketAddr::new(s_ip, ECHO_PORT).to_string();
    let held = tb.hold("client", s_ip, ECHO_PORT, "cli").unwrap();
    assert_eventually!(!tb.connections("node2").unwrap().is_empty());

    // Readable output: what each command is for, exit code 0.
    let inventory = tb.state().inventory.display().to_string();
    let (cid, sid) = (client.identity(), server.identity());
    let cases: [(&[&str], Vec<&str>); 7] = [
        (
            &["status"],
            vec!["node node2", "default/server", "enrolled"],
        ),
        (
            &["workloads"],
            vec!["default/server", "default/client", &sid],
        ),
        (&["certs"], vec![&sid, "available"]),
        (&["connections"], vec!["inbound", "mutual_tls", &cid]),
        (&["policy"], vec!["default/server", "PERMISSIVE"]),
        (&["logging"], vec!["info"]),
        (&["metrics"], vec!["istio_tcp_connections_opened_total"]),
    ];
    for (args, want) in &cases {
        let (code, out, err) = cli(&tb, "node2", args);
        assert_eq!(code, 0, "ambit {args:?}: {out}{err}");
        for w in want {
            assert!(
                out.contains(w),
                "`ambit {}` does not show {w:?}:\n{out}",
                args.join(" ")
            );
        }
    }
    let (code, out, err) = cli(&tb, "node1", &["explain", "default/client", &to]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("tunnelled"), "{out}");

    // --json: one parseable document each.
    for args in [
        &["status"][..],
        &["workloads"],
        &["certs"],
        &["connections"],
        &["policy"],
        &["logging"],
        &["explain", "--from", "default/client", "--to", &to],
    ] {
        let mut a = args.to_vec();
        a.push("--json");
        let node = if args[0] == "explain" {
            "node1"
        } else {
            "node2"
        };
        let (code, out, err) = cli(&tb, node, &a);
        assert_eq!(code, 0, "ambit {a:?}: {err}");
        let v: Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("`ambit {}` is not JSON: {e}\n{out}", a.join(" ")));
        assert!(v.is_object(), "{v}");
    }
    drop(held);

    // Exit code 1: the connection would be refused (an AuthorizationPolicy denies the
    // client's principal on the server).
    tb.apply(&format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  \
         name: deny-client\n  namespace: default\nspec:\n  selector:\n    matchLabels:\n      \
         app: server\n  action: DENY\n  rules:\n  - from:\n    - source:\n        \
         principals: [\"{}\"]\n",
        cid.trim_start_matches("spiffe://")
    ))
    .unwrap();
    let (code, out, _) = cli(&tb, "node1", &["explain", "default/client", &to]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("refused") && out.contains("deny-client"),
        "{out}"
    );

    // Exit code 2: no agent behind the socket, for every command.
    let missing = tb.state().dir.join("no-such-agent.sock");
    let missing = missing.to_str().unwrap();
    for args in [
        &["status"][..],
        &["workloads"],
        &["certs"],
        &["connections"],
        &["policy"],
        &["logging"],
        &["logging", "debug"],
        &["metrics"],
        &["explain", "default/client", &to],
    ] {
        let out = ambit_e2e::cmd::run(
            Command::new(tb.agent_bin().unwrap())
                .args(args)
                .args(["--admin-socket", missing]),
            ADMIN_TIMEOUT,
        )
        .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "ambit {args:?}: {err}");
        assert!(
            err.contains(missing),
            "ambit {args:?} does not name the socket: {err}"
        );
    }

    // `ambit status` names the inventory it reads (checked last: see target/agent-bugs.md).
    let (_, out, _) = cli(&tb, "node2", &["status"]);
    assert!(
        out.contains(&inventory),
        "`ambit status` does not name the inventory {inventory}:\n{out}"
    );
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn the_cli_says_what_happens_in_words() {
    let tb = testbed();
    let (client, server) = (tb.pod("client").clone(), tb.pod("server").clone());
    let s_ip = server.ipv4;
    let to = format!("{s_ip}:{ECHO_PORT}");

    // `explain` in words: the destination's checks say what decided them, no JSON.
    let (code, out, err) = cli(&tb, "node1", &["explain", "default/client", &to]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        out,
        format!(
            "default/client -> {to}: tunnelled over mTLS (HBONE)\n\
             \n\
             enrollment:\n  \
             - source default/client: enrolled by pod label ambit.io/mode=enabled\n  \
             - destination default/server: enrolled by pod label ambit.io/mode=enabled\n\
             \n\
             source agent:\n  \
             - {s_ip} is enrolled pod default/server\n  \
             - destination PeerAuthentication on port {ECHO_PORT}: PERMISSIVE (default, nothing set)\n  \
             - HBONE to {s_ip}:{TUNNEL_PORT} requiring {}\n\
             \n\
             destination agent (default/server):\n  \
             - PeerAuthentication: PERMISSIVE (no PeerAuthentication applies: the default)\n  \
             - AuthorizationPolicy: ALLOW (no AuthorizationPolicy selects default/server)\n",
            server.identity()
        )
    );

    // An error answer: its message, not its JSON body; exit code 2 as before.
    let (code, out, err) = cli(&tb, "node1", &["explain", "client", &to]);
    assert_eq!(
        (code, out.as_str(), err.as_str()),
        (
            2,
            "",
            "ambit: no pod \"client\" in the inventory (use namespace/name)\n"
        )
    );
    let (code, out, err) = cli(&tb, "node1", &["explain", "default/client", "10.9.9.9"]);
    assert_eq!(
        (code, out.as_str(), err.as_str()),
        (
            2,
            "",
            "ambit: to=10.9.9.9 is not IP:PORT (IPv6 in brackets)\n"
        )
    );

    // `connections` on the client's node: the outbound source is the client pod's address
    // with the app socket's port (not 127.0.0.1, the same in every pod).
    let held = tb
        .hold("client", IpAddr::V4(s_ip), ECHO_PORT, "words")
        .unwrap();
    let app_port = held.reply.0["sock"]
        .as_str()
        .and_then(|a| a.rsplit(':').next())
        .unwrap()
        .to_string();
    let want_src = format!("{}:{app_port}", client.ipv4);
    assert_eventually!(
        cli(&tb, "node1", &["connections"]).1.contains(&want_src),
        "no outbound row from {want_src}:\n{}",
        cli(&tb, "node1", &["connections"]).1
    );
    let (_, out, _) = cli(&tb, "node1", &["connections"]);
    let row = out.lines().find(|l| l.contains(&want_src)).unwrap();
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        cols[..5],
        ["outbound", "default/client", &want_src, &to, "mutual_tls"],
        "{out}"
    );
    assert!(!out.contains("127.0.0.1"), "{out}");
    drop(held);
}

/// Runs `ambit ARGS --admin-socket SOCKET` with stdout a pipe whose read end is already
/// closed (`ambit status | head -0`): (exit code, stderr).
fn with_closed_stdout(bin: &std::path::Path, args: &[&str], socket: &str) -> (Option<i32>, String) {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let mut child = Command::new(bin)
        .args(args)
        .args(["--admin-socket", socket])
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status = ambit_e2e::cmd::wait_deadline(&mut child, ADMIN_TIMEOUT)
        .unwrap()
        .unwrap_or_else(|| {
            let _ = child.kill();
            panic!("ambit {args:?} did not exit with stdout closed")
        });
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    (status.code(), err)
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn every_command_exits_quietly_when_stdout_is_closed() {
    let tb = testbed();
    let to = format!("{}:{ECHO_PORT}", tb.pod("server").ipv4);
    let bin = tb.agent_bin().unwrap().to_path_buf();
    let socket = tb.admin_socket("node1");
    let socket = socket.to_str().unwrap();
    for args in [
        &["status"][..],
        &["status", "--json"],
        &["workloads"],
        &["certs"],
        &["connections"],
        &["policy"],
        &["logging"],
        &["metrics"],
        &["explain", "default/client", &to],
        &["explain", "default/client", &to, "--json"],
        &["--help"],
    ] {
        // Each of them writes to stdout when it is open (so the closed pipe is hit).
        let (code, out, err) = cli(&tb, "node1", args);
        assert_eq!(code, 0, "ambit {args:?}: {err}");
        assert!(!out.is_empty(), "ambit {args:?} printed nothing");
        let (code, err) = with_closed_stdout(&bin, args, socket);
        assert_eq!(
            (code, err.as_str()),
            (Some(0), ""),
            "ambit {args:?} with a closed stdout"
        );
    }
}
