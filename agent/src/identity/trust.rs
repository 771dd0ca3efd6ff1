//! Follows the CA root file (`ca.rootCert`) and the CA's latest roots into the tunnels' trust.
//!
//! The root file is a mounted ConfigMap in Kubernetes (`istio-ca-root-cert` with istiod,
//! `ambit-ca-root-cert` with `ambit ca`); kubelet replaces it when the ConfigMap changes. It is
//! polled (a content comparison: kubelet swaps a symlink, so inotify on the file would miss it)
//! and, when its text changed and parses into a usable bundle, replaces the file's roots in the
//! [`TlsSource`]. A file that does not parse, holds no usable root or cannot be read keeps the
//! last good roots in force: the error is logged once per distinct content and counted in
//! [`Reloads`]. The roots the CA sends with each certificate ([`CertManager::watch_roots`])
//! are followed too; the trust bundle is the union of both (see [`TlsSource`]).
//!
//! A root rotation therefore needs no restart: add the new root to the file (both trusted),
//! let the CA sign with the new root until every certificate was renewed, remove the old root.
//!
//! [`CertManager::watch_roots`]: crate::identity::manager::CertManager::watch_roots
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::watch;

use crate::identity::source::TlsSource;
use crate::identity::{BundleError, TrustBundle};

/// Reloads of the root file by outcome (`applied`, `rejected`, `unreadable`); registered by the
/// admin metrics registry as `ambit_trust_reloads_total`. A handle: clones count into the same
/// family.
#[derive(Debug, Clone, Default)]
pub struct Reloads(Family<OutcomeLabel, Counter>);

impl Reloads {
    /// Counts one reload with `outcome`.
    fn count(&self, outcome: &'static str) {
        self.0.get_or_create(&OutcomeLabel { outcome }).inc();
    }

    /// How many reloads had `outcome` so far.
    pub fn value(&self, outcome: &'static str) -> u64 {
        self.0.get_or_create(&OutcomeLabel { outcome }).get()
    }

    /// The family, for the registry.
    pub fn family(&self) -> Family<OutcomeLabel, Counter> {
        self.0.clone()
    }
}

/// Label of [`Reloads`].
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// `applied`: new roots in force; `rejected`: the new text is not a usable bundle;
    /// `unreadable`: the file could not be read. The last two keep the last good roots.
    pub outcome: &'static str,
}

/// The root file, as last seen.
#[derive(Debug)]
pub struct RootFile {
    path: PathBuf,
    /// The text of the last read, good or bad: a change is a new text.
    last_text: Option<String>,
    /// The last read error, so one lasting fault is logged once.
    last_error: Option<String>,
    /// Where reloads are counted.
    reloads: Reloads,
}

/// Why the root file's new content is not used.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// The file could not be read.
    #[error("cannot read ca root file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The file holds no usable trust bundle.
    #[error("ca root file {} holds no usable root", path.display())]
    Bundle {
        path: PathBuf,
        #[source]
        source: BundleError,
    },
}

/// What one look at the root file found.
#[derive(Debug)]
pub enum Check {
    /// Same text as last time (or the same error).
    Unchanged,
    /// New text holding a usable bundle.
    Changed(TrustBundle),
    /// New text (or a new read error) that cannot be used; the last good roots stay.
    Rejected(TrustError),
}

impl RootFile {
    /// The file at `path`, whose current text (`text`, read at startup) is in force; reloads
    /// are counted in `reloads`.
    pub fn new(path: PathBuf, text: String, reloads: Reloads) -> Self {
        Self {
            path,
            last_text: Some(text),
            last_error: None,
            reloads,
        }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the file and compares it with the last read.
    pub fn check(&mut self) -> Check {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(source) => {
                let message = source.to_string();
                if self.last_error.as_deref() == Some(message.as_str()) {
                    return Check::Unchanged;
                }
                self.last_error = Some(message);
                // Read again once it is back, even if unchanged.
                self.last_text = None;
                return Check::Rejected(TrustError::Read {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        self.last_error = None;
        if self.last_text.as_deref() == Some(text.as_str()) {
            return Check::Unchanged;
        }
        let parsed = TrustBundle::from_pem(&text);
        self.last_text = Some(text);
        match parsed {
            Ok(bundle) => Check::Changed(bundle),
            Err(source) => Check::Rejected(TrustError::Bundle {
                path: self.path.clone(),
                source,
            }),
        }
    }

    /// Looks at the file once and applies what it found to `tls`.
    pub fn apply(&mut self, tls: &TlsSource) {
        match self.check() {
            Check::Unchanged => {}
            Check::Changed(bundle) => {
                let roots = bundle.roots().len();
                let changed = tls.set_file_roots(bundle);
                self.reloads.count("applied");
                tracing::info!(path = %self.path.display(), roots, trusted = tls.roots().roots().len(), changed,
                    "ca root file reloaded; new handshakes verify peers against its roots");
            }
            Check::Rejected(error) => {
                self.reloads.count(match error {
                    TrustError::Read { .. } => "unreadable",
                    TrustError::Bundle { .. } => "rejected",
                });
                tracing::error!(error = %crate::error::error_chain(&error), trusted = tls.roots().roots().len(),
                    "ca root file not usable; the last good roots stay in force");
            }
        }
    }
}

/// Follows `file` every `interval` and the CA's latest roots into `tls`, until `ca_roots`'
/// sender (the certificate manager) is dropped.
pub async fn follow(
    mut file: RootFile,
    interval: Duration,
    tls: Arc<TlsSource>,
    mut ca_roots: watch::Receiver<Option<TrustBundle>>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => file.apply(&tls),
            changed = ca_roots.changed() => {
                if changed.is_err() {
                    return;
                }
                let roots = ca_roots.borrow_and_update().clone();
                let sent = roots.as_ref().map_or(0, |r| r.roots().len());
                if tls.set_ca_roots(roots) {
                    tracing::info!(ca.roots = sent, trusted = tls.roots().roots().len(),
                        "the ca sent other roots; trust bundle updated");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
