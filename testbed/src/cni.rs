//! Pods set up through the CNI chain, as kubelet and a container runtime do it: the Pod object
//! first (no netns, no address), then a fresh namespace, `loopback`, then the conflist `bridge`
//! (+ `host-local`) → `ambit-cni` run with `CNI_*` variables and the config on stdin (Debian's
//! `containernetworking-plugins`), against the agent's `cni:` socket.
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::cmd;
use crate::process;
use crate::state::{Node, Pod, State};
use crate::testbed::Testbed;
use crate::{cgroup, net};

/// Where Debian installs the reference plugins.
pub const PLUGINS: &str = "/usr/lib/cni";
/// How long one plugin call may take (the agent holds ADD until the pod is captured).
pub const PLUGIN_TIMEOUT: Duration = Duration::from_secs(30);
/// host-local hands out node addresses from `.200` to `.249`, clear of the testbed's own pods.
const RANGE: (u8, u8) = (200, 249);

/// The `cni:` section of `node`'s agent config: socket and pod map in the instance dir.
pub fn agent_section(state: &State, node: &Node) -> String {
    format!(
        "cni:\n  socket: {}\n  podMap: {}\n  waitMs: 20000\n",
        socket(state, node).display(),
        pod_map(state, node).display()
    )
}

/// `node`'s agent's CNI socket.
pub fn socket(state: &State, node: &Node) -> PathBuf {
    state.dir.join(format!("{}-cni.sock", node.name))
}

/// `node`'s agent's CNI pod map file.
pub fn pod_map(state: &State, node: &Node) -> PathBuf {
    state.dir.join(format!("{}-cni-pods.json", node.name))
}

/// A pod sandbox created through the chain.
#[derive(Debug, Clone)]
pub struct Sandbox {
    /// The pod as the testbed records it (`ipv4` is the address host-local gave it).
    pub pod: Pod,
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// The pod's `metadata.uid` (`K8S_POD_UID`).
    pub uid: String,
    /// The conflist the chain ran with.
    pub conflist: Value,
    /// The chain's ADD result (cached, as a runtime does, for DEL).
    pub result: Value,
}

impl Testbed {
    /// Creates enrolled pod `name` on `node` as kubelet and a runtime would: lists the Pod in
    /// the inventory without a netns annotation or address, creates its namespace (`ip netns
    /// add`) and cgroup, and runs `loopback`, then `bridge` (node bridge `br0`, `host-local`
    /// IPAM) and `ambit-cni` with ADD. The pod is recorded before anything is created, so
    /// teardown removes its namespace even after a failure. Needs `Options::cni`.
    pub fn add_cni_pod(&mut self, name: &str, node: &str) -> Result<Sandbox> {
        if !self.state().cni {
            bail!("add_cni_pod: the testbed was built without Options::cni");
        }
        if self.state().pods.iter().any(|p| p.name == name) {
            bail!("add_cni_pod: pod {name} exists (or existed) already");
        }
        let n = self.state().node(node)?.clone();
        let id = self.state().id.clone();
        let pod = Pod {
            name: name.into(),
            namespace: "default".into(),
            node: node.into(),
            netns: format!("ambit-{id}-{name}"),
            cgroup: n.cgroup.join(name),
            ipv4: Ipv4Addr::UNSPECIFIED,
            ipv6: Ipv6Addr::UNSPECIFIED,
            enrolled: true,
            servers: false,
            in_inventory: false,
            annotations: Vec::new(),
            labels: Vec::new(),
        };
        self.state_mut().pods.push(pod.clone());
        self.state().save()?;
        let uid = format!("uid-{id}-{name}");
        self.apply(&pod_yaml(&pod, &uid))?;
        net::add_netns(&pod.netns)?;
        // `add_netns` brought lo up; the runtime's loopback plugin does that on a real node.
        cmd::ip(&["-n", &pod.netns, "link", "set", "lo", "down"])?;
        cgroup::create(&pod.cgroup)?;
        let mut sandbox = Sandbox {
            container_id: format!("{id}{name}").replace('-', ""),
            uid,
            conflist: self.conflist(&n),
            result: Value::Null,
            pod,
        };
        let lo = json!({"cniVersion": "1.0.0", "name": "cni-loopback", "type": "loopback"});
        self.invoke(&sandbox, &lo, "ADD")?;
        sandbox.result = self.run_list(&sandbox, "ADD")?;
        let addr = sandbox.result["ips"][0]["address"]
            .as_str()
            .with_context(|| format!("chain result has no address: {}", sandbox.result))?;
        let ip: Ipv4Addr = addr
            .split('/')
            .next()
            .unwrap_or_default()
            .parse()
            .with_context(|| format!("chain result address `{addr}`"))?;
        sandbox.pod.ipv4 = ip;
        if let Some(p) = self.state_mut().pods.iter_mut().find(|p| p.name == name) {
            p.ipv4 = ip;
        }
        self.state().save()?;
        Ok(sandbox)
    }

    /// Updates the Pod's status with the sandbox's address and phase Running, as kubelet does
    /// once the sandbox is up (so the other nodes' agents know the address too).
    pub fn report_cni_pod_ip(&mut self, sandbox: &Sandbox) -> Result<()> {
        let mut yaml = pod_yaml(&sandbox.pod, &sandbox.uid);
        yaml = yaml.replace(
            "status:\n  phase: Pending\n",
            &format!(
                "status:\n  phase: Running\n  podIP: {ip}\n  podIPs:\n  - ip: {ip}\n",
                ip = sandbox.pod.ipv4
            ),
        );
        self.apply(&yaml).map(drop)
    }

    /// Tears the sandbox's network down as a runtime does: the conflist's plugins with DEL in
    /// reverse order, each given the cached ADD result, then `loopback`. The namespace stays.
    pub fn del_cni_pod(&self, sandbox: &Sandbox) -> Result<()> {
        self.run_list(sandbox, "DEL")?;
        let lo = json!({"cniVersion": "1.0.0", "name": "cni-loopback", "type": "loopback"});
        self.invoke(sandbox, &lo, "DEL").map(drop)
    }

    /// The conflist of `node`: the node bridge with host-local IPAM, then ambit.
    fn conflist(&self, node: &Node) -> Value {
        let st = self.state();
        let gw = net::gateway_v4(node.index);
        let at = |host: u8| net::pod_v4(node.index, host).to_string();
        json!({
            "cniVersion": "1.0.0",
            "name": "ambit-testbed",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": "br0",
                    "isGateway": false,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{
                            "subnet": format!("{}/24", net::pod_v4(node.index, 0)),
                            "rangeStart": at(RANGE.0),
                            "rangeEnd": at(RANGE.1),
                            "gateway": gw.to_string(),
                        }]],
                        "routes": [{"dst": "0.0.0.0/0", "gw": gw.to_string()}],
                        "dataDir": st.dir.join(format!("{}-ipam", node.name)),
                    },
                },
                {
                    "type": "ambit-cni",
                    "socketPath": socket(st, node),
                    "timeoutSeconds": 25,
                },
            ],
        })
    }

    /// Runs the conflist with `command` (ADD in order, DEL in reverse), as libcni does:
    /// each plugin gets `cniVersion`, `name` and the previous (for DEL: the cached) result.
    fn run_list(&self, sandbox: &Sandbox, command: &str) -> Result<Value> {
        let list = &sandbox.conflist;
        let mut plugins: Vec<Value> = list["plugins"]
            .as_array()
            .context("conflist without plugins")?
            .clone();
        if command == "DEL" {
            plugins.reverse();
        }
        let mut prev = sandbox.result.clone();
        for mut conf in plugins {
            conf["cniVersion"] = list["cniVersion"].clone();
            conf["name"] = list["name"].clone();
            if !prev.is_null() {
                conf["prevResult"] = prev.clone();
            }
            let out = self.invoke(sandbox, &conf, command)?;
            if command == "ADD" {
                prev = out;
            }
        }
        Ok(prev)
    }

    /// Runs the plugin `conf.type` in the node's namespace with the `CNI_*` environment and
    /// `conf` on stdin; returns its result (`Null` when it printed none).
    fn invoke(&self, sandbox: &Sandbox, conf: &Value, command: &str) -> Result<Value> {
        let st = self.state();
        let pod = &sandbox.pod;
        let node = st.node(&pod.node)?;
        let ty = conf["type"]
            .as_str()
            .context("plugin config without type")?;
        let bin_dir = st.dir.join("cni-bin");
        let ambit = bin_dir.join("ambit-cni");
        if !ambit.exists() {
            std::fs::create_dir_all(&bin_dir)?;
            std::os::unix::fs::symlink(self.agent_bin()?, &ambit)
                .with_context(|| format!("linking {}", ambit.display()))?;
        }
        let plugin = [&bin_dir, Path::new(PLUGINS)]
            .iter()
            .map(|d| d.join(ty))
            .find(|p| p.exists())
            .with_context(|| {
                format!("CNI plugin `{ty}` not found (install containernetworking-plugins)")
            })?;
        let host = st.cgroup_root.join("host");
        cgroup::create(&host)?;
        let mut c = process::command_in(&host, &node.netns_path(), &[&plugin]);
        c.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &sandbox.container_id)
            .env("CNI_NETNS", pod.netns_path())
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", format!("{}:{PLUGINS}", bin_dir.display()))
            .env(
                "CNI_ARGS",
                format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};\
                     K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
                    pod.namespace, pod.name, sandbox.container_id, sandbox.uid
                ),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let what = format!("CNI {command} `{ty}` for pod {}", pod.name);
        let mut child = c.spawn().with_context(|| format!("cannot start {what}"))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(conf.to_string().as_bytes())?;
        }
        if cmd::wait_deadline(&mut child, PLUGIN_TIMEOUT)?.is_none() {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what} timed out after {PLUGIN_TIMEOUT:?}");
        }
        let out = child.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "{what} failed ({}): {} {}",
                out.status,
                text.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        if text.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text).with_context(|| format!("{what} printed non-JSON: {text}"))
    }
}

/// The Pod object as the API server has it before the sandbox exists: enrolled, on its node,
/// no address and no netns annotation.
pub fn pod_yaml(pod: &Pod, uid: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  uid: {uid}\n  \
         labels:\n    app: {name}\n    ambit.io/mode: enabled\n\
         spec:\n  nodeName: {node}\n  serviceAccountName: {name}\n  containers:\n  - name: app\n    \
         image: testbed\n\
         status:\n  phase: Pending\n",
        name = pod.name,
        ns = pod.namespace,
        node = pod.node,
    )
}

/// Whether `ip` is one host-local may hand out on node `index`.
pub fn in_range(index: u8, ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V4(v4) if v4.octets()[..3] == net::pod_v4(index, 0).octets()[..3]
        && (RANGE.0..=RANGE.1).contains(&v4.octets()[3]))
}
