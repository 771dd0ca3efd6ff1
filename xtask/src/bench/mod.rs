//! `cargo xtask bench`: throughput, latency, connection rate, agent memory and CPU, against the direct path.
mod bed;
mod chart;
mod inventory;
mod load;
mod procs;
mod report;
mod results;
mod tools;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args as ClapArgs;

use self::bed::{Bed, Route, HOLD_PORT, ROUTES, SYSCTLS};
use self::procs::Lines;
use self::results::{Better, Compare, Results, RowSpec};
use crate::{cargo, prereq};

/// `cargo xtask bench` options.
#[derive(Debug, ClapArgs)]
pub(crate) struct Args {
    /// Everything once and short (2 s per run, 200 held connections), for CI.
    #[arg(long)]
    quick: bool,
    /// Write the results as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Draw the results as an SVG chart to FILE.
    #[arg(long, value_name = "FILE.svg")]
    chart: Option<PathBuf>,
    /// Record the results for the documents: write docs/bench/results.json and
    /// docs/bench/chart.svg, and rewrite the generated tables of docs/performance.md and the
    /// summary in README.md from them (a unit test checks that they agree).
    #[arg(long, alias = "readme", conflicts_with = "quick")]
    docs: bool,
    /// Measure nothing: render the table (and --chart, --docs) from an earlier --json FILE.
    #[arg(long, value_name = "FILE", conflicts_with = "quick")]
    from: Option<PathBuf>,
    /// Rounds: each path of each figure runs this often, alternating (default 3; 1 with --quick).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=20))]
    rounds: Option<u32>,
    /// Seconds per load run (default 10; 2 with --quick).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=120))]
    seconds: Option<u32>,
    /// Measure this agent binary instead of building `target/release/ambit` (e.g. a prototype).
    #[arg(long, value_name = "FILE")]
    agent_bin: Option<PathBuf>,
    /// Only these figures (for profiling): iperf1, iperf4, pingpong, wrk, memory, inventory
    /// (the istiod inventory at scale; alone, it needs neither root nor the testbed).
    #[arg(long, value_delimiter = ',', value_parser = FIGURES.map(|f| f.0))]
    only: Vec<String>,
    /// Only these paths: direct, ambit, same_node, capture.
    #[arg(long, value_delimiter = ',', value_parser = ROUTES.map(|r| r.key))]
    paths: Vec<String>,
    /// Do not install missing Debian packages.
    #[arg(long)]
    no_install: bool,
}

/// Load figures: key for `--only`, and what the progress line calls it.
const FIGURES: [(&str, &str); 6] = [
    ("iperf1", "iperf3 1 stream"),
    ("iperf4", "iperf3 4 streams"),
    ("pingpong", "sockperf ping-pong"),
    ("wrk", "wrk"),
    ("memory", "held connections"),
    ("inventory", "istiod inventory at scale"),
];

/// What one run measures.
#[derive(Debug, Clone)]
struct Plan {
    rounds: u32,
    seconds: u32,
    held: Vec<usize>,
    wrk_conns: u32,
    only: Vec<String>,
    paths: Vec<String>,
}

impl Plan {
    fn new(args: &Args) -> Self {
        let (rounds, seconds, held) = if args.quick {
            (1, 2, vec![200])
        } else {
            (3, 10, vec![1000, 5000])
        };
        Self {
            rounds: args.rounds.unwrap_or(rounds),
            seconds: args.seconds.unwrap_or(seconds),
            held,
            wrk_conns: 16,
            only: args.only.clone(),
            paths: args.paths.clone(),
        }
    }

    fn wants(&self, figure: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|f| f == figure)
    }

    fn routes(&self) -> Vec<Route> {
        ROUTES
            .into_iter()
            .filter(|r| self.paths.is_empty() || self.paths.iter().any(|p| p == r.key))
            .collect()
    }
}

/// Measures (or loads) the results, then prints and writes them.
pub(crate) fn run(args: &Args) -> Result<ExitCode> {
    let results = match &args.from {
        Some(file) => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("reading {}", file.display()))?;
            let mut r: Results = serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", file.display()))?;
            r.check();
            r
        }
        None => measure(args)?,
    };
    println!("{}", report::table(&results));
    if let Some(file) = &args.json {
        let text = serde_json::to_string_pretty(&results)?;
        std::fs::write(file, text + "\n").with_context(|| format!("writing {}", file.display()))?;
        eprintln!("==> wrote {}", file.display());
    }
    if let Some(file) = &args.chart {
        chart::draw(&results, file)?;
        eprintln!("==> wrote {}", file.display());
    }
    if args.docs {
        let root = cargo::workspace_root();
        let file = root.join(report::RESULTS);
        let text = serde_json::to_string_pretty(&results)?;
        std::fs::write(&file, text + "\n")
            .with_context(|| format!("writing {}", file.display()))?;
        chart::draw(&results, &root.join(report::CHART))?;
        report::update_docs(&root, &results)?;
        eprintln!(
            "==> wrote {}, {} and the generated sections of {} and {}",
            report::RESULTS,
            report::CHART,
            report::PERFORMANCE,
            report::README
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn measure(args: &Args) -> Result<Results> {
    let plan = Plan::new(args);
    // Measured first, before the testbed loads the machine.
    let inventory = if plan.wants("inventory") {
        let scale = if args.quick {
            inventory::Scale::QUICK
        } else {
            inventory::Scale::FULL
        };
        Some(inventory::measure(scale, args.quick)?)
    } else {
        None
    };
    let only_inventory = !plan.only.is_empty() && plan.only.iter().all(|f| f == "inventory");
    if let (true, Some(inv)) = (only_inventory, &inventory) {
        return Ok(inventory::alone(inv.clone(), args.quick));
    }
    ambit_testbed::require_root_result()?;
    prereq::ensure(!args.no_install)?;
    tools::ensure(!args.no_install)?;
    let bin = match &args.agent_bin {
        Some(b) => b
            .canonicalize()
            .with_context(|| format!("agent binary {}", b.display()))?,
        None => build_release_agent()?,
    };
    for state in ambit_testbed::teardown::stale_instances() {
        eprintln!("==> removing testbed {} left by a crashed run", state.id);
        ambit_testbed::teardown::teardown(&state, &mut Vec::new())?;
    }
    let (kernel, cpus, cpu_model) = tools::machine();
    let mut results = Results {
        inventory,
        ..Results::default()
    };
    results.meta = results::Meta {
        kernel,
        cpus,
        cpu_model,
        tools: tools::versions(),
        commit: tools::commit(&cargo::workspace_root()),
        agent_bin: bin.display().to_string(),
        quick: args.quick,
        rounds: plan.rounds,
        seconds: plan.seconds,
        held: plan.held.clone(),
        wrk: format!("-t1 -c{}", plan.wrk_conns),
        sysctls: SYSCTLS.iter().map(|s| (*s).to_string()).collect(),
        date: String::new(),
        loadavg: String::new(),
    };
    eprintln!("==> bringing the testbed up (agent {})", bin.display());
    let mut bed = Bed::up(&bin)?;
    results.meta.loadavg = tools::loadavg();
    if results
        .meta
        .loadavg
        .split_whitespace()
        .next()
        .and_then(|l| l.parse::<f64>().ok())
        .is_some_and(|l| l > 0.5)
    {
        eprintln!("==> note: load average {} before measuring; other work on the machine skews the figures", results.meta.loadavg);
    }
    idle_memory(&bed, &mut results)?;
    loads(&mut bed, &plan, &mut results)?;
    if plan.wants("memory") {
        held_memory(&bed, &plan, &mut results)?;
    }
    drop(bed);
    results.meta.date = tools::now_utc();
    results.check();
    Ok(results)
}

/// `cargo build --release -p ambit-agent`; the bench measures optimized code.
fn build_release_agent() -> Result<PathBuf> {
    eprintln!("==> building the agent (cargo build --release -p ambit-agent)");
    cargo::run(&["build", "--release", "-p", "ambit-agent"])?;
    let bin = cargo::target_dir().join("release").join("ambit");
    if !bin.exists() {
        bail!(
            "cargo built ambit-agent but {} does not exist",
            bin.display()
        );
    }
    Ok(bin)
}

const IPERF1: RowSpec<'static> = spec(
    "iperf1",
    "iperf3, 1 stream",
    "Gbit/s",
    Better::Higher,
    Compare::Ratio,
);
const IPERF4: RowSpec<'static> = spec(
    "iperf4",
    "iperf3, 4 streams",
    "Gbit/s",
    Better::Higher,
    Compare::Ratio,
);
const RTT_P50: RowSpec<'static> = spec(
    "rtt_p50",
    "ping-pong 64 B RTT p50",
    "µs",
    Better::Lower,
    Compare::Added,
);
const RTT_P99: RowSpec<'static> = spec(
    "rtt_p99",
    "ping-pong 64 B RTT p99",
    "µs",
    Better::Lower,
    Compare::Added,
);
const RTT_P999: RowSpec<'static> = spec(
    "rtt_p999",
    "ping-pong 64 B RTT p99.9",
    "µs",
    Better::Lower,
    Compare::Added,
);
const CONN_RATE: RowSpec<'static> = spec(
    "conn_rate",
    "new connections (wrk, Connection: close)",
    "req/s",
    Better::Higher,
    Compare::Ratio,
);
const CONN_P50: RowSpec<'static> = spec(
    "conn_p50",
    "wrk latency p50",
    "ms",
    Better::Lower,
    Compare::Added,
);
const CONN_P90: RowSpec<'static> = spec(
    "conn_p90",
    "wrk latency p90",
    "ms",
    Better::Lower,
    Compare::Added,
);
const CONN_P99: RowSpec<'static> = spec(
    "conn_p99",
    "wrk latency p99",
    "ms",
    Better::Lower,
    Compare::Added,
);
const CONN_ERRORS: RowSpec<'static> = spec(
    "conn_errors",
    "wrk errors, worst run",
    "count",
    Better::Lower,
    Compare::None,
);
const CPU_GB: [RowSpec<'static>; 2] = [
    spec(
        "cpu_gb_node1",
        "agent CPU per GB, node1 (1 stream)",
        "s/GB",
        Better::Lower,
        Compare::None,
    ),
    spec(
        "cpu_gb_node2",
        "agent CPU per GB, node2 (1 stream)",
        "s/GB",
        Better::Lower,
        Compare::None,
    ),
];
const CPU_CONN: [RowSpec<'static>; 2] = [
    spec(
        "cpu_conn_node1",
        "agent CPU per connection, node1",
        "µs",
        Better::Lower,
        Compare::None,
    ),
    spec(
        "cpu_conn_node2",
        "agent CPU per connection, node2",
        "µs",
        Better::Lower,
        Compare::None,
    ),
];
const RSS_IDLE: RowSpec<'static> = spec(
    "rss_idle",
    "RSS idle after start",
    "MiB",
    Better::Lower,
    Compare::None,
);
const ANON_IDLE: RowSpec<'static> = spec(
    "anon_idle",
    "of which anonymous (RssAnon; the rest is the binary's pages)",
    "MiB",
    Better::Lower,
    Compare::None,
);
const RSS_BULK: RowSpec<'static> = spec(
    "rss_bulk",
    "RSS peak during bulk (4 streams, cross-node)",
    "MiB",
    Better::Lower,
    Compare::None,
);
const RSS_BEFORE_HOLD: RowSpec<'static> = spec(
    "rss_before_hold",
    "RSS before holding connections",
    "MiB",
    Better::Lower,
    Compare::None,
);
const KIB_PER_CONN: RowSpec<'static> = spec(
    "kib_per_conn",
    "RSS per held tunnelled connection",
    "KiB",
    Better::Lower,
    Compare::None,
);

const fn spec(
    key: &'static str,
    title: &'static str,
    unit: &'static str,
    better: Better,
    compare: Compare,
) -> RowSpec<'static> {
    RowSpec {
        key,
        title,
        unit,
        better,
        compare,
    }
}

fn idle_memory(bed: &Bed, results: &mut Results) -> Result<()> {
    // Let startup work (certificate fetches, first reconcile) finish before "idle".
    std::thread::sleep(Duration::from_secs(2));
    for (col, agent) in bed.agents() {
        results.push_agent(&RSS_IDLE, col, mib(agent.rss_kib()?));
        results.push_agent(&ANON_IDLE, col, mib(agent.anon_kib()?));
    }
    Ok(())
}

/// The load figures: every round runs each figure on every path, rotating the path order.
fn loads(bed: &mut Bed, plan: &Plan, results: &mut Results) -> Result<()> {
    let figures: Vec<(usize, &str)> = FIGURES[..4]
        .iter()
        .enumerate()
        .filter(|(_, (key, _))| plan.wants(key))
        .map(|(i, (_, title))| (i, *title))
        .collect();
    let routes = plan.routes();
    let total = plan.rounds as usize * figures.len() * routes.len();
    let started = Instant::now();
    let mut step = 0;
    for round in 0..plan.rounds {
        for &(fi, figure) in &figures {
            for k in 0..routes.len() {
                let route = routes[(k + round as usize) % routes.len()];
                step += 1;
                bed.check_servers()?;
                eprint!(
                    "[{step:>3}/{total}] {:>5.0}s round {}/{} · {figure:<18} · {:<9} ",
                    started.elapsed().as_secs_f32(),
                    round + 1,
                    plan.rounds,
                    route.key
                );
                let tag = format!("{}-{}-{}", route.key, fi, round);
                let shown = one_load(bed, plan, fi, &route, &tag, results)?;
                eprintln!("{shown}");
            }
        }
    }
    Ok(())
}

/// Runs figure `fi` on `route` once, records it, and returns what to print.
fn one_load(
    bed: &Bed,
    plan: &Plan,
    fi: usize,
    route: &Route,
    tag: &str,
    results: &mut Results,
) -> Result<String> {
    let col = route.key;
    let secs = plan.seconds;
    Ok(match fi {
        0 | 1 => {
            let streams = if fi == 0 { 1 } else { 4 };
            let r = load::iperf(bed, route, streams, secs, tag)?;
            results.push_load(if fi == 0 { &IPERF1 } else { &IPERF4 }, col, r.gbit_per_sec);
            let gb = r.bytes / 1e9;
            if fi == 0 {
                for (i, spec) in CPU_GB.iter().enumerate() {
                    results.push_load(spec, col, r.usage.cpu_secs[i] / gb);
                }
            } else if col == "ambit" {
                for (i, (agent, _)) in bed.agents().iter().enumerate() {
                    results.push_agent(&RSS_BULK, agent, mib(r.usage.rss_max_kib[i]));
                }
            }
            format!(
                "{:6.2} Gbit/s  agents {:.2}+{:.2} CPU-s/GB",
                r.gbit_per_sec,
                r.usage.cpu_secs[0] / gb,
                r.usage.cpu_secs[1] / gb
            )
        }
        2 => {
            let r = load::ping_pong(bed, route, secs, tag)?;
            results.push_load(&RTT_P50, col, r.p50);
            results.push_load(&RTT_P99, col, r.p99);
            results.push_load(&RTT_P999, col, r.p999);
            format!(
                "RTT p50 {:.1} µs  p99 {:.1} µs  p99.9 {:.1} µs",
                r.p50, r.p99, r.p999
            )
        }
        _ => {
            let r = load::wrk(bed, route, plan.wrk_conns, secs, tag)?;
            results.push_load(&CONN_RATE, col, r.requests_per_sec);
            results.push_load(&CONN_P50, col, r.p50_ms);
            results.push_load(&CONN_P90, col, r.p90_ms);
            results.push_load(&CONN_P99, col, r.p99_ms);
            results.push_load(&CONN_ERRORS, col, r.errors as f64);
            for (i, spec) in CPU_CONN.iter().enumerate() {
                results.push_load(spec, col, r.usage.cpu_secs[i] * 1e6 / r.requests.max(1.0));
            }
            format!(
                "{:8.0} req/s  p50 {:.2} ms  p99 {:.2} ms  errors {}",
                r.requests_per_sec, r.p50_ms, r.p99_ms, r.errors
            )
        }
    })
}

/// Holds idle tunnelled connections (client → server, HBONE) in steps and reads both agents'
/// RSS at each; KiB per connection is the growth over the RSS before, divided by the count.
fn held_memory(bed: &Bed, plan: &Plan, results: &mut Results) -> Result<()> {
    let before: Vec<(&str, u64)> = bed
        .agents()
        .iter()
        .map(|(c, a)| Ok((*c, a.rss_kib()?)))
        .collect::<Result<_>>()?;
    for (col, kib) in &before {
        results.push_agent(&RSS_BEFORE_HOLD, col, mib(*kib));
    }
    let server = bed.pod("server").ipv4.to_string();
    let py = ambit_testbed::servers::python();
    let mut argv = vec![
        py.to_string_lossy().into_owned(),
        bed.dir.join("many.py").to_string_lossy().into_owned(),
        "steps".into(),
        server,
        HOLD_PORT.to_string(),
    ];
    argv.extend(plan.held.iter().map(ToString::to_string));
    argv.extend(["--max-seconds".into(), "900".into()]);
    let mut holder = Lines::spawn(bed.pod("client"), &argv, &bed.dir.join("holder.log"))?;
    for &n in &plan.held {
        eprint!("==> holding {n} idle tunnelled connections ... ");
        let started = Instant::now();
        let line = holder.next_line(Duration::from_secs(300))?;
        let v: serde_json::Value =
            serde_json::from_str(&line).with_context(|| format!("holder said {line}"))?;
        let open = v["open"].as_u64().unwrap_or(0) as usize;
        if open < n {
            bail!(
                "holder opened only {open} of {n} connections ({line}); see {}",
                bed.dir.join("holder.log").display()
            );
        }
        // Let allocator and kernel settle, then read.
        std::thread::sleep(Duration::from_secs(1));
        let (key, title) = (
            format!("rss_hold_{n}"),
            format!("RSS holding {n} connections"),
        );
        let spec = RowSpec {
            key: &key,
            title: &title,
            unit: "MiB",
            better: Better::Lower,
            compare: Compare::None,
        };
        let mut shown = Vec::new();
        for ((col, agent), (_, base)) in bed.agents().iter().zip(&before) {
            let kib = agent.rss_kib()?;
            results.push_agent(&spec, col, mib(kib));
            if Some(&n) == plan.held.last() {
                let per = (kib as f64 - *base as f64) / n as f64;
                results.push_agent(&KIB_PER_CONN, col, per);
            }
            shown.push(format!("{col} {:.1} MiB", mib(kib)));
        }
        eprintln!(
            "open after {:.1}s: {}",
            started.elapsed().as_secs_f32(),
            shown.join(", ")
        );
        holder.send("next")?;
    }
    Ok(())
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}
