//! HTTP/2 flow control of HBONE: windows that stalled streams cannot use up, and the client's view of a connection without send window.
//!
//! A receiver holds at most one stream window of unwritten bytes per stream: the window of a
//! chunk is given back only once the chunk is written on (`stream.rs`). The connection window
//! is sized for every stream the connection may carry, plus one, so that streams whose reader
//! stopped can never use it up: each keeps at most its stream window, the others still get
//! theirs. Both ends of an ambit tunnel size their windows this way. A peer that sizes them
//! otherwise (ztunnel: 4 MiB streams in a 16 MiB connection) can still run out of connection
//! window; the client then sees a stream that cannot send its first bytes, marks the
//! connection, and the pool puts new streams on another one ([`Flow`]).
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// HTTP/2 stream receive window: the most a peer may send on one stream before the agent has
/// written it on, so also the most one stalled stream holds in the agent. It bounds one
/// stream's throughput to a window per window round trip: 2 MiB covers 2 ms at 8 Gbit/s; on
/// the testbed 1 MiB cost 10-15 % of the one-stream figure and 4 MiB gained nothing over 2
/// (ARCHITECTURE.md, "Flow control").
pub const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
/// HTTP/2 max frame size (as ztunnel).
pub const MAX_FRAME: u32 = 1024 * 1024;
/// The largest window HTTP/2 can express (RFC 9113 §6.9.1).
pub const MAX_WINDOW: u32 = (1 << 31) - 1;
/// Streams one connection may carry at once such that their windows fit its window.
pub const MAX_STREAMS_FOR_WINDOW: u32 = MAX_WINDOW / STREAM_WINDOW - 1;

/// A new stream that waits this long for its first bytes' window, while no stream of the
/// connection got any, finds the connection out of window.
pub const STARVED_AFTER: Duration = Duration::from_millis(250);
/// Bytes below which a stream cannot have used up its own window: HTTP/2's default initial
/// stream window, which every peer we know keeps or raises.
const FRESH_BYTES: u64 = 65_535;

/// The connection receive window for a connection carrying up to `max_streams` streams at
/// once: one stream window each, plus one, so that a stream window's worth is always left for
/// a stream that is reading while all the others are stalled. `max_streams` is capped at
/// [`MAX_STREAMS_FOR_WINDOW`].
pub fn connection_window(max_streams: u32) -> u32 {
    let streams = max_streams.clamp(1, MAX_STREAMS_FOR_WINDOW);
    (streams + 1) * STREAM_WINDOW
}

/// What the client knows about a connection's send window: whether new streams wait for it.
/// Shared by the pool's entry and the connection's streams (`Arc`).
#[derive(Debug)]
pub struct Flow {
    epoch: Instant,
    /// New streams (fewer than [`FRESH_BYTES`] sent) waiting for send window now.
    waiting: AtomicUsize,
    /// Milliseconds since `epoch` of the latest of: a stream of the connection got window, a
    /// new stream started waiting for it while none was.
    since_ms: AtomicU64,
}

impl Default for Flow {
    fn default() -> Self {
        Self {
            epoch: Instant::now(),
            waiting: AtomicUsize::new(0),
            since_ms: AtomicU64::new(0),
        }
    }
}

impl Flow {
    /// Whether the connection has had no send window for a new stream for [`STARVED_AFTER`]
    /// at `now`: a new stream there would wait too.
    pub fn starved(&self, now: Instant) -> bool {
        self.waiting.load(Ordering::Relaxed) > 0
            && self
                .ms(now)
                .saturating_sub(self.since_ms.load(Ordering::Relaxed))
                >= STARVED_AFTER.as_millis() as u64
    }

    /// A stream that has sent `sent` bytes so far waits for window; returns whether it is
    /// counted (it must then call [`Flow::wait_end`]).
    pub fn wait_begin(&self, sent: u64) -> bool {
        if sent >= FRESH_BYTES {
            // It may have used up its own window: no sign about the connection's.
            return false;
        }
        if self.waiting.fetch_add(1, Ordering::Relaxed) == 0 {
            self.since_ms
                .fetch_max(self.ms(Instant::now()), Ordering::Relaxed);
        }
        true
    }

    /// A stream counted by [`Flow::wait_begin`] no longer waits (it got window or ended).
    pub fn wait_end(&self) {
        self.waiting.fetch_sub(1, Ordering::Relaxed);
    }

    /// A stream of the connection got send window: the connection has some.
    pub fn granted(&self) {
        self.since_ms
            .fetch_max(self.ms(Instant::now()), Ordering::Relaxed);
    }

    fn ms(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stalled_streams_cannot_use_up_the_connection_window() {
        for streams in [1, 100, 1000, MAX_STREAMS_FOR_WINDOW] {
            let w = u64::from(connection_window(streams));
            assert!(w <= u64::from(MAX_WINDOW), "{streams}: {w}");
            // Every stream but one stalled with a full stream window: a window is left.
            let stalled = u64::from(streams - 1) * u64::from(STREAM_WINDOW);
            assert!(w - stalled >= u64::from(STREAM_WINDOW), "{streams}");
        }
        // Past what a window can express, the window stays valid (the server caps its streams).
        assert_eq!(
            connection_window(u32::MAX),
            connection_window(MAX_STREAMS_FOR_WINDOW)
        );
    }

    #[test]
    fn a_new_stream_waiting_while_nothing_moves_marks_the_connection() {
        let f = Flow::default();
        let t0 = Instant::now();
        assert!(!f.starved(t0), "nothing waits");
        assert!(
            !f.wait_begin(FRESH_BYTES),
            "a stream that sent a window's worth may be waiting on its own window"
        );
        assert!(!f.starved(t0 + STARVED_AFTER * 4));
        assert!(f.wait_begin(10));
        assert!(!f.starved(Instant::now()), "not yet");
        assert!(
            f.starved(Instant::now() + STARVED_AFTER),
            "waited long enough"
        );
        // Another stream gets window: the connection has some.
        f.granted();
        assert!(!f.starved(Instant::now()));
        assert!(f.starved(Instant::now() + STARVED_AFTER));
        f.wait_end();
        assert!(
            !f.starved(Instant::now() + STARVED_AFTER * 4),
            "nothing waits any more"
        );
    }
}
