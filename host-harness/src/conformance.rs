//! The conformance suite: one case a file under `tests/conformance/cases/`,
//! run by every host (the policy natively, this harness on the proxy-wasm
//! module, the real Envoy, the component). A host reports what it
//! [`Observed`]; [`Case::check`] compares that with the case's expectation,
//! so every runner is judged by the same code.
//!
//! A runner may leave a case out only through `tests/conformance/skip.json`
//! (`{"runner": {"case": "reason"}}`); [`Suite::plan`] refuses a skip entry
//! that names no case, so the list cannot rot.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The suite's directory in this repository.
pub fn default_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/conformance")
}

/// One case, loaded and with its configuration resolved to text.
#[derive(Debug, Clone)]
pub struct Case {
    /// The file stem, for example `forward-bearer-swap`.
    pub name: String,
    pub description: String,
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
    /// case without them; a runner without a controlled clock and HTTP
    /// calls skips a case that has steps (with its reason in `skip.json`).
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

/// Every case, and every runner's skip list.
#[derive(Debug)]
pub struct Suite {
    pub dir: PathBuf,
    pub cases: Vec<Case>,
    skips: BTreeMap<String, BTreeMap<String, String>>,
}

/// Which cases a runner runs and which it skips, with the reasons.
#[derive(Debug)]
pub struct Plan<'s> {
    pub run: Vec<&'s Case>,
    pub skipped: Vec<(&'s Case, &'s str)>,
}

impl Suite {
    /// Loads `dir/cases/*.json`, sorted by name, and `dir/skip.json`.
    ///
    /// # Errors
    /// A case or skip list that cannot be read or parsed, named by file.
    pub fn load(dir: &Path) -> Result<Self, String> {
        let cases_dir = dir.join("cases");
        let entries = std::fs::read_dir(&cases_dir).map_err(|e| format!("{}: {e}", cases_dir.display()))?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        files.sort();
        let mut cases = Vec::with_capacity(files.len());
        for file in files {
            cases.push(load_case(dir, &file).map_err(|e| format!("{}: {e}", file.display()))?);
        }
        let skip_file = dir.join("skip.json");
        let skips = match std::fs::read_to_string(&skip_file) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| format!("{}: {e}", skip_file.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(format!("{}: {e}", skip_file.display())),
        };
        Ok(Self { dir: dir.to_path_buf(), cases, skips })
    }

    /// The cases `runner` runs and skips.
    ///
    /// # Errors
    /// A skip entry for `runner` that names no case, or gives no reason.
    pub fn plan(&self, runner: &str) -> Result<Plan<'_>, String> {
        static EMPTY: BTreeMap<String, String> = BTreeMap::new();
        let skips = self.skips.get(runner).unwrap_or(&EMPTY);
        for (name, reason) in skips {
            if !self.cases.iter().any(|c| &c.name == name) {
                return Err(format!("skip.json: {runner} skips `{name}`, which is not a case"));
            }
            if reason.trim().is_empty() {
                return Err(format!("skip.json: {runner} skips `{name}` without a reason"));
            }
        }
        let mut plan = Plan { run: Vec::new(), skipped: Vec::new() };
        for case in &self.cases {
            match skips.get(&case.name) {
                Some(reason) => plan.skipped.push((case, reason.as_str())),
                None => plan.run.push(case),
            }
        }
        Ok(plan)
    }
}

fn load_case(dir: &Path, file: &Path) -> Result<Case, String> {
    let text = std::fs::read_to_string(file).map_err(|e| e.to_string())?;
    let raw: CaseFile = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    let config = match raw.config {
        ConfigRef::File(name) => {
            let path = dir.join("configs").join(&name);
            std::fs::read_to_string(&path).map_err(|e| format!("config {}: {e}", path.display()))?
        }
        ConfigRef::Inline(value) => value.to_string(),
    };
    let name = file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    Ok(Case {
        name,
        description: raw.description,
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

impl Case {
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

/// The outcome of running a plan.
#[derive(Debug, Default)]
pub struct Report {
    pub passed: usize,
    /// `(case, differences)`.
    pub failed: Vec<(String, String)>,
    pub skipped: usize,
}

impl Report {
    /// Runs every planned case through `run` and checks it.
    pub fn run(plan: &Plan<'_>, mut run: impl FnMut(&Case) -> Result<Observed, String>) -> Self {
        let mut report = Report { skipped: plan.skipped.len(), ..Self::default() };
        for case in &plan.run {
            match run(case).and_then(|observed| case.check(&observed)) {
                Ok(()) => report.passed += 1,
                Err(diff) => report.failed.push((case.name.clone(), diff)),
            }
        }
        report
    }

    /// Each failure, then the closing line `N passed, M failed`.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (name, diff) in &self.failed {
            let _ = writeln!(out, "FAIL {name}\n{diff}");
        }
        let _ = write!(out, "{} passed, {} failed", self.passed, self.failed.len());
        if self.skipped > 0 {
            let _ = write!(out, ", {} skipped", self.skipped);
        }
        out
    }
}
