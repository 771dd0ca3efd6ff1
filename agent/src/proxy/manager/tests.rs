//! Tests of when the manager re-authorizes open connections.
use std::path::Path;
use std::sync::Arc;

use super::authorization_inputs_changed;
use crate::inventory::file::parse;
use crate::inventory::Snapshot;

const INV: &str = r#"
kind: Pod
metadata: {name: local, namespace: shop, labels: {app: web}}
spec: {nodeName: node1}
status: {podIPs: [{ip: 10.1.0.2}]}
---
kind: Pod
metadata: {name: remote, namespace: shop}
spec: {nodeName: node2}
status: {podIPs: [{ip: 10.2.0.2}]}
---
kind: AuthorizationPolicy
apiVersion: security.istio.io/v1
metadata: {name: deny-zoo, namespace: shop}
spec:
  action: DENY
  rules: [{from: [{source: {namespaces: [zoo]}}]}]
"#;

#[test]
fn open_connections_are_reauthorized_only_when_policies_or_local_workloads_change() {
    let old = parse(Path::new("t.yaml"), INV).unwrap();
    let mut churn = old.edit();
    let mut remote = (*churn.workloads["shop/remote"]).clone();
    remote.ips = vec!["10.2.0.3".parse().unwrap()];
    churn.put_workload(remote);
    assert!(!authorization_inputs_changed(&old, &churn, "node1"));
    let mut same_policies = churn.edit();
    same_policies.authorization_policies = Arc::new(old.authorization_policies.to_vec());
    assert!(!authorization_inputs_changed(&old, &same_policies, "node1"));

    let mut relabelled: Snapshot = old.edit();
    let mut local = (*relabelled.workloads["shop/local"]).clone();
    local.labels.insert("app".into(), "api".into());
    relabelled.put_workload(local);
    assert!(authorization_inputs_changed(&old, &relabelled, "node1"));
    assert!(!authorization_inputs_changed(&old, &relabelled, "node2"));
    let mut no_policies = old.edit();
    no_policies.set_authorization_policies(Vec::new());
    assert!(authorization_inputs_changed(&old, &no_policies, "node1"));
}
