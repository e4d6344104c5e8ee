//! Dynamic credential values (`oauth2`, `token_exchange`, `fetch`) become
//! [`Provider`]s: the call, checked and prepared (client authentication,
//! form body, headers), and how to read its answer.

use base64::Engine as _;
use sha2::{Digest as _, Sha256};

use super::env::{secret, ConfigError, Environment};
use crate::credential::{
    Keyed, Kind, Provider, SubjectSource, CLIENT_PLACEHOLDER, DEFAULT_IDLE_SECONDS, DEFAULT_MARGIN_SECONDS,
    DEFAULT_MAX_KEYS, DEFAULT_MAX_SUBJECTS, DEFAULT_REFRESH_SECONDS, DEFAULT_TIMEOUT_MS,
};
use crate::query::encode_component;
use crate::raw::{ClientAuth, RawFetch, RawOauth2, RawSecret, RawSubjectToken, RawTokenExchange};

const TOKEN_EXCHANGE_GRANT: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";

/// Compiles dynamic values. Providers are shared by entries that make the
/// same call (`fetch` entries differing only in `json_pointer` share one
/// call, and so one consistent answer); a token exchange is per route.
#[derive(Default)]
pub(crate) struct ProviderBuilder {
    providers: Vec<Provider>,
}

/// Whose `inject` list a dynamic value is in: a record is never shared
/// between owners that are different callers.
#[derive(Clone, Copy)]
pub(crate) enum Owner<'a> {
    /// A route's own list: shared by every client of the route without a
    /// list of its own, and with other routes making the same call.
    Route(&'a str),
    /// A client's own list for a route (by the client's id): shared with
    /// nobody else, only with the same client's lists for other routes.
    Client { id: &'a str, route: &'a str },
}

impl<'a> Owner<'a> {
    fn route(self) -> &'a str {
        match self {
            Owner::Route(route) | Owner::Client { route, .. } => route,
        }
    }
}

/// A dynamic value as written, borrowed from the raw configuration.
pub(crate) enum RawDynamic<'a> {
    Oauth2(&'a RawOauth2),
    TokenExchange(&'a RawTokenExchange),
    Fetch(&'a RawFetch),
}

impl ProviderBuilder {
    /// Adds (or finds) the source for `raw` at `path` (the `value` field's
    /// path) in `owner`'s list; returns the source and value index.
    pub fn add(
        &mut self,
        raw: RawDynamic<'_>,
        owner: Owner<'_>,
        path: &str,
        env: &dyn Environment,
    ) -> Result<(usize, usize), ConfigError> {
        let (mut source, pointer) = match raw {
            RawDynamic::Oauth2(o) => (oauth2(o, &format!("{path}.oauth2"), env)?, None),
            RawDynamic::TokenExchange(t) => (token_exchange(t, &format!("{path}.token_exchange"), env)?, None),
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
        let call = call_digest(&source, owner);
        if let Some(s) = self.providers.iter().position(|s| s.id == call) {
            let existing = &mut self.providers[s];
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
        self.providers.push(source);
        Ok((self.providers.len() - 1, 0))
    }

    /// The finished sources, each id now covering its pointers too (so a
    /// changed set of pointers never reads another set's record).
    pub fn finish(mut self) -> Vec<Provider> {
        for source in &mut self.providers {
            let mut digest = Sha256::new();
            digest.update(source.id.as_bytes());
            for p in &source.pointers {
                digest.update([0]);
                digest.update(p.as_bytes());
            }
            source.id = hex12(&digest.finalize());
        }
        self.providers
    }
}

fn hex12(bytes: &[u8]) -> String {
    bytes.iter().take(6).map(|b| format!("{b:02x}")).collect()
}

fn call_digest(source: &Provider, owner: Owner<'_>) -> String {
    let mut digest = Sha256::new();
    let mut part = |bytes: &[u8]| {
        digest.update((bytes.len() as u64).to_le_bytes());
        digest.update(bytes);
    };
    part(source.kind.name().as_bytes());
    // A token exchange is cached per (route, audience): the route is part
    // of its identity. A client's own value is its own: the client is part
    // of its identity (`client:ID` and a newline, which neither a route
    // name nor a client id holds, so no route's scope can equal it).
    let route = if source.kind == Kind::TokenExchange { owner.route() } else { "" };
    let scope = match owner {
        Owner::Route(_) => std::borrow::Cow::Borrowed(route),
        Owner::Client { id, .. } => std::borrow::Cow::Owned(format!("client:{id}\n{route}")),
    };
    part(scope.as_bytes());
    part(source.cluster.as_bytes());
    for (n, v) in &source.headers {
        part(n.as_bytes());
        part(v.as_bytes());
    }
    part(source.body.as_deref().unwrap_or(b"\xff"));
    part(&source.margin_ms.to_le_bytes());
    part(&source.refresh_ms.to_le_bytes());
    part(&source.timeout_ms.to_le_bytes());
    if let Some(keyed) = &source.keyed {
        part(&keyed.idle_ms.to_le_bytes());
        part(&(keyed.max_keys as u64).to_le_bytes());
    }
    if let Some(subject) = &source.subject {
        part(b"subject from the request");
        part(subject.header.as_bytes());
        part(subject.prefix.as_deref().unwrap_or(b"\xff"));
    }
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

/// A field other than a `fetch` path must not name `{client}`: it would be
/// sent as written, never filled in.
fn no_placeholder(value: &str, field: &str) -> Result<(), ConfigError> {
    if value.contains(CLIENT_PLACEHOLDER) {
        return Err(ConfigError::new(
            field,
            "holds `{client}`, which is filled in only in a `fetch` value's `path` (one credential per client)",
        ));
    }
    Ok(())
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
) -> Result<Provider, ConfigError> {
    let cluster = cluster_name(cluster, path)?;
    no_placeholder(token_path, &format!("{path}.token_path"))?;
    no_placeholder(authority_raw.unwrap_or_default(), &format!("{path}.authority"))?;
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
    Ok(Provider {
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
        keyed: None,
        subject: None,
    })
}

fn oauth2(raw: &RawOauth2, path: &str, env: &dyn Environment) -> Result<Provider, ConfigError> {
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

fn token_exchange(raw: &RawTokenExchange, path: &str, env: &dyn Environment) -> Result<Provider, ConfigError> {
    let (margin_ms, timeout_ms) = timing(raw.refresh_margin_seconds, raw.timeout_ms, path)?;
    let mut form = Form(Vec::new());
    form.push("grant_type", TOKEN_EXCHANGE_GRANT);
    form_text(&raw.audience, &format!("{path}.audience"))?;
    form.push("audience", &raw.audience);
    let subject_path = format!("{path}.subject_token");
    let from_request = subject_source(&raw.subject_token, &subject_path)?;
    if from_request.is_none() {
        let secret_raw = match (&raw.subject_token.env, &raw.subject_token.inline) {
            (Some(name), None) => RawSecret::Env(name.clone()),
            (None, Some(value)) => RawSecret::Inline(value.clone()),
            _ => return Err(ConfigError::new(subject_path, "needs exactly one of `env`, `inline` or `header`")),
        };
        let subject = static_secret(&secret_raw, &subject_path, env)?;
        form.push("subject_token", &subject);
    }
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
    let keyed = subject_keyed(raw, from_request.is_some(), path)?;
    let mut provider = token_source(
        Kind::TokenExchange,
        (&raw.cluster, &raw.token_path, raw.authority.as_deref()),
        path,
        (margin_ms, timeout_ms),
        headers,
        form,
    )?;
    provider.keyed = keyed;
    provider.subject = from_request;
    Ok(provider)
}

/// A subject token read from the request (`{"header": …, "prefix": …}`):
/// where, or `None` for the gateway's own (`env` or `inline`).
fn subject_source(raw: &RawSubjectToken, path: &str) -> Result<Option<SubjectSource>, ConfigError> {
    let Some(header) = &raw.header else {
        if raw.prefix.is_some() {
            return Err(ConfigError::new(format!("{path}.prefix"), "applies only with `header`"));
        }
        return Ok(None);
    };
    if raw.env.is_some() || raw.inline.is_some() {
        return Err(ConfigError::new(path, "needs exactly one of `env`, `inline` or `header`"));
    }
    let header = super::header_name(header, &format!("{path}.header"))?;
    let prefix = match &raw.prefix {
        Some(p) if p.trim().is_empty() || p.bytes().any(|b| b.is_ascii_control()) => {
            return Err(ConfigError::new(format!("{path}.prefix"), "must be non-empty text without control characters"))
        }
        Some(p) => Some(p.to_ascii_lowercase().into_bytes()),
        None => None,
    };
    Ok(Some(SubjectSource { header, prefix }))
}

/// The most `max_subjects`.
const MAX_SUBJECTS: u64 = 100_000;

/// An on-behalf-of exchange is one record per subject: `idle_seconds` and
/// `max_subjects` belong to it only.
fn subject_keyed(raw: &RawTokenExchange, from_request: bool, path: &str) -> Result<Option<Keyed>, ConfigError> {
    if !from_request {
        for (name, given) in
            [("idle_seconds", raw.idle_seconds.is_some()), ("max_subjects", raw.max_subjects.is_some())]
        {
            if given {
                return Err(ConfigError::new(
                    format!("{path}.{name}"),
                    "applies only to an on-behalf-of exchange: a `subject_token` read from a request `header`",
                ));
            }
        }
        return Ok(None);
    }
    let bound = ("max_subjects", raw.max_subjects, DEFAULT_MAX_SUBJECTS as u64, MAX_SUBJECTS);
    keyed_bounds(raw.idle_seconds, bound, path).map(|keyed| Some(Keyed { evicts: true, ..keyed }))
}

/// A keyed provider's `idle_seconds` and its bound on keys (`name`,
/// given, default, most), within their ranges.
fn keyed_bounds(
    idle: Option<u64>,
    (name, max, default, most): (&str, Option<u64>, u64, u64),
    path: &str,
) -> Result<Keyed, ConfigError> {
    let idle = idle.unwrap_or(DEFAULT_IDLE_SECONDS);
    if !(1..=MAX_IDLE_SECONDS).contains(&idle) {
        return Err(ConfigError::new(format!("{path}.idle_seconds"), "must be between 1 and 604800 (a week)"));
    }
    let max = max.unwrap_or(default);
    if !(1..=most).contains(&max) {
        return Err(ConfigError::new(format!("{path}.{name}"), format!("must be between 1 and {most}")));
    }
    Ok(Keyed { idle_ms: idle as i64 * 1000, max_keys: max as usize, evicts: false })
}

fn fetch(raw: &RawFetch, path: &str, env: &dyn Environment) -> Result<Provider, ConfigError> {
    let (_, timeout_ms) = timing(None, raw.timeout_ms, path)?;
    let refresh = raw.refresh_seconds.unwrap_or(DEFAULT_REFRESH_SECONDS);
    if !(1..=86_400).contains(&refresh) {
        return Err(ConfigError::new(format!("{path}.refresh_seconds"), "must be between 1 and 86400"));
    }
    let cluster = cluster_name(&raw.cluster, path)?;
    let target = request_path(&raw.path, &format!("{path}.path"))?;
    no_placeholder(raw.authority.as_deref().unwrap_or_default(), &format!("{path}.authority"))?;
    no_placeholder(&raw.json_pointer, &format!("{path}.json_pointer"))?;
    let keyed = keyed(raw, &target, path)?;
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
    Ok(Provider {
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
        keyed,
        subject: None,
    })
}

/// The most `idle_seconds`: a week.
const MAX_IDLE_SECONDS: u64 = 7 * 86_400;
/// The most `max_clients`.
const MAX_CLIENTS: u64 = 100_000;

/// A fetch whose path names `{client}` (once, in the path before any
/// query) is one credential per client; `idle_seconds` and `max_clients`
/// belong to such a fetch only.
fn keyed(raw: &RawFetch, target: &str, path: &str) -> Result<Option<Keyed>, ConfigError> {
    let field = format!("{path}.path");
    let count = target.matches(CLIENT_PLACEHOLDER).count();
    let rest = target.replace(CLIENT_PLACEHOLDER, "");
    if rest.contains('{') || rest.contains('}') {
        return Err(ConfigError::new(field, "holds `{` or `}` outside the one placeholder, `{client}`"));
    }
    if count > 1 {
        return Err(ConfigError::new(field, "names `{client}` more than once"));
    }
    if count == 0 {
        for (name, given) in [("idle_seconds", raw.idle_seconds.is_some()), ("max_clients", raw.max_clients.is_some())]
        {
            if given {
                return Err(ConfigError::new(
                    format!("{path}.{name}"),
                    "applies only to a per-client fetch: name `{client}` in `path`",
                ));
            }
        }
        return Ok(None);
    }
    if target.split('?').next().is_none_or(|p| !p.contains(CLIENT_PLACEHOLDER)) {
        return Err(ConfigError::new(field, "names `{client}` in the query; it belongs in the path"));
    }
    keyed_bounds(raw.idle_seconds, ("max_clients", raw.max_clients, DEFAULT_MAX_KEYS as u64, MAX_CLIENTS), path)
        .map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credential::{backoff_ms, Record, Success, MAX_BACKOFF_MS};
    use crate::Policy;

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

    /// The record id of `OAUTH`'s provider, as keyswap named it before clients could
    /// bring their own credentials (worked out from the call by hand).
    const PINNED_ROUTE_ID: &str = "35c386ab7ecd";

    const OAUTH: &str = r#"[{"name": "r", "match": {"clusters": ["r"]}, "inject": [
        {"header": "authorization", "prefix": "Bearer ", "value": {"oauth2": {
          "cluster": "idp", "token_path": "/oauth/token", "authority": "idp.example.com",
          "client_id": {"inline": "my client"}, "client_secret": {"env": "IDP_SECRET"},
          "scopes": ["read", "write"], "audience": "https://api.example.com"}}}]}]"#;

    fn source(p: &Policy) -> &Provider {
        &p.credential_providers()[0]
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
        assert_eq!(p.credential_providers().len(), 1);
        let s = source(&p);
        assert_eq!(s.pointers, ["/data/id", "/data/secret"]);
        let f = s.parse(200, br#"{"data":{"id":"k7","secret":"s/7"}}"#, 0).unwrap();
        assert_eq!(f.values, ["k7", "s/7"]);
        assert_eq!(f.refresh_at, 300_000);
        assert_eq!(s.parse(200, br#"{"data":{"id":"k7"}}"#, 0).unwrap_err().0, "the answer has no `/data/secret`");
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
        assert_eq!(p.credential_providers().len(), 3);
        let body = String::from_utf8(source(&p).body.clone().unwrap()).unwrap();
        assert_eq!(
            body,
            "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange&audience=api-1\
             &subject_token=env-SUBJECT&subject_token_type=urn%3Aietf%3Aparams%3Aoauth%3Atoken-type%3Aaccess_token"
        );
        // Identical oauth2 grants on two routes share one token.
        let o = OAUTH.trim_start_matches('[').trim_end_matches(']');
        let two = format!("[{o}, {}]", o.replace(r#""name": "r""#, r#""name": "s""#));
        assert_eq!(policy(&two).credential_providers().len(), 1);
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

    /// A dynamic value in a client's own list is the client's: never shared
    /// with the route's or another client's, even for the same call; shared
    /// between the same client's lists, as a route's are between routes.
    #[test]
    fn a_clients_own_dynamic_values_are_its_own() {
        let entry = OAUTH.split_once(r#""inject": ["#).unwrap().1.trim_end().trim_end_matches("]}]").trim_end();
        let json = format!(
            r#"{{"clients": [
                  {{"id": "a", "key": "k1", "routes": ["r", "s"], "inject": {{"r": [{entry}], "s": [{entry}]}}}},
                  {{"id": "b", "key": "k2", "routes": ["r"], "inject": {{"r": [{entry}]}}}},
                  {{"id": "c", "key": "k3", "routes": ["*"]}}],
                "routes": [{{"name": "r", "match": {{"clusters": ["r"]}}, "inject": [{entry}]}},
                           {{"name": "s", "match": {{"clusters": ["s"]}}, "inject": [{entry}]}}]}}"#
        );
        let p = Policy::from_json(json.as_bytes(), &ENV).unwrap_or_else(|e| panic!("{e}\n{json}"));
        let paths: Vec<&str> = p.credential_providers().iter().map(|s| s.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "routes[0].inject[0].value.oauth2",
                "clients[0].inject.r[0].value.oauth2",
                "clients[1].inject.r[0].value.oauth2"
            ]
        );
        // The route's record keeps the identity it had before clients could
        // bring their own (a reload keeps its value).
        assert_eq!(p.credential_providers()[0].id, PINNED_ROUTE_ID);
        assert_eq!((p.route_providers("r"), p.route_providers("s")), (&[0, 1, 2][..], &[0, 1][..]));
    }

    /// Every example under `## Dynamic credentials` in docs/config.md loads,
    /// with the sources it describes.
    #[test]
    fn documented_examples_load() {
        let doc = include_str!("../../../docs/config.md");
        let start = doc.find("## Dynamic credentials").unwrap();
        let end = start + doc[start..].find("## When a configuration is refused").unwrap();
        let mut kinds = Vec::new();
        for block in doc[start..end].split("```json\n").skip(1) {
            let json = &block[..block.find("```").unwrap()];
            let p = Policy::from_json(json.as_bytes(), &ENV).unwrap_or_else(|e| panic!("{e}\n{json}"));
            kinds.extend(p.credential_providers().iter().map(|s| (s.kind, s.pointers.len(), s.keyed.clone())));
        }
        let broker = Some(Keyed { idle_ms: 3_600_000, max_keys: 1000, evicts: false });
        let on_behalf = Some(Keyed { idle_ms: 3_600_000, max_keys: 1000, evicts: true });
        assert_eq!(
            kinds,
            [
                (Kind::Oauth2, 0, None),
                (Kind::TokenExchange, 0, None),
                (Kind::Fetch, 2, None),
                (Kind::Fetch, 2, broker),
                (Kind::TokenExchange, 0, on_behalf)
            ]
        );
    }

    /// A per-client fetch: `{client}` only in a fetch path, its fields only
    /// with it, within bounds; the caller-token header only with one.
    #[test]
    fn per_client_fetch_fields_are_checked_with_their_path() {
        let load = |value: &str, top: &str| {
            let json = format!(
                r#"{{"clients": [{{"id": "c", "key": "k1", "routes": ["*"]}}], "key_sources": [{{"header": "x-api-key"}}],
                    {top} "routes": [{{"name": "r", "match": {{"clusters": ["r"]}}, "inject": [{{"header": "x", "value": {value}}}]}}]}}"#
            );
            Policy::from_json(json.as_bytes(), &|_: &str| None).map(|p| p.has_keyed_credentials())
        };
        let err = |value: &str, top: &str| load(value, top).unwrap_err().to_string();
        let fetch = |fields: &str| format!(r#"{{"fetch": {{"cluster": "v", "json_pointer": "/t", {fields}}}}}"#);
        assert_eq!(load(&fetch(r#""path": "/c/{client}""#), ""), Ok(true));
        assert_eq!(load(&fetch(r#""path": "/c""#), ""), Ok(false));
        let path = "routes[0].inject[0].value.fetch";
        for (fields, want) in [
            (r#""path": "/c/{client}/{client}""#, format!("{path}.path: names `{{client}}` more than once")),
            (r#""path": "/c?u={client}""#, format!("{path}.path: names `{{client}}` in the query; it belongs in the path")),
            (r#""path": "/c/{user}""#, format!("{path}.path: holds `{{` or `}}` outside the one placeholder, `{{client}}`")),
            (
                r#""path": "/c", "authority": "{client}.vault""#,
                format!("{path}.authority: holds `{{client}}`, which is filled in only in a `fetch` value's `path` (one credential per client)"),
            ),
            (r#""path": "/c", "idle_seconds": 60"#, format!("{path}.idle_seconds: applies only to a per-client fetch: name `{{client}}` in `path`")),
            (r#""path": "/c", "max_clients": 5"#, format!("{path}.max_clients: applies only to a per-client fetch: name `{{client}}` in `path`")),
            (r#""path": "/c/{client}", "idle_seconds": 0"#, format!("{path}.idle_seconds: must be between 1 and 604800 (a week)")),
            (r#""path": "/c/{client}", "max_clients": 100001"#, format!("{path}.max_clients: must be between 1 and 100000")),
        ] {
            assert_eq!(err(&fetch(fields), ""), want, "{fields}");
        }
        let oauth = r#"{"oauth2": {"cluster": "i", "token_path": "/t/{client}", "client_id": {"inline": "a"}, "client_secret": {"inline": "b"}}}"#;
        assert_eq!(
            err(oauth, ""),
            "routes[0].inject[0].value.oauth2.token_path: holds `{client}`, which is filled in only in a `fetch` value's `path` (one credential per client)"
        );
        let keyed = fetch(r#""path": "/c/{client}""#);
        assert_eq!(load(&keyed, r#""caller_token_header": "X-Caller-Token","#), Ok(true));
        assert_eq!(
            err(&fetch(r#""path": "/c""#), r#""caller_token_header": "x-caller-token","#),
            "caller_token_header: is read only for a per-client fetch (`{client}` in a `fetch` path), and no credential is one"
        );
        assert_eq!(
            err(&keyed, r#""caller_token_header": "x-api-key","#),
            "caller_token_header: is a key source or the client_id_header; name a header of its own"
        );
        assert_eq!(
            err(&keyed, r#""caller_token_header": "x","#),
            "caller_token_header: is a header a credential is injected into; name a header of its own"
        );
        assert_eq!(
            err(&keyed, r#""caller_token_header": ":path","#),
            "caller_token_header: must not be a pseudo-header"
        );
    }

    /// An on-behalf-of exchange: the subject from a request header, one
    /// record per subject (evicting, bounded), its fields checked with
    /// their path; one subject header for the configuration.
    #[test]
    fn on_behalf_of_fields_are_checked_with_their_path() {
        let load = |te: &str, top: &str| {
            let json = format!(
                r#"{{"clients": [{{"id": "c", "key": "k1", "routes": ["*"]}}], "key_sources": [{{"header": "x-api-key"}}],
                    {top} "routes": [{{"name": "r", "match": {{"clusters": ["r"]}}, "inject": [{{"header": "authorization",
                    "value": {{"token_exchange": {{"cluster": "sts", "token_path": "/t", "audience": "a", {te}}}}}}}]}},
                    {{"name": "s", "match": {{"clusters": ["s"]}}, "inject": [{{"header": "authorization",
                    "value": {{"token_exchange": {{"cluster": "sts", "token_path": "/t", "audience": "b",
                    "subject_token": {{"header": "x-user-token", "prefix": "Bearer "}}}}}}}}]}}]}}"#
            );
            Policy::from_json(json.as_bytes(), &|_: &str| Some("gw".to_string()))
        };
        let err = |te: &str, top: &str| load(te, top).map(|_| ()).unwrap_err().to_string();
        let p = load(r#""subject_token": {"header": "X-User-Token", "prefix": "bearer "}, "max_subjects": 5"#, "")
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(p.has_subject_credentials() && p.has_keyed_credentials());
        let providers = p.credential_providers();
        assert_eq!(providers[0].keyed, Some(Keyed { idle_ms: 3_600_000, max_keys: 5, evicts: true }));
        assert_eq!(providers[1].keyed.as_ref().map(|k| k.max_keys), Some(DEFAULT_MAX_SUBJECTS));
        assert!(!String::from_utf8_lossy(providers[0].body.as_deref().unwrap_or_default()).contains("subject_token="));
        let body = providers[0].call_body(Some("a.b/c")).unwrap_or_default();
        assert!(String::from_utf8_lossy(&body).ends_with("&subject_token=a%2Eb%2Fc"));
        // One subject, two audiences: unrelated keys; never the subject.
        let (a, b) = (providers[0].subject_key(b"user-1"), providers[1].subject_key(b"user-1"));
        assert_ne!(a, b);
        assert_eq!(a.len(), 64);
        assert!(!a.contains("user-1"));
        assert_ne!(a, providers[0].subject_key(b"user-2"));
        let path = "routes[0].inject[0].value.token_exchange";
        for (te, want) in [
            (
                r#""subject_token": {"header": "x-user-token", "env": "S"}"#,
                format!("{path}.subject_token: needs exactly one of `env`, `inline` or `header`"),
            ),
            (r#""subject_token": {}"#, format!("{path}.subject_token: needs exactly one of `env`, `inline` or `header`")),
            (r#""subject_token": {"env": "S", "prefix": "Bearer "}"#, format!("{path}.subject_token.prefix: applies only with `header`")),
            (r#""subject_token": {"header": ":path"}"#, format!("{path}.subject_token.header: must not be a pseudo-header")),
            (
                r#""subject_token": {"header": "x-user-token", "prefix": " "}"#,
                format!("{path}.subject_token.prefix: must be non-empty text without control characters"),
            ),
            (
                r#""subject_token": {"header": "x-user-token"}, "max_subjects": 0"#,
                format!("{path}.max_subjects: must be between 1 and 100000"),
            ),
            (
                r#""subject_token": {"header": "x-user-token"}, "idle_seconds": 0"#,
                format!("{path}.idle_seconds: must be between 1 and 604800 (a week)"),
            ),
            (
                r#""subject_token": {"env": "S"}, "max_subjects": 10"#,
                format!("{path}.max_subjects: applies only to an on-behalf-of exchange: a `subject_token` read from a request `header`"),
            ),
            (
                r#""subject_token": {"header": "x-api-key"}"#,
                format!("{path}.subject_token.header: is a key source, the client_id_header or the caller_token_header; name a header of its own"),
            ),
            (
                r#""subject_token": {"header": "x-user-token"}"#,
                "routes[1].inject[0].value.token_exchange.subject_token.header: differs from another on-behalf-of exchange's subject header or prefix; every one reads the same".to_string(),
            ),
        ] {
            assert_eq!(err(te, ""), want, "{te}");
        }
        // The caller's token authenticates a per-client fetch only: an
        // exchange sends the subject, never it.
        assert_eq!(
            err(r#""subject_token": {"env": "S"}"#, r#""caller_token_header": "x-caller-token","#),
            "caller_token_header: is read only for a per-client fetch (`{client}` in a `fetch` path), and no credential is one"
        );
    }

    #[test]
    fn a_subjects_jwt_exp_caps_the_exchanged_token() {
        use base64::Engine as _;
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let jwt = |payload: &str| format!("{}.{}.sig", b64(r#"{"alg":"none"}"#), b64(payload));
        assert_eq!(crate::credential::jwt_exp_ms(&jwt(r#"{"exp":1800000030}"#)), Some(1_800_000_030_000));
        for not_one in
            [jwt(r#"{"sub":"a"}"#), jwt(r#"{"exp":"soon"}"#), jwt("not json"), "opaque-token".into(), "a.b".into()]
        {
            assert_eq!(crate::credential::jwt_exp_ms(&not_one), None, "{not_one}");
        }
        let answer =
            crate::credential::Answer { values: vec!["t".into()], expires_at: Some(3_600_000), refresh_at: 3_540_000 };
        let capped = answer.clone().capped(Some(30_000));
        assert_eq!((capped.expires_at, capped.refresh_at), (Some(30_000), 30_000), "kept to exp, not refreshed before");
        assert_eq!(answer.clone().capped(Some(7_200_000)), answer, "a later exp changes nothing");
        assert_eq!(answer.clone().capped(None), answer, "a subject that is no JWT has no cap");
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
        let answer = crate::credential::Answer { values: vec!["tok-secret-2".into()], expires_at: None, refresh_at: 1 };
        let forward = crate::Forward {
            route: Some("r"),
            client: Some("c"),
            key: None,
            metadata: None,
            remove_headers: vec!["authorization"],
            remove_look_alikes: Vec::new(),
            add_headers: vec![("authorization", "tok-secret-3".into())],
            path: Some(b"/?k=tok-secret-4".to_vec()),
            secrets: vec!["tok-secret-6".into()],
            used: Vec::new(),
        };
        let raw = crate::raw::RawValue::Inline("tok-secret-5".into());
        let text = format!("{record:?} {answer:?} {forward:?} {raw:?}");
        assert!(!text.contains("tok-secret"), "{text}");
        assert!(
            text.contains("generation: 3") && text.contains("[1 redacted]") && text.contains("Inline(..)"),
            "{text}"
        );
    }
}
