//! File inventory source: multi-document Kubernetes YAML, parsed with exact error locations, polled for changes and merged with the CNI plugin's reports.
mod watch;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ipnet::IpNet;
use k8s_openapi::jiff::Timestamp;
use serde::de::DeserializeOwned;
use tokio::sync::watch as channel;

pub use self::watch::{watch_file, watch_with_cni, WatchSettings};
pub use super::publish::ReloadStats;

use super::enrollment;
use super::objects::{Namespace, Node, Pod};
use super::services::{self, EndpointSliceObject, ServiceObject, SERVICE_NAME_LABEL};
use super::{
    Snapshot, Workload, CGROUP_ANNOTATION, EXCLUDE_CIDRS_ANNOTATION, EXCLUDE_PORTS_ANNOTATION,
    NETNS_ANNOTATION,
};
use crate::cni::pods::CniPod;
use crate::inventory::sandboxes::merge_netns_local;
use crate::policy::authz::{self, AuthorizationPolicy};
use crate::policy::destination_rule::DestinationRule;
use crate::policy::peer_auth::{self, PeerAuthentication};

/// Errors reading or parsing an inventory file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be read.
    #[error("cannot read inventory {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A document failed to parse, or a field had a bad value.
    #[error(transparent)]
    Object(Box<ObjectError>),
}

/// Where and why one inventory object was rejected.
#[derive(Debug, thiserror::Error)]
#[error("inventory {}: document {doc} ({kind} {name}): field `{field}`: {message} (line {line})", path.display())]
pub struct ObjectError {
    /// Inventory file.
    pub path: PathBuf,
    /// 1-based document number.
    pub doc: usize,
    /// Object kind.
    pub kind: String,
    /// Object name.
    pub name: String,
    /// Field path, e.g. `status.podIPs[0].ip`.
    pub field: String,
    /// What is wrong.
    pub message: String,
    /// 1-based line in the file.
    pub line: usize,
}

/// A parsed inventory file: the snapshot as written, and the UIDs of its pods that have one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Parsed {
    /// The objects of the file.
    pub snapshot: Snapshot,
    /// `metadata.uid` of each pod that sets it, keyed by `namespace/name`.
    pub uids: BTreeMap<String, String>,
}

impl Parsed {
    /// The snapshot to publish: with CNI reports, `node`'s pods without a netns annotation take
    /// the namespace the plugin reported for them (as in Kubernetes mode); annotations win.
    pub fn merged(&self, cni: Option<&CniReports>) -> Snapshot {
        let mut snap = self.snapshot.clone();
        if let Some(c) = cni {
            let pods = c.pods.borrow().clone();
            merge_netns_local(
                &mut snap,
                &c.node,
                |k| self.uids.get(k).map(String::as_str),
                &pods,
            );
        }
        snap
    }
}

/// The CNI plugin's reports a file inventory merges (an agent with a `cni:` section).
#[derive(Debug, Clone)]
pub struct CniReports {
    /// This node: only its pods take a reported netns.
    pub node: String,
    /// The pod map's entries, as they change.
    pub pods: channel::Receiver<Arc<Vec<CniPod>>>,
}

/// Parses inventory text. `path` is used in error messages only.
pub fn parse(path: &Path, text: &str) -> Result<Snapshot, Error> {
    parse_file(path, text).map(|p| p.snapshot)
}

/// Parses inventory text, keeping the pods' UIDs. `path` is used in error messages only.
pub fn parse_file(path: &Path, text: &str) -> Result<Parsed, Error> {
    let mut snap = Snapshot::default();
    let mut uids = BTreeMap::new();
    let mut pods = Vec::new();
    let mut service_objs = Vec::new();
    let mut slices = Vec::new();
    for (doc, (first_line, chunk)) in documents(text).into_iter().enumerate() {
        let err = |kind: &str, name: &str, field: String, message: String, line: usize| {
            Error::Object(Box::new(ObjectError {
                path: path.to_path_buf(),
                doc: doc + 1,
                kind: kind.to_string(),
                name: name.to_string(),
                field,
                message,
                line: first_line + line.saturating_sub(1),
            }))
        };
        let value: serde_json::Value = crate::yaml::from_str(&chunk)
            .map_err(|e| err("?", "?", e.field, e.message, e.line.max(1)))?;
        if value.is_null() {
            continue;
        }
        let kind = value
            .get("kind")
            .and_then(|k| k.as_str())
            .unwrap_or_default()
            .to_string();
        let name = value
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(|n| n.as_str())
            .unwrap_or("?")
            .to_string();
        match kind.as_str() {
            "Pod" => {
                let pod: Pod = typed(&chunk).map_err(|(f, m, l)| err(&kind, &name, f, m, l))?;
                // A finished pod's addresses may already be another pod's: it owns nothing.
                if pod.status.is_terminal() {
                    continue;
                }
                let line = first_line + line_of(&chunk, "metadata:") - 1;
                pods.push((pod, line, doc));
            }
            "Node" => {
                let node: Node = typed(&chunk).map_err(|(f, m, l)| err(&kind, &name, f, m, l))?;
                let ranges = pod_cidrs(&node)
                    .map_err(|(f, m)| err(&kind, &name, f, m, line_of(&chunk, "spec:")))?;
                snap.nodes.insert(node.metadata.name, ranges);
            }
            "Namespace" => {
                let ns: Namespace =
                    typed(&chunk).map_err(|(f, m, l)| err(&kind, &name, f, m, l))?;
                snap.namespaces
                    .insert(ns.metadata.name.clone(), ns.metadata.labels);
            }
            "PeerAuthentication" | "AuthorizationPolicy" => {
                let api = value
                    .get("apiVersion")
                    .and_then(|a| a.as_str())
                    .unwrap_or_default();
                if !matches!(api, "security.istio.io/v1" | "security.istio.io/v1beta1") {
                    let msg = format!(
                        "unsupported apiVersion `{api}` (want security.istio.io/v1 or v1beta1)"
                    );
                    return Err(err(&kind, &name, "apiVersion".into(), msg, 1));
                }
                let spec_line = line_of(&chunk, "spec:");
                if kind == "PeerAuthentication" {
                    let mut pa: PeerAuthentication =
                        typed(&chunk).map_err(|(f, m, l)| err(&kind, &name, f, m, l))?;
                    default_namespace(&mut pa.metadata);
                    peer_auth::validate(&pa)
                        .map_err(|(f, m)| err(&kind, &name, f, m, spec_line))?;
                    Arc::make_mut(&mut snap.peer_authentications).push(pa);
                } else {
                    let mut ap: AuthorizationPolicy =
                        typed(&chunk).map_err(|(f, m, l)| err(&kind, &name, f, m, l))?;
                    default_namespace(&mut ap.metadata);
                    authz::validate(&ap).map_err(|(f, m)| err(&kind, &name, f, m, spec_line))?;
                    Arc::make_mut(&mut snap.authorization_policies).push(ap);
                }
            }
            "Service" => {
                let s: ServiceObject =
                    typed(&chunk).map_err(|(f, m, l)| err(&kind, &name, f, m, l))?;
                service_objs.push((s, doc, first_line + line_of(&chunk, "spec:") - 1));
            }
            "EndpointSlice" => {
                let s: EndpointSliceObject =
                    typed(&chunk).map_err(|(f, m, l)| err(&kind, &name, f, m, l))?;
                slices.push(s);
            }
            "DestinationRule" => {
                let api = value
                    .get("apiVersion")
                    .and_then(|a| a.as_str())
                    .unwrap_or_default();
                if !matches!(
                    api,
                    "networking.istio.io/v1"
                        | "networking.istio.io/v1beta1"
                        | "networking.istio.io/v1alpha3"
                ) {
                    let msg = format!(
                        "unsupported apiVersion `{api}` (want networking.istio.io/v1 or v1beta1)"
                    );
                    return Err(err(&kind, &name, "apiVersion".into(), msg, 1));
                }
                let mut dr: DestinationRule =
                    typed(&chunk).map_err(|(f, m, l)| err(&kind, &name, f, m, l))?;
                default_namespace(&mut dr.metadata);
                if dr.spec.host.is_empty() {
                    return Err(err(
                        &kind,
                        &name,
                        "spec.host".into(),
                        "must not be empty".into(),
                        line_of(&chunk, "spec:"),
                    ));
                }
                Arc::make_mut(&mut snap.destination_rules).push(dr);
            }
            "List" => {
                return Err(err(
                    &kind,
                    &name,
                    "kind".into(),
                    "List is not supported; write one object per document".into(),
                    1,
                ))
            }
            "" => return Err(err("?", &name, "kind".into(), "missing kind".into(), 1)),
            // Objects ambit has no use for (Deployments, ConfigMaps, ...): noted, not fatal.
            other => snap.warnings.push(format!(
                "document {}: kind {other} ({name}) is not used by ambit; ignored",
                doc + 1
            )),
        }
    }
    for (obj, doc, line) in &service_objs {
        let ns = if obj.metadata.namespace.is_empty() {
            "default"
        } else {
            obj.metadata.namespace.as_str()
        };
        let mine: Vec<&EndpointSliceObject> = slices
            .iter()
            .filter(|s| {
                let s_ns = if s.metadata.namespace.is_empty() {
                    "default"
                } else {
                    s.metadata.namespace.as_str()
                };
                s_ns == ns && s.metadata.labels.get(SERVICE_NAME_LABEL) == Some(&obj.metadata.name)
            })
            .collect();
        let svc = services::service(obj, &mine).map_err(|(field, message)| {
            Error::Object(Box::new(ObjectError {
                path: path.to_path_buf(),
                doc: doc + 1,
                kind: "Service".into(),
                name: obj.metadata.name.clone(),
                field,
                message,
                line: *line,
            }))
        })?;
        if svc.endpoints.iter().all(|e| !e.ready) {
            snap.warnings.push(format!(
                "Service {} has no ready endpoints: connections to it will be refused",
                svc.key()
            ));
        }
        snap.services.insert(svc.key(), Arc::new(svc));
    }
    for (pod, line, doc) in pods {
        let kind = "Pod";
        let name = pod.metadata.name.clone();
        let uid = pod.metadata.uid.clone();
        let w = workload(pod, &snap.namespaces).map_err(|(field, message)| {
            Error::Object(Box::new(ObjectError {
                path: path.to_path_buf(),
                doc: doc + 1,
                kind: kind.to_string(),
                name: name.clone(),
                field,
                message,
                line,
            }))
        })?;
        if !uid.is_empty() {
            uids.insert(w.key(), uid);
        }
        snap.workloads.insert(w.key(), Arc::new(w));
    }
    Ok(Parsed {
        snapshot: snap,
        uids,
    })
}

/// Splits multi-document YAML on `---` lines; returns (first line number, text) per document.
fn documents(text: &str) -> Vec<(usize, String)> {
    let mut docs = vec![(1, String::new())];
    for (i, line) in text.lines().enumerate() {
        if line.trim_end() == "---" || line.starts_with("--- ") {
            docs.push((i + 2, String::new()));
            continue;
        }
        if let Some((_, cur)) = docs.last_mut() {
            cur.push_str(line);
            cur.push('\n');
        }
    }
    docs.retain(|(_, d)| !d.trim().is_empty());
    docs
}

/// Objects without a namespace live in `default`, as kubectl applies them.
fn default_namespace(meta: &mut super::objects::ObjectMeta) {
    if meta.namespace.is_empty() {
        meta.namespace = "default".into();
    }
}

fn line_of(chunk: &str, needle: &str) -> usize {
    chunk
        .lines()
        .position(|l| l.contains(needle))
        .map_or(1, |p| p + 1)
}

fn typed<T: DeserializeOwned>(chunk: &str) -> Result<T, (String, String, usize)> {
    crate::yaml::from_str(chunk).map_err(|e| (e.field, e.message, e.line.max(1)))
}

/// A Node's pod ranges (`spec.podCIDRs`, else `spec.podCIDR`).
pub(crate) fn pod_cidrs(node: &Node) -> Result<Vec<IpNet>, (String, String)> {
    let mut out = Vec::new();
    let listed = node
        .spec
        .pod_cidrs
        .iter()
        .enumerate()
        .map(|(i, c)| (format!("spec.podCIDRs[{i}]"), c));
    let single = node
        .spec
        .pod_cidr
        .iter()
        .map(|c| ("spec.podCIDR".to_string(), c));
    for (field, raw) in listed.chain(single) {
        let net = raw
            .parse::<IpNet>()
            .map_err(|_| (field, format!("`{raw}` is not a CIDR")))?
            .trunc();
        if !out.contains(&net) {
            out.push(net);
        }
    }
    Ok(out)
}

/// An RFC 3339 time of `metadata`, or an error naming `field`.
fn timestamp(raw: Option<&str>, field: &str) -> Result<Option<Timestamp>, (String, String)> {
    raw.map(|t| {
        t.parse::<Timestamp>().map_err(|e| {
            (
                field.to_string(),
                format!("`{t}` is not an RFC 3339 time: {e}"),
            )
        })
    })
    .transpose()
}

pub(crate) fn workload(
    pod: Pod,
    namespaces: &BTreeMap<String, BTreeMap<String, String>>,
) -> Result<Workload, (String, String)> {
    let meta = pod.metadata;
    let namespace = if meta.namespace.is_empty() {
        "default".to_string()
    } else {
        meta.namespace
    };
    let mut ips = Vec::new();
    let raw_ips = pod
        .status
        .pod_ips
        .iter()
        .map(|p| p.ip.as_str())
        .chain(pod.status.pod_ip.as_deref());
    for (i, raw) in raw_ips.enumerate() {
        let ip: IpAddr = raw.parse().map_err(|_| {
            (
                format!("status.podIPs[{i}].ip"),
                format!("`{raw}` is not an IP address"),
            )
        })?;
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    // The labels of the pod and its namespace (a host-network pod never: that would capture the
    // node; a pod with an Istio sidecar never: the sidecar holds the same ports).
    let enrollment = enrollment::decide(
        &meta.labels,
        &meta.annotations,
        namespaces.get(&namespace),
        pod.spec.host_network,
    );
    let created = timestamp(
        meta.creation_timestamp.as_deref(),
        "metadata.creationTimestamp",
    )?;
    let deleting = meta.deletion_timestamp.is_some();
    let annotation = |k: &str| meta.annotations.get(k).map(String::as_str);
    let mut skip_ports = Vec::new();
    for p in list(annotation(EXCLUDE_PORTS_ANNOTATION)) {
        let port = p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| {
            (
                format!("metadata.annotations.{EXCLUDE_PORTS_ANNOTATION}"),
                format!("`{p}` is not a port"),
            )
        })?;
        skip_ports.push(port);
    }
    let mut skip_cidrs = Vec::new();
    for c in list(annotation(EXCLUDE_CIDRS_ANNOTATION)) {
        let net = c
            .parse::<IpNet>()
            .or_else(|_| c.parse::<IpAddr>().map(IpNet::from))
            .map_err(|_| {
                (
                    format!("metadata.annotations.{EXCLUDE_CIDRS_ANNOTATION}"),
                    format!("`{c}` is not a CIDR"),
                )
            })?;
        skip_cidrs.push(net.trunc());
    }
    const MAX_PORTS: usize = crate::redirect::maps::MAX_SKIP_PORTS;
    const MAX_CIDRS: usize = crate::redirect::maps::MAX_SKIP_CIDRS;
    if skip_ports.len() > MAX_PORTS {
        return Err((
            format!("metadata.annotations.{EXCLUDE_PORTS_ANNOTATION}"),
            format!("at most {MAX_PORTS} ports"),
        ));
    }
    if skip_cidrs.len() > MAX_CIDRS {
        return Err((
            format!("metadata.annotations.{EXCLUDE_CIDRS_ANNOTATION}"),
            format!("at most {MAX_CIDRS} CIDRs"),
        ));
    }
    let service_account = if pod.spec.service_account_name.is_empty() {
        "default".to_string()
    } else {
        pod.spec.service_account_name
    };
    Ok(Workload {
        name: meta.name,
        namespace,
        service_account,
        node: pod.spec.node_name,
        ips,
        enrolled: enrollment.enrolled(),
        enrollment,
        netns: annotation(NETNS_ANNOTATION).map(PathBuf::from),
        cgroup: annotation(CGROUP_ANNOTATION).map(PathBuf::from),
        labels: meta.labels,
        skip_ports,
        skip_cidrs,
        host_network: pod.spec.host_network,
        deleting,
        created,
    })
}

fn list(v: Option<&str>) -> impl Iterator<Item = &str> {
    v.unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests;
