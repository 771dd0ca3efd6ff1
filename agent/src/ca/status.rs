//! The CA's optional plain-HTTP `GET /status`: issued and refused counters as JSON (503 until the inventory is synced).
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::ca::service::CaService;

/// Serves `GET /status` on `listener` until aborted.
pub(crate) async fn serve(
    listener: TcpListener,
    service: Arc<CaService>,
    ready: watch::Receiver<bool>,
) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::warn!(%error, "ca status accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let service = service.clone();
        let ready = ready.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let service = service.clone();
                let ready = *ready.borrow();
                async move { Ok::<_, Infallible>(route(&service, ready, &req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .serve_connection(TokioIo::new(stream), svc);
            let _ = tokio::time::timeout(Duration::from_secs(30), conn).await;
        });
    }
}

fn route(service: &CaService, ready: bool, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let (code, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/status") if !ready => (
            StatusCode::SERVICE_UNAVAILABLE,
            b"{\"error\":\"inventory not synced yet\"}".to_vec(),
        ),
        (&Method::GET, "/status") => match serde_json::to_vec(&service.stats().snapshot()) {
            Ok(body) => (StatusCode::OK, body),
            Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, b"{}".to_vec()),
        },
        (_, "/status") => (
            StatusCode::METHOD_NOT_ALLOWED,
            b"{\"error\":\"use GET\"}".to_vec(),
        ),
        _ => (StatusCode::NOT_FOUND, b"{\"error\":\"not found\"}".to_vec()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = code;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}
