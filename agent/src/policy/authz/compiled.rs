//! AuthorizationPolicies compiled once per snapshot into typed matchers (parsed CIDRs, ports, patterns, an index by namespace): evaluating a connection allocates and parses nothing.
//!
//! A policy that does not compile never reaches a snapshot from the sources (they reject it at
//! load with [`super::validate`], which is this compiler), except as a placeholder for an
//! object the Kubernetes source could not read at all ([`AuthorizationPolicy::unreadable`]).
//! Either way it is compiled to fail closed: an ALLOW that cannot be understood never matches,
//! a DENY (or an action that cannot be read) always does. Policies that are not the node
//! proxy's ([`super::NotForNodeProxy`]) are left out: they decide nothing here.
mod pattern;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use ipnet::IpNet;

use super::{scope, Action, AuthorizationPolicy, ConnAttrs, Decision, Mesh};
use pattern::{Pattern, Principal};

/// Why a policy does not compile: the field, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    /// A port that is not a number in 1-65535.
    #[error("`{value}` is not a port")]
    Port {
        /// Path of the field (`spec.rules[0].to[1].operation.ports`).
        field: String,
        /// The value as written.
        value: String,
    },
    /// An address that is neither an IP nor a CIDR.
    #[error("`{value}` is not an IP or CIDR")]
    Address {
        /// Path of the field (`spec.rules[0].from[0].source.ipBlocks`).
        field: String,
        /// The value as written.
        value: String,
    },
    /// A scope Istio refuses: `selector`, `targetRef` and `targetRefs` together, or a target
    /// without a kind or name.
    #[error("{problem}")]
    Scope {
        /// Path of the field (`spec`, `spec.targetRefs[0].name`).
        field: String,
        /// What is wrong.
        problem: &'static str,
    },
    /// The object could not be read at all (the Kubernetes source keeps it to fail closed).
    #[error("the object could not be read: {problem}")]
    Unreadable {
        /// What the source reported.
        problem: String,
    },
}

impl CompileError {
    /// Path of the field at fault (`spec` when the object could not be read).
    pub fn field(&self) -> &str {
        match self {
            Self::Port { field, .. } | Self::Address { field, .. } | Self::Scope { field, .. } => {
                field
            }
            Self::Unreadable { .. } => "spec",
        }
    }
}

/// A policy that compiled to fail closed, for logs and counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// `namespace/name`.
    pub policy: String,
    /// Why.
    pub error: CompileError,
}

/// The AuthorizationPolicies of one snapshot, compiled, with their index by namespace.
#[derive(Debug, Clone, Default)]
pub struct Policies {
    /// In snapshot order: the first matching policy is the one a decision names.
    policies: Vec<Compiled>,
    /// Namespace → positions in `policies`, ascending.
    by_namespace: HashMap<Box<str>, Vec<usize>>,
    /// Policies compiled to fail closed.
    failures: Vec<Failure>,
}

impl Policies {
    /// Compiles the node proxy's policies of `list`; a policy that does not compile fails
    /// closed and is listed in [`Policies::failures`].
    pub fn compile(list: &[AuthorizationPolicy]) -> Self {
        let mut out = Self::default();
        for p in list.iter().filter(|p| p.not_for_node_proxy().is_none()) {
            let compiled = compile(p).unwrap_or_else(|error| {
                out.failures.push(Failure {
                    policy: p.key(),
                    error,
                });
                Compiled::fail_closed(p)
            });
            out.by_namespace
                .entry(p.metadata.namespace.as_str().into())
                .or_default()
                .push(out.policies.len());
            out.policies.push(compiled);
        }
        out
    }

    /// Policies that did not compile and fail closed.
    pub fn failures(&self) -> &[Failure] {
        &self.failures
    }

    /// Decides a connection to a workload in `namespace` with `labels`, as Istio does: any
    /// matching DENY policy denies; with no ALLOW policy the connection is allowed; otherwise
    /// some ALLOW policy must match.
    pub fn evaluate(
        &self,
        mesh: &Mesh<'_>,
        namespace: &str,
        labels: &BTreeMap<String, String>,
        c: &ConnAttrs,
    ) -> Decision {
        let own = self.in_namespace(namespace);
        let root = if mesh.root_namespace == namespace {
            &[][..]
        } else {
            self.in_namespace(mesh.root_namespace)
        };
        let applicable = || {
            Merged { a: own, b: root }
                .map(|i| &self.policies[i])
                .filter(|p| p.selects(labels))
        };
        for p in applicable().filter(|p| p.action != Action::Allow) {
            if p.matches(mesh, c) {
                return Decision::Denied {
                    policy: p.key.clone(),
                };
            }
        }
        let mut any_allow = false;
        for p in applicable().filter(|p| p.action == Action::Allow) {
            if p.matches(mesh, c) {
                return Decision::Allow {
                    policy: Some(p.key.clone()),
                };
            }
            any_allow = true;
        }
        if any_allow {
            Decision::NotAllowed
        } else {
            Decision::Allow { policy: None }
        }
    }

    fn in_namespace(&self, namespace: &str) -> &[usize] {
        self.by_namespace.get(namespace).map_or(&[], Vec::as_slice)
    }
}

/// Compiles one policy (its scope checked as Istio's validation checks it).
pub(super) fn compile(p: &AuthorizationPolicy) -> Result<Compiled, CompileError> {
    if let Some(problem) = &p.unreadable {
        return Err(CompileError::Unreadable {
            problem: problem.clone(),
        });
    }
    scope::check(p).map_err(|(field, problem)| CompileError::Scope { field, problem })?;
    let mut rules = Vec::with_capacity(p.spec.rules.len());
    for (i, r) in p.spec.rules.iter().enumerate() {
        // Compiled even when it cannot be checked: a bad value is rejected at load either way.
        let l4 = L4Rule::compile(r, &format!("spec.rules[{i}]"))?;
        let rule = l4.filter(|_| super::unsupported_fields(r).is_empty());
        rules.push(rule.map_or(RuleMatch::Unsupported, RuleMatch::L4));
    }
    Ok(Compiled {
        rules,
        ..Compiled::fail_closed(p)
    })
}

/// One policy, compiled.
#[derive(Debug, Clone)]
pub(super) struct Compiled {
    /// `namespace/name`, shared by every decision naming it.
    key: Arc<str>,
    /// `selector.matchLabels`; empty selects every workload of the namespace.
    selector: Vec<(String, String)>,
    action: Action,
    rules: Vec<RuleMatch>,
}

impl Compiled {
    /// `p` with one rule that fails safe: never matches for ALLOW, always for any other
    /// action (DENY, or one that could not be read and was taken as DENY).
    fn fail_closed(p: &AuthorizationPolicy) -> Self {
        Self {
            key: p.key().into(),
            selector: p
                .spec
                .selector
                .iter()
                .flat_map(|s| s.match_labels.iter())
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            action: p.spec.action,
            rules: vec![RuleMatch::Unsupported],
        }
    }

    fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.selector
            .iter()
            .all(|(k, v)| labels.get(k).is_some_and(|l| l == v))
    }

    fn matches(&self, mesh: &Mesh<'_>, c: &ConnAttrs) -> bool {
        // DENY: what cannot be checked matches.
        let fail_safe = self.action != Action::Allow;
        self.rules.iter().any(|r| match r {
            RuleMatch::L4(rule) => rule.matches(mesh, c),
            RuleMatch::Unsupported => fail_safe,
        })
    }
}

/// A rule: checkable at L4, or using fields ambit cannot check (it fails safe).
#[derive(Debug, Clone)]
enum RuleMatch {
    L4(L4Rule),
    Unsupported,
}

/// All of `from`, `to` and `when` must match; an empty `from` or `to` places no constraint.
#[derive(Debug, Clone)]
struct L4Rule {
    from: Vec<SourceMatch>,
    to: Vec<Values<u16>>,
    when: Vec<ConditionMatch>,
}

impl L4Rule {
    /// `None` when a `when` key cannot be checked at L4.
    fn compile(r: &super::Rule, at: &str) -> Result<Option<Self>, CompileError> {
        let from = r
            .from
            .iter()
            .enumerate()
            .map(|(j, f)| SourceMatch::compile(&f.source, &format!("{at}.from[{j}].source")))
            .collect::<Result<_, _>>()?;
        let to =
            r.to.iter()
                .enumerate()
                .map(|(j, t)| {
                    let o = &t.operation;
                    let field = format!("{at}.to[{j}].operation");
                    Values::compile(&o.ports, &o.not_ports, |v, not| {
                        port(v, &field, if not { "notPorts" } else { "ports" })
                    })
                })
                .collect::<Result<_, _>>()?;
        let when = r
            .when
            .iter()
            .enumerate()
            .map(|(j, w)| ConditionMatch::compile(w, &format!("{at}.when[{j}]")))
            .collect::<Result<Option<_>, _>>()?;
        Ok(when.map(|when| Self { from, to, when }))
    }

    fn matches(&self, mesh: &Mesh<'_>, c: &ConnAttrs) -> bool {
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(mesh, c)))
            && (self.to.is_empty() || self.to.iter().any(|p| p.check(|p| *p == c.dst_port)))
            && self.when.iter().all(|w| w.matches(mesh, c))
    }
}

/// `rules[].from[].source`, compiled.
#[derive(Debug, Clone)]
struct SourceMatch {
    principals: Values<Principal>,
    namespaces: Values<Pattern>,
    service_accounts: Values<Pattern>,
    ip_blocks: Values<IpNet>,
    /// No proxy in front at L4: the remote IP is the source IP.
    remote_ip_blocks: Values<IpNet>,
}

impl SourceMatch {
    fn compile(s: &super::Source, at: &str) -> Result<Self, CompileError> {
        let patterns = |yes: &[String], no: &[String]| {
            Values::compile(yes, no, |v, _| Ok::<_, CompileError>(Pattern::new(v)))
        };
        let blocks = |yes: &[String], no: &[String], name: &str, not_name: &str| {
            Values::compile(yes, no, |v, not| {
                ip_block(v, at, if not { not_name } else { name })
            })
        };
        Ok(Self {
            principals: Values::compile(&s.principals, &s.not_principals, |v, _| {
                Ok::<_, CompileError>(Principal::new(v))
            })?,
            namespaces: patterns(&s.namespaces, &s.not_namespaces)?,
            service_accounts: patterns(&s.service_accounts, &s.not_service_accounts)?,
            ip_blocks: blocks(&s.ip_blocks, &s.not_ip_blocks, "ipBlocks", "notIpBlocks")?,
            remote_ip_blocks: blocks(
                &s.remote_ip_blocks,
                &s.not_remote_ip_blocks,
                "remoteIpBlocks",
                "notRemoteIpBlocks",
            )?,
        })
    }

    fn matches(&self, mesh: &Mesh<'_>, c: &ConnAttrs) -> bool {
        let principal = c.principal();
        let peer = c.peer.as_ref();
        self.principals
            .check(|p| principal.is_some_and(|v| p.matches(mesh, v)))
            && self
                .namespaces
                .check(|p| peer.is_some_and(|id| p.matches(id.namespace())))
            && self.service_accounts.check(|p| {
                peer.is_some_and(|id| p.matches_pair(id.namespace(), id.service_account()))
            })
            && self.ip_blocks.check(|b| b.contains(&c.src_ip))
            && self.remote_ip_blocks.check(|b| b.contains(&c.src_ip))
    }
}

/// `rules[].when[]` with a key ambit checks at L4, compiled.
#[derive(Debug, Clone)]
enum ConditionMatch {
    SourceIp(Values<IpNet>),
    DestinationIp(Values<IpNet>),
    DestinationPort(Values<u16>),
    SourcePrincipal(Values<Principal>),
    SourceNamespace(Values<Pattern>),
}

impl ConditionMatch {
    /// `None` for a key that cannot be checked at L4.
    fn compile(w: &super::Condition, at: &str) -> Result<Option<Self>, CompileError> {
        let name = |not: bool| if not { "notValues" } else { "values" };
        let (yes, no) = (&w.values, &w.not_values);
        Ok(Some(match w.key.as_str() {
            "source.ip" => Self::SourceIp(Values::compile(yes, no, |v, not| {
                ip_block(v, at, name(not))
            })?),
            "destination.ip" => Self::DestinationIp(Values::compile(yes, no, |v, not| {
                ip_block(v, at, name(not))
            })?),
            "destination.port" => {
                Self::DestinationPort(Values::compile(yes, no, |v, not| port(v, at, name(not)))?)
            }
            "source.principal" => Self::SourcePrincipal(Values::compile(yes, no, |v, _| {
                Ok::<_, CompileError>(Principal::new(v))
            })?),
            "source.namespace" => Self::SourceNamespace(Values::compile(yes, no, |v, _| {
                Ok::<_, CompileError>(Pattern::new(v))
            })?),
            _ => return Ok(None),
        }))
    }

    fn matches(&self, mesh: &Mesh<'_>, c: &ConnAttrs) -> bool {
        match self {
            Self::SourceIp(v) => v.check(|b| b.contains(&c.src_ip)),
            Self::DestinationIp(v) => v.check(|b| b.contains(&c.dst_ip)),
            Self::DestinationPort(v) => v.check(|p| *p == c.dst_port),
            Self::SourcePrincipal(v) => {
                v.check(|p| c.principal().is_some_and(|v| p.matches(mesh, v)))
            }
            Self::SourceNamespace(v) => {
                v.check(|p| c.peer.as_ref().is_some_and(|id| p.matches(id.namespace())))
            }
        }
    }
}

/// A list and its negation (`principals` and `notPrincipals`, `values` and `notValues`, ...).
#[derive(Debug, Clone)]
struct Values<T> {
    /// Empty places no constraint; otherwise some entry must match.
    any: Vec<T>,
    /// No entry may match.
    none: Vec<T>,
}

impl<T> Values<T> {
    /// Compiles each value with `f(value, negated)`.
    fn compile<E>(
        yes: &[String],
        no: &[String],
        f: impl Fn(&str, bool) -> Result<T, E>,
    ) -> Result<Self, E> {
        Ok(Self {
            any: yes.iter().map(|v| f(v, false)).collect::<Result<_, _>>()?,
            none: no.iter().map(|v| f(v, true)).collect::<Result<_, _>>()?,
        })
    }

    fn check(&self, f: impl Fn(&T) -> bool) -> bool {
        (self.any.is_empty() || self.any.iter().any(&f)) && !self.none.iter().any(f)
    }
}

/// A port of `field` (`<at>.<name>`): 1-65535.
fn port(v: &str, at: &str, name: &str) -> Result<u16, CompileError> {
    v.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| CompileError::Port {
            field: format!("{at}.{name}"),
            value: v.to_string(),
        })
}

/// An IP (a block of one address) or a CIDR of `field` (`<at>.<name>`).
fn ip_block(v: &str, at: &str, name: &str) -> Result<IpNet, CompileError> {
    v.parse::<IpNet>()
        .or_else(|_| v.parse::<std::net::IpAddr>().map(IpNet::from))
        .map_err(|_| CompileError::Address {
            field: format!("{at}.{name}"),
            value: v.to_string(),
        })
}

/// Two ascending lists of positions, merged into one ascending walk.
struct Merged<'a> {
    a: &'a [usize],
    b: &'a [usize],
}

impl Iterator for Merged<'_> {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        let take_a = match (self.a.first(), self.b.first()) {
            (Some(a), Some(b)) => a <= b,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => return None,
        };
        let list = if take_a { &mut self.a } else { &mut self.b };
        let (first, rest) = list.split_first()?;
        *list = rest;
        Some(*first)
    }
}

#[cfg(test)]
mod tests;
