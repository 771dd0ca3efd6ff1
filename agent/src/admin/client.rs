//! CLI clients of the admin socket (`ambit status`).
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

use crate::cli::{AdminArgs, ExplainArgs, LoggingArgs};

/// `ambit status`: exit code 0 when every local pod is enrolled, 1 when some failed, 2 when the
/// agent cannot be reached.
pub fn status(args: AdminArgs) -> anyhow::Result<()> {
    let v = get_or_exit(&args, "/status");
    if args.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print_status(&v);
    }
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
    let rows = v["certs"].as_array().cloned().unwrap_or_default();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "{:<48} {:<13} {:<5} {:<22} {:<22} {:<22} SERIAL",
            "IDENTITY", "STATE", "PODS", "NOT AFTER", "NEXT RENEWAL", "LAST ERROR"
        );
        for c in &rows {
            println!(
                "{:<48} {:<13} {:<5} {:<22} {:<22} {:<22} {}",
                s(&c["identity"]),
                s(&c["state"]),
                n(&c["pods"]),
                c["notAfter"].as_str().unwrap_or("-"),
                c["nextRenewal"].as_str().unwrap_or("-"),
                c["lastError"].as_str().unwrap_or("-"),
                c["serial"].as_str().unwrap_or("-"),
            );
        }
    }
    if rows.iter().any(|c| c["state"] != "available") {
        std::process::exit(1);
    }
    Ok(())
}

/// `ambit workloads`.
pub fn workloads(args: AdminArgs) -> anyhow::Result<()> {
    let Some(v) = json_or_table(&args, "/workloads")? else {
        return Ok(());
    };
    println!(
        "{:<32} {:<8} {:<6} {:<9} {:<30} IDENTITY",
        "POD", "NODE", "LOCAL", "ENROLLED", "IPS"
    );
    for w in v["workloads"].as_array().into_iter().flatten() {
        let ips: Vec<&str> = w["ips"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| i.as_str())
            .collect();
        println!(
            "{:<32} {:<8} {:<6} {:<9} {:<30} {}",
            format!("{}/{}", s(&w["namespace"]), s(&w["name"])),
            s(&w["node"]),
            w["local"],
            w["enrolled"],
            ips.join(","),
            s(&w["identity"]),
        );
    }
    Ok(())
}

/// `ambit logging [LEVEL]`.
pub fn logging(args: LoggingArgs) -> anyhow::Result<()> {
    let v = match &args.level {
        None => get_or_exit(&args.admin, "/logging"),
        Some(level) => {
            let path = format!(
                "/logging?level={}",
                level.replace('%', "%25").replace('&', "%26")
            );
            match request(&args.admin.admin_socket, http::Method::POST, &path) {
                Ok(v) => v,
                Err(e) => {
                    eprintln!("ambit: {e:#}");
                    std::process::exit(2);
                }
            }
        }
    };
    if args.admin.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("{}", s(&v["level"]));
    }
    Ok(())
}

/// `ambit metrics`: the Prometheus text.
pub fn metrics(args: AdminArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let text = rt.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(10),
            raw(&args.admin_socket, http::Method::GET, "/metrics"),
        )
        .await
    });
    match text {
        Ok(Ok(body)) => {
            print!("{}", String::from_utf8_lossy(&body));
            Ok(())
        }
        Ok(Err(e)) => {
            eprintln!("ambit: {e:#}");
            std::process::exit(2);
        }
        Err(_) => {
            eprintln!(
                "ambit: admin socket {} did not answer in 10 s",
                args.admin_socket.display()
            );
            std::process::exit(2);
        }
    }
}

/// `ambit connections`.
pub fn connections(args: AdminArgs) -> anyhow::Result<()> {
    let Some(v) = json_or_table(&args, "/connections")? else {
        return Ok(());
    };
    println!(
        "{:<9} {:<20} {:<24} {:<24} {:<10} {:>8} {:>10} {:>10}  PEER IDENTITY",
        "DIRECTION", "POD", "SOURCE", "DESTINATION", "SECURITY", "AGE(s)", "SENT", "RECEIVED"
    );
    for c in v["connections"].as_array().into_iter().flatten() {
        let peer = if c["direction"] == "outbound" {
            &c["dst_identity"]
        } else {
            &c["src_identity"]
        };
        println!(
            "{:<9} {:<20} {:<24} {:<24} {:<10} {:>8.1} {:>10} {:>10}  {}",
            s(&c["direction"]),
            s(&c["pod"]),
            s(&c["src"]),
            s(&c["dst"]),
            s(&c["security"]),
            c["age_s"].as_f64().unwrap_or(0.0),
            n(&c["bytes_sent"]),
            n(&c["bytes_received"]),
            peer.as_str().unwrap_or("-"),
        );
    }
    Ok(())
}

/// `ambit policy`.
pub fn policy(args: AdminArgs) -> anyhow::Result<()> {
    let Some(v) = json_or_table(&args, "/policies")? else {
        return Ok(());
    };
    println!(
        "{:<28} {:<8} {:<12} {:<10} DECIDED BY",
        "POD", "PORT", "MODE", "LEVEL"
    );
    for p in v["policies"].as_array().into_iter().flatten() {
        let pa = &p["peer_authentication"];
        let row = |port: &str, r: &serde_json::Value| {
            println!(
                "{:<28} {:<8} {:<12} {:<10} {}",
                s(&p["pod"]),
                port,
                s(&r["mode"]),
                s(&r["level"]),
                r["policy"].as_str().unwrap_or("(default: nothing set)")
            );
        };
        row("*", &pa["default"]);
        for (port, r) in pa["ports"].as_object().into_iter().flatten() {
            row(port, r);
        }
    }
    Ok(())
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
    if args.admin.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("{} -> {}: {}", s(&v["from"]), s(&v["to"]), s(&v["verdict"]));
        println!("\nsource agent:");
        for step in v["outbound"]["steps"].as_array().into_iter().flatten() {
            println!("  - {}", s(step));
        }
        if let Some(r) = v["outbound"]["reason"].as_str() {
            println!("  refused: {r}");
        }
        if v["inbound"].is_object() {
            let i = &v["inbound"];
            let pa = &i["peer_authentication"];
            println!("\ndestination agent ({}):", s(&i["pod"]));
            println!(
                "  - PeerAuthentication: {} ({}, {})",
                s(&pa["mode"]),
                s(&pa["level"]),
                pa["policy"].as_str().unwrap_or("nothing set")
            );
            println!("  - AuthorizationPolicy: {}", i["authorization"]);
        }
        let warnings = v["warnings"].as_array().cloned().unwrap_or_default();
        if !warnings.is_empty() {
            println!("\nwarnings:");
            for w in warnings {
                println!("  ! {}", s(&w));
            }
        }
    }
    let refused = v["verdict"]
        .as_str()
        .is_some_and(|s| s.starts_with("refused"));
    if refused {
        std::process::exit(1);
    }
    Ok(())
}

/// GETs `path`; with `--json` prints the answer and returns `None`, otherwise returns it for
/// the caller's table.
fn json_or_table(args: &AdminArgs, path: &str) -> anyhow::Result<Option<serde_json::Value>> {
    let v = get_or_exit(args, path);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(None);
    }
    Ok(Some(v))
}

fn get_or_exit(args: &AdminArgs, path: &str) -> serde_json::Value {
    match get(&args.admin_socket, path) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("ambit: {e:#}");
            std::process::exit(2);
        }
    }
}

/// GETs `path` from the admin socket and parses the JSON body.
pub fn get(socket: &Path, path: &str) -> anyhow::Result<serde_json::Value> {
    request(socket, http::Method::GET, path)
}

/// Sends `method path` to the admin socket and parses the JSON body.
pub fn request(
    socket: &Path,
    method: http::Method,
    path: &str,
) -> anyhow::Result<serde_json::Value> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let body = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), raw(socket, method, path))
            .await
            .with_context(|| format!("admin socket {} did not answer in 10 s", socket.display()))?
    })?;
    serde_json::from_slice(&body).with_context(|| format!("{path}: response is not JSON"))
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
        bail!(
            "{method} {path}: {status}: {}",
            String::from_utf8_lossy(&body).trim()
        );
    }
    Ok(body)
}

fn print_status(v: &serde_json::Value) {
    println!(
        "node {}  version {}  up {}s",
        s(&v["node"]),
        s(&v["version"]),
        v["uptime_s"]
    );
    println!(
        "inventory {}  loads {}  errors {}",
        s(&v["inventory"]["source"]),
        v["inventory"]["loads"],
        v["inventory"]["errors"]
    );
    if let Some(h) = v["inventory"]["held"].as_object() {
        println!(
            "inventory reload held back: {} (last good inventory in force; applies if unchanged after {} ms)",
            s(&h["message"]),
            n(&h["settle_ms"])
        );
    }
    let mesh = &v["mesh"];
    if mesh["mesh_only"].as_bool() == Some(true) {
        println!(
            "capture mesh-only: {} of {} destinations listed{}",
            n(&mesh["destinations"]),
            n(&mesh["capacity"]),
            if mesh["capture_everything"].as_bool() == Some(true) {
                " (list incomplete: capturing every destination)"
            } else {
                ""
            }
        );
    } else {
        println!("capture: every destination");
    }
    println!();
    println!(
        "{:<24} {:<9} {:<28} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6}",
        "POD", "STATE", "IPS", "REDIR", "EXEMPT", "STEER", "BYPASS", "DROP", "OUT", "IN"
    );
    for p in v["pods"].as_array().into_iter().flatten() {
        let c = &p["counters"];
        let x = &p["proxy"];
        let ips: Vec<&str> = p["ips"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| i.as_str())
            .collect();
        println!(
            "{:<24} {:<9} {:<28} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6}",
            format!("{}/{}", s(&p["namespace"]), s(&p["name"])),
            s(&p["state"]),
            ips.join(","),
            n(&c["redirected"]),
            n(&c["exempted"]),
            n(&c["steered"]),
            n(&c["bypassed"]),
            n(&c["dropped"]),
            n(&x["outbound_accepted"]),
            n(&x["inbound_accepted"]),
        );
        if let Some(e) = p["error"].as_str() {
            println!("    error: {e}");
        }
    }
    println!();
    println!("kernel counters:");
    if let Some(k) = v["kernel"].as_object() {
        for (name, val) in k {
            println!("  {name:<28} {val}");
        }
    }
}

fn s(v: &serde_json::Value) -> String {
    v.as_str().map_or_else(|| v.to_string(), str::to_string)
}

fn n(v: &serde_json::Value) -> String {
    v.as_u64()
        .map_or_else(|| "-".to_string(), |x| x.to_string())
}
