//! Dynamic upstream credentials: `oauth2`, `token_exchange` and `fetch`
//! values, in plain Rust. The host does the I/O; this module says what to
//! ask, how to read the answer, when to ask again, and what a request on a
//! route with dynamic credentials gets.
//!
//! ```text
//!  config ──compile──▶ Source (cluster, request, how to read the answer)
//!  host timer ──Record::due──▶ Source::request ──host HTTP call──▶ Source::parse ──▶ Record::succeeded | failed
//!  request ──Policy::decide──▶ Forward ──Policy::dynamic_edits(records)──▶ DynamicEdits | credential_unavailable
//! ```
//!
//! A [`Record`] is the state of one source shared by every worker of a host
//! (the proxy-wasm filter keeps it in shared data, updated with
//! compare-and-swap): the last good values, when they expire, when to
//! refresh, the failure streak, and a lease that lets one worker refresh at
//! a time. All values of one source come from one answer, and a request is
//! given every credential of its route or refused, never a mixed set.
//!
//! Nothing here logs. [`FetchError`] messages and [`Source`]'s `Debug`
//! never carry a secret, a token or a response body.

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::config::{secret, ConfigError, Environment};
use crate::decision::DenialReason;
use crate::policy::{Policy, QueryInject};
use crate::query::encode_component;
use crate::raw::{ClientAuth, RawFetch, RawOauth2, RawSecret, RawTokenExchange};
use crate::request::RequestView;

/// Refresh this long before `expires_in` runs out, unless configured.
pub const DEFAULT_MARGIN_SECONDS: u64 = 60;
/// How long a token call may take, unless configured.
pub const DEFAULT_TIMEOUT_MS: u64 = 5000;
/// How often a `fetch` source is polled, unless configured; also the refresh
/// period of a token answered without `expires_in`.
pub const DEFAULT_REFRESH_SECONDS: u64 = 300;
/// The longest wait between retries after failed refreshes.
pub const MAX_BACKOFF_MS: i64 = 60_000;
/// The longest credential value accepted from a token endpoint.
pub const MAX_VALUE_BYTES: usize = 16 * 1024;

const TOKEN_EXCHANGE_GRANT: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";

/// Which kind of dynamic value a source is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Oauth2,
    TokenExchange,
    Fetch,
}

impl Kind {
    /// The configuration name of the kind.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Oauth2 => "oauth2",
            Kind::TokenExchange => "token_exchange",
            Kind::Fetch => "fetch",
        }
    }
}

/// One HTTP call that yields credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct Source {
    /// A stable name for the source's shared state: a digest of everything
    /// that shapes the call and its reading (never shown in logs).
    pub id: String,
    /// The configuration path of the first entry that uses it, for logs
    /// (`routes[0].inject[0].value.oauth2`).
    pub path: String,
    pub kind: Kind,
    /// The Envoy cluster the call goes to.
    pub cluster: String,
    /// Pseudo-headers (`:method`, `:path`, `:authority`) first, then the
    /// others. May hold a client secret: never log them.
    pub headers: Vec<(String, String)>,
    /// The form body of a token request; `None` for a `fetch` GET.
    pub body: Option<Vec<u8>>,
    pub timeout_ms: u64,
    /// `fetch`: the JSON pointers read from each answer, in value order.
    pub pointers: Vec<String>,
    margin_ms: i64,
    refresh_ms: i64,
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source")
            .field("path", &self.path)
            .field("kind", &self.kind)
            .field("cluster", &self.cluster)
            .field("pointers", &self.pointers)
            .finish_non_exhaustive()
    }
}

/// Where one dynamic value goes in a forwarded request.
#[derive(Debug)]
pub(crate) struct DynamicInject {
    pub source: usize,
    /// Index into the source's values.
    pub value: usize,
    pub prefix: String,
    pub target: Target,
}

#[derive(Debug)]
pub(crate) enum Target {
    Header(String),
    Query(Vec<u8>),
}

/// What a successful call gave.
#[derive(Clone, PartialEq, Eq)]
pub struct Fetched {
    pub values: Vec<String>,
    /// Unix milliseconds after which the values may no longer be used.
    pub expires_at: Option<i64>,
    /// Unix milliseconds at which to refresh.
    pub refresh_at: i64,
}

/// Why an answer was not taken; the message never holds a value from it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FetchError(pub String);

fn fail<T>(message: impl Into<String>) -> Result<T, FetchError> {
    Err(FetchError(message.into()))
}

impl Source {
    /// Reads an answer received at `now` (Unix milliseconds).
    ///
    /// # Errors
    /// The status is not 2xx, the body is not the expected JSON, or a value
    /// is empty, too long or not fit for a header.
    pub fn parse(&self, status: u16, body: &[u8], now: i64) -> Result<Fetched, FetchError> {
        if !(200..300).contains(&status) {
            return fail(format!("the {} answered status {status}", self.endpoint()));
        }
        let Ok(json) = serde_json::from_slice::<serde_json::Value>(body) else {
            return fail(format!("the {} answered a body that is not JSON", self.endpoint()));
        };
        match self.kind {
            Kind::Fetch => {
                let mut values = Vec::with_capacity(self.pointers.len());
                for pointer in &self.pointers {
                    let value = match json.pointer(pointer) {
                        Some(serde_json::Value::String(s)) => s.clone(),
                        Some(_) => return fail(format!("`{pointer}` in the answer is not a string")),
                        None => return fail(format!("the answer has no `{pointer}`")),
                    };
                    check_value(&value, pointer)?;
                    values.push(value);
                }
                Ok(Fetched { values, expires_at: None, refresh_at: now.saturating_add(self.refresh_ms) })
            }
            Kind::Oauth2 | Kind::TokenExchange => {
                let token = match json.get("access_token") {
                    Some(serde_json::Value::String(s)) => s.clone(),
                    Some(_) => return fail("`access_token` in the answer is not a string"),
                    None => return fail("the answer has no `access_token`"),
                };
                check_value(&token, "access_token")?;
                let expires_in = match json.get("expires_in") {
                    None | Some(serde_json::Value::Null) => None,
                    Some(serde_json::Value::Number(n)) => n.as_f64(),
                    // Some providers send the number as a string.
                    Some(serde_json::Value::String(s)) => s.trim().parse::<f64>().ok(),
                    Some(_) => return fail("`expires_in` in the answer is not a number"),
                };
                let (expires_at, refresh_at) = match expires_in {
                    None if json.get("expires_in").is_some_and(|v| !v.is_null()) => {
                        return fail("`expires_in` in the answer is not a number")
                    }
                    None => (None, now.saturating_add(self.refresh_ms)),
                    Some(s) if !(s.is_finite() && s > 0.0) => {
                        return fail("`expires_in` in the answer is not a positive number")
                    }
                    // A token that lives under a second would be fetched
                    // again on every tick, by every worker, and never used.
                    Some(s) if s < 1.0 => return fail("`expires_in` in the answer is under a second"),
                    Some(s) => {
                        let life = (s * 1000.0).min(i64::MAX as f64 / 4.0) as i64;
                        // Refresh `margin` before expiry, but never later
                        // than half-way through a short life.
                        let lead = life.saturating_sub(self.margin_ms).max(life / 2);
                        (Some(now.saturating_add(life)), now.saturating_add(lead))
                    }
                };
                Ok(Fetched { values: vec![token], expires_at, refresh_at })
            }
        }
    }

    fn endpoint(&self) -> &'static str {
        match self.kind {
            Kind::Fetch => "credential service",
            Kind::Oauth2 | Kind::TokenExchange => "token endpoint",
        }
    }
}

fn check_value(value: &str, what: &str) -> Result<(), FetchError> {
    if value.is_empty() {
        return fail(format!("`{what}` in the answer is empty"));
    }
    if value.len() > MAX_VALUE_BYTES {
        return fail(format!("`{what}` in the answer is longer than {MAX_VALUE_BYTES} bytes"));
    }
    if !value.bytes().all(|b| (0x21..0x7f).contains(&b)) {
        return fail(format!("`{what}` in the answer holds a character not allowed in a credential"));
    }
    Ok(())
}

/// The shared state of one source.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The last good values; empty until the first success.
    #[serde(default)]
    pub values: Vec<String>,
    /// Unix milliseconds; the values are refused from then on.
    #[serde(default)]
    pub expires_at: Option<i64>,
    /// Unix milliseconds at which the next refresh is due (0: now).
    #[serde(default)]
    pub refresh_at: i64,
    /// Failed refreshes since the last success.
    #[serde(default)]
    pub failures: u32,
    /// Unix milliseconds until which one worker's call is in flight.
    #[serde(default)]
    pub lease_until: i64,
    /// Bumped each time the values change.
    #[serde(default)]
    pub generation: u64,
}

/// What [`Record::succeeded`] changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Success {
    /// The values differ from the cached ones (or there were none).
    pub changed: bool,
    /// The failure streak this success ended (0 when there was none).
    pub recovered_after: u32,
}

impl Record {
    /// The values a request may use at `now`, if any.
    pub fn usable(&self, now: i64) -> Option<&[String]> {
        let fresh = self.expires_at.is_none_or(|at| now < at);
        (!self.values.is_empty() && fresh).then_some(self.values.as_slice())
    }

    /// True when a refresh is due and no worker holds the lease.
    pub fn due(&self, now: i64) -> bool {
        now >= self.refresh_at && now >= self.lease_until
    }

    /// This record with a lease taken at `now` for a call of `source`.
    pub fn leased(&self, source: &Source, now: i64) -> Record {
        let lease = i64::try_from(source.timeout_ms).unwrap_or(i64::MAX).saturating_add(1000);
        Record { lease_until: now.saturating_add(lease), ..self.clone() }
    }

    /// This record after a successful call. Unchanged values keep their
    /// generation (only changed values replace the cached ones).
    pub fn succeeded(&self, fetched: Fetched) -> (Record, Success) {
        let changed = fetched.values != self.values;
        let record = Record {
            generation: if changed { self.generation.saturating_add(1) } else { self.generation },
            values: fetched.values,
            expires_at: fetched.expires_at,
            refresh_at: fetched.refresh_at,
            failures: 0,
            lease_until: 0,
        };
        (record, Success { changed, recovered_after: self.failures })
    }

    /// This record after a failed call at `now`: the last good values are
    /// kept (until they expire), and the next try waits 1 s, 2 s, 4 s, …
    /// up to [`MAX_BACKOFF_MS`].
    pub fn failed(&self, now: i64) -> Record {
        let failures = self.failures.saturating_add(1);
        Record { failures, refresh_at: now.saturating_add(backoff_ms(failures)), lease_until: 0, ..self.clone() }
    }

    /// The shared-data encoding.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads [`Record::encode`]'s output; anything else is an empty record.
    pub fn decode(bytes: &[u8]) -> Record {
        serde_json::from_slice(bytes).unwrap_or_default()
    }
}

/// The wait before retry number `failures` (1-based).
pub fn backoff_ms(failures: u32) -> i64 {
    let exp = failures.saturating_sub(1).min(16);
    (1000i64 << exp).min(MAX_BACKOFF_MS)
}

/// The edits a route's dynamic credentials add to a forwarded request,
/// applied after [`crate::Forward::apply`].
#[derive(Clone, PartialEq, Eq)]
pub struct DynamicEdits<'p> {
    /// Client-sent copies of the injected headers.
    pub remove_headers: Vec<&'p str>,
    pub add_headers: Vec<(&'p str, String)>,
    /// The new `:path` (static and dynamic query credentials), when the
    /// route injects a dynamic query credential.
    pub path: Option<Vec<u8>>,
    /// The values injected, without prefixes: what a response must never
    /// carry back (see [`Policy::reflections`]).
    pub secrets: Vec<String>,
}

impl DynamicEdits<'_> {
    /// Applies the edits to a header list already edited by the forward.
    pub fn apply(&self, headers: &mut Vec<(String, Vec<u8>)>) {
        headers.retain(|(name, _)| !self.remove_headers.iter().any(|r| name.eq_ignore_ascii_case(r)));
        if let Some(path) = &self.path {
            match headers.iter_mut().find(|(name, _)| name == ":path") {
                Some(entry) => entry.1.clone_from(path),
                None => headers.push((":path".to_string(), path.clone())),
            }
        }
        headers.extend(self.add_headers.iter().map(|(n, v)| (n.to_string(), v.as_bytes().to_vec())));
    }
}

impl Policy {
    /// Every dynamic credential source, in configuration order; an index
    /// into it is a source number.
    pub fn credential_sources(&self) -> &[Source] {
        &self.sources
    }

    /// The sources a route's requests need (empty for a static route).
    pub fn route_sources(&self, route: &str) -> &[usize] {
        self.routes.iter().find(|r| r.name == route).map_or(&[], |r| r.sources.as_slice())
    }

    /// The edits for a forwarded request on `route` whose route has dynamic
    /// credentials. `values[s]` holds source `s`'s usable values (the
    /// host reads them once, from one record per source, so they are
    /// consistent); hosts need fill only [`Policy::route_sources`].
    ///
    /// # Errors
    /// [`DenialReason::CredentialUnavailable`] when any of the route's
    /// sources has no usable value: every credential of a route is injected,
    /// or none.
    pub fn dynamic_edits<'p>(
        &'p self,
        route: &str,
        req: &RequestView<'_>,
        values: &[Option<&[String]>],
    ) -> Result<DynamicEdits<'p>, DenialReason> {
        let Some(route) = self.routes.iter().find(|r| r.name == route) else {
            return Ok(DynamicEdits {
                remove_headers: Vec::new(),
                add_headers: Vec::new(),
                path: None,
                secrets: Vec::new(),
            });
        };
        let mut add_headers = Vec::new();
        let mut remove_headers = Vec::new();
        let mut queries: Vec<QueryInject> = Vec::new();
        let mut secrets = Vec::with_capacity(route.dynamic.len());
        for inject in &route.dynamic {
            let value = values
                .get(inject.source)
                .copied()
                .flatten()
                .and_then(|v| v.get(inject.value))
                .ok_or(DenialReason::CredentialUnavailable)?;
            let full = format!("{}{value}", inject.prefix);
            secrets.push(value.clone());
            match &inject.target {
                Target::Header(name) => {
                    if req.headers.iter().any(|(n, _)| n.eq_ignore_ascii_case(name)) {
                        remove_headers.push(name.as_str());
                    }
                    add_headers.push((name.as_str(), full));
                }
                Target::Query(name) => {
                    let shown = String::from_utf8_lossy(name);
                    let encoded = format!("{}={}", encode_component(&shown), encode_component(&full));
                    queries.push(QueryInject { name: name.clone(), encoded });
                }
            }
        }
        let path = if queries.is_empty() {
            None
        } else {
            let mut all: Vec<QueryInject> = route
                .queries
                .iter()
                .map(|q| QueryInject { name: q.name.clone(), encoded: q.encoded.clone() })
                .collect();
            all.extend(queries);
            self.rewrite_query(req.path, &all)
        };
        Ok(DynamicEdits { remove_headers, add_headers, path, secrets })
    }
}

/// Compiles one dynamic value. Sources are shared by entries that make the
/// same call (`fetch` entries differing only in `json_pointer` share one
/// call, and so one consistent answer); a token exchange is per route.
pub(crate) struct SourceBuilder {
    pub sources: Vec<Source>,
}

/// A dynamic value as written, borrowed from the raw configuration.
pub(crate) enum RawDynamic<'a> {
    Oauth2(&'a RawOauth2),
    TokenExchange(&'a RawTokenExchange),
    Fetch(&'a RawFetch),
}

impl SourceBuilder {
    /// Adds (or finds) the source for `raw` at `path` (the `value` field's
    /// path) on route `route`; returns the source and value index.
    pub fn add(
        &mut self,
        raw: RawDynamic<'_>,
        route: &str,
        path: &str,
        env: &dyn Environment,
    ) -> Result<(usize, usize), ConfigError> {
        let (mut source, pointer) = match raw {
            RawDynamic::Oauth2(o) => (oauth2(o, &format!("{path}.oauth2"), env)?, None),
            RawDynamic::TokenExchange(t) => (token_exchange(t, route, &format!("{path}.token_exchange"), env)?, None),
            RawDynamic::Fetch(f) => {
                let path = format!("{path}.fetch");
                let pointer = &f.json_pointer;
                if !(pointer.is_empty() || pointer.starts_with('/')) {
                    return Err(ConfigError::new(
                        format!("{path}.json_pointer"),
                        "must be a JSON pointer (RFC 6901): empty or starting with `/`",
                    ));
                }
                (fetch(f, &path, env)?, Some(pointer.clone()))
            }
        };
        // The identity of the call, before pointers.
        let call = call_digest(&source, route);
        if let Some(s) = self.sources.iter().position(|s| s.id == call) {
            let existing = &mut self.sources[s];
            let value = match pointer {
                Some(p) => match existing.pointers.iter().position(|q| *q == p) {
                    Some(v) => v,
                    None => {
                        existing.pointers.push(p);
                        existing.pointers.len() - 1
                    }
                },
                None => 0,
            };
            return Ok((s, value));
        }
        source.id = call;
        source.pointers = pointer.into_iter().collect();
        self.sources.push(source);
        Ok((self.sources.len() - 1, 0))
    }

    /// The finished sources, each id now covering its pointers too (so a
    /// changed set of pointers never reads another set's record).
    pub fn finish(mut self) -> Vec<Source> {
        for source in &mut self.sources {
            let mut digest = Sha256::new();
            digest.update(source.id.as_bytes());
            for p in &source.pointers {
                digest.update([0]);
                digest.update(p.as_bytes());
            }
            source.id = hex12(&digest.finalize());
        }
        self.sources
    }
}

fn hex12(bytes: &[u8]) -> String {
    bytes.iter().take(6).map(|b| format!("{b:02x}")).collect()
}

fn call_digest(source: &Source, route: &str) -> String {
    let mut digest = Sha256::new();
    let mut part = |bytes: &[u8]| {
        digest.update((bytes.len() as u64).to_le_bytes());
        digest.update(bytes);
    };
    part(source.kind.name().as_bytes());
    // A token exchange is cached per (route, audience): the route is part
    // of its identity.
    part(if source.kind == Kind::TokenExchange { route.as_bytes() } else { b"" });
    part(source.cluster.as_bytes());
    for (n, v) in &source.headers {
        part(n.as_bytes());
        part(v.as_bytes());
    }
    part(source.body.as_deref().unwrap_or(b"\xff"));
    part(&source.margin_ms.to_le_bytes());
    part(&source.refresh_ms.to_le_bytes());
    part(&source.timeout_ms.to_le_bytes());
    hex12(&digest.finalize())
}

fn cluster_name(cluster: &str, path: &str) -> Result<String, ConfigError> {
    if cluster.is_empty() || cluster.len() > 256 || !cluster.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ConfigError::new(
            format!("{path}.cluster"),
            "must name an Envoy cluster (1-256 visible ASCII characters)",
        ));
    }
    Ok(cluster.to_string())
}

fn request_path(p: &str, field: &str) -> Result<String, ConfigError> {
    if !p.starts_with('/') || !p.bytes().all(|b| b.is_ascii_graphic()) || p.contains('#') {
        return Err(ConfigError::new(field, "must be a request path starting with `/` (visible ASCII, no fragment)"));
    }
    Ok(p.to_string())
}

fn authority(raw: Option<&str>, cluster: &str, path: &str) -> Result<String, ConfigError> {
    match raw {
        None => Ok(cluster.to_string()),
        Some(a) if !a.is_empty() && a.bytes().all(|b| b.is_ascii_graphic() && b != b'/') => Ok(a.to_string()),
        Some(_) => Err(ConfigError::new(format!("{path}.authority"), "must be a host name, with an optional port")),
    }
}

fn timing(margin: Option<u64>, timeout: Option<u64>, path: &str) -> Result<(i64, u64), ConfigError> {
    let timeout = timeout.unwrap_or(DEFAULT_TIMEOUT_MS);
    if !(1..=60_000).contains(&timeout) {
        return Err(ConfigError::new(format!("{path}.timeout_ms"), "must be between 1 and 60000"));
    }
    let margin = margin.unwrap_or(DEFAULT_MARGIN_SECONDS);
    if margin > 86_400 {
        return Err(ConfigError::new(format!("{path}.refresh_margin_seconds"), "must be at most 86400 (one day)"));
    }
    Ok((margin as i64 * 1000, timeout))
}

fn form_text(value: &str, field: &str) -> Result<(), ConfigError> {
    if value.is_empty() || value.bytes().any(|b| b.is_ascii_control()) {
        return Err(ConfigError::new(field, "must be non-empty text without control characters"));
    }
    Ok(())
}

fn scopes(raw: &[String], path: &str) -> Result<Option<String>, ConfigError> {
    for (i, scope) in raw.iter().enumerate() {
        // RFC 6749 3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E )
        if scope.is_empty()
            || !scope.bytes().all(|b| b == 0x21 || (0x23..=0x5b).contains(&b) || (0x5d..=0x7e).contains(&b))
        {
            return Err(ConfigError::new(
                format!("{path}.scopes[{i}]"),
                "must be a scope token (visible ASCII, no space, `\"` or `\\`)",
            ));
        }
    }
    Ok((!raw.is_empty()).then(|| raw.join(" ")))
}

struct Form(Vec<u8>);

impl Form {
    fn push(&mut self, name: &str, value: &str) {
        if !self.0.is_empty() {
            self.0.push(b'&');
        }
        self.0.extend_from_slice(encode_component(name).as_bytes());
        self.0.push(b'=');
        self.0.extend_from_slice(encode_component(value).as_bytes());
    }
}

fn static_secret(raw: &RawSecret, path: &str, env: &dyn Environment) -> Result<String, ConfigError> {
    let value = secret(raw, path, env)?;
    if value.bytes().any(|b| b.is_ascii_control()) {
        return Err(ConfigError::new(path, "holds a control character"));
    }
    Ok(value)
}

/// The client authentication of a token request: an `authorization`
/// header, or fields of the form.
fn client_auth(
    id: Option<(&RawSecret, &RawSecret)>,
    how: ClientAuth,
    path: &str,
    env: &dyn Environment,
    headers: &mut Vec<(String, String)>,
    form: &mut Form,
) -> Result<(), ConfigError> {
    let Some((id, secret_raw)) = id else {
        return Ok(());
    };
    let id = static_secret(id, &format!("{path}.client_id"), env)?;
    let secret_value = static_secret(secret_raw, &format!("{path}.client_secret"), env)?;
    match how {
        ClientAuth::Basic => {
            // RFC 6749 2.3.1: both form-encoded, then Basic.
            let pair = format!("{}:{}", encode_component(&id), encode_component(&secret_value));
            let basic = base64::engine::general_purpose::STANDARD.encode(pair);
            headers.push(("authorization".into(), format!("Basic {basic}")));
        }
        ClientAuth::Body => {
            form.push("client_id", &id);
            form.push("client_secret", &secret_value);
        }
    }
    Ok(())
}

/// Where a token request goes: cluster, token path, authority.
type Endpoint<'a> = (&'a str, &'a str, Option<&'a str>);

fn token_source(
    kind: Kind,
    (cluster, token_path, authority_raw): Endpoint<'_>,
    path: &str,
    (margin_ms, timeout_ms): (i64, u64),
    mut headers: Vec<(String, String)>,
    form: Form,
) -> Result<Source, ConfigError> {
    let cluster = cluster_name(cluster, path)?;
    let target = request_path(token_path, &format!("{path}.token_path"))?;
    let authority = authority(authority_raw, &cluster, path)?;
    let mut all = vec![
        (":method".to_string(), "POST".to_string()),
        (":path".to_string(), target),
        (":authority".to_string(), authority),
        ("content-type".to_string(), "application/x-www-form-urlencoded".to_string()),
        ("accept".to_string(), "application/json".to_string()),
    ];
    all.append(&mut headers);
    Ok(Source {
        id: String::new(),
        path: path.to_string(),
        kind,
        cluster,
        headers: all,
        body: Some(form.0),
        timeout_ms,
        pointers: Vec::new(),
        margin_ms,
        refresh_ms: DEFAULT_REFRESH_SECONDS as i64 * 1000,
    })
}

fn oauth2(raw: &RawOauth2, path: &str, env: &dyn Environment) -> Result<Source, ConfigError> {
    let (margin_ms, timeout_ms) = timing(raw.refresh_margin_seconds, raw.timeout_ms, path)?;
    let mut form = Form(Vec::new());
    form.push("grant_type", "client_credentials");
    if let Some(scope) = scopes(&raw.scopes, path)? {
        form.push("scope", &scope);
    }
    if let Some(audience) = &raw.audience {
        form_text(audience, &format!("{path}.audience"))?;
        form.push("audience", audience);
    }
    let mut headers = Vec::new();
    client_auth(Some((&raw.client_id, &raw.client_secret)), raw.client_auth, path, env, &mut headers, &mut form)?;
    token_source(
        Kind::Oauth2,
        (&raw.cluster, &raw.token_path, raw.authority.as_deref()),
        path,
        (margin_ms, timeout_ms),
        headers,
        form,
    )
}

fn token_exchange(
    raw: &RawTokenExchange,
    _route: &str,
    path: &str,
    env: &dyn Environment,
) -> Result<Source, ConfigError> {
    let (margin_ms, timeout_ms) = timing(raw.refresh_margin_seconds, raw.timeout_ms, path)?;
    let mut form = Form(Vec::new());
    form.push("grant_type", TOKEN_EXCHANGE_GRANT);
    form_text(&raw.audience, &format!("{path}.audience"))?;
    form.push("audience", &raw.audience);
    let subject = static_secret(&raw.subject_token, &format!("{path}.subject_token"), env)?;
    form.push("subject_token", &subject);
    let subject_type = raw.subject_token_type.as_deref().unwrap_or(ACCESS_TOKEN_TYPE);
    form_text(subject_type, &format!("{path}.subject_token_type"))?;
    form.push("subject_token_type", subject_type);
    if let Some(resource) = &raw.resource {
        form_text(resource, &format!("{path}.resource"))?;
        form.push("resource", resource);
    }
    if let Some(requested) = &raw.requested_token_type {
        form_text(requested, &format!("{path}.requested_token_type"))?;
        form.push("requested_token_type", requested);
    }
    if let Some(scope) = scopes(&raw.scopes, path)? {
        form.push("scope", &scope);
    }
    let client = match (&raw.client_id, &raw.client_secret) {
        (Some(id), Some(secret_raw)) => Some((id, secret_raw)),
        (None, None) => None,
        (Some(_), None) => return Err(ConfigError::new(format!("{path}.client_secret"), "is needed with `client_id`")),
        (None, Some(_)) => return Err(ConfigError::new(format!("{path}.client_id"), "is needed with `client_secret`")),
    };
    let mut headers = Vec::new();
    client_auth(client, raw.client_auth, path, env, &mut headers, &mut form)?;
    token_source(
        Kind::TokenExchange,
        (&raw.cluster, &raw.token_path, raw.authority.as_deref()),
        path,
        (margin_ms, timeout_ms),
        headers,
        form,
    )
}

fn fetch(raw: &RawFetch, path: &str, env: &dyn Environment) -> Result<Source, ConfigError> {
    let (_, timeout_ms) = timing(None, raw.timeout_ms, path)?;
    let refresh = raw.refresh_seconds.unwrap_or(DEFAULT_REFRESH_SECONDS);
    if !(1..=86_400).contains(&refresh) {
        return Err(ConfigError::new(format!("{path}.refresh_seconds"), "must be between 1 and 86400"));
    }
    let cluster = cluster_name(&raw.cluster, path)?;
    let target = request_path(&raw.path, &format!("{path}.path"))?;
    let authority = authority(raw.authority.as_deref(), &cluster, path)?;
    let mut headers = vec![
        (":method".to_string(), "GET".to_string()),
        (":path".to_string(), target),
        (":authority".to_string(), authority),
        ("accept".to_string(), "application/json".to_string()),
    ];
    if let Some(auth) = &raw.authorization {
        let value = static_secret(auth, &format!("{path}.authorization"), env)?;
        headers.push(("authorization".to_string(), value));
    }
    Ok(Source {
        id: String::new(),
        path: path.to_string(),
        kind: Kind::Fetch,
        cluster,
        headers,
        body: None,
        timeout_ms,
        pointers: Vec::new(),
        margin_ms: 0,
        refresh_ms: refresh as i64 * 1000,
    })
}

// Credentials never show in Debug output: values are counted, not printed.

impl std::fmt::Debug for Fetched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetched")
            .field("values", &format_args!("[{} redacted]", self.values.len()))
            .field("expires_at", &self.expires_at)
            .field("refresh_at", &self.refresh_at)
            .finish()
    }
}

impl std::fmt::Debug for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Record")
            .field("values", &format_args!("[{} redacted]", self.values.len()))
            .field("expires_at", &self.expires_at)
            .field("refresh_at", &self.refresh_at)
            .field("failures", &self.failures)
            .field("lease_until", &self.lease_until)
            .field("generation", &self.generation)
            .finish()
    }
}

impl std::fmt::Debug for DynamicEdits<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let added: Vec<&str> = self.add_headers.iter().map(|(name, _)| *name).collect();
        f.debug_struct("DynamicEdits")
            .field("remove_headers", &self.remove_headers)
            .field("add_headers", &added)
            .field("path", &self.path.as_ref().map(|_| ".."))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::Decision;

    const ENV: fn(&str) -> Option<String> = |name| Some(format!("env-{name}"));

    fn policy(routes: &str) -> Policy {
        let json = format!(
            r#"{{"clients": [{{"id": "c", "key": "k1", "routes": ["*"]}}],
                "key_sources": [{{"header": "x-api-key"}}], "routes": {routes}}}"#
        );
        match Policy::from_json(json.as_bytes(), &ENV) {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        }
    }

    const OAUTH: &str = r#"[{"name": "r", "match": {"clusters": ["r"]}, "inject": [
        {"header": "authorization", "prefix": "Bearer ", "value": {"oauth2": {
          "cluster": "idp", "token_path": "/oauth/token", "authority": "idp.example.com",
          "client_id": {"inline": "my client"}, "client_secret": {"env": "IDP_SECRET"},
          "scopes": ["read", "write"], "audience": "https://api.example.com"}}}]}]"#;

    fn source(p: &Policy) -> &Source {
        &p.credential_sources()[0]
    }

    #[test]
    fn oauth2_builds_a_client_credentials_request() {
        let p = policy(OAUTH);
        let s = source(&p);
        assert_eq!(s.cluster, "idp");
        assert_eq!(s.path, "routes[0].inject[0].value.oauth2");
        let header = |n: &str| s.headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
        assert_eq!(header(":method"), Some("POST"));
        assert_eq!(header(":path"), Some("/oauth/token"));
        assert_eq!(header(":authority"), Some("idp.example.com"));
        let basic = base64::engine::general_purpose::STANDARD.encode("my%20client:env-IDP_SECRET");
        assert_eq!(header("authorization"), Some(format!("Basic {basic}").as_str()));
        let body = String::from_utf8(s.body.clone().unwrap()).unwrap();
        assert_eq!(body, "grant_type=client_credentials&scope=read%20write&audience=https%3A%2F%2Fapi.example.com");
        // The secret never shows in Debug.
        assert!(!format!("{s:?} {p:?}").contains("env-IDP_SECRET"));
    }

    #[test]
    fn token_answers_set_expiry_and_refresh_with_a_margin() {
        let p = policy(OAUTH);
        let s = source(&p);
        let f = s.parse(200, br#"{"access_token":"t1","token_type":"Bearer","expires_in":3600}"#, 1000).unwrap();
        assert_eq!(f.values, ["t1"]);
        assert_eq!(f.expires_at, Some(3_601_000));
        assert_eq!(f.refresh_at, 1000 + 3_540_000);
        // A short life refreshes half-way.
        let f = s.parse(200, br#"{"access_token":"t1","expires_in":"10"}"#, 0).unwrap();
        assert_eq!((f.expires_at, f.refresh_at), (Some(10_000), 5_000));
        // No expires_in: valid until replaced, refreshed on the default period.
        let f = s.parse(200, br#"{"access_token":"t1"}"#, 0).unwrap();
        assert_eq!((f.expires_at, f.refresh_at), (None, 300_000));
    }

    #[test]
    fn bad_answers_are_refused_without_quoting_them() {
        let p = policy(OAUTH);
        let s = source(&p);
        let cases: [(u16, &[u8], &str); 8] = [
            (500, br#"{"access_token":"secret-t"}"#, "the token endpoint answered status 500"),
            (200, b"secret-t", "the token endpoint answered a body that is not JSON"),
            (200, br#"{"token":"secret-t"}"#, "the answer has no `access_token`"),
            (200, br#"{"access_token":7}"#, "`access_token` in the answer is not a string"),
            (200, br#"{"access_token":""}"#, "`access_token` in the answer is empty"),
            (
                200,
                br#"{"access_token":"secret t"}"#,
                "`access_token` in the answer holds a character not allowed in a credential",
            ),
            (
                200,
                br#"{"access_token":"secret-t","expires_in":0}"#,
                "`expires_in` in the answer is not a positive number",
            ),
            (
                200,
                br#"{"access_token":"secret-t","expires_in":0.0001}"#,
                "`expires_in` in the answer is under a second",
            ),
        ];
        for (status, body, message) in cases {
            let err = s.parse(status, body, 0).unwrap_err();
            assert_eq!(err.0, message);
            assert!(!err.0.contains("secret"));
        }
    }

    #[test]
    fn fetch_entries_of_one_call_share_a_source_and_one_answer() {
        let p = policy(
            r#"[{"name": "r", "match": {"clusters": ["r"]}, "inject": [
                {"header": "x-key-id", "value": {"fetch": {"cluster": "vault", "path": "/v1/cred", "json_pointer": "/data/id"}}},
                {"query": "sig", "value": {"fetch": {"cluster": "vault", "path": "/v1/cred", "json_pointer": "/data/secret"}}}]}]"#,
        );
        assert_eq!(p.credential_sources().len(), 1);
        let s = source(&p);
        assert_eq!(s.pointers, ["/data/id", "/data/secret"]);
        let f = s.parse(200, br#"{"data":{"id":"k7","secret":"s/7"}}"#, 0).unwrap();
        assert_eq!(f.values, ["k7", "s/7"]);
        assert_eq!(f.refresh_at, 300_000);
        assert_eq!(s.parse(200, br#"{"data":{"id":"k7"}}"#, 0).unwrap_err().0, "the answer has no `/data/secret`");

        let headers = vec![
            (":method".to_string(), b"GET".to_vec()),
            (":path".to_string(), b"/x?sig=mine&a=1".to_vec()),
            ("x-key-id".to_string(), b"client-sent".to_vec()),
            ("x-api-key".to_string(), b"k1".to_vec()),
        ];
        let mut view = RequestView::from_headers(None, &headers);
        view.cluster = Some("r");
        let Decision::Forward(forward) = p.decide(&view, &|| 0) else { panic!() };
        assert_eq!(p.route_sources("r"), [0]);
        let values = [Some(&f.values[..])];
        let edits = p.dynamic_edits("r", &view, &values).unwrap();
        let mut out = headers.clone();
        forward.apply(&mut out);
        edits.apply(&mut out);
        assert_eq!(
            out,
            vec![
                (":method".to_string(), b"GET".to_vec()),
                (":path".to_string(), b"/x?a=1&sig=s%2F7".to_vec()),
                ("x-key-id".to_string(), b"k7".to_vec()),
            ]
        );
        assert_eq!(p.dynamic_edits("r", &view, &[None]), Err(DenialReason::CredentialUnavailable));
    }

    #[test]
    fn token_exchange_is_one_source_per_route_and_audience() {
        let te = |aud: &str| {
            format!(
                r#"{{"header": "authorization", "prefix": "Bearer ", "value": {{"token_exchange": {{
                  "cluster": "sts", "token_path": "/token", "subject_token": {{"env": "SUBJECT"}},
                  "audience": "{aud}"}}}}}}"#
            )
        };
        let p = policy(&format!(
            r#"[{{"name": "a", "match": {{"clusters": ["a"]}}, "inject": [{}]}},
                {{"name": "b", "match": {{"clusters": ["b"]}}, "inject": [{}]}},
                {{"name": "c", "match": {{"clusters": ["c"]}}, "inject": [{}]}}]"#,
            te("api-1"),
            te("api-1"),
            te("api-2")
        ));
        assert_eq!(p.credential_sources().len(), 3);
        let body = String::from_utf8(source(&p).body.clone().unwrap()).unwrap();
        assert_eq!(
            body,
            "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange&audience=api-1\
             &subject_token=env-SUBJECT&subject_token_type=urn%3Aietf%3Aparams%3Aoauth%3Atoken-type%3Aaccess_token"
        );
        // Identical oauth2 grants on two routes share one token.
        let o = OAUTH.trim_start_matches('[').trim_end_matches(']');
        let two = format!("[{o}, {}]", o.replace(r#""name": "r""#, r#""name": "s""#));
        assert_eq!(policy(&two).credential_sources().len(), 1);
    }

    #[test]
    fn records_keep_the_last_good_value_and_back_off() {
        let p = policy(OAUTH);
        let s = source(&p);
        let empty = Record::default();
        assert!(empty.due(0) && empty.usable(0).is_none());
        let leased = empty.leased(s, 0);
        assert!(!leased.due(1000) && leased.due(6000));
        let f = s.parse(200, br#"{"access_token":"t1","expires_in":100}"#, 0).unwrap();
        let (ok, success) = leased.succeeded(f.clone());
        assert_eq!(success, Success { changed: true, recovered_after: 0 });
        assert_eq!(ok.usable(99_999), Some(&["t1".to_string()][..]));
        assert_eq!(ok.usable(100_000), None);
        let failed = ok.failed(50_000).failed(51_000).failed(53_000);
        assert_eq!((failed.failures, failed.refresh_at), (3, 57_000));
        assert_eq!(failed.usable(60_000), Some(&["t1".to_string()][..]));
        let (back, success) = failed.succeeded(f);
        assert_eq!(success, Success { changed: false, recovered_after: 3 });
        assert_eq!(back.generation, ok.generation);
        assert_eq!(Record::decode(&back.encode()), back);
        assert_eq!(Record::decode(b"garbage"), Record::default());
        assert_eq!(backoff_ms(40), MAX_BACKOFF_MS);
    }

    /// Every example under `## Dynamic credentials` in docs/config.md loads,
    /// with the sources it describes.
    #[test]
    fn documented_examples_load() {
        let doc = include_str!("../../docs/config.md");
        let start = doc.find("## Dynamic credentials").unwrap();
        let end = start + doc[start..].find("## When a configuration is refused").unwrap();
        let mut kinds = Vec::new();
        for block in doc[start..end].split("```json\n").skip(1) {
            let json = &block[..block.find("```").unwrap()];
            let p = Policy::from_json(json.as_bytes(), &ENV).unwrap_or_else(|e| panic!("{e}\n{json}"));
            kinds.extend(p.credential_sources().iter().map(|s| (s.kind, s.pointers.len())));
        }
        assert_eq!(kinds, [(Kind::Oauth2, 0), (Kind::TokenExchange, 0), (Kind::Fetch, 2)]);
    }

    #[test]
    fn config_errors_name_the_field() {
        let bad = |value: &str| {
            let json = format!(
                r#"{{"routes": [{{"name": "r", "match": {{"clusters": ["r"]}}, "inject": [{{"header": "x", "value": {value}}}]}}]}}"#
            );
            Policy::from_json(json.as_bytes(), &|_: &str| None).unwrap_err().to_string()
        };
        assert_eq!(
            bad(r#"{"fetch": {"cluster": "", "path": "/c", "json_pointer": "/t"}}"#),
            "routes[0].inject[0].value.fetch.cluster: must name an Envoy cluster (1-256 visible ASCII characters)"
        );
        assert_eq!(
            bad(r#"{"fetch": {"cluster": "v", "path": "/c", "json_pointer": "t"}}"#),
            "routes[0].inject[0].value.fetch.json_pointer: must be a JSON pointer (RFC 6901): empty or starting with `/`"
        );
        assert_eq!(
            bad(r#"{"oauth2": {"cluster": "i", "token_path": "token", "client_id": {"inline": "a"}, "client_secret": {"inline": "b"}}}"#),
            "routes[0].inject[0].value.oauth2.token_path: must be a request path starting with `/` (visible ASCII, no fragment)"
        );
        assert_eq!(
            bad(
                r#"{"oauth2": {"cluster": "i", "token_path": "/t", "client_id": {"inline": "a"}, "client_secret": {"env": "IDP_SECRET"}}}"#
            ),
            "routes[0].inject[0].value.oauth2.client_secret.env: IDP_SECRET is not set"
        );
        assert_eq!(
            bad(
                r#"{"token_exchange": {"cluster": "s", "token_path": "/t", "subject_token": {"inline": "x"}, "audience": "a", "client_id": {"inline": "a"}}}"#
            ),
            "routes[0].inject[0].value.token_exchange.client_secret: is needed with `client_id`"
        );
    }

    #[test]
    fn debug_output_never_shows_a_value() {
        let record = Record { values: vec!["tok-secret-1".into()], generation: 3, ..Record::default() };
        let fetched = Fetched { values: vec!["tok-secret-2".into()], expires_at: None, refresh_at: 1 };
        let edits = DynamicEdits {
            remove_headers: vec!["authorization"],
            add_headers: vec![("authorization", "tok-secret-3".into())],
            path: Some(b"/?k=tok-secret-4".to_vec()),
            secrets: vec!["tok-secret-6".into()],
        };
        let raw: crate::raw::RawValue = serde_json::from_str(r#"{"inline": "tok-secret-5"}"#).unwrap();
        let text = format!("{record:?} {fetched:?} {edits:?} {raw:?}");
        assert!(!text.contains("tok-secret"), "{text}");
        assert!(
            text.contains("generation: 3") && text.contains("[1 redacted]") && text.contains("Inline(..)"),
            "{text}"
        );
    }
}
