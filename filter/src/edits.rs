//! How a decision's header edits reach Envoy: one call that replaces the
//! whole map, or one targeted call per edit, whichever costs Envoy less.
//!
//! Measured in Envoy (docs/performance.md, "What each host call costs"):
//! `proxy_set_header_map_pairs` ≈ 8.0 µs (it copies, removes and re-adds
//! every header), a targeted `proxy_add_header_map_value`,
//! `proxy_replace_header_map_value` or `proxy_remove_header_map_value`
//! ≈ 1.3-2.0 µs. Up to [`MAX_TARGETED`] edits go one by one (the final
//! stage of an allowed request: the credential and the client id, two
//! calls); more go as one map. The result is the same list either way:
//! removals first, then the additions appended in order, `:path` in place.

use keyswap_policy::Forward;
use proxy_wasm::hostcalls;
use proxy_wasm::types::MapType;

/// The most edits made one call each; above it, one whole-map write.
pub const MAX_TARGETED: usize = 3;

/// Applies `forward`'s edits to the effective context's request, whose
/// headers `headers` were read from.
pub fn apply(forward: &Forward<'_>, headers: &[(String, Vec<u8>)]) {
    const MAP: MapType = MapType::HttpRequestHeaders;
    let edits = forward.remove_headers.len()
        + forward.remove_look_alikes.len()
        + forward.add_headers.len()
        + usize::from(forward.path.is_some());
    if edits > MAX_TARGETED {
        // One call replaces the whole map, borrowing every header rather
        // than copying it.
        let _ = hostcalls::set_map_bytes(MAP, forward.edited(headers));
        return;
    }
    for name in &forward.remove_headers {
        let _ = hostcalls::set_map_value_bytes(MAP, name, None);
    }
    for name in &forward.remove_look_alikes {
        let _ = hostcalls::set_map_value_bytes(MAP, name, None);
    }
    if let Some(path) = &forward.path {
        let _ = hostcalls::set_map_value_bytes(MAP, ":path", Some(path));
    }
    for (name, value) in &forward.add_headers {
        let _ = hostcalls::add_map_value_bytes(MAP, name, value.as_bytes());
    }
}
