//! Node authentication: Kubernetes service-account tokens (JWT, RS256/ES256) checked against JWKS.
//!
//! A node agent proves which node it runs on with its projected service-account token. We
//! check, in order: the JWS signature against the issuer's keys (JWKS, RFC 7517), the issuer,
//! the audience, exp/nbf (with leeway), that the subject is an allowed node-agent service
//! account, and read the node from the `kubernetes.io.node.name` claim that projected tokens
//! carry. Only compact JWS with RS256 or ES256 is accepted; `none`, HMAC and `crit` headers are
//! refused, so a token can never choose a weaker check.
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use serde::Deserialize;

/// Largest token we parse; Kubernetes tokens are about 1 KiB.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// Smallest RSA modulus accepted in the JWKS (ring's RS256 floor), in bytes.
const MIN_RSA_MODULUS_BYTES: usize = 256;
/// Length of one P-256 coordinate, in bytes.
const P256_COORDINATE_BYTES: usize = 32;

/// Checks node agents' service-account tokens.
#[derive(Debug)]
pub struct TokenVerifier {
    issuer: String,
    audiences: Vec<String>,
    /// Token subjects (`system:serviceaccount:<ns>:<sa>`) allowed to ask for certificates.
    agents: Vec<String>,
    leeway: Duration,
    keys: RwLock<Arc<Jwks>>,
    key_missed: tokio::sync::Notify,
}

/// What a verified token proves: which service account asks, from which node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeToken {
    /// The token subject, `system:serviceaccount:<ns>:<sa>`.
    pub subject: String,
    /// The node the token was issued for (`kubernetes.io.node.name`).
    pub node: String,
}

/// The issuer's public keys, parsed from a JWKS document.
#[derive(Clone)]
pub struct Jwks {
    keys: Vec<Jwk>,
}

/// Why a token was refused.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The token is larger than [`MAX_TOKEN_BYTES`].
    #[error("token is {len} bytes, at most {max} allowed")]
    Oversized { len: usize, max: usize },
    /// Not a compact JWS, or a part is not valid base64url/JSON.
    #[error("token is not a valid jwt: {what}")]
    Malformed { what: &'static str },
    /// The header names an algorithm other than RS256 and ES256.
    #[error("token algorithm {alg:?} is not accepted (RS256 or ES256 only)")]
    UnsupportedAlgorithm { alg: String },
    /// The header carries `crit` extensions we do not implement (RFC 7515 4.1.11).
    #[error("token header has critical extensions")]
    CriticalHeader,
    /// No key of the issuer matches the token's key id and algorithm.
    #[error("no issuer key for token key id {kid:?} and algorithm {alg}")]
    UnknownKey {
        kid: Option<String>,
        alg: &'static str,
    },
    /// The signature does not verify with the issuer's keys.
    #[error("token signature does not verify against the issuer keys")]
    BadSignature,
    /// Signed by a trusted key, but for another issuer.
    #[error("token issuer {actual:?} is not {expected:?}")]
    WrongIssuer { actual: String, expected: String },
    /// Not meant for us.
    #[error("token of {subject} has audience {actual:?}, expected one of {expected:?}")]
    WrongAudience {
        subject: String,
        actual: Vec<String>,
        expected: Vec<String>,
    },
    /// Past `exp` (plus leeway).
    #[error("token of {subject} expired at unix time {exp} (now {now})")]
    Expired { subject: String, exp: i64, now: i64 },
    /// Before `nbf` (minus leeway).
    #[error("token of {subject} is not valid before unix time {nbf} (now {now})")]
    NotYetValid { subject: String, nbf: i64, now: i64 },
    /// A valid token of a service account that is not a node agent.
    #[error("token subject {subject} is not an allowed node agent service account")]
    SubjectNotAllowed { subject: String },
    /// A node-agent token without the node claim (not a pod-bound projected token).
    #[error("token of {subject} has no kubernetes.io.node.name claim")]
    NoNodeClaim { subject: String },
}

/// Why the issuer's keys could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    /// The JWKS file could not be read.
    #[error("cannot read jwks file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not a JWKS JSON document.
    #[error("jwks file {}: not a jwks document", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// A key has a bad or missing parameter.
    #[error("jwks file {}: key #{index}: {reason}", path.display())]
    Key {
        path: PathBuf,
        index: usize,
        reason: &'static str,
    },
    /// No RSA or P-256 signing key in the set.
    #[error("jwks file {}: no usable RS256 or ES256 key", path.display())]
    NoUsableKey { path: PathBuf },
}

impl TokenVerifier {
    /// Accepts tokens from `issuer` for one of `audiences`, whose subject is one of `agents`.
    pub fn new(
        issuer: String,
        audiences: Vec<String>,
        agents: Vec<String>,
        leeway: Duration,
        keys: Jwks,
    ) -> Self {
        Self {
            issuer,
            audiences,
            agents,
            leeway,
            keys: RwLock::new(Arc::new(keys)),
            key_missed: tokio::sync::Notify::new(),
        }
    }

    /// Notified whenever a token names a key the verifier does not have (so a key source that
    /// can be refetched, like OIDC discovery, fetches again).
    pub fn key_missed(&self) -> &tokio::sync::Notify {
        &self.key_missed
    }

    /// Replaces the issuer's keys (after the JWKS file changed).
    pub fn set_keys(&self, keys: Jwks) {
        // A poisoned lock only means a reader panicked; the Arc inside is still whole.
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
    }

    /// Verifies `token` at `now` and returns who asks from which node.
    pub fn verify(&self, token: &str, now: SystemTime) -> Result<NodeToken, TokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::Oversized {
                len: token.len(),
                max: MAX_TOKEN_BYTES,
            });
        }
        let mut parts = token.split('.');
        let (Some(header_b64), Some(claims_b64), Some(signature_b64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed {
                what: "expected three dot-separated parts",
            });
        };
        let header: Header = decode_json(
            header_b64,
            "header is not base64url",
            "header is not a jws header",
        )?;
        if header.crit.is_some() {
            return Err(TokenError::CriticalHeader);
        }
        let alg = Algorithm::try_from(header.alg.as_str())?;
        let signature =
            URL_SAFE_NO_PAD
                .decode(signature_b64)
                .map_err(|_| TokenError::Malformed {
                    what: "signature is not base64url",
                })?;
        // The JWS signing input is the first two parts exactly as sent (RFC 7515 5.2).
        let signed_len = header_b64.len() + 1 + claims_b64.len();
        let signed = &token.as_bytes()[..signed_len];
        self.check_signature(alg, header.kid, signed, &signature)?;

        let claims: Claims = decode_json(
            claims_b64,
            "claims are not base64url",
            "claims lack iss, sub, aud or exp, or have the wrong types",
        )?;
        self.check_claims(claims, now)
    }

    fn check_signature(
        &self,
        alg: Algorithm,
        kid: Option<String>,
        signed: &[u8],
        signature: &[u8],
    ) -> Result<(), TokenError> {
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner()).clone();
        let mut candidates = keys
            .keys
            .iter()
            .filter(|key| key.algorithm() == alg)
            .filter(|key| kid.is_none() || key.kid == kid)
            .peekable();
        if candidates.peek().is_none() {
            self.key_missed.notify_one();
            return Err(TokenError::UnknownKey {
                kid,
                alg: alg.name(),
            });
        }
        if candidates.any(|key| key.verifies(signed, signature)) {
            Ok(())
        } else {
            Err(TokenError::BadSignature)
        }
    }

    fn check_claims(&self, claims: Claims, now: SystemTime) -> Result<NodeToken, TokenError> {
        if claims.iss != self.issuer {
            return Err(TokenError::WrongIssuer {
                actual: claims.iss,
                expected: self.issuer.clone(),
            });
        }
        let subject = claims.sub;
        let audiences = claims.aud.into_vec();
        if !audiences.iter().any(|aud| self.audiences.contains(aud)) {
            return Err(TokenError::WrongAudience {
                subject,
                actual: audiences,
                expected: self.audiences.clone(),
            });
        }
        let now = unix_secs(now);
        let leeway = i64::try_from(self.leeway.as_secs()).unwrap_or(i64::MAX);
        if now >= claims.exp.saturating_add(leeway) {
            return Err(TokenError::Expired {
                subject,
                exp: claims.exp,
                now,
            });
        }
        if let Some(nbf) = claims.nbf {
            if now.saturating_add(leeway) < nbf {
                return Err(TokenError::NotYetValid { subject, nbf, now });
            }
        }
        if !self.agents.contains(&subject) {
            return Err(TokenError::SubjectNotAllowed { subject });
        }
        let node = claims
            .kubernetes
            .and_then(|k| k.node)
            .map(|node| node.name)
            .filter(|name| !name.is_empty());
        match node {
            Some(node) => Ok(NodeToken { subject, node }),
            None => Err(TokenError::NoNodeClaim { subject }),
        }
    }
}

impl Jwks {
    /// Reads and parses a JWKS file (as served at `/openid/v1/jwks` by the API server).
    pub fn load(path: &Path) -> Result<Self, JwksError> {
        let text = std::fs::read_to_string(path).map_err(|source| JwksError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses JWKS JSON; `path` is used in error messages only. Keys of other types (or for
    /// encryption) are skipped; malformed RSA or EC keys are errors.
    pub fn parse(path: &Path, text: &str) -> Result<Self, JwksError> {
        let doc: JwksDoc = serde_json::from_str(text).map_err(|source| JwksError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        let mut keys = Vec::new();
        for (index, doc) in doc.keys.into_iter().enumerate() {
            let bad = |reason| JwksError::Key {
                path: path.to_path_buf(),
                index,
                reason,
            };
            if doc.use_.as_deref().is_some_and(|u| u != "sig") {
                continue;
            }
            if let Some(key) = Jwk::try_from(doc).map_err(bad)? {
                keys.push(key);
            }
        }
        if keys.is_empty() {
            return Err(JwksError::NoUsableKey {
                path: path.to_path_buf(),
            });
        }
        Ok(Self { keys })
    }

    /// Number of usable keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the set has no key (never true for a parsed set).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

impl fmt::Debug for Jwks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kids: Vec<_> = self
            .keys
            .iter()
            .map(|k| (k.kid.as_deref(), k.algorithm().name()))
            .collect();
        f.debug_struct("Jwks").field("keys", &kids).finish()
    }
}

/// The two signature algorithms we accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Algorithm {
    Rs256,
    Es256,
}

impl Algorithm {
    fn name(self) -> &'static str {
        match self {
            Self::Rs256 => "RS256",
            Self::Es256 => "ES256",
        }
    }
}

impl TryFrom<&str> for Algorithm {
    type Error = TokenError;

    fn try_from(alg: &str) -> Result<Self, TokenError> {
        match alg {
            "RS256" => Ok(Self::Rs256),
            "ES256" => Ok(Self::Es256),
            other => Err(TokenError::UnsupportedAlgorithm {
                alg: other.chars().take(32).collect(),
            }),
        }
    }
}

/// One public key of the issuer.
#[derive(Clone)]
struct Jwk {
    kid: Option<String>,
    key: PublicKey,
}

#[derive(Clone)]
enum PublicKey {
    /// Big-endian modulus and exponent.
    Rsa { n: Vec<u8>, e: Vec<u8> },
    /// Uncompressed SEC1 point `04 || x || y`.
    P256 { point: Vec<u8> },
}

impl Jwk {
    fn algorithm(&self) -> Algorithm {
        match self.key {
            PublicKey::Rsa { .. } => Algorithm::Rs256,
            PublicKey::P256 { .. } => Algorithm::Es256,
        }
    }

    fn verifies(&self, signed: &[u8], signature: &[u8]) -> bool {
        match &self.key {
            PublicKey::Rsa { n, e } => RsaPublicKeyComponents { n, e }
                .verify(&signature::RSA_PKCS1_2048_8192_SHA256, signed, signature)
                .is_ok(),
            PublicKey::P256 { point } => {
                UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                    .verify(signed, signature)
                    .is_ok()
            }
        }
    }

    /// Parses one JWKS entry; `Ok(None)` for key types we do not use.
    fn try_from(doc: JwkDoc) -> Result<Option<Self>, &'static str> {
        let b64 = |value: Option<String>, missing: &'static str, bad: &'static str| {
            let value = value.ok_or(missing)?;
            URL_SAFE_NO_PAD.decode(value).map_err(|_| bad)
        };
        let key = match doc.kty.as_str() {
            "RSA" => {
                if doc.alg.as_deref().is_some_and(|alg| alg != "RS256") {
                    return Ok(None);
                }
                let n = b64(doc.n, "rsa key without n", "rsa n is not base64url")?;
                let e = b64(doc.e, "rsa key without e", "rsa e is not base64url")?;
                let significant = n.iter().skip_while(|b| **b == 0).count();
                if significant < MIN_RSA_MODULUS_BYTES {
                    return Err("rsa modulus is shorter than 2048 bits");
                }
                if e.is_empty() {
                    return Err("rsa exponent is empty");
                }
                PublicKey::Rsa { n, e }
            }
            "EC" => {
                if doc.crv.as_deref() != Some("P-256")
                    || doc.alg.as_deref().is_some_and(|alg| alg != "ES256")
                {
                    return Ok(None);
                }
                let x = b64(doc.x, "ec key without x", "ec x is not base64url")?;
                let y = b64(doc.y, "ec key without y", "ec y is not base64url")?;
                if x.len() != P256_COORDINATE_BYTES || y.len() != P256_COORDINATE_BYTES {
                    return Err("p-256 coordinates must be 32 bytes each");
                }
                let mut point = Vec::with_capacity(1 + 2 * P256_COORDINATE_BYTES);
                point.push(0x04);
                point.extend_from_slice(&x);
                point.extend_from_slice(&y);
                PublicKey::P256 { point }
            }
            _ => return Ok(None),
        };
        Ok(Some(Self { kid: doc.kid, key }))
    }
}

#[derive(Deserialize)]
struct JwksDoc {
    keys: Vec<JwkDoc>,
}

#[derive(Deserialize)]
struct JwkDoc {
    kty: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    alg: Option<String>,
    #[serde(default, rename = "use")]
    use_: Option<String>,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    e: Option<String>,
    #[serde(default)]
    crv: Option<String>,
    #[serde(default)]
    x: Option<String>,
    #[serde(default)]
    y: Option<String>,
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    crit: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct Claims {
    iss: String,
    sub: String,
    aud: Audience,
    exp: i64,
    #[serde(default)]
    nbf: Option<i64>,
    #[serde(default, rename = "kubernetes.io")]
    kubernetes: Option<KubernetesClaims>,
}

/// RFC 7519 4.1.3: one audience string or an array of them.
#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

impl Audience {
    fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(aud) => vec![aud],
            Self::Many(auds) => auds,
        }
    }
}

#[derive(Deserialize)]
struct KubernetesClaims {
    #[serde(default)]
    node: Option<NodeClaim>,
}

#[derive(Deserialize)]
struct NodeClaim {
    name: String,
}

/// Decodes one base64url JSON part of the token into `T`.
fn decode_json<T: serde::de::DeserializeOwned>(
    part: &str,
    not_base64: &'static str,
    not_json: &'static str,
) -> Result<T, TokenError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| TokenError::Malformed { what: not_base64 })?;
    serde_json::from_slice(&bytes).map_err(|_| TokenError::Malformed { what: not_json })
}

/// Seconds since the epoch (negative before it).
fn unix_secs(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

#[cfg(test)]
mod tests;
