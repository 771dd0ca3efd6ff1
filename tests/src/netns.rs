//! A test server (the agent crate's fake istiod, its test API server) kept serving on a thread inside a testbed network namespace for as long as its handle lives.
//!
//! Sockets belong to the namespace they were created in, so the server is started on a thread
//! that entered the namespace first, and that thread's runtime keeps running what it spawned.
//! For a one-shot call in a namespace, see [`crate::hbone::in_netns`].
use std::fs::File;
use std::future::Future;
use std::path::Path;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use nix::sched::CloneFlags;
use tokio::sync::oneshot;

/// How long a server may take to start.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A server `T` serving from a thread inside a network namespace; stopped on drop (the server
/// first, then its runtime).
pub struct NetnsServer<T> {
    server: Option<T>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl<T: Send + 'static> NetnsServer<T> {
    /// Enters the network namespace at `netns` on a new thread and runs `start` there on a
    /// single-thread tokio runtime, which keeps serving what `start` spawned until drop. Fails
    /// when the namespace cannot be entered or `start` gives no server within 10 s.
    pub fn start<F, Fut>(netns: &Path, start: F) -> Result<Self>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T>,
    {
        let ns = File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop, stop_rx) = oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = match runtime_in(&ns) {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            rt.block_on(async move {
                let _ = tx.send(Ok(start().await));
                let _ = stop_rx.await;
            });
        });
        let server = rx
            .recv_timeout(START_TIMEOUT)
            .map_err(|e| anyhow!("server in {} did not start: {e}", netns.display()))??;
        Ok(Self {
            server: Some(server),
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The server.
    pub fn server(&self) -> &T {
        // Only `drop` takes it.
        self.server.as_ref().expect("server present until drop")
    }
}

impl<T> Drop for NetnsServer<T> {
    fn drop(&mut self) {
        drop(self.server.take());
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A single-thread runtime on this thread, after moving it into the network namespace `ns`.
fn runtime_in(ns: &File) -> Result<tokio::runtime::Runtime> {
    nix::sched::setns(ns, CloneFlags::CLONE_NEWNET).context("setns(CLONE_NEWNET)")?;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building a tokio runtime")
}
