//! The proxy-wasm ABI's byte formats, as pure functions (no wasmtime).
//!
//! A header map (ABI v0.2.1, "Serialization"; the Rust SDK's
//! `hostcalls::utils::serialize_map_bytes`) is, little-endian:
//!
//! ```text
//! u32 count │ count × (u32 name_len, u32 value_len) │ count × (name NUL value NUL)
//! ```
//!
//! An empty map may arrive as zero bytes or as a count of zero; it is always
//! written as a count of zero. A property path is its segments joined by NUL.

/// A header list as the host holds it: names as text, values as bytes, in
/// order, duplicates allowed.
pub type HeaderList = Vec<(String, Vec<u8>)>;

/// Why a serialised map could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("map is {len} bytes, too short for its header")]
    Truncated { len: usize },
    #[error("map entry {index} runs past the end of the buffer")]
    EntryOutOfBounds { index: usize },
    #[error("map entry {index} is not followed by a NUL byte")]
    MissingNul { index: usize },
    #[error("map entry {index} has a name that is not UTF-8")]
    NameNotUtf8 { index: usize },
    #[error("map has {extra} bytes after its last entry")]
    TrailingBytes { extra: usize },
}

/// Serialises `pairs` in the ABI's map format.
pub fn encode_map<N: AsRef<[u8]>, V: AsRef<[u8]>>(pairs: &[(N, V)]) -> Vec<u8> {
    let data: usize = pairs.iter().map(|(n, v)| n.as_ref().len() + v.as_ref().len() + 2).sum();
    let mut out = Vec::with_capacity(4 + pairs.len() * 8 + data);
    out.extend_from_slice(&len_u32(pairs.len()).to_le_bytes());
    for (name, value) in pairs {
        out.extend_from_slice(&len_u32(name.as_ref().len()).to_le_bytes());
        out.extend_from_slice(&len_u32(value.as_ref().len()).to_le_bytes());
    }
    for (name, value) in pairs {
        out.extend_from_slice(name.as_ref());
        out.push(0);
        out.extend_from_slice(value.as_ref());
        out.push(0);
    }
    out
}

/// Reads a map in the ABI's format. The whole buffer must be used.
///
/// # Errors
/// A buffer that is too short, lacks a NUL terminator, carries a name that is
/// not UTF-8, or has bytes left over.
pub fn decode_map(bytes: &[u8]) -> Result<HeaderList, CodecError> {
    // The spec allows an empty map as zero bytes or a single NUL byte.
    if bytes.is_empty() || bytes == [0] {
        return Ok(Vec::new());
    }
    let count = read_u32(bytes, 0).ok_or(CodecError::Truncated { len: bytes.len() })? as usize;
    let sizes_end = count
        .checked_mul(8)
        .and_then(|n| n.checked_add(4))
        .filter(|&end| end <= bytes.len())
        .ok_or(CodecError::Truncated { len: bytes.len() })?;
    let mut pos = sizes_end;
    let mut pairs = Vec::with_capacity(count);
    for index in 0..count {
        let at = 4 + index * 8;
        let (name_len, value_len) = match (read_u32(bytes, at), read_u32(bytes, at + 4)) {
            (Some(n), Some(v)) => (n as usize, v as usize),
            _ => return Err(CodecError::Truncated { len: bytes.len() }),
        };
        let name = take(bytes, &mut pos, name_len, index)?;
        let value = take(bytes, &mut pos, value_len, index)?;
        let name = std::str::from_utf8(name).map_err(|_| CodecError::NameNotUtf8 { index })?;
        pairs.push((name.to_string(), value.to_vec()));
    }
    if pos != bytes.len() {
        return Err(CodecError::TrailingBytes { extra: bytes.len() - pos });
    }
    Ok(pairs)
}

/// Splits a property path (`xds\0route_name`) into its segments.
pub fn decode_property_path(bytes: &[u8]) -> Vec<String> {
    if bytes.is_empty() {
        return Vec::new();
    }
    bytes.split(|&b| b == 0).map(|s| String::from_utf8_lossy(s).into_owned()).collect()
}

/// Joins property path segments with NUL, as the SDK sends them.
pub fn encode_property_path(segments: &[&str]) -> Vec<u8> {
    segments.join("\0").into_bytes()
}

fn take<'b>(bytes: &'b [u8], pos: &mut usize, len: usize, index: usize) -> Result<&'b [u8], CodecError> {
    let end = pos.checked_add(len).ok_or(CodecError::EntryOutOfBounds { index })?;
    let field = bytes.get(*pos..end).ok_or(CodecError::EntryOutOfBounds { index })?;
    match bytes.get(end) {
        Some(0) => {}
        Some(_) => return Err(CodecError::MissingNul { index }),
        None => return Err(CodecError::EntryOutOfBounds { index }),
    }
    *pos = end + 1;
    Ok(field)
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let raw: [u8; 4] = bytes.get(at..at.checked_add(4)?)?.try_into().ok()?;
    Some(u32::from_le_bytes(raw))
}

/// Lengths in guest memory are 32-bit; a host value past that cannot have
/// come from (or fit into) the guest, so it saturates rather than wraps.
fn len_u32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(pairs: &[(&str, &[u8])]) -> HeaderList {
        pairs.iter().map(|(n, v)| (n.to_string(), v.to_vec())).collect()
    }

    /// The spec's own example: `{"a": "1"}, {"b": "22"}`.
    #[test]
    fn spec_example_bytes() {
        let bytes = encode_map(&list(&[("a", b"1"), ("b", b"22")]));
        #[rustfmt::skip]
        let want: &[u8] = &[
            2, 0, 0, 0,
            1, 0, 0, 0, 1, 0, 0, 0,
            1, 0, 0, 0, 2, 0, 0, 0,
            b'a', 0, b'1', 0, b'b', 0, b'2', b'2', 0,
        ];
        assert_eq!(bytes, want);
    }

    #[test]
    fn round_trips() {
        let cases: &[(&str, HeaderList)] = &[
            ("empty", Vec::new()),
            ("one", list(&[(":path", b"/v1/models")])),
            ("pseudo and regular", list(&[(":method", b"GET"), (":authority", b"gw"), ("accept", b"*/*")])),
            ("duplicates kept in order", list(&[("set-cookie", b"a=1"), ("set-cookie", b"b=2")])),
            ("empty value", list(&[("x-empty", b"")])),
            ("binary value", list(&[("x-bin", &[0xff, 0x00, 0x7f])])),
            ("long value", vec![("x-long".to_string(), vec![b'k'; 70_000])]),
        ];
        for (name, pairs) in cases {
            let bytes = encode_map(pairs);
            assert_eq!(&decode_map(&bytes).unwrap(), pairs, "{name}");
        }
    }

    #[test]
    fn empty_forms() {
        for (name, bytes) in [("no bytes", &[][..]), ("single NUL", &[0][..]), ("zero count", &[0, 0, 0, 0][..])] {
            assert_eq!(decode_map(bytes).unwrap(), Vec::new(), "{name}");
        }
    }

    #[test]
    fn malformed_maps_are_refused() {
        let good = encode_map(&list(&[("a", b"1")]));
        let mut no_nul = good.clone();
        let last = no_nul.len() - 1;
        no_nul[last] = b'x';
        let mut bad_name = encode_map(&list(&[("a", b"1")]));
        bad_name[12] = 0xff;
        let mut trailing = good.clone();
        trailing.push(0);
        let cases: &[(&str, &[u8], CodecError)] = &[
            ("short header", &[1, 0], CodecError::Truncated { len: 2 }),
            ("count past the end", &[9, 0, 0, 0, 0, 0, 0, 0], CodecError::Truncated { len: 8 }),
            ("entry past the end", &good[..good.len() - 2], CodecError::EntryOutOfBounds { index: 0 }),
            ("missing NUL", &no_nul, CodecError::MissingNul { index: 0 }),
            ("name not UTF-8", &bad_name, CodecError::NameNotUtf8 { index: 0 }),
            ("trailing bytes", &trailing, CodecError::TrailingBytes { extra: 1 }),
        ];
        for (name, bytes, want) in cases {
            assert_eq!(decode_map(bytes).as_ref(), Err(want), "{name}");
        }
    }

    #[test]
    fn property_paths() {
        let cases: &[(&[&str], &[u8])] =
            &[(&["xds", "route_name"], b"xds\0route_name"), (&["plugin_name"], b"plugin_name"), (&[], b"")];
        for (segments, bytes) in cases {
            assert_eq!(encode_property_path(segments), *bytes);
            assert_eq!(decode_property_path(bytes), *segments);
        }
    }
}
