//! Logging: `proxy_log` (captured per instance, with its level) and
//! `proxy_get_log_level` (always `trace`: the harness keeps every line).

use wasmtime::{Caller, Linker};

use super::{memory, status, HostResult, Status, ENV};
use crate::state::{HostState, LogEntry, LogLevel};

/// Registers the logging host calls.
///
/// # Errors
/// A definition wasmtime refuses.
pub fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(ENV, "proxy_log", |mut caller: Caller<'_, HostState>, level: u32, ptr: u32, len: u32| {
        caller.data_mut().record("proxy_log");
        status(log(&mut caller, level, ptr, len))
    })?;
    linker.func_wrap(ENV, "proxy_get_log_level", |mut caller: Caller<'_, HostState>, level_out: u32| {
        caller.data_mut().record("proxy_get_log_level");
        status(memory::write_u32(&mut caller, level_out, LogLevel::Trace.to_abi()))
    })?;
    Ok(())
}

fn log(caller: &mut Caller<'_, HostState>, level: u32, ptr: u32, len: u32) -> HostResult {
    let level = LogLevel::from_abi(level).ok_or(Status::BadArgument)?;
    let message = String::from_utf8_lossy(&memory::read(caller, ptr, len)?).into_owned();
    caller.data_mut().log.push(LogEntry { level, message });
    Ok(())
}
