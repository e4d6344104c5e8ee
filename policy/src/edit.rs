//! The one way a forward's edits are applied to a request, used by every
//! host (the proxy-wasm filter, the component, the harness, the native
//! runner): remove every header named for removal (all of its values),
//! put the new path in `:path` (appended when there is none), then append
//! the added headers in order.
//!
//! The list is the request as a proxy-wasm host sees it: pseudo-headers
//! included, names in lower case.

/// The edited header list as borrowed pairs, for a host that replaces the
/// whole map in one call: nothing is copied.
pub fn edited<'o, 'h: 'o, 'e: 'o>(
    headers: &'h [(String, Vec<u8>)],
    removes: impl Fn(&str) -> bool,
    path: Option<&'e [u8]>,
    add: impl ExactSizeIterator<Item = (&'e str, &'e [u8])>,
) -> Vec<(&'o str, &'o [u8])> {
    let mut out: Vec<(&'o str, &'o [u8])> = Vec::with_capacity(headers.len() + add.len() + 1);
    let mut path_set = path.is_none();
    for (name, value) in headers {
        if removes(name) {
            continue;
        }
        match path {
            Some(path) if name == ":path" => {
                out.push((name.as_str(), path));
                path_set = true;
            }
            _ => out.push((name.as_str(), value.as_slice())),
        }
    }
    if let (false, Some(path)) = (path_set, path) {
        out.push((":path", path));
    }
    for (name, value) in add {
        out.push((name, value));
    }
    out
}

/// [`edited`], written back into an owned header list.
pub fn apply<'e>(
    headers: &mut Vec<(String, Vec<u8>)>,
    removes: impl Fn(&str) -> bool,
    path: Option<&'e [u8]>,
    add: impl ExactSizeIterator<Item = (&'e str, &'e [u8])>,
) {
    let owned =
        edited(headers.as_slice(), removes, path, add).into_iter().map(|(n, v)| (n.to_string(), v.to_vec())).collect();
    *headers = owned;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_every_value_sets_the_path_then_adds() {
        let mut headers = vec![
            (":method".to_string(), b"GET".to_vec()),
            ("authorization".to_string(), b"one".to_vec()),
            ("Authorization".to_string(), b"two".to_vec()),
            ("accept".to_string(), b"*/*".to_vec()),
        ];
        let removes = |n: &str| n.eq_ignore_ascii_case("authorization");
        let add = [("authorization", &b"up"[..])];
        apply(&mut headers, removes, Some(b"/a"), add.into_iter());
        let names: Vec<&str> = headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, [":method", "accept", ":path", "authorization"], "a missing :path is appended");
        assert_eq!(headers[2].1, b"/a");
        apply(&mut headers, |_| false, Some(b"/b"), std::iter::empty());
        assert_eq!(headers[2], (":path".to_string(), b"/b".to_vec()), ":path replaced in place");
    }
}
