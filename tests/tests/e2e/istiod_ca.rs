//! The agent against a CA configured as istiod is: tokens of audience `istio-ca` and a required
//! `ClusterID` (a multi-cluster istiod's `CLUSTER_ID`). The testbed's `ambit ca` plays istiod
//! (`tokens.audiences: [istio-ca]`, `tokens.clusterId`, `requireClusterId`), the agents are
//! configured as `deploy/istio` configures them (`ca.clusterId`, an `istio-ca` token): they
//! get their certificates and carry mTLS traffic; a request naming another cluster or none, or
//! with a token for `ambit ca`'s audience, is refused, saying why.
#![allow(
    clippy::unwrap_used,
    reason = "test bodies panic with a line number (STYLE.md §7)"
)]
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use ambit::identity::{CaClient, CaClientConfig, SpiffeId};
use ambit_e2e::hbone::{in_netns, Issue as _};
use ambit_e2e::{error_chain, testbed_with, Options, Testbed, ECHO_PORT};

/// istiod's token audience (its `TOKEN_AUDIENCES` default).
const ISTIO_AUDIENCE: &str = "istio-ca";
/// The cluster the CA serves.
const CLUSTER: &str = "east";

/// Asks the CA for `server`'s certificate with node2's `token`, sending `cluster` as
/// `ClusterID`; the error chain on refusal.
fn fetch(tb: &Testbed, token: PathBuf, cluster: Option<&str>) -> Result<(), String> {
    let ca = tb.state().ca().unwrap().clone();
    let cfg = CaClientConfig {
        address: ca.addr.to_string(),
        root_cert: ca.cert_dir.join("root-cert.pem"),
        root_cert_poll_ms: 2_000,
        token_file: token,
        cluster_id: cluster.map(str::to_owned),
        server_name: None,
        ttl_secs: 3600,
        timeout_ms: 5000,
    };
    let id: SpiffeId = tb.pod("server").identity().parse().unwrap();
    let node2 = tb.node("node2").netns_path();
    in_netns(&node2, move || async move {
        let client = CaClient::new(cfg).map_err(|e| error_chain(&e))?;
        client
            .fetch(&id)
            .await
            .map(drop)
            .map_err(|e| error_chain(&e))
    })
    .unwrap()
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn agents_take_certificates_from_a_ca_that_wants_istiods_audience_and_cluster_id() {
    let tb = testbed_with(Options {
        ca_audience: ISTIO_AUDIENCE.into(),
        cluster_id: Some(CLUSTER.into()),
        ..Options::default()
    });
    // The agents' config says so, as deploy/istio's does.
    let config = std::fs::read_to_string(&tb.node("node1").config).unwrap();
    assert!(
        config.contains(&format!("clusterId: {CLUSTER}")),
        "{config}"
    );

    // Both agents hold their pod's certificate, and mTLS traffic flows between them.
    for (node, pod) in [("node1", "client"), ("node2", "server")] {
        let id = tb.pod(pod).identity();
        let cert = tb.cert(node, &id);
        assert!(
            cert.as_ref().is_some_and(|c| c.state == "available"),
            "{node}: {cert:?}"
        );
    }
    let server = IpAddr::V4(tb.pod("server").ipv4);
    let r = tb
        .request("client", server, ECHO_PORT, Some("via istiod"))
        .unwrap();
    assert_eq!(r.data(), "via istiod", "{r:?}\n{}", tb.agent_logs(20));

    // The agent's own token and cluster: signed.
    let token = tb.node("node2").token_file.clone();
    fetch(&tb, token.clone(), Some(CLUSTER)).unwrap();
    assert_eq!(
        tb.issue("node2", "default", "server")
            .unwrap()
            .cert
            .id()
            .to_string(),
        tb.pod("server").identity()
    );
    // Another cluster, or none: refused, saying which cluster this CA serves.
    // (The CA's message is quoted in the error chain, its own quotes escaped.)
    for (cluster, why) in [
        (
            Some("west"),
            ["sent ClusterID", "west", "this ca serves cluster", "east"],
        ),
        (
            None,
            [
                "request has no ClusterID metadata",
                "requires cluster id",
                "east",
                "",
            ],
        ),
    ] {
        let err = fetch(&tb, token.clone(), cluster).unwrap_err();
        assert!(why.iter().all(|w| err.contains(w)), "{cluster:?}: {err}");
    }
    // A token minted for `ambit ca`'s audience: refused, naming the audience expected.
    let issuer = ambit_e2e::ca::issuer(tb.state().ca().unwrap()).unwrap();
    let wrong = tb.state().dir.join("ambit-ca-audience.token");
    let text = ambit_e2e::ca::node_token_for(
        &issuer,
        "node2",
        ambit_e2e::ca::AUDIENCE,
        Duration::from_secs(600),
    )
    .unwrap();
    std::fs::write(&wrong, text).unwrap();
    let err = fetch(&tb, wrong, Some(CLUSTER)).unwrap_err();
    assert!(
        err.contains("has audience")
            && err.contains(ambit_e2e::ca::AUDIENCE)
            && err.contains(ISTIO_AUDIENCE),
        "{err}"
    );
}
