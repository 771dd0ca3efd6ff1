//! The admin socket server: `GET /status`; unknown paths 404, wrong methods 405, bad requests 400.
//!
//! It runs on its own OS thread with its own single-threaded runtime ([`spawn_thread`]), so
//! floods on the data plane (its own runtime) cannot queue admin requests behind connection
//! tasks. At most `limits.maxAdminConnections` connections are served at once per listener;
//! past it a connection is closed at once and counted; a request head must arrive within
//! [`HEADER_TIMEOUT`] and a connection lasts at most [`CONNECTION_TIMEOUT`].
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::UnixListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use super::handler::Handler;
use super::logging::LogControl;
use super::metrics;
use crate::config::Config;
use crate::error::error_chain;
use crate::inventory::file::ReloadStats;
use crate::inventory::Snapshot;
use crate::redirect::Datapath;

/// Errors starting the admin server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket could not be created.
    #[error("cannot bind admin socket {}", path.display())]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What the admin API reports on.
pub struct AdminState {
    /// The agent's configuration.
    pub cfg: Arc<Config>,
    /// Inventory reload counters.
    pub reloads: Arc<ReloadStats>,
    /// The agent's answers (the pod manager's).
    pub agent: Arc<dyn Handler>,
    /// The kernel side.
    pub datapath: Arc<Datapath>,
    /// When the agent started.
    pub started: Instant,
    /// Admin requests refused as malformed.
    pub bad_requests: AtomicU64,
    /// Admin connections refused (not root, over the cap).
    pub refusals: Refusals,
    /// Metrics.
    pub registry: Registry,
    /// Run-time log filter.
    pub log: LogControl,
    /// The inventory as last loaded.
    pub inventory_rx: watch::Receiver<Arc<Snapshot>>,
    /// The istiod stream's state, with `inventory: {kind: istiod}`.
    pub xds: Option<crate::inventory::istiod::status::StatusHandle>,
}

/// Admin connections refused: handles shared by the admin socket, the metrics listener, the
/// registry (`ambit_admin_refused_peers_total`, `ambit_admin_refused_over_limit_total`) and
/// `/status`.
#[derive(Debug, Clone, Default)]
pub struct Refusals {
    /// Connections refused because the peer was not root.
    pub peers: Counter,
    /// Connections closed at once because `limits.maxAdminConnections` were open.
    pub over_limit: Counter,
    /// Rate of the over-limit log line.
    log: Arc<crate::proxy::caps::LogLimiter>,
}

/// Deadline for a request head (also for the next one on a kept-alive connection).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head read; admin requests are small, and a flood of huge heads costs the
/// admin thread little before the connection is refused (431).
const MAX_REQUEST_HEAD: usize = 64 * 1024;
/// Longest life of one admin connection.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// Binds the admin socket (replacing a stale one), restricted to its owner. The listener is
/// non-blocking, for the admin thread's runtime ([`spawn_thread`]).
pub fn bind(path: &Path) -> Result<std::os::unix::net::UnixListener, Error> {
    crate::sys::bind_owner_only(path).map_err(|source| Error::Bind {
        path: path.to_path_buf(),
        source,
    })
}

/// Nice value of the admin thread (the data plane runs at 0).
pub const ADMIN_NICE: i32 = -10;

/// Serves the admin socket, and the metrics listener when given, on a thread of their own
/// with a single-threaded runtime, until the process exits; also every listener later sent on
/// `rebound` (the socket bound again at the same path when this agent takes the node back from
/// a newer agent that replaced it).
pub fn spawn_thread(
    listener: std::os::unix::net::UnixListener,
    metrics: Option<std::net::TcpListener>,
    state: Arc<AdminState>,
    mut rebound: tokio::sync::mpsc::UnboundedReceiver<std::os::unix::net::UnixListener>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("ambit-admin".into())
        .spawn(move || {
            // Ahead of data-plane threads for a CPU: `/status` must answer promptly while the
            // data plane is flooded. Its peers are root (on the admin socket) and the metrics
            // scraper, and it is one thread, so it can never hold more than one CPU.
            if let Err(e) = crate::sys::set_thread_nice(ADMIN_NICE) {
                tracing::warn!(error = %e, nice = ADMIN_NICE, "cannot raise the admin thread's priority; /status may wait behind data-plane load");
            }
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the admin runtime; admin socket not served");
                    return;
                }
            };
            rt.block_on(async move {
                if let Some(m) = metrics {
                    match m.set_nonblocking(true).and_then(|()| tokio::net::TcpListener::from_std(m)) {
                        Ok(m) => drop(tokio::spawn(serve_metrics(m, state.clone()))),
                        Err(e) => tracing::error!(error = %e, "cannot serve metricsListen"),
                    }
                }
                let serve_std = |l: std::os::unix::net::UnixListener| match UnixListener::from_std(l) {
                    Ok(l) => drop(tokio::spawn(serve(l, state.clone()))),
                    Err(e) => tracing::error!(error = %e, "cannot serve the admin socket"),
                };
                serve_std(listener);
                while let Some(l) = rebound.recv().await {
                    serve_std(l);
                }
                std::future::pending::<()>().await;
            });
        })
}

/// One of `slots`, or `None` (the connection is to be closed, counted and logged at most once
/// a second) when every slot is taken.
fn admit(
    slots: &Arc<Semaphore>,
    listener: &'static str,
    refusals: &Refusals,
) -> Option<OwnedSemaphorePermit> {
    if let Ok(p) = slots.clone().try_acquire_owned() {
        return Some(p);
    }
    refusals.over_limit.inc();
    if let Some(suppressed) = refusals.log.allow(Instant::now()) {
        tracing::warn!(
            listener,
            suppressed,
            "admin connection closed: limits.maxAdminConnections are open; `suppressed` more \
             since the last such line"
        );
    }
    None
}

/// Serves admin requests until the task is dropped.
pub async fn serve(listener: UnixListener, state: Arc<AdminState>) {
    let slots = Arc::new(Semaphore::new(
        state.cfg.limits.max_admin_connections.max(1),
    ));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Only root may use the admin API (the socket mode already restricts it).
        match stream.peer_cred() {
            Ok(cred) if cred.uid() == 0 => {}
            Ok(cred) => {
                state.refusals.peers.inc();
                let pid = cred.pid().unwrap_or(0);
                tracing::warn!(
                    peer.uid = cred.uid(),
                    peer.pid = pid,
                    "admin connection from a non-root peer refused"
                );
                continue;
            }
            Err(e) => {
                state.refusals.peers.inc();
                tracing::warn!(error = %e, "admin connection refused: peer credentials unreadable");
                continue;
            }
        }
        let Some(slot) = admit(&slots, "admin_socket", &state.refusals) else {
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let svc_state = state.clone();
            let svc = service_fn(move |req| {
                let state = svc_state.clone();
                async move { Ok::<_, Infallible>(route(&state, req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(MAX_REQUEST_HEAD)
                .serve_connection(TokioIo::new(stream), svc);
            match tokio::time::timeout(CONNECTION_TIMEOUT, conn).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    // hyper answers malformed requests with 400 itself; count them here.
                    state.bad_requests.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(error = %e, "admin connection ended with error");
                }
                Err(_) => tracing::debug!("admin connection closed after 30 s"),
            }
        });
    }
}

fn route(state: &AdminState, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let query = req.uri().query().unwrap_or_default();
    let (get, post) = (req.method() == Method::GET, req.method() == Method::POST);
    let ok = |v: serde_json::Value| json_response(StatusCode::OK, &v);
    match path {
        "/status" if get => ok(status(state)),
        "/workloads" if get => ok(json!({ "workloads": workloads(state) })),
        "/certs" if get => ok(json!({ "certs": state.agent.certs() })),
        "/connections" if get => ok(json!({ "connections": state.agent.connections() })),
        "/policies" if get => ok(json!({ "policies": state.agent.policies() })),
        "/explain" if get => explain(state, query),
        "/config_dump" if get => ok(config_dump(state)),
        "/metrics" if get => metrics_response(state),
        "/logging" if get => ok(json!({ "level": state.log.current() })),
        "/logging" if post => match param(query, "level") {
            None => bad(
                state,
                "POST /logging needs level=FILTER (e.g. info, ambit=debug)".into(),
            ),
            Some(level) => match state.log.set(&level) {
                Ok(()) => ok(json!({ "level": state.log.current() })),
                Err(e) => bad(state, error_chain(&e)),
            },
        },
        "/healthz/ready" if get => {
            let (ready, reasons) = state.agent.readiness();
            let code = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            json_response(code, &json!({ "ready": ready, "waiting_for": reasons }))
        }
        "/drain" if post => {
            state.agent.begin_drain();
            ok(json!({ "draining": true }))
        }
        "/status" | "/workloads" | "/certs" | "/connections" | "/policies" | "/explain"
        | "/config_dump" | "/metrics" | "/logging" | "/healthz/ready" | "/drain" => json_response(
            StatusCode::METHOD_NOT_ALLOWED,
            &json!({"error": "method not allowed"}),
        ),
        _ => json_response(
            StatusCode::NOT_FOUND,
            &json!({"error": format!("no such path {path}")}),
        ),
    }
}

fn bad(state: &AdminState, msg: String) -> Response<Full<Bytes>> {
    state.bad_requests.fetch_add(1, Ordering::Relaxed);
    json_response(StatusCode::BAD_REQUEST, &json!({ "error": msg }))
}

/// The value of `name` in a query string, percent-decoded.
pub fn param(query: &str, name: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| percent_decode(v))
}

fn metrics_response(state: &AdminState) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(metrics::render(&state.registry))));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
    );
    resp
}

/// Every pod in the inventory, with whether this agent serves it.
fn workloads(state: &AdminState) -> Vec<serde_json::Value> {
    let snap = state.inventory_rx.borrow().clone();
    let td = &state.cfg.trust_domain;
    snap.workloads
        .values()
        .map(|w| {
            json!({
                "name": w.name,
                "namespace": w.namespace,
                "identity": w.spiffe_id(td),
                "node": w.node,
                "local": w.node == state.cfg.node,
                "ips": w.ips,
                "enrolled": w.enrolled,
                "deleting": w.deleting,
                "host_network": w.host_network,
                "labels": w.labels,
                "netns": w.netns,
            })
        })
        .collect()
}

/// Everything in one document.
fn config_dump(state: &AdminState) -> serde_json::Value {
    json!({
        "config": &*state.cfg,
        "log_level": state.log.current(),
        "status": status(state),
        "workloads": workloads(state),
        "certs": state.agent.certs(),
        "connections": state.agent.connections(),
        "policies": state.agent.policies(),
    })
}

/// Serves only `GET /metrics` on a TCP listener (Prometheus scrapes; `:15020` in the DaemonSet).
pub async fn serve_metrics(listener: tokio::net::TcpListener, state: Arc<AdminState>) {
    let slots = Arc::new(Semaphore::new(
        state.cfg.limits.max_admin_connections.max(1),
    ));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Some(slot) = admit(&slots, "metrics", &state.refusals) else {
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let svc = service_fn(move |req: Request<Incoming>| {
                let state = state.clone();
                async move {
                    Ok::<_, Infallible>(match (req.method(), req.uri().path()) {
                        (&Method::GET, "/metrics" | "/stats/prometheus") => {
                            metrics_response(&state)
                        }
                        _ => json_response(
                            StatusCode::NOT_FOUND,
                            &json!({"error": "only GET /metrics here"}),
                        ),
                    })
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(MAX_REQUEST_HEAD)
                .serve_connection(TokioIo::new(stream), svc);
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
        });
    }
}

fn explain(state: &AdminState, query: &str) -> Response<Full<Bytes>> {
    let (Some(from), Some(to)) = (param(query, "from"), param(query, "to")) else {
        return bad(
            state,
            "explain needs from=NAMESPACE/POD and to=IP:PORT".into(),
        );
    };
    let Ok(to) = to.parse::<std::net::SocketAddr>() else {
        return bad(state, format!("to={to} is not IP:PORT (IPv6 in brackets)"));
    };
    match state.agent.explain(&from, to) {
        Ok(e) => json_response(StatusCode::OK, &json!(e)),
        Err(e) => json_response(StatusCode::NOT_FOUND, &json!({ "error": e.to_string() })),
    }
}

/// Decodes `%XX` escapes of a query value; malformed escapes are kept as written.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = |c: u8| (c as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The `/status` document.
pub fn status(state: &AdminState) -> serde_json::Value {
    let kernel: serde_json::Map<String, serde_json::Value> = state
        .datapath
        .stats()
        .into_iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    json!({
        "node": state.cfg.node,
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_s": state.started.elapsed().as_secs(),
        "inventory": {
            "source": state.cfg.inventory.to_string(),
            "loads": state.reloads.loads.load(Ordering::Relaxed),
            "errors": state.reloads.errors.load(Ordering::Relaxed),
            "warnings": state.inventory_rx.borrow().warnings.clone(),
            "held": state.reloads.held(),
            "held_total": state.reloads.holds.load(Ordering::Relaxed),
            "confirmed_total": state.reloads.confirmed.load(Ordering::Relaxed),
            "ambiguous_addresses": state
                .inventory_rx
                .borrow()
                .addresses()
                .ambiguous()
                .cloned()
                .collect::<Vec<_>>(),
            "istiod": state.xds.as_ref().map(|x| x.snapshot()),
        },
        "admin": {
            "bad_requests": state.bad_requests.load(Ordering::Relaxed),
            "refused_peers": state.refusals.peers.get(),
            "refused_over_limit": state.refusals.over_limit.get(),
        },
        "agent": state.datapath.handover().summary(),
        "pods": state.agent.pods(),
        "mesh": state.datapath.mesh_summary(),
        "kernel": kernel,
    })
}

fn json_response(code: StatusCode, v: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut body = serde_json::to_vec_pretty(v).unwrap_or_default();
    body.push(b'\n');
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = code;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}
