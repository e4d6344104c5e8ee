//! The configuration as written: plain serde types that mirror the JSON
//! contract in `docs/config.md` field by field. Nothing here is checked
//! beyond its JSON shape; [`crate::config`] turns it into a [`crate::Policy`].

use serde::de::{Deserializer, Error as _, MapAccess, Visitor};
use serde::Deserialize;

/// The whole plugin configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub clients: Vec<RawClient>,
    pub key_sources: Option<Vec<RawKeySource>>,
    #[serde(default)]
    pub routes: Vec<RawRoute>,
    #[serde(default)]
    pub strip_request_headers: Vec<String>,
    #[serde(default)]
    pub strip_response_headers: Vec<String>,
    pub client_id_header: Option<String>,
    /// Envoy's first stage (the listener) sets `client_id_header` too, to
    /// the id of the client whose valid key the request presents, for a
    /// rate-limit filter after keyswap on the listener to key on.
    #[serde(default)]
    pub client_id_on_listener: bool,
    /// The request header carrying the caller's own token for the
    /// credential service of a `{client}` fetch; removed from every request.
    pub caller_token_header: Option<String>,
    #[serde(default)]
    pub unmatched_route: UnmatchedRoute,
    #[serde(default)]
    pub metrics: RawMetrics,
    /// Refuse every request (503 `configuration_unavailable`): the
    /// fail-closed configuration Envoy serves when it has no usable one.
    #[serde(default)]
    pub refuse_all: bool,
    /// Client metadata fields sent upstream, by field name: the request
    /// header each goes in (`{"team": "x-keyswap-team"}`).
    #[serde(default)]
    pub metadata_headers: RawNamedStrings,
}

/// What the filter counts beyond the per-route totals.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMetrics {
    /// Count allowed requests per client and route (one time series each).
    #[serde(default)]
    pub per_client: bool,
}

/// One client holding one gateway key (`key_sha256` or `key`), or
/// several (`keys`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawClient {
    pub id: String,
    pub key_sha256: Option<String>,
    pub key: Option<String>,
    /// Several keys, each with its own id and validity (boxed: one
    /// pointer in each of 100,000 single-key clients).
    pub keys: Option<Box<Vec<RawKey>>>,
    #[serde(default)]
    pub routes: Vec<String>,
    pub expires: Option<String>,
    #[serde(default)]
    pub disabled: bool,
    /// The client's own credentials for some of its routes, used instead
    /// of those routes' `inject`.
    #[serde(default)]
    pub inject: RawClientInject,
    /// Non-secret metadata (`{"team": "search", "tier": "gold"}`), boxed
    /// like `keys`.
    pub metadata: Option<Box<RawNamedStrings>>,
    /// The client's limits on all its routes together.
    pub limits: Option<RawLimits>,
    /// The client's own limits for some of its routes, used instead of
    /// those routes' `limits`.
    #[serde(default)]
    pub route_limits: RawRouteLimits,
}

/// One of a client's `keys`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKey {
    /// The key's non-secret id; derived from its digest when absent.
    pub id: Option<String>,
    pub key_sha256: Option<String>,
    pub key: Option<String>,
    pub not_before: Option<String>,
    pub expires: Option<String>,
    #[serde(default)]
    pub disabled: bool,
    /// Written by `keyswap rotate` on the key it adds: when the rotation
    /// began (RFC 3339). Not read by the policy beyond its form.
    pub rotated_at: Option<String>,
}

/// A client's own inject lists by route name (`{"openai": [...]}`), in
/// document order. Every key must be a route name before its list is read,
/// so a misplaced secret used as a key never shows in a field path.
#[derive(Debug, Default)]
pub struct RawClientInject(pub Vec<(String, Vec<RawInject>)>);

impl<'de> Deserialize<'de> for RawClientInject {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Lists;
        impl<'de> Visitor<'de> for Lists {
            type Value = RawClientInject;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object of inject lists by route name")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut lists = Vec::new();
                while let Some(route) = map.next_key::<String>()? {
                    if !is_route_name(&route) {
                        return Err(A::Error::custom("has a key that is not a route name"));
                    }
                    let list = map.next_value::<Vec<RawInject>>()?;
                    lists.push((route, list));
                }
                Ok(RawClientInject(lists))
            }
        }
        deserializer.deserialize_map(Lists)
    }
}

/// String values by metadata field name (`clients[].metadata`,
/// `metadata_headers`), in document order. Every key must be a metadata
/// field name before its value is read, and none may repeat.
#[derive(Debug, Default)]
pub struct RawNamedStrings(pub Vec<(String, String)>);

impl<'de> Deserialize<'de> for RawNamedStrings {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> Visitor<'de> for Fields {
            type Value = RawNamedStrings;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object of strings by metadata field name")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut fields: Vec<(String, String)> = Vec::new();
                while let Some(name) = map.next_key::<String>()? {
                    if !is_metadata_name(&name) {
                        return Err(A::Error::custom(
                            "has a key that is not a metadata field name (1-64 lower-case letters, digits, `-` or `_`)",
                        ));
                    }
                    if fields.iter().any(|(n, _)| *n == name) {
                        return Err(A::Error::custom(format!("has the field `{name}` twice")));
                    }
                    let value = map.next_value::<String>()?;
                    fields.push((name, value));
                }
                Ok(RawNamedStrings(fields))
            }
        }
        deserializer.deserialize_map(Fields)
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
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKeySource {
    pub header: Option<String>,
    pub prefix: Option<String>,
    pub query: Option<String>,
}

/// One route: how it is recognised and which credentials it injects.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub name: String,
    #[serde(rename = "match")]
    pub matcher: RawMatch,
    /// `None`: every client allowed on the route brings its own.
    pub inject: Option<Vec<RawInject>>,
    /// Limits for each client on this route (a bucket per client).
    pub limits: Option<RawLimits>,
}

/// Every given field must hold for the route to match.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMatch {
    pub route_name: Option<String>,
    /// Envoy clusters the route's credentials may go to.
    pub clusters: Option<Vec<String>>,
    pub path_prefix: Option<String>,
    pub host: Option<String>,
}

/// One upstream credential: where it goes and what it is.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawInject {
    pub header: Option<String>,
    pub query: Option<String>,
    pub prefix: Option<String>,
    pub value: Option<RawValue>,
    pub basic: Option<RawBasic>,
}

/// HTTP Basic credentials, encoded once at configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBasic {
    pub username: String,
    pub password: RawSecret,
}

/// An injected credential's value: a static secret (`env`, `inline`), or a
/// dynamic one fetched and refreshed in the background (see
/// [`crate::credential`]).
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum RawValue {
    Env(String),
    Inline(String),
    Oauth2(Box<RawOauth2>),
    TokenExchange(Box<RawTokenExchange>),
    Fetch(Box<RawFetch>),
}

/// A static secret value: read from the VM's environment or written inline.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum RawSecret {
    Env(String),
    Inline(String),
}

/// A plaintext `key` shows as `Some(..)`: never the key.
impl std::fmt::Debug for RawClient {
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
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    /// HTTP Basic (`client_secret_basic`, RFC 6749 2.3.1).
    #[default]
    Basic,
    /// `client_id` and `client_secret` in the form body (`client_secret_post`).
    Body,
}

/// An OAuth2 client-credentials grant (RFC 6749 4.4).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOauth2 {
    pub cluster: String,
    pub token_path: String,
    pub authority: Option<String>,
    pub client_id: RawSecret,
    pub client_secret: RawSecret,
    #[serde(default)]
    pub scopes: Vec<String>,
    pub audience: Option<String>,
    #[serde(default)]
    pub client_auth: ClientAuth,
    pub refresh_margin_seconds: Option<u64>,
    pub timeout_ms: Option<u64>,
}

/// An OAuth2 token exchange (RFC 8693) of a configured subject token for an
/// audience-scoped access token.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTokenExchange {
    pub cluster: String,
    pub token_path: String,
    pub authority: Option<String>,
    pub subject_token: RawSubjectToken,
    pub subject_token_type: Option<String>,
    pub audience: String,
    #[serde(default)]
    pub scopes: Vec<String>,
    pub resource: Option<String>,
    pub requested_token_type: Option<String>,
    pub client_id: Option<RawSecret>,
    pub client_secret: Option<RawSecret>,
    #[serde(default)]
    pub client_auth: ClientAuth,
    pub refresh_margin_seconds: Option<u64>,
    pub timeout_ms: Option<u64>,
    /// With a subject from the request: drop a subject's token after this
    /// long unused.
    pub idle_seconds: Option<u64>,
    /// With a subject from the request: the most subjects cached at once.
    pub max_subjects: Option<u64>,
}

/// A token exchange's subject token: the gateway's own (`env` or `inline`,
/// exactly one), or the caller's, read from a request `header` with an
/// optional `prefix` (on-behalf-of). Which one is checked at compile, with
/// the field path.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "an object with `env`, `inline` or `header` (and `prefix`)")]
pub struct RawSubjectToken {
    pub env: Option<String>,
    pub inline: Option<String>,
    pub header: Option<String>,
    pub prefix: Option<String>,
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
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
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

/// A rate, a quota, or both (`{}`: none, only in `route_limits`, where it
/// exempts the client from the route's default).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "an object with `rate`, `quota` or both")]
pub struct RawLimits {
    pub rate: Option<RawRate>,
    pub quota: Option<RawQuota>,
}

/// `requests` per `per`, evenly spaced, plus `burst` at once.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "an object with `requests`, `per` and `burst`")]
pub struct RawRate {
    pub requests: u64,
    pub per: RawWindow,
    #[serde(default)]
    pub burst: u64,
}

/// A rate's window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawWindow {
    Second,
    Minute,
    Hour,
}

/// `requests` per UTC day.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "an object with `requests` and `per`")]
pub struct RawQuota {
    pub requests: u64,
    pub per: RawQuotaWindow,
}

/// A quota's window: the UTC day.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawQuotaWindow {
    Day,
}

/// A client's own limits by route name (`{"openai": {...}}`), in document
/// order; every key must be a route name before its value is read.
#[derive(Debug, Default)]
pub struct RawRouteLimits(pub Vec<(String, RawLimits)>);

impl<'de> Deserialize<'de> for RawRouteLimits {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Limits;
        impl<'de> Visitor<'de> for Limits {
            type Value = RawRouteLimits;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object of limits by route name")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut limits = Vec::new();
                while let Some(route) = map.next_key::<String>()? {
                    if !is_route_name(&route) {
                        return Err(A::Error::custom("has a key that is not a route name"));
                    }
                    limits.push((route, map.next_value::<RawLimits>()?));
                }
                Ok(RawRouteLimits(limits))
            }
        }
        deserializer.deserialize_map(Limits)
    }
}

/// What happens to a request that matches no route.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnmatchedRoute {
    /// Answer 404 `no_route`.
    #[default]
    Deny,
    /// Forward without a key check, still removing keys and stripped headers.
    Pass,
}

#[cfg(test)]
mod tests {
    use super::RawConfig;

    #[test]
    fn debug_never_shows_a_key_or_an_inline_secret() {
        let json = r#"{"clients": [{"id": "c", "key": "plain-client-key-1", "routes": ["r"],
            "keys": [{"key": "plain-client-key-4"}],
            "inject": {"r": [{"header": "x-k", "value": {"inline": "inline-secret-2"}}]}}],
            "routes": [{"name": "r", "match": {}, "inject": [{"header": "x-k", "value": {"inline": "inline-secret-3"}}]}]}"#;
        let raw: RawConfig = serde_json::from_str(json).expect("a configuration");
        let shown = format!("{raw:?}");
        assert!(shown.contains("\"c\""), "{shown}");
        for secret in ["plain-client-key-1", "inline-secret-2", "inline-secret-3", "plain-client-key-4"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
    }
}
