//! Inbound capture is decided by the pod's network namespace, not by the addresses the inventory
//! lists: from the unenrolled `legacy` pod (same node, same bridge) the server pod's IPv6
//! link-local address, a secondary IPv4 address added to its eth0 at run time and its pod IPs
//! all reach the agent. Under PERMISSIVE each is carried to the app (from the client's own
//! address) and counted; under STRICT each is refused and counted, and the app sees none.
#![allow(
    clippy::unwrap_used,
    reason = "test bodies panic with a line number (STYLE.md §7)"
)]
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use ambit_e2e::policy::PeerAuthentication as Pa;
use ambit_e2e::{testbed, unique_marker, Reply, Testbed, ECHO_PORT, PEER_PORT};

/// An address in node2's pod range that no pod has: added to the server's eth0 at run time.
const SECONDARY: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 250);

/// The IPv6 link-local address of `pod`'s eth0.
fn link_local(tb: &Testbed, pod: &str) -> Ipv6Addr {
    let argv = [
        "ip", "-6", "-o", "addr", "show", "dev", "eth0", "scope", "link",
    ];
    let out = tb.exec(pod, &argv, Duration::from_secs(10)).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .skip_while(|w| *w != "inet6")
        .nth(1)
        .and_then(|cidr| cidr.split('/').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("{pod} has no link-local address on eth0: {text}"))
}

/// A request from `legacy` to `host` (as the client script takes it: `fe80::1%eth0` works).
fn request(tb: &Testbed, host: &str, port: u16, send: Option<&str>) -> Reply {
    let mut args = vec!["request".to_string(), host.to_string(), port.to_string()];
    if let Some(s) = send {
        args.push(format!("--send={s}"));
    }
    Reply(tb.client("legacy", &args, Duration::from_secs(30)).unwrap())
}

/// The server's destinations: (what, host for the client, the address as the app's peer
/// report shows legacy's source for it).
fn destinations(tb: &Testbed) -> Vec<(&'static str, String, String)> {
    let (server, legacy) = (tb.pod("server"), tb.pod("legacy"));
    let (s_ll, l_ll) = (link_local(tb, "server"), link_local(tb, "legacy"));
    vec![
        (
            "link-local",
            format!("{s_ll}%eth0"),
            format!("peer=[{l_ll}"),
        ),
        (
            "secondary",
            SECONDARY.to_string(),
            format!("peer={}:", legacy.ipv4),
        ),
        (
            "pod IPv4",
            server.ipv4.to_string(),
            format!("peer={}:", legacy.ipv4),
        ),
        (
            "pod IPv6",
            server.ipv6.to_string(),
            format!("peer=[{}]:", legacy.ipv6),
        ),
    ]
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn every_address_of_an_enrolled_pod_is_policed() {
    let mut tb = testbed();
    // A secondary address, unknown to the inventory. It is in the bridge's /24, which is
    // on-link for legacy: legacy finds it by ARP, no route needed.
    let add = format!("{SECONDARY}/32");
    let argv = ["ip", "addr", "add", &add, "dev", "eth0"];
    let out = tb.exec("server", &argv, Duration::from_secs(10)).unwrap();
    assert!(out.status.success(), "ip addr add: {out:?}");
    let dsts = destinations(&tb);

    // STRICT: every address is refused, counted, and the app sees nothing.
    tb.apply(&Pa::new("default", "default").mode("STRICT").yaml())
        .unwrap();
    for (what, host, _) in &dsts {
        let denied = tb.proxy_counter("node2", "server", "inbound_denied");
        let seen = tb.peer_log("server").len();
        let echo = request(&tb, host, ECHO_PORT, Some("plain"));
        assert!(
            echo.data().is_empty(),
            "{what} ({host}): plaintext reached the app under STRICT: {echo:?}"
        );
        let report = request(&tb, host, PEER_PORT, None);
        assert!(
            !report.data().contains("peer="),
            "{what} ({host}): plaintext reached the app under STRICT: {report:?}"
        );
        assert_eq!(
            tb.proxy_counter("node2", "server", "inbound_denied") - denied,
            2,
            "{what} ({host}): refusals counted"
        );
        assert_eq!(tb.peer_log("server").len(), seen, "{what} ({host})");
    }
    // The enrolled client still gets through (mTLS): the refusals are STRICT's, not a broken path.
    let server = IpAddr::V4(tb.pod("server").ipv4);
    let echo = tb
        .request("client", server, ECHO_PORT, Some("mtls"))
        .unwrap();
    assert_eq!(echo.data(), "mtls");

    tb.delete("PeerAuthentication", "default", "default")
        .unwrap();
    // PERMISSIVE (no policy left): every address is carried by the agent to the app, from
    // legacy's own address, and counted.
    for (what, host, peer) in &dsts {
        let accepted = tb.proxy_counter("node2", "server", "inbound_accepted");
        let marker = unique_marker();
        let echo = request(&tb, host, ECHO_PORT, Some(&marker));
        assert_eq!(echo.data(), marker, "{what} ({host}): {echo:?}");
        assert_eq!(
            tb.proxy_counter("node2", "server", "inbound_accepted") - accepted,
            1,
            "{what} ({host}): the echo came back, but not through the agent"
        );
        let report = request(&tb, host, PEER_PORT, None);
        assert!(
            report.data().starts_with(peer.as_str()),
            "{what} ({host}): the app saw {:?}, want {peer}...",
            report.data()
        );
    }
}
