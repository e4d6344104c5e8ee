//! The policy's integration tests, one module an area.
//!
//! - [`conformance`]: runner `native`, the whole conformance suite
//!   (`tests/conformance/`) through the policy, no wasm.
//! - [`docs`]: what docs/config.md restates of the policy (the denial
//!   table) agrees with it.
//! - [`module_graph`]: the policy's modules import one way (no circle).

// Test code: its helpers fail the test the way `#[test]` functions do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod conformance;
mod docs;
mod module_graph;
