//! Drains the kernel's event ring buffer into `tracing`.
use aya::maps::{MapData, RingBuf};
use tokio::io::unix::AsyncFd;

use super::maps::{AmbEvent, EventKind};

/// Logs every kernel event until the ring buffer fails.
pub async fn drain(ring: RingBuf<MapData>) {
    // The safe constructor is deprecated in favour of an `unsafe` one; the ring buffer owns its
    // fd for as long as the AsyncFd holds it, which is the soundness condition.
    #[expect(deprecated, reason = "the replacement is unsafe; RingBuf owns its fd")]
    let registered = AsyncFd::with_interest(ring, tokio::io::Interest::READABLE);
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch the kernel event ring buffer");
            return;
        }
    };
    loop {
        let mut guard = match fd.readable_mut().await {
            Ok(g) => g,
            Err(e) => {
                tracing::error!(error = %e, "kernel event ring buffer failed");
                return;
            }
        };
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            match AmbEvent::from_bytes(&item) {
                Some(ev) => log(&ev),
                None => tracing::warn!(len = item.len(), "short kernel event record"),
            }
        }
        guard.clear_ready();
    }
}

fn log(ev: &AmbEvent) {
    let dst = ev
        .dst()
        .map(|d| d.to_string())
        .unwrap_or_else(|| "?".into());
    let cookie = ev.netns_cookie;
    match EventKind::from(ev.kind) {
        EventKind::MapFull => {
            tracing::warn!(netns.cookie = cookie, pod.id = ev.pod_id, dst.orig = %dst, reason = "map_full", "kernel refused a connect: original destination map full")
        }
        EventKind::AgentPort => {
            tracing::info!(netns.cookie = cookie, pod.id = ev.pod_id, dst.orig = %dst, reason = "agent_port", "pod dialled an agent port directly; not captured")
        }
        EventKind::NoListener => {
            tracing::warn!(netns.cookie = cookie, dst.orig = %dst, reason = "no_listener", "inbound connection to an enrolled pod dropped: no agent listener")
        }
        EventKind::AssignFail => {
            tracing::warn!(netns.cookie = cookie, dst.orig = %dst, reason = "assign_fail", "inbound connection dropped: sk_assign failed")
        }
        EventKind::BindDenied => {
            tracing::warn!(netns.cookie = cookie, pod.id = ev.pod_id, listen.addr = %dst, reason = "bind_denied", "pod tried to bind an agent port; refused")
        }
        EventKind::ForgedMark => {
            tracing::warn!(netns.cookie = cookie, pod.id = ev.pod_id, dst.orig = %dst, reason = "forged_mark", "pod socket carries the agent's mark but is not the agent's; captured")
        }
        EventKind::Unknown(k) => tracing::warn!(kind = k, "unknown kernel event"),
    }
}
