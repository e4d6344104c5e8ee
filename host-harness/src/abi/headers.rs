//! Header-map edits as Envoy makes them, over a plain [`HeaderList`]:
//! names are stored in lower case and matched without regard to case;
//! order and duplicates are kept.

use crate::model::codec::HeaderList;

/// The first value of `name`, as `proxy_get_header_map_value` returns it.
pub fn get<'h>(headers: &'h HeaderList, name: &str) -> Option<&'h [u8]> {
    headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_slice())
}

/// Appends `name: value` (`proxy_add_header_map_value`).
pub fn add(headers: &mut HeaderList, name: &str, value: &[u8]) {
    headers.push((name.to_ascii_lowercase(), value.to_vec()));
}

/// Sets `name` to `value`: the first entry is replaced in place and any
/// others removed; a missing header is appended
/// (`proxy_replace_header_map_value`).
pub fn replace(headers: &mut HeaderList, name: &str, value: &[u8]) {
    match headers.iter().position(|(n, _)| n.eq_ignore_ascii_case(name)) {
        Some(first) => {
            headers[first].1 = value.to_vec();
            let mut index = 0;
            headers.retain(|(n, _)| {
                let keep = index == first || !n.eq_ignore_ascii_case(name);
                index += 1;
                keep
            });
        }
        None => add(headers, name, value),
    }
}

/// Removes every entry of `name` (`proxy_remove_header_map_value`; removing
/// a missing header is not an error).
pub fn remove(headers: &mut HeaderList, name: &str) {
    headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
}

/// Replaces the whole map (`proxy_set_header_map_pairs`), lower-casing
/// names as Envoy does.
pub fn set_all(headers: &mut HeaderList, pairs: HeaderList) {
    *headers = pairs.into_iter().map(|(n, v)| (n.to_ascii_lowercase(), v)).collect();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(pairs: &[(&str, &str)]) -> HeaderList {
        pairs.iter().map(|(n, v)| (n.to_string(), v.as_bytes().to_vec())).collect()
    }

    enum Op {
        Add(&'static str, &'static str),
        Replace(&'static str, &'static str),
        Remove(&'static str),
        SetAll(&'static [(&'static str, &'static str)]),
    }

    #[test]
    fn edits() {
        const START: &[(&str, &str)] = &[("accept", "*/*"), ("cookie", "a=1"), ("x-k", "1"), ("cookie", "b=2")];
        type Case = (&'static str, Op, &'static [(&'static str, &'static str)]);
        let cases: &[Case] = &[
            (
                "add appends, lower-cased",
                Op::Add("X-New", "v"),
                &[("accept", "*/*"), ("cookie", "a=1"), ("x-k", "1"), ("cookie", "b=2"), ("x-new", "v")],
            ),
            (
                "add keeps duplicates",
                Op::Add("accept", "text/html"),
                &[("accept", "*/*"), ("cookie", "a=1"), ("x-k", "1"), ("cookie", "b=2"), ("accept", "text/html")],
            ),
            (
                "replace keeps the first position and drops the rest",
                Op::Replace("Cookie", "c=3"),
                &[("accept", "*/*"), ("cookie", "c=3"), ("x-k", "1")],
            ),
            (
                "replace of a missing header appends",
                Op::Replace("authorization", "Bearer u"),
                &[("accept", "*/*"), ("cookie", "a=1"), ("x-k", "1"), ("cookie", "b=2"), ("authorization", "Bearer u")],
            ),
            ("remove drops every entry", Op::Remove("COOKIE"), &[("accept", "*/*"), ("x-k", "1")]),
            ("remove of a missing header is a no-op", Op::Remove("x-none"), START),
            (
                "set_all replaces everything",
                Op::SetAll(&[(":path", "/"), ("X-A", "1")]),
                &[(":path", "/"), ("x-a", "1")],
            ),
        ];
        for (name, op, want) in cases {
            let mut headers = list(START);
            match op {
                Op::Add(n, v) => add(&mut headers, n, v.as_bytes()),
                Op::Replace(n, v) => replace(&mut headers, n, v.as_bytes()),
                Op::Remove(n) => remove(&mut headers, n),
                Op::SetAll(pairs) => set_all(&mut headers, list(pairs)),
            }
            assert_eq!(headers, list(want), "{name}");
        }
    }

    #[test]
    fn get_finds_the_first_value_case_insensitively() {
        let headers = list(&[("cookie", "a=1"), ("cookie", "b=2")]);
        assert_eq!(get(&headers, "Cookie"), Some(&b"a=1"[..]));
        assert_eq!(get(&headers, "x-none"), None);
    }
}
