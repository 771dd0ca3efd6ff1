//! Waypoints (issue 19 item 6): a pod labelled `istio.io/use-waypoint` is reached only through
//! its waypoint. The client's agent sends its connections over HBONE to the waypoint's pod
//! (here a fake HBONE server with a genuine certificate), CONNECT to the pod's own address;
//! while the waypoint cannot be resolved it refuses them and counts them, never going around
//! it; and the pod's agent accepts mesh traffic only from the waypoint's identity (401 for
//! any other). A Service labelled so is reached the same way, CONNECT to its own address.
#![allow(
    clippy::unwrap_used,
    reason = "test bodies panic with a line number (STYLE.md §7)"
)]
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use ambit_e2e::hbone::{self, client_config, in_netns, FakeHbone, Issue as _, Outcome};
use ambit_e2e::state::identity;
use ambit_e2e::{testbed_with, Options, PodSpec, Testbed, ECHO_PORT, TUNNEL_PORT};
use http::{Method, StatusCode};

/// The waypoint's name (its Service) and service account.
const WAYPOINT: &str = "waypoint";
/// Virtual IPs and port of Service `web`, which uses the waypoint.
const VIP4: &str = "10.96.0.81";
const VIP6: &str = "fd00:96::81";
const SERVICE_PORT: u16 = 80;

/// An unenrolled pod `waypoint` on node2 (as Istio's waypoints are: not captured) with the
/// addresses of the unlisted pod `wp`, and its Service `waypoint` with one EndpointSlice per
/// family over them.
fn waypoint_objects(tb: &Testbed) -> String {
    let wp = tb.pod("wp");
    let mut y = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {WAYPOINT}\n  namespace: default\n  labels:\n    \
         gateway.networking.k8s.io/gateway-name: {WAYPOINT}\n\
         spec:\n  nodeName: node2\n  serviceAccountName: {WAYPOINT}\n\
         status:\n  phase: Running\n  podIP: {}\n  podIPs:\n  - ip: {}\n  - ip: {}\n\
         ---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {WAYPOINT}\n  namespace: default\n\
         spec:\n  clusterIP: 10.96.0.80\n  ports:\n  - name: mesh\n    port: {TUNNEL_PORT}\n",
        wp.ipv4, wp.ipv4, wp.ipv6
    );
    for (family, v6) in [("IPv4", false), ("IPv6", true)] {
        let _ = write!(
            y,
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  \
             name: {WAYPOINT}-{}\n  namespace: default\n  labels:\n    \
             kubernetes.io/service-name: {WAYPOINT}\naddressType: {family}\nports:\n\
             - name: mesh\n  port: {TUNNEL_PORT}\nendpoints:\n- addresses: [\"{}\"]\n",
            family.to_lowercase(),
            wp.ip(v6)
        );
    }
    y
}

/// Service `web` (dual stack, port 80 -> echo) over `legacy`, labelled to use the waypoint.
fn web_service(tb: &Testbed) -> String {
    let legacy = tb.pod("legacy");
    let mut y = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: default\n  labels:\n    \
         istio.io/use-waypoint: {WAYPOINT}\n\
         spec:\n  clusterIP: {VIP4}\n  clusterIPs: [{VIP4}, \"{VIP6}\"]\n  ports:\n  \
         - name: echo\n    port: {SERVICE_PORT}\n    targetPort: {ECHO_PORT}\n"
    );
    for (family, v6) in [("IPv4", false), ("IPv6", true)] {
        let _ = write!(
            y,
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  \
             name: web-{}\n  namespace: default\n  labels:\n    kubernetes.io/service-name: web\n\
             addressType: {family}\nports:\n- name: echo\n  port: {ECHO_PORT}\n\
             endpoints:\n- addresses: [\"{}\"]\n",
            family.to_lowercase(),
            legacy.ip(v6)
        );
    }
    y
}

/// `ambit_policy_denials_total{reason="waypoint_unavailable"}` of node1.
fn waypoint_refusals(tb: &Testbed) -> f64 {
    tb.metrics("node1").unwrap().sum(
        "ambit_policy_denials_total",
        &[("reason", "waypoint_unavailable")],
    )
}

/// Inbound connections `server`'s agent accepted so far.
fn accepted(tb: &Testbed) -> u64 {
    tb.proxy_counter("node2", "server", "inbound_accepted")
}

/// `ambit_tunnel_rejections_total{reason="not_from_waypoint"}` of node2.
fn bypass_rejections(tb: &Testbed) -> f64 {
    tb.metrics("node2").unwrap().sum(
        "ambit_tunnel_rejections_total",
        &[("reason", "not_from_waypoint")],
    )
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn a_pod_behind_a_waypoint_is_reached_only_through_it() {
    let mut pods = PodSpec::defaults();
    for p in &mut pods {
        if p.name == "server" {
            *p = p.clone().labelled("istio.io/use-waypoint", WAYPOINT);
        }
    }
    pods.push(PodSpec::unlisted("wp", "node2"));
    let mut tb = testbed_with(Options {
        pods,
        ..Options::default()
    });
    let server = tb.pod("server").clone();

    // 1. The waypoint does not exist yet: refused by the client's agent, counted, and nothing
    //    reaches the server.
    let before = (waypoint_refusals(&tb), accepted(&tb));
    for v6 in [false, true] {
        let dst = SocketAddr::new(server.ip(v6), ECHO_PORT);
        let why = tb.explain("node1", "default/client", dst).unwrap();
        assert_eq!(why["outbound"]["route"], "refuse", "{why:#}");
        let verdict = why["verdict"].as_str().unwrap();
        assert!(
            verdict.contains("waypoint_unavailable: waypoint default/waypoint has no Service"),
            "{verdict}"
        );
        let r = tb
            .request(
                "client",
                server.ip(v6),
                ECHO_PORT,
                Some("around the waypoint"),
            )
            .unwrap();
        assert_eq!(
            r.data(),
            "",
            "the server answered without its waypoint: {r:?}"
        );
    }
    assert!(
        waypoint_refusals(&tb) >= before.0 + 2.0,
        "refusals not counted: {} -> {}",
        before.0,
        waypoint_refusals(&tb)
    );
    assert_eq!(accepted(&tb), before.1, "a connection reached the server");

    // 2. The waypoint appears (Service, endpoints, a pod with its own identity serving HBONE):
    //    the same requests now go to it, CONNECT to the server's own address.
    tb.apply(&waypoint_objects(&tb)).unwrap();
    let svid = tb
        .issue_when_listed(
            "node2",
            "default",
            WAYPOINT,
            std::time::Duration::from_secs(10),
        )
        .unwrap();
    let fake = FakeHbone::start(&tb.pod("wp").netns_path(), &svid).unwrap();
    let before = accepted(&tb);
    for v6 in [false, true] {
        let dst = SocketAddr::new(server.ip(v6), ECHO_PORT);
        let why = tb.explain("node1", "default/client", dst).unwrap();
        assert_eq!(why["outbound"]["route"], "tunnel", "{why:#}");
        assert_eq!(
            why["outbound"]["peer"],
            SocketAddr::new(tb.pod("wp").ip(v6), TUNNEL_PORT).to_string()
        );
        assert_eq!(why["outbound"]["dst_id"], identity("default", WAYPOINT));
        assert_eq!(why["outbound"]["waypoint"]["name"], WAYPOINT, "{why:#}");
        let r = tb
            .request("client", server.ip(v6), ECHO_PORT, Some("via the waypoint"))
            .unwrap();
        // The fake waypoint echoes what it is sent.
        assert_eq!(r.data(), "via the waypoint", "{r:?}");
    }
    assert_eq!(
        fake.authorities(),
        vec![
            SocketAddr::new(server.ip(false), ECHO_PORT),
            SocketAddr::new(server.ip(true), ECHO_PORT)
        ],
        "the waypoint was not asked for the server's address"
    );
    assert_eq!(
        accepted(&tb),
        before,
        "the client's agent went around the waypoint"
    );

    // A Service labelled to use the waypoint: its address is what the waypoint is asked for.
    tb.apply(&web_service(&tb)).unwrap();
    for vip in [VIP4, VIP6] {
        let vip: IpAddr = vip.parse().unwrap();
        let r = tb
            .request("client", vip, SERVICE_PORT, Some("to the Service"))
            .unwrap();
        assert_eq!(r.data(), "to the Service", "{r:?}");
    }
    assert_eq!(
        fake.authorities()[2..],
        [VIP4, VIP6].map(|v| SocketAddr::new(v.parse().unwrap(), SERVICE_PORT)),
        "the waypoint was not asked for the Service's address"
    );

    // 3. Inbound on node2: a genuine mesh identity that is not the waypoint's is refused 401
    //    and counted; the waypoint's identity is let through to the server's app.
    let client_svid = tb.issue("node1", "default", "client").unwrap();
    let as_client = client_config(&client_svid, &server.identity()).unwrap();
    let as_waypoint = client_config(&svid, &server.identity()).unwrap();
    let peer = SocketAddr::new(IpAddr::V4(server.ipv4), TUNNEL_PORT);
    let target = SocketAddr::new(IpAddr::V4(server.ipv4), ECHO_PORT);
    let rejected = bypass_rejections(&tb);
    let (from_client, from_waypoint) =
        in_netns(&tb.pod("outsider").netns_path(), move || async move {
            let c = hbone::hbone_request(peer, as_client, Method::CONNECT, target, b"bypass").await;
            let w =
                hbone::hbone_request(peer, as_waypoint, Method::CONNECT, target, b"from wp").await;
            (c, w)
        })
        .unwrap();
    assert_eq!(
        from_client.0,
        Outcome::Status(StatusCode::UNAUTHORIZED),
        "{from_client:?}"
    );
    assert!(from_client.1.is_empty());
    assert_eq!(bypass_rejections(&tb), rejected + 1.0);
    assert_eq!(
        from_waypoint.0,
        Outcome::Status(StatusCode::OK),
        "{from_waypoint:?}"
    );
    assert_eq!(from_waypoint.1, b"from wp");
}
