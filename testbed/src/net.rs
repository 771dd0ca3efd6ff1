//! Network plumbing with `ip`: node and pod namespaces, bridges, the underlay, routes.
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};

use crate::cmd::{self, ip, SETUP_TIMEOUT};
use crate::state::{Node, Pod};

/// Node `index`'s bridge address (the pods' IPv4 gateway): `10.<index>.0.1`.
pub fn gateway_v4(index: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, index, 0, 1)
}

/// Node `index`'s bridge IPv6 address: `fd00:<index>::1`.
pub fn gateway_v6(index: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, index.into(), 0, 0, 0, 0, 0, 1)
}

/// The `host`th address in node `index`'s IPv4 pod range: `10.<index>.0.<host>`.
pub fn pod_v4(index: u8, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, index, 0, host)
}

/// The `host`th address in node `index`'s IPv6 pod range: `fd00:<index>::<host>`.
pub fn pod_v6(index: u8, host: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, index.into(), 0, 0, 0, 0, 0, host.into())
}

/// Node `index`'s underlay IPv4 address: `192.168.254.<index>/30`.
pub fn underlay_v4(index: u8) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 254, index)
}

/// Node `index`'s underlay IPv6 address: `fd00:ff::<index>/64`.
pub fn underlay_v6(index: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0xff, 0, 0, 0, 0, 0, index.into())
}

/// Creates the named network namespace with `lo` up.
pub fn add_netns(name: &str) -> Result<()> {
    ip(&["netns", "add", name])?;
    ip(&["-n", name, "link", "set", "lo", "up"])?;
    Ok(())
}

/// Deletes the named network namespace; a missing one is fine.
pub fn delete_netns(name: &str) -> Result<()> {
    if !crate::state::netns_path(name).exists() {
        return Ok(());
    }
    ip(&["netns", "del", name]).map(drop)
}

/// Sets sysctls (`key=value`, dotted keys) inside the namespace at `netns_path`.
pub fn sysctl(netns_path: &Path, settings: &[&str]) -> Result<()> {
    let mut script = String::from("set -e");
    for s in settings {
        let (key, value) = s
            .split_once('=')
            .context("sysctl setting needs `key=value`")?;
        script.push_str(&format!(
            "; echo {value} > /proc/sys/{}",
            key.replace('.', "/")
        ));
    }
    let mut c = Command::new("nsenter");
    c.arg(format!("--net={}", netns_path.display()))
        .args(["--", "sh", "-c", &script]);
    cmd::check(&mut c, SETUP_TIMEOUT).map(drop)
}

/// Builds a node: its namespace, forwarding, and a bridge `br0` that is its pods' gateway.
pub fn setup_node(node: &Node) -> Result<()> {
    let ns = node.netns.as_str();
    add_netns(ns)?;
    sysctl(
        &node.netns_path(),
        &["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"],
    )?;
    // A bridge without an address of its own takes the lowest MAC of its ports, so a pod added
    // at run time can change the gateway's MAC under the pods that already resolved it: their
    // frames to the old MAC are dropped until their neighbour entry expires (seen as stalled
    // connections from old pods right after a new pod joined). A set address never changes.
    let mac = format!("02:a6:b1:00:00:{:02x}", node.index);
    ip(&[
        "-n", ns, "link", "add", "br0", "address", &mac, "type", "bridge",
    ])?;
    let gw4 = format!("{}/24", gateway_v4(node.index));
    let gw6 = format!("{}/64", gateway_v6(node.index));
    ip(&["-n", ns, "addr", "add", &gw4, "dev", "br0"])?;
    ip(&["-n", ns, "addr", "add", &gw6, "dev", "br0", "nodad"])?;
    ip(&["-n", ns, "link", "set", "br0", "up"])?;
    Ok(())
}

/// Joins two nodes with a veth pair `ul0` and routes each one's pod ranges via the other.
pub fn link_nodes(a: &Node, b: &Node) -> Result<()> {
    ip(&[
        "-n", &a.netns, "link", "add", "ul0", "type", "veth", "peer", "name", "ul0", "netns",
        &b.netns,
    ])?;
    for (me, peer) in [(a, b), (b, a)] {
        let ns = me.netns.as_str();
        let (v4, v6) = (me.underlay_v4, me.underlay_v6);
        address_up(ns, "ul0", &format!("{v4}/30"), &format!("{v6}/64"))?;
        let cidr4 = format!("10.{}.0.0/24", peer.index);
        let cidr6 = format!("fd00:{}::/64", peer.index);
        routes_via(ns, (&cidr4, peer.underlay_v4), (&cidr6, peer.underlay_v6))?;
    }
    Ok(())
}

/// Builds a pod: namespace, veth `eth0` into its node's bridge, addresses and default routes.
/// The routing that returns the app's replies to the agent's delivery sockets is the agent's to
/// install when it enrolls the pod (docs/inbound-delivery.md), as on a Kubernetes node.
pub fn setup_pod(pod: &Pod, node: &Node, host: u8) -> Result<()> {
    let ns = pod.netns.as_str();
    let node_ns = node.netns.as_str();
    let port = format!("vp{host}");
    add_netns(ns)?;
    ip(&[
        "-n", node_ns, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", ns,
    ])?;
    ip(&["-n", node_ns, "link", "set", &port, "master", "br0", "up"])?;
    let (v4, v6) = (pod.ipv4, pod.ipv6);
    address_up(ns, "eth0", &format!("{v4}/24"), &format!("{v6}/64"))?;
    routes_via(
        ns,
        ("default", gateway_v4(node.index)),
        ("default", gateway_v6(node.index)),
    )
}

/// Gives `dev` in netns `ns` the addresses `v4` and `v6` (with prefix lengths; no duplicate
/// address detection) and sets it up.
fn address_up(ns: &str, dev: &str, v4: &str, v6: &str) -> Result<()> {
    ip(&["-n", ns, "addr", "add", v4, "dev", dev])?;
    ip(&["-n", ns, "addr", "add", v6, "dev", dev, "nodad"])?;
    ip(&["-n", ns, "link", "set", dev, "up"]).map(drop)
}

/// Routes `v4.0` via `v4.1` and `v6.0` via `v6.1` in netns `ns`.
fn routes_via(ns: &str, v4: (&str, Ipv4Addr), v6: (&str, Ipv6Addr)) -> Result<()> {
    ip(&["-n", ns, "route", "add", v4.0, "via", &v4.1.to_string()])?;
    ip(&[
        "-n",
        ns,
        "-6",
        "route",
        "add",
        v6.0,
        "via",
        &v6.1.to_string(),
    ])
    .map(drop)
}

/// TCP ports listening in the namespace at `netns_path` (from `ss -Hltn`).
pub fn listening_ports(netns_path: &Path) -> Result<Vec<u16>> {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net={}", netns_path.display()))
        .args(["--", "ss", "-Hltn"]);
    let out = cmd::check(&mut c, SETUP_TIMEOUT)?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3))
        .filter_map(|local| local.rsplit_once(':').and_then(|(_, p)| p.parse().ok()))
        .collect())
}
