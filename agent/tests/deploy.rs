//! deploy/: every manifest parses into k8s-openapi types with no unknown field, and agrees
//! with the code (RBAC covers every watched kind, sockets, ports, token audience, CLI args).
#![expect(
    clippy::unwrap_used,
    reason = "test helpers panic on bad manifests, like the tests"
)]
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use clap::Parser;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Namespace, Node, Pod, Service, ServiceAccount,
};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::Resource;
use serde_json::Value;

use ambit::ca::config::{CaConfig, CaInventory, KeySource, DEFAULT_AUDIENCE, DEFAULT_NODE_AGENT};
use ambit::ca::oidc::DISCOVERY_PATH;
use ambit::cli::{Cli, Command};
use ambit::cni::{DEFAULT_POD_MAP, DEFAULT_SOCKET};
use ambit::inventory::kube::ISTIO_KINDS;

mod manifests;
use manifests::{deploy_dir, mount_of, typed, volume, Kustomization};

/// Every document of every YAML file under deploy/ but the Istio overlay deploy/istio/ (rendered
/// and checked by tests/deploy_istio.rs), with its file name.
fn documents() -> Vec<(String, Value)> {
    let mut files = Vec::new();
    let mut dirs = vec![deploy_dir()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p == deploy_dir().join("istio") {
                continue;
            }
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                files.push(p);
            }
        }
    }
    files.sort();
    assert!(files.len() >= 8, "manifests found: {files:?}");
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let name = f.strip_prefix(deploy_dir()).unwrap().display().to_string();
        let docs = ambit::yaml::from_multiple::<Value>(&text)
            .unwrap_or_else(|e| panic!("{name}: not YAML: {e}"));
        for v in docs {
            if !v.is_null() {
                out.push((name.clone(), v));
            }
        }
    }
    out
}

#[derive(Default)]
struct Manifests {
    namespaces: Vec<Namespace>,
    accounts: Vec<ServiceAccount>,
    roles: BTreeMap<String, ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
    config_maps: BTreeMap<String, ConfigMap>,
    daemon_sets: Vec<DaemonSet>,
    deployments: Vec<Deployment>,
    services: Vec<Service>,
    crds: Vec<CustomResourceDefinition>,
    kustomizations: BTreeMap<String, Kustomization>,
}

fn manifests() -> Manifests {
    let mut m = Manifests::default();
    for (file, v) in documents() {
        let name = v["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        match v["kind"].as_str().unwrap_or_default() {
            "Namespace" => m.namespaces.push(typed(&file, &v)),
            "ServiceAccount" => m.accounts.push(typed(&file, &v)),
            "ClusterRole" => {
                m.roles.insert(name, typed(&file, &v));
            }
            "ClusterRoleBinding" => m.bindings.push(typed(&file, &v)),
            "ConfigMap" => {
                m.config_maps.insert(name, typed(&file, &v));
            }
            "DaemonSet" => m.daemon_sets.push(typed(&file, &v)),
            "Deployment" => m.deployments.push(typed(&file, &v)),
            "Service" => m.services.push(typed(&file, &v)),
            "CustomResourceDefinition" => m.crds.push(typed(&file, &v)),
            "Kustomization" => {
                let k: Kustomization = serde_json::from_value(v)
                    .unwrap_or_else(|e| panic!("{file}: kustomization: {e}"));
                // Patches belong to the Istio overlay (tests/deploy_istio.rs renders them).
                let patches: Vec<&str> = k.patches.iter().map(|p| p.path.as_str()).collect();
                assert!(
                    patches.is_empty(),
                    "{file}: patches {patches:?} outside deploy/istio/"
                );
                m.kustomizations.insert(file, k);
            }
            other => panic!("{file}: unexpected kind `{other}`"),
        }
    }
    m
}

fn config_yaml(m: &Manifests, cm: &str, key: &str) -> Value {
    let text = &m.config_maps[cm].data.as_ref().unwrap()[key];
    ambit::yaml::from_str(text).unwrap()
}

fn container<'a>(containers: &'a [Container], name: &str) -> &'a Container {
    containers.iter().find(|c| c.name == name).unwrap()
}

fn args(c: &Container) -> Vec<String> {
    let mut v = vec!["ambit".to_string()];
    let cmd = c.command.clone().unwrap_or_default();
    v.extend(cmd.into_iter().skip(1));
    v.extend(c.args.clone().unwrap_or_default());
    v
}

#[test]
fn kustomizations_list_every_manifest() {
    let m = manifests();
    let dir = deploy_dir();
    let mut listed = BTreeSet::new();
    for (file, k) in &m.kustomizations {
        assert_eq!(k.kind, "Kustomization", "{file}");
        let base = Path::new(file).parent().unwrap();
        for r in &k.resources {
            let p = base.join(r);
            // A directory resource is another kustomization (deploy/base), listed itself.
            let p = if dir.join(&p).is_dir() {
                p.join("kustomization.yaml")
            } else {
                p
            };
            assert!(dir.join(&p).is_file(), "{file}: resource {r} missing");
            listed.insert(p.display().to_string());
        }
    }
    for (file, _) in documents() {
        let top = ["kustomization.yaml", "crds/kustomization.yaml"].contains(&file.as_str());
        if !top {
            assert!(listed.contains(&file), "{file} is in no kustomization");
        }
    }
    assert_eq!(
        m.kustomizations["kustomization.yaml"].namespace.as_deref(),
        Some("ambit-system")
    );
    assert!(m
        .namespaces
        .iter()
        .any(|n| n.metadata.name.as_deref() == Some("ambit-system")));
}

#[test]
fn ca_role_is_exactly_its_kube_inventory_and_oidc_discovery() {
    let m = manifests();
    let ca = CaConfig::parse(
        Path::new("ca.yaml"),
        m.config_maps["ambit-ca-config"].data.as_ref().unwrap()["ca.yaml"].as_str(),
    )
    .unwrap();
    assert!(
        matches!(&ca.inventory, CaInventory::Kubernetes(k) if k.kubeconfig.is_none()),
        "the in-cluster CA reads its inventory from the API server: {:?}",
        ca.inventory
    );
    assert!(matches!(ca.tokens.keys, KeySource::OidcDiscovery(_)));
    // inventory::kube::Options::all_nodes() watches pods and namespaces, nothing else.
    let mut want: BTreeSet<(String, String)> = [
        (Pod::GROUP.into(), Pod::URL_PATH_SEGMENT.into()),
        (Namespace::GROUP.into(), Namespace::URL_PATH_SEGMENT.into()),
    ]
    .into();
    let role = &m.roles["ambit-ca"];
    let mut urls = BTreeSet::new();
    for r in role.rules.iter().flatten() {
        if let Some(u) = &r.non_resource_urls {
            assert_eq!(r.verbs, ["get"], "oidc discovery only reads");
            urls.extend(u.iter().cloned());
            continue;
        }
        assert_eq!(r.verbs, ["list", "watch"], "the CA only lists and watches");
        for g in r.api_groups.iter().flatten() {
            for res in r.resources.iter().flatten() {
                assert!(
                    want.remove(&(g.clone(), res.clone())),
                    "ClusterRole ambit-ca grants {g}/{res}, which the CA does not watch"
                );
            }
        }
    }
    assert!(
        want.is_empty(),
        "ClusterRole ambit-ca lacks list/watch on {want:?}"
    );
    // The discovery document and the API server's jwks_uri path.
    assert_eq!(
        urls,
        BTreeSet::from([DISCOVERY_PATH.to_owned(), "/openid/v1/jwks".to_owned()])
    );
    let dep = m
        .deployments
        .iter()
        .find(|d| d.metadata.name.as_deref() == Some("ambit-ca"))
        .unwrap();
    let sa = dep.spec.template.spec.as_ref().unwrap();
    let sa = sa.service_account_name.as_deref().unwrap();
    let binding = m
        .bindings
        .iter()
        .find(|b| b.role_ref.name == "ambit-ca")
        .unwrap();
    let subject = &binding.subjects.as_ref().unwrap()[0];
    assert_eq!(
        (subject.name.as_str(), subject.namespace.as_deref()),
        (sa, dep.metadata.namespace.as_deref())
    );
}

#[test]
fn agent_role_covers_every_watched_kind_with_list_and_watch() {
    let m = manifests();
    let role = &m.roles["ambit-agent"];
    let mut kinds: Vec<(String, String)> = vec![
        (Pod::GROUP.into(), Pod::URL_PATH_SEGMENT.into()),
        (Namespace::GROUP.into(), Namespace::URL_PATH_SEGMENT.into()),
        // Optional for the agent (pod ranges decide contested addresses); granted here.
        (Node::GROUP.into(), Node::URL_PATH_SEGMENT.into()),
        (Service::GROUP.into(), Service::URL_PATH_SEGMENT.into()),
        (
            EndpointSlice::GROUP.into(),
            EndpointSlice::URL_PATH_SEGMENT.into(),
        ),
    ];
    kinds.extend(
        ISTIO_KINDS
            .iter()
            .map(|(g, _, _, p)| (g.to_string(), p.to_string())),
    );
    for (group, plural) in &kinds {
        let ok = role.rules.iter().flatten().any(|r| {
            r.api_groups.iter().flatten().any(|g| g == group)
                && r.resources.iter().flatten().any(|x| x == plural)
                && ["list", "watch"]
                    .iter()
                    .all(|v| r.verbs.iter().any(|x| x == v))
        });
        assert!(
            ok,
            "ClusterRole ambit-agent lacks list/watch on {group}/{plural}"
        );
    }
    // Beyond list and watch, only patch on pods (the redirection annotation), in a rule of
    // its own.
    let mut patch = 0;
    for r in role.rules.iter().flatten() {
        if r.verbs == ["patch"] {
            assert_eq!(r.api_groups.as_deref(), Some(&[Pod::GROUP.to_string()][..]));
            assert_eq!(
                r.resources.as_deref(),
                Some(&[Pod::URL_PATH_SEGMENT.to_string()][..]),
                "patch on pods only"
            );
            patch += 1;
        } else {
            assert_eq!(
                r.verbs,
                ["list", "watch"],
                "the agent only lists and watches (and patches pods)"
            );
        }
    }
    assert_eq!(patch, 1, "the agent patches pods (redirection annotation)");
    // The DaemonSet's account is the one the CA accepts and the binding names.
    let ds = &m.daemon_sets[0];
    let spec = ds.spec.template.spec.as_ref().unwrap();
    let sa = spec.service_account_name.as_deref().unwrap();
    let ns = ds.metadata.namespace.as_deref().unwrap();
    assert_eq!(
        format!("system:serviceaccount:{ns}:{sa}"),
        DEFAULT_NODE_AGENT
    );
    let binding = m
        .bindings
        .iter()
        .find(|b| b.role_ref.name == "ambit-agent")
        .unwrap();
    let subject = &binding.subjects.as_ref().unwrap()[0];
    assert_eq!(
        (subject.name.as_str(), subject.namespace.as_deref()),
        (sa, Some(ns))
    );
    assert!(m
        .accounts
        .iter()
        .any(|a| a.metadata.name.as_deref() == Some(sa)));
}

#[test]
fn daemonset_agrees_with_the_agent() {
    let m = manifests();
    let ds = &m.daemon_sets[0];
    let dspec = &ds.spec;
    let strategy = dspec.update_strategy.as_ref().unwrap();
    let max = strategy
        .rolling_update
        .as_ref()
        .unwrap()
        .max_unavailable
        .as_ref()
        .unwrap();
    assert_eq!(serde_json::to_value(max).unwrap(), 1);
    let spec = dspec.template.spec.as_ref().unwrap();
    assert_eq!(spec.host_network, Some(true));
    assert_eq!(spec.host_pid, Some(false));
    let agent = container(&spec.containers, "agent");
    let sc = agent.security_context.as_ref().unwrap();
    assert_eq!(sc.privileged, Some(false), "capabilities, not privileged");
    let caps = sc.capabilities.as_ref().unwrap();
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
    let added: BTreeSet<&str> = caps.add.iter().flatten().map(String::as_str).collect();
    let want: BTreeSet<&str> = ["BPF", "PERFMON", "NET_ADMIN", "SYS_ADMIN", "SYS_RESOURCE"].into();
    assert_eq!(added, want);

    // The command lines are ones the binary accepts.
    let cli = Cli::try_parse_from(args(agent)).unwrap();
    let Command::Run(run) = cli.command else {
        panic!("agent does not run `ambit run`")
    };
    let install = container(spec.init_containers.as_deref().unwrap(), "install-cni");
    let cli = Cli::try_parse_from(args(install)).unwrap();
    let Command::CniInstall(ia) = cli.command else {
        panic!("init container is not cni-install")
    };
    assert_eq!(ia.socket, Path::new(DEFAULT_SOCKET));
    for probe in [&agent.readiness_probe, &agent.liveness_probe] {
        let cmd = probe
            .as_ref()
            .unwrap()
            .exec
            .as_ref()
            .unwrap()
            .command
            .clone()
            .unwrap();
        let mut argv = vec!["ambit".to_string()];
        argv.extend(cmd.into_iter().skip(1));
        Cli::try_parse_from(argv).unwrap();
    }
    // The init container writes where the host's runtime looks.
    let vols = spec.volumes.as_deref().unwrap();
    for (dir, host) in [
        (&ia.bin_dir, "/opt/cni/bin"),
        (&ia.conf_dir, "/etc/cni/net.d"),
    ] {
        let (name, _) = mount_of(install, dir);
        assert_eq!(volume(vols, name).host_path.as_ref().unwrap().path, host);
    }

    // Agent config: sockets and map on the host's /run/ambit; CA token, root and port.
    let cfg_path = run.config;
    let (name, dir) = mount_of(agent, &cfg_path);
    let cm_name = &volume(vols, name).config_map.as_ref().unwrap().name;
    let key = cfg_path.strip_prefix(dir).unwrap().to_str().unwrap();
    let cfg = config_yaml(&m, cm_name, key);
    let run_dir = Path::new(DEFAULT_SOCKET).parent().unwrap();
    for p in [
        cfg["cni"]["socket"].as_str().unwrap(),
        cfg["cni"]["podMap"].as_str().unwrap(),
        cfg["adminSocket"].as_str().unwrap(),
        DEFAULT_POD_MAP,
    ] {
        assert!(
            Path::new(p).starts_with(run_dir),
            "{p} not under {}",
            run_dir.display()
        );
        let (name, _) = mount_of(agent, Path::new(p));
        assert_eq!(
            volume(vols, name).host_path.as_ref().unwrap().path,
            run_dir.to_str().unwrap()
        );
    }
    assert_eq!(cfg["cni"]["socket"], DEFAULT_SOCKET);
    let (name, _) = mount_of(agent, Path::new("/run/netns/cni-1234"));
    let mount = agent
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == name)
        .unwrap();
    assert_eq!(mount.mount_propagation.as_deref(), Some("HostToContainer"));
    let token = Path::new(cfg["ca"]["tokenFile"].as_str().unwrap());
    let (name, dir) = mount_of(agent, token);
    let projected = volume(vols, name).projected.as_ref().unwrap();
    let sat = projected
        .sources
        .iter()
        .flatten()
        .find_map(|s| s.service_account_token.as_ref())
        .unwrap();
    assert_eq!(sat.audience.as_deref(), Some(DEFAULT_AUDIENCE));
    assert_eq!(Path::new(dir).join(&sat.path), token);
    let metrics: std::net::SocketAddr = cfg["metricsListen"].as_str().unwrap().parse().unwrap();
    let port = agent
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some("metrics"))
        .unwrap();
    assert_eq!((metrics.port(), port.container_port), (15020, 15020));
    let (name, _) = mount_of(agent, Path::new(cfg["ca"]["rootCert"].as_str().unwrap()));
    assert!(volume(vols, name).config_map.is_some());
    // Kernel programs attach in the host's cgroup2 tree and pin on the host's bpffs; the agent
    // finds kubelet's pod root itself and stays in its own pod's cgroup.
    // The pods' delivery sysctls are set through the host's /proc/sys/net: the container's
    // own /proc/sys is read-only.
    for (key, host) in [
        ("cgroupRoot", "/sys/fs/cgroup"),
        ("bpfPinDir", "/sys/fs/bpf"),
        ("procSysNet", "/proc/sys/net"),
    ] {
        let p = Path::new(cfg[key].as_str().unwrap());
        let (name, _) = mount_of(agent, p);
        let on_host = &volume(vols, name).host_path.as_ref().unwrap().path;
        assert_eq!(
            on_host,
            host,
            "{key}: {} is not on the host's {host}",
            p.display()
        );
    }
    assert_eq!(cfg["podsCgroup"], "auto");
    assert!(
        cfg.get("agentCgroup").is_none(),
        "the agent cannot leave its cgroup namespace"
    );

    // The CA serves under the name and port the agent dials.
    let ca = CaConfig::parse(
        Path::new("ca.yaml"),
        m.config_maps["ambit-ca-config"].data.as_ref().unwrap()["ca.yaml"].as_str(),
    )
    .unwrap();
    let (host, ca_port) = cfg["ca"]["address"]
        .as_str()
        .unwrap()
        .rsplit_once(':')
        .unwrap();
    assert!(
        ca.serving_names.iter().any(|n| n == host),
        "CA does not serve as {host}"
    );
    assert_eq!(ca.tokens.audiences, [DEFAULT_AUDIENCE]);
    assert_eq!(ca.tokens.node_agents, [DEFAULT_NODE_AGENT]);
    let svc = m
        .services
        .iter()
        .find(|s| s.metadata.name.as_deref() == Some("ambit-ca"))
        .unwrap();
    let sp = &svc.spec.as_ref().unwrap().ports.as_ref().unwrap()[0];
    assert_eq!(sp.port.to_string(), ca_port);
    assert_eq!(ca.listen.port().to_string(), ca_port);
    assert!(host.starts_with(&format!("{}.", svc.metadata.name.as_deref().unwrap())));
}

#[test]
fn crds_serve_the_versions_the_agent_watches() {
    let m = manifests();
    for (group, version, kind, plural) in ISTIO_KINDS {
        let crd = m
            .crds
            .iter()
            .find(|c| c.spec.group == group && c.spec.names.plural == plural)
            .unwrap_or_else(|| panic!("no CRD for {group}/{plural}"));
        assert_eq!(crd.spec.names.kind, kind);
        assert_eq!(
            crd.metadata.name.as_deref(),
            Some(format!("{plural}.{group}").as_str())
        );
        assert!(crd
            .spec
            .versions
            .iter()
            .any(|v| v.name == version && v.served));
        assert_eq!(crd.spec.versions.iter().filter(|v| v.storage).count(), 1);
    }
}

#[test]
fn agent_configmap_is_a_valid_agent_config() {
    let m = manifests();
    let text = &m.config_maps["ambit-config"].data.as_ref().unwrap()["config.yaml"];
    let cfg = ambit::config::Config::parse_with_node(
        Path::new("deploy/base/configmap.yaml"),
        text,
        Some("node-a".into()),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        cfg.node, "node-a",
        "the node name comes from AMBIT_NODE_NAME"
    );
    assert!(matches!(
        cfg.inventory,
        ambit::config::InventorySource::Kubernetes(_)
    ));
    assert!(cfg.ca.is_some() && cfg.cni.is_some() && cfg.metrics_listen.is_some());
}
