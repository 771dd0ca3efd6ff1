//! A gRPC channel to istiod (or `ambit ca`) over TLS: the address, the root file it follows, the bearer token.
//!
//! Shared by the CA client and the xDS client. tonic runs without its own transport: TLS is
//! added by [`Connector`], so tonic sees plain HTTP/2 on `http://host:port`. The serving
//! certificate is verified against the configured root file, read anew for every channel
//! request; the channel is rebuilt when the file's text changes (root rotation).
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::rt::TokioIo;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::{Channel, Endpoint};
use tower_service::Service;

use crate::identity::{BundleError, TrustBundle};

/// Interval of HTTP/2 pings while a call is open.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long a ping may go unanswered before the connection is dropped.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a channel (or the token sent on it) could not be had.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The address is not `host[:port]` or `https://host[:port]`.
    #[error("address {address:?} is invalid: {reason}")]
    Address {
        address: String,
        reason: &'static str,
    },
    /// The server name (or the host) is not a DNS name or IP address.
    #[error("server name {name:?} is not a dns name or ip address")]
    ServerName { name: String },
    /// The root file could not be read.
    #[error("cannot read root file {}", path.display())]
    RootFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The root file holds no usable root.
    #[error("root file {}", path.display())]
    Roots {
        path: PathBuf,
        #[source]
        source: BundleError,
    },
    /// rustls refused the TLS settings.
    #[error("failed to build the client tls config")]
    Tls {
        #[source]
        source: rustls::Error,
    },
    /// The token file could not be read.
    #[error("cannot read token file {}", path.display())]
    TokenFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The token file is empty or holds characters a header cannot carry.
    #[error("token file {} is empty or not a token", path.display())]
    BadToken { path: PathBuf },
}

/// Where to connect and what to trust: one server, its root file, and the cached channel.
pub struct TlsTarget {
    address: String,
    /// `http://host:port`: TLS is added by our connector, so tonic sees plain HTTP/2.
    endpoint: Uri,
    host: String,
    port: u16,
    server_name: ServerName<'static>,
    root_cert: PathBuf,
    connect_timeout: Duration,
    /// The channel, the root file text it was built with, and that file's roots.
    channel: Mutex<Option<(String, Channel, TrustBundle)>>,
}

impl TlsTarget {
    /// Parses `address` (`host[:port]` or `https://host[:port]`, `default_port` when omitted);
    /// nothing is read or connected until [`TlsTarget::channel`].
    pub fn new(
        address: &str,
        default_port: u16,
        server_name: Option<&str>,
        root_cert: PathBuf,
        connect_timeout: Duration,
    ) -> Result<Self, ChannelError> {
        let bad = |reason| ChannelError::Address {
            address: address.to_owned(),
            reason,
        };
        let text = if address.contains("://") {
            address.to_owned()
        } else {
            format!("https://{address}")
        };
        let uri: Uri = text.parse().map_err(|_| bad("not a uri"))?;
        if uri.scheme_str() != Some("https") {
            return Err(bad("scheme must be https"));
        }
        if uri
            .path_and_query()
            .is_some_and(|p| p.as_str() != "/" && !p.as_str().is_empty())
        {
            return Err(bad("must not have a path"));
        }
        let authority = uri.authority().ok_or_else(|| bad("no host"))?;
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = authority.port_u16().unwrap_or(default_port);
        let endpoint = match host.parse::<IpAddr>() {
            Ok(IpAddr::V6(ip)) => format!("http://[{ip}]:{port}"),
            _ => format!("http://{host}:{port}"),
        };
        let endpoint = endpoint.parse().map_err(|_| bad("not a uri"))?;
        let name = server_name.map_or_else(|| host.clone(), str::to_owned);
        let server_name =
            ServerName::try_from(name.clone()).map_err(|_| ChannelError::ServerName { name })?;
        Ok(Self {
            address: address.to_owned(),
            endpoint,
            host,
            port,
            server_name,
            root_cert,
            connect_timeout,
            channel: Mutex::new(None),
        })
    }

    /// The address as configured.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The host to connect to (no brackets around an IPv6 address).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port to connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The root file.
    pub fn root_cert(&self) -> &Path {
        &self.root_cert
    }

    /// The channel for the current root file (rebuilt when the file changed) and its roots.
    pub async fn channel(&self) -> Result<(Channel, TrustBundle), ChannelError> {
        let path = &self.root_cert;
        let root_pem =
            tokio::fs::read_to_string(path)
                .await
                .map_err(|source| ChannelError::RootFile {
                    path: path.clone(),
                    source,
                })?;
        // A poisoned lock only means a holder panicked between two plain assignments.
        let mut cached = self.channel.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((pem, channel, bundle)) = cached.as_ref() {
            if *pem == root_pem {
                return Ok((channel.clone(), bundle.clone()));
            }
        }
        let bundle = TrustBundle::from_pem(&root_pem).map_err(|source| ChannelError::Roots {
            path: path.clone(),
            source,
        })?;
        let mut store = RootCertStore::empty();
        let (_, ignored) = store.add_parsable_certificates(bundle.roots().iter().cloned());
        if ignored > 0 {
            tracing::warn!(path = %path.display(), ignored, "some roots are unusable for tls");
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|source| ChannelError::Tls { source })?
            .with_root_certificates(store)
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let connector = Connector {
            tls: TlsConnector::from(Arc::new(tls)),
            host: self.host.clone(),
            port: self.port,
            server_name: self.server_name.clone(),
        };
        // HTTP/2 pings while a call is open: a long-lived stream (xDS) notices a peer that
        // vanished without closing the connection.
        let channel = Endpoint::from(self.endpoint.clone())
            .connect_timeout(self.connect_timeout)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .connect_with_connector_lazy(connector);
        *cached = Some((root_pem, channel.clone(), bundle.clone()));
        Ok((channel, bundle))
    }
}

impl std::fmt::Debug for TlsTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsTarget")
            .field("address", &self.address)
            .field("root_cert", &self.root_cert)
            .finish_non_exhaustive()
    }
}

/// `Bearer <token>` from `token_file`, read anew (kubelet rotates projected tokens).
pub async fn bearer(token_file: &Path) -> Result<AsciiMetadataValue, ChannelError> {
    let token = tokio::fs::read_to_string(token_file)
        .await
        .map_err(|source| ChannelError::TokenFile {
            path: token_file.to_owned(),
            source,
        })?;
    AsciiMetadataValue::try_from(format!("Bearer {}", token.trim()))
        .ok()
        .filter(|_| !token.trim().is_empty())
        .ok_or_else(|| ChannelError::BadToken {
            path: token_file.to_owned(),
        })
}

/// `value` as `ClusterID` gRPC metadata; `None` when it is empty or not visible ASCII.
pub fn cluster_id_metadata(value: &str) -> Option<AsciiMetadataValue> {
    AsciiMetadataValue::try_from(value)
        .ok()
        .filter(|_| !value.is_empty() && value.bytes().all(|b| b.is_ascii_graphic()))
}

/// Opens TCP + TLS to the server for tonic's channel.
#[derive(Clone)]
struct Connector {
    tls: TlsConnector,
    host: String,
    port: u16,
    server_name: ServerName<'static>,
}

type ConnectFuture =
    Pin<Box<dyn Future<Output = io::Result<TokioIo<TlsStream<TcpStream>>>> + Send>>;

impl Service<Uri> for Connector {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let tcp = TcpStream::connect((this.host.as_str(), this.port)).await?;
            tcp.set_nodelay(true)?;
            let tls = this.tls.connect(this.server_name, tcp).await?;
            Ok(TokioIo::new(tls))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(address: &str) -> Result<TlsTarget, ChannelError> {
        TlsTarget::new(
            address,
            15012,
            None,
            PathBuf::from("/nonexistent"),
            Duration::from_secs(1),
        )
    }

    #[test]
    fn addresses_take_the_default_port_and_refuse_other_schemes_and_paths() {
        assert_eq!(target("istiod").unwrap().port, 15012);
        assert_eq!(target("https://istiod:443").unwrap().port, 443);
        let v6 = target("[::1]:1").unwrap();
        assert_eq!(v6.endpoint.to_string(), "http://[::1]:1/");
        for bad in ["http://istiod", "https://istiod/x", "https://"] {
            assert!(
                matches!(target(bad), Err(ChannelError::Address { .. })),
                "{bad}"
            );
        }
    }

    #[tokio::test]
    async fn bearer_trims_the_token_and_refuses_an_empty_one() {
        let dir = std::env::temp_dir().join(format!("ambit-bearer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "abc\n").unwrap();
        assert_eq!(bearer(&file).await.unwrap(), "Bearer abc");
        std::fs::write(&file, " \n").unwrap();
        assert!(matches!(
            bearer(&file).await,
            Err(ChannelError::BadToken { .. })
        ));
        assert!(matches!(
            bearer(&dir.join("none")).await,
            Err(ChannelError::TokenFile { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
