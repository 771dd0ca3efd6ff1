//! Certificate lifetimes of tunnel connections: which certificates a handshake used and when the first of them expires.
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{CommonState, SignatureScheme};

use crate::identity::chain_not_after;

/// Records the certificate a config's resolver hands to rustls, so that the connection knows
/// what it presented (rustls does not tell after the handshake).
#[derive(Debug)]
pub(crate) struct Presented<R: ?Sized> {
    inner: Arc<R>,
    chosen: Mutex<Option<Arc<CertifiedKey>>>,
}

impl<R: ?Sized> Presented<R> {
    pub(crate) fn new(inner: Arc<R>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            chosen: Mutex::new(None),
        })
    }

    /// When the presented chain expires (`None`: nothing was presented).
    pub(crate) fn not_after(&self) -> Option<SystemTime> {
        let chosen = self
            .chosen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        chosen.and_then(|k| chain_not_after(&k.cert))
    }

    fn record(&self, key: Option<Arc<CertifiedKey>>) -> Option<Arc<CertifiedKey>> {
        *self
            .chosen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = key.clone();
        key
    }
}

impl ResolvesServerCert for Presented<dyn ResolvesServerCert> {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.record(self.inner.resolve(client_hello))
    }

    fn only_raw_public_keys(&self) -> bool {
        self.inner.only_raw_public_keys()
    }
}

impl ResolvesClientCert for Presented<dyn ResolvesClientCert> {
    fn resolve(
        &self,
        root_hint_subjects: &[&[u8]],
        sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.record(self.inner.resolve(root_hint_subjects, sigschemes))
    }

    fn only_raw_public_keys(&self) -> bool {
        self.inner.only_raw_public_keys()
    }

    fn has_certs(&self) -> bool {
        self.inner.has_certs()
    }
}

/// When a finished handshake stops being backed by valid certificates: the earliest
/// `notAfter` of the peer's chain and of the chain we presented (`None`: neither is known).
pub(crate) fn connection_not_after(
    session: &CommonState,
    presented: Option<SystemTime>,
) -> Option<SystemTime> {
    let peer = session.peer_certificates().and_then(chain_not_after);
    match (peer, presented) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Whether credentials valid until `not_after` have expired at `now`.
pub(crate) fn expired(not_after: Option<SystemTime>, now: SystemTime) -> bool {
    not_after.is_some_and(|t| now >= t)
}

/// The tokio instant at which wall-clock time `t` arrives (now when it is past).
pub(crate) fn instant_of(t: SystemTime) -> tokio::time::Instant {
    let left = t
        .duration_since(SystemTime::now())
        .unwrap_or(std::time::Duration::ZERO);
    tokio::time::Instant::now() + left
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn expiry_is_inclusive_and_unknown_never_expires() {
        let now = SystemTime::now();
        assert!(!expired(None, now));
        assert!(!expired(Some(now + Duration::from_secs(1)), now));
        assert!(expired(Some(now), now));
        assert!(expired(Some(now - Duration::from_secs(1)), now));
    }
}
