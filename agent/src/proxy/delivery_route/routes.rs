//! The `local` routes of the delivery table, as netlink messages.
use std::net::{Ipv4Addr, Ipv6Addr};

use rtnetlink::packet_route::route::{RouteMessage, RouteProtocol, RouteScope, RouteType};
use rtnetlink::{IpVersion, RouteMessageBuilder};

/// `local default dev lo table TABLE` of `family`.
pub(super) fn local_route(
    family: &IpVersion,
    table: u32,
    lo: u32,
    protocol: RouteProtocol,
    scope: RouteScope,
) -> RouteMessage {
    match family {
        IpVersion::V4 => finish(
            RouteMessageBuilder::<Ipv4Addr>::new().destination_prefix(Ipv4Addr::UNSPECIFIED, 0),
            table,
            lo,
            protocol,
            scope,
        ),
        IpVersion::V6 => finish(
            RouteMessageBuilder::<Ipv6Addr>::new().destination_prefix(Ipv6Addr::UNSPECIFIED, 0),
            table,
            lo,
            protocol,
            scope,
        ),
    }
}

/// `local fe80::/10 dev DEVICE table TABLE`: the app's reply to a link-local client is looked
/// up with its interface as the required output device (a strict lookup), which `dev lo` does
/// not match; without this route it would leave on that interface instead of reaching the
/// agent's delivery socket.
pub(super) fn link_local_route(
    table: u32,
    device: u32,
    protocol: RouteProtocol,
    scope: RouteScope,
) -> RouteMessage {
    let fe80 = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0);
    finish(
        RouteMessageBuilder::<Ipv6Addr>::new().destination_prefix(fe80, 10),
        table,
        device,
        protocol,
        scope,
    )
}

fn finish<T>(
    b: RouteMessageBuilder<T>,
    table: u32,
    device: u32,
    protocol: RouteProtocol,
    scope: RouteScope,
) -> RouteMessage {
    b.table_id(table)
        .kind(RouteType::Local)
        .protocol(protocol)
        .scope(scope)
        .output_interface(device)
        .build()
}
