//! The route through a waypoint: HBONE to one of the waypoint's pods, requiring its identity, CONNECT to the original destination; refused when the waypoint cannot be reached.
use std::net::SocketAddr;

use super::{Decision, Recorder, Refusal, Route, RouteCtx};
use crate::identity::SpiffeId;
use crate::inventory::waypoints::WaypointRef;

/// Sends a connection to `authority` (the Service address dialled, or the pod's address and
/// port) through waypoint `wp`, as ztunnel does; refuses it when the waypoint cannot be
/// reached, never carrying it around the waypoint (whose L7 policy would then not apply).
pub(super) fn via(
    ctx: &RouteCtx<'_>,
    mut rec: Recorder,
    wp: WaypointRef,
    authority: SocketAddr,
    pick: impl FnMut(&str, usize) -> usize,
) -> Decision {
    let refuse = |rec: Recorder, why: String, wp: WaypointRef| {
        let mut d = rec.done(Route::Refuse {
            reason: format!(
                "waypoint_unavailable: {why}; refused rather than sent around the waypoint"
            ),
            code: Refusal::WaypointUnavailable,
        });
        d.waypoint = Some(wp);
        d
    };
    if !ctx.mtls {
        let why = format!(
            "waypoint {} is reached over HBONE but this agent has no CA",
            wp.key()
        );
        return refuse(rec, why, wp);
    }
    let ep = match ctx
        .snap
        .waypoint_endpoint(&wp, authority.ip(), ctx.trust_domain, pick)
    {
        Ok(ep) => ep,
        Err(e) => return refuse(rec, e.to_string(), wp),
    };
    if ep.identity.parse::<SpiffeId>().is_err() {
        let why = format!(
            "waypoint {} pod {} has no valid identity ({})",
            wp.key(),
            ep.ip,
            ep.identity
        );
        return refuse(rec, why, wp);
    }
    let peer = SocketAddr::new(ep.ip, ctx.tunnel_port);
    rec.note(|| {
        format!(
            "HBONE to waypoint {} at {peer} requiring {}, CONNECT {authority}",
            wp.key(),
            ep.identity
        )
    });
    let mut d = rec.done(Route::Tunnel {
        peer,
        target: authority,
        dst_id: ep.identity,
    });
    d.waypoint = Some(wp);
    d
}

#[cfg(test)]
mod tests;
