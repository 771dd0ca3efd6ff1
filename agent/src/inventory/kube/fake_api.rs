//! MOCK Kubernetes API server for the reflector tests (list + watch over HTTP on 127.0.0.1).
//!
//! This is a mock, used only to drive kube-rs's real client and watcher through real sockets
//! (the unit tests here, and the e2e crate's tests of a real agent process, which build it with
//! the `fake-api` feature; the release binary does not contain it):
//! it serves collections of JSON objects, numbered watch events replayed from a resourceVersion,
//! 404 Status for kinds it is told the cluster lacks, injected 500s, fixed documents at
//! other paths (the CA's OIDC discovery tests), and JSON merge patches of pods (recorded, with
//! the UID precondition checked; injected failures). It knows nothing of
//! field selectors, pagination or bookmarks, which the reflectors here do not need.
#![allow(
    clippy::unwrap_used,
    reason = "a test server: a broken invariant panics the test (STYLE.md §7)"
)]
use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{Full, StreamBody};
use hyper::body::Frame;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::sync::Notify;

/// Collection path for a `kind` (the subset the inventory watches).
pub fn path_of(kind: &str) -> &'static str {
    match kind {
        "Pod" => "/api/v1/pods",
        "Namespace" => "/api/v1/namespaces",
        "Node" => "/api/v1/nodes",
        "Service" => "/api/v1/services",
        "EndpointSlice" => "/apis/discovery.k8s.io/v1/endpointslices",
        "PeerAuthentication" => "/apis/security.istio.io/v1/peerauthentications",
        "AuthorizationPolicy" => "/apis/security.istio.io/v1/authorizationpolicies",
        "DestinationRule" => "/apis/networking.istio.io/v1/destinationrules",
        other => panic!("fake API does not serve {other}"),
    }
}

#[derive(Default)]
struct State {
    rv: u64,
    /// path -> key -> object
    objects: BTreeMap<String, BTreeMap<String, Value>>,
    /// (rv, path, event type, object)
    log: Vec<(u64, String, &'static str, Value)>,
    missing: BTreeSet<String>,
    forbidden: BTreeSet<String>,
    fail_lists: BTreeMap<String, usize>,
    list_requests: BTreeMap<String, usize>,
    /// path -> (status, body, requests): fixed documents (OIDC discovery, keys).
    raw: BTreeMap<String, (StatusCode, String, usize)>,
    /// Every PATCH received, in order.
    patches: Vec<PatchCall>,
    /// (path, query) of every other request, in order.
    queries: Vec<(String, String)>,
    /// How many of the next pod patches answer 500.
    fail_patches: usize,
}

/// One PATCH request the server received.
#[derive(Debug, Clone)]
pub struct PatchCall {
    /// `namespace/name` of the pod.
    pub pod: String,
    /// The `fieldManager` query parameter.
    pub field_manager: Option<String>,
    /// The `content-type` header.
    pub content_type: String,
    /// The patch document.
    pub body: Value,
    /// The status answered.
    pub status: u16,
}

/// A running mock API server.
pub struct FakeApi {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    notify: Arc<Notify>,
}

impl FakeApi {
    /// Starts serving on 127.0.0.1 (an ephemeral port) in the current runtime.
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let notify = Arc::new(Notify::new());
        let (s, n) = (state.clone(), notify.clone());
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (s, n) = (s.clone(), n.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let (s, n) = (s.clone(), n.clone());
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = http_body_util::BodyExt::collect(body)
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            if parts.method == hyper::Method::PATCH {
                                return Ok::<_, Infallible>(patch(&s, &n, &parts, &body));
                            }
                            Ok::<_, Infallible>(route(&s, &n, &Request::from_parts(parts, ())))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        Self {
            addr,
            state,
            notify,
        }
    }

    /// A kube client talking to this server.
    pub fn client(&self) -> kube::Client {
        let uri = format!("http://{}", self.addr).parse().unwrap();
        kube::Client::try_from(kube::Config::new(uri)).unwrap()
    }

    /// Adds or replaces an object (a JSON value with `kind` and `metadata`).
    pub fn apply(&self, obj: Value) {
        self.record(obj, false);
    }

    /// Deletes an object.
    pub fn delete(&self, obj: Value) {
        self.record(obj, true);
    }

    /// Makes a kind's collection answer 404, as for a CRD that is not installed.
    pub fn set_missing(&self, kind: &str) {
        self.state
            .lock()
            .unwrap()
            .missing
            .insert(path_of(kind).into());
    }

    /// Makes a kind's collection answer 403, as for a kind the cluster role does not grant.
    pub fn set_forbidden(&self, kind: &str) {
        self.state
            .lock()
            .unwrap()
            .forbidden
            .insert(path_of(kind).into());
    }

    /// Makes the next `n` lists of `kind` fail with 500.
    pub fn fail_lists(&self, kind: &str, n: usize) {
        self.state
            .lock()
            .unwrap()
            .fail_lists
            .insert(path_of(kind).into(), n);
    }

    /// Serves `body` with `code` at `path` (any method), replacing what was there.
    pub fn serve_raw(&self, path: &str, code: StatusCode, body: impl Into<String>) {
        let mut s = self.state.lock().unwrap();
        let count = s.raw.get(path).map_or(0, |r| r.2);
        s.raw.insert(path.into(), (code, body.into(), count));
    }

    /// How many requests `path` (set with [`FakeApi::serve_raw`]) got.
    pub fn raw_requests(&self, path: &str) -> usize {
        self.state.lock().unwrap().raw.get(path).map_or(0, |r| r.2)
    }

    /// Empties `kind`'s collection without delete events and ends its watches with 410 Gone:
    /// the reflector re-lists and finds nothing, as after an API server restored from an
    /// empty backup or a proxy answering with an empty list.
    pub fn relist_empty(&self, kind: &str) {
        let path = path_of(kind).to_string();
        let mut s = self.state.lock().unwrap();
        s.objects.remove(&path);
        s.rv += 1;
        let rv = s.rv;
        let gone = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": "too old resource version",
            "reason": "Expired",
            "code": 410,
        });
        s.log.push((rv, path, "ERROR", gone));
        drop(s);
        self.notify.notify_waiters();
    }

    /// Every PATCH received so far, in order.
    pub fn patches(&self) -> Vec<PatchCall> {
        self.state.lock().unwrap().patches.clone()
    }

    /// Makes the next `n` pod patches fail with 500.
    pub fn fail_patches(&self, n: usize) {
        self.state.lock().unwrap().fail_patches = n;
    }

    /// The query strings of the list and watch requests `kind` got, in order.
    pub fn queries(&self, kind: &str) -> Vec<String> {
        let s = self.state.lock().unwrap();
        let path = path_of(kind);
        s.queries
            .iter()
            .filter(|(p, _)| p == path)
            .map(|(_, q)| q.clone())
            .collect()
    }

    /// The stored pod `namespace/name`, if any.
    pub fn pod(&self, key: &str) -> Option<Value> {
        let s = self.state.lock().unwrap();
        s.objects.get(path_of("Pod"))?.get(key).cloned()
    }

    /// How many list requests `kind` got.
    pub fn list_requests(&self, kind: &str) -> usize {
        let s = self.state.lock().unwrap();
        s.list_requests.get(path_of(kind)).copied().unwrap_or(0)
    }

    fn record(&self, mut obj: Value, delete: bool) {
        let kind = obj["kind"].as_str().unwrap().to_string();
        let path = path_of(&kind).to_string();
        let key = format!(
            "{}/{}",
            obj["metadata"]["namespace"].as_str().unwrap_or(""),
            obj["metadata"]["name"].as_str().unwrap()
        );
        let mut s = self.state.lock().unwrap();
        s.rv += 1;
        let rv = s.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let coll = s.objects.entry(path.clone()).or_default();
        let kind = if delete {
            coll.remove(&key);
            "DELETED"
        } else if coll.insert(key, obj.clone()).is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        s.log.push((rv, path, kind, obj));
        drop(s);
        self.notify.notify_waiters();
    }
}

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn route(state: &Arc<Mutex<State>>, notify: &Arc<Notify>, req: &Request<()>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let query: BTreeMap<String, String> = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let mut s = state.lock().unwrap();
    let q = req.uri().query().unwrap_or("").to_string();
    s.queries.push((path.clone(), q));
    if let Some((code, body, count)) = s.raw.get_mut(&path) {
        *count += 1;
        return Response::builder()
            .status(*code)
            .header("content-type", "application/json")
            .body(http_body_util::BodyExt::boxed(Full::new(Bytes::from(
                body.clone(),
            ))))
            .unwrap();
    }
    if s.forbidden.contains(&path) {
        return status(StatusCode::FORBIDDEN, "Forbidden", "cannot list resource");
    }
    if s.missing.contains(&path) || !is_served(&path) {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        );
    }
    if query.get("watch").map(String::as_str) == Some("true") {
        let from: u64 = query
            .get("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        drop(s);
        return watch(state.clone(), notify.clone(), path, from);
    }
    *s.list_requests.entry(path.clone()).or_default() += 1;
    if let Some(n) = s.fail_lists.get_mut(&path).filter(|n| **n > 0) {
        *n -= 1;
        return status(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "injected failure",
        );
    }
    let items: Vec<Value> = s
        .objects
        .get(&path)
        .map(|c| c.values().cloned().collect())
        .unwrap_or_default();
    let body = json!({
        "kind": "List",
        "apiVersion": "v1",
        "metadata": {"resourceVersion": s.rv.to_string()},
        "items": items,
    });
    json_response(StatusCode::OK, &body)
}

/// `PATCH /api/v1/namespaces/NS/pods/NAME` with a JSON merge patch: applied to the stored
/// pod (a `metadata.uid` in the patch must match, as the API server requires), recorded, and
/// sent to watchers as MODIFIED.
fn patch(
    state: &Arc<Mutex<State>>,
    notify: &Arc<Notify>,
    parts: &hyper::http::request::Parts,
    body: &[u8],
) -> Response<Body> {
    let segments: Vec<&str> = parts.uri.path().split('/').collect();
    let (ns, name) = match segments[..] {
        ["", "api", "v1", "namespaces", ns, "pods", name] => (ns, name),
        _ => {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                "only pods can be patched",
            )
        }
    };
    let key = format!("{ns}/{name}");
    let field_manager = parts
        .uri
        .query()
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("fieldManager=").map(str::to_string));
    let content_type = parts
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let doc: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let mut s = state.lock().unwrap();
    let stored = s
        .objects
        .get(path_of("Pod"))
        .and_then(|c| c.get(&key))
        .cloned();
    let answer = if s.fail_patches > 0 {
        s.fail_patches -= 1;
        Err((
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "injected failure",
        ))
    } else if content_type != "application/merge-patch+json" {
        Err((
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            "merge patch only",
        ))
    } else {
        match stored {
            None => Err((StatusCode::NOT_FOUND, "NotFound", "pod not found")),
            Some(old)
                if doc["metadata"]["uid"].is_string()
                    && doc["metadata"]["uid"] != old["metadata"]["uid"] =>
            {
                Err((
                    StatusCode::CONFLICT,
                    "Conflict",
                    "Precondition failed: UID in precondition",
                ))
            }
            Some(mut obj) => {
                merge(&mut obj, &doc);
                Ok(obj)
            }
        }
    };
    let code = answer.as_ref().map_or_else(|e| e.0, |_| StatusCode::OK);
    s.patches.push(PatchCall {
        pod: key.clone(),
        field_manager,
        content_type,
        body: doc,
        status: code.as_u16(),
    });
    match answer {
        Err((code, reason, message)) => status(code, reason, message),
        Ok(mut obj) => {
            s.rv += 1;
            let rv = s.rv;
            obj["metadata"]["resourceVersion"] = json!(rv.to_string());
            let path = path_of("Pod").to_string();
            s.objects
                .entry(path.clone())
                .or_default()
                .insert(key, obj.clone());
            s.log.push((rv, path, "MODIFIED", obj.clone()));
            drop(s);
            notify.notify_waiters();
            json_response(StatusCode::OK, &obj)
        }
    }
}

/// RFC 7386 JSON merge patch of `target` by `patch`.
fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let t = target.as_object_mut().unwrap();
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

fn is_served(path: &str) -> bool {
    [
        "Pod",
        "Namespace",
        "Node",
        "Service",
        "EndpointSlice",
        "PeerAuthentication",
        "AuthorizationPolicy",
        "DestinationRule",
    ]
    .iter()
    .any(|k| path_of(k) == path)
}

/// Streams the events of `path` after `from`, then new ones as they come.
fn watch(state: Arc<Mutex<State>>, notify: Arc<Notify>, path: String, from: u64) -> Response<Body> {
    let stream = futures_util::stream::unfold(from, move |mut seen| {
        let (state, notify, path) = (state.clone(), notify.clone(), path.clone());
        async move {
            loop {
                let waiter = notify.notified();
                let next = {
                    let s = state.lock().unwrap();
                    s.log
                        .iter()
                        .find(|(rv, p, _, _)| *rv > seen && *p == path)
                        .map(|(rv, _, t, o)| (*rv, json!({"type": t, "object": o})))
                };
                if let Some((rv, ev)) = next {
                    seen = rv;
                    let mut line = serde_json::to_vec(&ev).unwrap();
                    line.push(b'\n');
                    return Some((Ok::<_, Infallible>(Frame::data(Bytes::from(line))), seen));
                }
                waiter.await;
            }
        }
    });
    Response::builder()
        .header("content-type", "application/json")
        .body(http_body_util::BodyExt::boxed(StreamBody::new(stream)))
        .unwrap()
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    let body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    });
    json_response(code, &body)
}

fn json_response(code: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(http_body_util::BodyExt::boxed(Full::new(Bytes::from(
            serde_json::to_vec(body).unwrap(),
        ))))
        .unwrap()
}
