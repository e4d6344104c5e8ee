//! The harness's integration tests, one module an area.

// Test scaffolding: helpers outside `#[test]` functions may fail loudly too,
// and table-driven cases are allowed their tuple types.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::type_complexity)]

mod abi;
mod cli;
mod component;
mod credentials;
mod harness;
mod limits;
mod metrics;
mod serve;

use std::sync::OnceLock;

use keyswap_harness::{Artifact, FilterModule};

/// The real filter module, compiled once for this test binary (test
/// scaffolding, not harness state). `KEYSWAP_FILTER` points elsewhere.
pub fn filter() -> &'static FilterModule {
    static FILTER: OnceLock<FilterModule> = OnceLock::new();
    FILTER.get_or_init(|| FilterModule::load(&Artifact::Filter.default_path()).unwrap_or_else(|e| panic!("{e}")))
}
