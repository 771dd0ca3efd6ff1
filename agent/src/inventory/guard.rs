//! Holds back a reload that empties the inventory or unenrolls much of the node at once, until the same content has stayed for the settle time.
//!
//! An inventory file truncated by a non-atomic writer (`: > inventory.yaml`, then the write),
//! half written, or a relist an API server answers with nothing, would otherwise unenroll every
//! pod and drop every policy within one poll: enrolled pods would send plaintext and STRICT
//! would stop refusing it. A mass unenrollment is rare and loses nothing by waiting a moment;
//! acting on a torn write fails open. So such a reload is held (the last good state stays in
//! force) and applies only when the same content is seen again once `settle` has passed; any
//! other content meanwhile replaces the held one, and content that is not suspicious applies
//! at once (a writer that finishes its file ends the hold).
use std::fmt;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::Snapshot;

/// When a reload is held back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuardSettings {
    /// Whose pods count: this node's, or every node's (`None`, the CA's view).
    pub node: Option<String>,
    /// A reload that unenrolls more than this share (percent) of the counted enrolled pods is
    /// held; 100 turns the share rule off (an emptied inventory is still held).
    pub max_unenroll_percent: u8,
    /// How long suspicious content must stay unchanged before it applies.
    pub settle: Duration,
}

impl GuardSettings {
    /// Default share of pods a reload may unenroll at once, in percent.
    pub const DEFAULT_MAX_UNENROLL_PERCENT: u8 = 50;
    /// Default settle time.
    pub const DEFAULT_SETTLE: Duration = Duration::from_secs(2);

    /// The defaults, counting `node`'s pods (every node's with `None`).
    pub fn new(node: Option<String>) -> Self {
        Self {
            node,
            max_unenroll_percent: Self::DEFAULT_MAX_UNENROLL_PERCENT,
            settle: Self::DEFAULT_SETTLE,
        }
    }
}

/// Why a reload is held.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Suspicion {
    /// The new content has no pod (or no object at all) where the inventory in force has some.
    Empty {
        /// Pods in the inventory in force.
        pods: usize,
    },
    /// The new content unenrolls `lost` of the `of` enrolled pods counted.
    Unenrolls {
        /// Enrolled pods the reload would unenroll or drop.
        lost: usize,
        /// Enrolled pods counted in the inventory in force.
        of: usize,
        /// The configured share, in percent.
        max_percent: u8,
    },
}

impl fmt::Display for Suspicion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Empty { pods } => write!(f, "the new inventory has no pods ({pods} in force)"),
            Self::Unenrolls {
                lost,
                of,
                max_percent,
            } => write!(
                f,
                "the new inventory unenrolls {lost} of {of} enrolled pods (more than {max_percent}%)"
            ),
        }
    }
}

/// Whether replacing `current` by `candidate` is suspicious under `settings`.
pub fn suspicion(
    settings: &GuardSettings,
    current: &Snapshot,
    candidate: &Snapshot,
) -> Option<Suspicion> {
    if !current.workloads.is_empty() && candidate.workloads.is_empty() {
        return Some(Suspicion::Empty {
            pods: current.workloads.len(),
        });
    }
    if !current.is_empty() && candidate.is_empty() {
        return Some(Suspicion::Empty { pods: 0 });
    }
    // This node's pods through the node index (not a scan of the cluster), or every pod.
    let enrolled: Vec<&super::Workload> = match settings.node.as_deref() {
        Some(node) => current.on_node(node).filter(|w| w.enrolled).collect(),
        None => current
            .workloads
            .values()
            .map(AsRef::as_ref)
            .filter(|w| w.enrolled)
            .collect(),
    };
    let lost = enrolled
        .iter()
        .filter(|w| {
            !candidate
                .workloads
                .get(&w.key())
                .is_some_and(|c| c.enrolled && c.node == w.node)
        })
        .count();
    let of = enrolled.len();
    // lost / of > max / 100, in integers.
    (of > 0 && lost * 100 > of * usize::from(settings.max_unenroll_percent)).then_some(
        Suspicion::Unenrolls {
            lost,
            of,
            max_percent: settings.max_unenroll_percent,
        },
    )
}

/// What to do with a reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing suspicious: apply it.
    Apply,
    /// Suspicious, but the same content has stayed for the settle time: apply it.
    Confirmed {
        /// Why it was held.
        why: Suspicion,
        /// How long it was held.
        held: Duration,
    },
    /// Keep the inventory in force; look again at `until`.
    Hold {
        /// Why.
        why: Suspicion,
        /// Whether this content was just seen for the first time (log and count it once).
        new: bool,
        /// When the same content would be confirmed.
        until: Instant,
    },
}

/// The guard of one source; `C` is what "the same content" compares (the parsed file, or the
/// snapshot a relist produced).
#[derive(Debug)]
pub struct Guard<C> {
    settings: GuardSettings,
    held: Option<Held<C>>,
}

#[derive(Debug)]
struct Held<C> {
    content: C,
    since: Instant,
}

impl<C: PartialEq + Clone> Guard<C> {
    /// A guard with nothing held.
    pub fn new(settings: GuardSettings) -> Self {
        Self {
            settings,
            held: None,
        }
    }

    /// The settings.
    pub fn settings(&self) -> &GuardSettings {
        &self.settings
    }

    /// Decides on `candidate` (whose content is `content`) replacing `current`, at `now`.
    /// `content` is copied only when a new hold starts.
    pub fn check(
        &mut self,
        current: &Snapshot,
        candidate: &Snapshot,
        content: &C,
        now: Instant,
    ) -> Verdict {
        let Some(why) = suspicion(&self.settings, current, candidate) else {
            self.held = None;
            return Verdict::Apply;
        };
        match &self.held {
            Some(h) if h.content == *content => {
                let held = now.saturating_duration_since(h.since);
                if held >= self.settings.settle {
                    self.held = None;
                    Verdict::Confirmed { why, held }
                } else {
                    Verdict::Hold {
                        why,
                        new: false,
                        until: h.since + self.settings.settle,
                    }
                }
            }
            _ => {
                self.held = Some(Held {
                    content: content.clone(),
                    since: now,
                });
                Verdict::Hold {
                    why,
                    new: true,
                    until: now + self.settings.settle,
                }
            }
        }
    }

    /// When the held content (if any) can be confirmed.
    pub fn deadline(&self) -> Option<Instant> {
        self.held.as_ref().map(|h| h.since + self.settings.settle)
    }

    /// Forgets the held content (it could not be read again: the next sighting starts over).
    pub fn reset(&mut self) {
        self.held = None;
    }
}

#[cfg(test)]
mod tests;
