//! The request headers of an HBONE CONNECT as ztunnel sends them: `baggage`, `traceparent`, `forwarded`.
//!
//! Outbound, every CONNECT carries the source workload in W3C `baggage` (cluster, namespace,
//! pod, canonical service and revision), a fresh W3C `traceparent`, and RFC 7239 `forwarded`
//! with the client's own address (and the Service host it dialled), so that a ztunnel or a
//! waypoint on the other end gets its telemetry and trace context. Inbound they are accepted
//! and only read for the access log: the source that policy and the app see is always the
//! TCP peer and the identity its certificate proves, never what a header claims.
use std::fmt;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::num::NonZeroU128;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue, FORWARDED};

/// W3C baggage.
pub const BAGGAGE: HeaderName = HeaderName::from_static("baggage");
/// W3C trace context.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// The source workload as `baggage` names it (ztunnel's keys).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Baggage {
    /// `k8s.cluster.name`.
    pub cluster: String,
    /// `k8s.namespace.name`.
    pub namespace: String,
    /// `k8s.pod.name` (ambit knows the pod, not its controller).
    pub pod: String,
    /// `service.name`: the canonical service.
    pub service: String,
    /// `service.version`: the canonical revision.
    pub version: String,
}

impl Baggage {
    /// The header value; empty fields are left out. `None` when nothing is left or a value
    /// cannot be a header (Kubernetes names and label values always can).
    pub fn value(&self) -> Option<HeaderValue> {
        let parts = [
            ("k8s.cluster.name", &self.cluster),
            ("k8s.namespace.name", &self.namespace),
            ("k8s.pod.name", &self.pod),
            ("service.name", &self.service),
            ("service.version", &self.version),
        ];
        let text = parts
            .iter()
            .filter(|(_, v)| !v.is_empty() && !v.contains([',', '=', ';']))
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        if text.is_empty() {
            return None;
        }
        HeaderValue::from_str(&text).ok()
    }

    /// Reads every `baggage` header of `headers`; unknown keys and malformed members are
    /// skipped (the header is telemetry, never a reason to refuse).
    pub fn parse(headers: &HeaderMap) -> Self {
        let mut out = Self::default();
        let members = headers
            .get_all(BAGGAGE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','));
        for member in members {
            // A member may carry properties after `;`.
            let kv = member.split(';').next().unwrap_or_default();
            let Some((k, v)) = kv.split_once('=') else {
                continue;
            };
            let v = v.trim().to_string();
            match k.trim() {
                "k8s.cluster.name" => out.cluster = v,
                "k8s.namespace.name" => out.namespace = v,
                "k8s.pod.name"
                | "k8s.deployment.name"
                | "k8s.replicaset.name"
                | "k8s.statefulset.name"
                | "k8s.daemonset.name"
                | "k8s.job.name"
                | "k8s.cronjob.name" => out.pod = v,
                "service.name" => out.service = v,
                "service.version" => out.version = v,
                _ => {}
            }
        }
        out
    }
}

/// A W3C `traceparent` (version 00).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    /// The trace.
    pub trace_id: u128,
    /// The span that sent the request.
    pub parent_id: u64,
    /// Trace flags (bit 0: sampled).
    pub flags: u8,
}

impl TraceParent {
    /// A new trace with random ids, not sampled (ambit records no spans). The ids come from
    /// a per-thread generator seeded once from the system RNG: they must be unique, not
    /// secret, and a `getrandom` call per connection cost more than the rest of the headers.
    pub fn random() -> Self {
        let (hi, lo, parent) = (ids::next(), ids::next(), ids::next());
        Self {
            // W3C: an all-zero trace-id or parent-id is invalid.
            trace_id: ((u128::from(hi) << 64) | u128::from(lo)).max(1),
            parent_id: parent.max(1),
            flags: 0,
        }
    }

    /// Parses a version-00 value; `None` for anything malformed (all-zero ids included).
    pub fn parse(v: &str) -> Option<Self> {
        let mut parts = v.trim().split('-');
        let (version, trace, parent, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        fn hex(s: &str, len: usize) -> Option<&str> {
            (s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
                .then_some(s)
        }
        if parts.next().is_some() || hex(version, 2)? != "00" {
            return None;
        }
        let tp = Self {
            trace_id: u128::from_str_radix(hex(trace, 32)?, 16).ok()?,
            parent_id: u64::from_str_radix(hex(parent, 16)?, 16).ok()?,
            flags: u8::from_str_radix(hex(flags, 2)?, 16).ok()?,
        };
        (tp.trace_id != 0 && tp.parent_id != 0).then_some(tp)
    }

    /// The trace id as the access log shows it (32 hex digits).
    pub fn trace_id(&self) -> String {
        format!("{:032x}", self.trace_id)
    }

    /// The trace id, formatted only when shown; `None` for the invalid all-zero id.
    pub fn id(&self) -> Option<TraceId> {
        NonZeroU128::new(self.trace_id).map(TraceId)
    }
}

/// A W3C trace id (never zero), shown and serialized as 32 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TraceId(pub NonZeroU128);

impl TraceId {
    /// The 32 hex digits written into `buf`, for a log field that must stay a string.
    pub fn hex<'a>(&self, buf: &'a mut [u8; 32]) -> &'a str {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let v = self.0.get();
        for (i, b) in buf.iter_mut().enumerate() {
            *b = DIGITS[((v >> (124 - 4 * i)) & 0xf) as usize];
        }
        std::str::from_utf8(buf).unwrap_or("-")
    }
}

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl serde::Serialize for TraceId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id, self.parent_id, self.flags
        )
    }
}

impl fmt::Debug for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The headers one outbound CONNECT carries besides `:authority`.
#[derive(Debug, Clone, Default)]
pub struct ConnectHeaders {
    /// The source workload (`None`: not sent).
    pub baggage: Option<HeaderValue>,
    /// The trace (`None`: not sent).
    pub traceparent: Option<TraceParent>,
    /// The client's own address and the Service host it dialled (`None`: not sent).
    pub forwarded: Option<HeaderValue>,
}

impl ConnectHeaders {
    /// ztunnel's set: `baggage` of `source`, a new trace, `forwarded` for `client` (and
    /// `host=` the Service it dialled, when it dialled one).
    pub fn new(source: &Baggage, client: SocketAddr, service: Option<&str>) -> Self {
        Self::with_baggage(source.value(), client, service)
    }

    /// [`ConnectHeaders::new`] with the `baggage` value already made (once per pod).
    pub fn with_baggage(
        baggage: Option<HeaderValue>,
        client: SocketAddr,
        service: Option<&str>,
    ) -> Self {
        Self {
            baggage,
            traceparent: Some(TraceParent::random()),
            forwarded: forwarded(client, service),
        }
    }

    /// Adds the headers to a request's `headers`.
    pub fn apply(&self, headers: &mut HeaderMap) {
        if let Some(b) = &self.baggage {
            headers.insert(BAGGAGE, b.clone());
        }
        // Written once into a buffer of its exact length (55), which the value then owns:
        // one allocation, not a growing String and a copy.
        if let Some(v) = self.traceparent.and_then(|t| {
            let mut text = String::with_capacity(55);
            write!(text, "{t}").ok()?;
            HeaderValue::from_maybe_shared(Bytes::from(text)).ok()
        }) {
            headers.insert(TRACEPARENT, v);
        }
        if let Some(f) = &self.forwarded {
            headers.insert(FORWARDED, f.clone());
        }
    }
}

/// RFC 7239 `for="<client>"` (quoted: an IPv6 address has brackets and colons), with
/// `;host=<service>` when the client dialled a Service.
fn forwarded(client: SocketAddr, service: Option<&str>) -> Option<HeaderValue> {
    let text = match service {
        Some(host) if !host.is_empty() => format!("for=\"{client}\";host={host}"),
        _ => format!("for=\"{client}\""),
    };
    HeaderValue::from_str(&text).ok()
}

/// What an inbound CONNECT said about itself, for the access log only. Only the trace is
/// read on arrival (without allocating); `baggage` and `forwarded` stay in the request's
/// headers (moved here, not copied) and are parsed only when asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Received {
    /// The trace, when a well-formed `traceparent` came.
    pub trace: Option<TraceParent>,
    headers: HeaderMap,
}

impl Received {
    /// Takes the headers of an inbound CONNECT; a malformed `traceparent` is left out.
    pub fn new(headers: HeaderMap) -> Self {
        Self {
            trace: headers
                .get(TRACEPARENT)
                .and_then(|v| v.to_str().ok())
                .and_then(TraceParent::parse),
            headers,
        }
    }

    /// The source workload as its `baggage` claims it (not verified: never used for policy).
    pub fn baggage(&self) -> Baggage {
        Baggage::parse(&self.headers)
    }

    /// The `forwarded` header as sent (not verified: never used for policy or delivery).
    pub fn forwarded(&self) -> Option<&str> {
        self.headers.get(FORWARDED).and_then(|v| v.to_str().ok())
    }
}

/// The per-thread id generator of [`TraceParent::random`]: splitmix64 over a counter that
/// starts at a random point per thread (distinct outputs for 2^64 calls on one thread; other
/// threads and agents start elsewhere).
mod ids {
    use std::cell::Cell;
    use std::hash::{BuildHasher, Hasher};

    thread_local! {
        static STATE: Cell<u64> = Cell::new(seed());
    }

    fn seed() -> u64 {
        let mut b = [0u8; 8];
        match ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b) {
            Ok(()) => u64::from_ne_bytes(b),
            // The system RNG failing is no reason to drop connections: std's per-thread hash
            // keys (also from the OS, with their own fallbacks) still differ per thread.
            Err(_) => std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish(),
        }
    }

    /// The next id of this thread.
    pub(super) fn next() -> u64 {
        STATE.with(|s| {
            let x = s.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
            s.set(x);
            mix(x)
        })
    }

    /// splitmix64's finaliser: a bijection, so distinct counters give distinct ids.
    fn mix(mut z: u64) -> u64 {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests;
