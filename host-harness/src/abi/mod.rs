//! The host side of the proxy-wasm ABI v0.2.1, one small module a group of
//! host calls. Each group's `add_to_linker` registers its calls through
//! [`HostCalls`] with [`host_call!`], which writes each name once (linked,
//! listed as implemented, counted per call); [`link`] registers them all,
//! wasmtime-wasi's preview1, and a counting `Unimplemented` stub for every
//! other function the module imports.
//!
//! - [`headers`]: header-map edits with Envoy's semantics (pure; the byte
//!   formats are in `model::codec`).
//! - [`memory`]: copying into and out of the guest, its allocator.
//! - [`log`], [`time`], [`buffer`], [`map`], [`property`], [`http`],
//!   [`context`], [`metrics`]: the implemented host calls.
//! - [`callout`]: timer, HTTP calls and shared data (dynamic credentials).
//! - [`stub`]: everything else the module imports.

/// Registers one `env` host call, its name written once: linked under
/// that name, listed among the implemented calls ([`HostCalls`]) and
/// counted on every call (`HostState::record`). The closure's first
/// argument is the caller; the others are the ABI's, with their types.
macro_rules! host_call {
    ($calls:expr, $name:literal, |$caller:ident $(, $arg:ident : $ty:ty)* $(,)?| $body:block) => {
        $calls.wrap($name, move |mut $caller: ::wasmtime::Caller<'_, $crate::state::HostState> $(, $arg: $ty)*| {
            $caller.data_mut().record($name);
            $body
        })
    };
}

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

/// The linker, with the names of the `env` host calls registered so far:
/// each group's `add_to_linker` registers through it (with
/// [`host_call!`]), so the implemented set is what was linked, and every
/// other import gets a counting [`stub`].
pub struct HostCalls<'a> {
    linker: &'a mut Linker<HostState>,
    implemented: Vec<&'static str>,
}

impl HostCalls<'_> {
    /// Links `func` as `env.<name>` and lists `name` as implemented.
    ///
    /// # Errors
    /// A definition wasmtime refuses.
    pub(crate) fn wrap<Params, Args>(
        &mut self,
        name: &'static str,
        func: impl wasmtime::IntoFunc<HostState, Params, Args>,
    ) -> wasmtime::Result<()> {
        self.linker.func_wrap(ENV, name, func)?;
        self.implemented.push(name);
        Ok(())
    }
}

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
/// preview1, and a stub for the rest. Returns the stubbed imports, as
/// (module, name).
///
/// # Errors
/// A definition wasmtime refuses (a clash, or a type it cannot express).
pub fn link(linker: &mut Linker<HostState>, module: &Module) -> wasmtime::Result<Vec<(String, String)>> {
    let mut calls = HostCalls { linker, implemented: Vec::new() };
    log::add_to_linker(&mut calls)?;
    time::add_to_linker(&mut calls)?;
    buffer::add_to_linker(&mut calls)?;
    map::add_to_linker(&mut calls)?;
    property::add_to_linker(&mut calls)?;
    http::add_to_linker(&mut calls)?;
    context::add_to_linker(&mut calls)?;
    metrics::add_to_linker(&mut calls)?;
    callout::add_to_linker(&mut calls)?;
    let HostCalls { linker, implemented } = calls;
    wasmtime_wasi::p1::add_to_linker_sync(linker, |state: &mut HostState| state.wasi_mut())?;
    stub::add_to_linker(linker, module, &implemented)
}
