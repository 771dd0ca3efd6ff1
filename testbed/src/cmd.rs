//! Running external commands (`ip`, `nsenter`, test clients) with a deadline and captured output.
use std::io::Read;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

/// How long a plain setup command (`ip`, `sysctl`) may take.
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs `cmd` to completion, capturing stdout and stderr; kills it (and its process group) at
/// `timeout` and returns an error naming the command.
pub fn run(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let shown = describe(cmd);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // Own process group, so a timeout kills whatever the command forked too.
    std::os::unix::process::CommandExt::process_group(cmd, 0);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start `{shown}`"))?;
    let stdout = reader(child.stdout.take());
    let stderr = reader(child.stderr.take());
    let status = match wait_deadline(&mut child, timeout)? {
        Some(status) => status,
        None => {
            kill_group(&child);
            let _ = child.wait();
            let err = collect(&stderr, Duration::from_secs(1));
            bail!(
                "`{shown}` timed out after {timeout:?}; stderr: {}",
                String::from_utf8_lossy(&err).trim()
            );
        }
    };
    Ok(Output {
        status,
        stdout: collect(&stdout, Duration::from_secs(5)),
        stderr: collect(&stderr, Duration::from_secs(5)),
    })
}

/// Runs `cmd` like [`run`] and requires success; returns stdout as text.
pub fn check(cmd: &mut Command, timeout: Duration) -> Result<String> {
    let shown = describe(cmd);
    let out = run(cmd, timeout)?;
    if !out.status.success() {
        bail!(
            "`{shown}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `ip ARGS...` and requires success.
pub fn ip(args: &[&str]) -> Result<String> {
    check(Command::new("ip").args(args), SETUP_TIMEOUT)
}

/// Waits for `child` until `timeout`; `None` when it is still running then.
pub fn wait_deadline(child: &mut Child, timeout: Duration) -> Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().context("waiting for child")? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// `program arg arg...`, for messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn kill_group(child: &Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

fn reader(pipe: Option<impl Read + Send + 'static>) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    if let Some(mut pipe) = pipe {
        thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            let _ = tx.send(buf);
        });
    }
    rx
}

/// The pipe's contents, or nothing if a grandchild that escaped the kill still holds it open.
fn collect(rx: &mpsc::Receiver<Vec<u8>>, timeout: Duration) -> Vec<u8> {
    rx.recv_timeout(timeout).unwrap_or_default()
}
