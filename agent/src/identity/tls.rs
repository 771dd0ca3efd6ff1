//! rustls glue: SVID-based peer verifiers and the TLS 1.3 configs the HBONE tunnel uses.
//!
//! As in ztunnel, the server name plays no part: a client requires the server's SPIFFE ID to
//! be the identity it meant to reach, and a server accepts any client identity of our trust
//! domains (authorization by identity happens later, in policy). Both sides require a chain
//! to the trust bundle. Verification errors reach rustls as
//! `CertificateError::Other(`[`SvidError`]`)`, so the tunnel can log exactly what failed.
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, LazyLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::ring::cipher_suite;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::SingleCertAndKey;
use rustls::{
    CertificateError, ClientConfig, CommonState, DigitallySignedStruct, DistinguishedName,
    OtherError, ServerConfig, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::identity::verify::{self, CertName, PeerRole, ALGORITHMS};
use crate::identity::{SpiffeId, SvidError, TrustBundle, TrustDomain, WorkloadCertificate};

/// The ALPN protocol of the HBONE tunnel.
pub const ALPN_H2: &[u8] = b"h2";

/// The crypto provider of every ambit TLS config: ring, TLS 1.3 AES-GCM suites only.
pub(crate) static PROVIDER: LazyLock<Arc<CryptoProvider>> = LazyLock::new(|| {
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            cipher_suite::TLS13_AES_256_GCM_SHA384,
            cipher_suite::TLS13_AES_128_GCM_SHA256,
        ],
        ..rustls::crypto::ring::default_provider()
    })
});

/// Why a TLS config could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// rustls refused the protocol settings (cannot happen with the fixed provider above).
    #[error("failed to build the {side} tls config")]
    Config {
        side: &'static str,
        #[source]
        source: rustls::Error,
    },
}

/// Verifies a TLS client's SVID: any workload identity of our trust domains.
#[derive(Debug)]
pub struct ClientSvidVerifier {
    roots: Arc<TrustBundle>,
    trust_domains: Arc<[TrustDomain]>,
}

/// Verifies a TLS server's SVID: it must certify exactly the identity we meant to reach.
#[derive(Debug)]
pub struct ServerSvidVerifier {
    roots: Arc<TrustBundle>,
    trust_domains: Arc<[TrustDomain]>,
    expected: SpiffeId,
}

impl ClientSvidVerifier {
    /// Accepts clients whose chain leads to `roots` with an identity in `trust_domains`.
    pub fn new(roots: Arc<TrustBundle>, trust_domains: Arc<[TrustDomain]>) -> Self {
        Self {
            roots,
            trust_domains,
        }
    }
}

impl ServerSvidVerifier {
    /// Accepts only a server certifying `expected`, chained to `roots`.
    pub fn new(
        roots: Arc<TrustBundle>,
        trust_domains: Arc<[TrustDomain]>,
        expected: SpiffeId,
    ) -> Self {
        Self {
            roots,
            trust_domains,
            expected,
        }
    }
}

/// Builds the tunnel server's config: presents `cert`, requires a client SVID, TLS 1.3, `h2`.
pub fn server_config(
    cert: &WorkloadCertificate,
    roots: Arc<TrustBundle>,
    trust_domains: Arc<[TrustDomain]>,
) -> Result<ServerConfig, TlsError> {
    let verifier = ClientSvidVerifier::new(roots, trust_domains);
    let mut config = ServerConfig::builder_with_provider(PROVIDER.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Config {
            side: "server",
            source,
        })?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(Arc::new(SingleCertAndKey::from(cert.certified_key())));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// Builds a tunnel client config that presents `cert` and accepts only a server certifying
/// `expected`; TLS 1.3, `h2`. Connect with [`server_name`]: the name is not checked.
pub fn client_config(
    cert: &WorkloadCertificate,
    roots: Arc<TrustBundle>,
    trust_domains: Arc<[TrustDomain]>,
    expected: SpiffeId,
) -> Result<ClientConfig, TlsError> {
    let verifier = ServerSvidVerifier::new(roots, trust_domains, expected);
    let mut config = ClientConfig::builder_with_provider(PROVIDER.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Config {
            side: "client",
            source,
        })?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(SingleCertAndKey::from(cert.certified_key())));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// The server name to connect with: an IP address, so rustls sends no SNI (as ztunnel).
pub fn server_name() -> ServerName<'static> {
    ServerName::IpAddress(IpAddr::V4(Ipv4Addr::UNSPECIFIED).into())
}

/// The SPIFFE ID of the peer of a completed handshake whose config came from this module.
///
/// The verifier already checked the chain; this reads the identity back from the leaf.
pub fn peer_identity(conn: &CommonState) -> Result<SpiffeId, SvidError> {
    let leaf = conn
        .peer_certificates()
        .and_then(<[_]>::first)
        .ok_or(SvidError::NoCertificate)?;
    let x509 = verify::parse_certificate(leaf)?;
    verify::leaf_identity(&x509, &CertName::of(&x509))
}

/// When a presented chain stops being valid: the earliest `notAfter` of its certificates
/// (`None` when the chain is empty or a certificate does not parse, which verification refuses).
pub fn chain_not_after(chain: &[CertificateDer<'_>]) -> Option<std::time::SystemTime> {
    let mut earliest: Option<std::time::SystemTime> = None;
    for der in chain {
        let x509 = verify::parse_certificate(der).ok()?;
        let secs = u64::try_from(x509.validity().not_after.timestamp()).unwrap_or(0);
        let t = std::time::UNIX_EPOCH.checked_add(std::time::Duration::from_secs(secs))?;
        earliest = Some(earliest.map_or(t, |e| e.min(t)));
    }
    earliest
}

/// The handshake-signature methods of a rustls verifier, the same for client and server
/// certificates: checked with [`ALGORITHMS`].
macro_rules! handshake_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &ALGORITHMS)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &ALGORITHMS)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            ALGORITHMS.supported_schemes()
        }
    };
}

impl ClientCertVerifier for ClientSvidVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        verify::verify_leaf_and_chain(
            end_entity,
            intermediates,
            &self.roots,
            now,
            &self.trust_domains,
            PeerRole::Client,
        )
        .map_err(to_rustls)?;
        Ok(ClientCertVerified::assertion())
    }

    handshake_signatures!();
}

impl ServerCertVerifier for ServerSvidVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let actual = verify::verify_leaf_and_chain(
            end_entity,
            intermediates,
            &self.roots,
            now,
            &self.trust_domains,
            PeerRole::Server,
        )
        .map_err(to_rustls)?;
        if actual != self.expected {
            return Err(to_rustls(SvidError::PeerIdentityMismatch {
                expected: self.expected.clone(),
                actual,
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    handshake_signatures!();
}

/// Wraps an SVID verdict for rustls, keeping it reachable through `Error::source` chains.
fn to_rustls(err: SvidError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(err))))
}

#[cfg(test)]
mod tests;
