//! Header maps: the open stream's request headers, and its response
//! headers once the upstream answered. Trailers, gRPC metadata and call
//! responses are not held (`BAD_ARGUMENT`, as Envoy answers for a map it
//! does not have).

use wasmtime::Caller;

use super::{headers, map_type, memory, status, HostCalls, HostError, HostResult, Status};
use crate::model::codec::{decode_map, encode_map, HeaderList};
use crate::state::HostState;

/// Registers the header-map host calls.
///
/// # Errors
/// A definition wasmtime refuses.
pub fn add_to_linker(calls: &mut HostCalls<'_>) -> wasmtime::Result<()> {
    host_call!(calls, "proxy_get_header_map_pairs", |caller, map: u32, data_out: u32, size_out: u32| {
        status(get_pairs(&mut caller, map, data_out, size_out))
    })?;
    host_call!(calls, "proxy_get_header_map_size", |caller, map: u32, size_out: u32| {
        status(get_size(&mut caller, map, size_out))
    })?;
    host_call!(calls, "proxy_set_header_map_pairs", |caller, map: u32, data: u32, size: u32| {
        status(set_pairs(&mut caller, map, data, size))
    })?;
    host_call!(
        calls,
        "proxy_get_header_map_value",
        |caller, map: u32, key: u32, key_len: u32, data_out: u32, size_out: u32| {
            status(get_value(&mut caller, map, key, key_len, data_out, size_out))
        }
    )?;
    host_call!(
        calls,
        "proxy_add_header_map_value",
        |caller, map: u32, key: u32, key_len: u32, value: u32, value_len: u32| {
            status(edit(&mut caller, map, key, key_len, Some((value, value_len)), headers::add))
        }
    )?;
    host_call!(
        calls,
        "proxy_replace_header_map_value",
        |caller, map: u32, key: u32, key_len: u32, value: u32, value_len: u32| {
            status(edit(&mut caller, map, key, key_len, Some((value, value_len)), headers::replace))
        }
    )?;
    host_call!(calls, "proxy_remove_header_map_value", |caller, map: u32, key: u32, key_len: u32| {
        status(edit(&mut caller, map, key, key_len, None, |h, name, _| headers::remove(h, name)))
    })?;
    Ok(())
}

/// The map `map` of the open stream.
fn map_mut(state: &mut HostState, map: u32) -> Result<&mut HeaderList, HostError> {
    if map == map_type::HTTP_CALL_RESPONSE_HEADERS {
        return state.call_response.as_mut().map(|(headers, _)| headers).ok_or(Status::BadArgument.into());
    }
    let stream = state.stream.as_mut().ok_or(Status::BadArgument)?;
    match map {
        map_type::HTTP_REQUEST_HEADERS => Ok(&mut stream.request_headers),
        map_type::HTTP_RESPONSE_HEADERS => stream.response_headers.as_mut().ok_or(Status::BadArgument.into()),
        _ => Err(Status::BadArgument.into()),
    }
}

fn get_pairs(caller: &mut Caller<'_, HostState>, map: u32, data_out: u32, size_out: u32) -> HostResult {
    let bytes = encode_map(map_mut(caller.data_mut(), map)?);
    memory::give(caller, &bytes, data_out, size_out)
}

fn get_size(caller: &mut Caller<'_, HostState>, map: u32, size_out: u32) -> HostResult {
    let size = encode_map(map_mut(caller.data_mut(), map)?).len();
    memory::write_u32(caller, size_out, u32::try_from(size).map_err(|_| Status::InternalFailure)?)
}

fn set_pairs(caller: &mut Caller<'_, HostState>, map: u32, data: u32, size: u32) -> HostResult {
    let pairs = decode_map(&memory::read(caller, data, size)?).map_err(|_| Status::BadArgument)?;
    headers::set_all(map_mut(caller.data_mut(), map)?, pairs);
    Ok(())
}

fn get_value(
    caller: &mut Caller<'_, HostState>,
    map: u32,
    key: u32,
    key_len: u32,
    data_out: u32,
    size_out: u32,
) -> HostResult {
    let name = memory::read_str(caller, key, key_len)?;
    let value = headers::get(map_mut(caller.data_mut(), map)?, &name).ok_or(Status::NotFound)?.to_vec();
    memory::give(caller, &value, data_out, size_out)
}

fn edit(
    caller: &mut Caller<'_, HostState>,
    map: u32,
    key: u32,
    key_len: u32,
    value: Option<(u32, u32)>,
    op: impl FnOnce(&mut HeaderList, &str, &[u8]),
) -> HostResult {
    let name = memory::read_str(caller, key, key_len)?;
    let value = match value {
        Some((ptr, len)) => memory::read(caller, ptr, len)?,
        None => Vec::new(),
    };
    op(map_mut(caller.data_mut(), map)?, &name, &value);
    Ok(())
}
