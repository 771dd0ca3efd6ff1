//! Pods that come and go while the testbed runs, as on a node with pod churn: a new pod gets
//! its own namespace, veth, addresses and cgroup and is listed in the inventory; removing it
//! takes it out of the inventory and deletes its namespace, in either order (a pod deleted
//! through the API, or one whose sandbox vanished first).
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::cmd::ip;
use crate::state::{Pod, PodSpec};
use crate::testbed::Testbed;
use crate::{cgroup, net};

/// Which goes first when a pod is removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// The inventory drops the pod, the agent unenrolls it, then its namespace is deleted.
    InventoryFirst,
    /// The namespace is deleted while the pod is still listed (the agent notices on its
    /// own), then the inventory drops it.
    NetnsFirst,
}

impl Testbed {
    /// Creates pod `spec` (no servers) on its node with the next free host address (never
    /// reusing one, so stale kernel entries of a removed pod cannot be mistaken for a new
    /// pod's: removed pods stay in the state, unlisted) and lists it in the inventory. The pod is recorded before anything is created,
    /// so teardown removes it even after a crash. Does not wait for the agents.
    pub fn add_pod(&mut self, spec: &PodSpec) -> Result<Pod> {
        if spec.servers {
            bail!("add_pod: pods added at run time run no test servers");
        }
        if self.state().pods.iter().any(|p| p.name == spec.name) {
            bail!("add_pod: pod {} exists (or existed) already", spec.name);
        }
        let node = self.state().node(&spec.node)?.clone();
        let host = self
            .state()
            .pods
            .iter()
            .filter(|p| p.node == spec.node)
            .map(|p| p.ipv4.octets()[3])
            .max()
            .unwrap_or(1)
            + 1;
        if host > 250 {
            bail!("add_pod: node {} has no free pod address", spec.node);
        }
        let id = self.state().id.clone();
        let pod = Pod {
            name: spec.name.clone(),
            namespace: spec.namespace.clone(),
            node: spec.node.clone(),
            netns: format!("ambit-{id}-{}", spec.name),
            cgroup: node.cgroup.join(&spec.name),
            ipv4: net::pod_v4(node.index, host),
            ipv6: net::pod_v6(node.index, host),
            enrolled: spec.enrolled,
            servers: false,
            in_inventory: spec.in_inventory,
            annotations: spec.annotations.clone(),
            labels: spec.labels.clone(),
        };
        self.state_mut().pods.push(pod.clone());
        self.state().save()?;
        net::setup_pod(&pod, &node, host)
            .with_context(|| format!("setting up pod {}", pod.name))?;
        cgroup::create(&pod.cgroup)?;
        self.write_inventory()?;
        Ok(pod)
    }

    /// Removes pod `name` (added with [`Testbed::add_pod`]): kills what runs in its cgroup,
    /// deletes its namespace and cgroup and drops it from the inventory, in `order`. With
    /// [`Removal::InventoryFirst`], `before_delete` runs once the pod's agent has stopped
    /// serving it and before its namespace goes (to look inside it).
    pub fn remove_pod(
        &mut self,
        name: &str,
        order: Removal,
        before_delete: impl FnOnce(&Testbed, &Pod) -> Result<()>,
    ) -> Result<()> {
        let pod = self.state().pod(name)?.clone();
        let unlist = |tb: &mut Testbed| -> Result<()> {
            if let Some(p) = tb.state_mut().pods.iter_mut().find(|p| p.name == name) {
                p.in_inventory = false;
                p.enrolled = false;
            }
            tb.state().save()?;
            tb.write_inventory()
        };
        cgroup::kill_all(&pod.cgroup, Duration::from_secs(5))?;
        if order == Removal::InventoryFirst {
            unlist(self)?;
            let gone = crate::eventually(Duration::from_secs(15), || {
                let st = self.status(&pod.node).ok()?;
                st.pod(name).is_none().then_some(())
            });
            if gone.is_none() {
                bail!(
                    "agent of {} still lists pod {name} 15 s after it left the inventory",
                    pod.node
                );
            }
            before_delete(self, &pod)?;
        }
        net::delete_netns(&pod.netns)?;
        if order == Removal::NetnsFirst {
            unlist(self)?;
        }
        cgroup::remove_tree(&pod.cgroup)
    }

    /// Whether the node side of pod `pod`'s veth still exists: it goes only once the pod's
    /// namespace is freed, i.e. nothing (no process, no socket, no fd) holds it any more.
    pub fn pod_veth_exists(&self, pod: &Pod) -> Result<bool> {
        let node = self.state().node(&pod.node)?;
        let port = format!("vp{}", pod.ipv4.octets()[3]);
        Ok(ip(&["-n", &node.netns, "link", "show", &port]).is_ok())
    }
}
