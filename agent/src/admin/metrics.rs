//! Prometheus metrics: Istio's TCP metrics with Istio's labels, plus `ambit_*` kernel, certificate and policy figures.
use std::fmt::Write as _;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::inventory::publish::ReloadStats;
use crate::proxy::manager::Manager;
use crate::redirect::Datapath;

/// Istio's standard labels of the TCP metrics. Every value comes from a bounded set (workloads,
/// namespaces and identities in the inventory; fixed flags), so cardinality stays bounded.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    /// `source` (outbound side) or `destination` (inbound side).
    pub reporter: &'static str,
    /// Source workload name (`app` label, else pod name), or `unknown`.
    pub source_workload: String,
    /// Source namespace, or `unknown`.
    pub source_workload_namespace: String,
    /// Source SPIFFE ID, or `unknown` (plaintext).
    pub source_principal: String,
    /// Destination workload name, or `unknown`.
    pub destination_workload: String,
    /// Destination namespace, or `unknown`.
    pub destination_workload_namespace: String,
    /// Destination SPIFFE ID, or `unknown`.
    pub destination_principal: String,
    /// Destination Service (`name.namespace.svc.cluster.local`), or `unknown`.
    pub destination_service: String,
    /// `mutual_tls` or `none`.
    pub connection_security_policy: &'static str,
    /// `-`, or `DENY` (policy), `UF` (upstream failure), `NR` (no route).
    pub response_flags: &'static str,
}

/// Policy denial reasons (`ambit_policy_denials_total`) and tunnel rejection reasons
/// (`ambit_tunnel_rejections_total`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// `strict_plaintext`, `authorization`, `destination_rule`, ...
    pub reason: &'static str,
}

/// Connections refused by a connection cap, per pod and listener.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    /// `namespace/name` of the pod (bounded by the enrolled pods).
    pub pod: String,
    /// `outbound` (15001) or `inbound_plaintext` (15006).
    pub listener: &'static str,
    /// `pod_connection_limit`.
    pub reason: &'static str,
}

/// Counters the data plane updates.
#[derive(Debug, Default)]
pub struct ProxyMetrics {
    /// `istio_tcp_connections_opened_total`.
    pub opened: Family<TcpLabels, Counter>,
    /// `istio_tcp_connections_closed_total`.
    pub closed: Family<TcpLabels, Counter>,
    /// `istio_tcp_sent_bytes_total` (source to destination).
    pub sent_bytes: Family<TcpLabels, Counter>,
    /// `istio_tcp_received_bytes_total` (destination to source).
    pub received_bytes: Family<TcpLabels, Counter>,
    /// `ambit_policy_denials_total`.
    pub denials: Family<ReasonLabel, Counter>,
    /// `ambit_connection_limit_refusals_total`.
    pub limit_refusals: Family<LimitLabels, Counter>,
}

impl ProxyMetrics {
    /// Counts a connection refused before it was carried (opened and closed at once).
    pub fn refused(&self, labels: &TcpLabels) {
        self.opened.get_or_create(labels).inc();
        self.closed.get_or_create(labels).inc();
    }
}

/// Builds the registry: the proxy counters plus collectors that read the kernel counters, the
/// certificate states and the inventory's reload counters at scrape time.
pub fn registry(
    proxy: Arc<ProxyMetrics>,
    datapath: Arc<Datapath>,
    manager: Arc<Manager>,
    reloads: Arc<ReloadStats>,
) -> Registry {
    let mut r = Registry::default();
    r.register(
        "istio_tcp_connections_opened",
        "TCP connections opened",
        proxy.opened.clone(),
    );
    r.register(
        "istio_tcp_connections_closed",
        "TCP connections closed",
        proxy.closed.clone(),
    );
    r.register(
        "istio_tcp_sent_bytes",
        "Bytes sent from source to destination",
        proxy.sent_bytes.clone(),
    );
    r.register(
        "istio_tcp_received_bytes",
        "Bytes sent from destination to source",
        proxy.received_bytes.clone(),
    );
    r.register(
        "ambit_policy_denials",
        "Connections refused or closed by policy, by reason",
        proxy.denials.clone(),
    );
    r.register(
        "ambit_connection_limit_refusals",
        "Connections reset at once because the pod held its cap of connections on the listener",
        proxy.limit_refusals.clone(),
    );
    r.register(
        "ambit_tunnel_rejections",
        "Connections and streams refused on the tunnel port (15008), by reason",
        crate::tunnel::reject::REJECTIONS.clone(),
    );
    r.register(
        "ambit_delivery_routing_failures",
        "Failures to install (the pod is not enrolled) or remove a pod's delivery routing",
        crate::proxy::delivery_route::FAILURES.clone(),
    );
    r.register_collector(Box::new(Runtime { datapath, manager }));
    r.register_collector(Box::new(Inventory(reloads)));
    r
}

/// Renders the registry in the Prometheus text format.
pub fn render(r: &Registry) -> String {
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, r).is_err() {
        let _ = writeln!(out, "# encoding failed");
    }
    out
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CounterLabel {
    counter: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IdentityLabel {
    identity: String,
}

/// Reads kernel counters and certificate states on each scrape.
struct Runtime {
    datapath: Arc<Datapath>,
    manager: Arc<Manager>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Runtime")
    }
}

impl Collector for Runtime {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats = self.datapath.stats();
        {
            let mut e = encoder.encode_descriptor(
                "ambit_datapath",
                "Kernel program counters by hook and outcome (captures, exemptions, lookups, map full)",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (name, v) in stats {
                let label = CounterLabel { counter: name };
                ConstCounter::new(v).encode(e.encode_family(&label)?)?;
            }
        }
        {
            let e = encoder.encode_descriptor(
                "ambit_admin_refused_peers",
                "Admin socket connections refused because the peer was not root",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            let refused = super::server::REFUSED_PEERS.load(std::sync::atomic::Ordering::Relaxed);
            ConstCounter::new(refused).encode(e)?;
        }
        {
            let e = encoder.encode_descriptor(
                "ambit_admin_refused_over_limit",
                "Admin socket and metrics connections closed at once because limits.maxAdminConnections were open",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            let refused =
                super::server::REFUSED_OVER_LIMIT.load(std::sync::atomic::Ordering::Relaxed);
            ConstCounter::new(refused).encode(e)?;
        }
        let certs = self.manager.certs();
        {
            let mut e = encoder.encode_descriptor(
                "ambit_certificate_expiry_timestamp_seconds",
                "When each local identity's certificate expires (unix seconds)",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for c in &certs {
                if let Some(t) = c.not_after_unix {
                    let label = IdentityLabel {
                        identity: c.identity.clone(),
                    };
                    ConstGauge::new(t).encode(e.encode_family(&label)?)?;
                }
            }
        }
        for (name, help, get) in [
            (
                "ambit_certificate_renewals",
                "Certificates obtained per identity",
                (|c: &crate::identity::manager::CertStatus| c.renewals) as fn(&_) -> u64,
            ),
            (
                "ambit_certificate_failures",
                "Failed CA requests per identity",
                |c| c.failures.into(),
            ),
            (
                "ambit_certificate_rejected",
                "CA answers refused per identity (another identity, invalid chain, untrusted roots)",
                |c| c.rejected,
            ),
            (
                "ambit_certificate_refused_connections",
                "Connections refused because the identity had no valid certificate",
                |c| c.refused,
            ),
        ] {
            let mut e = encoder.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for c in &certs {
                let label = IdentityLabel {
                    identity: c.identity.clone(),
                };
                ConstCounter::new(get(c)).encode(e.encode_family(&label)?)?;
            }
        }
        Ok(())
    }
}

/// Reads the inventory's reload counters on each scrape.
#[derive(Debug)]
struct Inventory(Arc<ReloadStats>);

impl Collector for Inventory {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use prometheus_client::metrics::MetricType;
        use std::sync::atomic::Ordering::Relaxed;
        let r = &self.0;
        for (name, help, kind, value) in [
            (
                "ambit_inventory_loads",
                "Inventory reloads applied",
                MetricType::Counter,
                r.loads.load(Relaxed),
            ),
            (
                "ambit_inventory_errors",
                "Inventory reloads rejected (unreadable or invalid); the last good inventory stayed",
                MetricType::Counter,
                r.errors.load(Relaxed),
            ),
            (
                "ambit_inventory_held_reloads",
                "Inventory reloads held back because they emptied the inventory or unenrolled more than inventoryGuard.maxUnenrollPercent of the node's pods",
                MetricType::Counter,
                r.holds.load(Relaxed),
            ),
            (
                "ambit_inventory_confirmed_reloads",
                "Held inventory reloads applied after their content stayed for inventoryGuard.settleMs",
                MetricType::Counter,
                r.confirmed.load(Relaxed),
            ),
            (
                "ambit_inventory_held",
                "1 while an inventory reload is held back (the last good inventory is in force)",
                MetricType::Gauge,
                u64::from(r.held().is_some()),
            ),
            (
                "ambit_inventory_ambiguous_addresses",
                "Addresses several pods claim with no rule deciding the owner; connections to them are refused",
                MetricType::Gauge,
                r.ambiguous_addresses.load(Relaxed),
            ),
            (
                "ambit_inventory_failed_closed_policies",
                "AuthorizationPolicies in force that cannot be compiled: an ALLOW never matches, a DENY matches every connection it selects",
                MetricType::Gauge,
                r.failed_closed_policies.load(Relaxed),
            ),
        ] {
            let e = encoder.encode_descriptor(name, help, None, kind)?;
            match kind {
                MetricType::Counter => ConstCounter::new(value).encode(e)?,
                _ => ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX)).encode(e)?,
            }
        }
        Ok(())
    }
}
