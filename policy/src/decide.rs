//! The decision for one request: [`Policy::decide`], the one entry point,
//! and what Envoy's first stage asks before routing is final
//! ([`Policy::key_check`], [`Policy::admit`]).
//!
//! ```text
//!  RequestView (+ the first stage's KeyCheck) ──decide(now, records)──▶ Decision
//!      refuse_all? authority? route? echoing method? key? client? allowed?
//!      └─▶ Forward: protected names removed, one inject list (the client's
//!          own for the route, else the route's) set whole (static, and
//!          dynamic read from SharedRecords: all or none), the client id
//!          added, the query rewritten
//! ```

use std::borrow::Cow;
use std::cell::Cell;

use sha2::{Digest as _, Sha256};

use crate::credential::{Provider, SharedRecords, Slot, Used};
use crate::decision::{Decision, Denial, DenialReason, Forward, Wait};
use crate::limit::{NoCounters, SharedCounters};
use crate::model::{Client, Credentials, InjectTarget, Key, KeySource, Policy, QueryInject, Route, RouteMatch};
use crate::query::{self, encode_component, Param};
use crate::raw::UnmatchedRoute;
use crate::request::{KeyCheck, RequestView, MAX_KEY_BYTES};

/// The host's clock, read at most once per decision and only when needed
/// (a client with `expires`, a route with dynamic credentials).
struct Now<'c> {
    clock: &'c dyn Fn() -> i64,
    read: Cell<Option<i64>>,
}

impl<'c> Now<'c> {
    fn new(clock: &'c dyn Fn() -> i64) -> Self {
        Self { clock, read: Cell::new(None) }
    }

    /// Unix milliseconds.
    fn millis(&self) -> i64 {
        match self.read.get() {
            Some(ms) => ms,
            None => {
                let ms = (self.clock)();
                self.read.set(Some(ms));
                ms
            }
        }
    }

    /// Unix seconds.
    fn seconds(&self) -> i64 {
        self.millis().div_euclid(1000)
    }
}

impl Policy {
    /// Decides one request, whole: the denial, or every edit of the
    /// forwarded request, dynamic credentials included.
    ///
    /// `req.key` is what Envoy's first stage read ([`Self::key_check`]);
    /// when it is `None` the key is read from `req` here (a host that
    /// decides in one pass). `now_ms` gives Unix milliseconds; it is called
    /// at most once, and only when the client has an `expires` time or the
    /// credentials it gets are dynamic. `records` holds the dynamic
    /// credentials' values; it is read once per provider of the inject
    /// list the request gets and never for a list of static credentials.
    ///
    /// The inject list is the client's own for the route when it brings
    /// one (`clients[].inject`), else the route's: one list, whole, never
    /// a mix of the two.
    ///
    /// This host keeps no counters ([`NoCounters`]): a request a rate limit
    /// or quota applies to is refused. Hosts that count use
    /// [`Self::decide_limited`].
    pub fn decide<'p>(
        &'p self,
        req: &RequestView<'_>,
        now_ms: &dyn Fn() -> i64,
        records: &dyn SharedRecords,
    ) -> Decision<'p> {
        self.decide_limited(req, now_ms, records, &mut NoCounters)
    }

    /// [`Self::decide`] with the host's rate-limit counters: once the key
    /// is accepted and the route allowed, and before any credential is
    /// read, the request is taken from every bucket of the client's limits
    /// that applies (`counters`, read and written only then), or refused
    /// `rate_limited` / `quota_exceeded` (see [`crate::limit`]).
    pub fn decide_limited<'p>(
        &'p self,
        req: &RequestView<'_>,
        now_ms: &dyn Fn() -> i64,
        records: &dyn SharedRecords,
        counters: &mut dyn SharedCounters,
    ) -> Decision<'p> {
        let read;
        let (key, subject) = match req.key {
            Some(key) => (key, req.subject),
            None => {
                read = self.key_check(req);
                (&read, self.subject_token(req))
            }
        };
        let now = Now::new(now_ms);
        let deny_unrouted = |reason| {
            Decision::Deny(Denial { reason, route: None, client: None, key: None, metadata: None, limit: None })
        };
        if let Some(denial) = self.refusal() {
            return Decision::Deny(denial);
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
                UnmatchedRoute::Pass if !bound => match self.forward(req, None, None, None, &now, records) {
                    Ok(forward) => Decision::Forward(forward),
                    Err(Refusal::Deny(reason)) => deny_unrouted(reason),
                    // Only a route's list has credentials to wait for.
                    Err(Refusal::Wait(..)) => deny_unrouted(DenialReason::CredentialUnavailable),
                },
                _ => deny_unrouted(DenialReason::NoRoute),
            };
        };
        let route = &self.routes[r];
        let deny = |reason, known: Option<(&'p Client, &'p Key)>| {
            Decision::Deny(Denial {
                reason,
                route: Some(route.name.as_str()),
                client: known.map(|(c, _)| self.client_id(c)),
                key: known.and_then(|(_, k)| k.id()),
                metadata: known.and_then(|(c, _)| c.metadata()),
                limit: None,
            })
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
        let Some(key) = self.index.find(&self.keys, digest).map(|k| &self.keys[k]) else {
            return deny(DenialReason::InvalidKey, None);
        };
        let Some(client) = self.clients.get(key.client()) else {
            return deny(DenialReason::InvalidKey, None);
        };
        let known = Some((client, key));
        if let Some(reason) = key_refusal(client, key, &|| now.seconds()) {
            return deny(reason, known);
        }
        if !client.allowed.allows(r) {
            return deny(DenialReason::RouteForbidden, known);
        }
        // Rate limits and quotas: a request refused here reads no credential.
        if let Err(refusal) = self.throttle(client, r, &|| now.millis(), counters) {
            let reason = if refusal.limit.is_quota() { DenialReason::QuotaExceeded } else { DenialReason::RateLimited };
            let limit = Some(refusal);
            let (route, key, metadata) = (Some(route.name.as_str()), key.id(), client.metadata());
            return Decision::Deny(Denial {
                reason,
                route,
                client: Some(self.client_id(client)),
                key,
                metadata,
                limit,
            });
        }
        // The client's own list for this route, else the route's: a
        // length check for a client without any list of its own.
        let inject = match client.own_credentials(r) {
            Some(own) => Injection { route, credentials: own, clients_own: true },
            None => match &route.credentials {
                Some(credentials) => Injection { route, credentials, clients_own: false },
                // Refused at configuration (a route with no `inject` needs a
                // list from every client allowed on it); fail closed anyway.
                None => return deny(DenialReason::CredentialUnavailable, known),
            },
        };
        // Dynamic credentials come all, or none.
        match self.forward(req, Some(inject), Some((client, key)), subject, &now, records) {
            Ok(forward) => Decision::Forward(forward),
            Err(Refusal::Deny(reason)) => deny(reason, known),
            Err(Refusal::Wait(slots, timeout_ms)) => {
                let metadata = client.metadata();
                let (route, client, key) = (route.name.as_str(), self.client_id(client), key.id());
                Decision::Wait(Wait { route, client, key, metadata, slots, timeout_ms })
            }
        }
    }

    /// The denial every request gets, at any stage, before anything is
    /// read: the fail-closed configuration (`"refuse_all": true`) lets
    /// nothing through. `None` for any other configuration.
    pub fn refusal(&self) -> Option<Denial<'static>> {
        self.refuse_all.then_some(Denial {
            reason: DenialReason::ConfigurationUnavailable,
            route: None,
            client: None,
            key: None,
            metadata: None,
            limit: None,
        })
    }

    /// The denials [`Self::decide`] can give a request on `route`, in
    /// [`DenialReason::ALL`]'s order (a host defines a counter for each):
    /// every reason but those given to no route, `credential_unavailable`
    /// only on a route with dynamic credentials, `missing_subject_token`
    /// and `invalid_subject_token` only on a route with an on-behalf-of
    /// exchange, and `rate_limited` and `quota_exceeded` only where a rate
    /// or a quota can apply.
    pub fn route_denials(&self, route: &str) -> impl Iterator<Item = DenialReason> {
        let providers = self.route_providers(route);
        let dynamic = !providers.is_empty();
        let on_behalf = providers.iter().any(|&p| self.providers.get(p).is_some_and(|p| p.subject.is_some()));
        let limited = self.route_limited(route);
        DenialReason::ALL.into_iter().filter(move |reason| match reason {
            DenialReason::NoRoute | DenialReason::InvalidAuthority | DenialReason::ConfigurationUnavailable => false,
            DenialReason::CredentialUnavailable => dynamic,
            DenialReason::MissingSubjectToken | DenialReason::InvalidSubjectToken => on_behalf,
            DenialReason::RateLimited => limited.0,
            DenialReason::QuotaExceeded => limited.1,
            _ => true,
        })
    }

    /// What [`Self::decide`] can answer a request that gets no route: the
    /// denials, and `None` for passing it on. Under `refuse_all`, only
    /// `configuration_unavailable`; else `no_route`, `invalid_authority`
    /// when some route matches on the host, and a pass with
    /// `unmatched_route: "pass"`.
    pub fn unrouted_outcomes(&self) -> Vec<Option<DenialReason>> {
        if self.refuse_all {
            return vec![Some(DenialReason::ConfigurationUnavailable)];
        }
        let mut outcomes = vec![Some(DenialReason::NoRoute)];
        if self.matches_host {
            outcomes.push(Some(DenialReason::InvalidAuthority));
        }
        if self.unmatched == UnmatchedRoute::Pass {
            outcomes.push(None);
        }
        outcomes
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
    /// by [`Self::decide`] on the final route.
    pub fn admit<'p>(&'p self, req: &RequestView<'_>) -> Forward<'p> {
        let present = |name: &str| req.headers.iter().any(|(n, _)| n.eq_ignore_ascii_case(name));
        let remove_headers = self.protected.iter().map(String::as_str).filter(|n| present(n)).collect();
        Forward {
            route: None,
            client: None,
            key: None,
            metadata: None,
            remove_headers,
            remove_look_alikes: self.look_alikes(req),
            add_headers: Vec::new(),
            path: self.rewrite_query(req.path, &[], &[]),
            secrets: Vec::new(),
            used: Vec::new(),
        }
    }

    /// The first stage's edits ([`Self::admit`]) for a request that
    /// presented `key` ([`Self::key_check`]): with `client_id_on_listener`,
    /// `client_id_header` is also set to the id of the key's client when
    /// the key is valid at `now_ms` (known, not `disabled`, not past
    /// `expires`), whatever the route; a client-sent copy is removed in
    /// any case. A rate-limit filter after keyswap on the listener keys its
    /// descriptor on it; the final stage removes it and sets it again on
    /// its own decision. The clock is read only for a client with
    /// `expires`; without the option this is [`Self::admit`].
    pub fn admit_with_id<'p>(&'p self, req: &RequestView<'_>, key: &KeyCheck, now_ms: &dyn Fn() -> i64) -> Forward<'p> {
        let mut admit = self.admit(req);
        if let (true, Some(name), KeyCheck::Digest(digest)) = (self.client_id_on_listener, &self.client_id_header, key)
        {
            let key = self.index.find(&self.keys, digest).and_then(|k| self.keys.get(k));
            let client = key.and_then(|k| Some((self.clients.get(k.client())?, k)));
            let valid = client.filter(|(c, k)| key_refusal(c, k, &|| now_ms().div_euclid(1000)).is_none());
            if let Some((client, _)) = valid {
                admit.add_headers.push((name.as_str(), Cow::Borrowed(self.client_id(client))));
            }
        }
        admit
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

    /// The forward for a request with `inject` (`None`: a passed request)
    /// by `client`, with the caller's `subject` token when it has one.
    ///
    /// # Errors
    /// [`DenialReason::CredentialUnavailable`] when one of the list's
    /// dynamic credentials has no usable value in `records` at `now`;
    /// [`Refusal::Wait`] when every one missing is a client's keyed value
    /// the request can wait for.
    fn forward<'p>(
        &'p self,
        req: &RequestView<'_>,
        inject: Option<Injection<'p>>,
        caller: Option<(&'p Client, &'p Key)>,
        subject: Option<&[u8]>,
        now: &Now<'_>,
        records: &dyn SharedRecords,
    ) -> Result<Forward<'p>, Refusal> {
        let client = caller.map(|(c, _)| c);
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
        if inject.is_some() && present("expect") {
            remove_headers.push("expect");
        }
        let credentials = inject.as_ref().map(|i| i.credentials);
        let mut add_headers: Vec<(&str, Cow<'p, str>)> = Vec::new();
        if let Some(credentials) = credentials {
            add_headers.extend(credentials.headers.iter().map(|h| (h.name.as_str(), Cow::Borrowed(h.value.as_str()))));
        }
        if let (Some(name), Some(client)) = (&self.client_id_header, client) {
            add_headers.push((name.as_str(), Cow::Borrowed(self.client_id(client))));
        }
        // The client's metadata fields `metadata_headers` names: a length
        // check for a client without metadata. Client-sent copies of these
        // headers are among the protected names, removed above.
        if let Some(metadata) = client.and_then(|c| c.metadata()) {
            for (field, header) in &self.metadata_headers {
                if let Some(value) = metadata.get(field) {
                    add_headers.push((header.as_str(), Cow::Borrowed(value)));
                }
            }
        }
        let injected: &[QueryInject] = credentials.map_or(&[], |c| c.queries.as_slice());
        let (path, mut secrets, used) = match credentials {
            // Static configurations pay nothing more: no clock, no read.
            Some(credentials) if !credentials.dynamic.is_empty() => {
                let key = client.map(|c| self.client_id(c));
                let dynamic = dynamic_values(credentials, &self.providers, (key, subject), now, records)?;
                add_headers.extend(dynamic.headers);
                (self.rewrite_query(req.path, injected, &dynamic.queries), dynamic.secrets, dynamic.used)
            }
            _ => (self.rewrite_query(req.path, injected, &[]), Vec::new(), Vec::new()),
        };
        // A response is checked for the route's own static credentials by
        // route name (`reflections`); a client's own go with the forward.
        if let Some(Injection { credentials, clients_own: true, .. }) = &inject {
            secrets.extend(credentials.echoes.0.iter().cloned());
        }
        Ok(Forward {
            route: inject.map(|i| i.route.name.as_str()),
            client: client.map(|c| self.client_id(c)),
            key: caller.and_then(|(_, k)| k.id()),
            metadata: client.and_then(|c| c.metadata()),
            remove_headers,
            remove_look_alikes: self.look_alikes(req),
            add_headers,
            path,
            secrets,
            used,
        })
    }

    /// The new path without key parameters and client-sent copies of any
    /// route's injected ones, with `injected` and then `dynamic` (encoded
    /// `name=value` pairs) appended, and without a fragment (never part of a request target, and a place to hide a key
    /// or a second credential from the query rewrite); `None` when nothing
    /// changes.
    pub(crate) fn rewrite_query(&self, path: &[u8], injected: &[QueryInject], dynamic: &[String]) -> Option<Vec<u8>> {
        // By the name as upstream frameworks read it: `api.key`, `API_KEY`
        // and `api_key[]` are `api_key` to PHP, ASP.NET or Rack.
        // (`injected` are among them.)
        let removed = |p: &Param<'_>| {
            let name = p.canonical_name();
            self.reserved_query_names.contains(&name)
        };
        let (base, query, fragment) = query::split_path(path);
        let drops = query.is_some_and(|q| query::params(q).any(|p| removed(&p)));
        if !drops && injected.is_empty() && dynamic.is_empty() && fragment.is_none() {
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
        for encoded in dynamic {
            push(&mut out, b'&', encoded.as_bytes());
        }
        Some(out)
    }
}

/// What a request on a route is given: one inject list, whole.
struct Injection<'p> {
    route: &'p Route,
    credentials: &'p Credentials,
    /// True for the client's own list, false for the route's.
    clients_own: bool,
}

/// Why a known key is refused at `now_s` (Unix seconds, read only when a
/// time applies), whatever the route: a disabled client or key, or a key
/// before its `not_before`, is answered like an unknown key; a passed
/// `expires` (the client's or the key's) as expired.
fn key_refusal(client: &Client, key: &Key, now_s: &dyn Fn() -> i64) -> Option<DenialReason> {
    let listed = key.listed.as_deref();
    if client.disabled || listed.is_some_and(|l| l.disabled) {
        return Some(DenialReason::InvalidKey);
    }
    if listed.and_then(|l| l.not_before).is_some_and(|at| now_s() < at) {
        return Some(DenialReason::InvalidKey);
    }
    let passed = |at: Option<i64>| at.is_some_and(|at| now_s() >= at);
    (passed(client.expires) || passed(listed.and_then(|l| l.expires))).then_some(DenialReason::ExpiredKey)
}

/// Why [`Policy::forward`] gives no forward.
enum Refusal {
    Deny(DenialReason),
    /// Keyed records (provider, key) to wait for, and the longest timeout.
    Wait(Vec<(usize, String)>, u64),
}

impl From<DenialReason> for Refusal {
    fn from(reason: DenialReason) -> Self {
        Refusal::Deny(reason)
    }
}

/// An inject list's dynamic credentials at `now`, every one or none: each
/// of the list's providers is read once (a keyed one at the record of its
/// key: the client's id, or for an on-behalf-of exchange the digest of the
/// request's subject token), so all values of a provider come from one
/// record, written whole by one refresh. Client-sent copies of the
/// injected headers are among the protected names, removed by
/// [`Policy::forward`].
fn dynamic_values<'p>(
    list: &'p Credentials,
    providers: &'p [Provider],
    (client, subject): (Option<&'p str>, Option<&[u8]>),
    now: &Now<'_>,
    records: &dyn SharedRecords,
) -> Result<DynamicValues<'p>, Refusal> {
    let now = now.millis();
    let mut read: Vec<(usize, Option<String>, Option<crate::credential::Record>)> =
        Vec::with_capacity(list.providers.len());
    let (mut waits, mut timeout_ms) = (Vec::new(), 0);
    for &p in &list.providers {
        let Some(provider) = providers.get(p) else { return Err(DenialReason::CredentialUnavailable.into()) };
        let key = match (&provider.keyed, &provider.subject) {
            (None, _) => None,
            (Some(_), Some(_)) => match subject {
                Some(subject) => Some(provider.subject_key(subject)),
                None => return Err(DenialReason::MissingSubjectToken.into()),
            },
            (Some(_), None) => match client {
                Some(client) => Some(client.to_string()),
                // A keyed value is a client's: nothing to read without one.
                None => return Err(DenialReason::CredentialUnavailable.into()),
            },
        };
        let slot = match &key {
            Some(key) => Slot::Keyed(p, key),
            None => Slot::Provider(p),
        };
        let record = records.read(slot).map(|(record, _)| record);
        let usable = record.as_ref().is_some_and(|r| r.usable(now).is_some());
        if let (Some(key), false) = (&key, usable) {
            // The STS refused this subject: refused too until its backoff
            // ends (then one request may try it again).
            if record.as_ref().is_some_and(|r| r.refused && r.refresh_at > now) {
                return Err(DenialReason::InvalidSubjectToken.into());
            }
            // A first fetch that failed, with its next try after this
            // request could wait: refused now, no call storm.
            let deadline = now.saturating_add(i64::try_from(provider.timeout_ms).unwrap_or(i64::MAX));
            if record.as_ref().is_some_and(|r| r.failures > 0 && !r.refused && r.refresh_at > deadline) {
                return Err(DenialReason::CredentialUnavailable.into());
            }
            waits.push((p, key.clone()));
            timeout_ms = timeout_ms.max(provider.timeout_ms);
        }
        read.push((p, key, record));
    }
    let unkeyed_ready = read.iter().all(|(_, k, r)| k.is_some() || r.as_ref().is_some_and(|r| r.usable(now).is_some()));
    if !waits.is_empty() {
        // Only a client's keyed values are waited for; a route's shared
        // value is refreshed in the background and never waited on.
        return Err(if unkeyed_ready {
            Refusal::Wait(waits, timeout_ms)
        } else {
            DenialReason::CredentialUnavailable.into()
        });
    }
    let mut out = DynamicValues {
        headers: Vec::new(),
        queries: Vec::new(),
        secrets: Vec::with_capacity(list.dynamic.len()),
        // Every provider of the list is read by some entry: all were used.
        used: read
            .iter()
            .filter_map(|(provider, key, record)| {
                let record = record.as_ref()?;
                let keyed = providers.get(*provider).and_then(|p| p.keyed.as_ref());
                Some(Used {
                    provider: *provider,
                    key: key.clone(),
                    generation: record.generation,
                    touch: keyed.is_some_and(|k| now.saturating_sub(record.used_at) >= k.touch_ms()),
                    due: keyed.is_some() && record.due(now),
                })
            })
            .collect(),
    };
    for inject in &list.dynamic {
        let value = read
            .iter()
            .find(|(p, _, _)| *p == inject.provider)
            .and_then(|(_, _, record)| record.as_ref())
            .and_then(|record| record.usable(now))
            .and_then(|values| values.get(inject.value))
            .ok_or(DenialReason::CredentialUnavailable)?;
        let full = format!("{}{value}", inject.prefix);
        out.secrets.push(value.clone());
        match &inject.target {
            InjectTarget::Header(name) => out.headers.push((name.as_str(), Cow::Owned(full))),
            InjectTarget::Query(name) => {
                let shown = String::from_utf8_lossy(name);
                out.queries.push(format!("{}={}", encode_component(&shown), encode_component(&full)));
            }
        }
    }
    Ok(out)
}

/// An inject list's dynamic credentials, read for one request.
struct DynamicValues<'p> {
    headers: Vec<(&'p str, Cow<'p, str>)>,
    /// `name=value`, percent-encoded.
    queries: Vec<String>,
    /// The values without prefixes.
    secrets: Vec<String>,
    /// The providers read and the generation of their values.
    used: Vec<Used>,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credential::{MemoryRecords, NoRecords, Record};

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
        match policy.decide(&RequestView::from_headers(None, headers), &|| 0, &NoRecords) {
            Decision::Deny(denial) => Some(denial.reason),
            Decision::Forward(_) => None,
            Decision::Wait(w) => panic!("{w:?}"),
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
            match p.decide(&view, &|| 0, &NoRecords) {
                Decision::Forward(f) => {
                    assert_eq!(f.path.as_deref(), upstream.map(str::as_bytes), "{path}");
                }
                Decision::Deny(d) => assert!(upstream.is_none(), "{path}: {d:?}"),
                Decision::Wait(w) => panic!("{w:?}"),
            }
        }
        // Passed (unmatched) requests lose their fragment too.
        let headers = request("GET", "/b#api_key=k1", &[]);
        let mut view = RequestView::from_headers(None, &headers);
        view.authority = b"other.test";
        match p.decide(&view, &|| 0, &NoRecords) {
            Decision::Forward(f) => assert_eq!(f.path.as_deref(), Some(&b"/b"[..])),
            Decision::Deny(d) => panic!("{d:?}"),
            Decision::Wait(w) => panic!("{w:?}"),
        }
    }

    #[test]
    fn connect_matches_no_route() {
        let bearer = [("authorization", "Bearer k1")];
        assert_eq!(reason(&policy("deny"), &request("CONNECT", "", &bearer)), Some(DenialReason::NoRoute));
        let p = policy("pass");
        let headers = request("CONNECT", "", &bearer);
        match p.decide(&RequestView::from_headers(None, &headers), &|| 0, &NoRecords) {
            Decision::Forward(f) => {
                assert_eq!((f.route, f.client), (None, None));
                assert_eq!(f.remove_headers, ["authorization"]);
                assert!(f.add_headers.is_empty());
            }
            Decision::Deny(d) => panic!("{d:?}"),
            Decision::Wait(w) => panic!("{w:?}"),
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
        view.key = Some(&key);
        p.decide(&view, &|| 0, &NoRecords)
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
                Decision::Wait(w) => panic!("{w:?}"),
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
            Decision::Wait(w) => panic!("{w:?}"),
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
            Decision::Wait(w) => panic!("{w:?}"),
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

    /// `client_id_on_listener`: the first stage sets the client id of a
    /// valid key (any route), never a client-sent one, and nothing for a
    /// key that is unknown, disabled or expired, or without the option.
    #[test]
    fn the_first_stage_sets_a_valid_keys_client_id_only_with_client_id_on_listener() {
        let config = |on: bool| {
            format!(
                r#"{{"clients": [{{"id": "team-a", "key": "ka", "routes": ["a"]}},
                                 {{"id": "off", "key": "kd", "routes": ["*"], "disabled": true}},
                                 {{"id": "old", "key": "ke", "routes": ["*"], "expires": "2020-01-01T00:00:00Z"}},
                                 {{"id": "team-b", "key": "kb", "routes": ["b"]}},
                                 {{"id": "listed", "routes": ["*"], "keys": [
                                     {{"key": "kl-live"}}, {{"key": "kl-off", "disabled": true}},
                                     {{"key": "kl-later", "not_before": "2999-01-01T00:00:00Z"}},
                                     {{"key": "kl-gone", "expires": "2020-01-01T00:00:00Z"}}]}}],
                    "routes": [{{"name": "a", "match": {{"clusters": ["ca"]}}, "inject": [{{"header": "x-u", "value": {{"inline": "secret-a"}}}}]}},
                               {{"name": "b", "match": {{"clusters": ["cb"]}}, "inject": [{{"header": "x-u", "value": {{"inline": "secret-b"}}}}]}}],
                    "client_id_header": "x-keyswap-client", "client_id_on_listener": {on}}}"#
            )
        };
        let on = Policy::from_json(config(true).as_bytes(), &|_: &str| None).unwrap_or_else(|e| panic!("{e}"));
        let off = Policy::from_json(config(false).as_bytes(), &|_: &str| None).unwrap_or_else(|e| panic!("{e}"));
        let now = || 1_800_000_000_000;
        let first = |p: &Policy, key: &str, forged: &[(&str, &str)]| {
            let mut sent = vec![("x-api-key", key)];
            sent.extend_from_slice(forged);
            let mut headers = request("GET", "/x", &sent);
            let view = RequestView::from_headers(None, &headers);
            let key = p.key_check(&view);
            p.admit_with_id(&view, &key, &now).apply(&mut headers);
            headers
                .into_iter()
                .filter(|(n, _)| n.eq_ignore_ascii_case("x-keyswap-client") || n.contains('_'))
                .collect::<Vec<_>>()
        };
        let id = |v: &str| vec![("x-keyswap-client".to_string(), v.as_bytes().to_vec())];
        let forged = [("x-keyswap-client", "team-b"), ("X-Keyswap-Client", "admin"), ("x_keyswap_client", "team-b")];
        assert_eq!(first(&on, "ka", &forged), id("team-a"), "a valid key: its own id, every forged copy gone");
        assert_eq!(first(&on, "kb", &[]), id("team-b"), "whatever the route");
        assert_eq!(first(&on, "kl-live", &[]), id("listed"), "a live key of a `keys` list");
        for key in ["wrong", "kd", "ke", "", "kl-off", "kl-later", "kl-gone"] {
            assert_eq!(first(&on, key, &forged), [], "no id for key {key:?}, and no forged one");
        }
        assert_eq!(first(&off, "ka", &forged), [], "without the option the first stage adds nothing");
        let refused = Policy::from_json(br#"{"client_id_on_listener": true}"#, &|_: &str| None).map(|_| ());
        assert_eq!(
            refused.map_err(|e| e.to_string()),
            Err("client_id_on_listener: needs `client_id_header`: the header the listener stage sets to the client id"
                .into())
        );
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

    /// A route with dynamic credentials: every value from the provider's
    /// record, in the one forward, or the request refused.
    #[test]
    fn dynamic_credentials_come_whole_or_not_at_all() {
        let json = r#"{"clients": [{"id": "c", "key": "k1", "routes": ["*"]}],
            "key_sources": [{"header": "x-api-key"}],
            "routes": [{"name": "r", "match": {"clusters": ["r"]}, "inject": [
                {"header": "x-key-id", "value": {"fetch": {"cluster": "vault", "path": "/v1/cred", "json_pointer": "/data/id"}}},
                {"query": "sig", "value": {"fetch": {"cluster": "vault", "path": "/v1/cred", "json_pointer": "/data/secret"}}}]}]}"#;
        let p = match Policy::from_json(json.as_bytes(), &|_: &str| None) {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        };
        let headers = vec![
            (":method".to_string(), b"GET".to_vec()),
            (":path".to_string(), b"/x?sig=mine&a=1".to_vec()),
            ("x-key-id".to_string(), b"client-sent".to_vec()),
            ("x-api-key".to_string(), b"k1".to_vec()),
        ];
        let mut view = RequestView::from_headers(None, &headers);
        view.cluster = Some("r");
        match p.decide(&view, &|| 0, &NoRecords) {
            Decision::Deny(d) => {
                assert_eq!((d.reason, d.route, d.client), (DenialReason::CredentialUnavailable, Some("r"), Some("c")))
            }
            Decision::Forward(f) => panic!("forwarded without its credentials: {f:?}"),
            Decision::Wait(w) => panic!("a route's value is never waited for: {w:?}"),
        }
        let answer = p.credential_providers()[0].parse(200, br#"{"data":{"id":"k7","secret":"s/7"}}"#, 0).unwrap();
        let mut records = MemoryRecords::new(1);
        assert!(records.write(Slot::Provider(0), &Record::default().succeeded(answer).0, None));
        let Decision::Forward(forward) = p.decide(&view, &|| 1, &records) else { panic!() };
        assert_eq!(forward.secrets, ["k7", "s/7"]);
        let mut out = headers.clone();
        forward.apply(&mut out);
        assert_eq!(
            out,
            vec![
                (":method".to_string(), b"GET".to_vec()),
                (":path".to_string(), b"/x?a=1&sig=s%2F7".to_vec()),
                ("x-key-id".to_string(), b"k7".to_vec()),
            ]
        );
    }

    /// The example under `## Per-client credentials` in docs/config.md
    /// does what the text says: each team its own list, whole; a client
    /// without one the route's; a route without `inject` only for clients
    /// that bring one.
    #[test]
    fn the_documented_per_client_example_does_what_it_says() {
        let doc = include_str!("../../docs/config.md");
        let section = &doc[doc.find("## Per-client credentials").unwrap()..];
        let start = section.find("```json\n").unwrap() + 8;
        let json = &section[start..start + section[start..].find("```").unwrap()];
        let env = |name: &str| Some(format!("value-of-{name}"));
        let p = Policy::from_json(json.as_bytes(), &env).unwrap_or_else(|e| panic!("{e}"));
        let sent = |key: &str, route: &str| {
            let bearer = format!("Bearer {key}");
            let headers = request("GET", "/v1", &[("authorization", &bearer), ("openai-project", "forged")]);
            match decide_on(&p, &headers, Some(route), Some(route)) {
                Decision::Forward(f) => {
                    let added: Vec<String> = f.add_headers.iter().map(|(n, v)| format!("{n}: {v}")).collect();
                    assert!(f.remove_headers.contains(&"openai-project"), "{key}: {f:?}");
                    (added, f.path.map(|p| String::from_utf8_lossy(&p).into_owned()), f.secrets)
                }
                Decision::Deny(d) => panic!("{key} on {route}: {d:?}"),
                Decision::Wait(w) => panic!("{key} on {route}: {w:?}"),
            }
        };
        let (added, path, secrets) = sent("team-a-key", "openai");
        assert_eq!(added, ["authorization: Bearer value-of-OPENAI_KEY_TEAM_A", "x-keyswap-client: team-a"]);
        assert_eq!(path, None);
        assert_eq!(secrets, ["value-of-OPENAI_KEY_TEAM_A"]);
        let (added, _, secrets) = sent("team-b-key", "openai");
        assert_eq!(
            added,
            [
                "authorization: Bearer value-of-OPENAI_KEY_TEAM_B",
                "openai-project: proj_team_b",
                "x-keyswap-client: team-b"
            ]
        );
        assert_eq!(secrets, ["value-of-OPENAI_KEY_TEAM_B", "proj_team_b"]);
        // The route's own static credentials are found by route name, so a
        // forward with them carries none.
        let (added, _, secrets) = sent("batch-jobs-key", "openai");
        assert_eq!(
            added,
            [
                "authorization: Bearer value-of-OPENAI_API_KEY",
                "openai-organization: org-gateway",
                "x-keyswap-client: batch-jobs"
            ]
        );
        assert!(secrets.is_empty());
        let (added, path, _) = sent("team-a-key", "search");
        assert_eq!(added, ["x-keyswap-client: team-a"]);
        assert_eq!(path.as_deref(), Some("/v1?key=value-of-SEARCH_KEY_TEAM_A"));
        let headers = request("GET", "/", &[("authorization", "Bearer batch-jobs-key")]);
        assert!(matches!(
            decide_on(&p, &headers, Some("search"), Some("search")),
            Decision::Deny(d) if d.reason == DenialReason::RouteForbidden
        ));
        // A response handing a client's own credential back loses it, and
        // no Debug output shows one.
        let response = vec![("x-echo".to_string(), b"proj_team_b".to_vec()), ("x-ok".to_string(), b"1".to_vec())];
        let own = ["value-of-OPENAI_KEY_TEAM_B", "proj_team_b"];
        assert_eq!(p.reflections("openai", &own, &response), [("x-echo".to_string(), None)]);
        let location = vec![("location".to_string(), b"/next?a=1&key=value-of-SEARCH_KEY_TEAM_A".to_vec())];
        let own = ["value-of-SEARCH_KEY_TEAM_A"];
        assert_eq!(p.reflections("search", &own, &location), [("location".to_string(), Some(b"/next?a=1".to_vec()))]);
        let debug = format!("{p:?}");
        for secret in ["value-of-", "proj_team_b", "org-gateway"] {
            assert!(!debug.contains(secret), "{secret} in {debug}");
        }
    }
}
