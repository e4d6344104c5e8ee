//! keyswap's host harness.
//!
//! - [`conformance`]: the suite's case format, skip lists and the one
//!   comparison every runner uses.

pub mod conformance;
