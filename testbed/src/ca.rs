//! The testbed's CA: `ambit ca` in node1's network namespace, and the token issuer that plays
//! the Kubernetes API server (its key, its JWKS, and the node agents' projected tokens).
//!
//! The CA listens on node1's underlay address, so both nodes' agents (and tests that enter a
//! node's namespace) reach it; nothing of it is visible outside the testbed's namespaces.
use std::fs;
use std::io::Write as _;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};

use crate::agent;
use crate::issuer::{ServiceAccountClaims, TokenIssuer};
use crate::net;
use crate::process;
use crate::state::{write_atomic, Ca, Node, State, CA_PORT, TRUST_DOMAIN};

/// `iss` of the testbed's tokens (what a cluster's API server would use).
pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// Audience the agents' tokens carry and the CA requires, unless the testbed says otherwise
/// (`Options::ca_audience`).
pub const AUDIENCE: &str = "ambit-ca";
/// Namespace of the node agents' service account (as `deploy/`).
pub const AGENT_NAMESPACE: &str = "ambit-system";
/// The node agents' service account (as `deploy/`).
pub const AGENT_SERVICE_ACCOUNT: &str = "ambit";
/// Lifetime of the token files the testbed writes: long, because nothing rotates them (a
/// kubelet would) and a `--keep` testbed may stay up for days.
pub const TOKEN_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// How long the CA gets to listen after it starts.
pub const CA_READY_TIMEOUT: Duration = Duration::from_secs(15);
/// The process role of the CA in the state file.
pub const ROLE: &str = "ca";

/// Where the CA of an instance in `dir` lives, running in `node`'s namespace.
pub fn plan(dir: &Path, cgroup_root: &Path, node: &Node, cert_ttl_secs: u64) -> Ca {
    Ca {
        node: node.name.clone(),
        addr: SocketAddr::new(node.underlay_v4.into(), CA_PORT),
        cert_dir: dir.join("ca"),
        config: dir.join("ca.yaml"),
        log: dir.join("ca.log"),
        cgroup: cgroup_root.join("ca"),
        issuer: ISSUER.to_string(),
        issuer_key: dir.join("issuer.pk8"),
        jwks: dir.join("issuer-jwks.json"),
        cert_ttl_secs,
        audience: AUDIENCE.to_string(),
        cluster_id: None,
    }
}

/// Generates the issuer key, writes it (0600), its JWKS, every node's token file and the CA's
/// config file.
pub fn prepare(state: &State) -> Result<()> {
    let ca = state.ca()?;
    let issuer = TokenIssuer::generate(&ca.issuer).context("generating the token issuer key")?;
    write_private(&ca.issuer_key, issuer.pkcs8())?;
    write_atomic(&ca.jwks, issuer.jwks().as_bytes())?;
    for node in &state.nodes {
        let token = node_token_for(&issuer, &node.name, &ca.audience, TOKEN_TTL)?;
        write_private(&node.token_file, token.as_bytes())?;
    }
    write_atomic(&ca.config, config_yaml(state, ca).as_bytes())
}

/// The issuer, loaded from its key file (to mint more tokens in tests).
pub fn issuer(ca: &Ca) -> Result<TokenIssuer> {
    let key =
        fs::read(&ca.issuer_key).with_context(|| format!("reading {}", ca.issuer_key.display()))?;
    TokenIssuer::from_pkcs8(&ca.issuer, &key).context("loading the token issuer key")
}

/// A node agent's projected token for `node`, valid for `ttl`, with the default audience.
pub fn node_token(issuer: &TokenIssuer, node: &str, ttl: Duration) -> Result<String> {
    node_token_for(issuer, node, AUDIENCE, ttl)
}

/// A node agent's projected token for `node` with `audience`, valid for `ttl`.
pub fn node_token_for(
    issuer: &TokenIssuer,
    node: &str,
    audience: &str,
    ttl: Duration,
) -> Result<String> {
    issuer
        .token(&ServiceAccountClaims {
            namespace: AGENT_NAMESPACE.to_string(),
            service_account: AGENT_SERVICE_ACCOUNT.to_string(),
            node: node.to_string(),
            audiences: vec![audience.to_string()],
            issued_at: SystemTime::now(),
            ttl,
        })
        .context("minting a node token")
}

/// The `ambit ca --config` YAML.
pub fn config_yaml(state: &State, ca: &Ca) -> String {
    let max_ttl = ca.cert_ttl_secs.max(24 * 3600);
    let cluster = match &ca.cluster_id {
        Some(id) => format!("  clusterId: {id}\n  requireClusterId: true\n"),
        None => String::new(),
    };
    format!(
        "# ambit testbed {id}: the CA, in {node}'s network namespace\n\
         listen: {addr}\n\
         trustDomain: {TRUST_DOMAIN}\n\
         certDir: {cert_dir}\n\
         generate: true\n\
         inventory: {inventory}\n\
         pollMs: 200\n\
         defaultTtlSecs: {ttl}\n\
         maxTtlSecs: {max_ttl}\n\
         tokens:\n  \
           issuer: {issuer}\n  \
           jwksFile: {jwks}\n  \
           audiences: [{audience}]\n  \
           nodeAgents: [\"system:serviceaccount:{AGENT_NAMESPACE}:{AGENT_SERVICE_ACCOUNT}\"]\n\
         {cluster}",
        id = state.id,
        node = ca.node,
        addr = ca.addr,
        cert_dir = ca.cert_dir.display(),
        inventory = state.inventory.display(),
        ttl = ca.cert_ttl_secs,
        issuer = ca.issuer,
        jwks = ca.jwks.display(),
        audience = ca.audience,
    )
}

/// How often the agents check the CA's root file for changes, in milliseconds.
pub const ROOT_POLL_MS: u64 = 200;

/// The `ca:` section of an agent's config.
pub fn agent_section(ca: &Ca, node: &Node) -> String {
    let mut out = format!(
        "ca:\n  address: {addr}\n  rootCert: {root}\n  rootCertPollMs: {ROOT_POLL_MS}\n  \
         tokenFile: {token}\n  ttlSecs: {ttl}\n",
        addr = ca.addr,
        root = ca.cert_dir.join("root-cert.pem").display(),
        token = node.token_file.display(),
        ttl = ca.cert_ttl_secs,
    );
    if let Some(id) = &ca.cluster_id {
        out.push_str(&format!("  clusterId: {id}\n"));
    }
    out
}

/// Starts `ambit ca` in its node's namespace, in its own cgroup.
pub fn start(state: &State, bin: &Path) -> Result<Child> {
    let ca = state.ca()?;
    let node = state.node(&ca.node)?;
    let argv = [
        bin.as_os_str(),
        "ca".as_ref(),
        "--config".as_ref(),
        ca.config.as_os_str(),
    ];
    let log = std::env::var("AMBIT_LOG").unwrap_or_else(|_| "info".to_string());
    process::spawn_in(
        &ca.cgroup,
        &node.netns_path(),
        &argv,
        &ca.log,
        &[("AMBIT_LOG", log.as_str()), ("NO_COLOR", "1")],
    )
}

/// Waits until the CA listens and its root is on disk; `alive` says whether it still runs.
pub fn wait_ready(state: &State, timeout: Duration, alive: impl Fn() -> bool) -> Result<()> {
    let ca = state.ca()?;
    let node = state.node(&ca.node)?;
    let root = ca.cert_dir.join("root-cert.pem");
    let deadline = Instant::now() + timeout;
    loop {
        if !alive() {
            bail!(
                "the CA exited during startup; log {}:\n{}",
                ca.log.display(),
                agent::log_tail(&ca.log, 40)
            );
        }
        let listening = net::listening_ports(&node.netns_path())?.contains(&ca.addr.port());
        if listening && root.exists() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "the CA is not listening on {} after {timeout:?}; log:\n{}",
                ca.addr,
                agent::log_tail(&ca.log, 40)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))
}
