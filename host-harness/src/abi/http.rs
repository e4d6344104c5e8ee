//! `proxy_continue_stream`: a held request goes on (recorded on the open
//! stream, read by [`crate::FilterInstance::held_outcome`]).
//! `proxy_send_local_response`: the filter answers the client itself. The
//! response is recorded on the open stream exactly as sent (Envoy would add
//! `content-length` and the like; the harness reports what the filter gave).

use wasmtime::Caller;

use super::{memory, status, HostCalls, HostResult, Status};
use crate::model::codec::decode_map;
use crate::state::{HostState, LocalResponse};

/// Registers the local-response host call.
///
/// # Errors
/// A definition wasmtime refuses.
pub fn add_to_linker(calls: &mut HostCalls<'_>) -> wasmtime::Result<()> {
    host_call!(
        calls,
        "proxy_send_local_response",
        |caller,
         status_code: u32,
         details: u32,
         details_len: u32,
         body: u32,
         body_len: u32,
         headers: u32,
         headers_len: u32,
         grpc_status: i32| {
            let args =
                LocalArgs { status_code, details, details_len, body, body_len, headers, headers_len, grpc_status };
            status(send(&mut caller, args))
        }
    )?;
    host_call!(calls, "proxy_continue_stream", |caller, stream_type: u32| {
        // Only a request (0) is ever held; Envoy continues it once the
        // callback returns.
        let stream = caller.data_mut().stream.as_mut();
        status(match (stream, stream_type) {
            (Some(stream), 0) => {
                stream.resumed = true;
                Ok(())
            }
            _ => Err(Status::BadArgument.into()),
        })
    })?;
    Ok(())
}

struct LocalArgs {
    status_code: u32,
    details: u32,
    details_len: u32,
    body: u32,
    body_len: u32,
    headers: u32,
    headers_len: u32,
    grpc_status: i32,
}

fn send(caller: &mut Caller<'_, HostState>, args: LocalArgs) -> HostResult {
    let details = String::from_utf8_lossy(&memory::read(caller, args.details, args.details_len)?).into_owned();
    let body = memory::read(caller, args.body, args.body_len)?;
    let headers =
        decode_map(&memory::read(caller, args.headers, args.headers_len)?).map_err(|_| Status::BadArgument)?;
    let stream = caller.data_mut().stream.as_mut().ok_or(Status::BadArgument)?;
    stream.local_response =
        Some(LocalResponse { status: args.status_code, details, headers, body, grpc_status: args.grpc_status });
    Ok(())
}
