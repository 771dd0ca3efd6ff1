//! Peer verification of X.509-SVIDs: chain to the trust bundle, then the SPIFFE leaf rules.
//!
//! The rules are those of the X.509-SVID specification (X509-SVID.md): the chain must lead to a
//! root in our bundle and be valid now (section 5); the leaf has exactly one URI SAN, the SPIFFE
//! ID (section 2), is not a CA (4.1) and has key usage digitalSignature without keyCertSign or
//! cRLSign (4.3). On top of that the ID must be a workload identity in one of our trust domains.
use std::fmt;
use std::sync::LazyLock;

use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls_pki_types::{CertificateDer, UnixTime};
use x509_parser::certificate::X509Certificate;
use x509_parser::error::X509Error;
use x509_parser::extensions::GeneralName;

use crate::identity::{SpiffeId, SpiffeIdError, TrustBundle, TrustDomain};

/// Which side of a TLS handshake presented the chain being verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerRole {
    /// The peer is the TLS client: its chain must allow clientAuth.
    Client,
    /// The peer is the TLS server: its chain must allow serverAuth.
    Server,
}

/// Why a peer's certificate chain is not an acceptable X.509-SVID.
#[derive(Debug, thiserror::Error)]
pub enum SvidError {
    /// The peer sent no certificate.
    #[error("peer presented no certificate")]
    NoCertificate,
    /// The leaf is not parseable X.509.
    #[error("peer certificate is not valid x.509")]
    Malformed {
        #[source]
        source: X509Error,
    },
    /// The chain does not lead to a root in the trust bundle (unknown issuer, or a signature
    /// that does not verify under the key of the certificate named as issuer).
    #[error("{cert}: not issued by a trusted root")]
    UntrustedIssuer { cert: CertName },
    /// A certificate of the chain has expired.
    #[error("{cert}: chain expired at {not_after} (now {now})")]
    Expired {
        cert: CertName,
        not_after: Timestamp,
        now: Timestamp,
    },
    /// A certificate of the chain is not valid yet.
    #[error("{cert}: chain not valid before {not_before} (now {now})")]
    NotYetValid {
        cert: CertName,
        not_before: Timestamp,
        now: Timestamp,
    },
    /// The leaf has basicConstraints cA=true.
    #[error("{cert}: leaf is a ca certificate")]
    LeafIsCa { cert: CertName },
    /// The chain's extended key usage does not allow the peer's role.
    #[error("{cert}: extended key usage does not allow {required}")]
    WrongExtendedKeyUsage {
        cert: CertName,
        required: &'static str,
    },
    /// Any other failure of chain validation (bad signature, unsupported algorithm, path length).
    #[error("{cert}: chain validation failed")]
    Chain {
        cert: CertName,
        #[source]
        source: webpki::Error,
    },
    /// The leaf has no key usage extension.
    #[error("{cert}: leaf has no key usage extension")]
    MissingKeyUsage { cert: CertName },
    /// The leaf's key usage lacks digitalSignature.
    #[error("{cert}: leaf key usage lacks digitalSignature")]
    MissingDigitalSignature { cert: CertName },
    /// The leaf's key usage includes a CA usage.
    #[error("{cert}: leaf key usage includes {usage}")]
    ForbiddenKeyUsage { cert: CertName, usage: &'static str },
    /// The leaf has no URI SAN, so no SPIFFE ID.
    #[error("{cert}: leaf has no uri san")]
    NoUriSan { cert: CertName },
    /// The leaf has more than one URI SAN.
    #[error("{cert}: leaf has {count} uri sans, an svid has exactly one")]
    MultipleUriSans { cert: CertName, count: usize },
    /// The URI SAN is not a workload SPIFFE ID.
    #[error("{cert}: uri san is not a workload spiffe id")]
    InvalidSpiffeId {
        cert: CertName,
        #[source]
        source: SpiffeIdError,
    },
    /// The SPIFFE ID belongs to a trust domain we do not accept.
    #[error("{cert}: trust domain {trust_domain} is not one of ours ({allowed})")]
    ForeignTrustDomain {
        cert: CertName,
        trust_domain: String,
        allowed: String,
    },
    /// A valid SVID, but not of the identity we meant to reach.
    #[error("peer identity {actual} is not the expected {expected}")]
    PeerIdentityMismatch {
        expected: SpiffeId,
        actual: SpiffeId,
    },
}

/// Names a certificate in errors and logs: its serial and the URI SAN it claims (unverified).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertName {
    serial: String,
    uri: Option<String>,
}

/// A point in time shown as RFC 3339 UTC in messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timestamp(pub UnixTime);

/// Signature algorithms accepted in chains (those of the ring provider).
pub(crate) static ALGORITHMS: LazyLock<WebPkiSupportedAlgorithms> =
    LazyLock::new(|| rustls::crypto::ring::default_provider().signature_verification_algorithms);

/// Verifies that `chain` (leaf first, then intermediates) is an X.509-SVID issued under `roots`
/// and valid at `now` for a peer acting as `role`, whose SPIFFE ID is a workload identity in
/// one of `trust_domains`; returns that identity.
pub fn verify_svid(
    chain: &[CertificateDer<'_>],
    roots: &TrustBundle,
    now: UnixTime,
    trust_domains: &[TrustDomain],
    role: PeerRole,
) -> Result<SpiffeId, SvidError> {
    let (leaf, intermediates) = chain.split_first().ok_or(SvidError::NoCertificate)?;
    verify_leaf_and_chain(leaf, intermediates, roots, now, trust_domains, role)
}

/// [`verify_svid`] with the leaf and intermediates apart, as rustls hands them over.
pub(crate) fn verify_leaf_and_chain(
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    roots: &TrustBundle,
    now: UnixTime,
    trust_domains: &[TrustDomain],
    role: PeerRole,
) -> Result<SpiffeId, SvidError> {
    let x509 = parse_certificate(leaf)?;
    let cert = CertName::of(&x509);
    verify_chain(leaf, intermediates, roots, now, role, &cert)?;
    let id = leaf_identity(&x509, &cert)?;
    if !trust_domains
        .iter()
        .any(|td| td.as_str() == id.trust_domain())
    {
        let allowed = trust_domains
            .iter()
            .map(TrustDomain::as_str)
            .collect::<Vec<_>>()
            .join(", ");
        return Err(SvidError::ForeignTrustDomain {
            cert,
            trust_domain: id.trust_domain().to_owned(),
            allowed,
        });
    }
    Ok(id)
}

/// Applies the SVID leaf rules (not a CA, key usage, one URI SAN) and returns the SPIFFE ID.
///
/// This does not check the chain: use it on certificates that are already trusted (our own,
/// or a peer's after the handshake verified it).
pub(crate) fn leaf_identity(
    x509: &X509Certificate<'_>,
    cert: &CertName,
) -> Result<SpiffeId, SvidError> {
    let malformed = |source| SvidError::Malformed { source };
    let is_ca = x509
        .basic_constraints()
        .map_err(malformed)?
        .is_some_and(|bc| bc.value.ca);
    if is_ca {
        return Err(SvidError::LeafIsCa { cert: cert.clone() });
    }
    let Some(key_usage) = x509.key_usage().map_err(malformed)? else {
        return Err(SvidError::MissingKeyUsage { cert: cert.clone() });
    };
    if key_usage.value.key_cert_sign() {
        return Err(SvidError::ForbiddenKeyUsage {
            cert: cert.clone(),
            usage: "keyCertSign",
        });
    }
    if key_usage.value.crl_sign() {
        return Err(SvidError::ForbiddenKeyUsage {
            cert: cert.clone(),
            usage: "cRLSign",
        });
    }
    if !key_usage.value.digital_signature() {
        return Err(SvidError::MissingDigitalSignature { cert: cert.clone() });
    }
    let uris = uri_sans(x509).map_err(malformed)?;
    match uris.as_slice() {
        [] => Err(SvidError::NoUriSan { cert: cert.clone() }),
        [uri] => uri.parse().map_err(|source| SvidError::InvalidSpiffeId {
            cert: cert.clone(),
            source,
        }),
        _ => Err(SvidError::MultipleUriSans {
            cert: cert.clone(),
            count: uris.len(),
        }),
    }
}

/// Parses one DER certificate with nothing after it.
pub(crate) fn parse_certificate<'a>(
    der: &'a CertificateDer<'_>,
) -> Result<X509Certificate<'a>, SvidError> {
    match x509_parser::parse_x509_certificate(der) {
        Ok(([], x509)) => Ok(x509),
        Ok((_, _)) => Err(SvidError::Malformed {
            source: X509Error::InvalidCertificate,
        }),
        Err(x509_parser::nom::Err::Error(source) | x509_parser::nom::Err::Failure(source)) => {
            Err(SvidError::Malformed { source })
        }
        Err(x509_parser::nom::Err::Incomplete(_)) => Err(SvidError::Malformed {
            source: X509Error::InvalidCertificate,
        }),
    }
}

impl CertName {
    /// Describes `x509` by serial and claimed URI SAN; never fails.
    pub(crate) fn of(x509: &X509Certificate<'_>) -> Self {
        // Shown in logs: cut what the peer controls.
        const MAX_SHOWN: usize = 256;
        let uri = uri_sans(x509)
            .ok()
            .and_then(|uris| uris.first().copied())
            .map(|uri| match uri.char_indices().nth(MAX_SHOWN) {
                Some((end, _)) => format!("{}...", &uri[..end]),
                None => uri.to_owned(),
            });
        let serial = x509
            .raw_serial()
            .iter()
            .take(32)
            .map(|b| format!("{b:02x}"))
            .collect();
        Self { serial, uri }
    }

    /// The serial number, lowercase hex.
    pub fn serial(&self) -> &str {
        &self.serial
    }
}

impl fmt::Display for CertName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.uri {
            Some(uri) => write!(f, "certificate {} ({uri:?})", self.serial),
            None => write!(f, "certificate {}", self.serial),
        }
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = i64::try_from(self.0.as_secs()).unwrap_or(i64::MAX);
        match time::OffsetDateTime::from_unix_timestamp(secs) {
            Ok(t) => write!(
                f,
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute(),
                t.second()
            ),
            Err(_) => write!(f, "unix time {secs}"),
        }
    }
}

/// Runs webpki path building and maps its verdict onto [`SvidError`].
fn verify_chain(
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    roots: &TrustBundle,
    now: UnixTime,
    role: PeerRole,
    cert: &CertName,
) -> Result<(), SvidError> {
    let (usage, required) = match role {
        PeerRole::Client => (webpki::KeyUsage::client_auth(), "clientAuth"),
        PeerRole::Server => (webpki::KeyUsage::server_auth(), "serverAuth"),
    };
    let end_entity = webpki::EndEntityCert::try_from(leaf).map_err(|source| SvidError::Chain {
        cert: cert.clone(),
        source,
    })?;
    let verdict = end_entity.verify_for_usage(
        ALGORITHMS.all,
        roots.anchors(),
        intermediates,
        now,
        usage,
        None,
        None,
    );
    let cert = cert.clone();
    match verdict {
        Ok(_) => Ok(()),
        // A root or intermediate with the issuer's name but another key (e.g. a second CA
        // generated with the same subject) is as untrusted as an unknown name.
        Err(webpki::Error::UnknownIssuer | webpki::Error::InvalidSignatureForPublicKey) => {
            Err(SvidError::UntrustedIssuer { cert })
        }
        Err(webpki::Error::CertExpired { time, not_after }) => Err(SvidError::Expired {
            cert,
            not_after: Timestamp(not_after),
            now: Timestamp(time),
        }),
        Err(webpki::Error::CertNotValidYet { time, not_before }) => Err(SvidError::NotYetValid {
            cert,
            not_before: Timestamp(not_before),
            now: Timestamp(time),
        }),
        Err(webpki::Error::CaUsedAsEndEntity) => Err(SvidError::LeafIsCa { cert }),
        Err(webpki::Error::RequiredEkuNotFoundContext(_)) => {
            Err(SvidError::WrongExtendedKeyUsage { cert, required })
        }
        Err(source) => Err(SvidError::Chain { cert, source }),
    }
}

/// All URI SANs of `x509`, in order.
fn uri_sans<'a>(x509: &'a X509Certificate<'_>) -> Result<Vec<&'a str>, X509Error> {
    let Some(san) = x509.subject_alternative_name()? else {
        return Ok(Vec::new());
    };
    Ok(san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .collect())
}

#[cfg(test)]
mod tests;
