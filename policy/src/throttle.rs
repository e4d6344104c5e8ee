//! Which limits apply to a request, and taking it from their buckets: the
//! facet of [`Policy`] that [`Policy::decide_limited`] asks once the key is
//! accepted and the route allowed, before any credential is read.
//!
//! ```text
//!  client on route r ──▶ the client's own limits for r, else the route's default (whole)
//!                        + the client's limits on all its routes
//!                   ──limit::admit (SharedCounters, compare-and-swap)──▶ Ok | Refusal (which limit, retry after)
//! ```
//!
//! A client with no limits of its own on a route without a default costs
//! two length checks: no key is formatted, no counter read.

use crate::limit::{self, Limit, Refusal, SharedCounters};
use crate::model::{Client, Policy};

impl Policy {
    /// Takes the request of `client` on route `r` from every bucket that
    /// applies to it at `now_ms()` (read only when one does), or from none.
    ///
    /// # Errors
    /// The first limit that refuses it (route limits before the client's
    /// limits on all routes).
    pub(crate) fn throttle<'p>(
        &'p self,
        client: &'p Client,
        r: usize,
        now_ms: &dyn Fn() -> i64,
        counters: &mut dyn SharedCounters,
    ) -> Result<(), Refusal<'p>> {
        let Some(route) = self.routes.get(r) else { return Ok(()) };
        let on_route: &[Limit] = client.limits_for_route(r).unwrap_or(&route.limits);
        if (on_route.is_empty() && client.limits_all().is_empty()) || counters.taken() {
            return Ok(());
        }
        let buckets: Vec<(&Limit, String)> = on_route
            .iter()
            .chain(client.limits_all().iter())
            .map(|l| (l, l.key(self.client_id(client), &route.name)))
            .collect();
        limit::admit(&buckets, now_ms(), counters)
    }

    /// Whether a request on `route` can meet a rate, a quota: which of
    /// `rate_limited` and `quota_exceeded` it can be answered.
    pub(crate) fn route_limited(&self, route: &str) -> (bool, bool) {
        self.routes.iter().find(|r| r.name == route).map_or((false, false), |r| r.limited)
    }
}

impl Policy {
    /// The key of every bucket a request could be counted in under this
    /// configuration (each client, on each route it may use), once each: a
    /// host whose shared storage cannot create a key with compare-and-swap
    /// (Envoy's shared data) creates them when the configuration loads, so
    /// that two workers never both create the same bucket on a request.
    pub fn limit_keys(&self) -> Vec<String> {
        let mut keys = Vec::new();
        for client in self.clients.iter().filter(|c| !c.disabled) {
            keys.extend(client.limits_all().iter().map(|l| l.key(self.client_id(client), "")));
            for (r, route) in self.routes.iter().enumerate().filter(|(r, _)| client.allowed.allows(*r)) {
                let on_route: &[Limit] = client.limits_for_route(r).unwrap_or(&route.limits);
                keys.extend(on_route.iter().map(|l| l.key(self.client_id(client), &route.name)));
            }
        }
        keys.sort_unstable();
        keys.dedup();
        keys
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use crate::credential::{SharedRecords, Slot};
    use crate::limit::{Counter, MemoryCounters, SharedCounters};
    use crate::{Decision, DenialReason, Policy, RequestView};

    /// Counts every call, for "pays nothing" and "reads no credential".
    #[derive(Default)]
    struct Spy {
        counters: MemoryCounters,
        calls: Cell<usize>,
    }

    impl SharedCounters for Spy {
        fn read(&self, key: &str) -> Option<(Counter, Option<u32>)> {
            self.calls.set(self.calls.get() + 1);
            self.counters.read(key)
        }
        fn write(&mut self, key: &str, counter: Counter, version: Option<u32>) -> bool {
            self.calls.set(self.calls.get() + 1);
            self.counters.write(key, counter, version)
        }
    }

    impl SharedRecords for Spy {
        fn read_bytes(&self, _slot: Slot<'_>) -> Option<(Vec<u8>, Option<u32>)> {
            self.calls.set(self.calls.get() + 1);
            None
        }
        fn write_bytes(&mut self, _slot: Slot<'_>, _bytes: &[u8], _version: Option<u32>) -> bool {
            false
        }
    }

    fn policy(rate: &str, extra_client: &str) -> Policy {
        let json = format!(
            r#"{{"clients": [{{"id": "limited", "key": "k-limited", "routes": ["*"],
                              "limits": {{"rate": {rate}}}}},
                             {{"id": "free", "key": "k-free", "routes": ["s"]}}{extra_client}],
                "routes": [{{"name": "s", "match": {{"clusters": ["s"]}},
                             "inject": [{{"header": "x-k", "value": {{"inline": "static-secret"}}}}]}},
                           {{"name": "d", "match": {{"clusters": ["d"]}},
                             "inject": [{{"header": "x-k", "value": {{"fetch": {{"cluster": "vault", "path": "/c", "json_pointer": "/t"}}}}}}]}}]}}"#
        );
        Policy::from_json(json.as_bytes(), &|_: &str| None).unwrap_or_else(|e| panic!("{e}"))
    }

    fn decide(p: &Policy, key: &str, cluster: &str, at: i64, counters: &mut Spy) -> Result<(), DenialReason> {
        let headers = vec![(":path".to_string(), b"/".to_vec()), ("x-api-key".to_string(), key.as_bytes().to_vec())];
        let mut view = RequestView::from_headers(None, &headers);
        view.cluster = Some(cluster);
        let records = Spy::default();
        match p.decide_limited(&view, &|| at, &records, counters).without_waiting() {
            Ok(_) => Ok(()),
            Err(d) => Err(d.reason),
        }
    }

    #[test]
    fn a_client_without_limits_pays_nothing() {
        let p = policy(r#"{"requests": 1, "per": "hour"}"#, "");
        let mut spy = Spy::default();
        let clock_reads = Cell::new(0);
        let headers = vec![(":path".to_string(), b"/".to_vec()), ("x-api-key".to_string(), b"k-free".to_vec())];
        let mut view = RequestView::from_headers(None, &headers);
        view.cluster = Some("s");
        for _ in 0..10 {
            let now = || {
                clock_reads.set(clock_reads.get() + 1);
                0
            };
            assert!(matches!(p.decide_limited(&view, &now, &NoRecordsSpy, &mut spy), Decision::Forward(_)));
        }
        assert_eq!((spy.calls.get(), clock_reads.get()), (0, 0), "no counter read, no clock read");
        assert!(p.limit_keys().iter().all(|k| !k.contains(" free")), "{:?}", p.limit_keys());
    }

    struct NoRecordsSpy;
    impl SharedRecords for NoRecordsSpy {
        fn read_bytes(&self, _slot: Slot<'_>) -> Option<(Vec<u8>, Option<u32>)> {
            panic!("no credential is read for a static route")
        }
        fn write_bytes(&mut self, _slot: Slot<'_>, _bytes: &[u8], _version: Option<u32>) -> bool {
            false
        }
    }

    /// Limits come after the key check and before any credential: a bad
    /// key is not counted, and a refused request reads no credential (on
    /// route `d` the only other answer is `credential_unavailable`).
    #[test]
    fn limits_sit_between_the_key_check_and_the_credentials() {
        let p = policy(r#"{"requests": 1, "per": "minute"}"#, "");
        let mut spy = Spy::default();
        assert_eq!(decide(&p, "not-a-key", "d", 0, &mut spy), Err(DenialReason::InvalidKey));
        assert_eq!(decide(&p, "k-free", "d", 0, &mut spy), Err(DenialReason::RouteForbidden));
        assert_eq!(spy.calls.get(), 0, "nothing counted before the key is accepted on an allowed route");
        assert_eq!(decide(&p, "k-limited", "d", 0, &mut spy), Err(DenialReason::CredentialUnavailable));
        let headers = vec![(":path".to_string(), b"/".to_vec()), ("x-api-key".to_string(), b"k-limited".to_vec())];
        let mut view = RequestView::from_headers(None, &headers);
        view.cluster = Some("d");
        let records = Spy::default();
        match p.decide_limited(&view, &|| 1, &records, &mut spy) {
            Decision::Deny(d) => assert_eq!(d.reason, DenialReason::RateLimited),
            other => panic!("{other:?}"),
        }
        assert_eq!(records.calls.get(), 0, "a refused request reads no credential");
    }

    /// A push that keeps a limit keeps its bucket (whatever else changed);
    /// a changed limit starts fresh from the push.
    #[test]
    fn buckets_survive_a_push_that_keeps_the_limit() {
        let before = policy(r#"{"requests": 1, "per": "minute"}"#, "");
        let mut spy = Spy::default();
        assert_eq!(decide(&before, "k-limited", "s", 0, &mut spy), Ok(()));
        assert_eq!(decide(&before, "k-limited", "s", 1_000, &mut spy), Err(DenialReason::RateLimited));
        let more = r#", {"id": "new", "key": "k-new", "routes": ["s"]}"#;
        let same = policy(r#"{"requests": 1, "per": "minute"}"#, more);
        assert_eq!(decide(&same, "k-limited", "s", 2_000, &mut spy), Err(DenialReason::RateLimited));
        let changed = policy(r#"{"requests": 2, "per": "minute"}"#, more);
        assert_eq!(decide(&changed, "k-limited", "s", 3_000, &mut spy), Ok(()));
        // A client-wide bucket is one for all its routes.
        assert_eq!(decide(&changed, "k-limited", "d", 3_000, &mut spy), Err(DenialReason::RateLimited));
        assert_eq!(changed.limit_keys().len(), 1, "{:?}", changed.limit_keys());
    }

    #[test]
    fn the_refusal_carries_the_rate_limit_fields() {
        let p = policy(r#"{"requests": 10, "per": "minute", "burst": 1}"#, "");
        let mut spy = Spy::default();
        let headers = vec![(":path".to_string(), b"/".to_vec()), ("x-api-key".to_string(), b"k-limited".to_vec())];
        let mut view = RequestView::from_headers(None, &headers);
        view.cluster = Some("s");
        let records = Spy::default();
        for _ in 0..2 {
            assert!(matches!(p.decide_limited(&view, &|| 0, &records, &mut spy), Decision::Forward(_)));
        }
        let Decision::Deny(denial) = p.decide_limited(&view, &|| 0, &records, &mut spy) else { panic!() };
        let headers: Vec<(String, String)> =
            denial.headers().into_iter().map(|(n, v)| (n.to_string(), v.into_owned())).collect();
        let get = |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str());
        assert_eq!(denial.reason.status(), 429);
        assert_eq!(get("retry-after"), Some("6"));
        assert_eq!(get("ratelimit-policy"), Some(r#""client-rate";q=10;w=60"#));
        assert_eq!(get("ratelimit"), Some(r#""client-rate";r=0;t=6"#));
        assert_eq!(get("content-type"), Some("application/json"));
    }
}
