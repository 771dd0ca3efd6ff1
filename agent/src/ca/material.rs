//! The CA's root material on disk (Istio `cacerts` layout) and its TLS serving certificate.
//!
//! Files in the certificate directory, as Istio's `cacerts` secret:
//! `ca-cert.pem` (the signing certificate), `ca-key.pem` (its PKCS#8 key), `cert-chain.pem`
//! (the chain from the signing certificate up to the root; optional for a root) and
//! `root-cert.pem` (the root or roots agents trust; several during a root rotation).
//! `--generate` writes a fresh self-signed root there when the directory holds none.
use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use time::OffsetDateTime;

use crate::identity::{pem_block, CaError, CertificateAuthority, TrustBundle, TrustDomain};

/// The signing certificate.
pub const CA_CERT: &str = "ca-cert.pem";
/// The signing certificate's private key (mode 0600).
pub const CA_KEY: &str = "ca-key.pem";
/// The chain from the signing certificate to the root.
pub const CERT_CHAIN: &str = "cert-chain.pem";
/// The root(s) agents trust.
pub const ROOT_CERT: &str = "root-cert.pem";
/// Lifetime of the serving certificate (re-issued at every start).
const SERVING_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// How far back generated certificates' notBefore is set, for clock skew.
const BACKDATE: Duration = Duration::from_secs(3600);

/// Loaded root material: the signing authority, the roots it answers with, and the TLS identity.
pub struct Material {
    /// Signs workload certificates.
    pub authority: CertificateAuthority,
    /// Every trusted root (the CA's own and those of `root-cert.pem`), sent as the last entry of
    /// each response.
    pub roots: TrustBundle,
    /// The gRPC server's certificate chain and key.
    pub serving: Arc<CertifiedKey>,
    /// When the serving certificate expires.
    pub serving_not_after: OffsetDateTime,
}

/// Why the root material could not be loaded, generated or used.
#[derive(Debug, thiserror::Error)]
pub enum MaterialError {
    /// A file could not be read.
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file or the directory could not be written.
    #[error("cannot write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Some but not all files exist, and `--generate` would overwrite an operator's material.
    #[error("{}: holds {present} but not {missing}; refusing to generate over partial material", dir.display())]
    Partial {
        dir: PathBuf,
        present: &'static str,
        missing: &'static str,
    },
    /// The material is unusable.
    #[error("ca material in {}", dir.display())]
    Authority {
        dir: PathBuf,
        #[source]
        source: CaError,
    },
    /// `root-cert.pem` is not a usable bundle.
    #[error("{}", path.display())]
    Roots {
        path: PathBuf,
        #[source]
        source: crate::identity::BundleError,
    },
    /// A PEM file holds no certificate or is broken.
    #[error("{}: invalid pem", path.display())]
    Pem {
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// rcgen failed to generate a key or certificate.
    #[error("failed to {what}")]
    Generate {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
    /// rustls refused the serving certificate and key.
    #[error("serving certificate is unusable")]
    Serving {
        #[source]
        source: rustls::Error,
    },
}

/// What to put in the serving certificate.
#[derive(Debug, Clone)]
pub struct ServingNames {
    /// DNS SANs.
    pub dns: Vec<String>,
    /// IP SANs.
    pub ips: Vec<IpAddr>,
}

impl Material {
    /// Loads the material in `dir`; with `generate` (a root lifetime), first writes a new root
    /// there if the directory holds no material at all.
    pub fn load(
        dir: &Path,
        generate: Option<Duration>,
        trust_domain: TrustDomain,
        names: &ServingNames,
        now: SystemTime,
    ) -> Result<Self, MaterialError> {
        if let Some(root_ttl) = generate {
            let present = [CA_CERT, CA_KEY, ROOT_CERT].map(|f| dir.join(f).exists());
            match present {
                [false, false, false] => {
                    generate_root(dir, &trust_domain, root_ttl, now)?;
                    tracing::info!(dir = %dir.display(), "generated a new root ca");
                }
                [true, true, true] => {
                    tracing::info!(dir = %dir.display(), "reusing the root ca found in the directory")
                }
                _ => {
                    let name = |i: usize| [CA_CERT, CA_KEY, ROOT_CERT][i];
                    let first_present = present.iter().position(|p| *p).unwrap_or(0);
                    let first_missing = present.iter().position(|p| !*p).unwrap_or(0);
                    return Err(MaterialError::Partial {
                        dir: dir.to_path_buf(),
                        present: name(first_present),
                        missing: name(first_missing),
                    });
                }
            }
        }
        let cert_pem = read(&dir.join(CA_CERT))?;
        let key_pem = read(&dir.join(CA_KEY))?;
        let root_path = dir.join(ROOT_CERT);
        let root_pem = read(&root_path)?;
        let chain_path = dir.join(CERT_CHAIN);
        let chain_pem = if chain_path.exists() {
            read(&chain_path)?
        } else {
            String::new()
        };

        let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|source| {
            MaterialError::Pem {
                path: dir.join(CA_CERT),
                source,
            }
        })?;
        let file_roots =
            TrustBundle::from_pem(&root_pem).map_err(|source| MaterialError::Roots {
                path: root_path.clone(),
                source,
            })?;
        // `from_pem` wants the chain *above* the signing certificate, roots included: Istio's
        // cert-chain.pem usually starts with the signing certificate itself, and may omit roots.
        let mut above = Vec::new();
        for der in CertificateDer::pem_slice_iter(chain_pem.as_bytes()) {
            let der = der.map_err(|source| MaterialError::Pem {
                path: chain_path.clone(),
                source,
            })?;
            if der != cert && !above.contains(&der) {
                above.push(der);
            }
        }
        for root in file_roots.roots() {
            if *root != cert && !above.contains(root) {
                above.push(root.clone());
            }
        }
        let above_pem: String = above
            .iter()
            .map(|der| pem_block("CERTIFICATE", der))
            .collect();
        let authority =
            CertificateAuthority::from_pem(trust_domain, &cert_pem, &key_pem, &above_pem, now)
                .map_err(|source| MaterialError::Authority {
                    dir: dir.to_path_buf(),
                    source,
                })?;
        let roots = authority.roots().merged(&file_roots);

        let (serving, serving_not_after) =
            serving_certificate(&authority, &cert, &key_pem, names, now)?;
        Ok(Self {
            authority,
            roots,
            serving,
            serving_not_after,
        })
    }
}

/// Issues the TLS serving certificate (serverAuth, the configured names) under the signing key.
fn serving_certificate(
    authority: &CertificateAuthority,
    ca_cert: &CertificateDer<'static>,
    ca_key_pem: &str,
    names: &ServingNames,
    now: SystemTime,
) -> Result<(Arc<CertifiedKey>, OffsetDateTime), MaterialError> {
    let generate = |what| move |source| MaterialError::Generate { what, source };
    let ca_key_der = PrivateKeyDer::from_pem_slice(ca_key_pem.as_bytes()).map_err(|source| {
        MaterialError::Pem {
            path: PathBuf::from(CA_KEY),
            source,
        }
    })?;
    let ca_key = KeyPair::try_from(&ca_key_der).map_err(generate("load the ca key"))?;
    let issuer =
        Issuer::from_ca_cert_der(ca_cert, ca_key).map_err(generate("read the ca certificate"))?;
    let ca_not_after = x509_parser::parse_x509_certificate(ca_cert)
        .ok()
        .map(|(_, x509)| x509.validity().not_after.to_datetime());

    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(generate("generate the serving key"))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, "ambit-ca");
    for name in &names.dns {
        let name = name
            .clone()
            .try_into()
            .map_err(generate("encode a serving dns name"))?;
        params.subject_alt_names.push(SanType::DnsName(name));
    }
    params
        .subject_alt_names
        .extend(names.ips.iter().map(|ip| SanType::IpAddress(*ip)));
    let now = OffsetDateTime::from(now);
    params.not_before = now - BACKDATE;
    params.not_after = (now + SERVING_TTL).min(ca_not_after.unwrap_or(now + SERVING_TTL));
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let leaf = params
        .signed_by(&key, &issuer)
        .map_err(generate("sign the serving certificate"))?;

    let mut chain = vec![leaf.der().clone()];
    chain.extend(authority.chain().iter().cloned());
    let key_der =
        PrivateKeyDer::try_from(key.serialize_der()).map_err(|_| MaterialError::Serving {
            source: rustls::Error::General("serving key".into()),
        })?;
    let provider = rustls::crypto::ring::default_provider();
    let certified = CertifiedKey::from_der(chain, key_der, &provider)
        .map_err(|source| MaterialError::Serving { source })?;
    Ok((Arc::new(certified), params.not_after))
}

/// Generates a self-signed P-256 root and writes it as `ca-cert.pem`, `ca-key.pem` (0600),
/// `cert-chain.pem` and `root-cert.pem`.
fn generate_root(
    dir: &Path,
    trust_domain: &TrustDomain,
    ttl: Duration,
    now: SystemTime,
) -> Result<(), MaterialError> {
    let generate = |what| move |source| MaterialError::Generate { what, source };
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(generate("generate the root key"))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, trust_domain.as_str());
    params
        .distinguished_name
        .push(DnType::CommonName, "ambit root ca");
    let now = OffsetDateTime::from(now);
    params.not_before = now - BACKDATE;
    params.not_after = now + ttl;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = params
        .self_signed(&key)
        .map_err(generate("self-sign the root"))?;

    let write_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| MaterialError::Write { path, source }
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(write_err(dir))?;
    // The key first, created exclusively with mode 0600: it is never world-readable, not even
    // for an instant, and an existing key is never overwritten.
    let key_path = dir.join(CA_KEY);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&key_path)
        .map_err(write_err(&key_path))?;
    file.write_all(key.serialize_pem().as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(write_err(&key_path))?;
    let cert_pem = cert.pem();
    for name in [CERT_CHAIN, ROOT_CERT, CA_CERT] {
        let path = dir.join(name);
        fs::write(&path, &cert_pem).map_err(write_err(&path))?;
    }
    Ok(())
}

fn read(path: &Path) -> Result<String, MaterialError> {
    fs::read_to_string(path).map_err(|source| MaterialError::Read {
        path: path.to_path_buf(),
        source,
    })
}
