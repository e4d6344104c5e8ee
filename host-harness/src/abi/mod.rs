//! The host side of the proxy-wasm ABI v0.2.1, one small module a group of
//! host calls. Each group has an `add_to_linker`; [`link`] registers them
//! all, wasmtime-wasi's preview1, and a counting `Unimplemented` stub for
//! every other function the module imports.
//!
//! - [`codec`]: the map and property-path byte formats (pure).
//! - [`headers`]: header-map edits with Envoy's semantics (pure).
//! - [`memory`]: copying into and out of the guest, its allocator.
//! - [`log`], [`time`], [`buffer`], [`map`], [`property`], [`http`],
//!   [`context`], [`metrics`]: the implemented host calls.
//! - [`callout`]: timer, HTTP calls and shared data (dynamic credentials).
//! - [`stub`]: everything else the module imports.

pub mod buffer;
pub mod callout;
pub mod context;
pub mod headers;
pub mod http;
pub mod log;
pub mod map;
pub mod memory;
pub mod metrics;
pub mod property;
pub mod stub;
pub mod time;

use wasmtime::{Linker, Module};

use crate::state::HostState;

pub use crate::model::status::Status;

/// `proxy_map_type_t` values the harness holds.
pub mod map_type {
    pub const HTTP_REQUEST_HEADERS: u32 = 0;
    pub const HTTP_REQUEST_TRAILERS: u32 = 1;
    pub const HTTP_RESPONSE_HEADERS: u32 = 2;
    pub const HTTP_RESPONSE_TRAILERS: u32 = 3;
    pub const HTTP_CALL_RESPONSE_HEADERS: u32 = 6;
    /// The highest defined map type (`HTTP_CALL_RESPONSE_TRAILERS`).
    pub const LAST: u32 = 7;
}

/// `proxy_buffer_type_t` values the harness holds.
pub mod buffer_type {
    pub const HTTP_CALL_RESPONSE_BODY: u32 = 4;
    pub const VM_CONFIGURATION: u32 = 6;
    pub const PLUGIN_CONFIGURATION: u32 = 7;
    /// The highest defined buffer type (`FOREIGN_FUNCTION_ARGUMENTS`).
    pub const LAST: u32 = 8;
}

/// `proxy_action_t`.
pub mod action {
    pub const CONTINUE: u32 = 0;
    pub const PAUSE: u32 = 1;
}

/// The module host calls are imported from.
pub const ENV: &str = "env";
/// WASI preview1's module name.
pub const WASI_P1: &str = "wasi_snapshot_preview1";

/// The `env` host calls this harness implements; every other import is a
/// counting [`stub`].
pub const IMPLEMENTED: &[&str] = &[
    "proxy_log",
    "proxy_get_log_level",
    "proxy_get_current_time_nanoseconds",
    "proxy_get_buffer_bytes",
    "proxy_get_buffer_status",
    "proxy_get_header_map_pairs",
    "proxy_get_header_map_size",
    "proxy_set_header_map_pairs",
    "proxy_get_header_map_value",
    "proxy_add_header_map_value",
    "proxy_replace_header_map_value",
    "proxy_remove_header_map_value",
    "proxy_get_property",
    "proxy_set_property",
    "proxy_send_local_response",
    "proxy_set_effective_context",
    "proxy_define_metric",
    "proxy_increment_metric",
    "proxy_record_metric",
    "proxy_get_metric",
    "proxy_set_tick_period_milliseconds",
    "proxy_http_call",
    "proxy_get_shared_data",
    "proxy_set_shared_data",
];

/// An error inside a host call: an ABI status for the guest, or a trap
/// (the guest's allocator trapped while the host called it).
#[derive(Debug)]
pub enum HostError {
    Status(Status),
    Trap(wasmtime::Error),
}

impl From<Status> for HostError {
    fn from(status: Status) -> Self {
        Self::Status(status)
    }
}

/// What a host call did: `Ok` stands for [`Status::Ok`].
pub type HostResult = Result<(), HostError>;

/// Turns a host call's result into the status the guest receives.
///
/// # Errors
/// A trap, passed on to the guest's caller.
pub fn status(result: HostResult) -> wasmtime::Result<u32> {
    match result {
        Ok(()) => Ok(Status::Ok as u32),
        Err(HostError::Status(status)) => Ok(status as u32),
        Err(HostError::Trap(err)) => Err(err),
    }
}

/// Links everything `module` imports: the implemented host calls, WASI
/// preview1, and a stub for the rest.
///
/// # Errors
/// A definition wasmtime refuses (a clash, or a type it cannot express).
pub fn link(linker: &mut Linker<HostState>, module: &Module) -> wasmtime::Result<()> {
    log::add_to_linker(linker)?;
    time::add_to_linker(linker)?;
    buffer::add_to_linker(linker)?;
    map::add_to_linker(linker)?;
    property::add_to_linker(linker)?;
    http::add_to_linker(linker)?;
    context::add_to_linker(linker)?;
    metrics::add_to_linker(linker)?;
    callout::add_to_linker(linker)?;
    wasmtime_wasi::p1::add_to_linker_sync(linker, |state: &mut HostState| state.wasi_mut())?;
    stub::add_to_linker(linker, module)
}
