//! keyswap's configuration as Envoy and the control planes take it, made in
//! one place for every tool that writes or reads it:
//!
//! ```text
//!  ecds ────── the configuration as Envoy's ECDS resource: the bytes of the
//!              file Envoy watches, writing it atomically under a lock, and
//!              what Envoy's admin (stats, /config_dump) says of it
//!  proto ───── the few Envoy protobuf messages of a binary (.pb) ECDS
//!              file, declared by hand (prost)
//!  manifest ── the configuration as Istio and Envoy Gateway manifests
//!              (both stages, one configuration), and their size limits
//!  delivery ── how large a configuration each delivery path carries
//!              (ECDS file, gRPC xDS, Kubernetes objects), and whether it fits
//!  bench ───── the benchmark job (clients, keys, headers, credential) that
//!              the Envoy benchmark and `keyswap bench` both measure
//! ```
//!
//! Used by the `keyswap` CLI (`push`, `manifest`, `check`) in
//! `host-harness/` and by the end-to-end tests in `tests/`, so a test
//! writes exactly what a user's command writes. No wasmtime and no network
//! here; the only I/O is the ECDS file and its lock.

pub mod bench;
pub mod delivery;
pub mod ecds;
pub mod manifest;
pub mod proto;
