//! The pods' test servers (HTTP, echo, peer report) and the scripts and files they serve.
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Child;

use anyhow::{Context, Result};

use crate::process;
use crate::state::{Pod, State, ECHO_PORT, HTTP_PORT, PEER_PORT};

/// The test client (see its docstring), written to `<dir>/client.py`.
pub const CLIENT_PY: &str = include_str!("scripts/client.py");
/// The peer-report server, written to `<dir>/peer_server.py`.
pub const PEER_SERVER_PY: &str = include_str!("scripts/peer_server.py");
/// Body of `/hello.txt` on every HTTP server.
pub const HELLO: &str = "hello from the ambit testbed\n";
/// Size of `/big.bin` on every HTTP server.
pub const BIG_FILE_BYTES: usize = 20 * 1024 * 1024;

/// `/usr/bin/python3` when present (fast start), else `python3` from PATH.
pub fn python() -> PathBuf {
    let system = Path::new("/usr/bin/python3");
    if system.exists() {
        system.to_path_buf()
    } else {
        PathBuf::from("python3")
    }
}

/// Writes the scripts and the web root (`hello.txt`, a 20 MiB pseudo-random `big.bin`).
pub fn prepare_files(state: &State) -> Result<()> {
    fs::write(state.dir.join("client.py"), CLIENT_PY).context("writing client.py")?;
    fs::write(state.dir.join("peer_server.py"), PEER_SERVER_PY)
        .context("writing peer_server.py")?;
    let www = web_root(state);
    fs::create_dir_all(&www).with_context(|| format!("creating {}", www.display()))?;
    fs::write(www.join("hello.txt"), HELLO).context("writing hello.txt")?;
    fs::write(
        www.join("big.bin"),
        pseudo_random(BIG_FILE_BYTES, std::process::id().into()),
    )
    .context("writing big.bin")?;
    Ok(())
}

/// `<dir>/www`, served by every HTTP server.
pub fn web_root(state: &State) -> PathBuf {
    state.dir.join("www")
}

/// Starts HTTP on 8080, echo on 9000 and peer report on 7000 in `pod` (IPv4 and IPv6 each).
/// Returns (role, child) per server.
pub fn start(state: &State, pod: &Pod) -> Result<Vec<(String, Child)>> {
    let py = python();
    let py = py.to_string_lossy();
    let www = web_root(state);
    let peer_script = state.dir.join("peer_server.py");
    let http = [
        py.as_ref(),
        "-m",
        "http.server",
        &HTTP_PORT.to_string(),
        "--bind",
        "::",
        "--directory",
        &www.to_string_lossy(),
    ]
    .map(str::to_string);
    let echo = [
        "socat".to_string(),
        // socat's default half-close wait is 0.5 s: a client that sends and shuts down its
        // write side at once could lose its echo when `cat` starts slowly (under qemu TCG).
        "-t".to_string(),
        "10".to_string(),
        format!("TCP6-LISTEN:{ECHO_PORT},ipv6only=0,fork,reuseaddr,backlog=256"),
        "EXEC:cat".to_string(),
    ];
    let peer = [
        py.to_string(),
        peer_script.to_string_lossy().into_owned(),
        PEER_PORT.to_string(),
    ];
    let mut out = Vec::new();
    for (port, argv) in [
        (HTTP_PORT, &http[..]),
        (ECHO_PORT, &echo[..]),
        (PEER_PORT, &peer[..]),
    ] {
        let log = state.dir.join(format!("{}-{port}.log", pod.name));
        let child = process::spawn_in(&pod.cgroup, &pod.netns_path(), argv, &log, &[])?;
        out.push((format!("server {}:{port}", pod.name), child));
    }
    Ok(out)
}

/// Deterministic xorshift64* bytes: cheap to make, incompressible enough for a transfer test.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pseudo_random_has_exact_length_and_varies() {
        let a = pseudo_random(1001, 7);
        assert_eq!(a.len(), 1001);
        assert_ne!(a[..8], a[8..16]);
        assert_eq!(a, pseudo_random(1001, 7));
    }
}
