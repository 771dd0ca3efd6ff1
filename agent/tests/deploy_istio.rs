//! deploy/istio/: the overlay for clusters with Istio, rendered from deploy/base as kustomize
//! would (strategic-merge patches), parsed into k8s-openapi types with no unknown field, and
//! checked against the agent: no ambit CA, no CRDs, the agent pointed at istiod with an
//! `istio-ca` token and istiod's root, the rest of its config the standalone install's.
#![expect(
    clippy::unwrap_used,
    reason = "test helpers panic on bad manifests, like the tests"
)]
use std::collections::BTreeSet;
use std::path::Path;

use clap::Parser;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Volume};
use serde_json::{Map, Value};

use ambit::cli::{Cli, Command};

mod manifests;
use manifests::{deploy_dir, mount_of, typed, volume, Kustomization};

/// istiod's CA token audience (its `TOKEN_AUDIENCES` default).
const ISTIO_AUDIENCE: &str = "istio-ca";
/// The ConfigMap istiod publishes its root in, in every namespace, and its key.
const ISTIO_ROOT_CONFIGMAP: &str = "istio-ca-root-cert";
const ISTIO_ROOT_KEY: &str = "root-cert.pem";
/// istiod's CA, as the agent must dial it.
const ISTIOD: &str = "istiod.istio-system.svc:15012";

fn kustomization(dir: &Path) -> Kustomization {
    let text = std::fs::read_to_string(dir.join("kustomization.yaml")).unwrap();
    ambit::yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

fn yaml_docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    ambit::yaml::from_multiple::<Value>(&text)
        .unwrap_or_else(|e| panic!("{}: not YAML: {e}", path.display()))
        .into_iter()
        .filter(|v| !v.is_null())
        .collect()
}

/// The objects a kustomization directory renders to (resources, recursively, then patches).
fn render(dir: &Path) -> Vec<Value> {
    let k = kustomization(dir);
    assert_eq!(k.kind, "Kustomization", "{}", dir.display());
    let mut objects = Vec::new();
    for r in &k.resources {
        let p = dir.join(r);
        if p.is_dir() {
            objects.extend(render(&p));
        } else {
            objects.extend(yaml_docs(&p));
        }
    }
    for patch in &k.patches {
        for doc in yaml_docs(&dir.join(&patch.path)) {
            apply(&mut objects, &doc, &patch.path);
        }
    }
    objects
}

/// (kind, namespace, name) of an object or patch.
fn key(v: &Value) -> (String, String, String) {
    let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
    (
        s(&v["kind"]),
        s(&v["metadata"]["namespace"]),
        s(&v["metadata"]["name"]),
    )
}

/// Applies one strategic-merge patch: kustomize refuses a patch whose target is missing.
fn apply(objects: &mut Vec<Value>, patch: &Value, file: &str) {
    let target = key(patch);
    let at = objects
        .iter()
        .position(|o| key(o) == target)
        .unwrap_or_else(|| panic!("{file}: patch target {target:?} is not in the base"));
    if patch["$patch"] == "delete" {
        objects.remove(at);
    } else {
        merge(&mut objects[at], patch);
    }
}

/// Strategic merge as it acts on the fields these patches touch: maps merge key by key; lists
/// of objects with a `name` (containers, volumes, mounts: patchMergeKey `name`) merge by
/// name; other lists (`projected.sources`, no merge key) are replaced.
fn merge(base: &mut Value, patch: &Value) {
    match (base, patch) {
        (Value::Object(b), Value::Object(p)) => {
            for (k, v) in p {
                match b.get_mut(k) {
                    Some(existing) => merge(existing, v),
                    None => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (Value::Array(b), Value::Array(p)) if p.iter().all(|e| e["name"].is_string()) => {
            for item in p {
                match b.iter_mut().find(|e| e["name"] == item["name"]) {
                    Some(existing) => merge(existing, item),
                    None => b.push(item.clone()),
                }
            }
        }
        (b, p) => *b = p.clone(),
    }
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// The agent's config file of a rendered DaemonSet: (the config as YAML, the container).
fn agent_config(objects: &[Value]) -> (Value, Container, Vec<Volume>) {
    let ds: DaemonSet = typed("deploy/istio", find(objects, "DaemonSet", "ambit"));
    let spec = ds.spec.template.spec.unwrap();
    let agent = spec
        .containers
        .iter()
        .find(|c| c.name == "agent")
        .unwrap()
        .clone();
    let mut argv = vec!["ambit".to_string()];
    argv.extend(agent.args.clone().unwrap_or_default());
    let Command::Run(run) = Cli::try_parse_from(argv).unwrap().command else {
        panic!("the agent container does not run `ambit run`")
    };
    let volumes = spec.volumes.unwrap_or_default();
    let (name, dir) = mount_of(&agent, &run.config);
    let cm_name = volume(&volumes, name)
        .config_map
        .as_ref()
        .unwrap()
        .name
        .clone();
    let cm: ConfigMap = typed("deploy/istio", find(objects, "ConfigMap", &cm_name));
    let key = run.config.strip_prefix(dir).unwrap().to_str().unwrap();
    let text = &cm.data.unwrap()[key];
    (ambit::yaml::from_str(text).unwrap(), agent, volumes)
}

#[test]
fn the_overlay_is_loadable_by_kustomize() {
    // kustomize refuses a resource directory that contains the kustomization itself (a cycle:
    // `../` from deploy/istio) and, by default, any file outside the kustomization's directory.
    let dir = deploy_dir().join("istio").canonicalize().unwrap();
    for r in kustomization(&dir).resources {
        let p = dir.join(&r).canonicalize().unwrap();
        assert!(
            p.is_dir(),
            "{r}: only kustomization directories may be outside deploy/istio"
        );
        assert!(
            !dir.starts_with(&p),
            "{r} contains deploy/istio: kustomize rejects the cycle"
        );
        assert!(
            p.join("kustomization.yaml").is_file(),
            "{r} is no kustomization"
        );
    }
}

#[test]
fn the_overlay_has_no_ambit_ca_and_installs_no_crds() {
    let base = render(&deploy_dir());
    let overlay = render(&deploy_dir().join("istio"));
    assert!(
        base.iter().any(|o| key(o).2 == "ambit-ca"),
        "the base has a CA for the overlay to remove"
    );
    let left: Vec<_> = overlay
        .iter()
        .map(key)
        .filter(|(_, _, name)| name.starts_with("ambit-ca"))
        .collect();
    assert!(left.is_empty(), "CA objects left: {left:?}");
    assert!(overlay
        .iter()
        .all(|o| o["kind"] != "CustomResourceDefinition"));
    // Everything else of the base is there, and still well-formed.
    for o in &base {
        if key(o).2.starts_with("ambit-ca") {
            continue;
        }
        let kept = overlay.iter().find(|x| key(x) == key(o));
        assert!(kept.is_some(), "{:?} missing from the overlay", key(o));
    }
    for o in &overlay {
        match o["kind"].as_str().unwrap() {
            "DaemonSet" => {
                let _: DaemonSet = typed("deploy/istio", o);
            }
            "ConfigMap" => {
                let _: ConfigMap = typed("deploy/istio", o);
            }
            _ => {}
        }
    }
}

#[test]
fn the_agent_asks_istiod_with_an_istio_ca_token_and_trusts_istiods_root() {
    let overlay = render(&deploy_dir().join("istio"));
    let (cfg, agent, volumes) = agent_config(&overlay);
    let parsed = ambit::config::Config::parse_with_node(
        Path::new("deploy/istio/configmap.yaml"),
        &serde_json::to_string(&cfg).unwrap(),
        Some("node-a".into()),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        matches!(&parsed.inventory, ambit::config::InventorySource::Istiod(i) if i.address.is_none()),
        "the inventory is istiod's, at the CA's address: {}",
        parsed.inventory
    );
    let ca = parsed.ca.expect("a ca: section");
    assert_eq!(ca.address, ISTIOD);
    assert_eq!(ca.server_name, None, "istiod's certificate names its host");

    // The token: projected by kubelet with istiod's audience, where the agent reads it.
    let (name, dir) = mount_of(&agent, &ca.token_file);
    let sat = volume(&volumes, name)
        .projected
        .as_ref()
        .unwrap()
        .sources
        .iter()
        .flatten()
        .find_map(|s| s.service_account_token.as_ref())
        .unwrap();
    assert_eq!(sat.audience.as_deref(), Some(ISTIO_AUDIENCE));
    assert_eq!(Path::new(dir).join(&sat.path), ca.token_file);

    // The root: istiod's ConfigMap, its key as the file the agent reads.
    let (name, dir) = mount_of(&agent, &ca.root_cert);
    let source = volume(&volumes, name).config_map.as_ref().unwrap();
    assert_eq!(source.name, ISTIO_ROOT_CONFIGMAP);
    assert_eq!(
        ca.root_cert.strip_prefix(dir).unwrap(),
        Path::new(ISTIO_ROOT_KEY)
    );
    assert!(
        source.items.is_none(),
        "kubelet updates whole-ConfigMap mounts in place (rotation without restart)"
    );
    assert!(agent
        .volume_mounts
        .iter()
        .flatten()
        .all(|m| m.sub_path.is_none()));
}

#[test]
fn the_overlay_config_is_the_bases_but_for_the_ca_and_inventory_sections() {
    let base = render(&deploy_dir());
    let overlay = render(&deploy_dir().join("istio"));
    let strip = |mut v: Value| {
        let m: &mut Map<String, Value> = v.as_object_mut().unwrap();
        assert!(m.remove("ca").is_some(), "no ca: section");
        assert!(m.remove("inventory").is_some(), "no inventory: section");
        v
    };
    let (base_cfg, _, base_volumes) = agent_config(&base);
    let (overlay_cfg, _, overlay_volumes) = agent_config(&overlay);
    assert_ne!(base_cfg["ca"], overlay_cfg["ca"]);
    assert_eq!(base_cfg["inventory"]["kind"], "kubernetes");
    assert_eq!(overlay_cfg["inventory"]["kind"], "istiod");
    assert_eq!(
        strip(base_cfg),
        strip(overlay_cfg),
        "deploy/istio/configmap.yaml drifted from deploy/base/configmap.yaml"
    );
    // Only the two CA volumes differ.
    let names = |v: &[Volume]| v.iter().map(|v| v.name.clone()).collect::<BTreeSet<_>>();
    assert_eq!(names(&base_volumes), names(&overlay_volumes));
    for b in &base_volumes {
        if b.name != "ca-root" && b.name != "ca-token" {
            assert_eq!(
                b,
                volume(&overlay_volumes, &b.name),
                "volume {} changed",
                b.name
            );
        }
    }
}

#[test]
fn the_istiod_settings_an_operator_must_make_are_written_down() {
    let overlay = render(&deploy_dir().join("istio"));
    let ds: DaemonSet = typed("deploy/istio", find(&overlay, "DaemonSet", "ambit"));
    let sa = ds.spec.template.spec.unwrap().service_account_name.unwrap();
    let ns = ds.metadata.namespace.unwrap();
    // istiod's format: namespace/serviceaccount.
    let account = format!("{ns}/{sa}");
    assert_eq!(account, "ambit-system/ambit");
    let doc = std::fs::read_to_string(deploy_dir().join("../docs/kubernetes.md")).unwrap();
    assert!(
        doc.contains("CA_TRUSTED_NODE_ACCOUNTS") && doc.contains(&account),
        "docs/kubernetes.md must tell operators to add {account} to istiod's CA_TRUSTED_NODE_ACCOUNTS"
    );
    assert!(doc.contains("kubectl apply -k deploy/istio"));
    let readme = std::fs::read_to_string(deploy_dir().join("../README.md")).unwrap();
    assert!(
        readme.contains("deploy/istio"),
        "README's Kubernetes section"
    );
}
