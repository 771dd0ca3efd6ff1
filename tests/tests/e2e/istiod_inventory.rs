//! A real agent whose inventory comes only from istiod's delta xDS: node1's agent reads the
//! fake istiod (serving from node1's network namespace with a certificate of the testbed's CA,
//! as istiod's is) while node2's keeps the file inventory. A CNI pod istiod lists on node1 is
//! enrolled; its HBONE to node2's server, learned only from xDS, carries its identity; an
//! Authorization DENY pushed for node1's pod closes the open connection and refuses new ones;
//! a malformed resource is NACKed with its error while traffic keeps flowing; and when istiod
//! restarts (drops its streams) traffic goes on and the agent resubscribes with the versions it
//! holds, `/status` showing the stream connected with its resource counts.
#![allow(
    clippy::unwrap_used,
    reason = "test bodies panic with a line number (STYLE.md §7)"
)]
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::{Duration, Instant};

use ambit::inventory::istiod::fake_istiod::{FakeIstiod, Recorded};
use ambit::inventory::istiod::model::{ADDRESS_TYPE, AUTHORIZATION_TYPE};
use ambit_e2e::netns::NetnsServer;
use ambit_e2e::{assert_eventually, testbed_with, Options, PodSpec, Testbed, ECHO_PORT};
use ambit_proto::envoy::service::discovery::v3::DeltaDiscoveryResponse;
use ambit_proto::istio::security as sec;
use ambit_proto::istio::workload as wl;
use prost::Message as _;
use serde_json::Value;

/// The fake istiod, serving from a thread inside a node's network namespace (where the agent
/// runs); stopped on drop.
struct Istiod(NetnsServer<FakeIstiod>);

impl Istiod {
    /// Starts in `netns` on 127.0.0.1 with a serving certificate for `127.0.0.1` issued by the
    /// CA in `ca_dir` (`ca-cert.pem`, `ca-key.pem`), which the agents' `rootCert` trusts.
    fn start(netns: &Path, ca_dir: &Path) -> Self {
        let cert = std::fs::read_to_string(ca_dir.join("ca-cert.pem")).unwrap();
        let key = std::fs::read_to_string(ca_dir.join("ca-key.pem")).unwrap();
        Self(
            NetnsServer::start(netns, move || async move {
                FakeIstiod::start_with_ca(&cert, &key, &["127.0.0.1"]).await
            })
            .unwrap(),
        )
    }

    fn fake(&self) -> &FakeIstiod {
        self.0.server()
    }

    /// Waits (20 s) until the requests satisfy `done`; returns them.
    fn wait(&self, tb: &Testbed, what: &str, done: impl Fn(&[Recorded]) -> bool) -> Vec<Recorded> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let all = self.fake().requests();
            if done(&all) {
                return all;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: requests {all:#?}\n{}",
                tb.agent_logs(40)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// istiod's uid of pod `name` (`cluster//Pod/namespace/name`, not the Kubernetes UID).
fn uid(name: &str) -> String {
    format!("Kubernetes//Pod/default/{name}")
}

/// The Address resource of pod `name` on `node`, HBONE, service account `name`, at `ip`.
fn workload(name: &str, node: &str, ip: Ipv4Addr) -> Vec<u8> {
    let w = wl::Workload {
        uid: uid(name),
        name: name.into(),
        namespace: "default".into(),
        addresses: vec![ip.octets().to_vec()],
        tunnel_protocol: wl::TunnelProtocol::Hbone.into(),
        service_account: name.into(),
        node: node.into(),
        ..wl::Workload::default()
    };
    wl::Address {
        r#type: Some(wl::address::Type::Workload(w)),
    }
    .encode_to_vec()
}

/// A namespace-wide DENY of connections from `principal` (istiod's form, without `spiffe://`).
fn deny(principal: &str) -> Vec<u8> {
    let exact = sec::StringMatch {
        match_type: Some(sec::string_match::MatchType::Exact(principal.into())),
    };
    sec::Authorization {
        name: "deny-server".into(),
        namespace: "default".into(),
        scope: sec::Scope::Namespace.into(),
        action: sec::Action::Deny.into(),
        rules: vec![sec::Rule {
            clauses: vec![sec::Clause {
                matches: vec![sec::Match {
                    principals: vec![exact],
                    ..sec::Match::default()
                }],
            }],
        }],
        ..sec::Authorization::default()
    }
    .encode_to_vec()
}

/// node1's `inventory.istiod` status section.
fn xds_status(tb: &Testbed) -> Value {
    tb.status("node1").unwrap().0["inventory"]["istiod"].clone()
}

/// Whether an echo of `text` from `pod` to `ip` comes back whole.
fn echoes(tb: &Testbed, pod: &str, ip: Ipv4Addr, text: &str) -> bool {
    let r = tb
        .request(pod, IpAddr::V4(ip), ECHO_PORT, Some(text))
        .unwrap();
    r.data() == text
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn an_agent_fed_by_istiod_enrolls_tunnels_enforces_nacks_and_survives_istiod_restarts() {
    let mut tb = testbed_with(Options {
        pods: vec![PodSpec::new("server", "node2", true, true)],
        cni: true,
        ..Options::default()
    });
    let ca_dir = tb.state().ca().unwrap().cert_dir.clone();
    let istiod = Istiod::start(&tb.node("node1").netns_path(), &ca_dir);
    let fake = istiod.fake();
    // istiod lists the CNI pod (at the first address host-local hands out on node1: the
    // model refuses a Workload without addresses) and node2's server.
    let server_ip = tb.pod("server").ipv4;
    let pod_ip = ambit_e2e::net::pod_v4(tb.node("node1").index, 200);
    fake.push(
        ADDRESS_TYPE,
        &[
            (uid("cnipod").as_str(), workload("cnipod", "node1", pod_ip)),
            (
                uid("server").as_str(),
                workload("server", "node2", server_ip),
            ),
        ],
        &[],
    );
    tb.restart_agent_with(
        "node1",
        &format!(
            "inventory: {{kind: istiod, address: \"{}\"}}\nredirectionAnnotation: false\n",
            fake.addr()
        ),
    )
    .unwrap();
    // One stream, subscribed to both types with the node's token, both first pushes ACKed.
    let first = istiod.wait(&tb, "first pushes ACKed", |r| {
        [ADDRESS_TYPE, AUTHORIZATION_TYPE]
            .iter()
            .all(|t| r.iter().any(|q| q.type_url == *t && q.is_ack()))
    });
    assert!(first.iter().all(|q| q.stream == 1), "{first:#?}");
    assert!(
        first.iter().all(|q| q
            .authorization
            .as_deref()
            .is_some_and(|a| a.starts_with("Bearer "))),
        "{first:#?}"
    );

    // The CNI pod is enrolled: the workload from istiod, the netns and address from the chain.
    let sandbox = tb.add_cni_pod("cnipod", "node1").unwrap();
    assert_eq!(sandbox.pod.ipv4, pod_ip);
    let st = tb.status("node1").unwrap();
    let entry = st.pod("cnipod").unwrap_or_else(|| panic!("{}", st.0));
    assert_eq!(entry["state"], "enrolled", "{entry}");
    assert_eq!(
        entry["ips"],
        serde_json::json!([pod_ip.to_string()]),
        "{entry}"
    );
    // node2's inventory learns the address from the pod's status.
    tb.report_cni_pod_ip(&sandbox).unwrap();

    // HBONE to node2's server, which node1 knows only from istiod: mTLS with both identities.
    let (me, them) = (sandbox.pod.identity(), tb.pod("server").identity());
    let marker = ambit_e2e::unique_marker();
    assert!(
        echoes(&tb, "cnipod", server_ip, &marker),
        "{}",
        tb.agent_logs(40)
    );
    let held_out = tb
        .hold("cnipod", IpAddr::V4(server_ip), ECHO_PORT, &marker)
        .unwrap();
    let tunnelled = |tb: &Testbed| {
        tb.connections("node2").unwrap().iter().any(|c| {
            c.direction == "inbound"
                && c.pod == "default/server"
                && c.security == "mutual_tls"
                && c.src_identity.as_deref() == Some(me.as_str())
        })
    };
    assert_eventually!(
        tunnelled(&tb),
        "node2 lists no mTLS connection from {me}: {:?}",
        tb.connections("node2")
    );
    assert!(
        tb.connections("node1").unwrap().iter().any(|c| {
            c.direction == "outbound" && c.dst_identity.as_deref() == Some(them.as_str())
        }),
        "{:?}",
        tb.connections("node1")
    );

    // node1's pod as a destination: node2's server reaches it, then istiod's DENY of the
    // server's principal closes the open connection and refuses new ones.
    let _echo = tb.start_echo_server("cnipod", ECHO_PORT).unwrap();
    assert_eventually!(
        echoes(&tb, "server", pod_ip, "to node1"),
        "node2's server cannot reach cnipod: {}",
        tb.agent_logs(40)
    );
    let held_in = tb
        .hold("server", IpAddr::V4(pod_ip), ECHO_PORT, "open")
        .unwrap();
    let inbound = |tb: &Testbed| {
        tb.connections("node1").unwrap().iter().any(|c| {
            c.direction == "inbound"
                && c.pod == "default/cnipod"
                && c.src_identity.as_deref() == Some(them.as_str())
        })
    };
    assert_eventually!(inbound(&tb), "node1 lists no inbound connection");
    let principal = them.trim_start_matches("spiffe://").to_string();
    fake.push(
        AUTHORIZATION_TYPE,
        &[("default/deny-server", deny(&principal))],
        &[],
    );
    assert_eventually!(
        !inbound(&tb),
        "the denied connection is still open: {:?}",
        tb.connections("node1")
    );
    drop(held_in);
    assert!(!echoes(&tb, "server", pod_ip, "denied"));
    // The other direction is node2's policy: untouched.
    assert!(echoes(&tb, "cnipod", server_ip, "still allowed"));

    // A malformed resource is NACKed with its error; the rest stays in force.
    let nonces = fake.push_raw(DeltaDiscoveryResponse {
        system_version_info: "bad".into(),
        type_url: ADDRESS_TYPE.into(),
        resources: vec![ambit::inventory::istiod::fake_istiod::resource(
            ADDRESS_TYPE,
            &uid("garbage"),
            "bad",
            b"\xff\xff not an address".to_vec(),
        )],
        ..DeltaDiscoveryResponse::default()
    });
    assert_eq!(nonces.len(), 1, "one stream open");
    let all = istiod.wait(&tb, "the NACK", |r| {
        r.iter()
            .any(|q| q.response_nonce == nonces[0] && q.is_nack())
    });
    let nack = all.iter().find(|q| q.response_nonce == nonces[0]).unwrap();
    let text = nack.error.clone().unwrap();
    assert!(
        text.contains(&uid("garbage")) && text.contains("decode"),
        "{text}"
    );
    let st = xds_status(&tb);
    assert!(st["nacks"].as_u64() >= Some(1), "{st}");
    assert!(
        st["types"][ADDRESS_TYPE]["last_nack"]
            .as_str()
            .is_some_and(|n| n.contains(&uid("garbage"))),
        "{st}"
    );
    assert!(echoes(&tb, "cnipod", server_ip, "after the nack"));
    assert!(!echoes(&tb, "server", pod_ip, "still denied"));

    // istiod restarts: no interruption, and a second stream resumes with what the agent holds.
    fake.drop_streams();
    assert!(echoes(&tb, "cnipod", server_ip, "during the restart"));
    let all = istiod.wait(&tb, "the resumed stream's ACKs", |r| {
        [ADDRESS_TYPE, AUTHORIZATION_TYPE].iter().all(|t| {
            r.iter()
                .any(|q| q.stream == 2 && q.type_url == *t && q.is_ack())
        })
    });
    let resumed = all
        .iter()
        .find(|q| q.stream == 2 && q.type_url == ADDRESS_TYPE && q.response_nonce.is_empty())
        .unwrap();
    let held: Vec<&str> = resumed
        .initial_resource_versions
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(held, [uid("cnipod"), uid("server")], "{resumed:#?}");
    let policies = all
        .iter()
        .find(|q| q.stream == 2 && q.type_url == AUTHORIZATION_TYPE && q.response_nonce.is_empty())
        .unwrap();
    assert!(
        policies
            .initial_resource_versions
            .contains_key("default/deny-server"),
        "{policies:#?}"
    );
    assert_eventually!(
        xds_status(&tb)["state"] == "connected",
        "{}",
        xds_status(&tb)
    );
    let st = xds_status(&tb);
    assert_eq!(st["types"][ADDRESS_TYPE]["resources"], 2, "{st}");
    assert_eq!(st["types"][AUTHORIZATION_TYPE]["resources"], 1, "{st}");
    assert!(st["reconnects"].as_u64() >= Some(1), "{st}");
    assert!(
        st["types"][ADDRESS_TYPE]["last_ack_version"].is_string(),
        "{st}"
    );
    let metrics = tb.metrics("node1").unwrap();
    assert!(metrics.sum("ambit_xds_reconnects_total", &[]) >= 1.0);
    assert!(metrics.sum("ambit_xds_nacks_total", &[]) >= 1.0);
    // The connection held across the restart is still there, and so is the policy.
    assert!(tunnelled(&tb), "{:?}", tb.connections("node2"));
    assert!(echoes(&tb, "cnipod", server_ip, "after the restart"));
    assert!(!echoes(&tb, "server", pod_ip, "denied after the restart"));
    assert_eq!(
        tb.status("node1").unwrap().pod_state("cnipod"),
        Some("enrolled")
    );
    drop(held_out);
}
