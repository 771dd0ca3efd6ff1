//! The bench's results: machine facts, sample rows, summary statistics and the targets.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::inventory::Inventory;

/// Everything one `cargo xtask bench` run measured; also its JSON format (`--json`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Results {
    /// Where and how it ran.
    pub(crate) meta: Meta,
    /// Load figures, sampled per path (`direct`, `ambit`, `same_node`, `capture`).
    pub(crate) load: Vec<Row>,
    /// Agent figures, sampled per agent (`node1`, `node2`).
    pub(crate) agents: Vec<Row>,
    /// The targets, checked against the medians (filled in by [`Results::check`]).
    #[serde(default)]
    pub(crate) targets: Vec<Target>,
    /// The istiod inventory at scale (its own targets: [`Inventory::targets`]), when measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) inventory: Option<Inventory>,
}

/// The machine, the tools and the run's settings.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Meta {
    /// When the run finished (UTC, RFC 3339).
    pub(crate) date: String,
    /// `uname -r`.
    pub(crate) kernel: String,
    /// CPUs this process may run on.
    pub(crate) cpus: usize,
    /// `/proc/cpuinfo` model name.
    pub(crate) cpu_model: String,
    /// Tool name → version line.
    pub(crate) tools: BTreeMap<String, String>,
    /// `git describe --always --dirty` of the workspace.
    pub(crate) commit: String,
    /// The agent binary measured.
    pub(crate) agent_bin: String,
    /// `--quick`.
    pub(crate) quick: bool,
    /// Rounds: each path of each figure ran this many times, alternating with the others.
    pub(crate) rounds: u32,
    /// Seconds per load run.
    pub(crate) seconds: u32,
    /// Idle tunnelled connections held for the memory figures.
    pub(crate) held: Vec<usize>,
    /// wrk's connections (`-c`) and threads (`-t`).
    pub(crate) wrk: String,
    /// `/proc/loadavg` when the measurements started (other work on the machine skews them).
    #[serde(default)]
    pub(crate) loadavg: String,
    /// Per-netns settings applied to every pod and node namespace, direct and ambit alike.
    pub(crate) sysctls: Vec<String>,
}

/// Whether bigger is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Better {
    /// Throughput, rates.
    Higher,
    /// Latency, memory, CPU.
    Lower,
}

/// How a load row compares each path with `direct`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Compare {
    /// `0.42×` of direct.
    Ratio,
    /// `+37 µs` over direct (latencies).
    Added,
    /// No comparison (direct has no agent).
    None,
}

/// One figure: samples per column (path or agent).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Row {
    /// Stable key (`iperf1`, `rtt_p50`, `rss_idle`, ...).
    pub(crate) key: String,
    /// What it is, for people.
    pub(crate) title: String,
    /// Unit of the samples.
    pub(crate) unit: String,
    /// Whether bigger is better.
    pub(crate) better: Better,
    /// How the table compares columns with `direct`.
    pub(crate) compare: Compare,
    /// Column → samples, in run order.
    pub(crate) samples: BTreeMap<String, Vec<f64>>,
}

/// Median, minimum and maximum of a column.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Stat {
    pub(crate) median: f64,
    pub(crate) min: f64,
    pub(crate) max: f64,
    pub(crate) n: usize,
}

/// One of the targets and how this run did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Target {
    /// The figure, as the issue names it.
    pub(crate) figure: String,
    /// The target, as the issue states it.
    pub(crate) target: String,
    /// What this run measured (medians), rendered.
    pub(crate) measured: String,
    /// Whether it is met; `None` when a figure is missing.
    pub(crate) met: Option<bool>,
}

/// Load columns in table order: key and title.
pub(crate) const PATHS: [(&str, &str); 4] = [
    ("direct", "direct"),
    ("ambit", "ambit cross-node (HBONE)"),
    ("same_node", "ambit same-node"),
    ("capture", "captured, not tunnelled"),
];

/// Load rows in table order (keys); others follow.
const LOAD_ORDER: &[&str] = &[
    "iperf1",
    "iperf4",
    "cpu_gb_node1",
    "cpu_gb_node2",
    "rtt_p50",
    "rtt_p99",
    "rtt_p999",
    "conn_rate",
    "conn_p50",
    "conn_p90",
    "conn_p99",
    "conn_errors",
    "cpu_conn_node1",
    "cpu_conn_node2",
];

/// Agent columns in table order: key and title.
pub(crate) const AGENTS: [(&str, &str); 2] = [
    ("node1", "node1 agent (client side)"),
    ("node2", "node2 agent (server side)"),
];

impl Results {
    /// The load row `key`.
    pub(crate) fn load_row(&self, key: &str) -> Option<&Row> {
        self.load.iter().find(|r| r.key == key)
    }

    /// The agent row `key`.
    pub(crate) fn agent_row(&self, key: &str) -> Option<&Row> {
        self.agents.iter().find(|r| r.key == key)
    }

    /// Adds `value` to column `col` of the load row `key` (created from `proto` on first use).
    pub(crate) fn push_load(&mut self, proto: &RowSpec, col: &str, value: f64) {
        push(&mut self.load, proto, col, value);
    }

    /// Adds `value` to column `col` of the agent row `key`.
    pub(crate) fn push_agent(&mut self, proto: &RowSpec, col: &str, value: f64) {
        push(&mut self.agents, proto, col, value);
    }

    /// Median of column `col` of load row `key`.
    pub(crate) fn load_median(&self, key: &str, col: &str) -> Option<f64> {
        self.load_row(key)?.stat(col).map(|s| s.median)
    }

    /// Median of column `col` of agent row `key`.
    pub(crate) fn agent_median(&self, key: &str, col: &str) -> Option<f64> {
        self.agent_row(key)?.stat(col).map(|s| s.median)
    }

    /// Puts the load rows in `order` (by key); rows not listed keep their place at the end.
    pub(crate) fn order_load(&mut self, order: &[&str]) {
        let rank = |r: &Row| {
            order
                .iter()
                .position(|k| *k == r.key)
                .unwrap_or(order.len())
        };
        self.load.sort_by_key(rank);
    }

    /// Orders the load rows ([`LOAD_ORDER`]) and fills [`Results::targets`] from the medians
    /// (the table, in its order).
    pub(crate) fn check(&mut self) {
        self.order_load(LOAD_ORDER);
        let ratio = |key: &str, col: &str| -> Option<f64> {
            Some(self.load_median(key, col)? / self.load_median(key, "direct")?)
        };
        let added = |key: &str| -> Option<f64> {
            Some(self.load_median(key, "ambit")? - self.load_median(key, "direct")?)
        };
        let worst_agent = |key: &str| -> Option<f64> {
            AGENTS
                .iter()
                .filter_map(|(a, _)| self.agent_median(key, a))
                .reduce(f64::max)
        };
        let at_least = |v: Option<f64>, min: f64, fmt: &dyn Fn(f64) -> String| {
            (v.map_or("missing".into(), fmt), v.map(|v| v >= min))
        };
        let at_most = |v: Option<f64>, max: f64, fmt: &dyn Fn(f64) -> String| {
            (v.map_or("missing".into(), fmt), v.map(|v| v <= max))
        };
        let x = |v: f64| format!("{v:.2}× of direct");
        let mut t = Vec::new();
        let mut add = |figure: &str, target: &str, (measured, met): (String, Option<bool>)| {
            t.push(Target {
                figure: figure.into(),
                target: target.into(),
                measured,
                met,
            });
        };
        add(
            "one-stream throughput",
            "≥ 0.60 of direct",
            at_least(ratio("iperf1", "ambit"), 0.60, &x),
        );
        add(
            "4-stream throughput",
            "≥ 0.60 of direct",
            at_least(ratio("iperf4", "ambit"), 0.60, &x),
        );
        add(
            "ping-pong p50 added over direct",
            "≤ 50 µs",
            at_most(added("rtt_p50"), 50.0, &|v| format!("+{v:.1} µs")),
        );
        add(
            "ping-pong p99 added over direct",
            "≤ 80 µs",
            at_most(added("rtt_p99"), 80.0, &|v| format!("+{v:.1} µs")),
        );
        add(
            "new connections per second",
            "≥ 0.42 of direct",
            at_least(ratio("conn_rate", "ambit"), 0.42, &x),
        );
        add(
            "agent RSS idle",
            "≤ 6 MiB",
            at_most(worst_agent("rss_idle"), 6.0, &|v| {
                format!("{v:.1} MiB (larger agent)")
            }),
        );
        add(
            "agent RSS per held connection",
            "≤ 3 KiB",
            at_most(worst_agent("kib_per_conn"), 3.0, &|v| {
                format!("{v:.1} KiB (larger agent)")
            }),
        );
        let cpu = ["cpu_gb_node1", "cpu_gb_node2"]
            .iter()
            .filter_map(|k| self.load_median(k, "ambit"))
            .reduce(f64::max);
        add(
            "agent CPU per GB (each side)",
            "≤ 0.45 CPU-seconds",
            at_most(cpu, 0.45, &|v| format!("{v:.2} s/GB (busier side)")),
        );
        let same = self
            .load_median("iperf1", "same_node")
            .zip(self.load_median("iperf1", "ambit"))
            .map(|(s, c)| s / c);
        add(
            "same-node throughput",
            "≥ cross-node",
            at_least(same, 1.0, &|v| format!("{v:.2}× of cross-node (1 stream)")),
        );
        let capture = ["iperf1", "conn_rate"]
            .iter()
            .filter_map(|k| ratio(k, "capture"))
            .reduce(f64::min);
        add(
            "non-tunnelled traffic",
            "≥ 0.95 of direct",
            at_least(capture, 0.95, &|v| {
                format!("{v:.2}× of direct (worse of throughput, conn/s)")
            }),
        );
        self.targets = t;
    }
}

/// What a row is, before it has samples.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RowSpec<'a> {
    pub(crate) key: &'a str,
    pub(crate) title: &'a str,
    pub(crate) unit: &'a str,
    pub(crate) better: Better,
    pub(crate) compare: Compare,
}

fn push(rows: &mut Vec<Row>, spec: &RowSpec, col: &str, value: f64) {
    if !value.is_finite() {
        return;
    }
    let row = match rows.iter().position(|r| r.key == spec.key) {
        Some(i) => &mut rows[i],
        None => {
            rows.push(Row {
                key: spec.key.into(),
                title: spec.title.into(),
                unit: spec.unit.into(),
                better: spec.better,
                compare: spec.compare,
                samples: BTreeMap::new(),
            });
            rows.last_mut().expect("just pushed")
        }
    };
    row.samples.entry(col.to_string()).or_default().push(value);
}

impl Row {
    /// Median, min and max of column `col`; `None` without samples.
    pub(crate) fn stat(&self, col: &str) -> Option<Stat> {
        stat(self.samples.get(col)?)
    }
}

/// Median (mean of the middle two for an even count), min and max; `None` when empty.
pub(crate) fn stat(values: &[f64]) -> Option<Stat> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some(Stat {
        median,
        min: v[0],
        max: v[n - 1],
        n,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const IPERF1: RowSpec<'static> = RowSpec {
        key: "iperf1",
        title: "iperf3, 1 stream",
        unit: "Gbit/s",
        better: Better::Higher,
        compare: Compare::Ratio,
    };

    #[test]
    fn stat_takes_the_middle_and_the_extremes() {
        let s = stat(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        assert_eq!(stat(&[4.0, 1.0, 2.0, 3.0]).unwrap().median, 2.5);
        assert!(stat(&[]).is_none());
        assert!(stat(&[f64::NAN]).is_none());
    }

    #[test]
    fn targets_compare_medians_with_direct() {
        let mut r = Results::default();
        for v in [10.0, 12.0, 11.0] {
            r.push_load(&IPERF1, "direct", v);
        }
        for v in [7.0, 6.0, 8.0] {
            r.push_load(&IPERF1, "ambit", v);
        }
        r.check();
        let one = &r.targets[0];
        assert_eq!(one.figure, "one-stream throughput");
        assert_eq!(one.met, Some(true), "{one:?}");
        assert!(one.measured.starts_with("0.64×"), "{one:?}");
        // Figures that were not measured are reported as missing, not as met.
        let four = &r.targets[1];
        assert_eq!((four.met, four.measured.as_str()), (None, "missing"));
    }

    #[test]
    fn json_round_trips() {
        let mut r = Results::default();
        r.push_load(&IPERF1, "direct", 1.5);
        r.check();
        let text = serde_json::to_string(&r).unwrap();
        let back: Results = serde_json::from_str(&text).unwrap();
        assert_eq!(back.load_median("iperf1", "direct"), Some(1.5));
    }
}
