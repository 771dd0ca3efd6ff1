//! Inbound tunnel path: terminate HBONE on 15008, check the CONNECT target and policy, deliver to the app with the client's address.
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::Instrument;

use super::conns::{self, ConnInfo};
use super::copy::{copy_tcp_h2_until_closed, TcpSide};
use super::{accept_loop, deliver, reset, ActiveGuard, PodContext};
use crate::addr::ClientAddr;
use crate::config::Limits;
use crate::error::error_chain;
use crate::metrics::{ReasonLabel, Rejections};
use crate::policy::authz::ConnAttrs;
use crate::reason::Reason;
use crate::tunnel::server::{accept_tls, serve_h2, PendingConnect, ServerLimits};

/// Serves one tunnel listener of a pod until the task is aborted.
pub async fn run(listener: TcpListener, pod: Arc<PodContext>) {
    let shards = pod.agent.shards.clone();
    accept_loop(listener, "inbound_tunnel", shards, move |stream, peer| {
        let pod = pod.clone();
        let span =
            tracing::info_span!("inbound_tunnel", pod = %pod.workload.key(), peer.addr = %peer);
        async move { serve(stream, peer, pod).await }.instrument(span)
    })
    .await
}

async fn serve(tcp: TcpStream, peer: SocketAddr, pod: Arc<PodContext>) {
    let refused = |reason: Reason, error: String| {
        pod.stats.tunnel_refused.fetch_add(1, Ordering::Relaxed);
        pod.agent.gate.limits.rejections.count(reason);
        tracing::warn!(target: "access", direction = "inbound", src.addr = %peer, reason = reason.label(), error, "tunnel connection refused");
    };
    // A connection the TLS or HTTP/2 layer refused: the whole error chain (the TLS alert the
    // client sent, `received fatal alert: BadCertificate`, is the cause of a failed
    // handshake), and the alert in a field of its own.
    let failed = |e: crate::tunnel::Error| {
        pod.stats.tunnel_refused.fetch_add(1, Ordering::Relaxed);
        pod.agent.gate.limits.rejections.count(e.reason());
        let alert = e.peer_alert().map(|a| format!("{a:?}"));
        tracing::warn!(
            target: "access",
            direction = "inbound",
            src.addr = %peer,
            reason = e.reason().label(),
            error = error_chain(&e),
            tls.alert = alert.as_deref().unwrap_or("-"),
            "tunnel connection refused"
        );
    };
    let Some(id) = pod.identity() else {
        refused(
            Reason::NoLocalIdentity,
            "this pod has no valid identity".into(),
        );
        return reset(tcp);
    };
    let Some(source) = pod.agent.tls.as_ref() else {
        refused(Reason::NoCa, "agent runs without identities".into());
        return reset(tcp);
    };
    if let Err(e) = pod.await_certificate(&id).await {
        refused(Reason::NoCertificate, e.to_string());
        return reset(tcp);
    }
    let tls = match source.server(&id) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            refused(Reason::NoCertificate, e.to_string());
            return reset(tcp);
        }
    };
    // Fairness: one source cannot hold more than its share of connections, and handshakes
    // (the expensive part) are capped agent-wide; over either cap the connection is reset.
    let Some(_source_slot) = pod.agent.gate.admit_source(peer.ip()) else {
        refused(
            Reason::SourceLimit,
            format!("{} holds too many tunnel connections", peer.ip()),
        );
        return reset(tcp);
    };
    let Some(source_handshake) = pod.agent.gate.admit_handshake(peer.ip()) else {
        refused(
            Reason::SourceHandshakeLimit,
            format!("{} has too many tls handshakes in progress", peer.ip()),
        );
        return reset(tcp);
    };
    let Ok(permit) = pod.agent.gate.handshakes.clone().try_acquire_owned() else {
        refused(
            Reason::HandshakeLimit,
            "too many tls handshakes in progress".into(),
        );
        return reset(tcp);
    };
    let limits = pod.agent.gate.limits.clone();
    let (stream, peer_id) = match accept_tls(tcp, peer, tls, limits.handshake_timeout).await {
        Ok(s) => s,
        Err(e) => return failed(e),
    };
    drop(permit);
    drop(source_handshake);
    let handler_pod = pod.clone();
    let served = serve_h2(stream, peer, peer_id, limits, pod.drain.clone(), move |p| {
        handle(p, handler_pod.clone())
    });
    if let Err(e) = served.await {
        failed(e);
    }
}

/// Why a CONNECT from `peer_id` would bypass the waypoint `pod` is behind (only the
/// waypoint's pods may send it mesh traffic, as ztunnel enforces), or `None` when `pod` uses
/// no waypoint or `peer_id` is the waypoint's.
fn bypassed_waypoint(pod: &PodContext, peer_id: &str) -> Option<String> {
    let snap = pod.agent.inventory.borrow().clone();
    let w = snap
        .workloads
        .get(&pod.workload.key())
        .map(AsRef::as_ref)
        .unwrap_or(&pod.workload);
    let wp = snap.waypoint_of_workload(w)?;
    let ids = snap.waypoint_identities(&wp, &pod.agent.cfg.trust_domain);
    if ids.iter().any(|id| id == peer_id) {
        return None;
    }
    let accepted = if ids.is_empty() {
        "none: the waypoint has no known pod".to_string()
    } else {
        ids.join(", ")
    };
    Some(format!(
        "pod {} is behind waypoint {} and accepts mesh traffic only from it (accepted: {accepted})",
        w.key(),
        wp.key()
    ))
}

/// Agent-wide caps of the tunnel ports.
pub struct Gate {
    /// Handshakes in progress.
    pub handshakes: Arc<Semaphore>,
    per_source: Mutex<HashMap<IpAddr, usize>>,
    max_per_source: usize,
    handshakes_per_source: Mutex<HashMap<IpAddr, usize>>,
    max_handshakes_per_source: usize,
    /// Per-connection limits.
    pub limits: ServerLimits,
}

/// Holds one of a source's connection (or handshake) slots.
pub struct SourceSlot<'a> {
    counts: &'a Mutex<HashMap<IpAddr, usize>>,
    ip: IpAddr,
}

impl Drop for SourceSlot<'_> {
    fn drop(&mut self) {
        let mut m = self
            .counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

impl Gate {
    /// Caps from the configuration; refusals counted in `rejections`.
    pub fn new(l: &Limits, rejections: Rejections) -> Self {
        Self {
            handshakes: Arc::new(Semaphore::new(l.max_handshakes.max(1))),
            per_source: Mutex::new(HashMap::new()),
            max_per_source: l.max_connections_per_source.max(1),
            handshakes_per_source: Mutex::new(HashMap::new()),
            max_handshakes_per_source: l.max_handshakes_per_source.max(1),
            limits: ServerLimits {
                handshake_timeout: Duration::from_millis(l.handshake_timeout_ms.max(100)),
                max_streams: l.max_streams_per_connection.max(1),
                idle_timeout: Duration::from_millis(l.idle_timeout_ms.max(1000)),
                rejections,
            },
        }
    }

    /// A connection slot for `ip`, unless it already holds its maximum.
    pub fn admit_source(&self, ip: IpAddr) -> Option<SourceSlot<'_>> {
        admit(&self.per_source, self.max_per_source, ip)
    }

    /// A handshake slot for `ip`, unless it already has its maximum of handshakes in progress.
    pub fn admit_handshake(&self, ip: IpAddr) -> Option<SourceSlot<'_>> {
        admit(
            &self.handshakes_per_source,
            self.max_handshakes_per_source,
            ip,
        )
    }
}

fn admit(counts: &Mutex<HashMap<IpAddr, usize>>, max: usize, ip: IpAddr) -> Option<SourceSlot<'_>> {
    let mut m = counts
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let n = m.entry(ip).or_insert(0);
    if *n >= max {
        return None;
    }
    *n += 1;
    Some(SourceSlot { counts, ip })
}

pub(super) async fn handle(p: PendingConnect, pod: Arc<PodContext>) {
    // Held from accept to close: the pod's and the agent's drain wait for it.
    let _drain = pod.drain.watch();
    let stats = &pod.stats;
    let target = p.connect.authority;
    let peer_id = p.connect.peer_id.to_string();
    let src = p.connect.peer;
    // Only the trace id of what the peer's headers say is kept (for the access log): the
    // source is the TCP peer and the identity is the certificate's, whatever `forwarded` or
    // `baggage` claim.
    let trace_id = p.connect.received.trace.and_then(|t| t.id());
    // The source agent dials from inside the source pod, so the TCP peer is the client pod.
    let client_ip = src.ip();
    let dst_id = pod.workload.spiffe_id(&pod.agent.cfg.trust_domain);
    let labels = |flags| {
        pod.labels(
            "destination",
            client_ip,
            target.ip(),
            Some(&peer_id),
            Some(&dst_id),
            None,
            true,
            flags,
        )
    };
    let metrics = pod.agent.conns.metrics();
    let refuse = |p: PendingConnect, reason: Reason, why: Option<String>| {
        stats.tunnel_refused.fetch_add(1, Ordering::Relaxed);
        let status = reason.status();
        let error = match why {
            Some(why) => format!("answered {status} to {peer_id}: {why}"),
            None => format!("answered {status} to {peer_id}"),
        };
        if let Some(denial) = reason.denial() {
            metrics
                .denials
                .get_or_create(&ReasonLabel { reason: denial })
                .inc();
        }
        conns::refused(
            metrics,
            &labels(reason.response_flags()),
            "inbound",
            &src.to_string(),
            &target.to_string(),
            reason,
            &error,
        );
        p.refuse(reason);
    };
    if !pod.workload.ips.contains(&target.ip()) {
        return refuse(p, Reason::ForeignTarget, None);
    }
    if pod.agent.ports.is_agent_port(target.port()) {
        return refuse(p, Reason::AgentPort, None);
    }
    if let Some(why) = bypassed_waypoint(&pod, &peer_id) {
        stats.authz_denied.fetch_add(1, Ordering::Relaxed);
        return refuse(p, Reason::NotFromWaypoint, Some(why));
    }
    let attrs = ConnAttrs {
        peer: Some(p.connect.peer_id.clone()),
        src_ip: client_ip,
        dst_port: target.port(),
        dst_ip: target.ip(),
    };
    if !pod.authorize(&attrs).allowed() {
        stats.authz_denied.fetch_add(1, Ordering::Relaxed);
        return refuse(p, Reason::PolicyDenied, None);
    }
    stats.inbound_accepted.fetch_add(1, Ordering::Relaxed);
    let _active = ActiveGuard::new(&stats.inbound_active);
    let mut up = match deliver(&pod, ClientAddr(SocketAddr::new(client_ip, 0)), target).await {
        Ok(up) => up,
        Err(reason) => {
            stats.inbound_failed.fetch_add(1, Ordering::Relaxed);
            return refuse(p, reason, None);
        }
    };
    let Some(mut down) = p.accept() else {
        stats.inbound_failed.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let guard = pod.agent.conns.open(ConnInfo {
        direction: "inbound",
        pod: pod.workload.key(),
        src,
        dst: target,
        target: None,
        src_identity: Some(peer_id.clone()),
        dst_identity: Some(dst_id.clone()),
        security: "mutual_tls",
        trace_id,
        authz: Some(attrs),
        labels: labels("-"),
    });
    let result = copy_tcp_h2_until_closed(
        &mut up,
        &mut down,
        TcpSide::Destination,
        guard.bytes(),
        guard.closer(),
    )
    .await;
    let t = result.as_ref().copied().unwrap_or_default();
    stats.bytes_sent.fetch_add(t.sent, Ordering::Relaxed);
    stats
        .bytes_received
        .fetch_add(t.received, Ordering::Relaxed);
    guard.finish(&result);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gate_caps_each_source_and_releases_slots() {
        let limits = Limits {
            max_connections_per_source: 2,
            ..Limits::default()
        };
        let gate = Gate::new(&limits, Rejections::default());
        let a: IpAddr = "10.1.0.2".parse().unwrap();
        let b: IpAddr = "10.1.0.3".parse().unwrap();
        let s1 = gate.admit_source(a).unwrap();
        let _s2 = gate.admit_source(a).unwrap();
        assert!(
            gate.admit_source(a).is_none(),
            "third connection from one source refused"
        );
        assert!(gate.admit_source(b).is_some(), "other sources unaffected");
        drop(s1);
        assert!(gate.admit_source(a).is_some(), "slot released on close");
    }

    #[test]
    fn gate_caps_handshakes_per_source() {
        let limits = Limits {
            max_handshakes_per_source: 1,
            ..Limits::default()
        };
        let gate = Gate::new(&limits, Rejections::default());
        let a: IpAddr = "10.1.0.2".parse().unwrap();
        let b: IpAddr = "10.1.0.3".parse().unwrap();
        let h = gate.admit_handshake(a).unwrap();
        assert!(
            gate.admit_handshake(a).is_none(),
            "second handshake refused"
        );
        assert!(
            gate.admit_handshake(b).is_some(),
            "other sources unaffected"
        );
        drop(h);
        assert!(
            gate.admit_handshake(a).is_some(),
            "slot released after the handshake"
        );
    }
}
