//! Making a testbed instance: its plan (ids, names, addresses, cgroups, files) and the build.
use std::collections::hash_map::RandomState;
use std::fs;
use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::{Options, Testbed, AGENT_READY_TIMEOUT, SERVER_READY_TIMEOUT};
use crate::state::{self, Node, Pod, State, BASE_DIR};
use crate::state::{ECHO_PORT, HTTP_PORT, PEER_PORT};
use crate::{ca, cgroup, net, servers, teardown};

impl Testbed {
    /// Claims a fresh id and plans every name, address, cgroup and file of the instance; the
    /// state is saved before anything is created, so teardown always knows what to remove.
    pub(super) fn create_state(opts: &Options) -> Result<Self> {
        let mount = cgroup::mount_point()?;
        fs::create_dir_all(BASE_DIR).with_context(|| format!("creating {BASE_DIR}"))?;
        let id = fresh_id(&mount)?;
        let dir = teardown::instance_dir(&id);
        let cgroup_root = mount.join(format!("ambit-{id}"));
        let bpffs = Path::new("/sys/fs/bpf");
        let mut nodes = Vec::new();
        for index in 1..=2u8 {
            let name = format!("node{index}");
            let cgroup = cgroup_root.join(&name);
            nodes.push(Node {
                netns: format!("ambit-{id}-{name}"),
                underlay_v4: net::underlay_v4(index),
                underlay_v6: net::underlay_v6(index),
                agent_cgroup: match opts.kubelet_cgroups {
                    Some(driver) => driver.container(&cgroup, "burstable", "ambit-agent"),
                    None => cgroup.join("agent"),
                },
                cgroup,
                config: dir.join(format!("{name}.yaml")),
                admin_socket: dir.join(format!("{name}.sock")),
                pin_dir: bpffs.join(format!("ambit-{id}-{name}")),
                log: dir.join(format!("{name}.log")),
                token_file: dir.join(format!("{name}.token")),
                name,
                index,
            });
        }
        let mut pods = Vec::new();
        for spec in &opts.pods {
            let node = nodes
                .iter()
                .find(|n| n.name == spec.node)
                .with_context(|| format!("no node {}", spec.node))?;
            let host =
                2 + u8::try_from(pods.iter().filter(|p: &&Pod| p.node == spec.node).count())?;
            pods.push(Pod {
                name: spec.name.clone(),
                namespace: spec.namespace.clone(),
                node: spec.node.clone(),
                netns: format!("ambit-{id}-{}", spec.name),
                cgroup: match opts.kubelet_cgroups {
                    Some(driver) => driver.container(&node.cgroup, "besteffort", &spec.name),
                    None => node.cgroup.join(&spec.name),
                },
                ipv4: net::pod_v4(node.index, host),
                ipv6: net::pod_v6(node.index, host),
                enrolled: spec.enrolled,
                servers: spec.servers,
                in_inventory: spec.in_inventory,
                annotations: spec.annotations.clone(),
                labels: spec.labels.clone(),
            });
        }
        let ca = (opts.ca && opts.agents).then(|| state::Ca {
            audience: opts.ca_audience.clone(),
            cluster_id: opts.cluster_id.clone(),
            ..ca::plan(&dir, &cgroup_root, &nodes[0], opts.cert_ttl_secs)
        });
        let agent_bin = match &opts.agent_bin {
            Some(b) => Some(b.clone()),
            None => default_agent_bin(),
        };
        let state = State {
            inventory: dir.join("inventory.yaml"),
            owner_pid: if opts.persistent {
                None
            } else {
                Some(std::process::id())
            },
            agent_bin,
            cgroup_mount: mount,
            cgroup_root,
            dir,
            id,
            nodes,
            pods,
            processes: Vec::new(),
            ca,
            applied: Vec::new(),
            kubelet_cgroups: opts.kubelet_cgroups,
            cni: opts.cni,
        };
        state.save()?;
        Ok(Self {
            state,
            children: Vec::new(),
            persistent: opts.persistent,
            progress: opts.progress,
            torn_down: false,
            started: Instant::now(),
        })
    }

    /// Creates the planned namespaces, links and cgroups, starts the servers, and (with
    /// `opts.agents`) the CA and the agents, waiting until each is ready.
    pub(super) fn build(&mut self, opts: &Options) -> Result<()> {
        let st = self.state.clone();
        self.progress(&format!(
            "building instance {} in {}",
            st.id,
            st.dir.display()
        ));
        for n in &st.nodes {
            net::setup_node(n)?;
        }
        net::link_nodes(&st.nodes[0], &st.nodes[1])?;
        cgroup::create(&st.cgroup_root)?;
        for n in &st.nodes {
            cgroup::create(&n.agent_cgroup)?;
        }
        for pod in &st.pods {
            let node = st.node(&pod.node)?;
            let host = pod.ipv4.octets()[3];
            net::setup_pod(pod, node, host)?;
            cgroup::create(&pod.cgroup)?;
        }
        self.progress(&format!(
            "{} nodes and {} pods are up; starting servers",
            st.nodes.len(),
            st.pods.len()
        ));
        servers::prepare_files(&st)?;
        for pod in st.pods.iter().filter(|p| p.servers) {
            for (role, child) in servers::start(&st, pod)? {
                self.record(role, child)?;
            }
        }
        self.wait_servers()?;
        self.write_inventory()?;
        if opts.agents {
            let bin = self.agent_bin()?.to_path_buf();
            if !bin.exists() {
                bail!(
                    "agent binary {} not found; build it with `cargo build -p ambit-agent`",
                    bin.display()
                );
            }
            if self.state.ca.is_some() {
                self.progress("starting the CA (token issuer: the testbed)");
                ca::prepare(&self.state)?;
                self.start_ca()?;
            }
            self.progress(&format!("starting agents ({})", bin.display()));
            for n in &st.nodes {
                self.start_agent(&n.name)?;
            }
            self.wait_agents_ready(AGENT_READY_TIMEOUT)?;
        }
        self.progress("ready");
        Ok(())
    }

    /// Waits until every pod with servers listens on their ports.
    fn wait_servers(&self) -> Result<()> {
        let deadline = Instant::now() + SERVER_READY_TIMEOUT;
        for pod in self.state.pods.iter().filter(|p| p.servers) {
            loop {
                let ports = net::listening_ports(&pod.netns_path())?;
                if [HTTP_PORT, ECHO_PORT, PEER_PORT]
                    .iter()
                    .all(|p| ports.contains(p))
                {
                    break;
                }
                if Instant::now() >= deadline {
                    bail!("servers in {} not listening after {SERVER_READY_TIMEOUT:?}: ports {ports:?}", pod.name);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }
}

/// `target/<profile>/ambit` next to the running executable (tests live in `target/<profile>/deps`).
pub fn default_agent_bin() -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os("AMBIT_BIN") {
        return Some(PathBuf::from(bin));
    }
    let exe = std::env::current_exe().ok()?;
    let mut dir = exe.parent()?;
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent()?;
    }
    Some(dir.join("ambit"))
}

/// A 6-hex-digit id not used by any namespace, cgroup or instance on this machine; its instance
/// dir is created here (`create_dir` is the atomic claim between parallel runs).
fn fresh_id(mount: &Path) -> Result<String> {
    for _ in 0..100 {
        let mut h = RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_nanos(),
        );
        let id = format!("{:06x}", h.finish() & 0xff_ffff);
        let taken = mount.join(format!("ambit-{id}")).exists()
            || state::netns_path(&format!("ambit-{id}-node1")).exists();
        if !taken && fs::create_dir(teardown::instance_dir(&id)).is_ok() {
            return Ok(id);
        }
    }
    bail!("could not find a free testbed id")
}
