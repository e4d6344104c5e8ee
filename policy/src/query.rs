//! The request target's query string: split, walk parameters, decode and
//! encode. Parameters are separated by `&` and also by `;`, which some
//! upstreams accept, so a key hidden behind a `;` is still found.

use std::borrow::Cow;

/// Splits a request target into path, query (after `?`) and fragment
/// (after `#`).
pub fn split_path(target: &[u8]) -> (&[u8], Option<&[u8]>, Option<&[u8]>) {
    let (rest, fragment) = match target.iter().position(|&b| b == b'#') {
        Some(i) => (&target[..i], Some(&target[i + 1..])),
        None => (target, None),
    };
    match rest.iter().position(|&b| b == b'?') {
        Some(i) => (&rest[..i], Some(&rest[i + 1..]), fragment),
        None => (rest, None, fragment),
    }
}

/// One query parameter as written.
#[derive(Debug, Clone, Copy)]
pub struct Param<'q> {
    /// `name=value` exactly as in the request.
    pub raw: &'q [u8],
    /// The separator before it (`&` or `;`; `&` for the first).
    pub separator: u8,
}

impl<'q> Param<'q> {
    /// The decoded name.
    pub fn name(&self) -> Cow<'q, [u8]> {
        let end = self.raw.iter().position(|&b| b == b'=').unwrap_or(self.raw.len());
        decode(&self.raw[..end])
    }

    /// The name as upstream frameworks read it ([`canonical_name`]).
    pub fn canonical_name(&self) -> Vec<u8> {
        canonical_name(&self.name())
    }

    /// The decoded value (empty without `=`).
    pub fn value(&self) -> Cow<'q, [u8]> {
        match self.raw.iter().position(|&b| b == b'=') {
            Some(i) => decode(&self.raw[i + 1..]),
            None => Cow::Borrowed(&[]),
        }
    }
}

/// A decoded parameter name as the frameworks upstreams run read it, so
/// that look-alikes of a key or credential parameter are removed with it:
/// NUL bytes dropped, leading spaces dropped (PHP), ASCII lower case
/// (ASP.NET), an array suffix `[…]` cut (`api_key[]`: PHP, Rack, Node's
/// `qs`), and ` `, `.`, `[` and `-` read as `_` (PHP's `api.key`,
/// `api key`, `api[key`).
pub fn canonical_name(name: &[u8]) -> Vec<u8> {
    let name: Vec<u8> = name.iter().copied().filter(|&b| b != 0).collect();
    let start = name.iter().position(|&b| b != b' ').unwrap_or(name.len());
    let mut name = &name[start..];
    // `a[b]...`: the first `[` with a `]` after it starts the array suffix.
    if let Some(open) = name.iter().position(|&b| b == b'[') {
        if open > 0 && name[open..].contains(&b']') {
            name = &name[..open];
        }
    }
    name.iter()
        .map(|&b| match b.to_ascii_lowercase() {
            b' ' | b'.' | b'[' | b'-' => b'_',
            other => other,
        })
        .collect()
}

/// The parameters of a query, empty ones included.
pub fn params(query: &[u8]) -> impl Iterator<Item = Param<'_>> {
    let mut rest = Some(query);
    let mut separator = b'&';
    std::iter::from_fn(move || {
        let q = rest?;
        let (raw, next) = match q.iter().position(|&b| b == b'&' || b == b';') {
            Some(i) => (&q[..i], Some((&q[i + 1..], q[i]))),
            None => (q, None),
        };
        let param = Param { raw, separator };
        match next {
            Some((tail, sep)) => {
                rest = Some(tail);
                separator = sep;
            }
            None => rest = None,
        }
        Some(param)
    })
}

/// Percent-decodes, with `+` as a space (form encoding). Malformed escapes
/// are kept as written.
pub fn decode(text: &[u8]) -> Cow<'_, [u8]> {
    if !text.iter().any(|&b| b == b'%' || b == b'+') {
        return Cow::Borrowed(text);
    }
    let hex = |b: u8| (b as char).to_digit(16);
    let mut out = Vec::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        match text[i] {
            b'+' => out.push(b' '),
            b'%' => match (text.get(i + 1).and_then(|&b| hex(b)), text.get(i + 2).and_then(|&b| hex(b))) {
                (Some(hi), Some(lo)) => {
                    out.push((hi * 16 + lo) as u8);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    Cow::Owned(out)
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
pub fn encode_component(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(q: &str) -> Vec<String> {
        params(q.as_bytes()).map(|p| String::from_utf8_lossy(&p.name()).into_owned()).collect()
    }

    #[test]
    fn look_alike_names_read_as_their_framework_reads_them() {
        for name in [
            "api_key",
            "API_KEY",
            "api.key",
            "api key",
            "api[key",
            " api_key",
            "api_key[]",
            "api_key[x]",
            "api-key",
            "api\0_key",
            "Api.Key[]",
        ] {
            assert_eq!(canonical_name(name.as_bytes()), b"api_key", "{name:?}");
        }
        for name in ["apikey", "api_keys", "xapi_key", "[api_key]", "api__key"] {
            assert_ne!(canonical_name(name.as_bytes()), b"api_key", "{name:?}");
        }
    }

    #[test]
    fn splits_target_into_parts() {
        assert_eq!(split_path(b"/a?b=1#f"), (&b"/a"[..], Some(&b"b=1"[..]), Some(&b"f"[..])));
        assert_eq!(split_path(b"/a#f?x"), (&b"/a"[..], None, Some(&b"f?x"[..])));
        assert_eq!(split_path(b"/a"), (&b"/a"[..], None, None));
        assert_eq!(split_path(b"/a?"), (&b"/a"[..], Some(&b""[..]), None));
    }

    #[test]
    fn params_split_on_ampersand_and_semicolon() {
        assert_eq!(names("a=1&b=2;c=3&&d"), ["a", "b", "c", "", "d"]);
        let seps: Vec<u8> = params(b"a&b;c").map(|p| p.separator).collect();
        assert_eq!(seps, b"&&;");
    }

    #[test]
    fn decoding_handles_plus_escapes_and_malformed_input() {
        assert_eq!(&*decode(b"api%5Fkey"), b"api_key");
        assert_eq!(&*decode(b"a+b"), b"a b");
        assert_eq!(&*decode(b"100%"), b"100%");
        assert_eq!(&*decode(b"%zz%4"), b"%zz%4");
        assert_eq!(&*decode(b"%C3%A9"), "é".as_bytes());
    }

    #[test]
    fn encoding_round_trips_through_decoding() {
        for text in ["plain", "a b+c&d=e;f", "é/?#%", ""] {
            let encoded = encode_component(text);
            assert!(encoded.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~%".contains(&b)));
            assert_eq!(&*decode(encoded.as_bytes()), text.as_bytes());
        }
    }
}
