//! `inventory-bench`: the istiod inventory at scale: a fake istiod and the agent's xDS client + publisher in one process, measuring first sync, memory and per-change apply latency.
//!
//! Two OS threads, each with its own single-threaded tokio runtime:
//!
//! - the server thread runs [`FakeIstiod`], filled before the client connects with `--workloads`
//!   workloads on `--nodes` nodes (see [`mesh`]) plus their Services and 100 Authorizations;
//!   in phase 2 it pushes `--rate` changes per second for `--seconds` seconds (60 % an existing
//!   workload's address changes, 20 % a workload is deleted, 20 % one is created), a batch per
//!   1 ms tick, recording each change's send time and what the snapshot must show;
//! - the client thread is "the agent": [`XdsClient`] into a [`MeshSink`] and
//!   [`source::publish`] for node `node-0`, without a CNI plugin, wired as `app.rs` wires them;
//!   a task beside them watches the published snapshots and marks a pending change applied
//!   when a snapshot shows it (looking up only the pending changes).
//!
//! Phase 1 (first sync) is the time from starting the client until `ready` turns true; the
//! snapshot then must hold every workload. The client's memory is the process's `VmRSS` after
//! the first sync minus before the client started (the server loaded); `VmHWM` is reset
//! before the client starts, so the peak covers the first sync. The server's transient
//! buffers of the first push (it encodes the whole store) are part of both, so the client's
//! share is an upper bound. CPU per change is the client thread's run time
//! (`/proc/self/task/<tid>/schedstat`) over phase 2 (until the last change applied or the
//! grace period ended), divided by the changes sent.
//!
//! Prints one JSON object on stdout; progress goes to stderr.
mod mesh;
mod probe;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{mpsc as std_mpsc, Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use tokio::sync::{oneshot, watch};

use ambit::inventory::guard::GuardSettings;
use ambit::inventory::istiod::fake_istiod::{FakeIstiod, SERVER_NAME};
use ambit::inventory::istiod::model::{Mesh, ADDRESS_TYPE, AUTHORIZATION_TYPE};
use ambit::inventory::istiod::node::NodeInfo;
use ambit::inventory::istiod::source::{self, MeshSink};
use ambit::inventory::istiod::status::{StatusHandle, XdsMetrics};
use ambit::inventory::istiod::stream::{Backoff, XdsClient, XdsClientConfig};
use ambit::inventory::publish::ReloadStats;
use ambit::inventory::Snapshot;

use self::mesh::{workload_ip, Rng, Shape};

/// Resources per push while filling the server (keeps its transient buffers small).
const FILL_CHUNK: usize = 1000;

/// `inventory-bench` options.
#[derive(Debug, Parser)]
#[command(about = "istiod inventory at scale: first sync, RSS and per-change apply latency")]
struct Args {
    /// Workloads the fake istiod holds before the agent connects.
    #[arg(long, default_value_t = 150_000)]
    workloads: u32,
    /// Nodes they run on (the agent serves node-0, which has workloads/nodes of them).
    #[arg(long, default_value_t = 5_000)]
    nodes: u32,
    /// Changes per second in phase 2.
    #[arg(long, default_value_t = 1_000)]
    rate: u32,
    /// Seconds of changes in phase 2.
    #[arg(long, default_value_t = 30)]
    seconds: u32,
    /// Seconds to wait after the last change for the pending ones to apply.
    #[arg(long, default_value_t = 10)]
    grace: u64,
    /// Seconds to wait for the first sync.
    #[arg(long, default_value_t = 300)]
    sync_timeout: u64,
}

/// What a pending change must make the snapshot show.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// The workload exists with this address.
    At(Ipv4Addr),
    /// The workload is gone.
    Gone,
}

#[derive(Debug)]
struct Pending {
    expect: Expect,
    sent: Instant,
}

/// Changes in flight and the latencies of those applied; shared by both threads.
#[derive(Debug, Default)]
struct Changes {
    /// Inventory key (`namespace/name`) → the change not yet seen in a snapshot.
    pending: HashMap<String, Pending>,
    /// Send → seen in a published snapshot, per applied change, in µs.
    latencies_us: Vec<u64>,
}

type Shared = Arc<Mutex<Changes>>;

fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, Changes> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let shape = Shape::new(args.workloads, args.nodes);
    let shared = Shared::default();
    let (ready_tx, ready_rx) = std_mpsc::channel();
    let (go_tx, go_rx) = oneshot::channel();
    let (done_tx, done_rx) = std_mpsc::channel();
    let server = {
        let shared = shared.clone();
        let (rate, seconds) = (args.rate, args.seconds);
        std::thread::Builder::new()
            .name("fake-istiod".into())
            .spawn(move || serve(shape, rate, seconds, &shared, &ready_tx, go_rx, &done_tx))
            .context("spawning the server thread")?
    };
    let Ok((addr, root_pem, store_bytes)) = ready_rx.recv() else {
        return Err(thread_failed(server, "server"));
    };
    let dir = std::env::temp_dir().join(format!("ambit-inventory-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let (root, token) = (dir.join("root.pem"), dir.join("token"));
    std::fs::write(&root, root_pem).with_context(|| format!("writing {}", root.display()))?;
    std::fs::write(&token, "bench-token")
        .with_context(|| format!("writing {}", token.display()))?;

    let rss_before = probe::rss_kib()?;
    probe::reset_peak()?;
    eprintln!(
        "==> server loaded (RSS {:.1} MiB); starting the agent's client for {}",
        mib(rss_before),
        Shape::local_node()
    );
    let (synced_tx, synced_rx) = std_mpsc::channel();
    let client = {
        let shared = shared.clone();
        let cfg = client_config(addr, &root, &token);
        std::thread::Builder::new()
            .name("agent".into())
            .spawn(move || agent(cfg, &shared, &synced_tx))
            .context("spawning the client thread")?
    };
    let sync = match synced_rx.recv_timeout(Duration::from_secs(args.sync_timeout)) {
        Ok(sync) => sync,
        Err(std_mpsc::RecvTimeoutError::Timeout) => {
            bail!("no first sync within {} s", args.sync_timeout)
        }
        Err(std_mpsc::RecvTimeoutError::Disconnected) => {
            return Err(thread_failed(client, "client"))
        }
    };
    let (rss_after, rss_peak) = (probe::rss_kib()?, probe::peak_kib()?);
    eprintln!(
        "==> first sync of {} workloads ({} on {}) in {:.0} ms; RSS {:.1} MiB (peak {:.1} MiB)",
        sync.workloads,
        sync.local,
        Shape::local_node(),
        sync.elapsed.as_secs_f64() * 1e3,
        mib(rss_after),
        mib(rss_peak)
    );
    if sync.workloads != args.workloads as usize {
        bail!(
            "the first snapshot holds {} workloads, the server {}",
            sync.workloads,
            args.workloads
        );
    }

    let cpu_start = probe::thread_cpu_ns(sync.tid)?;
    eprintln!(
        "==> {} changes/s for {} s (60 % address change, 20 % delete, 20 % create)",
        args.rate, args.seconds
    );
    if go_tx.send(()).is_err() {
        return Err(thread_failed(server, "server"));
    }
    let Ok(changes) = done_rx.recv() else {
        return Err(thread_failed(server, "server"));
    };
    let deadline = Instant::now() + Duration::from_secs(args.grace);
    while !lock(&shared).pending.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let cpu_ns = probe::thread_cpu_ns(sync.tid)? - cpu_start;
    let (mut latencies, unapplied) = {
        let c = lock(&shared);
        (c.latencies_us.clone(), c.pending.len())
    };
    latencies.sort_unstable();
    let (p50, p99, max) = (
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
        latencies.last().copied(),
    );
    let cpu_us_per_change = (changes > 0).then(|| cpu_ns as f64 / 1e3 / changes as f64);
    eprintln!(
        "==> {changes} changes, {} applied, {unapplied} never; apply p50 {} µs, p99 {} µs, max {} µs; {} µs CPU per change",
        latencies.len(),
        shown(p50),
        shown(p99),
        shown(max),
        cpu_us_per_change.map_or("–".into(), |c| format!("{c:.1}"))
    );
    let report = serde_json::json!({
        "workloads": args.workloads,
        "nodes": shape.nodes,
        "services": shape.services,
        "authorizations": shape.authorizations,
        "local_workloads": sync.local,
        "rate": args.rate,
        "seconds": args.seconds,
        "first_sync_ms": sync.elapsed.as_secs_f64() * 1e3,
        "rss_before_kib": rss_before,
        "rss_after_kib": rss_after,
        "rss_peak_kib": rss_peak,
        "store_mib": store_bytes as f64 / (1024.0 * 1024.0),
        "agent_rss_mib": mib(rss_after.saturating_sub(rss_before)),
        "agent_peak_mib": mib(rss_peak.saturating_sub(rss_before)),
        "rss_method": "VmRSS after the first sync minus VmRSS before the client started (the \
                       server loaded); peak: VmHWM (reset before the client started) minus the \
                       same; both include the server's freed transient buffers of the first \
                       push (a copy of the store, store_mib, and its encoding), so they are \
                       upper bounds",
        "changes": changes,
        "applied": latencies.len(),
        "unapplied": unapplied,
        "p50_us": p50,
        "p99_us": p99,
        "max_us": max,
        "cpu_us_per_change": cpu_us_per_change,
        "cpu_method": "run time of the client thread (schedstat) from the first change until \
                       the last one applied (or the grace period ended), over the changes sent",
    });
    println!("{}", serde_json::to_string(&report)?);
    let _ = std::fs::remove_dir_all(&dir);
    // Both runtimes run endless tasks (the xDS stream, the server); the result is out.
    std::process::exit(0);
}

/// The server thread: starts and fills the fake istiod, reports its address and root, and on
/// `go` pushes the changes; reports how many it sent, then serves until the process exits.
fn serve(
    shape: Shape,
    rate: u32,
    seconds: u32,
    shared: &Shared,
    ready: &std_mpsc::Sender<(SocketAddr, String, usize)>,
    go: oneshot::Receiver<()>,
    done: &std_mpsc::Sender<u64>,
) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the server's runtime")?;
    rt.block_on(async {
        let fake = FakeIstiod::start().await;
        let started = Instant::now();
        let bytes = fill(&fake, &shape);
        eprintln!(
            "==> fake istiod filled: {} workloads on {} nodes, {} Services, {} Authorizations ({:.1} MiB) in {:.1} s",
            shape.workloads,
            shape.nodes,
            shape.services,
            shape.authorizations,
            bytes as f64 / (1024.0 * 1024.0),
            started.elapsed().as_secs_f64()
        );
        ready
            .send((fake.addr(), fake.root_pem().to_owned(), bytes))
            .context("main thread gone")?;
        if go.await.is_err() {
            return Ok(());
        }
        let sent = churn(&fake, &shape, rate, seconds, shared).await;
        done.send(sent).context("main thread gone")?;
        std::future::pending::<()>().await;
        Ok(())
    })
}

/// Fills the store (no stream is open: nothing is sent); returns the bytes of its names and
/// messages (about the size of the first push).
fn fill(fake: &FakeIstiod, shape: &Shape) -> usize {
    let mut bytes = push_all(fake, AUTHORIZATION_TYPE, shape.authorizations());
    let mut services = shape.services();
    while !services.is_empty() {
        let rest = services.split_off(services.len().saturating_sub(FILL_CHUNK));
        bytes += push_all(fake, ADDRESS_TYPE, rest);
    }
    let ids: Vec<u32> = (0..shape.workloads).collect();
    for chunk in ids.chunks(FILL_CHUNK) {
        let resources = chunk
            .iter()
            .map(|&id| (shape.uid(id), shape.workload(id, workload_ip(id))))
            .collect();
        bytes += push_all(fake, ADDRESS_TYPE, resources);
    }
    bytes
}

fn push_all(fake: &FakeIstiod, type_url: &str, resources: Vec<(String, Vec<u8>)>) -> usize {
    let bytes = resources.iter().map(|(n, v)| n.len() + v.len()).sum();
    let (names, values): (Vec<String>, Vec<Vec<u8>>) = resources.into_iter().unzip();
    let refs: Vec<(&str, Vec<u8>)> = names.iter().map(String::as_str).zip(values).collect();
    fake.push(type_url, &refs, &[]);
    bytes
}

/// Phase 2: `rate` changes a second for `seconds`, a batch per 1 ms tick (as many as are due
/// by then); returns how many were sent. A slot whose few picks all had a change in flight
/// is skipped (not counted).
async fn churn(fake: &FakeIstiod, shape: &Shape, rate: u32, seconds: u32, shared: &Shared) -> u64 {
    let total = u64::from(rate) * u64::from(seconds);
    let mut live: Vec<u32> = (0..shape.workloads).collect();
    let mut next_id = shape.workloads;
    // Addresses after the initial ones; never reused.
    let mut next_ip = shape.workloads;
    let mut rng = Rng::new(0x5eed_1234_abcd);
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let started = Instant::now();
    let (mut slots, mut sent) = (0u64, 0u64);
    while slots < total {
        tick.tick().await;
        let due = ((started.elapsed().as_secs_f64() * f64::from(rate)) as u64).min(total);
        let (mut names, mut values, mut removed) = (Vec::new(), Vec::new(), Vec::new());
        {
            let mut changes = lock(shared);
            let now = Instant::now();
            while slots < due {
                slots += 1;
                let roll = rng.below(10);
                let (id, expect) = if roll < 2 {
                    let id = next_id;
                    next_id += 1;
                    live.push(id);
                    (id, Expect::At(workload_ip(next_ip)))
                } else {
                    // A live workload with no change in flight.
                    if live.is_empty() {
                        continue;
                    }
                    let Some(i) = (0..8)
                        .map(|_| rng.below(live.len() as u64) as usize)
                        .find(|&i| !changes.pending.contains_key(&shape.key(live[i])))
                    else {
                        continue;
                    };
                    if roll < 4 {
                        (live.swap_remove(i), Expect::Gone)
                    } else {
                        (live[i], Expect::At(workload_ip(next_ip)))
                    }
                };
                match expect {
                    Expect::At(ip) => {
                        next_ip += 1;
                        names.push(shape.uid(id));
                        values.push(shape.workload(id, ip));
                    }
                    Expect::Gone => removed.push(shape.uid(id)),
                }
                changes
                    .pending
                    .insert(shape.key(id), Pending { expect, sent: now });
                sent += 1;
            }
        }
        if names.is_empty() && removed.is_empty() {
            continue;
        }
        let resources: Vec<(&str, Vec<u8>)> =
            names.iter().map(String::as_str).zip(values).collect();
        let removed: Vec<&str> = removed.iter().map(String::as_str).collect();
        fake.push_wait(ADDRESS_TYPE, &resources, &removed).await;
    }
    sent
}

/// What the client thread reports after the first sync.
struct Synced {
    elapsed: Duration,
    workloads: usize,
    local: usize,
    tid: u32,
}

/// The client thread: the agent's istiod inventory (client + publisher), timed to its first
/// sync, then a watcher of the published snapshots; runs until the process exits.
fn agent(cfg: XdsClientConfig, shared: &Shared, synced: &std_mpsc::Sender<Synced>) -> Result<()> {
    let tid = probe::thread_id()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the client's runtime")?;
    rt.block_on(async {
        let started = Instant::now();
        let node = cfg.node.node_name.clone();
        let status = StatusHandle::new(&cfg.address, XdsMetrics::default());
        let sink = MeshSink::new(Mesh::new("cluster.local", "istio-system"));
        let client = XdsClient::new(cfg, sink.clone(), status)?;
        let (tx, mut snapshots) = watch::channel(Arc::new(Snapshot::default()));
        let (ready_tx, mut ready_rx) = watch::channel(false);
        let opts = source::Options {
            node: node.clone(),
            debounce: Duration::from_millis(20),
            guard: GuardSettings::new(Some(node.clone())),
            reloads: Arc::new(ReloadStats::default()),
        };
        tokio::spawn(client.run());
        tokio::spawn(source::publish(sink, opts, None, tx, ready_tx));
        ready_rx
            .wait_for(|r| *r)
            .await
            .context("the istiod source stopped before its first sync")?;
        let elapsed = started.elapsed();
        let snap = snapshots.borrow_and_update().clone();
        synced
            .send(Synced {
                elapsed,
                workloads: snap.workloads.len(),
                local: snap.on_node(&node).count(),
                tid,
            })
            .context("main thread gone")?;
        drop(snap);
        while snapshots.changed().await.is_ok() {
            let snap = snapshots.borrow_and_update().clone();
            observe(&snap, shared);
        }
        Ok(())
    })
}

/// Marks the pending changes `snap` shows as applied.
fn observe(snap: &Snapshot, shared: &Shared) {
    let now = Instant::now();
    let mut changes = lock(shared);
    let Changes {
        pending,
        latencies_us,
    } = &mut *changes;
    pending.retain(|key, p| {
        let shows = match p.expect {
            Expect::Gone => !snap.workloads.contains_key(key),
            Expect::At(ip) => snap
                .workloads
                .get(key)
                .is_some_and(|w| w.ips.contains(&IpAddr::V4(ip))),
        };
        if shows {
            latencies_us.push(now.duration_since(p.sent).as_micros() as u64);
        }
        !shows
    });
}

fn client_config(addr: SocketAddr, root: &Path, token: &Path) -> XdsClientConfig {
    let node = Shape::local_node();
    XdsClientConfig {
        address: addr.to_string(),
        root_cert: PathBuf::from(root),
        token_file: PathBuf::from(token),
        server_name: Some(SERVER_NAME.into()),
        cluster_id: None,
        node: NodeInfo {
            ip: "10.255.0.1".into(),
            pod_name: format!("ambit-{node}"),
            namespace: "ambit-system".into(),
            node_name: node.into(),
            ..NodeInfo::default()
        },
        connect_timeout: Duration::from_secs(30),
        backoff: Backoff::default(),
    }
}

/// The error a finished thread ended with (or that it panicked).
fn thread_failed(handle: std::thread::JoinHandle<Result<()>>, what: &str) -> anyhow::Error {
    match handle.join() {
        Ok(Ok(())) => anyhow::anyhow!("the {what} thread ended early"),
        Ok(Err(e)) => e.context(format!("the {what} thread failed")),
        Err(_) => anyhow::anyhow!("the {what} thread panicked"),
    }
}

/// The `q` quantile (nearest rank) of sorted `v`.
fn percentile(v: &[u64], q: f64) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    Some(v[rank - 1])
}

fn shown(v: Option<u64>) -> String {
    v.map_or("–".into(), |v| v.to_string())
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}
