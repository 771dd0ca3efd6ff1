//! ambit's network-namespace testbed: nodes, pods, servers, clients, the CA and the agents.
//!
//! The privileged tests (`ambit-e2e`, `tests/tests/e2e/*.rs`) build a [`Testbed`] each (unique
//! names, removed on drop even when the test panics); `cargo xtask testbed`, the demo and the
//! bench drive the same code by hand. The agent is used only as a binary (`AMBIT_BIN`), so this
//! crate, and xtask with it, builds without the kernel toolchain the agent's build script needs.
pub mod admin;
pub mod agent;
pub mod apply;
pub mod ca;
pub mod capture;
pub mod cgroup;
pub mod churn;
pub mod client;
pub mod cmd;
pub mod cni;
pub mod config;
pub mod counters;
pub mod forge;
pub mod issuer;
pub mod kubelet;
pub mod leaks;
pub mod net;
pub mod ops;
pub mod pcap;
pub mod peer;
pub mod policy;
pub mod process;
pub mod scope;
pub mod servers;
pub mod state;
pub mod teardown;
pub mod testbed;

use std::time::{Duration, Instant};

pub use agent::{Cert, Certs, Connection, Status};
pub use client::Reply;
pub use servers::HELLO;
pub use state::{PodSpec, State, CA_PORT, ECHO_PORT, HTTP_PORT, PEER_PORT, TUNNEL_PORT};
pub use testbed::{Options, Testbed};

/// Default time `assert_eventually!` waits for its condition.
pub const EVENTUALLY: Duration = Duration::from_secs(10);

/// Whether the process runs as root.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Panics unless running as root: privileged tests must fail, never pass, without privileges.
pub fn require_root() {
    if let Err(e) = require_root_result() {
        panic!("{e:#}");
    }
}

/// `Err` unless running as root, naming what is needed.
pub fn require_root_result() -> anyhow::Result<()> {
    if !is_root() {
        anyhow::bail!(
            "the ambit testbed needs root (network namespaces, cgroup v2, bpffs); \
             run `cargo xtask test` as root"
        );
    }
    Ok(())
}

/// Builds a default testbed with agents, or panics with the reason (and the kernel version).
pub fn testbed() -> Testbed {
    testbed_with(Options::default())
}

/// Builds a testbed with `opts`, or panics with the reason (and the kernel version).
pub fn testbed_with(opts: Options) -> Testbed {
    require_root();
    match Testbed::up(opts) {
        Ok(tb) => tb,
        Err(e) => panic!("testbed up failed on kernel {}: {e:#}", kernel_release()),
    }
}

/// A string that occurs nowhere else (in captures, logs, replies): `AMBIT-MARKER-<hex>`.
pub fn unique_marker() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    format!("AMBIT-MARKER-{:016x}", h.finish())
}

/// `uname -r`.
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "?".into(), |s| s.trim().into())
}

/// Polls `f` every 100 ms until it returns `Some`, for at most `timeout`; `None` on timeout.
pub fn eventually<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs a privileged test body twice, for behaviour that must hold in both agent modes:
/// `NAME::mtls` on the default testbed (a CA; enrolled pods talk HBONE) and
/// `NAME::capture_only` on a testbed without a CA (the agents carry plaintext). `NAME` is a
/// function of the test file taking the [`Testbed`] (functions and modules do not collide).
///
/// ```text
/// both_modes!(echo_reaches_the_server);
/// fn echo_reaches_the_server(tb: Testbed) { ... }
/// ```
#[macro_export]
macro_rules! both_modes {
    ($name:ident) => {
        mod $name {
            #[test]
            #[ignore = "privileged: run with `cargo xtask test`"]
            fn mtls() {
                super::$name($crate::testbed())
            }

            #[test]
            #[ignore = "privileged: run with `cargo xtask test`"]
            fn capture_only() {
                super::$name($crate::testbed_with($crate::Options::capture_only()))
            }
        }
    };
}

/// Asserts that a condition becomes true within a deadline (default [`EVENTUALLY`]), polling
/// it every 100 ms, instead of sleeping. Extra arguments format the failure message.
///
/// ```text
/// assert_eventually!(tb.status("node1").unwrap().kernel("connect4_redirect") > Some(0));
/// assert_eventually!(timeout = Duration::from_secs(3), done(), "still waiting for {x}");
/// ```
#[macro_export]
macro_rules! assert_eventually {
    (timeout = $t:expr, $cond:expr $(,)?) => {
        $crate::assert_eventually!(timeout = $t, $cond, "")
    };
    (timeout = $t:expr, $cond:expr, $($msg:tt)+) => {
        if $crate::eventually($t, || if $cond { Some(()) } else { None }).is_none() {
            panic!(
                "condition `{}` not true within {:?}: {}",
                stringify!($cond),
                $t,
                format!($($msg)+)
            );
        }
    };
    ($cond:expr $(,)?) => {
        $crate::assert_eventually!(timeout = $crate::EVENTUALLY, $cond, "")
    };
    ($cond:expr, $($msg:tt)+) => {
        $crate::assert_eventually!(timeout = $crate::EVENTUALLY, $cond, $($msg)+)
    };
}
