//! The `ambit` binary as a CNI plugin, run exactly as a container runtime runs it (env + stdin,
//! by the name `ambit-cni`), against the agent's real CNI server, handler and pod map.
#![expect(
    clippy::unwrap_used,
    reason = "test helpers panic on setup failure, like the tests"
)]
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ambit::cni::handler::handler;
use ambit::cni::pods::PodMap;
use ambit::cni::server;
use ambit::inventory::enrollment::Enrollment;
use ambit::inventory::{Snapshot, Workload};
use serde_json::{json, Value};
use tokio::sync::watch;

struct Dir(PathBuf);

impl Dir {
    fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "ambit-cni-bin-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The test process's own netns, by a path the agent (this process) can stat too.
fn netns() -> String {
    format!("/proc/{}/ns/net", std::process::id())
}

/// The binary under the name runtimes use: `<dir>/ambit-cni` -> `ambit`.
fn plugin_binary(dir: &Path) -> PathBuf {
    let link = dir.join("ambit-cni");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_ambit"), &link).unwrap();
    link
}

/// Runs `program args` with the CNI environment and `stdin`; returns (exit code, stdout JSON).
fn invoke(
    program: &Path,
    args: &[&str],
    command: &str,
    stdin: &Value,
    extra: &[(&str, &str)],
) -> (i32, Value) {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", "9c1d2e3f4a5b")
        .env("CNI_NETNS", netns())
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .env(
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=client;K8S_POD_UID=u-1",
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in extra {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let v = if text.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("stdout `{text}`: {e}"))
    };
    (out.status.code().unwrap(), v)
}

fn conf(socket: &Path) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "type": "ambit-cni",
        "socketPath": socket,
        "timeoutSeconds": 5,
        "prevResult": {
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "sandbox": netns()}],
            "ips": [{"interface": 0, "address": "10.88.0.9/16", "gateway": "10.88.0.1"}]
        }
    })
}

fn workload(netns: Option<PathBuf>) -> Workload {
    Workload {
        name: "client".into(),
        namespace: "shop".into(),
        service_account: "client".into(),
        node: "node1".into(),
        ips: vec!["10.88.0.9".parse().unwrap()],
        labels: Default::default(),
        enrolled: true,
        enrollment: Enrollment::by_mode_label(true),
        netns,
        cgroup: None,
        skip_ports: Vec::new(),
        skip_cidrs: Vec::new(),
        host_network: false,
        deleting: false,
        created: None,
    }
}

#[test]
fn plugin_binary_add_check_del_version_against_the_agent() {
    let dir = Dir::new();
    let socket = dir.0.join("cni.sock");
    let map_path = dir.0.join("cni-pods.json");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let map = Arc::new(PodMap::load(&map_path).unwrap());
    // Stand-in for the Kubernetes source: merge the CNI map's netns into the pod.
    let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
    let mut pods = map.subscribe();
    rt.spawn(async move {
        loop {
            let netns = pods.borrow_and_update().first().map(|p| p.netns.clone());
            let mut s = Snapshot::default();
            let w = workload(netns);
            s.workloads.insert(w.key(), w.into());
            tx.send_replace(Arc::new(s));
            if pods.changed().await.is_err() {
                return;
            }
        }
    });
    let listener = {
        let _g = rt.enter();
        server::bind(&socket).unwrap()
    };
    rt.spawn(server::serve(
        listener,
        handler(
            map.clone(),
            ambit::inventory::sandboxes::pod_views(rx),
            None,
            Duration::from_secs(3),
        ),
    ));
    let bin = plugin_binary(&dir.0);

    let (code, out) = invoke(&bin, &[], "ADD", &conf(&socket), &[]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out["ips"][0]["address"], "10.88.0.9/16",
        "prevResult passed through"
    );
    let saved: Value = serde_json::from_slice(&std::fs::read(&map_path).unwrap()).unwrap();
    assert_eq!(saved["pods"][0]["pod"]["name"], "client");
    assert_eq!(saved["pods"][0]["netns"], netns());
    assert!(saved["pods"][0]["netnsId"]["ino"].as_u64().unwrap() > 0);

    let (code, out) = invoke(&bin, &[], "CHECK", &conf(&socket), &[]);
    assert_eq!((code, out), (0, Value::Null));

    // `ambit cni` is the same plugin.
    let real = Path::new(env!("CARGO_BIN_EXE_ambit"));
    let (code, out) = invoke(
        real,
        &["cni"],
        "VERSION",
        &json!({"cniVersion": "1.0.0"}),
        &[],
    );
    assert_eq!(code, 0);
    assert_eq!(out["supportedVersions"].as_array().unwrap().len(), 4);

    for _ in 0..2 {
        let (code, out) = invoke(&bin, &[], "DEL", &conf(&socket), &[]);
        assert_eq!((code, out), (0, Value::Null));
    }
    assert!(map.pods().is_empty());

    // The agent goes away: ADD must tell the runtime to retry; DEL still succeeds.
    drop(rt);
    let (code, out) = invoke(&bin, &[], "ADD", &conf(&socket), &[]);
    assert_eq!(code, 1);
    assert_eq!(out["code"], 11, "{out}");
    assert!(
        out["msg"].as_str().unwrap().contains("shop/client"),
        "{out}"
    );
    let (code, out) = invoke(&bin, &[], "DEL", &conf(&socket), &[]);
    assert_eq!((code, out), (0, Value::Null));
}

#[test]
fn plugin_binary_reports_bad_input_as_cni_errors() {
    let dir = Dir::new();
    let bin = plugin_binary(&dir.0);
    let socket = dir.0.join("none.sock");
    let (code, out) = invoke(&bin, &[], "ADD", &json!("garbage"), &[]);
    assert_eq!((code, out["code"].as_u64()), (1, Some(6)), "{out}");
    let (code, out) = invoke(&bin, &[], "ADD", &conf(&socket), &[("CNI_NETNS", "")]);
    assert_eq!((code, out["code"].as_u64()), (1, Some(4)), "{out}");
    assert!(out["msg"].as_str().unwrap().contains("CNI_NETNS"));
}
