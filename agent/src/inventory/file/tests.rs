use std::path::Path;

use super::parse;

const GOOD: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels:
    ambit.io/mode: enabled
---
apiVersion: v1
kind: Pod
metadata:
  name: client
  namespace: shop
  annotations:
    ambit.io/netns: /run/netns/client
    traffic.sidecar.istio.io/excludeOutboundPorts: "22, 2379"
    traffic.sidecar.istio.io/excludeOutboundIPRanges: "10.96.0.0/12,fd00::1"
spec:
  nodeName: node1
  serviceAccountName: client
status:
  podIP: 10.0.1.2
  podIPs:
  - ip: 10.0.1.2
  - ip: fd00:1::2
---
apiVersion: v1
kind: Pod
metadata:
  name: opted-out
  namespace: shop
  labels:
    ambit.io/mode: disabled
spec:
  nodeName: node1
---
apiVersion: v1
kind: Pod
metadata:
  name: plain
spec:
  nodeName: node2
"#;

#[test]
fn parses_pods_namespaces_and_enrollment() {
    let snap = parse(Path::new("inv.yaml"), GOOD).unwrap();
    let client = &snap.workloads["shop/client"];
    assert!(client.enrolled, "namespace label enrolls");
    assert_eq!(client.ips.len(), 2, "podIP duplicates podIPs[0]");
    assert_eq!(client.skip_ports, vec![22, 2379]);
    assert_eq!(client.skip_cidrs.len(), 2);
    assert_eq!(
        client.spiffe_id("cluster.local"),
        "spiffe://cluster.local/ns/shop/sa/client"
    );
    assert!(
        !snap.workloads["shop/opted-out"].enrolled,
        "pod label opts out"
    );
    let plain = &snap.workloads["default/plain"];
    assert!(!plain.enrolled);
    assert_eq!(plain.service_account, "default");
    assert_eq!(snap.on_node("node1").count(), 2);
}

#[test]
fn bad_ip_names_document_field_and_line() {
    let text = "kind: Pod\nmetadata:\n  name: a\n---\nkind: Pod\nmetadata:\n  name: b\nstatus:\n  podIPs:\n  - ip: 10.0.0.999\n";
    let err = parse(Path::new("inv.yaml"), text).unwrap_err().to_string();
    assert!(err.contains("inv.yaml"), "{err}");
    assert!(err.contains("document 2"), "{err}");
    assert!(err.contains("Pod b"), "{err}");
    assert!(err.contains("status.podIPs[0].ip"), "{err}");
}

#[test]
fn type_error_reports_absolute_line() {
    let text = "kind: Namespace\nmetadata:\n  name: x\n---\nkind: Pod\nmetadata:\n  name: b\n  labels: 7\n";
    let err = parse(Path::new("inv.yaml"), text).unwrap_err().to_string();
    assert!(err.contains("metadata.labels"), "{err}");
    assert!(err.contains("line 8"), "{err}");
}

#[test]
fn broken_yaml_is_an_error_not_a_panic() {
    for text in [
        "kind: Pod\nmetadata: [",
        "- - -\n  :",
        "kind: [1,2]\n",
        "kind: Pod\n",
    ] {
        assert!(parse(Path::new("x"), text).is_err(), "{text:?}");
    }
}

#[test]
fn bad_skip_annotations_are_rejected() {
    let text = "kind: Pod\nmetadata:\n  name: a\n  annotations:\n    traffic.sidecar.istio.io/excludeOutboundPorts: \"http\"\n";
    let err = parse(Path::new("x"), text).unwrap_err().to_string();
    assert!(err.contains("excludeOutboundPorts"), "{err}");
}

#[test]
fn parses_peer_authentication_and_rejects_bad_ones() {
    let text = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: strict\n  namespace: shop\nspec:\n  mtls:\n    mode: STRICT\n";
    let snap = parse(Path::new("x"), text).unwrap();
    assert_eq!(snap.peer_authentications.len(), 1);
    let bad_mode = text.replace("STRICT", "SRTICT");
    let err = parse(Path::new("x"), &bad_mode).unwrap_err().to_string();
    assert!(
        err.contains("PeerAuthentication strict") && err.contains("spec.mtls.mode"),
        "{err}"
    );
    let bad_api = text.replace("security.istio.io/v1", "security.istio.io/v2");
    assert!(parse(Path::new("x"), &bad_api)
        .unwrap_err()
        .to_string()
        .contains("apiVersion"));
    let no_selector = "apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata:\n  name: p\nspec:\n  portLevelMtls:\n    80:\n      mode: STRICT\n";
    assert!(parse(Path::new("x"), no_selector)
        .unwrap_err()
        .to_string()
        .contains("selector"));
}
