//! A provider: one HTTP call that yields credentials, and how its answer
//! is read.

use crate::json::{number_f64, Value};

/// Refresh this long before `expires_in` runs out, unless configured.
pub const DEFAULT_MARGIN_SECONDS: u64 = 60;
/// How long a token call may take, unless configured.
pub const DEFAULT_TIMEOUT_MS: u64 = 5000;
/// How often a `fetch` provider is polled, unless configured; also the refresh
/// period of a token answered without `expires_in`.
pub const DEFAULT_REFRESH_SECONDS: u64 = 300;
/// The longest wait between retries after failed refreshes.
pub const MAX_BACKOFF_MS: i64 = 60_000;
/// The shortest time between two refreshes forced by an upstream's 401 for
/// one provider ([`crate::credential::Record::rejected`]).
pub const MIN_FORCED_REFRESH_MS: i64 = 5_000;
/// The longest credential value accepted from a token endpoint.
pub const MAX_VALUE_BYTES: usize = 16 * 1024;
/// The placeholder a `fetch` path names its client with.
pub const CLIENT_PLACEHOLDER: &str = "{client}";
/// How long a keyed value (a `{client}` fetch) is kept unused, unless configured.
pub const DEFAULT_IDLE_SECONDS: u64 = 3600;
/// How many keys (clients) a keyed provider caches at once, unless configured.
pub const DEFAULT_MAX_KEYS: usize = 1000;
/// How many subjects an on-behalf-of exchange caches at once, unless configured.
pub const DEFAULT_MAX_SUBJECTS: usize = 1000;
/// The longest subject token read from a request.
pub const MAX_SUBJECT_BYTES: usize = 8192;

/// Which kind of dynamic value a provider gives.
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

/// One HTTP call that yields credentials: a token endpoint or a credential
/// service, and how to read its answer.
#[derive(Clone, PartialEq, Eq)]
pub struct Provider {
    /// A stable name for the provider's shared record: a digest of
    /// everything that shapes the call and its reading (never shown in
    /// logs).
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
    /// Refresh this long before a token expires.
    pub(crate) margin_ms: i64,
    /// Refresh this often when the answer gives no lifetime.
    pub(crate) refresh_ms: i64,
    /// `Some` for a provider with one record per key (a `fetch` whose path
    /// names `{client}`: one per client; an on-behalf-of exchange: one per
    /// subject), `None` for one record in all.
    pub keyed: Option<Keyed>,
    /// An on-behalf-of exchange: where the subject token is read from the
    /// request. Its records are keyed by [`Provider::subject_key`], and the
    /// call's form gets the request's subject ([`Provider::call_body`]).
    pub subject: Option<SubjectSource>,
}

/// Where an on-behalf-of exchange reads its subject token: a request
/// header, with an optional scheme prefix (lower case, compared
/// case-insensitively).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectSource {
    pub header: String,
    pub prefix: Option<Vec<u8>>,
}

/// How a keyed provider's records live: one per key (a client id), made
/// on the key's first request, dropped after `idle_ms` unused, at most
/// `max_keys` at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keyed {
    /// A record unused this long is dropped.
    pub idle_ms: i64,
    /// The most keys holding a record at once. Past it, a new key is
    /// refused (`credential_unavailable`) until one is dropped, or, with
    /// `evicts`, the least recently used key is dropped to make room.
    pub max_keys: usize,
    /// True for subjects (an on-behalf-of exchange): a new subject evicts
    /// the least recently used one rather than being refused.
    pub evicts: bool,
}

impl Keyed {
    /// How stale a record's `used_at` may get before a request writes it
    /// again: a quarter of the idle time, at least a second, so the write
    /// happens at most once per that interval per worker.
    pub fn touch_ms(&self) -> i64 {
        (self.idle_ms / 4).max(1000)
    }
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider")
            .field("path", &self.path)
            .field("kind", &self.kind)
            .field("cluster", &self.cluster)
            .field("pointers", &self.pointers)
            .field("keyed", &self.keyed)
            .field("subject", &self.subject)
            .finish_non_exhaustive()
    }
}

/// A provider's answer, read: the values it gave and how long they last.
#[derive(Clone, PartialEq, Eq)]
pub struct Answer {
    pub values: Vec<String>,
    /// Unix milliseconds after which the values may no longer be used.
    pub expires_at: Option<i64>,
    /// Unix milliseconds at which to refresh.
    pub refresh_at: i64,
}

impl Answer {
    /// This answer for a subject token whose own `exp` is `cap` (Unix
    /// milliseconds; see [`jwt_exp_ms`]): never valid past it, and not
    /// refreshed before it when it is the binding limit (an exchange of the
    /// same subject could not last longer).
    pub fn capped(self, cap: Option<i64>) -> Answer {
        match cap {
            Some(cap) if self.expires_at.is_none_or(|at| cap < at) => {
                Answer { expires_at: Some(cap), refresh_at: cap, ..self }
            }
            _ => self,
        }
    }
}

/// Why an answer was not taken; the message never holds a value from it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct AnswerError(pub String);

fn fail<T>(message: impl Into<String>) -> Result<T, AnswerError> {
    Err(AnswerError(message.into()))
}

impl Provider {
    /// The call's headers for `key` (a keyed provider's `{client}` in
    /// `:path`, percent-encoded) with `authorization` replacing the
    /// configured one when given (the caller's own token). May hold a
    /// secret: never log them.
    pub fn call_headers(&self, key: Option<&str>, authorization: Option<&str>) -> Vec<(String, String)> {
        let mut headers = self.headers.clone();
        if let (Some(key), Some(_)) = (key, &self.keyed) {
            let encoded = percent_encoded(key);
            for (name, value) in &mut headers {
                if name == ":path" {
                    *value = value.replace(CLIENT_PLACEHOLDER, &encoded);
                }
            }
        }
        if let Some(authorization) = authorization {
            headers.retain(|(name, _)| name != "authorization");
            headers.push(("authorization".to_string(), authorization.to_string()));
        }
        headers
    }

    /// The call's form body: for an on-behalf-of exchange, the configured
    /// form with the request's `subject_token` appended. May hold a
    /// secret: never log it.
    pub fn call_body(&self, subject: Option<&str>) -> Option<Vec<u8>> {
        let mut body = self.body.clone()?;
        if let (Some(subject), Some(_)) = (subject, &self.subject) {
            body.extend_from_slice(b"&subject_token=");
            body.extend_from_slice(form_encoded(subject).as_bytes());
        }
        Some(body)
    }

    /// The key of an on-behalf-of exchange's record for `subject`: the hex
    /// SHA-256 of the provider's identity (its call: route, audience, STS)
    /// and the subject, so the subject itself is never a key, and the same
    /// subject has unrelated keys for two audiences.
    pub fn subject_key(&self, subject: &[u8]) -> String {
        use sha2::{Digest as _, Sha256};
        let mut digest = Sha256::new();
        digest.update((self.id.len() as u64).to_le_bytes());
        digest.update(self.id.as_bytes());
        digest.update(subject);
        digest.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// True when an answer refuses the subject of an on-behalf-of exchange
    /// (RFC 6749 5.2: `400` with `invalid_grant`, or `401`): the caller is
    /// answered `invalid_subject_token` rather than `credential_unavailable`.
    pub fn refuses_subject(&self, status: u16, body: &[u8]) -> bool {
        if self.subject.is_none() {
            return false;
        }
        match status {
            401 => true,
            400 => Value::parse(body)
                .ok()
                .is_some_and(|json| json.get("error").and_then(Value::as_str) == Some("invalid_grant")),
            _ => false,
        }
    }

    /// Reads an answer received at `now` (Unix milliseconds).
    ///
    /// # Errors
    /// The status is not 2xx, the body is not the expected JSON, or a value
    /// is empty, too long or not fit for a header.
    pub fn parse(&self, status: u16, body: &[u8], now: i64) -> Result<Answer, AnswerError> {
        if !(200..300).contains(&status) {
            return fail(format!("the {} answered status {status}", self.endpoint()));
        }
        let Ok(json) = Value::parse(body) else {
            return fail(format!("the {} answered a body that is not JSON", self.endpoint()));
        };
        match self.kind {
            Kind::Fetch => {
                let mut values = Vec::with_capacity(self.pointers.len());
                for pointer in &self.pointers {
                    let value = match json.pointer(pointer) {
                        Some(Value::String(s)) => s.to_string(),
                        Some(_) => return fail(format!("`{pointer}` in the answer is not a string")),
                        None => return fail(format!("the answer has no `{pointer}`")),
                    };
                    check_value(&value, pointer)?;
                    values.push(value);
                }
                Ok(Answer { values, expires_at: None, refresh_at: now.saturating_add(self.refresh_ms) })
            }
            Kind::Oauth2 | Kind::TokenExchange => {
                let token = match json.get("access_token") {
                    Some(Value::String(s)) => s.to_string(),
                    Some(_) => return fail("`access_token` in the answer is not a string"),
                    None => return fail("the answer has no `access_token`"),
                };
                check_value(&token, "access_token")?;
                let expires_in = match json.get("expires_in") {
                    None | Some(Value::Null) => None,
                    Some(Value::Number(n)) => number_f64(n),
                    // Some providers send the number as a string.
                    Some(Value::String(s)) => number_f64(s.trim()),
                    Some(_) => return fail("`expires_in` in the answer is not a number"),
                };
                let (expires_at, refresh_at) = match expires_in {
                    None if json.get("expires_in").is_some_and(|v| *v != Value::Null) => {
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
                Ok(Answer { values: vec![token], expires_at, refresh_at })
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

/// `key` as one path segment: every byte but RFC 3986's unreserved ones
/// percent-encoded (so a `/`, `?`, `#` or `..` in a client id stays inside
/// its segment). The module is a leaf, so it keeps its own encoder.
pub(super) fn percent_encoded(key: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(key.len() * 3);
    for &b in key.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            // `.` too: a client id `..` must not become a dot segment.
            out.extend(['%', char::from(HEX[usize::from(b >> 4)]), char::from(HEX[usize::from(b & 15)])]);
        }
    }
    out
}

/// A form value (`application/x-www-form-urlencoded`): every byte but
/// RFC 3986's unreserved ones percent-encoded.
fn form_encoded(value: &str) -> String {
    percent_encoded(value)
}

/// The `exp` of a subject token that is a JWT (three base64url parts, the
/// middle one a JSON object with a numeric `exp`), in Unix milliseconds;
/// `None` for anything else. Read without verifying the token: the STS
/// verifies it; keyswap only never keeps an exchanged token past it.
pub fn jwt_exp_ms(token: &str) -> Option<i64> {
    use base64::Engine as _;
    let mut parts = token.split('.');
    let (_, payload, _) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let json = Value::parse(&bytes).ok()?;
    let exp = json.get("exp")?.as_f64()?;
    (exp.is_finite() && exp > 0.0).then(|| (exp.min(i64::MAX as f64 / 4000.0) * 1000.0) as i64)
}

fn check_value(value: &str, what: &str) -> Result<(), AnswerError> {
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

// Credentials never show in Debug output: values are counted, not printed.
impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Answer")
            .field("values", &format_args!("[{} redacted]", self.values.len()))
            .field("expires_at", &self.expires_at)
            .field("refresh_at", &self.refresh_at)
            .finish()
    }
}
