//! Outbound path: accept an app's captured connection, recover where it was going, and carry it there.
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument;

use super::conns::ConnInfo;
use super::copy::copy_both;
use super::{accept_loop, reset, ActiveGuard, PodContext, CONNECT_TIMEOUT};
use crate::addr::{ClientAddr, OrigDstAddr};

/// Serves one outbound listener of a pod until the task is aborted.
pub async fn run(listener: TcpListener, pod: Arc<PodContext>) {
    accept_loop(listener, "outbound", move |stream, peer| {
        let pod = pod.clone();
        let span = tracing::info_span!("outbound", pod = %pod.workload.key(), src.addr = %peer);
        async move { serve(stream, ClientAddr(peer), pod).await }.instrument(span)
    })
    .await
}

async fn serve(down: TcpStream, client: ClientAddr, pod: Arc<PodContext>) {
    let start = Instant::now();
    let stats = &pod.stats;
    stats.outbound_accepted.fetch_add(1, Ordering::Relaxed);
    let _active = ActiveGuard::new(&stats.outbound_active);
    let Some(orig) = orig_dst(&down, client, &pod) else {
        stats.outbound_failed.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(target: "access", direction = "outbound", reason = "no_orig_dst", "connection refused: original destination unknown");
        reset(down);
        return;
    };
    if is_loop(&pod, orig.0) {
        stats.outbound_failed.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(target: "access", direction = "outbound", dst.orig = %orig, reason = "loop", "connection refused: destination is the agent itself");
        reset(down);
        return;
    }
    let up = match tokio::time::timeout(CONNECT_TIMEOUT, pod.sockets.connect_outbound(orig.0)).await
    {
        Ok(Ok(up)) => up,
        Ok(Err(e)) => {
            stats.outbound_failed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(target: "access", direction = "outbound", dst.orig = %orig, reason = "upstream", error = %e, "connection failed");
            reset(down);
            return;
        }
        Err(_) => {
            stats.outbound_failed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(target: "access", direction = "outbound", dst.orig = %orig, reason = "upstream_timeout", "connection failed: connect timed out");
            reset(down);
            return;
        }
    };
    let (mut down, mut up) = (down, up);
    let guard = pod.conns.open(ConnInfo {
        direction: "outbound",
        pod: pod.workload.key(),
        src: client.to_string(),
        dst: orig.to_string(),
        src_identity: None,
        dst_identity: None,
        security: "plaintext",
    });
    let result = copy_both(&mut down, &mut up, &guard.bytes).await;
    let t = result.as_ref().copied().unwrap_or_default();
    stats.bytes_sent.fetch_add(t.sent, Ordering::Relaxed);
    stats
        .bytes_received
        .fetch_add(t.received, Ordering::Relaxed);
    let dur_ms = start.elapsed().as_millis() as u64;
    match result {
        Ok(_) => {
            tracing::info!(target: "access", direction = "outbound", dst.orig = %orig, security = "plaintext", bytes.sent = t.sent, bytes.recv = t.received, dur_ms, "connection complete")
        }
        Err(e) => {
            tracing::info!(target: "access", direction = "outbound", dst.orig = %orig, security = "plaintext", dur_ms, error = %e, "connection ended with error")
        }
    }
}

/// Where the app meant to go: SO_ORIGINAL_DST (answered by the cgroup/getsockopt program),
/// else the tuple map the sockops program filled.
fn orig_dst(stream: &TcpStream, client: ClientAddr, pod: &PodContext) -> Option<OrigDstAddr> {
    let sock = socket2::SockRef::from(stream);
    let via_sockopt = if client.0.is_ipv4() {
        sock.original_dst_v4()
    } else {
        sock.original_dst_v6()
    };
    via_sockopt
        .ok()
        .and_then(|a| a.as_socket())
        .map(OrigDstAddr)
        .or_else(|| pod.datapath.orig_dst(pod.netns_cookie, client))
}

/// A destination that would come straight back to this agent.
fn is_loop(pod: &PodContext, dst: SocketAddr) -> bool {
    let ip = dst.ip();
    pod.ports.is_agent_port(dst.port())
        && (ip.is_loopback() || ip.is_unspecified() || pod.workload.ips.contains(&ip))
}
