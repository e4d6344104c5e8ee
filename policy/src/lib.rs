//! keyswap's policy, in plain Rust: no proxy-wasm, no WIT, no I/O.
//!
//! ```text
//!  JSON ──raw──▶ RawConfig ──compile──▶ Policy (model) ◀── decide(RequestView, now, records) ──▶ Decision
//!                                │                              │                                ├─ Forward { every edit }
//!                                └──▶ credential::Provider ◀────┘ SharedRecords                 └─ Deny { reason }
//!  host timer ──credential::Refresher (lease, compare-and-swap, backoff) over SharedRecords
//!  upstream's status ──upstream_status(Forward::used)──▶ a 401 drops the values sent (credential::reject)
//! ```
//!
//! The module map; imports run one way, top to bottom, never back up:
//!
//! | module | what is there | imports from the crate |
//! |---|---|---|
//! | [`decide`] | [`Policy::decide`], the one entry point: the whole answer for a request, dynamic credentials included; Envoy's first stage ([`Policy::key_check`], [`Policy::admit`]); request trailers | `model`, `decision`, `request`, `credential`, `query`, `raw` |
//! | [`respond`] | what a response may carry back: [`Policy::reflections`], [`Policy::response_removals`]; what its status means for the dynamic values sent: [`Policy::upstream_status`] | `model`, `query`, `credential` |
//! | [`compile`] | parse, then compile ([`Policy::from_json`]); [`ConfigError`] names the field path; [`compile::env`] the environment secrets come from | `model`, `credential`, `raw`, `request`, `query`, `time` |
//! | [`model`] | the compiled [`Policy`] and its parts; read-only accessors | `credential`, `raw` |
//! | [`credential`] | dynamic credentials, a leaf but for [`json`]: [`credential::Provider`] (the call and its answer), [`credential::Record`] (the shared state), [`credential::Refresher`] (the refresh state machine) over [`credential::SharedRecords`] | — |
//! | [`throttle`] | which limits apply to a request ([`Policy::decide_limited`] asks it after the key is accepted, before any credential) | `model`, `limit` |
//! | [`limit`] | rate limits (GCRA) and daily quotas, a leaf: [`limit::Limit`], [`limit::admit`] over [`limit::SharedCounters`] (compare-and-swap, retried) | — |
//! | [`decision`] | the answer as a value ([`Decision`], [`Forward`], [`Denial`]) and the reason-to-status mapping | `edit`, `limit` |
//! | [`edit`] | the one way a forward's edits are applied to a header list | — |
//! | [`request`] | [`RequestView`], what `decide` reads; [`KeyCheck`], what the first stage hands the final one | `query` |
//! | [`raw`] | the document as written, read with [`json`]; the clients one at a time ([`raw::Clients`]) | `json` |
//! | [`json`], [`query`], [`time`] | a small JSON reader (typed by its caller, field paths, no value in an error); query strings; RFC 3339 | — |
//!
//! `impl Policy` is one facet per module: constructors in [`compile`],
//! accessors in [`model`], the request in [`decide`], the response in
//! [`respond`].
//!
//! Hosts (the proxy-wasm filter, the component, the native conformance
//! runner) read the request once, call [`Policy::decide`], and apply its
//! answer with [`Forward::edited`] or [`Forward::apply`]. Nothing here
//! logs; no error, decision or `Debug` output carries a key or an upstream
//! credential.

pub mod compile;
pub mod credential;
pub mod decide;
pub mod decision;
pub mod edit;
pub mod json;
pub mod limit;
pub mod model;
pub mod query;
pub mod raw;
pub mod request;
pub mod respond;
mod throttle;
pub mod time;

pub use compile::{content_version, ConfigError, Environment, Routing};
pub use decision::{AccessLog, Decision, Denial, DenialReason, Forward, Unconfigured};
pub use model::{key_id, Metadata, Policy, Summary};
pub use request::{KeyCheck, RequestView, MAX_KEY_BYTES};
