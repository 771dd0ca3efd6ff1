//! Wires the agent together; owns startup and shutdown order.
//!
//! Startup: block the handled signals (before any thread exists; [`signals`]) → config →
//! logging → signal thread (a stop signal now exits at once) → join the agent cgroup (before
//! any socket exists) → bind `metricsListen` (an agent that cannot start fails before it
//! touches the node) → claim the node in the pin directory's hand-over (the agent that was
//! current stops writing shared kernel state), load and attach the kernel programs →
//! data-plane shards → inventory watch → mesh destinations in the kernel (before every
//! snapshot goes on) → pod manager → admin socket → hand-over watch → serving.
//!
//! Serving: SIGHUP re-reads the config file and logs what differs from the running config
//! (nothing is applied: every setting takes a restart; the inventory and certificates follow
//! their sources anyway, the log filter is `ambit logging`); SIGUSR1 logs a state summary;
//! other signals are logged and ignored. Every 250 ms the hand-over directory is checked
//! ([`handover::follow`]): a newer agent on the node supersedes this one (its listeners and
//! open connections go on, the kernel state and the admin socket are the newer one's); when the
//! newer ones are gone (stopped or dead) this one takes the node back: mesh list, cgroup links,
//! its pods' listeners and sk_lookup links, stale state, the admin and CNI sockets.
//!
//! Shutdown (SIGTERM, SIGINT, SIGQUIT, or `POST /drain`; a second stop signal exits at once):
//! leave the hand-over and, if this agent was current and an older one still runs, wait (at
//! most 5 s) until it has taken the node back; then drain (listeners close, GOAWAY, open
//! connections up to `drainDeadlineMs`), remove the admin socket if it is still ours, and
//! exit, leaving the pinned programs and maps in place, so enrolled pods fail closed until
//! the next agent takes over.
mod handover;
mod mesh;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::{mpsc, watch};

use crate::admin::logging::{self, LogControl};
use crate::admin::metrics;
use crate::admin::server::{self, AdminState};
use crate::cli::RunArgs;
use crate::cni;
use crate::config::{Config, InventorySource};
use crate::identity::manager::{CertManager, ManagerSettings};
use crate::identity::source::TlsSource;
use crate::identity::trust::{self, RootFile};
use crate::identity::CaClient;
use crate::identity::{SpiffeId, TrustBundle, TrustDomain};
use crate::inventory::file::{self, ReloadStats};
use crate::inventory::guard::GuardSettings;
use crate::inventory::istiod;
use crate::inventory::kube as kube_source;
use crate::inventory::kube::annotate;
use crate::inventory::Snapshot;
use crate::proxy::manager::Manager;
use crate::proxy::shards::{self, Shards};
use crate::redirect::{events, Datapath};
use crate::signals::{self, Event, Signals};
use crate::{cgroups, sys};

/// `ambit run`.
pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let blocked = signals::block().context("cannot block signals")?;
    let cfg = Config::load(&args.config)?;
    let log = logging::init(cfg.log_format);
    let signals = blocked
        .start("agent")
        .context("cannot start the signal thread")?;
    let cg_root = match &cfg.cgroup_root {
        Some(root) => root.clone(),
        None => sys::cgroup2_mount()?,
    };
    let pods_cgroup = cgroups::pods_root(&cg_root, cfg.pods_cgroup.as_deref())?;
    let agent_cgroup = match &cfg.agent_cgroup {
        Some(dir) => {
            let dir = under(&cg_root, dir);
            // A socket's cgroup is fixed when it is created: join ours before opening any.
            sys::join_cgroup(&dir)?;
            dir
        }
        None => cgroups::own_cgroup(&cg_root, &pods_cgroup)?,
    };
    // Before the node is claimed: an agent that cannot start must not disturb the one serving.
    let metrics = match cfg.metrics_listen {
        Some(addr) => Some(
            std::net::TcpListener::bind(addr)
                .with_context(|| format!("cannot bind metricsListen {addr}"))?,
        ),
        None => None,
    };
    let (datapath, ring) = Datapath::load(&cfg, &cg_root, &pods_cgroup, &agent_cgroup)?;
    let datapath = Arc::new(datapath);
    tracing::info!(
        node = %cfg.node,
        pods.cgroup = %pods_cgroup.display(),
        agent.cgroup = %agent_cgroup.display(),
        pin.dir = %cfg.bpf_pin_dir.display(),
        admin.socket = %cfg.admin_socket.display(),
        "kernel programs attached"
    );
    let cfg = Arc::new(cfg);
    let data_plane = Arc::new(
        Shards::start(shards::default_count()).context("cannot start the data-plane threads")?,
    );
    let admin_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let early = Early {
        config_path: args.config.clone(),
        log,
        signals,
        metrics,
    };
    let result = admin_rt.block_on(serve(
        cfg.clone(),
        datapath,
        ring,
        data_plane.clone(),
        early,
    ));
    data_plane.shutdown(Duration::from_secs(1));
    tracing::info!("agent stopped; kernel programs stay attached (pods fail closed)");
    result
}

/// What `run` sets up before the kernel programs.
struct Early {
    /// The config file, read again on SIGHUP.
    config_path: PathBuf,
    log: LogControl,
    signals: Signals,
    /// `metricsListen`, bound.
    metrics: Option<std::net::TcpListener>,
}

async fn serve(
    cfg: Arc<Config>,
    datapath: Arc<Datapath>,
    ring: aya::maps::RingBuf<aya::maps::MapData>,
    data_plane: Arc<Shards>,
    early: Early,
) -> anyhow::Result<()> {
    let Early {
        config_path,
        log,
        mut signals,
        metrics: metrics_listener,
    } = early;
    tokio::spawn(events::drain(ring));
    let (raw_tx, mut raw_rx) = watch::channel(Arc::new(Snapshot::default()));
    let reloads = Arc::new(ReloadStats::default());
    let xds = match &cfg.inventory {
        InventorySource::Istiod(i) => Some(istiod::status::StatusHandle::new(
            i.address
                .as_deref()
                .or(cfg.ca.as_ref().map(|c| c.address.as_str()))
                .unwrap_or_default(),
            istiod::status::XdsMetrics::default(),
        )),
        _ => None,
    };
    let (pod_map, kube_client) =
        start_inventory(&cfg, raw_tx, reloads.clone(), xds.as_ref()).await?;
    // The kernel's mesh destinations follow each snapshot before anything else sees it.
    let (first, report) = mesh::sync_current(&datapath, &mut raw_rx, None).await;
    let (tx, rx) = watch::channel(first.clone());
    tokio::spawn(mesh::follow(datapath.clone(), raw_rx, tx, first, report));
    let trust_reloads = trust::Reloads::default();
    let (tls, certs) = match identities(&cfg, trust_reloads.clone())? {
        Some((tls, certs)) => (Some(tls), Some(certs)),
        None => {
            tracing::warn!(
                "no ca configured: capture only, enrolled pods talk plaintext (no mTLS)"
            );
            (None, None)
        }
    };
    let manager = Arc::new(Manager::new(
        cfg.clone(),
        datapath.clone(),
        data_plane,
        rx.clone(),
        tls,
        certs.clone(),
    ));
    let mut cni_handler = None;
    if let (Some(cni), Some(pod_map)) = (&cfg.cni, pod_map) {
        let m = manager.clone();
        let confirm: cni::handler::Confirm = Arc::new(move |key: &str| m.pods().pod_state(key));
        let listener = cni::server::bind(&cni.socket)
            .with_context(|| format!("cannot bind the cni socket {}", cni.socket.display()))?;
        let handler = cni::handler::handler(
            pod_map,
            crate::inventory::sandboxes::pod_views(rx.clone()),
            Some(confirm),
            Duration::from_millis(cni.wait_ms),
        );
        cni_handler = Some(handler.clone());
        tokio::spawn(cni::server::serve(listener, handler));
        tracing::info!(cni.socket = %cni.socket.display(), "cni socket bound");
    }
    let rx_admin = rx.clone();
    let rx_owned = rx.clone();
    let annotation_patches = annotate::PatchCounter::default();
    match kube_client {
        Some(client) if cfg.redirection_annotation => {
            tokio::spawn(annotate::run(
                client,
                annotate::Settings::new(cfg.node.clone()),
                manager.pods().captured(),
                manager.draining(),
                annotation_patches.clone(),
            ));
        }
        Some(_) => tracing::info!("redirectionAnnotation is off: pods are not annotated"),
        None => {}
    }
    tokio::spawn(manager.clone().run(rx));
    let listener = server::bind(&cfg.admin_socket)?;
    let admin_refusals = server::Refusals::default();
    let mut registry = metrics::registry(
        manager.metrics(),
        datapath.clone(),
        certs,
        reloads.clone(),
        annotation_patches,
        trust_reloads,
        &admin_refusals,
    );
    if let Some(x) = &xds {
        x.metrics().register(&mut registry);
    }
    let state = Arc::new(AdminState {
        cfg: cfg.clone(),
        reloads,
        agent: manager.clone(),
        datapath,
        started: Instant::now(),
        bad_requests: AtomicU64::new(0),
        refusals: admin_refusals,
        registry,
        log,
        inventory_rx: rx_admin,
        xds,
    });
    let admin_ino = Arc::new(AtomicU64::new(handover::inode(&cfg.admin_socket)));
    let (admin_tx, admin_rx) = mpsc::unbounded_channel();
    // Its own thread and runtime: data-plane floods cannot delay `/status`.
    server::spawn_thread(listener, metrics_listener, state.clone(), admin_rx)
        .context("cannot start the admin thread")?;
    let owned = Arc::new(handover::Owned {
        cfg: cfg.clone(),
        datapath: state.datapath.clone(),
        manager: manager.clone(),
        inventory: rx_owned,
        admin_tx,
        admin_ino: admin_ino.clone(),
        cni: cni_handler,
    });
    tokio::spawn(handover::follow(owned, manager.draining()));
    signals.serving();
    tracing::info!(admin.socket = %cfg.admin_socket.display(), "agent serving");
    let mut stopping = manager.draining();
    loop {
        tokio::select! {
            ev = signals.recv() => match ev {
                Event::Stop(_) => break,
                Event::Reload => reload_check(&cfg, &config_path),
                Event::Dump => dump_state(&state),
            },
            () = stopping.signaled() => {
                signals.stopping();
                tracing::info!("drain requested on the admin socket");
                break;
            }
        }
    }
    manager.begin_drain();
    handover::hand_back(state.datapath.clone()).await;
    manager
        .drain(Duration::from_millis(cfg.drain_deadline_ms))
        .await;
    // A newer agent may have bound the same path since: remove only our own socket.
    let ours = admin_ino.load(Ordering::Relaxed);
    if ours != 0 && handover::inode(&cfg.admin_socket) == ours {
        let _ = std::fs::remove_file(&cfg.admin_socket);
    }
    Ok(())
}

/// SIGHUP: reads the config file again and logs what differs from the running config. Nothing
/// is applied: every setting takes a (zero-downtime) restart.
fn reload_check(running: &Config, path: &Path) {
    let read = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(signal = "SIGHUP", config = %path.display(), error = %crate::error::error_chain(&e), "SIGHUP: cannot use the config file; the running configuration stays");
            return;
        }
    };
    let (a, b) = (serde_json::to_value(running), serde_json::to_value(&read));
    let changed = match (a, b) {
        (Ok(a), Ok(b)) => signals::changed_keys(&a, &b),
        _ => vec!["(cannot compare)".to_string()],
    };
    if changed.is_empty() {
        tracing::info!(signal = "SIGHUP", config = %path.display(), "SIGHUP: configuration unchanged");
    } else {
        tracing::warn!(signal = "SIGHUP", config = %path.display(), changed = ?changed, "SIGHUP: the config file differs from the running configuration in {}; nothing is applied: a restart takes the new settings", changed.join(", "));
    }
}

/// SIGUSR1: one log line with the state in numbers.
fn dump_state(state: &AdminState) {
    let pods = state.agent.pods();
    let enrolled = pods.iter().filter(|p| p.state == "enrolled").count();
    let agent = state.datapath.handover().summary();
    let mesh = state.datapath.mesh_summary();
    tracing::info!(
        signal = "SIGUSR1",
        pods.enrolled = enrolled,
        pods.failed = pods.len() - enrolled,
        connections = state.agent.connections().len(),
        certificates = state.agent.certs().len(),
        ready = state.agent.readiness().0,
        generation = agent.generation,
        current = agent.current,
        mesh.destinations = mesh.destinations,
        mesh.capture_everything = mesh.capture_everything,
        uptime_s = state.started.elapsed().as_secs(),
        "SIGUSR1: state summary"
    );
}

/// Starts the configured inventory source publishing to `tx`; returns the CNI pod map when
/// there is a `cni:` section (required in Kubernetes mode). Either source merges the plugin's
/// reports: Kubernetes pods take their netns only from them, file pods without a netns
/// annotation too. A file inventory must load once before the agent serves anything; the
/// Kubernetes source holds off until every kind has listed once, and its client is returned
/// too (the redirection annotation uses it).
async fn start_inventory(
    cfg: &Config,
    tx: watch::Sender<Arc<Snapshot>>,
    reloads: Arc<ReloadStats>,
    xds: Option<&istiod::status::StatusHandle>,
) -> anyhow::Result<(Option<Arc<cni::pods::PodMap>>, Option<kube::Client>)> {
    let pod_map = match &cfg.cni {
        Some(c) => Some(open_pod_map(&c.pod_map)?),
        None => None,
    };
    match &cfg.inventory {
        InventorySource::File(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read inventory {}", path.display()))?;
            let reports = pod_map.as_ref().map(|m| file::CniReports {
                node: cfg.node.clone(),
                pods: m.subscribe(),
            });
            let first = file::parse_file(path, &text)?;
            tx.send_replace(Arc::new(first.merged(reports.as_ref())));
            let settings = file::WatchSettings {
                interval: Duration::from_millis(cfg.inventory_poll_ms.max(50)),
                guard: guard_settings(cfg),
            };
            tokio::spawn(file::watch_with_cni(
                path.clone(),
                settings,
                tx,
                reloads,
                reports,
            ));
            Ok((pod_map, None))
        }
        InventorySource::Kubernetes(k) => {
            let pod_map = pod_map.context("inventory kind kubernetes needs a cni: section")?;
            let client = kube_source::client(k.kubeconfig.as_deref()).await?;
            let (ready_tx, mut ready_rx) = watch::channel(false);
            let stats = Arc::new(kube_source::Stats::default());
            let opts = kube_source::Options {
                guard: guard_settings(cfg),
                reloads,
                ..kube_source::Options::new(cfg.node.clone())
            };
            tokio::spawn(kube_source::watch(
                client.clone(),
                opts,
                pod_map.subscribe(),
                tx,
                ready_tx,
                stats,
            ));
            tracing::info!("waiting for the first full sync with the api server");
            ready_rx
                .wait_for(|r| *r)
                .await
                .context("kubernetes source stopped before its first sync")?;
            Ok((Some(pod_map), Some(client)))
        }
        InventorySource::Istiod(i) => {
            let pod_map = pod_map.context("inventory kind istiod needs a cni: section")?;
            let xds = xds.context("inventory kind istiod needs its status handle")?;
            let ca = cfg
                .ca
                .as_ref()
                .context("inventory kind istiod needs a ca: section")?;
            let client_cfg = istiod::stream::XdsClientConfig {
                address: i.address.clone().unwrap_or_else(|| ca.address.clone()),
                root_cert: ca.root_cert.clone(),
                token_file: ca.token_file.clone(),
                server_name: ca.server_name.clone(),
                cluster_id: ca.cluster_id.clone(),
                node: istiod::node::NodeInfo::from_env(&cfg.node, ca.cluster_id.clone()),
                connect_timeout: Duration::from_secs(30),
                backoff: istiod::stream::Backoff::default(),
            };
            let sink = istiod::source::MeshSink::new(istiod::model::Mesh::new(
                &cfg.trust_domain,
                &cfg.root_namespace,
            ));
            let client = istiod::stream::XdsClient::new(client_cfg, sink.clone(), xds.clone())?;
            let (ready_tx, mut ready_rx) = watch::channel(false);
            let opts = istiod::source::Options {
                node: cfg.node.clone(),
                // A snapshot is a cheap copy of the one the mesh keeps up to date: publish each
                // change as soon as it is applied (a push of many resources still publishes
                // once, when the loop next runs).
                debounce: Duration::ZERO,
                guard: guard_settings(cfg),
                reloads,
            };
            tokio::spawn(client.run());
            tokio::spawn(istiod::source::publish(
                sink,
                opts,
                Some(pod_map.subscribe()),
                tx,
                ready_tx,
            ));
            tracing::info!(istiod = %xds.snapshot().address, "waiting for istiod's first push of workloads and policies");
            ready_rx
                .wait_for(|r| *r)
                .await
                .context("istiod source stopped before its first sync")?;
            // The redirection annotation still needs the API server (istiod reads it).
            let client = if cfg.redirection_annotation {
                Some(kube_source::client(None).await?)
            } else {
                None
            };
            Ok((Some(pod_map), client))
        }
    }
}

/// The inventory guard of `cfg` (`inventoryGuard`), counting this node's pods.
fn guard_settings(cfg: &Config) -> GuardSettings {
    GuardSettings {
        node: Some(cfg.node.clone()),
        max_unenroll_percent: cfg.inventory_guard.max_unenroll_percent,
        settle: Duration::from_millis(cfg.inventory_guard.settle_ms),
    }
}

/// Loads the CNI pod map and drops the sandboxes that went away while no agent ran.
fn open_pod_map(path: &Path) -> anyhow::Result<Arc<cni::pods::PodMap>> {
    let pod_map = Arc::new(cni::pods::PodMap::load(path)?);
    let r = pod_map.resync()?;
    tracing::info!(kept = ?r.kept, removed = ?r.removed, "cni pod map re-synced after start");
    Ok(pod_map)
}

/// The certificate manager and the TLS source built on it, when a CA is configured; the TLS
/// source's trust follows the root file and the CA's roots from then on.
fn identities(
    cfg: &Config,
    reloads: trust::Reloads,
) -> anyhow::Result<Option<(Arc<TlsSource>, Arc<CertManager>)>> {
    let Some(ca) = cfg.ca.clone() else {
        return Ok(None);
    };
    let root_pem = std::fs::read_to_string(&ca.root_cert)
        .with_context(|| format!("cannot read ca.rootCert {}", ca.root_cert.display()))?;
    let roots = TrustBundle::from_pem(&root_pem).with_context(|| {
        format!(
            "ca.rootCert {} holds no usable root",
            ca.root_cert.display()
        )
    })?;
    let mut domains = vec![cfg
        .trust_domain
        .parse::<TrustDomain>()
        .context("trustDomain")?];
    for alias in &cfg.trust_domain_aliases {
        domains.push(
            alias
                .parse::<TrustDomain>()
                .with_context(|| format!("trustDomainAliases: {alias}"))?,
        );
    }
    let root_file = RootFile::new(ca.root_cert.clone(), root_pem, reloads);
    let poll = Duration::from_millis(ca.root_cert_poll_ms.max(50));
    let client = CaClient::new(ca).context("cannot set up the ca client")?;
    let certs = Arc::new(CertManager::new(
        client,
        tokio::runtime::Handle::current(),
        ManagerSettings::default(),
    ));
    let lookup = certs.clone();
    let tls = Arc::new(TlsSource::new(
        Arc::new(move |id: &SpiffeId| lookup.get(id)),
        roots,
        domains,
    ));
    tokio::spawn(trust::follow(
        root_file,
        poll,
        tls.clone(),
        certs.watch_roots(),
    ));
    Ok(Some((tls, certs)))
}

/// Resolves a configured cgroup path: absolute as is, relative under the cgroup2 mount.
fn under(root: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        root.join(p)
    }
}
