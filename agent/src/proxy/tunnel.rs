//! Inbound tunnel port (15008): bound in every enrolled pod; HBONE serving arrives with the mTLS issue.
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::net::TcpListener;

use super::{accept_loop, reset, PodContext};

/// Holds the pod's tunnel port. Until HBONE is served, connections are refused (reset) and
/// counted; nothing reaches the app through this port.
pub async fn run(listener: TcpListener, pod: Arc<PodContext>) {
    accept_loop(listener, "tunnel", move |stream, peer| {
        let pod = pod.clone();
        async move {
            pod.stats.tunnel_refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(target: "access", direction = "inbound", src.addr = %peer, reason = "hbone_unavailable", "tunnel connection refused: HBONE is not served yet");
            reset(stream);
        }
    })
    .await
}
