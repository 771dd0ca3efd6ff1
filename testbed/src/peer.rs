//! Admin-socket peers of another user: `GET /status` from a Python client run through `setpriv`.
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::Result;
use serde_json::Value;

use crate::ops::last_json;
use crate::{cmd, servers};

/// `setpriv` arguments for uid and gid 65534 (nobody) without supplementary groups.
pub const NOBODY: [&str; 3] = ["--reuid=65534", "--regid=65534", "--clear-groups"];

/// [`NOBODY`] with CAP_DAC_OVERRIDE, which passes the admin socket's 0600 mode and leaves the
/// agent's peer-credential check as the only guard.
pub const NOBODY_DAC_OVERRIDE: [&str; 5] = [
    NOBODY[0],
    NOBODY[1],
    NOBODY[2],
    "--inh-caps=+dac_override",
    "--ambient-caps=+dac_override",
];

/// The peer: connects, sends `GET /status`, reads to EOF and prints one JSON line: `uid`,
/// `connect` (`ok` or the error's class), `reply` (the first 40 bytes) or `io` (the error's class).
const PEER_PY: &str = r#"
import json, os, socket, sys
out = {"uid": os.getuid()}
s = socket.socket(socket.AF_UNIX)
s.settimeout(8)
try:
    s.connect(sys.argv[1])
except OSError as e:
    out["connect"] = type(e).__name__
    print(json.dumps(out)); sys.exit(0)
out["connect"] = "ok"
try:
    s.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    data = b""
    while True:
        c = s.recv(65536)
        if not c:
            break
        data += c
    out["reply"] = data[:40].decode(errors="replace")
except OSError as e:
    out["io"] = type(e).__name__
print(json.dumps(out))
"#;

/// Connects to the admin socket at `socket` as root (`setpriv` empty) or through `setpriv`
/// with these arguments (e.g. [`NOBODY`]), sends `GET /status` and reports what happened as
/// JSON: `uid`, `connect`, and `reply` or `io`.
pub fn admin_peer(socket: &Path, setpriv: &[&str]) -> Result<Value> {
    // The system interpreter: one under root's home (pyenv) is out of another user's reach.
    let python = servers::python();
    let mut c = if setpriv.is_empty() {
        Command::new(&python)
    } else {
        let mut c = Command::new("setpriv");
        c.args(setpriv).arg(&python);
        c
    };
    c.arg("-c").arg(PEER_PY).arg(socket).current_dir("/");
    let out = cmd::run(&mut c, Duration::from_secs(20))?;
    last_json(&out, &format!("admin peer on {}", socket.display()))
}
