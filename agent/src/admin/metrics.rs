//! The Prometheus registry the admin socket and `metricsListen` serve: the data path's counters
//! ([`crate::metrics`]) plus collectors of kernel, certificate, admin and inventory figures.
use std::fmt::Write as _;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::identity::manager::CertManager;
use crate::inventory::kube::annotate::PatchCounter;
use crate::inventory::publish::ReloadStats;
use crate::metrics::ProxyMetrics;
use crate::redirect::Datapath;

/// Builds the registry: the proxy counters plus collectors that read the kernel counters, the
/// certificate states and the inventory's reload counters at scrape time, and the redirection
/// annotation's patch counter.
pub fn registry(
    proxy: Arc<ProxyMetrics>,
    datapath: Arc<Datapath>,
    certs: Option<Arc<CertManager>>,
    reloads: Arc<ReloadStats>,
    annotation_patches: PatchCounter,
    trust_reloads: crate::identity::trust::Reloads,
    admin_refusals: &super::server::Refusals,
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
        proxy.rejections.family(),
    );
    r.register(
        "ambit_delivery_routing_failures",
        "Failures to install (the pod is not enrolled) or remove a pod's delivery routing",
        proxy.routing_failures.family(),
    );
    r.register(
        "ambit_trust_reloads",
        "Reloads of the CA root file (ca.rootCert) by outcome; rejected and unreadable keep the last good roots",
        trust_reloads.family(),
    );
    r.register(
        "ambit_redirection_annotation_patches",
        "Patches of this node's pods' ambient.istio.io/redirection annotation, by op (set, remove) and result (ok, error; errors are retried)",
        annotation_patches,
    );
    r.register(
        "ambit_admin_refused_peers",
        "Admin socket connections refused because the peer was not root",
        admin_refusals.peers.clone(),
    );
    r.register(
        "ambit_admin_refused_over_limit",
        "Admin socket and metrics connections closed at once because limits.maxAdminConnections were open",
        admin_refusals.over_limit.clone(),
    );
    r.register_collector(Box::new(Runtime { datapath, certs }));
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
    /// The certificate manager (`None` without a CA).
    certs: Option<Arc<CertManager>>,
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
        let certs = self
            .certs
            .as_ref()
            .map(|c| c.snapshot())
            .unwrap_or_default();
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
