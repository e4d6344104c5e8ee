//! Dynamic upstream credentials: `oauth2`, `token_exchange` and `fetch`
//! values, in plain Rust. A leaf of the crate: it imports nothing from the
//! rest of the policy.
//!
//! ```text
//!  compile::providers ──▶ Provider (cluster, the call, how to read its answer)
//!  host timer ──Refresher::tick──▶ SharedRecords: lease won? ──host HTTP call──▶ Refresher::answer
//!                                         └─ Provider::parse ──▶ Record::succeeded | failed ──CAS──▶ SharedRecords
//!  request ──Policy::decide──▶ SharedRecords::read (once per provider of the route) ──▶ Forward | credential_unavailable
//!  upstream 401 ──Policy::upstream_status(Forward::used)──▶ reject: Record::rejected ──CAS──▶ SharedRecords
//!
//!  keyed (a `{client}` fetch): one record per (provider, key) — Slot::Keyed
//!  first request ──decide──▶ Decision::Wait ──admit (Index, CAS, max_keys)──▶ Refresher::demand(key, caller token)
//!      ──next tick: lease, call──▶ answer ──▶ the host decides the waiting request again
//!  later requests ──decide──▶ cached value; Used { touch, due } ──▶ touch (used_at) | demand (refresh)
//!  tick ──idle for idle_ms──▶ Record::dropped, unlisted from the Index
//! ```
//!
//! A record is named by a [`Slot`]: one per unkeyed provider, one per
//! (provider, key) for a keyed one (the key is the client id; an
//! on-behalf-of exchange would key by a subject's digest), plus the keyed
//! provider's [`Index`] of keys, which bounds their count.
//!
//! - `provider`: [`Provider`], the call and how its answer is read
//!   ([`Answer`], [`AnswerError`]).
//! - [`record`]: [`Record`], the state of one provider shared by every
//!   worker of a host: the last good values, when they expire, when to
//!   refresh, the failure streak, and a lease that lets one worker refresh
//!   at a time.
//! - [`refresh`]: the refresh state machine (lease, compare-and-swap,
//!   backoff) over [`SharedRecords`], the small trait a host implements
//!   over its shared storage (the filter over Envoy's shared data;
//!   [`MemoryRecords`] in memory); and [`reject`], which drops values an
//!   upstream answered 401 to (compare-and-swap on their generation, at
//!   most one forced refresh per [`MIN_FORCED_REFRESH_MS`]).
//!
//! All values of one provider come from one answer, and a request is given
//! every credential of its route or refused, never a mixed set (see
//! [`crate::decide`]). Nothing here logs. [`AnswerError`] messages and the
//! `Debug` of every type here never carry a secret, a token or a response
//! body.

mod provider;
pub mod record;
pub mod refresh;

pub use provider::{
    Answer, AnswerError, Keyed, Kind, Provider, CLIENT_PLACEHOLDER, DEFAULT_IDLE_SECONDS, DEFAULT_MARGIN_SECONDS,
    DEFAULT_MAX_KEYS, DEFAULT_REFRESH_SECONDS, DEFAULT_TIMEOUT_MS, MAX_BACKOFF_MS, MAX_VALUE_BYTES,
    MIN_FORCED_REFRESH_MS,
};
pub use record::{backoff_ms, Index, Record, Success};
pub use refresh::{
    admit, ready, reject, touch, Call, Event, Full, MemoryRecords, NoRecords, Note, Refresher, Rejection, Reply,
    SharedRecords, Slot, Used, MAX_ANSWER_BYTES,
};
