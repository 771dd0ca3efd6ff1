//! Publishing snapshots, for every source: the snapshot's index built before anyone reads it, the guard for the rebuilding sources, reload counters and the held reload for `/status` and metrics, one log line per address conflict and per policy that fails closed.
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tokio::sync::watch;

use super::addresses::Conflict;
use super::guard::{Guard, GuardSettings, Suspicion, Verdict};
use super::Snapshot;
use crate::policy::authz::Failure;

/// Counts of inventory reloads, for status and metrics.
#[derive(Debug, Default)]
pub struct ReloadStats {
    /// Successful loads.
    pub loads: AtomicU64,
    /// Failed loads (the last good state stayed in force).
    pub errors: AtomicU64,
    /// Times the inventory file was read (only when its `stat` moved, or to confirm a hold).
    pub reads: AtomicU64,
    /// Warnings in the inventory in force (ignored kinds, Services without endpoints, ...).
    pub warnings: AtomicU64,
    /// Reloads held back (each content counted once).
    pub holds: AtomicU64,
    /// Held reloads applied after the settle time.
    pub confirmed: AtomicU64,
    /// Addresses that several pods claim and no rule decides, in the inventory in force.
    pub ambiguous_addresses: AtomicU64,
    /// AuthorizationPolicies in force that could not be compiled and fail closed.
    pub failed_closed_policies: AtomicU64,
    /// The reload held back now, if any.
    held: Mutex<Option<HoldStatus>>,
}

/// A reload held back, as `/status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HoldStatus {
    /// Why.
    pub reason: Suspicion,
    /// Why, in words.
    pub message: String,
    /// When it was first seen (unix seconds).
    pub since_unix: u64,
    /// How long the same content must stay before it applies.
    pub settle_ms: u64,
}

impl ReloadStats {
    /// The reload held back now, if any.
    pub fn held(&self) -> Option<HoldStatus> {
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Records what the guard decided, counting and logging each held content once. `source`
    /// names the inventory in logs.
    pub fn note(&self, verdict: &Verdict, settle: Duration, source: &str) {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        match verdict {
            Verdict::Apply => {
                if held.take().is_some() {
                    tracing::info!(
                        source,
                        "inventory reload no longer held: the new content is not suspicious"
                    );
                }
            }
            Verdict::Confirmed { why, held: waited } => {
                *held = None;
                self.confirmed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(source, reason = %why, held_ms = waited.as_millis() as u64, "inventory reload applied: the same content stayed for the settle time");
            }
            Verdict::Hold { why, new, .. } => {
                if *new {
                    self.holds.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(source, reason = %why, settle_ms = settle.as_millis() as u64, "inventory reload held back; the last good inventory stays in force (write inventories atomically: temp file, then rename)");
                    *held = Some(HoldStatus {
                        reason: why.clone(),
                        message: why.to_string(),
                        since_unix: SystemTime::now()
                            .duration_since(SystemTime::UNIX_EPOCH)
                            .map_or(0, |d| d.as_secs()),
                        settle_ms: settle.as_millis() as u64,
                    });
                }
            }
        }
    }

    /// Forgets a held reload (its content could not be read again).
    pub fn release(&self) {
        *self.held.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }
}

/// Publishes snapshots to the agent and logs each address conflict once (not per connection,
/// not per reload): when it appears or changes, and when it is gone.
#[derive(Debug)]
pub struct Publisher {
    tx: watch::Sender<Arc<Snapshot>>,
    stats: Arc<ReloadStats>,
    reported: BTreeMap<IpAddr, Conflict>,
    /// Policies that fail closed, as last logged.
    failed: Vec<Failure>,
}

impl Publisher {
    /// A publisher to `tx`.
    pub fn new(tx: watch::Sender<Arc<Snapshot>>, stats: Arc<ReloadStats>) -> Self {
        let mut p = Self {
            tx,
            stats,
            reported: BTreeMap::new(),
            failed: Vec::new(),
        };
        let current = p.tx.borrow().clone();
        p.report(&current);
        p
    }

    /// The snapshot in force.
    pub fn current(&self) -> Arc<Snapshot> {
        self.tx.borrow().clone()
    }

    /// The counters.
    pub fn stats(&self) -> &Arc<ReloadStats> {
        &self.stats
    }

    /// Publishes `snap` if it differs from the snapshot in force (or `force`); true if sent.
    /// Its index (addresses, VIPs, identities, compiled policies) is built here, once, before
    /// any reader sees it.
    pub fn publish(&mut self, snap: Snapshot, force: bool) -> bool {
        let snap = Arc::new(snap);
        self.report(&snap);
        self.tx.send_if_modified(|cur| {
            let changed = force || **cur != *snap;
            if changed {
                *cur = snap;
            }
            changed
        })
    }

    /// Whether the receivers are all gone.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Waits until the receivers are all gone.
    pub async fn closed(&self) {
        self.tx.closed().await;
    }

    fn report(&mut self, snap: &Snapshot) {
        self.report_policies(snap);
        let index = snap.addresses();
        let mut now = BTreeMap::new();
        for c in index.conflicts() {
            if self.reported.get(&c.ip) != Some(c) {
                if c.owner.is_none() {
                    tracing::warn!(ip = %c.ip, claimants = ?c.claimants, conflict = %c.describe(), "address claimed by more than one pod; connections to it are refused until one owns it");
                } else {
                    tracing::info!(ip = %c.ip, claimants = ?c.claimants, conflict = %c.describe(), "address claimed by more than one pod; decided by rule");
                }
            }
            now.insert(c.ip, c.clone());
        }
        for ip in self.reported.keys().filter(|ip| !now.contains_key(ip)) {
            tracing::info!(ip = %ip, "address conflict resolved: one pod claims it");
        }
        self.stats
            .ambiguous_addresses
            .store(index.ambiguous().count() as u64, Ordering::Relaxed);
        self.reported = now;
    }

    /// Logs each AuthorizationPolicy that fails closed once (when it appears or its reason
    /// changes) and counts those in force.
    fn report_policies(&mut self, snap: &Snapshot) {
        let failures = snap.authz().failures();
        for f in failures.iter().filter(|f| !self.failed.contains(f)) {
            tracing::warn!(policy = %f.policy, field = f.error.field(), error = %f.error, "AuthorizationPolicy cannot be compiled; it fails closed (an ALLOW never matches, a DENY matches every connection it selects)");
        }
        self.stats
            .failed_closed_policies
            .store(failures.len() as u64, Ordering::Relaxed);
        self.failed = failures.to_vec();
    }
}

/// Publishing for the sources that rebuild on changes (Kubernetes, istiod): the first snapshot
/// always goes out and makes the source ready; each later one passes the [`Guard`] first.
#[derive(Debug)]
pub struct GuardedPublisher {
    publisher: Publisher,
    guard: Guard<Snapshot>,
    settings: GuardSettings,
    ready: watch::Sender<bool>,
    /// Names the source in logs (`kubernetes`, `istiod`).
    source: &'static str,
    published: bool,
}

impl GuardedPublisher {
    /// Publishes to `tx` through a guard with `settings`; `ready` turns true with the first
    /// snapshot.
    pub fn new(
        tx: watch::Sender<Arc<Snapshot>>,
        stats: Arc<ReloadStats>,
        settings: GuardSettings,
        ready: watch::Sender<bool>,
        source: &'static str,
    ) -> Self {
        Self {
            publisher: Publisher::new(tx, stats),
            guard: Guard::new(settings.clone()),
            settings,
            ready,
            source,
            published: false,
        }
    }

    /// When a held snapshot can be confirmed: offer the snapshot again then.
    pub fn deadline(&self) -> Option<Instant> {
        self.guard.deadline()
    }

    /// Waits until the receivers are all gone.
    pub async fn closed(&self) {
        self.publisher.closed().await;
    }

    /// Offers `snap`: held back by the guard (see [`Guard::check`]), or published if it
    /// differs from the snapshot in force; true if it was sent.
    pub fn offer(&mut self, snap: Snapshot) -> bool {
        let stats = self.publisher.stats().clone();
        if self.published {
            let verdict = self
                .guard
                .check(&self.publisher.current(), &snap, &snap, Instant::now());
            stats.note(&verdict, self.settings.settle, self.source);
            if let Verdict::Hold { .. } = verdict {
                return false;
            }
        }
        let sent = self.publisher.publish(snap, !self.published);
        let snap = self.publisher.current();
        if sent {
            stats.loads.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                source = self.source,
                workloads = snap.workloads.len(),
                services = snap.services.len(),
                policies = snap.peer_authentications.len() + snap.authorization_policies.len(),
                "inventory updated"
            );
        }
        if !self.published {
            self.published = true;
            self.ready.send_replace(true);
            let local = self
                .settings
                .node
                .as_deref()
                .map(|n| snap.on_node(n).count());
            tracing::info!(
                source = self.source,
                workloads = snap.workloads.len(),
                local,
                services = snap.services.len(),
                "inventory synced"
            );
        }
        sent
    }
}

/// Sleeps until `at`, or forever without one.
pub async fn until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
