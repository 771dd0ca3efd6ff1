//! L4 AuthorizationPolicy (security.istio.io/v1): Istio's YAML, evaluated on proven identity, namespace, IP and port.
//!
//! Order, as Istio: any matching DENY policy denies; with no ALLOW policy the connection is
//! allowed; otherwise some ALLOW policy must match. Fields ambit cannot check at L4 (methods,
//! paths, hosts, request principals, non-L4 `when` keys) fail safe: an ALLOW rule using them
//! never matches, a DENY rule using them always does; both are reported by [`unsupported`].
//! A policy with `targetRef(s)`, or with action AUDIT or CUSTOM, is not the node proxy's
//! ([`NotForNodeProxy`], as istiod decides for ztunnel). Policies are evaluated compiled
//! ([`Policies`], built once per inventory snapshot).
pub mod compiled;
pub mod scope;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use compiled::{CompileError, Failure, Policies};
pub use scope::{Mesh, NotForNodeProxy, TargetRef};

use super::peer_auth::Selector;
use crate::identity::SpiffeId;
use crate::meta::ObjectMeta;
use crate::policy::destination_rule::Ignored;

/// `spec.action`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Action {
    /// Allow matching connections (the default).
    #[default]
    Allow,
    /// Deny matching connections.
    Deny,
    /// Audit logging: not the node proxy's (see [`NotForNodeProxy::Audit`]).
    Audit,
    /// External authorizer: not the node proxy's (see [`NotForNodeProxy::Custom`]).
    Custom,
}

/// `rules[].from[].source`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    /// Service accounts as `namespace/name` (Istio 1.24+).
    #[serde(default)]
    pub service_accounts: Vec<String>,
    /// Negated `serviceAccounts`.
    #[serde(default)]
    pub not_service_accounts: Vec<String>,
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub not_principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    #[serde(default)]
    pub ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_ip_blocks: Vec<String>,
    #[serde(default)]
    pub remote_ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_remote_ip_blocks: Vec<String>,
    #[serde(default)]
    pub request_principals: Vec<String>,
    #[serde(default)]
    pub not_request_principals: Vec<String>,
}

/// `rules[].to[].operation`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    #[serde(default)]
    pub ports: Vec<String>,
    #[serde(default)]
    pub not_ports: Vec<String>,
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub not_hosts: Vec<String>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub not_methods: Vec<String>,
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub not_paths: Vec<String>,
}

/// `rules[].from[]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct From {
    #[serde(default)]
    pub source: Source,
}

/// `rules[].to[]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct To {
    #[serde(default)]
    pub operation: Operation,
}

/// `rules[].when[]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    pub key: String,
    #[serde(default)]
    pub values: Vec<String>,
    #[serde(default)]
    pub not_values: Vec<String>,
}

/// One rule: all of `from`, `to` and `when` must match (each list matches if any entry does).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    #[serde(default)]
    pub from: Vec<From>,
    #[serde(default)]
    pub to: Vec<To>,
    #[serde(default)]
    pub when: Vec<Condition>,
}

/// `spec` of an AuthorizationPolicy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    /// The one object whose proxy enforces the policy: then the node proxy does not.
    #[serde(default)]
    pub target_ref: Option<TargetRef>,
    /// The objects whose proxies enforce the policy: then the node proxy does not.
    #[serde(default)]
    pub target_refs: Vec<TargetRef>,
    /// Istio field ambit does not use; accepted so valid objects load.
    #[serde(default)]
    pub provider: Ignored,
    #[serde(default)]
    pub selector: Option<Selector>,
    #[serde(default)]
    pub action: Action,
    #[serde(default)]
    pub rules: Vec<Rule>,
}

/// An AuthorizationPolicy object.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct AuthorizationPolicy {
    /// Metadata.
    pub metadata: ObjectMeta,
    /// Spec.
    #[serde(default)]
    pub spec: AuthorizationPolicySpec,
    /// Why the object could not be read, when the Kubernetes source keeps it only to fail
    /// closed (no good version of it was ever seen): `spec` then holds what could be read
    /// (the selector and action, an unreadable action read as DENY) and no rules.
    #[serde(skip)]
    pub unreadable: Option<String>,
}

/// What is known about a connection when it is authorized.
#[derive(Debug, Clone)]
pub struct ConnAttrs {
    /// Proven peer identity; `None` for plaintext.
    pub peer: Option<SpiffeId>,
    /// Source IP.
    pub src_ip: IpAddr,
    /// Destination (target) port.
    pub dst_port: u16,
    /// Destination IP.
    pub dst_ip: IpAddr,
}

impl ConnAttrs {
    /// The proven identity as Istio's `principals` name it: without `spiffe://`
    /// (`td/ns/NS/sa/SA`).
    pub fn principal(&self) -> Option<&str> {
        self.peer
            .as_ref()
            .map(|id| id.as_str().strip_prefix("spiffe://").unwrap_or(id.as_str()))
    }
}

/// The decision for one connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Decision {
    /// Allowed; names the ALLOW policy that matched, if any.
    Allow {
        /// `namespace/name`, shared with the compiled policy (a decision allocates nothing).
        #[serde(serialize_with = "name_or_none")]
        policy: Option<Arc<str>>,
    },
    /// Denied by a matching DENY policy.
    Denied {
        /// `namespace/name`.
        #[serde(serialize_with = "name")]
        policy: Arc<str>,
    },
    /// ALLOW policies exist and none matched.
    NotAllowed,
}

/// Serializes a policy name as a string (serde's `rc` feature is not enabled).
fn name<S: serde::Serializer>(policy: &Arc<str>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(policy)
}

fn name_or_none<S: serde::Serializer>(policy: &Option<Arc<str>>, s: S) -> Result<S::Ok, S::Error> {
    match policy {
        Some(p) => s.serialize_some(&**p),
        None => s.serialize_none(),
    }
}

impl Decision {
    /// Whether the connection may proceed.
    pub fn allowed(&self) -> bool {
        matches!(self, Self::Allow { .. })
    }
}

impl AuthorizationPolicy {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.metadata.namespace, self.metadata.name)
    }

    /// Whether this policy applies to a workload in `namespace` with `labels`.
    pub fn applies_to(
        &self,
        root_namespace: &str,
        namespace: &str,
        labels: &BTreeMap<String, String>,
    ) -> bool {
        let in_scope =
            self.metadata.namespace == namespace || self.metadata.namespace == root_namespace;
        in_scope
            && self
                .spec
                .selector
                .as_ref()
                .is_none_or(|s| s.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v)))
    }
}

/// The fields of a policy ambit cannot enforce at L4, as `rules[i].field` paths.
pub fn unsupported(p: &AuthorizationPolicy) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(problem) = &p.unreadable {
        out.push(format!("spec: unreadable ({problem})"));
    }
    for (i, r) in p.spec.rules.iter().enumerate() {
        for f in unsupported_fields(r) {
            out.push(format!("spec.rules[{i}].{f}"));
        }
    }
    out
}

pub(crate) fn unsupported_fields(r: &Rule) -> Vec<&'static str> {
    let mut out = Vec::new();
    for f in &r.from {
        let s = &f.source;
        if !s.request_principals.is_empty() || !s.not_request_principals.is_empty() {
            out.push("from.source.requestPrincipals");
        }
    }
    for t in &r.to {
        let o = &t.operation;
        if !o.methods.is_empty() || !o.not_methods.is_empty() {
            out.push("to.operation.methods");
        }
        if !o.paths.is_empty() || !o.not_paths.is_empty() {
            out.push("to.operation.paths");
        }
        if !o.hosts.is_empty() || !o.not_hosts.is_empty() {
            out.push("to.operation.hosts");
        }
    }
    for w in &r.when {
        if !L4_KEYS.contains(&w.key.as_str()) {
            out.push("when (non-L4 key)");
        }
    }
    out
}

const L4_KEYS: &[&str] = &[
    "source.ip",
    "source.namespace",
    "source.principal",
    "destination.ip",
    "destination.port",
];

/// Checks what must be rejected at load (the policy must compile, its scope be one Istio
/// accepts); returns (field, message).
pub fn validate(p: &AuthorizationPolicy) -> Result<(), (String, String)> {
    compiled::compile(p)
        .map(drop)
        .map_err(|e| (e.field().to_string(), e.to_string()))
}

#[cfg(test)]
mod tests;
