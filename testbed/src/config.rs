//! Renders the agents' config files and the shared Kubernetes-shaped inventory.
use std::fmt::Write as _;

use crate::net;
use crate::state::{Node, Pod, State};

/// How often agents poll the inventory file, in milliseconds.
pub const INVENTORY_POLL_MS: u64 = 200;

/// The `ambit run --config` YAML for `node`: with a `ca:` section when the testbed has a CA
/// (mTLS), without one otherwise (capture only). The node's bridge addresses, where its
/// kubelet's probes would come from, are admitted under STRICT.
pub fn agent_config(state: &State, node: &Node) -> String {
    let mut out = format!(
        "# ambit testbed {id}: agent of {name}\n\
         node: {name}\n\
         trustDomain: cluster.local\n\
         inventory: {inventory}\n\
         inventoryPollMs: {INVENTORY_POLL_MS}\n\
         adminSocket: {socket}\n\
         bpfPinDir: {pins}\n\
         {cgroups}\
         probeSources: [{probe4}, \"{probe6}\"]\n",
        id = state.id,
        name = node.name,
        inventory = state.inventory.display(),
        socket = node.admin_socket.display(),
        pins = node.pin_dir.display(),
        cgroups = cgroups(state, node),
        probe4 = net::gateway_v4(node.index),
        probe6 = net::gateway_v6(node.index),
    );
    if let Some(ca) = &state.ca {
        out.push_str(&crate::ca::agent_section(ca, node));
    }
    if state.cni {
        out.push_str(&crate::cni::agent_section(state, node));
    }
    out
}

/// Where the agent attaches and lives: told both, or (kubelet's layout) only the node's
/// cgroup2 root, finding the pods' root and staying in the cgroup it is started in.
fn cgroups(state: &State, node: &Node) -> String {
    match state.kubelet_cgroups {
        Some(_) => format!("cgroupRoot: {}\npodsCgroup: auto\n", node.cgroup.display()),
        None => format!(
            "podsCgroup: {}\nagentCgroup: {}\n",
            node.cgroup.display(),
            node.agent_cgroup.display()
        ),
    }
}

/// The inventory: the `default` Namespace, every listed pod, as `kubectl get -o yaml`
/// documents, then the objects added with `apply`.
pub fn inventory(state: &State) -> String {
    let mut out = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: default\n  labels:\n    \
         kubernetes.io/metadata.name: default\n",
    );
    for pod in state.pods.iter().filter(|p| p.in_inventory) {
        out.push_str("---\n");
        out.push_str(&pod_yaml(pod));
    }
    for obj in &state.applied {
        out.push_str("---\n");
        out.push_str(obj.yaml.trim_end());
        out.push('\n');
    }
    out
}

fn pod_yaml(pod: &Pod) -> String {
    let mut y = String::new();
    let _ = write!(
        y,
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  labels:\n    \
         app: {name}\n",
        name = pod.name,
        ns = pod.namespace,
    );
    if pod.enrolled {
        y.push_str("    ambit.io/mode: enabled\n");
    }
    for (k, v) in &pod.labels {
        let _ = writeln!(y, "    {k}: {v:?}");
    }
    let _ = write!(
        y,
        "  annotations:\n    ambit.io/netns: {netns}\n    ambit.io/cgroup: {cgroup}\n{extra}\
         spec:\n  nodeName: {node}\n  serviceAccountName: {name}\n  containers:\n  - name: app\n    \
         image: testbed\n\
         status:\n  phase: Running\n  podIP: {v4}\n  podIPs:\n  - ip: {v4}\n  - ip: {v6}\n",
        netns = pod.netns_path().display(),
        cgroup = pod.cgroup.display(),
        extra = pod
            .annotations
            .iter()
            .map(|(k, v)| format!("    {k}: {v:?}\n"))
            .collect::<String>(),
        node = pod.node,
        name = pod.name,
        v4 = pod.ipv4,
        v6 = pod.ipv6,
    );
    y
}
