//! keyswap's host harness: the filter's `.wasm` in wasmtime, with the host
//! side of proxy-wasm ABI v0.2.1 that the filter uses, so the conformance
//! suite and the `keyswap` CLI run the very module Envoy loads.
//!
//! ```text
//!  artifact ───── Artifact: the filter module and the component, where and how built
//!  module ─────── FilterModule (Engine + Module + linker, compiled once, Clone)
//!        └─────── FilterInstance (Store<HostState>: one VM, one plugin)
//!  state ──────── HostState: configs, clock, log, metrics, streams, call counts
//!  abi ────────── host calls, one module a group, over state and model
//!  model ──────── pure models of Envoy: codec, metrics, shared data, status
//!  runner ─────── a conformance case (keyswap-conformance) or a CLI request through an instance
//!  push ───────── `keyswap push` (the ECDS resource and the manifests
//!                 are keyswap-envoy-config's `ecds` and `manifest`)
//!  error ──────── HarnessError
//! ```
//!
//! No state is global: everything an instance's host side holds lives in
//! its store, so instances run in parallel. Host calls the harness does not
//! implement are linked to stubs that answer `UNIMPLEMENTED` and are
//! counted ([`FilterInstance::unimplemented_calls`]), never ignored.

pub mod abi;
pub mod artifact;
pub mod bench;
pub mod component;
pub mod error;
pub mod model;
pub mod module;
pub mod push;
pub mod runner;
pub mod serve;
pub mod state;

/// The ECDS resource and the platform manifests, from their own crate
/// (also used by the end-to-end tests).
pub use keyswap_envoy_config::{delivery, ecds, manifest};

pub use artifact::{Artifact, ArtifactError};
pub use error::HarnessError;
pub use model::codec::HeaderList;
pub use model::metrics::MetricType;
pub use model::shared::SharedData;
pub use module::{FilterInstance, FilterModule, Handled};
pub use state::{CallCounts, Clock, HttpCall, LocalResponse, LogEntry, LogLevel};
