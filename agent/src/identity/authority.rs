//! The certificate authority core: signing material and the X.509-SVID leaf it issues.
//!
//! This is the policy-free part of `ambit ca`: it checks that a CSR is sound and issues exactly
//! the identity the caller (the CA service, after node authorization) decided on. The leaf is
//! the SVID profile of X509-SVID.md: one URI SAN, cA=false, key usage digitalSignature,
//! EKU serverAuth + clientAuth, random serial, lifetime capped by the signing certificate's.
use std::fmt;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use time::OffsetDateTime;

use crate::identity::verify::{self, CertName, PeerRole};
use crate::identity::{
    new_csr, BundleError, Csr, CsrError, SpiffeId, SvidError, TrustBundle, TrustDomain,
};

/// A leaf's notBefore is set this far back (at most a tenth of its lifetime) for clock skew.
const MAX_BACKDATE: Duration = Duration::from_secs(60);
/// Lifetime of the throwaway leaf issued to self-check loaded CA material.
const PROBE_TTL: Duration = Duration::from_secs(60);

/// A signing certificate and key, the chain above it, and the roots it leads to.
pub struct CertificateAuthority {
    trust_domain: TrustDomain,
    issuer: Issuer<'static, KeyPair>,
    /// The signing certificate, then the intermediates above it; roots excluded.
    chain: Vec<CertificateDer<'static>>,
    roots: TrustBundle,
    /// Leaves never outlive the signing certificate.
    not_after: OffsetDateTime,
}

/// Why CA material could not be loaded or made, or a leaf not issued.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// rcgen failed to generate a key or sign a certificate.
    #[error("failed to {what}")]
    Generate {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
    /// The PEM text of the named input could not be read.
    #[error("{what}: invalid pem")]
    Pem {
        what: &'static str,
        #[source]
        source: pem::Error,
    },
    /// The CA key is not PKCS#8 or not a supported algorithm.
    #[error("ca key: unsupported, expected an unencrypted pkcs#8 ecdsa, ed25519 or rsa key")]
    Key {
        #[source]
        source: rcgen::Error,
    },
    /// A certificate of the CA material is unusable.
    #[error("ca certificate is unusable: {reason}")]
    Unusable { reason: &'static str },
    /// The CA certificate does not certify the CA key.
    #[error("ca certificate does not match the ca key")]
    KeyMismatch,
    /// The CA certificate is not valid now.
    #[error("ca certificate is not valid now")]
    NotValidNow,
    /// The roots could not form a trust bundle.
    #[error("ca roots")]
    Roots {
        #[source]
        source: BundleError,
    },
    /// The loaded material does not issue verifiable SVIDs (e.g. a chain in the wrong order).
    #[error("ca self-check failed: a test leaf does not verify")]
    SelfCheck {
        #[source]
        source: Box<SvidError>,
    },
    /// The requested identity belongs to another trust domain.
    #[error("refusing {id}: this ca issues only for trust domain {trust_domain}")]
    ForeignTrustDomain {
        id: SpiffeId,
        trust_domain: TrustDomain,
    },
    /// The CSR was refused.
    #[error("refusing csr for {id}")]
    Csr {
        id: SpiffeId,
        #[source]
        source: CsrError,
    },
    /// A zero lifetime, or one that does not fit in a timestamp.
    #[error("invalid certificate lifetime {ttl:?}")]
    Ttl { ttl: Duration },
    /// The system random generator failed.
    #[error("failed to draw a random serial number")]
    Random,
}

impl CaError {
    /// Whether the request was at fault (answer `InvalidArgument`), rather than the CA
    /// itself (answer `Internal`).
    pub fn is_bad_request(&self) -> bool {
        match self {
            Self::ForeignTrustDomain { .. } | Self::Csr { .. } | Self::Ttl { .. } => true,
            Self::Generate { .. }
            | Self::Pem { .. }
            | Self::Key { .. }
            | Self::Unusable { .. }
            | Self::KeyMismatch
            | Self::NotValidNow
            | Self::Roots { .. }
            | Self::SelfCheck { .. }
            | Self::Random => false,
        }
    }
}

impl CertificateAuthority {
    /// Generates a self-signed ECDSA P-256 root for `trust_domain` (dev and testbed use).
    pub fn generate_root(
        trust_domain: TrustDomain,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<Self, CaError> {
        let key = generate_key("generate the root key")?;
        let params = ca_params(
            &trust_domain,
            "ambit root ca",
            BasicConstraints::Unconstrained,
            ttl,
            now,
        )?;
        let cert = params
            .self_signed(&key)
            .map_err(|source| CaError::Generate {
                what: "self-sign the root",
                source,
            })?;
        let root = cert.der().clone();
        let roots = TrustBundle::new(vec![root]).map_err(|source| CaError::Roots { source })?;
        Ok(Self {
            trust_domain,
            not_after: params.not_after,
            issuer: Issuer::new(params, key),
            chain: Vec::new(),
            roots,
        })
    }

    /// Generates an intermediate CA under `self` that may sign leaves only.
    pub fn generate_intermediate(&self, ttl: Duration, now: SystemTime) -> Result<Self, CaError> {
        let key = generate_key("generate the intermediate key")?;
        let mut params = ca_params(
            &self.trust_domain,
            "ambit intermediate ca",
            BasicConstraints::Constrained(0),
            ttl,
            now,
        )?;
        params.not_after = params.not_after.min(self.not_after);
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|source| CaError::Generate {
                what: "sign the intermediate",
                source,
            })?;
        let mut chain = vec![cert.der().clone()];
        chain.extend(self.chain.iter().cloned());
        Ok(Self {
            trust_domain: self.trust_domain.clone(),
            not_after: params.not_after,
            issuer: Issuer::new(params, key),
            chain,
            roots: self.roots.clone(),
        })
    }

    /// Loads operator-provided material, like Istio's `cacerts`: the signing certificate, its
    /// PKCS#8 key, and the chain above it up to and including the root (empty for a root).
    ///
    /// Self-signed certificates in the chain become the trust bundle; the rest are sent along
    /// with every leaf. The material is checked by issuing and verifying a throwaway leaf.
    pub fn from_pem(
        trust_domain: TrustDomain,
        cert_pem: &str,
        key_pem: &str,
        chain_pem: &str,
        now: SystemTime,
    ) -> Result<Self, CaError> {
        let cert =
            CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|source| CaError::Pem {
                what: "ca certificate",
                source,
            })?;
        let above = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| CaError::Pem {
                what: "ca chain",
                source,
            })?;
        let key_der =
            PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|source| CaError::Pem {
                what: "ca key",
                source,
            })?;
        let key = KeyPair::try_from(&key_der).map_err(|source| CaError::Key { source })?;

        let x509 = verify::parse_certificate(&cert).map_err(|_| CaError::Unusable {
            reason: "not valid x.509",
        })?;
        if !x509.is_ca() {
            return Err(CaError::Unusable {
                reason: "basicConstraints cA is not set",
            });
        }
        if let Ok(Some(ku)) = x509.key_usage() {
            if !ku.value.key_cert_sign() {
                return Err(CaError::Unusable {
                    reason: "key usage lacks keyCertSign",
                });
            }
        }
        if x509.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(CaError::KeyMismatch);
        }
        let asn1_now = x509_parser::time::ASN1Time::new(OffsetDateTime::from(now));
        if !x509.validity().is_valid_at(asn1_now) {
            return Err(CaError::NotValidNow);
        }
        let not_after = x509.validity().not_after.to_datetime();
        let issuer = Issuer::from_ca_cert_der(&cert, key).map_err(|source| CaError::Generate {
            what: "read the ca certificate",
            source,
        })?;

        let mut chain = Vec::new();
        let mut roots = Vec::new();
        for der in std::iter::once(cert).chain(above) {
            match verify::parse_certificate(&der) {
                Ok(x509) if x509.subject().as_raw() == x509.issuer().as_raw() => roots.push(der),
                Ok(_) => chain.push(der),
                Err(_) => {
                    return Err(CaError::Unusable {
                        reason: "chain entry is not x.509",
                    })
                }
            }
        }
        let roots = TrustBundle::new(roots).map_err(|source| CaError::Roots { source })?;
        let ca = Self {
            trust_domain,
            issuer,
            chain,
            roots,
            not_after,
        };
        ca.self_check(now)?;
        Ok(ca)
    }

    /// Issues an SVID for `id` to the key in `csr`, valid from `now` for `ttl` (capped by the
    /// signing certificate); returns the chain leaf first, without the roots.
    ///
    /// The caller decides `id` (after authorizing the requester); the CSR may only repeat it.
    pub fn sign(
        &self,
        csr: &Csr,
        id: &SpiffeId,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<Vec<CertificateDer<'static>>, CaError> {
        if id.trust_domain() != self.trust_domain.as_str() {
            return Err(CaError::ForeignTrustDomain {
                id: id.clone(),
                trust_domain: self.trust_domain.clone(),
            });
        }
        csr.check_sans(id).map_err(|source| CaError::Csr {
            id: id.clone(),
            source,
        })?;
        let mut params = leaf_params(id, ttl, now)?;
        params.not_after = params.not_after.min(self.not_after);
        let leaf = params
            .signed_by(csr.public_key(), &self.issuer)
            .map_err(|source| CaError::Generate {
                what: "sign the leaf",
                source,
            })?;
        let mut chain = Vec::with_capacity(1 + self.chain.len());
        chain.push(leaf.der().clone());
        chain.extend(self.chain.iter().cloned());
        Ok(chain)
    }

    /// The trust domain this CA issues for.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The roots leaves chain to: what agents must trust.
    pub fn roots(&self) -> &TrustBundle {
        &self.roots
    }

    /// The certificates sent after each leaf: the signing certificate and intermediates.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The signer, for tests that issue deliberately broken certificates.
    #[cfg(test)]
    pub(crate) fn issuer(&self) -> &Issuer<'static, KeyPair> {
        &self.issuer
    }

    /// Issues a throwaway leaf and verifies it against our own roots.
    fn self_check(&self, now: SystemTime) -> Result<(), CaError> {
        let id =
            SpiffeId::new(self.trust_domain.clone(), "ambit-ca", "self-check").map_err(|_| {
                CaError::Unusable {
                    reason: "trust domain makes no valid identity",
                }
            })?;
        let probe = new_csr(&id).map_err(|source| CaError::Csr {
            id: id.clone(),
            source,
        })?;
        let csr = Csr::from_der(&probe.csr).map_err(|source| CaError::Csr {
            id: id.clone(),
            source,
        })?;
        let chain = self.sign(&csr, &id, PROBE_TTL, now)?;
        let now = UnixTime::since_unix_epoch(
            now.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default(),
        );
        let domains = [self.trust_domain.clone()];
        for role in [PeerRole::Client, PeerRole::Server] {
            verify::verify_svid(&chain, &self.roots, now, &domains, role).map_err(|source| {
                CaError::SelfCheck {
                    source: Box::new(source),
                }
            })?;
        }
        Ok(())
    }
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let chain: Vec<String> = self
            .chain
            .iter()
            .filter_map(|der| {
                verify::parse_certificate(der)
                    .ok()
                    .map(|x| CertName::of(&x).to_string())
            })
            .collect();
        f.debug_struct("CertificateAuthority")
            .field("trust_domain", &self.trust_domain)
            .field("chain", &chain)
            .field("roots", &self.roots)
            .finish_non_exhaustive()
    }
}

/// The X.509-SVID leaf profile for `id`, living `ttl` from `now`.
pub(crate) fn leaf_params(
    id: &SpiffeId,
    ttl: Duration,
    now: SystemTime,
) -> Result<CertificateParams, CaError> {
    let (not_before, not_after) = validity(ttl, now)?;
    let mut params = CertificateParams::default();
    // Empty subject: the identity is the URI SAN alone, which rcgen then marks critical
    // (RFC 5280 4.2.1.6).
    params.distinguished_name = DistinguishedName::new();
    params.not_before = not_before;
    params.not_after = not_after;
    params.serial_number = Some(random_serial()?);
    let uri = id
        .to_string()
        .try_into()
        .map_err(|source| CaError::Generate {
            what: "encode the uri san",
            source,
        })?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// Parameters shared by generated root and intermediate CA certificates.
fn ca_params(
    trust_domain: &TrustDomain,
    common_name: &str,
    constraints: BasicConstraints,
    ttl: Duration,
    now: SystemTime,
) -> Result<CertificateParams, CaError> {
    let (not_before, not_after) = validity(ttl, now)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, trust_domain.as_str());
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.not_before = not_before;
    params.not_after = not_after;
    params.serial_number = Some(random_serial()?);
    params.is_ca = IsCa::Ca(constraints);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(params)
}

fn generate_key(what: &'static str) -> Result<KeyPair, CaError> {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|source| CaError::Generate { what, source })
}

/// notBefore (backdated for clock skew) and notAfter of a certificate living `ttl` from `now`.
fn validity(ttl: Duration, now: SystemTime) -> Result<(OffsetDateTime, OffsetDateTime), CaError> {
    let err = || CaError::Ttl { ttl };
    if ttl.is_zero() {
        return Err(err());
    }
    let now = OffsetDateTime::from(now);
    let backdate = MAX_BACKDATE.min(ttl / 10);
    let not_before = now.checked_sub(time::Duration::try_from(backdate).map_err(|_| err())?);
    let not_after = now.checked_add(time::Duration::try_from(ttl).map_err(|_| err())?);
    match (not_before, not_after) {
        (Some(not_before), Some(not_after)) => Ok((not_before, not_after)),
        _ => Err(err()),
    }
}

/// A positive 128-bit serial from the system CSPRNG (RFC 5280 4.1.2.2 allows up to 20 bytes).
fn random_serial() -> Result<SerialNumber, CaError> {
    let mut bytes = [0u8; 16];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| CaError::Random)?;
    // Clear the sign bit so the DER INTEGER is positive, and set the next one so the value
    // keeps all 16 bytes (no leading zero octet to strip).
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

#[cfg(test)]
mod tests;
