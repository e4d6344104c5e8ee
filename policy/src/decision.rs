//! What the policy answers for one request: forward it with edits, or deny
//! it with a reason. Both are plain values; the reason-to-status mapping
//! lives here so that every host answers alike.

use std::borrow::Cow;

use crate::limit::Refusal;

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DenialReason {
    /// No key in any key source.
    MissingKey,
    /// The key is unknown, disabled, or too long to be one.
    InvalidKey,
    /// The key's client has passed its `expires` time.
    ExpiredKey,
    /// Different keys were presented in different places.
    AmbiguousKey,
    /// The key is valid but its client may not use this route.
    RouteForbidden,
    /// No route matched and `unmatched_route` is `deny`.
    NoRoute,
    /// The route's dynamic credentials are not (or no longer) available:
    /// none fetched yet, or the last one expired.
    CredentialUnavailable,
    /// `TRACE` (or `TRACK`) on a route with credentials: the upstream would
    /// echo the injected credential back.
    MethodNotAllowed,
    /// The authority cannot be read strictly (an empty or doubled port,
    /// user information, a byte no host holds) where a route matches on
    /// `host`.
    InvalidAuthority,
    /// The configuration is the fail-closed one (`"refuse_all": true`):
    /// Envoy had no usable configuration to serve, so nothing is let through.
    ConfigurationUnavailable,
    /// An on-behalf-of exchange needs the caller's subject token, and the
    /// request carries none (or none fit to be one).
    MissingSubjectToken,
    /// The STS refused the request's subject token (`invalid_grant`, 401),
    /// or it expired.
    InvalidSubjectToken,
    /// The client is over one of its rates (see [`crate::limit`]).
    RateLimited,
    /// The client has used up one of its daily quotas.
    QuotaExceeded,
}

const JSON: (&str, &str) = ("content-type", "application/json");
const NO_STORE: (&str, &str) = ("cache-control", "no-store");
const ALLOW: (&str, &str) = ("allow", "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS");
const RETRY_AFTER: (&str, &str) = ("retry-after", "1");
const CHALLENGE: (&str, &str) = ("www-authenticate", "Bearer realm=\"keyswap\"");
const INVALID_TOKEN: (&str, &str) = ("www-authenticate", "Bearer realm=\"keyswap\", error=\"invalid_token\"");

impl DenialReason {
    /// Every reason, for tables and metrics.
    pub const ALL: [DenialReason; 14] = [
        DenialReason::MissingKey,
        DenialReason::InvalidKey,
        DenialReason::ExpiredKey,
        DenialReason::AmbiguousKey,
        DenialReason::RouteForbidden,
        DenialReason::NoRoute,
        DenialReason::CredentialUnavailable,
        DenialReason::MethodNotAllowed,
        DenialReason::InvalidAuthority,
        DenialReason::ConfigurationUnavailable,
        DenialReason::MissingSubjectToken,
        DenialReason::InvalidSubjectToken,
        DenialReason::RateLimited,
        DenialReason::QuotaExceeded,
    ];

    /// The HTTP status the client receives.
    pub fn status(self) -> u16 {
        match self {
            Self::MissingKey
            | Self::InvalidKey
            | Self::ExpiredKey
            | Self::AmbiguousKey
            | Self::MissingSubjectToken
            | Self::InvalidSubjectToken => 401,
            Self::RouteForbidden => 403,
            Self::NoRoute => 404,
            Self::MethodNotAllowed => 405,
            Self::InvalidAuthority => 400,
            Self::CredentialUnavailable | Self::ConfigurationUnavailable => 503,
            Self::RateLimited | Self::QuotaExceeded => 429,
        }
    }

    /// The stable error code in the JSON body (and in metrics).
    pub fn code(self) -> &'static str {
        match self {
            Self::MissingKey => "missing_key",
            Self::InvalidKey => "invalid_key",
            Self::ExpiredKey => "expired_key",
            Self::AmbiguousKey => "ambiguous_key",
            Self::RouteForbidden => "route_forbidden",
            Self::NoRoute => "no_route",
            Self::CredentialUnavailable => "credential_unavailable",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::InvalidAuthority => "invalid_authority",
            Self::ConfigurationUnavailable => "configuration_unavailable",
            Self::MissingSubjectToken => "missing_subject_token",
            Self::InvalidSubjectToken => "invalid_subject_token",
            Self::RateLimited => "rate_limited",
            Self::QuotaExceeded => "quota_exceeded",
        }
    }

    /// A sentence for the person reading the response.
    pub fn message(self) -> &'static str {
        match self {
            Self::MissingKey => "This route needs an API key and none was presented.",
            Self::InvalidKey => "The API key is not valid.",
            Self::ExpiredKey => "The API key has expired.",
            Self::AmbiguousKey => "Different API keys were presented in one request.",
            Self::RouteForbidden => "The API key may not be used on this route.",
            Self::NoRoute => "No route is configured for this request.",
            Self::CredentialUnavailable => {
                "The upstream credential for this route is not available yet; retry shortly."
            }
            Self::MethodNotAllowed => "This method is not allowed on a route with upstream credentials.",
            Self::InvalidAuthority => "The request's authority (Host) is malformed.",
            Self::ConfigurationUnavailable => "The gateway has no usable configuration; every request is refused.",
            Self::MissingSubjectToken => "This route acts on behalf of a user and no user token was presented.",
            Self::InvalidSubjectToken => "The user token was refused by the token service.",
            Self::RateLimited => "Too many requests for this API key; retry after the time given.",
            Self::QuotaExceeded => "This API key's daily quota is used up; retry after the time given.",
        }
    }

    /// The response headers, besides those the host adds itself.
    pub fn headers(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Self::MissingKey | Self::MissingSubjectToken => &[JSON, NO_STORE, CHALLENGE],
            Self::InvalidKey | Self::ExpiredKey | Self::AmbiguousKey | Self::InvalidSubjectToken => {
                &[JSON, NO_STORE, INVALID_TOKEN]
            }
            Self::RouteForbidden
            | Self::NoRoute
            | Self::InvalidAuthority
            | Self::ConfigurationUnavailable
            | Self::RateLimited
            | Self::QuotaExceeded => &[JSON, NO_STORE],
            Self::MethodNotAllowed => &[JSON, NO_STORE, ALLOW],
            Self::CredentialUnavailable => &[JSON, NO_STORE, RETRY_AFTER],
        }
    }

    /// The JSON body: `{"error":"<code>","message":"<sentence>"}`.
    pub fn body(self) -> String {
        // Codes and messages are fixed ASCII with nothing to escape.
        format!(r#"{{"error":"{}","message":"{}"}}"#, self.code(), self.message())
    }
}

/// What the access-log field says of one request
/// (`%FILTER_STATE(wasm.keyswap:PLAIN)%` in Envoy), written by
/// [`AccessLog::write`] the same way by every host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccessLog<'a> {
    /// `allowed`, `passed` or `denied`.
    pub outcome: &'a str,
    /// The denial's code; `None` for a forwarded request.
    pub reason: Option<DenialReason>,
    pub route: Option<&'a str>,
    pub client: Option<&'a str>,
    /// The id of one of the client's `keys` (never the key).
    pub key: Option<&'a str>,
    /// The client's metadata.
    pub metadata: Option<&'a crate::model::Metadata>,
}

impl AccessLog<'_> {
    /// `outcome=O reason=R route=N client=C`, then ` key=K` when the key
    /// is one of the client's `keys`, then ` meta.FIELD=VALUE` for each
    /// field of the client's metadata, by field name (values hold no
    /// spaces); `-` for what is not known. Written
    /// into `out` (cleared first), which a host keeps and reuses: no
    /// allocation per request once it has grown.
    pub fn write(&self, out: &mut String) {
        out.clear();
        let reason = self.reason.map_or("-", DenialReason::code);
        for part in [
            "outcome=",
            self.outcome,
            " reason=",
            reason,
            " route=",
            self.route.unwrap_or("-"),
            " client=",
            self.client.unwrap_or("-"),
        ] {
            out.push_str(part);
        }
        if let Some(key) = self.key {
            out.push_str(" key=");
            out.push_str(key);
        }
        for (field, value) in self.metadata.into_iter().flat_map(crate::model::Metadata::fields) {
            for part in [" meta.", field, "=", value] {
                out.push_str(part);
            }
        }
    }
}

impl<'p> Forward<'p> {
    /// The access-log field's parts for this forward: `allowed` on a
    /// route, `passed` without one.
    pub fn access_log(&self) -> AccessLog<'p> {
        let outcome = if self.route.is_some() { "allowed" } else { "passed" };
        let (route, client, key, metadata) = (self.route, self.client, self.key, self.metadata);
        AccessLog { outcome, reason: None, route, client, key, metadata }
    }
}

impl<'p> Denial<'p> {
    /// The access-log field's parts for this denial.
    pub fn access_log(&self) -> AccessLog<'p> {
        AccessLog {
            outcome: "denied",
            reason: Some(self.reason),
            route: self.route,
            client: self.client,
            key: self.key,
            metadata: self.metadata,
        }
    }
}

/// Why a host has no policy to decide with: answered 500 `not_configured`,
/// the one refusal that no loaded configuration gives (so it is not a
/// [`DenialReason`]), written here once for every host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unconfigured {
    /// No configuration is loaded (none given yet, or refused at start).
    NoConfiguration,
    /// A final stage (a cluster's upstream filter) with no record from a
    /// first stage: keyswap is missing from the listener.
    NoListenerStage,
}

impl Unconfigured {
    pub const STATUS: u16 = 500;
    pub const CODE: &'static str = "not_configured";

    /// The JSON body, as every denial's: `{"error":"not_configured","message":…}`.
    pub const fn body(self) -> &'static str {
        match self {
            Self::NoConfiguration => {
                r#"{"error":"not_configured","message":"The gateway has no keyswap configuration."}"#
            }
            Self::NoListenerStage => {
                r#"{"error":"not_configured","message":"keyswap runs on this cluster but not on the listener."}"#
            }
        }
    }

    /// The message alone.
    pub const fn message(self) -> &'static str {
        match self {
            Self::NoConfiguration => "The gateway has no keyswap configuration.",
            Self::NoListenerStage => "keyswap runs on this cluster but not on the listener.",
        }
    }
}

/// The policy's answer for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision<'p> {
    Forward(Forward<'p>),
    Deny(Denial<'p>),
    /// The request needs per-client credentials not fetched yet.
    Wait(Wait<'p>),
}

/// A request that needs keyed credentials (a `{client}` fetch, or an
/// on-behalf-of exchange for its subject) with no value yet. A host that can hold a request admits each key
/// ([`crate::credential::admit`]: refused `credential_unavailable` past
/// `max_clients`), asks for it ([`crate::credential::Refresher::demand`],
/// with the caller's token), holds the request, and decides it again once
/// every slot holds a value ([`crate::credential::ready`]) or `timeout_ms`
/// has passed, when a request still waiting is refused
/// ([`Wait::denial`]). A host that cannot hold requests refuses at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wait<'p> {
    pub route: &'p str,
    pub client: &'p str,
    /// The id of the client's key, when it is one of its `keys`.
    pub key: Option<&'p str>,
    /// The client's metadata.
    pub metadata: Option<&'p crate::model::Metadata>,
    /// (provider, key) of each record waited for: a client id, or the
    /// digest of a subject ([`crate::credential::Provider::subject_key`]).
    pub slots: Vec<(usize, String)>,
    /// The longest `timeout_ms` of the providers waited for.
    pub timeout_ms: u64,
}

impl<'p> Decision<'p> {
    /// The decision for a host that cannot hold a request: a forward, or
    /// a denial (a [`Decision::Wait`] is its [`Wait::denial`]).
    ///
    /// # Errors
    /// The denial.
    pub fn without_waiting(self) -> Result<Forward<'p>, Denial<'p>> {
        match self {
            Decision::Forward(forward) => Ok(forward),
            Decision::Deny(denial) => Err(denial),
            Decision::Wait(wait) => Err(wait.denial()),
        }
    }
}

impl<'p> Wait<'p> {
    /// The answer to a request that cannot wait (longer).
    pub fn denial(&self) -> Denial<'p> {
        Denial {
            reason: DenialReason::CredentialUnavailable,
            route: Some(self.route),
            client: Some(self.client),
            key: self.key,
            metadata: self.metadata,
            limit: None,
        }
    }
}

/// A refusal: the reason, and what was known when it was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Denial<'p> {
    pub reason: DenialReason,
    /// The matched route, if any.
    pub route: Option<&'p str>,
    /// The client, when the key was recognised.
    pub client: Option<&'p str>,
    /// The id of the key presented, when it is one of its client's `keys`
    /// (never the key).
    pub key: Option<&'p str>,
    /// The client's metadata, when the key was recognised.
    pub metadata: Option<&'p crate::model::Metadata>,
    /// The limit that refused the request (`rate_limited`,
    /// `quota_exceeded`), with the time until it would admit one more.
    pub limit: Option<Refusal<'p>>,
}

impl Denial<'_> {
    /// The response headers, besides those the host adds itself: the
    /// reason's, and for a limit's refusal `retry-after` and the IETF
    /// `RateLimit-Policy` and `RateLimit` fields
    /// (draft-ietf-httpapi-ratelimit-headers: the limit's name, `q`
    /// requests per `w` seconds; `r` remaining, `t` seconds until one more
    /// is admitted).
    pub fn headers(&self) -> Vec<(&'static str, Cow<'static, str>)> {
        let mut out: Vec<(&'static str, Cow<'static, str>)> =
            self.reason.headers().iter().map(|(n, v)| (*n, Cow::Borrowed(*v))).collect();
        if let Some(refusal) = &self.limit {
            let (name, seconds) = (refusal.limit.name(), refusal.retry_after_seconds());
            let (q, w) = refusal.limit.policy_numbers();
            out.push(("retry-after", Cow::Owned(seconds.to_string())));
            out.push(("ratelimit-policy", Cow::Owned(format!("\"{name}\";q={q};w={w}"))));
            out.push(("ratelimit", Cow::Owned(format!("\"{name}\";r=0;t={seconds}"))));
        }
        out
    }
}

/// The edits that turn the client's request into the upstream's, dynamic
/// credentials included: the whole answer for a forwarded request.
///
/// Apply them with [`Self::edited`] or [`Self::apply`] (the one rule of
/// [`crate::edit`]): remove every header named in `remove_headers` or
/// `remove_look_alikes` (all of its values), replace `:path` with `path` if
/// set, then add each of `add_headers`.
#[derive(Clone, PartialEq, Eq)]
pub struct Forward<'p> {
    /// The matched route; `None` on an unmatched request that was passed.
    pub route: Option<&'p str>,
    /// The authenticated client; `None` on a passed request.
    pub client: Option<&'p str>,
    /// The id of the key presented, when it is one of the client's `keys`
    /// (never the key).
    pub key: Option<&'p str>,
    /// The client's metadata; `None` on a passed request.
    pub metadata: Option<&'p crate::model::Metadata>,
    /// Header names (lower case) present in the request to remove.
    pub remove_headers: Vec<&'p str>,
    /// Client-sent look-alikes of protected names (`x_api_key`), as sent,
    /// to remove too (empty on almost every request: no allocation).
    pub remove_look_alikes: Vec<String>,
    /// Headers to add after the removals: the route's credentials (static
    /// ones borrowed from the policy, dynamic ones owned) and the client id.
    pub add_headers: Vec<(&'p str, Cow<'p, str>)>,
    /// The new `:path`, when the query changed.
    pub path: Option<Vec<u8>>,
    /// The dynamic credential values injected, without prefixes: what a
    /// response must never carry back (see [`crate::Policy::reflections`]).
    /// Empty on a route with static credentials only.
    pub secrets: Vec<String>,
    /// The dynamic credentials the request carries, by provider and the
    /// generation of the values sent (no value): what a host hands
    /// [`crate::Policy::upstream_status`] with the upstream's answer.
    /// Empty on a route with static credentials only.
    pub used: Vec<crate::credential::Used>,
}

impl Forward<'_> {
    /// True when the edits change nothing.
    pub fn is_noop(&self) -> bool {
        self.remove_headers.is_empty()
            && self.remove_look_alikes.is_empty()
            && self.add_headers.is_empty()
            && self.path.is_none()
    }

    fn removes(&self, name: &str) -> bool {
        self.remove_headers.iter().any(|r| name.eq_ignore_ascii_case(r))
            || self.remove_look_alikes.iter().any(|r| name.eq_ignore_ascii_case(r))
    }

    /// Applies the edits to a request's header list (pseudo-headers
    /// included, names in lower case).
    pub fn apply(&self, headers: &mut Vec<(String, Vec<u8>)>) {
        let add = self.add_headers.iter().map(|(n, v)| (*n, v.as_bytes()));
        crate::edit::apply(headers, |name| self.removes(name), self.path.as_deref(), add);
    }

    /// The edited header list as borrowed pairs, for a host that replaces
    /// the whole map in one call: the same result as [`Self::apply`]
    /// without copying a header.
    pub fn edited<'a>(&'a self, headers: &'a [(String, Vec<u8>)]) -> Vec<(&'a str, &'a [u8])> {
        let add = self.add_headers.iter().map(|(n, v)| (*n, v.as_bytes()));
        crate::edit::edited(headers, |name| self.removes(name), self.path.as_deref(), add)
    }
}

// Dynamic values never show in Debug output: added headers by name only.
impl std::fmt::Debug for Forward<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let added: Vec<&str> = self.add_headers.iter().map(|(name, _)| *name).collect();
        f.debug_struct("Forward")
            .field("route", &self.route)
            .field("client", &self.client)
            .field("key", &self.key)
            .field("remove_headers", &self.remove_headers)
            .field("remove_look_alikes", &self.remove_look_alikes)
            .field("add_headers", &added)
            .field("path", &self.path.as_ref().map(|_| ".."))
            .field("secrets", &format_args!("[{} redacted]", self.secrets.len()))
            .field("used", &self.used)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_follow_the_contract() {
        let table = [
            (DenialReason::MissingKey, 401),
            (DenialReason::InvalidKey, 401),
            (DenialReason::ExpiredKey, 401),
            (DenialReason::AmbiguousKey, 401),
            (DenialReason::RouteForbidden, 403),
            (DenialReason::NoRoute, 404),
            (DenialReason::CredentialUnavailable, 503),
            (DenialReason::MethodNotAllowed, 405),
            (DenialReason::InvalidAuthority, 400),
            (DenialReason::ConfigurationUnavailable, 503),
            (DenialReason::MissingSubjectToken, 401),
            (DenialReason::InvalidSubjectToken, 401),
            (DenialReason::RateLimited, 429),
            (DenialReason::QuotaExceeded, 429),
        ];
        for (reason, status) in table {
            assert_eq!(reason.status(), status, "{reason:?}");
        }
    }

    #[test]
    fn bodies_are_json_with_the_code() {
        for reason in DenialReason::ALL {
            let body: serde_json::Value = serde_json::from_str(&reason.body()).unwrap();
            assert_eq!(body["error"], reason.code());
            assert_eq!(body["message"], reason.message());
            assert!(reason.headers().contains(&JSON));
        }
    }

    #[test]
    fn every_401_carries_a_bearer_challenge() {
        for reason in DenialReason::ALL {
            let challenge = reason.headers().iter().any(|(n, _)| *n == "www-authenticate");
            assert_eq!(challenge, reason.status() == 401, "{reason:?}");
        }
    }

    #[test]
    fn apply_removes_every_value_then_adds() {
        let mut headers = vec![
            (":path".to_string(), b"/a?api_key=k".to_vec()),
            ("authorization".to_string(), b"Bearer one".to_vec()),
            ("Authorization".to_string(), b"Bearer two".to_vec()),
            ("accept".to_string(), b"*/*".to_vec()),
            ("X_Api_Key".to_string(), b"k".to_vec()),
        ];
        let forward = Forward {
            route: Some("r"),
            client: Some("c"),
            key: None,
            metadata: None,
            remove_headers: vec!["authorization"],
            remove_look_alikes: vec!["x_api_key".to_string()],
            add_headers: vec![("authorization", "Bearer up".into()), ("x-client", "c".into())],
            path: Some(b"/a".to_vec()),
            secrets: Vec::new(),
            used: Vec::new(),
        };
        let edited: Vec<(String, Vec<u8>)> =
            forward.edited(&headers).into_iter().map(|(n, v)| (n.to_string(), v.to_vec())).collect();
        forward.apply(&mut headers);
        assert_eq!(edited, headers, "edited() and apply() agree");
        assert_eq!(
            headers,
            vec![
                (":path".to_string(), b"/a".to_vec()),
                ("accept".to_string(), b"*/*".to_vec()),
                ("authorization".to_string(), b"Bearer up".to_vec()),
                ("x-client".to_string(), b"c".to_vec()),
            ]
        );
    }
}
