//! Which AuthorizationPolicies a node proxy applies (as istiod decides for ztunnel), and what a decision needs to know about the mesh.
//!
//! istiod's compilation of policies for ztunnel
//! (`pilot/pkg/serviceregistry/kube/controller/ambient/authorization.go`) drops three kinds of
//! policy before a node proxy ever sees them: one with `targetRef`/`targetRefs` (its waypoint,
//! gateway or Service's waypoint enforces it), `action: AUDIT` and `action: CUSTOM` (ztunnel
//! knows only ALLOW and DENY; sidecars and waypoints audit and call external authorizers).
//! ambit drops the same ones and says why ([`NotForNodeProxy`]).
use std::fmt;

use serde::Deserialize;

use super::{Action, AuthorizationPolicy};

/// `spec.targetRef` or one of `spec.targetRefs`: the object whose proxy enforces the policy
/// (a Gateway or GatewayClass, a Service or ServiceEntry through its waypoint).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TargetRef {
    /// API group (`gateway.networking.k8s.io`; empty for core).
    #[serde(default)]
    pub group: String,
    /// Kind (`Gateway`, `Service`, ...).
    #[serde(default)]
    pub kind: String,
    /// Name, in the policy's namespace.
    #[serde(default)]
    pub name: String,
    /// Namespace (Istio refuses a reference to another namespace; read so it loads as Istio's
    /// schema allows).
    #[serde(default)]
    pub namespace: String,
}

impl fmt::Display for TargetRef {
    /// `Kind/name`, as an operator names the object.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let or_unknown = |s: &str| if s.is_empty() { "?" } else { s }.to_string();
        write!(f, "{}/{}", or_unknown(&self.kind), or_unknown(&self.name))
    }
}

/// Why a node proxy does not apply a policy: istiod sends ztunnel none of these.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotForNodeProxy {
    /// The policy names where it is enforced (`targetRef`/`targetRefs`).
    Targeted(Vec<TargetRef>),
    /// `action: AUDIT`: only proxies that log requests (sidecars, waypoints) audit.
    Audit,
    /// `action: CUSTOM`: only sidecars and waypoints call an external authorizer.
    Custom,
}

impl fmt::Display for NotForNodeProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Targeted(targets) => {
                f.write_str("targetRefs: ")?;
                for (i, t) in targets.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{t}")?;
                }
                Ok(())
            }
            Self::Audit => f.write_str(
                "action AUDIT: ztunnel does not apply it either; sidecars and waypoints audit",
            ),
            Self::Custom => f.write_str(
                "action CUSTOM: ztunnel does not apply it either; sidecars and waypoints call \
                 the external authorizer",
            ),
        }
    }
}

impl AuthorizationPolicy {
    /// Every target of the policy: `targetRef`, then `targetRefs`.
    pub fn targets(&self) -> impl Iterator<Item = &TargetRef> {
        self.spec.target_ref.iter().chain(&self.spec.target_refs)
    }

    /// Why the node proxy does not apply this policy, or `None` when it does. Targets decide
    /// first, as in istiod: a targeted DENY is the waypoint's, not a node-wide DENY.
    pub fn not_for_node_proxy(&self) -> Option<NotForNodeProxy> {
        let targets: Vec<TargetRef> = self.targets().cloned().collect();
        if !targets.is_empty() {
            return Some(NotForNodeProxy::Targeted(targets));
        }
        match self.spec.action {
            Action::Allow | Action::Deny => None,
            Action::Audit => Some(NotForNodeProxy::Audit),
            Action::Custom => Some(NotForNodeProxy::Custom),
        }
    }
}

/// What an authorization decision needs from the agent's config.
#[derive(Debug, Clone, Copy)]
pub struct Mesh<'a> {
    /// Istio's root namespace: its policies apply to the pods of every namespace.
    pub root_namespace: &'a str,
    /// The mesh's trust domain.
    pub trust_domain: &'a str,
    /// Istio's `trustDomainAliases`: identities in these trust domains are the mesh's own.
    pub trust_domain_aliases: &'a [String],
}

impl<'a> Mesh<'a> {
    /// A mesh of `trust_domain` without aliases, its root namespace `root_namespace`.
    pub const fn new(root_namespace: &'a str, trust_domain: &'a str) -> Self {
        Self {
            root_namespace,
            trust_domain,
            trust_domain_aliases: &[],
        }
    }

    /// The trust domain, then its aliases (Istio's trust domain bundle, in its order).
    pub fn trust_domains(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.trust_domain)
            .chain(self.trust_domain_aliases.iter().map(String::as_str))
    }
}

/// What Istio's validation refuses in a policy's scope: `(field, problem)`.
pub(super) fn check(p: &AuthorizationPolicy) -> Result<(), (String, &'static str)> {
    let s = &p.spec;
    let set = [
        s.selector.is_some(),
        s.target_ref.is_some(),
        !s.target_refs.is_empty(),
    ];
    if set.into_iter().filter(|x| *x).count() > 1 {
        return Err((
            "spec".into(),
            "only one of selector, targetRef and targetRefs may be set",
        ));
    }
    let fields = s
        .target_ref
        .iter()
        .map(|t| ("spec.targetRef".to_string(), t))
        .chain(
            s.target_refs
                .iter()
                .enumerate()
                .map(|(i, t)| (format!("spec.targetRefs[{i}]"), t)),
        );
    for (at, t) in fields {
        if t.kind.is_empty() {
            return Err((format!("{at}.kind"), "must be set"));
        }
        if t.name.is_empty() {
            return Err((format!("{at}.name"), "must be set"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
