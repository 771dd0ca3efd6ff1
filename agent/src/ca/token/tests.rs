//! Token verification: every check refuses a token that breaks it; good RS256/ES256 tokens pass.
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{KeyPair as _, RsaKeyPair, RSA_PKCS1_SHA256};
use rsa::pkcs8::EncodePrivateKey as _;
use serde_json::{json, Value};

use super::*;
use ambit_testbed::issuer::{ServiceAccountClaims, TokenIssuer};

const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
const AGENT: &str = "system:serviceaccount:ambit-system:ambit";

fn now() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

fn verifier(jwks: &str) -> TokenVerifier {
    let keys = Jwks::parse(Path::new("jwks.json"), jwks).unwrap();
    TokenVerifier::new(
        ISSUER.into(),
        vec!["ambit-ca".into()],
        vec![AGENT.into()],
        Duration::from_secs(60),
        keys,
    )
}

fn claims() -> ServiceAccountClaims {
    ServiceAccountClaims {
        namespace: "ambit-system".into(),
        service_account: "ambit".into(),
        node: "node1".into(),
        audiences: vec!["ambit-ca".into()],
        issued_at: now() - Duration::from_secs(10),
        ttl: Duration::from_secs(3600),
    }
}

/// A claims object shaped like a projected token, to edit before signing.
fn raw_claims() -> Value {
    let iat = 1_700_000_000 - 10;
    json!({
        "iss": ISSUER, "sub": AGENT, "aud": ["ambit-ca"], "iat": iat, "nbf": iat, "exp": iat + 3600,
        "kubernetes.io": { "namespace": "ambit-system", "node": { "name": "node1" } },
    })
}

/// A 2048-bit RSA key, made once per test binary (RSA key generation is slow).
fn rsa_key() -> &'static RsaKeyPair {
    static KEY: OnceLock<RsaKeyPair> = OnceLock::new();
    KEY.get_or_init(|| {
        let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).unwrap();
        let pkcs8 = key.to_pkcs8_der().unwrap();
        RsaKeyPair::from_pkcs8(pkcs8.as_bytes()).unwrap()
    })
}

fn rsa_jwks(key: &RsaKeyPair) -> String {
    let public = key.public_key();
    let components: ring::rsa::PublicKeyComponents<Vec<u8>> = public.into();
    json!({ "keys": [{
        "kty": "RSA", "alg": "RS256", "use": "sig", "kid": "rsa-1",
        "n": URL_SAFE_NO_PAD.encode(&components.n), "e": URL_SAFE_NO_PAD.encode(&components.e),
    }]})
    .to_string()
}

fn rsa_token(key: &RsaKeyPair, claims: &Value) -> String {
    let header = json!({ "alg": "RS256", "kid": "rsa-1", "typ": "JWT" });
    let signed = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let mut signature = vec![0; key.public().modulus_len()];
    key.sign(
        &RSA_PKCS1_SHA256,
        &SystemRandom::new(),
        signed.as_bytes(),
        &mut signature,
    )
    .unwrap();
    format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature))
}

#[test]
fn accepts_es256_projected_token_and_reads_node() {
    let issuer = TokenIssuer::generate(ISSUER).unwrap();
    let token = issuer.token(&claims()).unwrap();
    let node = verifier(&issuer.jwks()).verify(&token, now()).unwrap();
    assert_eq!(
        node,
        NodeToken {
            subject: AGENT.into(),
            node: "node1".into()
        }
    );
}

#[test]
fn accepts_rs256_token() {
    let key = rsa_key();
    let token = rsa_token(key, &raw_claims());
    let node = verifier(&rsa_jwks(key)).verify(&token, now()).unwrap();
    assert_eq!(node.node, "node1");
}

#[test]
fn refuses_rs256_token_with_tampered_claims() {
    let key = rsa_key();
    let token = rsa_token(key, &raw_claims());
    let mut forged = raw_claims();
    forged["kubernetes.io"]["node"]["name"] = json!("node2");
    let parts: Vec<&str> = token.split('.').collect();
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        URL_SAFE_NO_PAD.encode(forged.to_string()),
        parts[2]
    );
    let err = verifier(&rsa_jwks(key))
        .verify(&tampered, now())
        .unwrap_err();
    assert!(matches!(err, TokenError::BadSignature), "{err}");
}

#[test]
fn refuses_token_signed_by_another_key() {
    let trusted = TokenIssuer::generate(ISSUER).unwrap();
    let other = TokenIssuer::generate(ISSUER).unwrap();
    let token = other.token(&claims()).unwrap();
    // The other key has another kid: no key matches at all.
    let err = verifier(&trusted.jwks()).verify(&token, now()).unwrap_err();
    assert!(matches!(err, TokenError::UnknownKey { .. }), "{err}");
    // Same kid, different key: the signature does not verify.
    let jwks: Value = serde_json::from_str(&trusted.jwks()).unwrap();
    let other_jwks: Value = serde_json::from_str(&other.jwks()).unwrap();
    let mut spoofed = trusted.jwks().parse::<Value>().unwrap();
    spoofed["keys"][0]["kid"] = other_jwks["keys"][0]["kid"].clone();
    assert_ne!(spoofed, jwks);
    let err = verifier(&spoofed.to_string())
        .verify(&token, now())
        .unwrap_err();
    assert!(matches!(err, TokenError::BadSignature), "{err}");
}

#[test]
fn refuses_wrong_audience() {
    let issuer = TokenIssuer::generate(ISSUER).unwrap();
    let token = issuer
        .token(&ServiceAccountClaims {
            audiences: vec!["istio-ca".into()],
            ..claims()
        })
        .unwrap();
    let err = verifier(&issuer.jwks()).verify(&token, now()).unwrap_err();
    assert!(matches!(err, TokenError::WrongAudience { .. }), "{err}");
    assert!(
        err.to_string().contains("istio-ca") && err.to_string().contains(AGENT),
        "{err}"
    );
}

#[test]
fn refuses_wrong_issuer() {
    let issuer = TokenIssuer::generate("https://evil.example").unwrap();
    let token = issuer.token(&claims()).unwrap();
    let err = verifier(&issuer.jwks()).verify(&token, now()).unwrap_err();
    assert!(matches!(err, TokenError::WrongIssuer { .. }), "{err}");
}

#[test]
fn refuses_expired_token_beyond_leeway() {
    let issuer = TokenIssuer::generate(ISSUER).unwrap();
    let issued_at = now() - Duration::from_secs(3600 + 61);
    let token = issuer
        .token(&ServiceAccountClaims {
            issued_at,
            ..claims()
        })
        .unwrap();
    let err = verifier(&issuer.jwks()).verify(&token, now()).unwrap_err();
    assert!(matches!(err, TokenError::Expired { .. }), "{err}");
    // Within the 60 s leeway it still passes.
    let issued_at = now() - Duration::from_secs(3600 + 30);
    let token = issuer
        .token(&ServiceAccountClaims {
            issued_at,
            ..claims()
        })
        .unwrap();
    verifier(&issuer.jwks()).verify(&token, now()).unwrap();
}

#[test]
fn refuses_token_not_yet_valid() {
    let issuer = TokenIssuer::generate(ISSUER).unwrap();
    let issued_at = now() + Duration::from_secs(600);
    let token = issuer
        .token(&ServiceAccountClaims {
            issued_at,
            ..claims()
        })
        .unwrap();
    let err = verifier(&issuer.jwks()).verify(&token, now()).unwrap_err();
    assert!(matches!(err, TokenError::NotYetValid { .. }), "{err}");
}

#[test]
fn refuses_other_service_account() {
    let issuer = TokenIssuer::generate(ISSUER).unwrap();
    let token = issuer
        .token(&ServiceAccountClaims {
            namespace: "default".into(),
            service_account: "web".into(),
            ..claims()
        })
        .unwrap();
    let err = verifier(&issuer.jwks()).verify(&token, now()).unwrap_err();
    assert!(
        matches!(err, TokenError::SubjectNotAllowed { ref subject } if subject == "system:serviceaccount:default:web"),
        "{err}"
    );
}

#[test]
fn refuses_token_without_node_claim() {
    let issuer = TokenIssuer::generate(ISSUER).unwrap();
    let mut raw = raw_claims();
    raw["kubernetes.io"].as_object_mut().unwrap().remove("node");
    let token = issuer.sign_claims(&raw).unwrap();
    let err = verifier(&issuer.jwks()).verify(&token, now()).unwrap_err();
    assert!(matches!(err, TokenError::NoNodeClaim { .. }), "{err}");
}

#[test]
fn refuses_alg_none_and_hmac() {
    let issuer = TokenIssuer::generate(ISSUER).unwrap();
    let claims = URL_SAFE_NO_PAD.encode(raw_claims().to_string());
    for alg in ["none", "HS256", "ES384"] {
        let header = URL_SAFE_NO_PAD.encode(json!({ "alg": alg }).to_string());
        let err = verifier(&issuer.jwks())
            .verify(&format!("{header}.{claims}."), now())
            .unwrap_err();
        assert!(
            matches!(err, TokenError::UnsupportedAlgorithm { .. }),
            "{alg}: {err}"
        );
    }
}

#[test]
fn refuses_critical_header() {
    let issuer = TokenIssuer::generate(ISSUER).unwrap();
    let claims = URL_SAFE_NO_PAD.encode(raw_claims().to_string());
    let header = URL_SAFE_NO_PAD.encode(json!({ "alg": "ES256", "crit": ["exp"] }).to_string());
    let err = verifier(&issuer.jwks())
        .verify(&format!("{header}.{claims}.AAAA"), now())
        .unwrap_err();
    assert!(matches!(err, TokenError::CriticalHeader), "{err}");
}

#[test]
fn refuses_garbage_without_panicking() {
    let issuer = TokenIssuer::generate(ISSUER).unwrap();
    let verifier = verifier(&issuer.jwks());
    for garbage in [
        "",
        "a",
        "a.b",
        "a.b.c.d",
        "!!.??.**",
        "e30.e30.e30",
        "\u{0}.\u{0}.\u{0}",
    ] {
        let err = verifier.verify(garbage, now()).unwrap_err();
        assert!(
            matches!(
                err,
                TokenError::Malformed { .. } | TokenError::UnsupportedAlgorithm { .. }
            ),
            "{garbage:?}: {err}"
        );
    }
    let huge = "a".repeat(MAX_TOKEN_BYTES + 1);
    assert!(matches!(
        verifier.verify(&huge, now()),
        Err(TokenError::Oversized { .. })
    ));
}

#[test]
fn jwks_refuses_weak_rsa_and_bad_ec_keys() {
    let weak = json!({ "keys": [{ "kty": "RSA", "n": URL_SAFE_NO_PAD.encode([0xff; 128]), "e": "AQAB" }] });
    let err = Jwks::parse(Path::new("j.json"), &weak.to_string()).unwrap_err();
    assert!(matches!(err, JwksError::Key { index: 0, .. }), "{err}");
    let short = json!({ "keys": [{ "kty": "EC", "crv": "P-256", "x": "AAAA", "y": "AAAA" }] });
    let err = Jwks::parse(Path::new("j.json"), &short.to_string()).unwrap_err();
    assert!(matches!(err, JwksError::Key { index: 0, .. }), "{err}");
    let none = json!({ "keys": [{ "kty": "oct", "k": "AAAA" }] });
    let err = Jwks::parse(Path::new("j.json"), &none.to_string()).unwrap_err();
    assert!(matches!(err, JwksError::NoUsableKey { .. }), "{err}");
}

#[test]
fn key_rotation_takes_effect_on_set_keys() {
    let old = TokenIssuer::generate(ISSUER).unwrap();
    let new = TokenIssuer::generate(ISSUER).unwrap();
    let verifier = verifier(&old.jwks());
    let token = new.token(&claims()).unwrap();
    assert!(verifier.verify(&token, now()).is_err());
    verifier.set_keys(Jwks::parse(Path::new("j.json"), &new.jwks()).unwrap());
    verifier.verify(&token, now()).unwrap();
}
