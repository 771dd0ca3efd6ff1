//! The redirection annotation set by a real agent process with a Kubernetes inventory: node1's
//! agent reads a test API server (the agent crate's mock, in node1's network namespace, over a
//! kubeconfig) and patches `ambient.istio.io/redirection` on its own pods: removed at start
//! from a pod it does not capture, set only once a CNI pod's capture is attached, removed on
//! CNI DEL, and removed at restart after a crash from a pod no longer enrolled.
#![allow(
    clippy::unwrap_used,
    reason = "test bodies panic with a line number (STYLE.md §7)"
)]
use std::path::Path;
use std::time::{Duration, Instant};

use ambit::inventory::kube::annotate::{FIELD_MANAGER, REDIRECTION_ANNOTATION};
use ambit::inventory::kube::fake_api::{FakeApi, PatchCall};
use ambit_e2e::netns::NetnsServer;
use ambit_e2e::{testbed_with, Options, Testbed};
use nix::sys::signal::Signal;
use serde_json::{json, Value};

/// A Pod as the API server lists it, on `node`, enrolled or not by `ambit.io/mode`.
fn pod(tb: &Testbed, name: &str, node: &str, mode: &str, annotated: bool) -> Value {
    let mut annotations = serde_json::Map::new();
    if annotated {
        annotations.insert(REDIRECTION_ANNOTATION.into(), json!("enabled"));
    }
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": "default",
            "uid": uid(tb, name),
            "creationTimestamp": "2026-01-01T00:00:00Z",
            "labels": {"app": name, "ambit.io/mode": mode},
            "annotations": annotations,
        },
        "spec": {
            "nodeName": node,
            "serviceAccountName": name,
            "containers": [{"name": "app", "image": "testbed"}],
        },
        "status": {"phase": "Pending"},
    })
}

/// The UID `add_cni_pod` gives pod `name` (`K8S_POD_UID`).
fn uid(tb: &Testbed, name: &str) -> String {
    format!("uid-{}-{name}", tb.state().id)
}

/// Waits (20 s) for a patch of `default/name` matching `want`; returns it.
fn wait_patch(tb: &Testbed, api: &FakeApi, name: &str, want: &Value) -> PatchCall {
    let key = format!("default/{name}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let all = api.patches();
        if let Some(p) = all.iter().find(|p| p.pod == key && p.body == *want) {
            return p.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no patch {want} of {key}; patches: {all:?}\n{}",
            tb.agent_logs(40)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The patch body that sets (`Some("enabled")`) or removes (`None`) the annotation.
fn body(tb: &Testbed, name: &str, value: Option<&str>) -> Value {
    json!({"metadata": {"uid": uid(tb, name), "annotations": {REDIRECTION_ANNOTATION: value}}})
}

/// The annotation as the API server stores pod `name`.
fn annotation(api: &FakeApi, name: &str) -> Option<String> {
    let pod = api.pod(&format!("default/{name}"))?;
    pod["metadata"]["annotations"][REDIRECTION_ANNOTATION]
        .as_str()
        .map(str::to_string)
}

/// node1's agent config switched to the Kubernetes inventory of `kubeconfig`, annotating.
fn kube_config(kubeconfig: &Path) -> String {
    format!(
        "inventory: {{kind: kubernetes, kubeconfig: {}}}\nredirectionAnnotation: true\n",
        kubeconfig.display()
    )
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn the_agent_annotates_captured_pods_and_removes_stale_annotations() {
    let mut tb = testbed_with(Options {
        pods: Vec::new(),
        ca: false,
        cni: true,
        ..Options::default()
    });
    // The test API server serves from node1's network namespace, where the agent runs.
    let server = NetnsServer::start(&tb.node("node1").netns_path(), FakeApi::start).unwrap();
    let api = server.server();
    api.apply(json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": "default", "labels": {"kubernetes.io/metadata.name": "default"}},
    }));
    for n in ["node1", "node2"] {
        api.apply(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": n}}));
    }
    // Left by a crashed agent on a pod it does not capture (not enrolled), and another
    // node's annotated pod, which this agent must never touch.
    api.apply(pod(&tb, "stale", "node1", "disabled", true));
    api.apply(pod(&tb, "elsewhere", "node2", "enabled", true));
    let kubeconfig = tb.state().dir.join("kubeconfig.yaml");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: http://{addr}\n\
             users:\n- name: test\n  user: {{}}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: test\n\
             current-context: test\n",
            addr = api.addr
        ),
    )
    .unwrap();
    tb.restart_agent_with("node1", &kube_config(&kubeconfig))
        .unwrap();

    // At start the stale annotation is removed, with the agent's field manager.
    let p = wait_patch(&tb, api, "stale", &body(&tb, "stale", None));
    assert_eq!(p.status, 200, "{p:?}");
    assert_eq!(p.field_manager.as_deref(), Some(FIELD_MANAGER), "{p:?}");
    assert_eq!(p.content_type, "application/merge-patch+json");
    assert_eq!(annotation(api, "stale"), None);

    // An enrolled pod the agent lists but has no netns for yet (the runtime has not called
    // ADD) is not captured: no annotation, although the loop is live (it just removed one).
    api.apply(pod(&tb, "cnipod", "node1", "enabled", false));
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        api.patches().iter().all(|p| p.pod != "default/cnipod"),
        "{:?}",
        api.patches()
    );
    assert_ne!(
        tb.status("node1").unwrap().pod_state("cnipod"),
        Some("enrolled")
    );

    // ADD returns once the capture is attached; the annotation follows.
    let sandbox = tb.add_cni_pod("cnipod", "node1").unwrap();
    assert_eq!(
        tb.status("node1").unwrap().pod_state("cnipod"),
        Some("enrolled")
    );
    let p = wait_patch(&tb, api, "cnipod", &body(&tb, "cnipod", Some("enabled")));
    assert_eq!(p.status, 200, "{p:?}");
    assert_eq!(annotation(api, "cnipod").as_deref(), Some("enabled"));

    // CNI DEL unenrolls it: the annotation is removed.
    tb.del_cni_pod(&sandbox).unwrap();
    wait_patch(&tb, api, "cnipod", &body(&tb, "cnipod", None));
    assert_eq!(annotation(api, "cnipod"), None);

    // Crash: the agent dies (SIGKILL) holding a captured, annotated pod; while it is down the
    // pod is unenrolled. The restarted agent removes the annotation it left.
    api.apply(pod(&tb, "crashpod", "node1", "enabled", false));
    let _crashed = tb.add_cni_pod("crashpod", "node1").unwrap();
    wait_patch(
        &tb,
        api,
        "crashpod",
        &body(&tb, "crashpod", Some("enabled")),
    );
    tb.stop_agent("node1", Signal::SIGKILL).unwrap();
    api.apply(pod(&tb, "crashpod", "node1", "disabled", true));
    let before = api.patches().len();
    // Not waiting for readiness: the testbed expects its CNI pods served, and neither is.
    tb.start_agent_with("node1", &kube_config(&kubeconfig))
        .unwrap();
    let p = wait_patch(&tb, api, "crashpod", &body(&tb, "crashpod", None));
    assert_eq!(p.status, 200, "{p:?}");
    assert_eq!(annotation(api, "crashpod"), None);

    // Never a patch of another node's pod, across both runs.
    let all = api.patches();
    assert!(all.len() > before, "{all:?}");
    assert!(all.iter().all(|p| p.pod != "default/elsewhere"), "{all:?}");
    assert_eq!(annotation(api, "elsewhere").as_deref(), Some("enabled"));
}
