//! The compiled policy: what [`crate::compile`] builds and [`crate::decide`]
//! and [`crate::respond`] read. Everything a request needs is prepared
//! here; nothing in this module decides.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use subtle::ConstantTimeEq as _;

use crate::credential::Provider;
use crate::limit::{ClientLimits, Limit};
use crate::raw::UnmatchedRoute;

/// A configuration, compiled: everything a request needs is prepared.
#[derive(Debug)]
pub struct Policy {
    pub(crate) clients: Vec<Client>,
    /// Every client's id, one after another ([`Client::id`] is where its
    /// own is): one allocation, not one per client.
    pub(crate) client_ids: String,
    /// Every key of every client; [`ClientIndex`] finds one by digest.
    pub(crate) keys: Vec<Key>,
    pub(crate) index: ClientIndex,
    pub(crate) key_sources: Vec<KeySource>,
    pub(crate) routes: Vec<Route>,
    /// Key-source headers, stripped headers, the client-id header and every
    /// header name any route injects: removed
    /// from every request (a client-sent copy of a credential header is
    /// never forwarded, whatever the route), and so is a client-sent header
    /// whose name is one of these with `_` for `-`.
    pub(crate) protected: Vec<String>,
    /// Every key parameter and every query parameter name any route
    /// injects, as [`query::canonical_name`]s: a client-sent parameter that
    /// reads as one of them upstream is removed from every request, before
    /// a route's own are appended.
    pub(crate) reserved_query_names: Vec<Vec<u8>>,
    /// Every cluster some route is bound to, sorted: a request to one of
    /// them is never passed unchecked.
    pub(crate) bound_clusters: Vec<String>,
    /// True when some route matches on `host` (then a malformed authority
    /// is refused, never matched loosely).
    pub(crate) matches_host: bool,
    pub(crate) strip_response: Vec<String>,
    pub(crate) client_id_header: Option<String>,
    /// `client_id_on_listener`: the first stage sets `client_id_header` to
    /// the id of a valid key's client ([`Policy::admit_with_id`]).
    pub(crate) client_id_on_listener: bool,
    pub(crate) unmatched: UnmatchedRoute,
    pub(crate) needs_route_name: bool,
    pub(crate) per_client_metrics: bool,
    pub(crate) version: String,
    /// Dynamic credential providers (see [`crate::credential`]); an index
    /// into it is a provider number.
    pub(crate) providers: Vec<Provider>,
    /// `"refuse_all": true`: every request is denied `configuration_unavailable`.
    pub(crate) refuse_all: bool,
    /// The field path of the first limit in the configuration, if any
    /// (`clients[0].limits`): a host that keeps no counters refuses it.
    pub(crate) first_limit: Option<String>,
    /// The request header with the caller's own token for the credential
    /// service of a per-client fetch; among `protected`.
    pub(crate) caller_token_header: Option<String>,
    /// Where on-behalf-of exchanges read the subject token (one header for
    /// the configuration); the header is among `protected`.
    pub(crate) subject_source: Option<crate::credential::SubjectSource>,
    /// `metadata_headers`: (metadata field, request header), the headers
    /// among `protected`.
    pub(crate) metadata_headers: Vec<(String, String)>,
}

#[derive(Debug)]
pub(crate) struct Client {
    /// Where the id is in [`Policy::client_ids`]: start and length.
    pub id: (u32, u32),
    pub allowed: Allowed,
    /// Unix seconds; every key of the client is refused from this instant on.
    pub expires: Option<i64>,
    pub disabled: bool,
    /// What few clients have; `None` (8 bytes, no allocation) for the
    /// rest, so 100,000 plain clients are 56 bytes each.
    pub extra: Option<Box<ClientExtra>>,
}

/// A client's own credentials, metadata and limits.
#[derive(Debug, Default)]
pub(crate) struct ClientExtra {
    /// The client's own credentials (`inject` on the client), by route
    /// index, sorted.
    pub own: Box<[(usize, Credentials)]>,
    /// `metadata`, sorted by field name.
    pub metadata: Option<Metadata>,
    /// The client's rate limits and quotas (see [`crate::throttle`]).
    pub limits: ClientLimits,
}

/// A client's metadata (`clients[].metadata`): non-secret
/// (field, value) pairs, sorted by field name.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Metadata(pub(crate) Box<[(Box<str>, Box<str>)]>);

impl Metadata {
    /// The (field, value) pairs, sorted by field name.
    pub fn fields(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(n, v)| (&**n, &**v))
    }

    /// True for a client without metadata.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The value of `field`, if the client has it.
    pub fn get(&self, field: &str) -> Option<&str> {
        self.0.binary_search_by(|(n, _)| (**n).cmp(field)).ok().map(|i| &*self.0[i].1)
    }
}

impl Client {
    /// The client's id, out of `ids` (every client's, one after another).
    pub fn id_in<'i>(&self, ids: &'i str) -> &'i str {
        let (start, len) = (self.id.0 as usize, self.id.1 as usize);
        ids.get(start..start + len).unwrap_or_default()
    }

    /// The client's own credentials, by route index, sorted.
    pub fn own(&self) -> &[(usize, Credentials)] {
        self.extra.as_ref().map_or(&[], |e| &e.own)
    }

    /// The client's own credentials for route `r`, if it brings some: a
    /// length check for a client without any.
    pub fn own_credentials(&self, r: usize) -> Option<&Credentials> {
        let own = self.own();
        own.binary_search_by_key(&r, |(route, _)| *route).ok().map(|i| &own[i].1)
    }

    /// The client's metadata, if it has some.
    pub fn metadata(&self) -> Option<&Metadata> {
        self.extra.as_ref().and_then(|e| e.metadata.as_ref())
    }

    /// The client's limits on all its routes together.
    pub fn limits_all(&self) -> &[Limit] {
        self.extra.as_ref().map_or(&[], |e| &e.limits.all)
    }

    /// The client's own limits for route `r`, if it has some (possibly
    /// none: an empty list exempts it from the route's default).
    pub fn limits_for_route(&self, r: usize) -> Option<&[Limit]> {
        self.extra.as_ref().and_then(|e| e.limits.for_route(r))
    }

    /// True when the client has no limits of its own.
    pub fn has_no_limits(&self) -> bool {
        self.extra.as_ref().is_none_or(|e| e.limits.is_empty())
    }
}

/// One key: the client's only one (`key_sha256` or `key` on the client,
/// no id, no window of its own), or one of its `keys`. 48 bytes: what a
/// key of `keys` adds lives behind one pointer, absent for the single-key
/// form.
#[derive(Debug)]
pub(crate) struct Key {
    pub digest: [u8; 32],
    /// Index into [`Policy::clients`].
    pub client: u32,
    /// `None` for a client's single key.
    pub listed: Option<Box<Listed>>,
}

/// What a key of a client's `keys` has of its own.
#[derive(Debug)]
pub(crate) struct Listed {
    /// The non-secret id (given, or [`crate::key_id`]).
    pub id: Box<str>,
    /// Unix seconds; the key is refused before this instant.
    pub not_before: Option<i64>,
    /// Unix seconds; the key is refused from this instant on.
    pub expires: Option<i64>,
    pub disabled: bool,
}

/// The non-secret id of a key listed in `keys` without an `id`: `k-` and
/// the first 12 hex digits of SHA-256(`keyswap key id\0` ‖ the key's
/// digest). A digest of the digest, under a label of its own, so the id
/// is not a prefix of the digest (nothing in the configuration can be
/// looked up by it) and says nothing of the key beyond what the digest
/// already would: telling a key from its id means guessing the key
/// itself, hopeless for a random key of 256 bits (what `keyswap new-key`
/// and `keyswap rotate` make). A weak, human-chosen key should be given
/// an `id` instead. 48 bits keep ids short and apart within a client (a
/// repeat is refused at load anyway).
pub fn key_id(digest: &[u8; 32]) -> String {
    use sha2::{Digest as _, Sha256};
    let mut hash = Sha256::new();
    hash.update(b"keyswap key id\0");
    hash.update(digest);
    let out = hash.finalize();
    let mut id = String::with_capacity(14);
    id.push_str("k-");
    for b in out.iter().take(6) {
        id.push_str(&format!("{b:02x}"));
    }
    id
}

#[derive(Debug, Clone)]
pub(crate) enum Allowed {
    All,
    /// Sorted route indices, shared by every client with the same list
    /// (100,000 clients hold a handful of distinct lists).
    Only(std::sync::Arc<[usize]>),
}

impl Allowed {
    /// True when route `r` may be used.
    pub fn allows(&self, r: usize) -> bool {
        match self {
            Allowed::All => true,
            Allowed::Only(routes) => routes.binary_search(&r).is_ok(),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum KeySource {
    /// `prefix` is lower case and compared case-insensitively.
    Header {
        name: String,
        prefix: Option<Vec<u8>>,
    },
    Query {
        name: Vec<u8>,
    },
}

#[derive(Debug)]
pub(crate) struct Route {
    pub name: String,
    pub matcher: RouteMatch,
    /// The route's own `inject` list; `None` when every client allowed on
    /// the route brings its own (checked at configuration).
    pub credentials: Option<Credentials>,
    /// Every query parameter name injected on this route, by the route or
    /// by a client's own list: what a `location` sent back loses.
    pub query_names: Vec<Vec<u8>>,
    /// The providers any request on this route may read (the route's own
    /// and every client's for it), sorted, once each.
    pub any_providers: Vec<usize>,
    /// The route's default limits, counted per client (`routes[].limits`).
    pub limits: Box<[Limit]>,
    /// Whether some request on this route may meet a rate, a quota (any
    /// client's, for this route or for all): which of `rate_limited` and
    /// `quota_exceeded` the route can answer.
    pub limited: (bool, bool),
}

/// One `inject` list, compiled: a route's own, or a client's for a route.
/// A forwarded request gets exactly one of them, whole.
#[derive(Debug)]
pub(crate) struct Credentials {
    pub headers: Vec<HeaderInject>,
    pub queries: Vec<QueryInject>,
    /// The static credentials in every form a response could hand them
    /// back in (the secret after its prefix, a Basic password decoded, a
    /// query value raw and encoded), for [`Policy::reflections`].
    pub echoes: Echoes,
    /// Dynamic credentials (see [`crate::credential`]).
    pub dynamic: Vec<DynamicInject>,
    /// The providers `dynamic` reads, sorted, once each.
    pub providers: Vec<usize>,
}

impl Credentials {
    /// Every header name this list sets.
    pub fn header_names(&self) -> impl Iterator<Item = &String> {
        self.headers.iter().map(|h| &h.name).chain(self.dynamic.iter().filter_map(|d| match &d.target {
            InjectTarget::Header(name) => Some(name),
            InjectTarget::Query(_) => None,
        }))
    }

    /// Every query parameter name this list sets.
    pub fn query_names(&self) -> impl Iterator<Item = &Vec<u8>> {
        self.queries.iter().map(|q| &q.name).chain(self.dynamic.iter().filter_map(|d| match &d.target {
            InjectTarget::Query(name) => Some(name),
            InjectTarget::Header(_) => None,
        }))
    }
}

/// Secret values; `Debug` shows how many, never one.
pub(crate) struct Echoes(pub Vec<String>);

impl std::fmt::Debug for Echoes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Echoes({} values)", self.0.len())
    }
}

#[derive(Debug)]
pub(crate) struct RouteMatch {
    pub route_name: Option<String>,
    /// Envoy clusters; `None` only where keyswap itself routes.
    pub clusters: Option<Vec<String>>,
    pub path_prefix: Option<String>,
    /// Lower case, without a port.
    pub host: Option<String>,
}

pub(crate) struct HeaderInject {
    pub name: String,
    /// The full header value, prefix included.
    pub value: String,
}

pub(crate) struct QueryInject {
    pub name: Vec<u8>,
    /// `name=value`, percent-encoded.
    pub encoded: String,
}

/// The name only, never the credential.
impl std::fmt::Debug for HeaderInject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeaderInject").field("name", &self.name).finish_non_exhaustive()
    }
}

/// The name only, never the credential.
impl std::fmt::Debug for QueryInject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueryInject").field("name", &String::from_utf8_lossy(&self.name)).finish_non_exhaustive()
    }
}

/// Where one dynamic value goes in a forwarded request.
#[derive(Debug)]
pub(crate) struct DynamicInject {
    /// The provider, by number.
    pub provider: usize,
    /// Index into the provider's values.
    pub value: usize,
    pub prefix: String,
    pub target: InjectTarget,
}

/// A header or a query parameter.
#[derive(Debug, Clone)]
pub(crate) enum InjectTarget {
    Header(String),
    Query(Vec<u8>),
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

impl Summary {
    /// How the filter's log line that a configuration is loaded starts:
    /// the one contract every tool that waits for a configuration reads
    /// ([`Self::log_line`] writes it, [`Self::from_log_line`] reads it).
    pub const LOG_PREFIX: &'static str = "keyswap: configuration loaded: ";

    /// `keyswap: configuration loaded: N clients, M routes, version V`.
    pub fn log_line(&self) -> String {
        format!("{}{self}", Self::LOG_PREFIX)
    }

    /// The summary in a log line that carries [`Self::log_line`] anywhere
    /// (Envoy prefixes it with its own fields), or `None`.
    pub fn from_log_line(line: &str) -> Option<Self> {
        let (_, rest) = line.split_once(Self::LOG_PREFIX)?;
        let (clients, rest) = rest.split_once(" clients, ")?;
        let (routes, version) = rest.split_once(" routes, version ")?;
        let version = version.trim_end();
        let hex = !version.is_empty() && version.bytes().all(|b| b.is_ascii_hexdigit());
        Some(Self {
            clients: clients.parse().ok()?,
            routes: routes.parse().ok()?,
            version: hex.then(|| version.to_string())?,
        })
    }
}

#[cfg(test)]
mod summary_tests {
    use super::Summary;

    #[test]
    fn the_log_line_reads_back() {
        let summary = Summary { clients: 12, routes: 3, version: "1c0ffee2d4a1".into() };
        let line = format!("[2026-12-02 06:00:00.000][7][info][wasm] wasm log keyswap: {}", summary.log_line());
        assert_eq!(Summary::from_log_line(&line), Some(summary.clone()));
        assert_eq!(Summary::from_log_line(&summary.log_line()), Some(summary));
        for bad in [
            "keyswap: configuration loaded: x clients, 3 routes, version ab",
            "no line",
            "keyswap: configuration loaded: 1 clients, 2 routes, version ",
        ] {
            assert_eq!(Summary::from_log_line(bad), None, "{bad}");
        }
    }
}

impl Policy {
    /// Client `c`'s id.
    pub(crate) fn client_id(&self, c: &Client) -> &str {
        c.id_in(&self.client_ids)
    }

    /// Counts and version, never a key or credential.
    pub fn summary(&self) -> Summary {
        Summary { clients: self.clients.len(), routes: self.routes.len(), version: self.version.clone() }
    }

    /// The route names, in configuration order.
    pub fn route_names(&self) -> impl Iterator<Item = &str> {
        self.routes.iter().map(|r| r.name.as_str())
    }

    /// Every Envoy cluster some route is bound to (`match.clusters`),
    /// sorted, once each: where keyswap's final stage must run.
    pub fn bound_clusters(&self) -> &[String] {
        &self.bound_clusters
    }

    /// Clients whose key would be accepted at `now` (not disabled, not
    /// expired).
    pub fn active_clients(&self, now: i64) -> usize {
        let mut active = vec![false; self.clients.len()];
        for key in self.keys.iter().filter(|k| k.accepts_at(now)) {
            if let Some(slot) = active.get_mut(key.client()) {
                *slot = true;
            }
        }
        let live =
            |(c, client): (usize, &Client)| active[c] && !client.disabled && client.expires.is_none_or(|at| now < at);
        self.clients.iter().enumerate().filter(|&c| live(c)).count()
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

    /// True when responses may need edits at all.
    pub fn strips_responses(&self) -> bool {
        !self.strip_response.is_empty()
    }

    /// Every dynamic credential provider, in configuration order; an index
    /// into it is a provider number.
    pub fn credential_providers(&self) -> &[Provider] {
        &self.providers
    }

    /// The field path of the first rate limit or quota in the
    /// configuration (`routes[1].limits`), or `None` when it has none: a
    /// host that cannot count them refuses the configuration with it.
    pub fn first_limit(&self) -> Option<&str> {
        self.first_limit.as_deref()
    }

    /// True when some provider keeps one record per client (a `{client}`
    /// fetch) or per subject (an on-behalf-of exchange): a host able to
    /// hold a request until its first value arrives runs the broker then
    /// ([`crate::Decision::Wait`]).
    pub fn has_keyed_credentials(&self) -> bool {
        self.providers.iter().any(|p| p.keyed.is_some())
    }

    /// The caller's own token for a per-client fetch's credential service:
    /// the value of `caller_token_header`, when configured and present
    /// once with a value fit for a header (else `None`: the configured
    /// `authorization` is used). The first stage reads it before removing
    /// the header with every other protected name; it never reaches an
    /// upstream.
    pub fn caller_token<'r>(&self, req: &crate::RequestView<'r>) -> Option<&'r [u8]> {
        let name = self.caller_token_header.as_deref()?;
        let mut found = req.headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case(name));
        let (_, value) = found.next()?;
        let fit = !value.is_empty()
            && value.len() <= crate::MAX_KEY_BYTES * 2
            && value.iter().all(|&b| b == b' ' || b.is_ascii_graphic());
        (found.next().is_none() && fit).then_some(value.as_slice())
    }

    /// True when some provider is an on-behalf-of exchange, reading the
    /// caller's subject token from the request ([`Self::subject_token`]).
    pub fn has_subject_credentials(&self) -> bool {
        self.subject_source.is_some()
    }

    /// The subject token of an on-behalf-of exchange: the configured
    /// header's value after its prefix (compared case-insensitively),
    /// trimmed, when present once, non-empty, at most
    /// [`crate::credential::MAX_SUBJECT_BYTES`] and visible ASCII; else
    /// `None` (answered `missing_subject_token` on a route that needs it).
    /// The first stage reads it before removing the header with every
    /// other protected name; it never reaches an upstream.
    pub fn subject_token<'r>(&self, req: &crate::RequestView<'r>) -> Option<&'r [u8]> {
        let source = self.subject_source.as_ref()?;
        let mut found = req.headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case(&source.header));
        let (_, value) = found.next()?;
        if found.next().is_some() {
            return None;
        }
        let value = value.trim_ascii();
        let token = match &source.prefix {
            Some(prefix) => {
                let head = value.get(..prefix.len())?;
                if !head.eq_ignore_ascii_case(prefix) {
                    return None;
                }
                value[prefix.len()..].trim_ascii()
            }
            None => value,
        };
        let fit = !token.is_empty()
            && token.len() <= crate::credential::MAX_SUBJECT_BYTES
            && token.iter().all(u8::is_ascii_graphic);
        fit.then_some(token)
    }

    /// The providers a route's requests may need, by number: the route's
    /// own and those of every client's own list for it (empty for a route
    /// whose credentials are all static, or no such route).
    pub fn route_providers(&self, route: &str) -> &[usize] {
        self.routes.iter().find(|r| r.name == route).map_or(&[], |r| r.any_providers.as_slice())
    }
}

impl Key {
    /// The key's id, when it is one of its client's `keys`.
    pub fn id(&self) -> Option<&str> {
        self.listed.as_deref().map(|l| &*l.id)
    }

    /// The client's index in [`Policy::clients`].
    pub fn client(&self) -> usize {
        self.client as usize
    }

    /// True when the key itself (not its client) is accepted at `now`.
    pub fn accepts_at(&self, now: i64) -> bool {
        self.listed.as_deref().is_none_or(|l| {
            !l.disabled && l.not_before.is_none_or(|at| now >= at) && l.expires.is_none_or(|at| now < at)
        })
    }
}

/// Finds a key by digest in O(1): a hash map on the digest's first
/// 64 bits (already uniformly spread, so it is used as the hash), then a
/// constant-time comparison of the whole digest.
#[derive(Debug, Default)]
pub(crate) struct ClientIndex {
    first: HashMap<u64, usize, BuildHasherDefault<PrefixHasher>>,
    /// Keys whose digest shares its first 64 bits with an earlier one.
    colliding: Vec<usize>,
}

impl ClientIndex {
    pub fn with_capacity(n: usize) -> Self {
        Self { first: HashMap::with_capacity_and_hasher(n, Default::default()), colliding: Vec::new() }
    }

    /// Adds key `index`; on a duplicate digest returns the earlier key.
    pub fn insert(&mut self, keys: &[Key], digest: &[u8; 32], index: usize) -> Option<usize> {
        if let Some(earlier) = self.find(keys, digest) {
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

    pub fn find(&self, keys: &[Key], digest: &[u8; 32]) -> Option<usize> {
        let same = |k: &usize| keys.get(*k).is_some_and(|k| bool::from(k.digest.ct_eq(digest)));
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
mod key_id_tests {
    use super::key_id;

    #[test]
    fn a_derived_key_id_is_stable_short_and_not_the_digest() {
        use sha2::{Digest as _, Sha256};
        let digest: [u8; 32] = Sha256::digest(b"rotating-new-key").into();
        // The value the conformance cases (configs/keys.json) expect.
        assert_eq!(key_id(&digest), "k-0f3d0b098e94");
        assert_eq!(key_id(&digest), key_id(&digest));
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        assert!(!hex.contains(&key_id(&digest)[2..]), "the id is no part of the digest");
        assert_ne!(key_id(&[0; 32]), key_id(&[1; 32]));
    }

    /// 100,000 single-key clients pay for the digest, the client number
    /// and one absent pointer per key, and a client without its own
    /// credentials, metadata or limits is 56 bytes (64-bit; less in wasm32).
    #[test]
    fn a_key_and_a_plain_client_stay_small() {
        assert!(std::mem::size_of::<super::Key>() <= 48, "{}", std::mem::size_of::<super::Key>());
        assert!(std::mem::size_of::<super::Client>() <= 56, "{}", std::mem::size_of::<super::Client>());
    }
}
