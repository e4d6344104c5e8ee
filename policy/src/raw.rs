//! The configuration as written: plain types that mirror the JSON contract
//! in `docs/config.md` field by field, read with [`crate::json`]. Nothing
//! here is checked beyond its JSON shape (unknown fields are refused, with
//! their path); [`crate::compile`] turns it into a [`crate::Policy`].
//!
//! The clients are not read with the rest: [`RawConfig::read`] notes where
//! the `clients` array is and how many it holds, and [`Clients`] reads them
//! one at a time, borrowing their strings from the document, so 100,000
//! clients are compiled without a second copy of them in memory.

use std::borrow::Cow;

use crate::json::{self, Reader};

type Result<T> = std::result::Result<T, json::Error>;

/// The whole plugin configuration, but its clients (see [`Clients`]).
#[derive(Debug, Default)]
pub struct RawConfig {
    /// Where the `clients` array starts in the document, and its length.
    pub clients: Option<(usize, usize)>,
    pub key_sources: Option<Vec<RawKeySource>>,
    pub routes: Vec<RawRoute>,
    pub strip_request_headers: Vec<String>,
    pub strip_response_headers: Vec<String>,
    pub client_id_header: Option<String>,
    /// Envoy's first stage (the listener) sets `client_id_header` too, to
    /// the id of the client whose valid key the request presents, for a
    /// rate-limit filter after keyswap on the listener to key on.
    pub client_id_on_listener: bool,
    /// The request header carrying the caller's own token for the
    /// credential service of a `{client}` fetch; removed from every request.
    pub caller_token_header: Option<String>,
    pub unmatched_route: UnmatchedRoute,
    pub metrics: RawMetrics,
    /// Refuse every request (503 `configuration_unavailable`): the
    /// fail-closed configuration Envoy serves when it has no usable one.
    pub refuse_all: bool,
    /// Client metadata fields sent upstream, by field name: the request
    /// header each goes in (`{"team": "x-keyswap-team"}`).
    pub metadata_headers: RawNamedStrings,
}

impl RawConfig {
    /// Reads a whole document but its clients, which are only checked for
    /// their JSON syntax and counted.
    ///
    /// # Errors
    /// The first problem found, with its path.
    pub fn read(json: &[u8]) -> Result<Self> {
        const FIELDS: &[&str] = &[
            "clients",
            "key_sources",
            "routes",
            "strip_request_headers",
            "strip_response_headers",
            "client_id_header",
            "client_id_on_listener",
            "caller_token_header",
            "unmatched_route",
            "metrics",
            "refuse_all",
            "metadata_headers",
        ];
        let mut r = Reader::new(json);
        let mut raw = Self::default();
        let mut o = r.object("an object")?;
        while let Some(field) = r.field(&mut o, FIELDS)? {
            match field {
                "clients" => {
                    let mut a = r.array("a sequence")?;
                    let start = r.position() - 1;
                    let mut count = 0;
                    while r.item(&mut a)?.is_some() {
                        r.skip()?;
                        count += 1;
                    }
                    raw.clients = Some((start, count));
                }
                "key_sources" => raw.key_sources = option(&mut r, |r| list(r, RawKeySource::read))?,
                "routes" => raw.routes = list(&mut r, RawRoute::read)?,
                "strip_request_headers" => raw.strip_request_headers = strings(&mut r)?,
                "strip_response_headers" => raw.strip_response_headers = strings(&mut r)?,
                "client_id_header" => raw.client_id_header = option(&mut r, string)?,
                "client_id_on_listener" => raw.client_id_on_listener = r.bool()?,
                "caller_token_header" => raw.caller_token_header = option(&mut r, string)?,
                "unmatched_route" => raw.unmatched_route = UnmatchedRoute::read(&mut r)?,
                "metrics" => raw.metrics = RawMetrics::read(&mut r)?,
                "refuse_all" => raw.refuse_all = r.bool()?,
                "metadata_headers" => raw.metadata_headers = RawNamedStrings::read(&mut r)?,
                _ => r.skip()?,
            }
        }
        r.end()?;
        Ok(raw)
    }
}

/// The clients of a document, read one at a time (see [`RawConfig::read`]).
pub struct Clients<'a> {
    reader: Option<(Reader<'a>, json::Array)>,
}

impl<'a> Clients<'a> {
    /// The clients of `json`, whose `clients` array starts at `at` (from
    /// [`RawConfig::clients`]); none when it has none.
    ///
    /// # Errors
    /// When `at` is not the start of an array.
    pub fn new(json: &'a [u8], at: Option<usize>) -> Result<Self> {
        let Some(at) = at else { return Ok(Self { reader: None }) };
        let mut reader = Reader::at(json, at, "clients");
        let array = reader.array("a sequence")?;
        Ok(Self { reader: Some((reader, array)) })
    }

    /// The next client, or `None` after the last.
    ///
    /// # Errors
    /// The first problem in the client's shape, with its path.
    pub fn next_client(&mut self) -> Result<Option<RawClient<'a>>> {
        let Some((reader, array)) = &mut self.reader else { return Ok(None) };
        if reader.item(array)?.is_none() {
            return Ok(None);
        }
        RawClient::read(reader).map(Some)
    }
}

/// What the filter counts beyond the per-route totals.
#[derive(Debug, Default)]
pub struct RawMetrics {
    /// Count allowed requests per client and route (one time series each).
    pub per_client: bool,
}

impl RawMetrics {
    fn read(r: &mut Reader<'_>) -> Result<Self> {
        let mut raw = Self::default();
        let mut o = r.object("an object")?;
        while let Some(field) = r.field(&mut o, &["per_client"])? {
            if field == "per_client" {
                raw.per_client = r.bool()?;
            }
        }
        Ok(raw)
    }
}

/// One client holding one gateway key (`key_sha256` or `key`), or
/// several (`keys`). Its most common strings are borrowed from the
/// document.
#[derive(Default)]
pub struct RawClient<'a> {
    pub id: Cow<'a, str>,
    pub key_sha256: Option<Cow<'a, str>>,
    pub key: Option<Cow<'a, str>>,
    /// Several keys, each with its own id and validity.
    pub keys: Option<Vec<RawKey>>,
    pub routes: Vec<Cow<'a, str>>,
    pub expires: Option<Cow<'a, str>>,
    pub disabled: bool,
    /// The client's own credentials for some of its routes, used instead
    /// of those routes' `inject`.
    pub inject: RawClientInject,
    /// Non-secret metadata (`{"team": "search", "tier": "gold"}`).
    pub metadata: Option<RawNamedStrings>,
    /// The client's limits on all its routes together.
    pub limits: Option<RawLimits>,
    /// The client's own limits for some of its routes, used instead of
    /// those routes' `limits`.
    pub route_limits: RawRouteLimits,
}

impl<'a> RawClient<'a> {
    fn read(r: &mut Reader<'a>) -> Result<Self> {
        const FIELDS: &[&str] = &[
            "id",
            "key_sha256",
            "key",
            "keys",
            "routes",
            "expires",
            "disabled",
            "inject",
            "metadata",
            "limits",
            "route_limits",
        ];
        let mut raw = Self::default();
        let mut id = None;
        let mut o = r.object("an object")?;
        while let Some(field) = r.field(&mut o, FIELDS)? {
            match field {
                "id" => id = Some(r.string()?),
                "key_sha256" => raw.key_sha256 = option(r, Reader::string)?,
                "key" => raw.key = option(r, Reader::string)?,
                "keys" => raw.keys = option(r, |r| list(r, RawKey::read))?,
                "routes" => {
                    let mut a = r.array("a sequence")?;
                    while r.item(&mut a)?.is_some() {
                        raw.routes.push(r.string()?);
                    }
                }
                "expires" => raw.expires = option(r, Reader::string)?,
                "disabled" => raw.disabled = r.bool()?,
                "inject" => raw.inject = RawClientInject::read(r)?,
                "metadata" => raw.metadata = option(r, RawNamedStrings::read)?,
                "limits" => raw.limits = option(r, RawLimits::read)?,
                "route_limits" => raw.route_limits = RawRouteLimits::read(r)?,
                _ => r.skip()?,
            }
        }
        raw.id = id.ok_or_else(|| r.missing("id"))?;
        Ok(raw)
    }
}

/// One of a client's `keys`.
#[derive(Default)]
pub struct RawKey {
    /// The key's non-secret id; derived from its digest when absent.
    pub id: Option<String>,
    pub key_sha256: Option<String>,
    pub key: Option<String>,
    pub not_before: Option<String>,
    pub expires: Option<String>,
    pub disabled: bool,
    /// Written by `keyswap rotate` on the key it adds: when the rotation
    /// began (RFC 3339). Not read by the policy beyond its form.
    pub rotated_at: Option<String>,
}

impl RawKey {
    fn read(r: &mut Reader<'_>) -> Result<Self> {
        const FIELDS: &[&str] = &["id", "key_sha256", "key", "not_before", "expires", "disabled", "rotated_at"];
        let mut raw = Self::default();
        let mut o = r.object("an object")?;
        while let Some(field) = r.field(&mut o, FIELDS)? {
            match field {
                "id" => raw.id = option(r, string)?,
                "key_sha256" => raw.key_sha256 = option(r, string)?,
                "key" => raw.key = option(r, string)?,
                "not_before" => raw.not_before = option(r, string)?,
                "expires" => raw.expires = option(r, string)?,
                "disabled" => raw.disabled = r.bool()?,
                "rotated_at" => raw.rotated_at = option(r, string)?,
                _ => r.skip()?,
            }
        }
        Ok(raw)
    }
}

/// A client's own inject lists by route name (`{"openai": [...]}`), in
/// document order. Every key must be a route name before its list is read,
/// so a misplaced secret used as a key never shows in a field path.
#[derive(Debug, Default)]
pub struct RawClientInject(pub Vec<(String, Vec<RawInject>)>);

impl RawClientInject {
    fn read(r: &mut Reader<'_>) -> Result<Self> {
        let mut lists = Vec::new();
        let mut o = r.object("an object of inject lists by route name")?;
        while let Some(route) = r.key(&mut o)? {
            if !is_route_name(&route) {
                return Err(r.key_error("has a key that is not a route name"));
            }
            lists.push((route.into_owned(), list(r, RawInject::read)?));
        }
        Ok(Self(lists))
    }
}

/// String values by metadata field name (`clients[].metadata`,
/// `metadata_headers`), in document order. Every key must be a metadata
/// field name before its value is read, and none may repeat.
#[derive(Debug, Default)]
pub struct RawNamedStrings(pub Vec<(String, String)>);

impl RawNamedStrings {
    fn read(r: &mut Reader<'_>) -> Result<Self> {
        let mut fields: Vec<(String, String)> = Vec::new();
        let mut o = r.object("an object of strings by metadata field name")?;
        while let Some(name) = r.key(&mut o)? {
            if !is_metadata_name(&name) {
                return Err(r.key_error(
                    "has a key that is not a metadata field name (1-64 lower-case letters, digits, `-` or `_`)",
                ));
            }
            if fields.iter().any(|(n, _)| *n == name) {
                return Err(r.key_error(&format!("has the field `{name}` twice")));
            }
            fields.push((name.into_owned(), string(r)?));
        }
        Ok(Self(fields))
    }
}

/// What a metadata field name may be: 1-64 lower-case letters, digits,
/// `-` or `_` (a header-safe token, and a word in a log line).
pub fn is_metadata_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// What a route name may be: 1-64 letters, digits, `-`, `_` or `.`.
pub fn is_route_name(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// Where a client may present its key: a header (with an optional scheme
/// prefix) or a query parameter.
#[derive(Debug, Default)]
pub struct RawKeySource {
    pub header: Option<String>,
    pub prefix: Option<String>,
    pub query: Option<String>,
}

impl RawKeySource {
    fn read(r: &mut Reader<'_>) -> Result<Self> {
        let mut raw = Self::default();
        let mut o = r.object("an object")?;
        while let Some(field) = r.field(&mut o, &["header", "prefix", "query"])? {
            let value = option(r, string)?;
            match field {
                "header" => raw.header = value,
                "prefix" => raw.prefix = value,
                _ => raw.query = value,
            }
        }
        Ok(raw)
    }
}

/// One route: how it is recognised and which credentials it injects.
#[derive(Debug)]
pub struct RawRoute {
    pub name: String,
    pub matcher: RawMatch,
    /// `None`: every client allowed on the route brings its own.
    pub inject: Option<Vec<RawInject>>,
    /// Limits for each client on this route (a bucket per client).
    pub limits: Option<RawLimits>,
}

impl RawRoute {
    fn read(r: &mut Reader<'_>) -> Result<Self> {
        let (mut name, mut matcher, mut inject, mut limits) = (None, None, None, None);
        let mut o = r.object("an object")?;
        while let Some(field) = r.field(&mut o, &["name", "match", "inject", "limits"])? {
            match field {
                "name" => name = Some(string(r)?),
                "match" => matcher = Some(RawMatch::read(r)?),
                "inject" => inject = option(r, |r| list(r, RawInject::read))?,
                _ => limits = option(r, RawLimits::read)?,
            }
        }
        let name = name.ok_or_else(|| r.missing("name"))?;
        let matcher = matcher.ok_or_else(|| r.missing("match"))?;
        Ok(Self { name, matcher, inject, limits })
    }
}

/// Every given field must hold for the route to match.
#[derive(Debug, Default)]
pub struct RawMatch {
    pub route_name: Option<String>,
    /// Envoy clusters the route's credentials may go to.
    pub clusters: Option<Vec<String>>,
    pub path_prefix: Option<String>,
    pub host: Option<String>,
}

impl RawMatch {
    fn read(r: &mut Reader<'_>) -> Result<Self> {
        let mut raw = Self::default();
        let mut o = r.object("an object")?;
        while let Some(field) = r.field(&mut o, &["route_name", "clusters", "path_prefix", "host"])? {
            match field {
                "route_name" => raw.route_name = option(r, string)?,
                "clusters" => raw.clusters = option(r, strings)?,
                "path_prefix" => raw.path_prefix = option(r, string)?,
                _ => raw.host = option(r, string)?,
            }
        }
        Ok(raw)
    }
}

/// One upstream credential: where it goes and what it is.
#[derive(Debug, Default)]
pub struct RawInject {
    pub header: Option<String>,
    pub query: Option<String>,
    pub prefix: Option<String>,
    pub value: Option<RawValue>,
    pub basic: Option<RawBasic>,
}

impl RawInject {
    fn read(r: &mut Reader<'_>) -> Result<Self> {
        let mut raw = Self::default();
        let mut o = r.object("an object")?;
        while let Some(field) = r.field(&mut o, &["header", "query", "prefix", "value", "basic"])? {
            match field {
                "header" => raw.header = option(r, string)?,
                "query" => raw.query = option(r, string)?,
                "prefix" => raw.prefix = option(r, string)?,
                "value" => raw.value = option(r, RawValue::read)?,
                _ => raw.basic = option(r, RawBasic::read)?,
            }
        }
        Ok(raw)
    }
}

/// HTTP Basic credentials, encoded once at configuration.
#[derive(Debug)]
pub struct RawBasic {
    pub username: String,
    pub password: RawSecret,
}

impl RawBasic {
    fn read(r: &mut Reader<'_>) -> Result<Self> {
        let (mut username, mut password) = (None, None);
        let mut o = r.object("an object")?;
        while let Some(field) = r.field(&mut o, &["username", "password"])? {
            match field {
                "username" => username = Some(string(r)?),
                _ => password = Some(RawSecret::read(r)?),
            }
        }
        let username = username.ok_or_else(|| r.missing("username"))?;
        let password = password.ok_or_else(|| r.missing("password"))?;
        Ok(Self { username, password })
    }
}

/// An injected credential's value: a static secret (`env`, `inline`), or a
/// dynamic one fetched and refreshed in the background (see
/// [`crate::credential`]).
pub enum RawValue {
    Env(String),
    Inline(String),
    Oauth2(Box<RawOauth2>),
    TokenExchange(Box<RawTokenExchange>),
    Fetch(Box<RawFetch>),
}

impl RawValue {
    const VARIANTS: &'static [&'static str] = &["env", "inline", "oauth2", "token_exchange", "fetch"];

    fn read(r: &mut Reader<'_>) -> Result<Self> {
        let variant = one_key(r, Self::VARIANTS)?;
        let value = match variant {
            "env" => Self::Env(string(r)?),
            "inline" => Self::Inline(string(r)?),
            "oauth2" => Self::Oauth2(Box::new(RawOauth2::read(r)?)),
            "token_exchange" => Self::TokenExchange(Box::new(RawTokenExchange::read(r)?)),
            _ => Self::Fetch(Box::new(RawFetch::read(r)?)),
        };
        end_one_key(r, Self::VARIANTS)?;
        Ok(value)
    }
}

/// A static secret value: read from the VM's environment or written inline.
#[derive(Clone)]
pub enum RawSecret {
    Env(String),
    Inline(String),
}

impl RawSecret {
    fn read(r: &mut Reader<'_>) -> Result<Self> {
        const VARIANTS: &[&str] = &["env", "inline"];
        let variant = one_key(r, VARIANTS)?;
        let value = match variant {
            "env" => Self::Env(string(r)?),
            _ => Self::Inline(string(r)?),
        };
        end_one_key(r, VARIANTS)?;
        Ok(value)
    }
}

/// The start of an object that holds exactly one of `variants` as its key
/// (an enum written `{"variant": value}`): the key read, its value next.
/// A string where the object belongs is an unknown variant, as serde has
/// it; a key that is no variant is not written out.
fn one_key(r: &mut Reader<'_>, variants: &[&'static str]) -> Result<&'static str> {
    if r.kind()? == json::Kind::String {
        r.string()?;
        return Err(r.unknown_variant(variants));
    }
    let mut o = r.object(&format!("an object with one of {}", names(variants)))?;
    let Some(key) = r.key(&mut o)? else {
        return Err(r.error(&format!("must hold one of {}", names(variants))));
    };
    match variants.iter().find(|v| **v == key) {
        Some(variant) => Ok(variant),
        None => Err(r.unknown_variant_key(variants)),
    }
}

/// The end of an object read by [`one_key`].
fn end_one_key(r: &mut Reader<'_>, variants: &[&'static str]) -> Result<()> {
    // The object was started by `one_key` and its one key read.
    let mut o = json::Object::started();
    if r.key(&mut o)?.is_some() {
        return Err(r.key_error(&format!("must hold only one of {}", names(variants))));
    }
    Ok(())
}

/// `` `a`, `b`, `c` ``.
fn names(variants: &[&str]) -> String {
    variants.iter().map(|v| format!("`{v}`")).collect::<Vec<_>>().join(", ")
}

/// A plaintext `key` shows as `Some(..)`: never the key.
impl std::fmt::Debug for RawClient<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawClient")
            .field("id", &self.id)
            .field("key_sha256", &self.key_sha256)
            .field("key", &self.key.as_ref().map(|_| ".."))
            .field("keys", &self.keys)
            .field("routes", &self.routes)
            .field("expires", &self.expires)
            .field("disabled", &self.disabled)
            .field("inject", &self.inject)
            .field("metadata", &self.metadata)
            .field("limits", &self.limits)
            .field("route_limits", &self.route_limits)
            .finish()
    }
}

/// A plaintext `key` shows as `Some(..)`: never the key.
impl std::fmt::Debug for RawKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawKey")
            .field("id", &self.id)
            .field("key_sha256", &self.key_sha256)
            .field("key", &self.key.as_ref().map(|_| ".."))
            .field("not_before", &self.not_before)
            .field("expires", &self.expires)
            .field("disabled", &self.disabled)
            .field("rotated_at", &self.rotated_at)
            .finish()
    }
}

/// An `inline` secret shows as `Inline(..)`: never its value.
impl std::fmt::Debug for RawValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Env(name) => f.debug_tuple("Env").field(name).finish(),
            Self::Inline(_) => f.write_str("Inline(..)"),
            Self::Oauth2(o) => f.debug_tuple("Oauth2").field(o).finish(),
            Self::TokenExchange(t) => f.debug_tuple("TokenExchange").field(t).finish(),
            Self::Fetch(x) => f.debug_tuple("Fetch").field(x).finish(),
        }
    }
}

/// An `inline` secret shows as `Inline(..)`: never its value.
impl std::fmt::Debug for RawSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Env(name) => f.debug_tuple("Env").field(name).finish(),
            Self::Inline(_) => f.write_str("Inline(..)"),
        }
    }
}

/// How an OAuth2 client authenticates to the token endpoint.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// HTTP Basic (`client_secret_basic`, RFC 6749 2.3.1).
    #[default]
    Basic,
    /// `client_id` and `client_secret` in the form body (`client_secret_post`).
    Body,
}

impl ClientAuth {
    fn read(r: &mut Reader<'_>) -> Result<Self> {
        match &*r.string()? {
            "basic" => Ok(Self::Basic),
            "body" => Ok(Self::Body),
            _ => Err(r.unknown_variant(&["basic", "body"])),
        }
    }
}

/// An OAuth2 client-credentials grant (RFC 6749 4.4).
#[derive(Debug)]
pub struct RawOauth2 {
    pub cluster: String,
    pub token_path: String,
    pub authority: Option<String>,
    pub client_id: RawSecret,
    pub client_secret: RawSecret,
    pub scopes: Vec<String>,
    pub audience: Option<String>,
    pub client_auth: ClientAuth,
    pub refresh_margin_seconds: Option<u64>,
    pub timeout_ms: Option<u64>,
}

impl RawOauth2 {
    fn read(r: &mut Reader<'_>) -> Result<Self> {
        const FIELDS: &[&str] = &[
            "cluster",
            "token_path",
            "authority",
            "client_id",
            "client_secret",
            "scopes",
            "audience",
            "client_auth",
            "refresh_margin_seconds",
            "timeout_ms",
        ];
        let (mut cluster, mut token_path, mut client_id, mut client_secret) = (None, None, None, None);
        let (mut authority, mut scopes, mut audience, mut client_auth) =
            (None, Vec::new(), None, ClientAuth::default());
        let (mut refresh_margin_seconds, mut timeout_ms) = (None, None);
        let mut o = r.object("an object")?;
        while let Some(field) = r.field(&mut o, FIELDS)? {
            match field {
                "cluster" => cluster = Some(string(r)?),
                "token_path" => token_path = Some(string(r)?),
                "authority" => authority = option(r, string)?,
                "client_id" => client_id = Some(RawSecret::read(r)?),
                "client_secret" => client_secret = Some(RawSecret::read(r)?),
                "scopes" => scopes = strings(r)?,
                "audience" => audience = option(r, string)?,
                "client_auth" => client_auth = ClientAuth::read(r)?,
                "refresh_margin_seconds" => refresh_margin_seconds = option(r, Reader::u64)?,
                _ => timeout_ms = option(r, Reader::u64)?,
            }
        }
        Ok(Self {
            cluster: cluster.ok_or_else(|| r.missing("cluster"))?,
            token_path: token_path.ok_or_else(|| r.missing("token_path"))?,
            authority,
            client_id: client_id.ok_or_else(|| r.missing("client_id"))?,
            client_secret: client_secret.ok_or_else(|| r.missing("client_secret"))?,
            scopes,
            audience,
            client_auth,
            refresh_margin_seconds,
            timeout_ms,
        })
    }
}

/// An OAuth2 token exchange (RFC 8693) of a configured subject token for an
/// audience-scoped access token.
#[derive(Debug)]
pub struct RawTokenExchange {
    pub cluster: String,
    pub token_path: String,
    pub authority: Option<String>,
    pub subject_token: RawSubjectToken,
    pub subject_token_type: Option<String>,
    pub audience: String,
    pub scopes: Vec<String>,
    pub resource: Option<String>,
    pub requested_token_type: Option<String>,
    pub client_id: Option<RawSecret>,
    pub client_secret: Option<RawSecret>,
    pub client_auth: ClientAuth,
    pub refresh_margin_seconds: Option<u64>,
    pub timeout_ms: Option<u64>,
    /// With a subject from the request: drop a subject's token after this
    /// long unused.
    pub idle_seconds: Option<u64>,
    /// With a subject from the request: the most subjects cached at once.
    pub max_subjects: Option<u64>,
}

impl RawTokenExchange {
    fn read(r: &mut Reader<'_>) -> Result<Self> {
        const FIELDS: &[&str] = &[
            "cluster",
            "token_path",
            "authority",
            "subject_token",
            "subject_token_type",
            "audience",
            "scopes",
            "resource",
            "requested_token_type",
            "client_id",
            "client_secret",
            "client_auth",
            "refresh_margin_seconds",
            "timeout_ms",
            "idle_seconds",
            "max_subjects",
        ];
        let (mut cluster, mut token_path, mut subject_token, mut audience) = (None, None, None, None);
        let mut raw = Self {
            cluster: String::new(),
            token_path: String::new(),
            authority: None,
            subject_token: RawSubjectToken::default(),
            subject_token_type: None,
            audience: String::new(),
            scopes: Vec::new(),
            resource: None,
            requested_token_type: None,
            client_id: None,
            client_secret: None,
            client_auth: ClientAuth::default(),
            refresh_margin_seconds: None,
            timeout_ms: None,
            idle_seconds: None,
            max_subjects: None,
        };
        let mut o = r.object("an object")?;
        while let Some(field) = r.field(&mut o, FIELDS)? {
            match field {
                "cluster" => cluster = Some(string(r)?),
                "token_path" => token_path = Some(string(r)?),
                "authority" => raw.authority = option(r, string)?,
                "subject_token" => subject_token = Some(RawSubjectToken::read(r)?),
                "subject_token_type" => raw.subject_token_type = option(r, string)?,
                "audience" => audience = Some(string(r)?),
                "scopes" => raw.scopes = strings(r)?,
                "resource" => raw.resource = option(r, string)?,
                "requested_token_type" => raw.requested_token_type = option(r, string)?,
                "client_id" => raw.client_id = option(r, RawSecret::read)?,
                "client_secret" => raw.client_secret = option(r, RawSecret::read)?,
                "client_auth" => raw.client_auth = ClientAuth::read(r)?,
                "refresh_margin_seconds" => raw.refresh_margin_seconds = option(r, Reader::u64)?,
                "timeout_ms" => raw.timeout_ms = option(r, Reader::u64)?,
                "idle_seconds" => raw.idle_seconds = option(r, Reader::u64)?,
                _ => raw.max_subjects = option(r, Reader::u64)?,
            }
        }
        raw.cluster = cluster.ok_or_else(|| r.missing("cluster"))?;
        raw.token_path = token_path.ok_or_else(|| r.missing("token_path"))?;
        raw.subject_token = subject_token.ok_or_else(|| r.missing("subject_token"))?;
        raw.audience = audience.ok_or_else(|| r.missing("audience"))?;
        Ok(raw)
    }
}

/// A token exchange's subject token: the gateway's own (`env` or `inline`,
/// exactly one), or the caller's, read from a request `header` with an
/// optional `prefix` (on-behalf-of). Which one is checked at compile, with
/// the field path.
#[derive(Default)]
pub struct RawSubjectToken {
    pub env: Option<String>,
    pub inline: Option<String>,
    pub header: Option<String>,
    pub prefix: Option<String>,
}

impl RawSubjectToken {
    fn read(r: &mut Reader<'_>) -> Result<Self> {
        let mut raw = Self::default();
        let mut o = r.object("an object with `env`, `inline` or `header` (and `prefix`)")?;
        while let Some(field) = r.field(&mut o, &["env", "inline", "header", "prefix"])? {
            let value = option(r, string)?;
            match field {
                "env" => raw.env = value,
                "inline" => raw.inline = value,
                "header" => raw.header = value,
                _ => raw.prefix = value,
            }
        }
        Ok(raw)
    }
}

/// An `inline` subject shows as `..`: never its value.
impl std::fmt::Debug for RawSubjectToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawSubjectToken")
            .field("env", &self.env)
            .field("inline", &self.inline.as_ref().map(|_| ".."))
            .field("header", &self.header)
            .field("prefix", &self.prefix)
            .finish()
    }
}

/// A credential service answering JSON to a GET.
#[derive(Debug)]
pub struct RawFetch {
    pub cluster: String,
    pub path: String,
    pub authority: Option<String>,
    /// Sent as the `authorization` header to the credential service.
    pub authorization: Option<RawSecret>,
    pub json_pointer: String,
    pub refresh_seconds: Option<u64>,
    pub timeout_ms: Option<u64>,
    /// With `{client}` in `path`: drop a client's value after this long
    /// unused.
    pub idle_seconds: Option<u64>,
    /// With `{client}` in `path`: the most clients cached at once.
    pub max_clients: Option<u64>,
}

impl RawFetch {
    fn read(r: &mut Reader<'_>) -> Result<Self> {
        const FIELDS: &[&str] = &[
            "cluster",
            "path",
            "authority",
            "authorization",
            "json_pointer",
            "refresh_seconds",
            "timeout_ms",
            "idle_seconds",
            "max_clients",
        ];
        let (mut cluster, mut path, mut json_pointer) = (None, None, None);
        let mut raw = Self {
            cluster: String::new(),
            path: String::new(),
            authority: None,
            authorization: None,
            json_pointer: String::new(),
            refresh_seconds: None,
            timeout_ms: None,
            idle_seconds: None,
            max_clients: None,
        };
        let mut o = r.object("an object")?;
        while let Some(field) = r.field(&mut o, FIELDS)? {
            match field {
                "cluster" => cluster = Some(string(r)?),
                "path" => path = Some(string(r)?),
                "authority" => raw.authority = option(r, string)?,
                "authorization" => raw.authorization = option(r, RawSecret::read)?,
                "json_pointer" => json_pointer = Some(string(r)?),
                "refresh_seconds" => raw.refresh_seconds = option(r, Reader::u64)?,
                "timeout_ms" => raw.timeout_ms = option(r, Reader::u64)?,
                "idle_seconds" => raw.idle_seconds = option(r, Reader::u64)?,
                _ => raw.max_clients = option(r, Reader::u64)?,
            }
        }
        raw.cluster = cluster.ok_or_else(|| r.missing("cluster"))?;
        raw.path = path.ok_or_else(|| r.missing("path"))?;
        raw.json_pointer = json_pointer.ok_or_else(|| r.missing("json_pointer"))?;
        Ok(raw)
    }
}

/// A rate, a quota, or both (`{}`: none, only in `route_limits`, where it
/// exempts the client from the route's default).
#[derive(Debug, Default)]
pub struct RawLimits {
    pub rate: Option<RawRate>,
    pub quota: Option<RawQuota>,
}

impl RawLimits {
    fn read(r: &mut Reader<'_>) -> Result<Self> {
        let mut raw = Self::default();
        let mut o = r.object("an object with `rate`, `quota` or both")?;
        while let Some(field) = r.field(&mut o, &["rate", "quota"])? {
            match field {
                "rate" => raw.rate = option(r, RawRate::read)?,
                _ => raw.quota = option(r, RawQuota::read)?,
            }
        }
        Ok(raw)
    }
}

/// `requests` per `per`, evenly spaced, plus `burst` at once.
#[derive(Debug)]
pub struct RawRate {
    pub requests: u64,
    pub per: RawWindow,
    pub burst: u64,
}

impl RawRate {
    fn read(r: &mut Reader<'_>) -> Result<Self> {
        let (mut requests, mut per, mut burst) = (None, None, 0);
        let mut o = r.object("an object with `requests`, `per` and `burst`")?;
        while let Some(field) = r.field(&mut o, &["requests", "per", "burst"])? {
            match field {
                "requests" => requests = Some(r.u64()?),
                "per" => {
                    per = Some(match &*r.string()? {
                        "second" => RawWindow::Second,
                        "minute" => RawWindow::Minute,
                        "hour" => RawWindow::Hour,
                        _ => return Err(r.unknown_variant(&["second", "minute", "hour"])),
                    });
                }
                _ => burst = r.u64()?,
            }
        }
        let requests = requests.ok_or_else(|| r.missing("requests"))?;
        let per = per.ok_or_else(|| r.missing("per"))?;
        Ok(Self { requests, per, burst })
    }
}

/// A rate's window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawWindow {
    Second,
    Minute,
    Hour,
}

/// `requests` per UTC day.
#[derive(Debug)]
pub struct RawQuota {
    pub requests: u64,
    pub per: RawQuotaWindow,
}

impl RawQuota {
    fn read(r: &mut Reader<'_>) -> Result<Self> {
        let (mut requests, mut per) = (None, None);
        let mut o = r.object("an object with `requests` and `per`")?;
        while let Some(field) = r.field(&mut o, &["requests", "per"])? {
            match field {
                "requests" => requests = Some(r.u64()?),
                _ => {
                    if &*r.string()? != "day" {
                        return Err(r.unknown_variant(&["day"]));
                    }
                    per = Some(RawQuotaWindow::Day);
                }
            }
        }
        let requests = requests.ok_or_else(|| r.missing("requests"))?;
        let per = per.ok_or_else(|| r.missing("per"))?;
        Ok(Self { requests, per })
    }
}

/// A quota's window: the UTC day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawQuotaWindow {
    Day,
}

/// A client's own limits by route name (`{"openai": {...}}`), in document
/// order; every key must be a route name before its value is read.
#[derive(Debug, Default)]
pub struct RawRouteLimits(pub Vec<(String, RawLimits)>);

impl RawRouteLimits {
    fn read(r: &mut Reader<'_>) -> Result<Self> {
        let mut limits = Vec::new();
        let mut o = r.object("an object of limits by route name")?;
        while let Some(route) = r.key(&mut o)? {
            if !is_route_name(&route) {
                return Err(r.key_error("has a key that is not a route name"));
            }
            limits.push((route.into_owned(), RawLimits::read(r)?));
        }
        Ok(Self(limits))
    }
}

/// What happens to a request that matches no route.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum UnmatchedRoute {
    /// Answer 404 `no_route`.
    #[default]
    Deny,
    /// Forward without a key check, still removing keys and stripped headers.
    Pass,
}

impl UnmatchedRoute {
    fn read(r: &mut Reader<'_>) -> Result<Self> {
        match &*r.string()? {
            "deny" => Ok(Self::Deny),
            "pass" => Ok(Self::Pass),
            _ => Err(r.unknown_variant(&["deny", "pass"])),
        }
    }
}

/// `null` or a value read by `read`.
fn option<'a, T>(r: &mut Reader<'a>, read: impl FnOnce(&mut Reader<'a>) -> Result<T>) -> Result<Option<T>> {
    if r.null()? {
        return Ok(None);
    }
    read(r).map(Some)
}

/// An array of values read by `read`.
fn list<'a, T>(r: &mut Reader<'a>, read: impl Fn(&mut Reader<'a>) -> Result<T>) -> Result<Vec<T>> {
    let mut out = Vec::new();
    let mut a = r.array("a sequence")?;
    while r.item(&mut a)?.is_some() {
        out.push(read(r)?);
    }
    Ok(out)
}

fn string(r: &mut Reader<'_>) -> Result<String> {
    r.string().map(Cow::into_owned)
}

fn strings(r: &mut Reader<'_>) -> Result<Vec<String>> {
    list(r, string)
}

#[cfg(test)]
mod tests {
    use super::{Clients, RawConfig};

    #[test]
    fn debug_never_shows_a_key_or_an_inline_secret() {
        let json = r#"{"clients": [{"id": "c", "key": "plain-client-key-1", "routes": ["r"],
            "keys": [{"key": "plain-client-key-4"}],
            "inject": {"r": [{"header": "x-k", "value": {"inline": "inline-secret-2"}}]}}],
            "routes": [{"name": "r", "match": {}, "inject": [{"header": "x-k", "value": {"inline": "inline-secret-3"}}]}]}"#;
        let raw = RawConfig::read(json.as_bytes()).expect("a configuration");
        let mut clients = Clients::new(json.as_bytes(), raw.clients.map(|(at, _)| at)).expect("clients");
        let client = clients.next_client().expect("a client").expect("one");
        assert!(clients.next_client().expect("the end").is_none());
        let shown = format!("{raw:?} {client:?}");
        assert!(shown.contains("\"c\""), "{shown}");
        for secret in ["plain-client-key-1", "inline-secret-2", "inline-secret-3", "plain-client-key-4"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
    }

    #[test]
    fn clients_are_counted_then_read_in_order_with_their_paths() {
        let json = br#"{"clients": [{"id": "a", "routes": []}, {"id": "b", "disabled": 1}], "routes": []}"#;
        let raw = RawConfig::read(json).expect("a configuration");
        assert_eq!(raw.clients.map(|(_, n)| n), Some(2));
        let mut clients = Clients::new(json, raw.clients.map(|(at, _)| at)).expect("clients");
        assert_eq!(clients.next_client().expect("a").map(|c| c.id.into_owned()), Some("a".to_string()));
        let err = clients.next_client().unwrap_err();
        assert_eq!(err.path, "clients[1].disabled");
        assert!(err.message.starts_with("invalid type: integer `…`, expected a boolean"), "{err:?}");
    }
}
