//! Buffers: the VM and plugin configurations, and the body of the HTTP
//! call response being delivered. Request and response bodies and the like
//! are not held by this harness (`NOT_FOUND`).

use wasmtime::Caller;

use super::{buffer_type, memory, status, HostCalls, HostError, HostResult, Status};
use crate::state::HostState;

/// Registers the buffer host calls.
///
/// # Errors
/// A definition wasmtime refuses.
pub fn add_to_linker(calls: &mut HostCalls<'_>) -> wasmtime::Result<()> {
    host_call!(calls, "proxy_get_buffer_bytes", |caller,
                                                 buffer: u32,
                                                 start: u32,
                                                 max_size: u32,
                                                 data_out: u32,
                                                 size_out: u32| {
        status(get_bytes(&mut caller, buffer, start, max_size, data_out, size_out))
    })?;
    host_call!(calls, "proxy_get_buffer_status", |caller, buffer: u32, size_out: u32, flags_out: u32| {
        status(get_status(&mut caller, buffer, size_out, flags_out))
    })?;
    Ok(())
}

fn contents(state: &HostState, buffer: u32) -> Result<&[u8], HostError> {
    match buffer {
        buffer_type::VM_CONFIGURATION => Ok(&state.vm_configuration),
        buffer_type::PLUGIN_CONFIGURATION => Ok(&state.plugin_configuration),
        buffer_type::HTTP_CALL_RESPONSE_BODY => match &state.call_response {
            Some((_, body)) => Ok(body),
            None => Err(Status::NotFound.into()),
        },
        b if b <= buffer_type::LAST => Err(Status::NotFound.into()),
        _ => Err(Status::BadArgument.into()),
    }
}

fn get_bytes(
    caller: &mut Caller<'_, HostState>,
    buffer: u32,
    start: u32,
    max_size: u32,
    data_out: u32,
    size_out: u32,
) -> HostResult {
    let all = contents(caller.data(), buffer)?;
    let start = start as usize;
    if start > all.len() {
        return Err(Status::BadArgument.into());
    }
    let end = start.saturating_add(max_size as usize).min(all.len());
    let bytes = all[start..end].to_vec();
    memory::give(caller, &bytes, data_out, size_out)
}

fn get_status(caller: &mut Caller<'_, HostState>, buffer: u32, size_out: u32, flags_out: u32) -> HostResult {
    let len = contents(caller.data(), buffer)?.len();
    let len = u32::try_from(len).map_err(|_| Status::InternalFailure)?;
    memory::write_u32(caller, size_out, len)?;
    memory::write_u32(caller, flags_out, 0)
}
