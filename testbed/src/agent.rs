//! The node agents as processes: start one in its node's netns, query `ambit status --json`.
use std::fs;
use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::Value;

use crate::cmd;
use crate::config;
use crate::process;
use crate::state::{write_atomic, Node, State};

/// How long `ambit status` may take.
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

/// Writes `node`'s config and starts `ambit run` in the node's netns (through `nsenter`, so
/// /sys is not remounted). It starts in the instance's root cgroup and joins its own cgroup, or
/// with kubelet's layout starts in its pod's cgroup and stays there.
pub fn start(state: &State, node: &Node, bin: &Path) -> Result<Child> {
    write_atomic(&node.config, config::agent_config(state, node).as_bytes())?;
    let cgroup = match state.kubelet_cgroups {
        Some(_) => &node.agent_cgroup,
        None => &state.cgroup_root,
    };
    spawn(node, bin, cgroup, &node.log)
}

/// Starts `bin run --config <node's config>` in `node`'s netns and `cgroup` as it is (the
/// config is not rewritten), logging to `log`.
pub fn spawn(node: &Node, bin: &Path, cgroup: &Path, log: &Path) -> Result<Child> {
    let rust_log = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_string());
    let argv = [
        bin.as_os_str(),
        "run".as_ref(),
        "--config".as_ref(),
        node.config.as_os_str(),
    ];
    process::spawn_in(
        cgroup,
        &node.netns_path(),
        &argv,
        log,
        &[("RUST_LOG", rust_log.as_str()), ("NO_COLOR", "1")],
    )
}

/// `ambit status --json` of `node`'s agent, parsed. The CLI exits 1 (still printing the
/// document) when a pod failed to enroll; only a missing document is an error.
pub fn status(bin: &Path, node: &Node) -> Result<Status> {
    admin_json(bin, node, &["status"]).map(Status)
}

/// Runs `ambit ARGS --admin-socket S --json` against `node`'s agent and parses what it prints.
/// Commands that exit non-zero while still printing their document (`certs` with an
/// unavailable identity) are fine; only a missing document is an error.
pub fn admin_json(bin: &Path, node: &Node, args: &[&str]) -> Result<Value> {
    let out = cmd::run(
        Command::new(bin)
            .args(args)
            .arg("--admin-socket")
            .arg(&node.admin_socket)
            .arg("--json"),
        STATUS_TIMEOUT,
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.trim().is_empty() {
        bail!(
            "`ambit {}` of {} failed ({}): {}",
            args.join(" "),
            node.name,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_str(&text).with_context(|| {
        format!(
            "`ambit {} --json` of {} printed non-JSON: {text}",
            args.join(" "),
            node.name
        )
    })
}

/// One identity's certificate, as `GET /certs` (`ambit certs --json`) reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Cert {
    /// SPIFFE ID.
    pub identity: String,
    /// `initializing`, `available` or `unavailable`.
    pub state: String,
    /// Local pods using it.
    pub pods: u64,
    /// Serial (hex) of the certificate served.
    pub serial: Option<String>,
    /// Validity start (RFC 3339).
    pub not_before: Option<String>,
    /// Validity end (RFC 3339).
    pub not_after: Option<String>,
    /// When the next request is due.
    pub next_renewal: Option<String>,
    /// Why the last request failed.
    pub last_error: Option<String>,
    /// Certificates received after the first.
    pub renewals: u64,
    /// Failed requests since the last success.
    pub failures: u64,
}

/// An agent's certificates.
#[derive(Debug, Clone, Default)]
pub struct Certs(pub Vec<Cert>);

impl Certs {
    /// The certificate of `identity`.
    pub fn get(&self, identity: &str) -> Option<&Cert> {
        self.0.iter().find(|c| c.identity == identity)
    }
}

/// One open connection, as `GET /connections` (`ambit connections --json`) reports it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Connection {
    /// `outbound` or `inbound`.
    pub direction: String,
    /// The local pod (`namespace/name`).
    pub pod: String,
    /// Source address.
    pub src: String,
    /// Destination address.
    pub dst: String,
    /// Source identity (proved, for inbound mTLS).
    pub src_identity: Option<String>,
    /// Destination identity.
    pub dst_identity: Option<String>,
    /// `mutual_tls` or `plaintext`.
    pub security: String,
    /// Bytes from source to destination.
    pub bytes_sent: u64,
    /// Bytes from destination to source.
    pub bytes_received: u64,
}

/// The last `lines` lines of a log file (for failure messages).
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// One agent's `/status` document, read by field name so small shape changes stay easy.
#[derive(Debug, Clone)]
pub struct Status(pub Value);

impl Status {
    /// A kernel (per-hook) counter, e.g. `connect4_redirect`, `lookup_steer`.
    pub fn kernel(&self, name: &str) -> Option<u64> {
        let k = &self.0["kernel"];
        k[name].as_u64().or_else(|| k["counters"][name].as_u64())
    }

    /// A kernel counter that must exist.
    pub fn kernel_required(&self, name: &str) -> Result<u64> {
        match self.kernel(name) {
            Some(v) => Ok(v),
            None => bail!(
                "status has no kernel counter `{name}`: {}",
                self.0["kernel"]
            ),
        }
    }

    /// The entry of pod `name` in `pods` (matched on `name`, or `namespace/name`).
    pub fn pod(&self, name: &str) -> Option<&Value> {
        self.0["pods"].as_array()?.iter().find(|p| {
            p["name"].as_str() == Some(name)
                || p["name"].as_str().and_then(|n| n.rsplit('/').next()) == Some(name)
        })
    }

    /// Pod `name`'s `state` (`enrolled`, ...).
    pub fn pod_state(&self, name: &str) -> Option<&str> {
        self.pod(name)?["state"].as_str()
    }

    /// One of pod `name`'s counters (`redirected`, `steered`, `bypassed`, ...).
    pub fn pod_counter(&self, pod: &str, counter: &str) -> Option<u64> {
        self.pod(pod)?["counters"][counter].as_u64()
    }

    /// Sums every number found under `path` (e.g. `proxy`) whose key contains `needle`; used for
    /// loosely-shaped sections such as connection counts.
    pub fn sum_matching(&self, section: &str, needle: &str) -> u64 {
        fn walk(v: &Value, needle: &str, key_hit: bool, acc: &mut u64) {
            match v {
                Value::Object(m) => {
                    for (k, v) in m {
                        walk(v, needle, key_hit || k.contains(needle), acc);
                    }
                }
                Value::Array(a) => a.iter().for_each(|v| walk(v, needle, key_hit, acc)),
                Value::Number(n) if key_hit => *acc += n.as_u64().unwrap_or(0),
                _ => {}
            }
        }
        let mut acc = 0;
        walk(&self.0[section], needle, false, &mut acc);
        acc
    }
}
