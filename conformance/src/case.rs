//! A case's format (one JSON file under `cases/`), what a host reports of
//! it ([`Observed`]), and the one comparison every runner is judged by
//! ([`SuiteCase::check`]).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;

use serde::Deserialize;

use crate::runner::Capability;

/// One case, loaded and with its configuration resolved to text.
#[derive(Debug, Clone)]
pub struct SuiteCase {
    /// The file stem, for example `forward-bearer-swap`.
    pub name: String,
    pub description: String,
    /// What the case needs of its host beyond sending a request and
    /// observing what comes of it: the file's `needs`, plus
    /// [`Capability::Timeline`] when it has `steps`. A runner that lacks one
    /// of them skips the case ([`crate::Runner::lacks`]).
    pub needs: BTreeSet<Capability>,
    /// The plugin configuration exactly as the host receives it.
    pub config: String,
    /// The VM's environment variables.
    pub env: BTreeMap<String, String>,
    pub request: Request,
    pub expect: Expect,
    /// What the upstream answers and what the client must see of it.
    pub response: Option<Response>,
    /// Dynamic credentials: what happens before the request (timer ticks on
    /// a controlled clock, token calls answered or failed). Empty for a
    /// case without them; a case with steps needs [`Capability::Timeline`].
    pub steps: Vec<Step>,
    /// How many workers (VMs sharing shared data and the clock) run the
    /// steps; every tick reaches them in order, and the request goes to the
    /// last (so a worker that made no call must see what another fetched).
    /// 1 unless given.
    pub workers: usize,
    /// The request's time, in milliseconds after [`STEPS_START`]; the last
    /// `tick_at` unless given.
    pub request_at_ms: Option<u64>,
}

/// The clock's start for a case with steps: 2027-01-15T08:00:00Z.
pub const STEPS_START: std::time::Duration = std::time::Duration::from_secs(1_800_000_000);

/// One step of a case's timeline.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum Step {
    /// Sets the clock to [`STEPS_START`] plus this many milliseconds, then
    /// gives every worker one timer tick.
    TickAt(u64),
    /// Answers the oldest pending call to `cluster` (there must be one).
    Answer(CallAnswer),
    /// The oldest pending call to `cluster` (there must be one) fails
    /// without an answer (a timeout or a reset).
    Fail { cluster: String },
    /// Exactly this many calls are pending, across every worker.
    Pending(usize),
    /// The case's request (with `headers` instead of its own, when given)
    /// goes to a worker and must be forwarded; its stream stays open,
    /// waiting for the upstream's answer ([`Step::Respond`]).
    Send(SendStep),
    /// The upstream answers the request open on a worker (there must be
    /// one) with this status, headers only; the stream ends.
    Respond(RespondStep),
    /// Rate limits and quotas: sets the clock (never backwards) and sends
    /// `count` requests one after the other, each run to its end; the
    /// first `forwarded` must be forwarded, the rest denied `denied`.
    Requests(RequestsStep),
    /// The request a `send` with `waits` left held on a worker has been
    /// let go since, forwarded: it must carry `carries` and lack `lacks`;
    /// its stream stays open for `respond`. Only `worker`, `carries` and
    /// `lacks` are read (a case giving `headers` or `waits` is refused).
    Resumed(SendStep),
    /// The request a `send` with `waits` left held on a worker has been
    /// answered locally since, with this status and error code.
    Refused(RefusedStep),
}

/// See [`Step::Refused`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefusedStep {
    /// The worker (0-based); the last by default.
    #[serde(default)]
    pub worker: Option<usize>,
    pub status: u16,
    /// The `error` of the JSON body.
    pub error: String,
}

impl RefusedStep {
    /// Compares a local answer with this step.
    ///
    /// # Errors
    /// The difference.
    pub fn check(&self, status: u16, body: &[u8]) -> Result<(), String> {
        let error = serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|json| json["error"].as_str().map(str::to_string));
        if status == self.status && error.as_deref() == Some(self.error.as_str()) {
            Ok(())
        } else {
            Err(format!("want {} {:?}, got {status} {error:?}", self.status, self.error))
        }
    }
}

/// See [`Step::Requests`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestsStep {
    /// The clock, in milliseconds after [`STEPS_START`].
    pub at_ms: u64,
    /// How many requests; default 1.
    #[serde(default = "one")]
    pub count: usize,
    /// The requests' headers instead of the case's (another client's key).
    #[serde(default)]
    pub headers: Option<Vec<(String, String)>>,
    /// The requests' Envoy route name (and cluster) instead of the case's.
    #[serde(default)]
    pub route_name: Option<String>,
    /// The worker (0-based); the last by default.
    #[serde(default)]
    pub worker: Option<usize>,
    /// How many of them, the first ones, are forwarded.
    pub forwarded: usize,
    /// The `error` of the local answer to the rest (required when
    /// `forwarded` is less than `count`).
    #[serde(default)]
    pub denied: Option<String>,
}

fn one() -> usize {
    1
}

impl RequestsStep {
    /// The request this step sends: `case`'s, with this step's headers and
    /// route.
    pub fn request(&self, case: &Request) -> Request {
        let mut request = case.clone();
        if let Some(headers) = &self.headers {
            request.headers.clone_from(headers);
        }
        if let Some(route) = &self.route_name {
            request.route_name = Some(route.clone());
            request.cluster = None;
        }
        request
    }

    /// Checks the outcome of request `i` (0-based): `None` forwarded, or
    /// the local answer's status and body.
    ///
    /// # Errors
    /// What was expected and what came.
    pub fn check(&self, i: usize, outcome: Option<(u16, &[u8])>) -> Result<(), String> {
        let want = if i < self.forwarded { None } else { self.denied.as_deref() };
        match (want, outcome) {
            (None, None) => Ok(()),
            (Some(code), Some((status, body))) => {
                let got: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
                if got["error"] == code {
                    Ok(())
                } else {
                    Err(format!("request {i}: want denied `{code}`, got {status} {}", String::from_utf8_lossy(body)))
                }
            }
            (None, Some((status, body))) => {
                Err(format!("request {i}: want forwarded, got {status} {}", String::from_utf8_lossy(body)))
            }
            (Some(code), None) => Err(format!("request {i}: want denied `{code}`, got forwarded")),
        }
    }
}

/// See [`Step::Send`].
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendStep {
    /// The request's headers instead of the case's (another client's key).
    #[serde(default)]
    pub headers: Option<Vec<(String, String)>>,
    /// The worker (0-based); the last by default. It must have no request
    /// open.
    #[serde(default)]
    pub worker: Option<usize>,
    /// Headers the forwarded request must carry with exactly these values.
    #[serde(default)]
    pub carries: Vec<(String, String)>,
    /// Header names the forwarded request must not carry.
    #[serde(default)]
    pub lacks: Vec<String>,
    /// The request must be held (waiting for a per-client credential)
    /// instead of forwarded; `resumed` or `refused` says what came of it.
    #[serde(default)]
    pub waits: bool,
}

/// See [`Step::Respond`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RespondStep {
    pub status: u16,
    /// The worker (0-based); the last by default.
    #[serde(default)]
    pub worker: Option<usize>,
}

impl SendStep {
    /// The request this step sends: `case`'s, with this step's headers.
    pub fn request(&self, case: &Request) -> Request {
        let mut request = case.clone();
        if let Some(headers) = &self.headers {
            request.headers.clone_from(headers);
        }
        request
    }

    /// Compares the forwarded request's headers with [`Self::carries`].
    ///
    /// # Errors
    /// Every header missing or with another value, one a line.
    pub fn check(&self, forwarded: &[(String, Vec<u8>)]) -> Result<(), String> {
        let mut diff = String::new();
        for (name, want) in &self.carries {
            let name = name.to_ascii_lowercase();
            let got: Vec<String> = forwarded
                .iter()
                .filter(|(n, _)| *n == name)
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
                .collect();
            if got != [want.clone()] {
                let _ = writeln!(diff, "forwarded header {name}: want {want:?}, got {got:?}");
            }
        }
        for name in &self.lacks {
            let name = name.to_ascii_lowercase();
            if forwarded.iter().any(|(n, _)| *n == name) {
                let _ = writeln!(diff, "forwarded header {name}: must be absent, is present");
            }
        }
        if diff.is_empty() {
            Ok(())
        } else {
            Err(diff)
        }
    }
}

/// Which of `workers` a step names: `worker`, else the last.
///
/// # Errors
/// A worker that does not exist.
pub fn step_worker(worker: Option<usize>, workers: usize) -> Result<usize, String> {
    let w = worker.unwrap_or(workers.saturating_sub(1));
    if w < workers {
        Ok(w)
    } else {
        Err(format!("there is no worker {w} (the case has {workers})"))
    }
}

/// A token endpoint's or credential service's answer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallAnswer {
    pub cluster: String,
    #[serde(default = "ok_status")]
    pub status: u16,
    /// A JSON value, sent as its compact text; a string is sent as is.
    pub body: serde_json::Value,
    /// What the call must have been.
    #[serde(default)]
    pub call: Option<ExpectCall>,
}

/// What an HTTP call the filter made must hold.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectCall {
    pub method: Option<String>,
    pub path: Option<String>,
    pub authority: Option<String>,
    /// Headers the call must carry with exactly these values.
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    /// The exact body.
    pub body: Option<String>,
}

impl ExpectCall {
    /// Compares a call's headers and body with this expectation.
    ///
    /// # Errors
    /// Every difference, one a line.
    pub fn check(&self, headers: &[(String, Vec<u8>)], body: &[u8]) -> Result<(), String> {
        let get =
            |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| String::from_utf8_lossy(v).into_owned());
        let mut diff = String::new();
        for (name, want) in [(":method", &self.method), (":path", &self.path), (":authority", &self.authority)] {
            if let Some(want) = want {
                if get(name).as_deref() != Some(want.as_str()) {
                    let _ = writeln!(diff, "call {name}: want {want:?}, got {:?}", get(name));
                }
            }
        }
        for (name, want) in &self.headers {
            if get(&name.to_ascii_lowercase()).as_deref() != Some(want.as_str()) {
                let _ = writeln!(diff, "call header {name}: want {want:?}, got {:?}", get(&name.to_ascii_lowercase()));
            }
        }
        if let Some(want) = &self.body {
            if want.as_bytes() != body {
                let _ = writeln!(diff, "call body: want {want:?}, got {:?}", String::from_utf8_lossy(body));
            }
        }
        if diff.is_empty() {
            Ok(())
        } else {
            Err(diff)
        }
    }
}

fn ok_status() -> u16 {
    200
}

impl CallAnswer {
    /// The body's bytes.
    pub fn body_bytes(&self) -> Vec<u8> {
        match &self.body {
            serde_json::Value::String(text) => text.clone().into_bytes(),
            other => other.to_string().into_bytes(),
        }
    }
}

/// The request the client sends.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// Envoy's route name for this request, if the case needs one.
    #[serde(default)]
    pub route_name: Option<String>,
    /// Envoy's cluster for this request (`xds.cluster_name`); by default
    /// the cluster named like `route_name` (the Envoy runner sends each
    /// named route to a cluster of that name).
    #[serde(default)]
    pub cluster: Option<String>,
    #[serde(default = "default_method")]
    pub method: String,
    #[serde(default = "default_path")]
    pub path: String,
    #[serde(default = "default_authority")]
    pub authority: String,
    /// Headers besides the pseudo-headers, in order.
    #[serde(default)]
    pub headers: Vec<(String, String)>,
}

impl Default for Request {
    fn default() -> Self {
        Self {
            route_name: None,
            cluster: None,
            method: default_method(),
            path: default_path(),
            authority: default_authority(),
            headers: Vec::new(),
        }
    }
}

impl Request {
    /// The request's cluster: `cluster`, else the one named like
    /// `route_name`.
    pub fn cluster(&self) -> Option<&str> {
        self.cluster.as_deref().or(self.route_name.as_deref())
    }

    /// The full header list a proxy-wasm host hands the filter:
    /// pseudo-headers first, then the others with names in lower case.
    pub fn header_list(&self) -> Vec<(String, Vec<u8>)> {
        let mut list = vec![
            (":authority".to_string(), self.authority.as_bytes().to_vec()),
            (":path".to_string(), self.path.as_bytes().to_vec()),
            (":method".to_string(), self.method.as_bytes().to_vec()),
            (":scheme".to_string(), b"http".to_vec()),
        ];
        list.extend(self.headers.iter().map(|(n, v)| (n.to_ascii_lowercase(), v.as_bytes().to_vec())));
        list
    }
}

fn default_method() -> String {
    "GET".into()
}
fn default_path() -> String {
    "/".into()
}
fn default_authority() -> String {
    "gateway.local".into()
}

/// What must happen.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum Expect {
    /// The request reaches the upstream like this.
    Forward(ExpectForward),
    /// The client is answered locally like this.
    Deny(ExpectDeny),
    /// The configuration is refused; the text is the error line
    /// (`field.path: message`) the host must log.
    ConfigError(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectForward {
    /// The `:path` the upstream receives.
    pub path: String,
    /// Exactly the headers the upstream receives (any order), besides the
    /// pseudo-headers and what the host itself adds.
    pub headers: Vec<(String, String)>,
    /// Exactly the access-log field keyswap sets (needs
    /// [`Capability::AccessLog`], implied).
    #[serde(default)]
    pub access_log: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectDeny {
    pub status: u16,
    /// The `error` field of the JSON body.
    pub error: String,
    /// Headers the response must carry with exactly these values.
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    /// Exactly the access-log field keyswap sets (needs
    /// [`Capability::AccessLog`], implied).
    #[serde(default)]
    pub access_log: Option<String>,
}

/// The upstream's response headers and what the client must see of them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Response {
    pub headers: Vec<(String, String)>,
    /// The subset of `headers` that reaches the client (any order).
    pub client_sees: Vec<(String, String)>,
}

/// What a host saw happen to a case's request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observed {
    Forwarded {
        path: String,
        /// The upstream's request headers, pseudo-headers and host-added
        /// headers left out.
        headers: Vec<(String, String)>,
        /// The response headers the client received, when the case has a
        /// `response`.
        client_response: Option<Vec<(String, String)>>,
    },
    Denied {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// The host refused the configuration; `log` is what it logged.
    ConfigRefused {
        log: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseFile {
    description: String,
    #[serde(default)]
    needs: Vec<Capability>,
    config: ConfigRef,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    request: Request,
    expect: Expect,
    #[serde(default)]
    response: Option<Response>,
    #[serde(default)]
    steps: Vec<Step>,
    #[serde(default)]
    workers: Option<usize>,
    #[serde(default)]
    request_at_ms: Option<u64>,
}

/// A file under `configs/` (read as raw text, so it may be broken JSON), or
/// an inline JSON object.
#[derive(Deserialize)]
#[serde(untagged)]
enum ConfigRef {
    File(String),
    Inline(serde_json::Value),
}

/// Loads `file`, a case of the suite in `dir`, and resolves its
/// configuration.
///
/// # Errors
/// A file that cannot be read or parsed, a configuration file that cannot be
/// read, or `needs` that the case itself contradicts.
pub(crate) fn load_case(dir: &Path, file: &Path) -> Result<SuiteCase, String> {
    let text = std::fs::read_to_string(file).map_err(|e| e.to_string())?;
    let raw: CaseFile = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    let mut needs = BTreeSet::new();
    for need in raw.needs {
        match need {
            Capability::Timeline => {
                return Err(format!("needs: `{}` is implied by `steps`; do not write it", need.name()))
            }
            Capability::AccessLog => {
                return Err(format!("needs: `{}` is implied by `expect`'s `access_log`; do not write it", need.name()))
            }
            Capability::RouteAndCluster if raw.request.route_name.is_none() && raw.request.cluster.is_none() => {
                return Err(format!("needs: `{}`, but the request has no route_name or cluster", need.name()))
            }
            Capability::EchoRemoval if raw.response.is_none() => {
                return Err(format!("needs: `{}`, but the case has no `response`", need.name()))
            }
            _ => {}
        }
        if !needs.insert(need) {
            return Err(format!("needs: `{}` twice", need.name()));
        }
    }
    if !raw.steps.is_empty() {
        needs.insert(Capability::Timeline);
    }
    if access_log(&raw.expect).is_some() {
        needs.insert(Capability::AccessLog);
    }
    for (i, step) in raw.steps.iter().enumerate() {
        match step {
            Step::Requests(r) if r.forwarded > r.count || (r.forwarded < r.count && r.denied.is_none()) => {
                return Err(format!(
                    "steps[{i}]: `forwarded` must be at most `count`, and `denied` given for the rest"
                ));
            }
            Step::Resumed(resumed) if resumed.headers.is_some() || resumed.waits => {
                return Err(format!("steps[{i}]: `resumed` takes only `worker`, `carries` and `lacks`"));
            }
            _ => {}
        }
    }
    let config = match raw.config {
        ConfigRef::File(name) => {
            let path = dir.join("configs").join(&name);
            std::fs::read_to_string(&path).map_err(|e| format!("config {}: {e}", path.display()))?
        }
        ConfigRef::Inline(value) => value.to_string(),
    };
    let name = file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    Ok(SuiteCase {
        name,
        description: raw.description,
        needs,
        config,
        env: raw.env,
        request: raw.request,
        expect: raw.expect,
        response: raw.response,
        steps: raw.steps,
        workers: raw.workers.unwrap_or(1).max(1),
        request_at_ms: raw.request_at_ms,
    })
}

fn sorted(headers: &[(String, String)]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = headers.iter().map(|(n, v)| (n.to_ascii_lowercase(), v.clone())).collect();
    out.sort();
    out
}

fn access_log(expect: &Expect) -> Option<&str> {
    match expect {
        Expect::Forward(f) => f.access_log.as_deref(),
        Expect::Deny(d) => d.access_log.as_deref(),
        Expect::ConfigError(_) => None,
    }
}

impl SuiteCase {
    /// The access-log field the case expects, if it says.
    pub fn access_log(&self) -> Option<&str> {
        access_log(&self.expect)
    }

    /// Compares the access-log field a host shows (`None`: none set) with
    /// the one the case expects; Ok when it expects none.
    ///
    /// # Errors
    /// The difference.
    pub fn check_access_log(&self, field: Option<&str>) -> Result<(), String> {
        match self.access_log() {
            Some(want) if field != Some(want) => Err(format!("access log: want {want:?}, got {field:?}")),
            _ => Ok(()),
        }
    }

    /// Compares what a host observed with what this case expects.
    ///
    /// # Errors
    /// Every difference, one a line.
    pub fn check(&self, observed: &Observed) -> Result<(), String> {
        let mut diff = String::new();
        match (&self.expect, observed) {
            (Expect::Forward(want), Observed::Forwarded { path, headers, client_response }) => {
                if &want.path != path {
                    let _ = writeln!(diff, "upstream path: want {:?}, got {path:?}", want.path);
                }
                let (want_h, got_h) = (sorted(&want.headers), sorted(headers));
                if want_h != got_h {
                    let _ = writeln!(diff, "upstream headers:\n  want {want_h:?}\n  got  {got_h:?}");
                }
                if let Some(response) = &self.response {
                    match client_response {
                        None => {
                            let _ = writeln!(diff, "the host did not report the client's response");
                        }
                        Some(received) => {
                            let sent: Vec<String> =
                                response.headers.iter().map(|(n, _)| n.to_ascii_lowercase()).collect();
                            let seen: Vec<(String, String)> =
                                sorted(received).into_iter().filter(|(n, _)| sent.contains(n)).collect();
                            let want_seen = sorted(&response.client_sees);
                            if seen != want_seen {
                                let _ =
                                    writeln!(diff, "client response headers:\n  want {want_seen:?}\n  got  {seen:?}");
                            }
                        }
                    }
                }
            }
            (Expect::Deny(want), Observed::Denied { status, headers, body }) => {
                if want.status != *status {
                    let _ = writeln!(diff, "status: want {}, got {status}", want.status);
                }
                match serde_json::from_slice::<serde_json::Value>(body) {
                    Ok(json) => {
                        if json["error"] != want.error.as_str() {
                            let _ = writeln!(diff, "error code: want {:?}, got {}", want.error, json["error"]);
                        }
                        if json["message"].as_str().is_none_or(str::is_empty) {
                            let _ = writeln!(diff, "the body has no message: {json}");
                        }
                    }
                    Err(_) => {
                        let _ = writeln!(diff, "body is not JSON: {:?}", String::from_utf8_lossy(body));
                    }
                }
                let got = sorted(headers);
                for header in sorted(&want.headers) {
                    if !got.contains(&header) {
                        let _ = writeln!(diff, "response header {header:?} missing; got {got:?}");
                    }
                }
            }
            (Expect::ConfigError(want), Observed::ConfigRefused { log }) => {
                if !log.contains(want.as_str()) {
                    let _ = writeln!(diff, "config error: want a line with {want:?}, log was:\n{log}");
                }
            }
            (want, got) => {
                let _ = writeln!(diff, "want {want:?},\n got {got:?}");
            }
        }
        if diff.is_empty() {
            Ok(())
        } else {
            Err(diff)
        }
    }
}
