//! Cleanup: after `down` (or cleanup from the state file after a crash) nothing of the
//! instance remains, and two instances never collide.
use std::net::IpAddr;

use ambit_e2e::state::State;
use ambit_e2e::{teardown, testbed, testbed_with, Options, ECHO_PORT, HELLO, HTTP_PORT};
use nix::sys::signal::Signal;

fn assert_nothing_left(state: &State) {
    let left = teardown::leftovers(state);
    assert!(left.is_empty(), "left behind: {left:#?}");
    for pod in &state.pods {
        assert!(!ambit_e2e::state::netns_path(&pod.netns).exists());
    }
    assert!(
        !state.cgroup_root.exists(),
        "{}",
        state.cgroup_root.display()
    );
    for node in &state.nodes {
        assert!(!node.pin_dir.exists(), "{}", node.pin_dir.display());
    }
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn down_leaves_no_namespace_cgroup_pin_or_process() {
    let tb = testbed();
    let server = IpAddr::V4(tb.pod("server").ipv4);
    assert_eq!(
        tb.http_get("client", server, HTTP_PORT, "/hello.txt")
            .unwrap(),
        HELLO
    );
    let state = tb.state().clone();
    assert!(
        state.nodes.iter().all(|n| n.pin_dir.exists()),
        "agents pinned nothing"
    );
    assert!(!teardown::leftovers(&state).is_empty());
    tb.down().unwrap();
    assert_nothing_left(&state);
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn cleanup_from_the_state_file_after_a_crash() {
    let mut tb = testbed();
    let file = tb.state().state_file();
    // A crash: the agent dies, and the owner goes away without cleaning up.
    tb.stop_agent("node2", Signal::SIGKILL).unwrap();
    tb.set_persistent(true);
    tb.state().save().unwrap();
    drop(tb);
    let state = State::load(&file).unwrap();
    assert!(!teardown::leftovers(&state).is_empty());
    teardown::teardown(&state, &mut Vec::new()).unwrap();
    assert_nothing_left(&state);
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn two_testbeds_run_side_by_side() {
    let a = testbed_with(Options {
        agents: false,
        ..Options::default()
    });
    let b = testbed();
    assert_ne!(a.state().id, b.state().id);
    for tb in [&a, &b] {
        let server = IpAddr::V4(tb.pod("server").ipv4);
        let echo = tb
            .request("client", server, ECHO_PORT, Some(&tb.state().id))
            .unwrap();
        assert_eq!(echo.data(), tb.state().id, "{echo:?}");
    }
    let (sa, sb) = (a.state().clone(), b.state().clone());
    a.down().unwrap();
    assert_nothing_left(&sa);
    // b is untouched by a's teardown.
    let server = IpAddr::V4(b.pod("server").ipv4);
    assert_eq!(
        b.http_get("client", server, HTTP_PORT, "/hello.txt")
            .unwrap(),
        HELLO
    );
    b.down().unwrap();
    assert_nothing_left(&sb);
}
