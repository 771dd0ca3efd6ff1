//! Inbound plaintext path: a captured connection to the pod is checked against PeerAuthentication and AuthorizationPolicy, then delivered to the app.
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument;

use super::caps::{self, Listener};
use super::conns::{self, ConnInfo};
use super::copy::copy_until_closed;
use super::{accept_loop, deliver, reset, ActiveGuard, PodContext};
use crate::addr::{ClientAddr, OrigDstAddr};
use crate::metrics::ReasonLabel;
use crate::policy::authz::ConnAttrs;
use crate::policy::peer_auth::{self, Effective};
use crate::reason::Reason;

/// Serves one inbound plaintext listener of a pod until the task is aborted.
pub async fn run(listener: TcpListener, pod: Arc<PodContext>) {
    let shards = pod.agent.shards.clone();
    accept_loop(
        listener,
        "inbound_plaintext",
        shards,
        move |stream, peer| {
            let pod = pod.clone();
            // Debug level, as the outbound span (the access-log line names pod and source).
            let span = tracing::debug_span!("inbound", pod = %pod.workload.key(), src.addr = %peer);
            // Counted by the drain from accept to close (see `outbound::run`).
            let accepted = pod.drain.watch();
            async move {
                let _accepted = accepted;
                serve(stream, ClientAddr(peer), pod).await;
            }
            .instrument(span)
        },
    )
    .await
}

pub(super) async fn serve(down: TcpStream, client: ClientAddr, pod: Arc<PodContext>) {
    let stats = &pod.stats;
    stats.inbound_accepted.fetch_add(1, Ordering::Relaxed);
    let Some(_slot) = caps::admit(&pod, Listener::InboundPlaintext) else {
        return caps::refuse(&pod, Listener::InboundPlaintext, down, client.0);
    };
    let _active = ActiveGuard::new(&stats.inbound_active);
    let Ok(orig) = pod.kernel.inbound_dst(&down) else {
        stats.inbound_failed.fetch_add(1, Ordering::Relaxed);
        reset(down);
        return;
    };
    let dst_id = pod.workload.spiffe_id(&pod.agent.cfg.trust_domain);
    let labels = |flags| {
        pod.labels(
            "destination",
            client.0.ip(),
            orig.0.ip(),
            None,
            Some(&dst_id),
            None,
            false,
            flags,
        )
    };
    let metrics = pod.agent.conns.metrics();
    let refuse = |down: TcpStream, reason: Reason, error: String| {
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
            &client.to_string(),
            &orig.to_string(),
            reason,
            &error,
        );
        reset(down);
    };
    if pod.agent.ports.is_agent_port(orig.0.port()) {
        stats.inbound_failed.fetch_add(1, Ordering::Relaxed);
        return refuse(
            down,
            Reason::AgentPort,
            "agent ports are not application targets".into(),
        );
    }
    if let Some(policy) = strict_policy(&pod, client, orig) {
        stats.inbound_denied.fetch_add(1, Ordering::Relaxed);
        return refuse(
            down,
            Reason::StrictPlaintext,
            format!("plaintext under STRICT ({policy})"),
        );
    }
    let attrs = ConnAttrs {
        peer: None,
        src_ip: client.0.ip(),
        dst_port: orig.0.port(),
        dst_ip: orig.0.ip(),
    };
    let decision = pod.authorize(&attrs);
    if !decision.allowed() {
        stats.authz_denied.fetch_add(1, Ordering::Relaxed);
        return refuse(
            down,
            Reason::PolicyDenied,
            format!("AuthorizationPolicy: {decision:?}"),
        );
    }
    let mut up = match deliver(&pod, client, orig.0).await {
        Ok(up) => up,
        Err(reason) => {
            stats.inbound_failed.fetch_add(1, Ordering::Relaxed);
            return refuse(down, reason, "delivery to the app failed".into());
        }
    };
    let mut down = down;
    let guard = pod.agent.conns.open(ConnInfo {
        direction: "inbound",
        pod: pod.workload.key(),
        src: client.0,
        dst: orig.0,
        target: None,
        src_identity: None,
        dst_identity: None,
        security: "plaintext",
        trace_id: None,
        authz: Some(attrs),
        labels: labels("-"),
    });
    let result = copy_until_closed(&mut down, &mut up, guard.bytes(), guard.closer()).await;
    let t = result.as_ref().copied().unwrap_or_default();
    stats.bytes_sent.fetch_add(t.sent, Ordering::Relaxed);
    stats
        .bytes_received
        .fetch_add(t.received, Ordering::Relaxed);
    guard.finish(&result);
}

/// The deciding policy when the pod's effective mode for this port is STRICT (and the source
/// is not an admitted probe source); `None` when plaintext may pass.
fn strict_policy(pod: &PodContext, client: ClientAddr, orig: OrigDstAddr) -> Option<String> {
    if pod.agent.cfg.probe_sources.contains(&client.0.ip()) {
        return None;
    }
    let snap = pod.agent.inventory.borrow().clone();
    let w = snap
        .workloads
        .get(&pod.workload.key())
        .map(AsRef::as_ref)
        .unwrap_or(&pod.workload);
    let r = peer_auth::resolve(
        &snap.peer_authentications,
        &pod.agent.cfg.root_namespace,
        &w.namespace,
        &w.labels,
        orig.0.port(),
    );
    (r.mode == Effective::Strict).then(|| r.policy.unwrap_or_else(|| "default".into()))
}
