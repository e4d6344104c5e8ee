//! `proxy_set_effective_context`: accepted for the root context and the
//! open stream (the SDK calls it before callbacks that arrive on the root).

use wasmtime::{Caller, Linker};

use super::{status, Status, ENV};
use crate::state::HostState;

/// Registers the context host call.
///
/// # Errors
/// A definition wasmtime refuses.
pub fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(ENV, "proxy_set_effective_context", |mut caller: Caller<'_, HostState>, context_id: u32| {
        caller.data_mut().record("proxy_set_effective_context");
        let state = caller.data();
        let known =
            context_id == state.root_context_id || state.stream.as_ref().is_some_and(|s| s.context_id == context_id);
        status(if known { Ok(()) } else { Err(Status::BadArgument.into()) })
    })?;
    Ok(())
}
