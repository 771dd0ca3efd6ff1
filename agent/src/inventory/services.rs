//! Services and their endpoints: v1 Service and discovery.k8s.io/v1 EndpointSlice shapes, and the resolved model.
use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::Deserialize;

use super::objects::ObjectMeta;

/// Label on an EndpointSlice naming its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// v1 Service (the fields ambit uses).
#[derive(Debug, Clone, Deserialize)]
pub struct ServiceObject {
    /// Metadata.
    pub metadata: ObjectMeta,
    /// Spec.
    #[serde(default)]
    pub spec: ServiceSpec,
}

/// `spec` of a Service.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    /// Primary cluster IP (`None` is written as the string "None" for headless services).
    #[serde(default, rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    /// All cluster IPs (dual stack).
    #[serde(default, rename = "clusterIPs")]
    pub cluster_ips: Vec<String>,
    /// Ports.
    #[serde(default)]
    pub ports: Vec<ServicePortSpec>,
}

/// One `spec.ports` entry.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePortSpec {
    /// Port name (matches the EndpointSlice port name).
    #[serde(default)]
    pub name: String,
    /// Service port.
    pub port: u16,
    /// Target port: a number or a container port name.
    #[serde(default)]
    pub target_port: Option<serde_json::Value>,
    /// Protocol (TCP unless set).
    #[serde(default)]
    pub protocol: Option<String>,
}

/// discovery.k8s.io/v1 EndpointSlice (the fields ambit uses).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSliceObject {
    /// Metadata (the service name label).
    pub metadata: ObjectMeta,
    /// `IPv4`, `IPv6` or `FQDN`.
    #[serde(default)]
    pub address_type: String,
    /// Endpoints.
    #[serde(default)]
    pub endpoints: Vec<EndpointSpec>,
    /// Ports.
    #[serde(default)]
    pub ports: Vec<EndpointPortSpec>,
}

/// One endpoint of a slice.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct EndpointSpec {
    /// Addresses.
    #[serde(default)]
    pub addresses: Vec<String>,
    /// Conditions.
    #[serde(default)]
    pub conditions: EndpointConditions,
}

/// Endpoint conditions.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct EndpointConditions {
    /// Ready (absent means ready, as Kubernetes says).
    #[serde(default)]
    pub ready: Option<bool>,
}

/// One port of a slice.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct EndpointPortSpec {
    /// Name (matches the Service port name).
    #[serde(default)]
    pub name: Option<String>,
    /// Port number on the endpoints.
    pub port: Option<u16>,
}

/// A Service as the agent uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    /// Name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Labels (`istio.io/use-waypoint`).
    pub labels: BTreeMap<String, String>,
    /// Virtual IPs.
    pub vips: Vec<IpAddr>,
    /// Ports: service port -> (port name, numeric target port when known).
    pub ports: BTreeMap<u16, ServicePort>,
    /// Endpoints with their readiness.
    pub endpoints: Vec<Endpoint>,
}

/// A service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    /// Name.
    pub name: String,
    /// Numeric target port from the Service, if it is a number.
    pub target_port: Option<u16>,
}

/// One endpoint address with its ports by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Address.
    pub ip: IpAddr,
    /// Ready to serve.
    pub ready: bool,
    /// Port name -> endpoint port.
    pub ports: BTreeMap<String, u16>,
}

impl Service {
    /// `name.namespace.svc.<domain>`.
    pub fn fqdn(&self, cluster_domain: &str) -> String {
        format!("{}.{}.svc.{cluster_domain}", self.name, self.namespace)
    }

    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The port on `endpoint` that service port `port` forwards to.
    pub fn target_port(&self, port: u16, endpoint: &Endpoint) -> Option<u16> {
        let sp = self.ports.get(&port)?;
        endpoint.ports.get(&sp.name).copied().or(sp.target_port)
    }
}

/// Builds the Service model from its object and slices; returns (field, message) on bad values.
pub fn service(
    obj: &ServiceObject,
    slices: &[&EndpointSliceObject],
) -> Result<Service, (String, String)> {
    let mut vips = Vec::new();
    let raw = obj
        .spec
        .cluster_ips
        .iter()
        .chain(obj.spec.cluster_ip.iter());
    for (i, ip) in raw.enumerate() {
        if ip.is_empty() || ip == "None" {
            continue;
        }
        let ip: IpAddr = ip.parse().map_err(|_| {
            (
                format!("spec.clusterIPs[{i}]"),
                format!("`{ip}` is not an IP address"),
            )
        })?;
        if !vips.contains(&ip) {
            vips.push(ip);
        }
    }
    let mut ports = BTreeMap::new();
    for p in &obj.spec.ports {
        if p.protocol.as_deref().is_some_and(|proto| proto != "TCP") {
            continue;
        }
        let target_port = match &p.target_port {
            None => Some(p.port),
            Some(serde_json::Value::Number(n)) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
            Some(_) => None, // a named port: resolved per endpoint from the slices
        };
        ports.insert(
            p.port,
            ServicePort {
                name: p.name.clone(),
                target_port,
            },
        );
    }
    let mut endpoints = Vec::new();
    for slice in slices {
        let slice_ports: BTreeMap<String, u16> = slice
            .ports
            .iter()
            .filter_map(|p| Some((p.name.clone().unwrap_or_default(), p.port?)))
            .collect();
        for e in &slice.endpoints {
            for a in &e.addresses {
                let ip: IpAddr = a.parse().map_err(|_| {
                    (
                        "endpoints[].addresses".to_string(),
                        format!(
                            "EndpointSlice {}: `{a}` is not an IP address",
                            slice.metadata.name
                        ),
                    )
                })?;
                endpoints.push(Endpoint {
                    ip,
                    ready: e.conditions.ready.unwrap_or(true),
                    ports: slice_ports.clone(),
                });
            }
        }
    }
    let namespace = if obj.metadata.namespace.is_empty() {
        "default".into()
    } else {
        obj.metadata.namespace.clone()
    };
    Ok(Service {
        name: obj.metadata.name.clone(),
        namespace,
        labels: obj.metadata.labels.clone(),
        vips,
        ports,
        endpoints,
    })
}
