use std::error::Error as StdError;
use std::io;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::*;
use crate::identity::testing::{spiffe, td, TestCa};

const CLIENT: &str = "spiffe://cluster.local/ns/shop/sa/client";
const SERVER: &str = "spiffe://cluster.local/ns/shop/sa/server";

fn domains() -> Arc<[TrustDomain]> {
    Arc::from(vec![td("cluster.local")])
}

/// Outcome of one handshake: what each side saw of its peer, or its error.
struct Handshake {
    server: io::Result<SpiffeId>,
    client: io::Result<(SpiffeId, Option<Vec<u8>>)>,
}

/// Runs a TLS handshake over an in-memory pipe and exchanges one byte each way.
async fn handshake(server: ServerConfig, client: ClientConfig) -> Handshake {
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let acceptor = TlsAcceptor::from(Arc::new(server));
    let connector = TlsConnector::from(Arc::new(client));
    let server = async move {
        let mut tls = acceptor.accept(server_io).await?;
        let id = peer_identity(tls.get_ref().1).map_err(io::Error::other)?;
        assert_eq!(
            tls.get_ref().1.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
        let mut buf = [0u8; 1];
        tls.read_exact(&mut buf).await?;
        tls.write_all(&buf).await?;
        tls.flush().await?;
        Ok(id)
    };
    let client = async move {
        let mut tls = connector.connect(server_name(), client_io).await?;
        let id = peer_identity(tls.get_ref().1).map_err(io::Error::other)?;
        let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        tls.write_all(b"x").await?;
        tls.flush().await?;
        let mut buf = [0u8; 1];
        tls.read_exact(&mut buf).await?;
        Ok((id, alpn))
    };
    let (server, client) = tokio::join!(server, client);
    Handshake { server, client }
}

/// The SVID verdict carried inside a failed handshake's io::Error, if any.
fn svid_error(err: &io::Error) -> Option<&SvidError> {
    let mut source: Option<&(dyn StdError + 'static)> = err.get_ref().map(|e| e as _);
    while let Some(e) = source {
        if let Some(rustls::Error::InvalidCertificate(CertificateError::Other(other))) =
            e.downcast_ref::<rustls::Error>()
        {
            return other.0.downcast_ref::<SvidError>();
        }
        source = e.source();
    }
    None
}

#[tokio::test]
async fn mutual_tls_between_two_svids_exposes_both_identities() {
    let ca = TestCa::new("cluster.local");
    let roots = Arc::new(ca.bundle());
    let server_cert = ca.svid(SERVER);
    let client_cert = ca.svid(CLIENT);
    let server = server_config(&server_cert, roots.clone(), domains()).unwrap();
    let client = client_config(&client_cert, roots, domains(), spiffe(SERVER)).unwrap();

    let outcome = handshake(server, client).await;
    assert_eq!(outcome.server.unwrap(), spiffe(CLIENT));
    let (server_id, alpn) = outcome.client.unwrap();
    assert_eq!(server_id, spiffe(SERVER));
    assert_eq!(alpn.as_deref(), Some(ALPN_H2));
}

#[tokio::test]
async fn client_rejects_server_with_the_wrong_identity() {
    let ca = TestCa::new("cluster.local");
    let roots = Arc::new(ca.bundle());
    let impostor = ca.svid("spiffe://cluster.local/ns/shop/sa/impostor");
    let server = server_config(&impostor, roots.clone(), domains()).unwrap();
    let client = client_config(&ca.svid(CLIENT), roots, domains(), spiffe(SERVER)).unwrap();

    let outcome = handshake(server, client).await;
    let err = outcome.client.unwrap_err();
    let verdict = svid_error(&err).expect("svid error inside the io error");
    assert!(
        matches!(verdict, SvidError::PeerIdentityMismatch { expected, actual }
            if *expected == spiffe(SERVER) && actual.service_account() == "impostor"),
        "{verdict:?}"
    );
    assert!(outcome.server.is_err());
}

#[tokio::test]
async fn server_rejects_client_from_another_ca() {
    let ca = TestCa::new("cluster.local");
    let rogue = TestCa::new("cluster.local");
    let roots = Arc::new(ca.bundle());
    let server = server_config(&ca.svid(SERVER), roots.clone(), domains()).unwrap();
    let client = client_config(&rogue.svid(CLIENT), roots, domains(), spiffe(SERVER)).unwrap();

    let outcome = handshake(server, client).await;
    let err = outcome.server.unwrap_err();
    let verdict = svid_error(&err).expect("svid error inside the io error");
    assert!(
        matches!(verdict, SvidError::UntrustedIssuer { .. }),
        "{verdict:?}"
    );
    assert!(outcome.client.is_err());
}

#[tokio::test]
async fn server_rejects_client_of_a_foreign_trust_domain() {
    let ca = TestCa::new("cluster.local");
    let roots = Arc::new(ca.bundle());
    let foreign = ca.svid("spiffe://cluster.local/ns/shop/sa/client");
    let server = server_config(
        &ca.svid(SERVER),
        roots.clone(),
        Arc::from(vec![td("other.example")]),
    )
    .unwrap();
    let client = client_config(&foreign, roots, domains(), spiffe(SERVER)).unwrap();

    let outcome = handshake(server, client).await;
    let err = outcome.server.unwrap_err();
    let verdict = svid_error(&err).expect("svid error inside the io error");
    assert!(
        matches!(verdict, SvidError::ForeignTrustDomain { .. }),
        "{verdict:?}"
    );
}

#[tokio::test]
async fn server_requires_a_client_certificate() {
    let ca = TestCa::new("cluster.local");
    let roots = Arc::new(ca.bundle());
    let server = server_config(&ca.svid(SERVER), roots.clone(), domains()).unwrap();
    let mut client = ClientConfig::builder_with_provider(PROVIDER.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ServerSvidVerifier::new(
            roots,
            domains(),
            spiffe(SERVER),
        )))
        .with_no_client_auth();
    client.alpn_protocols = vec![ALPN_H2.to_vec()];

    let outcome = handshake(server, client).await;
    let err = outcome.server.unwrap_err().to_string();
    assert!(err.contains("no certificates"), "{err}");
}

#[tokio::test]
async fn refuses_tls12_clients() {
    let ca = TestCa::new("cluster.local");
    let roots = Arc::new(ca.bundle());
    let server = server_config(&ca.svid(SERVER), roots.clone(), domains()).unwrap();
    let client =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ServerSvidVerifier::new(
                roots,
                domains(),
                spiffe(SERVER),
            )))
            .with_no_client_auth();

    let outcome = handshake(server, client).await;
    assert!(outcome.server.is_err());
    assert!(outcome.client.is_err());
}
