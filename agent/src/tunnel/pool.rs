//! HBONE connection pool: many CONNECT streams share one mTLS connection per (source pod, peer, identities).
//!
//! Invariants:
//! - A key names the data-plane shard, the source pod (its netns cookie: the TCP source address is the pod's), the
//!   source identity (the certificate presented), the peer address and the identity the peer
//!   must prove. Connections are never shared across keys.
//! - A connection carries at most `max_streams` streams at once; past that another one opens.
//! - Concurrent streams of a key are spread: a new stream takes the least-loaded connection,
//!   and another connection is dialed while every one already carries a stream and the key has
//!   fewer than `spread` connections (open or being dialed), so that parallel bulk streams run on
//!   several connection tasks (cores). Past `spread`, streams share up to `max_streams`.
//! - A connection idle (no stream) for `idle_timeout`, or closed by the peer, is dropped by
//!   `reap`; the lock is never held across an await.
//! - A connection whose certificates (the peer's or ours) have expired carries no new stream:
//!   checkout evicts it (its open streams go on) and a fresh connection is dialed.
//! - A connection out of send window (a new stream there waited
//!   [`super::flow::STARVED_AFTER`] for its first bytes while nothing moved: a peer whose
//!   connection window stalled streams used up) is taken last: while every connection with
//!   room is out of window, another one is dialed, up to `STARVED_EXTRA` past `spread`.
//! - At most `MAX_DIALS_PER_KEY` connections are dialed at once for a key; other new streams
//!   wait for them and share them.
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use super::client::Tunnel;
use super::headers::ConnectHeaders;
use super::stream::H2Stream;
use super::Error;
use crate::identity::SpiffeId;

/// Streams per connection before another connection opens (as ztunnel); also the most a
/// connection carries (the client's connection window is sized for that many, see
/// [`super::flow::connection_window`]).
pub const DEFAULT_MAX_STREAMS: usize = 100;
/// Connections a key may dial past its spread while every one it has is out of send window.
pub const STARVED_EXTRA: usize = 4;
/// How long an unused connection is kept.
pub const DEFAULT_IDLE: Duration = Duration::from_secs(300);
/// Connections being dialed at once for one key. A burst of new streams waits for these
/// (and then shares them) instead of each dialing its own: a handshake storm that the peer's
/// per-source handshake cap would refuse.
pub const MAX_DIALS_PER_KEY: usize = 4;

/// Connections a key spreads its concurrent streams over before sharing them: the CPUs
/// available (one h2 connection task, so one core, encrypts all of a connection's bytes).
pub fn default_spread() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// What a pooled connection is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// The data-plane shard the streams run on: a shard's streams use connections whose h2
    /// task runs on the same thread (see `proxy::shards`).
    pub shard: usize,
    /// Netns cookie of the source pod.
    pub src_netns: u64,
    /// Identity presented by the source.
    pub src_id: SpiffeId,
    /// The peer's tunnel address (`pod_ip:15008`).
    pub peer: SocketAddr,
    /// Identity the peer must prove.
    pub dst_id: SpiffeId,
}

struct Entry {
    tunnel: Tunnel,
    active: Arc<AtomicUsize>,
    last_used: Arc<Mutex<Instant>>,
}

/// The pool.
pub struct Pool {
    conns: Mutex<HashMap<PoolKey, Vec<Entry>>>,
    dials: Mutex<HashMap<PoolKey, Arc<tokio::sync::Semaphore>>>,
    max_streams: usize,
    spread: usize,
    idle_timeout: Duration,
}

/// Keeps a stream counted against its connection until dropped.
pub struct StreamGuard {
    active: Arc<AtomicUsize>,
    last_used: Arc<Mutex<Instant>>,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.active.fetch_sub(1, Ordering::Relaxed);
        *lock(&self.last_used) = Instant::now();
    }
}

/// Pool counters for status.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct PoolStats {
    /// Open connections.
    pub connections: usize,
    /// Streams in use.
    pub streams: usize,
}

impl Pool {
    /// An empty pool spreading a key's concurrent streams over [`default_spread`] connections.
    pub fn new(max_streams: usize, idle_timeout: Duration) -> Self {
        Self {
            conns: Mutex::new(HashMap::new()),
            dials: Mutex::new(HashMap::new()),
            max_streams: max_streams.clamp(1, DEFAULT_MAX_STREAMS),
            spread: default_spread(),
            idle_timeout,
        }
    }

    /// Spreads a key's concurrent streams over up to `spread` connections (1: every stream
    /// shares the first connection with room).
    pub fn with_spread(mut self, spread: usize) -> Self {
        self.spread = spread.max(1);
        self
    }

    /// Connections being dialed for `key` (permits taken from its gate).
    fn dialing(&self, key: &PoolKey) -> usize {
        lock(&self.dials).get(key).map_or(0, |g| in_flight(g))
    }

    /// Opens a CONNECT stream to `authority` over a pooled connection for `key`, dialing a new
    /// connection with `dial` when none has room.
    pub async fn stream<D, Fut>(
        &self,
        key: &PoolKey,
        authority: SocketAddr,
        dial: D,
    ) -> Result<(H2Stream, StreamGuard), Error>
    where
        D: FnOnce() -> Fut,
        Fut: Future<Output = Result<Tunnel, Error>>,
    {
        self.stream_with(key, authority, &ConnectHeaders::default(), dial)
            .await
    }

    /// [`Pool::stream`], the CONNECT carrying `headers`.
    pub async fn stream_with<D, Fut>(
        &self,
        key: &PoolKey,
        authority: SocketAddr,
        headers: &ConnectHeaders,
        dial: D,
    ) -> Result<(H2Stream, StreamGuard), Error>
    where
        D: FnOnce() -> Fut,
        Fut: Future<Output = Result<Tunnel, Error>>,
    {
        if let Some(c) = self.checkout(key, || self.dialing(key)) {
            if let Some(r) = Self::on_pooled(c, key, authority, headers).await {
                return r;
            }
        }
        let gate = lock(&self.dials)
            .entry(key.clone())
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(MAX_DIALS_PER_KEY)))
            .clone();
        // Held until the new connection is in the pool, so that waiters find it there.
        let mut dialing = Some(gate.clone().acquire_owned().await);
        // A connection dialed while we waited may have room for us (the permit is not held
        // across its CONNECT round trip). Other dials in flight count towards the spread.
        if let Some(c) = self.checkout(key, || in_flight(&gate) - 1) {
            dialing = None;
            if let Some(r) = Self::on_pooled(c, key, authority, headers).await {
                return r;
            }
        }
        let tunnel = dial().await?;
        let active = Arc::new(AtomicUsize::new(1));
        let last_used = Arc::new(Mutex::new(Instant::now()));
        let guard = StreamGuard {
            active: active.clone(),
            last_used: last_used.clone(),
        };
        lock(&self.conns)
            .entry(key.clone())
            .or_default()
            .push(Entry {
                tunnel: tunnel.clone(),
                active,
                last_used,
            });
        drop(dialing);
        let mut tunnel = tunnel;
        let stream = tunnel.connect_with(authority, headers).await?;
        Ok((stream, guard))
    }

    /// A stream on the checked-out pooled connection `c` (`None`: it is broken, dial).
    async fn on_pooled(
        c: (Tunnel, StreamGuard),
        key: &PoolKey,
        authority: SocketAddr,
        headers: &ConnectHeaders,
    ) -> Option<Result<(H2Stream, StreamGuard), Error>> {
        let (mut tunnel, guard) = c;
        match tunnel.connect_with(authority, headers).await {
            Ok(s) => Some(Ok((s, guard))),
            // The peer refused the stream because a certificate of the connection expired (by
            // its clock, which ours may lag): dial with fresh certificates.
            Err(Error::Status { status, .. })
                if status == http::StatusCode::SERVICE_UNAVAILABLE
                    && tunnel.is_expired(SystemTime::now()) =>
            {
                None
            }
            // A CONNECT refused by the peer is an answer, not a broken connection.
            Err(e @ Error::Status { .. }) => Some(Err(e)),
            Err(e) => {
                tracing::debug!(peer.addr = %key.peer, error = %e, "pooled connection failed; dialing a new one");
                None
            }
        }
    }

    /// The least-loaded usable connection of `key` with room, counted for one more stream,
    /// preferring those with send window; `None` (dial) when there is none, when every one
    /// carries a stream and the key has fewer than `spread` connections counting the
    /// `dialing` ones, or when every one is out of window and the key has fewer than `spread +
    /// STARVED_EXTRA`.
    fn checkout(
        &self,
        key: &PoolKey,
        dialing: impl FnOnce() -> usize,
    ) -> Option<(Tunnel, StreamGuard)> {
        let mut conns = lock(&self.conns);
        let entries = conns.get_mut(key)?;
        let now = SystemTime::now();
        entries.retain_mut(|e| {
            let expired = e.tunnel.is_expired(now);
            if expired {
                tracing::debug!(peer.addr = %key.peer, "pooled connection's certificates expired; evicted");
            }
            !expired && e.tunnel.is_open()
        });
        let at = Instant::now();
        let (e, (starved, load)) = entries
            .iter()
            .map(|e| {
                (
                    e,
                    (
                        e.tunnel.flow().starved(at),
                        e.active.load(Ordering::Relaxed),
                    ),
                )
            })
            .filter(|(_, (_, n))| *n < self.max_streams)
            .min_by_key(|(_, rank)| *rank)?;
        // The dial count is looked up only when it matters (its lock stays off the common path).
        if starved {
            if entries.len() + dialing() < self.spread + STARVED_EXTRA {
                tracing::debug!(peer.addr = %key.peer, "pooled connections out of send window; dialing another");
                return None;
            }
        } else if load > 0 && entries.len() < self.spread && entries.len() + dialing() < self.spread
        {
            return None;
        }
        e.active.fetch_add(1, Ordering::Relaxed);
        Some((
            e.tunnel.clone(),
            StreamGuard {
                active: e.active.clone(),
                last_used: e.last_used.clone(),
            },
        ))
    }

    /// Drops connections that are closed, idle past the timeout or past their certificates'
    /// expiry.
    pub fn reap(&self) {
        let now = Instant::now();
        let wall = SystemTime::now();
        let mut conns = lock(&self.conns);
        for entries in conns.values_mut() {
            entries.retain_mut(|e| {
                let idle = e.active.load(Ordering::Relaxed) == 0
                    && now.duration_since(*lock(&e.last_used)) >= self.idle_timeout;
                !idle && !e.tunnel.is_expired(wall) && e.tunnel.is_open()
            });
        }
        conns.retain(|_, v| !v.is_empty());
        drop(conns);
        // Dial gates nobody waits on.
        lock(&self.dials).retain(|_, g| Arc::strong_count(g) > 1);
    }

    /// Drops every connection of a source pod (it left the node).
    pub fn forget_source(&self, src_netns: u64) {
        lock(&self.conns).retain(|k, _| k.src_netns != src_netns);
        lock(&self.dials).retain(|k, g| k.src_netns != src_netns || Arc::strong_count(g) > 1);
    }

    /// Connection and stream counts.
    pub fn stats(&self) -> PoolStats {
        let conns = lock(&self.conns);
        let connections = conns.values().map(Vec::len).sum();
        let streams = conns
            .values()
            .flatten()
            .map(|e| e.active.load(Ordering::Relaxed))
            .sum();
        PoolStats {
            connections,
            streams,
        }
    }
}

/// Dials holding a permit of `gate`.
fn in_flight(gate: &tokio::sync::Semaphore) -> usize {
    MAX_DIALS_PER_KEY - gate.available_permits()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
