//! CNI conformance of the plugin: real stdin/stdout buffers and env maps against a real
//! unix-socket agent (the crate's own server) in this process.
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

use super::{run, CODE_AGENT_FAILED};
use crate::cni::server;
use crate::cni::{CniCommand, CniEvent, CniReply};

const NETNS: &str = "/proc/self/ns/net";

/// A directory under the system temp dir, removed on drop.
pub(crate) struct TempDir(pub(crate) PathBuf);

impl TempDir {
    pub(crate) fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ambit-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An in-process agent answering through `reply` and recording what it was told.
struct Stub {
    _dir: TempDir,
    socket: PathBuf,
    events: Arc<Mutex<Vec<CniEvent>>>,
    _rt: tokio::runtime::Runtime,
}

fn stub(reply: impl Fn(&CniEvent) -> CniReply + Send + Sync + 'static) -> Stub {
    let dir = TempDir::new("cni");
    let socket = dir.0.join("cni.sock");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let events = Arc::new(Mutex::new(Vec::new()));
    let seen = events.clone();
    let handler: server::Handler = Arc::new(move |ev: CniEvent| {
        let r = reply(&ev);
        seen.lock().unwrap().push(ev);
        r
    });
    let listener = {
        let _g = rt.enter();
        server::bind(&socket).unwrap()
    };
    rt.spawn(server::serve(listener, handler));
    Stub {
        _dir: dir,
        socket,
        events,
        _rt: rt,
    }
}

fn env(command: &str) -> BTreeMap<String, String> {
    [
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", "3f1a9c0e2b7d"),
        ("CNI_NETNS", NETNS),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin"),
        (
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=client;K8S_POD_INFRA_CONTAINER_ID=3f1a9c0e2b7d;K8S_POD_UID=8d1c5a6e-1111-2222-3333-444455556666",
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn prev_result() -> Value {
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [
            {"name": "cni0", "mac": "de:ad:be:ef:00:01"},
            {"name": "veth1234", "mac": "de:ad:be:ef:00:02"},
            {"name": "eth0", "mac": "de:ad:be:ef:00:03", "sandbox": NETNS}
        ],
        "ips": [
            {"interface": 2, "address": "10.244.1.7/24", "gateway": "10.244.1.1"},
            {"interface": 2, "address": "fd00:10:244:1::7/64", "gateway": "fd00:10:244:1::1"}
        ],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dns": {}
    })
}

fn config(socket: &Path) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "type": "ambit-cni",
        "socketPath": socket,
        "timeoutSeconds": 2,
        "prevResult": prev_result(),
    })
}

/// Runs the plugin; returns (exit code, parsed stdout or Null when empty).
fn call(env: &BTreeMap<String, String>, stdin: &[u8]) -> (i32, Value) {
    let mut out = Vec::new();
    let code = run(env, &mut &stdin[..], &mut out);
    let text = String::from_utf8(out).unwrap();
    let v = if text.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap()
    };
    (code, v)
}

fn assert_error(out: &(i32, Value), code: u64, needle: &str) {
    assert_eq!(out.0, 1, "{}", out.1);
    assert_eq!(out.1["code"], code, "{}", out.1);
    assert!(out.1["cniVersion"].is_string(), "{}", out.1);
    let text = format!("{} {}", out.1["msg"], out.1["details"]);
    assert!(text.contains(needle), "want `{needle}` in {text}");
}

#[test]
fn version_lists_supported_versions() {
    let mut e = BTreeMap::new();
    e.insert("CNI_COMMAND".to_string(), "VERSION".to_string());
    let (code, v) = call(&e, br#"{"cniVersion":"0.4.0"}"#);
    assert_eq!(code, 0);
    assert_eq!(v["cniVersion"], "0.4.0");
    let versions: Vec<&str> = v["supportedVersions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(versions.contains(&"1.0.0") && versions.contains(&"0.3.1"));
}

#[test]
fn add_reports_pod_with_netns_fd_and_passes_prev_result_through() {
    let s = stub(|_| CniReply::Enrolled);
    let (code, out) = call(&env("ADD"), config(&s.socket).to_string().as_bytes());
    assert_eq!(code, 0, "{out}");
    assert_eq!(out, prev_result(), "prevResult passes through unchanged");
    let events = s.events.lock().unwrap();
    assert_eq!(events.len(), 1);
    let ev = &events[0];
    assert_eq!(ev.command, CniCommand::Add);
    assert_eq!(ev.container_id, "3f1a9c0e2b7d");
    assert_eq!(ev.pod.key(), "shop/client");
    assert_eq!(ev.pod.uid, "8d1c5a6e-1111-2222-3333-444455556666");
    assert_eq!(ev.ifname, "eth0");
    assert_eq!(ev.netns.as_deref(), Some(Path::new(NETNS)));
    let ips: Vec<String> = ev.ips.iter().map(ToString::to_string).collect();
    assert_eq!(ips, ["10.244.1.7", "fd00:10:244:1::7"]);
    let md = std::fs::metadata(NETNS).unwrap();
    let id = ev.netns_id.expect("server saw the netns fd");
    assert_eq!((id.dev, id.ino), (md.dev(), md.ino()));
}

#[test]
fn add_for_pod_outside_mesh_passes_through() {
    let s = stub(|_| CniReply::NotInMesh);
    let mut conf = config(&s.socket);
    conf["cniVersion"] = json!("0.4.0");
    let (code, out) = call(&env("ADD"), conf.to_string().as_bytes());
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out["cniVersion"], "0.4.0",
        "result is in the config's version"
    );
    assert_eq!(out["ips"], prev_result()["ips"]);
}

#[test]
fn add_refused_by_agent_is_plugin_error_naming_pod() {
    let s = stub(|_| CniReply::Failed {
        message: "capture not in place".into(),
    });
    let out = call(&env("ADD"), config(&s.socket).to_string().as_bytes());
    assert_error(&out, u64::from(CODE_AGENT_FAILED), "shop/client");
    assert_error(&out, u64::from(CODE_AGENT_FAILED), "capture not in place");
}

#[test]
fn add_with_agent_unreachable_is_try_again_later() {
    let dir = TempDir::new("cni");
    let socket = dir.0.join("absent.sock");
    let out = call(&env("ADD"), config(&socket).to_string().as_bytes());
    assert_error(&out, 11, socket.to_str().unwrap());
}

#[test]
fn add_with_silent_agent_times_out_as_try_again_later() {
    let dir = TempDir::new("cni");
    let socket = dir.0.join("silent.sock");
    // Accepts (the backlog does) but never answers.
    let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let mut conf = config(&socket);
    conf["timeoutSeconds"] = json!(1);
    let started = std::time::Instant::now();
    let out = call(&env("ADD"), conf.to_string().as_bytes());
    assert_error(&out, 11, "no reply");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
}

#[test]
fn del_succeeds_with_agent_gone_and_is_idempotent() {
    let dir = TempDir::new("cni");
    let conf = config(&dir.0.join("absent.sock")).to_string();
    for _ in 0..2 {
        let (code, out) = call(&env("DEL"), conf.as_bytes());
        assert_eq!((code, out), (0, Value::Null));
    }
    // DEL without a netns and without prevResult (allowed by the spec).
    let mut e = env("DEL");
    e.remove("CNI_NETNS");
    let conf = json!({"cniVersion": "1.0.0", "name": "n", "type": "ambit-cni", "socketPath": dir.0.join("absent.sock")});
    assert_eq!(call(&e, conf.to_string().as_bytes()), (0, Value::Null));
}

#[test]
fn del_tells_the_agent_even_when_it_fails() {
    let s = stub(|_| CniReply::Failed {
        message: "boom".into(),
    });
    let (code, out) = call(&env("DEL"), config(&s.socket).to_string().as_bytes());
    assert_eq!((code, out), (0, Value::Null));
    let events = s.events.lock().unwrap();
    assert_eq!(events[0].command, CniCommand::Del);
    assert!(events[0].ips.is_empty());
}

#[test]
fn check_asks_the_agent() {
    let s = stub(|_| CniReply::Enrolled);
    let (code, out) = call(&env("CHECK"), config(&s.socket).to_string().as_bytes());
    assert_eq!((code, out), (0, Value::Null));
    assert_eq!(s.events.lock().unwrap()[0].command, CniCommand::Check);
    let s = stub(|_| CniReply::Failed {
        message: "not captured".into(),
    });
    let out = call(&env("CHECK"), config(&s.socket).to_string().as_bytes());
    assert_error(&out, u64::from(CODE_AGENT_FAILED), "not captured");
}

#[test]
fn missing_or_bad_environment_is_code_4_naming_the_variable() {
    let conf = config(Path::new("/nonexistent.sock")).to_string();
    for var in [
        "CNI_COMMAND",
        "CNI_CONTAINERID",
        "CNI_NETNS",
        "CNI_IFNAME",
        "CNI_PATH",
    ] {
        let mut e = env("ADD");
        e.remove(var);
        assert_error(&call(&e, conf.as_bytes()), 4, var);
    }
    let bad = [
        ("CNI_COMMAND", "FROB"),
        ("CNI_CONTAINERID", "../etc"),
        ("CNI_IFNAME", "eth0/x"),
        ("CNI_IFNAME", "a-name-that-is-too-long"),
        ("CNI_ARGS", "K8S_POD_NAME"),
    ];
    for (var, value) in bad {
        let mut e = env("ADD");
        e.insert(var.to_string(), value.to_string());
        assert_error(&call(&e, conf.as_bytes()), 4, var);
    }
}

#[test]
fn malformed_stdin_is_code_6() {
    for stdin in [
        &b""[..],
        b"not json",
        b"[1,2]",
        br#"{"name":"n","type":"t"}"#,
    ] {
        assert_error(&call(&env("ADD"), stdin), 6, "decode");
    }
    // DEL with garbage is still an error: the runtime must see its config is broken.
    assert_error(&call(&env("DEL"), b"{"), 6, "decode");
}

#[test]
fn unsupported_version_is_code_1() {
    let mut conf = config(Path::new("/nonexistent.sock"));
    conf["cniVersion"] = json!("9.9.9");
    let out = call(&env("ADD"), conf.to_string().as_bytes());
    assert_error(&out, 1, "9.9.9");
    assert_eq!(out.1["cniVersion"], "1.0.0");
}

#[test]
fn invalid_network_config_is_code_7_naming_the_field() {
    let socket = Path::new("/nonexistent.sock");
    let mut conf = config(socket);
    conf.as_object_mut().unwrap().remove("prevResult");
    assert_error(
        &call(&env("ADD"), conf.to_string().as_bytes()),
        7,
        "prevResult",
    );
    assert_error(
        &call(&env("CHECK"), conf.to_string().as_bytes()),
        7,
        "prevResult",
    );
    let mut conf = config(socket);
    conf["prevResult"]["ips"][0]["address"] = json!("10.0.0.300/24");
    assert_error(
        &call(&env("ADD"), conf.to_string().as_bytes()),
        7,
        "prevResult.ips",
    );
    let mut conf = config(socket);
    conf["name"] = json!("");
    assert_error(&call(&env("ADD"), conf.to_string().as_bytes()), 7, "name");
}

#[test]
fn add_without_kubernetes_args_passes_through_without_the_agent() {
    let mut e = env("ADD");
    e.insert("CNI_ARGS".into(), "IgnoreUnknown=1".into());
    let conf = config(Path::new("/nonexistent.sock"));
    let (code, out) = call(&e, conf.to_string().as_bytes());
    assert_eq!(code, 0, "{out}");
    assert_eq!(out, prev_result());
}

#[test]
fn add_with_missing_netns_is_io_error_naming_path() {
    let s = stub(|_| CniReply::Enrolled);
    let mut e = env("ADD");
    e.insert("CNI_NETNS".into(), "/var/run/netns/cni-gone".into());
    let out = call(&e, config(&s.socket).to_string().as_bytes());
    assert_error(&out, 5, "/var/run/netns/cni-gone");
    assert!(s.events.lock().unwrap().is_empty());
}

#[test]
fn server_refuses_fd_that_is_not_a_netns_or_not_the_path() {
    let s = stub(|_| CniReply::Enrolled);
    let dir = TempDir::new("cni");
    let file = dir.0.join("plain");
    std::fs::write(&file, b"x").unwrap();
    let ev = CniEvent {
        command: CniCommand::Add,
        container_id: "c1".into(),
        netns: Some(NETNS.into()),
        ifname: "eth0".into(),
        pod: crate::cni::PodRef {
            namespace: "a".into(),
            name: "b".into(),
            uid: String::new(),
        },
        ips: Vec::new(),
        netns_id: None,
    };
    let timeout = std::time::Duration::from_secs(2);
    let plain = std::fs::File::open(&file).unwrap();
    let reply = crate::cni::wire::call(
        &s.socket,
        &ev,
        Some(std::os::fd::AsFd::as_fd(&plain)),
        timeout,
    )
    .unwrap();
    assert!(
        matches!(&reply, CniReply::Failed { message } if message.contains("not a network namespace")),
        "{reply:?}"
    );
    // A netns fd, but the path names a file that is not that namespace.
    let mut ev2 = ev.clone();
    ev2.netns = Some(file.clone());
    let ns = std::fs::File::open(NETNS).unwrap();
    let reply = crate::cni::wire::call(
        &s.socket,
        &ev2,
        Some(std::os::fd::AsFd::as_fd(&ns)),
        timeout,
    )
    .unwrap();
    assert!(
        matches!(&reply, CniReply::Failed { message } if message.contains("not the namespace")),
        "{reply:?}"
    );
    assert!(
        s.events.lock().unwrap().is_empty(),
        "handler never saw bad requests"
    );
}
