//! The admin socket server: `GET /status`; unknown paths 404, wrong methods 405, bad requests 400.
use std::convert::Infallible;
use std::os::unix::fs::PermissionsExt;
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

use crate::inventory::file::ReloadStats;
use crate::proxy::manager::Manager;
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
    /// Node name.
    pub node: String,
    /// Inventory file path.
    pub inventory: PathBuf,
    /// Inventory reload counters.
    pub reloads: Arc<ReloadStats>,
    /// The pod manager.
    pub manager: Arc<Manager>,
    /// The kernel side.
    pub datapath: Arc<Datapath>,
    /// When the agent started.
    pub started: Instant,
    /// Admin requests refused as malformed.
    pub bad_requests: AtomicU64,
}

/// Binds the admin socket (replacing a stale one), restricted to its owner.
pub fn bind(path: &Path) -> Result<UnixListener, Error> {
    let err = |source| Error::Bind {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(listener)
}

/// Serves admin requests until the task is dropped.
pub async fn serve(listener: UnixListener, state: Arc<AdminState>) {
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
        if stream.peer_cred().map(|c| c.uid()).ok() != Some(0) {
            tracing::warn!("admin connection from a non-root peer refused");
            continue;
        }
        let state = state.clone();
        tokio::spawn(async move {
            let svc_state = state.clone();
            let svc = service_fn(move |req| {
                let state = svc_state.clone();
                async move { Ok::<_, Infallible>(route(&state, req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .serve_connection(TokioIo::new(stream), svc);
            match tokio::time::timeout(Duration::from_secs(30), conn).await {
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
    let get = req.method() == Method::GET;
    match path {
        "/status" if get => json_response(StatusCode::OK, &status(state)),
        "/connections" if get => json_response(
            StatusCode::OK,
            &json!({ "connections": state.manager.connections() }),
        ),
        "/policies" if get => json_response(
            StatusCode::OK,
            &json!({ "policies": state.manager.policies() }),
        ),
        "/certs" if get => {
            json_response(StatusCode::OK, &json!({ "certs": state.manager.certs() }))
        }
        "/explain" if get => explain(state, req.uri().query().unwrap_or_default()),
        "/status" | "/connections" | "/policies" | "/explain" | "/certs" => json_response(
            StatusCode::METHOD_NOT_ALLOWED,
            &json!({"error": "method not allowed"}),
        ),
        _ => json_response(
            StatusCode::NOT_FOUND,
            &json!({"error": format!("no such path {path}")}),
        ),
    }
}

fn explain(state: &AdminState, query: &str) -> Response<Full<Bytes>> {
    let param = |name: &str| {
        query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| percent_decode(v))
    };
    let bad = |msg: String| {
        state.bad_requests.fetch_add(1, Ordering::Relaxed);
        json_response(StatusCode::BAD_REQUEST, &json!({ "error": msg }))
    };
    let (Some(from), Some(to)) = (param("from"), param("to")) else {
        return bad("explain needs from=NAMESPACE/POD and to=IP:PORT".into());
    };
    let Ok(to) = to.parse::<std::net::SocketAddr>() else {
        return bad(format!("to={to} is not IP:PORT (IPv6 in brackets)"));
    };
    match state.manager.explain(&from, to) {
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
        "node": state.node,
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_s": state.started.elapsed().as_secs(),
        "inventory": {
            "path": state.inventory,
            "loads": state.reloads.loads.load(Ordering::Relaxed),
            "errors": state.reloads.errors.load(Ordering::Relaxed),
        },
        "admin": { "bad_requests": state.bad_requests.load(Ordering::Relaxed) },
        "pods": state.manager.status(),
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
