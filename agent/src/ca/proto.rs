//! Istio's CA API messages (`proto/ca.proto`), written by hand with prost so no protoc is needed.
use prost_types::value::Kind;
use prost_types::{Struct, Value};

/// gRPC path of `istio.v1.auth.IstioCertificateService/CreateCertificate`.
pub const CREATE_CERTIFICATE_PATH: &str =
    "/istio.v1.auth.IstioCertificateService/CreateCertificate";
/// gRPC service name, as `grpc.health` and reflection would name it.
pub const SERVICE_NAME: &str = "istio.v1.auth.IstioCertificateService";
/// Metadata key naming the identity a node agent asks for on behalf of a pod.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

/// `istio.v1.auth.IstioCertificateRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateRequest {
    /// PEM-encoded PKCS#10 CSR.
    #[prost(string, tag = "1")]
    pub csr: String,
    /// Requested lifetime in seconds; 0 means the CA's default.
    #[prost(int64, tag = "3")]
    pub validity_duration: i64,
    /// Optional metadata; `ImpersonatedIdentity` selects the identity.
    #[prost(message, optional, tag = "4")]
    pub metadata: Option<Struct>,
}

/// `istio.v1.auth.IstioCertificateResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateResponse {
    /// PEM certificates, leaf first; the last entry holds the root(s), possibly several.
    #[prost(string, repeated, tag = "1")]
    pub cert_chain: Vec<String>,
}

/// What `metadata.ImpersonatedIdentity` holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Impersonation<'a> {
    /// Not present.
    Absent,
    /// Present, but not a string value.
    NotAString,
    /// The requested identity, unparsed.
    Identity(&'a str),
}

impl IstioCertificateRequest {
    /// Builds a request for `csr_pem` on behalf of `identity`.
    pub fn impersonating(csr_pem: String, validity_secs: i64, identity: &str) -> Self {
        let value = Value {
            kind: Some(Kind::StringValue(identity.to_owned())),
        };
        let metadata = Struct {
            fields: [(IMPERSONATED_IDENTITY.to_owned(), value)].into(),
        };
        Self {
            csr: csr_pem,
            validity_duration: validity_secs,
            metadata: Some(metadata),
        }
    }

    /// The `ImpersonatedIdentity` metadata entry.
    pub fn impersonated_identity(&self) -> Impersonation<'_> {
        let value = self
            .metadata
            .as_ref()
            .and_then(|m| m.fields.get(IMPERSONATED_IDENTITY));
        match value.map(|v| &v.kind) {
            None => Impersonation::Absent,
            Some(Some(Kind::StringValue(id))) => Impersonation::Identity(id),
            Some(_) => Impersonation::NotAString,
        }
    }
}
