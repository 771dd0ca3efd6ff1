//! Test fixtures: a CA with a generated root, a token issuer and an inventory, in a temp dir.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::sign::CertifiedKey;
use tokio::sync::watch;

use crate::ca::material::{Material, ServingNames, ROOT_CERT};
use crate::ca::server::RunningCa;
use crate::ca::service::{CaService, ClusterPolicy};
use crate::ca::token::{Jwks, TokenVerifier};
use crate::identity::ca_client::CaClientConfig;
use crate::identity::{SpiffeId, TrustBundle};
use crate::inventory::{self, Snapshot};
use ambit_testbed::issuer::{ServiceAccountClaims, TokenIssuer};

pub(crate) const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
pub(crate) const AGENT_NS: &str = "ambit-system";
pub(crate) const AGENT_SA: &str = "ambit";

/// `shop/web` runs on node1 (twice), `shop/db` only on node2.
pub(crate) const INVENTORY: &str = "\
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop}
spec: {nodeName: node1, serviceAccountName: web}
status: {podIP: 10.0.1.5}
---
apiVersion: v1
kind: Pod
metadata: {name: web-2, namespace: shop}
spec: {nodeName: node1, serviceAccountName: web}
status: {podIP: 10.0.1.6}
---
apiVersion: v1
kind: Pod
metadata: {name: db-1, namespace: shop}
spec: {nodeName: node2, serviceAccountName: db}
status: {podIP: 10.0.2.5}
";

/// A directory under the system temp dir, removed on drop.
pub(crate) struct TestDir(PathBuf);

impl TestDir {
    pub(crate) fn new(tag: &str) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("ambit-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A CA (service not yet listening), its issuer, and where its files are.
pub(crate) struct Fixture {
    pub(crate) dir: TestDir,
    pub(crate) issuer: TokenIssuer,
    pub(crate) service: Arc<CaService>,
    pub(crate) inventory: watch::Sender<Arc<Snapshot>>,
    pub(crate) serving: Arc<CertifiedKey>,
    pub(crate) roots: TrustBundle,
}

impl Fixture {
    /// A CA for `cluster.local` granting at most `max_ttl`, with [`INVENTORY`].
    pub(crate) fn new(max_ttl: Duration) -> Self {
        Self::build(max_ttl, None)
    }

    /// Like [`Fixture::new`], serving the cluster of `policy`.
    pub(crate) fn in_cluster(max_ttl: Duration, policy: ClusterPolicy) -> Self {
        Self::build(max_ttl, Some(policy))
    }

    fn build(max_ttl: Duration, cluster: Option<ClusterPolicy>) -> Self {
        let dir = TestDir::new("ca");
        let trust_domain = "cluster.local".parse().unwrap();
        let names = ServingNames {
            dns: vec!["ambit-ca".into()],
            ips: vec!["127.0.0.1".parse().unwrap()],
        };
        let material = Material::load(
            &dir.path().join("certs"),
            Some(Duration::from_secs(3600)),
            trust_domain,
            &names,
            SystemTime::now(),
        )
        .unwrap();
        let issuer = TokenIssuer::generate(ISSUER).unwrap();
        let jwks = Jwks::parse(Path::new("jwks.json"), &issuer.jwks()).unwrap();
        let tokens = TokenVerifier::new(
            ISSUER.into(),
            vec!["ambit-ca".into()],
            vec![format!("system:serviceaccount:{AGENT_NS}:{AGENT_SA}")],
            Duration::from_secs(60),
            jwks,
        );
        let snapshot = inventory::file::parse(Path::new("inventory.yaml"), INVENTORY).unwrap();
        let (inventory, rx) = watch::channel(Arc::new(snapshot));
        let mut service = CaService::new(
            material.authority,
            &material.roots,
            tokens,
            rx,
            max_ttl,
            max_ttl,
        );
        if let Some(cluster) = cluster {
            service = service.with_cluster(cluster);
        }
        let service = Arc::new(service);
        Self {
            dir,
            issuer,
            service,
            inventory,
            serving: material.serving,
            roots: material.roots,
        }
    }

    /// A node agent's token for `node`.
    pub(crate) fn token(&self, node: &str) -> String {
        self.issuer
            .token(&ServiceAccountClaims {
                namespace: AGENT_NS.into(),
                service_account: AGENT_SA.into(),
                node: node.into(),
                audiences: vec!["ambit-ca".into()],
                issued_at: SystemTime::now(),
                ttl: Duration::from_secs(3600),
            })
            .unwrap()
    }

    /// Starts serving on `addr` (port 0: any).
    pub(crate) async fn start(&self, addr: SocketAddr) -> RunningCa {
        self.start_with(addr, crate::ca::server::CaLimits::default())
            .await
    }

    /// Starts serving on `addr` with `limits`.
    pub(crate) async fn start_with(
        &self,
        addr: SocketAddr,
        limits: crate::ca::server::CaLimits,
    ) -> RunningCa {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        RunningCa::spawn(listener, self.service.clone(), self.serving.clone(), limits).unwrap()
    }

    /// Client settings for node `node`'s agent talking to `addr` (writes the token file).
    pub(crate) fn client_config(&self, addr: SocketAddr, node: &str) -> CaClientConfig {
        let token_file = self.dir.path().join(format!("token-{node}"));
        std::fs::write(&token_file, self.token(node)).unwrap();
        CaClientConfig {
            address: format!("https://{addr}"),
            root_cert: self.dir.path().join("certs").join(ROOT_CERT),
            root_cert_poll_ms: 2_000,
            token_file,
            cluster_id: None,
            server_name: None,
            ttl_secs: 0,
            timeout_ms: 5_000,
        }
    }
}

pub(crate) fn spiffe(s: &str) -> SpiffeId {
    s.parse().unwrap()
}
