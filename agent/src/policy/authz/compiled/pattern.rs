//! Istio's string patterns as compiled matchers, and principals matched across the mesh's trust-domain aliases.
//!
//! A pattern is exact, `prefix*`, `*suffix` or `*` (any non-empty value); a leading `*` is
//! read first, as istiod reads it (`*a*` is "ends with `a*`").
//!
//! Principals follow Istio's trust-domain migration (istio/istio
//! `pilot/pkg/security/trustdomain/bundle.go`, applied to `principals`, `notPrincipals` and
//! `when: source.principal` by sidecars and waypoints): a principal of five `/`-separated parts
//! (`td/ns/NS/sa/SA`) whose trust domain is the mesh's, one of its `trustDomainAliases`
//! (a `*` in either matching as Istio's helper does) or `cluster.local` stands for that
//! identity in the mesh's trust domain and in every alias, and only there. Any other principal
//! (`*/ns/...`, fewer parts, a foreign trust domain) is matched as written. ztunnel itself does
//! not do this yet (istio/ztunnel#1260, istio/istio#58511); Istio documents it and its other
//! proxies do it, so a node proxy beside them must.
use super::super::Mesh;

/// The trust domain that stands for the mesh's own in any policy, whatever the mesh's is.
const CLUSTER_LOCAL: &str = "cluster.local";

/// Istio's string match, compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Pattern {
    Exact(Box<str>),
    Prefix(Box<str>),
    Suffix(Box<str>),
    Present,
}

impl Pattern {
    pub(super) fn new(p: &str) -> Self {
        if p == "*" {
            Self::Present
        } else if let Some(suffix) = p.strip_prefix('*') {
            Self::Suffix(suffix.into())
        } else if let Some(prefix) = p.strip_suffix('*') {
            Self::Prefix(prefix.into())
        } else {
            Self::Exact(p.into())
        }
    }

    pub(super) fn matches(&self, v: &str) -> bool {
        self.matches_parts(&[v])
    }

    /// Matches `a/b` without building it (a service account is `namespace/name`).
    pub(super) fn matches_pair(&self, a: &str, b: &str) -> bool {
        self.matches_parts(&[a, "/", b])
    }

    /// Matches the concatenation of `parts`.
    fn matches_parts(&self, parts: &[&str]) -> bool {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        match self {
            Self::Present => len > 0,
            Self::Exact(s) => s.len() == len && starts_with(parts, s.as_bytes()),
            Self::Prefix(s) => starts_with(parts, s.as_bytes()),
            Self::Suffix(s) => ends_with(parts, s.as_bytes()),
        }
    }
}

/// A principal of a policy, matched as Istio's proxies match it (see the module comment).
#[derive(Debug, Clone)]
pub(super) struct Principal {
    /// The principal as written.
    written: Pattern,
    /// Its trust domain and the rest, when it has Istio's five parts and names a trust domain.
    migrates: Option<Migrates>,
}

/// A principal `td/ns/NS/sa/SA` whose trust domain may stand for the mesh's.
#[derive(Debug, Clone)]
struct Migrates {
    /// The trust domain as written (possibly with a `*`).
    trust_domain: Box<str>,
    /// `ns/NS/sa/SA` as written: the same identity under another trust domain is
    /// `<td>/<rest>`, a prefix match when `rest` ends in `*` (the whole then starts with a
    /// trust domain, never with `*`).
    rest: Rest,
}

#[derive(Debug, Clone)]
enum Rest {
    Exact(Box<str>),
    Prefix(Box<str>),
}

impl Principal {
    pub(super) fn new(p: &str) -> Self {
        let parts = p.split('/').count();
        let migrates = p
            .split_once('/')
            .filter(|(td, _)| parts == 5 && *td != "*")
            .map(|(td, rest)| Migrates {
                trust_domain: td.into(),
                rest: match rest.strip_suffix('*') {
                    Some(prefix) => Rest::Prefix(prefix.into()),
                    None => Rest::Exact(rest.into()),
                },
            });
        Self {
            written: Pattern::new(p),
            migrates,
        }
    }

    /// Whether the peer's principal `v` (`td/ns/NS/sa/SA`) matches, in `mesh`.
    pub(super) fn matches(&self, mesh: &Mesh<'_>, v: &str) -> bool {
        let Some(m) = self.migrates.as_ref().filter(|m| m.stands_for_mesh(mesh)) else {
            return self.written.matches(v);
        };
        mesh.trust_domains().any(|td| {
            if suffix_match(td, &m.trust_domain) {
                // `*-td/...` already covers this trust domain: kept as written.
                self.written.matches(v)
            } else {
                m.matches_in(td, v)
            }
        })
    }
}

impl Migrates {
    /// Whether the written trust domain is the mesh's, an alias, or `cluster.local`.
    fn stands_for_mesh(&self, mesh: &Mesh<'_>) -> bool {
        &*self.trust_domain == CLUSTER_LOCAL
            || mesh
                .trust_domains()
                .any(|td| either_matches(&self.trust_domain, td))
    }

    /// Whether `v` is `<td>/<rest>`.
    fn matches_in(&self, td: &str, v: &str) -> bool {
        let Some(tail) = v.strip_prefix(td).and_then(|t| t.strip_prefix('/')) else {
            return false;
        };
        match &self.rest {
            Rest::Exact(r) => tail == &**r,
            Rest::Prefix(r) => tail.starts_with(&**r),
        }
    }
}

/// Istio's trust-domain comparison: equal, or either one a `*` pattern matching the other.
fn either_matches(a: &str, b: &str) -> bool {
    a == b
        || b == "*"
        || prefix_match(a, b)
        || prefix_match(b, a)
        || suffix_match(a, b)
        || suffix_match(b, a)
}

/// `pattern` is `x*` and `a` starts with `x`.
fn prefix_match(a: &str, pattern: &str) -> bool {
    pattern.strip_suffix('*').is_some_and(|p| a.starts_with(p))
}

/// `pattern` is `*x` and `a` ends with `x`.
fn suffix_match(a: &str, pattern: &str) -> bool {
    pattern.strip_prefix('*').is_some_and(|p| a.ends_with(p))
}

/// Whether the concatenation of `parts` starts with `prefix`.
fn starts_with(parts: &[&str], mut prefix: &[u8]) -> bool {
    for p in parts.iter().map(|p| p.as_bytes()) {
        if prefix.len() <= p.len() {
            return p.starts_with(prefix);
        }
        let (head, rest) = prefix.split_at(p.len());
        if head != p {
            return false;
        }
        prefix = rest;
    }
    prefix.is_empty()
}

/// Whether the concatenation of `parts` ends with `suffix`.
fn ends_with(parts: &[&str], mut suffix: &[u8]) -> bool {
    for p in parts.iter().rev().map(|p| p.as_bytes()) {
        if suffix.len() <= p.len() {
            return p.ends_with(suffix);
        }
        let (rest, tail) = suffix.split_at(suffix.len() - p.len());
        if tail != p {
            return false;
        }
        suffix = rest;
    }
    suffix.is_empty()
}

#[cfg(test)]
mod tests;
