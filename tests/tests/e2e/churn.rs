//! Pod churn: pods are created (own netns, enrolled) and deleted again, round after round,
//! while a connection between two other pods stays open and busy. Afterwards neither agent
//! keeps anything of the removed pods: no pinned map entry names their netns cookies, no
//! sk_lookup link or pin is left, their namespaces are freed (nothing holds them: the veth
//! disappears), the agents' listeners were gone from them before they were deleted, and the
//! agents' fd counts are back to baseline. The surviving connection never missed an echo.
#![allow(
    clippy::unwrap_used,
    reason = "test bodies panic with a line number (STYLE.md §7)"
)]
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use ambit_e2e::churn::Removal;
use ambit_e2e::leaks::{self, Usage};
use ambit_e2e::net::listening_ports;
use ambit_e2e::{eventually, testbed, PodSpec, Testbed, ECHO_PORT};
use serde_json::Value;

/// Rounds of churn; each adds and removes one pod per node.
const ROUNDS: usize = 6;
/// Echo port of the `many.py` server in the churned server pods.
const PORT: u16 = 9100;
/// fds an agent may hold above baseline afterwards (a pooled tunnel connection, timers).
const FD_SLACK: usize = 8;
/// The agents' pinned maps that are keyed by, or point to, a pod's netns cookie.
const MAPS: &[&str] = &["amb_pods", "amb_pod_stats", "amb_listeners", "amb_conns"];

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn churned_pods_leave_no_kernel_state_listeners_or_fds_behind() {
    // Default limits: tunnel connections of a removed pod must go with it, not after the
    // 5-minute idle timeout.
    let mut tb = testbed();
    let server = IpAddr::V4(tb.pod("server").ipv4);
    // The survivor: one connection client -> server, an echo every 100 ms throughout.
    let mut pinger = tb
        .start_load_script(
            "client",
            &[
                "ping".into(),
                server.to_string(),
                ECHO_PORT.to_string(),
                "--interval=0.1".into(),
                "--seconds=600".into(),
            ],
        )
        .unwrap();
    pinger
        .wait_line(Duration::from_secs(20), |v| v.get("ping").cloned())
        .unwrap();
    let base = [usage(&tb, "node1"), usage(&tb, "node2")];
    let kept = enrolled_cookies(&tb);
    let t0 = Instant::now();

    let mut removed = Vec::new();
    for round in 0..ROUNDS {
        let order = if round % 2 == 0 {
            Removal::InventoryFirst
        } else {
            Removal::NetnsFirst
        };
        let (c, s) = (format!("churnc{round}"), format!("churns{round}"));
        tb.add_pod(&PodSpec::new(&c, "node1", true, false)).unwrap();
        let s_pod = tb.add_pod(&PodSpec::new(&s, "node2", true, false)).unwrap();
        tb.wait_agents_ready(Duration::from_secs(60)).unwrap();
        let echo = tb.start_many_server(&s, PORT).unwrap();
        // Traffic out of, into and between the new pods: kernel entries, pooled tunnels.
        let s_ip = IpAddr::V4(s_pod.ipv4);
        for (from, to, port) in [
            (c.as_str(), server, ECHO_PORT),
            ("client", s_ip, PORT),
            (c.as_str(), s_ip, PORT),
        ] {
            let msg = format!("round {round} {from}");
            let r = tb.request(from, to, port, Some(&msg)).unwrap();
            assert_eq!(r.data(), msg, "{from} -> {to}:{port}: {r:?}");
        }
        let cookies = [cookie(&tb, "node1", &c), cookie(&tb, "node2", &s)];
        drop(echo);
        for name in [&c, &s] {
            tb.remove_pod(name, order, |_, pod| {
                // The agent no longer serves the pod: none of its ports listen there.
                let ports = listening_ports(&pod.netns_path())?;
                let agent: Vec<u16> = ports
                    .into_iter()
                    .filter(|p| [15001, 15006, 15008].contains(p))
                    .collect();
                anyhow::ensure!(
                    agent.is_empty(),
                    "agent ports {agent:?} still listen in unenrolled pod {}",
                    pod.name
                );
                Ok(())
            })
            .unwrap();
        }
        removed.push((tb.pod(&c).clone(), cookies[0]));
        removed.push((tb.pod(&s).clone(), cookies[1]));
    }
    let churn_time = t0.elapsed();

    // Every removed pod's namespace is freed: nothing of the agents holds it.
    for (pod, _) in &removed {
        assert!(
            eventually(Duration::from_secs(30), || (!tb
                .pod_veth_exists(pod)
                .unwrap())
            .then_some(()))
            .is_some(),
            "the namespace of removed pod {} is still alive 30 s later (its veth exists): \
             something holds it\n{}",
            pod.name,
            tb.agent_logs(20)
        );
    }
    // Kernel state: only the pods still enrolled.
    let gone: Vec<u64> = removed.iter().map(|(_, c)| *c).collect();
    for node in ["node1", "node2"] {
        let pins = tb.node(node).pin_dir.clone();
        // The agent removes a pod's entries once it sees the pod gone from the inventory (or
        // its netns gone, polled every 2 s); under qemu TCG that takes seconds, so wait for it.
        let _ = eventually(Duration::from_secs(30), || {
            stale_entries(&pins, &gone).is_empty().then_some(())
        });
        let left = stale_entries(&pins, &gone);
        assert!(
            left.is_empty(),
            "{node}: stale map entries 30 s after: {left:#?}"
        );
        let pods: BTreeSet<u64> = key_cookies(&pins.join("amb_pods"));
        assert_eq!(
            pods,
            kept[node_index(node)],
            "{node}: amb_pods keys are not the enrolled pods' cookies"
        );
        let lookups = lookup_pins(&pins);
        assert_eq!(
            lookups,
            kept[node_index(node)],
            "{node}: sk_lookup pins are not the enrolled pods'"
        );
    }
    // sk_lookup links in the kernel: one per enrolled pod, none for a removed netns.
    let links = sk_lookup_links(&tb);
    assert_eq!(
        links.len(),
        kept[0].len() + kept[1].len(),
        "sk_lookup links of our programs: {links:#?}"
    );
    // fds back to baseline once the removed pods' tunnels idled out.
    let after = eventually(Duration::from_secs(30), || {
        let now = [usage(&tb, "node1"), usage(&tb, "node2")];
        (0..2)
            .all(|i| now[i].fds <= base[i].fds + FD_SLACK)
            .then_some(now)
    });
    let now = [usage(&tb, "node1"), usage(&tb, "node2")];
    eprintln!(
        "{ROUNDS} rounds ({} pods) in {:.1} s; node1 agent: baseline {} | after {}; \
         node2 agent: baseline {} | after {}",
        removed.len(),
        churn_time.as_secs_f64(),
        base[0],
        now[0],
        base[1],
        now[1]
    );
    assert!(
        after.is_some(),
        "agents' fds not back to baseline (+{FD_SLACK}) after churn: node1 {} -> {}, node2 {} -> {}",
        base[0].fds,
        now[0].fds,
        base[1].fds,
        now[1].fds
    );
    // The survivor kept going: still connected, and it echoed during the whole churn.
    let lines = pinger.json_lines();
    assert!(
        lines.iter().all(|v| v.get("end").is_none()),
        "the surviving connection ended: {:?}",
        lines.last()
    );
    let pings = lines.iter().filter(|v| v.get("ping").is_some()).count();
    let want = (churn_time.as_secs_f64() / 0.1 / 4.0) as usize;
    assert!(
        pings >= want,
        "only {pings} echoes on the surviving connection during {:.1} s of churn",
        churn_time.as_secs_f64()
    );
}

fn usage(tb: &Testbed, node: &str) -> Usage {
    tb.agent_usage(node).unwrap()
}

fn node_index(node: &str) -> usize {
    usize::from(node == "node2")
}

/// netns cookie of `pod` per `node`'s status.
fn cookie(tb: &Testbed, node: &str, pod: &str) -> u64 {
    let st = tb.status(node).unwrap();
    st.pod(pod)
        .and_then(|p| p["netns_cookie"].as_u64())
        .unwrap_or_else(|| panic!("{node}: no netns cookie for {pod}: {}", st.0["pods"]))
}

/// Cookies of the pods each agent serves now.
fn enrolled_cookies(tb: &Testbed) -> [BTreeSet<u64>; 2] {
    ["node1", "node2"].map(|node| {
        let st = tb.status(node).unwrap();
        st.0["pods"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["state"] == "enrolled")
            .filter_map(|p| p["netns_cookie"].as_u64())
            .collect()
    })
}

/// Entries of our pinned maps that belong to one of `cookies`: the netns cookie is the first
/// 8 bytes (little-endian) of the raw key of every map here. Only that field is compared: on
/// kernels that hand out cookies from per-CPU batches (6.1) cookies are small numbers that
/// also occur as flags, counters or families.
fn stale_entries(pins: &Path, cookies: &[u64]) -> Vec<String> {
    let mut out = Vec::new();
    for map in MAPS {
        let field = "key";
        let entries = leaks::map_dump(&pins.join(map)).unwrap();
        for e in entries {
            let formatted = &e["formatted"][field];
            let cookie = raw_u64(&e[field])
                .or_else(|| formatted.as_u64())
                .or_else(|| formatted["netns_cookie"].as_u64());
            assert!(cookie.is_some(), "{map}: no netns cookie in the entry {e}");
            if cookie.is_some_and(|c| cookies.contains(&c)) {
                out.push(format!("{map}: {e}"));
            }
        }
    }
    out
}

/// The first 8 bytes of a bpftool raw byte array (`["0x02", "0x10", ...]`), little-endian.
fn raw_u64(v: &Value) -> Option<u64> {
    let bytes: Vec<u8> = v
        .as_array()?
        .iter()
        .map(|b| u8::from_str_radix(b.as_str()?.trim_start_matches("0x"), 16).ok())
        .collect::<Option<_>>()?;
    Some(u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?))
}

/// The u64 keys of a map keyed by netns cookie.
fn key_cookies(pin: &Path) -> BTreeSet<u64> {
    leaks::map_dump(pin)
        .unwrap()
        .iter()
        .filter_map(|e| {
            let f = e.get("formatted").unwrap_or(e);
            match &f["key"] {
                Value::Number(n) => n.as_u64(),
                Value::Array(a) => {
                    let b: Vec<u8> = a
                        .iter()
                        .filter_map(|b| {
                            u8::from_str_radix(b.as_str()?.trim_start_matches("0x"), 16).ok()
                        })
                        .collect();
                    Some(u64::from_le_bytes(b.get(..8)?.try_into().ok()?))
                }
                _ => None,
            }
        })
        .collect()
}

/// Cookies of the `links/lookup-<cookie>` pins.
fn lookup_pins(pins: &Path) -> BTreeSet<u64> {
    std::fs::read_dir(pins.join("links"))
        .unwrap()
        .filter_map(|e| {
            e.ok()?
                .file_name()
                .to_str()?
                .strip_prefix("lookup-")?
                .parse()
                .ok()
        })
        .collect()
}

/// Every netns (sk_lookup) link in the kernel running one of our agents' lookup programs.
fn sk_lookup_links(tb: &Testbed) -> Vec<Value> {
    let mut progs = BTreeSet::new();
    for node in ["node1", "node2"] {
        let pins = tb.node(node).pin_dir.clone();
        for c in lookup_pins(&pins) {
            let l = leaks::pinned_link(&pins.join("links").join(format!("lookup-{c}"))).unwrap();
            progs.insert(l["prog_id"].as_u64().unwrap());
        }
    }
    leaks::links()
        .unwrap()
        .into_iter()
        .filter(|l| l["prog_id"].as_u64().is_some_and(|p| progs.contains(&p)))
        .collect()
}
