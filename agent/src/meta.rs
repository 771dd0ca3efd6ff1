//! Kubernetes object metadata, as every Kubernetes-shaped object ambit reads carries it (the
//! inventory's objects and the Istio policies alike).
use std::collections::BTreeMap;

use serde::Deserialize;

/// `metadata` of any object.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    /// Object name.
    pub name: String,
    /// Namespace (empty for cluster-scoped objects).
    #[serde(default)]
    pub namespace: String,
    /// Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Annotations.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// UID, when the object came from an API server.
    #[serde(default)]
    pub uid: String,
    /// Creation time (RFC 3339), as the API server sets it.
    #[serde(default)]
    pub creation_timestamp: Option<String>,
    /// Set once deletion was requested (RFC 3339): the pod is terminating.
    #[serde(default)]
    pub deletion_timestamp: Option<String>,
}
