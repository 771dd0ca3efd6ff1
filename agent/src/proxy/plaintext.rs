//! Inbound plaintext path: a captured connection to the pod is checked against PeerAuthentication and delivered to the app.
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument;

use super::conns::ConnInfo;
use super::copy::copy_until_closed;
use super::{accept_loop, deliver, reset, ActiveGuard, PodContext};
use crate::addr::{ClientAddr, OrigDstAddr};
use crate::policy::authz::ConnAttrs;
use crate::policy::peer_auth::{self, Effective};

/// Serves one inbound plaintext listener of a pod until the task is aborted.
pub async fn run(listener: TcpListener, pod: Arc<PodContext>) {
    accept_loop(listener, "inbound_plaintext", move |stream, peer| {
        let pod = pod.clone();
        let span = tracing::info_span!("inbound", pod = %pod.workload.key(), src.addr = %peer);
        async move { serve(stream, ClientAddr(peer), pod).await }.instrument(span)
    })
    .await
}

async fn serve(down: TcpStream, client: ClientAddr, pod: Arc<PodContext>) {
    let start = Instant::now();
    let stats = &pod.stats;
    stats.inbound_accepted.fetch_add(1, Ordering::Relaxed);
    let _active = ActiveGuard::new(&stats.inbound_active);
    // sk_lookup assigned the connection without rewriting it: our local address is where the
    // client was going.
    let orig = match down.local_addr() {
        Ok(a) => OrigDstAddr(a),
        Err(e) => {
            stats.inbound_failed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(target: "access", direction = "inbound", error = %e, "getsockname failed");
            reset(down);
            return;
        }
    };
    if pod.ports.is_agent_port(orig.0.port()) {
        stats.inbound_failed.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(target: "access", direction = "inbound", dst.orig = %orig, reason = "agent_port", "connection refused: agent ports are not application targets");
        reset(down);
        return;
    }
    if let Some(policy) = strict_policy(&pod, client, orig) {
        stats.inbound_denied.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(target: "access", direction = "inbound", dst.orig = %orig, security = "plaintext", reason = "policy_strict", policy = %policy, "plaintext connection refused: PeerAuthentication STRICT");
        reset(down);
        return;
    }
    let attrs = ConnAttrs {
        principal: None,
        namespace: None,
        src_ip: client.0.ip(),
        dst_port: orig.0.port(),
        dst_ip: orig.0.ip(),
    };
    let decision = pod.authorize(&attrs);
    if !decision.allowed() {
        stats.authz_denied.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(target: "access", direction = "inbound", dst.orig = %orig, security = "plaintext", reason = "policy_denied", decision = ?decision, "connection refused by AuthorizationPolicy");
        reset(down);
        return;
    }
    let mut up = match deliver(&pod, client.0.ip(), orig.0).await {
        Ok(up) => up,
        Err(reason) => {
            stats.inbound_failed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(target: "access", direction = "inbound", dst.orig = %orig, reason, "delivery failed");
            reset(down);
            return;
        }
    };
    let mut down = down;
    let guard = pod.conns.open(ConnInfo {
        direction: "inbound",
        pod: pod.workload.key(),
        src: client.to_string(),
        dst: orig.to_string(),
        src_identity: None,
        dst_identity: None,
        security: "plaintext",
        authz: Some(attrs),
    });
    let result = copy_until_closed(&mut down, &mut up, &guard.bytes, &guard.closer).await;
    let t = result.as_ref().copied().unwrap_or_default();
    stats.bytes_sent.fetch_add(t.sent, Ordering::Relaxed);
    stats
        .bytes_received
        .fetch_add(t.received, Ordering::Relaxed);
    let dur_ms = start.elapsed().as_millis() as u64;
    match result {
        Ok(_) => {
            tracing::info!(target: "access", direction = "inbound", dst.orig = %orig, security = "plaintext", bytes.sent = t.sent, bytes.recv = t.received, dur_ms, "connection complete")
        }
        Err(e) => {
            tracing::info!(target: "access", direction = "inbound", dst.orig = %orig, security = "plaintext", dur_ms, error = %e, "connection ended with error")
        }
    }
}

/// The deciding policy when the pod's effective mode for this port is STRICT (and the source
/// is not an admitted probe source); `None` when plaintext may pass.
fn strict_policy(pod: &PodContext, client: ClientAddr, orig: OrigDstAddr) -> Option<String> {
    if pod.cfg.probe_sources.contains(&client.0.ip()) {
        return None;
    }
    let snap = pod.inventory.borrow().clone();
    let w = snap
        .workloads
        .get(&pod.workload.key())
        .unwrap_or(&pod.workload);
    let r = peer_auth::resolve(
        &snap.peer_authentications,
        &pod.cfg.root_namespace,
        &w.namespace,
        &w.labels,
        orig.0.port(),
    );
    (r.mode == Effective::Strict).then(|| r.policy.unwrap_or_else(|| "default".into()))
}
