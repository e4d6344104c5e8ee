//! keyswap's policy, in plain Rust: no proxy-wasm, no WIT, no I/O.
//!
//! ```text
//!  JSON ──raw──▶ RawConfig ──config──▶ Policy ──decide(RequestView)──▶ Decision
//!                                          │                           ├─ Forward { edits }
//!                                          └─ response_removals        └─ Deny { reason }
//! ```
//!
//! - [`raw`]: the configuration as written (serde, unknown fields refused).
//! - [`config`]: parse and compile; errors carry the field path.
//! - [`policy`]: the compiled form and [`Policy::decide`], the one entry point.
//! - [`credential`]: dynamic credentials (`oauth2`, `token_exchange`,
//!   `fetch`): what to ask, how to read the answer, when to ask again.
//! - [`decision`]: the answer as a value, and the reason-to-status mapping.
//! - [`request`], [`query`], [`time`]: what `decide` reads, and helpers.
//!
//! Hosts (the proxy-wasm filter, the component) read the request once, call
//! [`Policy::decide`], and apply its answer. Nothing here logs; no error or
//! decision carries a key or an upstream credential.

pub mod config;
pub mod credential;
pub mod decision;
pub mod policy;
pub mod query;
pub mod raw;
pub mod request;
pub mod time;

pub use config::{content_version, ConfigError, Environment, Routing, MAX_KEY_BYTES};
pub use decision::{Decision, Denial, DenialReason, Forward};
pub use policy::{KeyCheck, Policy, Summary};
pub use request::RequestView;
