//! Connection accounting: the table behind `GET /connections`, Istio TCP metrics and the access log (one line per connection at close).
use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;
use tokio::sync::Notify;

use super::copy::Transferred;
use crate::metrics::{ProxyMetrics, TcpLabels};
use crate::policy::authz::ConnAttrs;
use crate::reason::Reason;
use crate::tunnel::headers::TraceId;

/// What is known about one open connection.
#[derive(Debug, Clone, Serialize)]
pub struct ConnInfo {
    /// `outbound` or `inbound`.
    pub direction: &'static str,
    /// The pod this agent serves on this side (`namespace/name`).
    pub pod: String,
    /// Source address. Outbound: the pod's address with the app socket's port (the socket
    /// itself is 127.0.0.1:PORT after the connect4 rewrite); inbound: the peer as accepted.
    pub src: SocketAddr,
    /// Destination as the client dialled it.
    pub dst: SocketAddr,
    /// Where the bytes go when that differs (Service endpoint).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<SocketAddr>,
    /// Source identity, when proved (mTLS) or known (outbound from a local pod).
    pub src_identity: Option<String>,
    /// Destination identity, when known.
    pub dst_identity: Option<String>,
    /// `mutual_tls` or `plaintext`.
    pub security: &'static str,
    /// The W3C trace id of the CONNECT (sent outbound, received inbound), to correlate the
    /// two agents' log lines and a waypoint's trace.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<TraceId>,
    /// What inbound authorization decided on; re-checked when policies change.
    #[serde(skip)]
    pub authz: Option<ConnAttrs>,
    /// Metric labels.
    #[serde(skip)]
    pub labels: TcpLabels,
}

/// One open connection, shared by the table and the connection's task (one allocation).
struct Entry {
    info: ConnInfo,
    started: Instant,
    bytes: ByteCounts,
    closer: Notify,
}

/// Live byte counters of one connection.
#[derive(Debug, Default)]
pub struct ByteCounts {
    /// Bytes from source to destination.
    pub sent: AtomicU64,
    /// Bytes from destination to source.
    pub received: AtomicU64,
}

/// Open connections of this agent, and the metrics they feed.
pub struct ConnTable {
    next: AtomicU64,
    open: Mutex<BTreeMap<u64, Arc<Entry>>>,
    metrics: Arc<ProxyMetrics>,
}

/// Keeps a connection in the table; [`ConnGuard::finish`] writes its access-log line.
pub struct ConnGuard {
    table: Arc<ConnTable>,
    id: u64,
    entry: Arc<Entry>,
}

/// One row of `GET /connections`.
#[derive(Debug, Serialize)]
pub struct ConnRow {
    /// Connection id (per agent run).
    pub id: u64,
    /// The connection.
    #[serde(flatten)]
    pub info: ConnInfo,
    /// Seconds open.
    pub age_s: f64,
    /// Bytes from source to destination so far.
    pub bytes_sent: u64,
    /// Bytes from destination to source so far.
    pub bytes_received: u64,
}

impl ConnTable {
    /// An empty table feeding `metrics`.
    pub fn new(metrics: Arc<ProxyMetrics>) -> Self {
        Self {
            next: AtomicU64::new(0),
            open: Mutex::new(BTreeMap::new()),
            metrics,
        }
    }

    /// The metrics this table feeds.
    pub fn metrics(&self) -> &ProxyMetrics {
        &self.metrics
    }

    /// The shared metrics handle.
    pub fn metrics_arc(&self) -> Arc<ProxyMetrics> {
        self.metrics.clone()
    }

    /// Registers an open connection.
    pub fn open(self: &Arc<Self>, info: ConnInfo) -> ConnGuard {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        self.metrics.opened.get_or_create(&info.labels).inc();
        let entry = Arc::new(Entry {
            info,
            started: Instant::now(),
            bytes: ByteCounts::default(),
            closer: Notify::new(),
        });
        lock(&self.open).insert(id, entry.clone());
        ConnGuard {
            table: self.clone(),
            id,
            entry,
        }
    }

    /// Closes every authorized connection for which `still_allowed` says no; returns how many.
    pub fn reevaluate(&self, still_allowed: impl Fn(&ConnInfo, &ConnAttrs) -> bool) -> usize {
        let open = lock(&self.open);
        let mut closed = 0;
        for e in open.values() {
            if let Some(attrs) = &e.info.authz {
                if !still_allowed(&e.info, attrs) {
                    // notify_one stores a permit, so a copy loop not yet waiting still sees it.
                    e.closer.notify_one();
                    closed += 1;
                }
            }
        }
        closed
    }

    /// Every open connection.
    pub fn rows(&self) -> Vec<ConnRow> {
        lock(&self.open)
            .iter()
            .map(|(id, e)| ConnRow {
                id: *id,
                info: e.info.clone(),
                age_s: e.started.elapsed().as_secs_f64(),
                bytes_sent: e.bytes.sent.load(Ordering::Relaxed),
                bytes_received: e.bytes.received.load(Ordering::Relaxed),
            })
            .collect()
    }
}

impl ConnGuard {
    /// The connection's byte counters.
    pub fn bytes(&self) -> &ByteCounts {
        &self.entry.bytes
    }

    /// Notified when the connection must be closed (a policy no longer allows it).
    pub fn closer(&self) -> &Notify {
        &self.entry.closer
    }

    /// Ends the connection: counts its bytes and writes its access-log line.
    pub fn finish(self, result: &io::Result<Transferred>) {
        let e = &self.entry;
        let (sent, received) = (
            e.bytes.sent.load(Ordering::Relaxed),
            e.bytes.received.load(Ordering::Relaxed),
        );
        let dur_ms = e.started.elapsed().as_millis() as u64;
        let i = &e.info;
        // Formatted on the stack: the field stays a string (quoted by the text format).
        let mut trace = [0u8; 32];
        let (outcome, error) = match result {
            Ok(_) => ("ok", String::new()),
            Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {
                ("closed_by_policy", e.to_string())
            }
            Err(e) => ("error", e.to_string()),
        };
        tracing::info!(
            target: "access",
            direction = i.direction,
            pod = %i.pod,
            src.addr = %i.src,
            src.id = i.src_identity.as_deref().unwrap_or("-"),
            dst.orig = %i.dst,
            dst.target = %i.target.unwrap_or(i.dst),
            dst.id = i.dst_identity.as_deref().unwrap_or("-"),
            security = i.security,
            trace_id = i.trace_id.map_or("-", |t| t.hex(&mut trace)),
            bytes.sent = sent,
            bytes.recv = received,
            dur_ms,
            result = outcome,
            error,
            "connection closed"
        );
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        lock(&self.table.open).remove(&self.id);
        let m = &self.table.metrics;
        let e = &self.entry;
        let l = &e.info.labels;
        m.closed.get_or_create(l).inc();
        m.sent_bytes
            .get_or_create(l)
            .inc_by(e.bytes.sent.load(Ordering::Relaxed));
        m.received_bytes
            .get_or_create(l)
            .inc_by(e.bytes.received.load(Ordering::Relaxed));
    }
}

/// Writes the access-log line and metrics of a connection refused before it was carried.
pub fn refused(
    metrics: &ProxyMetrics,
    labels: &TcpLabels,
    direction: &'static str,
    src: &str,
    dst: &str,
    reason: Reason,
    error: &str,
) {
    metrics.refused(labels);
    tracing::warn!(
        target: "access",
        direction,
        src.addr = %src,
        dst.orig = %dst,
        security = if labels.connection_security_policy == "mutual_tls" { "mutual_tls" } else { "plaintext" },
        response_flags = labels.response_flags,
        result = "refused",
        reason = reason.label(),
        error,
        "connection refused"
    );
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
