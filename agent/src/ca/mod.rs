//! `ambit ca`: the certificate authority, speaking Istio's CA API, and the agent's client of it.
//!
//! Server side: [`config`] (YAML), [`material`] (root material, serving certificate; followed
//! by [`reload`]), [`token`] (node authentication), [`service`] (authorization and signing),
//! [`server`] (TLS and gRPC). Client side: [`client`]. Where no API server mints service-account tokens (the
//! testbed, tests), the `ambit-testbed` crate's `issuer` does.
//!
//! Startup order in [`run`]: config → logging → root material (generated if asked) → issuer
//! keys (a JWKS file, or OIDC discovery from the API server) → first inventory load from a file
//! (must succeed: a CA that cannot authorize anyone is useless), or the Kubernetes reflectors
//! (`/status` answers 503 until their first full sync) → listener → watchers (inventory, keys,
//! root material)
//! → serve until SIGTERM/SIGINT/SIGQUIT. Signals are taken over first, as in the agent
//! ([`crate::signals`]): SIGHUP re-reads the config file and logs whether it differs (nothing
//! is applied: the inventory, the issuer keys and the root material are followed anyway, the
//! rest takes a restart), SIGUSR1 logs the CA's counters, other signals are logged and ignored.
pub mod config;
pub mod material;
pub mod oidc;
pub mod reload;
pub mod server;
pub mod service;
mod status;
pub mod token;

#[cfg(test)]
mod cluster_tests;
#[cfg(test)]
pub(crate) mod testing;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use crate::ca::config::{CaConfig, CaInventory, ConfigError, KeySource};
use crate::ca::material::{Material, MaterialError, ServingNames};
use crate::ca::oidc::{Discovery, OidcError};
use crate::ca::server::{RunningCa, ServerError};
use crate::ca::service::CaService;
use crate::ca::token::{Jwks, JwksError, TokenVerifier};
use crate::config::LogFormat;
use crate::inventory;
use crate::signals::{Event, Signals};

/// Why `ambit ca` could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is unreadable or invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The root material is missing or unusable.
    #[error(transparent)]
    Material(#[from] MaterialError),
    /// The issuer's keys could not be loaded.
    #[error(transparent)]
    Jwks(#[from] JwksError),
    /// OIDC discovery failed at startup.
    #[error(transparent)]
    Oidc(#[from] OidcError),
    /// No Kubernetes client for the inventory.
    #[error("inventory {what}: cannot reach the kubernetes api")]
    Kube {
        what: String,
        #[source]
        source: inventory::kube::Error,
    },
    /// The first inventory load failed.
    #[error(transparent)]
    Inventory(#[from] inventory::file::Error),
    /// The runtime could not start.
    #[error("cannot start the tokio runtime")]
    Runtime {
        #[source]
        source: std::io::Error,
    },
    /// The gRPC server could not start.
    #[error(transparent)]
    Server(#[from] ServerError),
    /// The signals could not be taken over.
    #[error("cannot block signals")]
    SignalMask(#[from] crate::sys::Error),
    /// The signal thread could not start.
    #[error("cannot start the signal thread")]
    SignalThread(#[source] std::io::Error),
    /// The status listener could not start.
    #[error("cannot listen on {addr} for /status")]
    Status {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// `ambit ca`.
#[derive(Debug, clap::Args)]
pub struct CaArgs {
    /// CA configuration file (YAML).
    #[arg(long, short, env = "AMBIT_CA_CONFIG")]
    pub config: PathBuf,
    /// Dev/testbed: write a new root to the config's certDir if it holds none.
    #[arg(long)]
    pub generate: bool,
}

/// `ambit ca`: serve until SIGTERM or SIGINT.
pub fn run(args: CaArgs) -> Result<(), Error> {
    let blocked = crate::signals::block()?;
    let mut cfg = CaConfig::load(&args.config)?;
    cfg.generate |= args.generate;
    init_logging(cfg.log_format);
    let signals = blocked.start("ca").map_err(Error::SignalThread)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .thread_name("ambit-ca")
        .enable_all()
        .build()
        .map_err(|source| Error::Runtime { source })?;
    runtime.block_on(serve(cfg, args, signals))
}

async fn serve(cfg: CaConfig, args: CaArgs, mut signals: Signals) -> Result<(), Error> {
    let mut ips = cfg.serving_ips.clone();
    if !cfg.listen.ip().is_unspecified() && !ips.contains(&cfg.listen.ip()) {
        ips.push(cfg.listen.ip());
    }
    let names = ServingNames {
        dns: cfg.serving_names.clone(),
        ips,
    };
    let reloader = reload::Reload {
        dir: cfg.cert_dir.clone(),
        trust_domain: cfg.trust_domain.clone(),
        names: names.clone(),
    };
    let generate = cfg.generate.then_some(cfg.root_ttl);
    // Read before loading: a change made meanwhile is then seen as one and loaded.
    let files = reload::Files::read(&cfg.cert_dir);
    let material = Material::load(
        &cfg.cert_dir,
        generate,
        cfg.trust_domain.clone(),
        &names,
        SystemTime::now(),
    )?;

    let kubeconfig = match &cfg.inventory {
        CaInventory::Kubernetes(k) => k.kubeconfig.clone(),
        CaInventory::File(_) => None,
    };
    let (jwks, discovery) = match &cfg.tokens.keys {
        KeySource::JwksFile(path) => (Jwks::load(path)?, None),
        KeySource::OidcDiscovery(url) => {
            let discovery = Discovery::new(url, kubeconfig.as_deref()).await?;
            (first_keys(&discovery).await?, Some(discovery))
        }
    };
    tracing::info!(keys = jwks.len(), source = ?cfg.tokens.keys, "issuer keys loaded");
    let tokens = TokenVerifier::new(
        cfg.tokens.issuer.clone(),
        cfg.tokens.audiences.clone(),
        cfg.tokens.node_agents.clone(),
        cfg.tokens.leeway,
        jwks,
    );

    let (inventory_rx, ready, inventory_task) = start_inventory(&cfg.inventory, cfg.poll).await?;
    let service = Arc::new(
        CaService::new(
            material.authority,
            &material.roots,
            tokens,
            inventory_rx,
            cfg.default_ttl,
            cfg.max_ttl,
        )
        .with_cluster(cfg.tokens.cluster.clone()),
    );
    let jwks_watch = match (&cfg.tokens.keys, discovery) {
        (_, Some(discovery)) => tokio::spawn(oidc::refresh(
            discovery,
            cfg.tokens.jwks_refresh,
            service.clone(),
        )),
        (KeySource::JwksFile(path), None) => {
            tokio::spawn(watch_jwks(path.clone(), cfg.poll, service.clone()))
        }
        (KeySource::OidcDiscovery(_), None) => unreachable!("discovery is set for oidc"),
    };
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| ServerError::Bind {
            addr: cfg.listen,
            source,
        })?;
    let mut running = RunningCa::spawn(listener, service.clone(), material.serving, cfg.limits)?;
    let material_watch =
        tokio::spawn(reloader.follow(files, cfg.poll, service.clone(), running.serving()));
    let status = match cfg.status_listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| Error::Status { addr, source })?;
            Some(tokio::spawn(status::serve(
                listener,
                service.clone(),
                ready.clone(),
            )))
        }
        None => None,
    };
    tracing::info!(
        listen.addr = %running.local_addr(),
        trust_domain = %cfg.trust_domain,
        roots = material.roots.roots().len(),
        serving.names = ?names.dns,
        serving.ips = ?names.ips,
        serving.not_after = %material.serving_not_after,
        default_ttl.secs = cfg.default_ttl.as_secs(),
        issuer = %cfg.tokens.issuer,
        cluster_id = %cfg.tokens.cluster.id,
        cluster_id.required = cfg.tokens.cluster.required,
        "ca serving"
    );

    signals.serving();
    loop {
        tokio::select! {
            ev = signals.recv() => match ev {
                Event::Stop(_) => break,
                Event::Reload => reload_check(&cfg, &args),
                Event::Dump => tracing::info!(signal = "SIGUSR1", stats = ?service.stats().snapshot(), "SIGUSR1: state summary"),
            },
            () = running.wait() => {
                tracing::error!("ca server stopped unexpectedly");
                break;
            }
        }
    }
    tracing::info!(stats = ?service.stats().snapshot(), "ca stopping");
    running.stop().await;
    inventory_task.abort();
    jwks_watch.abort();
    material_watch.abort();
    if let Some(status) = status {
        status.abort();
    }
    Ok(())
}

/// The first keys from OIDC discovery: a few tries (1, 2, 4, 8 s apart) ride out an API server
/// that is briefly unreachable; then the last error stops the CA.
async fn first_keys(discovery: &Discovery) -> Result<Jwks, OidcError> {
    let mut wait = Duration::from_secs(1);
    loop {
        match discovery.fetch().await {
            Ok(keys) => return Ok(keys),
            Err(error) if wait <= Duration::from_secs(8) => {
                tracing::warn!(error = %service::chain(&error), retry.secs = wait.as_secs(), "issuer keys not fetched; retrying");
                tokio::time::sleep(wait).await;
                wait *= 2;
            }
            Err(error) => return Err(error),
        }
    }
}

/// Starts the inventory source: the file (first load must succeed) or the Kubernetes reflectors
/// over every node's pods. Returns the snapshots, whether the first full sync is done, and the
/// task to abort at shutdown.
async fn start_inventory(
    source: &CaInventory,
    poll: Duration,
) -> Result<
    (
        watch::Receiver<Arc<inventory::Snapshot>>,
        watch::Receiver<bool>,
        tokio::task::JoinHandle<()>,
    ),
    Error,
> {
    match source {
        CaInventory::File(path) => {
            let text =
                std::fs::read_to_string(path).map_err(|source| inventory::file::Error::Read {
                    path: path.clone(),
                    source,
                })?;
            let first = inventory::file::parse(path, &text)?;
            let (tx, rx) = watch::channel(Arc::new(first));
            let reloads = Arc::new(inventory::file::ReloadStats::default());
            let task = tokio::spawn(inventory::file::watch_file(path.clone(), poll, tx, reloads));
            Ok((rx, watch::channel(true).1, task))
        }
        CaInventory::Kubernetes(k) => {
            let client = inventory::kube::client(k.kubeconfig.as_deref())
                .await
                .map_err(|source| Error::Kube {
                    what: source_name(k.kubeconfig.as_deref()),
                    source,
                })?;
            Ok(watch_kube(client))
        }
    }
}

fn source_name(kubeconfig: Option<&std::path::Path>) -> String {
    match kubeconfig {
        Some(path) => format!("kubernetes (kubeconfig {})", path.display()),
        None => "kubernetes".to_owned(),
    }
}

/// Runs the reflectors in the CA's mode (pods and namespaces of every node, no CNI reports).
pub(crate) fn watch_kube(
    client: kube::Client,
) -> (
    watch::Receiver<Arc<inventory::Snapshot>>,
    watch::Receiver<bool>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = watch::channel(Arc::new(inventory::Snapshot::default()));
    let (ready_tx, ready_rx) = watch::channel(false);
    let stats = Arc::new(inventory::kube::Stats::default());
    let task = tokio::spawn(async move {
        // No CNI plugin reports to the CA; the sender lives as long as the watch.
        let (_cni_tx, cni_rx) = watch::channel(Arc::new(Vec::new()));
        let mut opts = inventory::kube::Options::all_nodes();
        opts.resync = Duration::from_secs(300);
        inventory::kube::watch(client, opts, cni_rx, tx, ready_tx, stats).await;
    });
    (rx, ready_rx, task)
}

/// Polls the JWKS file and swaps in the new keys when it changes and parses; keeps the old keys
/// otherwise.
async fn watch_jwks(path: PathBuf, interval: Duration, service: Arc<CaService>) {
    let mut last = std::fs::read_to_string(&path).ok();
    loop {
        tokio::time::sleep(interval).await;
        let Ok(text) = tokio::fs::read_to_string(&path).await else {
            continue;
        };
        if last.as_deref() == Some(text.as_str()) {
            continue;
        }
        match Jwks::parse(&path, &text) {
            Ok(keys) => {
                tracing::info!(path = %path.display(), keys = keys.len(), "issuer keys reloaded");
                service.tokens().set_keys(keys);
            }
            Err(error) => {
                tracing::warn!(error = %service::chain(&error), "issuer keys rejected; keeping the previous keys");
            }
        }
        last = Some(text);
    }
}

/// SIGHUP: reads the config file again and logs whether it differs from the running one.
fn reload_check(running: &CaConfig, args: &CaArgs) {
    let path = args.config.display();
    match CaConfig::load(&args.config) {
        Err(e) => {
            tracing::error!(signal = "SIGHUP", config = %path, error = %service::chain(&e), "SIGHUP: cannot use the config file; the running configuration stays")
        }
        Ok(mut read) => {
            read.generate |= args.generate;
            if format!("{read:?}") == format!("{running:?}") {
                tracing::info!(signal = "SIGHUP", config = %path, "SIGHUP: configuration unchanged");
            } else {
                tracing::warn!(signal = "SIGHUP", config = %path, "SIGHUP: the config file differs from the running configuration; nothing is applied: a restart takes the new settings (the inventory, the issuer keys and the root material are followed without one)");
            }
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("AMBIT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
