//! `ambit ca` configuration: parsed once from a YAML file into typed values.
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ca::server::CaLimits;
use crate::ca::service::{ClusterPolicy, DEFAULT_CLUSTER_ID};
pub use crate::config::CaInventory;
use crate::config::{InventorySource, LogFormat};
use crate::identity::TrustDomain;

/// Default listen address (istiod's CA port).
pub const DEFAULT_LISTEN: &str = "0.0.0.0:15012";
/// Default token audience node agents ask for.
pub const DEFAULT_AUDIENCE: &str = "ambit-ca";
/// Default node-agent service account (`deploy/`'s DaemonSet).
pub const DEFAULT_NODE_AGENT: &str = "system:serviceaccount:ambit-system:ambit";
/// Prefix of every service-account token subject.
const SUBJECT_PREFIX: &str = "system:serviceaccount:";

/// The CA's configuration, typed.
#[derive(Debug, Clone)]
pub struct CaConfig {
    /// Where the gRPC (TLS) server listens.
    pub listen: SocketAddr,
    /// Trust domain of every identity the CA signs.
    pub trust_domain: TrustDomain,
    /// Directory of the root material (Istio `cacerts` layout).
    pub cert_dir: PathBuf,
    /// Generate a root into `cert_dir` when it holds none (dev and testbed).
    pub generate: bool,
    /// Lifetime of a generated root.
    pub root_ttl: Duration,
    /// DNS names in the serving certificate.
    pub serving_names: Vec<String>,
    /// IP addresses in the serving certificate (the listen address is added unless unspecified).
    pub serving_ips: Vec<IpAddr>,
    /// Inventory source (a file, or the Kubernetes API): which pod (identity) runs on which node.
    pub inventory: CaInventory,
    /// How often the inventory and JWKS files and the root material are checked for changes.
    pub poll: Duration,
    /// Lifetime of a certificate when the request asks for none.
    pub default_ttl: Duration,
    /// Longest lifetime granted; longer requests are shortened.
    pub max_ttl: Duration,
    /// How node agents' tokens are checked.
    pub tokens: TokenConfig,
    /// Optional plain-HTTP listener serving `GET /status` (counters as JSON).
    pub status_listen: Option<SocketAddr>,
    /// Log output format.
    pub log_format: LogFormat,
    /// Caps and deadline of the listener.
    pub limits: CaLimits,
}

/// How node agents' service-account tokens are verified.
#[derive(Debug, Clone)]
pub struct TokenConfig {
    /// Expected `iss`.
    pub issuer: String,
    /// Accepted `aud` values (any one suffices).
    pub audiences: Vec<String>,
    /// Where the issuer's public keys come from.
    pub keys: KeySource,
    /// Subjects (`system:serviceaccount:<ns>:<sa>`) allowed to ask for certificates.
    pub node_agents: Vec<String>,
    /// Clock skew allowed on `exp` and `nbf`.
    pub leeway: Duration,
    /// How often keys from OIDC discovery are fetched again.
    pub jwks_refresh: Duration,
    /// The cluster whose tokens these are (istiod's `CLUSTER_ID`): a request naming another
    /// cluster in its `ClusterID` metadata is refused.
    pub cluster: ClusterPolicy,
}

/// Source of the token issuer's keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// A JWKS file (e.g. a copy of the API server's `/openid/v1/jwks`), reloaded on change.
    JwksFile(PathBuf),
    /// OIDC discovery from the API server at this URL (`/.well-known/openid-configuration`,
    /// then its `jwks_uri`), refreshed every [`TokenConfig::jwks_refresh`] and on an unknown key id.
    OidcDiscovery(String),
}

/// Errors reading or parsing the CA configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read ca config file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The YAML did not parse or a field had a bad value.
    #[error("ca config file {}: {field}: {message} (line {line}, column {column})", path.display())]
    Parse {
        path: PathBuf,
        field: String,
        message: String,
        line: usize,
        column: usize,
    },
    /// A value parsed but is not usable.
    #[error("ca config file {}: {field}: {message}", path.display())]
    Invalid {
        path: PathBuf,
        field: &'static str,
        message: String,
    },
}

impl CaConfig {
    /// Reads and parses the configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses configuration text; `path` is used in error messages only.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = crate::yaml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            field: e.field,
            message: e.message,
            line: e.line,
            column: e.column,
        })?;
        let invalid = |field, message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            field,
            message,
        };
        let trust_domain = raw
            .trust_domain
            .parse::<TrustDomain>()
            .map_err(|e| invalid("trustDomain", e.to_string()))?;
        let secs = |field, secs: u64| {
            if secs == 0 {
                Err(invalid(field, "must be at least 1 second".into()))
            } else {
                Ok(Duration::from_secs(secs))
            }
        };
        let default_ttl = secs("defaultTtlSecs", raw.default_ttl_secs)?;
        let max_ttl = secs("maxTtlSecs", raw.max_ttl_secs)?;
        if default_ttl > max_ttl {
            return Err(invalid(
                "defaultTtlSecs",
                "must not exceed maxTtlSecs".into(),
            ));
        }
        let root_ttl = secs("rootTtlSecs", raw.root_ttl_secs)?;
        let jwks_refresh = secs("tokens.jwksRefreshSecs", raw.tokens.jwks_refresh_secs)?;
        let keys = match (raw.tokens.jwks_file, raw.tokens.oidc_discovery) {
            (Some(file), None) => KeySource::JwksFile(file),
            (None, Some(url)) => KeySource::OidcDiscovery(url),
            _ => {
                return Err(invalid(
                    "tokens",
                    "set exactly one of jwksFile and oidcDiscovery".into(),
                ))
            }
        };
        if let KeySource::OidcDiscovery(url) = &keys {
            if !(url.starts_with("https://") || url.starts_with("http://")) {
                return Err(invalid(
                    "tokens.oidcDiscovery",
                    format!("{url:?} is not an http(s) url"),
                ));
            }
        }
        if raw.tokens.issuer.is_empty() {
            return Err(invalid("tokens.issuer", "must not be empty".into()));
        }
        if raw.tokens.audiences.is_empty() {
            return Err(invalid(
                "tokens.audiences",
                "must name at least one audience".into(),
            ));
        }
        for agent in &raw.tokens.node_agents {
            let parts = agent
                .strip_prefix(SUBJECT_PREFIX)
                .map(|rest| rest.split(':').collect::<Vec<_>>());
            if !matches!(parts.as_deref(), Some([ns, sa]) if !ns.is_empty() && !sa.is_empty()) {
                return Err(invalid(
                    "tokens.nodeAgents",
                    format!(
                        "{agent:?} is not of the form system:serviceaccount:<namespace>:<name>"
                    ),
                ));
            }
        }
        if raw.tokens.node_agents.is_empty() {
            return Err(invalid(
                "tokens.nodeAgents",
                "must name at least one service account".into(),
            ));
        }
        let cluster_id = raw.tokens.cluster_id;
        if cluster_id.is_empty() || !cluster_id.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(invalid(
                "tokens.clusterId",
                format!("{cluster_id:?} is empty or not visible ascii"),
            ));
        }
        let inventory = match raw.inventory {
            InventorySource::File(path) => CaInventory::File(path),
            InventorySource::Kubernetes(k) => CaInventory::Kubernetes(k),
            InventorySource::Istiod(_) => return Err(invalid(
                "inventory.kind",
                "istiod is an agent's inventory; the CA reads pods from a file or the API server"
                    .into(),
            )),
        };
        let limits = raw
            .limits
            .check()
            .map_err(|(field, message)| invalid(field, message))?;
        Ok(Self {
            listen: raw.listen,
            trust_domain,
            cert_dir: raw.cert_dir,
            generate: raw.generate,
            root_ttl,
            serving_names: raw.serving_names,
            serving_ips: raw.serving_ips,
            inventory,
            poll: Duration::from_millis(raw.poll_ms.max(50)),
            default_ttl,
            max_ttl,
            tokens: TokenConfig {
                issuer: raw.tokens.issuer,
                audiences: raw.tokens.audiences,
                keys,
                node_agents: raw.tokens.node_agents,
                leeway: Duration::from_secs(raw.tokens.leeway_secs),
                jwks_refresh,
                cluster: ClusterPolicy {
                    id: cluster_id,
                    required: raw.tokens.require_cluster_id,
                },
            },
            status_listen: raw.status_listen,
            log_format: raw.log_format,
            limits,
        })
    }
}

/// The file as written (`camelCase`); see [`CaConfig`] for the meaning of each field.
/// `Serialize` shows its defaults (docs/configuration.md is checked against them).
#[derive(Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct RawConfig {
    #[serde(default = "default_listen")]
    listen: SocketAddr,
    #[serde(default = "default_trust_domain")]
    trust_domain: String,
    cert_dir: PathBuf,
    #[serde(default)]
    generate: bool,
    #[serde(default = "default_root_ttl_secs")]
    root_ttl_secs: u64,
    #[serde(default = "default_serving_names")]
    serving_names: Vec<String>,
    #[serde(default)]
    serving_ips: Vec<IpAddr>,
    inventory: InventorySource,
    #[serde(default = "default_poll_ms")]
    poll_ms: u64,
    #[serde(default = "default_ttl_secs")]
    default_ttl_secs: u64,
    #[serde(default = "default_ttl_secs")]
    max_ttl_secs: u64,
    tokens: RawTokens,
    #[serde(default)]
    status_listen: Option<SocketAddr>,
    #[serde(default)]
    log_format: LogFormat,
    #[serde(default)]
    limits: RawLimits,
}

/// `limits` as written; every field defaults to [`CaLimits::default`].
#[derive(Deserialize, Serialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
struct RawLimits {
    max_handshakes: usize,
    max_handshakes_per_source: usize,
    max_connections_per_source: usize,
    handshake_timeout_ms: u64,
}

impl Default for RawLimits {
    fn default() -> Self {
        let d = CaLimits::default();
        Self {
            max_handshakes: d.max_handshakes,
            max_handshakes_per_source: d.max_handshakes_per_source,
            max_connections_per_source: d.max_connections_per_source,
            handshake_timeout_ms: d.handshake_timeout.as_millis() as u64,
        }
    }
}

impl RawLimits {
    /// The typed limits, or the field (and why) that is out of range.
    fn check(self) -> Result<CaLimits, (&'static str, String)> {
        for (field, value) in [
            ("limits.maxHandshakes", self.max_handshakes),
            (
                "limits.maxHandshakesPerSource",
                self.max_handshakes_per_source,
            ),
            (
                "limits.maxConnectionsPerSource",
                self.max_connections_per_source,
            ),
        ] {
            if value == 0 {
                return Err((field, "must be at least 1".into()));
            }
        }
        if self.handshake_timeout_ms < 100 {
            return Err((
                "limits.handshakeTimeoutMs",
                format!(
                    "{} ms is below the minimum of 100 ms",
                    self.handshake_timeout_ms
                ),
            ));
        }
        Ok(CaLimits {
            max_handshakes: self.max_handshakes,
            max_handshakes_per_source: self.max_handshakes_per_source,
            max_connections_per_source: self.max_connections_per_source,
            handshake_timeout: Duration::from_millis(self.handshake_timeout_ms),
        })
    }
}

#[derive(Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawTokens {
    issuer: String,
    #[serde(default = "default_audiences")]
    audiences: Vec<String>,
    #[serde(default)]
    jwks_file: Option<PathBuf>,
    #[serde(default)]
    oidc_discovery: Option<String>,
    #[serde(default = "default_node_agents")]
    node_agents: Vec<String>,
    #[serde(default = "default_leeway_secs")]
    leeway_secs: u64,
    #[serde(default = "default_jwks_refresh_secs")]
    jwks_refresh_secs: u64,
    #[serde(default = "default_cluster_id")]
    cluster_id: String,
    #[serde(default)]
    require_cluster_id: bool,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 15012))
}
fn default_trust_domain() -> String {
    "cluster.local".to_owned()
}
fn default_root_ttl_secs() -> u64 {
    10 * 365 * 24 * 3600
}
fn default_serving_names() -> Vec<String> {
    vec!["ambit-ca".to_owned()]
}
fn default_poll_ms() -> u64 {
    500
}
fn default_ttl_secs() -> u64 {
    24 * 3600
}
fn default_audiences() -> Vec<String> {
    vec![DEFAULT_AUDIENCE.to_owned()]
}
fn default_node_agents() -> Vec<String> {
    vec![DEFAULT_NODE_AGENT.to_owned()]
}
fn default_leeway_secs() -> u64 {
    60
}
fn default_jwks_refresh_secs() -> u64 {
    300
}
fn default_cluster_id() -> String {
    DEFAULT_CLUSTER_ID.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "certDir: /ca\ninventory: /inv.yaml\ntokens:\n  issuer: https://k8s\n  jwksFile: /jwks.json\n";

    #[test]
    fn parses_minimal_config_with_defaults() {
        let cfg = CaConfig::parse(Path::new("ca.yaml"), MINIMAL).unwrap();
        assert_eq!(cfg.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(cfg.trust_domain.as_str(), "cluster.local");
        assert_eq!(cfg.tokens.audiences, [DEFAULT_AUDIENCE]);
        assert_eq!(cfg.tokens.node_agents, [DEFAULT_NODE_AGENT]);
        assert_eq!(cfg.tokens.keys, KeySource::JwksFile("/jwks.json".into()));
        assert_eq!(cfg.default_ttl, Duration::from_secs(86400));
        assert!(!cfg.generate);
        assert_eq!(
            cfg.tokens.cluster,
            ClusterPolicy {
                id: "Kubernetes".into(),
                required: false
            }
        );
    }

    #[test]
    fn cluster_id_can_be_required_and_must_be_ascii() {
        let text = MINIMAL.replace(
            "  jwksFile",
            "  clusterId: east\n  requireClusterId: true\n  jwksFile",
        );
        let cfg = CaConfig::parse(Path::new("ca.yaml"), &text).unwrap();
        assert_eq!(
            cfg.tokens.cluster,
            ClusterPolicy {
                id: "east".into(),
                required: true
            }
        );
        for bad in ["\"\"", "\"two words\""] {
            let text = MINIMAL.replace("  jwksFile", &format!("  clusterId: {bad}\n  jwksFile"));
            let err = CaConfig::parse(Path::new("ca.yaml"), &text).unwrap_err();
            assert!(
                matches!(
                    err,
                    ConfigError::Invalid {
                        field: "tokens.clusterId",
                        ..
                    }
                ),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn limits_default_and_can_be_set() {
        let cfg = CaConfig::parse(Path::new("ca.yaml"), MINIMAL).unwrap();
        assert_eq!(cfg.limits, CaLimits::default());
        let text = format!(
            "{MINIMAL}limits:\n  maxHandshakesPerSource: 2\n  maxConnectionsPerSource: 5\n  \
             handshakeTimeoutMs: 700\n"
        );
        let cfg = CaConfig::parse(Path::new("ca.yaml"), &text).unwrap();
        assert_eq!(
            cfg.limits,
            CaLimits {
                max_handshakes_per_source: 2,
                max_connections_per_source: 5,
                handshake_timeout: Duration::from_millis(700),
                ..CaLimits::default()
            }
        );
        for (bad, field) in [
            ("maxHandshakes: 0", "limits.maxHandshakes"),
            (
                "maxConnectionsPerSource: 0",
                "limits.maxConnectionsPerSource",
            ),
            ("handshakeTimeoutMs: 5", "limits.handshakeTimeoutMs"),
            ("maxStreams: 5", "limits.maxStreams"),
        ] {
            let text = format!("{MINIMAL}limits:\n  {bad}\n");
            let err = CaConfig::parse(Path::new("ca.yaml"), &text)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(field) || err.contains("maxStreams"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn names_file_field_and_line_on_bad_value() {
        let text = format!("{MINIMAL}maxTtlSecs: soon\n");
        let err = CaConfig::parse(Path::new("ca.yaml"), &text)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("ca.yaml") && err.contains("maxTtlSecs") && err.contains("line 6"),
            "{err}"
        );
    }

    #[test]
    fn rejects_malformed_node_agent_subject() {
        let text = MINIMAL.replace(
            "  jwksFile",
            "  nodeAgents: [ambit-system/ambit]\n  jwksFile",
        );
        let err = CaConfig::parse(Path::new("ca.yaml"), &text).unwrap_err();
        assert!(
            matches!(
                err,
                ConfigError::Invalid {
                    field: "tokens.nodeAgents",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn inventory_accepts_a_path_or_the_kubernetes_api() {
        let cfg = CaConfig::parse(Path::new("ca.yaml"), MINIMAL).unwrap();
        assert_eq!(cfg.inventory, CaInventory::File("/inv.yaml".into()));
        let text = MINIMAL.replace(
            "inventory: /inv.yaml",
            "inventory: {kind: kubernetes, kubeconfig: /kc}",
        );
        let cfg = CaConfig::parse(Path::new("ca.yaml"), &text).unwrap();
        let CaInventory::Kubernetes(k) = cfg.inventory else {
            panic!("not kubernetes: {:?}", cfg.inventory);
        };
        assert_eq!(k.kubeconfig.as_deref(), Some(Path::new("/kc")));
        let text = MINIMAL.replace("inventory: /inv.yaml", "inventory: {kind: etcd}");
        let err = CaConfig::parse(Path::new("ca.yaml"), &text)
            .unwrap_err()
            .to_string();
        assert!(err.contains("inventory"), "{err}");
        let text = MINIMAL.replace("inventory: /inv.yaml", "inventory: {kind: istiod}");
        let err = CaConfig::parse(Path::new("ca.yaml"), &text)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("inventory.kind: istiod is an agent's inventory"),
            "{err}"
        );
    }

    #[test]
    fn parses_oidc_discovery_and_rejects_a_non_url() {
        let text = MINIMAL.replace(
            "  jwksFile: /jwks.json",
            "  oidcDiscovery: https://kubernetes.default.svc\n  jwksRefreshSecs: 30",
        );
        let cfg = CaConfig::parse(Path::new("ca.yaml"), &text).unwrap();
        assert_eq!(
            cfg.tokens.keys,
            KeySource::OidcDiscovery("https://kubernetes.default.svc".into())
        );
        assert_eq!(cfg.tokens.jwks_refresh, Duration::from_secs(30));
        let text = MINIMAL.replace("  jwksFile: /jwks.json", "  oidcDiscovery: kubernetes");
        let err = CaConfig::parse(Path::new("ca.yaml"), &text).unwrap_err();
        assert!(
            matches!(
                err,
                ConfigError::Invalid {
                    field: "tokens.oidcDiscovery",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn requires_exactly_one_key_source() {
        let text = MINIMAL.replace("  jwksFile", "  oidcDiscovery: https://k8s\n  jwksFile");
        let err = CaConfig::parse(Path::new("ca.yaml"), &text).unwrap_err();
        assert!(
            matches!(
                err,
                ConfigError::Invalid {
                    field: "tokens",
                    ..
                }
            ),
            "{err}"
        );
    }
}
