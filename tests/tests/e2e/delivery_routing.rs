//! The agent's per-pod delivery routing (fwmark rule, `local` route, sysctls): installed when a
//! pod is enrolled, whatever reported it (the testbed installs none, as a Kubernetes node has
//! none), so a pod added through the CNI chain serves HBONE and plaintext inbound with the
//! client's own address; not duplicated by a restart; removed once the pod is unenrolled and
//! its delivered connections are closed; and a pod whose routing cannot be set up is not
//! enrolled at all.
#![allow(
    clippy::unwrap_used,
    reason = "test bodies panic with a line number (STYLE.md §7)"
)]
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ambit::config::{DEFAULT_DELIVER_MARK, DEFAULT_DELIVER_TABLE};
use ambit_e2e::{
    assert_eventually, net, testbed, testbed_with, Options, Testbed, ECHO_PORT, PEER_PORT,
};
use nix::sys::signal::Signal;
use serde_json::Value;

/// The sysctls the agent sets, under `/proc/sys/net`.
const SYSCTLS: [&str; 3] = [
    "ipv4/tcp_fwmark_accept",
    "ipv4/fwmark_reflect",
    "ipv6/fwmark_reflect",
];

/// What `ip` and `/proc/sys/net` show of the delivery routing in one network namespace.
#[derive(Debug, PartialEq, Eq)]
struct Routing {
    /// `fwmark 0x53a lookup 100 pref 100` rules, IPv4 and IPv6.
    rules: (usize, usize),
    /// `local default dev lo` routes in table 100, IPv4 and IPv6.
    routes: (usize, usize),
    /// The values of [`SYSCTLS`].
    sysctls: Vec<String>,
}

impl Routing {
    /// Exactly what the agent installs.
    fn installed() -> Self {
        Self {
            rules: (1, 1),
            routes: (1, 1),
            sysctls: vec!["1".into(); 3],
        }
    }
}

/// Runs `argv` in `netns` (not in any pod's cgroup: `ip` and `cat` make no connection).
fn run_in(netns: &Path, argv: &[&str]) -> String {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .arg("--")
        .args(argv)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{argv:?} in {}: {}",
        netns.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `ip -j ARGS` in `netns`, parsed.
fn ip_json(netns: &Path, args: &[&str]) -> Vec<Value> {
    let mut argv = vec!["ip", "-j"];
    argv.extend_from_slice(args);
    let text = run_in(netns, &argv);
    if text.trim().is_empty() {
        return Vec::new();
    }
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("ip {args:?}: {e}: {text}"))
}

/// The delivery routing in the namespace at `netns`, as `ip` and `/proc/sys/net` show it.
fn routing(netns: &Path) -> Routing {
    let mark = format!("{DEFAULT_DELIVER_MARK:#x}");
    let table = DEFAULT_DELIVER_TABLE.to_string();
    let rules = |family| {
        ip_json(netns, &[family, "rule", "show"])
            .iter()
            .filter(|r| {
                r["fwmark"] == mark.as_str()
                    && r["table"] == table.as_str()
                    && r["priority"] == 100
                    && r.get("action").is_none()
            })
            .count()
    };
    let routes = |family| {
        // `show table 100` fails while the table does not exist.
        ip_json(netns, &[family, "route", "show", "table", "all"])
            .iter()
            .filter(|r| {
                r["table"] == table.as_str()
                    && r["type"] == "local"
                    && r["dst"] == "default"
                    && r["dev"] == "lo"
            })
            .count()
    };
    let paths: Vec<String> = SYSCTLS
        .iter()
        .map(|s| format!("/proc/sys/net/{s}"))
        .collect();
    let mut cat = vec!["cat"];
    cat.extend(paths.iter().map(String::as_str));
    Routing {
        rules: (rules("-4"), rules("-6")),
        routes: (routes("-4"), routes("-6")),
        sysctls: run_in(netns, &cat).lines().map(str::to_string).collect(),
    }
}

/// The routing of pod `pod`.
fn pod_routing(tb: &Testbed, pod: &str) -> Routing {
    routing(&tb.pod(pod).netns_path())
}

/// `ambit_delivery_routing_failures_total{op}` of `node`'s agent.
fn failures(tb: &Testbed, node: &str, op: &str) -> f64 {
    tb.metrics(node)
        .unwrap()
        .sum("ambit_delivery_routing_failures_total", &[("op", op)])
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn a_cni_pod_serves_inbound_with_the_clients_address_through_routing_the_agent_installed() {
    let mut tb = testbed_with(Options {
        cni: true,
        ..Options::default()
    });
    let sandbox = tb.add_cni_pod("cnisrv", "node2").unwrap();
    tb.report_cni_pod_ip(&sandbox).unwrap();
    let netns = sandbox.pod.netns_path();
    let ip = IpAddr::V4(sandbox.pod.ipv4);

    // The agent installed the routing in the pod; neither the testbed nor the CNI chain has,
    // and the node's own namespace (where the agent runs and wrote the sysctls) is untouched:
    // a net sysctl belongs to the namespace of the thread that opens it.
    assert_eq!(
        routing(&netns),
        Routing::installed(),
        "{}",
        tb.agent_logs(30)
    );
    assert_eq!(
        pod_routing(&tb, "legacy"),
        Routing {
            rules: (0, 0),
            routes: (0, 0),
            sysctls: vec!["0".into(); 3]
        },
        "an unenrolled pod on the same node gets nothing"
    );
    assert_eq!(
        routing(&tb.node("node2").netns_path()).sysctls,
        vec!["0"; 3]
    );

    // HBONE from an enrolled pod on node1: the app sees the client pod's own address.
    let _server = tb.start_peer_server("cnisrv").unwrap();
    let client_ip = tb.pod("client").ipv4;
    let r = tb.request("client", ip, PEER_PORT, None).unwrap();
    assert!(
        r.data().starts_with(&format!("peer={client_ip}:")),
        "{r:?}\n{}",
        tb.agent_logs(30)
    );
    // Plaintext from a pod outside the mesh, steered to 15006 and delivered the same way.
    let outsider_ip = tb.pod("outsider").ipv4;
    let r = tb.request("outsider", ip, PEER_PORT, None).unwrap();
    assert!(
        r.data().starts_with(&format!("peer={outsider_ip}:")),
        "{r:?}\n{}",
        tb.agent_logs(30)
    );
    // Both went through node2's agent, one over mTLS from the client's identity, one plaintext.
    let m = tb.metrics("node2").unwrap();
    let opened = |security: &str, principal: &str| {
        m.sum(
            "istio_tcp_connections_opened_total",
            &[
                ("reporter", "destination"),
                ("destination_workload", "cnisrv"),
                ("connection_security_policy", security),
                ("source_principal", principal),
            ],
        )
    };
    let client_id = tb.pod("client").identity();
    assert!(opened("mutual_tls", &client_id) >= 1.0, "{m:?}");
    assert!(opened("none", "unknown") >= 1.0, "{m:?}");

    // A second copy of the rule (another installer's: the kernel refuses an exact duplicate
    // only to a request with NLM_F_EXCL, and tells copies apart by protocol) is seen, and a
    // restarted agent converges on one: it neither fails on the existing routing nor adds to it.
    run_in(
        &netns,
        &[
            "ip", "-4", "rule", "add", "fwmark", "0x53a", "lookup", "100", "pref", "100",
            "protocol", "static",
        ],
    );
    assert_eq!(routing(&netns).rules, (2, 1));
    tb.stop_agent("node2", Signal::SIGTERM).unwrap();
    tb.start_agent("node2").unwrap();
    tb.wait_agents_ready(Duration::from_secs(30)).unwrap();
    assert_eq!(
        tb.status("node2").unwrap().pod_state("cnisrv"),
        Some("enrolled")
    );
    assert_eq!(
        routing(&netns),
        Routing::installed(),
        "{}",
        tb.agent_logs(30)
    );
    let r = tb.request("client", ip, PEER_PORT, None).unwrap();
    assert!(r.data().starts_with(&format!("peer={client_ip}:")), "{r:?}");
    assert_eq!(failures(&tb, "node2", "install"), 0.0);

    // CNI DEL unenrolls the pod: its rules and routes go (the sysctls stay, inert without
    // marked packets), while its namespace still exists.
    tb.del_cni_pod(&sandbox).unwrap();
    assert_eventually!(
        tb.status("node2").unwrap().pod("cnisrv").is_none(),
        "node2 still serves cnisrv after CNI DEL"
    );
    assert_eventually!(
        timeout = Duration::from_secs(20),
        routing(&netns).rules == (0, 0) && routing(&netns).routes == (0, 0),
        "routing left after unenrollment: {:?}\n{}",
        routing(&netns),
        tb.agent_logs(30)
    );
    assert!(netns.exists());
    assert_eq!(failures(&tb, "node2", "remove"), 0.0);
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn routing_outlives_unenrollment_until_the_delivered_connections_close() {
    let mut tb = testbed();
    let server_ip = IpAddr::V4(tb.pod("server").ipv4);
    assert_eq!(pod_routing(&tb, "server"), Routing::installed());
    let marker = ambit_e2e::unique_marker();
    let held = tb.hold("client", server_ip, ECHO_PORT, &marker).unwrap();
    assert_eq!(held.reply.data(), marker);

    tb.set_enrolled("server", false).unwrap();
    assert_eventually!(
        tb.status("node2").unwrap().pod("server").is_none(),
        "node2 still serves server"
    );
    // The app's replies on the held connection still need the rule: it stays across several
    // reconciles (every 2 s) while the connection is open.
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        assert_eq!(
            pod_routing(&tb, "server").rules,
            (1, 1),
            "rule removed under an open delivered connection"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    drop(held);
    assert_eventually!(
        timeout = Duration::from_secs(20),
        pod_routing(&tb, "server").rules == (0, 0),
        "routing left after the last connection closed: {:?}\n{}",
        pod_routing(&tb, "server"),
        tb.agent_logs(30)
    );
    assert_eq!(pod_routing(&tb, "server").routes, (0, 0));

    // Enrolled again: installed again, and delivery works.
    tb.set_enrolled("server", true).unwrap();
    assert_eventually!(
        tb.status("node2").unwrap().pod_state("server") == Some("enrolled"),
        "server not enrolled again"
    );
    assert_eq!(pod_routing(&tb, "server"), Routing::installed());
    let client_ip = tb.pod("client").ipv4;
    let r = tb.request("client", server_ip, PEER_PORT, None).unwrap();
    assert!(r.data().starts_with(&format!("peer={client_ip}:")), "{r:?}");
}

/// A read-only bind mount of the host's `/proc/sys/net`, as a container without the hostPath
/// mount sees it; unmounted on drop.
struct ReadOnlySysctls(PathBuf);

impl ReadOnlySysctls {
    fn new(dir: PathBuf) -> Self {
        std::fs::create_dir_all(&dir).unwrap();
        let mount = |args: &[&str]| {
            let out = Command::new("mount").args(args).output().unwrap();
            assert!(out.status.success(), "mount {args:?}: {out:?}");
        };
        let at = dir.to_str().unwrap().to_string();
        let at = at.as_str();
        mount(&["--bind", "/proc/sys/net", at]);
        let guard = Self(dir);
        mount(&["-o", "remount,bind,ro", at]);
        guard
    }
}

impl Drop for ReadOnlySysctls {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn a_pod_whose_routing_cannot_be_set_up_is_not_enrolled() {
    let mut tb = testbed();
    let ro = ReadOnlySysctls::new(tb.state().dir.join("ro-proc-sys-net"));
    assert!(
        std::fs::write(ro.0.join("ipv4/tcp_fwmark_accept"), "1").is_err(),
        "the bind mount is writable"
    );
    tb.restart_agent_with("node1", &format!("procSysNet: {}", ro.0.display()))
        .unwrap();
    // The sysctls of the pods the first agent set up already read 1: nothing to write, they
    // stay enrolled.
    assert_eq!(
        tb.status("node1").unwrap().pod_state("client"),
        Some("enrolled")
    );

    // A pod that was never set up needs the writes, which fail: the pod is not enrolled, the
    // error names it and what failed, the failure is counted, and nothing of the pod is
    // half-set-up: no listener, no rule.
    assert_eq!(pod_routing(&tb, "outsider").sysctls, vec!["0"; 3]);
    tb.set_enrolled("outsider", true).unwrap();
    assert_eventually!(
        tb.status("node1").unwrap().pod_state("outsider") == Some("failed"),
        "outsider not reported failed: {:?}",
        tb.status("node1").unwrap().pod("outsider")
    );
    let st = tb.status("node1").unwrap();
    let error = st.pod("outsider").unwrap()["error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        error.contains("delivery routing of pod default/outsider")
            && error.contains("tcp_fwmark_accept")
            && error.contains("Read-only file system"),
        "{error}"
    );
    assert!(failures(&tb, "node1", "install") >= 1.0);
    let ports = net::listening_ports(&tb.pod("outsider").netns_path()).unwrap();
    for p in [15001, 15006, 15008] {
        assert!(!ports.contains(&p), "outsider listens on {p}: {ports:?}");
    }
    assert_eq!(pod_routing(&tb, "outsider").rules, (0, 0));

    // With the host's /proc/sys/net writable again the pod is enrolled (the manager retries).
    tb.restart_agent_with("node1", "").unwrap();
    drop(ro);
    assert_eventually!(
        tb.status("node1").unwrap().pod_state("outsider") == Some("enrolled"),
        "outsider not enrolled with writable sysctls"
    );
    assert_eq!(pod_routing(&tb, "outsider"), Routing::installed());
}
