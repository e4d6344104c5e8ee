//! Per-client rate limits and quotas, in plain Rust. A leaf of the crate:
//! it imports nothing from the rest of the policy.
//!
//! ```text
//!  compile ──▶ Limit (Rate | Quota, the digest of its definition)
//!  request ──Policy::decide (crate::throttle: which limits apply)──▶ admit(limits, now, SharedCounters)
//!      per limit: read ─▶ Rate::step (GCRA) | Quota::step (UTC day) ─▶ write (compare-and-swap, retried)
//!      a refusal after an earlier limit was taken gives that one back (refund)
//! ```
//!
//! - A **rate** is a GCRA (generic cell rate algorithm): one number per
//!   bucket, its theoretical arrival time (TAT). `requests` per `window`
//!   means one request every `window / requests` (the emission interval
//!   `T`); `burst` lets that many more through at once after a quiet spell
//!   (tolerance `burst × T`). Time is counted in ticks of `1 / requests`
//!   milliseconds, so `T` is exactly `window` milliseconds' worth of ticks:
//!   no rounding, ever. Over any half-open interval of length `window`, at
//!   most `requests + burst` are admitted; over any interval of length
//!   `d`, at most `1 + burst + floor(d / T)`.
//! - A **quota** counts requests per UTC day (`[00:00:00, 24:00:00)` UTC):
//!   one `(day, count)` pair per bucket; the first request of a new day
//!   starts the count again.
//!
//! A refused request takes nothing from any bucket, so a client that keeps
//! knocking does not push its own limit further out. Each bucket lives in
//! storage every worker of a host shares ([`SharedCounters`]: Envoy's
//! shared data in the filter, [`MemoryCounters`] here), under a key made of
//! the digest of the limit's definition and the client (and route): a new
//! configuration with the same limit finds the same bucket, a changed limit
//! starts a fresh one. Nothing here logs, and nothing here holds a secret.

use sha2::{Digest as _, Sha256};

/// The largest `requests` a rate or a quota may have: ticks of
/// `1 / requests` ms stay within a `u64` until the year 2500.
pub const MAX_REQUESTS: u32 = 1_000_000;

/// The largest `burst`.
pub const MAX_BURST: u32 = 1_000_000;

/// How many times one bucket is read and written before giving up on
/// storage that keeps changing under it (the request is then refused, with
/// a retry after one second: fail closed).
pub const WRITE_ATTEMPTS: usize = 16;

const DAY_MS: u64 = 86_400_000;

/// A rate's window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Window {
    Second,
    Minute,
    Hour,
}

impl Window {
    /// The window's length in milliseconds.
    pub fn millis(self) -> u64 {
        match self {
            Window::Second => 1_000,
            Window::Minute => 60_000,
            Window::Hour => 3_600_000,
        }
    }

    /// Its name in the configuration.
    pub fn name(self) -> &'static str {
        match self {
            Window::Second => "second",
            Window::Minute => "minute",
            Window::Hour => "hour",
        }
    }
}

/// What a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `requests` per `window`, evenly spaced, plus `burst` at once.
    Rate { requests: u32, window: Window, burst: u32 },
    /// `requests` per UTC day.
    Quota { requests: u32 },
}

/// Where a limit counts: the client's requests on every route, or on one
/// route (a route's default, or the client's own for that route).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    Client,
    Route,
}

/// One compiled limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limit {
    pub kind: Kind,
    pub scope: Scope,
    /// The first 12 hex digits of the SHA-256 of the definition (kind,
    /// numbers, window): part of every bucket key, so an unchanged limit
    /// keeps its buckets across configurations and a changed one starts
    /// fresh.
    pub definition: String,
}

impl Limit {
    /// A limit of `kind` counted on `scope`.
    pub fn new(kind: Kind, scope: Scope) -> Self {
        let text = match kind {
            Kind::Rate { requests, window, burst } => format!("rate {requests} {} {burst}", window.millis()),
            Kind::Quota { requests } => format!("quota {requests} utc-day"),
        };
        let definition = Sha256::digest(text.as_bytes()).iter().take(6).map(|b| format!("{b:02x}")).collect();
        Self { kind, scope, definition }
    }

    /// The shared key of `client`'s bucket (on `route` for a route-scoped
    /// limit). Client ids have no spaces and route names none either, so
    /// the key reads back one way only.
    pub fn key(&self, client: &str, route: &str) -> String {
        match self.scope {
            Scope::Client => format!("keyswap.limit {} {client}", self.definition),
            Scope::Route => format!("keyswap.limit {} {client} {route}", self.definition),
        }
    }

    /// The name in the `RateLimit-Policy` and `RateLimit` fields and in
    /// the audit line: `client-rate`, `route-quota`, ….
    pub fn name(&self) -> &'static str {
        match (self.scope, self.kind) {
            (Scope::Client, Kind::Rate { .. }) => "client-rate",
            (Scope::Client, Kind::Quota { .. }) => "client-quota",
            (Scope::Route, Kind::Rate { .. }) => "route-rate",
            (Scope::Route, Kind::Quota { .. }) => "route-quota",
        }
    }

    /// True for a quota (refused `quota_exceeded`), false for a rate
    /// (`rate_limited`).
    pub fn is_quota(&self) -> bool {
        matches!(self.kind, Kind::Quota { .. })
    }

    /// `q` and `w` of the `RateLimit-Policy` item: the requests and the
    /// window in seconds (a rate's `burst` is not in it).
    pub fn policy_numbers(&self) -> (u32, u64) {
        match self.kind {
            Kind::Rate { requests, window, .. } => (requests, window.millis() / 1000),
            Kind::Quota { requests } => (requests, DAY_MS / 1000),
        }
    }

    /// What a bucket holds after one more admitted request at `now_ms`, or
    /// how many milliseconds until one would be admitted.
    pub fn step(&self, stored: Counter, now_ms: i64) -> Result<Counter, u64> {
        let now_ms = u64::try_from(now_ms).unwrap_or(0);
        match self.kind {
            Kind::Rate { requests, window, burst } => gcra(stored, now_ms, requests, window.millis(), burst),
            Kind::Quota { requests } => {
                let day = now_ms / DAY_MS;
                let count = if stored.epoch == day { stored.value } else { 0 };
                if count >= u64::from(requests) {
                    Err((day + 1) * DAY_MS - now_ms)
                } else {
                    Ok(Counter { epoch: day, value: count + 1 })
                }
            }
        }
    }

    /// `stored` with one admitted request given back (a later limit refused
    /// the request): the inverse of [`Self::step`].
    fn refund(&self, stored: Counter, now_ms: i64) -> Counter {
        match self.kind {
            Kind::Rate { window, .. } => Counter { epoch: 0, value: stored.value.saturating_sub(window.millis()) },
            Kind::Quota { .. } => {
                let day = u64::try_from(now_ms).unwrap_or(0) / DAY_MS;
                if stored.epoch == day {
                    Counter { epoch: day, value: stored.value.saturating_sub(1) }
                } else {
                    stored
                }
            }
        }
    }
}

/// `route-rate 10/minute burst 2`, `client-quota 5000/day`: the name and
/// the definition, for log lines.
impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            Kind::Rate { requests, window, burst } => {
                write!(f, "{} {requests}/{} burst {burst}", self.name(), window.name())
            }
            Kind::Quota { requests } => write!(f, "{} {requests}/day", self.name()),
        }
    }
}

/// The GCRA over ticks of `1 / requests` ms: the emission interval is
/// `window_ms` ticks, the tolerance `burst` intervals. Admitted when the
/// theoretical arrival time is at most the tolerance ahead of now; the new
/// one is then one interval after the later of the two.
fn gcra(stored: Counter, now_ms: u64, requests: u32, window_ms: u64, burst: u32) -> Result<Counter, u64> {
    let per_ms = u128::from(requests.max(1));
    let now = u128::from(now_ms) * per_ms;
    let interval = u128::from(window_ms);
    let tolerance = interval * u128::from(burst);
    let tat = u128::from(stored.value).max(now);
    if tat - now > tolerance {
        // Ticks until `tat - tolerance`, rounded up to whole milliseconds.
        let wait = tat - now - tolerance;
        return Err(u64::try_from(wait.div_ceil(per_ms)).unwrap_or(u64::MAX));
    }
    Ok(Counter { epoch: 0, value: u64::try_from(tat + interval).unwrap_or(u64::MAX) })
}

/// One bucket's state: for a rate the theoretical arrival time in ticks
/// (`value`); for a quota the UTC day (`epoch`, days since 1970-01-01) and
/// the requests admitted in it (`value`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counter {
    pub epoch: u64,
    pub value: u64,
}

impl Counter {
    /// 16 bytes, little-endian.
    pub fn encode(self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[..8].copy_from_slice(&self.epoch.to_le_bytes());
        out[8..].copy_from_slice(&self.value.to_le_bytes());
        out
    }

    /// What [`Self::encode`] wrote; anything else reads as a fresh bucket.
    pub fn decode(bytes: &[u8]) -> Self {
        let (Some(epoch), Some(value)) = (bytes.get(..8), bytes.get(8..)) else { return Self::default() };
        match (<[u8; 8]>::try_from(epoch), <[u8; 8]>::try_from(value)) {
            (Ok(epoch), Ok(value)) => Self { epoch: u64::from_le_bytes(epoch), value: u64::from_le_bytes(value) },
            _ => Self::default(),
        }
    }
}

/// The buckets as a host keeps them: shared by every worker, each written
/// with compare-and-swap. The proxy-wasm filter keeps them in Envoy's
/// shared data; [`MemoryCounters`] keeps them in memory.
pub trait SharedCounters {
    /// The bucket under `key` and the version it was read at (for
    /// [`Self::write`]); `None` when none is stored yet.
    fn read(&self, key: &str) -> Option<(Counter, Option<u32>)>;

    /// Stores `counter` under `key` if the stored version is still
    /// `version` (`None`: whatever is stored, or nothing). False when
    /// another writer came first, or it could not be stored.
    fn write(&mut self, key: &str, counter: Counter, version: Option<u32>) -> bool;

    /// True when the request was taken from its buckets already ([`Taken`]):
    /// its limits then admit it without reading anything.
    fn taken(&self) -> bool {
        false
    }
}

/// The counters of a request its limits took when it was first decided: a
/// request held for a client's first per-client credential (a
/// [`crate::Decision::Wait`]) is decided again once the credential arrives,
/// and is not counted a second time.
#[derive(Debug, Clone, Copy, Default)]
pub struct Taken;

impl SharedCounters for Taken {
    fn read(&self, _key: &str) -> Option<(Counter, Option<u32>)> {
        None
    }

    fn write(&mut self, _key: &str, _counter: Counter, _version: Option<u32>) -> bool {
        false
    }

    fn taken(&self) -> bool {
        true
    }
}

/// No storage: for a host that keeps no counters. Nothing can be counted,
/// so a request a limit applies to is refused (fail closed).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoCounters;

impl SharedCounters for NoCounters {
    fn read(&self, _key: &str) -> Option<(Counter, Option<u32>)> {
        None
    }

    fn write(&mut self, _key: &str, _counter: Counter, _version: Option<u32>) -> bool {
        false
    }
}

/// Buckets in memory, versioned the way Envoy's shared data is: for a host
/// with one worker (the native conformance runner) and for tests.
#[derive(Debug, Clone, Default)]
pub struct MemoryCounters {
    buckets: std::collections::HashMap<String, (Counter, u32)>,
    version: u32,
}

impl MemoryCounters {
    /// How many buckets are stored.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// True when none is.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

impl SharedCounters for MemoryCounters {
    fn read(&self, key: &str) -> Option<(Counter, Option<u32>)> {
        self.buckets.get(key).map(|(counter, version)| (*counter, Some(*version)))
    }

    fn write(&mut self, key: &str, counter: Counter, version: Option<u32>) -> bool {
        let stored = self.buckets.get(key).map(|(_, v)| *v);
        if version.is_some() && version != stored {
            return false;
        }
        // One sequence for every key, as Envoy's: a version is never reused.
        self.version = self.version.wrapping_add(1).max(1);
        self.buckets.insert(key.to_string(), (counter, self.version));
        true
    }
}

/// Why a request was refused: the limit, and how long until it would admit
/// one more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal<'l> {
    pub limit: &'l Limit,
    pub retry_after_ms: u64,
}

impl Refusal<'_> {
    /// `retry-after` and the `t` of the `RateLimit` field: whole seconds,
    /// rounded up, at least one.
    pub fn retry_after_seconds(&self) -> u64 {
        self.retry_after_ms.div_ceil(1000).max(1)
    }
}

/// Takes one request from every bucket in `buckets` (each a limit and its
/// key) at `now_ms`, or none: on the first refusal the buckets already
/// taken from are given back, and the refusal is returned.
///
/// # Errors
/// The limit that refuses with the longest wait, and that wait: the first
/// to refuse, unless a later bucket (read, not written) would refuse for
/// longer, so a client told to retry after `retry-after` does not meet
/// the next limit then; a bucket that could not be written in
/// [`WRITE_ATTEMPTS`] tries refuses with one second.
pub fn admit<'l>(
    buckets: &[(&'l Limit, String)],
    now_ms: i64,
    counters: &mut dyn SharedCounters,
) -> Result<(), Refusal<'l>> {
    for (i, (limit, key)) in buckets.iter().enumerate() {
        if let Err(refusal) = take(limit, key, now_ms, counters) {
            for (limit, key) in &buckets[..i] {
                give_back(limit, key, now_ms, counters);
            }
            let later = buckets[i + 1..].iter().filter_map(|(limit, key)| {
                let (stored, _) = counters.read(key).unwrap_or_default();
                limit.step(stored, now_ms).err().map(|retry_after_ms| Refusal { limit, retry_after_ms })
            });
            return Err(later.fold(refusal, |a, b| if b.retry_after_ms > a.retry_after_ms { b } else { a }));
        }
    }
    Ok(())
}

fn take<'l>(limit: &'l Limit, key: &str, now_ms: i64, counters: &mut dyn SharedCounters) -> Result<(), Refusal<'l>> {
    for _ in 0..WRITE_ATTEMPTS {
        let (stored, version) = counters.read(key).unwrap_or_default();
        match limit.step(stored, now_ms) {
            Ok(next) => {
                if counters.write(key, next, version) {
                    return Ok(());
                }
            }
            Err(retry_after_ms) => return Err(Refusal { limit, retry_after_ms }),
        }
    }
    Err(Refusal { limit, retry_after_ms: 1000 })
}

fn give_back(limit: &Limit, key: &str, now_ms: i64, counters: &mut dyn SharedCounters) {
    for _ in 0..WRITE_ATTEMPTS {
        let Some((stored, version)) = counters.read(key) else { return };
        if counters.write(key, limit.refund(stored, now_ms), version) {
            return;
        }
    }
}

/// A client's limits: on every route, and its own for some routes (by
/// route index, sorted; each replaces that route's default whole).
/// Nothing is allocated for a client without any.
#[derive(Debug, Default)]
pub struct ClientLimits {
    pub all: Box<[Limit]>,
    pub by_route: Box<[(usize, Box<[Limit]>)]>,
}

impl ClientLimits {
    /// True when the client has neither.
    pub fn is_empty(&self) -> bool {
        self.all.is_empty() && self.by_route.is_empty()
    }

    /// The client's own limits for route `r`, if it has some (possibly
    /// none: an empty list exempts it from the route's default).
    pub fn for_route(&self, r: usize) -> Option<&[Limit]> {
        if self.by_route.is_empty() {
            return None;
        }
        self.by_route.binary_search_by_key(&r, |(route, _)| *route).ok().map(|i| &*self.by_route[i].1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_800_000_000_000;

    fn rate(requests: u32, window: Window, burst: u32) -> Limit {
        Limit::new(Kind::Rate { requests, window, burst }, Scope::Client)
    }

    /// Runs `arrivals` (ms, sorted) through one limit; the admitted times.
    fn run(limit: &Limit, arrivals: &[i64]) -> Vec<i64> {
        let mut counters = MemoryCounters::default();
        let key = limit.key("c", "r");
        arrivals.iter().copied().filter(|&at| admit(&[(limit, key.clone())], at, &mut counters).is_ok()).collect()
    }

    /// A small deterministic generator (xorshift64*), so the property
    /// tests need no crate and fail the same way every time.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n.max(1)
        }
    }

    /// Over any arrival sequence, any half-open window of the limit's
    /// length admits at most `requests + burst`, and any closed interval of
    /// length `d` at most `1 + burst + floor(d / T)`.
    #[test]
    fn no_window_admits_more_than_requests_plus_burst() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for round in 0..300 {
            let requests = 1 + rng.below(12) as u32;
            let burst = rng.below(4) as u32;
            let window = [Window::Second, Window::Minute][rng.below(2) as usize];
            let limit = rate(requests, window, burst);
            let w = window.millis() as i64;
            // Arrivals at mixed densities: bursts, quiet spells, repeats.
            let mut at = T0 + rng.below(10_000) as i64;
            let mut arrivals = Vec::new();
            for _ in 0..400 {
                at += match rng.below(4) {
                    0 => 0,
                    1 => rng.below(5) as i64,
                    2 => rng.below((w / i64::from(requests)).max(1) as u64 * 2) as i64,
                    _ => rng.below(w as u64 * 2) as i64,
                };
                arrivals.push(at);
            }
            let admitted = run(&limit, &arrivals);
            assert!(!admitted.is_empty(), "round {round}: the first request is always admitted");
            let max = i64::from(requests + burst);
            for (i, start) in admitted.iter().enumerate() {
                let inside = admitted[i..].iter().take_while(|&&t| t < start + w).count() as i64;
                assert!(inside <= max, "round {round}: {inside} admitted in [{start}, +{w}) > {max} ({limit:?})");
                // Closed intervals [start, start + d] for d = k·T exactly.
                for k in 0..3i64 {
                    let d_ticks = k * w; // k intervals, in ticks of 1/requests ms
                    let end_ticks = start * i64::from(requests) + d_ticks;
                    let inside =
                        admitted[i..].iter().take_while(|&&t| t * i64::from(requests) <= end_ticks).count() as i64;
                    assert!(inside <= 1 + i64::from(burst) + k, "round {round}: {inside} in a closed {k}·T");
                }
            }
        }
    }

    /// Under demand that never lets up, nothing is lost: arrivals every
    /// millisecond get exactly one admission per emission interval after
    /// the burst, at the instant it is due.
    #[test]
    fn steady_demand_is_admitted_exactly_at_the_rate() {
        for (requests, window, burst) in [(10, Window::Second, 0), (3, Window::Second, 2), (60, Window::Minute, 5)] {
            let limit = rate(requests, window, burst);
            let w = window.millis() as i64;
            // 1 + burst at the start, then one every millisecond.
            let start = std::iter::repeat_n(T0, burst as usize);
            let arrivals: Vec<i64> = start.chain((0..10 * w).map(|ms| T0 + ms)).collect();
            let admitted = run(&limit, &arrivals);
            // 1 + burst at once, then one every T (T = w / requests ms,
            // possibly fractional: the schedule never drifts).
            assert_eq!(admitted[..=burst as usize], vec![T0; 1 + burst as usize][..]);
            let expected: Vec<i64> = (1..)
                .map(|n: i64| T0 + (n * w + i64::from(requests) - 1) / i64::from(requests))
                .take_while(|&t| t < T0 + 10 * w)
                .collect();
            assert_eq!(&admitted[1 + burst as usize..], &expected[..], "{requests}/{window:?} burst {burst}");
            // So every aligned window after the first admits exactly `requests`.
            for k in 1..10 {
                let n = admitted.iter().filter(|&&t| t >= T0 + k * w && t < T0 + (k + 1) * w).count();
                assert_eq!(n, requests as usize, "window {k}");
            }
        }
    }

    #[test]
    fn a_refusal_says_when_the_next_request_is_admitted() {
        let limit = rate(2, Window::Second, 0);
        let mut counters = MemoryCounters::default();
        let key = limit.key("c", "r");
        let buckets = [(&limit, key)];
        assert!(admit(&buckets, T0, &mut counters).is_ok());
        let refusal = admit(&buckets, T0 + 100, &mut counters).unwrap_err();
        assert_eq!(refusal.retry_after_ms, 400);
        assert_eq!(refusal.retry_after_seconds(), 1);
        // Knocking while refused does not move the limit.
        for at in 100..500 {
            assert!(admit(&buckets, T0 + at, &mut counters).is_err());
        }
        assert!(admit(&buckets, T0 + 500, &mut counters).is_ok());
    }

    #[test]
    fn a_quota_counts_per_utc_day_and_rolls_over_at_midnight() {
        let limit = Limit::new(Kind::Quota { requests: 3 }, Scope::Route);
        let mut counters = MemoryCounters::default();
        let buckets = [(&limit, limit.key("c", "r"))];
        let midnight = (T0 / 86_400_000 + 1) * 86_400_000;
        let before = midnight - 2_000;
        for _ in 0..3 {
            assert!(admit(&buckets, before, &mut counters).is_ok());
        }
        let refusal = admit(&buckets, before + 500, &mut counters).unwrap_err();
        assert_eq!((refusal.retry_after_ms, refusal.retry_after_seconds()), (1_500, 2));
        assert!(admit(&buckets, midnight - 1, &mut counters).is_err());
        for _ in 0..3 {
            assert!(admit(&buckets, midnight, &mut counters).is_ok());
        }
        assert!(admit(&buckets, midnight + 86_399_999, &mut counters).is_err());
        assert!(admit(&buckets, midnight + 86_400_000, &mut counters).is_ok());
    }

    #[test]
    fn a_refusal_gives_back_what_earlier_limits_took() {
        let wide = rate(5, Window::Second, 0);
        let quota = Limit::new(Kind::Quota { requests: 1 }, Scope::Route);
        let mut counters = MemoryCounters::default();
        let buckets = [(&wide, wide.key("c", "r")), (&quota, quota.key("c", "r"))];
        assert!(admit(&buckets, T0, &mut counters).is_ok());
        let before = counters.read(&buckets[0].1);
        let refusal = admit(&buckets, T0 + 200, &mut counters).unwrap_err();
        assert_eq!(refusal.limit, &quota);
        let after = counters.read(&buckets[0].1).map(|(c, _)| c);
        assert_eq!(after, before.map(|(c, _)| c), "the rate's bucket is as before the refused request");
    }

    #[test]
    fn two_refusing_limits_answer_the_longer_wait() {
        let rate_limit = rate(1, Window::Minute, 0);
        let quota = Limit::new(Kind::Quota { requests: 1 }, Scope::Client);
        let mut counters = MemoryCounters::default();
        let buckets = [(&rate_limit, rate_limit.key("c", "r")), (&quota, quota.key("c", "r"))];
        assert!(admit(&buckets, T0, &mut counters).is_ok());
        // Both spent: the rate would admit in a minute, the quota tomorrow.
        let refusal = admit(&buckets, T0 + 1_000, &mut counters).unwrap_err();
        assert_eq!(refusal.limit, &quota, "the quota's wait is the longer");
        assert!(refusal.retry_after_ms > 60_000, "{} ms", refusal.retry_after_ms);
        // Only the rate spent (a fresh quota): the rate's own wait.
        let mut fresh = MemoryCounters::default();
        let wide = Limit::new(Kind::Quota { requests: 100 }, Scope::Client);
        let buckets = [(&rate_limit, rate_limit.key("c", "r")), (&wide, wide.key("c", "r"))];
        assert!(admit(&buckets, T0, &mut fresh).is_ok());
        let refusal = admit(&buckets, T0 + 1_000, &mut fresh).unwrap_err();
        assert_eq!((refusal.limit, refusal.retry_after_ms), (&rate_limit, 59_000));
    }

    #[test]
    fn keys_follow_the_definition_and_the_scope() {
        let a = rate(10, Window::Minute, 0);
        assert_eq!(a.key("team-a", "openai"), rate(10, Window::Minute, 0).key("team-a", "openai"));
        assert_ne!(a.key("team-a", "x"), a.key("team-b", "x"), "two clients never share a bucket");
        assert_ne!(a.key("c", "x"), rate(10, Window::Minute, 1).key("c", "x"));
        assert_ne!(a.key("c", "x"), rate(11, Window::Minute, 0).key("c", "x"));
        assert_ne!(a.key("c", "x"), rate(10, Window::Hour, 0).key("c", "x"));
        assert_eq!(a.key("c", "x"), a.key("c", "y"), "a client-wide bucket is one for every route");
        let per_route = Limit::new(a.kind, Scope::Route);
        assert_ne!(per_route.key("c", "x"), per_route.key("c", "y"));
        assert_ne!(per_route.key("c", "x"), a.key("c", "x"));
    }

    #[test]
    fn storage_that_keeps_failing_refuses() {
        let limit = rate(10, Window::Second, 0);
        let refusal = admit(&[(&limit, limit.key("c", "r"))], T0, &mut NoCounters).unwrap_err();
        assert_eq!(refusal.retry_after_seconds(), 1);
    }

    #[test]
    fn counters_round_trip_and_garbage_reads_as_fresh() {
        let c = Counter { epoch: 20_833, value: u64::MAX - 3 };
        assert_eq!(Counter::decode(&c.encode()), c);
        for bad in [&b""[..], b"short", &[7u8; 17]] {
            assert_eq!(Counter::decode(bad), Counter::default());
        }
    }
}
