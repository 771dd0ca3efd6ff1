//! CNI integration: the chained `ambit cni` plugin, the agent's socket server and the pod map.
//!
//! The container runtime runs `ambit cni` after the interface plugin (bridge, calico, …) has
//! set up a pod's network namespace. The plugin sends one [`CniEvent`] to the node agent over
//! a unix socket (the namespace's fd rides along with SCM_RIGHTS), waits for the [`CniReply`]
//! and passes `prevResult` through. The agent records every pod it hears of in a map file, so
//! after a restart it knows its pods' namespaces again without the runtime calling back.
pub mod handler;
pub mod install;
pub mod plugin;
pub mod pods;
pub mod server;
mod wire;

use std::net::IpAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Where the agent listens for the plugin, unless the plugin config says otherwise.
pub const DEFAULT_SOCKET: &str = "/run/ambit/cni.sock";
/// Where the agent persists the pods it learned from the plugin.
pub const DEFAULT_POD_MAP: &str = "/run/ambit/cni-pods.json";

/// The CNI operation being reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum CniCommand {
    /// A pod sandbox's network was set up.
    Add,
    /// A pod sandbox's network is being torn down.
    Del,
    /// The runtime asks whether the pod is still set up as expected.
    Check,
}

/// The pod a CNI call is about (from `CNI_ARGS`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRef {
    /// `K8S_POD_NAMESPACE`.
    pub namespace: String,
    /// `K8S_POD_NAME`.
    pub name: String,
    /// `K8S_POD_UID` (empty when the runtime does not send it).
    #[serde(default)]
    pub uid: String,
}

impl PodRef {
    /// `namespace/name`, the inventory's workload key.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Identity of a network namespace: device and inode of its nsfs file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetnsId {
    /// `st_dev`.
    pub dev: u64,
    /// `st_ino`.
    pub ino: u64,
}

/// One message from the plugin to the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CniEvent {
    /// ADD, DEL or CHECK.
    pub command: CniCommand,
    /// `CNI_CONTAINERID` (the pod sandbox).
    pub container_id: String,
    /// `CNI_NETNS`; DEL may come without one.
    #[serde(default)]
    pub netns: Option<PathBuf>,
    /// `CNI_IFNAME`.
    #[serde(default)]
    pub ifname: String,
    /// The pod.
    pub pod: PodRef,
    /// Pod addresses from `prevResult.ips`.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    /// The namespace the plugin passed as an fd, as the agent saw it (set by the server; a
    /// value sent by the plugin is ignored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns_id: Option<NetnsId>,
}

/// The agent's answer to a [`CniEvent`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "camelCase")]
pub enum CniReply {
    /// The pod is captured (ADD, CHECK) or was released (DEL).
    Enrolled,
    /// The pod is not in the mesh; nothing to do.
    NotInMesh,
    /// The agent could not set the pod up; the runtime should retry.
    Failed {
        /// What went wrong, for the runtime's log.
        message: String,
    },
}
