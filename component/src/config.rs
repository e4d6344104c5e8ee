//! The gateway's configuration: the policy configuration, unchanged, and
//! where each route's requests go. Plain Rust, no WIT types, so it is
//! unit-tested natively.
//!
//! ```json
//! {
//!   "keyswap": { "clients": [...], "routes": [{"name": "openai", ...}], ... },
//!   "upstreams": { "openai": "https://api.openai.com", "*": "http://127.0.0.1:8081" }
//! }
//! ```
//!
//! `keyswap` is the document of `docs/config.md`, compiled by
//! [`Policy::from_json_for`] with [`Routing::Own`] from its exact text (so
//! its version is the one `keyswap check` prints for the same text): the
//! gateway is the router, so `host` and `path_prefix` route, and `clusters`
//! match nothing (there is no proxy cluster). `upstreams` maps route names,
//! and `*` for every other route and for requests passed by
//! `"unmatched_route": "pass"`, to `http://host[:port]` or
//! `https://host[:port]`. Every route needs an upstream. Errors carry field
//! paths like the policy's: `keyswap.routes[0].inject[0].value.env`,
//! `upstreams.openai`.

use std::collections::BTreeMap;

use keyswap_policy::raw::{RawConfig, UnmatchedRoute};
use keyswap_policy::{ConfigError, Environment, Policy, Routing};
use serde::Deserialize;
use serde_json::value::RawValue;

/// The environment variable that holds the gateway's configuration.
pub const CONFIG_VAR: &str = "KEYSWAP_GATEWAY_CONFIG";

/// The upstream key that stands for every route without its own, and for
/// passed requests.
pub const DEFAULT_UPSTREAM: &str = "*";

/// A compiled gateway configuration.
#[derive(Debug)]
pub struct GatewayConfig {
    pub policy: Policy,
    upstreams: BTreeMap<String, Upstream>,
}

/// Where a route's requests are sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// True for `https`.
    pub tls: bool,
    /// `host[:port]`.
    pub authority: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGateway<'a> {
    #[serde(borrow)]
    keyswap: &'a RawValue,
    #[serde(default)]
    upstreams: BTreeMap<String, serde_json::Value>,
}

impl GatewayConfig {
    /// Parses and compiles a gateway configuration, reading the policy's
    /// `env` credentials from `env`.
    ///
    /// # Errors
    /// The first problem found, with its field path.
    pub fn from_json(text: &str, env: &dyn Environment) -> Result<Self, ConfigError> {
        let raw: RawGateway<'_> = serde_json::from_str(text).map_err(document_error)?;
        let policy_text = raw.keyswap.get();
        // The gateway sends each request to its route's upstream: keyswap is
        // the router, so its own rules (`host`, `path_prefix`) are the
        // routing and cannot disagree with another.
        let policy = Policy::from_json_for(policy_text.as_bytes(), env, Routing::Own).map_err(|e| {
            let path = match e.path.as_str() {
                "$" => "keyswap".to_string(),
                p if p.starts_with('[') => format!("keyswap{p}"),
                p => format!("keyswap.{p}"),
            };
            ConfigError { path, message: e.message }
        })?;
        // A component has no timer and no outbound call of its own here, so
        // it cannot keep a dynamic credential fresh: refused, by its path.
        if let Some(provider) = policy.credential_providers().first() {
            return Err(error(
                format!("keyswap.{}", provider.path),
                format!(
                    "`{}` credentials are fetched in the background, which the component cannot do; \
                     run this configuration in the proxy-wasm filter",
                    provider.kind.name()
                ),
            ));
        }
        // A component instance keeps nothing between requests, so it cannot
        // count a rate limit or a quota: refused, by its path.
        if let Some(path) = policy.first_limit() {
            return Err(error(format!("keyswap.{path}"), crate::NO_COUNTERS));
        }
        // The policy accepted this text, so it parses again; only the route
        // names and the unmatched-route setting are read from it.
        let shape = RawConfig::read(policy_text.as_bytes())
            .map_err(|_| error("keyswap", "could not be read again for its route names"))?;
        let routes: Vec<&str> = shape.routes.iter().map(|r| r.name.as_str()).collect();

        let mut upstreams = BTreeMap::new();
        for (name, value) in &raw.upstreams {
            let path = if is_name(name) || name == DEFAULT_UPSTREAM {
                format!("upstreams.{name}")
            } else {
                "upstreams".to_string()
            };
            if name != DEFAULT_UPSTREAM && !routes.contains(&name.as_str()) {
                let message = if is_name(name) {
                    format!("names no route (`{name}` is not in `keyswap.routes`)")
                } else {
                    "has a key that names no route (and is not a valid route name)".to_string()
                };
                return Err(error(path, message));
            }
            let upstream = value.as_str().and_then(parse_upstream).ok_or_else(|| {
                error(&path, "must be `http://host[:port]` or `https://host[:port]`, with no path, query or user info")
            })?;
            upstreams.insert(name.clone(), upstream);
        }
        let default = upstreams.contains_key(DEFAULT_UPSTREAM);
        if let Some(route) = routes.iter().find(|r| !default && !upstreams.contains_key(**r)) {
            return Err(error(
                "upstreams",
                format!("has no upstream for route `{route}` (give it one, or `*` for every route without its own)"),
            ));
        }
        if shape.unmatched_route == UnmatchedRoute::Pass && !default {
            return Err(error(
                "upstreams",
                "needs `*`: `unmatched_route` is `pass`, and passed requests are sent there",
            ));
        }
        Ok(Self { policy, upstreams })
    }

    /// The upstream for a forward's route (`None`: a passed request).
    pub fn upstream(&self, route: Option<&str>) -> Option<&Upstream> {
        route.and_then(|r| self.upstreams.get(r)).or_else(|| self.upstreams.get(DEFAULT_UPSTREAM))
    }
}

fn error(path: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError { path: path.into(), message: message.into() }
}

/// serde's messages about values quote them; only syntax messages (which
/// never quote the text) and messages about field names are passed on.
fn document_error(e: serde_json::Error) -> ConfigError {
    let text = e.to_string();
    let message =
        if e.is_syntax() || e.is_eof() || text.starts_with("unknown field") || text.starts_with("missing field") {
            text
        } else {
            r#"must be {"keyswap": {...}, "upstreams": {"<route>": "http://host:port"}}"#.to_string()
        };
    error("$", message)
}

/// `http://host[:port]` or `https://host[:port]`, an optional `/` after.
fn parse_upstream(url: &str) -> Option<Upstream> {
    let (tls, rest) = if let Some(rest) = url.strip_prefix("http://") {
        (false, rest)
    } else {
        (true, url.strip_prefix("https://")?)
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    let valid = |b: u8| b.is_ascii_alphanumeric() || b"-._:[]".contains(&b);
    if authority.is_empty() || !authority.bytes().all(valid) {
        return None;
    }
    Some(Upstream { tls, authority: authority.to_string() })
}

/// A name the policy accepts for a route.
fn is_name(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r#"{"clients": [{"id": "c", "key": "k", "routes": ["*"]}],
        "routes": [{"name": "a", "match": {"path_prefix": "/a/"},
                    "inject": [{"header": "x-up", "value": {"inline": "a-secret"}}]},
                   {"name": "b", "match": {"path_prefix": "/b/"},
                    "inject": [{"header": "x-up", "value": {"env": "UP"}}]}]}"#;

    fn load(upstreams: &str) -> Result<GatewayConfig, ConfigError> {
        let text = format!(r#"{{"keyswap": {POLICY}, "upstreams": {upstreams}}}"#);
        GatewayConfig::from_json(&text, &|name: &str| (name == "UP").then(|| "secret".to_string()))
    }

    fn rendered(upstreams: &str) -> String {
        match load(upstreams) {
            Ok(_) => "ok".to_string(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn routes_find_their_upstream_or_the_default() {
        let config = load(r#"{"a": "http://127.0.0.1:8081", "*": "https://api.example.com/"}"#).unwrap();
        let a = config.upstream(Some("a")).unwrap();
        assert_eq!((a.tls, a.authority.as_str()), (false, "127.0.0.1:8081"));
        let b = config.upstream(Some("b")).unwrap();
        assert_eq!((b.tls, b.authority.as_str()), (true, "api.example.com"));
        assert_eq!(config.upstream(None), Some(b));
    }

    #[test]
    fn the_policy_version_is_that_of_its_exact_text() {
        let config = load(r#"{"*": "http://127.0.0.1:1"}"#).unwrap();
        assert_eq!(config.policy.summary().version, keyswap_policy::content_version(POLICY.as_bytes()));
    }

    #[test]
    fn errors_name_the_field() {
        let table = [
            (r#"{"a": "http://h:1"}"#, "upstreams: has no upstream for route `b`"),
            (r#"{"*": "http://h:1", "c": "http://h:2"}"#, "upstreams.c: names no route (`c` is not"),
            (r#"{"*": "ftp://h"}"#, "upstreams.*: must be `http://host[:port]`"),
            (r#"{"*": "http://h:1/v1"}"#, "upstreams.*: must be"),
            (r#"{"*": "http://user:pw@h"}"#, "upstreams.*: must be"),
            (r#"{"*": 5}"#, "upstreams.*: must be"),
            (r#"{"*": "http://h:1", "a b": "http://h"}"#, "upstreams: has a key that names no route"),
        ];
        for (upstreams, want) in table {
            let got = rendered(upstreams);
            assert!(got.starts_with(want), "{upstreams}: {got}");
        }
    }

    #[test]
    fn policy_errors_are_placed_under_keyswap() {
        let env = |_: &str| None;
        let err = GatewayConfig::from_json(&format!(r#"{{"keyswap": {POLICY}}}"#), &env).unwrap_err();
        assert_eq!(err.to_string(), "keyswap.routes[1].inject[0].value.env: UP is not set");
        let err = GatewayConfig::from_json(r#"{"keyswap": []}"#, &env).unwrap_err();
        assert_eq!(err.path, "keyswap");
    }

    #[test]
    fn dynamic_credentials_are_refused_by_path() {
        let policy = r#"{"routes": [{"name": "a", "match": {}, "inject": [{"header": "authorization",
            "value": {"fetch": {"cluster": "vault", "path": "/c", "json_pointer": "/t"}}}]}]}"#;
        let text = format!(r#"{{"keyswap": {policy}, "upstreams": {{"*": "http://h:1"}}}}"#);
        let err = GatewayConfig::from_json(&text, &|_: &str| None).unwrap_err();
        assert_eq!(err.path, "keyswap.routes[0].inject[0].value.fetch");
        assert!(err.message.starts_with("`fetch` credentials are fetched in the background"), "{err}");
    }

    #[test]
    fn limits_are_refused_by_path() {
        let policy = r#"{"clients": [{"id": "c", "key": "k", "routes": ["a"],
            "route_limits": {"a": {"quota": {"requests": 5, "per": "day"}}}}],
            "routes": [{"name": "a", "match": {}, "inject": [{"header": "x", "value": {"inline": "v"}}]}]}"#;
        let text = format!(r#"{{"keyswap": {policy}, "upstreams": {{"*": "http://h:1"}}}}"#);
        let err = GatewayConfig::from_json(&text, &|_: &str| None).unwrap_err();
        assert_eq!(err.path, "keyswap.clients[0].route_limits.a");
        assert_eq!(err.message, crate::NO_COUNTERS);
    }

    #[test]
    fn document_errors_quote_no_value() {
        let env = |_: &str| None;
        let cases = [
            (r#"{"keyswap": {}, "upstream": {}}"#, "$: unknown field `upstream`"),
            (r#"{"upstreams": {}}"#, "$: missing field `keyswap`"),
            (r#"{"keyswap": {}, "upstreams": "sk-secret"}"#, "$: must be {"),
            (r#"{"keyswap": {"#, "$: EOF while parsing an object"),
            (r#"{"keyswap": {"a": "sk-secret" "b"}}"#, "$: expected `,` or `}`"),
        ];
        for (text, want) in cases {
            let got = GatewayConfig::from_json(text, &env).unwrap_err().to_string();
            assert!(got.starts_with(want) && !got.contains("sk-secret"), "{text}: {got}");
        }
    }

    #[test]
    fn passed_requests_need_the_default() {
        let policy = r#"{"routes": [], "unmatched_route": "pass"}"#;
        let env = |_: &str| None;
        let text = format!(r#"{{"keyswap": {policy}, "upstreams": {{}}}}"#);
        let err = GatewayConfig::from_json(&text, &env).unwrap_err();
        assert!(err.to_string().starts_with("upstreams: needs `*`"), "{err}");
    }
}
