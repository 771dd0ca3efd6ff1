//! istiod's `Authorization` resources (L4 policies it compiled from AuthorizationPolicy and PeerAuthentication objects) mapped onto ambit's AuthorizationPolicy, or refused with the field at fault.
//!
//! An `Authorization` is rules (OR) of clauses (AND) of matches (OR); ambit's rule is a `from`
//! list (OR of sources), a `to` list (OR of port sets) and `when` conditions (AND). A clause of
//! one match becomes constraints on the rule: its source fields a `from` entry (or `when`
//! conditions once `from` is taken), its ports a `to` entry (or a `destination.port`
//! condition), its destination IPs a `destination.ip` condition. A clause of several matches
//! must be all sources (the rule's `from`) or all ports (its `to`). A clause whose every match
//! is empty never matches (as in ztunnel): its rule is dropped. Whatever does not fit is
//! refused, never widened.
//!
//! Scope: GLOBAL is a selector-less policy of the root namespace, NAMESPACE one of another
//! namespace, WORKLOAD_SELECTOR a policy whose selector is a label ([`selected_label`]) that
//! the mapping puts on exactly the workloads listing the policy in `authorization_policies`.
//! istiod's static STRICT policy ([`STATIC_STRICT`], "deny without a principal", listed by the
//! workloads whose effective PeerAuthentication is STRICT) becomes ambit's STRICT
//! PeerAuthentication on those workloads, so plaintext is refused as ambit refuses it (probe
//! sources admitted) and `explain` says STRICT.
use ambit_proto::istio::security as sec;
use ipnet::IpNet;

use super::model::ModelError;
use super::workloads::{bad_ip, invalid, ip, namespaced, unsupported, Fault};
use crate::meta::ObjectMeta;
use crate::policy::authz::{
    Action, AuthorizationPolicy, AuthorizationPolicySpec, Condition, From, Operation, Rule, Source,
    To,
};
use crate::policy::peer_auth::Selector;

/// The name of istiod's static STRICT policy (in the root namespace).
pub const STATIC_STRICT: &str = "istio_converted_static_strict";
/// Prefix of the label marking a workload as selected by a WORKLOAD_SELECTOR policy; the
/// policy's `namespace/name` follows.
pub const SELECTED_LABEL_PREFIX: &str = "istiod.ambit.io/authorization.";
/// The value of that label.
pub const SELECTED: &str = "selected";

/// The label that selects a workload for the policy `namespace/name`.
pub fn selected_label(policy: &str) -> String {
    format!("{SELECTED_LABEL_PREFIX}{policy}")
}

/// An `Authorization`, mapped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Policy {
    /// Enforced.
    Enforced(AuthorizationPolicy),
    /// `dry_run`: istiod asks that it only be logged; ambit does not enforce it.
    DryRun(AuthorizationPolicy),
    /// istiod's static STRICT policy.
    StaticStrict,
}

/// Maps the `Authorization` resource `name` (already decoded) in a mesh whose root namespace
/// is `root_namespace`.
pub fn convert(
    name: &str,
    a: &sec::Authorization,
    root_namespace: &str,
) -> Result<Policy, ModelError> {
    policy(name, a, root_namespace).map_err(|f| f.into_error("Authorization", name))
}

fn policy(name: &str, a: &sec::Authorization, root: &str) -> Result<Policy, Fault> {
    if a.name.is_empty() || a.namespace.is_empty() {
        return Err(invalid("name", "name or namespace is empty"));
    }
    let key = format!("{}/{}", a.namespace, a.name);
    if key != name {
        return Err(invalid(
            "name",
            format!("`{key}` is not the resource name (istiod names a policy `namespace/name`)"),
        ));
    }
    if !a.extensions.is_empty() {
        return Err(unsupported(
            "extensions",
            "extensions ambit does not understand",
        ));
    }
    let scope = sec::Scope::try_from(a.scope)
        .map_err(|_| invalid("scope", format!("unknown value {}", a.scope)))?;
    let action = match sec::Action::try_from(a.action) {
        Ok(sec::Action::Allow) => Action::Allow,
        Ok(sec::Action::Deny) => Action::Deny,
        Err(_) => return Err(invalid("action", format!("unknown value {}", a.action))),
    };
    if a.namespace == root && a.name == STATIC_STRICT {
        return static_strict(a, scope, action).map(|()| Policy::StaticStrict);
    }
    let selector = match scope {
        sec::Scope::Global if a.namespace != root => {
            return Err(unsupported(
                "scope",
                format!(
                    "GLOBAL in namespace {}: ambit applies mesh-wide only the policies of its \
                     root namespace ({root}); is the agent's rootNamespace istiod's?",
                    a.namespace
                ),
            ))
        }
        sec::Scope::Namespace if a.namespace == root => {
            return Err(unsupported(
                "scope",
                format!(
                    "NAMESPACE in the root namespace {root}: ambit would apply it mesh-wide; is \
                     the agent's rootNamespace istiod's?"
                ),
            ))
        }
        sec::Scope::Global | sec::Scope::Namespace => None,
        sec::Scope::WorkloadSelector => Some(Selector {
            match_labels: [(selected_label(&key), SELECTED.to_string())].into(),
        }),
    };
    let mut rules = Vec::with_capacity(a.rules.len());
    for (i, r) in a.rules.iter().enumerate() {
        if let Some(r) = rule(r, &format!("rules[{i}]"))? {
            rules.push(r);
        }
    }
    let p = AuthorizationPolicy {
        metadata: ObjectMeta {
            name: a.name.clone(),
            namespace: a.namespace.clone(),
            ..ObjectMeta::default()
        },
        spec: AuthorizationPolicySpec {
            selector,
            action,
            rules,
            ..AuthorizationPolicySpec::default()
        },
        unreadable: None,
    };
    // What ambit's own loader checks (ports, addresses) must hold too.
    crate::policy::authz::validate(&p).map_err(|(field, problem)| invalid(field, problem))?;
    Ok(if a.dry_run {
        Policy::DryRun(p)
    } else {
        Policy::Enforced(p)
    })
}

/// Checks that the static STRICT policy is istiod's: DENY, selector-scoped, one match
/// `not_principals: [presence]`.
fn static_strict(a: &sec::Authorization, scope: sec::Scope, action: Action) -> Result<(), Fault> {
    let presence = sec::StringMatch {
        match_type: Some(sec::string_match::MatchType::Presence(())),
    };
    let expected = vec![sec::Rule {
        clauses: vec![sec::Clause {
            matches: vec![sec::Match {
                not_principals: vec![presence],
                ..sec::Match::default()
            }],
        }],
    }];
    if scope != sec::Scope::WorkloadSelector
        || action != Action::Deny
        || a.rules != expected
        || a.dry_run
    {
        return Err(unsupported(
            "rules",
            format!(
                "{STATIC_STRICT} is not istiod's static STRICT policy (a selector-scoped DENY \
                 of connections without a principal)"
            ),
        ));
    }
    Ok(())
}

/// One rule; `None` when it can never match.
fn rule(r: &sec::Rule, at: &str) -> Result<Option<Rule>, Fault> {
    let mut clauses = Vec::with_capacity(r.clauses.len());
    for (j, c) in r.clauses.iter().enumerate() {
        let at = format!("{at}.clauses[{j}]");
        for (k, m) in c.matches.iter().enumerate() {
            if !m.extensions.is_empty() {
                return Err(unsupported(
                    format!("{at}.matches[{k}].extensions"),
                    "extensions ambit does not understand",
                ));
            }
        }
        if c.matches.is_empty() {
            continue; // no constraint
        }
        let set: Vec<(usize, &sec::Match)> = c
            .matches
            .iter()
            .enumerate()
            .filter(|(_, m)| !is_empty(m))
            .collect();
        if set.is_empty() {
            return Ok(None); // only empty matches: never matches
        }
        clauses.push((at, set));
    }
    // Clauses of alternatives first: they need the rule's `from` or `to` list.
    clauses.sort_by_key(|(_, set)| std::cmp::Reverse(set.len()));
    // A rule's `from` (or `to`) list is taken by the first clause that fills it; later
    // sources (ports) become `when` conditions, or are refused when they are alternatives.
    let mut out = Rule::default();
    for (at, set) in clauses {
        if let [(k, m)] = set.as_slice() {
            let at = format!("{at}.matches[{k}]");
            if has_source(m) {
                if out.from.is_empty() {
                    out.from.push(from_entry(m, &at)?);
                } else {
                    out.when.extend(source_conditions(m, &at)?);
                }
            }
            if has_ports(m) {
                if out.to.is_empty() {
                    out.to.push(to_entry(m, &at)?);
                } else {
                    let (yes, no) = ports(m, &at)?;
                    out.when.push(condition("destination.port", yes, no));
                }
            }
            if !m.destination_ips.is_empty() || !m.not_destination_ips.is_empty() {
                out.when.push(condition(
                    "destination.ip",
                    nets(&m.destination_ips, &format!("{at}.destination_ips"))?,
                    nets(&m.not_destination_ips, &format!("{at}.not_destination_ips"))?,
                ));
            }
        } else if set
            .iter()
            .all(|(_, m)| !has_ports(m) && !has_destination_ips(m))
        {
            alternatives(&mut out.from, &at, &set, "sources", from_entry)?;
        } else if set
            .iter()
            .all(|(_, m)| !has_source(m) && !has_destination_ips(m))
        {
            alternatives(&mut out.to, &at, &set, "ports", to_entry)?;
        } else {
            return Err(unsupported(
                at,
                "alternatives mixing sources, ports and destination addresses",
            ));
        }
    }
    Ok(Some(out))
}

/// Fills `list` (the rule's `from` or `to`) with one `entry` per match of the clause of
/// alternative `what` at `at`; a list another clause took already is refused.
fn alternatives<T>(
    list: &mut Vec<T>,
    at: &str,
    set: &[(usize, &sec::Match)],
    what: &str,
    entry: fn(&sec::Match, &str) -> Result<T, Fault>,
) -> Result<(), Fault> {
    if !list.is_empty() {
        return Err(unsupported(
            at,
            format!("a second clause of alternative {what} in one rule"),
        ));
    }
    for (k, m) in set {
        list.push(entry(m, &format!("{at}.matches[{k}]"))?);
    }
    Ok(())
}

/// The `from` entry of the match at `at`: its sources.
fn from_entry(m: &sec::Match, at: &str) -> Result<From, Fault> {
    Ok(From {
        source: source(m, at)?,
    })
}

/// The `to` entry of the match at `at`: its ports.
fn to_entry(m: &sec::Match, at: &str) -> Result<To, Fault> {
    let (ports, not_ports) = ports(m, at)?;
    Ok(To {
        operation: Operation {
            ports,
            not_ports,
            ..Operation::default()
        },
    })
}

fn is_empty(m: &sec::Match) -> bool {
    !has_source(m) && !has_ports(m) && !has_destination_ips(m)
}

fn has_source(m: &sec::Match) -> bool {
    !(m.namespaces.is_empty()
        && m.not_namespaces.is_empty()
        && m.service_accounts.is_empty()
        && m.not_service_accounts.is_empty()
        && m.principals.is_empty()
        && m.not_principals.is_empty()
        && m.source_ips.is_empty()
        && m.not_source_ips.is_empty())
}

fn has_ports(m: &sec::Match) -> bool {
    !m.destination_ports.is_empty() || !m.not_destination_ports.is_empty()
}

fn has_destination_ips(m: &sec::Match) -> bool {
    !m.destination_ips.is_empty() || !m.not_destination_ips.is_empty()
}

fn source(m: &sec::Match, at: &str) -> Result<Source, Fault> {
    Ok(Source {
        service_accounts: accounts(&m.service_accounts, &format!("{at}.service_accounts"))?,
        not_service_accounts: accounts(
            &m.not_service_accounts,
            &format!("{at}.not_service_accounts"),
        )?,
        principals: patterns(&m.principals, &format!("{at}.principals"))?,
        not_principals: patterns(&m.not_principals, &format!("{at}.not_principals"))?,
        namespaces: patterns(&m.namespaces, &format!("{at}.namespaces"))?,
        not_namespaces: patterns(&m.not_namespaces, &format!("{at}.not_namespaces"))?,
        ip_blocks: nets(&m.source_ips, &format!("{at}.source_ips"))?,
        not_ip_blocks: nets(&m.not_source_ips, &format!("{at}.not_source_ips"))?,
        ..Source::default()
    })
}

/// A source match as `when` conditions (the rule's `from` is taken by another clause).
fn source_conditions(m: &sec::Match, at: &str) -> Result<Vec<Condition>, Fault> {
    if !m.service_accounts.is_empty() || !m.not_service_accounts.is_empty() {
        return Err(unsupported(
            format!("{at}.service_accounts"),
            "service accounts in a second source clause of one rule",
        ));
    }
    let s = source(m, at)?;
    let mut out = Vec::new();
    for (key, yes, no) in [
        ("source.principal", s.principals, s.not_principals),
        ("source.namespace", s.namespaces, s.not_namespaces),
        ("source.ip", s.ip_blocks, s.not_ip_blocks),
    ] {
        if !yes.is_empty() || !no.is_empty() {
            out.push(condition(key, yes, no));
        }
    }
    Ok(out)
}

fn condition(key: &str, values: Vec<String>, not_values: Vec<String>) -> Condition {
    Condition {
        key: key.to_string(),
        values,
        not_values,
    }
}

/// Istio's string matches as the policy patterns ambit reads (`exact`, `prefix*`, `*suffix`,
/// `*`); a value that would read otherwise is refused.
fn patterns(list: &[sec::StringMatch], at: &str) -> Result<Vec<String>, Fault> {
    use sec::string_match::MatchType;
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let at = format!("{at}[{i}]");
        let starred = |s: &str| s.starts_with('*') || s.ends_with('*');
        out.push(match &m.match_type {
            None => return Err(invalid(at, "no match type")),
            Some(MatchType::Presence(())) => "*".to_string(),
            Some(MatchType::Exact(s) | MatchType::Prefix(s) | MatchType::Suffix(s))
                if s.is_empty() =>
            {
                return Err(unsupported(at, "an empty value"))
            }
            Some(MatchType::Exact(s)) if starred(s) => {
                return Err(unsupported(
                    at,
                    format!("exact `{s}`: a `*` at its start or end"),
                ))
            }
            Some(MatchType::Prefix(s)) if s.starts_with('*') => {
                return Err(unsupported(at, format!("prefix `{s}`: a `*` at its start")))
            }
            Some(MatchType::Exact(s)) => s.clone(),
            Some(MatchType::Prefix(s)) => format!("{s}*"),
            Some(MatchType::Suffix(s)) => format!("*{s}"),
        });
    }
    Ok(out)
}

fn accounts(list: &[sec::ServiceAccountMatch], at: &str) -> Result<Vec<String>, Fault> {
    list.iter()
        .enumerate()
        .map(|(i, a)| {
            let plain = |s: &str| !s.is_empty() && !s.contains(['/', '*']);
            if plain(&a.namespace) && plain(&a.service_account) {
                Ok(format!("{}/{}", a.namespace, a.service_account))
            } else {
                Err(invalid(
                    format!("{at}[{i}]"),
                    format!(
                        "`{}/{}` is not a namespace and a service account",
                        a.namespace, a.service_account
                    ),
                ))
            }
        })
        .collect()
}

fn nets(list: &[sec::Address], at: &str) -> Result<Vec<String>, Fault> {
    list.iter()
        .enumerate()
        .map(|(i, a)| {
            let at = format!("{at}[{i}]");
            let addr = ip(&a.address).ok_or_else(|| invalid(&at, bad_ip(&a.address)))?;
            u8::try_from(a.length)
                .ok()
                .and_then(|len| IpNet::new(addr, len).ok())
                .map(|n| n.to_string())
                .ok_or_else(|| {
                    invalid(
                        at,
                        format!("prefix length {} is too long for {addr}", a.length),
                    )
                })
        })
        .collect()
}

fn ports(m: &sec::Match, at: &str) -> Result<(Vec<String>, Vec<String>), Fault> {
    let list = |ps: &[u32], field: &str| {
        ps.iter()
            .enumerate()
            .map(|(i, p)| match u16::try_from(*p) {
                Ok(p) if p != 0 => Ok(p.to_string()),
                _ => Err(invalid(
                    format!("{at}.{field}[{i}]"),
                    format!("{p} is not a port (1-65535)"),
                )),
            })
            .collect::<Result<Vec<_>, _>>()
    };
    Ok((
        list(&m.destination_ports, "destination_ports")?,
        list(&m.not_destination_ports, "not_destination_ports")?,
    ))
}

/// Whether `key` (`namespace/name`) is istiod's static STRICT policy in `root_namespace`.
pub fn is_static_strict(key: &str, root_namespace: &str) -> bool {
    namespaced(key) == Some((root_namespace, STATIC_STRICT))
}
