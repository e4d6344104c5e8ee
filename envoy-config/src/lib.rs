//! keyswap's configuration as Envoy and the control planes take it, made in
//! one place for every tool that writes or reads it:
//!
//! ```text
//!  ecds ────── the configuration as Envoy's ECDS resource: the bytes of the
//!              file Envoy watches, writing it atomically under a lock, and
//!              what Envoy's admin (stats, /config_dump) says of it
//!  manifest ── the configuration as Istio and Envoy Gateway manifests
//!              (both stages, one configuration), and their size limits
//!  bench ───── the benchmark job (clients, keys, headers, credential) that
//!              the Envoy benchmark and `keyswap bench` both measure
//! ```
//!
//! Used by the `keyswap` CLI (`push`, `manifest`, `check`) in
//! `host-harness/` and by the end-to-end tests in `tests/`, so a test
//! writes exactly what a user's command writes. No wasmtime and no network
//! here; the only I/O is the ECDS file and its lock.

pub mod bench;
pub mod ecds;
pub mod manifest;
