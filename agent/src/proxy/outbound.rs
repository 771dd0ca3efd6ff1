//! Outbound path: accept an app's captured connection, recover where it was going, tunnel it (HBONE) or pass it through.
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument;

use super::conns::ConnInfo;
use super::copy::copy_both;
use super::{accept_loop, reset, ActiveGuard, PodContext, CONNECT_TIMEOUT};
use crate::addr::{ClientAddr, OrigDstAddr, PeerAddr};
use crate::identity::SpiffeId;
use crate::inventory::Workload;
use crate::policy::peer_auth::{self, Effective};
use crate::tunnel::client::Tunnel;
use crate::tunnel::pool::PoolKey;

/// How a destination is reached.
enum Route {
    /// HBONE to the destination pod's tunnel port, which must prove `dst_id`.
    Tunnel { peer: PeerAddr, dst_id: SpiffeId },
    /// Plaintext from inside the pod (not enrolled, or PeerAuthentication DISABLE).
    Passthrough,
}

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
    let fail = |down: TcpStream, reason: &'static str, error: String| {
        stats.outbound_failed.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(target: "access", direction = "outbound", reason, error, "connection refused");
        reset(down);
    };
    let Some(orig) = orig_dst(&down, client, &pod) else {
        return fail(down, "no_orig_dst", "original destination unknown".into());
    };
    if is_loop(&pod, orig.0) {
        return fail(down, "loop", format!("{orig} is the agent itself"));
    }
    let route = match route(&pod, orig) {
        Ok(r) => r,
        Err(e) => return fail(down, "no_identity", e),
    };
    let mut down = down;
    match route {
        Route::Passthrough => {
            let up =
                match tokio::time::timeout(CONNECT_TIMEOUT, pod.sockets.connect_outbound(orig.0))
                    .await
                {
                    Ok(Ok(up)) => up,
                    Ok(Err(e)) => return fail(down, "upstream", format!("{orig}: {e}")),
                    Err(_) => {
                        return fail(
                            down,
                            "upstream_timeout",
                            format!("{orig}: connect timed out"),
                        )
                    }
                };
            let mut up = up;
            carry(
                &pod,
                client,
                orig,
                None,
                "plaintext",
                &mut down,
                &mut up,
                start,
            )
            .await;
        }
        Route::Tunnel { peer, dst_id } => {
            let (mut up, _guard) = match tunnel(&pod, orig, peer, &dst_id).await {
                Ok(s) => s,
                Err(e) => {
                    return fail(down, "tunnel", format!("{orig} via {peer} ({dst_id}): {e}"))
                }
            };
            carry(
                &pod,
                client,
                orig,
                Some(dst_id.to_string()),
                "mutual_tls",
                &mut down,
                &mut up,
                start,
            )
            .await;
        }
    }
}

#[expect(
    clippy::too_many_arguments,
    reason = "one call site per route; a struct would only rename them"
)]
async fn carry<U>(
    pod: &PodContext,
    client: ClientAddr,
    orig: OrigDstAddr,
    dst_identity: Option<String>,
    security: &'static str,
    down: &mut TcpStream,
    up: &mut U,
    start: Instant,
) where
    U: AsyncRead + AsyncWrite + Unpin,
{
    let guard = pod.conns.open(ConnInfo {
        direction: "outbound",
        pod: pod.workload.key(),
        src: client.to_string(),
        dst: orig.to_string(),
        src_identity: (security == "mutual_tls")
            .then(|| pod.workload.spiffe_id(&pod.cfg.trust_domain)),
        dst_identity: dst_identity.clone(),
        security,
        authz: None,
    });
    let result = copy_both(down, up, &guard.bytes).await;
    let t = result.as_ref().copied().unwrap_or_default();
    pod.stats.bytes_sent.fetch_add(t.sent, Ordering::Relaxed);
    pod.stats
        .bytes_received
        .fetch_add(t.received, Ordering::Relaxed);
    let dur_ms = start.elapsed().as_millis() as u64;
    let peer_id = dst_identity.unwrap_or_default();
    match result {
        Ok(_) => {
            tracing::info!(target: "access", direction = "outbound", dst.orig = %orig, security, peer.id = %peer_id, bytes.sent = t.sent, bytes.recv = t.received, dur_ms, "connection complete")
        }
        Err(e) => {
            tracing::info!(target: "access", direction = "outbound", dst.orig = %orig, security, peer.id = %peer_id, dur_ms, error = %e, "connection ended with error")
        }
    }
}

/// Enrolled destinations are tunnelled unless their PeerAuthentication for the port is
/// DISABLE, or the agent runs without identities (no `ca` configured: capture only).
fn route(pod: &PodContext, orig: OrigDstAddr) -> Result<Route, String> {
    if pod.tls.is_none() {
        return Ok(Route::Passthrough);
    }
    let snap = pod.inventory.borrow().clone();
    let Some(dst) = snap.by_ip(orig.0.ip()).filter(|w| w.enrolled) else {
        return Ok(Route::Passthrough);
    };
    let mode = peer_auth::resolve(
        &snap.peer_authentications,
        &pod.cfg.root_namespace,
        &dst.namespace,
        &dst.labels,
        orig.0.port(),
    );
    if mode.mode == Effective::Disable {
        return Ok(Route::Passthrough);
    }
    // An enrolled destination without a valid identity cannot be reached securely: refuse
    // rather than send plaintext.
    let dst_id = dst_identity(pod, dst)
        .ok_or_else(|| format!("destination {} has no valid identity", dst.key()))?;
    Ok(Route::Tunnel {
        peer: PeerAddr(SocketAddr::new(orig.0.ip(), pod.ports.tunnel)),
        dst_id,
    })
}

fn dst_identity(pod: &PodContext, dst: &Workload) -> Option<SpiffeId> {
    dst.spiffe_id(&pod.cfg.trust_domain).parse().ok()
}

async fn tunnel(
    pod: &PodContext,
    orig: OrigDstAddr,
    peer: PeerAddr,
    dst_id: &SpiffeId,
) -> Result<
    (
        crate::tunnel::stream::H2Stream,
        crate::tunnel::pool::StreamGuard,
    ),
    String,
> {
    let src_id = pod.identity().ok_or("source pod has no valid identity")?;
    let tls = pod.tls.as_ref().ok_or("agent has no identities")?;
    let key = PoolKey {
        src_netns: pod.netns_cookie,
        src_id: src_id.clone(),
        peer: peer.0,
        dst_id: dst_id.clone(),
    };
    let dial = || async {
        let tls = tls
            .client(&src_id, dst_id)
            .map_err(|e| crate::tunnel::Error::Tls {
                peer: peer.to_string(),
                source: std::io::Error::other(e),
            })?;
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, pod.sockets.connect_outbound(peer.0))
            .await
            .map_err(|_| crate::tunnel::Error::HandshakeTimeout {
                peer: peer.to_string(),
            })?
            .map_err(|e| crate::tunnel::Error::Tls {
                peer: peer.to_string(),
                source: std::io::Error::other(e),
            })?;
        Tunnel::handshake(tcp, peer.0, Arc::new(tls)).await
    };
    pod.pool
        .stream(&key, orig.0, dial)
        .await
        .map_err(|e| error_chain(&e))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
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
