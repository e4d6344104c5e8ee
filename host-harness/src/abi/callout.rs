//! What dynamic credentials need of the host: the root context's timer
//! (`proxy_set_tick_period_milliseconds`), outgoing HTTP calls
//! (`proxy_http_call`, answered later by the test through
//! [`FilterInstance::answer_call`](crate::FilterInstance::answer_call)), and
//! shared data with compare-and-swap (`proxy_get_shared_data`,
//! `proxy_set_shared_data`) with Envoy's semantics:
//!
//! - every write gives the entry a new, never-zero `cas`;
//! - a write with `cas` 0 always succeeds; with another `cas` it succeeds
//!   only when the entry is missing or holds that `cas` (`CAS_MISMATCH`
//!   otherwise);
//! - a read of a missing key is `NOT_FOUND`.
//!
//! Shared data is a [`SharedData`](crate::model::shared::SharedData) handle: instances given the same handle
//! share it like the workers of one Envoy VM.

use wasmtime::Caller;

use super::{memory, status, HostCalls, HostResult, Status};
use crate::model::codec::decode_map;
use crate::state::{HostState, HttpCall};

/// Registers the timer, HTTP-call and shared-data host calls.
///
/// # Errors
/// A definition wasmtime refuses.
pub fn add_to_linker(calls: &mut HostCalls<'_>) -> wasmtime::Result<()> {
    host_call!(calls, "proxy_set_tick_period_milliseconds", |caller, period: u32| {
        caller.data_mut().tick_period_ms = (period > 0).then_some(period);
        Ok(Status::Ok as u32)
    })?;
    host_call!(calls, "proxy_http_call", |caller,
                                          upstream: u32,
                                          upstream_len: u32,
                                          headers: u32,
                                          headers_len: u32,
                                          body: u32,
                                          body_len: u32,
                                          trailers: u32,
                                          trailers_len: u32,
                                          timeout_ms: u32,
                                          token_out: u32| {
        let _ = (trailers, trailers_len);
        let args = CallArgs { upstream, upstream_len, headers, headers_len, body, body_len, timeout_ms, token_out };
        status(http_call(&mut caller, args))
    })?;
    host_call!(calls, "proxy_get_shared_data", |caller,
                                                key: u32,
                                                key_len: u32,
                                                data_out: u32,
                                                size_out: u32,
                                                cas_out: u32| {
        status(get_shared(&mut caller, key, key_len, data_out, size_out, cas_out))
    })?;
    host_call!(calls, "proxy_set_shared_data", |caller,
                                                key: u32,
                                                key_len: u32,
                                                value: u32,
                                                value_len: u32,
                                                cas: u32| {
        status(set_shared(&mut caller, key, key_len, value, value_len, cas))
    })?;
    Ok(())
}

struct CallArgs {
    upstream: u32,
    upstream_len: u32,
    headers: u32,
    headers_len: u32,
    body: u32,
    body_len: u32,
    timeout_ms: u32,
    token_out: u32,
}

fn http_call(caller: &mut Caller<'_, HostState>, args: CallArgs) -> HostResult {
    let cluster = memory::read_str(caller, args.upstream, args.upstream_len)?;
    let headers =
        decode_map(&memory::read(caller, args.headers, args.headers_len)?).map_err(|_| Status::BadArgument)?;
    let body = memory::read(caller, args.body, args.body_len)?;
    // Envoy refuses a call without :method, :path or :authority, or to a
    // cluster it does not know (BAD_ARGUMENT).
    let has = |name: &str| headers.iter().any(|(n, v)| n == name && !v.is_empty());
    if !(has(":method") && has(":path") && has(":authority")) {
        return Err(Status::BadArgument.into());
    }
    let state = caller.data_mut();
    if state.unknown_clusters.contains(&cluster) {
        return Err(Status::BadArgument.into());
    }
    state.next_call_token = state.next_call_token.wrapping_add(1).max(1);
    let token = state.next_call_token;
    state.http_calls.push(HttpCall { token, cluster, headers, body, timeout_ms: args.timeout_ms });
    memory::write_u32(caller, args.token_out, token)
}

fn get_shared(
    caller: &mut Caller<'_, HostState>,
    key: u32,
    key_len: u32,
    data_out: u32,
    size_out: u32,
    cas_out: u32,
) -> HostResult {
    let key = memory::read_str(caller, key, key_len)?;
    let (value, cas) = caller.data().shared.get(&key).ok_or(Status::NotFound)?;
    memory::give(caller, &value, data_out, size_out)?;
    memory::write_u32(caller, cas_out, cas)
}

fn set_shared(
    caller: &mut Caller<'_, HostState>,
    key: u32,
    key_len: u32,
    value: u32,
    value_len: u32,
    cas: u32,
) -> HostResult {
    let key = memory::read_str(caller, key, key_len)?;
    let value = memory::read(caller, value, value_len)?;
    caller.data().shared.set(&key, &value, cas).map_err(Into::into)
}
