//! Logging: `proxy_log` (captured per instance, with its level) and
//! `proxy_get_log_level` (always `trace`: the harness keeps every line).

use wasmtime::Caller;

use super::{memory, status, HostCalls, HostResult, Status};
use crate::state::{HostState, LogEntry, LogLevel};

/// Registers the logging host calls.
///
/// # Errors
/// A definition wasmtime refuses.
pub fn add_to_linker(calls: &mut HostCalls<'_>) -> wasmtime::Result<()> {
    host_call!(calls, "proxy_log", |caller, level: u32, ptr: u32, len: u32| {
        status(log(&mut caller, level, ptr, len))
    })?;
    host_call!(calls, "proxy_get_log_level", |caller, level_out: u32| {
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
