//! The outbound routing decision: Service resolution, DestinationRule, destination PeerAuthentication → tunnel, plaintext or refusal, with reasons.
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;

use serde::Serialize;

use crate::identity::SpiffeId;
use crate::inventory::addresses::Claim;
use crate::inventory::waypoints::{self, WaypointRef};
use crate::inventory::Snapshot;
use crate::policy::destination_rule::{self, TlsMode};
use crate::policy::peer_auth::{self, Effective};
use crate::reason::Reason;

/// Cluster DNS domain of Service FQDNs.
pub const CLUSTER_DOMAIN: &str = "cluster.local";

/// What the decision needs besides the inventory.
pub struct RouteCtx<'a> {
    /// The inventory.
    pub snap: &'a Snapshot,
    /// Trust domain of identities.
    pub trust_domain: &'a str,
    /// Istio root namespace.
    pub root_namespace: &'a str,
    /// Peers' tunnel port.
    pub tunnel_port: u16,
    /// Whether this agent has identities (a CA is configured).
    pub mtls: bool,
}

/// Where a connection goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "route", rename_all = "snake_case")]
pub enum Route {
    /// HBONE to `peer` (the endpoint's tunnel port), CONNECT to `target`, the peer must prove `dst_id`.
    Tunnel {
        /// The endpoint's tunnel address.
        peer: SocketAddr,
        /// The CONNECT authority.
        target: SocketAddr,
        /// The identity the peer must prove.
        dst_id: String,
    },
    /// Plaintext from inside the source pod to `target`.
    Plaintext {
        /// Where to connect.
        target: SocketAddr,
    },
    /// Refused.
    Refuse {
        /// Why.
        reason: String,
        /// What kind of refusal (the metric label and the access log's reason).
        code: Refusal,
    },
}

/// Kinds of outbound refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Refusal {
    /// The routing rules refuse it (no such Service port, no endpoint, mTLS required, ...).
    Route,
    /// Several pods claim the destination address and no rule decides which one holds it:
    /// its identity cannot be decided, and plaintext could be a downgrade.
    AmbiguousAddress,
    /// The destination uses a waypoint that cannot be reached (no Service, no ready endpoint,
    /// no identity, no CA): refused rather than carried around the waypoint.
    WaypointUnavailable,
}

impl Refusal {
    /// The reason the refusal is counted and logged under.
    pub fn reason(self) -> Reason {
        match self {
            Self::Route => Reason::Route,
            Self::AmbiguousAddress => Reason::AmbiguousAddress,
            Self::WaypointUnavailable => Reason::WaypointUnavailable,
        }
    }
}

/// A route with the steps that led to it.
#[derive(Debug, Clone, Serialize)]
pub struct Decision {
    /// The route.
    #[serde(flatten)]
    pub route: Route,
    /// The waypoint the connection is sent through (or refused for), when the destination
    /// uses one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<WaypointRef>,
    /// Human-readable reasoning, in order.
    pub steps: Vec<String>,
}

/// Round-robin position per Service.
#[derive(Default)]
pub struct RoundRobin(Mutex<HashMap<String, usize>>);

impl RoundRobin {
    /// The next index in `0..n` for `key`.
    pub fn next(&self, key: &str, n: usize) -> usize {
        let mut m = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Looked up before inserting: a Service seen before costs no allocation.
        if !m.contains_key(key) {
            m.insert(key.to_string(), 0);
        }
        let Some(slot) = m.get_mut(key) else {
            return 0; // inserted just above
        };
        let i = *slot % n.max(1);
        *slot = slot.wrapping_add(1);
        i
    }
}

/// Whether [`decide`] writes down its reasoning: `ambit explain` (and a debug log) reads the
/// steps; a connection only needs the route, and formats nothing it does not use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Steps {
    /// Record every step.
    Record,
    /// Record nothing ([`Decision::steps`] stays empty).
    Skip,
}

/// The steps of one decision, formatted only when recorded.
struct Recorder(Option<Vec<String>>);

impl Recorder {
    fn note(&mut self, step: impl FnOnce() -> String) {
        if let Some(steps) = &mut self.0 {
            steps.push(step());
        }
    }

    fn done(self, route: Route) -> Decision {
        Decision {
            route,
            waypoint: None,
            steps: self.0.unwrap_or_default(),
        }
    }

    fn refuse(self, reason: String) -> Decision {
        self.done(Route::Refuse {
            reason,
            code: Refusal::Route,
        })
    }
}

/// Decides how a connection to `orig` is carried. `pick(service key, ready count)` chooses
/// the endpoint index (of a Service or a waypoint); `steps` says whether the reasoning is
/// written down.
pub fn decide(
    ctx: &RouteCtx<'_>,
    orig: SocketAddr,
    steps: Steps,
    mut pick: impl FnMut(&str, usize) -> usize,
) -> Decision {
    let mut rec = Recorder((steps == Steps::Record).then(Vec::new));
    let (target, client_tls) = match ctx.snap.vip(orig.ip()) {
        Some(vip) => {
            let svc = vip.service;
            rec.note(|| format!("{} is a virtual IP of Service {}", orig.ip(), svc.key()));
            if !svc.ports.contains_key(&orig.port()) {
                return rec.refuse(format!("Service {} has no port {}", svc.key(), orig.port()));
            }
            if let Some(wp) = ctx.snap.waypoint_of_service(svc) {
                rec.note(|| {
                    format!(
                        "Service {} uses waypoint {} ({} label {})",
                        svc.key(),
                        wp.key(),
                        wp.bound_by,
                        waypoints::USE_WAYPOINT_LABEL
                    )
                });
                return waypoint::via(ctx, rec, wp, orig, pick);
            }
            let ready = vip.ready_count();
            if ready == 0 {
                return rec.refuse(format!("Service {} has no ready endpoints", svc.key()));
            }
            // `ready` is not zero and the index is taken modulo it: the endpoint exists.
            let Some(ep) = vip.ready(pick(vip.name, ready) % ready) else {
                return rec.refuse(format!("Service {} has no ready endpoints", svc.key()));
            };
            let Some(port) = svc.target_port(orig.port(), ep) else {
                return rec.refuse(format!(
                    "Service {} port {} has no target port on endpoint {}",
                    svc.key(),
                    orig.port(),
                    ep.ip
                ));
            };
            let target = SocketAddr::new(ep.ip, port);
            rec.note(|| format!("endpoint {target} chosen from {ready} ready"));
            let tls = destination_rule::client_tls(
                &ctx.snap.destination_rules,
                destination_rule::ServiceName {
                    namespace: &svc.namespace,
                    name: &svc.name,
                },
                orig.port(),
                CLUSTER_DOMAIN,
            );
            match &tls {
                Some(t) => rec.note(|| {
                    format!(
                        "DestinationRule {} sets tls mode {} for port {}",
                        t.rule,
                        t.mode,
                        orig.port()
                    )
                }),
                None => rec.note(|| "no DestinationRule applies".to_string()),
            }
            (target, tls)
        }
        None => (orig, None),
    };
    let requires_mtls = client_tls
        .as_ref()
        .is_some_and(|t| t.mode == TlsMode::IstioMutual);
    let disables_mtls = client_tls
        .as_ref()
        .is_some_and(|t| t.mode != TlsMode::IstioMutual);
    let owner = match ctx.snap.claim(target.ip()) {
        Claim::Owner(w) => {
            if let Some(c) = ctx.snap.addresses().conflict(target.ip()) {
                rec.note(|| c.describe());
            }
            Some(w)
        }
        Claim::Ambiguous(c) => {
            rec.note(|| c.describe());
            let in_mesh = c
                .claimants
                .iter()
                .any(|k| ctx.snap.workloads.get(k).is_some_and(|w| w.enrolled));
            if in_mesh {
                // Any claimant may be the pod that answers: its identity cannot be decided,
                // and plaintext to an enrolled pod would be a downgrade.
                return rec.done(Route::Refuse {
                    reason: format!(
                        "ambiguous_address: {} is claimed by {}; the identity of the destination cannot be decided",
                        target.ip(),
                        c.claimants.join(" and ")
                    ),
                    code: Refusal::AmbiguousAddress,
                });
            }
            rec.note(|| "no claimant is in the mesh: plaintext either way".to_string());
            None
        }
        Claim::Unclaimed => None,
    };
    let Some(dst) = owner.filter(|w| w.enrolled) else {
        rec.note(|| format!("{} is not an enrolled pod", target.ip()));
        if requires_mtls {
            return rec.refuse(
                "DestinationRule requires mTLS but the destination is not in the mesh".into(),
            );
        }
        return rec.done(Route::Plaintext { target });
    };
    rec.note(|| format!("{} is enrolled pod {}", target.ip(), dst.key()));
    if let Some(wp) = ctx.snap.waypoint_of_workload(dst) {
        rec.note(|| {
            format!(
                "pod {} uses waypoint {} ({} label {})",
                dst.key(),
                wp.key(),
                wp.bound_by,
                waypoints::USE_WAYPOINT_LABEL
            )
        });
        return waypoint::via(ctx, rec, wp, target, pick);
    }
    if !ctx.mtls {
        if requires_mtls {
            return rec.refuse(
                "DestinationRule requires mTLS but this agent has no CA configured".into(),
            );
        }
        rec.note(|| "this agent runs without a CA: plaintext".to_string());
        return rec.done(Route::Plaintext { target });
    }
    let pa = peer_auth::resolve(
        &ctx.snap.peer_authentications,
        ctx.root_namespace,
        &dst.namespace,
        &dst.labels,
        target.port(),
    );
    rec.note(|| {
        let by = pa.policy.as_deref().unwrap_or("nothing set");
        format!(
            "destination PeerAuthentication on port {}: {} ({}, {by})",
            target.port(),
            pa.mode,
            pa.level
        )
    });
    if disables_mtls {
        if pa.mode == Effective::Strict {
            rec.note(|| {
                "warning: the destination is STRICT and will refuse this plaintext".to_string()
            });
        }
        return rec.done(Route::Plaintext { target });
    }
    if pa.mode == Effective::Disable && !requires_mtls {
        rec.note(|| "DISABLE: peers send plaintext".to_string());
        return rec.done(Route::Plaintext { target });
    }
    let raw_id = dst.spiffe_id(ctx.trust_domain);
    if raw_id.parse::<SpiffeId>().is_err() {
        return rec.refuse(format!(
            "destination {} has no valid identity ({raw_id})",
            dst.key()
        ));
    }
    rec.note(|| {
        format!(
            "HBONE to {}:{} requiring {raw_id}",
            target.ip(),
            ctx.tunnel_port
        )
    });
    rec.done(Route::Tunnel {
        peer: SocketAddr::new(target.ip(), ctx.tunnel_port),
        target,
        dst_id: raw_id,
    })
}

mod waypoint;

#[cfg(test)]
mod tests;
