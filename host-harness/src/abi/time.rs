//! The clock: `proxy_get_current_time_nanoseconds` reads the instance's
//! [`Clock`](crate::state::Clock), which a test may stop at any time.

use wasmtime::{Caller, Linker};

use super::{memory, status, ENV};
use crate::state::HostState;

/// Registers the clock host call.
///
/// # Errors
/// A definition wasmtime refuses.
pub fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        ENV,
        "proxy_get_current_time_nanoseconds",
        |mut caller: Caller<'_, HostState>, time_out: u32| {
            caller.data_mut().record("proxy_get_current_time_nanoseconds");
            let now = caller.data().clock.now_nanos();
            status(memory::write_u64(&mut caller, time_out, now))
        },
    )?;
    Ok(())
}
