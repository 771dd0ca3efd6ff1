//! The agents' own sockets are recognised by the cgroup of the task that connects them (a
//! pinned set the agents of a node share), never by their mark alone. A restart hand-over to a
//! new agent in another cgroup (a new agent pod, in Kubernetes) works both ways while both run:
//! the new agent binds its listeners and dials its tunnels through the old agent's programs.
//! Once the old agent is gone its cgroup is dropped from the set: a marked socket made from it
//! is then captured like a pod's, where before it was exempt.
#![allow(
    clippy::unwrap_used,
    reason = "test bodies panic with a line number (STYLE.md §7)"
)]
use std::net::IpAddr;
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use ambit_e2e::forge::cgroup_id;
use ambit_e2e::ops::tail;
use ambit_e2e::{assert_eventually, eventually, testbed, Testbed, ECHO_PORT};
use nix::sys::signal::Signal;

/// The agent's outbound mark.
const MARK: u32 = 0x539;

fn counter(tb: &Testbed, name: &str) -> u64 {
    tb.kernel_counter("node1", name)
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn a_new_agent_in_another_cgroup_takes_over_and_the_old_cgroup_stops_counting() {
    let mut tb = testbed();
    let server = IpAddr::V4(tb.pod("server").ipv4);
    let old_cg = tb.node("node1").agent_cgroup.clone();
    let old_id = cgroup_id(&old_cg).unwrap();
    assert_eq!(tb.agent_cgroup_ids("node1").unwrap(), vec![old_id]);

    // A marked socket made from the running agent's cgroup is the agent's: exempt, direct.
    let (exempt, forged) = (
        counter(&tb, "connect_exempt_mark"),
        counter(&tb, "connect_forged_mark"),
    );
    let r = tb
        .marked_request_from(&old_cg, "client", (server, ECHO_PORT), MARK, "agent")
        .unwrap();
    assert_eq!(r["data"], "agent", "{r}");
    assert_eq!(counter(&tb, "connect_exempt_mark") - exempt, 1);
    assert_eq!(counter(&tb, "connect_forged_mark"), forged);

    // A second agent in a cgroup of its own takes over: it binds the pod listeners and
    // registers its cgroup beside the first agent's, whose programs it passes.
    let new_cg = tb.node("node1").cgroup.join("agent-next");
    let old_pid = tb.agent_pid("node1").unwrap();
    let sock = tb.admin_socket("node1");
    let ino = std::fs::metadata(&sock).unwrap().ino();
    let bind_denied = counter(&tb, "bind_denied");
    let new = tb.start_successor_in("node1", &new_cg).unwrap();
    let ready = eventually(Duration::from_secs(60), || {
        let ours = std::fs::metadata(&sock).is_ok_and(|m| m.ino() != ino);
        let enrolled = ours
            && tb
                .status("node1")
                .is_ok_and(|st| st.pod_state("client") == Some("enrolled"))
            && tb
                .admin_http("node1", "GET", "/healthz/ready")
                .is_ok_and(|r| r.status == 200);
        enrolled.then_some(())
    });
    assert!(
        ready.is_some() && new.running(),
        "the agent in {} never served the client pod: status {:?}\n{}",
        new_cg.display(),
        tb.status("node1").map(|s| s.0),
        tail(&new.output(), 40)
    );
    // Never refused on the way: the old agent's bind guard knows the new agent's cgroup (a
    // refused pod is left to the old agent and wiped from the kernel by the new one).
    assert_eq!(
        counter(&tb, "bind_denied"),
        bind_denied,
        "the new agent's binds were refused:\n{}",
        tail(&new.output(), 20)
    );
    let new_id = cgroup_id(&new_cg).unwrap();
    let mut both = vec![old_id, new_id];
    both.sort_unstable();
    assert_eq!(tb.agent_cgroup_ids("node1").unwrap(), both);
    let echo = tb
        .request("client", server, ECHO_PORT, Some("both"))
        .unwrap();
    assert_eq!(echo.data(), "both", "{echo:?}");

    // The first agent leaves; its cgroup, now empty, is dropped from the set.
    assert!(tb.signal_pid(old_pid, Signal::SIGTERM));
    assert!(
        tb.wait_pid_exit(old_pid, Duration::from_secs(30)),
        "the old agent did not exit"
    );
    tb.forget_agent("node1");
    assert_eventually!(
        timeout = Duration::from_secs(15),
        tb.agent_cgroup_ids("node1").unwrap() == vec![new_id],
        "the gone agent's cgroup stays in the set: {:?}",
        tb.agent_cgroup_ids("node1")
    );

    // The new agent serves alone; none of its own sockets is taken for a forged one.
    let (forged, redirected) = (
        counter(&tb, "connect_forged_mark"),
        counter(&tb, "connect4_redirect"),
    );
    let echo = tb
        .request("client", server, ECHO_PORT, Some("alone"))
        .unwrap();
    assert_eq!(
        echo.data(),
        "alone",
        "{echo:?}\n{}",
        tail(&new.output(), 40)
    );
    assert_eq!(counter(&tb, "connect_forged_mark"), forged);
    assert_eq!(counter(&tb, "connect4_redirect") - redirected, 1);
    // The old agent's cgroup grants nothing now: the same marked socket from it is captured
    // (counted as forged) and carried through the agent.
    let (forged, redirected) = (
        counter(&tb, "connect_forged_mark"),
        counter(&tb, "connect4_redirect"),
    );
    let r = tb
        .marked_request_from(&old_cg, "client", (server, ECHO_PORT), MARK, "former")
        .unwrap();
    assert_eq!(r["data"], "former", "{r}");
    assert_eq!(counter(&tb, "connect_forged_mark") - forged, 1);
    assert_eq!(counter(&tb, "connect4_redirect") - redirected, 1);
}
