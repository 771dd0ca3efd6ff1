//! The `ambit` CLI as an operator runs it against a real agent: tables, `--json` for scripts,
//! exit codes 0/1/2, and what it says when the admin socket is not there.
#![allow(
    clippy::unwrap_used,
    reason = "test bodies panic with a line number (STYLE.md §7)"
)]
use std::net::{IpAddr, SocketAddr};
use std::process::Command;

use ambit_e2e::ops::ADMIN_TIMEOUT;
use ambit_e2e::{assert_eventually, testbed, Testbed, ECHO_PORT};
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
