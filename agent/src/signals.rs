//! Signals of the long-running commands (`ambit run`, `ambit ca`): none ends the process silently.
//!
//! [`block`] is called first thing, before the process has a second thread: it blocks every
//! catchable signal whose default action would end the process, so all threads started later
//! inherit the mask. [`Blocked::start`] (once logging is set up) starts the `ambit-signals`
//! thread, which takes them with `sigwait`, logs each and acts by the process's phase:
//!
//! | signal | starting | serving | stopping |
//! |---|---|---|---|
//! | SIGTERM, SIGINT, SIGQUIT | exit at once (status 128+n) | [`Event::Stop`]: drain, then exit | exit at once |
//! | SIGHUP | ignored | [`Event::Reload`] | ignored |
//! | SIGUSR1 | ignored | [`Event::Dump`] | ignored |
//! | SIGUSR2, SIGALRM, SIGVTALRM, SIGPROF, SIGIO, SIGPWR, SIGSTKFLT, realtime | ignored | ignored | ignored |
//!
//! Every line names the signal and the command. SIGKILL and SIGSTOP cannot be caught; signals
//! raised by faults (SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT, SIGSYS, SIGTRAP) and by resource
//! limits (SIGXCPU, SIGXFSZ) keep their default action; SIGPIPE is ignored by the Rust runtime.
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use nix::sys::signal::Signal;
use tokio::sync::mpsc;

use crate::sys::{self, SignalSet};

/// The signals that end the process after a drain.
const STOP: [Signal; 3] = [Signal::SIGTERM, Signal::SIGINT, Signal::SIGQUIT];
/// Signals with a default action of ending the process that are only logged.
const IGNORED: [Signal; 7] = [
    Signal::SIGUSR2,
    Signal::SIGALRM,
    Signal::SIGVTALRM,
    Signal::SIGPROF,
    Signal::SIGIO,
    Signal::SIGPWR,
    Signal::SIGSTKFLT,
];

/// What the serving process is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Drain and exit (SIGTERM, SIGINT, SIGQUIT), with the signal's name.
    Stop(&'static str),
    /// Re-read the configuration (SIGHUP).
    Reload,
    /// Log a summary of the state (SIGUSR1).
    Dump,
}

/// The process's phase, which decides what a signal does (see the module's table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// Not serving yet: nothing to drain or reload.
    Starting = 0,
    /// Serving: events go to the process.
    Serving = 1,
    /// Draining or exiting.
    Stopping = 2,
}

/// What the signal thread does with one signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Hand the event to the process.
    Forward(Event),
    /// Exit now with this status.
    Exit(i32),
    /// Log only.
    Ignore,
}

/// The signal thread's decision for `signo` in `phase` (pure, for tests).
pub fn action(signo: i32, phase: Phase) -> Action {
    let sig = Signal::try_from(signo).ok();
    let stop = sig.filter(|s| STOP.contains(s));
    match (stop, sig, phase) {
        (Some(s), _, Phase::Serving) => Action::Forward(Event::Stop(s.as_str())),
        (Some(_), _, _) => Action::Exit(128 + signo),
        (None, Some(Signal::SIGHUP), Phase::Serving) => Action::Forward(Event::Reload),
        (None, Some(Signal::SIGUSR1), Phase::Serving) => Action::Forward(Event::Dump),
        _ => Action::Ignore,
    }
}

/// The name of `signo` (`SIGHUP`, `SIGRTMIN+3`, ...).
pub fn name(signo: i32) -> String {
    match Signal::try_from(signo) {
        Ok(s) => s.as_str().to_string(),
        Err(_) if sys::realtime_signals().contains(&signo) => {
            format!("SIGRTMIN+{}", signo - sys::realtime_signals().start())
        }
        Err(_) => format!("signal {signo}"),
    }
}

/// The signal numbers [`block`] takes over.
fn handled() -> Vec<i32> {
    let mut v: Vec<i32> = STOP
        .iter()
        .chain(&IGNORED)
        .chain(&[Signal::SIGHUP, Signal::SIGUSR1])
        .map(|s| *s as i32)
        .collect();
    v.extend(sys::realtime_signals());
    v
}

/// The handled signals, blocked; nothing receives them until [`Blocked::start`].
pub struct Blocked(SignalSet);

/// Blocks the handled signals in the calling thread (and all threads started after it).
pub fn block() -> Result<Blocked, sys::Error> {
    sys::block_signals(&handled()).map(Blocked)
}

/// The events of the signal thread, and the phase it acts on.
pub struct Signals {
    rx: mpsc::UnboundedReceiver<Event>,
    phase: Arc<AtomicU8>,
}

impl Blocked {
    /// Starts the `ambit-signals` thread for `command` (`agent`, `ca`); signals that came
    /// since [`block`] are taken at once.
    pub fn start(self, command: &'static str) -> std::io::Result<Signals> {
        let (tx, rx) = mpsc::unbounded_channel();
        let phase = Arc::new(AtomicU8::new(Phase::Starting as u8));
        let shared = phase.clone();
        std::thread::Builder::new()
            .name("ambit-signals".into())
            .spawn(move || loop {
                let signo = match sys::wait_signal(&self.0) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(command, error = %crate::error::error_chain(&e), "cannot wait for signals; they stay blocked");
                        return;
                    }
                };
                let phase = phase_of(shared.load(Ordering::Acquire));
                dispatch(command, signo, phase, &tx, &shared);
            })?;
        Ok(Signals { rx, phase })
    }
}

fn phase_of(v: u8) -> Phase {
    match v {
        0 => Phase::Starting,
        1 => Phase::Serving,
        _ => Phase::Stopping,
    }
}

fn dispatch(
    command: &'static str,
    signo: i32,
    phase: Phase,
    tx: &mpsc::UnboundedSender<Event>,
    shared: &AtomicU8,
) {
    let signal = name(signo);
    match action(signo, phase) {
        Action::Forward(ev @ Event::Stop(_)) => {
            shared.store(Phase::Stopping as u8, Ordering::Release);
            tracing::info!(command, %signal, "{signal} received: draining, then exiting (another stop signal exits at once)");
            let _ = tx.send(ev);
        }
        Action::Forward(ev) => {
            tracing::info!(command, %signal, "{signal} received");
            let _ = tx.send(ev);
        }
        Action::Exit(status) => {
            let when = if phase == Phase::Starting {
                "during startup"
            } else {
                "while stopping"
            };
            tracing::warn!(command, %signal, status, "{signal} received {when}: exiting now (pinned kernel state stays; pods fail closed)");
            std::process::exit(status);
        }
        Action::Ignore => {
            let why = match phase {
                Phase::Serving => "no action is defined for it",
                Phase::Starting => "not serving yet",
                Phase::Stopping => "already stopping",
            };
            tracing::info!(command, %signal, "{signal} ignored: {why}");
        }
    }
}

impl Signals {
    /// The process serves from now on: stop signals drain, SIGHUP and SIGUSR1 are forwarded.
    pub fn serving(&self) {
        self.set(Phase::Serving);
    }

    /// The process is stopping (for another reason than a signal, e.g. `POST /drain`): a stop
    /// signal now exits at once.
    pub fn stopping(&self) {
        self.set(Phase::Stopping);
    }

    fn set(&self, p: Phase) {
        self.phase.store(p as u8, Ordering::Release);
    }

    /// The next event; pending forever once the signal thread has gone.
    pub async fn recv(&mut self) -> Event {
        match self.rx.recv().await {
            Some(ev) => ev,
            None => std::future::pending().await,
        }
    }
}

/// The top-level keys whose values differ between two configurations (as serialized).
pub fn changed_keys(running: &serde_json::Value, read: &serde_json::Value) -> Vec<String> {
    let empty = serde_json::Map::new();
    let (a, b) = (
        running.as_object().unwrap_or(&empty),
        read.as_object().unwrap_or(&empty),
    );
    let mut keys: Vec<String> = a
        .keys()
        .chain(b.keys())
        .filter(|k| a.get(*k) != b.get(*k))
        .cloned()
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "unit tests")]
    use super::*;

    #[test]
    fn stop_signals_drain_while_serving_and_exit_otherwise() {
        for s in STOP {
            let n = s as i32;
            assert_eq!(
                action(n, Phase::Serving),
                Action::Forward(Event::Stop(s.as_str()))
            );
            assert_eq!(action(n, Phase::Starting), Action::Exit(128 + n));
            assert_eq!(action(n, Phase::Stopping), Action::Exit(128 + n));
        }
    }

    #[test]
    fn hup_and_usr1_act_only_while_serving_and_the_rest_is_ignored() {
        let hup = Signal::SIGHUP as i32;
        let usr1 = Signal::SIGUSR1 as i32;
        assert_eq!(action(hup, Phase::Serving), Action::Forward(Event::Reload));
        assert_eq!(action(usr1, Phase::Serving), Action::Forward(Event::Dump));
        for phase in [Phase::Starting, Phase::Stopping] {
            assert_eq!(action(hup, phase), Action::Ignore);
            assert_eq!(action(usr1, phase), Action::Ignore);
        }
        let rt = *sys::realtime_signals().start() + 2;
        for n in IGNORED.iter().map(|s| *s as i32).chain([rt]) {
            for phase in [Phase::Starting, Phase::Serving, Phase::Stopping] {
                assert_eq!(action(n, phase), Action::Ignore, "{}", name(n));
            }
        }
    }

    #[test]
    fn every_handled_signal_ends_the_process_by_default_and_has_a_name() {
        let handled = handled();
        for n in &handled {
            assert!(!name(*n).starts_with("signal "), "{n}");
        }
        assert_eq!(name(*sys::realtime_signals().start() + 3), "SIGRTMIN+3");
        for s in [
            Signal::SIGKILL,
            Signal::SIGSTOP,
            Signal::SIGSEGV,
            Signal::SIGCHLD,
        ] {
            assert!(!handled.contains(&(s as i32)), "{s}");
        }
        // Left ignored by the Rust runtime: blocked, every EPIPE would queue one.
        assert!(!handled.contains(&(Signal::SIGPIPE as i32)));
        for s in [
            Signal::SIGHUP,
            Signal::SIGUSR1,
            Signal::SIGUSR2,
            Signal::SIGTERM,
        ] {
            assert!(handled.contains(&(s as i32)), "{s}");
        }
    }

    #[test]
    fn changed_keys_names_what_differs() {
        let a = serde_json::json!({"node": "n1", "drainDeadlineMs": 5000, "ca": {"addr": "x"}});
        let b = serde_json::json!({"node": "n1", "drainDeadlineMs": 7000, "ca": {"addr": "y"}, "new": 1});
        assert_eq!(changed_keys(&a, &b), ["ca", "drainDeadlineMs", "new"]);
        assert!(changed_keys(&a, &a).is_empty());
    }
}
