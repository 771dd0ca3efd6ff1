//! Wires the agent together; owns startup and shutdown order.
//!
//! Startup: config → logging → join the agent cgroup (before any socket exists) → load and
//! attach the kernel programs → data-plane shards → inventory watch → mesh destinations in the
//! kernel (before every snapshot goes on) → pod manager → admin socket.
//! Shutdown (SIGTERM/SIGINT): stop serving and exit, leaving the pinned programs and maps in
//! place, so enrolled pods fail closed until the next agent takes over.
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::watch;

use crate::admin::logging::{self, LogControl};
use crate::admin::metrics;
use crate::admin::server::{self, AdminState};
use crate::ca::CaClient;
use crate::cli::RunArgs;
use crate::cni;
use crate::config::{Config, InventorySource};
use crate::identity::manager::{CertManager, ManagerSettings};
use crate::identity::{SpiffeId, TrustBundle, TrustDomain};
use crate::inventory::file::{self, ReloadStats};
use crate::inventory::kube as kube_source;
use crate::inventory::Snapshot;
use crate::proxy::manager::Manager;
use crate::proxy::shards::{self, Shards};
use crate::proxy::tls::TlsSource;
use crate::redirect::{events, mesh, Datapath};
use crate::{cgroups, sys};

/// `ambit run`.
pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let cfg = Config::load(&args.config)?;
    let log = logging::init(cfg.log_format);
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
    let result = admin_rt.block_on(serve(cfg.clone(), datapath, ring, data_plane.clone(), log));
    data_plane.shutdown(Duration::from_secs(1));
    tracing::info!("agent stopped; kernel programs stay attached (pods fail closed)");
    result
}

async fn serve(
    cfg: Arc<Config>,
    datapath: Arc<Datapath>,
    ring: aya::maps::RingBuf<aya::maps::MapData>,
    data_plane: Arc<Shards>,
    log: LogControl,
) -> anyhow::Result<()> {
    tokio::spawn(events::drain(ring));
    let (raw_tx, mut raw_rx) = watch::channel(Arc::new(Snapshot::default()));
    let reloads = Arc::new(ReloadStats::default());
    let pod_map = start_inventory(&cfg, raw_tx, reloads.clone()).await?;
    // The kernel's mesh destinations follow each snapshot before anything else sees it.
    let (first, report) = mesh::sync_current(&datapath, &mut raw_rx, None).await;
    let (tx, rx) = watch::channel(first);
    tokio::spawn(mesh::follow(datapath.clone(), raw_rx, tx, report));
    let (tls, certs) = match identities(&cfg)? {
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
        certs,
    ));
    if let (Some(cni), Some(pod_map)) = (&cfg.cni, pod_map) {
        let m = manager.clone();
        let confirm: cni::handler::Confirm = Arc::new(move |key: &str| m.pod_state(key));
        let listener = cni::server::bind(&cni.socket)
            .with_context(|| format!("cannot bind the cni socket {}", cni.socket.display()))?;
        let handler = cni::handler::handler(
            pod_map,
            rx.clone(),
            Some(confirm),
            Duration::from_millis(cni.wait_ms),
        );
        tokio::spawn(cni::server::serve(listener, handler));
        tracing::info!(cni.socket = %cni.socket.display(), "cni socket bound");
    }
    let rx_admin = rx.clone();
    tokio::spawn(manager.clone().run(rx));
    let listener = server::bind(&cfg.admin_socket)?;
    let registry = metrics::registry(manager.metrics(), datapath.clone(), manager.clone());
    let state = Arc::new(AdminState {
        cfg: cfg.clone(),
        reloads,
        manager,
        datapath,
        started: Instant::now(),
        bad_requests: AtomicU64::new(0),
        registry,
        log,
        inventory_rx: rx_admin,
    });
    let metrics_listener = match cfg.metrics_listen {
        Some(addr) => Some(
            std::net::TcpListener::bind(addr)
                .with_context(|| format!("cannot bind metricsListen {addr}"))?,
        ),
        None => None,
    };
    let admin_ino = inode(&cfg.admin_socket);
    // Its own thread and runtime: data-plane floods cannot delay `/status`.
    server::spawn_thread(listener, metrics_listener, state.clone())
        .context("cannot start the admin thread")?;
    tracing::info!(admin.socket = %cfg.admin_socket.display(), "agent serving");
    let drain = state.manager.drain_trigger();
    tokio::select! {
        () = shutdown_signal() => {},
        () = drain.notified() => {},
    }
    state
        .manager
        .drain(Duration::from_millis(cfg.drain_deadline_ms))
        .await;
    // A newer agent may have bound the same path already: remove only our own socket.
    if admin_ino.is_some() && inode(&cfg.admin_socket) == admin_ino {
        let _ = std::fs::remove_file(&cfg.admin_socket);
    }
    Ok(())
}

fn inode(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| m.ino())
}

/// Starts the configured inventory source publishing to `tx`; returns the CNI pod map when
/// there is a `cni:` section (required in Kubernetes mode). Either source merges the plugin's
/// reports: Kubernetes pods take their netns only from them, file pods without a netns
/// annotation too. A file inventory must load once before the agent serves anything; the
/// Kubernetes source holds off until every kind has listed once.
async fn start_inventory(
    cfg: &Config,
    tx: watch::Sender<Arc<Snapshot>>,
    reloads: Arc<ReloadStats>,
) -> anyhow::Result<Option<Arc<cni::pods::PodMap>>> {
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
            let poll = Duration::from_millis(cfg.inventory_poll_ms.max(50));
            tokio::spawn(file::watch_with_cni(
                path.clone(),
                poll,
                tx,
                reloads,
                reports,
            ));
            Ok(pod_map)
        }
        InventorySource::Kubernetes(k) => {
            let pod_map = pod_map.context("inventory kind kubernetes needs a cni: section")?;
            let client = kube_source::client(k.kubeconfig.as_deref()).await?;
            let (ready_tx, mut ready_rx) = watch::channel(false);
            let stats = Arc::new(kube_source::Stats::default());
            tokio::spawn(kube_source::watch(
                client,
                kube_source::Options::new(cfg.node.clone()),
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
            Ok(Some(pod_map))
        }
    }
}

/// Loads the CNI pod map and drops the sandboxes that went away while no agent ran.
fn open_pod_map(path: &Path) -> anyhow::Result<Arc<cni::pods::PodMap>> {
    let pod_map = Arc::new(cni::pods::PodMap::load(path)?);
    let r = pod_map.resync()?;
    tracing::info!(kept = ?r.kept, removed = ?r.removed, "cni pod map re-synced after start");
    Ok(pod_map)
}

/// The certificate manager and the TLS source built on it, when a CA is configured.
fn identities(cfg: &Config) -> anyhow::Result<Option<(Arc<TlsSource>, Arc<CertManager>)>> {
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
    Ok(Some((tls, certs)))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; running until killed");
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}

/// Resolves a configured cgroup path: absolute as is, relative under the cgroup2 mount.
fn under(root: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        root.join(p)
    }
}
