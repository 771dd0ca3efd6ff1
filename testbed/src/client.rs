//! Talking from inside a pod: the Python test client, curl, and typed views of their results.
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{Child, Output};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::Signal;
use serde_json::Value;

use crate::process;
use crate::servers;
use crate::state::url_host;
use crate::testbed::Testbed;

/// Socket timeout the client uses for each connect, send and receive.
pub const SOCKET_TIMEOUT: Duration = Duration::from_secs(5);

impl Testbed {
    /// Runs the test client (`client.py`) in `pod` and parses its one-line JSON report. Failed
    /// connections are reports too (`error`, `stage`), not errors; errors are for a client that
    /// printed no JSON or timed out.
    pub fn client(&self, pod: &str, args: &[String], timeout: Duration) -> Result<Value> {
        let argv = self.client_argv(args);
        let out = self.exec(pod, &argv, timeout)?;
        parse_report(pod, &out)
    }

    /// Like [`Testbed::request`], but from `node`'s own namespace (as a kubelet probe would).
    pub fn request_from_node(
        &self,
        node: &str,
        ip: IpAddr,
        port: u16,
        send: Option<&str>,
    ) -> Result<Reply> {
        let mut args = vec!["request".to_string(), ip.to_string(), port.to_string()];
        if let Some(s) = send {
            args.push(format!("--send={s}"));
        }
        let argv = self.client_argv(&args);
        let out = self.exec_on_node(node, &argv, Duration::from_secs(20))?;
        parse_report(node, &out).map(Reply)
    }

    fn client_argv(&self, args: &[String]) -> Vec<String> {
        let script = self.state().dir.join("client.py");
        let mut argv = vec![
            servers::python().to_string_lossy().into_owned(),
            script.to_string_lossy().into_owned(),
            "--timeout".to_string(),
            format!("{}", SOCKET_TIMEOUT.as_secs_f32()),
        ];
        argv.extend(args.iter().cloned());
        argv
    }

    /// Connects from `pod` to `ip:port`, sends `send` (if any), half-closes and reads to EOF.
    pub fn request(&self, pod: &str, ip: IpAddr, port: u16, send: Option<&str>) -> Result<Reply> {
        let mut args = vec!["request".to_string(), ip.to_string(), port.to_string()];
        if let Some(s) = send {
            args.push(format!("--send={s}"));
        }
        self.client(pod, &args, Duration::from_secs(20)).map(Reply)
    }

    /// Sends `bytes` random bytes from `pod` to the echo server at `ip` and reads them back.
    pub fn transfer(&self, pod: &str, ip: IpAddr, port: u16, bytes: usize) -> Result<Value> {
        let args = [
            "transfer".to_string(),
            ip.to_string(),
            port.to_string(),
            bytes.to_string(),
        ];
        self.client(pod, &args, Duration::from_secs(120))
    }

    /// Opens `count` echo connections from `pod` to `ip:port`, all at once; returns the report.
    pub fn concurrent(&self, pod: &str, ip: IpAddr, port: u16, count: usize) -> Result<Value> {
        let args = [
            "concurrent".to_string(),
            ip.to_string(),
            port.to_string(),
            count.to_string(),
        ];
        self.client(pod, &args, Duration::from_secs(60))
    }

    /// `curl` from `pod`: GETs `http://ip:port/path` and returns the body (errors on failure).
    pub fn http_get(&self, pod: &str, ip: IpAddr, port: u16, path: &str) -> Result<String> {
        let out = self.curl(pod, ip, port, path, &["-m", "20"], Duration::from_secs(30))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Downloads `http://ip:port/path` from `pod` into a file of the instance dir; returns its path.
    pub fn http_download(&self, pod: &str, ip: IpAddr, port: u16, path: &str) -> Result<PathBuf> {
        let file = self.state().dir.join(format!("download-{pod}-{port}"));
        let file_s = file.to_string_lossy().into_owned();
        let args = ["-m", "90", "-o", &file_s];
        self.curl(pod, ip, port, path, &args, Duration::from_secs(100))?;
        Ok(file)
    }

    /// `curl -sS --fail` of `http://ip:port/path` from `pod` with `args`; an error unless it
    /// succeeds within `timeout`.
    fn curl(
        &self,
        pod: &str,
        ip: IpAddr,
        port: u16,
        path: &str,
        args: &[&str],
        timeout: Duration,
    ) -> Result<Output> {
        let url = format!("http://{}:{port}{path}", url_host(ip));
        let mut argv = vec!["curl", "-sS", "--fail", "--connect-timeout", "5"];
        argv.extend(args);
        argv.push(&url);
        let out = self.exec(pod, &argv, timeout)?;
        if !out.status.success() {
            bail!(
                "curl {url} from {pod} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(out)
    }

    /// Opens a connection from `pod` to the echo server at `ip:port`, sends `send`, reads the
    /// echo, and keeps the connection open until the returned [`Held`] is dropped (at most a
    /// minute). Returns once the echo came back, so the connection is established end to end.
    pub fn hold(&self, pod: &str, ip: IpAddr, port: u16, send: &str) -> Result<Held> {
        let st = self.state();
        let p = st.pod(pod)?;
        let n = std::fs::read_dir(&st.dir).map_or(0, |d| d.count());
        let log = st.dir.join(format!("hold-{pod}-{n}.log"));
        let script = st.dir.join("client.py");
        let argv = [
            servers::python().to_string_lossy().into_owned(),
            script.to_string_lossy().into_owned(),
            "--timeout".to_string(),
            format!("{}", SOCKET_TIMEOUT.as_secs_f32()),
            "hold".to_string(),
            ip.to_string(),
            port.to_string(),
            format!("--send={send}"),
        ];
        let child = process::spawn_in(&p.cgroup, &p.netns_path(), &argv, &log, &[])?;
        let mut held = Held {
            pid: i32::try_from(child.id())?,
            child: Some(child),
            cgroup: p.cgroup.clone(),
            mount: st.cgroup_mount.clone(),
            reply: Reply(Value::Null),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(line) = text.lines().find(|l| l.starts_with('{')) {
                held.reply = Reply(serde_json::from_str(line)?);
                if !held.reply.ok() {
                    bail!("hold from {pod} to {ip}:{port} failed: {line}");
                }
                return Ok(held);
            }
            if held
                .child
                .as_mut()
                .is_some_and(|c| c.try_wait().ok().flatten().is_some())
            {
                bail!("hold client in {pod} exited without a report: {text}");
            }
            if Instant::now() >= deadline {
                bail!("hold client in {pod} reported nothing in 20s: {text}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Lines the peer-report server of `pod` has logged (one `peer=...` per connection it got).
    pub fn peer_log(&self, pod: &str) -> Vec<String> {
        let path = self
            .state()
            .dir
            .join(format!("{pod}-{}.log", crate::state::PEER_PORT));
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("peer="))
            .map(str::to_string)
            .collect()
    }
}

/// A connection held open by a client process in a pod; closed (the process killed) on drop.
#[derive(Debug)]
pub struct Held {
    child: Option<Child>,
    pid: i32,
    cgroup: PathBuf,
    mount: PathBuf,
    /// What the client saw: peer, own address, the echo.
    pub reply: Reply,
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            process::signal_ours(self.pid, Signal::SIGKILL, &self.cgroup, &self.mount);
            process::reap(&mut child, Duration::from_secs(2));
        }
    }
}

/// The report of one `request`: what the client's socket saw.
#[derive(Debug, Clone)]
pub struct Reply(pub Value);

impl Reply {
    /// The connection worked: no error was reported.
    pub fn ok(&self) -> bool {
        self.0.get("error").is_none()
    }

    /// Bytes received, as text (empty when none).
    pub fn data(&self) -> &str {
        self.0["data"].as_str().unwrap_or("")
    }

    /// `getpeername()` of the client's socket, as `ip:port` / `[ip]:port`.
    pub fn peer(&self) -> &str {
        self.0["peer"].as_str().unwrap_or("")
    }

    /// The error, if any (`stage: message`).
    pub fn error(&self) -> Option<String> {
        let e = self.0.get("error")?.as_str()?;
        Some(format!("{}: {e}", self.0["stage"].as_str().unwrap_or("?")))
    }
}

/// The last JSON line the test client printed.
fn parse_report(place: &str, out: &std::process::Output) -> Result<Value> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .with_context(|| {
            format!(
                "client in {place} printed no report ({}); stdout: {stdout}; stderr: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    serde_json::from_str(line).with_context(|| format!("client report is not JSON: {line}"))
}

/// sha256 of a file, via `sha256sum`.
pub fn sha256_file(path: &std::path::Path) -> Result<String> {
    let out = crate::cmd::check(
        std::process::Command::new("sha256sum").arg(path),
        Duration::from_secs(30),
    )?;
    out.split_whitespace()
        .next()
        .map(str::to_string)
        .context("sha256sum printed nothing")
}
