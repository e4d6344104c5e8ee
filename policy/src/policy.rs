//! The compiled policy and its one entry point, [`Policy::decide`].

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

use crate::config::MAX_KEY_BYTES;
use crate::decision::{Decision, Denial, DenialReason, Forward};
use crate::query::{self, Param};
use crate::raw::UnmatchedRoute;
use crate::request::RequestView;

/// A configuration, compiled: everything a request needs is prepared.
#[derive(Debug)]
pub struct Policy {
    pub(crate) clients: Vec<Client>,
    pub(crate) index: ClientIndex,
    pub(crate) key_sources: Vec<KeySource>,
    pub(crate) routes: Vec<Route>,
    /// Key-source headers, stripped headers and the client-id header: what
    /// every forwarded request loses.
    pub(crate) request_removals: Vec<String>,
    pub(crate) strip_response: Vec<String>,
    pub(crate) client_id_header: Option<String>,
    pub(crate) unmatched: UnmatchedRoute,
    pub(crate) needs_route_name: bool,
    pub(crate) per_client_metrics: bool,
    pub(crate) version: String,
    /// Dynamic credential sources (see [`crate::credential`]).
    pub(crate) sources: Vec<crate::credential::Source>,
    /// `"refuse_all": true`: every request is denied `configuration_unavailable`.
    pub(crate) refuse_all: bool,
}

#[derive(Debug)]
pub(crate) struct Client {
    pub id: String,
    pub digest: [u8; 32],
    pub allowed: Allowed,
    /// Unix seconds; the key is refused from this instant on.
    pub expires: Option<i64>,
    pub disabled: bool,
}

#[derive(Debug)]
pub(crate) enum Allowed {
    All,
    /// Sorted route indices.
    Only(Box<[usize]>),
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum KeySource {
    /// `prefix` is lower case and compared case-insensitively.
    Header { name: String, prefix: Option<Vec<u8>> },
    Query { name: Vec<u8> },
}

#[derive(Debug)]
pub(crate) struct Route {
    pub name: String,
    pub matcher: RouteMatch,
    pub headers: Vec<HeaderInject>,
    pub queries: Vec<QueryInject>,
    /// Dynamic credentials (see [`crate::credential`]).
    pub dynamic: Vec<crate::credential::DynamicInject>,
    /// The sources `dynamic` reads, sorted, once each.
    pub sources: Vec<usize>,
}

#[derive(Debug)]
pub(crate) struct RouteMatch {
    pub route_name: Option<String>,
    pub path_prefix: Option<String>,
    /// Lower case, without a port.
    pub host: Option<String>,
}

#[derive(Debug)]
pub(crate) struct HeaderInject {
    pub name: String,
    /// The full header value, prefix included.
    pub value: String,
}

#[derive(Debug)]
pub(crate) struct QueryInject {
    pub name: Vec<u8>,
    /// `name=value`, percent-encoded.
    pub encoded: String,
}

/// What a loaded configuration holds, for logs and `keyswap check`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub clients: usize,
    pub routes: usize,
    /// See [`crate::content_version`].
    pub version: String,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} clients, {} routes, version {}", self.clients, self.routes, self.version)
    }
}

impl Policy {
    /// Counts and version, never a key or credential.
    pub fn summary(&self) -> Summary {
        Summary { clients: self.clients.len(), routes: self.routes.len(), version: self.version.clone() }
    }

    /// The route names, in configuration order.
    pub fn route_names(&self) -> impl Iterator<Item = &str> {
        self.routes.iter().map(|r| r.name.as_str())
    }

    /// Clients whose key would be accepted at `now` (not disabled, not
    /// expired).
    pub fn active_clients(&self, now: i64) -> usize {
        self.clients.iter().filter(|c| !c.disabled && c.expires.is_none_or(|at| now < at)).count()
    }

    /// True when requests that match no route are forwarded
    /// (`unmatched_route: "pass"`).
    pub fn passes_unmatched(&self) -> bool {
        self.unmatched == UnmatchedRoute::Pass
    }

    /// True for the fail-closed configuration (`"refuse_all": true`).
    pub fn refuses_all(&self) -> bool {
        self.refuse_all
    }

    /// True when `metrics.per_client` is on.
    pub fn per_client_metrics(&self) -> bool {
        self.per_client_metrics
    }

    /// True when some route matches on Envoy's route name, so hosts fetch
    /// it only when it can matter.
    pub fn needs_route_name(&self) -> bool {
        self.needs_route_name
    }

    /// Decides one request. `now` gives Unix seconds and is called only when
    /// the client has an `expires` time.
    pub fn decide<'p>(&'p self, req: &RequestView<'_>, now: &dyn Fn() -> i64) -> Decision<'p> {
        // A CONNECT opens a tunnel whose bytes keyswap never sees: no key
        // can be checked and no credential swapped inside it, so it matches
        // no route.
        if self.refuse_all {
            let reason = DenialReason::ConfigurationUnavailable;
            return Decision::Deny(Denial { reason, route: None, client: None });
        }
        let tunnel = req.method.eq_ignore_ascii_case(b"CONNECT");
        let route = if tunnel { None } else { self.routes.iter().position(|r| r.matcher.matches(req)) };
        let Some(r) = route else {
            return match self.unmatched {
                UnmatchedRoute::Deny => Decision::Deny(Denial {
                    reason: DenialReason::NoRoute,
                    route: None,
                    client: None,
                }),
                UnmatchedRoute::Pass => Decision::Forward(self.forward(req, None, None)),
            };
        };
        let route = &self.routes[r];
        let deny = |reason, client: Option<&'p Client>| {
            Decision::Deny(Denial {
                reason,
                route: Some(route.name.as_str()),
                client: client.map(|c| c.id.as_str()),
            })
        };
        let key = match self.presented_key(req) {
            Presented::None => return deny(DenialReason::MissingKey, None),
            Presented::Conflicting => return deny(DenialReason::AmbiguousKey, None),
            Presented::One(key) => key,
        };
        if key.len() > MAX_KEY_BYTES {
            return deny(DenialReason::InvalidKey, None);
        }
        let digest: [u8; 32] = Sha256::digest(&key).into();
        let Some(client) = self.index.find(&self.clients, &digest).map(|c| &self.clients[c]) else {
            return deny(DenialReason::InvalidKey, None);
        };
        if client.disabled {
            return deny(DenialReason::InvalidKey, Some(client));
        }
        if client.expires.is_some_and(|at| now() >= at) {
            return deny(DenialReason::ExpiredKey, Some(client));
        }
        let allowed = match &client.allowed {
            Allowed::All => true,
            Allowed::Only(routes) => routes.binary_search(&r).is_ok(),
        };
        if !allowed {
            return deny(DenialReason::RouteForbidden, Some(client));
        }
        Decision::Forward(self.forward(req, Some(route), Some(client)))
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

    /// True when responses may need edits at all.
    pub fn strips_responses(&self) -> bool {
        !self.strip_response.is_empty()
    }

    fn presented_key<'r>(&self, req: &RequestView<'r>) -> Presented<'r> {
        let mut found = Presented::None;
        for source in &self.key_sources {
            match source {
                KeySource::Header { name, prefix } => {
                    // A repeated header and one value joined with commas are
                    // the same thing in HTTP (RFC 9110, 5.3), and Envoy joins
                    // some repeated headers (`authorization`) that way, so
                    // each comma-separated element is one presentation.
                    let values = req.headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case(name));
                    for element in values.flat_map(|(_, v)| v.split(|&b| b == b',')) {
                        if let Some(key) = header_key(element, prefix.as_deref()) {
                            found.add(std::borrow::Cow::Borrowed(key));
                        }
                    }
                }
                KeySource::Query { name } => {
                    for param in query::params(req.query()) {
                        if param.name() == name.as_slice() {
                            let value = param.value();
                            let trimmed = trim_ows(&value);
                            if !trimmed.is_empty() {
                                found.add(std::borrow::Cow::Owned(trimmed.to_vec()));
                            }
                        }
                    }
                }
            }
            if matches!(found, Presented::Conflicting) {
                break;
            }
        }
        found
    }

    fn forward<'p>(
        &'p self,
        req: &RequestView<'_>,
        route: Option<&'p Route>,
        client: Option<&'p Client>,
    ) -> Forward<'p> {
        let present = |name: &str| req.headers.iter().any(|(n, _)| n.eq_ignore_ascii_case(name));
        let mut remove_headers: Vec<&str> = Vec::new();
        let inject_names = route.into_iter().flat_map(|r| r.headers.iter().map(|h| h.name.as_str()));
        for name in self.request_removals.iter().map(String::as_str).chain(inject_names) {
            if present(name) && !remove_headers.contains(&name) {
                remove_headers.push(name);
            }
        }
        let mut add_headers: Vec<(&str, &str)> = Vec::new();
        if let Some(route) = route {
            add_headers.extend(route.headers.iter().map(|h| (h.name.as_str(), h.value.as_str())));
        }
        if let (Some(name), Some(client)) = (&self.client_id_header, client) {
            add_headers.push((name.as_str(), client.id.as_str()));
        }
        let injected: &[QueryInject] = route.map_or(&[], |r| r.queries.as_slice());
        let path = self.rewrite_query(req.path, injected);
        Forward {
            route: route.map(|r| r.name.as_str()),
            client: client.map(|c| c.id.as_str()),
            remove_headers,
            add_headers,
            path,
        }
    }

    /// The new path without key parameters and client-sent copies of
    /// injected ones, with the injected ones appended, and without a
    /// fragment (never part of a request target, and a place to hide a key
    /// or a second credential from the query rewrite); `None` when nothing
    /// changes.
    pub(crate) fn rewrite_query(&self, path: &[u8], injected: &[QueryInject]) -> Option<Vec<u8>> {
        let removed = |p: &Param<'_>| {
            let name = p.name();
            self.key_sources.iter().any(|s| matches!(s, KeySource::Query { name: n } if *n == *name))
                || injected.iter().any(|q| q.name == *name)
        };
        let (base, query, fragment) = query::split_path(path);
        let drops = query.is_some_and(|q| query::params(q).any(|p| removed(&p)));
        if !drops && injected.is_empty() && fragment.is_none() {
            return None;
        }
        let mut out = Vec::with_capacity(path.len() + 64);
        out.extend_from_slice(base);
        let mut first = true;
        let mut push = |out: &mut Vec<u8>, sep: u8, text: &[u8]| {
            out.push(if first { b'?' } else { sep });
            out.extend_from_slice(text);
            first = false;
        };
        for p in query::params(query.unwrap_or(b"")) {
            if !removed(&p) && !p.raw.is_empty() {
                push(&mut out, p.separator, p.raw);
            }
        }
        for q in injected {
            push(&mut out, b'&', q.encoded.as_bytes());
        }
        Some(out)
    }
}

enum Presented<'r> {
    None,
    One(std::borrow::Cow<'r, [u8]>),
    Conflicting,
}

impl<'r> Presented<'r> {
    fn add(&mut self, key: std::borrow::Cow<'r, [u8]>) {
        match self {
            Presented::None => *self = Presented::One(key),
            Presented::One(seen) if *seen == key => {}
            Presented::One(_) | Presented::Conflicting => *self = Presented::Conflicting,
        }
    }
}

/// The key in one header value: surrounding white space trimmed, the
/// scheme prefix (if any) required and removed. Empty is no key.
fn header_key<'v>(value: &'v [u8], prefix: Option<&[u8]>) -> Option<&'v [u8]> {
    let value = trim_ows(value);
    let key = match prefix {
        None => value,
        Some(prefix) => {
            let head = value.get(..prefix.len())?;
            if !head.eq_ignore_ascii_case(prefix) {
                return None;
            }
            trim_ows(&value[prefix.len()..])
        }
    };
    (!key.is_empty()).then_some(key)
}

fn trim_ows(v: &[u8]) -> &[u8] {
    let is_ows = |b: &u8| *b == b' ' || *b == b'\t';
    let start = v.iter().position(|b| !is_ows(b)).unwrap_or(v.len());
    let end = v.iter().rposition(|b| !is_ows(b)).map_or(start, |e| e + 1);
    &v[start..end]
}

impl RouteMatch {
    fn matches(&self, req: &RequestView<'_>) -> bool {
        if let Some(name) = &self.route_name {
            if req.route_name != Some(name.as_str()) {
                return false;
            }
        }
        if let Some(prefix) = &self.path_prefix {
            let (base, _, _) = query::split_path(req.path);
            if !base.starts_with(prefix.as_bytes()) {
                return false;
            }
        }
        if let Some(host) = &self.host {
            if !host_of(req.authority).eq_ignore_ascii_case(host.as_bytes()) {
                return false;
            }
        }
        true
    }
}

/// The authority without its port (IPv6 literals keep their brackets).
fn host_of(authority: &[u8]) -> &[u8] {
    if authority.first() == Some(&b'[') {
        return match authority.iter().position(|&b| b == b']') {
            Some(end) => &authority[..=end],
            None => authority,
        };
    }
    match authority.iter().rposition(|&b| b == b':') {
        Some(colon) => &authority[..colon],
        None => authority,
    }
}

/// Finds a client by key digest in O(1): a hash map on the digest's first
/// 64 bits (already uniformly spread, so it is used as the hash), then a
/// constant-time comparison of the whole digest.
#[derive(Debug, Default)]
pub(crate) struct ClientIndex {
    first: HashMap<u64, usize, BuildHasherDefault<PrefixHasher>>,
    /// Clients whose digest shares its first 64 bits with an earlier one.
    colliding: Vec<usize>,
}

impl ClientIndex {
    pub fn with_capacity(n: usize) -> Self {
        Self { first: HashMap::with_capacity_and_hasher(n, Default::default()), colliding: Vec::new() }
    }

    /// Adds client `index`; on a duplicate digest returns the earlier client.
    pub fn insert(&mut self, clients: &[Client], digest: &[u8; 32], index: usize) -> Option<usize> {
        if let Some(earlier) = self.find(clients, digest) {
            return Some(earlier);
        }
        match self.first.entry(prefix(digest)) {
            Entry::Occupied(_) => self.colliding.push(index),
            Entry::Vacant(slot) => {
                slot.insert(index);
            }
        }
        None
    }

    pub fn find(&self, clients: &[Client], digest: &[u8; 32]) -> Option<usize> {
        let same = |c: &usize| clients.get(*c).is_some_and(|c| bool::from(c.digest.ct_eq(digest)));
        match self.first.get(&prefix(digest)) {
            Some(c) if same(c) => Some(*c),
            _ => self.colliding.iter().copied().find(same),
        }
    }
}

fn prefix(digest: &[u8; 32]) -> u64 {
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(first)
}

/// A hasher for keys that are already uniformly random.
#[derive(Default)]
pub(crate) struct PrefixHasher(u64);

impl Hasher for PrefixHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_keys_are_trimmed_and_need_their_prefix() {
        let bearer = Some(&b"bearer "[..]);
        assert_eq!(header_key(b"Bearer abc", bearer), Some(&b"abc"[..]));
        assert_eq!(header_key(b"  BEARER   abc  ", bearer), Some(&b"abc"[..]));
        assert_eq!(header_key(b"Bearer ", bearer), None);
        assert_eq!(header_key(b"Bearer", bearer), None);
        assert_eq!(header_key(b"Basic abc", bearer), None);
        assert_eq!(header_key(b" abc ", None), Some(&b"abc"[..]));
        assert_eq!(header_key(b"   ", None), None);
    }

    fn policy(unmatched: &str) -> Policy {
        let json = format!(
            r#"{{"clients": [{{"id": "c", "key": "k1", "routes": ["*"]}}],
                "key_sources": [{{"header": "authorization", "prefix": "Bearer "}}, {{"query": "api_key"}}],
                "routes": [{{"name": "r", "match": {{"host": "api.test"}},
                             "inject": [{{"query": "key", "value": {{"inline": "up"}}}}]}}],
                "unmatched_route": "{unmatched}"}}"#
        );
        match Policy::from_json(json.as_bytes(), &|_: &str| None) {
            Ok(policy) => policy,
            Err(err) => panic!("{err}"),
        }
    }

    fn request(method: &str, path: &str, headers: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
        let mut list = vec![
            (":method".to_string(), method.as_bytes().to_vec()),
            (":path".to_string(), path.as_bytes().to_vec()),
            (":authority".to_string(), b"api.test:443".to_vec()),
        ];
        list.extend(headers.iter().map(|(n, v)| (n.to_string(), v.as_bytes().to_vec())));
        list
    }

    fn reason(policy: &Policy, headers: &[(String, Vec<u8>)]) -> Option<DenialReason> {
        match policy.decide(&RequestView::from_headers(None, headers), &|| 0) {
            Decision::Deny(denial) => Some(denial.reason),
            Decision::Forward(_) => None,
        }
    }

    #[test]
    fn a_comma_joined_header_is_read_like_repeated_headers() {
        let p = policy("deny");
        let joined = |v: &str| request("GET", "/", &[("authorization", v)]);
        assert_eq!(reason(&p, &joined("Bearer k1,Bearer k1")), None);
        assert_eq!(reason(&p, &joined("Bearer k1, Bearer k1")), None);
        assert_eq!(reason(&p, &joined("Bearer k1,Basic eA==")), None);
        assert_eq!(reason(&p, &joined("Bearer k1,Bearer k2")), Some(DenialReason::AmbiguousKey));
        assert_eq!(reason(&p, &joined("Bearer k1,")), None);
        assert_eq!(reason(&p, &joined(",")), Some(DenialReason::MissingKey));
    }

    #[test]
    fn the_fragment_never_reaches_the_upstream() {
        let p = policy("pass");
        let cases = [
            ("/a?api_key=k1#api_key=k2", Some("/a?key=up")),
            ("/a?x=1&api_key=k1#&key=mine", Some("/a?x=1&key=up")),
            ("/a#frag?api_key=k1", None),
        ];
        for (path, upstream) in cases {
            let headers = request("GET", path, &[]);
            let view = RequestView::from_headers(None, &headers);
            match p.decide(&view, &|| 0) {
                Decision::Forward(f) => {
                    assert_eq!(f.path.as_deref(), upstream.map(str::as_bytes), "{path}");
                }
                Decision::Deny(d) => assert!(upstream.is_none(), "{path}: {d:?}"),
            }
        }
        // Passed (unmatched) requests lose their fragment too.
        let headers = request("GET", "/b#api_key=k1", &[]);
        let mut view = RequestView::from_headers(None, &headers);
        view.authority = b"other.test";
        match p.decide(&view, &|| 0) {
            Decision::Forward(f) => assert_eq!(f.path.as_deref(), Some(&b"/b"[..])),
            Decision::Deny(d) => panic!("{d:?}"),
        }
    }

    #[test]
    fn connect_matches_no_route() {
        let bearer = [("authorization", "Bearer k1")];
        assert_eq!(reason(&policy("deny"), &request("CONNECT", "", &bearer)), Some(DenialReason::NoRoute));
        let p = policy("pass");
        let headers = request("CONNECT", "", &bearer);
        match p.decide(&RequestView::from_headers(None, &headers), &|| 0) {
            Decision::Forward(f) => {
                assert_eq!((f.route, f.client), (None, None));
                assert_eq!(f.remove_headers, ["authorization"]);
                assert!(f.add_headers.is_empty());
            }
            Decision::Deny(d) => panic!("{d:?}"),
        }
        assert_eq!(reason(&policy("deny"), &request("GET", "/", &bearer)), None);
    }

    #[test]
    fn hosts_lose_their_port() {
        assert_eq!(host_of(b"api.example.com:8443"), b"api.example.com");
        assert_eq!(host_of(b"api.example.com"), b"api.example.com");
        assert_eq!(host_of(b"[::1]:80"), b"[::1]");
        assert_eq!(host_of(b"[::1]"), b"[::1]");
    }
}
