//! Certificate signing requests: the agent's fresh key and CSR, and the CA's checks on one.
use std::fmt;

use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DistinguishedName, IsCa, KeyPair,
    KeyUsagePurpose, SanType, SignatureAlgorithm,
};
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateSigningRequestDer, PrivateKeyDer};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;

use crate::identity::SpiffeId;

/// Largest CSR (DER, or its PEM text) the CA reads; a P-256 CSR is about 300 bytes.
pub const MAX_CSR_BYTES: usize = 16 * 1024;
/// Smallest RSA modulus accepted in a CSR, in bits.
const MIN_RSA_BITS: usize = 2048;

/// A fresh leaf key and the CSR asking the CA to certify it; the key never leaves the agent.
pub struct NewCsr {
    /// The private key (PKCS#8), ECDSA P-256.
    pub key: PrivateKeyDer<'static>,
    /// The CSR: empty subject, one URI SAN holding the requested SPIFFE ID.
    pub csr: CertificateSigningRequestDer<'static>,
}

/// A CSR received by the CA whose encoding, signature and key were checked on parsing.
///
/// What it asks for is not yet held against an identity: [`Csr::check_sans`] does that.
#[derive(Debug)]
pub struct Csr {
    params: CertificateSigningRequestParams,
}

/// Why a CSR could not be made (agent side) or was refused (CA side).
#[derive(Debug, thiserror::Error)]
pub enum CsrError {
    /// Key or CSR generation failed.
    #[error("failed to generate a key and csr for {id}")]
    Generate {
        id: SpiffeId,
        #[source]
        source: rcgen::Error,
    },
    /// The CSR is larger than [`MAX_CSR_BYTES`].
    #[error("csr is {len} bytes, at most {max} allowed")]
    Oversized { len: usize, max: usize },
    /// The PEM text holds no `CERTIFICATE REQUEST` block or is broken.
    #[error("csr pem is invalid")]
    Pem {
        #[source]
        source: pem::Error,
    },
    /// The DER is not a PKCS#10 request, or has bytes after it.
    #[error("csr is not a valid pkcs#10 request")]
    Malformed,
    /// The CSR is not signed by the key it carries.
    #[error("csr signature does not verify")]
    BadSignature,
    /// The key or signature algorithm is not one we issue for.
    #[error("csr uses an unsupported key or signature algorithm")]
    UnsupportedAlgorithm,
    /// An RSA key below 2048 bits.
    #[error("csr rsa key has {bits} bits, at least {min} required")]
    WeakKey { bits: usize, min: usize },
    /// An extension the CA does not understand.
    #[error("csr requests an unsupported extension")]
    UnsupportedExtension,
    /// The CSR asks for a CA certificate or for CA key usages.
    #[error("csr requests ca powers ({what})")]
    CaRequested { what: &'static str },
    /// The CSR names a subject alternative name other than the identity being issued.
    #[error("csr requests san {san}, only {id} may be issued")]
    ForeignSan { san: String, id: SpiffeId },
}

/// Generates an ECDSA P-256 key and a CSR for `id` (the agent side of issuance).
pub fn new_csr(id: &SpiffeId) -> Result<NewCsr, CsrError> {
    let generate = |source| CsrError::Generate {
        id: id.clone(),
        source,
    };
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(generate)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let uri = id.to_string().try_into().map_err(generate)?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    let csr = params.serialize_request(&key).map_err(generate)?;
    Ok(NewCsr {
        key: key.into(),
        csr: csr.into(),
    })
}

impl Csr {
    /// Parses and checks a DER CSR: size, encoding, signature, key, no CA request.
    pub fn from_der(der: &[u8]) -> Result<Self, CsrError> {
        if der.len() > MAX_CSR_BYTES {
            return Err(CsrError::Oversized {
                len: der.len(),
                max: MAX_CSR_BYTES,
            });
        }
        let parsed = match X509CertificationRequest::from_der(der) {
            Ok(([], parsed)) => parsed,
            _ => return Err(CsrError::Malformed),
        };
        if let Ok(PublicKey::RSA(rsa)) = parsed.certification_request_info.subject_pki.parsed() {
            let bits = rsa.key_size();
            if bits < MIN_RSA_BITS {
                return Err(CsrError::WeakKey {
                    bits,
                    min: MIN_RSA_BITS,
                });
            }
        }
        let params =
            CertificateSigningRequestParams::from_der(&der.into()).map_err(|e| match e {
                rcgen::Error::InvalidCertificationRequestSignature => CsrError::BadSignature,
                rcgen::Error::UnsupportedSignatureAlgorithm => CsrError::UnsupportedAlgorithm,
                rcgen::Error::UnsupportedExtension => CsrError::UnsupportedExtension,
                _ => CsrError::Malformed,
            })?;
        if !SUPPORTED_ALGORITHMS.contains(&params.public_key.algorithm()) {
            return Err(CsrError::UnsupportedAlgorithm);
        }
        if matches!(params.params.is_ca, IsCa::Ca(_)) {
            return Err(CsrError::CaRequested {
                what: "basicConstraints cA",
            });
        }
        for (usage, what) in [
            (KeyUsagePurpose::KeyCertSign, "keyCertSign"),
            (KeyUsagePurpose::CrlSign, "cRLSign"),
        ] {
            if params.params.key_usages.contains(&usage) {
                return Err(CsrError::CaRequested { what });
            }
        }
        Ok(Self { params })
    }

    /// Parses and checks a PEM CSR (one `CERTIFICATE REQUEST` block), as [`Csr::from_der`].
    pub fn from_pem(pem: &str) -> Result<Self, CsrError> {
        if pem.len() > MAX_CSR_BYTES {
            return Err(CsrError::Oversized {
                len: pem.len(),
                max: MAX_CSR_BYTES,
            });
        }
        let der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
            .map_err(|source| CsrError::Pem { source })?;
        Self::from_der(&der)
    }

    /// Refuses the CSR if it names any SAN other than `id` (it may name none: the CA sets it).
    pub fn check_sans(&self, id: &SpiffeId) -> Result<(), CsrError> {
        for san in &self.params.params.subject_alt_names {
            let is_id = match san {
                SanType::URI(uri) => uri.as_str().parse::<SpiffeId>().is_ok_and(|u| u == *id),
                _ => false,
            };
            if !is_id {
                return Err(CsrError::ForeignSan {
                    san: SanName(san).to_string(),
                    id: id.clone(),
                });
            }
        }
        Ok(())
    }

    /// The public key to certify.
    pub(crate) fn public_key(&self) -> &rcgen::PublicKey {
        &self.params.public_key
    }
}

impl fmt::Debug for NewCsr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewCsr")
            .field("csr_bytes", &self.csr.as_ref().len())
            .finish_non_exhaustive()
    }
}

/// Key algorithms the CA certifies; all of them are usable by rustls with the ring provider.
static SUPPORTED_ALGORITHMS: [&SignatureAlgorithm; 5] = [
    &rcgen::PKCS_ECDSA_P256_SHA256,
    &rcgen::PKCS_ECDSA_P384_SHA384,
    &rcgen::PKCS_ED25519,
    &rcgen::PKCS_RSA_SHA256,
    &rcgen::PKCS_RSA_SHA384,
];

/// Shows a requested SAN in an error (`uri:…`, `dns:…`), cut to a sane length.
struct SanName<'a>(&'a SanType);

impl fmt::Display for SanName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const MAX_SHOWN: usize = 256;
        let (kind, value) = match self.0 {
            SanType::URI(uri) => ("uri", uri.as_str().to_owned()),
            SanType::DnsName(name) => ("dns", name.as_str().to_owned()),
            SanType::Rfc822Name(name) => ("email", name.as_str().to_owned()),
            SanType::IpAddress(ip) => ("ip", ip.to_string()),
            _ => ("other", String::new()),
        };
        let value: String = value.chars().take(MAX_SHOWN).collect();
        write!(f, "{kind}:{value:?}")
    }
}

#[cfg(test)]
mod tests;
