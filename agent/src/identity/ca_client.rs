//! The agent's CA client: `CreateCertificate` over TLS, on behalf of a pod's identity.
//!
//! Each call makes a fresh key and CSR, reads the service-account token file anew (kubelet
//! rotates projected tokens), asks for the identity with `ImpersonatedIdentity` (and names its
//! cluster with `ClusterID` metadata when configured, for a multi-cluster istiod), and checks
//! the answer as ztunnel does: the chain must be an X.509-SVID that verifies against the roots
//! the CA sent, and its identity must be exactly the one asked for. The TLS channel verifies
//! the CA's serving certificate against the configured root file, and is rebuilt when that
//! file changes. The same client serves `ambit ca` and istiod (see [`answer`] for the two
//! shapes of their answers).
use std::error::Error as StdError;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use http::uri::PathAndQuery;
use rustls_pki_types::UnixTime;
use serde::Deserialize;
use tonic::metadata::AsciiMetadataValue;
use tonic_prost::ProstCodec;

use crate::identity::ca_api::{
    Impersonate as _, IstioCertificateRequest, IstioCertificateResponse, CLUSTER_ID,
    CREATE_CERTIFICATE_PATH,
};
use crate::identity::channel::{bearer, cluster_id_metadata, ChannelError, TlsTarget};
use crate::identity::pem_block;
use crate::identity::{
    new_csr, verify_svid, BundleError, CsrError, PeerRole, SpiffeId, SvidError, TrustBundle,
    TrustDomain, WorkloadCertError, WorkloadCertificate,
};
use answer::Split;

/// Default CA port (istiod's).
const DEFAULT_PORT: u16 = 15012;

/// Where and how the agent asks for certificates: the agent config's `ca:` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CaClientConfig {
    /// The CA: `host:port` or `https://host:port` (port 15012 when omitted).
    pub address: String,
    /// PEM root(s) the CA's serving certificate must chain to (the CA's `root-cert.pem`, or
    /// istiod's `istio-ca-root-cert` ConfigMap); also trusted for peers, and followed as it
    /// changes.
    pub root_cert: PathBuf,
    /// How often `root_cert` is checked for changes.
    #[serde(default = "default_root_cert_poll_ms")]
    pub root_cert_poll_ms: u64,
    /// The node agent's service-account token (audience `ambit-ca`, or `istio-ca` for istiod),
    /// read for every request.
    pub token_file: PathBuf,
    /// `ClusterID` metadata sent with every request (istiod's `CLUSTER_ID`); none when unset.
    #[serde(default)]
    pub cluster_id: Option<String>,
    /// Name to verify in the CA's certificate; defaults to the host of `address`.
    #[serde(default)]
    pub server_name: Option<String>,
    /// Requested certificate lifetime.
    #[serde(default = "default_ttl_secs")]
    pub ttl_secs: u64,
    /// Deadline of one request, connection included.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

/// A client of `istio.v1.auth.IstioCertificateService` (ambit ca or istiod).
pub struct CaClient {
    cfg: CaClientConfig,
    /// The CA's address, root file and channel.
    target: TlsTarget,
    /// `cluster_id`, checked.
    cluster_id: Option<AsciiMetadataValue>,
}

/// A certificate the CA issued, checked, with the roots the CA sent along.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The SVID and its key.
    pub certificate: WorkloadCertificate,
    /// The roots from the last entry of the response (several during a root rotation).
    pub roots: TrustBundle,
}

/// Why a certificate could not be obtained.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The channel or the request's token could not be had (address, server name, root
    /// file, TLS settings, token file).
    #[error("ca {address}: cannot make the channel or the request token")]
    Channel {
        address: String,
        #[source]
        source: ChannelError,
    },
    /// `clusterId` cannot be sent as gRPC metadata.
    #[error("ca clusterId {value:?} is empty or not visible ascii")]
    ClusterId { value: String },
    /// Key or CSR generation failed.
    #[error("failed to make a csr")]
    Csr {
        #[source]
        source: CsrError,
    },
    /// The CA was not reachable or the request did not complete.
    #[error("ca {address}: request for {id} failed")]
    Transport {
        address: String,
        id: SpiffeId,
        #[source]
        source: tonic::transport::Error,
    },
    /// The request did not reach the CA: connection refused, TLS failure (e.g. a serving
    /// certificate that does not chain to the configured root), connection lost.
    #[error("ca {address} unreachable for {id}")]
    Unreachable {
        address: String,
        id: SpiffeId,
        #[source]
        source: tonic::Status,
    },
    /// The CA answered with an error status (refused, or failed).
    #[error("ca {address} refused {id}")]
    Refused {
        address: String,
        id: SpiffeId,
        #[source]
        source: tonic::Status,
    },
    /// No answer in time.
    #[error("ca {address}: request for {id} timed out after {timeout:?}")]
    Timeout {
        address: String,
        id: SpiffeId,
        timeout: Duration,
    },
    /// The response holds no leaf or no roots.
    #[error("ca {address} answered {id} with {entries} chain entries, expected a leaf and roots")]
    ShortChain {
        address: String,
        id: SpiffeId,
        entries: usize,
    },
    /// A response entry is not PEM certificates.
    #[error("ca {address} answered {id} with an invalid pem certificate")]
    ResponsePem {
        address: String,
        id: SpiffeId,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// The response's roots are unusable.
    #[error("ca {address} answered {id} with unusable roots")]
    ResponseRoots {
        address: String,
        id: SpiffeId,
        #[source]
        source: BundleError,
    },
    /// The returned chain is not a valid SVID under the returned roots.
    #[error("ca {address} answered {id} with a certificate that is not a valid svid")]
    InvalidSvid {
        address: String,
        id: SpiffeId,
        #[source]
        source: Box<SvidError>,
    },
    /// The response's roots share none with the configured root file: the certificate would
    /// not chain to the trust the agent was given.
    #[error("ca {address} answered {id} with roots the agent does not trust (none is in {})", root_file.display())]
    UntrustedRoots {
        address: String,
        id: SpiffeId,
        root_file: PathBuf,
    },
    /// The CA signed another identity than the one asked for.
    #[error("ca {address} issued {actual} when {expected} was asked for")]
    IdentityMismatch {
        address: String,
        expected: SpiffeId,
        actual: SpiffeId,
    },
    /// The chain and our key do not make a usable certificate.
    #[error("ca {address} answered {id} with an unusable certificate")]
    Certificate {
        address: String,
        id: SpiffeId,
        #[source]
        source: Box<WorkloadCertError>,
    },
}

impl ClientError {
    /// Whether the CA answered, but with a certificate the agent refuses (another identity,
    /// an invalid chain, untrusted roots): a misbehaving CA rather than an unreachable one.
    pub fn is_rejected_answer(&self) -> bool {
        matches!(
            self,
            Self::ShortChain { .. }
                | Self::ResponsePem { .. }
                | Self::ResponseRoots { .. }
                | Self::InvalidSvid { .. }
                | Self::UntrustedRoots { .. }
                | Self::IdentityMismatch { .. }
                | Self::Certificate { .. }
        )
    }
}

impl CaClient {
    /// Builds a client; nothing is read or connected until the first [`CaClient::fetch`].
    pub fn new(cfg: CaClientConfig) -> Result<Self, ClientError> {
        let target = TlsTarget::new(
            &cfg.address,
            DEFAULT_PORT,
            cfg.server_name.as_deref(),
            cfg.root_cert.clone(),
            Duration::from_millis(cfg.timeout_ms.max(1)),
        )
        .map_err(|source| ClientError::Channel {
            address: cfg.address.clone(),
            source,
        })?;
        let cluster_id = (cfg.cluster_id.as_deref())
            .map(|value| {
                cluster_id_metadata(value).ok_or_else(|| ClientError::ClusterId {
                    value: value.to_owned(),
                })
            })
            .transpose()?;
        Ok(Self {
            cfg,
            target,
            cluster_id,
        })
    }

    /// The configuration this client was built from.
    pub fn config(&self) -> &CaClientConfig {
        &self.cfg
    }

    /// Asks the CA for a certificate for `id` and checks what comes back.
    pub async fn fetch(&self, id: &SpiffeId) -> Result<Issued, ClientError> {
        let timeout = Duration::from_millis(self.cfg.timeout_ms.max(1));
        let address = self.cfg.address.clone();
        match tokio::time::timeout(timeout, self.fetch_inner(id)).await {
            Ok(result) => result,
            Err(_) => Err(ClientError::Timeout {
                address,
                id: id.clone(),
                timeout,
            }),
        }
    }

    async fn fetch_inner(&self, id: &SpiffeId) -> Result<Issued, ClientError> {
        let channel_error = |source| ClientError::Channel {
            address: self.cfg.address.clone(),
            source,
        };
        let bearer = bearer(&self.cfg.token_file).await.map_err(channel_error)?;
        let (channel, trusted) = self.target.channel().await.map_err(channel_error)?;
        let generated = new_csr(id).map_err(|source| ClientError::Csr { source })?;
        let csr_pem = pem_block("CERTIFICATE REQUEST", generated.csr.as_ref());
        let ttl_secs = i64::try_from(self.cfg.ttl_secs).unwrap_or(i64::MAX);
        let mut request = tonic::Request::new(IstioCertificateRequest::impersonating(
            csr_pem,
            ttl_secs,
            &id.to_string(),
        ));
        request.metadata_mut().insert("authorization", bearer);
        if let Some(cluster) = &self.cluster_id {
            request.metadata_mut().insert(CLUSTER_ID, cluster.clone());
        }
        request.set_timeout(Duration::from_millis(self.cfg.timeout_ms.max(1)));

        let address = || self.cfg.address.clone();
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready()
            .await
            .map_err(|source| ClientError::Transport {
                address: address(),
                id: id.clone(),
                source,
            })?;
        let response: tonic::Response<IstioCertificateResponse> = grpc
            .unary(
                request,
                PathAndQuery::from_static(CREATE_CERTIFICATE_PATH),
                ProstCodec::default(),
            )
            .await
            .map_err(|source| {
                // Statuses made on our side of the wire carry the transport error as source;
                // those the CA sent do not.
                if source.code() == tonic::Code::Unavailable && source.source().is_some() {
                    ClientError::Unreachable {
                        address: address(),
                        id: id.clone(),
                        source,
                    }
                } else {
                    ClientError::Refused {
                        address: address(),
                        id: id.clone(),
                        source,
                    }
                }
            })?;
        self.check(id, response.into_inner(), generated.key, &trusted)
    }

    /// Checks a response: an SVID of exactly `id` under the roots sent along, which must
    /// include one of the `trusted` roots (the configured root file; more may come along
    /// during a root rotation).
    fn check(
        &self,
        id: &SpiffeId,
        response: IstioCertificateResponse,
        key: rustls_pki_types::PrivateKeyDer<'static>,
        trusted: &TrustBundle,
    ) -> Result<Issued, ClientError> {
        let address = || self.cfg.address.clone();
        let Split { chain, roots } = answer::split(&response.cert_chain).map_err(|e| match e {
            answer::Error::Short { entries } => ClientError::ShortChain {
                address: address(),
                id: id.clone(),
                entries,
            },
            answer::Error::Pem(source) => ClientError::ResponsePem {
                address: address(),
                id: id.clone(),
                source,
            },
            answer::Error::Roots(source) => ClientError::ResponseRoots {
                address: address(),
                id: id.clone(),
                source,
            },
        })?;
        if !roots.roots().iter().any(|r| trusted.roots().contains(r)) {
            return Err(ClientError::UntrustedRoots {
                address: address(),
                id: id.clone(),
                root_file: self.cfg.root_cert.clone(),
            });
        }
        let now = UnixTime::since_unix_epoch(
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default(),
        );
        // Always parses: it came out of a valid SPIFFE ID. Were it not to, the empty list would
        // make verification fail rather than pass.
        let domains: Vec<TrustDomain> = id.trust_domain().parse().into_iter().collect();
        for role in [PeerRole::Client, PeerRole::Server] {
            let actual = verify_svid(&chain, &roots, now, &domains, role).map_err(|source| {
                ClientError::InvalidSvid {
                    address: address(),
                    id: id.clone(),
                    source: Box::new(source),
                }
            })?;
            if actual != *id {
                return Err(ClientError::IdentityMismatch {
                    address: address(),
                    expected: id.clone(),
                    actual,
                });
            }
        }
        let certificate =
            WorkloadCertificate::new(chain, key).map_err(|source| ClientError::Certificate {
                address: address(),
                id: id.clone(),
                source: Box::new(source),
            })?;
        Ok(Issued { certificate, roots })
    }
}

impl std::fmt::Debug for CaClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaClient")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

fn default_root_cert_poll_ms() -> u64 {
    2_000
}
fn default_ttl_secs() -> u64 {
    24 * 3600
}
fn default_timeout_ms() -> u64 {
    10_000
}

mod answer;
#[cfg(test)]
mod tests;
