//! Per-pod connection caps on the capture listeners (15001, 15006): admission, refusal, counting and rate-limited logging.
//!
//! One pod opening connections without end must not take the agent's sockets, memory and
//! CPU from the other pods: each pod may hold `limits.maxConnectionsPerPod` connections at
//! once on each capture listener. Past it a new connection is reset at once (the app sees a
//! refusal; an outbound connection is never let through in plaintext), counted per pod
//! (`outbound_limited` / `inbound_limited` in `/status`, and
//! `ambit_connection_limit_refusals_total{pod,listener,reason}`), and logged at most once a
//! second per pod and listener.
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use super::{reset, ActiveGuard, PodContext};
use crate::metrics::LimitLabels;
use crate::reason::Reason;

/// At most one log line per pod and listener in this period; refusals in between are
/// counted and reported with the next line.
const LOG_EVERY: Duration = Duration::from_secs(1);

/// A capped capture listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Listener {
    /// 15001.
    Outbound,
    /// 15006.
    InboundPlaintext,
}

impl Listener {
    fn name(self) -> &'static str {
        match self {
            Self::Outbound => "outbound",
            Self::InboundPlaintext => "inbound_plaintext",
        }
    }

    fn index(self) -> usize {
        match self {
            Self::Outbound => 0,
            Self::InboundPlaintext => 1,
        }
    }
}

/// Takes one of `pod`'s connection slots on `listener` (held until the guard drops), or
/// `None` when the pod holds its cap.
pub(crate) fn admit(pod: &PodContext, listener: Listener) -> Option<ActiveGuard<'_>> {
    let open = match listener {
        Listener::Outbound => &pod.stats.outbound_active,
        Listener::InboundPlaintext => &pod.stats.plaintext_active,
    };
    ActiveGuard::try_new(open, pod.agent.cfg.limits.max_connections_per_pod.max(1))
}

/// Refuses `stream` from `peer` because `pod` holds its cap on `listener`: counts, logs at a
/// bounded rate, and resets the connection.
pub(crate) fn refuse(pod: &PodContext, listener: Listener, stream: TcpStream, peer: SocketAddr) {
    let stats = &pod.stats;
    match listener {
        Listener::Outbound => &stats.outbound_limited,
        Listener::InboundPlaintext => &stats.inbound_limited,
    }
    .fetch_add(1, Ordering::Relaxed);
    let key = pod.workload.key();
    if let Some(suppressed) = stats.limit_log[listener.index()].allow(Instant::now()) {
        tracing::warn!(
            pod = %key,
            listener = listener.name(),
            src.addr = %peer,
            max = pod.agent.cfg.limits.max_connections_per_pod,
            suppressed,
            "connection reset: the pod holds its cap of open connections on this listener \
             (limits.maxConnectionsPerPod); `suppressed` more since the last such line"
        );
    }
    pod.agent
        .conns
        .metrics()
        .limit_refusals
        .get_or_create(&LimitLabels {
            pod: key,
            listener: listener.name(),
            reason: Reason::PodConnectionLimit.label(),
        })
        .inc();
    reset(stream);
}

/// Lets one log line through per [`LOG_EVERY`] and counts the ones held back.
#[derive(Debug, Default)]
pub struct LogLimiter {
    /// When the last line was let through, and how many were held back since.
    state: Mutex<Option<(Instant, u64)>>,
}

impl LogLimiter {
    /// A limiter that has let nothing through yet.
    pub const fn new() -> Self {
        Self {
            state: Mutex::new(None),
        }
    }

    /// `Some(held back since the last line)` if a line may be logged at `now`.
    pub fn allow(&self, now: Instant) -> Option<u64> {
        let mut s = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match *s {
            Some((last, n)) if now.saturating_duration_since(last) < LOG_EVERY => {
                *s = Some((last, n + 1));
                None
            }
            Some((_, n)) => {
                *s = Some((now, 0));
                Some(n)
            }
            None => {
                *s = Some((now, 0));
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;

    use super::*;

    #[test]
    fn log_limiter_lets_one_line_a_second_through_and_counts_the_rest() {
        let l = LogLimiter::default();
        let t0 = Instant::now();
        assert_eq!(l.allow(t0), Some(0));
        assert_eq!(l.allow(t0 + Duration::from_millis(10)), None);
        assert_eq!(l.allow(t0 + Duration::from_millis(900)), None);
        assert_eq!(l.allow(t0 + Duration::from_millis(1001)), Some(2));
        assert_eq!(l.allow(t0 + Duration::from_millis(1002)), None);
    }

    #[test]
    fn guard_admits_up_to_the_cap_and_frees_its_slot() {
        let open = AtomicU64::new(0);
        let a = ActiveGuard::try_new(&open, 2).unwrap();
        let b = ActiveGuard::try_new(&open, 2).unwrap();
        assert!(ActiveGuard::try_new(&open, 2).is_none());
        assert_eq!(open.load(Ordering::Relaxed), 2);
        drop(a);
        let c = ActiveGuard::try_new(&open, 2);
        assert!(c.is_some());
        drop((b, c));
        assert_eq!(open.load(Ordering::Relaxed), 0);
    }
}
