//! What the bench reads from /proc about itself: RSS, peak RSS (and its reset), a thread's id and CPU time.
use std::path::Path;

use anyhow::{Context, Result};

/// `VmRSS` of this process, in KiB.
pub(crate) fn rss_kib() -> Result<u64> {
    status_kib("VmRSS")
}

/// `VmHWM` (peak RSS since start or the last [`reset_peak`]) of this process, in KiB.
pub(crate) fn peak_kib() -> Result<u64> {
    status_kib("VmHWM")
}

/// Resets `VmHWM` to the current RSS (`5` into `/proc/self/clear_refs`, Linux 4.0+).
pub(crate) fn reset_peak() -> Result<()> {
    std::fs::write("/proc/self/clear_refs", "5").context("writing 5 to /proc/self/clear_refs")
}

/// The calling thread's id (from the `/proc/thread-self` link, `<pid>/task/<tid>`).
pub(crate) fn thread_id() -> Result<u32> {
    let link = std::fs::read_link("/proc/thread-self").context("reading /proc/thread-self")?;
    link.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("/proc/thread-self points to {}", link.display()))
}

/// CPU time thread `tid` of this process has run, in ns (`schedstat`'s first field).
pub(crate) fn thread_cpu_ns(tid: u32) -> Result<u64> {
    let path = format!("/proc/self/task/{tid}/schedstat");
    let text =
        std::fs::read_to_string(Path::new(&path)).with_context(|| format!("reading {path}"))?;
    text.split_whitespace()
        .next()
        .and_then(|f| f.parse().ok())
        .with_context(|| format!("{path}: no run time in {text:?}"))
}

fn status_kib(field: &str) -> Result<u64> {
    let text = std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("/proc/self/status has no {field}"))
}
