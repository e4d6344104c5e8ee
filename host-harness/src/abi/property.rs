//! Properties. `proxy_get_property`: Envoy's route name and the request
//! attributes a filter may read, from the open stream, plus the plugin's
//! name. Values are raw bytes, as Envoy returns strings. A path the harness
//! does not know is `NOT_FOUND` and is counted in
//! [`FilterInstance::missing_properties`](crate::FilterInstance::missing_properties).
//!
//! `proxy_set_property` as Envoy 1.40 does it (checked with a probe
//! module): the value goes into the stream's filter state under
//! `wasm.<path>` (the path's raw bytes, segments joined by NUL), where
//! Envoy's access log reads it (`%FILTER_STATE(wasm.keyswap:PLAIN)%`); a
//! later call replaces it; without a stream (from the root context) it is
//! `NOT_FOUND`. A one-segment path reads back through `proxy_get_property`.

use wasmtime::Caller;

use super::{headers, memory, status, HostCalls, HostResult, Status};
use crate::model::codec::decode_property_path;
use crate::state::HostState;

/// The property paths the harness answers, dot-joined.
pub const KNOWN: &[&str] = &[
    "xds.route_name",
    "xds.cluster_name",
    "upstream.address",
    "request.path",
    "request.url_path",
    "request.query",
    "request.host",
    "request.method",
    "request.scheme",
    "plugin_name",
    "plugin_root_id",
];

/// Registers the property host calls.
///
/// # Errors
/// A definition wasmtime refuses.
pub fn add_to_linker(calls: &mut HostCalls<'_>) -> wasmtime::Result<()> {
    host_call!(calls, "proxy_get_property", |caller, path: u32, path_len: u32, data_out: u32, size_out: u32| {
        status(get(&mut caller, path, path_len, data_out, size_out))
    })?;
    host_call!(calls, "proxy_set_property", |caller, path: u32, path_len: u32, value: u32, value_len: u32| {
        status(set(&mut caller, path, path_len, value, value_len))
    })?;
    Ok(())
}

/// The filter-state name Envoy stores a property set at `path` under.
pub fn filter_state_name(path: &[u8]) -> String {
    format!("{FILTER_STATE_PREFIX}{}", String::from_utf8_lossy(path))
}

const FILTER_STATE_PREFIX: &str = "wasm.";

fn set(caller: &mut Caller<'_, HostState>, path: u32, path_len: u32, value: u32, value_len: u32) -> HostResult {
    let name = filter_state_name(&memory::read(caller, path, path_len)?);
    let value = memory::read(caller, value, value_len)?;
    let stream = caller.data_mut().stream.as_mut().ok_or(Status::NotFound)?;
    stream.filter_state.insert(name, value);
    Ok(())
}

fn get(caller: &mut Caller<'_, HostState>, path: u32, path_len: u32, data_out: u32, size_out: u32) -> HostResult {
    let path = decode_property_path(&memory::read(caller, path, path_len)?).join(".");
    match lookup(caller.data(), &path) {
        Some(value) => memory::give(caller, &value, data_out, size_out),
        // A known path or a filter-state name without a value is NOT_FOUND
        // in Envoy too; only a path the harness cannot answer is missing.
        None if KNOWN.contains(&path.as_str()) || !path.contains('.') => Err(Status::NotFound.into()),
        None => {
            *caller.data_mut().missing_properties.entry(path).or_insert(0) += 1;
            Err(Status::NotFound.into())
        }
    }
}

/// The value of a dot-joined property path, if the harness has it.
pub(crate) fn lookup(state: &HostState, path: &str) -> Option<Vec<u8>> {
    match path {
        "plugin_name" | "plugin_root_id" => return Some(state.plugin_name.as_bytes().to_vec()),
        _ => {}
    }
    let stream = state.stream.as_ref()?;
    let header = |name: &str| headers::get(&stream.request_headers, name).map(<[u8]>::to_vec);
    let target = header(":path").unwrap_or_default();
    let split = target.iter().position(|&b| b == b'?');
    match path {
        "xds.route_name" => stream.route_name.as_ref().map(|r| r.as_bytes().to_vec()),
        "xds.cluster_name" => stream.cluster.as_ref().map(|c| c.as_bytes().to_vec()),
        "upstream.address" => stream.upstream_address.as_ref().map(|a| a.as_bytes().to_vec()),
        "request.path" => header(":path"),
        "request.url_path" => Some(split.map_or(target.clone(), |q| target[..q].to_vec())),
        "request.query" => Some(split.map_or(Vec::new(), |q| target[q + 1..].to_vec())),
        "request.host" => header(":authority").or_else(|| header("host")),
        "request.method" => header(":method"),
        "request.scheme" => header(":scheme"),
        // Envoy looks an unknown first segment up in the filter state.
        single if !single.contains('.') => stream.filter_state.get(&filter_state_name(single.as_bytes())).cloned(),
        _ => None,
    }
}
