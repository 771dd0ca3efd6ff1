//! The xDS `Node` the agent presents to istiod, shaped as ztunnel's so istiod treats it as a node proxy.
//!
//! istiod reads the proxy type from the id's first field (`ztunnel`: it then serves the
//! workload API for the whole mesh) and the pod, namespace and node from the metadata.
use std::collections::BTreeMap;

use prost_types::value::Kind;
use prost_types::{Struct, Value};

use ambit_proto::envoy::service::discovery::v3::Node;

/// Who the agent is, as istiod needs to know it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// The agent pod's IP (`INSTANCE_IP`).
    pub ip: String,
    /// The agent pod's name.
    pub pod_name: String,
    /// The agent pod's namespace.
    pub namespace: String,
    /// The Kubernetes node the agent serves.
    pub node_name: String,
    /// The cluster's id in the mesh (`CLUSTER_ID`; istiod's default is `Kubernetes`).
    pub cluster_id: Option<String>,
    /// The Istio version to claim (`ISTIO_VERSION`), when set.
    pub istio_version: Option<String>,
    /// More metadata entries, sent as strings (later entries of the same key win).
    pub extra: BTreeMap<String, String>,
}

impl NodeInfo {
    /// `ztunnel~IP~POD.NS~NS.svc.cluster.local`, as ztunnel names itself.
    pub fn id(&self) -> String {
        let Self {
            ip,
            pod_name,
            namespace,
            ..
        } = self;
        format!("ztunnel~{ip}~{pod_name}.{namespace}~{namespace}.svc.cluster.local")
    }

    /// The agent as its DaemonSet describes it (the downward API's `POD_NAME`,
    /// `POD_NAMESPACE`, `INSTANCE_IP` and `ISTIO_VERSION`, as ztunnel reads them), serving
    /// `node_name`; unset variables fall back to `ambit-<node>`, `ambit-system` and no IP.
    pub fn from_env(node_name: &str, cluster_id: Option<String>) -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        Self {
            ip: var("INSTANCE_IP").unwrap_or_default(),
            pod_name: var("POD_NAME").unwrap_or_else(|| format!("ambit-{node_name}")),
            namespace: var("POD_NAMESPACE").unwrap_or_else(|| "ambit-system".to_owned()),
            node_name: node_name.to_owned(),
            cluster_id,
            istio_version: var("ISTIO_VERSION"),
            extra: BTreeMap::new(),
        }
    }

    /// The `Node` of the stream's first request of each type.
    pub fn node(&self) -> Node {
        let mut fields = BTreeMap::new();
        let mut put = |k: &str, v: &str| {
            fields.insert(k.to_owned(), string(v));
        };
        put("NAME", &self.pod_name);
        put("NAMESPACE", &self.namespace);
        put("INSTANCE_IPS", &self.ip);
        put("NODE_NAME", &self.node_name);
        if let Some(cluster) = &self.cluster_id {
            put("CLUSTER_ID", cluster);
        }
        if let Some(version) = &self.istio_version {
            put("ISTIO_VERSION", version);
        }
        for (k, v) in &self.extra {
            put(k, v);
        }
        Node {
            id: self.id(),
            metadata: Some(Struct {
                fields: fields.into_iter().collect(),
            }),
            ..Node::default()
        }
    }
}

fn string(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_node_is_named_and_described_as_ztunnel_names_itself() {
        let info = NodeInfo {
            ip: "10.0.0.5".into(),
            pod_name: "ambit-x7".into(),
            namespace: "ambit-system".into(),
            node_name: "node1".into(),
            cluster_id: Some("c1".into()),
            istio_version: None,
            extra: [("NAME".to_owned(), "override".to_owned())].into(),
        };
        let node = info.node();
        assert_eq!(
            node.id,
            "ztunnel~10.0.0.5~ambit-x7.ambit-system~ambit-system.svc.cluster.local"
        );
        let meta = node.metadata.unwrap().fields;
        let get = |k: &str| match meta.get(k).and_then(|v| v.kind.clone()) {
            Some(Kind::StringValue(s)) => Some(s),
            _ => None,
        };
        assert_eq!(get("NAMESPACE").as_deref(), Some("ambit-system"));
        assert_eq!(get("NODE_NAME").as_deref(), Some("node1"));
        assert_eq!(get("INSTANCE_IPS").as_deref(), Some("10.0.0.5"));
        assert_eq!(get("CLUSTER_ID").as_deref(), Some("c1"));
        assert_eq!(get("NAME").as_deref(), Some("override"));
        assert_eq!(get("ISTIO_VERSION"), None);
    }
}
