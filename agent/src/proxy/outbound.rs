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
use super::route::{self, Route, RouteCtx};
use super::{accept_loop, reset, ActiveGuard, PodContext, CONNECT_TIMEOUT};
use crate::addr::{ClientAddr, OrigDstAddr, PeerAddr};
use crate::identity::SpiffeId;
use crate::tunnel::client::Tunnel;
use crate::tunnel::pool::{PoolKey, StreamGuard};
use crate::tunnel::stream::H2Stream;

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
    let decision = {
        let snap = pod.inventory.borrow().clone();
        let ctx = RouteCtx {
            snap: &snap,
            trust_domain: &pod.cfg.trust_domain,
            root_namespace: &pod.cfg.root_namespace,
            tunnel_port: pod.ports.tunnel,
            mtls: pod.tls.is_some(),
        };
        route::decide(&ctx, orig.0, |svc, n| pod.lb.next(svc, n))
    };
    tracing::debug!(dst.orig = %orig, steps = ?decision.steps, "route decided");
    let mut down = down;
    match decision.route {
        Route::Refuse { reason } => fail(down, "refused", format!("{orig}: {reason}")),
        Route::Plaintext { target } => {
            let connect = pod.sockets.connect_outbound(target);
            let mut up = match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
                Ok(Ok(up)) => up,
                Ok(Err(e)) => return fail(down, "upstream", format!("{target}: {e}")),
                Err(_) => {
                    return fail(
                        down,
                        "upstream_timeout",
                        format!("{target}: connect timed out"),
                    )
                }
            };
            let conn = Carried {
                client,
                orig,
                target,
                dst_identity: None,
                security: "plaintext",
            };
            carry(&pod, conn, &mut down, &mut up, start).await;
        }
        Route::Tunnel {
            peer,
            target,
            dst_id,
        } => {
            let Ok(dst_id) = dst_id.parse::<SpiffeId>() else {
                return fail(
                    down,
                    "no_identity",
                    format!("{orig}: bad destination identity {dst_id}"),
                );
            };
            let (mut up, _guard) = match tunnel(&pod, target, PeerAddr(peer), &dst_id).await {
                Ok(s) => s,
                Err(e) => {
                    return fail(
                        down,
                        "tunnel",
                        format!("{target} via {peer} ({dst_id}): {e}"),
                    )
                }
            };
            let conn = Carried {
                client,
                orig,
                target,
                dst_identity: Some(dst_id.to_string()),
                security: "mutual_tls",
            };
            carry(&pod, conn, &mut down, &mut up, start).await;
        }
    }
}

/// What the access log and connection table say about a carried connection.
struct Carried {
    client: ClientAddr,
    orig: OrigDstAddr,
    target: SocketAddr,
    dst_identity: Option<String>,
    security: &'static str,
}

async fn carry<U>(pod: &PodContext, c: Carried, down: &mut TcpStream, up: &mut U, start: Instant)
where
    U: AsyncRead + AsyncWrite + Unpin,
{
    let guard = pod.conns.open(ConnInfo {
        direction: "outbound",
        pod: pod.workload.key(),
        src: c.client.to_string(),
        dst: if c.target == c.orig.0 {
            c.orig.to_string()
        } else {
            format!("{} via {}", c.target, c.orig)
        },
        src_identity: (c.security == "mutual_tls")
            .then(|| pod.workload.spiffe_id(&pod.cfg.trust_domain)),
        dst_identity: c.dst_identity.clone(),
        security: c.security,
        authz: None,
    });
    let result = copy_both(down, up, &guard.bytes).await;
    let t = result.as_ref().copied().unwrap_or_default();
    pod.stats.bytes_sent.fetch_add(t.sent, Ordering::Relaxed);
    pod.stats
        .bytes_received
        .fetch_add(t.received, Ordering::Relaxed);
    let dur_ms = start.elapsed().as_millis() as u64;
    let (orig, target, security) = (c.orig, c.target, c.security);
    let peer_id = c.dst_identity.unwrap_or_default();
    match result {
        Ok(_) => {
            tracing::info!(target: "access", direction = "outbound", dst.orig = %orig, dst.target = %target, security, peer.id = %peer_id, bytes.sent = t.sent, bytes.recv = t.received, dur_ms, "connection complete")
        }
        Err(e) => {
            tracing::info!(target: "access", direction = "outbound", dst.orig = %orig, dst.target = %target, security, peer.id = %peer_id, dur_ms, error = %e, "connection ended with error")
        }
    }
}

async fn tunnel(
    pod: &PodContext,
    target: SocketAddr,
    peer: PeerAddr,
    dst_id: &SpiffeId,
) -> Result<(H2Stream, StreamGuard), String> {
    let src_id = pod.identity().ok_or("source pod has no valid identity")?;
    let tls = pod.tls.as_ref().ok_or("agent has no identities")?;
    let key = PoolKey {
        src_netns: pod.netns_cookie,
        src_id: src_id.clone(),
        peer: peer.0,
        dst_id: dst_id.clone(),
    };
    let tls_err = |e: String| crate::tunnel::Error::Tls {
        peer: peer.to_string(),
        source: std::io::Error::other(e),
    };
    let dial = || async {
        let config = tls
            .client(&src_id, dst_id)
            .map_err(|e| tls_err(e.to_string()))?;
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, pod.sockets.connect_outbound(peer.0))
            .await
            .map_err(|_| crate::tunnel::Error::HandshakeTimeout {
                peer: peer.to_string(),
            })?
            .map_err(|e| tls_err(e.to_string()))?;
        Tunnel::handshake(tcp, peer.0, Arc::new(config)).await
    };
    pod.pool
        .stream(&key, target, dial)
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
