//! The table of open proxied connections, for `GET /connections`; entries leave when their guard drops.
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;
use tokio::sync::Notify;

use crate::policy::authz::ConnAttrs;

/// What is known about one open connection.
#[derive(Debug, Clone, Serialize)]
pub struct ConnInfo {
    /// `outbound` or `inbound`.
    pub direction: &'static str,
    /// The pod this agent serves on this side (`namespace/name`).
    pub pod: String,
    /// Source address.
    pub src: String,
    /// Destination (original) address.
    pub dst: String,
    /// Source identity, when proved (mTLS) or known (outbound from a local pod).
    pub src_identity: Option<String>,
    /// Destination identity, when known.
    pub dst_identity: Option<String>,
    /// `mutual_tls` or `plaintext`.
    pub security: &'static str,
    /// What inbound authorization decided on; re-checked when policies change.
    #[serde(skip)]
    pub authz: Option<ConnAttrs>,
}

struct Entry {
    info: ConnInfo,
    started: Instant,
    bytes: Arc<ByteCounts>,
    closer: Arc<Notify>,
}

/// Live byte counters of one connection.
#[derive(Debug, Default)]
pub struct ByteCounts {
    /// Bytes from source to destination.
    pub sent: AtomicU64,
    /// Bytes from destination to source.
    pub received: AtomicU64,
}

/// Open connections of this agent.
#[derive(Default)]
pub struct ConnTable {
    next: AtomicU64,
    open: Mutex<BTreeMap<u64, Entry>>,
}

/// Removes its connection from the table when dropped.
pub struct ConnGuard {
    table: Arc<ConnTable>,
    id: u64,
    /// The connection's byte counters.
    pub bytes: Arc<ByteCounts>,
    /// Notified when the connection must be closed (a policy no longer allows it).
    pub closer: Arc<Notify>,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        lock(&self.table.open).remove(&self.id);
    }
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
    /// Registers an open connection.
    pub fn open(self: &Arc<Self>, info: ConnInfo) -> ConnGuard {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let bytes = Arc::new(ByteCounts::default());
        let closer = Arc::new(Notify::new());
        let entry = Entry {
            info,
            started: Instant::now(),
            bytes: bytes.clone(),
            closer: closer.clone(),
        };
        lock(&self.open).insert(id, entry);
        ConnGuard {
            table: self.clone(),
            id,
            bytes,
            closer,
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
