//! Dynamic upstream credentials: `oauth2`, `token_exchange` and `fetch`
//! values, in plain Rust. A leaf of the crate: it imports nothing from the
//! rest of the policy but [`crate::json`], to read answers and records.
//!
//! ```text
//!  compile::providers ──▶ Provider (cluster, the call, how to read its answer)
//!  host timer ──Refresher::tick──▶ SharedRecords: lease won? ──host HTTP call──▶ Refresher::answer
//!                                         └─ Provider::parse ──▶ Record::succeeded | failed ──CAS──▶ SharedRecords
//!  request ──Policy::decide──▶ SharedRecords::read (once per provider of the route) ──▶ Forward | credential_unavailable
//!  upstream 401 ──Policy::upstream_status(Forward::used)──▶ reject: Record::rejected ──CAS──▶ SharedRecords
//!
//!  keyed (a `{client}` fetch, an on-behalf-of exchange): one record per (provider, key) — Slot::Keyed,
//!  stored in one of max_keys pool slots (Slot::Pool) the Index gives the key, stamped with it
//!  first request ──decide──▶ Decision::Wait ──admit (Index, CAS, max_keys)──▶ Refresher::demand(key, caller token, subject)
//!      ──next tick: lease, call──▶ answer ──▶ the host decides the waiting request again
//!  later requests ──decide──▶ cached value; Used { touch, due } ──▶ touch (used_at) | demand (refresh)
//!  tick ──idle for idle_ms──▶ Record::dropped, unlisted from the Index
//! ```
//!
//! A record is named by a [`Slot`]: one per unkeyed provider, one per
//! (provider, key) for a keyed one (the key is the client id, or for an
//! on-behalf-of exchange a digest of the subject token,
//! [`Provider::subject_key`]), plus the keyed provider's [`Index`] of
//! keys, which bounds their count (a new client is refused past it; a new
//! subject evicts the least recently used one). A key's record lives in one
//! of a fixed pool of `max_keys` slots, reused once its key is dropped or
//! evicted, and stamped with its key: a record read for one key and
//! stamped with another is absent, and a write lands only over the key's
//! own record (compare-and-swap), so shared data stays bounded and a value
//! fetched for one caller is never read for another.
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
    jwt_exp_ms, Answer, AnswerError, Keyed, Kind, Provider, SubjectSource, CLIENT_PLACEHOLDER, DEFAULT_IDLE_SECONDS,
    DEFAULT_MARGIN_SECONDS, DEFAULT_MAX_KEYS, DEFAULT_MAX_SUBJECTS, DEFAULT_REFRESH_SECONDS, DEFAULT_TIMEOUT_MS,
    MAX_BACKOFF_MS, MAX_SUBJECT_BYTES, MAX_VALUE_BYTES, MIN_FORCED_REFRESH_MS,
};
pub use record::{backoff_ms, Index, Record, Success};
pub use refresh::{
    admit, ready, reject, touch, Call, Event, Full, Hints, MemoryRecords, NoRecords, Note, Refresher, Rejection, Reply,
    SharedRecords, Slot, Used, MAX_ANSWER_BYTES,
};
