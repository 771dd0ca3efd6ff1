//! The delta ADS client: one stream to istiod for the workload API, re-opened with backoff when it ends.
//!
//! It subscribes (wildcard) to [`ADDRESS_TYPE`] and [`AUTHORIZATION_TYPE`] with the node's
//! projected token as `authorization: Bearer ...`, over TLS verified against the configured root
//! file (the channel machinery of [`crate::identity::channel`], shared with the CA client). Every
//! response goes through [`DeltaState::handle`] into the [`Sink`] and is ACKed or NACKed. When the
//! stream ends it waits (exponential backoff with jitter, capped; back to the start once a stream
//! has delivered a push) and resubscribes with the versions it holds; the inventory stays as it is
//! until the new stream's first push of each type ([`super::state`]).
use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::AsciiMetadataValue;

use ambit_proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use ambit_proto::envoy::service::discovery::v3::DeltaDiscoveryRequest;

use super::node::NodeInfo;
use super::state::DeltaState;
pub use super::state::Sink;
use super::status::{Handled, StatusHandle};
use crate::identity::channel::{bearer, cluster_id_metadata, ChannelError, TlsTarget};

pub use super::model::{ADDRESS_TYPE, AUTHORIZATION_TYPE};
/// istiod's xDS port.
pub const DEFAULT_PORT: u16 = 15012;
/// Largest response decoded (a full push of a large mesh is big; ztunnel takes 200 MiB).
const MAX_RESPONSE_BYTES: usize = 256 * 1024 * 1024;
/// gRPC metadata naming the caller's cluster (as the CA client sends it).
const CLUSTER_ID_HEADER: &str = "clusterid";

/// Pauses between streams: `initial`, doubled after each failed attempt up to `max`, each
/// taken at a random 50–100 %.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The first pause, and the pause after a stream that delivered a push.
    pub initial: Duration,
    /// The longest pause.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(15),
        }
    }
}

/// Where and how the stream connects (built by the agent's config from its `inventory:` section).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XdsClientConfig {
    /// istiod: `host[:port]` or `https://host[:port]` (port 15012 when omitted).
    pub address: String,
    /// PEM root(s) istiod's serving certificate must chain to; re-read for every stream.
    pub root_cert: PathBuf,
    /// The node's projected service-account token (audience `istio-ca`), read for every stream.
    pub token_file: PathBuf,
    /// Name to verify in istiod's certificate; defaults to the host of `address`.
    pub server_name: Option<String>,
    /// Sent as the `clusterid` header when set (multi-cluster istiod).
    pub cluster_id: Option<String>,
    /// The node the agent presents.
    pub node: NodeInfo,
    /// Deadline to open a stream: TCP, TLS and the call's response headers (which a grpc-go
    /// server such as istiod may send only with its first push, so leave it room).
    pub connect_timeout: Duration,
    /// Pauses between streams.
    pub backoff: Backoff,
}

/// Why a stream could not be opened or ended.
#[derive(Debug, thiserror::Error)]
pub enum XdsError {
    /// The configuration cannot make a channel (address, server name, cluster id).
    #[error("istiod {address}: invalid configuration")]
    Config {
        address: String,
        #[source]
        source: ChannelError,
    },
    /// `clusterId` cannot be sent as gRPC metadata.
    #[error("istiod clusterId {value:?} is empty or not visible ascii")]
    ClusterId { value: String },
    /// The channel or the token could not be had (root file, token file).
    #[error("istiod {address}: cannot open a stream")]
    Channel {
        address: String,
        #[source]
        source: ChannelError,
    },
    /// The call failed or the stream broke.
    #[error("istiod {address}: delta ads stream failed")]
    Grpc {
        address: String,
        #[source]
        source: tonic::Status,
    },
    /// istiod ended the stream without an error.
    #[error("istiod {address}: delta ads stream ended")]
    Ended { address: String },
    /// The stream did not open in time.
    #[error("istiod {address}: no stream within {timeout:?}")]
    Timeout { address: String, timeout: Duration },
}

/// The client: owns the sink and the delta state; [`XdsClient::run`] drives it.
pub struct XdsClient<S> {
    cfg: XdsClientConfig,
    target: TlsTarget,
    cluster_id: Option<AsciiMetadataValue>,
    state: DeltaState,
    sink: S,
    status: StatusHandle,
}

impl<S: Sink> XdsClient<S> {
    /// A client delivering into `sink` and reporting into `status`; nothing is read or
    /// connected until [`XdsClient::run`].
    pub fn new(cfg: XdsClientConfig, sink: S, status: StatusHandle) -> Result<Self, XdsError> {
        let target = TlsTarget::new(
            &cfg.address,
            DEFAULT_PORT,
            cfg.server_name.as_deref(),
            cfg.root_cert.clone(),
            cfg.connect_timeout,
        )
        .map_err(|source| XdsError::Config {
            address: cfg.address.clone(),
            source,
        })?;
        let cluster_id = (cfg.cluster_id.as_deref())
            .map(|value| {
                cluster_id_metadata(value).ok_or_else(|| XdsError::ClusterId {
                    value: value.to_owned(),
                })
            })
            .transpose()?;
        let state = DeltaState::new(&[ADDRESS_TYPE, AUTHORIZATION_TYPE]);
        for type_url in state.type_urls() {
            status.subscribed(type_url);
        }
        Ok(Self {
            cfg,
            target,
            cluster_id,
            state,
            sink,
            status,
        })
    }

    /// The status this client reports into.
    pub fn status(&self) -> &StatusHandle {
        &self.status
    }

    /// Runs streams one after the other, forever (abort the task to stop it).
    pub async fn run(mut self) {
        let mut pause = self.cfg.backoff.initial;
        loop {
            self.status.connecting();
            self.state.begin_stream();
            let mut pushed = false;
            let error = self.stream(&mut pushed).await;
            if pushed {
                pause = self.cfg.backoff.initial;
            }
            let wait = jittered(pause);
            let error = crate::error::error_chain(&error);
            tracing::warn!(%error, retry_in = ?wait, "istiod stream ended");
            self.status.ended(error);
            tokio::time::sleep(wait).await;
            pause = (pause * 2).min(self.cfg.backoff.max);
        }
    }

    /// One stream, until it fails; `pushed` is set once a response arrived.
    async fn stream(&mut self, pushed: &mut bool) -> XdsError {
        let address = self.cfg.address.clone();
        let opened = tokio::time::timeout(self.cfg.connect_timeout, self.open()).await;
        let (tx, mut inbound) = match opened {
            Ok(Ok(open)) => open,
            Ok(Err(e)) => return e,
            Err(_) => {
                return XdsError::Timeout {
                    address,
                    timeout: self.cfg.connect_timeout,
                }
            }
        };
        self.status.connected();
        tracing::info!(%address, "istiod stream open");
        loop {
            let response = match inbound.message().await {
                Ok(Some(response)) => response,
                Ok(None) => return XdsError::Ended { address },
                Err(source) => return XdsError::Grpc { address, source },
            };
            *pushed = true;
            let outcome = self.state.handle(&response, &mut self.sink);
            let nack = outcome
                .reply
                .error_detail
                .as_ref()
                .map(|e| e.message.as_str());
            if let Some(error) = nack {
                tracing::warn!(type_url = %response.type_url, nonce = %response.nonce, %error, "istiod push NACKed");
            }
            if outcome.stale_removed > 0 {
                tracing::info!(type_url = %response.type_url, removed = outcome.stale_removed, "resources the new stream no longer has removed");
            }
            self.status.handled(&Handled {
                type_url: &response.type_url,
                version: &response.system_version_info,
                nonce: &response.nonce,
                nack,
                resources: self.state.count(&response.type_url),
                synced: self.state.synced(&response.type_url),
            });
            if tx.send(outcome.reply).await.is_err() {
                return XdsError::Ended { address };
            }
        }
    }

    /// Opens the call and sends the subscriptions.
    async fn open(
        &self,
    ) -> Result<
        (
            mpsc::Sender<DeltaDiscoveryRequest>,
            tonic::Streaming<ambit_proto::envoy::service::discovery::v3::DeltaDiscoveryResponse>,
        ),
        XdsError,
    > {
        let address = || self.cfg.address.clone();
        let channel_error = |source| XdsError::Channel {
            address: address(),
            source,
        };
        let bearer = bearer(&self.cfg.token_file).await.map_err(channel_error)?;
        let (channel, _) = self.target.channel().await.map_err(channel_error)?;
        let initial = self.state.initial_requests(&self.cfg.node.node());
        // Room for the subscriptions and one reply per response in flight.
        let (tx, rx) = mpsc::channel(initial.len() + 16);
        for request in initial {
            tracing::debug!(type_url = %request.type_url, held = request.initial_resource_versions.len(), "subscribing");
            // The channel has room for them all.
            let _ = tx.try_send(request);
        }
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        request.metadata_mut().insert("authorization", bearer);
        if let Some(cluster) = &self.cluster_id {
            request
                .metadata_mut()
                .insert(CLUSTER_ID_HEADER, cluster.clone());
        }
        let mut client = AggregatedDiscoveryServiceClient::new(channel)
            .max_decoding_message_size(MAX_RESPONSE_BYTES);
        let response = client
            .delta_aggregated_resources(request)
            .await
            .map_err(|source| XdsError::Grpc {
                address: address(),
                source,
            })?;
        Ok((tx, response.into_inner()))
    }
}

/// `pause` taken at a random 50–100 % (so that a fleet of agents does not reconnect in step).
fn jittered(pause: Duration) -> Duration {
    let mut byte = [0u8; 1];
    let r = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut byte);
    let fraction = if r.is_ok() {
        f64::from(byte[0]) / 255.0
    } else {
        1.0
    };
    pause.mul_f64(0.5 + fraction / 2.0)
}

#[cfg(test)]
mod tests;
