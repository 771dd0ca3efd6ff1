//! The agent's one drain/shutdown mechanism: a [`Trigger`] starts a drain, [`Signal`]s observe it
//! and [`Watch`]es hold it open; the drain is complete when every watch is gone or its deadline
//! passes (the shape of linkerd's `drain` crate and ztunnel's drain module).
//!
//! - A [`Trigger`] starts the drain ([`Trigger::start`], or by being dropped) and waits for it
//!   ([`Trigger::drain`]).
//! - A [`Signal`] (cloneable, cheap) tells a task that the drain started; it does not hold the
//!   drain open. Long-lived tasks that stop on drain (reconcile, hand-over watch, annotator,
//!   tunnel servers sending GOAWAY) take one.
//! - A [`Watch`] (from [`Signal::watch`]) is held by work the drain waits for: every proxied
//!   connection holds one from accept to close.
//! - [`Trigger::child`] is a trigger of its own (a pod's: it starts when the pod leaves) whose
//!   watches also hold the parent's drain open (the agent waits for every pod's connections).
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

/// Starts a drain and waits for it. Dropping it starts the drain too.
#[derive(Debug)]
pub struct Trigger {
    started: watch::Sender<bool>,
    /// Its receivers are the [`Watch`]es (of this trigger and its children).
    holds: Arc<watch::Sender<()>>,
}

/// Tells that a drain started; does not hold it open.
#[derive(Debug, Clone)]
pub struct Signal {
    started: watch::Receiver<bool>,
    holds: Arc<watch::Sender<()>>,
}

/// Holds a drain open while it lives; also tells that the drain started.
#[derive(Debug, Clone)]
pub struct Watch {
    signal: Signal,
    _hold: watch::Receiver<()>,
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// Every watch was dropped.
    Complete,
    /// The deadline passed with this many watches still held.
    DeadlineReached {
        /// Watches still held at the deadline.
        open: usize,
    },
}

impl Trigger {
    /// A trigger whose drain has not started.
    pub fn new() -> Self {
        Self {
            started: watch::channel(false).0,
            holds: Arc::new(watch::channel(()).0),
        }
    }

    /// A trigger of its own whose watches also hold this trigger's drain open. Starting this
    /// one does not start the child, nor the other way round.
    pub fn child(&self) -> Self {
        Self {
            started: watch::channel(false).0,
            holds: self.holds.clone(),
        }
    }

    /// An observer of this trigger's drain.
    pub fn signal(&self) -> Signal {
        Signal {
            started: self.started.subscribe(),
            holds: self.holds.clone(),
        }
    }

    /// Starts the drain: every signal and watch sees it (idempotent).
    pub fn start(&self) {
        self.started.send_replace(true);
    }

    /// Whether the drain started.
    pub fn is_started(&self) -> bool {
        *self.started.borrow()
    }

    /// How many watches (of this trigger and its children) are held.
    pub fn open(&self) -> usize {
        self.holds.receiver_count()
    }

    /// Starts the drain and waits until every watch is dropped, or `deadline` passes.
    pub async fn drain(&self, deadline: Duration) -> Drained {
        self.start();
        match tokio::time::timeout(deadline, self.holds.closed()).await {
            Ok(()) => Drained::Complete,
            Err(_) => Drained::DeadlineReached { open: self.open() },
        }
    }
}

impl Default for Trigger {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Trigger {
    fn drop(&mut self) {
        self.start();
    }
}

impl Signal {
    /// Whether the drain started.
    pub fn is_signaled(&self) -> bool {
        *self.started.borrow()
    }

    /// Resolves once the drain started (at once if it has).
    pub async fn signaled(&mut self) {
        // An error means the trigger is gone, and a dropped trigger started its drain.
        let _ = self.started.wait_for(|s| *s).await;
    }

    /// A watch that holds the drain open until it is dropped.
    pub fn watch(&self) -> Watch {
        Watch {
            signal: self.clone(),
            _hold: self.holds.subscribe(),
        }
    }
}

impl Watch {
    /// Whether the drain started.
    pub fn is_signaled(&self) -> bool {
        self.signal.is_signaled()
    }

    /// Resolves once the drain started (at once if it has).
    pub async fn signaled(&mut self) {
        self.signal.signaled().await;
    }
}

#[cfg(test)]
mod tests;
