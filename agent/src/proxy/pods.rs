//! Pod lifecycle: enrolls and unenrolls this node's pods (listeners, kernel entries, tasks),
//! keeps why a pod failed, and answers the CNI plugin's pod state and the captured set.
//!
//! Enrollment order (see redirect/mod.rs): install the pod's delivery routing, load the pod's
//! sk_lookup program, bind listeners in the pod, register the inbound listeners, enroll in the
//! kernel, then start the accept tasks. Removal reverses it; open connections keep running until
//! they end (and keep the routing). An agent that takes the node back from a newer one that
//! left ([`Pods::reassert`]) registers and enrolls its pods again.
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::delivery_route::DeliveryRoutes;
use super::seam::PodKernel;
use super::socket::{tokio_listener, SocketFactory};
use super::{inbound, outbound, plaintext, AgentContext, PodContext, ProxyStats};
use crate::drain;
use crate::error::error_chain;
use crate::inventory::kube::annotate::CapturedPods;
use crate::inventory::{Snapshot, Workload};
use crate::redirect::maps::{AmbPod, POD_F_CAPTURE_IN, POD_F_CAPTURE_OUT};
use crate::redirect::{Datapath, PodEntry};
use crate::sys::Netns;

mod report;
pub use report::{AppliedAuthz, PodPolicy, PodStatus};

/// Every pod of this node the agent serves (enrolled) or tried to (failed).
pub struct Pods {
    agent: Arc<AgentContext>,
    datapath: Arc<Datapath>,
    routes: DeliveryRoutes,
    enrolled: Mutex<BTreeMap<String, Enrolled>>,
    failed: Mutex<BTreeMap<String, Failed>>,
    next_id: AtomicU32,
    /// The pods whose capture is in place, after each reconcile (`None` before the first).
    captured: watch::Sender<Option<Arc<CapturedPods>>>,
    /// Parent of every pod's trigger: a child of the agent's drain, which waits for their
    /// connections.
    drain: drain::Trigger,
    /// The agent's drain: a pod enrolled once it started starts closed.
    stopping: drain::Signal,
}

struct Enrolled {
    ctx: Arc<PodContext>,
    /// The pod's network namespace (its sk_lookup link, its delivery routing).
    netns: Arc<Netns>,
    entry: PodEntry,
    netns_ino: (u64, u64),
    listeners: Vec<String>,
    /// Duplicates of the inbound listeners (family, fd), to register them again when this
    /// agent takes the node back; dropped with the pod and at drain (they must not keep the
    /// listeners open).
    inbound: Vec<(u8, std::os::fd::OwnedFd)>,
    tasks: Vec<JoinHandle<()>>,
    /// Started when the pod leaves (dropped with it) or the agent drains: its tunnel
    /// connections get GOAWAY, so they do not keep the pod's namespace alive until their idle
    /// timeout. A child of the agent's trigger: the agent's drain waits for its connections.
    closing: drain::Trigger,
}

impl Drop for Enrolled {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        self.closing.start();
    }
}

/// Why a pod that should be enrolled is not.
#[derive(Debug, Clone)]
struct Failed {
    workload: Workload,
    error: String,
}

impl Pods {
    /// No pods yet; pods' drains are children of `drain` (the agent's).
    pub fn new(agent: Arc<AgentContext>, datapath: Arc<Datapath>, drain: &drain::Trigger) -> Self {
        let cfg = &agent.cfg;
        let routes = DeliveryRoutes::new(
            cfg.deliver_mark,
            cfg.deliver_table,
            cfg.proc_sys_net.clone(),
            agent.conns.metrics().routing_failures.clone(),
        );
        Self {
            agent,
            datapath,
            routes,
            enrolled: Mutex::new(BTreeMap::new()),
            failed: Mutex::new(BTreeMap::new()),
            next_id: AtomicU32::new(1),
            captured: watch::channel(None).0,
            drain: drain.child(),
            stopping: drain.signal(),
        }
    }

    /// Brings the enrolled set in line with `snap`.
    pub fn reconcile(&self, snap: &Snapshot) {
        let desired: BTreeMap<String, &Workload> = snap
            .on_node(&self.agent.cfg.node)
            .filter(|w| w.enrolled && w.netns.is_some())
            .map(|w| (w.key(), w))
            .collect();
        // Remove pods that left, changed, or whose namespace is gone or replaced.
        let mut enrolled = lock(&self.enrolled);
        let stale: Vec<String> = enrolled
            .iter()
            .filter(|(key, e)| match desired.get(*key) {
                None => true,
                Some(w) => **w != e.ctx.workload || netns_ino(w) != Some(e.netns_ino),
            })
            .map(|(k, _)| k.clone())
            .collect();
        for key in stale {
            if let Some(e) = enrolled.remove(&key) {
                if let (Some(certs), Some(id)) = (&self.agent.certs, e.ctx.identity()) {
                    certs.forget(&id);
                }
                self.agent.pool.forget_source(e.entry.netns_cookie);
                self.routes.release(e.ctx.clone(), e.netns.clone());
                let gone = desired.get(&key).is_some_and(|w| netns_ino(w).is_none());
                if let Err(err) = self.datapath.unenroll(&e.entry) {
                    tracing::error!(pod = %key, error = %err, "unenroll failed");
                }
                if gone {
                    tracing::warn!(pod = %key, "pod network namespace vanished; unenrolled");
                } else {
                    tracing::info!(pod = %key, "pod unenrolled");
                }
            }
        }
        let mut failed = lock(&self.failed);
        failed.retain(|k, _| desired.contains_key(k));
        for (key, w) in desired {
            if enrolled.contains_key(&key) {
                continue;
            }
            match self.enroll(w) {
                Ok(e) => {
                    tracing::info!(pod = %key, netns.cookie = e.entry.netns_cookie, listeners = ?e.listeners, "pod enrolled");
                    failed.remove(&key);
                    enrolled.insert(key, e);
                }
                Err(err) => {
                    let is_new = failed.get(&key).is_none_or(|f| f.error != err);
                    if is_new {
                        tracing::error!(pod = %key, error = %err, "cannot enroll pod; will retry");
                    }
                    failed.insert(
                        key,
                        Failed {
                            workload: w.clone(),
                            error: err,
                        },
                    );
                }
            }
        }
        let cookies: Vec<u64> = enrolled.values().map(|e| e.entry.netns_cookie).collect();
        self.routes.sweep(|cookie| cookies.contains(&cookie));
        // Only pods enrolled in the kernel by now: the redirection annotation follows this.
        let now: CapturedPods = enrolled
            .values()
            .map(|e| (e.ctx.workload.key(), e.ctx.workload.created))
            .collect();
        self.captured.send_if_modified(|c| {
            let changed = c.as_deref() != Some(&now);
            if changed {
                *c = Some(Arc::new(now));
            }
            changed
        });
    }

    /// The pods whose capture is in place (kernel enrollment done), published after every
    /// reconcile; `None` until the first. The redirection annotation follows it.
    pub fn captured(&self) -> watch::Receiver<Option<Arc<CapturedPods>>> {
        self.captured.subscribe()
    }

    /// Removes kernel state of pods this agent does not serve (after its first reconcile).
    pub fn remove_stale(&self) {
        let keep: Vec<u64> = lock(&self.enrolled)
            .values()
            .map(|e| e.entry.netns_cookie)
            .collect();
        match self.datapath.remove_stale(&keep) {
            Ok(removed) if !removed.is_empty() => {
                tracing::info!(netns.cookies = ?removed, "removed kernel state of pods no longer served")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot remove stale kernel state"),
        }
    }

    fn enroll(&self, w: &Workload) -> Result<Enrolled, String> {
        let path = w.netns.clone().ok_or("no network namespace path")?;
        let ino = netns_ino(w)
            .ok_or_else(|| format!("network namespace {} does not exist", path.display()))?;
        let netns = Arc::new(Netns::open(&path).map_err(|e| error_chain(&e))?);
        // Before any listener exists: nothing is delivered into a pod without it (fail closed).
        self.routes
            .install(&w.key(), &netns)
            .map_err(|e| error_chain(&e))?;
        let sockets = SocketFactory::new(
            netns.clone(),
            self.agent.cfg.outbound_mark,
            self.agent.cfg.deliver_mark,
        );
        let p = self.agent.cfg.ports;
        // The slow part first, while the pod has no listener of ours that could queue
        // connections (a restart hand-over sends them to new listeners at once).
        let lookup = self
            .datapath
            .load_lookup(&netns)
            .map_err(|e| error_chain(&e))?;
        let l = sockets
            .listeners(p.outbound, p.inbound_plaintext, p.tunnel)
            .map_err(|e| error_chain(&e))?;
        let key = w.key();
        let mut inbound = Vec::new();
        for (family, listener) in &l.inbound {
            self.datapath
                .add_listener(&key, l.netns_cookie, *family, listener)
                .map_err(|e| error_chain(&e))?;
            let dup = listener
                .try_clone()
                .map_err(|e| format!("cannot duplicate the inbound listener: {e}"))?;
            inbound.push((*family, std::os::fd::OwnedFd::from(dup)));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let closing = self.drain.child();
        if self.stopping.is_signaled() {
            closing.start();
        }
        let entry = PodEntry {
            key: key.clone(),
            netns_cookie: l.netns_cookie,
            pod: AmbPod::new(
                id,
                POD_F_CAPTURE_OUT | POD_F_CAPTURE_IN,
                &w.skip_ports,
                &w.skip_cidrs,
            ),
        };
        let kernel = PodKernel::new(sockets, self.datapath.clone(), l.netns_cookie);
        let ctx = Arc::new(PodContext {
            agent: self.agent.clone(),
            workload: w.clone(),
            netns_cookie: l.netns_cookie,
            kernel: Arc::new(kernel),
            baggage: super::baggage_of(&self.agent.cfg.cluster_id, w).value(),
            drain: closing.signal(),
            stats: ProxyStats::default(),
        });
        let mut names = Vec::new();
        let mut tasks = Vec::new();
        // A pod's listeners live on one shard (their connections go round all of them).
        let shard = self.agent.shards.pick().clone();
        let _rt = shard.enter();
        let mut add = |l: std::net::TcpListener| -> Result<tokio::net::TcpListener, String> {
            names.push(l.local_addr().map(|a| a.to_string()).unwrap_or_default());
            tokio_listener(l).map_err(|e| format!("cannot register listener with the runtime: {e}"))
        };
        let outbound_ls = l
            .outbound
            .into_iter()
            .map(&mut add)
            .collect::<Result<Vec<_>, _>>()?;
        let plaintext_ls = l
            .inbound
            .into_iter()
            .map(|(_, s)| add(s))
            .collect::<Result<Vec<_>, _>>()?;
        let tunnel_ls = l
            .tunnel
            .into_iter()
            .map(&mut add)
            .collect::<Result<Vec<_>, _>>()?;
        // Kernel enrollment last before serving: the listeners exist and are registered.
        if let Err(e) = self.datapath.enroll(&entry, &netns, lookup) {
            let _ = self.datapath.unenroll(&entry);
            return Err(error_chain(&e));
        }
        // Before the first accept: connections that queued on the listeners meanwhile (a
        // restart hand-over sends them at once) wait for the certificate instead of finding no
        // identity to present.
        if let (Some(certs), Some(id)) = (&self.agent.certs, ctx.identity()) {
            certs.track(&id);
        }
        for listener in outbound_ls {
            tasks.push(shard.spawn(outbound::run(listener, ctx.clone())));
        }
        for listener in plaintext_ls {
            tasks.push(shard.spawn(plaintext::run(listener, ctx.clone())));
        }
        for listener in tunnel_ls {
            tasks.push(shard.spawn(inbound::run(listener, ctx.clone())));
        }
        Ok(Enrolled {
            ctx,
            netns,
            entry,
            netns_ino: ino,
            listeners: names,
            inbound,
            tasks,
            closing,
        })
    }

    /// Whether pod `key` (`namespace/name`) is enrolled (`Ok`), failed (`Err` with why), or
    /// not handled yet (`None`): the CNI plugin's ADD waits on this.
    pub fn pod_state(&self, key: &str) -> Option<Result<(), String>> {
        if lock(&self.enrolled).contains_key(key) {
            return Some(Ok(()));
        }
        lock(&self.failed).get(key).map(|f| Err(f.error.clone()))
    }

    /// Registers and enrolls every pod again, then removes kernel state of pods this agent
    /// does not serve: for an agent that takes the node back from a newer one that left (its
    /// listeners' SOCKHASH entries vanished with them, its sk_lookup pins replaced ours).
    /// Returns how many pods were re-asserted and the errors by pod.
    pub fn reassert(&self) -> (usize, Vec<String>) {
        let mut errors = Vec::new();
        let mut done = 0;
        for (key, e) in lock(&self.enrolled).iter() {
            let cookie = e.entry.netns_cookie;
            let r = e
                .inbound
                .iter()
                .try_for_each(|(family, fd)| self.datapath.add_listener(key, cookie, *family, fd))
                .and_then(|()| {
                    // A new copy of the pod's sk_lookup program: the one it was enrolled with
                    // went into the link this agent let go of when it stopped being current.
                    let lookup = self.datapath.load_lookup(&e.netns)?;
                    self.datapath.enroll(&e.entry, &e.netns, lookup)
                });
            match r {
                Ok(()) => done += 1,
                Err(err) => errors.push(format!("{key}: {}", error_chain(&err))),
            }
        }
        self.remove_stale();
        (done, errors)
    }

    /// Stops every pod's listeners and starts its drain (tunnel peers get GOAWAY); returns the
    /// pods stopped. The pods stay enrolled: their kernel state stays for the next agent.
    pub fn close_all(&self) -> Vec<String> {
        lock(&self.enrolled)
            .values_mut()
            .map(|e| {
                for t in e.tasks.drain(..) {
                    t.abort();
                }
                e.inbound.clear();
                e.closing.start();
                e.ctx.workload.key()
            })
            .collect()
    }

    /// The enrolled pods' identities that have no certificate yet (when a CA is configured).
    pub fn waiting_for_certificates(&self) -> Vec<String> {
        let Some(certs) = &self.agent.certs else {
            return Vec::new();
        };
        lock(&self.enrolled)
            .values()
            .filter_map(|e| e.ctx.identity())
            .filter(|id| certs.get(id).is_none())
            .map(|id| format!("certificate for {id}"))
            .collect()
    }
}

fn netns_ino(w: &Workload) -> Option<(u64, u64)> {
    let md = std::fs::metadata(w.netns.as_ref()?).ok()?;
    Some((md.dev(), md.ino()))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
