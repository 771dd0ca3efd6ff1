//! A minimal service-account token issuer (ES256) for the testbed and tests.
//!
//! In Kubernetes the API server issues node agents' projected tokens and publishes its keys
//! at `/openid/v1/jwks`. Without an API server (testbed, unit tests) this plays that part:
//! it holds one P-256 key, writes the JWKS the CA loads, and mints tokens shaped like a
//! projected token (`sub`, `aud`, `exp`, `nbf`, `iat` and the `kubernetes.io` claims).
use std::fmt;
use std::time::{Duration, SystemTime};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair as _, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde_json::json;

/// Issues ES256 service-account tokens under one issuer URL.
pub struct TokenIssuer {
    issuer: String,
    kid: String,
    pkcs8: Vec<u8>,
    key: EcdsaKeyPair,
    rng: SystemRandom,
}

/// The claims of a projected service-account token bound to a pod on a node.
#[derive(Debug, Clone)]
pub struct ServiceAccountClaims {
    /// Namespace of the service account.
    pub namespace: String,
    /// Service account name.
    pub service_account: String,
    /// Node the token's pod runs on (`kubernetes.io.node.name`).
    pub node: String,
    /// Audiences (`aud`), e.g. `ambit-ca`.
    pub audiences: Vec<String>,
    /// Issue time (`iat`, `nbf`).
    pub issued_at: SystemTime,
    /// Lifetime: `exp = iat + ttl`.
    pub ttl: Duration,
}

/// Why a key could not be made or loaded, or a token not signed.
#[derive(Debug, thiserror::Error)]
pub enum IssuerError {
    /// ring refused to generate or load the key.
    #[error("token issuer key: {reason}")]
    Key { reason: String },
    /// The system random generator failed while signing.
    #[error("failed to sign a token")]
    Sign,
}

impl TokenIssuer {
    /// Generates a fresh P-256 key for `issuer` (e.g. `https://kubernetes.default.svc`).
    pub fn generate(issuer: &str) -> Result<Self, IssuerError> {
        let rng = SystemRandom::new();
        let pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).map_err(|e| {
                IssuerError::Key {
                    reason: e.to_string(),
                }
            })?;
        Self::from_pkcs8(issuer, pkcs8.as_ref())
    }

    /// Loads a P-256 PKCS#8 key (as written by [`TokenIssuer::pkcs8`]).
    pub fn from_pkcs8(issuer: &str, pkcs8: &[u8]) -> Result<Self, IssuerError> {
        let rng = SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8, &rng).map_err(
            |e| IssuerError::Key {
                reason: e.to_string(),
            },
        )?;
        // A stable key id derived from the public key, as the API server does.
        let digest = ring::digest::digest(&ring::digest::SHA256, key.public_key().as_ref());
        let kid = URL_SAFE_NO_PAD.encode(&digest.as_ref()[..16]);
        Ok(Self {
            issuer: issuer.to_owned(),
            kid,
            pkcs8: pkcs8.to_vec(),
            key,
            rng,
        })
    }

    /// The issuer URL (`iss`).
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The private key, PKCS#8 DER (to persist it; keep the file mode 0600).
    pub fn pkcs8(&self) -> &[u8] {
        &self.pkcs8
    }

    /// The public key as a JWKS document, for the CA's `jwksFile`.
    pub fn jwks(&self) -> String {
        // The public key is the uncompressed point 04 || x || y (ring's fixed encoding).
        let point = self.key.public_key().as_ref();
        let (x, y) = point[1..].split_at(point.len().saturating_sub(1) / 2);
        json!({
            "keys": [{
                "kty": "EC",
                "crv": "P-256",
                "alg": "ES256",
                "use": "sig",
                "kid": self.kid,
                "x": URL_SAFE_NO_PAD.encode(x),
                "y": URL_SAFE_NO_PAD.encode(y),
            }]
        })
        .to_string()
    }

    /// Mints a token shaped like a Kubernetes projected service-account token.
    pub fn token(&self, claims: &ServiceAccountClaims) -> Result<String, IssuerError> {
        let iat = claims
            .issued_at
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let value = json!({
            "iss": self.issuer,
            "sub": format!("system:serviceaccount:{}:{}", claims.namespace, claims.service_account),
            "aud": claims.audiences,
            "iat": iat,
            "nbf": iat,
            "exp": iat.saturating_add(claims.ttl.as_secs()),
            "kubernetes.io": {
                "namespace": claims.namespace,
                "node": { "name": claims.node, "uid": "00000000-0000-0000-0000-000000000000" },
                "serviceaccount": { "name": claims.service_account, "uid": "00000000-0000-0000-0000-000000000000" },
            },
        });
        self.sign_claims(&value)
    }

    /// Signs arbitrary claims with this issuer's key (tests use it to build bad tokens).
    pub fn sign_claims(&self, claims: &serde_json::Value) -> Result<String, IssuerError> {
        let header = json!({ "alg": "ES256", "typ": "JWT", "kid": self.kid });
        let mut token = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let signature = self
            .key
            .sign(&self.rng, token.as_bytes())
            .map_err(|_| IssuerError::Sign)?;
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(signature.as_ref()));
        Ok(token)
    }
}

impl fmt::Debug for TokenIssuer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenIssuer")
            .field("issuer", &self.issuer)
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}
