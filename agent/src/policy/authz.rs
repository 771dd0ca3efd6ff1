//! L4 AuthorizationPolicy (security.istio.io/v1): Istio's YAML, evaluated on proven identity, namespace, IP and port.
//!
//! Order, as Istio: any matching DENY policy denies; with no ALLOW policy the connection is
//! allowed; otherwise some ALLOW policy must match. Fields ambit cannot check at L4 (methods,
//! paths, hosts, request principals, non-L4 `when` keys) fail safe: an ALLOW rule using them
//! never matches, a DENY rule using them always does; both are reported by [`unsupported`].
use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::peer_auth::Selector;
use crate::inventory::objects::ObjectMeta;
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
    /// Log only: no effect on the decision.
    Audit,
    /// External authorizer: not supported at L4; treated as a DENY that always matches.
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
    /// Istio field ambit does not use; accepted so valid objects load.
    #[serde(default)]
    pub target_ref: Ignored,
    /// Istio field ambit does not use; accepted so valid objects load.
    #[serde(default)]
    pub target_refs: Ignored,
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
}

/// What is known about a connection when it is authorized.
#[derive(Debug, Clone)]
pub struct ConnAttrs {
    /// Proven peer identity without `spiffe://` (`td/ns/x/sa/y`); `None` for plaintext.
    pub principal: Option<String>,
    /// Source namespace, from the proven identity; `None` for plaintext.
    pub namespace: Option<String>,
    /// Source IP.
    pub src_ip: IpAddr,
    /// Destination (target) port.
    pub dst_port: u16,
    /// Destination IP.
    pub dst_ip: IpAddr,
}

/// The decision for one connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Decision {
    /// Allowed; names the ALLOW policy that matched, if any.
    Allow { policy: Option<String> },
    /// Denied by a matching DENY policy.
    Denied { policy: String },
    /// ALLOW policies exist and none matched.
    NotAllowed,
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

    fn matches(&self, c: &ConnAttrs) -> bool {
        let fail_safe = self.spec.action != Action::Allow; // DENY (and CUSTOM): unsupported ⇒ match
        self.spec
            .rules
            .iter()
            .any(|r| rule_matches(r, c, fail_safe))
    }
}

/// Decides a connection to a workload in `namespace` with `labels`.
pub fn evaluate(
    policies: &[AuthorizationPolicy],
    root_namespace: &str,
    namespace: &str,
    labels: &BTreeMap<String, String>,
    c: &ConnAttrs,
) -> Decision {
    let applicable: Vec<&AuthorizationPolicy> = policies
        .iter()
        .filter(|p| p.applies_to(root_namespace, namespace, labels))
        .collect();
    for p in applicable
        .iter()
        .filter(|p| matches!(p.spec.action, Action::Deny | Action::Custom))
    {
        if p.spec.action == Action::Custom || p.matches(c) {
            return Decision::Denied { policy: p.key() };
        }
    }
    let allows: Vec<&&AuthorizationPolicy> = applicable
        .iter()
        .filter(|p| p.spec.action == Action::Allow)
        .collect();
    if allows.is_empty() {
        return Decision::Allow { policy: None };
    }
    match allows.iter().find(|p| p.matches(c)) {
        Some(p) => Decision::Allow {
            policy: Some(p.key()),
        },
        None => Decision::NotAllowed,
    }
}

/// The fields of a policy ambit cannot enforce at L4, as `rules[i].field` paths.
pub fn unsupported(p: &AuthorizationPolicy) -> Vec<String> {
    let mut out = Vec::new();
    if p.spec.action == Action::Custom {
        out.push("spec.action: CUSTOM".to_string());
    }
    for (i, r) in p.spec.rules.iter().enumerate() {
        for f in unsupported_fields(r) {
            out.push(format!("spec.rules[{i}].{f}"));
        }
    }
    out
}

fn unsupported_fields(r: &Rule) -> Vec<&'static str> {
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

fn rule_matches(r: &Rule, c: &ConnAttrs, fail_safe: bool) -> bool {
    if !unsupported_fields(r).is_empty() {
        return fail_safe;
    }
    let from = r.from.is_empty() || r.from.iter().any(|f| source_matches(&f.source, c));
    let to = r.to.is_empty() || r.to.iter().any(|t| operation_matches(&t.operation, c));
    let when = r.when.iter().all(|w| condition_matches(w, c));
    from && to && when
}

fn source_matches(s: &Source, c: &ConnAttrs) -> bool {
    let principal = c.principal.as_deref();
    let namespace = c.namespace.as_deref();
    positive(&s.principals, |p| principal.is_some_and(|v| string_match(p, v)))
        && negative(&s.not_principals, |p| principal.is_some_and(|v| string_match(p, v)))
        && positive(&s.namespaces, |p| namespace.is_some_and(|v| string_match(p, v)))
        && negative(&s.not_namespaces, |p| namespace.is_some_and(|v| string_match(p, v)))
        && positive(&s.service_accounts, |p| service_account(principal).is_some_and(|v| string_match(p, &v)))
        && negative(&s.not_service_accounts, |p| service_account(principal).is_some_and(|v| string_match(p, &v)))
        && positive(&s.ip_blocks, |b| ip_match(b, c.src_ip))
        && negative(&s.not_ip_blocks, |b| ip_match(b, c.src_ip))
        // No proxy in front at L4: the remote IP is the source IP.
        && positive(&s.remote_ip_blocks, |b| ip_match(b, c.src_ip))
        && negative(&s.not_remote_ip_blocks, |b| ip_match(b, c.src_ip))
}

fn operation_matches(o: &Operation, c: &ConnAttrs) -> bool {
    positive(&o.ports, |p| p.parse::<u16>().ok() == Some(c.dst_port))
        && negative(&o.not_ports, |p| p.parse::<u16>().ok() == Some(c.dst_port))
}

fn condition_matches(w: &Condition, c: &ConnAttrs) -> bool {
    let test = |v: &str| match w.key.as_str() {
        "source.ip" => ip_match(v, c.src_ip),
        "destination.ip" => ip_match(v, c.dst_ip),
        "destination.port" => v.parse::<u16>().ok() == Some(c.dst_port),
        "source.principal" => c.principal.as_deref().is_some_and(|p| string_match(v, p)),
        "source.namespace" => c.namespace.as_deref().is_some_and(|n| string_match(v, n)),
        _ => false,
    };
    positive(&w.values, |v| test(v)) && negative(&w.not_values, |v| test(v))
}

/// An empty list places no constraint; otherwise some entry must match.
fn positive(list: &[String], f: impl Fn(&str) -> bool) -> bool {
    list.is_empty() || list.iter().any(|v| f(v))
}

/// No entry may match.
fn negative(list: &[String], f: impl Fn(&str) -> bool) -> bool {
    !list.iter().any(|v| f(v))
}

/// `namespace/name` of a principal `td/ns/NS/sa/SA`.
fn service_account(principal: Option<&str>) -> Option<String> {
    let p = principal?;
    let (_, rest) = p.split_once("/ns/")?;
    let (ns, sa) = rest.split_once("/sa/")?;
    Some(format!("{ns}/{sa}"))
}

/// Istio string match: exact, `*` (any non-empty), `prefix*`, `*suffix`.
fn string_match(pattern: &str, value: &str) -> bool {
    if pattern == "*" {
        return !value.is_empty();
    }
    if let Some(prefix) = pattern.strip_suffix('*') {
        return value.starts_with(prefix);
    }
    if let Some(suffix) = pattern.strip_prefix('*') {
        return value.ends_with(suffix);
    }
    pattern == value
}

fn ip_match(block: &str, ip: IpAddr) -> bool {
    match block.parse::<IpNet>() {
        Ok(net) => net.contains(&ip),
        Err(_) => block.parse::<IpAddr>().is_ok_and(|b| b == ip),
    }
}

/// Checks what must be rejected at load; returns (field, message).
pub fn validate(p: &AuthorizationPolicy) -> Result<(), (String, String)> {
    for (i, r) in p.spec.rules.iter().enumerate() {
        for (j, t) in r.to.iter().enumerate() {
            for port in t.operation.ports.iter().chain(&t.operation.not_ports) {
                if port.parse::<u16>().map_or(true, |p| p == 0) {
                    return Err((
                        format!("spec.rules[{i}].to[{j}].operation.ports"),
                        format!("`{port}` is not a port"),
                    ));
                }
            }
        }
        for (j, f) in r.from.iter().enumerate() {
            let s = &f.source;
            for b in s
                .ip_blocks
                .iter()
                .chain(&s.not_ip_blocks)
                .chain(&s.remote_ip_blocks)
                .chain(&s.not_remote_ip_blocks)
            {
                if b.parse::<IpNet>().is_err() && b.parse::<IpAddr>().is_err() {
                    return Err((
                        format!("spec.rules[{i}].from[{j}].source.ipBlocks"),
                        format!("`{b}` is not an IP or CIDR"),
                    ));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
