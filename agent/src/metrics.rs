//! The data path's Prometheus counters and their labels: Istio's TCP metrics with Istio's
//! labels, policy denials and connection-cap refusals. The admin module registers and serves
//! them; the proxy and the tunnel only count.
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::reason::Reason;

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
    /// `-`, or `DENY` (policy), `UF` (upstream failure), `NR` (no route), `UO` (a cap): see
    /// [`crate::reason::Reason::response_flags`].
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

/// `ambit_tunnel_rejections_total`: refusals on the tunnel port by reason. A handle: clones
/// count into the same family (the agent's, registered by admin; a test's own).
#[derive(Debug, Clone, Default)]
pub struct Rejections(Family<ReasonLabel, Counter>);

impl Rejections {
    /// Counts one refusal for `reason`.
    pub fn count(&self, reason: Reason) {
        self.count_n(reason, 1);
    }

    /// Counts `n` refusals for `reason`.
    pub fn count_n(&self, reason: Reason, n: u64) {
        self.0
            .get_or_create(&ReasonLabel {
                reason: reason.label(),
            })
            .inc_by(n);
    }

    /// The current count for `reason`.
    pub fn value(&self, reason: Reason) -> u64 {
        self.0
            .get_or_create(&ReasonLabel {
                reason: reason.label(),
            })
            .get()
    }

    /// The family, for the registry.
    pub fn family(&self) -> Family<ReasonLabel, Counter> {
        self.0.clone()
    }
}

/// Failures to install or remove a pod's delivery routing, by operation; registered by the admin
/// metrics registry as `ambit_delivery_routing_failures_total`. A handle: clones count into the
/// same family.
#[derive(Debug, Clone, Default)]
pub struct RoutingFailures(Family<OpLabel, Counter>);

impl RoutingFailures {
    /// Counts one failed `op`.
    pub fn count(&self, op: &'static str) {
        self.0.get_or_create(&OpLabel { op }).inc();
    }

    /// How many `op`s failed so far.
    pub fn value(&self, op: &'static str) -> u64 {
        self.0.get_or_create(&OpLabel { op }).get()
    }

    /// The family, for the registry.
    pub fn family(&self) -> Family<OpLabel, Counter> {
        self.0.clone()
    }
}

/// Label of [`RoutingFailures`].
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabel {
    /// `install` or `remove`.
    pub op: &'static str,
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
    /// `ambit_tunnel_rejections_total`.
    pub rejections: Rejections,
    /// `ambit_delivery_routing_failures_total`.
    pub routing_failures: RoutingFailures,
}

impl ProxyMetrics {
    /// Counts a connection refused before it was carried (opened and closed at once).
    pub fn refused(&self, labels: &TcpLabels) {
        self.opened.get_or_create(labels).inc();
        self.closed.get_or_create(labels).inc();
    }
}
