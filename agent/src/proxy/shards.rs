//! Data-plane shards: one single-threaded runtime per CPU, so a connection, its HBONE stream and the HBONE connection under it are woken and run on one thread.
//!
//! A multi-threaded runtime moves tasks between workers and wakes idle workers to steal work:
//! on a busy node every hop of a tunnelled byte (app socket → stream task → h2 connection task
//! → TLS socket) may cross threads, each crossing a futex wake-up and a cold cache. Here an
//! accepted connection is handed to one shard and everything it spawns stays there; the pool
//! keys connections by shard (see `PoolKey::shard`), so the h2 connection task a stream uses
//! runs on the stream's own thread.
use std::cell::Cell;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::runtime::Handle;
use tokio::sync::watch;

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
    stop: watch::Sender<bool>,
    threads: std::sync::Mutex<Vec<JoinHandle<()>>>,
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
        let (stop, _) = watch::channel(false);
        let mut handles = Vec::new();
        let mut threads = Vec::new();
        for i in 0..count.max(1) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(rt.handle().clone());
            let mut stopped = stop.subscribe();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("ambit-dp-{i}"))
                    .spawn(move || {
                        CURRENT.with(|c| c.set(i));
                        rt.block_on(async move {
                            let _ = stopped.wait_for(|s| *s).await;
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

    /// The next shard in turn.
    pub fn pick(&self) -> &Handle {
        self.handle(self.next_index())
    }

    /// Spawns `fut` on the next shard in turn.
    pub fn spawn<F>(&self, fut: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.pick().spawn(fut)
    }

    /// Stops every shard (their tasks are dropped, which also ends the pod contexts that hold
    /// this value), waiting at most `timeout` for the threads.
    pub fn shutdown(&self, timeout: Duration) {
        let _ = self.stop.send(true);
        let deadline = Instant::now() + timeout;
        let threads = std::mem::take(
            &mut *self
                .threads
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
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
            shards.spawn(async move {
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
}
