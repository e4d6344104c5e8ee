//! The policy's integration tests, one module an area.
//!
//! - [`conformance`]: runner `native`, the whole conformance suite
//!   (`tests/conformance/`) through the policy, no wasm.
//! - [`docs`]: what docs/config.md restates of the policy (the denial
//!   table) agrees with it.

mod conformance;
mod docs;
