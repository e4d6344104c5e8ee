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
//! ```
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
    Answer, AnswerError, Kind, Provider, DEFAULT_MARGIN_SECONDS, DEFAULT_REFRESH_SECONDS, DEFAULT_TIMEOUT_MS,
    MAX_BACKOFF_MS, MAX_VALUE_BYTES, MIN_FORCED_REFRESH_MS,
};
pub use record::{backoff_ms, Record, Success};
pub use refresh::{
    reject, Event, MemoryRecords, NoRecords, Note, Refresher, Rejection, Reply, SharedRecords, Used, MAX_ANSWER_BYTES,
};
