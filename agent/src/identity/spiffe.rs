//! SPIFFE IDs of workloads (`spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`).
//!
//! Parsing follows the SPIFFE ID specification (SPIFFE-ID.md, sections 2.1-2.3): scheme `spiffe`,
//! a lowercase trust domain of `[a-z0-9.-_]`, path segments of `[A-Za-z0-9.-_]` that are neither
//! empty nor `.`/`..`, and no query, fragment, port, user info or trailing slash. On top of that,
//! a workload identity must have the Kubernetes shape `/ns/<namespace>/sa/<service-account>`.
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// URI scheme of every SPIFFE ID.
const SCHEME: &str = "spiffe://";
/// What precedes the namespace and the service account in a workload identity.
const NS: &str = "/ns/";
const SA: &str = "/sa/";
/// SPIFFE-ID.md 2.3: a SPIFFE ID is at most 2048 bytes long.
const MAX_ID_BYTES: usize = 2048;
/// SPIFFE-ID.md 2.1: a trust domain name is at most 255 bytes long.
const MAX_TRUST_DOMAIN_BYTES: usize = 255;

/// A SPIFFE trust domain name (e.g. `cluster.local`), already checked against the spec.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

/// A workload identity: trust domain, Kubernetes namespace and service account.
///
/// Built only by parsing or [`SpiffeId::new`], so every value is a valid SPIFFE ID and its
/// [`Display`](fmt::Display) form parses back to an equal value. Cloning is a reference-count
/// bump: identities key connection pools and certificate caches.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    /// The whole ID, `spiffe://<td>/ns/<ns>/sa/<sa>`, checked on construction.
    uri: Arc<str>,
    /// Byte offsets of `<ns>` and `<sa>` in `uri` (it is at most 2048 bytes long).
    namespace_at: u16,
    service_account_at: u16,
}

/// Why a string is not a valid trust domain or workload SPIFFE ID.
///
/// Every variant carries the offending input (an over-long one is cut for display).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    /// The input is longer than the spec allows.
    #[error("invalid spiffe id or trust domain {input:?}: {len} bytes, at most {max} allowed")]
    TooLong {
        input: String,
        len: usize,
        max: usize,
    },
    /// The input does not start with `spiffe://` (the scheme is case sensitive here: the spec
    /// requires lowercase).
    #[error("invalid spiffe id {input:?}: scheme must be \"spiffe://\"")]
    WrongScheme { input: String },
    /// `spiffe://` is followed directly by `/` or nothing.
    #[error("invalid trust domain in {input:?}: empty")]
    EmptyTrustDomain { input: String },
    /// A character outside `[a-z0-9.-_]` in the trust domain.
    #[error("invalid trust domain in {input:?}: contains {ch:?}, only [a-z0-9.-_] allowed")]
    TrustDomainChar { input: String, ch: char },
    /// The authority carries user info (`user@`).
    #[error("invalid trust domain in {input:?}: user info is not allowed")]
    UserInfo { input: String },
    /// The authority carries a port (`:port`).
    #[error("invalid trust domain in {input:?}: port is not allowed")]
    Port { input: String },
    /// A `?query` component.
    #[error("invalid spiffe id {input:?}: query is not allowed")]
    Query { input: String },
    /// A `#fragment` component.
    #[error("invalid spiffe id {input:?}: fragment is not allowed")]
    Fragment { input: String },
    /// An empty path segment (`//`).
    #[error("invalid spiffe id {input:?}: empty path segment")]
    EmptySegment { input: String },
    /// The path ends with `/`.
    #[error("invalid spiffe id {input:?}: trailing slash")]
    TrailingSlash { input: String },
    /// A `.` or `..` path segment.
    #[error("invalid spiffe id {input:?}: path segment {segment:?} is not allowed")]
    DotSegment {
        input: String,
        segment: &'static str,
    },
    /// A character outside `[A-Za-z0-9.-_]` in the path (this includes `%`: no percent-encoding).
    #[error("invalid spiffe id {input:?}: path contains {ch:?}, only [A-Za-z0-9.-_] allowed")]
    PathChar { input: String, ch: char },
    /// A valid SPIFFE ID whose path is not `/ns/<namespace>/sa/<service-account>`.
    #[error("spiffe id {input:?} is not a workload identity: path must be /ns/<namespace>/sa/<service-account>")]
    NotWorkload { input: String },
}

impl TrustDomain {
    /// The trust domain name, e.g. `cluster.local`.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        check_trust_domain(s, s)?;
        Ok(Self(s.to_owned()))
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl SpiffeId {
    /// Builds the identity of `service_account` in `namespace`, checking both as path segments.
    pub fn new(
        trust_domain: TrustDomain,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        let id = format!("{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}");
        if id.len() > MAX_ID_BYTES {
            return Err(too_long(&id));
        }
        for segment in [namespace, service_account] {
            check_segment(&id, segment)?;
        }
        // A segment may not smuggle in a `/` (check_segment refuses it), so the shape holds.
        Ok(Self::from_parts(
            &id,
            trust_domain.as_str().len(),
            namespace.len(),
        ))
    }

    /// The trust domain this identity belongs to, e.g. `cluster.local`.
    pub fn trust_domain(&self) -> &str {
        // Offsets were computed from this very string in `from_parts`, on ASCII boundaries.
        &self.uri[SCHEME.len()..usize::from(self.namespace_at) - NS.len()]
    }

    /// The Kubernetes namespace.
    pub fn namespace(&self) -> &str {
        &self.uri[usize::from(self.namespace_at)..usize::from(self.service_account_at) - SA.len()]
    }

    /// The Kubernetes service account.
    pub fn service_account(&self) -> &str {
        &self.uri[usize::from(self.service_account_at)..]
    }

    /// The whole ID as a string.
    pub fn as_str(&self) -> &str {
        &self.uri
    }

    /// Wraps `uri`, already checked to be `spiffe://<td>/ns/<ns>/sa/<sa>` with segments of the
    /// given lengths and at most [`MAX_ID_BYTES`] long.
    fn from_parts(uri: &str, trust_domain_len: usize, namespace_len: usize) -> Self {
        let namespace_at = SCHEME.len() + trust_domain_len + NS.len();
        let service_account_at = namespace_at + namespace_len + SA.len();
        // Both offsets are below MAX_ID_BYTES (2048), far from u16::MAX.
        Self {
            uri: Arc::from(uri),
            namespace_at: u16::try_from(namespace_at).unwrap_or(u16::MAX),
            service_account_at: u16::try_from(service_account_at).unwrap_or(u16::MAX),
        }
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        if input.len() > MAX_ID_BYTES {
            return Err(too_long(input));
        }
        let rest = input
            .strip_prefix(SCHEME)
            .ok_or_else(|| SpiffeIdError::WrongScheme {
                input: input.to_owned(),
            })?;
        // Query and fragment first: their delimiters would otherwise show up as bad characters.
        if rest.contains('#') {
            return Err(SpiffeIdError::Fragment {
                input: input.to_owned(),
            });
        }
        if rest.contains('?') {
            return Err(SpiffeIdError::Query {
                input: input.to_owned(),
            });
        }
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        check_trust_domain(input, authority)?;
        let segments = split_path(input, path)?;
        match segments.as_slice() {
            ["ns", namespace, "sa", _] => {
                Ok(Self::from_parts(input, authority.len(), namespace.len()))
            }
            _ => Err(SpiffeIdError::NotWorkload {
                input: input.to_owned(),
            }),
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("SpiffeId").field(&&*self.uri).finish()
    }
}

/// Checks `domain` (the authority part of `input`) as a trust domain name.
fn check_trust_domain(input: &str, domain: &str) -> Result<(), SpiffeIdError> {
    let err_input = || input.to_owned();
    if domain.is_empty() {
        return Err(SpiffeIdError::EmptyTrustDomain { input: err_input() });
    }
    if domain.len() > MAX_TRUST_DOMAIN_BYTES {
        return Err(SpiffeIdError::TooLong {
            input: truncated(input),
            len: domain.len(),
            max: MAX_TRUST_DOMAIN_BYTES,
        });
    }
    if domain.contains('@') {
        return Err(SpiffeIdError::UserInfo { input: err_input() });
    }
    if domain.contains(':') {
        return Err(SpiffeIdError::Port { input: err_input() });
    }
    match domain.chars().find(|&c| !is_trust_domain_char(c)) {
        Some(ch) => Err(SpiffeIdError::TrustDomainChar {
            input: err_input(),
            ch,
        }),
        None => Ok(()),
    }
}

/// Splits the path (after the authority's `/`) into segments, checking each.
fn split_path<'a>(input: &str, path: &'a str) -> Result<Vec<&'a str>, SpiffeIdError> {
    if path.is_empty() {
        // `spiffe://td` has no path; `spiffe://td/` is a trailing slash.
        if input.ends_with('/') {
            return Err(SpiffeIdError::TrailingSlash {
                input: input.to_owned(),
            });
        }
        return Ok(Vec::new());
    }
    if path.ends_with('/') {
        return Err(SpiffeIdError::TrailingSlash {
            input: input.to_owned(),
        });
    }
    let segments: Vec<&str> = path.split('/').collect();
    for segment in &segments {
        check_segment(input, segment)?;
    }
    Ok(segments)
}

/// Checks one path segment of `input`.
fn check_segment(input: &str, segment: &str) -> Result<(), SpiffeIdError> {
    let dot = match segment {
        "" => {
            return Err(SpiffeIdError::EmptySegment {
                input: input.to_owned(),
            })
        }
        "." => Some("."),
        ".." => Some(".."),
        _ => None,
    };
    if let Some(segment) = dot {
        return Err(SpiffeIdError::DotSegment {
            input: input.to_owned(),
            segment,
        });
    }
    match segment.chars().find(|&c| !is_path_char(c)) {
        Some(ch) => Err(SpiffeIdError::PathChar {
            input: input.to_owned(),
            ch,
        }),
        None => Ok(()),
    }
}

fn is_trust_domain_char(c: char) -> bool {
    matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_')
}

fn is_path_char(c: char) -> bool {
    matches!(c, 'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_')
}

fn too_long(input: &str) -> SpiffeIdError {
    SpiffeIdError::TooLong {
        input: truncated(input),
        len: input.len(),
        max: MAX_ID_BYTES,
    }
}

/// Cuts an over-long input for error messages, on a char boundary.
fn truncated(input: &str) -> String {
    const SHOWN: usize = 64;
    match input.char_indices().nth(SHOWN) {
        Some((end, _)) => format!("{}...", &input[..end]),
        None => input.to_owned(),
    }
}

#[cfg(test)]
mod tests;
