//! Tests of the agent's configuration: parsing, defaults and the checks that reject bad values.
use super::*;

#[test]
fn parses_minimal_config_with_defaults() {
    let cfg = Config::parse(
        Path::new("a.yaml"),
        "node: n1\ninventory: /x.yaml\npodsCgroup: pods\nagentCgroup: pods/agent\n",
    )
    .unwrap();
    assert_eq!(cfg.ports, Ports::default());
    assert_eq!(cfg.outbound_mark, 0x539);
    assert_eq!(cfg.trust_domain, "cluster.local");
    assert_eq!(cfg.agent_cgroup.as_deref(), Some(Path::new("pods/agent")));
    assert!(cfg.capture.mesh_only, "mesh-only capture is the default");
}

#[test]
fn capture_mesh_only_can_be_turned_off() {
    let cfg = Config::parse(
        Path::new("a.yaml"),
        "node: n1\ninventory: /x\ncapture:\n  meshOnly: false\n",
    )
    .unwrap();
    assert!(!cfg.capture.mesh_only);
    let err = Config::parse(
        Path::new("a.yaml"),
        "node: n1\ninventory: /x\ncapture:\n  meshonly: false\n",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("capture"), "{err}");
}

#[test]
fn cgroups_default_to_discovery() {
    let cfg = Config::parse(Path::new("a.yaml"), "node: n1\ninventory: /x.yaml\n").unwrap();
    assert_eq!(cfg.cgroup_root, None);
    assert_eq!(
        cfg.pods_cgroup, None,
        "auto: kubelet's root is found at start"
    );
    assert_eq!(cfg.agent_cgroup, None, "the agent stays in its own cgroup");
}

#[test]
fn names_file_field_and_line_on_bad_value() {
    let err = Config::parse(
        Path::new("a.yaml"),
        "node: n1\ninventory: /x.yaml\npodsCgroup: p\nagentCgroup: q\nports:\n  tunnel: hello\n",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("a.yaml"), "{err}");
    assert!(err.contains("ports.tunnel"), "{err}");
    assert!(err.contains("line 6"), "{err}");
}

#[test]
fn inventory_guard_has_defaults_and_rejects_bad_values_by_name() {
    let cfg = Config::parse(Path::new("a.yaml"), "node: n1\ninventory: /x\n").unwrap();
    assert_eq!(cfg.inventory_guard, InventoryGuard::default());
    let cfg = Config::parse(
        Path::new("a.yaml"),
        "node: n1\ninventory: /x\ninventoryGuard:\n  settleMs: 9000\n",
    )
    .unwrap();
    assert_eq!(cfg.inventory_guard.settle_ms, 9000);
    assert_eq!(cfg.inventory_guard.max_unenroll_percent, 50);
    for (text, field) in [
        (
            "inventoryGuard: {maxUnenrollPercent: 101}",
            "inventoryGuard.maxUnenrollPercent",
        ),
        ("inventoryGuard: {settleMs: 0}", "inventoryGuard.settleMs"),
        (
            "inventoryGuard: {settleMs: 600001}",
            "inventoryGuard.settleMs",
        ),
        (
            "inventoryGuard: {maxUnenrollPercent: 300}",
            "inventoryGuard.maxUnenrollPercent",
        ),
        ("inventoryGuard: {settle: 5}", "inventoryGuard"),
    ] {
        let err = Config::parse(
            Path::new("a.yaml"),
            &format!("node: n1\ninventory: /x\n{text}\n"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains(field), "{text}: {err}");
    }
}

#[test]
fn rejects_a_kernel_routing_table_for_delivery() {
    for table in [0, 253, 254, 255] {
        let err = Config::parse(
            Path::new("a.yaml"),
            &format!("node: n1\ninventory: /x\ndeliverTable: {table}\n"),
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                Error::Invalid {
                    field: "deliverTable",
                    ..
                }
            ),
            "table {table}: {err}"
        );
    }
    let cfg = Config::parse(
        Path::new("a.yaml"),
        "node: n1\ninventory: /x\ndeliverTable: 252\n",
    )
    .unwrap();
    assert_eq!(cfg.deliver_table, 252);
}

#[test]
fn rejects_equal_marks() {
    let err = Config::parse(
        Path::new("a.yaml"),
        "node: n1\ninventory: /x\npodsCgroup: p\nagentCgroup: q\noutboundMark: 5\ndeliverMark: 5\n",
    )
    .unwrap_err();
    assert!(matches!(
        err,
        Error::Invalid {
            field: "outboundMark",
            ..
        }
    ));
}

#[test]
fn the_istiod_inventory_needs_a_ca_section_and_defaults_to_its_address() {
    let ca = "ca:\n  address: istiod.istio-system.svc:15012\n  rootCert: /r.pem\n  tokenFile: /t\n";
    let cfg = Config::parse(
        Path::new("a.yaml"),
        &format!("node: n1\ninventory: {{kind: istiod}}\n{ca}"),
    )
    .unwrap();
    let InventorySource::Istiod(i) = &cfg.inventory else {
        panic!("not istiod: {:?}", cfg.inventory);
    };
    assert_eq!(i.address, None);
    assert_eq!(cfg.inventory.to_string(), "istiod (the ca: address)");
    let err = Config::parse(Path::new("a.yaml"), "node: n1\ninventory: {kind: istiod}\n")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("inventory.kind: istiod needs a ca: section"),
        "{err}"
    );
    let err = Config::parse(
        Path::new("a.yaml"),
        &format!("node: n1\ninventory: {{kind: istiod, kubeconfig: /k}}\n{ca}"),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("inventory"), "{err}");
}
