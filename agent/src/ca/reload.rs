//! Follows the CA's root material: `certDir` is loaded again when one of its files changes, as
//! istiod reloads plugged-in `cacerts`, so a root rotates without a restart.
//!
//! Rotation with the `cacerts` layout: (1) add the new root to `root-cert.pem` (agents trust
//! both; the CA sends both); (2) put the new signing certificate and key in `ca-cert.pem`,
//! `ca-key.pem` (and `cert-chain.pem`), keeping both roots in `root-cert.pem`, and wait until
//! every workload certificate was renewed; (3) remove the old root from `root-cert.pem`. Each
//! step takes effect at the next poll. Material that does not load (a half-written pair, a key
//! that does not match) is refused: the CA goes on signing with the last good material, logs
//! the error once per change and counts it (`material_rejected` in `/status`); the next change
//! is tried again.
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::ca::material::{Material, ServingNames, CA_CERT, CA_KEY, CERT_CHAIN, ROOT_CERT};
use crate::ca::server::ServingCert;
use crate::ca::service::CaService;
use crate::identity::TrustDomain;

/// The contents of the four material files (`None`: absent or unreadable).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Files([Option<Vec<u8>>; 4]);

impl Files {
    /// Reads the material files of `dir`.
    pub fn read(dir: &Path) -> Self {
        Self(
            [CA_CERT, CA_KEY, CERT_CHAIN, ROOT_CERT].map(|name| std::fs::read(dir.join(name)).ok()),
        )
    }
}

/// What the CA needs to load its material again.
#[derive(Debug, Clone)]
pub struct Reload {
    /// `certDir`.
    pub dir: PathBuf,
    /// The CA's trust domain.
    pub trust_domain: TrustDomain,
    /// Names of the serving certificate, issued again under the new material.
    pub names: ServingNames,
}

impl Reload {
    /// Loads the material and puts it in force in `service` and `serving`; false (logged and
    /// counted) when it does not load.
    pub fn apply(&self, service: &CaService, serving: &ServingCert) -> bool {
        let loaded = Material::load(
            &self.dir,
            None,
            self.trust_domain.clone(),
            &self.names,
            SystemTime::now(),
        );
        match loaded {
            Ok(material) => {
                let roots = material.roots.roots().len();
                service.set_material(material.authority, &material.roots);
                serving.set(material.serving);
                service.stats().count("material_reloaded");
                tracing::info!(dir = %self.dir.display(), roots,
                    serving.not_after = %material.serving_not_after,
                    "ca material reloaded; new certificates are signed with it");
                true
            }
            Err(error) => {
                service.stats().count("material_rejected");
                tracing::error!(dir = %self.dir.display(), error = %crate::error::error_chain(&error),
                    "ca material changed but does not load; signing with the previous material");
                false
            }
        }
    }

    /// Polls the files every `interval` and applies each change, starting from `seen` (the
    /// files as they were when the running material was loaded).
    pub async fn follow(
        self,
        mut seen: Files,
        interval: Duration,
        service: Arc<CaService>,
        serving: ServingCert,
    ) {
        loop {
            tokio::time::sleep(interval).await;
            let dir = self.dir.clone();
            let Ok(now) = tokio::task::spawn_blocking(move || Files::read(&dir)).await else {
                continue;
            };
            if now == seen {
                continue;
            }
            seen = now;
            self.apply(&service, &serving);
        }
    }
}

#[cfg(test)]
mod tests;
