//! The in-cluster CA against the MOCK API server (`inventory::kube::fake_api`, over HTTP on
//! 127.0.0.1): inventory from the reflectors for every node, `/status` held until synced, and
//! OIDC discovery of the issuer's keys (fetch, errors, refetch on an unknown key id).
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::StatusCode;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::ca::oidc::{self, Discovery, OidcError, DISCOVERY_PATH};
use crate::ca::testing::{spiffe, Fixture, AGENT_NS, AGENT_SA, INVENTORY, ISSUER};
use crate::ca::token::TokenError;
use crate::identity::ca_client::{CaClient, ClientError};
use crate::inventory::kube::fake_api::FakeApi;
use crate::inventory::Snapshot;
use ambit_testbed::issuer::{ServiceAccountClaims, TokenIssuer};

const DB: &str = "spiffe://cluster.local/ns/shop/sa/db";
const JWKS_PATH: &str = "/openid/v1/jwks";

/// The fixture's pods (web on node1, db on node2) as API objects, with uids.
fn pods() -> Vec<Value> {
    crate::yaml::from_multiple::<Value>(INVENTORY)
        .unwrap()
        .into_iter()
        .enumerate()
        .map(|(i, mut v)| {
            v["metadata"]["uid"] = json!(format!("uid-{i}"));
            v
        })
        .collect()
}

async fn get_status(addr: SocketAddr) -> String {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /status HTTP/1.1\r\nhost: ca\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    tcp.read_to_string(&mut out).await.unwrap();
    out
}

async fn wait(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..600 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for: {what}");
}

#[tokio::test]
async fn mock_api_ca_authorizes_pods_of_every_node_and_is_ready_after_sync() {
    let api = FakeApi::start().await;
    api.apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop", "uid": "ns-shop"}}));
    for pod in pods() {
        api.apply(pod);
    }
    api.fail_lists("Pod", usize::MAX);
    let f = Fixture::new(Duration::from_secs(3600));
    // Only the API server speaks for the inventory here.
    f.inventory.send_replace(Arc::new(Snapshot::default()));
    let (mut rx, ready, task) = super::watch_kube(api.client());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let status_addr = listener.local_addr().unwrap();
    let status = tokio::spawn(super::status::serve(
        listener,
        f.service.clone(),
        ready.clone(),
    ));

    // Pods cannot be listed: not ready, and /status says so.
    wait("a failed pod list", || api.list_requests("Pod") >= 1).await;
    let answer = get_status(status_addr).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(!*ready.borrow());

    api.fail_lists("Pod", 0);
    let mut r = ready.clone();
    tokio::time::timeout(Duration::from_secs(60), r.wait_for(|r| *r))
        .await
        .expect("ready after the first full sync")
        .unwrap();
    let answer = get_status(status_addr).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // Pods of both nodes, and nothing but pods and namespaces was listed.
    let snap = rx.borrow_and_update().clone();
    assert_eq!(snap.workloads.len(), 3, "{:?}", snap.workloads);
    assert_eq!(api.list_requests("Service"), 0);
    assert_eq!(api.list_requests("EndpointSlice"), 0);
    assert_eq!(api.list_requests("AuthorizationPolicy"), 0);
    f.inventory.send_replace(snap);

    let ca = f.start(SocketAddr::from(([127, 0, 0, 1], 0))).await;
    let node2 = CaClient::new(f.client_config(ca.local_addr(), "node2")).unwrap();
    let issued = node2.fetch(&spiffe(DB)).await.unwrap();
    assert_eq!(issued.certificate.id(), &spiffe(DB));
    let node1 = CaClient::new(f.client_config(ca.local_addr(), "node1")).unwrap();
    let err = node1.fetch(&spiffe(DB)).await.unwrap_err();
    assert!(
        matches!(&err, ClientError::Refused { source, .. } if source.code() == tonic::Code::PermissionDenied),
        "{err}"
    );

    // A db pod scheduled on node1 reaches the CA through the watch.
    let mut db2 = pods()[2].clone();
    db2["metadata"]["name"] = json!("db-2");
    db2["metadata"]["uid"] = json!("uid-db-2");
    db2["spec"]["nodeName"] = json!("node1");
    db2["status"]["podIP"] = json!("10.0.1.7");
    api.apply(db2);
    tokio::time::timeout(
        Duration::from_secs(30),
        rx.wait_for(|s| s.workloads.len() == 4),
    )
    .await
    .expect("the new pod is published")
    .unwrap();
    f.inventory.send_replace(rx.borrow().clone());
    node1.fetch(&spiffe(DB)).await.unwrap();
    task.abort();
    status.abort();
}

fn discovery_doc() -> String {
    // The issuer's host is not reachable from the test: only jwks_uri's path is used.
    json!({
        "issuer": ISSUER,
        "jwks_uri": format!("{ISSUER}{JWKS_PATH}"),
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"],
    })
    .to_string()
}

fn discovery(api: &FakeApi) -> Discovery {
    Discovery::with_client(api.client(), &format!("http://{}", api.addr))
}

#[tokio::test]
async fn mock_api_oidc_discovery_fetches_keys_and_names_what_failed() {
    let api = FakeApi::start().await;
    let issuer = TokenIssuer::generate(ISSUER).unwrap();
    api.serve_raw(DISCOVERY_PATH, StatusCode::OK, discovery_doc());
    api.serve_raw(JWKS_PATH, StatusCode::OK, issuer.jwks());
    let keys = discovery(&api).fetch().await.unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(api.raw_requests(JWKS_PATH), 1);

    api.serve_raw(JWKS_PATH, StatusCode::FORBIDDEN, "{}");
    let err = discovery(&api).fetch().await.unwrap_err();
    assert!(matches!(err, OidcError::Request { .. }), "{err}");
    assert!(err.to_string().contains(JWKS_PATH), "{err}");

    api.serve_raw(DISCOVERY_PATH, StatusCode::OK, "{\"issuer\": \"x\"}");
    let err = discovery(&api).fetch().await.unwrap_err();
    assert!(matches!(err, OidcError::Document { .. }), "{err}");
    assert!(err.to_string().contains(DISCOVERY_PATH), "{err}");

    api.serve_raw(DISCOVERY_PATH, StatusCode::OK, discovery_doc());
    api.serve_raw(JWKS_PATH, StatusCode::OK, "{\"keys\": []}");
    let err = discovery(&api).fetch().await.unwrap_err();
    assert!(matches!(err, OidcError::Keys(_)), "{err}");
}

#[tokio::test]
async fn mock_api_oidc_keys_are_refetched_on_an_unknown_key_id() {
    let api = FakeApi::start().await;
    let f = Fixture::new(Duration::from_secs(3600));
    // The API server rotated to a new signing key the CA has not seen.
    let rotated = TokenIssuer::generate(ISSUER).unwrap();
    api.serve_raw(DISCOVERY_PATH, StatusCode::OK, discovery_doc());
    api.serve_raw(JWKS_PATH, StatusCode::OK, rotated.jwks());
    let refresher = tokio::spawn(oidc::refresh(
        discovery(&api),
        Duration::from_secs(3600),
        f.service.clone(),
    ));
    let claims = ServiceAccountClaims {
        namespace: AGENT_NS.into(),
        service_account: AGENT_SA.into(),
        node: "node1".into(),
        audiences: vec!["ambit-ca".into()],
        issued_at: SystemTime::now(),
        ttl: Duration::from_secs(600),
    };
    let token = rotated.token(&claims).unwrap();
    let err = f
        .service
        .tokens()
        .verify(&token, SystemTime::now())
        .unwrap_err();
    assert!(matches!(err, TokenError::UnknownKey { .. }), "{err}");
    let service = f.service.clone();
    wait("keys refetched after the unknown key id", || {
        service.tokens().verify(&token, SystemTime::now()).is_ok()
    })
    .await;
    assert_eq!(api.raw_requests(JWKS_PATH), 1);
    refresher.abort();
}
