//! The policy's integration tests, one module an area.
//!
//! - [`conformance`]: runner `native`, the whole conformance suite
//!   (`tests/conformance/`) through the policy, no wasm.

mod conformance;
