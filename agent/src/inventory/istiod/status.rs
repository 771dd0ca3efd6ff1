//! What the istiod stream shows on `/status` and in metrics: state, versions, counts, counters.
//!
//! [`StatusHandle`] is shared between the stream's task (which writes) and the admin server
//! (which reads [`StatusHandle::snapshot`]); [`XdsMetrics`] holds the Prometheus counters, to be
//! registered by whoever owns the registry ([`XdsMetrics::register`]).
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::Serialize;

/// Where the stream is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamState {
    /// Opening the stream (TCP, TLS, gRPC call).
    #[default]
    Connecting,
    /// The stream is open.
    Connected,
    /// The last stream failed; waiting before the next attempt.
    Backoff,
}

/// One resource type's state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TypeStatus {
    /// Resources held (the last good version of each).
    pub resources: usize,
    /// `system_version_info` of the last response ACKed.
    pub last_ack_version: Option<String>,
    /// Nonce of the last response ACKed.
    pub last_ack_nonce: Option<String>,
    /// Error text of the last NACK, if the last response was NACKed.
    pub last_nack: Option<String>,
    /// Whether the current stream has delivered this type's first push.
    pub synced: bool,
}

/// The stream's state for `/status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct XdsStatus {
    /// istiod's address.
    pub address: String,
    /// Stream state.
    pub state: StreamState,
    /// Why the last stream ended, if one did.
    pub last_error: Option<String>,
    /// Per type URL.
    pub types: BTreeMap<String, TypeStatus>,
    /// Responses received.
    pub pushes: u64,
    /// Responses ACKed.
    pub acks: u64,
    /// Responses NACKed.
    pub nacks: u64,
    /// Streams re-opened after one ended.
    pub reconnects: u64,
}

/// Label of the per-type counters: the resource type (`istio.workload.Address`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabel {
    /// The type URL without `type.googleapis.com/`.
    pub resource_type: String,
}

impl TypeLabel {
    fn of(type_url: &str) -> Self {
        Self {
            resource_type: short_type(type_url).to_owned(),
        }
    }
}

/// `type.googleapis.com/istio.workload.Address` → `istio.workload.Address`.
pub fn short_type(type_url: &str) -> &str {
    type_url.rsplit('/').next().unwrap_or(type_url)
}

/// The stream's Prometheus counters. A handle: clones count into the same counters.
#[derive(Debug, Clone, Default)]
pub struct XdsMetrics {
    /// `ambit_xds_pushes_total{resource_type}`: responses received.
    pub pushes: Family<TypeLabel, Counter>,
    /// `ambit_xds_acks_total{resource_type}`: responses ACKed.
    pub acks: Family<TypeLabel, Counter>,
    /// `ambit_xds_nacks_total{resource_type}`: responses NACKed.
    pub nacks: Family<TypeLabel, Counter>,
    /// `ambit_xds_reconnects_total`: streams re-opened after one ended.
    pub reconnects: Counter,
}

impl XdsMetrics {
    /// Registers the counters as `ambit_xds_*` (the registry adds `_total`).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "ambit_xds_pushes",
            "xDS responses received from istiod, per resource type",
            self.pushes.clone(),
        );
        registry.register(
            "ambit_xds_acks",
            "xDS responses ACKed, per resource type",
            self.acks.clone(),
        );
        registry.register(
            "ambit_xds_nacks",
            "xDS responses NACKed (a resource could not be used), per resource type",
            self.nacks.clone(),
        );
        registry.register(
            "ambit_xds_reconnects",
            "xDS streams to istiod re-opened after one ended",
            self.reconnects.clone(),
        );
    }
}

/// The status and counters, shared by the stream's task and the readers.
#[derive(Debug, Clone, Default)]
pub struct StatusHandle {
    status: Arc<Mutex<XdsStatus>>,
    metrics: XdsMetrics,
}

/// One response's outcome, as the status records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handled<'a> {
    /// The response's type URL.
    pub type_url: &'a str,
    /// Its `system_version_info`.
    pub version: &'a str,
    /// Its nonce.
    pub nonce: &'a str,
    /// The NACK's error text; none for an ACK.
    pub nack: Option<&'a str>,
    /// Resources of that type held afterwards.
    pub resources: usize,
    /// Whether the type has synced on this stream.
    pub synced: bool,
}

impl StatusHandle {
    /// A status for a stream to `address`, counting into `metrics`.
    pub fn new(address: &str, metrics: XdsMetrics) -> Self {
        let status = XdsStatus {
            address: address.to_owned(),
            ..XdsStatus::default()
        };
        Self {
            status: Arc::new(Mutex::new(status)),
            metrics,
        }
    }

    /// The counters.
    pub fn metrics(&self) -> &XdsMetrics {
        &self.metrics
    }

    /// A copy of the current status.
    pub fn snapshot(&self) -> XdsStatus {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, XdsStatus> {
        // A poisoned lock only means a holder panicked between plain assignments.
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Lists `type_url` (with no resources yet) so that `/status` shows every subscribed type.
    pub(crate) fn subscribed(&self, type_url: &str) {
        self.lock().types.entry(type_url.to_owned()).or_default();
    }

    /// A stream is being opened; no type has synced on it yet.
    pub(crate) fn connecting(&self) {
        let mut s = self.lock();
        s.state = StreamState::Connecting;
        for t in s.types.values_mut() {
            t.synced = false;
        }
    }

    /// The stream is open.
    pub(crate) fn connected(&self) {
        self.lock().state = StreamState::Connected;
    }

    /// The stream ended with `error`; a new one follows after a pause.
    pub(crate) fn ended(&self, error: String) {
        let mut s = self.lock();
        s.state = StreamState::Backoff;
        s.last_error = Some(error);
        s.reconnects += 1;
        self.metrics.reconnects.inc();
    }

    /// Records a response and its ACK or NACK.
    pub(crate) fn handled(&self, h: &Handled<'_>) {
        let label = TypeLabel::of(h.type_url);
        self.metrics.pushes.get_or_create(&label).inc();
        let mut s = self.lock();
        s.pushes += 1;
        let entry = s.types.entry(h.type_url.to_owned()).or_default();
        entry.resources = h.resources;
        entry.synced = h.synced;
        match h.nack {
            None => {
                entry.last_ack_version = Some(h.version.to_owned());
                entry.last_ack_nonce = Some(h.nonce.to_owned());
                entry.last_nack = None;
                s.acks += 1;
                self.metrics.acks.get_or_create(&label).inc();
            }
            Some(error) => {
                entry.last_nack = Some(error.to_owned());
                s.nacks += 1;
                self.metrics.nacks.get_or_create(&label).inc();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_and_nacks_count_per_type_and_keep_the_last_acked_version() {
        let status = StatusHandle::new("istiod:15012", XdsMetrics::default());
        let t = "type.googleapis.com/istio.workload.Address";
        let mut h = Handled {
            type_url: t,
            version: "v1",
            nonce: "n1",
            nack: None,
            resources: 3,
            synced: true,
        };
        status.handled(&h);
        h.version = "v2";
        h.nonce = "n2";
        h.nack = Some("w1: bad");
        status.handled(&h);
        let s = status.snapshot();
        assert_eq!((s.pushes, s.acks, s.nacks), (2, 1, 1));
        let ts = &s.types[t];
        assert_eq!(ts.last_ack_version.as_deref(), Some("v1"));
        assert_eq!(ts.last_ack_nonce.as_deref(), Some("n1"));
        assert_eq!(ts.last_nack.as_deref(), Some("w1: bad"));
        let label = TypeLabel::of(t);
        assert_eq!(label.resource_type, "istio.workload.Address");
        assert_eq!(status.metrics().nacks.get_or_create(&label).get(), 1);
        status.ended("gone".into());
        status.connecting();
        let s = status.snapshot();
        assert_eq!((s.state, s.reconnects), (StreamState::Connecting, 1));
        assert!(!s.types[t].synced);
    }
}
