//! `proxy_set_effective_context`: accepted for the root context and the
//! open stream (the SDK calls it before callbacks that arrive on the root).

use super::{status, HostCalls, Status};

/// Registers the context host call.
///
/// # Errors
/// A definition wasmtime refuses.
pub fn add_to_linker(calls: &mut HostCalls<'_>) -> wasmtime::Result<()> {
    host_call!(calls, "proxy_set_effective_context", |caller, context_id: u32| {
        let state = caller.data();
        let known =
            context_id == state.root_context_id || state.stream.as_ref().is_some_and(|s| s.context_id == context_id);
        status(if known { Ok(()) } else { Err(Status::BadArgument.into()) })
    })?;
    Ok(())
}
