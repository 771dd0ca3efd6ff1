//! Data-plane shards: one single-threaded runtime per CPU, so a connection, its HBONE stream and the HBONE connection under it are woken and run on one thread.
//!
//! A multi-threaded runtime moves tasks between workers and wakes idle workers to steal work:
//! on a busy node every hop of a tunnelled byte (app socket → stream task → h2 connection task
//! → TLS socket) may cross threads, each crossing a futex wake-up and a cold cache. Here an
//! accepted connection is handed to one shard and everything it spawns stays there; the pool
//! keys connections by shard (see `PoolKey::shard`), so the h2 connection task a stream uses
//! runs on the stream's own thread. A tunnel this agent dials to itself (a same-node peer) is
//! accepted on another shard than the one dialing, so that its two ends use two cores.
use std::cell::Cell;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::runtime::Handle;

thread_local! {
    /// The shard this thread runs (0 outside the data plane: unit tests, the admin thread).
    static CURRENT: Cell<usize> = const { Cell::new(0) };
}

/// The shard the calling thread runs.
pub fn current() -> usize {
    CURRENT.with(Cell::get)
}

/// Shards the data plane runs on: `TOKIO_WORKER_THREADS` if set (as tokio's own runtimes
/// read it), else one per CPU.
pub fn default_count() -> usize {
    std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from))
}

/// The data-plane threads, each running a current-thread runtime.
pub struct Shards {
    handles: Vec<Handle>,
    next: AtomicUsize,
    stop: crate::drain::Trigger,
    threads: std::sync::Mutex<Vec<JoinHandle<()>>>,
    /// Tunnels being dialed, by source address: (shard dialing, dials in progress).
    dials: std::sync::Mutex<HashMap<IpAddr, (usize, usize)>>,
}

/// A tunnel dial in progress (see [`Shards::note_dial`]); forgotten when dropped.
pub struct DialNote<'a> {
    shards: &'a Shards,
    src: IpAddr,
}

impl Drop for DialNote<'_> {
    fn drop(&mut self) {
        let mut dials = lock(&self.shards.dials);
        if let Some((_, n)) = dials.get_mut(&self.src) {
            *n -= 1;
            if *n == 0 {
                dials.remove(&self.src);
            }
        }
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl std::fmt::Debug for Shards {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shards")
            .field("count", &self.handles.len())
            .finish()
    }
}

impl Shards {
    /// Starts `count` shard threads (`ambit-dp-N`).
    pub fn start(count: usize) -> std::io::Result<Self> {
        let stop = crate::drain::Trigger::new();
        let mut handles = Vec::new();
        let mut threads = Vec::new();
        for i in 0..count.max(1) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(rt.handle().clone());
            let mut stopped = stop.signal();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("ambit-dp-{i}"))
                    .spawn(move || {
                        CURRENT.with(|c| c.set(i));
                        rt.block_on(async move {
                            stopped.signaled().await;
                        });
                        rt.shutdown_timeout(Duration::from_millis(100));
                    })?,
            );
        }
        Ok(Self {
            handles,
            next: AtomicUsize::new(0),
            stop,
            threads: std::sync::Mutex::new(threads),
            dials: std::sync::Mutex::default(),
        })
    }

    /// How many shards run.
    pub fn count(&self) -> usize {
        self.handles.len()
    }

    /// The index of the next shard in turn: new connections and pods go round the shards.
    pub fn next_index(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len()
    }

    /// The runtime of shard `i` (modulo the count).
    pub fn handle(&self, i: usize) -> &Handle {
        &self.handles[i % self.handles.len()]
    }

    /// Notes that the calling shard dials a tunnel from `src` (a pod address), until the
    /// note is dropped (after the handshake: by then the peer has accepted).
    pub fn note_dial(&self, src: IpAddr) -> DialNote<'_> {
        let mut dials = lock(&self.dials);
        let e = dials.entry(src).or_insert((current(), 0));
        *e = (current(), e.1 + 1);
        DialNote { shards: self, src }
    }

    /// The shard for a connection accepted from `peer`: the next in turn, unless this agent
    /// is dialing from `peer` itself (a same-node tunnel), then the shard after the dialing
    /// one, so that the two ends of the tunnel do not share a thread.
    pub fn place(&self, peer: IpAddr) -> usize {
        let n = self.handles.len();
        if n > 1 {
            if let Some(&(dialing, _)) = lock(&self.dials).get(&peer) {
                return (dialing + 1) % n;
            }
        }
        self.next_index()
    }

    /// The next shard in turn.
    pub fn pick(&self) -> &Handle {
        self.handle(self.next_index())
    }

    /// Stops every shard (their tasks are dropped, which also ends the pod contexts that hold
    /// this value), waiting at most `timeout` for the threads.
    pub fn shutdown(&self, timeout: Duration) {
        self.stop.start();
        let deadline = Instant::now() + timeout;
        let threads = std::mem::take(&mut *lock(&self.threads));
        for t in threads {
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_run_on_their_shard_thread_and_spread_round_robin() {
        let shards = Shards::start(2).expect("shards");
        assert_eq!(shards.count(), 2);
        let (tx, rx) = std::sync::mpsc::channel();
        for _ in 0..4 {
            let tx = tx.clone();
            shards.pick().spawn(async move {
                // What a connection task spawns stays on its shard's thread.
                let outer = (current(), std::thread::current().id());
                let inner = tokio::spawn(async { (current(), std::thread::current().id()) })
                    .await
                    .expect("inner task");
                tx.send((outer, inner)).expect("send");
            });
        }
        let mut seen = Vec::new();
        for _ in 0..4 {
            let (outer, inner) = rx.recv_timeout(Duration::from_secs(5)).expect("task ran");
            assert_eq!(outer, inner, "a spawned task left its shard");
            seen.push(outer.0);
        }
        seen.sort_unstable();
        assert_eq!(seen, vec![0, 0, 1, 1], "round robin over two shards");
        let started = Instant::now();
        shards.shutdown(Duration::from_secs(2));
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "shards stop promptly"
        );
    }

    #[test]
    fn a_tunnel_dialed_to_ourselves_is_accepted_on_another_shard() {
        let shards = Shards::start(2).expect("shards");
        let pod: IpAddr = "10.0.1.2".parse().unwrap();
        let other: IpAddr = "10.0.2.2".parse().unwrap();
        let shards = std::sync::Arc::new(shards);
        let (tx, rx) = std::sync::mpsc::channel();
        let s = shards.clone();
        shards.handle(1).spawn(async move {
            let note = s.note_dial(pod);
            let placed = s.place(pod);
            // Dropped before the answer goes out: the checks below must not race this note.
            drop(note);
            tx.send(placed).unwrap();
        });
        let placed = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(placed, 0, "dialed from shard 1, accepted on shard 0");
        // Notes are taken on the calling thread's shard: outside the shards that is 0.
        let note = shards.note_dial(pod);
        assert_eq!(
            shards.place(pod),
            1,
            "the end accepted away from the dialing shard"
        );
        assert_eq!(shards.place(pod), 1, "every time while the dial lasts");
        let again = shards.note_dial(pod);
        drop(note);
        assert_eq!(
            shards.place(pod),
            1,
            "a second dial from the address keeps it noted"
        );
        drop(again);
        let spread: Vec<usize> = (0..4).map(|_| shards.place(pod)).collect();
        assert!(
            spread.contains(&0) && spread.contains(&1),
            "round robin after the dials: {spread:?}"
        );
        let spread: Vec<usize> = (0..4).map(|_| shards.place(other)).collect();
        assert!(
            spread.contains(&0) && spread.contains(&1),
            "others go round: {spread:?}"
        );
        shards.shutdown(Duration::from_secs(2));
    }
}
