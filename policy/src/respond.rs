//! What a client may see of the upstream's response: no credential the
//! route injected handed back (`reflections`, in Envoy's final stage), and
//! no `strip_response_headers` (`response_removals`, in the first stage);
//! and what the upstream's status means for the dynamic credentials the
//! request carried (`upstream_status`, in the final stage).

use crate::credential::{self, Rejection, SharedRecords, Used};
use crate::model::Policy;
use crate::query;

/// The status by which an upstream rejects the credentials it was given
/// (RFC 9110 15.5.2): their values are replaced by a refresh at once.
pub const REJECTED_STATUS: u16 = 401;

impl Policy {
    /// What the upstream's answer `status` to a request means for the
    /// dynamic credentials it carried (`used`, from the request's
    /// [`crate::Forward`]). On a 401 every one of them is marked rejected
    /// in `records` and fetched again at once ([`credential::reject`]; the
    /// answer does not say which credential was refused): the value is
    /// kept until the new one arrives, so one client's 401 never cuts the
    /// route's other clients off, and dropped if that refresh fails. A
    /// value already marked or replaced (another worker saw a 401 first,
    /// or a refresh came in between) is left alone, and a refresh forced by
    /// a 401 follows the last one by [`credential::MIN_FORCED_REFRESH_MS`]
    /// at least. Returns the values marked here, for a log line and a
    /// counter; empty for any other
    /// status or a request without dynamic credentials, which read neither
    /// `now_ms` nor `records`.
    pub fn upstream_status<'p>(
        &'p self,
        status: u16,
        used: &[Used],
        now_ms: &dyn Fn() -> i64,
        records: &mut dyn SharedRecords,
    ) -> Vec<Rejection<'p>> {
        if status != REJECTED_STATUS || used.is_empty() {
            return Vec::new();
        }
        let now = now_ms();
        used.iter().filter_map(|u| credential::reject(&self.providers, records, u, now)).collect()
    }

    /// Response headers that would hand a credential the route injected
    /// back to the client, with what to do: `Some(value)` replaces a
    /// `location` or `content-location` whose query carried an injected
    /// parameter (the parameter removed), `None` removes the header (any
    /// other header holding a secret). `dynamic` are the values the
    /// request's forward carried in [`crate::Forward::secrets`]: its
    /// dynamic credentials and a client's own static ones.
    pub fn reflections(
        &self,
        route: &str,
        dynamic: &[&str],
        headers: &[(String, Vec<u8>)],
    ) -> Vec<(String, Option<Vec<u8>>)> {
        let Some(route) = self.routes.iter().find(|r| r.name == route) else {
            return Vec::new();
        };
        // The route's static secrets in every form they travel in were
        // prepared at configuration; dynamic ones change, so per response.
        let encoded: Vec<String> = dynamic.iter().map(|d| query::encode_component(d)).collect();
        let own = route.credentials.iter().flat_map(|c| c.echoes.0.iter().map(String::as_bytes));
        let secrets: Vec<&[u8]> =
            own.chain(dynamic.iter().map(|d| d.as_bytes())).chain(encoded.iter().map(String::as_bytes)).collect();
        let holds = |value: &[u8]| secrets.iter().any(|s| contains_secret(value, s));
        let mut out = Vec::new();
        for (name, value) in headers {
            if !holds(value) {
                continue;
            }
            let uri = name.eq_ignore_ascii_case("location") || name.eq_ignore_ascii_case("content-location");
            let cleaned = uri.then(|| without_params(value, &route.query_names));
            match cleaned {
                Some(v) if !holds(&v) => out.push((name.clone(), Some(v))),
                _ => out.push((name.clone(), None)),
            }
        }
        out
    }

    /// The response headers a client may see, for a host that handles a
    /// response in one place (the component's gateway): [`Self::reflections`]
    /// applied for `route`, then `strip_response_headers` removed. In Envoy
    /// the final stage does the first and the first stage the second.
    pub fn client_response(
        &self,
        route: Option<&str>,
        dynamic: &[&str],
        headers: Vec<(String, Vec<u8>)>,
    ) -> Vec<(String, Vec<u8>)> {
        let reflected = route.map(|r| self.reflections(r, dynamic, &headers)).unwrap_or_default();
        let cleaned: Vec<(String, Vec<u8>)> = headers
            .into_iter()
            .filter_map(|(n, v)| match reflected.iter().find(|(name, _)| *name == n) {
                None => Some((n, v)),
                Some((_, cleaned)) => cleaned.clone().map(|c| (n, c)),
            })
            .collect();
        let removed = self.response_removals(&cleaned);
        let removed: Vec<String> = removed.into_iter().map(str::to_string).collect();
        cleaned.into_iter().filter(|(n, _)| !removed.iter().any(|r| n.eq_ignore_ascii_case(r))).collect()
    }

    /// The response headers to remove: configured names present in
    /// `headers`.
    pub fn response_removals<'p>(&'p self, headers: &[(String, Vec<u8>)]) -> Vec<&'p str> {
        self.strip_response
            .iter()
            .filter(|name| headers.iter().any(|(n, _)| n.eq_ignore_ascii_case(name)))
            .map(String::as_str)
            .collect()
    }
}

/// A URI without the query parameters `names` (every name injected on the
/// route, by the route or by a client's own list).
fn without_params(uri: &[u8], names: &[Vec<u8>]) -> Vec<u8> {
    let (base, query, _) = query::split_path(uri);
    let mut out = base.to_vec();
    let mut first = true;
    for p in query::params(query.unwrap_or(b"")) {
        let name = p.name();
        if !names.iter().any(|n| n[..] == name[..]) && !p.raw.is_empty() {
            out.push(if first { b'?' } else { p.separator });
            out.extend_from_slice(p.raw);
            first = false;
        }
    }
    out
}

/// True when `value` holds `secret`: anywhere for a secret of 8 bytes or
/// more, as the whole value for a shorter one (a short test value would
/// otherwise match unrelated text).
fn contains_secret(value: &[u8], secret: &[u8]) -> bool {
    if secret.is_empty() {
        return false;
    }
    if secret.len() < 8 {
        return value == secret;
    }
    value.windows(secret.len()).any(|w| w == secret)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An Envoy configuration: `a` bound to cluster `ca`, `q` to `cq` with a
    /// query credential.
    fn bound() -> Policy {
        let json = r#"{"clients": [{"id": "c", "key": "k1", "routes": ["a", "q"]}],
            "key_sources": [{"header": "authorization", "prefix": "Bearer "}, {"query": "api_key"}],
            "routes": [{"name": "a", "match": {"route_name": "ra", "clusters": ["ca"]},
                         "inject": [{"header": "x-upstream-key", "value": {"inline": "secret-for-a-123"}}]},
                       {"name": "q", "match": {"clusters": ["cq"]},
                         "inject": [{"query": "key", "value": {"inline": "query secret/456"}}]}],
            "client_id_header": "x-keyswap-client"}"#;
        match Policy::from_json(json.as_bytes(), &|_: &str| None) {
            Ok(policy) => policy,
            Err(err) => panic!("{err}"),
        }
    }

    /// Only a 401 to a request that carried dynamic values reads the clock
    /// or the records, and it drops exactly the providers it was given.
    #[test]
    fn only_a_401_with_dynamic_values_marks_anything() {
        use crate::credential::{MemoryRecords, Record};
        let json = r#"{"clients": [{"id": "c", "key": "k1", "routes": ["*"]}],
            "routes": [{"name": "a", "match": {"clusters": ["ca"]},
                        "inject": [{"header": "authorization", "value": {"fetch": {"cluster": "v", "path": "/a", "json_pointer": "/a"}}}]},
                       {"name": "b", "match": {"clusters": ["cb"]},
                        "inject": [{"header": "authorization", "value": {"fetch": {"cluster": "v", "path": "/b", "json_pointer": "/b"}}}]}]}"#;
        let p = Policy::from_json(json.as_bytes(), &|_: &str| None).unwrap();
        let mut records = MemoryRecords::new(2);
        for provider in 0..2 {
            let record = Record { values: vec!["value-1".into()], generation: 1, ..Record::default() };
            records.write(crate::credential::Slot::Provider(provider), &record, None);
        }
        let never = || -> i64 { panic!("the clock was read") };
        let used = [Used { provider: 0, key: None, generation: 1, touch: false, due: false }];
        for status in [200, 403, 500] {
            assert!(p.upstream_status(status, &used, &never, &mut records).is_empty(), "{status}");
        }
        assert!(p.upstream_status(401, &[], &never, &mut records).is_empty());
        let dropped = p.upstream_status(401, &used, &|| 7, &mut records);
        assert_eq!(
            dropped.iter().map(|r| r.provider.path.as_str()).collect::<Vec<_>>(),
            ["routes[0].inject[0].value.fetch"]
        );
        let record =
            |provider| records.read(crate::credential::Slot::Provider(provider)).map(|(r, _)| r).unwrap_or_default();
        assert_eq!((record(0).rejected, record(0).due(8)), (Some(1), true), "marked, refreshed at once");
        assert_eq!(record(1).rejected, None, "another route's value is untouched");
    }

    #[test]
    fn responses_never_carry_an_injected_secret_back() {
        let p = bound();
        let response = |pairs: &[(&str, &str)]| -> Vec<(String, Vec<u8>)> {
            pairs.iter().map(|(n, v)| (n.to_string(), v.as_bytes().to_vec())).collect()
        };
        // Header credentials: any header holding the secret goes.
        let headers = response(&[("x-echo", "got secret-for-a-123 ok"), ("x-other", "fine"), ("location", "/next")]);
        assert_eq!(p.reflections("a", &[], &headers), [("x-echo".to_string(), None)]);
        // Query credentials: location keeps its other parameters.
        let headers = response(&[
            ("location", "https://up.test/v1?alt=json&key=query%20secret%2F456&page=2"),
            ("content-location", "/v1?key=query%20secret%2F456"),
            ("x-raw", "query secret/456"),
        ]);
        let edits = p.reflections("q", &[], &headers);
        assert_eq!(
            edits,
            [
                ("location".to_string(), Some(b"https://up.test/v1?alt=json&page=2".to_vec())),
                ("content-location".to_string(), Some(b"/v1".to_vec())),
                ("x-raw".to_string(), None),
            ]
        );
        // Dynamic values the host injected count too; short ones only whole.
        let headers = response(&[("x-token", "Bearer dyn-token-789"), ("x-short", "ab"), ("x-has-ab", "cabd")]);
        let edits = p.reflections("a", &["dyn-token-789", "ab"], &headers);
        assert_eq!(edits, [("x-token".to_string(), None), ("x-short".to_string(), None)]);
    }
}
