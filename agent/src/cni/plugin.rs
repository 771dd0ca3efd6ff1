//! `ambit cni`: the chained CNI plugin (spec 1.0.0) that reports pod namespaces to the agent.
//!
//! Invoked by the container runtime as `/opt/cni/bin/ambit-cni` (the agent's binary under
//! another name) with `CNI_*` variables and the network config on stdin. Results and errors go
//! to stdout as the spec's JSON; diagnostics go to stderr.
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::IpAddr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use super::wire::{self, CallError};
use super::{CniCommand, CniEvent, CniReply, PodRef, DEFAULT_SOCKET};

/// CNI spec versions this plugin speaks (CHECK needs 0.4.0; GC and STATUS of 1.1.0 are not offered).
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0"];
/// The name the runtime runs this binary by (the conflist's `type`).
pub const PLUGIN_NAME: &str = "ambit-cni";
/// Error code (plugin-specific range) for "the agent answered and could not set the pod up".
pub const CODE_AGENT_FAILED: u32 = 100;
/// How long ADD and CHECK wait for the agent unless the config sets `timeoutSeconds`.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long DEL waits: teardown must not hang on a stuck agent.
const DEL_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the plugin reads `CNI_*` variables (the process environment, or a map in tests).
pub trait Env {
    /// The value of `name`, if set.
    fn var(&self, name: &str) -> Option<String>;
}

/// The real process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl Env for BTreeMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

/// A failed plugin call, mapped to the spec's error codes by [`Error::code`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The config's `cniVersion` is not one we speak.
    #[error("CNI version {version} is not supported (supported: {})", SUPPORTED_VERSIONS.join(", "))]
    IncompatibleVersion { version: String },
    /// A required variable is unset or empty.
    #[error("environment variable {var} is required for {command}")]
    MissingEnv {
        var: &'static str,
        command: &'static str,
    },
    /// A variable has a bad value.
    #[error("environment variable {var}: {message}")]
    InvalidEnv { var: &'static str, message: String },
    /// Stdin could not be read.
    #[error("cannot read the network configuration from stdin")]
    Stdin(#[source] std::io::Error),
    /// Stdin is not JSON of the expected shape.
    #[error("cannot decode the network configuration on stdin")]
    Decode(#[source] serde_json::Error),
    /// The config decoded but a field is unusable.
    #[error("network configuration field `{field}`: {message}")]
    InvalidConfig {
        field: &'static str,
        message: String,
    },
    /// The pod's network namespace could not be opened.
    #[error("cannot open network namespace {}", path.display())]
    Netns {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The agent could not be reached or did not answer in time.
    #[error("ambit agent unavailable for pod {pod}")]
    AgentUnavailable {
        pod: String,
        #[source]
        source: CallError,
    },
    /// The agent answered that it could not set the pod up.
    #[error("ambit agent could not set up pod {pod}: {message}")]
    AgentFailed { pod: String, message: String },
}

impl Error {
    /// The CNI error code: 1 version, 4 environment, 5 I/O, 6 decode, 7 config, 11 try again.
    pub fn code(&self) -> u32 {
        match self {
            Self::IncompatibleVersion { .. } => 1,
            Self::MissingEnv { .. } | Self::InvalidEnv { .. } => 4,
            Self::Stdin(_) | Self::Netns { .. } => 5,
            Self::Decode(_) => 6,
            Self::InvalidConfig { .. } => 7,
            Self::AgentUnavailable { .. } => 11,
            Self::AgentFailed { .. } => CODE_AGENT_FAILED,
        }
    }
}

/// Whether this process was started by a container runtime as the CNI plugin (by its name).
pub fn invoked_as_plugin() -> bool {
    std::env::args_os()
        .next()
        .as_deref()
        .and_then(|a| Path::new(a).file_name().map(|n| n == PLUGIN_NAME))
        .unwrap_or(false)
}

/// Runs the plugin on the process's environment, stdin and stdout; returns the exit code.
pub fn main() -> i32 {
    run(
        &ProcessEnv,
        &mut std::io::stdin().lock(),
        &mut std::io::stdout().lock(),
    )
}

/// Runs one CNI command: writes the result or the error JSON to `stdout`; returns the exit code.
pub fn run(env: &dyn Env, stdin: &mut dyn Read, stdout: &mut dyn Write) -> i32 {
    let mut input = Vec::new();
    let read = stdin.read_to_end(&mut input).map_err(Error::Stdin);
    // Errors are reported in the config's version when it can be read, as the spec asks.
    let version = serde_json::from_slice::<Value>(&input)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_string))
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| "1.0.0".to_string());
    let outcome = read.and_then(|_| execute(env, &input));
    let (code, out) = match outcome {
        Ok(Some(result)) => (0, Some(result)),
        Ok(None) => (0, None),
        Err(e) => {
            let mut details = String::new();
            let mut cur = std::error::Error::source(&e);
            while let Some(c) = cur {
                if !details.is_empty() {
                    details.push_str(": ");
                }
                details.push_str(&c.to_string());
                cur = c.source();
            }
            let sep = if details.is_empty() { "" } else { ": " };
            let _ = writeln!(std::io::stderr(), "ambit-cni: {e}{sep}{details}");
            let err = json!({
                "cniVersion": version,
                "code": e.code(),
                "msg": e.to_string(),
                "details": details,
            });
            (1, Some(err))
        }
    };
    if let Some(v) = out {
        // stdout is the runtime's pipe; if it is gone there is nobody left to tell.
        let _ = serde_json::to_writer(&mut *stdout, &v);
        let _ = stdout.write_all(b"\n");
        let _ = stdout.flush();
    }
    code
}

/// The network configuration fields this plugin reads (others are ignored, as the spec allows).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NetConf {
    cni_version: String,
    #[serde(default)]
    name: String,
    #[serde(default, rename = "type")]
    plugin_type: String,
    #[serde(default)]
    prev_result: Option<Value>,
    /// The agent's socket.
    #[serde(default)]
    socket_path: Option<PathBuf>,
    /// How long ADD and CHECK wait for the agent.
    #[serde(default)]
    timeout_seconds: Option<u64>,
}

fn execute(env: &dyn Env, input: &[u8]) -> Result<Option<Value>, Error> {
    let command = env.var("CNI_COMMAND").unwrap_or_default();
    let command = match command.as_str() {
        "VERSION" => return Ok(Some(version_result(input))),
        "ADD" => CniCommand::Add,
        "DEL" => CniCommand::Del,
        "CHECK" => CniCommand::Check,
        "" => {
            return Err(Error::MissingEnv {
                var: "CNI_COMMAND",
                command: "any command",
            })
        }
        other => {
            return Err(Error::InvalidEnv {
                var: "CNI_COMMAND",
                message: format!("unsupported command `{other}` (want ADD, DEL, CHECK or VERSION)"),
            })
        }
    };
    let name = match command {
        CniCommand::Add => "ADD",
        CniCommand::Del => "DEL",
        CniCommand::Check => "CHECK",
    };
    let required = |var: &'static str| {
        env.var(var)
            .filter(|v| !v.is_empty())
            .ok_or(Error::MissingEnv { var, command: name })
    };
    let container_id = required("CNI_CONTAINERID")?;
    check_container_id(&container_id)?;
    let ifname = required("CNI_IFNAME")?;
    check_ifname(&ifname)?;
    required("CNI_PATH")?;
    let netns = match command {
        CniCommand::Del => env.var("CNI_NETNS").filter(|v| !v.is_empty()),
        _ => Some(required("CNI_NETNS")?),
    }
    .map(PathBuf::from);
    let args = parse_args(&env.var("CNI_ARGS").unwrap_or_default())?;
    let conf: NetConf = serde_json::from_slice(input).map_err(Error::Decode)?;
    if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
        return Err(Error::IncompatibleVersion {
            version: conf.cni_version,
        });
    }
    if conf.name.is_empty() {
        return Err(Error::InvalidConfig {
            field: "name",
            message: "must not be empty".into(),
        });
    }
    if conf.plugin_type.is_empty() {
        return Err(Error::InvalidConfig {
            field: "type",
            message: "must not be empty".into(),
        });
    }
    let prev = match (command, conf.prev_result.clone()) {
        (CniCommand::Del, p) => p,
        (_, Some(p)) if p.is_object() => Some(p),
        (_, _) => {
            return Err(Error::InvalidConfig {
                field: "prevResult",
                message: "missing: ambit-cni must be chained after an interface plugin".into(),
            })
        }
    };
    let ips = match (command, &prev) {
        (CniCommand::Del, _) | (_, None) => Vec::new(),
        (_, Some(p)) => prev_ips(p)?,
    };
    let success = |prev: Option<Value>| match command {
        CniCommand::Add => prev.map(|mut p| {
            p["cniVersion"] = Value::String(conf.cni_version.clone());
            p
        }),
        _ => None,
    };
    // Without Kubernetes pod arguments this is not a pod ambit could know: nothing to report.
    let (Some(namespace), Some(pod_name)) =
        (args.get("K8S_POD_NAMESPACE"), args.get("K8S_POD_NAME"))
    else {
        return Ok(success(prev));
    };
    let pod = PodRef {
        namespace: namespace.clone(),
        name: pod_name.clone(),
        uid: args.get("K8S_POD_UID").cloned().unwrap_or_default(),
    };
    let event = CniEvent {
        command,
        container_id,
        netns: netns.clone(),
        ifname,
        pod: pod.clone(),
        ips,
        netns_id: None,
    };
    let socket = conf
        .socket_path
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
    let timeout = match command {
        CniCommand::Del => DEL_TIMEOUT,
        _ => conf
            .timeout_seconds
            .map_or(DEFAULT_TIMEOUT, Duration::from_secs),
    };
    if command == CniCommand::Del {
        // DEL is best effort: the agent forgets the pod when its namespace goes away anyway, and
        // a failing DEL would only block the pod's teardown.
        match wire::call(&socket, &event, None, timeout) {
            Ok(CniReply::Failed { message }) => {
                let _ = writeln!(
                    std::io::stderr(),
                    "ambit-cni: DEL {}: agent: {message}",
                    pod.key()
                );
            }
            Ok(_) => {}
            Err(e) => {
                let _ = writeln!(std::io::stderr(), "ambit-cni: DEL {}: {e}", pod.key());
            }
        }
        return Ok(None);
    }
    // `netns` is Some for ADD and CHECK (required above).
    let path = netns.unwrap_or_default();
    let file = std::fs::File::open(&path).map_err(|source| Error::Netns {
        path: path.clone(),
        source,
    })?;
    match wire::call(&socket, &event, Some(file.as_fd()), timeout) {
        Ok(CniReply::Enrolled | CniReply::NotInMesh) => Ok(success(prev)),
        Ok(CniReply::Failed { message }) => Err(Error::AgentFailed {
            pod: pod.key(),
            message,
        }),
        Err(source) => Err(Error::AgentUnavailable {
            pod: pod.key(),
            source,
        }),
    }
}

/// The VERSION result; echoes the requested version when we speak it.
fn version_result(input: &[u8]) -> Value {
    let asked = serde_json::from_slice::<Value>(input)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_string))
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| "1.0.0".to_string());
    json!({ "cniVersion": asked, "supportedVersions": SUPPORTED_VERSIONS })
}

/// `CNI_ARGS`: `KEY=VALUE` pairs separated by `;`.
fn parse_args(raw: &str) -> Result<BTreeMap<String, String>, Error> {
    let mut out = BTreeMap::new();
    for pair in raw.split(';').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').ok_or_else(|| Error::InvalidEnv {
            var: "CNI_ARGS",
            message: format!("`{pair}` is not KEY=VALUE"),
        })?;
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

/// The spec: alphanumerics plus `_`, `.` and `-`, starting with an alphanumeric.
fn check_container_id(id: &str) -> Result<(), Error> {
    let ok = id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidEnv {
            var: "CNI_CONTAINERID",
            message: format!("`{id}` has characters other than letters, digits, `_`, `.`, `-`"),
        })
    }
}

/// The spec: at most 15 bytes, not `.` or `..`, no `/`, `:` or whitespace.
fn check_ifname(name: &str) -> Result<(), Error> {
    let ok = name.len() <= 15
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace());
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidEnv {
            var: "CNI_IFNAME",
            message: format!("`{name}` is not a valid interface name"),
        })
    }
}

/// Addresses from `prevResult.ips[].address` (CIDR notation).
fn prev_ips(prev: &Value) -> Result<Vec<IpAddr>, Error> {
    let mut out = Vec::new();
    let Some(ips) = prev.get("ips") else {
        return Ok(out);
    };
    let ips = ips.as_array().ok_or_else(|| Error::InvalidConfig {
        field: "prevResult.ips",
        message: "must be a list".into(),
    })?;
    for (i, entry) in ips.iter().enumerate() {
        let raw = entry
            .get("address")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let ip = raw
            .split_once('/')
            .map_or(raw, |(ip, _)| ip)
            .parse::<IpAddr>()
            .map_err(|_| Error::InvalidConfig {
                field: "prevResult.ips",
                message: format!("entry {i}: `{raw}` is not an address in CIDR notation"),
            })?;
        out.push(ip);
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests;
