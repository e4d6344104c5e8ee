//! keyswap's host harness: the filter's `.wasm` in wasmtime, with the host
//! side of proxy-wasm ABI v0.2.1 that the filter uses, so the conformance
//! suite and the `keyswap` CLI run the very module Envoy loads.
//!
//! ```text
//!  module ─────── FilterModule (Engine + Module + linker, compiled once, Clone)
//!        └─────── FilterInstance (Store<HostState>: one VM, one plugin)
//!  state ──────── HostState: configs, clock, log, metrics, streams, call counts
//!  abi ────────── host calls, one module a group; codec + headers are pure
//!  runner ─────── a conformance case (keyswap-conformance) or a CLI request through an instance
//!  ecds, push ─── the configuration as Envoy's ECDS resource; `keyswap push`
//!  manifest ───── the configuration as Istio / Envoy Gateway manifests
//!  error ──────── HarnessError
//! ```
//!
//! No state is global: everything an instance's host side holds lives in
//! its store, so instances run in parallel. Host calls the harness does not
//! implement are linked to stubs that answer `UNIMPLEMENTED` and are
//! counted ([`FilterInstance::unimplemented_calls`]), never ignored.

pub mod abi;
pub mod bench;
pub mod component;
pub mod ecds;
pub mod error;
pub mod manifest;
pub mod module;
pub mod push;
pub mod runner;
pub mod serve;
pub mod state;

pub use abi::callout::SharedData;
pub use abi::codec::HeaderList;
pub use abi::metrics::MetricType;
pub use error::{HarnessError, BUILD_HINT};
pub use module::{default_filter_path, workspace_filter_path, FilterInstance, FilterModule, Outcome};
pub use state::{CallCounts, Clock, HttpCall, LocalResponse, LogEntry, LogLevel};
