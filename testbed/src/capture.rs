//! Packet captures on the testbed's links: tcpdump inside a node's namespace, writing a pcap
//! file into the instance directory, read back with [`crate::pcap`].
use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::Signal;

use crate::cgroup;
use crate::pcap::{self, Flow, Segment};
use crate::process;
use crate::testbed::Testbed;

/// The underlay link of every node (a veth pair between the node namespaces).
pub const UNDERLAY: &str = "ul0";
/// How long tcpdump gets to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A running tcpdump; stopped (and its file kept) by [`Capture::stop`], killed on drop.
#[derive(Debug)]
pub struct Capture {
    child: Option<Child>,
    pid: i32,
    cgroup_root: PathBuf,
    mount: PathBuf,
    file: PathBuf,
    log: PathBuf,
}

/// What a stopped capture saw.
#[derive(Debug, Clone)]
pub struct Captured {
    /// Every TCP segment.
    pub segments: Vec<Segment>,
    /// The segments as reassembled directional streams.
    pub flows: Vec<Flow>,
}

impl Testbed {
    /// Starts capturing TCP on `iface` inside `node`'s namespace and returns once tcpdump
    /// listens. tcpdump runs in the instance's `capture` cgroup, so teardown kills a stray one.
    pub fn capture(&self, node: &str, iface: &str) -> Result<Capture> {
        let st = self.state();
        let node = st.node(node)?;
        let cg = st.cgroup_root.join("capture");
        cgroup::create(&cg)?;
        let n = std::fs::read_dir(&st.dir).map_or(0, |d| d.count());
        let file = st
            .dir
            .join(format!("capture-{}-{iface}-{n}.pcap", node.name));
        let log = file.with_extension("log");
        let file_s = file.to_string_lossy().into_owned();
        // --immediate-mode: without it libpcap hands packets over in blocks (or after a
        // timeout), and tcpdump drops a pending block when it is stopped, so a short capture
        // would come back empty.
        let argv = [
            "tcpdump",
            "-i",
            iface,
            "--immediate-mode",
            "-n",
            "-U",
            "-s",
            "0",
            "-Z",
            "root",
            "-w",
            &file_s,
            "tcp",
        ];
        let child = process::spawn_in(&cg, &node.netns_path(), &argv, &log, &[])?;
        let pid = i32::try_from(child.id())?;
        let mut cap = Capture {
            child: Some(child),
            pid,
            cgroup_root: st.cgroup_root.clone(),
            mount: st.cgroup_mount.clone(),
            file,
            log,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let text = std::fs::read_to_string(&cap.log).unwrap_or_default();
            if text.contains("listening on") {
                return Ok(cap);
            }
            if let Some(status) = cap.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!(
                    "tcpdump on {iface} in {} exited ({status}): {text}",
                    node.name
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "tcpdump on {iface} in {} not listening after {START_TIMEOUT:?}: {text}",
                    node.name
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Capture {
    /// Stops tcpdump (SIGINT: it flushes and exits) and parses what it wrote.
    pub fn stop(mut self) -> Result<Captured> {
        process::signal_ours(self.pid, Signal::SIGINT, &self.cgroup_root, &self.mount);
        if !process::wait_gone(
            self.pid,
            Duration::from_secs(5),
            &self.cgroup_root,
            &self.mount,
        ) {
            bail!("tcpdump (pid {}) did not stop on SIGINT", self.pid);
        }
        if let Some(mut child) = self.child.take() {
            process::reap(&mut child, Duration::from_secs(1));
        }
        let bytes = std::fs::read(&self.file)
            .with_context(|| format!("reading capture {}", self.file.display()))?;
        let segments = pcap::segments(&bytes).with_context(|| {
            format!(
                "parsing {} (tcpdump log: {})",
                self.file.display(),
                self.log.display()
            )
        })?;
        let flows = pcap::flows(&segments);
        Ok(Captured { segments, flows })
    }

    /// The pcap file (kept in the instance directory until teardown).
    pub fn file(&self) -> &PathBuf {
        &self.file
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            process::signal_ours(self.pid, Signal::SIGKILL, &self.cgroup_root, &self.mount);
            process::reap(&mut child, Duration::from_secs(1));
        }
    }
}

impl Captured {
    /// Occurrences of `marker` in all reassembled streams (so a marker split across segments
    /// still counts).
    pub fn count(&self, marker: &[u8]) -> usize {
        self.flows
            .iter()
            .map(|f| pcap::count(&f.bytes, marker))
            .sum()
    }

    /// Streams that carried bytes.
    pub fn with_payload(&self) -> impl Iterator<Item = &Flow> {
        self.flows.iter().filter(|f| !f.bytes.is_empty())
    }

    /// A one-line-per-stream summary, for failure messages.
    pub fn summary(&self) -> String {
        let mut out = format!("{} segments\n", self.segments.len());
        for f in &self.flows {
            let head: String = f
                .bytes
                .iter()
                .take(24)
                .map(|b| {
                    if b.is_ascii_graphic() {
                        *b as char
                    } else {
                        '.'
                    }
                })
                .collect();
            out.push_str(&format!(
                "  {} -> {} {} bytes{} {head:?}\n",
                f.src,
                f.dst,
                f.bytes.len(),
                if f.from_start {
                    ""
                } else {
                    " (joined mid-stream)"
                }
            ));
        }
        out
    }
}
