//! The istiod inventory figure: builds and runs `inventory-bench` (tests crate) and keeps its result beside the targets.
//!
//! The program holds a fake istiod and the agent's xDS client in one process (see
//! tests/src/bin/inventory_bench.rs); xtask only builds it (release; debug with `--quick`), runs
//! it and reads the JSON line it prints. It needs no root and no testbed.
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::results::{Meta, Results, Target};
use super::tools;
use crate::cargo;

/// The scale and load of one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Scale {
    pub(crate) workloads: u32,
    pub(crate) nodes: u32,
    pub(crate) rate: u32,
    pub(crate) seconds: u32,
}

impl Scale {
    /// The figure: 150,000 workloads on 5,000 nodes, 1,000 changes/s for 30 s.
    pub(crate) const FULL: Self = Self {
        workloads: 150_000,
        nodes: 5_000,
        rate: 1_000,
        seconds: 30,
    };
    /// `--quick` (CI): small, to prove the pipeline runs; figures not asserted.
    pub(crate) const QUICK: Self = Self {
        workloads: 1_000,
        nodes: 50,
        rate: 200,
        seconds: 3,
    };
}

/// What `inventory-bench` measured (its JSON line; fields it adds later are ignored).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Inventory {
    /// Workloads the fake istiod held before the agent connected.
    pub(crate) workloads: u32,
    /// Nodes they ran on.
    pub(crate) nodes: u32,
    /// Workloads on the agent's node.
    pub(crate) local_workloads: u64,
    /// Changes per second pushed in phase 2.
    pub(crate) rate: u32,
    /// Seconds of changes.
    pub(crate) seconds: u32,
    /// Client start → `ready` with every workload in the snapshot, in ms.
    pub(crate) first_sync_ms: f64,
    /// Process VmRSS before the client started (server loaded), in KiB.
    pub(crate) rss_before_kib: u64,
    /// Process VmRSS after the first sync, in KiB.
    pub(crate) rss_after_kib: u64,
    /// Process VmHWM over the first sync, in KiB.
    pub(crate) rss_peak_kib: u64,
    /// The client's share: after − before, in MiB (an upper bound; see `rss_method`).
    pub(crate) agent_rss_mib: f64,
    /// How the RSS figures are derived.
    pub(crate) rss_method: String,
    /// The fake's store (names and messages), in MiB: its first push copies and encodes it,
    /// and those freed buffers are part of `agent_rss_mib`.
    #[serde(default)]
    pub(crate) store_mib: f64,
    /// Changes sent in phase 2.
    pub(crate) changes: u64,
    /// Changes never seen in a published snapshot (within the grace period).
    pub(crate) unapplied: u64,
    /// Send → seen in a published snapshot, p50, in µs.
    pub(crate) p50_us: Option<u64>,
    /// The same, p99.
    pub(crate) p99_us: Option<u64>,
    /// The same, worst.
    pub(crate) max_us: Option<u64>,
    /// CPU time of the client thread per change, in µs.
    pub(crate) cpu_us_per_change: Option<f64>,
}

impl Inventory {
    /// The targets for this figure, with this run's values.
    pub(crate) fn targets(&self) -> Vec<Target> {
        let scaled = if self.workloads == Scale::FULL.workloads {
            String::new()
        } else {
            format!(" ({} workloads, not the target's scale)", self.workloads)
        };
        let target = |figure: &str, target: &str, measured: String, met: Option<bool>| Target {
            figure: figure.into(),
            target: target.into(),
            measured: measured + &scaled,
            met,
        };
        let ms =
            |us: Option<u64>| us.map_or("missing".into(), |v| format!("{:.2} ms", v as f64 / 1e3));
        vec![
            target(
                "agent RSS, full view of 150,000 workloads",
                "≤ 64 MiB",
                format!("{:.1} MiB", self.agent_rss_mib),
                Some(self.agent_rss_mib <= 64.0),
            ),
            target(
                "first sync of 150,000 workloads",
                "≤ 5 s",
                format!("{:.2} s", self.first_sync_ms / 1e3),
                Some(self.first_sync_ms <= 5000.0),
            ),
            target(
                "per-change apply latency p99",
                "≤ 1 ms",
                format!(
                    "{}, {} of {} never applied",
                    ms(self.p99_us),
                    self.unapplied,
                    self.changes
                ),
                self.p99_us.map(|p| p <= 1000 && self.unapplied == 0),
            ),
        ]
    }

    /// The figures, one line each (title, value), for the tables.
    pub(crate) fn lines(&self) -> Vec<(String, String)> {
        let us = |v: Option<u64>| match v {
            None => "–".to_string(),
            Some(v) if v >= 10_000 => format!("{:.1} ms", v as f64 / 1e3),
            Some(v) => format!("{v} µs"),
        };
        vec![
            (
                "scale".into(),
                format!(
                    "{} workloads on {} nodes ({} on the agent's node); {} changes/s for {} s",
                    self.workloads, self.nodes, self.local_workloads, self.rate, self.seconds
                ),
            ),
            (
                "time to first sync".into(),
                format!("{:.0} ms", self.first_sync_ms),
            ),
            (
                "agent RSS for the full view".into(),
                format!(
                    "{:.1} MiB (process {:.1} → {:.1} MiB, peak {:.1} MiB; an upper bound: \
                     includes the fake's freed copy and encoding of its {:.1} MiB store)",
                    self.agent_rss_mib,
                    mib(self.rss_before_kib),
                    mib(self.rss_after_kib),
                    mib(self.rss_peak_kib),
                    self.store_mib
                ),
            ),
            (
                "per-change apply latency".into(),
                format!(
                    "p50 {}, p99 {}, max {}; {} of {} never applied",
                    us(self.p50_us),
                    us(self.p99_us),
                    us(self.max_us),
                    self.unapplied,
                    self.changes
                ),
            ),
            (
                "agent CPU per change".into(),
                self.cpu_us_per_change
                    .map_or("–".into(), |c| format!("{c:.1} µs")),
            ),
        ]
    }
}

/// The results of a run that measured only this figure (`--only inventory`): the machine,
/// no load or agent rows.
pub(crate) fn alone(inventory: Inventory, quick: bool) -> Results {
    let (kernel, cpus, cpu_model) = tools::machine();
    let mut results = Results {
        inventory: Some(inventory),
        meta: Meta {
            kernel,
            cpus,
            cpu_model,
            commit: tools::commit(&cargo::workspace_root()),
            quick,
            loadavg: tools::loadavg(),
            date: tools::now_utc(),
            ..Meta::default()
        },
        ..Results::default()
    };
    results.check();
    results
}

/// Builds `inventory-bench` (release, or debug for `quick`), runs it at `scale` and parses
/// its result.
pub(crate) fn measure(scale: Scale, quick: bool) -> Result<Inventory> {
    let bin = build(quick)?;
    eprintln!(
        "==> istiod inventory: {} workloads on {} nodes, {} changes/s for {} s ({})",
        scale.workloads,
        scale.nodes,
        scale.rate,
        scale.seconds,
        bin.display()
    );
    let mut cmd = Command::new(&bin);
    cmd.args([
        "--workloads",
        &scale.workloads.to_string(),
        "--nodes",
        &scale.nodes.to_string(),
        "--rate",
        &scale.rate.to_string(),
        "--seconds",
        &scale.seconds.to_string(),
    ]);
    cmd.stdin(Stdio::null()).stderr(Stdio::inherit());
    let out = cmd
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("{} failed ({}): {stdout}", bin.display(), out.status);
    }
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .with_context(|| format!("{} printed no JSON line: {stdout}", bin.display()))?;
    serde_json::from_str(line).with_context(|| format!("parsing {}'s result {line}", bin.display()))
}

/// `cargo build -p ambit-e2e --bin inventory-bench` (`--release` unless `quick`).
fn build(quick: bool) -> Result<PathBuf> {
    let mut args = vec!["build", "-p", "ambit-e2e", "--bin", "inventory-bench"];
    if !quick {
        args.push("--release");
    }
    eprintln!(
        "==> building the inventory bench (cargo {})",
        args.join(" ")
    );
    cargo::run(&args)?;
    let profile = if quick { "debug" } else { "release" };
    let bin = cargo::target_dir().join(profile).join("inventory-bench");
    if !bin.exists() {
        bail!(
            "cargo built inventory-bench but {} does not exist",
            bin.display()
        );
    }
    Ok(bin)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample() -> Inventory {
        Inventory {
            workloads: 150_000,
            nodes: 5_000,
            local_workloads: 30,
            rate: 1_000,
            seconds: 30,
            first_sync_ms: 4200.0,
            rss_before_kib: 100 * 1024,
            rss_after_kib: 180 * 1024,
            rss_peak_kib: 250 * 1024,
            agent_rss_mib: 80.0,
            rss_method: "after − before".into(),
            store_mib: 40.0,
            changes: 30_000,
            unapplied: 0,
            p50_us: Some(400),
            p99_us: Some(900),
            max_us: Some(3000),
            cpu_us_per_change: Some(12.5),
        }
    }

    #[test]
    fn targets_judge_rss_sync_and_p99() {
        let t = sample().targets();
        let met: Vec<_> = t.iter().map(|t| t.met).collect();
        assert_eq!(met, [Some(false), Some(true), Some(true)], "{t:?}");
        assert_eq!(t[0].measured, "80.0 MiB");
        let mut lost = sample();
        lost.unapplied = 3;
        assert_eq!(lost.targets()[2].met, Some(false));
        let mut small = sample();
        small.workloads = 1_000;
        assert!(small.targets()[1]
            .measured
            .ends_with("not the target's scale)"));
    }

    #[test]
    fn parses_the_bench_line_ignoring_extra_fields() {
        let mut v = serde_json::to_value(sample()).unwrap();
        v["cpu_method"] = "schedstat".into();
        let back: Inventory = serde_json::from_value(v).unwrap();
        assert_eq!(back, sample());
    }
}
