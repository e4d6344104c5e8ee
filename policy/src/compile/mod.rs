//! Parse, then compile: JSON text becomes a [`RawConfig`], and a
//! [`RawConfig`] becomes a [`Policy`] with everything a request needs
//! prepared (digests decoded, names lower-cased, credentials read from the
//! environment and formatted). Errors name the field path and never quote a
//! value, so a misplaced secret cannot reach a log line.
//!
//! - [`env`]: the error every step returns, and the environment secrets
//!   are read from.
//! - [`providers`]: dynamic credential values become
//!   [`crate::credential::Provider`]s, shared by entries that make the same
//!   call.
//! - this module: the document, key sources, routes, clients, and `inject`
//!   lists (a route's own, or a client's own for a route) with their
//!   static credentials.

pub mod env;
mod limits;
pub mod metadata;
mod providers;

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::hash::BuildHasherDefault;
use std::sync::Arc;

use base64::Engine as _;
use sha2::{Digest as _, Sha256};

pub use env::{ConfigError, Environment};

use crate::model::{
    Allowed, Client, ClientExtra, ClientIndex, Credentials, DynamicInject, Echoes, HeaderInject, InjectTarget, Key,
    KeySource, Listed, Policy, QueryInject, Route, RouteMatch,
};
use crate::query::encode_component;
use crate::raw::{
    is_route_name, Clients, RawBasic, RawClient, RawClientInject, RawConfig, RawInject, RawKeySource, RawRoute,
    RawSecret, RawValue,
};
use crate::request::MAX_KEY_BYTES;
use crate::time::parse_rfc3339;
use env::secret;
use providers::{Owner, ProviderBuilder, RawDynamic};

/// Who routes requests, and so what a route's `match` may say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routing {
    /// Envoy routes (the proxy-wasm filter): every route is bound to the
    /// Envoy clusters its credentials may reach (`match.clusters`), and is
    /// decided on Envoy's final routing result. `host` and `path_prefix`
    /// are refused: they would be keyswap's reading of a request Envoy
    /// routes by its own rules.
    Envoy,
    /// keyswap routes (the component's gateway): the route it matches is
    /// the upstream the request goes to, so `host` and `path_prefix` cannot
    /// disagree with anybody. `clusters` match only a host-given cluster.
    Own,
}

impl Policy {
    /// Parses and compiles a JSON configuration for Envoy
    /// ([`Routing::Envoy`]), reading `env` values from `env`.
    ///
    /// # Errors
    /// The first problem found, with its field path.
    pub fn from_json(json: &[u8], env: &dyn Environment) -> Result<Self, ConfigError> {
        Self::from_json_for(json, env, Routing::Envoy)
    }

    /// [`Self::from_json`] for a host that routes as `routing` says.
    ///
    /// # Errors
    /// The first problem found, with its field path.
    pub fn from_json_for(json: &[u8], env: &dyn Environment, routing: Routing) -> Result<Self, ConfigError> {
        let raw = parse(json)?;
        let clients = Clients::new(json, raw.clients.map(|(at, _)| at)).map_err(ConfigError::from)?;
        let mut policy = compile(&raw, clients, env, routing)?;
        policy.version = content_version(json);
        Ok(policy)
    }
}

/// A short, stable version for a configuration's exact bytes: the first
/// twelve hex digits of its XXH3 (64-bit) hash. It names a version; it is
/// no secret and no signature (the operator writes both sides), so the
/// hash is chosen for speed: every VM hashes the whole configuration on
/// every load, and XXH3 does 12 MiB (100,000 clients) in V8 in a few
/// milliseconds where SHA-256 took over 100 (docs/performance.md).
pub fn content_version(json: &[u8]) -> String {
    let hash = xxhash_rust::xxh3::xxh3_64(json);
    format!("{:012x}", hash >> 16)
}

fn parse(json: &[u8]) -> Result<RawConfig, ConfigError> {
    RawConfig::read(json).map_err(ConfigError::from)
}

fn compile(
    raw: &RawConfig,
    clients: Clients<'_>,
    env: &dyn Environment,
    routing: Routing,
) -> Result<Policy, ConfigError> {
    let client_count = raw.clients.map_or(0, |(_, n)| n);
    if raw.refuse_all && !(client_count == 0 && raw.routes.is_empty()) {
        return Err(ConfigError::new("refuse_all", "refuses every request, so it takes no clients and no routes"));
    }
    let key_sources = compile_key_sources(raw.key_sources.as_deref())?;
    let mut builder = ProviderBuilder::default();
    let mut routes = compile_routes(&raw.routes, env, &mut builder, routing)?;
    let route_index: HashMap<&str, usize> = raw.routes.iter().enumerate().map(|(i, r)| (r.name.as_str(), i)).collect();

    let strip_request = header_names(&raw.strip_request_headers, "strip_request_headers")?;
    let strip_response = header_names(&raw.strip_response_headers, "strip_response_headers")?;
    let client_id_header = match &raw.client_id_header {
        Some(name) => Some(header_name(name, "client_id_header")?),
        None => None,
    };
    if raw.client_id_on_listener && client_id_header.is_none() {
        return Err(ConfigError::new(
            "client_id_on_listener",
            "needs `client_id_header`: the header the listener stage sets to the client id",
        ));
    }
    if let Some(id_header) = &client_id_header {
        for (r, route) in raw.routes.iter().enumerate() {
            if let Some(list) = &route.inject {
                not_the_client_id(list, &format!("routes[{r}].inject"), id_header)?;
            }
        }
    }

    let shared = Shared { routes: &routes, route_index: &route_index, client_id_header: client_id_header.as_deref() };
    let Compiled { clients, client_ids, keys, index, first_limit: first_client_limit } =
        compile_clients(clients, client_count, &shared, env, &mut builder)?;
    let providers = builder.finish();
    finish_routes(&mut routes, &clients);
    limits::finish_limits(&mut routes, &clients);
    let needs_route_name = routes.iter().any(|r| r.matcher.route_name.is_some());
    // Every inject list: the routes' own, then the clients' own.
    let every_list = || {
        let own = clients.iter().flat_map(|c| c.own().iter().map(|(_, list)| list));
        routes.iter().filter_map(|r| r.credentials.as_ref()).chain(own)
    };

    // Every header name keyswap reads, removes or sets, removed from every
    // request in one pass over its headers; a client-sent name that differs
    // only by `_` for `-` is removed too (many upstreams read `x_api_key`
    // and `x-api-key` as one variable).
    let mut protected: Vec<String> = Vec::new();
    let key_headers = key_sources.iter().filter_map(|s| match s {
        KeySource::Header { name, .. } => Some(name),
        KeySource::Query { .. } => None,
    });
    let caller_token_header = match &raw.caller_token_header {
        Some(name) => {
            let injected: Vec<&String> = every_list().flat_map(Credentials::header_names).collect();
            Some(caller_token_header(name, &key_sources, client_id_header.as_deref(), &providers, &injected)?)
        }
        None => None,
    };
    let subject_source =
        subject_source(&providers, &key_sources, client_id_header.as_deref(), caller_token_header.as_deref())?;
    let subject_header = subject_source.as_ref().map(|s| s.header.clone());
    let metadata_headers = {
        // Every header name something else already reads, removes or sets.
        let mut taken: Vec<(&str, &str)> = Vec::new();
        for source in &key_sources {
            if let KeySource::Header { name, .. } = source {
                taken.push((name, "a key source"));
            }
        }
        taken.extend(strip_request.iter().map(|n| (n.as_str(), "in strip_request_headers")));
        taken.extend(client_id_header.iter().map(|n| (n.as_str(), "the client_id_header")));
        taken.extend(caller_token_header.iter().map(|n| (n.as_str(), "the caller_token_header")));
        taken.extend(
            subject_header
                .iter()
                .map(|n| (n.as_str(), "the header an on-behalf-of exchange reads its subject token from")),
        );
        taken.extend(
            every_list()
                .flat_map(Credentials::header_names)
                .map(|n| (n.as_str(), "a header a credential is injected into")),
        );
        metadata::metadata_headers(&raw.metadata_headers, &taken)?
    };
    let metadata_header_names = metadata_headers.iter().map(|(_, header)| header);
    for name in key_headers
        .chain(&strip_request)
        .chain(&client_id_header)
        .chain(&caller_token_header)
        .chain(&subject_header)
        .chain(metadata_header_names)
    {
        if !protected.contains(name) {
            protected.push(name.clone());
        }
    }
    for name in every_list().flat_map(Credentials::header_names) {
        if !protected.contains(name) {
            protected.push(name.clone());
        }
    }
    let mut reserved_query_names: Vec<Vec<u8>> = Vec::new();
    let key_params = key_sources.iter().filter_map(|s| match s {
        KeySource::Query { name } => Some(name.clone()),
        KeySource::Header { .. } => None,
    });
    let injected_params = every_list().flat_map(Credentials::query_names).cloned();
    for name in key_params.chain(injected_params).map(|n| crate::query::canonical_name(&n)) {
        if !reserved_query_names.contains(&name) {
            reserved_query_names.push(name);
        }
    }
    let mut bound_clusters: Vec<String> =
        routes.iter().flat_map(|r| r.matcher.clusters.iter().flatten().cloned()).collect();
    bound_clusters.sort();
    bound_clusters.dedup();
    let matches_host = routes.iter().any(|r| r.matcher.host.is_some());

    Ok(Policy {
        clients,
        client_ids,
        keys,
        index,
        key_sources,
        routes,
        protected,
        reserved_query_names,
        bound_clusters,
        matches_host,
        strip_response,
        client_id_header,
        client_id_on_listener: raw.client_id_on_listener,
        unmatched: raw.unmatched_route,
        needs_route_name,
        per_client_metrics: raw.metrics.per_client,
        version: String::new(),
        providers,
        refuse_all: raw.refuse_all,
        first_limit: limits::first_route_limit(raw).or(first_client_limit),
        caller_token_header,
        subject_source,
        metadata_headers,
    })
}

/// Where on-behalf-of exchanges read the caller's subject token: one
/// header (and prefix) for the whole configuration, since the listener's
/// stage reads it before the route is known; a header no key source, the
/// client id or the caller's token is read from. It may be a header an
/// exchanged token is injected into (`authorization`): every request loses
/// it before any upstream either way.
fn subject_source(
    providers: &[crate::credential::Provider],
    key_sources: &[KeySource],
    client_id_header: Option<&str>,
    caller_token_header: Option<&str>,
) -> Result<Option<crate::credential::SubjectSource>, ConfigError> {
    let mut found: Option<&crate::credential::SubjectSource> = None;
    for provider in providers {
        let Some(source) = &provider.subject else { continue };
        let field = format!("{}.subject_token.header", provider.path);
        if found.is_some_and(|first| first != source) {
            return Err(ConfigError::new(
                field,
                "differs from another on-behalf-of exchange's subject header or prefix; every one reads the same",
            ));
        }
        let name = source.header.as_str();
        let key_header = key_sources.iter().any(|s| matches!(s, KeySource::Header { name: k, .. } if k == name));
        if key_header || client_id_header == Some(name) || caller_token_header == Some(name) {
            return Err(ConfigError::new(
                field,
                "is a key source, the client_id_header or the caller_token_header; name a header of its own",
            ));
        }
        found = Some(source);
    }
    Ok(found.cloned())
}

/// `caller_token_header`: a header name no other part of the
/// configuration reads or sets, for a configuration with a per-client
/// fetch (`{client}` in a `fetch` path), the only call it authenticates.
fn caller_token_header(
    name: &str,
    key_sources: &[KeySource],
    client_id_header: Option<&str>,
    providers: &[crate::credential::Provider],
    injected: &[&String],
) -> Result<String, ConfigError> {
    const FIELD: &str = "caller_token_header";
    let name = header_name(name, FIELD)?;
    if !providers.iter().any(|p| p.keyed.is_some() && p.subject.is_none()) {
        return Err(ConfigError::new(
            FIELD,
            "is read only for a per-client fetch (`{client}` in a `fetch` path), and no credential is one",
        ));
    }
    let key_header = key_sources.iter().any(|s| matches!(s, KeySource::Header { name: k, .. } if *k == name));
    if key_header || client_id_header == Some(name.as_str()) {
        return Err(ConfigError::new(FIELD, "is a key source or the client_id_header; name a header of its own"));
    }
    if injected.iter().any(|h| **h == name) {
        return Err(ConfigError::new(FIELD, "is a header a credential is injected into; name a header of its own"));
    }
    Ok(name)
}

fn compile_key_sources(raw: Option<&[RawKeySource]>) -> Result<Vec<KeySource>, ConfigError> {
    let Some(raw) = raw else {
        return Ok(vec![
            KeySource::Header { name: "authorization".into(), prefix: Some(b"bearer ".to_vec()) },
            KeySource::Header { name: "x-api-key".into(), prefix: None },
        ]);
    };
    if raw.is_empty() {
        return Err(ConfigError::new(
            "key_sources",
            "must name at least one place to read the key from (leave it out for the default)",
        ));
    }
    let mut sources = Vec::with_capacity(raw.len());
    for (i, source) in raw.iter().enumerate() {
        let path = format!("key_sources[{i}]");
        let compiled = match (&source.header, &source.query) {
            (Some(header), None) => {
                let name = header_name(header, &format!("{path}.header"))?;
                let prefix = match &source.prefix {
                    Some(p) if p.trim().is_empty() => {
                        return Err(ConfigError::new(format!("{path}.prefix"), "must not be empty"))
                    }
                    Some(p) => Some(p.to_ascii_lowercase().into_bytes()),
                    None => None,
                };
                KeySource::Header { name, prefix }
            }
            (None, Some(query)) => {
                if source.prefix.is_some() {
                    return Err(ConfigError::new(format!("{path}.prefix"), "applies to header sources only"));
                }
                if query.is_empty() {
                    return Err(ConfigError::new(format!("{path}.query"), "must not be empty"));
                }
                KeySource::Query { name: query.clone().into_bytes() }
            }
            _ => return Err(ConfigError::new(path, "needs exactly one of `header` or `query`")),
        };
        if sources.contains(&compiled) {
            return Err(ConfigError::new(path, "repeats an earlier key source"));
        }
        sources.push(compiled);
    }
    Ok(sources)
}

fn compile_routes(
    raw: &[RawRoute],
    env: &dyn Environment,
    builder: &mut ProviderBuilder,
    routing: Routing,
) -> Result<Vec<Route>, ConfigError> {
    let mut routes: Vec<Route> = Vec::with_capacity(raw.len());
    for (r, route) in raw.iter().enumerate() {
        let path = format!("routes[{r}]");
        if !is_route_name(&route.name) {
            return Err(ConfigError::new(
                format!("{path}.name"),
                "must be 1-64 characters of letters, digits, `-`, `_` or `.`",
            ));
        }
        if routes.iter().any(|other| other.name == route.name) {
            return Err(ConfigError::new(
                format!("{path}.name"),
                format!("`{}` is already the name of an earlier route", route.name),
            ));
        }
        let m = &route.matcher;
        let clusters = match &m.clusters {
            Some(list) if list.is_empty() => {
                return Err(ConfigError::new(format!("{path}.match.clusters"), "must name at least one cluster"))
            }
            Some(list) => {
                if let Some(c) = list.iter().position(|c| !is_cluster_name(c)) {
                    return Err(ConfigError::new(
                        format!("{path}.match.clusters[{c}]"),
                        "must be an Envoy cluster name: 1-200 visible ASCII characters",
                    ));
                }
                Some(list.clone())
            }
            None => None,
        };
        if routing == Routing::Envoy {
            for (field, given) in [("host", m.host.is_some()), ("path_prefix", m.path_prefix.is_some())] {
                if given {
                    return Err(ConfigError::new(
                        format!("{path}.match.{field}"),
                        "is not used in Envoy, which routes by its own rules: bind the route to \
                         Envoy's routing with `clusters` (and `route_name`) instead",
                    ));
                }
            }
            if clusters.is_none() {
                return Err(ConfigError::new(
                    format!("{path}.match.clusters"),
                    "is required in Envoy: name the clusters this route's credentials may be sent to",
                ));
            }
        }
        if let Some(prefix) = &m.path_prefix {
            if !prefix.starts_with('/') {
                return Err(ConfigError::new(format!("{path}.match.path_prefix"), "must start with `/`"));
            }
        }
        let host = match &m.host {
            Some(h) if h.is_empty() || h.contains(':') && !h.starts_with('[') => {
                return Err(ConfigError::new(format!("{path}.match.host"), "must be a host name without a port"))
            }
            Some(h) => Some(h.to_ascii_lowercase()),
            None => None,
        };
        let matcher =
            RouteMatch { route_name: m.route_name.clone(), clusters, path_prefix: m.path_prefix.clone(), host };
        let credentials = match &route.inject {
            Some(list) => {
                let owner = Owner::Route(&route.name);
                Some(compile_credentials(list, &format!("{path}.inject"), owner, env, builder)?)
            }
            None => None,
        };
        let limits = match &route.limits {
            Some(raw) => limits::compile_limits(raw, &format!("{path}.limits"), crate::limit::Scope::Route, false)?,
            None => Box::default(),
        };
        let name = route.name.clone();
        let (query_names, any_providers, limited) = (Vec::new(), Vec::new(), (false, false));
        routes.push(Route { name, matcher, credentials, query_names, any_providers, limits, limited });
    }
    Ok(routes)
}

/// Fills in what a route gathers from every list that can be injected on
/// it (its own and each client's own for it): the query names a response
/// loses and the providers a request may read.
fn finish_routes(routes: &mut [Route], clients: &[Client]) {
    for route in routes.iter_mut() {
        if let Some(list) = &route.credentials {
            route.query_names.extend(list.query_names().cloned());
            route.any_providers.extend(&list.providers);
        }
    }
    for (r, list) in clients.iter().flat_map(|c| c.own().iter()) {
        if let Some(route) = routes.get_mut(*r) {
            route.query_names.extend(list.query_names().cloned());
            route.any_providers.extend(&list.providers);
        }
    }
    for route in routes {
        route.query_names.sort();
        route.query_names.dedup();
        route.any_providers.sort_unstable();
        route.any_providers.dedup();
    }
}

/// Compiles one `inject` list at `path`: a route's own
/// (`routes[0].inject`) or a client's own for a route
/// (`clients[3].inject.openai`). Dynamic values become providers of
/// `owner`.
fn compile_credentials(
    list: &[RawInject],
    path: &str,
    owner: Owner<'_>,
    env: &dyn Environment,
    builder: &mut ProviderBuilder,
) -> Result<Credentials, ConfigError> {
    let (empty, this) = match owner {
        Owner::Route(_) => (
            "must hold at least one credential to inject (leave `inject` out when every client of the route \
             brings its own)",
            "this route",
        ),
        Owner::Client { .. } => {
            ("must hold at least one credential to inject (leave the route out to use its own)", "this list")
        }
    };
    if list.is_empty() {
        return Err(ConfigError::new(path, empty));
    }
    let mut out = Credentials {
        headers: Vec::new(),
        queries: Vec::new(),
        echoes: Echoes(Vec::new()),
        dynamic: Vec::new(),
        providers: Vec::new(),
    };
    for (i, inject) in list.iter().enumerate() {
        let ipath = format!("{path}[{i}]");
        let target = match inject.value.as_ref().and_then(dynamic_value) {
            Some(raw) => {
                let entry = compile_dynamic_inject(inject, raw, owner, &ipath, env, builder)?;
                let target = entry.target.clone();
                out.dynamic.push(entry);
                target
            }
            None => compile_inject(inject, &ipath, env, &mut out)?,
        };
        // A name set twice in one list, static or dynamic.
        let (field, twice) = match &target {
            InjectTarget::Header(name) => ("header", out.header_names().filter(|n| *n == name).count() > 1),
            InjectTarget::Query(name) => ("query", out.query_names().filter(|n| *n == name).count() > 1),
        };
        if twice {
            return Err(ConfigError::new(
                format!("{ipath}.{field}"),
                format!("is already injected by an earlier entry of {this}"),
            ));
        }
    }
    out.providers = out.dynamic.iter().map(|d| d.provider).collect();
    out.providers.sort_unstable();
    out.providers.dedup();
    Ok(out)
}

fn dynamic_value(value: &RawValue) -> Option<RawDynamic<'_>> {
    match value {
        RawValue::Env(_) | RawValue::Inline(_) => None,
        RawValue::Oauth2(o) => Some(RawDynamic::Oauth2(o)),
        RawValue::TokenExchange(t) => Some(RawDynamic::TokenExchange(t)),
        RawValue::Fetch(f) => Some(RawDynamic::Fetch(f)),
    }
}

/// An inject entry whose value is fetched: its target is checked here, the
/// value itself arrives later (see [`crate::credential`]).
fn compile_dynamic_inject(
    inject: &RawInject,
    raw: RawDynamic<'_>,
    owner: Owner<'_>,
    path: &str,
    env: &dyn Environment,
    builder: &mut ProviderBuilder,
) -> Result<DynamicInject, ConfigError> {
    let prefix = inject.prefix.clone().unwrap_or_default();
    if inject.basic.is_some() {
        return Err(ConfigError::new(path, "needs exactly one of `value` or `basic`"));
    }
    let target = match (&inject.header, &inject.query) {
        (Some(header), None) => {
            let name = header_name(header, &format!("{path}.header"))?;
            if !is_header_value(prefix.trim_end().as_bytes()) {
                return Err(ConfigError::new(
                    format!("{path}.prefix"),
                    "holds a character not allowed in a header value",
                ));
            }
            InjectTarget::Header(name)
        }
        (None, Some(query)) => {
            if query.is_empty() {
                return Err(ConfigError::new(format!("{path}.query"), "must not be empty"));
            }
            InjectTarget::Query(query.clone().into_bytes())
        }
        _ => return Err(ConfigError::new(path, "needs exactly one of `header` or `query`")),
    };
    let (provider, value) = builder.add(raw, owner, &format!("{path}.value"), env)?;
    Ok(DynamicInject { provider, value, prefix, target })
}

/// A static entry, added to `out`; returns where it goes.
fn compile_inject(
    inject: &RawInject,
    path: &str,
    env: &dyn Environment,
    out: &mut Credentials,
) -> Result<InjectTarget, ConfigError> {
    let echoes = &mut out.echoes.0;
    let prefix = inject.prefix.as_deref().unwrap_or("");
    let secret_at = if inject.basic.is_some() { "Basic ".len() } else { prefix.len() };
    let value = match (&inject.value, &inject.basic) {
        (Some(value), None) => {
            let value = match value {
                RawValue::Env(v) => RawSecret::Env(v.clone()),
                RawValue::Inline(v) => RawSecret::Inline(v.clone()),
                // Dynamic values never reach here (see compile_credentials).
                _ => return Err(ConfigError::new(format!("{path}.value"), "is not a static value")),
            };
            format!("{prefix}{}", secret(&value, &format!("{path}.value"), env)?)
        }
        (None, Some(basic)) => {
            if inject.prefix.is_some() {
                return Err(ConfigError::new(
                    format!("{path}.prefix"),
                    "cannot be combined with `basic` (it brings its own `Basic ` prefix)",
                ));
            }
            let (value, password) = basic_value(basic, &format!("{path}.basic"), env)?;
            echoes.push(password);
            value
        }
        _ => return Err(ConfigError::new(path, "needs exactly one of `value` or `basic`")),
    };
    match (&inject.header, &inject.query) {
        (Some(header), None) => {
            let name = header_name(header, &format!("{path}.header"))?;
            if !is_header_value(value.as_bytes()) {
                return Err(ConfigError::new(path, "the credential holds a character not allowed in a header value"));
            }
            echoes.push(value[secret_at..].to_string());
            out.headers.push(HeaderInject { name: name.clone(), value });
            Ok(InjectTarget::Header(name))
        }
        (None, Some(query)) => {
            if inject.basic.is_some() {
                return Err(ConfigError::new(format!("{path}.basic"), "applies to header credentials only"));
            }
            if query.is_empty() {
                return Err(ConfigError::new(format!("{path}.query"), "must not be empty"));
            }
            let encoded = format!("{}={}", encode_component(query), encode_component(&value));
            echoes.push(encode_component(&value));
            echoes.push(value);
            out.queries.push(QueryInject { name: query.clone().into_bytes(), encoded });
            Ok(InjectTarget::Query(query.clone().into_bytes()))
        }
        _ => Err(ConfigError::new(path, "needs exactly one of `header` or `query`")),
    }
}

/// The `Basic …` header value, and the password alone (a response must not
/// carry it back either, encoded or not).
fn basic_value(basic: &RawBasic, path: &str, env: &dyn Environment) -> Result<(String, String), ConfigError> {
    if basic.username.contains(':') {
        return Err(ConfigError::new(format!("{path}.username"), "must not contain `:`"));
    }
    let password = secret(&basic.password, &format!("{path}.password"), env)?;
    let pair = format!("{}:{password}", basic.username);
    Ok((format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(pair)), password))
}

/// `clients[N]`, formatted only when an error needs it.
#[derive(Clone, Copy)]
struct ClientPath(usize);

impl std::fmt::Display for ClientPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "clients[{}]", self.0)
    }
}

/// What every client is compiled against.
struct Shared<'r> {
    routes: &'r [Route],
    route_index: &'r HashMap<&'r str, usize>,
    client_id_header: Option<&'r str>,
}

/// A credential must not be injected into the client id's header.
fn not_the_client_id(list: &[RawInject], path: &dyn std::fmt::Display, id_header: &str) -> Result<(), ConfigError> {
    match list.iter().position(|i| i.header.as_deref().is_some_and(|h| h.eq_ignore_ascii_case(id_header))) {
        Some(i) => Err(ConfigError::new(
            format!("{path}[{i}].header"),
            "is the client_id_header; a credential cannot replace the client id",
        )),
        None => Ok(()),
    }
}

/// Compiles the clients as they are read, each with its own `inject`
/// lists: no client is held in its written form longer than it takes to
/// compile it. A route with no `inject` of its own needs a list from every
/// client allowed on it (but a disabled one, which reaches no route).
/// Also returns the path of the first client's limit, for a host that
/// cannot count them.
#[allow(clippy::type_complexity)]
fn compile_clients(
    mut raw: Clients<'_>,
    count: usize,
    shared: &Shared<'_>,
    env: &dyn Environment,
    builder: &mut ProviderBuilder,
) -> Result<Compiled, ConfigError> {
    let mut clients = Vec::with_capacity(count);
    let mut client_ids = String::with_capacity(count.saturating_mul(16));
    let mut keys = Vec::with_capacity(count);
    let mut index = ClientIndex::with_capacity(count);
    // Ids by their hash: a repeat is looked for among the clients only when
    // two hashes meet.
    let mut ids: HashSet<u64, BuildHasherDefault<crate::model::PrefixHasher>> =
        HashSet::with_capacity_and_hasher(count, Default::default());
    let mut first_limit = None;
    let mut route_lists = RouteLists::default();
    let bare: Vec<usize> = (0..shared.routes.len()).filter(|&r| shared.routes[r].credentials.is_none()).collect();
    let mut c = 0;
    while let Some(client) = raw.next_client().map_err(ConfigError::from)? {
        // The field path is formatted only on an error: 100,000 clients
        // must not mean 100,000 strings.
        let path = ClientPath(c);
        if !is_client_id(&client.id) {
            return Err(ConfigError::new(
                format!("{path}.id"),
                "must be 1-128 visible ASCII characters without spaces, quotes or commas",
            ));
        }
        let hash = xxhash_rust::xxh3::xxh3_64(client.id.as_bytes());
        if !ids.insert(hash) && clients.iter().any(|other: &Client| other.id_in(&client_ids) == client.id) {
            return Err(ConfigError::new(
                format!("{path}.id"),
                format!("`{}` is already the id of an earlier client", client.id),
            ));
        }
        let allowed = compile_client_routes(&client.routes, path, shared.route_index, &mut route_lists)?;
        let expires = match &client.expires {
            Some(text) => Some(parse_rfc3339(text).ok_or_else(|| {
                ConfigError::new(format!("{path}.expires"), "must be an RFC 3339 time such as 2027-01-01T00:00:00Z")
            })?),
            None => None,
        };
        if let Some(id_header) = shared.client_id_header {
            for (route, list) in &client.inject.0 {
                not_the_client_id(list, &format_args!("{path}.inject.{route}"), id_header)?;
            }
        }
        let own = compile_own(&client.inject, path, &client.id, &allowed, shared.route_index, env, builder)?;
        let needs_own = bare.iter().filter(|&&r| !client.disabled && allowed.allows(r));
        if let Some(&r) = needs_own.into_iter().find(|&&r| own.binary_search_by_key(&r, |(o, _)| *o).is_err()) {
            let name = &shared.routes[r].name;
            return Err(ConfigError::new(
                format!("{path}.inject.{name}"),
                format!(
                    "is required: this client may use route `{name}` (routes[{r}]), which has no `inject` of its own"
                ),
            ));
        }
        let limits = limits::compile_client_limits(&client, path, &allowed, shared.route_index)?;
        if first_limit.is_none() {
            first_limit = limits::first_client_limit(&client, path);
        }
        compile_keys(&client, path, c, &mut keys, &mut index)?;
        let metadata = match &client.metadata {
            Some(raw) => metadata::client_metadata(raw, path)?,
            None => None,
        };
        let disabled = client.disabled;
        // An id is at most 128 bytes; the ids together must stay within
        // what a u32 addresses (only a native host could hold more).
        let len = client.id.len() as u32;
        let Some(start) = u32::try_from(client_ids.len()).ok().filter(|s| s.checked_add(len).is_some()) else {
            return Err(ConfigError::new(path.to_string(), "is one client too many: the ids together pass 4 GiB"));
        };
        let id = (start, len);
        client_ids.push_str(&client.id);
        let plain = own.is_empty() && metadata.is_none() && limits.is_empty();
        let extra = (!plain).then(|| Box::new(ClientExtra { own, metadata, limits }));
        clients.push(Client { id, allowed, expires, disabled, extra });
        c += 1;
    }
    Ok(Compiled { clients, client_ids, keys, index, first_limit })
}

/// The clients compiled, with what they need beside them.
struct Compiled {
    clients: Vec<Client>,
    client_ids: String,
    keys: Vec<Key>,
    index: ClientIndex,
    /// The path of the first client limit, if any.
    first_limit: Option<String>,
}

/// A client's keys: its one `key_sha256`/`key`, or its `keys` list, each
/// indexed by digest (a digest anywhere else already is refused).
fn compile_keys(
    client: &RawClient<'_>,
    path: ClientPath,
    c: usize,
    keys: &mut Vec<Key>,
    index: &mut ClientIndex,
) -> Result<(), ConfigError> {
    let first = keys.len();
    let owner = u32::try_from(c).map_err(|_| ConfigError::new(path.to_string(), "is one client too many"))?;
    let add = |index: &mut ClientIndex, keys: &mut Vec<Key>, key: Key, at: &dyn Fn() -> String| {
        if let Some(earlier) = index.insert(keys, &key.digest, keys.len()) {
            let earlier = KeyAt(keys, earlier);
            return Err(ConfigError::new(at(), format!("is the same key as {earlier}")));
        }
        keys.push(key);
        Ok(())
    };
    let Some(list) = &client.keys else {
        let digest = key_digest(client.key_sha256.as_deref(), client.key.as_deref(), &path)?
            .ok_or_else(|| ConfigError::new(path.to_string(), "needs exactly one of `key_sha256`, `key` or `keys`"))?;
        let key = Key { digest, client: owner, listed: None };
        let what = if client.key.is_some() { "key" } else { "key_sha256" };
        return add(index, keys, key, &|| format!("{path}.{what}"));
    };
    if client.key_sha256.is_some() || client.key.is_some() {
        return Err(ConfigError::new(path.to_string(), "needs exactly one of `key_sha256`, `key` or `keys`"));
    }
    if list.is_empty() {
        return Err(ConfigError::new(format!("{path}.keys"), "must hold at least one key"));
    }
    for (k, raw) in list.iter().enumerate() {
        let at = format!("{path}.keys[{k}]");
        let digest = key_digest(raw.key_sha256.as_deref(), raw.key.as_deref(), &at)?
            .ok_or_else(|| ConfigError::new(at.clone(), "needs exactly one of `key_sha256` or `key`"))?;
        let what = if raw.key.is_some() { "key" } else { "key_sha256" };
        if let Some(earlier) = index.find(keys, &digest) {
            let earlier = KeyAt(keys, earlier);
            return Err(ConfigError::new(format!("{at}.{what}"), format!("is the same key as {earlier}")));
        }
        let id = match &raw.id {
            Some(id) if is_route_name(id) => id.clone(),
            Some(_) => {
                return Err(ConfigError::new(
                    format!("{at}.id"),
                    "must be 1-64 characters of letters, digits, `-`, `_` or `.`",
                ))
            }
            None => crate::model::key_id(&digest),
        };
        if let Some(other) = keys[first..].iter().position(|o| o.id() == Some(id.as_str())) {
            let field = if raw.id.is_some() { format!("{at}.id") } else { at.clone() };
            return Err(ConfigError::new(field, format!("`{id}` is already the id of {path}.keys[{other}]")));
        }
        let time = |text: &Option<String>, field: &str| -> Result<Option<i64>, ConfigError> {
            text.as_deref()
                .map(|t| {
                    parse_rfc3339(t).ok_or_else(|| {
                        ConfigError::new(
                            format!("{at}.{field}"),
                            "must be an RFC 3339 time such as 2027-01-01T00:00:00Z",
                        )
                    })
                })
                .transpose()
        };
        let not_before = time(&raw.not_before, "not_before")?;
        let expires = time(&raw.expires, "expires")?;
        time(&raw.rotated_at, "rotated_at")?;
        if let (Some(from), Some(until)) = (not_before, expires) {
            if from >= until {
                return Err(ConfigError::new(format!("{at}.not_before"), "must be before `expires`"));
            }
        }
        let listed = Listed { id: id.into(), not_before, expires, disabled: raw.disabled };
        let key = Key { digest, client: owner, listed: Some(Box::new(listed)) };
        add(index, keys, key, &|| format!("{at}.{what}"))?;
    }
    Ok(())
}

/// Where key `.1` of `.0` is written, for an error about a repeat.
struct KeyAt<'k>(&'k [Key], usize);

impl std::fmt::Display for KeyAt<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Some(key) = self.0.get(self.1) else { return f.write_str("an earlier key") };
        match key.listed {
            // A key in a `keys` list: its place in that list.
            Some(_) => {
                let first = self.0.iter().position(|o| o.client == key.client).unwrap_or(self.1);
                write!(f, "{}.keys[{}]", ClientPath(key.client()), self.1 - first)
            }
            None => write!(f, "{}", ClientPath(key.client())),
        }
    }
}

/// The digest of `key_sha256` (64 hex digits) or of a plaintext `key`;
/// `None` when neither is given, an error when both are or one is bad.
/// `path` is formatted only on an error (100,000 clients must not mean
/// 100,000 strings).
fn key_digest(
    sha256: Option<&str>,
    key: Option<&str>,
    path: &dyn std::fmt::Display,
) -> Result<Option<[u8; 32]>, ConfigError> {
    match (sha256, key) {
        (Some(hex), None) => decode_digest(hex)
            .map(Some)
            .ok_or_else(|| ConfigError::new(format!("{path}.key_sha256"), "must be 64 hexadecimal digits")),
        (None, Some(key)) => {
            let trimmed = key.trim_matches([' ', '\t']);
            if trimmed.is_empty() || trimmed.len() != key.len() {
                return Err(ConfigError::new(format!("{path}.key"), "must be non-empty with no surrounding spaces"));
            }
            if key.len() > MAX_KEY_BYTES {
                return Err(ConfigError::new(format!("{path}.key"), format!("must be at most {MAX_KEY_BYTES} bytes")));
            }
            Ok(Some(Sha256::digest(key.as_bytes()).into()))
        }
        (None, None) => Ok(None),
        (Some(_), Some(_)) => Err(ConfigError::new(path.to_string(), "needs exactly one of `key_sha256` or `key`")),
    }
}

/// The index of route `name`, a key of a client's by-route map at `at`
/// (`clients[0].inject.openai`): a route the client may use.
fn client_route(
    name: &str,
    at: &str,
    allowed: &Allowed,
    route_index: &HashMap<&str, usize>,
) -> Result<usize, ConfigError> {
    let Some(&r) = route_index.get(name) else {
        return Err(ConfigError::new(at, format!("names no route (`{name}` is not in `routes`)")));
    };
    if !allowed.allows(r) {
        return Err(ConfigError::new(
            at,
            format!("names a route this client may not use (`{name}` is not in its `routes`)"),
        ));
    }
    Ok(r)
}

/// A client's own `inject` lists (`clients[N].inject`), by route index,
/// sorted; nothing allocated for a client without any.
fn compile_own(
    raw: &RawClientInject,
    path: ClientPath,
    id: &str,
    allowed: &Allowed,
    route_index: &HashMap<&str, usize>,
    env: &dyn Environment,
    builder: &mut ProviderBuilder,
) -> Result<Box<[(usize, Credentials)]>, ConfigError> {
    if raw.0.is_empty() {
        return Ok(Box::default());
    }
    let mut own: Vec<(usize, Credentials)> = Vec::with_capacity(raw.0.len());
    for (name, list) in &raw.0 {
        // Keys are route names (`RawClientInject` refuses anything else
        // before reading a list), so they may be quoted.
        let at = format!("{path}.inject.{name}");
        let r = client_route(name, &at, allowed, route_index)?;
        if own.iter().any(|(o, _)| *o == r) {
            return Err(ConfigError::new(at, "is given twice"));
        }
        let owner = Owner::Client { id, route: name };
        own.push((r, compile_credentials(list, &at, owner, env, builder)?));
    }
    own.sort_unstable_by_key(|(r, _)| *r);
    Ok(own.into_boxed_slice())
}

fn compile_client_routes(
    raw: &[Cow<'_, str>],
    path: ClientPath,
    route_index: &HashMap<&str, usize>,
    shared_lists: &mut RouteLists,
) -> Result<Allowed, ConfigError> {
    if raw.is_empty() {
        return Err(ConfigError::new(
            format!("{path}.routes"),
            "must list the routes this client may use (`[\"*\"]` for all)",
        ));
    }
    if raw.iter().any(|r| r == "*") {
        if raw.len() > 1 {
            return Err(ConfigError::new(
                format!("{path}.routes"),
                "`*` already allows every route and must stand alone",
            ));
        }
        return Ok(Allowed::All);
    }
    // Most clients list the same routes as the one before them.
    if let Some(last) = shared_lists.last.as_ref().filter(|(names, _)| names.iter().eq(raw.iter().map(|r| &**r))) {
        return Ok(last.1.clone());
    }
    let lists = &mut shared_lists.lists;
    let scratch = &mut shared_lists.scratch;
    scratch.clear();
    for (i, name) in raw.iter().enumerate() {
        let Some(&r) = route_index.get(&**name) else {
            // Quoted only when it could be a route name at all.
            let message = if is_route_name(name) {
                format!("names no route (`{name}` is not in `routes`)")
            } else {
                "names no route (and is not a valid route name)".to_string()
            };
            return Err(ConfigError::new(format!("{path}.routes[{i}]"), message));
        };
        scratch.push(r);
    }
    scratch.sort_unstable();
    scratch.dedup();
    let list = match lists.get(&scratch[..]) {
        Some(list) => list.clone(),
        None => {
            let list: Arc<[usize]> = scratch[..].into();
            lists.insert(list.clone());
            list
        }
    };
    let allowed = Allowed::Only(list);
    shared_lists.last = Some((raw.iter().map(|r| r.to_string()).collect(), allowed.clone()));
    Ok(allowed)
}

/// The distinct route lists of the clients compiled so far, each allocated
/// once; `scratch` is reused for the list being compiled.
#[derive(Default)]
struct RouteLists {
    lists: HashSet<Arc<[usize]>>,
    scratch: Vec<usize>,
    /// The route names of the last list compiled, and what they compiled to.
    last: Option<(Vec<String>, Allowed)>,
}

fn decode_digest(hex: &str) -> Option<[u8; 32]> {
    let bytes = hex.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    // Eight digits at a time in one 64-bit word, no branch or table per
    // digit: 100,000 clients are 6.4 million random digits on every VM's
    // configure (a branch per digit mispredicted half the time; a table
    // was 9% of V8's configure time, a bounds-checked load per digit).
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // Per byte (all below 0x80): the high bit set where the byte >= `lo`,
    // and where it is <= `hi`.
    let at_least = |v: u64, lo: u8| v.wrapping_add(ONES * u64::from(0x80 - lo)) & HIGH;
    let at_most = |v: u64, hi: u8| !v.wrapping_add(ONES * u64::from(0x7f - hi)) & HIGH;
    let mut out = [0u8; 32];
    for (four, eight) in out.chunks_exact_mut(4).zip(bytes.chunks_exact(8)) {
        let mut word = [0u8; 8];
        word.copy_from_slice(eight);
        let v = u64::from_le_bytes(word);
        if v & HIGH != 0 {
            return None;
        }
        let digit = at_least(v, b'0') & at_most(v, b'9');
        let upper = at_least(v, b'A') & at_most(v, b'F');
        let lower = at_least(v, b'a') & at_most(v, b'f');
        if digit | upper | lower != HIGH {
            return None;
        }
        // A digit's value is its low four bits, a letter's those plus 9
        // (bit 6 tells letters from digits).
        let nibbles = (v & (ONES * 0x0f)) + ((v >> 6) & ONES) * 9;
        // Each pair of bytes (high digit, low digit) into its low byte.
        let pairs = (nibbles << 4) | (nibbles >> 8);
        for (i, byte) in four.iter_mut().enumerate() {
            *byte = (pairs >> (16 * i)) as u8;
        }
    }
    Some(out)
}

fn header_names(raw: &[String], field: &str) -> Result<Vec<String>, ConfigError> {
    let mut names: Vec<String> = Vec::with_capacity(raw.len());
    for (i, name) in raw.iter().enumerate() {
        let name = header_name(name, &format!("{field}[{i}]"))?;
        if !names.contains(&name) {
            names.push(name);
        }
    }
    Ok(names)
}

/// A lower-cased header name, or an error naming `path`.
fn header_name(name: &str, path: &str) -> Result<String, ConfigError> {
    if name.starts_with(':') {
        return Err(ConfigError::new(path, "must not be a pseudo-header"));
    }
    if name.is_empty() || !name.bytes().all(is_token_byte) {
        return Err(ConfigError::new(path, "must be a valid HTTP header name"));
    }
    let lower = name.to_ascii_lowercase();
    if lower == "host" {
        return Err(ConfigError::new(path, "must not be `host`"));
    }
    Ok(lower)
}

fn is_cluster_name(name: &str) -> bool {
    (1..=200).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_graphic())
}

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_header_value(v: &[u8]) -> bool {
    v.iter().all(|&b| b == b'\t' || (0x20..0x7f).contains(&b) || b >= 0x80)
        && v.first().is_none_or(|&b| b != b' ' && b != b'\t')
        && v.last().is_none_or(|&b| b != b' ' && b != b'\t')
}

fn is_client_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_graphic() && !matches!(b, b'"' | b'\'' | b',' | b'\\'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_digest_reads_exactly_the_hex_digits_of_either_case() {
        for b in 0..=u8::MAX {
            let text = String::from_utf8(vec![b; 64]).unwrap_or_default();
            let want = b.is_ascii_hexdigit().then(|| [(b as char).to_digit(16).map_or(0, |d| d as u8 * 17); 32]);
            assert_eq!(decode_digest(&text), want, "byte {b:#04x}");
        }
        assert_eq!(decode_digest(&"ab".repeat(31)), None, "62 digits");
        let mixed = "0123456789abcdefABCDEF".repeat(3);
        assert_eq!(decode_digest(&mixed[..64]).map(|d| d[..3].to_vec()), Some(vec![0x01, 0x23, 0x45]));
    }

    #[test]
    fn a_digest_reads_each_position_on_its_own() {
        // Every ASCII byte at every position among valid digits, against a
        // digit-by-digit decoding (the word-at-a-time reading must not let
        // one byte's value or fault spill into a neighbour's).
        let reference = |text: &str| -> Option<[u8; 32]> {
            let mut out = [0u8; 32];
            for (i, byte) in out.iter_mut().enumerate() {
                let digit = |j: usize| text[j..].chars().next()?.to_digit(16);
                *byte = u8::try_from(digit(2 * i)? * 16 + digit(2 * i + 1)?).ok()?;
            }
            Some(out)
        };
        let base: Vec<u8> = b"0123456789abcdefABCDEF9f".iter().copied().cycle().take(64).collect();
        for at in 0..64 {
            for b in 0..0x80u8 {
                let mut text = base.clone();
                text[at] = b;
                let text = String::from_utf8(text).unwrap_or_default();
                assert_eq!(decode_digest(&text), reference(&text), "byte {b:#04x} at {at}");
            }
        }
    }

    #[test]
    fn client_ids_refuse_quotes_commas_backslashes_and_spaces() {
        for bad in ["a\"b", "a'b", "a,b", "a\\b", "a b", "", "\u{e9}"] {
            assert!(!is_client_id(bad), "{bad:?}");
        }
        assert!(is_client_id("team-a_1.x:y/z@w"));
        assert!(is_client_id(&"x".repeat(128)) && !is_client_id(&"x".repeat(129)));
    }

    /// A value written where another kind belongs, or pasted as a name,
    /// is refused without being written back, whatever the kind.
    #[test]
    fn refusals_never_quote_a_value() {
        let env = |_: &str| None;
        let route = r#"{"name": "r", "match": {"clusters": ["r"]}, "inject": [{"header": "x", "value": VALUE}]}"#;
        for value in [
            r#""sk-secret-1""#,
            r#"{"sk-secret-1": "x"}"#,
            r#"{"inline": 918273645}"#,
            r#"{"inline": "x", "sk-secret-1": "y"}"#,
            r#"{"env": true}"#,
            r#"{"oauth2": {"cluster": "c", "token_path": "/t", "client_id": {"inline": "i"},
                "client_secret": {"inline": "s"}, "client_auth": "sk-secret-1"}}"#,
            r#"{"fetch": {"cluster": "c", "path": "/p", "json_pointer": "", "timeout_ms": -918273645}}"#,
        ] {
            let json = format!(r#"{{"routes": [{}]}}"#, route.replace("VALUE", value));
            let err = Policy::from_json(json.as_bytes(), &env).unwrap_err().to_string();
            assert!(!err.contains("sk-secret-1") && !err.contains("918273645"), "{value}: {err}");
            assert!(err.starts_with("routes[0].inject[0].value"), "{value}: {err}");
        }
        let json = r#"{"clients": [{"id": "c", "key": "k", "routes": ["*"], "disabled": "sk-secret-1"}]}"#;
        let err = Policy::from_json(json.as_bytes(), &env).unwrap_err().to_string();
        assert_eq!(err, "clients[0].disabled: invalid type: string \"…\", expected a boolean at line 1 column 79");
    }

    #[test]
    fn broken_json_is_blamed_on_the_document() {
        let err = parse(br#"{"clients": [] trailing"#).unwrap_err();
        assert_eq!(err.path, "$");
    }

    #[test]
    fn digests_decode_in_either_case_and_refuse_bad_hex() {
        let lower = "ab".repeat(32);
        assert_eq!(decode_digest(&lower), Some([0xab; 32]));
        assert_eq!(decode_digest(&lower.to_uppercase()), Some([0xab; 32]));
        assert_eq!(decode_digest(&"ab".repeat(31)), None);
        assert_eq!(decode_digest(&format!("zz{}", "ab".repeat(31))), None);
        assert_eq!(decode_digest(&format!("é{}", "a".repeat(62))), None);
    }
}

#[cfg(test)]
mod doc_tests {
    use super::*;

    /// The full example in docs/config.md and docs/examples/gateway.json load.
    #[test]
    fn documented_examples_load() {
        let env = |name: &str| Some(format!("value-of-{name}"));
        let doc = include_str!("../../../docs/config.md");
        let start = doc.find("```json\n").map(|i| i + 8).unwrap();
        let end = start + doc[start..].find("```").unwrap();
        let example = &doc[start..end];
        let policy = Policy::from_json(example.as_bytes(), &env).unwrap();
        assert_eq!((policy.summary().clients, policy.summary().routes), (3, 4));
        let file = include_str!("../../../docs/examples/gateway.json");
        assert_eq!(file, example, "docs/examples/gateway.json must be the documented example");
    }
}
