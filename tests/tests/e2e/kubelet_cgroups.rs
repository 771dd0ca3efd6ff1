//! Attachment on a kubelet node: the agent finds `kubepods.slice` / `kubepods` itself, attaches
//! there once, stays in its own pod's cgroup, and enrolled pods in kubelet's nested cgroups are
//! captured and tunnelled.
#![allow(
    clippy::unwrap_used,
    reason = "test bodies panic with a line number (STYLE.md §7)"
)]
use std::net::IpAddr;
use std::path::Path;
use std::process::Command;

use ambit_e2e::kubelet::CgroupDriver;
use ambit_e2e::{assert_eventually, testbed_with, Options, Testbed, ECHO_PORT, PEER_PORT};

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn systemd_driver_pods_are_found_captured_and_tunnelled() {
    kubelet_node(CgroupDriver::Systemd);
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn cgroupfs_driver_pods_are_found_captured_and_tunnelled() {
    kubelet_node(CgroupDriver::Cgroupfs);
}

fn kubelet_node(driver: CgroupDriver) {
    let tb = testbed_with(Options {
        kubelet_cgroups: Some(driver),
        ..Options::default()
    });
    for node in ["node1", "node2"] {
        let n = tb.state().node(node).unwrap();
        let pods_root = driver.pods_root(&n.cgroup);
        // The kernel programs sit on kubelet's root (found, not configured) and nowhere below.
        let attached = cgroup_programs(&pods_root);
        for kind in ["connect4", "connect6", "sock_ops", "getsockopt"] {
            assert!(
                attached.contains(kind),
                "{node}: no {kind} program on {}:\n{attached}",
                pods_root.display()
            );
        }
        assert!(
            cgroup_programs(&n.cgroup).trim().is_empty(),
            "{node}: programs attached above the pods' root: {}",
            cgroup_programs(&n.cgroup)
        );
        // The agent did not move itself: it is still in its own pod's container cgroup.
        let pid = tb.agent_pid(node).unwrap();
        let procs = std::fs::read_to_string(n.agent_cgroup.join("cgroup.procs")).unwrap();
        assert!(
            procs.lines().any(|l| l.trim() == pid.to_string()),
            "{node}: agent pid {pid} left {} (it lists {procs:?})",
            n.agent_cgroup.display()
        );
    }
    assert_tunnelled(&tb);
}

/// client (node1) → server (node2) goes through both agents over mTLS, and the app sees the
/// client's address.
fn assert_tunnelled(tb: &Testbed) {
    let server = IpAddr::V4(tb.pod("server").ipv4);
    let redirects = tb.kernel_counter("node1", "connect4_redirect");
    let echo = tb
        .request("client", server, ECHO_PORT, Some("kubelet"))
        .unwrap();
    assert_eq!(echo.data(), "kubelet", "{echo:?}");
    let peer = tb.request("client", server, PEER_PORT, None).unwrap();
    assert!(peer.data().starts_with("peer=10.1.0.2:"), "{peer:?}");
    assert_eventually!(
        tb.kernel_counter("node1", "connect4_redirect") >= redirects + 2,
        "node1 kernel: {:?}",
        tb.kernel_snapshot("node1")
    );
    let held = tb.hold("client", server, ECHO_PORT, "held").unwrap();
    assert_eq!(held.reply.data(), "held");
    assert_eventually!(
        tb.connections("node2")
            .unwrap()
            .iter()
            .any(|c| c.direction == "inbound"
                && c.pod == "default/server"
                && c.security == "mutual_tls"
                && c.src_identity.as_deref()
                    == Some("spiffe://cluster.local/ns/default/sa/client")),
        "node2 lists no mTLS connection from the client: {:?}",
        tb.connections("node2")
    );
    drop(held);
}

/// `bpftool cgroup show DIR`: the programs attached directly at `dir`.
fn cgroup_programs(dir: &Path) -> String {
    let out = Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bpftool cgroup show {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
