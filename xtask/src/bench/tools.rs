//! The load tools (iperf3, sockperf, wrk, nginx-light): install the missing ones, record versions.
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Result};

/// Debian packages the bench drives, and the binary each one provides.
const PACKAGES: &[(&str, &str)] = &[
    ("iperf3", "iperf3"),
    ("sockperf", "sockperf"),
    ("wrk", "wrk"),
    ("nginx-light", "nginx"),
];

/// Installs missing [`PACKAGES`] with apt-get (as root, unless `install` is off) and says what
/// is installed; fails when a tool is still missing, since no figure can be measured without it.
pub(crate) fn ensure(install: bool) -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(_, bin)| which(bin).is_none())
        .map(|(pkg, _)| *pkg)
        .collect();
    if !missing.is_empty() {
        if !install || !ambit_testbed::is_root() || !Path::new("/usr/bin/apt-get").exists() {
            bail!(
                "missing bench tools; install the Debian packages: {}",
                missing.join(" ")
            );
        }
        eprintln!("==> installing bench tools: {}", missing.join(" "));
        crate::prereq::install_packages(&missing)?;
    }
    for (pkg, bin) in PACKAGES {
        match which(bin) {
            Some(path) => eprintln!("==> {pkg}: {path} ({})", version(bin)),
            None => bail!("{pkg} is still missing after apt-get install"),
        }
    }
    Ok(())
}

/// Tool name → first line of its version output.
pub(crate) fn versions() -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = PACKAGES
        .iter()
        .map(|(_, bin)| ((*bin).to_string(), version(bin)))
        .collect();
    out.insert("rustc".into(), first_line("rustc", &["--version"]));
    out
}

/// `uname -r`, CPU count and model.
pub(crate) fn machine() -> (String, usize, String) {
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == "model name").then(|| v.trim().to_string())
        })
        .unwrap_or_else(|| "?".into());
    (ambit_testbed::kernel_release(), cpus, model)
}

/// `git describe --always --dirty` in `dir`, or `?`.
pub(crate) fn commit(dir: &Path) -> String {
    let out = Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .current_dir(dir)
        .output();
    match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        _ => "?".into(),
    }
}

/// The first three fields of `/proc/loadavg`.
pub(crate) fn loadavg() -> String {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    text.split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The current time, UTC, RFC 3339 (from `date`, to keep xtask free of a time crate).
pub(crate) fn now_utc() -> String {
    first_line("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"])
}

fn version(bin: &str) -> String {
    // nginx prints `nginx version: ...` on stderr, for `-v` only.
    let flag = if bin == "nginx" { "-v" } else { "--version" };
    first_line(bin, &[flag])
}

/// The first non-empty line a command prints (stdout, else stderr), or `?`.
fn first_line(bin: &str, args: &[&str]) -> String {
    let Ok(out) = Command::new(bin).args(args).output() else {
        return "?".into();
    };
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("?")
        .to_string()
}

/// The path of `bin` on PATH (or /usr/sbin, where nginx lives), if it is there.
fn which(bin: &str) -> Option<String> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/usr/bin"])
        .map(|d| Path::new(d).join(bin))
        .find(|p| p.is_file());
    found.map(|p| p.display().to_string())
}
