//! Polling the inventory file: a `stat` per interval and a read only when it changed, the guard against emptied or half-written files, and the CNI plugin's reports merged in.
//!
//! An unchanged file costs one `stat` per poll: it is read again only when its device, inode,
//! size, mtime or ctime changed (a rename onto the path is a new inode), or while its mtime is
//! too recent to trust (a second write within one timestamp tick, of the same size, would keep
//! every field; the file is read until its mtime is [`RACY`] older than the check, as git does
//! with "racily clean" entries), or when a held reload is due to be confirmed.
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;

use super::{parse_file, CniReports, Parsed, ReloadStats};
use crate::inventory::guard::{Guard, GuardSettings, Verdict};
use crate::inventory::publish::Publisher;
use crate::inventory::Snapshot;

/// How long after its mtime a file's `stat` is not trusted to show a further change.
const RACY: Duration = Duration::from_secs(2);

/// How the file is watched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchSettings {
    /// How often the file is checked.
    pub interval: Duration,
    /// When a reload is held back.
    pub guard: GuardSettings,
}

/// Polls `path` every `interval` with the default guard over every node's pods (the CA's
/// view); publishes each new good snapshot, keeps the last good one on error.
pub async fn watch_file(
    path: PathBuf,
    interval: Duration,
    tx: watch::Sender<Arc<Snapshot>>,
    stats: Arc<ReloadStats>,
) {
    let settings = WatchSettings {
        interval,
        guard: GuardSettings::new(None),
    };
    watch_with_cni(path, settings, tx, stats, None).await;
}

/// Polls `path` as `settings` say, merging `cni` reports into every snapshot; a change of the
/// reports is published at once (merged into the last good file), as a file change is.
pub async fn watch_with_cni(
    path: PathBuf,
    settings: WatchSettings,
    tx: watch::Sender<Arc<Snapshot>>,
    stats: Arc<ReloadStats>,
    mut cni: Option<CniReports>,
) {
    let source = path.display().to_string();
    let settle = settings.guard.settle;
    let mut guard: Guard<String> = Guard::new(settings.guard);
    let mut publisher = Publisher::new(tx, stats.clone());
    let mut file = FileState::default();
    let mut good: Option<Parsed> = None;
    let mut pending: Option<Parsed> = None;
    let mut cni_changed = false;
    loop {
        let now = Instant::now();
        let due = guard.deadline().is_some_and(|d| now >= d);
        let mut reloaded = false;
        let candidate = match file.poll(&path, due, &stats).await {
            Poll::Unchanged => None,
            // Read again only to confirm a held reload: the same text is the same candidate.
            Poll::Same => pending.take(),
            Poll::Changed(text) => match parse_file(&path, text) {
                Ok(parsed) => Some(parsed),
                Err(e) => {
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, "inventory rejected; keeping the last good state");
                    guard.reset();
                    stats.release();
                    pending = None;
                    None
                }
            },
            Poll::Failed(e) => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(path = %path.display(), error = %e, "cannot read inventory; keeping the last good state");
                guard.reset();
                stats.release();
                pending = None;
                None
            }
        };
        if let Some(parsed) = candidate {
            let current = publisher.current();
            let verdict = guard.check(&current, &parsed.snapshot, file.text(), now);
            stats.note(&verdict, settle, &source);
            if let Verdict::Hold { .. } = verdict {
                pending = Some(parsed);
            } else {
                let snap = &parsed.snapshot;
                stats.loads.fetch_add(1, Ordering::Relaxed);
                stats
                    .warnings
                    .store(snap.warnings.len() as u64, Ordering::Relaxed);
                for w in &snap.warnings {
                    tracing::warn!(path = %path.display(), warning = %w, "inventory");
                }
                tracing::info!(path = %path.display(), workloads = snap.workloads.len(), "inventory loaded");
                good = Some(parsed);
                pending = None;
                reloaded = true;
            }
        }
        if let Some(parsed) = good.as_ref().filter(|_| reloaded || cni_changed) {
            let sent = publisher.publish(parsed.merged(cni.as_ref()), false);
            if sent && !reloaded {
                tracing::info!("inventory updated from the CNI plugin's reports");
            }
        }
        cni_changed = wait(settings.interval, cni.as_mut()).await;
    }
}

/// What one look at the file found.
#[derive(Debug)]
enum Poll<'a> {
    /// Not read: nothing changed since the last read.
    Unchanged,
    /// Read (to confirm a held reload, or its stat moved): the same text as last time.
    Same,
    /// Read: new text.
    Changed(&'a str),
    /// It could not be read (reported once, until it is read again).
    Failed(std::io::Error),
}

/// The last read of the file.
#[derive(Debug, Default)]
struct FileState {
    /// Its text, or `None` after a failed read (the next good read counts as a change).
    text: Option<String>,
    /// Its `stat` just before that read.
    stamp: Option<Stamp>,
}

impl FileState {
    /// Reads `path` if its `stat` moved, is too recent to trust, or `force`.
    async fn poll(&mut self, path: &Path, force: bool, stats: &ReloadStats) -> Poll<'_> {
        let stamp = match tokio::fs::metadata(path).await {
            Ok(m) => Stamp::of(&m),
            Err(e) => return self.failed(e),
        };
        let trusted =
            self.text.is_some() && self.stamp == Some(stamp) && stamp.settled(SystemTime::now());
        if trusted && !force {
            return Poll::Unchanged;
        }
        stats.reads.fetch_add(1, Ordering::Relaxed);
        match tokio::fs::read_to_string(path).await {
            Ok(text) => {
                self.stamp = Some(stamp);
                if self.text.as_deref() == Some(text.as_str()) {
                    Poll::Same
                } else {
                    self.text = Some(text);
                    Poll::Changed(self.text.as_deref().unwrap_or_default())
                }
            }
            Err(e) => self.failed(e),
        }
    }

    fn failed(&mut self, e: std::io::Error) -> Poll<'_> {
        self.stamp = None;
        if self.text.take().is_some() {
            Poll::Failed(e)
        } else {
            // Reported when the last good read turned bad; until the next good read, quiet.
            Poll::Unchanged
        }
    }

    /// The text of the last read (empty after a failed one).
    fn text(&self) -> &String {
        static EMPTY: String = String::new();
        self.text.as_ref().unwrap_or(&EMPTY)
    }
}

/// The `stat` fields that move when a file is written or replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(m: &std::fs::Metadata) -> Self {
        Self {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }

    /// Whether the last change is at least [`RACY`] before `now`: a later write would move
    /// mtime or ctime past it.
    fn settled(&self, now: SystemTime) -> bool {
        let changed = self.mtime.max(self.ctime);
        let Ok(since_epoch) = now.duration_since(SystemTime::UNIX_EPOCH) else {
            return false;
        };
        let now_s = i64::try_from(since_epoch.as_secs()).unwrap_or(i64::MAX);
        let racy_s = i64::try_from(RACY.as_secs()).unwrap_or(i64::MAX);
        // Whole seconds, rounded against trusting: changed + RACY + 1 s <= now.
        changed.0.saturating_add(racy_s).saturating_add(1) <= now_s
    }
}

/// Sleeps `interval`, or less when the CNI reports change first (then returns true).
async fn wait(interval: Duration, cni: Option<&mut CniReports>) -> bool {
    let Some(c) = cni else {
        tokio::time::sleep(interval).await;
        return false;
    };
    tokio::select! {
        () = tokio::time::sleep(interval) => false,
        r = c.pods.changed() => {
            if r.is_err() {
                // The pod map is gone (shutdown): keep its last entries, poll the file only.
                tokio::time::sleep(interval).await;
            }
            r.is_ok()
        }
    }
}

#[cfg(test)]
mod tests;
