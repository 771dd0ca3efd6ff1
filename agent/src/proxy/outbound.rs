//! Outbound path: accept an app's captured connection, recover where it was going, tunnel it (HBONE) or pass it through.
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument;

use super::caps::{self, Listener};
use super::conns::{self, ConnInfo};
use super::copy::{copy_both, copy_tcp_h2, TcpSide};
use super::route::{self, Route, RouteCtx, Steps};
use super::{accept_loop, reset, PodContext, CONNECT_TIMEOUT};
use crate::addr::{ClientAddr, OrigDstAddr, PeerAddr};
use crate::error::error_chain;
use crate::identity::SpiffeId;
use crate::metrics::{ReasonLabel, TcpLabels};
use crate::reason::Reason;
use crate::tunnel::client::Tunnel;
use crate::tunnel::headers::{ConnectHeaders, TraceId};
use crate::tunnel::pool::{PoolKey, StreamGuard};
use crate::tunnel::stream::H2Stream;

/// Serves one outbound listener of a pod until the task is aborted.
pub async fn run(listener: TcpListener, pod: Arc<PodContext>) {
    let shards = pod.agent.shards.clone();
    accept_loop(listener, "outbound", shards, move |stream, peer| {
        let pod = pod.clone();
        // Debug level: the access-log line carries the pod and the source already; a span per
        // connection at info cost formatting, a registry slot and enter/exit on every poll.
        let span = tracing::debug_span!("outbound", pod = %pod.workload.key(), src.addr = %pod_source(&pod, ClientAddr(peer)));
        // Held from accept to close, taken here and not in the task: a connection accepted
        // just before a drain is counted even if its task has not run yet.
        let accepted = pod.drain.watch();
        async move {
            let _accepted = accepted;
            serve(stream, ClientAddr(peer), pod).await;
        }
        .instrument(span)
    })
    .await
}

pub(super) async fn serve(down: TcpStream, client: ClientAddr, pod: Arc<PodContext>) {
    let stats = &pod.stats;
    stats.outbound_accepted.fetch_add(1, Ordering::Relaxed);
    // Counts from accept (drain waits on it) and caps the pod's open connections.
    let Some(_active) = caps::admit(&pod, Listener::Outbound) else {
        return caps::refuse(&pod, Listener::Outbound, down, client.0);
    };
    // What the access log and `ambit connections` show as the source: the app's socket is
    // 127.0.0.1:PORT after the connect4 rewrite, the same in every pod; the pod's address (the
    // one its tunnel or plaintext connection leaves from) with the app's port names the pod.
    let src = pod_source(&pod, client);
    let src_ip = src.ip();
    let fail =
        |down: TcpStream, dst: SocketAddr, attempt: Attempt<'_>, reason: Reason, error: String| {
            stats.outbound_failed.fetch_add(1, Ordering::Relaxed);
            let (src_id, dst_id, mtls) = match attempt {
                Attempt::Plaintext => (None, None, false),
                Attempt::Mtls { src_id, dst_id } => (Some(src_id), Some(dst_id), true),
            };
            let labels = pod.labels(
                "source",
                src_ip,
                dst.ip(),
                src_id,
                dst_id,
                None,
                mtls,
                reason.response_flags(),
            );
            conns::refused(
                pod.agent.conns.metrics(),
                &labels,
                "outbound",
                &src.to_string(),
                &dst.to_string(),
                reason,
                &error,
            );
            reset(down);
        };
    let Some(orig) = pod.kernel.orig_dst(&down, client) else {
        return fail(
            down,
            client.0,
            Attempt::Plaintext,
            Reason::NoOrigDst,
            "original destination unknown".into(),
        );
    };
    if is_loop(&pod, orig.0) {
        return fail(
            down,
            orig.0,
            Attempt::Plaintext,
            Reason::Loop,
            format!("{orig} is the agent itself"),
        );
    }
    let (decision, service) = {
        let snap = pod.agent.inventory.borrow().clone();
        let ctx = RouteCtx {
            snap: &snap,
            trust_domain: &pod.agent.cfg.trust_domain,
            root_namespace: &pod.agent.cfg.root_namespace,
            tunnel_port: pod.agent.ports.tunnel,
            mtls: pod.agent.tls.is_some(),
        };
        let service = snap
            .service_by_vip(orig.0.ip())
            .map(|s| s.fqdn(route::CLUSTER_DOMAIN));
        // The steps are formatted only for the debug log that prints them.
        let steps = if tracing::enabled!(tracing::Level::DEBUG) {
            Steps::Record
        } else {
            Steps::Skip
        };
        (
            route::decide(&ctx, orig.0, steps, |svc, n| pod.agent.lb.next(svc, n)),
            service,
        )
    };
    // The rest of the decision (steps, waypoint) is dropped here, not held by this task for
    // as long as the connection stays open.
    let route = {
        let d = decision;
        tracing::debug!(dst.orig = %orig, steps = ?d.steps, "route decided");
        d.route
    };
    let mut down = down;
    let src_id = pod.workload.spiffe_id(&pod.agent.cfg.trust_domain);
    match route {
        Route::Refuse { reason, code } => {
            let code = code.reason();
            if let Some(denial) = code.denial() {
                pod.agent
                    .conns
                    .metrics()
                    .denials
                    .get_or_create(&ReasonLabel { reason: denial })
                    .inc();
            }
            fail(down, orig.0, Attempt::Plaintext, code, reason)
        }
        Route::Plaintext { target } => {
            let connect = pod.kernel.connect_outbound(target);
            let mut up = match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
                Ok(Ok(up)) => up,
                Ok(Err(e)) => {
                    return fail(
                        down,
                        target,
                        Attempt::Plaintext,
                        Reason::Upstream,
                        format!("{target}: {e}"),
                    )
                }
                Err(_) => {
                    return fail(
                        down,
                        target,
                        Attempt::Plaintext,
                        Reason::UpstreamTimeout,
                        format!("{target}: connect timed out"),
                    )
                }
            };
            let labels = pod.labels(
                "source",
                src_ip,
                target.ip(),
                None,
                None,
                service.as_deref(),
                false,
                "-",
            );
            let conn = Carried {
                src,
                orig,
                target,
                dst_identity: None,
                security: "plaintext",
                trace_id: None,
                labels,
            };
            carry(&pod, conn, &mut down, Upstream::Plain(&mut up)).await;
        }
        Route::Tunnel {
            peer,
            target,
            dst_id,
        } => {
            // Failures from here on are of an mTLS attempt: counted and logged as mutual_tls,
            // with the identities it was made with.
            let attempt = Attempt::Mtls {
                src_id: &src_id,
                dst_id: &dst_id,
            };
            let Ok(id) = dst_id.parse::<SpiffeId>() else {
                return fail(
                    down,
                    target,
                    attempt,
                    Reason::BadDestinationIdentity,
                    format!("bad destination identity {dst_id}"),
                );
            };
            // Boxed: the dial (TLS and h2 handshakes) would otherwise size this task's future
            // for as long as the connection stays open. The headers are dropped once sent.
            let (dialled, trace_id) = {
                let headers =
                    ConnectHeaders::with_baggage(pod.baggage.clone(), src, service.as_deref());
                let dial = Box::pin(tunnel(&pod, target, PeerAddr(peer), &id, &headers));
                (dial.await, headers.traceparent.and_then(|t| t.id()))
            };
            let (mut up, _guard) = match dialled {
                Ok(s) => s,
                Err(e) => {
                    return fail(
                        down,
                        target,
                        attempt,
                        Reason::Tunnel,
                        format!("{target} via {peer} ({dst_id}): {e}"),
                    )
                }
            };
            let d = id.to_string();
            let labels = pod.labels(
                "source",
                src_ip,
                target.ip(),
                Some(&src_id),
                Some(&d),
                service.as_deref(),
                true,
                "-",
            );
            let conn = Carried {
                src,
                orig,
                target,
                dst_identity: Some(d),
                security: "mutual_tls",
                trace_id,
                labels,
            };
            carry(&pod, conn, &mut down, Upstream::Tunnel(&mut up)).await;
        }
    }
}

/// What a connection that could not be carried was attempted as.
#[derive(Clone, Copy)]
enum Attempt<'a> {
    /// Plaintext, or nothing yet (no route).
    Plaintext,
    /// HBONE as `src_id`, requiring `dst_id` of the peer.
    Mtls { src_id: &'a str, dst_id: &'a str },
}

/// What the access log, metrics and connection table say about a carried connection.
struct Carried {
    /// The source as shown: the pod's address with the app socket's port ([`pod_source`]).
    src: SocketAddr,
    orig: OrigDstAddr,
    target: SocketAddr,
    dst_identity: Option<String>,
    security: &'static str,
    /// The trace id the CONNECT carried (tunnelled connections).
    trace_id: Option<TraceId>,
    labels: TcpLabels,
}

/// Where a carried connection goes on.
enum Upstream<'a> {
    Plain(&'a mut TcpStream),
    Tunnel(&'a mut H2Stream),
}

async fn carry(pod: &PodContext, c: Carried, down: &mut TcpStream, up: Upstream<'_>) {
    let guard = pod.agent.conns.open(ConnInfo {
        direction: "outbound",
        pod: pod.workload.key(),
        src: c.src,
        dst: c.orig.0,
        target: (c.target != c.orig.0).then_some(c.target),
        src_identity: (c.security == "mutual_tls")
            .then(|| pod.workload.spiffe_id(&pod.agent.cfg.trust_domain)),
        dst_identity: c.dst_identity,
        security: c.security,
        trace_id: c.trace_id,
        authz: None,
        labels: c.labels,
    });
    let result = match up {
        Upstream::Plain(up) => copy_both(down, up, guard.bytes()).await,
        Upstream::Tunnel(up) => copy_tcp_h2(down, up, TcpSide::Source, guard.bytes()).await,
    };
    let t = result.as_ref().copied().unwrap_or_default();
    pod.stats.bytes_sent.fetch_add(t.sent, Ordering::Relaxed);
    pod.stats
        .bytes_received
        .fetch_add(t.received, Ordering::Relaxed);
    guard.finish(&result);
}

async fn tunnel(
    pod: &PodContext,
    target: SocketAddr,
    peer: PeerAddr,
    dst_id: &SpiffeId,
    headers: &ConnectHeaders,
) -> Result<(H2Stream, StreamGuard), String> {
    let src_id = pod.identity().ok_or("source pod has no valid identity")?;
    let tls = pod.agent.tls.as_ref().ok_or("agent has no identities")?;
    pod.await_certificate(&src_id)
        .await
        .map_err(|e| e.to_string())?;
    let key = PoolKey {
        shard: super::shards::current(),
        src_netns: pod.netns_cookie,
        src_id: src_id.clone(),
        peer: peer.0,
        dst_id: dst_id.clone(),
    };
    let tls_err = |e: String| crate::tunnel::Error::Tls {
        peer: peer.to_string(),
        source: std::io::Error::other(e),
    };
    let src_ip = pod.workload.ip_like(peer.0.ip());
    let dial = || async {
        let config = tls
            .client(&src_id, dst_id)
            .map_err(|e| tls_err(e.to_string()))?;
        // Held through the handshake: a same-node peer (this agent) accepts on another shard.
        let _dialing = src_ip.map(|ip| pod.agent.shards.note_dial(ip));
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, pod.kernel.connect_outbound(peer.0))
            .await
            .map_err(|_| crate::tunnel::Error::HandshakeTimeout {
                peer: peer.to_string(),
            })?
            .map_err(|e| tls_err(e.to_string()))?;
        Tunnel::handshake(tcp, peer.0, Arc::new(config)).await
    };
    pod.agent
        .pool
        .stream_with(&key, target, headers, dial)
        .await
        .map_err(|e| error_chain(&e))
}
/// The source of an outbound connection as the access log and `ambit connections` show it: the
/// pod's address of the app socket's family (the address its tunnel or plaintext connection
/// leaves from, as the destination sees it) with the app socket's port, which still names the
/// socket inside the pod (`ss` there shows `127.0.0.1:PORT`). The address as accepted is
/// `127.0.0.1` after the connect4 rewrite, the same in every pod.
fn pod_source(pod: &PodContext, client: ClientAddr) -> SocketAddr {
    let ip = pod
        .workload
        .ip_like(client.0.ip())
        .or(pod.workload.ips.first().copied())
        .unwrap_or(client.0.ip());
    SocketAddr::new(ip, client.0.port())
}

/// A destination that would come straight back to this agent.
fn is_loop(pod: &PodContext, dst: SocketAddr) -> bool {
    let ip = dst.ip();
    pod.agent.ports.is_agent_port(dst.port())
        && (ip.is_loopback() || ip.is_unspecified() || pod.workload.ips.contains(&ip))
}
