//! The clock: `proxy_get_current_time_nanoseconds` reads the instance's
//! [`Clock`](crate::state::Clock), which a test may stop at any time.

use super::{memory, status, HostCalls};

/// Registers the clock host call.
///
/// # Errors
/// A definition wasmtime refuses.
pub fn add_to_linker(calls: &mut HostCalls<'_>) -> wasmtime::Result<()> {
    host_call!(calls, "proxy_get_current_time_nanoseconds", |caller, time_out: u32| {
        let now = caller.data().clock.now_nanos();
        status(memory::write_u64(&mut caller, time_out, now))
    })?;
    Ok(())
}
