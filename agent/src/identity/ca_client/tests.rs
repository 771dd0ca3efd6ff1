//! Loopback: the client and the CA over real TLS + gRPC on 127.0.0.1, and bad input on the port.
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::*;
use crate::ca::server::RunningCa;
use crate::ca::testing::{spiffe, Fixture};
use crate::identity::CertificateAuthority;

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const DB: &str = "spiffe://cluster.local/ns/shop/sa/db";

async fn started() -> (Fixture, RunningCa) {
    let f = Fixture::new(Duration::from_secs(3600));
    let ca = f.start(SocketAddr::from(([127, 0, 0, 1], 0))).await;
    (f, ca)
}

#[tokio::test]
async fn obtains_certificate_over_tls_and_grpc() {
    let (f, ca) = started().await;
    let client = CaClient::new(f.client_config(ca.local_addr(), "node1")).unwrap();
    let issued = client.fetch(&spiffe(WEB)).await.unwrap();
    assert_eq!(issued.certificate.id(), &spiffe(WEB));
    assert!(issued.certificate.is_valid_at(SystemTime::now()));
    assert_eq!(issued.roots.roots(), f.roots.roots());
    // A second request reuses the channel and gets a fresh key and serial.
    let again = client.fetch(&spiffe(WEB)).await.unwrap();
    assert_ne!(again.certificate.serial(), issued.certificate.serial());
    assert_eq!(f.service.stats().snapshot().issued, 2);
}

#[tokio::test]
async fn reports_the_cas_refusal_with_its_reason() {
    let (f, ca) = started().await;
    let client = CaClient::new(f.client_config(ca.local_addr(), "node1")).unwrap();
    let err = client.fetch(&spiffe(DB)).await.unwrap_err();
    let ClientError::Refused { source, .. } = &err else {
        panic!("{err}")
    };
    assert_eq!(source.code(), tonic::Code::PermissionDenied);
    assert!(
        source
            .message()
            .contains("no pod with that identity runs on node node1"),
        "{}",
        source.message()
    );
}

#[tokio::test]
async fn refuses_ca_whose_certificate_does_not_chain_to_the_configured_root() {
    let (f, ca) = started().await;
    let other = Fixture::new(Duration::from_secs(3600));
    let mut cfg = f.client_config(ca.local_addr(), "node1");
    cfg.root_cert = other
        .dir
        .path()
        .join("certs")
        .join(crate::ca::material::ROOT_CERT);
    let err = CaClient::new(cfg)
        .unwrap()
        .fetch(&spiffe(WEB))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Unreachable { .. } | ClientError::Transport { .. }
        ),
        "{err}"
    );
    let chain = crate::ca::service::chain(&err);
    assert!(chain.contains("certificate"), "{chain}");
    assert_eq!(f.service.stats().snapshot().issued, 0);
}

#[tokio::test]
async fn refuses_a_leaf_for_another_identity_than_requested() {
    let (f, ca) = started().await;
    let client = CaClient::new(f.client_config(ca.local_addr(), "node1")).unwrap();
    // A CA that certifies our key under another name.
    let rogue = CertificateAuthority::generate_root(
        "cluster.local".parse().unwrap(),
        Duration::from_secs(600),
        SystemTime::now(),
    )
    .unwrap();
    let asked = spiffe(WEB);
    let generated = new_csr(&spiffe(DB)).unwrap();
    let csr = crate::identity::Csr::from_der(generated.csr.as_ref()).unwrap();
    let chain = rogue
        .sign(
            &csr,
            &spiffe(DB),
            Duration::from_secs(600),
            SystemTime::now(),
        )
        .unwrap();
    let response = IstioCertificateResponse {
        cert_chain: vec![pem_block("CERTIFICATE", &chain[0]), rogue.roots().to_pem()],
    };
    // Our roots come along, so only the name is wrong.
    let trusted = rogue.roots().merged(&f.roots);
    let err = client
        .check(&asked, response, generated.key, &trusted)
        .unwrap_err();
    assert!(matches!(err, ClientError::IdentityMismatch { .. }), "{err}");
    // A response without roots is refused too.
    let err = client
        .check(
            &asked,
            IstioCertificateResponse { cert_chain: vec![] },
            new_csr(&asked).unwrap().key,
            &f.roots,
        )
        .unwrap_err();
    assert!(matches!(err, ClientError::ShortChain { .. }), "{err}");
}

#[tokio::test]
async fn keeps_serving_after_garbage_plaintext_and_silence_on_the_port() {
    let (f, ca) = started().await;
    let addr = ca.local_addr();
    // Garbage bytes.
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"\x16\x03\x01\x00\x05hello garbage \x00\xff\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf)).await;
    // Plaintext HTTP/2 (a gRPC client without TLS).
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf)).await;
    // A silent connection stays open while we are served.
    let _silent = tokio::net::TcpStream::connect(addr).await.unwrap();

    let client = CaClient::new(f.client_config(addr, "node1")).unwrap();
    client.fetch(&spiffe(WEB)).await.unwrap();
    // The handshake tasks count just after answering with an alert: allow them a moment.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let stats = f.service.stats().snapshot();
        if stats.refused.get("tls_handshake_failed") == Some(&2) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{stats:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn refuses_oversized_request_over_grpc_with_a_reason() {
    let (f, ca) = started().await;
    let cfg = f.client_config(ca.local_addr(), "node1");
    let client = CaClient::new(cfg).unwrap();
    let (channel, _) = client.target.channel().await.unwrap();
    let token = std::fs::read_to_string(&client.config().token_file).unwrap();
    for size in [70 * 1024, 200 * 1024] {
        let mut request = tonic::Request::new(IstioCertificateRequest::impersonating(
            "A".repeat(size),
            0,
            WEB,
        ));
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        grpc.ready().await.unwrap();
        let status = grpc
            .unary::<_, IstioCertificateResponse, _>(
                request,
                PathAndQuery::from_static(CREATE_CERTIFICATE_PATH),
                ProstCodec::default(),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(
                status.code(),
                tonic::Code::InvalidArgument | tonic::Code::OutOfRange
            ),
            "{size}: {status:?}"
        );
        assert!(
            status.message().contains("bytes"),
            "{size}: {}",
            status.message()
        );
    }
    // Still serving.
    client.fetch(&spiffe(WEB)).await.unwrap();
}

#[test]
fn parses_addresses() {
    let cfg = |address: &str| CaClientConfig {
        address: address.into(),
        root_cert: "/r".into(),
        root_cert_poll_ms: 2_000,
        token_file: "/t".into(),
        cluster_id: None,
        server_name: None,
        ttl_secs: 60,
        timeout_ms: 1000,
    };
    let client = CaClient::new(cfg("ambit-ca.ambit-system.svc")).unwrap();
    assert_eq!(
        (client.target.host(), client.target.port()),
        ("ambit-ca.ambit-system.svc", 15012)
    );
    let client = CaClient::new(cfg("https://[::1]:9000")).unwrap();
    assert_eq!((client.target.host(), client.target.port()), ("::1", 9000));
    assert!(CaClient::new(cfg("http://ca:15012")).is_err());
    assert!(CaClient::new(cfg("https://ca:15012/path")).is_err());
}

#[tokio::test]
async fn sends_the_configured_cluster_id_and_the_ca_checks_it() {
    use crate::ca::service::ClusterPolicy;
    let f = Fixture::in_cluster(
        Duration::from_secs(3600),
        ClusterPolicy {
            id: "east".into(),
            required: true,
        },
    );
    let ca = f.start(SocketAddr::from(([127, 0, 0, 1], 0))).await;
    let with = |cluster: Option<&str>| {
        let mut cfg = f.client_config(ca.local_addr(), "node1");
        cfg.cluster_id = cluster.map(str::to_owned);
        CaClient::new(cfg).unwrap()
    };
    with(Some("east")).fetch(&spiffe(WEB)).await.unwrap();
    for (cluster, want) in [
        (
            None,
            "request has no ClusterID metadata; this ca requires cluster id \"east\"",
        ),
        (
            Some("west"),
            "sent ClusterID \"west\": this ca serves cluster \"east\" only",
        ),
    ] {
        let err = with(cluster).fetch(&spiffe(WEB)).await.unwrap_err();
        let ClientError::Refused { source, .. } = &err else {
            panic!("{cluster:?}: {err}")
        };
        assert_eq!(source.code(), tonic::Code::Unauthenticated);
        assert!(source.message().contains(want), "{}", source.message());
    }
    assert_eq!(f.service.stats().snapshot().issued, 1);

    for bad in ["", "two words", "caf\u{e9}"] {
        let mut cfg = f.client_config(ca.local_addr(), "node1");
        cfg.cluster_id = Some(bad.into());
        assert!(
            matches!(CaClient::new(cfg), Err(ClientError::ClusterId { .. })),
            "{bad:?} accepted"
        );
    }
}
