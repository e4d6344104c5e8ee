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
    pub headers: Vec<HeaderInject>,
    pub queries: Vec<QueryInject>,
    /// The static credentials in every form a response could hand them
    /// back in (the secret after its prefix, a Basic password decoded, a
    /// query value raw and encoded), for [`Policy::reflections`].
    pub echoes: Echoes,
    /// Dynamic credentials (see [`crate::credential`]).
    pub dynamic: Vec<crate::credential::DynamicInject>,
    /// The sources `dynamic` reads, sorted, once each.
    pub sources: Vec<usize>,
}

/// Secret values; `Debug` shows how many, never one.
pub(crate) struct Echoes(pub Vec<Vec<u8>>);

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

    /// Every Envoy cluster some route is bound to (`match.clusters`),
    /// sorted, once each: where keyswap's final stage must run.
    pub fn bound_clusters(&self) -> &[String] {
        &self.bound_clusters
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

    /// Decides one request in one pass, for a host that reads the key and
    /// routes in the same place (the component, the native runner): the
    /// key is read here, then [`Self::decide_with`]. `now` gives Unix
    /// seconds and is called only when the client has an `expires` time.
    pub fn decide<'p>(&'p self, req: &RequestView<'_>, now: &dyn Fn() -> i64) -> Decision<'p> {
        self.decide_with(req, &self.key_check(req), now)
    }

    /// What the request presents as a key, read from every key source:
    /// the first stage in Envoy, before routing is final.
    pub fn key_check(&self, req: &RequestView<'_>) -> KeyCheck {
        match self.presented_key(req) {
            Presented::None => KeyCheck::Missing,
            Presented::Conflicting => KeyCheck::Ambiguous,
            Presented::One(key) if key.len() > MAX_KEY_BYTES => KeyCheck::TooLong,
            Presented::One(key) => KeyCheck::Digest(Sha256::digest(&key).into()),
        }
    }

    /// The first stage's edits in Envoy, made before the route is final:
    /// every key source, `strip_request_headers`, the client-id header and
    /// their look-alikes removed, the key parameters and any fragment
    /// dropped from the path. Nothing is added: credentials are set only
    /// by [`Self::decide_with`] on the final route.
    pub fn admit<'p>(&'p self, req: &RequestView<'_>) -> Forward<'p> {
        let present = |name: &str| req.headers.iter().any(|(n, _)| n.eq_ignore_ascii_case(name));
        let remove_headers = self.protected.iter().map(String::as_str).filter(|n| present(n)).collect();
        Forward {
            route: None,
            client: None,
            remove_headers,
            remove_look_alikes: self.look_alikes(req),
            add_headers: Vec::new(),
            path: self.rewrite_query(req.path, &[]),
        }
    }

    /// Decides one request on its final route (`route_name`, `cluster`)
    /// with the key the first stage read. `now` gives Unix seconds and is
    /// called only when the client has an `expires` time.
    pub fn decide_with<'p>(&'p self, req: &RequestView<'_>, key: &KeyCheck, now: &dyn Fn() -> i64) -> Decision<'p> {
        let deny_unrouted = |reason| Decision::Deny(Denial { reason, route: None, client: None });
        if self.refuse_all {
            return deny_unrouted(DenialReason::ConfigurationUnavailable);
        }
        if self.matches_host && authority_host(req.authority).is_none() {
            return deny_unrouted(DenialReason::InvalidAuthority);
        }
        // A CONNECT opens a tunnel whose bytes keyswap never sees: no key
        // can be checked and no credential swapped inside it, so it matches
        // no route.
        let tunnel = req.method.eq_ignore_ascii_case(b"CONNECT");
        let route = if tunnel { None } else { self.routes.iter().position(|r| r.matcher.matches(req)) };
        let Some(r) = route else {
            // A request to a cluster some route is bound to is that route's
            // business: never passed unchecked.
            let bound =
                req.cluster.is_some_and(|c| self.bound_clusters.binary_search_by(|b| b.as_str().cmp(c)).is_ok());
            return match self.unmatched {
                UnmatchedRoute::Pass if !bound => Decision::Forward(self.forward(req, None, None)),
                _ => deny_unrouted(DenialReason::NoRoute),
            };
        };
        let route = &self.routes[r];
        let deny = |reason, client: Option<&'p Client>| {
            Decision::Deny(Denial { reason, route: Some(route.name.as_str()), client: client.map(|c| c.id.as_str()) })
        };
        // TRACE (and IIS's TRACK) ask the upstream to echo the request,
        // credential included, back to the client; so does either one asked
        // for through a method override many frameworks honour.
        if echoing_method(req.method) || overridden_to_echo(req) {
            return deny(DenialReason::MethodNotAllowed, None);
        }
        let digest = match key {
            KeyCheck::Missing => return deny(DenialReason::MissingKey, None),
            KeyCheck::Ambiguous => return deny(DenialReason::AmbiguousKey, None),
            KeyCheck::TooLong => return deny(DenialReason::InvalidKey, None),
            KeyCheck::Digest(digest) => digest,
        };
        let Some(client) = self.index.find(&self.clients, digest).map(|c| &self.clients[c]) else {
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

    /// Client-sent header names that are a protected name with `_` for
    /// `-` (`x_api_key`, `X_Keyswap_Client`), to remove.
    fn look_alikes(&self, req: &RequestView<'_>) -> Vec<String> {
        self.protected_names(req.headers.iter().filter(|(n, _)| n.contains('_')))
    }

    /// The names among `fields` that are protected, read with `_` for `-`.
    fn protected_names<'f>(&self, fields: impl Iterator<Item = &'f (String, Vec<u8>)>) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for (name, _) in fields {
            let normal = name.replace('_', "-");
            if self.protected.iter().any(|p| p.eq_ignore_ascii_case(&normal)) && !out.contains(name) {
                out.push(name.clone());
            }
        }
        out
    }

    /// Request trailers to remove: every protected name (key sources,
    /// `strip_request_headers`, the client-id header, injected names) and
    /// their look-alikes. Trailers reach an HTTP/2 upstream, or an
    /// HTTP/1.1 one with trailers enabled, after every header edit.
    pub fn trailer_removals(&self, trailers: &[(String, Vec<u8>)]) -> Vec<String> {
        self.protected_names(trailers.iter())
    }

    /// Response headers that would hand a credential the route injected
    /// back to the client, with what to do: `Some(value)` replaces a
    /// `location` or `content-location` whose query carried an injected
    /// parameter (the parameter removed), `None` removes the header (any
    /// other header holding a secret). `dynamic` are the values the host
    /// injected for the route's dynamic credentials.
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
        let encoded: Vec<String> = dynamic.iter().map(|d| crate::query::encode_component(d)).collect();
        let secrets: Vec<&[u8]> = route
            .echoes
            .0
            .iter()
            .map(Vec::as_slice)
            .chain(dynamic.iter().map(|d| d.as_bytes()))
            .chain(encoded.iter().map(String::as_bytes))
            .collect();
        let query_names = route.queries.iter().map(|q| q.name.as_slice()).collect::<Vec<_>>();
        let holds = |value: &[u8]| secrets.iter().any(|s| contains_secret(value, s));
        let mut out = Vec::new();
        for (name, value) in headers {
            if !holds(value) {
                continue;
            }
            let uri = name.eq_ignore_ascii_case("location") || name.eq_ignore_ascii_case("content-location");
            let cleaned = uri.then(|| self.without_params(value, &query_names, &route.dynamic));
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

    /// A URI without the route's injected query parameters.
    fn without_params(&self, uri: &[u8], names: &[&[u8]], dynamic: &[crate::credential::DynamicInject]) -> Vec<u8> {
        let injected = |n: &[u8]| {
            names.contains(&n)
                || dynamic.iter().any(|d| matches!(&d.target, crate::credential::Target::Query(q) if q.as_slice() == n))
        };
        let (base, query, _) = query::split_path(uri);
        let mut out = base.to_vec();
        let mut first = true;
        for p in query::params(query.unwrap_or(b"")) {
            if !injected(&p.name()) && !p.raw.is_empty() {
                out.push(if first { b'?' } else { p.separator });
                out.extend_from_slice(p.raw);
                first = false;
            }
        }
        out
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
        for name in self.protected.iter().map(String::as_str) {
            if present(name) {
                remove_headers.push(name);
            }
        }
        // An upstream's `100 Continue` would reach the client unfiltered
        // (Envoy with `proxy_100_continue`): a credentialed request asks for
        // none.
        if route.is_some() && present("expect") {
            remove_headers.push("expect");
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
            remove_look_alikes: self.look_alikes(req),
            add_headers,
            path,
        }
    }

    /// The new path without key parameters and client-sent copies of any
    /// route's injected ones, with `injected` appended, and without a
    /// fragment (never part of a request target, and a place to hide a key
    /// or a second credential from the query rewrite); `None` when nothing
    /// changes.
    pub(crate) fn rewrite_query(&self, path: &[u8], injected: &[QueryInject]) -> Option<Vec<u8>> {
        // By the name as upstream frameworks read it: `api.key`, `API_KEY`
        // and `api_key[]` are `api_key` to PHP, ASP.NET or Rack.
        // (`injected` are among them.)
        let removed = |p: &Param<'_>| {
            let name = p.canonical_name();
            self.reserved_query_names.contains(&name)
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

/// What a request presented as a key, as the first stage hands it to the
/// decision: never the key itself, only its SHA-256 (what the
/// configuration stores too).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyCheck {
    /// No key in any key source.
    Missing,
    /// Different keys in different places.
    Ambiguous,
    /// A key longer than [`MAX_KEY_BYTES`], never hashed.
    TooLong,
    /// The SHA-256 of the one key presented.
    Digest([u8; 32]),
}

impl KeyCheck {
    /// The record the first stage leaves for the second (Envoy filter
    /// state): one tag byte, and the digest after `d`.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            KeyCheck::Missing => b"m".to_vec(),
            KeyCheck::Ambiguous => b"a".to_vec(),
            KeyCheck::TooLong => b"l".to_vec(),
            KeyCheck::Digest(d) => {
                let mut out = Vec::with_capacity(33);
                out.push(b'd');
                out.extend_from_slice(d);
                out
            }
        }
    }

    /// The record back; `None` for anything [`Self::encode`] never writes.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        match bytes {
            b"m" => Some(KeyCheck::Missing),
            b"a" => Some(KeyCheck::Ambiguous),
            b"l" => Some(KeyCheck::TooLong),
            [b'd', digest @ ..] => <[u8; 32]>::try_from(digest).ok().map(KeyCheck::Digest),
            _ => None,
        }
    }
}

fn echoing_method(method: &[u8]) -> bool {
    let method = trim_ows(method);
    method.eq_ignore_ascii_case(b"TRACE") || method.eq_ignore_ascii_case(b"TRACK")
}

/// Method overrides (`X-HTTP-Method-Override` and its kin, `_method=` in
/// the query) asking for an echoing method.
fn overridden_to_echo(req: &RequestView<'_>) -> bool {
    const HEADERS: [&str; 3] = ["x-http-method-override", "x-http-method", "x-method-override"];
    let header = req.headers.iter().any(|(n, v)| {
        let normal = n.replace('_', "-");
        HEADERS.iter().any(|h| normal.eq_ignore_ascii_case(h)) && v.split(|&b| b == b',').any(echoing_method)
    });
    header || query::params(req.query()).any(|p| p.canonical_name() == b"_method" && echoing_method(&p.value()))
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
        if let Some(clusters) = &self.clusters {
            if !req.cluster.is_some_and(|c| clusters.iter().any(|b| b == c)) {
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
            if !authority_host(req.authority).is_some_and(|h| h.eq_ignore_ascii_case(host.as_bytes())) {
                return false;
            }
        }
        true
    }
}

/// The host of an authority (`host[:port]`, IPv6 literals in brackets),
/// read strictly (RFC 3986 3.2): `None` for an empty host, an empty,
/// doubled or non-numeric port, user information, or any byte a host
/// cannot hold. Such an authority is refused, never matched loosely.
pub(crate) fn authority_host(authority: &[u8]) -> Option<&[u8]> {
    let (host, port) = if authority.first() == Some(&b'[') {
        let end = authority.iter().position(|&b| b == b']')?;
        let literal = &authority[1..end];
        if literal.is_empty() || !literal.iter().all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.') {
            return None;
        }
        (&authority[..=end], &authority[end + 1..])
    } else {
        match authority.iter().position(|&b| b == b':') {
            Some(colon) => (&authority[..colon], &authority[colon..]),
            None => (authority, &authority[authority.len()..]),
        }
    };
    let reg_name = |b: &u8| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=%".contains(b);
    if host.is_empty() || (host[0] != b'[' && !host.iter().all(reg_name)) {
        return None;
    }
    match port {
        [] => Some(host),
        [b':', digits @ ..] if (1..=5).contains(&digits.len()) && digits.iter().all(u8::is_ascii_digit) => Some(host),
        _ => None,
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
        match Policy::from_json_for(json.as_bytes(), &|_: &str| None, crate::Routing::Own) {
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
    fn hosts_lose_their_port_and_malformed_authorities_have_no_host() {
        let host = authority_host;
        assert_eq!(host(b"api.example.com:8443"), Some(&b"api.example.com"[..]));
        assert_eq!(host(b"api.example.com"), Some(&b"api.example.com"[..]));
        assert_eq!(host(b"[::1]:80"), Some(&b"[::1]"[..]));
        assert_eq!(host(b"[::1]"), Some(&b"[::1]"[..]));
        for bad in [
            &b"registry.internal:"[..],
            b"registry.internal:80:80",
            b"registry.internal:http",
            b"registry.internal:123456",
            b":80",
            b"",
            b"user@registry.internal",
            b"registry.internal/x",
            b"registry internal",
            b"[::1]:",
            b"[::1]x",
            b"[]",
            b"[::1",
        ] {
            assert_eq!(host(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn key_check_records_round_trip() {
        for check in [KeyCheck::Missing, KeyCheck::Ambiguous, KeyCheck::TooLong, KeyCheck::Digest([7; 32])] {
            assert_eq!(KeyCheck::decode(&check.encode()), Some(check));
        }
        for bad in [&b""[..], b"x", b"d", b"dshort", &[b'd'; 34]] {
            assert_eq!(KeyCheck::decode(bad), None);
        }
    }

    /// An Envoy configuration: `a` bound to cluster `ca`, `q` to `cq` with a
    /// query credential.
    fn bound(unmatched: &str) -> Policy {
        let json = format!(
            r#"{{"clients": [{{"id": "c", "key": "k1", "routes": ["a", "q"]}}],
                "key_sources": [{{"header": "authorization", "prefix": "Bearer "}}, {{"query": "api_key"}}],
                "routes": [{{"name": "a", "match": {{"route_name": "ra", "clusters": ["ca"]}},
                             "inject": [{{"header": "x-upstream-key", "value": {{"inline": "secret-for-a-123"}}}}]}},
                           {{"name": "q", "match": {{"clusters": ["cq"]}},
                             "inject": [{{"query": "key", "value": {{"inline": "query secret/456"}}}}]}}],
                "client_id_header": "x-keyswap-client",
                "unmatched_route": "{unmatched}"}}"#
        );
        match Policy::from_json(json.as_bytes(), &|_: &str| None) {
            Ok(policy) => policy,
            Err(err) => panic!("{err}"),
        }
    }

    fn decide_on<'p>(
        p: &'p Policy,
        headers: &[(String, Vec<u8>)],
        route: Option<&str>,
        cluster: Option<&str>,
    ) -> Decision<'p> {
        let view = RequestView::from_headers(None, headers);
        let key = p.key_check(&view);
        let mut view = RequestView::from_headers(route, headers);
        view.cluster = cluster;
        p.decide_with(&view, &key, &|| 0)
    }

    #[test]
    fn a_route_matches_only_on_a_cluster_it_is_bound_to() {
        let p = bound("deny");
        let keyed = request("GET", "/", &[("authorization", "Bearer k1")]);
        assert!(matches!(decide_on(&p, &keyed, Some("ra"), Some("ca")), Decision::Forward(f) if f.route == Some("a")));
        for (route, cluster) in [(Some("ra"), Some("other")), (Some("ra"), None), (Some("other"), Some("ca"))] {
            match decide_on(&p, &keyed, route, cluster) {
                Decision::Deny(d) => assert_eq!(d.reason, DenialReason::NoRoute, "{route:?} {cluster:?}"),
                Decision::Forward(f) => panic!("{route:?} {cluster:?}: forwarded on {:?}", f.route),
            }
        }
    }

    #[test]
    fn pass_never_passes_a_bound_cluster() {
        let p = bound("pass");
        let keyed = request("GET", "/", &[("authorization", "Bearer k1")]);
        // Another Envoy route to a bound cluster: refused, not passed.
        assert!(
            matches!(decide_on(&p, &keyed, Some("other"), Some("ca")), Decision::Deny(d) if d.reason == DenialReason::NoRoute)
        );
        // An unbound cluster: passed, with no credential.
        match decide_on(&p, &keyed, Some("other"), Some("elsewhere")) {
            Decision::Forward(f) => assert!(f.route.is_none() && f.add_headers.is_empty() && f.path.is_none()),
            Decision::Deny(d) => panic!("{d:?}"),
        }
    }

    #[test]
    fn trace_is_refused_on_a_route_before_the_key() {
        let p = bound("deny");
        for method in ["TRACE", "TRACK", "trace"] {
            let unkeyed = request(method, "/", &[]);
            assert!(
                matches!(decide_on(&p, &unkeyed, Some("ra"), Some("ca")),
                Decision::Deny(d) if d.reason == DenialReason::MethodNotAllowed),
                "{method}"
            );
        }
    }

    #[test]
    fn query_look_alikes_of_key_and_credential_parameters_are_removed() {
        let p = bound("deny");
        let target =
            "/x?api.key=k1&API_KEY=k1&api_key[]=k1&+api_key=k1&api%00_key=k1&key[]=mine&KEY=mine&key.=x&keep=1";
        let headers = request("GET", target, &[("authorization", "Bearer k1")]);
        let admit = p.admit(&RequestView::from_headers(None, &headers));
        assert_eq!(admit.path.as_deref(), Some(&b"/x?key.=x&keep=1"[..]), "`key.` is `key_` to PHP, not `key`");
        match decide_on(&p, &headers, None, Some("cq")) {
            Decision::Forward(f) => {
                let path = String::from_utf8_lossy(f.path.as_deref().unwrap_or_default()).into_owned();
                assert_eq!(path, "/x?key.=x&keep=1&key=query%20secret%2F456");
            }
            Decision::Deny(d) => panic!("{d:?}"),
        }
    }

    #[test]
    fn the_first_stage_removes_every_reserved_name_and_adds_nothing() {
        let p = bound("deny");
        let headers = request(
            "GET",
            "/x?api_key=k1&key=mine&api%5Fkey=k1&keep=1#frag",
            &[
                ("authorization", "Bearer k1"),
                ("x-upstream-key", "forged"),
                ("x_upstream_key", "forged"),
                ("X_Keyswap_Client", "admin"),
                ("x_other", "kept"),
            ],
        );
        let admit = p.admit(&RequestView::from_headers(None, &headers));
        assert!(admit.add_headers.is_empty());
        let mut edited = headers.clone();
        admit.apply(&mut edited);
        let names: Vec<&str> = edited.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, [":method", ":path", ":authority", "x_other"]);
        assert_eq!(edited[1].1, b"/x?keep=1");
    }

    #[test]
    fn trailers_lose_every_protected_name_and_look_alike() {
        let p = bound("deny");
        let trailers: Vec<(String, Vec<u8>)> =
            ["authorization", "x-keyswap-client", "x_upstream_key", "x-upstream-key", "grpc-status"]
                .iter()
                .map(|n| (n.to_string(), b"v".to_vec()))
                .collect();
        assert_eq!(
            p.trailer_removals(&trailers),
            ["authorization", "x-keyswap-client", "x_upstream_key", "x-upstream-key"]
        );
    }

    #[test]
    fn responses_never_carry_an_injected_secret_back() {
        let p = bound("deny");
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
