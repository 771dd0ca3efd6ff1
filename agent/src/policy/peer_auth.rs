//! PeerAuthentication (security.istio.io v1/v1beta1): parse Istio's YAML and resolve the effective mTLS mode.
//!
//! Resolution, as Istio: mesh (root namespace, no selector) < namespace (no selector) <
//! workload (`selector.matchLabels`) < that workload policy's `portLevelMtls` for the target
//! port. `UNSET` inherits from the level above; nothing set means PERMISSIVE. Where several
//! policies compete at one level, the oldest (`creationTimestamp`, then name) wins.
use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::meta::ObjectMeta;

/// The root namespace whose selector-less policy applies mesh-wide, unless configured.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

/// An mTLS mode as written in a policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Mode {
    /// Inherit from the level above.
    #[default]
    Unset,
    /// Accept mTLS and plaintext.
    Permissive,
    /// Accept only mTLS.
    Strict,
    /// Plaintext: peers send plaintext to this workload.
    Disable,
}

/// The effective mode for one workload and port (never `Unset`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Effective {
    /// Accept mTLS and plaintext.
    Permissive,
    /// Accept only mTLS.
    Strict,
    /// Plaintext.
    Disable,
}

impl fmt::Display for Effective {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Permissive => "PERMISSIVE",
            Self::Strict => "STRICT",
            Self::Disable => "DISABLE",
        })
    }
}

/// `spec.mtls` / a `portLevelMtls` entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MtlsSpec {
    /// The mode.
    #[serde(default)]
    pub mode: Mode,
}

/// `spec.selector`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Selector {
    /// Labels a workload must all carry.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

/// `spec` of a PeerAuthentication.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthenticationSpec {
    /// Workload selector; absent = namespace-wide (or mesh-wide in the root namespace).
    #[serde(default)]
    pub selector: Option<Selector>,
    /// Mode for all ports.
    #[serde(default)]
    pub mtls: Option<MtlsSpec>,
    /// Per target port modes (only honoured with a selector, as in Istio).
    #[serde(default)]
    pub port_level_mtls: BTreeMap<u32, MtlsSpec>,
}

/// A PeerAuthentication object.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PeerAuthentication {
    /// Metadata.
    pub metadata: ObjectMeta,
    /// Spec.
    #[serde(default)]
    pub spec: PeerAuthenticationSpec,
}

impl PeerAuthentication {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.metadata.namespace, self.metadata.name)
    }

    fn mode(&self) -> Mode {
        self.spec.mtls.as_ref().map(|m| m.mode).unwrap_or_default()
    }

    fn age_key(&self) -> (&str, &str) {
        // RFC 3339 timestamps in UTC sort lexically; a missing timestamp sorts first, as an
        // object without one cannot be proved younger.
        (
            self.metadata.creation_timestamp.as_deref().unwrap_or(""),
            self.metadata.name.as_str(),
        )
    }
}

/// The effective mode for a port, and which policy decided it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Resolution {
    /// The mode.
    pub mode: Effective,
    /// `namespace/name` of the deciding policy; `None` for the built-in default.
    pub policy: Option<String>,
    /// The level that decided: `default`, `mesh`, `namespace`, `workload` or `port`.
    pub level: &'static str,
}

/// Resolves the effective mode for a workload in `namespace` with `labels`, on target `port`.
pub fn resolve(
    policies: &[PeerAuthentication],
    root_namespace: &str,
    namespace: &str,
    labels: &BTreeMap<String, String>,
    port: u16,
) -> Resolution {
    // By reference: this runs per connection, and a policy is many strings and maps.
    fn oldest<'a>(
        it: impl Iterator<Item = &'a PeerAuthentication>,
    ) -> Option<&'a PeerAuthentication> {
        it.min_by(|a, b| a.age_key().cmp(&b.age_key()))
    }
    let mesh = oldest(
        policies
            .iter()
            .filter(|p| p.metadata.namespace == root_namespace && p.spec.selector.is_none()),
    );
    let ns = oldest(
        policies
            .iter()
            .filter(|p| p.metadata.namespace == namespace && p.spec.selector.is_none()),
    );
    let workload = oldest(policies.iter().filter(|p| {
        p.metadata.namespace == namespace
            && p.spec
                .selector
                .as_ref()
                .is_some_and(|s| s.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v)))
    }));
    // The deciding policy is named (formatted) once, at the end.
    let mut decided: Option<(Effective, &PeerAuthentication, &'static str)> = None;
    let mut apply = |mode: Mode, p, level: &'static str| {
        let mode = match mode {
            Mode::Unset => return,
            Mode::Permissive => Effective::Permissive,
            Mode::Strict => Effective::Strict,
            Mode::Disable => Effective::Disable,
        };
        decided = Some((mode, p, level));
    };
    if let Some(p) = mesh {
        apply(p.mode(), p, "mesh");
    }
    if let Some(p) = ns {
        // A selector-less policy in the root namespace is the mesh policy, not a namespace one.
        if namespace != root_namespace {
            apply(p.mode(), p, "namespace");
        }
    }
    if let Some(p) = workload {
        apply(p.mode(), p, "workload");
        if let Some(pl) = p.spec.port_level_mtls.get(&u32::from(port)) {
            apply(pl.mode, p, "port");
        }
    }
    match decided {
        Some((mode, p, level)) => Resolution {
            mode,
            policy: Some(p.key()),
            level,
        },
        None => Resolution {
            mode: Effective::Permissive,
            policy: None,
            level: "default",
        },
    }
}

/// The effective mode of a workload on every port, and the ports that differ.
#[derive(Debug, Clone, Serialize)]
pub struct Explained {
    /// The mode on ports without a port-level setting.
    pub default: Resolution,
    /// Ports whose mode comes from `portLevelMtls`.
    pub ports: BTreeMap<u16, Resolution>,
}

/// Resolves the mode on every port of a workload (see [`resolve`]).
pub fn explain(
    policies: &[PeerAuthentication],
    root_namespace: &str,
    namespace: &str,
    labels: &BTreeMap<String, String>,
) -> Explained {
    // Port 0 is never a target port, so it yields the workload-wide answer.
    let default = resolve(policies, root_namespace, namespace, labels, 0);
    let mut ports = BTreeMap::new();
    let selected = policies.iter().filter(|p| {
        p.metadata.namespace == namespace
            && p.spec
                .selector
                .as_ref()
                .is_some_and(|s| s.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v)))
    });
    for p in selected {
        for port in p
            .spec
            .port_level_mtls
            .keys()
            .filter_map(|p| u16::try_from(*p).ok())
        {
            let r = resolve(policies, root_namespace, namespace, labels, port);
            if r.level == "port" {
                ports.insert(port, r);
            }
        }
    }
    Explained { default, ports }
}

/// Checks what Istio's validation rejects; returns (field, message).
pub fn validate(p: &PeerAuthentication) -> Result<(), (String, String)> {
    if !p.spec.port_level_mtls.is_empty() && p.spec.selector.is_none() {
        return Err((
            "spec.portLevelMtls".into(),
            "portLevelMtls requires a workload selector".into(),
        ));
    }
    for port in p.spec.port_level_mtls.keys() {
        if *port == 0 || *port > 65535 {
            return Err((
                format!("spec.portLevelMtls.{port}"),
                "port must be 1-65535".into(),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
