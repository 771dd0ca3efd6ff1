//! Servers started on demand in a pod the testbed did not give any (a pod added through the CNI chain).
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use super::Proc;
use crate::state::PEER_PORT;
use crate::testbed::Testbed;
use crate::{net, process, servers};

impl Testbed {
    /// Starts the peer-report server (answers `peer=<address it saw>`) on [`PEER_PORT`] in
    /// `pod`, logging where [`Testbed::peer_log`] reads, and waits until it listens.
    pub fn start_peer_server(&self, pod: &str) -> Result<Proc> {
        let st = self.state();
        let p = st.pod(pod)?;
        let log = st.dir.join(format!("{pod}-{PEER_PORT}.log"));
        let argv = [
            servers::python().to_string_lossy().into_owned(),
            st.dir.join("peer_server.py").to_string_lossy().into_owned(),
            PEER_PORT.to_string(),
        ];
        let child = process::spawn_in(&p.cgroup, &p.netns_path(), &argv, &log, &[])?;
        let proc = Proc {
            pid: i32::try_from(child.id())?,
            log,
            child: Some(child),
            cgroup: p.cgroup.clone(),
            mount: st.cgroup_mount.clone(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !net::listening_ports(&p.netns_path())?.contains(&PEER_PORT) {
            if !proc.running() || Instant::now() >= deadline {
                bail!(
                    "peer server in {pod} does not listen on {PEER_PORT}; log:\n{}",
                    super::tail(&proc.output(), 20)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(proc)
    }
}
