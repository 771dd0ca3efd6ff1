//! The certificate manager: one SVID per local identity, fetched ahead and renewed at half life.
//!
//! Invariants:
//! - The cache is keyed by identity, not by pod: pods sharing a service account share one
//!   certificate. Each identity counts the pods that use it; `track` adds one (and starts the
//!   fetch, so the certificate is there before the first connection), `forget` removes one, and
//!   the last `forget` stops the identity's worker and drops its certificate and key.
//! - One worker task per identity, on the runtime given at construction: fetch (a fresh key
//!   and CSR every time), then sleep until the half-life point ± 5 % of the lifetime (jitter, so
//!   identities issued together do not renew together), or, after a failure, for an
//!   exponential backoff (±20 %, capped) that never oversleeps the current certificate's expiry.
//! - A certificate that is still valid keeps being served while renewals fail; `get` never
//!   hands out an expired one. At most [`MAX_CONCURRENT_FETCHES`] requests reach the CA at once.
//! - A CA answer the client refuses (another identity than asked for, a chain that does not
//!   verify, roots the agent does not trust) never replaces the certificate served: it counts
//!   as a failed request and as `rejected`, and is logged at error level.
//! - A connection that needs a certificate waits for one only while the first request is in
//!   flight; once requests have failed and nothing valid is left it is refused at once, and
//!   counted per identity (`refused`).
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use rustls_pki_types::UnixTime;
use serde::Serialize;
use tokio::runtime::Handle;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

use crate::identity::ca_client::CaClient;
use crate::identity::{SpiffeId, Timestamp, TrustBundle, WorkloadCertificate};

/// Requests in flight to the CA at once, over all identities.
pub const MAX_CONCURRENT_FETCHES: usize = 8;

/// Issues and renews the local identities' certificates through the CA.
pub struct CertManager {
    client: Arc<CaClient>,
    settings: ManagerSettings,
    runtime: Handle,
    permits: Arc<Semaphore>,
    entries: Mutex<HashMap<SpiffeId, Entry>>,
    /// The roots the CA sent with its latest certificate, of any identity.
    roots: Arc<watch::Sender<Option<TrustBundle>>>,
}

/// Retry and renewal timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ManagerSettings {
    /// First retry delay after a failure.
    pub initial_backoff: Duration,
    /// Longest retry delay.
    pub max_backoff: Duration,
    /// Shortest delay before a renewal, whatever the certificate's lifetime.
    pub min_renewal: Duration,
}

/// Where an identity's certificate stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CertState {
    /// The first request has not completed yet.
    Initializing,
    /// A valid certificate is being served (a renewal may have failed: see `lastError`).
    Available,
    /// No valid certificate: the last request failed.
    Unavailable,
}

/// One identity's certificate status, as `GET /certs` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CertStatus {
    /// The SPIFFE ID.
    pub identity: String,
    /// Where the certificate stands.
    pub state: CertState,
    /// Local pods using this identity.
    pub pods: usize,
    /// Serial of the certificate served (lowercase hex).
    pub serial: Option<String>,
    /// Start of its validity (RFC 3339, UTC).
    pub not_before: Option<String>,
    /// End of its validity (RFC 3339, UTC).
    pub not_after: Option<String>,
    /// End of its validity, unix seconds (for metrics).
    #[serde(skip)]
    pub not_after_unix: Option<i64>,
    /// When the next request is due: renewal, or retry after a failure (RFC 3339, UTC).
    pub next_renewal: Option<String>,
    /// Why the last request failed, if it did.
    pub last_error: Option<String>,
    /// Certificates received after the first one.
    pub renewals: u64,
    /// Failed requests since the last success.
    pub failures: u32,
    /// CA answers refused by the agent (wrong identity, invalid chain, untrusted roots).
    pub rejected: u64,
    /// Connections refused because this identity had no valid certificate.
    pub refused: u64,
}

/// Why waiting for a certificate gave up.
#[derive(Debug, thiserror::Error)]
pub enum CertWaitError {
    /// Nobody tracks this identity: no local pod uses it.
    #[error("no local pod uses {id}; its certificate is not managed")]
    NotTracked { id: SpiffeId },
    /// The identity was forgotten (its last pod left) while waiting.
    #[error("{id} was forgotten while waiting for its certificate")]
    Forgotten { id: SpiffeId },
    /// No valid certificate, and requests to the CA are failing.
    #[error("no valid certificate for {id}{}", last_error.as_deref().map(|e| format!(" (last error: {e})")).unwrap_or_default())]
    Unavailable {
        id: SpiffeId,
        last_error: Option<String>,
    },
    /// No valid certificate in time.
    #[error("no certificate for {id} after {timeout:?}{}", last_error.as_deref().map(|e| format!(" (last error: {e})")).unwrap_or_default())]
    Timeout {
        id: SpiffeId,
        timeout: Duration,
        last_error: Option<String>,
    },
}

/// A tracked identity: its pod count, published state and worker.
struct Entry {
    pods: usize,
    slot: Arc<watch::Sender<Slot>>,
    worker: JoinHandle<()>,
}

/// What the worker publishes for an identity.
#[derive(Clone)]
struct Slot {
    state: CertState,
    cert: Option<Arc<WorkloadCertificate>>,
    next_renewal: Option<SystemTime>,
    last_error: Option<String>,
    renewals: u64,
    failures: u32,
    rejected: u64,
    refused: u64,
}

impl CertManager {
    /// Builds a manager whose workers run on `runtime` (the agent's admin runtime).
    pub fn new(client: CaClient, runtime: Handle, settings: ManagerSettings) -> Self {
        Self {
            client: Arc::new(client),
            settings,
            runtime,
            permits: Arc::new(Semaphore::new(MAX_CONCURRENT_FETCHES)),
            entries: Mutex::new(HashMap::new()),
            roots: Arc::new(watch::Sender::new(None)),
        }
    }

    /// A local pod uses `id`: count it, and start fetching if it is the first.
    pub fn track(&self, id: &SpiffeId) {
        let mut entries = self.entries();
        if let Some(entry) = entries.get_mut(id) {
            entry.pods += 1;
            return;
        }
        let slot = Arc::new(watch::Sender::new(Slot::new()));
        let worker = self.runtime.spawn(renew(
            self.client.clone(),
            id.clone(),
            slot.clone(),
            self.settings,
            self.permits.clone(),
            self.roots.clone(),
        ));
        tracing::debug!(identity = %id, "identity tracked; fetching its certificate");
        entries.insert(
            id.clone(),
            Entry {
                pods: 1,
                slot,
                worker,
            },
        );
    }

    /// A local pod using `id` left: uncount it, and drop the certificate if it was the last.
    pub fn forget(&self, id: &SpiffeId) {
        let mut entries = self.entries();
        let Some(entry) = entries.get_mut(id) else {
            return;
        };
        entry.pods = entry.pods.saturating_sub(1);
        if entry.pods == 0 {
            // Dropping the entry aborts the worker and drops the key with the certificate.
            entries.remove(id);
            tracing::debug!(identity = %id, "identity forgotten");
        }
    }

    /// The certificate for `id`, if one is valid now.
    pub fn get(&self, id: &SpiffeId) -> Option<Arc<WorkloadCertificate>> {
        let entries = self.entries();
        let slot = entries.get(id)?.slot.borrow();
        slot.cert
            .clone()
            .filter(|cert| cert.is_valid_at(SystemTime::now()))
    }

    /// Waits up to `timeout` for a valid certificate for `id` (tracked beforehand).
    pub async fn wait(
        &self,
        id: &SpiffeId,
        timeout: Duration,
    ) -> Result<Arc<WorkloadCertificate>, CertWaitError> {
        let mut rx = match self.entries().get(id) {
            Some(entry) => entry.slot.subscribe(),
            None => return Err(CertWaitError::NotTracked { id: id.clone() }),
        };
        let wait = async {
            let slot = rx
                .wait_for(|slot| slot.valid_cert(SystemTime::now()).is_some())
                .await;
            slot.map(|slot| slot.valid_cert(SystemTime::now()))
        };
        let outcome = tokio::time::timeout(timeout, wait).await;
        match outcome {
            Ok(Ok(Some(cert))) => Ok(cert),
            Ok(Err(_)) => Err(CertWaitError::Forgotten { id: id.clone() }),
            // Expired between the check and now (`Ok(Ok(None))`), or no certificate in time.
            Ok(Ok(None)) | Err(_) => {
                let last_error = rx.borrow().last_error.clone();
                Err(CertWaitError::Timeout {
                    id: id.clone(),
                    timeout,
                    last_error,
                })
            }
        }
    }

    /// The certificate a new connection of `id` presents: the valid one, or, while the first
    /// request is still in flight, the one that arrives within `timeout`. Anything else
    /// (expired and not renewed, refused by the CA) refuses the connection and counts it.
    pub async fn for_connection(
        &self,
        id: &SpiffeId,
        timeout: Duration,
    ) -> Result<Arc<WorkloadCertificate>, CertWaitError> {
        if let Some(cert) = self.get(id) {
            return Ok(cert);
        }
        let (slot, initializing) = match self.entries().get(id) {
            Some(entry) => {
                let initializing = entry.slot.borrow().state == CertState::Initializing;
                (entry.slot.clone(), initializing)
            }
            None => return Err(CertWaitError::NotTracked { id: id.clone() }),
        };
        let result = if initializing {
            self.wait(id, timeout).await
        } else {
            Err(CertWaitError::Unavailable {
                id: id.clone(),
                last_error: slot.borrow().last_error.clone(),
            })
        };
        if result.is_err() {
            // Counted without waking waiters: nothing they wait for changed.
            slot.send_if_modified(|s| {
                s.refused += 1;
                false
            });
        }
        result
    }

    /// The roots the CA sent with its latest certificate (of any identity), as they change.
    pub fn watch_roots(&self) -> watch::Receiver<Option<TrustBundle>> {
        self.roots.subscribe()
    }

    /// Every tracked identity's status, sorted by identity.
    pub fn snapshot(&self) -> Vec<CertStatus> {
        let now = SystemTime::now();
        let entries = self.entries();
        let mut statuses: Vec<CertStatus> = entries
            .iter()
            .map(|(id, entry)| entry.slot.borrow().status(id, entry.pods, now))
            .collect();
        statuses.sort_by(|a, b| a.identity.cmp(&b.identity));
        statuses
    }

    fn entries(&self) -> MutexGuard<'_, HashMap<SpiffeId, Entry>> {
        // A poisoned lock only means a holder panicked; the map itself is never left half-edited.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Default for ManagerSettings {
    /// ztunnel's timing: retry after 0.5 s, doubling up to 150 s; renew no sooner than 1 s.
    fn default() -> Self {
        Self {
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(150),
            min_renewal: Duration::from_secs(1),
        }
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.worker.abort();
    }
}

impl Slot {
    fn new() -> Self {
        Self {
            state: CertState::Initializing,
            cert: None,
            next_renewal: None,
            last_error: None,
            renewals: 0,
            failures: 0,
            rejected: 0,
            refused: 0,
        }
    }

    fn valid_cert(&self, now: SystemTime) -> Option<Arc<WorkloadCertificate>> {
        self.cert.clone().filter(|cert| cert.is_valid_at(now))
    }

    fn status(&self, id: &SpiffeId, pods: usize, now: SystemTime) -> CertStatus {
        let valid = self.valid_cert(now);
        // The worker wakes at expiry to retry, but between its wake-ups a certificate can
        // expire: report what `get` would do.
        let state = match (self.state, &valid) {
            (CertState::Available, None) => CertState::Unavailable,
            (state, _) => state,
        };
        let cert = self.cert.as_ref();
        CertStatus {
            identity: id.to_string(),
            state,
            pods,
            serial: cert.map(|c| c.serial().to_owned()),
            not_before: cert.map(|c| rfc3339(c.not_before())),
            not_after: cert.map(|c| rfc3339(c.not_after())),
            not_after_unix: cert.and_then(|c| {
                let secs = c
                    .not_after()
                    .duration_since(std::time::UNIX_EPOCH)
                    .ok()?
                    .as_secs();
                i64::try_from(secs).ok()
            }),
            next_renewal: self.next_renewal.map(rfc3339),
            last_error: self.last_error.clone(),
            renewals: self.renewals,
            failures: self.failures,
            rejected: self.rejected,
            refused: self.refused,
        }
    }
}

/// The worker of one identity: fetch, publish, sleep until renewal or retry; forever.
async fn renew(
    client: Arc<CaClient>,
    id: SpiffeId,
    slot: Arc<watch::Sender<Slot>>,
    settings: ManagerSettings,
    permits: Arc<Semaphore>,
    latest_roots: Arc<watch::Sender<Option<TrustBundle>>>,
) {
    let mut backoff = settings.initial_backoff;
    loop {
        let result = {
            let Ok(_permit) = permits.acquire().await else {
                return;
            };
            client.fetch(&id).await
        };
        let now = SystemTime::now();
        let delay = match result {
            Ok(issued) => {
                backoff = settings.initial_backoff;
                let cert = Arc::new(issued.certificate);
                let delay = renewal_delay(&cert, now, unit_random()).max(settings.min_renewal);
                let rotated = slot.borrow().cert.is_some();
                let (serial, not_after) = (cert.serial(), rfc3339(cert.not_after()));
                let next_renewal = rfc3339(now + delay);
                if rotated {
                    tracing::info!(identity = %id, serial, %not_after, %next_renewal, "certificate rotated");
                } else {
                    tracing::info!(identity = %id, serial, %not_after, %next_renewal, "certificate issued");
                }
                latest_roots.send_if_modified(|latest| {
                    let same = latest
                        .as_ref()
                        .is_some_and(|r| r.roots() == issued.roots.roots());
                    if !same {
                        *latest = Some(issued.roots.clone());
                    }
                    !same
                });
                slot.send_modify(|s| {
                    s.state = CertState::Available;
                    s.cert = Some(cert);
                    s.next_renewal = Some(now + delay);
                    s.last_error = None;
                    s.failures = 0;
                    if rotated {
                        s.renewals += 1;
                    }
                });
                delay
            }
            Err(error) => {
                let message = crate::error::error_chain(&error);
                let mut delay = jittered(backoff, unit_random());
                backoff = backoff.saturating_mul(2).min(settings.max_backoff);
                let valid = slot.borrow().valid_cert(now);
                let rejected = error.is_rejected_answer();
                if let Some(cert) = &valid {
                    // Retry no later than expiry, so the state flips the moment it lapses.
                    let left = cert.not_after().duration_since(now).unwrap_or_default();
                    delay = delay.min(left.max(Duration::from_millis(100)));
                }
                if rejected {
                    // The CA answered, but not with a certificate we may use: never served.
                    let keeping = valid.as_ref().map_or("none", |c| c.serial());
                    tracing::error!(identity = %id, error = %message, retry.ms = delay.as_millis() as u64,
                        keeping.serial = keeping,
                        "ca answer refused; the previous certificate stays in use while valid");
                } else if valid.is_some() {
                    tracing::warn!(identity = %id, error = %message, retry.ms = delay.as_millis() as u64,
                        "certificate renewal failed; serving the current certificate until it expires");
                } else if slot.borrow().cert.is_some() {
                    tracing::error!(identity = %id, error = %message, retry.ms = delay.as_millis() as u64,
                        "certificate expired and renewal failed");
                } else {
                    tracing::warn!(identity = %id, error = %message, retry.ms = delay.as_millis() as u64,
                        "certificate request failed");
                }
                slot.send_modify(|s| {
                    s.state = if valid.is_some() {
                        CertState::Available
                    } else {
                        CertState::Unavailable
                    };
                    s.next_renewal = Some(now + delay);
                    s.last_error = Some(message);
                    s.failures = s.failures.saturating_add(1);
                    s.rejected += u64::from(rejected);
                });
                delay
            }
        };
        tokio::time::sleep(delay).await;
    }
}

/// Time from `now` to the half-life of `cert`, moved by up to ±5 % of its lifetime
/// (`random` in [0, 1)).
fn renewal_delay(cert: &WorkloadCertificate, now: SystemTime, random: f64) -> Duration {
    let lifetime = cert
        .not_after()
        .duration_since(cert.not_before())
        .unwrap_or_default();
    let jitter = lifetime.mul_f64(0.1 * random);
    let at = cert.refresh_at() + jitter;
    let at = at.checked_sub(lifetime / 20).unwrap_or(at);
    at.duration_since(now).unwrap_or_default()
}

/// `delay` ±20 % (`random` in [0, 1)).
fn jittered(delay: Duration, random: f64) -> Duration {
    delay.mul_f64(0.8 + 0.4 * random)
}

/// A uniform random number in [0, 1); 0.5 should the system generator fail (jitter is only
/// there to spread load).
fn unit_random() -> f64 {
    let mut bytes = [0u8; 8];
    match ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes) {
        // 53 random bits make every f64 in [0, 1) with a 2^-53 step.
        Ok(()) => (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64,
        Err(_) => 0.5,
    }
}

fn rfc3339(t: SystemTime) -> String {
    let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    Timestamp(UnixTime::since_unix_epoch(since)).to_string()
}

#[cfg(test)]
mod tests;
