//! The CNI chain on real namespaces: Debian's reference plugins (`bridge` + `host-local`, from
//! `containernetworking-plugins`) then `ambit-cni`, invoked as a container runtime does, inside a
//! throwaway "node" netns, against the agent's CNI server, handler, pod map and the Kubernetes
//! source's snapshot builder. Privileged: needs root and `ip`.
#![expect(
    clippy::unwrap_used,
    reason = "test helpers panic on setup failure, like the tests"
)]
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use ambit::cni::handler::handler;
use ambit::cni::pods::PodMap;
use ambit::cni::server;
use ambit::inventory::kube::{Builder, Objects};
use ambit::inventory::Snapshot;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use serde_json::{json, Value};
use tokio::sync::watch;

const PLUGINS: &str = "/usr/lib/cni";

/// Named network namespaces (and a temp dir) removed on drop.
struct Fixture {
    netns: Vec<String>,
    dir: PathBuf,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        for ns in &self.netns {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "privileged test: run as root (cargo test -- --include-ignored)"
    );
    assert!(
        Path::new(PLUGINS).join("bridge").exists(),
        "install Debian's containernetworking-plugins ({PLUGINS}/bridge missing)"
    );
}

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs `plugin` in `node` as the runtime does; returns (exit code, stdout JSON or Null).
fn cni(node: &str, plugin: &Path, command: &str, netns: &str, conf: &Value) -> (i32, Value) {
    let mut child = Command::new("ip")
        .args(["netns", "exec", node])
        .arg(plugin)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", "5a1b2c3d4e5f")
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", PLUGINS)
        .env(
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=client;K8S_POD_UID=u-client",
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let v = if text.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap()
    };
    (out.status.code().unwrap(), v)
}

const OBJECTS: &str = r#"
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
  uid: u-client
spec:
  nodeName: node1
  serviceAccountName: client
  containers:
  - name: app
    image: busybox
status:
  phase: Pending
"#;

#[test]
#[ignore = "privileged: needs root, ip and containernetworking-plugins"]
fn bridge_then_ambit_cni_on_real_namespaces() {
    require_root();
    let id = std::process::id();
    let (node, pod) = (format!("ambit-cnit-n{id}"), format!("ambit-cnit-p{id}"));
    let dir = std::env::temp_dir().join(format!("ambit-cni-chain-{id}"));
    std::fs::create_dir_all(&dir).unwrap();
    let fx = Fixture {
        netns: vec![node.clone(), pod.clone()],
        dir: dir.clone(),
    };
    ip(&["netns", "add", &node]);
    ip(&["netns", "add", &pod]);
    let pod_netns = format!("/run/netns/{pod}");

    // The agent: CNI server + handler + pod map, and the Kubernetes source's snapshot builder
    // fed with the pod's API objects and the map (what inventory::kube::watch does).
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let socket = dir.join("cni.sock");
    let map = Arc::new(PodMap::load(&dir.join("cni-pods.json")).unwrap());
    let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
    let mut pods_rx = map.subscribe();
    rt.spawn(async move {
        let mut builder = Builder::new("node1".into());
        let mut pods = Vec::new();
        let mut namespaces = Vec::new();
        for v in ambit::yaml::from_multiple::<serde_json::Value>(OBJECTS).unwrap() {
            match v["kind"].as_str().unwrap() {
                "Pod" => pods.push(Arc::new(serde_json::from_value::<Pod>(v).unwrap())),
                _ => namespaces.push(Arc::new(serde_json::from_value::<Namespace>(v).unwrap())),
            }
        }
        loop {
            let cni = pods_rx.borrow_and_update().clone();
            let snap = builder.build(&Objects {
                pods: &pods,
                namespaces: &namespaces,
                services: &[],
                endpoint_slices: &[],
                peer_authentications: &[],
                authorization_policies: &[],
                destination_rules: &[],
                nodes: &[],
                cni_pods: &cni,
            });
            tx.send_replace(Arc::new(snap));
            if pods_rx.changed().await.is_err() {
                return;
            }
        }
    });
    let listener = {
        let _g = rt.enter();
        server::bind(&socket).unwrap()
    };
    let inventory = rx.clone();
    rt.spawn(server::serve(
        listener,
        handler(
            map.clone(),
            ambit::inventory::sandboxes::pod_views(inventory),
            None,
            Duration::from_secs(5),
        ),
    ));
    let ambit = dir.join("ambit-cni");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_ambit"), &ambit).unwrap();

    let bridge_conf = json!({
        "cniVersion": "1.0.0",
        "name": "ambit-chain",
        "type": "bridge",
        "bridge": "ambt0",
        "isGateway": true,
        "ipam": {
            "type": "host-local",
            "ranges": [[{"subnet": "10.213.7.0/24"}]],
            "dataDir": dir.join("ipam"),
        },
    });
    let (code, result) = cni(
        &node,
        &Path::new(PLUGINS).join("bridge"),
        "ADD",
        &pod_netns,
        &bridge_conf,
    );
    assert_eq!(code, 0, "bridge ADD: {result}");
    let address = result["ips"][0]["address"].as_str().unwrap().to_string();
    let pod_ip = address.split('/').next().unwrap().to_string();
    let ambit_conf = json!({
        "cniVersion": "1.0.0",
        "name": "ambit-chain",
        "type": "ambit-cni",
        "socketPath": socket,
        "timeoutSeconds": 10,
        "prevResult": result,
    });
    let (code, out) = cni(&node, &ambit, "ADD", &pod_netns, &ambit_conf);
    assert_eq!(code, 0, "ambit-cni ADD: {out}");
    assert_eq!(out["ips"], result["ips"], "prevResult passed through");

    // The agent knows the pod's netns and the address the bridge plugin gave it.
    let snap = rx.borrow().clone();
    let w = &snap.workloads["shop/client"];
    assert!(w.enrolled);
    assert_eq!(w.netns.as_deref(), Some(Path::new(&pod_netns)));
    assert_eq!(w.ips, [pod_ip.parse::<std::net::IpAddr>().unwrap()]);
    assert!(ip(&["-n", &pod, "addr", "show", "eth0"]).contains(&address));

    // CHECK through the chain, then DEL in reverse order, twice (idempotent).
    let check_conf = |prev: &Value, ty: &str| {
        let mut c = if ty == "bridge" {
            bridge_conf.clone()
        } else {
            ambit_conf.clone()
        };
        c["prevResult"] = prev.clone();
        c
    };
    let (code, out) = cni(
        &node,
        &Path::new(PLUGINS).join("bridge"),
        "CHECK",
        &pod_netns,
        &check_conf(&result, "bridge"),
    );
    assert_eq!(code, 0, "bridge CHECK: {out}");
    let (code, out) = cni(
        &node,
        &ambit,
        "CHECK",
        &pod_netns,
        &check_conf(&result, "ambit"),
    );
    assert_eq!((code, out), (0, Value::Null));
    for _ in 0..2 {
        let (code, out) = cni(&node, &ambit, "DEL", &pod_netns, &ambit_conf);
        assert_eq!((code, out), (0, Value::Null));
        let (code, out) = cni(
            &node,
            &Path::new(PLUGINS).join("bridge"),
            "DEL",
            &pod_netns,
            &bridge_conf,
        );
        assert_eq!(code, 0, "bridge DEL: {out}");
    }
    assert!(map.pods().is_empty());
    drop(rt);
    drop(fx);
}
