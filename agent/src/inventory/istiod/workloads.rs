//! istiod's `Address` resources (a Workload or a Service) decoded and checked into what ambit's inventory model can hold, or refused with the field at fault.
//!
//! What ambit cannot express is refused, never approximated: a workload known only by
//! hostname (DNS), one behind an east-west network gateway, one of another trust domain, a
//! waypoint on another HBONE port, an application tunnel (PROXY), a Service VIP that is a
//! range or visible to one namespace only. The resource is then NACKed and the previous
//! version, if any, stays in use.
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ambit_proto::istio::workload as xds;

use super::model::ModelError;

/// The HBONE port every Istio dataplane listens on; a waypoint on another cannot be reached.
pub const HBONE_PORT: u32 = 15008;

/// How a workload is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tunnel {
    /// Plaintext: no node proxy captures it.
    None,
    /// HBONE: a mesh destination.
    Hbone,
    /// Istio's sidecar mTLS: a pod with a sidecar.
    LegacyIstioMtls,
}

/// The waypoint a Workload or Service names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Waypoint {
    /// The waypoint Service, by `namespace/hostname`.
    Hostname {
        /// Namespace of the waypoint's Service.
        namespace: String,
        /// Its hostname.
        hostname: String,
    },
    /// The waypoint by address (a Service VIP).
    Address(IpAddr),
}

/// A Workload resource, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadEntry {
    /// `uid`, the resource name.
    pub uid: String,
    /// Name (the pod's); may be empty.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Service account (`default` when istiod elided it).
    pub service_account: String,
    /// Node.
    pub node: String,
    /// Addresses.
    pub ips: Vec<IpAddr>,
    /// Tunnel protocol.
    pub tunnel: Tunnel,
    /// It terminates HBONE itself (a waypoint or gateway): never captured.
    pub native_tunnel: bool,
    /// It shares its node's network namespace.
    pub host_network: bool,
    /// Ready to serve.
    pub healthy: bool,
    /// Its waypoint.
    pub waypoint: Option<Waypoint>,
    /// Services it is an endpoint of (`namespace/hostname`) → service port → target port
    /// (`None`: the Service's own).
    pub services: BTreeMap<String, BTreeMap<u16, Option<u16>>>,
    /// Selector-scoped authorization policies selecting it (`namespace/name`).
    pub policies: Vec<String>,
}

/// A Service resource, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceEntry {
    /// Name; may be empty (then the hostname names it).
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Hostname.
    pub hostname: String,
    /// Virtual IPs.
    pub vips: Vec<IpAddr>,
    /// Service port → target port (`None`: per workload).
    pub ports: BTreeMap<u16, Option<u16>>,
    /// Its waypoint.
    pub waypoint: Option<Waypoint>,
    /// Problems that did not refuse it (load balancing ambit does not do).
    pub warnings: Vec<String>,
}

/// A checked `Address`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resource {
    /// A Workload.
    Workload(WorkloadEntry),
    /// A Service.
    Service(ServiceEntry),
}

/// What the checks below (and those of [`super::authorization`]) report on one resource:
/// `(field, problem)`; `unsupported` says whether the value is valid but beyond ambit's model.
pub(super) struct Fault {
    field: String,
    problem: String,
    unsupported: bool,
}

/// A value the API does not allow in `field`.
pub(super) fn invalid(field: impl Into<String>, problem: impl Into<String>) -> Fault {
    Fault {
        field: field.into(),
        problem: problem.into(),
        unsupported: false,
    }
}

/// A valid value in `field` that ambit's model cannot express.
pub(super) fn unsupported(field: impl Into<String>, problem: impl Into<String>) -> Fault {
    Fault {
        field: field.into(),
        problem: problem.into(),
        unsupported: true,
    }
}

impl Fault {
    /// The error refusing the `kind` resource `name` for this fault.
    pub(super) fn into_error(self, kind: &'static str, name: &str) -> ModelError {
        if self.unsupported {
            ModelError::unsupported(kind, name, self.field, self.problem)
        } else {
            ModelError::invalid(kind, name, self.field, self.problem)
        }
    }
}

/// Checks the `Address` resource `name` (already decoded) against ambit's model, in a mesh of
/// `trust_domain` whose root namespace is `root_namespace`.
pub fn check(
    name: &str,
    a: &xds::Address,
    trust_domain: &str,
    root_namespace: &str,
) -> Result<Resource, ModelError> {
    match &a.r#type {
        Some(xds::address::Type::Workload(w)) => workload(name, w, trust_domain, root_namespace)
            .map(Resource::Workload)
            .map_err(|f| f.into_error("Workload", name)),
        Some(xds::address::Type::Service(s)) => service(name, s)
            .map(Resource::Service)
            .map_err(|f| f.into_error("Service", name)),
        None => Err(ModelError::invalid(
            "Address",
            name,
            "type",
            "neither a workload nor a service",
        )),
    }
}

fn workload(
    name: &str,
    w: &xds::Workload,
    trust_domain: &str,
    root_namespace: &str,
) -> Result<WorkloadEntry, Fault> {
    if w.uid.is_empty() {
        return Err(invalid("uid", "is empty"));
    }
    if w.uid != name {
        return Err(invalid(
            "uid",
            format!(
                "`{}` is not the resource name (istiod names a workload by its uid)",
                w.uid
            ),
        ));
    }
    if w.namespace.is_empty() {
        return Err(invalid(
            "namespace",
            "is empty: the workload has no identity",
        ));
    }
    if !w.trust_domain.is_empty() && w.trust_domain != trust_domain {
        return Err(unsupported(
            "trust_domain",
            format!("`{}` is not the mesh's ({trust_domain})", w.trust_domain),
        ));
    }
    let ips = w
        .addresses
        .iter()
        .enumerate()
        .map(|(i, b)| ip(b).ok_or_else(|| invalid(format!("addresses[{i}]"), bad_ip(b))))
        .collect::<Result<Vec<_>, _>>()?;
    // A pod whose address istiod does not know yet comes without one (its addresses then
    // come from the CNI plugin's report, on this node); one reached by DNS name is refused.
    if ips.is_empty() && !w.hostname.is_empty() {
        return Err(unsupported(
            "hostname",
            format!(
                "`{}`: a workload reached by DNS name, without addresses",
                w.hostname
            ),
        ));
    }
    if w.network_gateway.is_some() {
        return Err(unsupported(
            "network_gateway",
            "a workload reached through an east-west network gateway",
        ));
    }
    if let Some(t) = &w.application_tunnel {
        match xds::application_tunnel::Protocol::try_from(t.protocol) {
            Ok(xds::application_tunnel::Protocol::None) => {}
            Ok(xds::application_tunnel::Protocol::Proxy) => {
                return Err(unsupported(
                    "application_tunnel.protocol",
                    "PROXY (a sandwiched proxy taking PROXY protocol)",
                ))
            }
            Err(_) => return Err(unknown_enum("application_tunnel.protocol", t.protocol)),
        }
    }
    let tunnel = match xds::TunnelProtocol::try_from(w.tunnel_protocol) {
        Ok(xds::TunnelProtocol::None) => Tunnel::None,
        Ok(xds::TunnelProtocol::Hbone) => Tunnel::Hbone,
        Ok(xds::TunnelProtocol::LegacyIstioMtls) => Tunnel::LegacyIstioMtls,
        Err(_) => return Err(unknown_enum("tunnel_protocol", w.tunnel_protocol)),
    };
    let host_network = match xds::NetworkMode::try_from(w.network_mode) {
        Ok(xds::NetworkMode::Standard) => false,
        Ok(xds::NetworkMode::HostNetwork) => true,
        Err(_) => return Err(unknown_enum("network_mode", w.network_mode)),
    };
    let healthy = match xds::WorkloadStatus::try_from(w.status) {
        Ok(xds::WorkloadStatus::Healthy) => true,
        Ok(xds::WorkloadStatus::Unhealthy) => false,
        Err(_) => return Err(unknown_enum("status", w.status)),
    };
    let waypoint = w
        .waypoint
        .as_ref()
        .map(|g| waypoint(g, "waypoint"))
        .transpose()?;
    let mut services = BTreeMap::new();
    for (key, list) in &w.services {
        let field = format!("services[{key}]");
        namespaced(key).ok_or_else(|| invalid(&field, "is not `namespace/hostname`"))?;
        let mut ports = BTreeMap::new();
        for (i, p) in list.ports.iter().enumerate() {
            let (svc, target) = port(p).map_err(|m| invalid(format!("{field}.ports[{i}]"), m))?;
            ports.insert(svc, target);
        }
        services.insert(key.clone(), ports);
    }
    for (i, p) in w.authorization_policies.iter().enumerate() {
        let field = format!("authorization_policies[{i}]");
        let (ns, _) = namespaced(p)
            .ok_or_else(|| invalid(&field, format!("`{p}` is not `namespace/name`")))?;
        // ambit applies a selector policy to the workloads of its own namespace, or of every
        // namespace from the root namespace; istiod selects no others.
        if ns != w.namespace && ns != root_namespace {
            return Err(unsupported(
                field,
                format!(
                    "`{p}`: a policy of namespace {ns} selecting a workload of {} (the root \
                     namespace is {root_namespace})",
                    w.namespace
                ),
            ));
        }
    }
    Ok(WorkloadEntry {
        uid: w.uid.clone(),
        name: w.name.clone(),
        namespace: w.namespace.clone(),
        service_account: if w.service_account.is_empty() {
            "default".into()
        } else {
            w.service_account.clone()
        },
        node: w.node.clone(),
        ips,
        tunnel,
        native_tunnel: w.native_tunnel,
        host_network,
        healthy,
        waypoint,
        services,
        policies: w.authorization_policies.clone(),
    })
}

fn service(name: &str, s: &xds::Service) -> Result<ServiceEntry, Fault> {
    if s.namespace.is_empty() {
        return Err(invalid("namespace", "is empty"));
    }
    if s.hostname.is_empty() {
        return Err(invalid("hostname", "is empty"));
    }
    let key = format!("{}/{}", s.namespace, s.hostname);
    if key != name {
        return Err(invalid(
            "hostname",
            format!(
                "`{key}` is not the resource name (istiod names a service `namespace/hostname`)"
            ),
        ));
    }
    if xds::service::Visibility::try_from(s.visibility) != Ok(xds::service::Visibility::Public) {
        return Err(match xds::service::Visibility::try_from(s.visibility) {
            Ok(_) => unsupported(
                "visibility",
                "NAMESPACE: visible to one namespace's clients only",
            ),
            Err(_) => unknown_enum("visibility", s.visibility),
        });
    }
    let mut vips = Vec::new();
    for (i, a) in s.addresses.iter().enumerate() {
        let field = format!("addresses[{i}]");
        let vip = ip(&a.address).ok_or_else(|| invalid(&field, bad_ip(&a.address)))?;
        let full = if vip.is_ipv4() { 32 } else { 128 };
        if let Some(len) = a.length.filter(|l| *l != full) {
            return Err(unsupported(
                format!("{field}.length"),
                format!("/{len}: a virtual IP range, not one address"),
            ));
        }
        if !vips.contains(&vip) {
            vips.push(vip);
        }
    }
    let mut ports = BTreeMap::new();
    for (i, p) in s.ports.iter().enumerate() {
        let (svc, target) = port(p).map_err(|m| invalid(format!("ports[{i}]"), m))?;
        ports.insert(svc, target);
    }
    let waypoint = s
        .waypoint
        .as_ref()
        .map(|g| waypoint(g, "waypoint"))
        .transpose()?;
    let mut warnings = Vec::new();
    if let Some(lb) = &s.load_balancing {
        let mode = xds::load_balancing::Mode::try_from(lb.mode)
            .map_err(|_| unknown_enum("load_balancing.mode", lb.mode))?;
        if mode != xds::load_balancing::Mode::UnspecifiedMode {
            warnings.push(format!(
                "Service {name}: load_balancing mode {} is not applied: ambit balances over \
                 every ready endpoint",
                mode.as_str_name()
            ));
        }
    }
    Ok(ServiceEntry {
        name: s.name.clone(),
        namespace: s.namespace.clone(),
        hostname: s.hostname.clone(),
        vips,
        ports,
        waypoint,
        warnings,
    })
}

fn waypoint(g: &xds::GatewayAddress, at: &str) -> Result<Waypoint, Fault> {
    if g.hbone_mtls_port != 0 && g.hbone_mtls_port != HBONE_PORT {
        return Err(unsupported(
            format!("{at}.hbone_mtls_port"),
            format!(
                "{}: ambit tunnels to waypoints on {HBONE_PORT}",
                g.hbone_mtls_port
            ),
        ));
    }
    match &g.destination {
        Some(xds::gateway_address::Destination::Hostname(h)) => {
            if h.namespace.is_empty() || h.hostname.is_empty() {
                return Err(invalid(
                    format!("{at}.hostname"),
                    "namespace or hostname is empty",
                ));
            }
            Ok(Waypoint::Hostname {
                namespace: h.namespace.clone(),
                hostname: h.hostname.clone(),
            })
        }
        Some(xds::gateway_address::Destination::Address(a)) => ip(&a.address)
            .map(Waypoint::Address)
            .ok_or_else(|| invalid(format!("{at}.address"), bad_ip(&a.address))),
        None => Err(invalid(at, "names neither a hostname nor an address")),
    }
}

/// A service port and its target (`None` when 0: decided elsewhere).
fn port(p: &xds::Port) -> Result<(u16, Option<u16>), String> {
    let svc = u16::try_from(p.service_port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("service_port {} is not a port (1-65535)", p.service_port))?;
    let target = u16::try_from(p.target_port)
        .map_err(|_| format!("target_port {} is not a port (1-65535)", p.target_port))?;
    Ok((svc, (target != 0).then_some(target)))
}

/// `namespace/rest`, both parts non-empty.
pub fn namespaced(key: &str) -> Option<(&str, &str)> {
    key.split_once('/')
        .filter(|(ns, rest)| !ns.is_empty() && !rest.is_empty())
}

/// An IPv4 (4 bytes) or IPv6 (16 bytes) address.
pub fn ip(b: &[u8]) -> Option<IpAddr> {
    if let Ok(v4) = <[u8; 4]>::try_from(b) {
        Some(IpAddr::V4(Ipv4Addr::from(v4)))
    } else if let Ok(v6) = <[u8; 16]>::try_from(b) {
        Some(IpAddr::V6(Ipv6Addr::from(v6)))
    } else {
        None
    }
}

/// Why `b` is no address.
pub fn bad_ip(b: &[u8]) -> String {
    format!(
        "{} bytes is not an IPv4 (4 bytes) or IPv6 (16 bytes) address",
        b.len()
    )
}

fn unknown_enum(field: &str, value: i32) -> Fault {
    invalid(field, format!("unknown value {value}"))
}
