//! `CreateCertificate`: authenticate the node agent, authorize the identity, sign the CSR.
//!
//! Order of checks: the bearer token (who asks, from which node) before anything in the
//! request is looked at, so unauthenticated callers learn nothing; then the `ClusterID`
//! metadata, as istiod checks it (absent or this CA's cluster: accepted, unless configured to
//! require it; another cluster: refused, istiod has no token reviewer for it); then the requested identity
//! and CSR (well-formed, no extra SANs or CA bits); then node authorization (a pod with that
//! identity runs on the token's node, per the inventory); then signing. Every refusal becomes
//! a gRPC status whose message says why, is logged at warn and counted.
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::watch;
use tonic::metadata::MetadataMap;
use tonic::{Code, Status};

use crate::ca::token::{NodeToken, TokenError, TokenVerifier};
use crate::identity::ca_api::{
    Impersonate as _, Impersonation, IstioCertificateRequest, IstioCertificateResponse, CLUSTER_ID,
};
use crate::identity::pem_block;
use crate::identity::{
    CaError, CertificateAuthority, Csr, CsrError, SpiffeId, SpiffeIdError, TrustBundle, TrustDomain,
};
use crate::inventory::Snapshot;

/// The CA's request handler: signing authority, token verifier, inventory and counters.
pub struct CaService {
    /// Replaced whole when the root material is reloaded; a request signs with one version.
    signing: RwLock<Arc<Signing>>,
    tokens: TokenVerifier,
    cluster: ClusterPolicy,
    inventory: watch::Receiver<Arc<Snapshot>>,
    default_ttl: Duration,
    max_ttl: Duration,
    stats: Stats,
}

/// The signing authority and the roots every response ends with.
struct Signing {
    authority: CertificateAuthority,
    /// PEM of every trusted root, concatenated: the last entry of each response.
    roots_pem: String,
}

/// The cluster this CA serves (istiod's `CLUSTER_ID`) and whether callers must name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterPolicy {
    /// This CA's cluster ID.
    pub id: String,
    /// Refuse requests without `ClusterID` metadata (istiod takes them as its own cluster).
    pub required: bool,
}

/// A request's `ClusterID` metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterHeader<'a> {
    /// Not sent.
    Absent,
    /// Sent once, as text.
    Value(&'a str),
    /// Sent several times, or not as visible ASCII.
    Unreadable,
}

/// Why a request was refused.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// No `authorization: Bearer` header.
    #[error("no bearer token in the authorization header")]
    MissingToken,
    /// The token failed a check.
    #[error("service-account token refused")]
    Token {
        #[source]
        source: TokenError,
    },
    /// No `ClusterID` metadata, and this CA requires it.
    #[error("node {node} ({subject}): request has no ClusterID metadata; this ca requires cluster id {cluster:?}")]
    MissingClusterId {
        subject: String,
        node: String,
        cluster: String,
    },
    /// `ClusterID` names another cluster: its tokens cannot be checked here.
    #[error(
        "node {node} ({subject}) sent ClusterID {got:?}: this ca serves cluster {cluster:?} only"
    )]
    ForeignCluster {
        subject: String,
        node: String,
        got: String,
        cluster: String,
    },
    /// `ClusterID` sent several times or not as text.
    #[error("node {node} ({subject}): ClusterID metadata is not one ascii value")]
    BadClusterId { subject: String, node: String },
    /// The request has no `ImpersonatedIdentity`: node agents always name the identity.
    #[error("node {node} ({subject}): request has no ImpersonatedIdentity metadata; node agents must name the identity they ask for")]
    NoImpersonation { subject: String, node: String },
    /// `ImpersonatedIdentity` is not a string.
    #[error("node {node} ({subject}): ImpersonatedIdentity metadata is not a string")]
    ImpersonationNotAString { subject: String, node: String },
    /// `ImpersonatedIdentity` is not a workload SPIFFE ID.
    #[error("node {node} ({subject}): ImpersonatedIdentity is not a workload spiffe id")]
    BadIdentity {
        subject: String,
        node: String,
        #[source]
        source: SpiffeIdError,
    },
    /// The identity belongs to another trust domain.
    #[error("node {node} ({subject}) asked for {id}: this ca signs only for trust domain {trust_domain}")]
    ForeignTrustDomain {
        subject: String,
        node: String,
        id: SpiffeId,
        trust_domain: TrustDomain,
    },
    /// `validity_duration` is negative.
    #[error("node {node} ({subject}) asked for {id} with a negative validity_duration {secs}")]
    NegativeTtl {
        subject: String,
        node: String,
        id: SpiffeId,
        secs: i64,
    },
    /// The CSR is malformed, oversized, asks for CA powers or for other names.
    #[error("node {node} ({subject}): csr for {id} refused")]
    Csr {
        subject: String,
        node: String,
        id: SpiffeId,
        #[source]
        source: Box<CsrError>,
    },
    /// Node authorization: no pod with the identity runs on the caller's node.
    #[error("node {node} ({subject}) may not ask for {id}: no pod with that identity runs on node {node}")]
    NotOnNode {
        subject: String,
        node: String,
        id: SpiffeId,
    },
    /// Signing failed (the CA's fault, not the caller's).
    #[error("failed to sign {id} for node {node}")]
    Sign {
        node: String,
        id: SpiffeId,
        #[source]
        source: Box<CaError>,
    },
}

/// Counters of issued certificates and of refusals by reason.
#[derive(Debug, Default)]
pub struct Stats {
    counts: Mutex<BTreeMap<&'static str, u64>>,
}

/// A point-in-time copy of [`Stats`], for `/status` and logs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct StatsSnapshot {
    /// Certificates issued.
    pub issued: u64,
    /// Root material reloaded from `certDir` after a change.
    pub material_reloaded: u64,
    /// Changes of `certDir` whose material did not load (the previous material stays).
    pub material_rejected: u64,
    /// Refusals by reason (`missing_token`, `bad_token`, `not_on_node`, `bad_csr`, ...).
    pub refused: BTreeMap<&'static str, u64>,
}

/// What a successful request produced: the response, and what to log about it.
#[derive(Debug)]
pub struct Signed {
    /// The response to send.
    pub response: IstioCertificateResponse,
    /// Who it was for.
    pub id: SpiffeId,
    /// Which node asked.
    pub node: String,
    /// Its lifetime.
    pub ttl: Duration,
}

impl CaService {
    /// Builds the handler; `roots` are sent as the last entry of every response. It serves
    /// the cluster istiod calls `Kubernetes` by default, without requiring its name
    /// ([`CaService::with_cluster`]).
    pub fn new(
        authority: CertificateAuthority,
        roots: &TrustBundle,
        tokens: TokenVerifier,
        inventory: watch::Receiver<Arc<Snapshot>>,
        default_ttl: Duration,
        max_ttl: Duration,
    ) -> Self {
        Self {
            signing: RwLock::new(Arc::new(Signing::new(authority, roots))),
            tokens,
            cluster: ClusterPolicy {
                id: DEFAULT_CLUSTER_ID.to_owned(),
                required: false,
            },
            inventory,
            default_ttl,
            max_ttl,
            stats: Stats::default(),
        }
    }

    /// The same handler serving `cluster`.
    pub fn with_cluster(mut self, cluster: ClusterPolicy) -> Self {
        self.cluster = cluster;
        self
    }

    /// Signs with `authority` and answers with `roots` from now on (the root material was
    /// reloaded); requests in flight finish with the previous material.
    pub fn set_material(&self, authority: CertificateAuthority, roots: &TrustBundle) {
        let signing = Arc::new(Signing::new(authority, roots));
        // A poisoned lock only means a holder panicked; the value is replaced whole.
        *self
            .signing
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = signing;
    }

    fn signing(&self) -> Arc<Signing> {
        self.signing
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The token verifier (to swap the issuer's keys when the JWKS file changes).
    pub fn tokens(&self) -> &TokenVerifier {
        &self.tokens
    }

    /// The counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Handles one gRPC request and maps a refusal to a status whose message says why.
    pub fn handle(
        &self,
        peer: Option<SocketAddr>,
        metadata: &MetadataMap,
        request: &IstioCertificateRequest,
    ) -> Result<IstioCertificateResponse, Status> {
        let authorization = metadata.get("authorization").and_then(|v| v.to_str().ok());
        let cluster = ClusterHeader::from_metadata(metadata);
        self.create_certificate(peer, authorization, cluster, request, SystemTime::now())
            .map(|issued| issued.response)
            .map_err(|refusal| Status::new(refusal.code(), chain(&refusal)))
    }

    /// Decides one request at `now` (see the module doc), then logs and counts the outcome.
    pub fn create_certificate(
        &self,
        peer: Option<SocketAddr>,
        authorization: Option<&str>,
        cluster: ClusterHeader<'_>,
        request: &IstioCertificateRequest,
        now: SystemTime,
    ) -> Result<Signed, Refusal> {
        let peer = peer.map_or_else(|| "unknown".to_owned(), |p| p.to_string());
        let outcome = self.decide(authorization, cluster, request, now);
        match &outcome {
            Ok(issued) => {
                self.stats.count("issued");
                tracing::info!(
                    peer.addr = %peer,
                    node = %issued.node,
                    identity = %issued.id,
                    ttl.secs = issued.ttl.as_secs(),
                    "certificate issued"
                );
            }
            Err(refusal) => {
                let reason = refusal.reason();
                self.stats.count(reason);
                let error = chain(refusal);
                if refusal.code() == Code::Internal {
                    tracing::error!(peer.addr = %peer, reason, %error, "certificate request failed");
                } else {
                    tracing::warn!(peer.addr = %peer, reason, %error, "certificate request refused");
                }
            }
        }
        outcome
    }

    /// The checks of the module doc, then signing.
    fn decide(
        &self,
        authorization: Option<&str>,
        cluster: ClusterHeader<'_>,
        request: &IstioCertificateRequest,
        now: SystemTime,
    ) -> Result<Signed, Refusal> {
        let token = authorization
            .and_then(|value| value.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|token| !token.is_empty())
            .ok_or(Refusal::MissingToken)?;
        let NodeToken { subject, node } = self
            .tokens
            .verify(token, now)
            .map_err(|source| Refusal::Token { source })?;
        self.check_cluster(cluster, &subject, &node)?;

        let signing = self.signing();
        let id = match request.impersonated_identity() {
            Impersonation::Identity(id) => {
                id.parse::<SpiffeId>()
                    .map_err(|source| Refusal::BadIdentity {
                        subject: subject.clone(),
                        node: node.clone(),
                        source,
                    })?
            }
            Impersonation::Absent => return Err(Refusal::NoImpersonation { subject, node }),
            Impersonation::NotAString => {
                return Err(Refusal::ImpersonationNotAString { subject, node })
            }
        };
        if id.trust_domain() != signing.authority.trust_domain().as_str() {
            let trust_domain = signing.authority.trust_domain().clone();
            return Err(Refusal::ForeignTrustDomain {
                subject,
                node,
                id,
                trust_domain,
            });
        }
        let ttl = match u64::try_from(request.validity_duration) {
            Ok(0) => self.default_ttl,
            Ok(secs) => Duration::from_secs(secs).min(self.max_ttl),
            Err(_) => {
                let secs = request.validity_duration;
                return Err(Refusal::NegativeTtl {
                    subject,
                    node,
                    id,
                    secs,
                });
            }
        };
        let csr = Csr::from_pem(&request.csr).and_then(|csr| csr.check_sans(&id).map(|()| csr));
        let csr = match csr {
            Ok(csr) => csr,
            Err(source) => {
                return Err(Refusal::Csr {
                    subject,
                    node,
                    id,
                    source: Box::new(source),
                })
            }
        };

        let on_node = self
            .inventory
            .borrow()
            .with_identity(id.namespace(), id.service_account())
            .any(|w| w.node == node);
        if !on_node {
            return Err(Refusal::NotOnNode { subject, node, id });
        }

        let chain = signing
            .authority
            .sign(&csr, &id, ttl, now)
            .map_err(|source| Refusal::Sign {
                node: node.clone(),
                id: id.clone(),
                source: Box::new(source),
            })?;
        let mut cert_chain: Vec<String> = chain
            .iter()
            .map(|der| pem_block("CERTIFICATE", der))
            .collect();
        cert_chain.push(signing.roots_pem.clone());
        Ok(Signed {
            response: IstioCertificateResponse { cert_chain },
            id,
            node,
            ttl,
        })
    }

    /// The `ClusterID` check (see the module doc).
    fn check_cluster(
        &self,
        cluster: ClusterHeader<'_>,
        subject: &str,
        node: &str,
    ) -> Result<(), Refusal> {
        let (subject, node) = (subject.to_owned(), node.to_owned());
        match cluster {
            ClusterHeader::Value(got) if got == self.cluster.id => Ok(()),
            ClusterHeader::Absent if !self.cluster.required => Ok(()),
            ClusterHeader::Absent => Err(Refusal::MissingClusterId {
                subject,
                node,
                cluster: self.cluster.id.clone(),
            }),
            ClusterHeader::Value(got) => Err(Refusal::ForeignCluster {
                subject,
                node,
                got: got.to_owned(),
                cluster: self.cluster.id.clone(),
            }),
            ClusterHeader::Unreadable => Err(Refusal::BadClusterId { subject, node }),
        }
    }
}

/// istiod's cluster ID when none is configured (`CLUSTER_ID`).
pub const DEFAULT_CLUSTER_ID: &str = "Kubernetes";

impl Signing {
    fn new(authority: CertificateAuthority, roots: &TrustBundle) -> Self {
        let roots_pem = roots
            .roots()
            .iter()
            .map(|der| pem_block("CERTIFICATE", der))
            .collect();
        Self {
            authority,
            roots_pem,
        }
    }
}

impl<'a> ClusterHeader<'a> {
    /// The `ClusterID` entry of `metadata` (gRPC metadata keys are lowercase on the wire).
    pub fn from_metadata(metadata: &'a MetadataMap) -> Self {
        let mut values = metadata.get_all(CLUSTER_ID).iter();
        match (values.next(), values.next()) {
            (None, _) => Self::Absent,
            (Some(value), None) => value
                .to_str()
                .ok()
                .filter(|v| !v.is_empty())
                .map_or(Self::Unreadable, Self::Value),
            (Some(_), Some(_)) => Self::Unreadable,
        }
    }
}

impl Refusal {
    /// The gRPC status code: who is at fault, and how.
    pub fn code(&self) -> Code {
        match self {
            Self::MissingToken
            | Self::MissingClusterId { .. }
            | Self::ForeignCluster { .. }
            | Self::BadClusterId { .. } => Code::Unauthenticated,
            Self::Token {
                source: TokenError::SubjectNotAllowed { .. },
            } => Code::PermissionDenied,
            Self::Token { .. } => Code::Unauthenticated,
            Self::ForeignTrustDomain { .. } | Self::NotOnNode { .. } => Code::PermissionDenied,
            Self::NoImpersonation { .. }
            | Self::ImpersonationNotAString { .. }
            | Self::BadIdentity { .. }
            | Self::NegativeTtl { .. }
            | Self::Csr { .. } => Code::InvalidArgument,
            Self::Sign { .. } => Code::Internal,
        }
    }

    /// A short label for counters and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::MissingToken => "missing_token",
            Self::Token {
                source: TokenError::SubjectNotAllowed { .. },
            } => "not_a_node_agent",
            Self::Token { .. } => "bad_token",
            Self::MissingClusterId { .. } => "missing_cluster_id",
            Self::ForeignCluster { .. } => "foreign_cluster",
            Self::BadClusterId { .. } => "bad_cluster_id",
            Self::NoImpersonation { .. } | Self::ImpersonationNotAString { .. } => {
                "no_impersonation"
            }
            Self::BadIdentity { .. } => "bad_identity",
            Self::ForeignTrustDomain { .. } => "foreign_trust_domain",
            Self::NegativeTtl { .. } => "bad_ttl",
            Self::Csr { .. } => "bad_csr",
            Self::NotOnNode { .. } => "not_on_node",
            Self::Sign { .. } => "sign_failed",
        }
    }
}

impl Stats {
    /// Adds one to the counter `what` (`issued`, `material_reloaded`, `material_rejected` or a
    /// refusal reason).
    pub fn count(&self, what: &'static str) {
        // A poisoned lock only means a holder panicked mid-increment; the map is still whole.
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        *counts.entry(what).or_default() += 1;
    }

    /// Copies the counters.
    pub fn snapshot(&self) -> StatsSnapshot {
        let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let mut snapshot = StatsSnapshot::default();
        for (what, count) in counts.iter() {
            match *what {
                "issued" => snapshot.issued = *count,
                "material_reloaded" => snapshot.material_reloaded = *count,
                "material_rejected" => snapshot.material_rejected = *count,
                reason => {
                    snapshot.refused.insert(reason, *count);
                }
            }
        }
        snapshot
    }
}

/// The error and all its sources, joined with `: ` (the status message a caller sees).
pub(crate) use crate::error::error_chain as chain;

#[cfg(test)]
mod tests;
