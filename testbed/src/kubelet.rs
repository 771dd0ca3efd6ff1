//! Pod and agent cgroups laid out as kubelet does (systemd or cgroupfs driver), below a node's cgroup.
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// kubelet's cgroup driver: which names its pod cgroups get.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CgroupDriver {
    /// `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid>.slice/cri-containerd-<id>.scope`.
    Systemd,
    /// `kubepods/<qos>/pod<uid>/<id>`.
    Cgroupfs,
}

impl CgroupDriver {
    /// Where kubelet roots every pod: what the agent's `podsCgroup: auto` must find.
    pub fn pods_root(self, node_root: &Path) -> PathBuf {
        node_root.join(match self {
            Self::Systemd => "kubepods.slice",
            Self::Cgroupfs => "kubepods",
        })
    }

    /// The cgroup of `pod`'s (only) container; `qos` is `besteffort` or `burstable`. The uid
    /// and container id are derived from the pod name, so they stay stable per instance.
    pub fn container(self, node_root: &Path, qos: &str, pod: &str) -> PathBuf {
        let uid = format!("{:0>32}", hex(pod));
        let uid = &uid[uid.len() - 32..];
        let dashed = format!(
            "{}-{}-{}-{}-{}",
            &uid[0..8],
            &uid[8..12],
            &uid[12..16],
            &uid[16..20],
            &uid[20..32]
        );
        let container = format!("{:0>64}", hex(pod));
        let container = &container[container.len() - 64..];
        let root = self.pods_root(node_root);
        match self {
            // systemd escapes the uid's dashes as underscores in slice names.
            Self::Systemd => root
                .join(format!("kubepods-{qos}.slice"))
                .join(format!(
                    "kubepods-{qos}-pod{}.slice",
                    dashed.replace('-', "_")
                ))
                .join(format!("cri-containerd-{container}.scope")),
            Self::Cgroupfs => root.join(qos).join(format!("pod{dashed}")).join(container),
        }
    }
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_look_like_kubelets() {
        let node = Path::new("/cg/node1");
        let s = CgroupDriver::Systemd.container(node, "besteffort", "client");
        let s = s.to_str().unwrap();
        assert!(
            s.starts_with(
                "/cg/node1/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod"
            ),
            "{s}"
        );
        assert!(
            s.ends_with(".scope") && s.contains("cri-containerd-"),
            "{s}"
        );
        let c = CgroupDriver::Cgroupfs.container(node, "burstable", "ambit-agent");
        assert!(
            c.to_str()
                .unwrap()
                .starts_with("/cg/node1/kubepods/burstable/pod"),
            "{}",
            c.display()
        );
        assert_ne!(
            CgroupDriver::Cgroupfs.container(node, "besteffort", "a"),
            CgroupDriver::Cgroupfs.container(node, "besteffort", "b")
        );
    }
}
