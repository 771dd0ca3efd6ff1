//! Helpers the manifest tests share: deploy/'s path, the kustomization file, strict typing of a manifest (no field the k8s-openapi type does not know), volumes and mounts.
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Container, Volume};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The repository's deploy/ directory.
pub(crate) fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// A `kustomization.yaml`, with only the fields deploy/ uses.
#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct Kustomization {
    pub(crate) api_version: String,
    pub(crate) kind: String,
    #[serde(default)]
    pub(crate) namespace: Option<String>,
    #[serde(default)]
    pub(crate) labels: Vec<Value>,
    pub(crate) resources: Vec<String>,
    #[serde(default)]
    pub(crate) images: Vec<Value>,
    #[serde(default)]
    pub(crate) patches: Vec<Patch>,
}

/// A strategic-merge patch a kustomization lists.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Patch {
    pub(crate) path: String,
}

/// Parses `v` as `T` and fails on any field `T` does not know (k8s-openapi ignores them);
/// `file` names where it came from in the failure.
pub(crate) fn typed<T: DeserializeOwned + Serialize>(file: &str, v: &Value) -> T {
    let what = format!("{file}: {} {}", v["kind"], v["metadata"]["name"]);
    let t: T = serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{what}: {e}"));
    let back = serde_json::to_value(&t).unwrap_or_else(|e| panic!("{what}: {e}"));
    let mut unknown = Vec::new();
    missing_keys(v, &back, String::new(), &mut unknown);
    assert!(unknown.is_empty(), "{what}: unknown fields {unknown:?}");
    t
}

/// The paths of `src` that `typed` (its round trip through a type) lost.
fn missing_keys(src: &Value, typed: &Value, path: String, out: &mut Vec<String>) {
    match (src, typed) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                let p = format!("{path}.{k}");
                match b.get(k) {
                    Some(w) => missing_keys(v, w, p, out),
                    None => out.push(p),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for (i, (v, w)) in a.iter().zip(b).enumerate() {
                missing_keys(v, w, format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// The volume called `name`.
pub(crate) fn volume<'a>(volumes: &'a [Volume], name: &str) -> &'a Volume {
    volumes
        .iter()
        .find(|v| v.name == name)
        .unwrap_or_else(|| panic!("no volume {name}"))
}

/// Where in `c` the path `p` is mounted from: (volume name, mount path).
pub(crate) fn mount_of<'a>(c: &'a Container, p: &Path) -> (&'a str, &'a str) {
    let m = c
        .volume_mounts
        .iter()
        .flatten()
        .filter(|m| p.starts_with(&m.mount_path))
        .max_by_key(|m| m.mount_path.len())
        .unwrap_or_else(|| panic!("{} is not mounted in {}", p.display(), c.name));
    (m.name.as_str(), m.mount_path.as_str())
}
