//! CLI clients of the admin socket (`ambit status`, ...): fetch, print ([`super::render`]), exit code.
//!
//! Exit codes: 0 when all is well, 1 when the answer reports a problem (a pod not enrolled, an
//! identity without a certificate, a connection `explain` says is refused), 2 when the agent
//! cannot be reached or refuses the request (the message of its answer is printed). A closed
//! stdout (`ambit status | head -1`) ends the output quietly and leaves the exit code as the
//! answer decides it, like every Unix filter.
use std::io::{self, Write};
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::UnixStream;

use super::render;
use crate::cli::{AdminArgs, ExplainArgs, LoggingArgs};

/// How long the CLI waits for the agent's answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// `ambit status`: exit code 0 when every local pod is enrolled, 1 when some failed, 2 when the
/// agent cannot be reached.
pub fn status(args: AdminArgs) -> anyhow::Result<()> {
    let v = get_or_exit(&args, "/status");
    show(&args, &v, render::status)?;
    let failed = v["pods"]
        .as_array()
        .is_some_and(|p| p.iter().any(|p| p["state"] != "enrolled"));
    if failed {
        std::process::exit(1);
    }
    Ok(())
}

/// `ambit certs`: exit code 1 when some identity has no valid certificate.
pub fn certs(args: AdminArgs) -> anyhow::Result<()> {
    let v = get_or_exit(&args, "/certs");
    show(&args, &v, render::certs)?;
    let unavailable = v["certs"]
        .as_array()
        .is_some_and(|c| c.iter().any(|c| c["state"] != "available"));
    if unavailable {
        std::process::exit(1);
    }
    Ok(())
}

/// `ambit workloads`.
pub fn workloads(args: AdminArgs) -> anyhow::Result<()> {
    let v = get_or_exit(&args, "/workloads");
    show(&args, &v, render::workloads)
}

/// `ambit connections`.
pub fn connections(args: AdminArgs) -> anyhow::Result<()> {
    let v = get_or_exit(&args, "/connections");
    show(&args, &v, render::connections)
}

/// `ambit policy`.
pub fn policy(args: AdminArgs) -> anyhow::Result<()> {
    let v = get_or_exit(&args, "/policies");
    show(&args, &v, render::policy)
}

/// `ambit logging [LEVEL]`.
pub fn logging(args: LoggingArgs) -> anyhow::Result<()> {
    let (method, path) = match &args.level {
        None => (http::Method::GET, "/logging".to_string()),
        Some(level) => (
            http::Method::POST,
            format!(
                "/logging?level={}",
                level.replace('%', "%25").replace('&', "%26")
            ),
        ),
    };
    let v = request(&args.admin.admin_socket, method, &path).unwrap_or_else(|e| fail(&e));
    show(&args.admin, &v, |v| {
        format!("{}\n", v["level"].as_str().unwrap_or("-"))
    })
}

/// `ambit metrics`: the Prometheus text.
pub fn metrics(args: AdminArgs) -> anyhow::Result<()> {
    let body =
        fetch(&args.admin_socket, http::Method::GET, "/metrics").unwrap_or_else(|e| fail(&e));
    emit(&mut io::stdout().lock(), &String::from_utf8_lossy(&body))
}

/// `ambit explain`: exit code 0 when the connection would be carried, 1 when refused.
pub fn explain(args: ExplainArgs) -> anyhow::Result<()> {
    let enc = |s: &str| {
        s.replace('%', "%25")
            .replace('[', "%5B")
            .replace(']', "%5D")
            .replace('&', "%26")
    };
    let from = args.from.or(args.src).unwrap_or_default();
    let to = args.to.or(args.dst).unwrap_or_default();
    let path = format!("/explain?from={}&to={}", enc(&from), enc(&to));
    let v = get_or_exit(&args.admin, &path);
    show(&args.admin, &v, render::explain)?;
    let refused = v["verdict"]
        .as_str()
        .is_some_and(|s| s.starts_with("refused"));
    if refused {
        std::process::exit(1);
    }
    Ok(())
}

/// GETs `path` from the admin socket and parses the JSON body.
pub fn get(socket: &Path, path: &str) -> anyhow::Result<Value> {
    request(socket, http::Method::GET, path)
}

/// Sends `method path` to the admin socket and parses the JSON body. An error answer becomes
/// an error carrying the agent's message (see [`render::error_message`]).
pub fn request(socket: &Path, method: http::Method, path: &str) -> anyhow::Result<Value> {
    let body = fetch(socket, method, path)?;
    serde_json::from_slice(&body).with_context(|| format!("{path}: response is not JSON"))
}

/// Writes `text` to `out`. A reader that went away (`EPIPE`: `ambit status | head -1`) ends the
/// output quietly; the caller goes on to its exit code. Other write errors are returned.
pub fn emit(out: &mut impl Write, text: &str) -> anyhow::Result<()> {
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        r => r.context("cannot write to stdout"),
    }
}

/// Prints `v` as pretty JSON with `--json`, else as `table` renders it.
fn show(args: &AdminArgs, v: &Value, table: impl Fn(&Value) -> String) -> anyhow::Result<()> {
    let text = if args.json {
        format!("{}\n", serde_json::to_string_pretty(v)?)
    } else {
        table(v)
    };
    emit(&mut io::stdout().lock(), &text)
}

fn get_or_exit(args: &AdminArgs, path: &str) -> Value {
    get(&args.admin_socket, path).unwrap_or_else(|e| fail(&e))
}

/// Prints `ambit: MESSAGE` on stderr (even if stderr is closed: no panic) and exits 2.
fn fail(e: &anyhow::Error) -> ! {
    let _ = writeln!(io::stderr().lock(), "ambit: {e:#}");
    std::process::exit(2);
}

/// `method path` on the admin socket: the body of a success answer, within [`ANSWER_TIMEOUT`].
fn fetch(socket: &Path, method: http::Method, path: &str) -> anyhow::Result<Bytes> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        tokio::time::timeout(ANSWER_TIMEOUT, raw(socket, method, path))
            .await
            .with_context(|| format!("admin socket {} did not answer in 10 s", socket.display()))?
    })
}

async fn raw(socket: &Path, method: http::Method, path: &str) -> anyhow::Result<Bytes> {
    let stream = UnixStream::connect(socket).await.with_context(|| {
        format!(
            "cannot connect to the agent's admin socket {}",
            socket.display()
        )
    })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method(method.clone())
        .uri(path)
        .header("host", "localhost")
        .body(Empty::<Bytes>::new())?;
    let resp = sender
        .send_request(req)
        .await
        .with_context(|| format!("{method} {path}"))?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        anyhow::bail!(render::error_message(method.as_str(), path, status, &body));
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer whose reader has gone away, as stdout is under `ambit status | head -1`.
    struct ClosedPipe {
        writes: usize,
    }

    impl Write for ClosedPipe {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            self.writes += 1;
            Err(io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    struct Full;

    impl Write for Full {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::from_raw_os_error(28)) // ENOSPC
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_closed_stdout_ends_the_output_quietly_other_write_errors_do_not() {
        let mut closed = ClosedPipe { writes: 0 };
        emit(&mut closed, "node node1\n").unwrap();
        emit(&mut closed, "more\n").unwrap();
        assert_eq!(closed.writes, 2, "the writes reached the closed pipe");
        let err = emit(&mut Full, "x").unwrap_err();
        assert!(
            format!("{err:#}").contains("cannot write to stdout"),
            "{err:#}"
        );
        let mut ok = Vec::new();
        emit(&mut ok, "node node1\n").unwrap();
        assert_eq!(ok, b"node node1\n");
    }
}
