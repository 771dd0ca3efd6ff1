//! The pod manager: follows inventory snapshots (pods enrolled and unenrolled by [`Pods`],
//! connections re-authorized, idle tunnels reaped), reports readiness, and drains the agent.
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::conns::{ConnRow, ConnTable};
use super::explain;
use super::pods::Pods;
use super::route::RoundRobin;
use super::shards::Shards;
use super::AgentContext;
use crate::config::Config;
use crate::drain;
use crate::identity::manager::{CertManager, CertStatus};
use crate::identity::source::TlsSource;
use crate::inventory::Snapshot;
use crate::metrics::ProxyMetrics;
use crate::redirect::Datapath;
use crate::tunnel::pool::{default_spread, Pool, DEFAULT_IDLE, DEFAULT_MAX_STREAMS};

/// How often the manager re-checks pods' namespaces even without inventory changes.
const RECHECK: Duration = Duration::from_secs(2);

/// Keeps this node's pods in line with the inventory and drains the agent.
pub struct Manager {
    /// What every pod's connections share (built once).
    agent: Arc<AgentContext>,
    datapath: Arc<Datapath>,
    /// The pods' lifecycle.
    pods: Pods,
    synced: std::sync::atomic::AtomicBool,
    /// The agent's drain: started when the agent stops ([`Manager::begin_drain`]); every
    /// pod's trigger is its child.
    drain: drain::Trigger,
}

impl Manager {
    /// A manager that serves pods' connections on `shards`.
    pub fn new(
        cfg: Arc<Config>,
        datapath: Arc<Datapath>,
        shards: Arc<Shards>,
        inventory: watch::Receiver<Arc<Snapshot>>,
        tls: Option<Arc<TlsSource>>,
        certs: Option<Arc<CertManager>>,
    ) -> Self {
        let limits = cfg.limits;
        let metrics = Arc::new(ProxyMetrics::default());
        let agent = Arc::new(AgentContext {
            ports: cfg.ports,
            cfg,
            inventory,
            conns: Arc::new(ConnTable::new(metrics.clone())),
            tls,
            // Each shard keys its own connections: a key spreads over the CPUs left per shard.
            pool: Arc::new(
                Pool::new(DEFAULT_MAX_STREAMS, DEFAULT_IDLE)
                    .with_spread(default_spread() / shards.count()),
            ),
            lb: Arc::new(RoundRobin::default()),
            gate: Arc::new(super::inbound::Gate::new(
                &limits,
                metrics.rejections.clone(),
            )),
            certs,
            shards,
        });
        let drain = drain::Trigger::new();
        Self {
            pods: Pods::new(agent.clone(), datapath.clone(), &drain),
            agent,
            datapath,
            synced: std::sync::atomic::AtomicBool::new(false),
            drain,
        }
    }

    /// Follows inventory snapshots until the sender goes away.
    pub async fn run(self: Arc<Self>, mut rx: watch::Receiver<Arc<Snapshot>>) {
        let mut first = true;
        let mut draining = self.drain.signal();
        let mut last: Option<Arc<Snapshot>> = None;
        loop {
            // A draining agent hands the pods to its successor: it must not touch kernel state
            // or listeners any more.
            if draining.is_signaled() {
                return;
            }
            let snap = rx.borrow_and_update().clone();
            let node = &self.agent.cfg.node;
            let reauthorize = last
                .as_ref()
                .is_none_or(|l| authorization_inputs_changed(l, &snap, node));
            last = Some(snap.clone());
            let this = self.clone();
            let reconciled = tokio::task::spawn_blocking(move || {
                this.pods.reconcile(&snap);
                this.datapath.sweep_agent_cgroups();
                if reauthorize {
                    this.reauthorize(&snap);
                }
                this.refresh_trust();
                if first {
                    this.pods.remove_stale();
                }
            })
            .await;
            if let Err(e) = reconciled {
                tracing::error!(error = %e, "pod reconcile task failed");
            }
            first = false;
            self.synced.store(true, Ordering::Relaxed);
            tokio::select! {
                changed = rx.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(RECHECK) => {}
                () = draining.signaled() => {}
            }
        }
    }

    /// Drops idle tunnel connections (trust follows the CA by itself: `identity::trust`).
    fn refresh_trust(&self) {
        self.agent.pool.reap();
    }

    /// Certificate status of the local identities (empty without a CA).
    pub fn certs(&self) -> Vec<CertStatus> {
        self.agent
            .certs
            .as_ref()
            .map(|c| c.snapshot())
            .unwrap_or_default()
    }

    /// Closes open inbound connections that the current AuthorizationPolicies no longer allow.
    fn reauthorize(&self, snap: &Snapshot) {
        let mesh = self.agent.cfg.authz_mesh();
        let closed = self.agent.conns.reevaluate(|info, attrs| {
            let Some(w) = snap.workloads.get(&info.pod) else {
                return true;
            };
            snap.authz()
                .evaluate(&mesh, &w.namespace, &w.labels, attrs)
                .allowed()
        });
        if closed > 0 {
            tracing::info!(
                connections = closed,
                "closing connections no longer allowed after a policy update"
            );
        }
    }

    /// Explains a connection from pod `from` (`namespace/name`) to `to`.
    pub fn explain(
        &self,
        from: &str,
        to: std::net::SocketAddr,
    ) -> Result<explain::Explanation, explain::Error> {
        let snap = self.agent.inventory.borrow().clone();
        let c = &self.agent.cfg;
        explain::explain(
            &snap,
            &c.authz_mesh(),
            c.ports.tunnel,
            self.agent.tls.is_some(),
            from,
            to,
        )
    }

    /// The proxy's metric families.
    pub fn metrics(&self) -> Arc<ProxyMetrics> {
        self.agent.conns.metrics_arc()
    }

    /// Whether the agent is ready: first inventory reconcile done and every enrolled pod's
    /// identity has a certificate (when a CA is configured). Otherwise, what it waits for.
    pub fn readiness(&self) -> (bool, Vec<String>) {
        let mut waiting = Vec::new();
        if !self.synced.load(Ordering::Relaxed) {
            waiting.push("first inventory reconcile".to_string());
        }
        if self.drain.is_started() {
            waiting.push("agent is draining".to_string());
        }
        waiting.extend(self.pods.waiting_for_certificates());
        waiting.dedup();
        (waiting.is_empty(), waiting)
    }

    /// The pods' lifecycle: enrollment state, the captured set, status and policies.
    pub fn pods(&self) -> &Pods {
        &self.pods
    }

    /// Whether the first reconcile is done (every pod of the first snapshot enrolled or failed).
    pub fn reconciled(&self) -> bool {
        self.synced.load(Ordering::Relaxed)
    }

    /// An observer of the agent's drain: it starts when the agent stops (a stop signal or
    /// `POST /drain`, [`Manager::begin_drain`]).
    pub fn draining(&self) -> drain::Signal {
        self.drain.signal()
    }

    /// Starts stopping: the agent reports not ready and stops reconciling (its listeners stay
    /// open until [`Manager::drain`]; in between it hands the node back, if it must).
    pub fn begin_drain(&self) {
        self.drain.start();
    }

    /// Drains: stop accepting (listeners close; queued connections migrate to a new agent's
    /// SO_REUSEPORT listener), tell tunnel peers GOAWAY, then wait up to `deadline` for open
    /// connections to finish (each holds a [`drain::Watch`] from accept to close). Kernel
    /// state stays pinned for the next agent.
    pub async fn drain(&self, deadline: std::time::Duration) {
        self.drain.start();
        let stopped = self.pods.close_all();
        tracing::info!(
            pods = stopped.len(),
            deadline_ms = deadline.as_millis() as u64,
            "drain started: listeners closed"
        );
        match self.drain.drain(deadline).await {
            drain::Drained::Complete => tracing::info!("drain complete: no open connections"),
            drain::Drained::DeadlineReached { open } => tracing::warn!(
                connections = open,
                "drain deadline reached; cutting open connections"
            ),
        }
    }

    /// Every open proxied connection.
    pub fn connections(&self) -> Vec<ConnRow> {
        self.agent.conns.rows()
    }
}

/// Whether what the re-authorization of open connections reads changed between two snapshots:
/// the AuthorizationPolicies, or a workload of this node (its namespace and labels). Under a
/// churn of other nodes' pods nothing here changes, and open connections are not re-evaluated.
fn authorization_inputs_changed(old: &Snapshot, new: &Snapshot, node: &str) -> bool {
    let policies = !Arc::ptr_eq(&old.authorization_policies, &new.authorization_policies)
        && old.authorization_policies != new.authorization_policies;
    policies || !old.on_node(node).eq(new.on_node(node))
}

#[cfg(test)]
mod tests;
