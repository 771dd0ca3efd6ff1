//! The CNI chain with a running agent: a pod whose netns only the chain reports (Debian's
//! `bridge` + `host-local`, then `ambit-cni`, run as a runtime does) is captured and tunnelled
//! over mTLS with its own identity, re-enrolled from the pod map after an agent restart, and
//! unenrolled by CNI DEL.
#![allow(
    clippy::unwrap_used,
    reason = "test bodies panic with a line number (STYLE.md §7)"
)]
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use ambit_e2e::cni;
use ambit_e2e::{assert_eventually, testbed_with, Options, Testbed, ECHO_PORT, PEER_PORT};
use nix::sys::signal::Signal;

/// The pod map file of `node`'s agent, parsed.
fn pod_map(tb: &Testbed, node: &str) -> serde_json::Value {
    let path = cni::pod_map(tb.state(), tb.node(node));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// An echo of `text` from `pod` to the server pod comes back whole.
fn assert_echo(tb: &Testbed, pod: &str, text: &str) {
    let server = IpAddr::V4(tb.pod("server").ipv4);
    let r = tb.request(pod, server, ECHO_PORT, Some(text)).unwrap();
    assert_eq!(r.data(), text, "{r:?}\n{}", tb.agent_logs(30));
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn a_pod_set_up_by_the_cni_chain_is_captured_tunnelled_and_released() {
    let mut tb = testbed_with(Options {
        cni: true,
        ..Options::default()
    });
    let sandbox = tb.add_cni_pod("cnipod", "node1").unwrap();
    let pod = sandbox.pod.clone();
    let ip = IpAddr::V4(pod.ipv4);
    assert!(cni::in_range(1, ip), "host-local gave {ip}");
    assert!(
        cni::pod_map(tb.state(), tb.node("node1")).exists(),
        "no pod map"
    );

    // ADD returned only once the agent had the pod enrolled, with the netns and address from
    // the chain (the inventory lists the pod with neither).
    let st = tb.status("node1").unwrap();
    let entry = st.pod("cnipod").unwrap_or_else(|| panic!("{}", st.0));
    assert_eq!(entry["state"], "enrolled", "{entry}");
    assert_eq!(
        entry["netns"].as_str().map(Path::new),
        Some(pod.netns_path().as_path())
    );
    assert_eq!(entry["ips"], serde_json::json!([ip.to_string()]), "{entry}");
    let map = pod_map(&tb, "node1");
    assert_eq!(map["pods"][0]["pod"]["name"], "cnipod", "{map}");
    assert_eq!(map["pods"][0]["containerId"], sandbox.container_id.as_str());
    tb.report_cni_pod_ip(&sandbox).unwrap();

    // Its traffic to node2's server is captured and carried over mTLS with its identity; the
    // server app sees the pod's own address.
    let redirected = tb.pod_counter("node1", "cnipod", "redirected");
    let marker = ambit_e2e::unique_marker();
    assert_echo(&tb, "cnipod", &marker);
    let server = IpAddr::V4(tb.pod("server").ipv4);
    let peer = tb.request("cnipod", server, PEER_PORT, None).unwrap();
    assert!(peer.data().starts_with(&format!("peer={ip}:")), "{peer:?}");
    assert!(
        tb.pod_counter("node1", "cnipod", "redirected") >= redirected + 2,
        "{:?}",
        tb.status("node1").unwrap().pod("cnipod")
    );
    let held = tb.hold("cnipod", server, ECHO_PORT, &marker).unwrap();
    assert_eq!(held.reply.data(), marker);
    let (me, them) = (pod.identity(), tb.pod("server").identity());
    assert_eventually!(
        tb.connections("node1").unwrap().iter().any(|c| {
            c.direction == "outbound"
                && c.pod == "default/cnipod"
                && c.security == "mutual_tls"
                && c.dst_identity.as_deref() == Some(them.as_str())
        }),
        "node1 does not list cnipod's mTLS connection: {:?}",
        tb.connections("node1")
    );
    assert_eventually!(
        tb.connections("node2").unwrap().iter().any(|c| {
            c.direction == "inbound"
                && c.pod == "default/server"
                && c.security == "mutual_tls"
                && c.src_identity.as_deref() == Some(me.as_str())
                && c.src.starts_with(&ip.to_string())
                && c.bytes_sent >= marker.len() as u64
        }),
        "node2 does not list the inbound mTLS connection from {me}: {:?}",
        tb.connections("node2")
    );
    drop(held);

    // A restarted agent finds the pod again from its pod map, without the runtime calling.
    tb.stop_agent("node1", Signal::SIGTERM).unwrap();
    tb.start_agent("node1").unwrap();
    tb.wait_agents_ready(Duration::from_secs(30)).unwrap();
    assert_eq!(
        tb.status("node1").unwrap().pod_state("cnipod"),
        Some("enrolled")
    );
    assert_echo(&tb, "cnipod", "after restart");

    // DEL releases it: the map forgets the sandbox and the agent stops serving the pod,
    // although the Pod is still listed and its namespace still exists.
    tb.del_cni_pod(&sandbox).unwrap();
    assert_eq!(pod_map(&tb, "node1")["pods"], serde_json::json!([]));
    assert_eventually!(
        tb.status("node1").unwrap().pod("cnipod").is_none(),
        "node1 still serves cnipod after CNI DEL: {}",
        tb.status("node1").unwrap().0["pods"]
    );
    assert!(pod.netns_path().exists());
    // The other pods are untouched.
    assert_echo(&tb, "client", "client after del");
}
