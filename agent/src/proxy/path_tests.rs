//! The proxy paths end to end in-process over the loopback kernel: outbound → pool → HBONE (real TLS, h2) → inbound → delivery, and plaintext inbound.
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;

use super::testing::{echo_app, exchange, Call, Node};
use super::PodContext;
use crate::metrics::ReasonLabel;
use crate::tunnel::client::Tunnel;
use crate::tunnel::Error as TunnelError;

const CLIENT_IP: &str = "127.0.0.2";
const SERVER_IP: &str = "127.0.0.3";
/// A client outside the mesh.
const OUTSIDER_IP: &str = "127.0.0.9";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/shop/sa/client";
const SERVER_ID: &str = "spiffe://cluster.local/ns/shop/sa/server";

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

/// Two enrolled pods in namespace `shop` on this node, plus `extra` (policies).
fn inventory(extra: &str) -> String {
    format!(
        r#"
kind: Namespace
metadata: {{name: shop, labels: {{ambit.io/mode: enabled}}}}
---
kind: Pod
metadata: {{name: client, namespace: shop, labels: {{app: client}}}}
spec: {{nodeName: node1, serviceAccountName: client}}
status: {{podIPs: [{{ip: {CLIENT_IP}}}]}}
---
kind: Pod
metadata: {{name: server, namespace: shop, labels: {{app: server}}}}
spec: {{nodeName: node1, serviceAccountName: server}}
status: {{podIPs: [{{ip: {SERVER_IP}}}]}}
{extra}"#
    )
}

/// A node with both pods enrolled and an echo app in the server pod.
async fn setup(extra: &str) -> (Node, Arc<PodContext>, Arc<PodContext>, SocketAddr) {
    let app = echo_app(ip(SERVER_IP)).await;
    let node = Node::new(&inventory(extra));
    let client = node.enroll("shop/client").await;
    let server = node.enroll("shop/server").await;
    (node, client, server, app)
}

/// The peer the app saw (first line of its answer) and the echoed rest.
fn split(answer: &str) -> (SocketAddr, &str) {
    let (peer, rest) = answer
        .split_once('\n')
        .unwrap_or_else(|| panic!("app answered {answer:?}"));
    (peer.parse().expect("peer address"), rest)
}

/// Waits until `f` holds (the paths count after the client saw its answer).
async fn eventually(what: &str, f: impl Fn() -> bool) {
    for _ in 0..200 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never: {what}");
}

fn denials(node: &Node, reason: &'static str) -> u64 {
    node.metrics
        .denials
        .get_or_create(&ReasonLabel { reason })
        .get()
}

fn rejections(node: &Node, reason: &'static str) -> u64 {
    node.metrics
        .rejections
        .family()
        .get_or_create(&ReasonLabel { reason })
        .get()
}

#[tokio::test]
async fn outbound_tunnels_over_hbone_and_inbound_delivers_from_the_client_address() {
    let (node, client, server, app) = setup("").await;
    let s = node.net.app_connect(ip(CLIENT_IP), app).await;
    let answer = exchange(s, "hello").await;
    let (seen, echoed) = split(&answer);
    assert_eq!(echoed, "hello");
    assert_eq!(
        seen.ip(),
        ip(CLIENT_IP),
        "the app sees the client pod's address"
    );
    let calls = node.net.calls();
    let tunnel_port = client.agent.ports.tunnel;
    assert!(
        calls.contains(&Call::Outbound {
            from: ip(CLIENT_IP),
            dst: SocketAddr::new(ip(SERVER_IP), tunnel_port)
        }),
        "the tunnel is dialled from the client pod to the server's tunnel port: {calls:?}"
    );
    assert!(
        !calls.contains(&Call::Outbound {
            from: ip(CLIENT_IP),
            dst: app
        }),
        "nothing went to the app in plaintext: {calls:?}"
    );
    // The delivery socket was bound to the client's address and let past capture only while
    // connecting.
    let add = Call::AddBypass {
        bound: seen,
        target: app,
    };
    let remove = Call::RemoveBypass {
        bound: seen,
        target: app,
    };
    let at = |c: &Call| calls.iter().position(|x| x == c);
    assert!(at(&add) < at(&remove) && at(&add).is_some(), "{calls:?}");
    assert_eq!(node.net.bypass_entries(), 0);
    eventually("both sides counted the bytes", || {
        client.stats.bytes_sent.load(Ordering::Relaxed) == 5
            && server.stats.bytes_sent.load(Ordering::Relaxed) == 5
    })
    .await;
    assert_eq!(server.stats.inbound_accepted.load(Ordering::Relaxed), 1);
    assert_eq!(node.pool_connections(), 1, "one pooled tunnel");
    // A second connection rides the pooled tunnel.
    let again = exchange(node.net.app_connect(ip(CLIENT_IP), app).await, "again").await;
    assert_eq!(split(&again).1, "again");
    assert_eq!(node.pool_connections(), 1, "the tunnel was reused");
}

#[tokio::test]
async fn permissive_delivers_plaintext_from_outside_the_mesh() {
    let (node, _client, server, app) = setup("").await;
    let s = node.net.dial(ip(OUTSIDER_IP), app).await.expect("dial");
    let answer = exchange(s, "plain").await;
    let (seen, echoed) = split(&answer);
    assert_eq!((seen.ip(), echoed), (ip(OUTSIDER_IP), "plain"));
    assert_eq!(server.stats.inbound_accepted.load(Ordering::Relaxed), 1);
    assert_eq!(server.stats.inbound_denied.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn strict_refuses_plaintext_and_still_accepts_hbone() {
    let strict = "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: strict, namespace: shop}\nspec: {mtls: {mode: STRICT}}\n";
    let (node, _client, server, app) = setup(strict).await;
    let s = node.net.dial(ip(OUTSIDER_IP), app).await.expect("dial");
    assert_eq!(exchange(s, "plain").await, "", "refused with a reset");
    eventually("the refusal is counted", || {
        server.stats.inbound_denied.load(Ordering::Relaxed) == 1
    })
    .await;
    assert_eq!(denials(&node, "strict_plaintext"), 1);
    assert!(
        !node
            .net
            .calls()
            .iter()
            .any(|c| matches!(c, Call::AddBypass { .. })),
        "nothing was delivered"
    );
    // The same app, reached over HBONE from the client pod, is delivered to.
    let answer = exchange(node.net.app_connect(ip(CLIENT_IP), app).await, "mtls").await;
    assert_eq!(split(&answer).1, "mtls");
}

#[tokio::test]
async fn peer_authentication_disable_sends_mesh_traffic_in_plaintext() {
    let disable = "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: off, namespace: shop}\nspec:\n  mtls: {mode: DISABLE}\n";
    let (node, _client, server, app) = setup(disable).await;
    let answer = exchange(node.net.app_connect(ip(CLIENT_IP), app).await, "clear").await;
    let (seen, echoed) = split(&answer);
    assert_eq!((seen.ip(), echoed), (ip(CLIENT_IP), "clear"));
    let calls = node.net.calls();
    assert!(
        calls.contains(&Call::Outbound {
            from: ip(CLIENT_IP),
            dst: app
        }),
        "dialled the app itself: {calls:?}"
    );
    assert!(
        !calls.iter().any(
            |c| matches!(c, Call::Outbound { dst, .. } if dst.port() == server.agent.ports.tunnel)
        ),
        "no tunnel: {calls:?}"
    );
    eventually("delivered through the plaintext listener", || {
        server.stats.inbound_accepted.load(Ordering::Relaxed) == 1
    })
    .await;
}

#[tokio::test]
async fn authorization_deny_refuses_the_connect_with_401_and_counts_it() {
    // Two apps in the server pod; the policy denies the client's identity on one port only.
    let denied = echo_app(ip(SERVER_IP)).await;
    let allowed = echo_app(ip(SERVER_IP)).await;
    let deny = format!(
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: deny, namespace: shop}}\nspec:\n  selector: {{matchLabels: {{app: server}}}}\n  action: DENY\n  rules:\n  - from:\n    - source: {{principals: [\"cluster.local/ns/shop/sa/client\"]}}\n    to:\n    - operation: {{ports: [\"{}\"]}}\n",
        denied.port()
    );
    let node = Node::new(&inventory(&deny));
    let client = node.enroll("shop/client").await;
    let server = node.enroll("shop/server").await;
    let s = node.net.app_connect(ip(CLIENT_IP), denied).await;
    assert_eq!(exchange(s, "no").await, "", "the app's connection is reset");
    eventually("the denial is counted", || {
        server.stats.authz_denied.load(Ordering::Relaxed) == 1
    })
    .await;
    assert_eq!(denials(&node, "authorization"), 1);
    assert_eq!(rejections(&node, "policy_denied"), 1);
    eventually("the client counts a failed connection", || {
        client.stats.outbound_failed.load(Ordering::Relaxed) == 1
    })
    .await;
    assert!(
        !node
            .net
            .calls()
            .iter()
            .any(|c| matches!(c, Call::AddBypass { target, .. } if *target == denied)),
        "nothing was delivered to the denied app"
    );
    // The client's agent was answered 401 (a CONNECT of its own from the client pod sees it).
    let tls = node.client_tls(CLIENT_ID, SERVER_ID);
    let peer = SocketAddr::new(ip(SERVER_IP), server.agent.ports.tunnel);
    let tcp = node.net.dial(ip(CLIENT_IP), peer).await.expect("dial");
    let mut t = Tunnel::handshake(tcp, peer, tls).await.expect("handshake");
    match t.connect(denied).await {
        Err(TunnelError::Status { status, .. }) => assert_eq!(status.as_u16(), 401),
        other => panic!("expected 401, got {:?}", other.err()),
    }
    assert_eq!(rejections(&node, "policy_denied"), 2);
    // The other port is delivered to, over the same kind of tunnel.
    let answer = exchange(node.net.app_connect(ip(CLIENT_IP), allowed).await, "yes").await;
    assert_eq!(split(&answer).1, "yes");
    assert_eq!(server.stats.authz_denied.load(Ordering::Relaxed), 2);
}

#[tokio::test]
async fn connect_to_a_foreign_target_is_refused_with_400_and_counted() {
    let (node, _client, server, app) = setup("").await;
    let tls = node.client_tls(CLIENT_ID, SERVER_ID);
    let peer = SocketAddr::new(ip(SERVER_IP), server.agent.ports.tunnel);
    let tcp = node.net.dial(ip(CLIENT_IP), peer).await.expect("dial");
    let mut t = Tunnel::handshake(tcp, peer, tls).await.expect("handshake");
    let foreign = SocketAddr::new(ip(OUTSIDER_IP), app.port());
    match t.connect(foreign).await {
        Err(TunnelError::Status { status, .. }) => assert_eq!(status.as_u16(), 400),
        other => panic!("expected 400, got {:?}", other.err()),
    }
    assert_eq!(rejections(&node, "foreign_target"), 1);
    assert_eq!(server.stats.tunnel_refused.load(Ordering::Relaxed), 1);
    // The same tunnel may CONNECT to the pod's own address: the app answers.
    let mut s = t.connect(app).await.expect("connect to the pod");
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while s.read_exact(&mut byte).await.is_ok() && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    let seen: SocketAddr = String::from_utf8_lossy(&line).parse().expect("peer");
    assert_eq!(seen.ip(), ip(CLIENT_IP));
}

#[tokio::test]
async fn a_drain_waits_for_open_connections_and_ends_when_they_close() {
    use crate::drain::Drained;
    use tokio::io::AsyncWriteExt;
    let (node, _client, _server, app) = setup("").await;
    let mut s = node.net.app_connect(ip(CLIENT_IP), app).await;
    // The app's greeting: the connection is carried end to end.
    let mut first = [0u8; 1];
    s.read_exact(&mut first).await.expect("greeting");
    // The outbound connection (client pod) and its CONNECT (server pod) hold the drain.
    assert_eq!(node.drain.open(), 2);
    assert_eq!(
        node.drain.drain(Duration::from_millis(200)).await,
        Drained::DeadlineReached { open: 2 }
    );
    // Draining (GOAWAY on the tunnel) lets the open connection finish.
    s.write_all(b"bye").await.expect("write");
    s.shutdown().await.expect("half-close");
    let mut rest = String::new();
    s.read_to_string(&mut rest).await.expect("answer");
    assert!(rest.ends_with("bye"), "{rest:?}");
    drop(s);
    assert_eq!(
        node.drain.drain(Duration::from_secs(5)).await,
        Drained::Complete
    );
}

mod measure;
