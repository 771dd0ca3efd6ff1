//! `ambit ca`: the certificate authority, speaking Istio's CA API, and the agent's client of it.
//!
//! Server side: [`config`] (YAML), [`material`] (root material, serving certificate),
//! [`token`] (node authentication), [`service`] (authorization and signing), [`server`] (TLS
//! and gRPC). Client side: [`client`]. [`issuer`] mints service-account tokens where no API
//! server does (testbed, tests).
//!
//! Startup order in [`run`]: config → logging → root material (generated if asked) → issuer
//! keys → first inventory load (must succeed: a CA that cannot authorize anyone is useless) →
//! listener → watchers (inventory, JWKS) → serve until SIGTERM/SIGINT.
pub mod client;
pub mod config;
pub mod issuer;
pub mod material;
pub mod proto;
pub mod server;
pub mod service;
mod status;
pub mod token;

#[cfg(test)]
pub(crate) mod testing;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use crate::ca::config::{CaConfig, ConfigError, KeySource};
use crate::ca::material::{Material, MaterialError, ServingNames};
use crate::ca::server::{RunningCa, ServerError};
use crate::ca::service::CaService;
use crate::ca::token::{Jwks, JwksError, TokenVerifier};
use crate::cli::CaArgs;
use crate::config::LogFormat;
use crate::inventory;

pub use client::{CaClient, CaClientConfig, ClientError};

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
    /// OIDC discovery was configured.
    #[error("tokens.oidcDiscovery ({url}): oidc discovery needs a kubernetes api server, which is not available to ambit ca yet; set tokens.jwksFile to a copy of the issuer's /openid/v1/jwks")]
    OidcUnavailable { url: String },
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
    /// The status listener could not start.
    #[error("cannot listen on {addr} for /status")]
    Status {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// `ambit ca`: serve until SIGTERM or SIGINT.
pub fn run(args: CaArgs) -> Result<(), Error> {
    let mut cfg = CaConfig::load(&args.config)?;
    cfg.generate |= args.generate;
    init_logging(cfg.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .thread_name("ambit-ca")
        .enable_all()
        .build()
        .map_err(|source| Error::Runtime { source })?;
    runtime.block_on(serve(cfg))
}

async fn serve(cfg: CaConfig) -> Result<(), Error> {
    let mut ips = cfg.serving_ips.clone();
    if !cfg.listen.ip().is_unspecified() && !ips.contains(&cfg.listen.ip()) {
        ips.push(cfg.listen.ip());
    }
    let names = ServingNames {
        dns: cfg.serving_names.clone(),
        ips,
    };
    let generate = cfg.generate.then_some(cfg.root_ttl);
    let material = Material::load(
        &cfg.cert_dir,
        generate,
        cfg.trust_domain.clone(),
        &names,
        SystemTime::now(),
    )?;

    let jwks_path = match &cfg.tokens.keys {
        KeySource::JwksFile(path) => path.clone(),
        KeySource::OidcDiscovery(url) => return Err(Error::OidcUnavailable { url: url.clone() }),
    };
    let jwks = Jwks::load(&jwks_path)?;
    let tokens = TokenVerifier::new(
        cfg.tokens.issuer.clone(),
        cfg.tokens.audiences.clone(),
        cfg.tokens.node_agents.clone(),
        cfg.tokens.leeway,
        jwks,
    );

    let text =
        std::fs::read_to_string(&cfg.inventory).map_err(|source| inventory::file::Error::Read {
            path: cfg.inventory.clone(),
            source,
        })?;
    let first = inventory::file::parse(&cfg.inventory, &text)?;
    let (inventory_tx, inventory_rx) = watch::channel(Arc::new(first));
    let reloads = Arc::new(inventory::file::ReloadStats::default());
    let inventory_watch = tokio::spawn(inventory::file::watch_file(
        cfg.inventory.clone(),
        cfg.poll,
        inventory_tx,
        reloads,
    ));

    let service = Arc::new(CaService::new(
        material.authority,
        &material.roots,
        tokens,
        inventory_rx,
        cfg.default_ttl,
        cfg.max_ttl,
    ));
    let jwks_watch = tokio::spawn(watch_jwks(jwks_path, cfg.poll, service.clone()));
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| ServerError::Bind {
            addr: cfg.listen,
            source,
        })?;
    let mut running = RunningCa::spawn(listener, service.clone(), material.serving)?;
    let status = match cfg.status_listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| Error::Status { addr, source })?;
            Some(tokio::spawn(status::serve(listener, service.clone())))
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
        "ca serving"
    );

    tokio::select! {
        () = shutdown_signal() => {}
        () = running.wait() => tracing::error!("ca server stopped unexpectedly"),
    }
    tracing::info!(stats = ?service.stats().snapshot(), "ca stopping");
    running.stop().await;
    inventory_watch.abort();
    jwks_watch.abort();
    if let Some(status) = status {
        status.abort();
    }
    Ok(())
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

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
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
