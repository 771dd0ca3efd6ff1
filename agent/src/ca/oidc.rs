//! OIDC discovery of the token issuer's keys from the Kubernetes API server, kept fresh.
//!
//! `GET <server>/.well-known/openid-configuration` names `jwks_uri`; its path is fetched from
//! the same server (the URI's host is the issuer's, often not resolvable from a pod). Both go
//! through kube's client, so the CA's own service-account token and the cluster's CA bundle (or
//! a kubeconfig) authenticate it. Keys are fetched again every refresh interval and whenever a
//! token names an unknown key id (at most once per [`MIN_REFETCH`]); failures keep the
//! previous keys and retry with exponential backoff.
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::ca::service::{chain, CaService};
use crate::ca::token::{Jwks, JwksError};

/// Shortest time between two fetches prompted by unknown key ids.
pub const MIN_REFETCH: Duration = Duration::from_secs(5);
/// Longest backoff between failed fetches.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Path of the discovery document.
pub const DISCOVERY_PATH: &str = "/.well-known/openid-configuration";

/// Errors of OIDC discovery.
#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    /// The Kubernetes client could not be configured.
    #[error("tokens.oidcDiscovery ({url}): cannot configure a client")]
    Client {
        url: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A request to the API server failed (connection, TLS, authorization or HTTP status).
    #[error("oidc discovery: GET {url} failed")]
    Request {
        url: String,
        #[source]
        source: kube::Error,
    },
    /// The discovery document is not JSON with a `jwks_uri`.
    #[error("oidc discovery: {url} is not an openid configuration with a jwks_uri")]
    Document {
        url: String,
        #[source]
        source: serde_json::Error,
    },
    /// `jwks_uri` is not a URI with a path.
    #[error("oidc discovery: jwks_uri {uri:?} from {url} is not a valid uri")]
    JwksUri { url: String, uri: String },
    /// The key set did not parse or held no usable key.
    #[error(transparent)]
    Keys(#[from] JwksError),
}

/// Fetches the issuer's keys from one API server.
#[derive(Clone)]
pub struct Discovery {
    client: kube::Client,
    url: String,
}

#[derive(Deserialize)]
struct OpenIdConfiguration {
    jwks_uri: String,
}

impl Discovery {
    /// Discovery at `url` with the credentials of `kubeconfig`, or else of `$KUBECONFIG`,
    /// `~/.kube/config` or the in-cluster service account.
    pub async fn new(url: &str, kubeconfig: Option<&Path>) -> Result<Self, OidcError> {
        let err = |source: Box<dyn std::error::Error + Send + Sync>| OidcError::Client {
            url: url.to_owned(),
            source,
        };
        let mut config = match kubeconfig {
            Some(path) => {
                let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| err(e.into()))?;
                kube::Config::from_custom_kubeconfig(kc, &Default::default())
                    .await
                    .map_err(|e| err(e.into()))?
            }
            None => kube::Config::infer().await.map_err(|e| err(e.into()))?,
        };
        config.cluster_url = url
            .parse()
            .map_err(|e: http::uri::InvalidUri| err(e.into()))?;
        let client = kube::Client::try_from(config).map_err(|e| err(e.into()))?;
        Ok(Self::with_client(client, url))
    }

    /// Discovery through an existing client (whose cluster URL is `url`).
    pub fn with_client(client: kube::Client, url: &str) -> Self {
        Self {
            client,
            url: url.trim_end_matches('/').to_owned(),
        }
    }

    /// Fetches the discovery document, then the key set it names.
    pub async fn fetch(&self) -> Result<Jwks, OidcError> {
        let doc_url = format!("{}{DISCOVERY_PATH}", self.url);
        let text = self.get(DISCOVERY_PATH, &doc_url).await?;
        let doc: OpenIdConfiguration =
            serde_json::from_str(&text).map_err(|source| OidcError::Document {
                url: doc_url.clone(),
                source,
            })?;
        let bad_uri = || OidcError::JwksUri {
            url: doc_url.clone(),
            uri: doc.jwks_uri.clone(),
        };
        let uri: http::Uri = doc.jwks_uri.parse().map_err(|_| bad_uri())?;
        let path = uri
            .path_and_query()
            .map(|p| p.as_str())
            .filter(|p| p.starts_with('/') && p.len() > 1)
            .ok_or_else(bad_uri)?;
        let jwks_url = format!("{}{path}", self.url);
        let text = self.get(path, &jwks_url).await?;
        Ok(Jwks::parse(Path::new(&jwks_url), &text)?)
    }

    async fn get(&self, path: &str, url: &str) -> Result<String, OidcError> {
        let request = http::Request::get(path)
            .header(http::header::ACCEPT, "application/json")
            .body(Vec::new())
            .map_err(|e| OidcError::Request {
                url: url.to_owned(),
                source: kube::Error::HttpError(e),
            })?;
        self.client
            .request_text(request)
            .await
            .map_err(|source| OidcError::Request {
                url: url.to_owned(),
                source,
            })
    }
}

/// Keeps `service`'s keys fresh until aborted: every `refresh`, and soon after a token names an
/// unknown key; on failure keeps the old keys and retries with backoff (1 s doubling to 60 s).
pub async fn refresh(discovery: Discovery, refresh: Duration, service: Arc<CaService>) {
    let mut backoff: Option<Duration> = None;
    loop {
        let wait = backoff.unwrap_or(refresh);
        let missed = tokio::select! {
            () = tokio::time::sleep(wait) => false,
            () = service.tokens().key_missed().notified(), if backoff.is_none() => true,
        };
        if missed {
            // Many requests with a new key id arrive together: fetch once for all of them.
            tokio::time::sleep(MIN_REFETCH).await;
        }
        match discovery.fetch().await {
            Ok(keys) => {
                tracing::debug!(url = %discovery.url, keys = keys.len(), missed, "issuer keys fetched");
                service.tokens().set_keys(keys);
                backoff = None;
            }
            Err(error) => {
                let next = backoff.map_or(Duration::from_secs(1), |b| (b * 2).min(MAX_BACKOFF));
                tracing::warn!(error = %chain(&error), retry.secs = next.as_secs(), "issuer keys not refreshed; keeping the previous keys");
                backoff = Some(next);
            }
        }
    }
}
