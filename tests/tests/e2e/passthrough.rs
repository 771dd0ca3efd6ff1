//! Mesh-only capture (issue 9): an enrolled pod's connects outside the mesh go straight out of
//! the pod (counted in the kernel, never seen by the agent); mesh destinations are still
//! captured, and the kernel's list of them follows the inventory.
#![allow(
    clippy::unwrap_used,
    reason = "test bodies, also those `both_modes!` runs, panic with a line number (STYLE.md §7)"
)]
use std::net::IpAddr;
use std::process::Command;
use std::time::Duration;

use ambit_e2e::{
    assert_eventually, both_modes, testbed, Testbed, ECHO_PORT, HELLO, HTTP_PORT, PEER_PORT,
};
use nix::sys::signal::Signal;

/// Whether `node`'s pinned `amb_mesh_dsts` lists `ip`, asked of the kernel with bpftool (the
/// key is `struct amb_addr_key`: 16 address bytes, the family, 3 zero bytes).
fn mesh_listed(tb: &Testbed, node: &str, ip: IpAddr) -> bool {
    let (mut key, family) = match ip {
        IpAddr::V4(v4) => (v4.octets().to_vec(), 2u8),
        IpAddr::V6(v6) => (v6.octets().to_vec(), 10u8),
    };
    key.resize(16, 0);
    key.extend([family, 0, 0, 0]);
    let map = tb.node(node).pin_dir.join("amb_mesh_dsts");
    let out = Command::new("bpftool")
        .args(["-j", "map", "lookup", "pinned"])
        .arg(&map)
        .arg("key")
        .args(key.iter().map(|b| b.to_string()))
        .output()
        .expect("bpftool runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // bpftool -j prints the entry when found, `null` (exit 1) when not.
    if out.status.success() && stdout.contains("\"key\"") {
        return true;
    }
    assert!(
        stdout.trim() == "null" || stderr.contains("No such file or directory"),
        "bpftool lookup in {} failed oddly: {stdout} {stderr}",
        map.display()
    );
    false
}

/// Every address of `pod`.
fn addrs(tb: &Testbed, pod: &str) -> [IpAddr; 2] {
    let p = tb.pod(pod);
    [IpAddr::V4(p.ipv4), IpAddr::V6(p.ipv6)]
}

both_modes!(connects_outside_the_mesh_go_direct_and_mesh_ones_are_captured);
fn connects_outside_the_mesh_go_direct_and_mesh_ones_are_captured(tb: Testbed) {
    let client = tb.pod("client").clone();
    let legacy = tb.pod("legacy").clone();
    // The list holds the enrolled pods of both nodes, not the unenrolled ones.
    for ip in addrs(&tb, "client").into_iter().chain(addrs(&tb, "server")) {
        assert!(mesh_listed(&tb, "node1", ip), "node1 does not list {ip}");
    }
    for ip in addrs(&tb, "legacy")
        .into_iter()
        .chain(addrs(&tb, "outsider"))
    {
        assert!(!mesh_listed(&tb, "node1", ip), "node1 lists {ip}");
    }

    let passed = tb.kernel_counter("node1", "connect_passthrough");
    let redirects = tb.kernel_counter("node1", "connect4_redirect")
        + tb.kernel_counter("node1", "connect6_redirect");
    let accepted = tb.proxy_counter("node1", "client", "outbound_accepted");
    let pod_passed = tb.pod_counter("node1", "client", "passthrough");

    // Four connects outside the mesh, IPv4 and IPv6.
    let echo = tb
        .request("client", legacy.ip(false), ECHO_PORT, Some("direct"))
        .unwrap();
    assert_eq!(echo.data(), "direct", "{echo:?}");
    // Not redirected: the app's socket is bound to its pod address, not to loopback.
    let sock = echo.0["sock"].as_str().unwrap_or_default();
    assert!(sock.starts_with(&format!("{}:", client.ipv4)), "{echo:?}");
    let peer = tb
        .request("client", legacy.ip(false), PEER_PORT, None)
        .unwrap();
    assert!(
        peer.data().starts_with(&format!("peer={}:", client.ipv4)),
        "the server must see the client's own address: {peer:?}"
    );
    assert_eq!(
        tb.http_get("client", legacy.ip(false), HTTP_PORT, "/hello.txt")
            .unwrap(),
        HELLO
    );
    let v6 = tb
        .request("client", legacy.ip(true), ECHO_PORT, Some("direct6"))
        .unwrap();
    assert_eq!(v6.data(), "direct6", "{v6:?}");

    assert_eq!(
        tb.kernel_counter("node1", "connect_passthrough"),
        passed + 4,
        "node1 kernel: {:?}",
        tb.kernel_snapshot("node1")
    );
    assert_eq!(
        tb.pod_counter("node1", "client", "passthrough"),
        pod_passed + 4
    );
    assert_eq!(
        tb.kernel_counter("node1", "connect4_redirect")
            + tb.kernel_counter("node1", "connect6_redirect"),
        redirects,
        "a connect outside the mesh was redirected"
    );
    assert_eq!(
        tb.proxy_counter("node1", "client", "outbound_accepted"),
        accepted,
        "the agent saw a connection outside the mesh"
    );

    // A mesh destination is still captured and carried by both agents.
    let server = tb.pod("server").clone();
    let inbound = tb.proxy_counter("node2", "server", "inbound_accepted");
    let steered = tb.kernel_counter("node2", "lookup_steer");
    let echo = tb
        .request("client", server.ip(false), ECHO_PORT, Some("meshed"))
        .unwrap();
    assert_eq!(echo.data(), "meshed", "{echo:?}");
    assert_eq!(
        tb.kernel_counter("node1", "connect4_redirect")
            + tb.kernel_counter("node1", "connect6_redirect"),
        redirects + 1
    );
    assert_eventually!(
        tb.proxy_counter("node1", "client", "outbound_accepted") == accepted + 1,
        "node1 did not carry the mesh connection"
    );
    assert_eq!(
        tb.kernel_counter("node1", "connect_passthrough"),
        passed + 4
    );
    if tb.state().ca.is_some() {
        // mTLS: it arrived on node2's tunnel port (HBONE), not as captured plaintext.
        assert_eventually!(
            tb.proxy_counter("node2", "server", "inbound_accepted") == inbound + 1,
            "node2 did not accept the tunnelled connection"
        );
        assert_eq!(tb.kernel_counter("node2", "lookup_steer"), steered);
    } else {
        // Capture only: node2 captured the plaintext the client's agent sent.
        assert!(tb.kernel_counter("node2", "lookup_steer") > steered);
    }
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn the_kernel_list_follows_enrollment_in_the_inventory() {
    let mut tb = testbed();
    let legacy = tb.pod("legacy").clone();
    assert!(!mesh_listed(&tb, "node1", legacy.ip(false)));
    // `/status` shows the list's size (and that it is complete).
    let listed = |tb: &Testbed| {
        let mesh = &tb.admin_get("node1", "/status").unwrap()["mesh"];
        assert_eq!(mesh["capture_everything"], false, "{mesh}");
        mesh["destinations"].as_u64().unwrap()
    };
    let before = listed(&tb);

    tb.set_enrolled("legacy", true).unwrap();
    assert_eventually!(
        timeout = Duration::from_secs(15),
        addrs(&tb, "legacy")
            .iter()
            .all(|ip| mesh_listed(&tb, "node1", *ip)),
        "node1 never listed legacy as a mesh destination:\n{}",
        tb.agent_logs(20)
    );
    assert_eq!(listed(&tb), before + 2, "legacy's two addresses");
    assert_eventually!(
        timeout = Duration::from_secs(20),
        tb.status("node2").unwrap().pod_state("legacy") == Some("enrolled"),
        "node2 never enrolled legacy"
    );
    let passed = tb.kernel_counter("node1", "connect_passthrough");
    let redirects = tb.kernel_counter("node1", "connect4_redirect");
    let accepted = tb.proxy_counter("node1", "client", "outbound_accepted");
    // Now a mesh destination: captured, and (once legacy has its certificate) tunnelled.
    assert_eventually!(
        timeout = Duration::from_secs(20),
        tb.request("client", legacy.ip(false), ECHO_PORT, Some("meshed"))
            .is_ok_and(|r| r.data() == "meshed"),
        "client never reached the newly enrolled legacy:\n{}",
        tb.agent_logs(20)
    );
    assert!(tb.kernel_counter("node1", "connect4_redirect") > redirects);
    assert!(tb.proxy_counter("node1", "client", "outbound_accepted") > accepted);
    assert_eq!(tb.kernel_counter("node1", "connect_passthrough"), passed);

    tb.set_enrolled("legacy", false).unwrap();
    assert_eventually!(
        timeout = Duration::from_secs(15),
        addrs(&tb, "legacy")
            .iter()
            .all(|ip| !mesh_listed(&tb, "node1", *ip)),
        "node1 still lists legacy:\n{}",
        tb.agent_logs(20)
    );
    assert_eq!(listed(&tb), before);
    // The enrolled pods stay listed (the sync removed only what left).
    for ip in addrs(&tb, "client").into_iter().chain(addrs(&tb, "server")) {
        assert!(mesh_listed(&tb, "node1", ip), "node1 dropped {ip}");
    }
    assert_eventually!(
        timeout = Duration::from_secs(20),
        tb.status("node2").unwrap().pod("legacy").is_none(),
        "node2 still serves legacy"
    );
    let passed = tb.kernel_counter("node1", "connect_passthrough");
    let redirects = tb.kernel_counter("node1", "connect4_redirect");
    let echo = tb
        .request("client", legacy.ip(false), ECHO_PORT, Some("direct again"))
        .unwrap();
    assert_eq!(echo.data(), "direct again", "{echo:?}");
    assert_eq!(
        tb.kernel_counter("node1", "connect_passthrough"),
        passed + 1
    );
    assert_eq!(tb.kernel_counter("node1", "connect4_redirect"), redirects);
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn a_dead_agent_fails_mesh_destinations_closed_and_leaves_the_others_direct() {
    let mut tb = testbed();
    tb.stop_agent("node1", Signal::SIGKILL).unwrap();
    let server = tb.pod("server").clone();
    let seen = tb.peer_log("server").len();
    let reply = tb
        .request("client", server.ip(false), PEER_PORT, None)
        .unwrap();
    assert!(
        !reply.data().contains("peer="),
        "client reached a mesh pod without its agent: {reply:?}"
    );
    assert_eq!(
        tb.peer_log("server").len(),
        seen,
        "the server app accepted a connection: bypass"
    );
    // The pinned list outlives the agent, and so does pass-through.
    assert!(mesh_listed(&tb, "node1", server.ip(false)));
    let legacy = tb.pod("legacy").clone();
    let echo = tb
        .request("client", legacy.ip(false), ECHO_PORT, Some("still direct"))
        .unwrap();
    assert_eq!(echo.data(), "still direct", "{echo:?}");
}
