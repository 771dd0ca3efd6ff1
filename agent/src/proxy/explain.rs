//! `ambit explain`: why a connection from a pod to an address is (or would be) tunnelled, plaintext or refused.
use std::net::SocketAddr;

use serde::Serialize;

use super::pods::AppliedAuthz;
use super::route::{self, Decision, Route, RouteCtx, Steps};
use crate::inventory::addresses::Conflict;
use crate::inventory::enrollment::Enrollment;
use crate::inventory::{Snapshot, Workload};
use crate::policy::authz::{self, ConnAttrs, Mesh};
use crate::policy::peer_auth::{self, Effective, Resolution};

/// The whole answer.
#[derive(Debug, Serialize)]
pub struct Explanation {
    /// Source pod (`namespace/name`).
    pub from: String,
    /// Destination as dialled.
    pub to: SocketAddr,
    /// What the source agent does.
    pub outbound: Decision,
    /// What the destination agent does, when the destination is an enrolled pod.
    pub inbound: Option<Inbound>,
    /// One line: tunnelled, plaintext or refused, and by whom.
    pub verdict: String,
    /// Whether the source pod and the destination pod (when the destination is one) are
    /// enrolled, and which label decided.
    pub enrollment: Vec<PodEnrollment>,
    /// Likely mistakes found in the policies that concern this connection.
    pub warnings: Vec<String>,
    /// Addresses of this connection (the one dialled, a Service's endpoints) that several
    /// pods claim, with every claimant and who owns it (none: connections are refused).
    pub address_conflicts: Vec<Conflict>,
}

/// The destination side.
#[derive(Debug, Serialize)]
pub struct Inbound {
    /// Destination pod.
    pub pod: String,
    /// Its PeerAuthentication on the target port.
    pub peer_authentication: Resolution,
    /// The AuthorizationPolicy decision for this source.
    pub authorization: authz::Decision,
    /// The AuthorizationPolicies that select the destination pod (whether or not they match),
    /// so that the decision can be told in words, and those in its scope that the node proxy
    /// does not apply (targeted at a waypoint or gateway, AUDIT, CUSTOM), saying why.
    pub authorization_policies: Vec<AppliedAuthz>,
}

/// One pod's enrollment, as `explain` tells it.
#[derive(Debug, Serialize)]
pub struct PodEnrollment {
    /// `source` or `destination`.
    pub role: &'static str,
    /// The pod (`namespace/name`).
    pub pod: String,
    /// Whether it is enrolled.
    pub enrolled: bool,
    /// The rule or label that decided.
    pub decision: Enrollment,
    /// The decision in words (`enrolled by namespace label istio.io/dataplane-mode=ambient`).
    pub reason: String,
}

impl PodEnrollment {
    fn of(role: &'static str, w: &Workload) -> Self {
        Self {
            role,
            pod: w.key(),
            enrolled: w.enrolled,
            decision: w.enrollment,
            reason: w.enrollment.to_string(),
        }
    }
}

/// Errors in the question itself.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The source pod is not in the inventory.
    #[error("no pod {0:?} in the inventory (use namespace/name)")]
    UnknownSource(String),
}

/// Explains a connection from pod `from` (`namespace/name`) to `to`.
pub fn explain(
    snap: &Snapshot,
    mesh: &Mesh<'_>,
    tunnel_port: u16,
    mtls: bool,
    from: &str,
    to: SocketAddr,
) -> Result<Explanation, Error> {
    let src = snap
        .workloads
        .get(from)
        .ok_or_else(|| Error::UnknownSource(from.to_string()))?;
    let root_namespace = mesh.root_namespace;
    let ctx = RouteCtx {
        snap,
        trust_domain: mesh.trust_domain,
        root_namespace,
        tunnel_port,
        mtls,
    };
    let mut warnings = Vec::new();
    if !src.enrolled {
        warnings.push(format!(
            "source {from} is not enrolled: its connections are not captured at all"
        ));
    }
    let outbound = route::decide(&ctx, to, Steps::Record, |_, _| 0);
    let (target, tunnelled) = match &outbound.route {
        Route::Tunnel { target, .. } => (Some(*target), true),
        Route::Plaintext { target } => (Some(*target), false),
        Route::Refuse { .. } => (None, false),
    };
    let dst = target.and_then(|t| snap.by_ip(t.ip()).map(|w| (t, w)));
    // Through a waypoint the destination's agent sees the waypoint, not this source: its
    // policy is the waypoint's to apply.
    let inbound = dst
        .filter(|(_, w)| w.enrolled && outbound.waypoint.is_none())
        .map(|(t, w)| inbound(snap, mesh, src, w, t, tunnelled));
    if let Some((t, w)) = dst {
        if !w.enrolled {
            warnings.push(format!("destination {} is not enrolled: PeerAuthentication and AuthorizationPolicy do not apply to it", w.key()));
        }
        warnings.extend(policy_warnings(snap, root_namespace, w, t.port()));
    }
    let verdict = verdict(&outbound, inbound.as_ref(), tunnelled, src.enrolled);
    let enrollment = std::iter::once(PodEnrollment::of("source", src))
        .chain(dst.map(|(_, w)| PodEnrollment::of("destination", w)))
        .collect();
    let endpoints: std::collections::BTreeSet<std::net::IpAddr> = snap
        .service_by_vip(to.ip())
        .map(|s| s.endpoints.iter().map(|e| e.ip).collect())
        .unwrap_or_else(|| [to.ip()].into());
    let address_conflicts = endpoints
        .into_iter()
        .filter_map(|ip| snap.addresses().conflict(ip).cloned())
        .collect();
    Ok(Explanation {
        from: from.to_string(),
        to,
        outbound,
        inbound,
        verdict,
        enrollment,
        warnings,
        address_conflicts,
    })
}

fn inbound(
    snap: &Snapshot,
    mesh: &Mesh<'_>,
    src: &Workload,
    dst: &Workload,
    target: SocketAddr,
    tunnelled: bool,
) -> Inbound {
    let root = mesh.root_namespace;
    let pa = peer_auth::resolve(
        &snap.peer_authentications,
        root,
        &dst.namespace,
        &dst.labels,
        target.port(),
    );
    let src_ip = src.ip_like(target.ip()).or(src.ips.first().copied());
    let attrs = ConnAttrs {
        // A tunnelled source proves its identity with its certificate; a pod whose namespace or
        // service account forms no valid identity has no certificate and proves none.
        peer: tunnelled
            .then(|| src.spiffe_id(mesh.trust_domain).parse().ok())
            .flatten(),
        src_ip: src_ip.unwrap_or(target.ip()),
        dst_port: target.port(),
        dst_ip: target.ip(),
    };
    let authorization = snap
        .authz()
        .evaluate(mesh, &dst.namespace, &dst.labels, &attrs);
    let authorization_policies = snap
        .authorization_policies
        .iter()
        .filter(|p| p.applies_to(root, &dst.namespace, &dst.labels))
        .map(AppliedAuthz::of)
        .collect();
    Inbound {
        pod: dst.key(),
        peer_authentication: pa,
        authorization,
        authorization_policies,
    }
}

fn verdict(
    outbound: &Decision,
    inbound: Option<&Inbound>,
    tunnelled: bool,
    src_enrolled: bool,
) -> String {
    if !src_enrolled {
        return "not captured: the source pod is not in the mesh".into();
    }
    if let Route::Refuse { reason, .. } = &outbound.route {
        return format!("refused by the source agent: {reason}");
    }
    if let (Some(wp), Route::Tunnel { peer, target, .. }) = (&outbound.waypoint, &outbound.route) {
        return format!(
            "tunnelled over mTLS (HBONE) through waypoint {} ({peer}, CONNECT {target}): the \
             waypoint applies the destination's policy",
            wp.key()
        );
    }
    let Some(inb) = inbound else {
        // With `capture.meshOnly` (the default) the kernel does not redirect a connect to an
        // address outside the mesh list (agent/src/redirect/mesh.rs) at all.
        return "plaintext to a destination outside the mesh (a Service address through the \
                agent; any other address connected directly by the kernel under \
                capture.meshOnly, the default)"
            .into();
    };
    if !tunnelled && inb.peer_authentication.mode == Effective::Strict {
        let by = inb.peer_authentication.policy.as_deref().unwrap_or("?");
        return format!("refused by the destination: plaintext under STRICT ({by})");
    }
    match &inb.authorization {
        authz::Decision::Allow { .. } => {}
        authz::Decision::Denied { policy } => {
            return format!("refused by the destination: AuthorizationPolicy {policy} denies it")
        }
        authz::Decision::NotAllowed => {
            return "refused by the destination: no ALLOW AuthorizationPolicy matches it".into()
        }
    }
    if tunnelled {
        "tunnelled over mTLS (HBONE)".into()
    } else {
        format!(
            "plaintext, accepted by the destination ({})",
            inb.peer_authentication.mode
        )
    }
}

/// Policies that look like they were meant to apply but do not.
fn policy_warnings(snap: &Snapshot, root: &str, dst: &Workload, port: u16) -> Vec<String> {
    let mut out = Vec::new();
    for p in snap.peer_authentications.iter() {
        let ns = &p.metadata.namespace;
        if let Some(sel) = &p.spec.selector {
            let selects_any = snap.workloads.values().any(|w| {
                &w.namespace == ns
                    && sel
                        .match_labels
                        .iter()
                        .all(|(k, v)| w.labels.get(k) == Some(v))
            });
            if !selects_any {
                out.push(format!(
                    "PeerAuthentication {} selects no pod (selector {})",
                    p.key(),
                    sel.match_labels
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(",")
                ));
            }
        } else if ns != root && !snap.workloads.values().any(|w| &w.namespace == ns) {
            out.push(format!("PeerAuthentication {} is in namespace {ns}, which has no pods; mesh-wide policies belong in {root}", p.key()));
        }
        if p.spec.selector.is_none() && ns != &dst.namespace && ns != root {
            out.push(format!(
                "PeerAuthentication {} is in namespace {ns} and does not apply to {}",
                p.key(),
                dst.key()
            ));
        }
        if p.spec.selector.is_some() && !p.spec.port_level_mtls.is_empty() && ns == &dst.namespace {
            let applies = p.spec.selector.as_ref().is_some_and(|s| {
                s.match_labels
                    .iter()
                    .all(|(k, v)| dst.labels.get(k) == Some(v))
            });
            if applies && !p.spec.port_level_mtls.contains_key(&u32::from(port)) {
                out.push(format!(
                    "PeerAuthentication {} has port-level modes, but not for target port {port}",
                    p.key()
                ));
            }
        }
    }
    for a in snap
        .authorization_policies
        .iter()
        .filter(|a| a.not_for_node_proxy().is_none())
    {
        let unsupported = authz::unsupported(a);
        if !unsupported.is_empty() && a.applies_to(root, &dst.namespace, &dst.labels) {
            out.push(format!(
                "AuthorizationPolicy {} uses fields ambit cannot check at L4 ({}): it fails safe",
                a.key(),
                unsupported.join(", ")
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::inventory::file::parse;

    const INV: &str = r#"
kind: Namespace
metadata: {name: shop, labels: {ambit.io/mode: enabled}}
---
kind: Pod
metadata: {name: client, namespace: shop}
spec: {nodeName: node1, serviceAccountName: client}
status: {podIPs: [{ip: 10.1.0.2}]}
---
kind: Pod
metadata: {name: outsider, namespace: other}
spec: {nodeName: node1}
status: {podIPs: [{ip: 10.1.0.3}]}
---
kind: Pod
metadata: {name: server, namespace: shop, labels: {app: server}}
spec: {nodeName: node2, serviceAccountName: server}
status: {podIPs: [{ip: 10.2.0.2}]}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: istio-config}
spec: {mtls: {mode: STRICT}}
"#;

    #[test]
    fn strict_in_the_wrong_namespace_is_flagged() {
        let s = parse(Path::new("x"), INV).unwrap();
        let e = explain(
            &s,
            &Mesh::new("istio-system", "cluster.local"),
            15008,
            true,
            "shop/client",
            "10.2.0.2:8080".parse().unwrap(),
        )
        .unwrap();
        assert_eq!(e.verdict, "tunnelled over mTLS (HBONE)");
        assert!(
            e.warnings
                .iter()
                .any(|w| w.contains("istio-config") && w.contains("no pods")),
            "{:?}",
            e.warnings
        );
    }

    #[test]
    fn plaintext_under_strict_is_refused_by_the_destination() {
        let text = format!("{INV}---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: strict, namespace: shop}}\nspec: {{mtls: {{mode: STRICT}}}}\n");
        let s = parse(Path::new("x"), &text).unwrap();
        // The outsider is not enrolled: not captured, so its plaintext reaches the server's agent.
        let e = explain(
            &s,
            &Mesh::new("istio-system", "cluster.local"),
            15008,
            false,
            "shop/client",
            "10.2.0.2:8080".parse().unwrap(),
        )
        .unwrap();
        assert!(e.verdict.contains("STRICT"), "{}", e.verdict);
        let unknown = explain(
            &s,
            &Mesh::new("istio-system", "cluster.local"),
            15008,
            true,
            "nope/x",
            "10.2.0.2:80".parse().unwrap(),
        );
        assert!(unknown.is_err());
    }
}
