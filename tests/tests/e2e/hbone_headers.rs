//! The headers of HBONE CONNECTs as ztunnel sends them: an enrolled pod's CONNECT carries
//! `baggage` (its workload), a fresh `traceparent` and `forwarded` (its own address), and the
//! trace id lands in the access log; inbound, what a peer writes in `forwarded` or `baggage`
//! changes neither the source the app sees nor the one policy decides on.
#![allow(
    clippy::unwrap_used,
    reason = "test bodies panic with a line number (STYLE.md §7)"
)]
use std::net::{IpAddr, SocketAddr};

use ambit_e2e::hbone::{self, client_config, in_netns, FakeHbone, Issue as _, Outcome};
use ambit_e2e::policy::foreign_pod;
use ambit_e2e::{
    assert_eventually, testbed, testbed_with, Options, PodSpec, ECHO_PORT, PEER_PORT, TUNNEL_PORT,
};
use http::{Method, StatusCode};

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn an_enrolled_pods_connect_carries_its_workload_a_trace_and_its_address() {
    let mut pods = PodSpec::defaults();
    pods.push(PodSpec::unlisted("recorder", "node2"));
    let mut tb = testbed_with(Options {
        pods,
        ..Options::default()
    });
    let recorder = tb.pod("recorder").clone();
    let client = tb.pod("client").clone();
    // The recorder stands in for a peer ztunnel or waypoint: genuine mesh certificate, and
    // the inventory names its addresses as an enrolled pod with that identity on a node
    // without an agent, so node1's agent tunnels straight to it.
    let svid = tb.issue("node2", "default", "legacy").unwrap();
    let fake = FakeHbone::start(&recorder.netns_path(), &svid).unwrap();
    let ips = [IpAddr::V4(recorder.ipv4), IpAddr::V6(recorder.ipv6)];
    tb.apply(&foreign_pod("recorder", "node3", "legacy", &ips))
        .unwrap();

    for ip in ips {
        let r = tb.request("client", ip, ECHO_PORT, Some("hello")).unwrap();
        assert_eq!(r.data(), "hello", "{r:?}");
    }
    let got = fake.received();
    assert_eq!(got.len(), 2, "{got:?}");
    let mut traces = Vec::new();
    for (r, client_ip) in got
        .iter()
        .zip([IpAddr::V4(client.ipv4), IpAddr::V6(client.ipv6)])
    {
        assert_eq!(r.baggage().cluster, "Kubernetes", "{r:?}");
        assert_eq!(r.baggage().namespace, "default", "{r:?}");
        assert_eq!(r.baggage().pod, "client", "{r:?}");
        assert_eq!(r.baggage().service, "client", "{r:?}");
        assert_eq!(r.baggage().version, "latest", "{r:?}");
        // `for=` is the client's own address (its pod IP of the family it dialled), quoted.
        let fwd = r.forwarded().unwrap_or_default();
        let want = match client_ip {
            IpAddr::V4(a) => format!("for=\"{a}:"),
            IpAddr::V6(a) => format!("for=\"[{a}]:"),
        };
        assert!(fwd.starts_with(&want), "forwarded {fwd:?}, want {want}…");
        traces.push(r.trace.expect("no valid traceparent").trace_id());
    }
    assert_ne!(traces[0], traces[1], "two connections share a trace");
    // The client's agent logs the trace id it sent, so the two sides' lines can be joined.
    let logs = tb.agent_logs(400);
    for t in &traces {
        assert!(
            logs.contains(&format!("trace_id=\"{t}\"")),
            "trace {t} is not in the access log"
        );
    }
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn a_peers_forwarded_header_changes_neither_the_source_nor_the_policy() {
    let mut tb = testbed();
    let server = tb.pod("server").clone();
    let outsider = tb.pod("outsider").clone();
    let s_ip = IpAddr::V4(server.ipv4);
    let peer = SocketAddr::new(s_ip, TUNNEL_PORT);
    // A genuine client identity used from the outsider pod (not enrolled: its connections to
    // 15008 are its own), lying about where it comes from.
    let svid = tb.issue("node1", "default", "client").unwrap();
    let tls = client_config(&svid, &server.identity()).unwrap();
    let lie: [(&'static str, &str); 3] = [
        (
            "forwarded",
            "for=\"203.0.113.9:4000\";host=server.default.svc.cluster.local",
        ),
        ("x-forwarded-for", "203.0.113.9"),
        (
            "baggage",
            "k8s.namespace.name=kube-system,k8s.pod.name=trusted",
        ),
    ];
    let connect = |port: u16, send: &'static [u8]| {
        let tls = tls.clone();
        in_netns(&outsider.netns_path(), move || async move {
            hbone::hbone_request_with(
                peer,
                tls,
                Method::CONNECT,
                SocketAddr::new(s_ip, port),
                &lie,
                send,
            )
            .await
        })
        .unwrap()
    };

    // The app sees the outsider's own address.
    let (outcome, body) = connect(PEER_PORT, b"");
    assert!(outcome.accepted(), "{outcome:?}");
    let report = String::from_utf8_lossy(&body).to_string();
    assert!(
        report.starts_with(&format!("peer={}:", outsider.ipv4)),
        "the app saw {report:?}, not the outsider's address"
    );
    assert!(!report.contains("203.0.113.9"), "{report:?}");

    // Policy decides on the real source: an ALLOW for the claimed address only refuses it.
    tb.apply(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  \
         name: only-claimed\n  namespace: default\nspec:\n  selector:\n    matchLabels:\n      \
         app: server\n  action: ALLOW\n  rules:\n  - from:\n    - source:\n        \
         ipBlocks: [203.0.113.9/32]\n",
    )
    .unwrap();
    assert_eventually!(
        connect(ECHO_PORT, b"let me in").0 == Outcome::Status(StatusCode::UNAUTHORIZED),
        "the forged forwarded address passed an ALLOW for that address"
    );
}
