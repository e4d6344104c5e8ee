//! keyswap as a WebAssembly component (`wasm32-wasip2`): thin glue around
//! `keyswap-policy`, behind the WIT in `wit/` (the single source of truth).
//!
//! ```text
//!  host ──policy.configure──▶ filter ── Policy::from_json_for(Own) ──▶ instance state
//!  host ──policy.decide────▶ filter ── Policy::decide ──▶ decision (WIT value)
//!  wasi:http ──incoming-handler.handle──▶ gateway ── Policy::decide ──▶ deny locally
//!                                                         └─▶ outgoing-handler: edited request,
//!                                                             bodies streamed both ways
//! ```
//!
//! - [`bindings`]: the generated bindings for the `gateway` world, boxed.
//! - [`filter`]: the `keyswap:gateway/policy` export (world `filter`).
//! - [`gateway`]: the `wasi:http/incoming-handler` and `gateway-config`
//!   exports (world `gateway`).
//! - [`wasi_http`]: plumbing over `wasi:http` and `wasi:io` (fields, local
//!   answers, spliced bodies), with no policy in it.
//! - [`config`]: the gateway's own configuration document (policy plus
//!   upstreams), plain Rust with no WIT types.
//!
//! A component instance is the state: the configured policy lives in a
//! thread-local of the instance. No decision is taken here, and no key or
//! credential is ever logged.

pub mod config;
#[cfg(target_arch = "wasm32")]
mod filter;
#[cfg(target_arch = "wasm32")]
mod gateway;
#[cfg(target_arch = "wasm32")]
mod wasi_http;

/// The generated bindings, boxed: only the glue modules reach in here.
#[cfg(target_arch = "wasm32")]
#[allow(missing_docs, clippy::all, clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod bindings {
    wit_bindgen::generate!({
        world: "gateway",
        path: "../wit",
        generate_all,
    });

    pub use exports::keyswap::gateway::{gateway_config, policy};
    pub use wasi::http::{outgoing_handler, types as http};
    pub use wasi::io::streams;

    use super::Component;
    export!(Component with_types_in crate::bindings);
}

/// The component: its exports are implemented on this type.
#[cfg(target_arch = "wasm32")]
struct Component;

/// Why a configuration with a rate limit or a quota is refused here: a
/// component instance keeps no storage shared across requests to count in
/// (the proxy-wasm filter counts in Envoy's shared data).
pub const NO_COUNTERS: &str = "rate limits and quotas are counted in storage shared across requests, which the \
     component does not have; run this configuration in the proxy-wasm filter";

/// Unix milliseconds now, for clients with `expires`.
#[cfg(target_arch = "wasm32")]
fn now_ms() -> i64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    since.map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Logs a panic's location (not its payload, which is not ours to prove
/// free of secrets) to stderr, once per instance.
#[cfg(target_arch = "wasm32")]
fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            let at = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
            eprintln!("keyswap: critical: panic{at}");
        }));
    });
}
