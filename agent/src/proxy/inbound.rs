//! Inbound tunnel path: terminate HBONE on 15008, check the CONNECT target, deliver to the app with the client's address.
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use http::StatusCode;
use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument;

use super::conns::ConnInfo;
use super::copy::copy_until_closed;
use super::{accept_loop, deliver, reset, ActiveGuard, PodContext};
use crate::policy::authz::ConnAttrs;
use crate::tunnel::server::{serve_connection, PendingConnect};

/// Serves one tunnel listener of a pod until the task is aborted.
pub async fn run(listener: TcpListener, pod: Arc<PodContext>) {
    accept_loop(listener, "inbound_tunnel", move |stream, peer| {
        let pod = pod.clone();
        let span =
            tracing::info_span!("inbound_tunnel", pod = %pod.workload.key(), peer.addr = %peer);
        async move { serve(stream, peer, pod).await }.instrument(span)
    })
    .await
}

async fn serve(tcp: TcpStream, peer: SocketAddr, pod: Arc<PodContext>) {
    let Some(id) = pod.identity() else {
        reset(tcp);
        return;
    };
    let Some(source) = pod.tls.as_ref() else {
        pod.stats.tunnel_refused.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(target: "access", direction = "inbound", reason = "no_ca", "tunnel connection refused: agent runs without identities");
        reset(tcp);
        return;
    };
    let tls = match source.server(&id) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            pod.stats.tunnel_refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(target: "access", direction = "inbound", reason = "no_certificate", error = %e, "tunnel connection refused");
            reset(tcp);
            return;
        }
    };
    let handler_pod = pod.clone();
    let served = serve_connection(tcp, peer, tls, move |p| handle(p, handler_pod.clone())).await;
    if let Err(e) = served {
        pod.stats.tunnel_refused.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(target: "access", direction = "inbound", reason = "tunnel", error = %e, "tunnel connection failed");
    }
}

async fn handle(p: PendingConnect, pod: Arc<PodContext>) {
    let start = Instant::now();
    let stats = &pod.stats;
    let target = p.connect.authority;
    let peer_id = p.connect.peer_id.to_string();
    let src = p.connect.peer;
    // The source agent dials from inside the source pod, so the TCP peer is the client pod.
    let client_ip = p.connect.peer.ip();
    let refuse = |p: PendingConnect, status: StatusCode, reason: &'static str| {
        stats.tunnel_refused.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(target: "access", direction = "inbound", security = "mutual_tls", peer.id = %peer_id, dst.orig = %target, status = status.as_u16(), reason, "tunnel stream refused");
        p.refuse(status);
    };
    if !pod.workload.ips.contains(&target.ip()) {
        return refuse(p, StatusCode::BAD_REQUEST, "foreign_target");
    }
    if pod.ports.is_agent_port(target.port()) {
        return refuse(p, StatusCode::BAD_REQUEST, "agent_port");
    }
    let principal = p
        .connect
        .peer_id
        .to_string()
        .trim_start_matches("spiffe://")
        .to_string();
    let attrs = ConnAttrs {
        principal: Some(principal),
        namespace: Some(p.connect.peer_id.namespace().to_string()),
        src_ip: client_ip,
        dst_port: target.port(),
        dst_ip: target.ip(),
    };
    if !pod.authorize(&attrs).allowed() {
        stats.authz_denied.fetch_add(1, Ordering::Relaxed);
        return refuse(p, StatusCode::UNAUTHORIZED, "policy_denied");
    }
    stats.inbound_accepted.fetch_add(1, Ordering::Relaxed);
    let _active = ActiveGuard::new(&stats.inbound_active);
    let mut up = match deliver(&pod, client_ip, target).await {
        Ok(up) => up,
        Err(reason) => {
            stats.inbound_failed.fetch_add(1, Ordering::Relaxed);
            return refuse(p, StatusCode::SERVICE_UNAVAILABLE, reason);
        }
    };
    let Some(mut down) = p.accept() else {
        stats.inbound_failed.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let guard = pod.conns.open(ConnInfo {
        direction: "inbound",
        pod: pod.workload.key(),
        src: src.to_string(),
        dst: target.to_string(),
        src_identity: Some(peer_id.clone()),
        dst_identity: pod.identity().map(|i| i.to_string()),
        security: "mutual_tls",
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
            tracing::info!(target: "access", direction = "inbound", security = "mutual_tls", peer.id = %peer_id, dst.orig = %target, bytes.sent = t.sent, bytes.recv = t.received, dur_ms, "connection complete")
        }
        Err(e) => {
            tracing::info!(target: "access", direction = "inbound", security = "mutual_tls", peer.id = %peer_id, dst.orig = %target, dur_ms, error = %e, "connection ended with error")
        }
    }
}
