//! Pure models of what Envoy does, below the host calls and the store:
//! nothing here knows wasmtime, so `state` and `abi` both build on it and
//! nothing imports upward.
//!
//! ```text
//!  codec ─── proxy-wasm's map and property-path encodings; HeaderList
//!  metrics ─ MetricType, MetricStore: Envoy 1.40's metric semantics
//!  shared ── SharedData: shared data with compare-and-swap
//!  status ── proxy_status_t
//! ```

pub mod codec;
pub mod metrics;
pub mod shared;
pub mod status;
