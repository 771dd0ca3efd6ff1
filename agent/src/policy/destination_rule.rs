//! DestinationRule (networking.istio.io v1/v1beta1): the client side's TLS mode per host and port.
use serde::{Deserialize, Serialize};

use crate::meta::ObjectMeta;

/// An Istio field ambit accepts but does not use.
pub type Ignored = Option<serde_json::Value>;

/// `trafficPolicy.tls.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TlsMode {
    /// Plaintext.
    Disable,
    /// Istio mTLS (HBONE here): must tunnel.
    IstioMutual,
    /// Originate TLS with a given CA: not done by ambit (L4); treated as passthrough of the app's bytes.
    Simple,
    /// Originate mTLS with given certificates: as SIMPLE.
    Mutual,
}

impl std::fmt::Display for TlsMode {
    /// As written in a DestinationRule (`ISTIO_MUTUAL`).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Disable => "DISABLE",
            Self::IstioMutual => "ISTIO_MUTUAL",
            Self::Simple => "SIMPLE",
            Self::Mutual => "MUTUAL",
        })
    }
}

/// `tls`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsSettings {
    /// Istio field ambit does not use; accepted so valid objects load.
    #[serde(default)]
    pub client_certificate: Ignored,
    /// Istio field ambit does not use; accepted so valid objects load.
    #[serde(default)]
    pub private_key: Ignored,
    /// Istio field ambit does not use; accepted so valid objects load.
    #[serde(default)]
    pub ca_certificates: Ignored,
    /// Istio field ambit does not use; accepted so valid objects load.
    #[serde(default)]
    pub credential_name: Ignored,
    /// Istio field ambit does not use; accepted so valid objects load.
    #[serde(default)]
    pub subject_alt_names: Ignored,
    /// Istio field ambit does not use; accepted so valid objects load.
    #[serde(default)]
    pub sni: Ignored,
    /// Istio field ambit does not use; accepted so valid objects load.
    #[serde(default)]
    pub insecure_skip_verify: Ignored,
    /// Istio field ambit does not use; accepted so valid objects load.
    #[serde(default)]
    pub ca_crl: Ignored,
    /// Mode.
    pub mode: TlsMode,
}

/// `port`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortSelector {
    /// Service port number.
    pub number: u16,
}

/// `portLevelSettings[]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortTrafficPolicy {
    /// Istio field ambit does not use; accepted so valid objects load.
    #[serde(default)]
    pub load_balancer: Ignored,
    /// Istio field ambit does not use; accepted so valid objects load.
    #[serde(default)]
    pub connection_pool: Ignored,
    /// Istio field ambit does not use; accepted so valid objects load.
    #[serde(default)]
    pub outlier_detection: Ignored,
    /// Which port.
    pub port: PortSelector,
    /// TLS for that port.
    #[serde(default)]
    pub tls: Option<TlsSettings>,
}

/// `trafficPolicy`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficPolicy {
    /// Istio field ambit does not use; accepted so valid objects load.
    #[serde(default)]
    pub load_balancer: Ignored,
    /// Istio field ambit does not use; accepted so valid objects load.
    #[serde(default)]
    pub connection_pool: Ignored,
    /// Istio field ambit does not use; accepted so valid objects load.
    #[serde(default)]
    pub outlier_detection: Ignored,
    /// Istio field ambit does not use; accepted so valid objects load.
    #[serde(default)]
    pub tunnel: Ignored,
    /// Istio field ambit does not use; accepted so valid objects load.
    #[serde(default)]
    pub proxy_protocol: Ignored,
    /// TLS for every port.
    #[serde(default)]
    pub tls: Option<TlsSettings>,
    /// Per-port overrides.
    #[serde(default)]
    pub port_level_settings: Vec<PortTrafficPolicy>,
}

/// `spec`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DestinationRuleSpec {
    /// Istio field ambit does not use; accepted so valid objects load.
    #[serde(default)]
    pub subsets: Ignored,
    /// Istio field ambit does not use; accepted so valid objects load.
    #[serde(default)]
    pub export_to: Ignored,
    /// Istio field ambit does not use; accepted so valid objects load.
    #[serde(default)]
    pub workload_selector: Ignored,
    /// Host: a Service FQDN, or a short name resolved in the rule's namespace.
    pub host: String,
    /// Policy.
    #[serde(default)]
    pub traffic_policy: Option<TrafficPolicy>,
}

/// A DestinationRule object.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct DestinationRule {
    /// Metadata.
    pub metadata: ObjectMeta,
    /// Spec.
    #[serde(default)]
    pub spec: DestinationRuleSpec,
}

/// The TLS mode a client must use for a service port, and the rule that said so.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClientTls {
    /// Mode.
    pub mode: TlsMode,
    /// `namespace/name` of the rule.
    pub rule: String,
}

impl DestinationRule {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.metadata.namespace, self.metadata.name)
    }

    /// Whether the rule's host names `svc`.
    pub fn matches(&self, svc: ServiceName<'_>, cluster_domain: &str) -> bool {
        let host = self.spec.host.trim_end_matches('.');
        if host.contains('.') {
            // `name.ns`, `name.ns.svc` and the full FQDN all name the service.
            let candidates = [
                format!("{}.{}", svc.name, svc.namespace),
                format!("{}.{}.svc", svc.name, svc.namespace),
                format!("{}.{}.svc.{cluster_domain}", svc.name, svc.namespace),
            ];
            candidates.iter().any(|c| c == host)
        } else {
            host == svc.name && self.metadata.namespace == svc.namespace
        }
    }
}

/// A Service as a DestinationRule's host names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceName<'a> {
    /// The Service's namespace.
    pub namespace: &'a str,
    /// The Service's name.
    pub name: &'a str,
}

/// The client TLS mode for `svc` on service port `port` (oldest matching rule wins, as Istio
/// merges by creation time); `None` when no rule applies.
pub fn client_tls(
    rules: &[DestinationRule],
    svc: ServiceName<'_>,
    port: u16,
    cluster_domain: &str,
) -> Option<ClientTls> {
    let rule = rules
        .iter()
        .filter(|r| r.matches(svc, cluster_domain))
        .min_by(|a, b| {
            let ka = (
                a.metadata.creation_timestamp.as_deref().unwrap_or(""),
                a.metadata.name.as_str(),
            );
            let kb = (
                b.metadata.creation_timestamp.as_deref().unwrap_or(""),
                b.metadata.name.as_str(),
            );
            ka.cmp(&kb)
        })?;
    let tp = rule.spec.traffic_policy.as_ref()?;
    let port_level = tp
        .port_level_settings
        .iter()
        .find(|p| p.port.number == port)
        .and_then(|p| p.tls.as_ref());
    let tls = port_level.or(tp.tls.as_ref())?;
    Some(ClientTls {
        mode: tls.mode,
        rule: rule.key(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc() -> ServiceName<'static> {
        ServiceName {
            name: "server",
            namespace: "shop",
        }
    }

    fn rule(ns: &str, host: &str, extra: &str) -> DestinationRule {
        let text = format!("metadata:\n  name: r\n  namespace: {ns}\nspec:\n  host: {host}\n  trafficPolicy:\n    tls:\n      mode: ISTIO_MUTUAL\n{extra}");
        crate::yaml::from_str(&text).unwrap()
    }

    #[test]
    fn host_forms_resolve_like_istio() {
        let s = svc();
        assert!(rule("shop", "server", "").matches(s, "cluster.local"));
        assert!(
            !rule("other", "server", "").matches(s, "cluster.local"),
            "short names resolve in the rule's namespace"
        );
        assert!(rule("other", "server.shop.svc.cluster.local", "").matches(s, "cluster.local"));
        assert!(rule("other", "server.shop", "").matches(s, "cluster.local"));
        assert!(!rule("shop", "client", "").matches(s, "cluster.local"));
    }

    #[test]
    fn port_level_overrides_the_rule() {
        let r = rule("shop", "server", "    portLevelSettings:\n    - port:\n        number: 8080\n      tls:\n        mode: DISABLE\n");
        let s = svc();
        assert_eq!(
            client_tls(std::slice::from_ref(&r), s, 8080, "cluster.local").map(|c| c.mode),
            Some(TlsMode::Disable)
        );
        assert_eq!(
            client_tls(&[r], s, 9000, "cluster.local").map(|c| c.mode),
            Some(TlsMode::IstioMutual)
        );
    }
}
