//! Kubernetes inventory source: kube-rs reflectors over pods, namespaces, services, slices and Istio policies.
//!
//! One reflector per kind keeps a store of the cluster's objects (re-listing after a lost watch,
//! with backoff on API errors). The [`Snapshot`] is rebuilt from all stores, debounced, whenever
//! a store or the CNI pod map changes, and every `resync` interval. Nothing is published, and
//! `ready` stays false, until every kind has finished its first list; an Istio kind whose CRD the
//! cluster does not serve counts as listed and empty (and is watched again with backoff).
//! [`Options::all_nodes`] is the CA's mode: pods and namespaces only, every node's.
//!
//! A rebuild that would drop every pod, or unenroll more than a share of this node's pods (a
//! relist the API server answered with nothing), is held by the [`Guard`] until the same
//! snapshot is built again after the settle time. Nodes (their pod ranges) are optional: a
//! cluster role without them only loses the routing-node rule of the address index.
pub mod annotate;
mod convert;

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::hash::Hash;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::reflector::{self, store::Writer, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::{watch, Notify};

pub use convert::{Builder, Objects};

use super::guard::GuardSettings;
use super::publish::{until, GuardedPublisher, ReloadStats};
use super::Snapshot;
use crate::cni::pods::CniPod;
use crate::error::error_chain;

/// The Istio kinds ambit reads: (group, version, kind, plural).
pub const ISTIO_KINDS: [(&str, &str, &str, &str); 3] = [
    (
        "security.istio.io",
        "v1",
        "PeerAuthentication",
        "peerauthentications",
    ),
    (
        "security.istio.io",
        "v1",
        "AuthorizationPolicy",
        "authorizationpolicies",
    ),
    (
        "networking.istio.io",
        "v1",
        "DestinationRule",
        "destinationrules",
    ),
];

/// Errors building a Kubernetes client.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The given kubeconfig could not be used.
    #[error("cannot load kubeconfig {}", path.display())]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// Neither `$KUBECONFIG`/`~/.kube/config` nor the in-cluster service account worked.
    #[error("no Kubernetes configuration found (kubeconfig or in-cluster service account)")]
    Infer(#[source] kube::config::InferConfigError),
    /// The client could not be built from the configuration.
    #[error("cannot create a Kubernetes client")]
    Client(#[source] kube::Error),
}

/// Settings of the Kubernetes source.
#[derive(Debug, Clone)]
pub struct Options {
    /// This node's name (`spec.nodeName` of the pods whose netns the CNI plugin reports).
    pub node: String,
    /// How long to wait after a change for more changes before rebuilding.
    pub debounce: Duration,
    /// Rebuild at least this often even without changes.
    pub resync: Duration,
    /// Watch only pods and namespaces (who runs where, as whom), for every node: the CA's
    /// view. Services, slices and Istio policies stay empty in the snapshot.
    pub workloads_only: bool,
    /// When a rebuild is held back (this node's pods count; every node's for the CA).
    pub guard: GuardSettings,
    /// Loads, held rebuilds and address conflicts, shared with `/status` and metrics.
    pub reloads: Arc<ReloadStats>,
}

impl Options {
    /// Defaults for `node`: 100 ms debounce, 60 s resync.
    pub fn new(node: impl Into<String>) -> Self {
        let node = node.into();
        Self {
            guard: GuardSettings::new(Some(node.clone())),
            node,
            debounce: Duration::from_millis(100),
            resync: Duration::from_secs(60),
            workloads_only: false,
            reloads: Arc::default(),
        }
    }

    /// The CA's view: pods and namespaces of every node (see [`Options::workloads_only`]).
    pub fn all_nodes() -> Self {
        Self {
            workloads_only: true,
            guard: GuardSettings::new(None),
            ..Self::new("")
        }
    }
}

/// Counters of the Kubernetes source, for status and metrics.
#[derive(Debug, Default)]
pub struct Stats {
    /// Snapshots published.
    pub publishes: AtomicU64,
    /// Errors from the API server (each retried with backoff).
    pub watch_errors: AtomicU64,
    /// Objects currently rejected (their last good version, if any, stays in force).
    pub rejected: AtomicU64,
}

/// A client from `kubeconfig`, or else from `$KUBECONFIG`, `~/.kube/config` or the in-cluster
/// service account.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, Error> {
    let config = match kubeconfig {
        Some(path) => {
            let err = |source| Error::Kubeconfig {
                path: path.to_path_buf(),
                source,
            };
            let kc = kube::config::Kubeconfig::read_from(path).map_err(err)?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(err)?
        }
        None => kube::Config::infer().await.map_err(Error::Infer)?,
    };
    Client::try_from(config).map_err(Error::Client)
}

/// Watches the cluster and publishes snapshots to `tx` until `tx` has no receivers left.
/// `ready` turns true with the first snapshot, after every kind's first full list.
pub async fn watch(
    client: Client,
    opts: Options,
    mut cni: watch::Receiver<Arc<Vec<CniPod>>>,
    tx: watch::Sender<Arc<Snapshot>>,
    ready: watch::Sender<bool>,
    stats: Arc<Stats>,
) {
    let changed = Arc::new(Notify::new());
    let synced = Arc::new(Mutex::new(BTreeSet::new()));
    let ctx = |kind: &'static str, optional: bool| Ctx {
        kind,
        optional,
        forbidden_is_absent: false,
        changed: changed.clone(),
        synced: synced.clone(),
        stats: stats.clone(),
    };
    let mut tasks = Vec::new();
    let pods = spawn_typed::<Pod>(&client, ctx("Pod", false), slim_pod, &mut tasks);
    let namespaces = spawn_typed::<Namespace>(&client, ctx("Namespace", false), slim, &mut tasks);
    let (services, slices, [peer_auth, authz, dest_rules], nodes, kinds) = if opts.workloads_only {
        let empty = ISTIO_KINDS.map(|(group, version, kind, plural)| {
            let gvk = GroupVersionKind::gvk(group, version, kind);
            Writer::new(ApiResource::from_gvk_with_plural(&gvk, plural)).as_reader()
        });
        let (services, slices, nodes) = (
            reflector::store().0,
            reflector::store().0,
            reflector::store().0,
        );
        (services, slices, empty, nodes, 2)
    } else {
        let services = spawn_typed::<Service>(&client, ctx("Service", false), slim, &mut tasks);
        let slices =
            spawn_typed::<EndpointSlice>(&client, ctx("EndpointSlice", false), slim, &mut tasks);
        let istio = ISTIO_KINDS.map(|(group, version, kind, plural)| {
            let ar = ApiResource::from_gvk_with_plural(
                &GroupVersionKind::gvk(group, version, kind),
                plural,
            );
            let api = Api::<DynamicObject>::all_with(client.clone(), &ar);
            let writer = Writer::new(ar);
            let store = writer.as_reader();
            tasks.push(tokio::spawn(reflect(api, writer, ctx(kind, true), slim)));
            store
        });
        // Optional: without them (or without the right to list them) only the routing-node
        // rule of the address index is lost, and a lost rule leaves an address undecided.
        let node_ctx = Ctx {
            forbidden_is_absent: true,
            ..ctx("Node", true)
        };
        let nodes = spawn_typed::<Node>(&client, node_ctx, slim_node, &mut tasks);
        (services, slices, istio, nodes, 5 + ISTIO_KINDS.len())
    };
    let mut builder = if opts.workloads_only {
        Builder::all_nodes()
    } else {
        Builder::new(opts.node.clone())
    };
    let mut publisher = GuardedPublisher::new(
        tx,
        opts.reloads.clone(),
        opts.guard.clone(),
        ready,
        "kubernetes",
    );
    loop {
        let due = publisher.deadline();
        tokio::select! {
            _ = changed.notified() => {}
            r = cni.changed() => if r.is_err() { break },
            _ = tokio::time::sleep(opts.resync) => {}
            () = until(due) => {}
            () = publisher.closed() => break,
        }
        tokio::time::sleep(opts.debounce).await;
        if synced.lock().unwrap_or_else(PoisonError::into_inner).len() < kinds {
            continue;
        }
        let cni_pods = cni.borrow_and_update().clone();
        let objects = Objects {
            pods: &pods.state(),
            namespaces: &namespaces.state(),
            services: &services.state(),
            endpoint_slices: &slices.state(),
            peer_authentications: &peer_auth.state(),
            authorization_policies: &authz.state(),
            destination_rules: &dest_rules.state(),
            nodes: &nodes.state(),
            cni_pods: &cni_pods,
        };
        let snap = builder.build(&objects);
        stats
            .rejected
            .store(builder.problems().len() as u64, Ordering::Relaxed);
        if publisher.offer(snap) {
            stats.publishes.fetch_add(1, Ordering::Relaxed);
        }
    }
    for t in tasks {
        t.abort();
    }
}

/// What a reflector task reports to the rebuild loop.
struct Ctx {
    kind: &'static str,
    optional: bool,
    /// 403 (the cluster role does not grant the kind) counts as absent too.
    forbidden_is_absent: bool,
    changed: Arc<Notify>,
    synced: Arc<Mutex<BTreeSet<&'static str>>>,
    stats: Arc<Stats>,
}

impl Ctx {
    fn mark_synced(&self) {
        let fresh = self
            .synced
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(self.kind);
        if fresh {
            tracing::debug!(kind = self.kind, "first list complete");
        }
        self.changed.notify_one();
    }
}

fn spawn_typed<K>(
    client: &Client,
    ctx: Ctx,
    slim: fn(&mut K),
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) -> Store<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Default + Send + Sync,
{
    let (store, writer) = reflector::store();
    tasks.push(tokio::spawn(reflect(
        Api::<K>::all(client.clone()),
        writer,
        ctx,
        slim,
    )));
    store
}

/// Runs one reflector until aborted: fills `writer`, tells the rebuild loop about changes.
async fn reflect<K>(api: Api<K>, writer: Writer<K>, ctx: Ctx, slim: fn(&mut K))
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Send + Sync,
{
    let stream = watcher(api, watcher::Config::default())
        .modify(slim)
        .default_backoff()
        .reflect(writer);
    let mut stream = std::pin::pin!(stream);
    let mut absent = false;
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::InitDone) => {
                if absent {
                    tracing::info!(kind = ctx.kind, "kind is now served by the API server");
                    absent = false;
                }
                ctx.mark_synced();
            }
            Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
            Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => ctx.changed.notify_one(),
            Err(e) => {
                ctx.stats.watch_errors.fetch_add(1, Ordering::Relaxed);
                if ctx.optional && (is_not_found(&e) || ctx.forbidden_is_absent && is_forbidden(&e))
                {
                    if !absent {
                        tracing::info!(kind = ctx.kind, "kind not served to the agent (CRD not installed, or not granted); treating it as empty");
                        absent = true;
                    }
                    ctx.mark_synced();
                } else {
                    tracing::warn!(kind = ctx.kind, error = %error_chain(&e), "Kubernetes watch failed; retrying with backoff");
                }
            }
        }
    }
}

fn is_not_found(e: &watcher::Error) -> bool {
    api_code(e) == Some(404)
}

fn is_forbidden(e: &watcher::Error) -> bool {
    api_code(e) == Some(403)
}

fn api_code(e: &watcher::Error) -> Option<u16> {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s)) => Some(s.code),
        watcher::Error::WatchError(s) => Some(s.code),
        _ => None,
    }
}

/// Drops what ambit never reads, so the stores stay small in large clusters.
fn slim<K: ResourceExt>(obj: &mut K) {
    obj.managed_fields_mut().clear();
    obj.annotations_mut()
        .remove("kubectl.kubernetes.io/last-applied-configuration");
}

fn slim_node(node: &mut Node) {
    slim(node);
    // Only `spec.podCIDRs` is read; the status (images, conditions) is most of a Node.
    node.status = None;
}

fn slim_pod(pod: &mut Pod) {
    slim(pod);
    if let Some(spec) = pod.spec.as_mut() {
        spec.containers.clear();
        spec.init_containers = None;
        spec.ephemeral_containers = None;
        spec.volumes = None;
        spec.affinity = None;
        spec.tolerations = None;
    }
    if let Some(status) = pod.status.as_mut() {
        status.conditions = None;
        status.container_statuses = None;
        status.init_container_statuses = None;
        status.ephemeral_container_statuses = None;
    }
}

#[cfg(any(test, feature = "fake-api"))]
pub mod fake_api;
#[cfg(test)]
mod tests;
