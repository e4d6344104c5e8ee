//! The metric host calls (`proxy_define_metric`, `proxy_increment_metric`,
//! `proxy_record_metric`, `proxy_get_metric`) over the instance's
//! [`MetricStore`](crate::model::metrics::MetricStore), whose semantics (Envoy 1.40's, probed) are in
//! [`crate::model::metrics`].

use wasmtime::Caller;

use super::{memory, status, HostCalls, HostResult};
use crate::state::HostState;

/// Registers the metric host calls.
///
/// # Errors
/// A definition wasmtime refuses.
pub fn add_to_linker(calls: &mut HostCalls<'_>) -> wasmtime::Result<()> {
    host_call!(calls, "proxy_define_metric", |caller, kind: u32, name: u32, name_len: u32, id_out: u32| {
        status(define(&mut caller, kind, name, name_len, id_out))
    })?;
    host_call!(calls, "proxy_increment_metric", |caller, id: u32, offset: i64| {
        let state = caller.data_mut();
        status(state.metrics.increment(id, offset).map_err(Into::into))
    })?;
    host_call!(calls, "proxy_record_metric", |caller, id: u32, value: u64| {
        let state = caller.data_mut();
        status(state.metrics.record(id, value).map_err(Into::into))
    })?;
    host_call!(calls, "proxy_get_metric", |caller, id: u32, value_out: u32| {
        status(get(&mut caller, id, value_out))
    })?;
    Ok(())
}

fn define(caller: &mut Caller<'_, HostState>, kind: u32, name: u32, name_len: u32, id_out: u32) -> HostResult {
    let name = memory::read_str(caller, name, name_len)?;
    let id = caller.data_mut().metrics.define(kind, &name)?;
    memory::write_u32(caller, id_out, id)
}

fn get(caller: &mut Caller<'_, HostState>, id: u32, value_out: u32) -> HostResult {
    let value = caller.data_mut().metrics.get(id)?;
    memory::write_u64(caller, value_out, value)
}
