//! `envoy-bench`: keyswap's side-by-side benchmark in Envoy (run it
//! through `scripts/bench`).
//!
//! One Envoy (`--concurrency 1`, pinned to one CPU) serves five listeners
//! that all proxy to the same fast local responder:
//!
//! ```text
//! plain      the floor: HTTP connection manager and router, nothing else
//! noop_wasm  the wasm floor: a proxy-wasm filter that does nothing (bench/noop-filter)
//! native     api_key_auth + credential_injector + header_mutation doing keyswap's job
//! lua        the same job in a Lua filter
//! keyswap    keyswap doing the job: the listener's filter and its cluster's upstream filter
//! ```
//!
//! The job is `keyswap_envoy_config::bench`, the one `keyswap bench`
//! measures in the harness. The bootstrap comes from `keyswap_tests::envoy`'s
//! builders, Envoy is started and proven ready (and keyswap's configuration
//! loaded) by `Envoy::start_with`, and every listener is checked to do the
//! job (or, for the floors, to proxy) before anything is measured and again
//! after the last round.
//!
//! wrk and the responder share the other CPU. The listeners are alternated
//! over many rounds (in a rotated order each round); for each the median
//! and spread of Envoy's CPU time per request (utime + stime from
//! /proc/PID/stat, all threads), requests per second, and wrk's p50/p99
//! latency; then keyswap's added CPU over plain Envoy as a ratio of the
//! native chain's. Generated files go to `.run/bench/`.
//!
//! Variants of the job are more listeners in the same run: another build
//! (`--variant`), every client limited (`--variant-limited`), and route
//! `bench`'s credential fetched per client from a loopback credential
//! service (`--variant-per-client-fetch`) or exchanged on behalf of the
//! caller's subject at a loopback STS (`--variant-on-behalf-of`; the load
//! then sends the subject's token too). The two services run in this
//! process; only the first request of the load's client or subject calls
//! them, and the run fails if either is called during the rounds, so what
//! is measured is the cached path. Each keyswap variant is also given
//! against `keyswap`, paired per round.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use clap::Parser;
use keyswap_envoy_config::bench::{self as job, Binding, CLIENTS, CLIENT_HEADER, STRIPPED};
use keyswap_tests::bench::{cpu_ticks, pin, ticks_per_second, Responder};
use keyswap_tests::envoy::{self, Envoy, Launch, LogLevels};
use keyswap_tests::http::Request;
use keyswap_tests::server::{Received, Reply, Server};
use serde_json::{json, Value};

/// The secret the native chain's credential_injector reads.
const SECRET: &str = "bench-upstream-credential";

#[derive(Parser)]
#[command(about = "keyswap's side-by-side benchmark in Envoy (scripts/bench runs it)")]
struct Args {
    #[arg(long, default_value_t = 10)]
    rounds: usize,
    /// Seconds of load per listener per round.
    #[arg(long, default_value_t = 5)]
    duration: u64,
    /// Seconds of unmeasured load per listener first.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    #[arg(long, default_value_t = 16)]
    connections: u32,
    #[arg(long, default_value = "0")]
    envoy_cpu: String,
    #[arg(long, default_value = "1")]
    load_cpu: String,
    #[arg(long)]
    noop_wasm: Option<PathBuf>,
    #[arg(long)]
    keyswap_wasm: Option<PathBuf>,
    /// The echo-upstream binary.
    #[arg(long)]
    responder: Option<PathBuf>,
    /// Write the tables and chart into docs/.
    #[arg(long)]
    update_docs: bool,
    /// Also measure another build of the keyswap filter doing the same job.
    #[arg(long, value_name = "NAME=WASM")]
    variant: Vec<String>,
    /// Also measure a build from before the two stages, on the listener only.
    #[arg(long, value_name = "NAME=WASM")]
    variant_listener_only: Vec<String>,
    /// Also measure a build doing the same job with every client given a
    /// rate and a quota the run never reaches (what counting costs).
    #[arg(long, value_name = "NAME=WASM")]
    variant_limited: Vec<String>,
    /// Also measure a build doing the same job with route `bench`'s
    /// credential fetched per client from a loopback credential service
    /// (`{client}` in the path), cached after each client's first request.
    #[arg(long, value_name = "NAME=WASM")]
    variant_per_client_fetch: Vec<String>,
    /// Also measure a build doing the same job with route `bench`'s
    /// credential exchanged on behalf of the caller at a loopback STS (the
    /// load sends a subject token), cached after the subject's first request.
    #[arg(long, value_name = "NAME=WASM")]
    variant_on_behalf_of: Vec<String>,
    /// Also measure the no-op filter making the host calls CALLS
    /// (comma-separated, see bench/noop-filter) on every request: one
    /// host call's price is this listener's CPU less `noop_wasm`'s.
    #[arg(long, value_name = "NAME=CALLS")]
    noop_variant: Vec<String>,
    /// The same, with the no-op filter also in the cluster's upstream
    /// filters (two stages, as keyswap is placed; CALLS in each stage).
    #[arg(long, value_name = "NAME=CALLS")]
    noop_variant_two_stages: Vec<String>,
    /// Filler headers (`x-filler-N`) added to every load request, to
    /// measure what the number of request headers costs.
    #[arg(long, default_value_t = 0)]
    extra_headers: usize,
    /// Only write the tables and chart again from an earlier run's results.json.
    #[arg(long, value_name = "RESULTS_JSON")]
    render: Option<PathBuf>,
}

/// What a listener runs before the router.
#[derive(Debug, Clone)]
enum Kind {
    Plain,
    /// The no-op filter; `calls`: its configuration, the host calls it
    /// makes; `two_stages`: also in the cluster's upstream filters.
    NoopWasm {
        calls: String,
        two_stages: bool,
    },
    Native,
    Lua,
    /// keyswap (or a variant build of it); `listener_only`: on the listener
    /// only, routes matched by `path_prefix` (builds before the two stages);
    /// `job`: the benchmark's job or a variant of it.
    Keyswap {
        wasm: PathBuf,
        listener_only: bool,
        job: Job,
    },
}

/// The keyswap job a listener runs: the benchmark's, or a variant of it
/// (`keyswap_envoy_config::bench`'s `with_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Job {
    /// The credential from the VM environment, no limits.
    Static,
    /// Every client with a rate and a quota never reached.
    Limited,
    /// Route `bench`'s credential fetched per client from the credential
    /// service, cached after the client's first request.
    PerClientFetch,
    /// Route `bench`'s credential exchanged at the STS for the caller's
    /// subject, cached after the subject's first request.
    OnBehalfOf,
}

impl Job {
    /// What the variant changes, for the report.
    fn label(self) -> &'static str {
        match self {
            Job::Static => "",
            Job::Limited => "every client limited (never reached)",
            Job::PerClientFetch => "route credential by per-client fetch, cached",
            Job::OnBehalfOf => "route credential by on-behalf-of exchange, cached",
        }
    }
}

#[derive(Debug, Clone)]
struct Listener {
    name: String,
    kind: Kind,
}

impl Listener {
    fn does_the_job(&self) -> bool {
        matches!(self.kind, Kind::Native | Kind::Lua | Kind::Keyswap { .. })
    }

    /// The cluster its route sends to: a keyswap listener's own, carrying
    /// keyswap's final stage, so the other listeners' requests never meet it.
    fn cluster(&self) -> String {
        match self.kind {
            Kind::Keyswap { listener_only: false, .. } | Kind::NoopWasm { two_stages: true, .. } => {
                format!("responder-{}", self.name)
            }
            _ => "responder".into(),
        }
    }

    fn keyswap_config(&self) -> Option<String> {
        match &self.kind {
            Kind::Keyswap { listener_only: true, .. } => Some(job::config(CLIENTS, Binding::PathPrefix)),
            Kind::Keyswap { job: kind, .. } => {
                let config = job::config(CLIENTS, Binding::Cluster(&self.cluster()));
                Some(match kind {
                    Job::Static => config,
                    Job::Limited => job::with_limits(&config, None),
                    Job::PerClientFetch => job::with_per_client_fetch(&config),
                    Job::OnBehalfOf => job::with_on_behalf_of(&config),
                })
            }
            _ => None,
        }
    }

    fn job(&self) -> Job {
        match self.kind {
            Kind::Keyswap { job, .. } => job,
            _ => Job::Static,
        }
    }

    /// What every load request to this listener carries besides the
    /// request line and `host`: the job's, and the subject's token for an
    /// on-behalf-of listener.
    fn load_headers(&self, extra_headers: usize) -> Vec<(String, String)> {
        let mut headers = job::load_headers(CLIENTS);
        if self.job() == Job::OnBehalfOf {
            headers
                .push((job::SUBJECT_HEADER.into(), format!("{}{}", job::KEY_PREFIX, job::subject(job::LOAD_SUBJECT))));
        }
        for n in 0..extra_headers {
            headers.push((format!("x-filler-{n}"), format!("filler value {n} of the load request")));
        }
        headers
    }

    /// What the upstream must get in `authorization` from a load request.
    fn upstream_authorization(&self) -> String {
        match self.job() {
            Job::Static | Job::Limited => job::upstream_authorization(),
            Job::PerClientFetch => {
                format!("{}{}", job::KEY_PREFIX, job::fetched_credential(&job::client_id(job::load_client(CLIENTS))))
            }
            Job::OnBehalfOf => format!("{}{}", job::KEY_PREFIX, job::exchanged_token(&job::subject(job::LOAD_SUBJECT))),
        }
    }

    /// keyswap's filter: the same object in the listener's chain (first
    /// stage) and in its cluster's (final stage).
    fn keyswap_filter(&self) -> Option<Value> {
        let Kind::Keyswap { wasm, .. } = &self.kind else { return None };
        Some(envoy::wasm_filter(&self.name, wasm, &self.keyswap_config()?, &job::env(), &[]))
    }

    fn filters(&self, noop_wasm: &Path) -> Vec<Value> {
        match &self.kind {
            Kind::Plain => vec![],
            Kind::NoopWasm { calls, .. } => vec![envoy::wasm_filter("noop", noop_wasm, calls, &BTreeMap::new(), &[])],
            Kind::Keyswap { .. } => self.keyswap_filter().into_iter().collect(),
            Kind::Lua => vec![json!({
                "name": "envoy.filters.http.lua",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
                    "default_source_code": {"inline_string": lua_source()},
                },
            })],
            Kind::Native => native_chain(),
        }
    }
}

/// The job in Lua: a table of every key.
fn lua_source() -> String {
    let table: Vec<String> =
        (0..CLIENTS).map(|i| format!("  [\"{}\"] = \"{}\"", job::key(i), job::client_id(i))).collect();
    let strip: Vec<String> = STRIPPED.iter().map(|h| format!("\"{h}\"")).collect();
    format!(
        r#"
local clients = {{
{}
}}
local strip = {{{}}}
local credential = "{}"
function envoy_on_request(handle)
  local headers = handle:headers()
  local auth = headers:get("authorization")
  local client = nil
  if auth ~= nil and auth:sub(1, 7) == "Bearer " then
    client = clients[auth:sub(8)]
  end
  if client == nil then
    handle:respond({{[":status"] = "401", ["content-type"] = "application/json"}}, '{{"error":"invalid_key"}}')
    return
  end
  headers:replace("authorization", credential)
  headers:replace("{CLIENT_HEADER}", client)
  for _, name in ipairs(strip) do
    headers:remove(name)
  end
end
"#,
        table.join(",\n"),
        strip.join(", "),
        job::upstream_authorization(),
    )
}

/// The job in Envoy's own filters.
fn native_chain() -> Vec<Value> {
    let credentials: Vec<Value> =
        (0..CLIENTS).map(|i| json!({"key": job::key(i), "client": job::client_id(i)})).collect();
    let removals: Vec<Value> = STRIPPED.iter().map(|h| json!({"remove": h})).collect();
    vec![
        json!({
            "name": "envoy.filters.http.api_key_auth",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.api_key_auth.v3.ApiKeyAuth",
                "credentials": credentials,
                // api_key_auth removes a leading "Bearer " from a header key itself.
                "key_sources": [{"header": job::KEY_HEADER}],
                "forwarding": {"header": CLIENT_HEADER, "hide_credentials": true},
            },
        }),
        json!({
            "name": "envoy.filters.http.credential_injector",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.credential_injector.v3.CredentialInjector",
                "overwrite": true,
                "credential": {
                    "name": "envoy.http.injected_credentials.generic",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.http.injected_credentials.generic.v3.Generic",
                        "credential": {"name": SECRET},
                        "header": job::KEY_HEADER,
                    },
                },
            },
        }),
        json!({
            "name": "envoy.filters.http.header_mutation",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
                "mutations": {"request_mutations": removals},
            },
        }),
    ]
}

/// The bootstrap: every listener, the responder's cluster, each two-stage
/// keyswap listener's own cluster, the native chain's secret, and the
/// credential service's and the STS's clusters when running.
fn bootstrap(listeners: &[Listener], responder: SocketAddr, noop_wasm: &Path, services: Option<&Services>) -> Value {
    let mut clusters = vec![envoy::cluster("responder", responder, None)];
    if let Some(services) = services {
        clusters.push(envoy::cluster(job::BROKER_CLUSTER, services.broker.addr(), None));
        clusters.push(envoy::cluster(job::STS_CLUSTER, services.sts.addr(), None));
    }
    for l in listeners {
        if let (Kind::Keyswap { listener_only: false, .. }, Some(filter)) = (&l.kind, l.keyswap_filter()) {
            clusters.push(envoy::cluster(&l.cluster(), responder, Some(&filter)));
        }
        if let Kind::NoopWasm { two_stages: true, .. } = &l.kind {
            clusters.push(envoy::cluster(&l.cluster(), responder, l.filters(noop_wasm).first()));
        }
    }
    let envoy_listeners = listeners
        .iter()
        .map(|l| {
            let route = json!({"name": job::ROUTE, "match": {"prefix": "/"}, "route": {"cluster": l.cluster()}});
            envoy::http_listener(&l.name, vec![route], l.filters(noop_wasm))
        })
        .collect();
    let mut bootstrap = envoy::bootstrap(envoy_listeners, clusters);
    bootstrap["static_resources"]["secrets"] = json!([{
        "name": SECRET,
        "generic_secret": {"secret": {"inline_string": job::upstream_authorization()}},
    }]);
    bootstrap
}

// ------------------------------------------------------------------ services

/// The loopback credential service (per-client `fetch`) and STS
/// (`token_exchange`) the dynamic variants call, in this process: each
/// answers `keyswap_envoy_config::bench`'s answer for the client or
/// subject asked, and counts its calls. Only the first request of each
/// client or subject calls; the load is measured on the cache.
struct Services {
    broker: Server,
    sts: Server,
    calls: Arc<AtomicUsize>,
}

impl Services {
    fn start() -> Result<Self, String> {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&calls);
        let broker = Server::start("127.0.0.1:0", move |request: Received| {
            counted.fetch_add(1, Ordering::Relaxed);
            match job::BROKER_PATH.split_once("{client}").and_then(|(p, _)| request.target.strip_prefix(p)) {
                Some(client) => Reply::json(200, job::broker_answer(client)),
                None => Reply::json(404, r#"{"error":"not_found"}"#),
            }
        })
        .map_err(|e| format!("the credential service: {e}"))?;
        let counted = Arc::clone(&calls);
        let sts = Server::start("127.0.0.1:0", move |request: Received| {
            counted.fetch_add(1, Ordering::Relaxed);
            let form = String::from_utf8_lossy(&request.body).into_owned();
            // The bench's subjects are form-safe: no decoding needed.
            match form.split('&').find_map(|pair| pair.strip_prefix("subject_token=")) {
                Some(subject) if request.target == job::STS_PATH => Reply::json(200, job::sts_answer(subject)),
                _ => Reply::json(400, r#"{"error":"invalid_request"}"#),
            }
        })
        .map_err(|e| format!("the STS: {e}"))?;
        Ok(Self { broker, sts, calls })
    }

    /// Calls so far, to both.
    fn calls(&self) -> usize {
        self.calls.load(Ordering::Relaxed)
    }
}

// ------------------------------------------------------------------ checks

fn request(addr: SocketAddr, headers: &[(String, String)]) -> Result<(u16, Vec<u8>), String> {
    let mut request = Request::get("/bench/check").header("host", addr.to_string());
    for (name, value) in headers {
        request = request.header(name, value);
    }
    let response = request.send(addr).map_err(|e| format!("{addr}: {e}"))?;
    Ok((response.status, response.body))
}

/// Proves a listener does what it is measured for; returns a one-line account.
fn verify(l: &Listener, addr: SocketAddr) -> Result<&'static str, String> {
    let load = job::load_client(CLIENTS);
    let (status, body) = request(addr, &l.load_headers(0))?;
    if status != 200 {
        let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
        return Err(format!("{}: the load request got {status}, not 200: {text:?}", l.name));
    }
    let echoed: Value = serde_json::from_slice(&body).map_err(|e| format!("{}: the echo's answer: {e}", l.name))?;
    let mut seen: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for pair in echoed["headers"].as_array().into_iter().flatten() {
        if let (Some(n), Some(v)) = (pair[0].as_str(), pair[1].as_str()) {
            seen.entry(n.to_string()).or_default().push(v.to_string());
        }
    }
    let is = |name: &str, value: String| seen.get(name).is_some_and(|v| *v == [value]);
    if !l.does_the_job() {
        if !is(job::KEY_HEADER, job::bearer(load)) {
            return Err(format!("{}: the floor changed the request", l.name));
        }
        return Ok("200, request proxied unchanged");
    }
    let mut problems = Vec::new();
    if !is(job::KEY_HEADER, l.upstream_authorization()) {
        problems.push("the upstream did not get exactly the injected credential".to_string());
    }
    if seen.contains_key(job::SUBJECT_HEADER) {
        problems.push("the subject token reached the upstream".into());
    }
    if !is(CLIENT_HEADER, job::client_id(load)) {
        problems.push(format!("the upstream did not get {CLIENT_HEADER}: {}", job::client_id(load)));
    }
    for h in STRIPPED {
        if seen.contains_key(h) {
            problems.push(format!("{h} reached the upstream"));
        }
    }
    if String::from_utf8_lossy(&body).contains(&job::key(load)) {
        problems.push("the client's key reached the upstream".into());
    }
    let (bad, _) = request(addr, &[(job::KEY_HEADER.to_string(), "Bearer not-a-key".to_string())])?;
    if bad != 401 {
        problems.push(format!("a wrong key got {bad}, not 401"));
    }
    let (missing, _) = request(addr, &[])?;
    if missing != 401 {
        problems.push(format!("no key got {missing}, not 401"));
    }
    if !problems.is_empty() {
        return Err(format!("{} does not do the job: {}", l.name, problems.join("; ")));
    }
    Ok("200 with the credential injected, client id forwarded, key and 4 headers gone; wrong key 401, no key 401")
}

// ------------------------------------------------------------------ load

/// `1.23ms` and the like in microseconds.
fn micros(value: &str) -> Option<f64> {
    let (number, unit) = value.split_at(value.find(|c: char| c.is_ascii_alphabetic())?);
    let scale = match unit {
        "us" => 1.0,
        "ms" => 1e3,
        "s" => 1e6,
        "m" => 60e6,
        _ => return None,
    };
    Some(number.parse::<f64>().ok()? * scale)
}

/// One wrk run on `l` at `addr`; its figures as JSON (requests, seconds,
/// p50_us, p99_us, non_2xx, socket_errors).
fn run_wrk(
    l: &Listener,
    addr: SocketAddr,
    seconds: u64,
    args: &Args,
) -> Result<serde_json::Map<String, Value>, String> {
    let mut command = Command::new("taskset");
    command.args(["-c", &args.load_cpu, "wrk", "-t1", &format!("-c{}", args.connections)]);
    command.args([format!("-d{seconds}s"), "--latency".into()]);
    for (name, value) in l.load_headers(args.extra_headers) {
        command.args(["-H".to_string(), format!("{name}: {value}")]);
    }
    command.arg(format!("http://{addr}/bench/load"));
    let output = command.output().map_err(|e| format!("wrk: {e}"))?;
    let out = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        return Err(format!("wrk failed ({}):\n{out}{}", output.status, String::from_utf8_lossy(&output.stderr)));
    }
    // `1234 requests in 2.00s, 1.2MB read`
    let totals = out.lines().find_map(|l| {
        let (requests, rest) = l.trim().split_once(" requests in ")?;
        Some((requests.parse::<u64>().ok()?, micros(rest.split(',').next()?)? / 1e6))
    });
    let Some((requests, elapsed)) = totals else { return Err(format!("cannot read wrk's output:\n{out}")) };
    let latency = |p: &str| {
        out.lines().find_map(|l| {
            let mut words = l.split_whitespace();
            (words.next()? == p).then_some(())?;
            let value = words.next()?;
            words.next().is_none().then(|| micros(value)).flatten()
        })
    };
    let after = |prefix: &str| out.lines().find_map(|l| l.trim().strip_prefix(prefix).map(str::trim));
    let mut result = serde_json::Map::new();
    result.insert("requests".into(), json!(requests));
    result.insert("seconds".into(), json!(elapsed));
    result.insert("p50_us".into(), json!(latency("50%")));
    result.insert("p99_us".into(), json!(latency("99%")));
    let non_2xx: u64 = after("Non-2xx or 3xx responses:").and_then(|n| n.parse().ok()).unwrap_or(0);
    result.insert("non_2xx".into(), json!(non_2xx));
    result.insert("socket_errors".into(), json!(after("Socket errors:").unwrap_or("")));
    Ok(result)
}

/// One measured run: wrk's figures and Envoy's CPU time over it.
fn measure(pid: u32, l: &Listener, addr: SocketAddr, seconds: u64, args: &Args) -> Result<Value, String> {
    let before = cpu_ticks(pid)?;
    let mut result = run_wrk(l, addr, seconds, args)?;
    let after = cpu_ticks(pid)?;
    let cpu_s = (after - before) as f64 / ticks_per_second() as f64;
    let requests = result["requests"].as_f64().unwrap_or(0.0);
    let elapsed = result["seconds"].as_f64().unwrap_or(1.0);
    result.insert("envoy_cpu_s".into(), json!(cpu_s));
    result.insert("cpu_us_per_req".into(), json!(cpu_s * 1e6 / requests.max(1.0)));
    result.insert("rps".into(), json!(requests / elapsed));
    Ok(Value::Object(result))
}

// ------------------------------------------------------------------ summary

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// 25th, 50th and 75th percentiles, interpolated between the closest
/// ranks (Python's `statistics.quantiles(method="inclusive")`).
fn quartiles(values: &[f64]) -> [f64; 3] {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    if v.len() < 2 {
        let x = v.first().copied().unwrap_or(f64::NAN);
        return [x, x, x];
    }
    let at = |p: f64| {
        let rank = p * (v.len() - 1) as f64;
        let (low, frac) = (rank.floor() as usize, rank.fract());
        v[low] + (v.get(low + 1).copied().unwrap_or(v[low]) - v[low]) * frac
    };
    [at(0.25), median(&v), at(0.75)]
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

fn summarise(names: &[String], rounds: &[Value]) -> Value {
    let mut listeners = serde_json::Map::new();
    for name in names {
        let of = |field: &str| rounds.iter().map(|r| num(&r[name][field])).collect::<Vec<f64>>();
        let (cpu, rps) = (of("cpu_us_per_req"), of("rps"));
        let [c25, c50, c75] = quartiles(&cpu);
        let [r25, r50, r75] = quartiles(&rps);
        let sum = |field: &str| rounds.iter().map(|r| r[name][field].as_u64().unwrap_or(0)).sum::<u64>();
        listeners.insert(
            name.clone(),
            json!({
                "cpu_us_per_req": {"p25": c25, "median": c50, "p75": c75,
                    "min": cpu.iter().copied().fold(f64::INFINITY, f64::min),
                    "max": cpu.iter().copied().fold(f64::NEG_INFINITY, f64::max)},
                "rps": {"p25": r25, "median": r50, "p75": r75},
                "p50_us": median(&of("p50_us")),
                "p99_us": median(&of("p99_us")),
                "non_2xx": sum("non_2xx"),
                "requests": sum("requests"),
            }),
        );
    }
    let med = |n: &str| num(&listeners[n]["cpu_us_per_req"]["median"]);
    let added: serde_json::Map<String, Value> =
        names.iter().map(|n| (n.clone(), json!(med(n) - med("plain")))).collect();
    let native = num(&added["native"]);
    let ratio = (native > 0.0).then(|| num(&added["keyswap"]) / native);
    let paired: Vec<f64> = rounds
        .iter()
        .filter_map(|r| {
            let cpu = |n: &str| num(&r[n]["cpu_us_per_req"]);
            let native = cpu("native") - cpu("plain");
            (native > 0.0).then(|| (cpu("keyswap") - cpu("plain")) / native)
        })
        .collect();
    let rps = |n: &str| num(&listeners[n]["rps"]["median"]);
    let throughput = rps("keyswap") / rps("plain");
    // Each variant against the keyswap listener, paired within each round
    // (the two measured minutes apart at most, under the same load).
    let mut vs_keyswap = serde_json::Map::new();
    for name in names.iter().filter(|n| !CANONICAL.contains(&n.as_str())) {
        let cpu = |r: &Value, n: &str| num(&r[n]["cpu_us_per_req"]);
        let ratios: Vec<f64> = rounds.iter().map(|r| cpu(r, name) / cpu(r, "keyswap")).collect();
        let differences: Vec<f64> = rounds.iter().map(|r| cpu(r, name) - cpu(r, "keyswap")).collect();
        vs_keyswap.insert(
            name.clone(),
            json!({"ratio": quartiles(&ratios), "difference_us": quartiles(&differences),
                   "ratio_by_round": ratios, "difference_us_by_round": differences}),
        );
    }
    json!({
        "listeners": listeners,
        "added_cpu_us": added,
        "ratio_keyswap_to_native_added": ratio,
        "ratio_paired_by_round": (!paired.is_empty()).then(|| quartiles(&paired)),
        "throughput_keyswap_vs_plain": throughput,
        "paired_vs_keyswap": vs_keyswap,
    })
}

// ------------------------------------------------------------------ outputs

/// What the run was: its listeners in order, and the variants' wasm files.
struct Shape {
    names: Vec<String>,
    variants: BTreeMap<String, String>,
}

/// A horizontal bar chart of median CPU per request with IQR whiskers.
fn svg_chart(summary: &Value, shape: &Shape, title: &str) -> String {
    let rows: Vec<(&str, &Value)> =
        shape.names.iter().map(|n| (n.as_str(), &summary["listeners"][n]["cpu_us_per_req"])).collect();
    let top = rows.iter().map(|(_, r)| num(&r["p75"])).fold(0.0, f64::max) * 1.15;
    let (width, left, right, bar_h, gap, head) = (640.0, 110.0, 90.0, 26.0, 12.0, 46.0);
    let height = head + rows.len() as f64 * (bar_h + gap) + 40.0;
    let scale = (width - left - right) / top;
    let colour = |name: &str| match name {
        "plain" => "#9aa5b1",
        "noop_wasm" => "#b8c2cc",
        "native" => "#3e7cb1",
        "lua" => "#e0a030",
        "keyswap" => "#2f9e44",
        _ => "#8fd19e",
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="13">"#
    );
    let _ = writeln!(out, r#"<rect width="{width}" height="{height}" fill="white"/>"#);
    let _ = writeln!(out, r#"<text x="{left}" y="20" font-size="15" font-weight="bold">{title}</text>"#);
    let _ = writeln!(
        out,
        r##"<text x="{left}" y="38" fill="#555">Envoy CPU µs per request (median; whisker: 25th-75th percentile)</text>"##
    );
    for (i, (name, r)) in rows.iter().enumerate() {
        let y = head + i as f64 * (bar_h + gap);
        let w = num(&r["median"]) * scale;
        let text_y = y + bar_h * 0.7;
        let _ = writeln!(out, r#"<text x="{}" y="{text_y:.1}" text-anchor="end">{name}</text>"#, left - 8.0);
        let _ = writeln!(out, r#"<rect x="{left}" y="{y}" width="{w:.1}" height="{bar_h}" fill="{}"/>"#, colour(name));
        let (x1, x2, ym) = (left + num(&r["p25"]) * scale, left + num(&r["p75"]) * scale, y + bar_h / 2.0);
        let _ = writeln!(
            out,
            r##"<line x1="{x1:.1}" y1="{ym:.1}" x2="{x2:.1}" y2="{ym:.1}" stroke="#222" stroke-width="1.5"/>"##
        );
        for x in [x1, x2] {
            let _ = writeln!(
                out,
                r##"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="#222" stroke-width="1.5"/>"##,
                ym - 6.0,
                ym + 6.0
            );
        }
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{text_y:.1}">{:.1} µs</text>"#,
            x2.max(left + w) + 6.0,
            num(&r["median"])
        );
    }
    let axis_y = head + rows.len() as f64 * (bar_h + gap) + 4.0;
    let _ = writeln!(out, r##"<line x1="{left}" y1="{axis_y}" x2="{}" y2="{axis_y}" stroke="#888"/>"##, width - right);
    let step = if top <= 60.0 {
        5.0
    } else if top <= 120.0 {
        10.0
    } else {
        25.0
    };
    let mut t = 0.0;
    while t <= top {
        let x = left + t * scale;
        let _ = writeln!(out, r##"<line x1="{x:.1}" y1="{axis_y}" x2="{x:.1}" y2="{}" stroke="#888"/>"##, axis_y + 4.0);
        let _ =
            writeln!(out, r##"<text x="{x:.1}" y="{}" text-anchor="middle" fill="#555">{t}</text>"##, axis_y + 18.0);
        t += step;
    }
    out.push_str("</svg>\n");
    out
}

fn markdown(summary: &Value, meta: &Value, shape: &Shape) -> String {
    let what = |n: &str| match n {
        "plain" => "Envoy, router only (floor)".to_string(),
        "noop_wasm" => "no-op proxy-wasm filter (wasm floor)".to_string(),
        "native" => "api_key_auth + credential_injector + header_mutation".to_string(),
        "lua" => "the same job in Lua".to_string(),
        "keyswap" => "keyswap".to_string(),
        other => match shape.variants.get(other) {
            Some(noop) if noop.starts_with("no-op") => noop.clone(),
            wasm => format!("keyswap variant: {}", wasm.map_or("?", String::as_str)),
        },
    };
    let m = &meta["machine"];
    let s = |v: &Value| v.as_str().map_or_else(|| v.to_string(), str::to_string);
    let load: Vec<String> = m["loadavg_at_start"].as_array().into_iter().flatten().map(s).collect();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Run {}: {} rounds × {} listeners × {} s, wrk -t1 -c{} (keep-alive, HTTP/1.1), {CLIENTS} clients; \
         Envoy {} `--concurrency 1` on CPU {}, wrk and the responder on CPU {}. \
         Machine: {} CPUs, {}, Linux {}; load average at start {}.\n",
        s(&m["date_utc"]),
        meta["rounds"],
        shape.names.len(),
        meta["duration_s"],
        meta["connections"],
        s(&m["envoy"]),
        s(&meta["envoy_cpu"]),
        s(&meta["load_cpu"]),
        m["nproc"],
        s(&m["cpu_model"]),
        s(&m["kernel"]),
        load.join(" "),
    );
    out.push_str("| listener | what | CPU µs/request, median | 25th-75th pct | added over plain | req/s, median | p50 latency | p99 latency |\n");
    out.push_str("|---|---|---:|---|---:|---:|---:|---:|\n");
    for n in &shape.names {
        let l = &summary["listeners"][n];
        let c = &l["cpu_us_per_req"];
        let added = if n == "plain" { "-".to_string() } else { format!("{:+.1}", num(&summary["added_cpu_us"][n])) };
        let _ = writeln!(
            out,
            "| {n} | {} | {:.1} | {:.1}-{:.1} | {added} | {:.0} | {:.2} ms | {:.2} ms |",
            what(n),
            num(&c["median"]),
            num(&c["p25"]),
            num(&c["p75"]),
            num(&l["rps"]["median"]),
            num(&l["p50_us"]) / 1000.0,
            num(&l["p99_us"]) / 1000.0,
        );
    }
    let ratio = summary["ratio_keyswap_to_native_added"].as_f64().map_or("-".to_string(), |r| format!("{r:.2}"));
    let paired = match summary["ratio_paired_by_round"].as_array() {
        Some(p) if p.len() == 3 => {
            format!("; per round, paired: median {:.2}, 25th-75th pct {:.2}-{:.2}", num(&p[1]), num(&p[0]), num(&p[2]))
        }
        _ => String::new(),
    };
    let _ = writeln!(
        out,
        "\n- keyswap's added CPU ÷ the native chain's added CPU: **{ratio}** (ratio of the medians){paired}. Target: at most 1.2."
    );
    let _ = writeln!(
        out,
        "- keyswap's throughput ÷ plain Envoy's: **{:.0}%** (medians). Target: at least 90%.",
        num(&summary["throughput_keyswap_vs_plain"]) * 100.0
    );
    let native = num(&summary["added_cpu_us"]["native"]);
    let plain_rps = num(&summary["listeners"]["plain"]["rps"]["median"]);
    for (n, wasm) in &shape.variants {
        if native > 0.0 {
            let added = num(&summary["added_cpu_us"][n]);
            let _ = write!(
                out,
                "- Variant `{n}` ({wasm}): added CPU {added:+.1} µs, {:.2}× the native chain's; throughput {:.0}% of plain",
                added / native,
                num(&summary["listeners"][n]["rps"]["median"]) / plain_rps * 100.0
            );
            let paired = &summary["paired_vs_keyswap"][n];
            if wasm.starts_with("no-op") || paired.is_null() {
                out.push_str(".\n");
            } else {
                let (r, d) = (&paired["ratio"], &paired["difference_us"]);
                let _ = writeln!(
                    out,
                    "; ÷ `keyswap` paired per round: median {:.3} (25th-75th pct {:.3}-{:.3}), difference median {:+.1} µs ({:+.1} to {:+.1}).",
                    num(&r[1]),
                    num(&r[0]),
                    num(&r[2]),
                    num(&d[1]),
                    num(&d[0]),
                    num(&d[2])
                );
            }
        }
    }
    let non_2xx: Vec<String> =
        shape.names.iter().map(|n| format!("{n} {}", summary["listeners"][n]["non_2xx"])).collect();
    let _ = writeln!(out, "- Non-2xx responses during measurement: {}.", non_2xx.join(", "));
    out
}

/// Replaces the text between `<!-- bench:envoy:start -->` and
/// `<!-- bench:envoy:end -->` in `doc` with `block`; `None` when the
/// markers are missing.
fn replace_block(doc: &str, block: &str) -> Option<String> {
    let (start, end) = ("<!-- bench:envoy:start -->", "<!-- bench:envoy:end -->");
    let i = doc.find(start)? + start.len();
    let j = doc[i..].find(end)? + i;
    Some(format!("{}\n{}{}", &doc[..i], block, &doc[j..]))
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

fn write_outputs(run: &Path, results: &Value, shape: &Shape, update_docs: bool) -> Result<(), String> {
    let (meta, summary) = (&results["meta"], &results["summary"]);
    write(&run.join("results.json"), &serde_json::to_string_pretty(results).unwrap_or_default())?;
    let table = markdown(summary, meta, shape);
    let envoy_version = meta["machine"]["envoy"].as_str().unwrap_or("?");
    let chart = svg_chart(summary, shape, &format!("Envoy {envoy_version}, one worker, {CLIENTS} clients"));
    write(&run.join("report.md"), &table)?;
    write(&run.join("cpu-per-request.svg"), &chart)?;
    println!("\n{table}");
    println!("bench: results in .run/bench/ (results.json, report.md, cpu-per-request.svg)");
    if update_docs {
        let docs = envoy::repo_root().join("docs");
        write(&docs.join("performance-cpu.svg"), &chart)?;
        let doc_path = docs.join("performance.md");
        let doc = std::fs::read_to_string(&doc_path).map_err(|e| format!("{}: {e}", doc_path.display()))?;
        let updated = replace_block(&doc, &table).ok_or_else(|| {
            format!(
                "{} has no <!-- bench:envoy:start --> … <!-- bench:envoy:end --> block to update",
                doc_path.display()
            )
        })?;
        write(&doc_path, &updated)?;
        println!("bench: docs/performance.md and docs/performance-cpu.svg updated");
    }
    Ok(())
}

// ------------------------------------------------------------------ machine

/// `1.40.0` out of `envoy --version`'s `version: <sha>/1.40.0/Clean/...`.
fn envoy_release(text: &str) -> String {
    let version = text.split_once("version: ").map_or(text, |(_, v)| v).split_whitespace().next().unwrap_or(text);
    let release = version.split('/').find(|part| {
        let numbers: Vec<&str> = part.split('.').collect();
        numbers.len() == 3 && numbers.iter().all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    });
    release.unwrap_or(version).trim().to_string()
}

fn command_text(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
        .unwrap_or_default()
}

fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, m)| m.trim().to_string()))
        .unwrap_or_else(|| "unknown".into());
    let nproc = cpuinfo.lines().filter(|l| l.starts_with("processor")).count();
    let envoy_version =
        envoy::envoy_binary().map(|e| command_text(&e.display().to_string(), &["--version"])).unwrap_or_default();
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    json!({
        "nproc": nproc,
        "cpu_model": model,
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "envoy": envoy_release(&envoy_version),
        "wrk": command_text("wrk", &["--version"]).lines().next().unwrap_or("").trim(),
        "date_utc": command_text("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).trim(),
        "loadavg_at_start": loadavg.split_whitespace().take(3).collect::<Vec<_>>(),
    })
}

// ------------------------------------------------------------------ main

const CANONICAL: [&str; 5] = ["plain", "noop_wasm", "native", "lua", "keyswap"];

fn render(path: &Path, update_docs: bool) -> Result<(), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut results: Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let envoy = results["meta"]["machine"]["envoy"].as_str().map(envoy_release);
    if let Some(envoy) = envoy {
        results["meta"]["machine"]["envoy"] = json!(envoy);
    }
    let in_summary: Vec<String> =
        results["summary"]["listeners"].as_object().map(|m| m.keys().cloned().collect()).unwrap_or_default();
    let names: Vec<String> = match results["meta"]["listeners"].as_array() {
        Some(names) => names.iter().filter_map(|n| n.as_str().map(str::to_string)).collect(),
        None => CANONICAL
            .iter()
            .map(|n| (*n).to_string())
            .chain(in_summary.iter().filter(|n| !CANONICAL.contains(&n.as_str())).cloned())
            .collect(),
    };
    let variants = names
        .iter()
        .filter(|n| !CANONICAL.contains(&n.as_str()))
        .map(|n| {
            let wasm = results["meta"]["variants"][n].as_str().map_or_else(|| format!("{n}.wasm"), str::to_string);
            (n.clone(), wasm)
        })
        .collect();
    let run = envoy::repo_root().join(".run/bench");
    std::fs::create_dir_all(&run).map_err(|e| format!("{}: {e}", run.display()))?;
    write_outputs(&run, &results, &Shape { names, variants }, update_docs)
}

/// Whether `name` can name one more listener: lower-case, not taken.
fn new_name(listeners: &[Listener], name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !listeners.iter().any(|l| l.name == name)
}

fn listeners(args: &Args, keyswap_wasm: &Path) -> Result<Vec<Listener>, String> {
    let mut listeners: Vec<Listener> = [
        ("plain", Kind::Plain),
        ("noop_wasm", Kind::NoopWasm { calls: String::new(), two_stages: false }),
        ("native", Kind::Native),
        ("lua", Kind::Lua),
        ("keyswap", Kind::Keyswap { wasm: keyswap_wasm.to_path_buf(), listener_only: false, job: Job::Static }),
    ]
    .into_iter()
    .map(|(name, kind)| Listener { name: name.into(), kind })
    .collect();
    let given = (args.variant.iter().map(|v| (v, false, Job::Static)))
        .chain(args.variant_listener_only.iter().map(|v| (v, true, Job::Static)))
        .chain(args.variant_limited.iter().map(|v| (v, false, Job::Limited)))
        .chain(args.variant_per_client_fetch.iter().map(|v| (v, false, Job::PerClientFetch)))
        .chain(args.variant_on_behalf_of.iter().map(|v| (v, false, Job::OnBehalfOf)));
    for (v, listener_only, job) in given {
        let (name, wasm) = v.split_once('=').unwrap_or((v, ""));
        if !new_name(&listeners, name) || wasm.is_empty() {
            return Err(format!("--variant {v}: expected NAME=WASM with a new lower-case NAME"));
        }
        let wasm = std::fs::canonicalize(wasm).map_err(|e| format!("--variant {v}: {wasm}: {e}"))?;
        listeners.push(Listener { name: name.into(), kind: Kind::Keyswap { wasm, listener_only, job } });
    }
    let noops =
        args.noop_variant.iter().map(|v| (v, false)).chain(args.noop_variant_two_stages.iter().map(|v| (v, true)));
    for (v, two_stages) in noops {
        let (name, calls) = v.split_once('=').unwrap_or((v, ""));
        if !new_name(&listeners, name) {
            return Err(format!("--noop-variant {v}: expected NAME=CALLS with a new lower-case NAME"));
        }
        listeners.push(Listener { name: name.into(), kind: Kind::NoopWasm { calls: calls.into(), two_stages } });
    }
    Ok(listeners)
}

fn absolute(path: Option<&PathBuf>, flag: &str) -> Result<PathBuf, String> {
    let path = path.ok_or_else(|| "--noop-wasm, --keyswap-wasm and --responder are required to run".to_string())?;
    std::fs::canonicalize(path).map_err(|e| format!("{flag} {}: {e}", path.display()))
}

fn run(args: &Args) -> Result<(), String> {
    if let Some(path) = &args.render {
        return render(path, args.update_docs);
    }
    let noop_wasm = absolute(args.noop_wasm.as_ref(), "--noop-wasm")?;
    let keyswap_wasm = absolute(args.keyswap_wasm.as_ref(), "--keyswap-wasm")?;
    let responder_bin = absolute(args.responder.as_ref(), "--responder")?;
    let listeners = listeners(args, &keyswap_wasm)?;
    let run = envoy::repo_root().join(".run/bench");
    std::fs::create_dir_all(&run).map_err(|e| format!("{}: {e}", run.display()))?;

    let responder = Responder::start(&responder_bin, Some(&args.load_cpu), &run.join("responder.log"))?;
    let dynamic = listeners.iter().any(|l| matches!(l.job(), Job::PerClientFetch | Job::OnBehalfOf));
    let services = if dynamic { Some(Services::start()?) } else { None };
    let config = bootstrap(&listeners, responder.addr(), &noop_wasm, services.as_ref());
    let config_path = run.join("envoy.json");
    write(&config_path, &serde_json::to_string_pretty(&config).unwrap_or_default())?;
    envoy::validate(&config_path, &[], &run)?;
    // keyswap's `configuration loaded` line (wasm, info) proves the filter
    // loaded the job; everything else at warn, as measured.
    let launch = Launch {
        file_name: "envoy.json".into(),
        text: config.to_string(),
        expect_configs: listeners.iter().filter(|l| l.name == "keyswap").filter_map(Listener::keyswap_config).collect(),
        ..Launch::default()
    };
    let log = LogLevels { level: "warn".into(), components: Some("wasm:info".into()) };
    let envoy = Envoy::start_with(&launch, &log, 1)?;
    let measured = (|| {
        pin(envoy.pid(), &args.envoy_cpu)?;
        println!(
            "bench: Envoy pid {} on CPU {}; wrk and responder on CPU {}",
            envoy.pid(),
            args.envoy_cpu,
            args.load_cpu
        );
        let addrs: Vec<SocketAddr> = listeners.iter().map(|l| envoy.listener(&l.name)).collect::<Result<_, _>>()?;
        for (l, addr) in listeners.iter().zip(&addrs) {
            println!("bench: check {:9} {}", l.name, verify(l, *addr)?);
        }
        for (l, addr) in listeners.iter().zip(&addrs) {
            run_wrk(l, *addr, args.warmup, args)?;
        }
        // Every client and subject the load uses has been served once: no
        // call from here on, or the measurement was not of the cache.
        let calls_before = services.as_ref().map(Services::calls);
        let mut rounds = Vec::new();
        let n = listeners.len();
        for r in 0..args.rounds {
            let mut results = serde_json::Map::new();
            for i in (0..n).map(|i| (i + r % n) % n) {
                let measured = measure(envoy.pid(), &listeners[i], addrs[i], args.duration, args)?;
                results.insert(listeners[i].name.clone(), measured);
            }
            let line: Vec<String> = listeners
                .iter()
                .map(|l| {
                    let x = &results[&l.name];
                    format!("{} {:.1}µs {:.0}/s", l.name, num(&x["cpu_us_per_req"]), num(&x["rps"]))
                })
                .collect();
            println!("bench: round {}/{}: {}", r + 1, args.rounds, line.join("  "));
            rounds.push(Value::Object(results));
        }
        let calls_after = services.as_ref().map(Services::calls);
        if calls_before != calls_after {
            return Err(format!(
                "the credential service and STS were called during the load ({calls_before:?} calls before the \
                 rounds, {calls_after:?} after): the cached path was not what was measured"
            ));
        }
        if let Some(calls) = calls_after {
            println!("bench: credential service and STS: {calls} calls, none during the rounds");
        }
        for (l, addr) in listeners.iter().zip(&addrs) {
            if l.does_the_job() {
                verify(l, *addr)?;
            }
        }
        Ok::<_, String>(rounds)
    })();
    let _ = std::fs::copy(envoy.log_path(), run.join("envoy.log"));
    drop(envoy);
    drop(responder);
    drop(services);
    let rounds = measured?;

    let names: Vec<String> = listeners.iter().map(|l| l.name.clone()).collect();
    let variants: BTreeMap<String, String> = listeners
        .iter()
        .filter(|l| !CANONICAL.contains(&l.name.as_str()))
        .filter_map(|l| match &l.kind {
            Kind::Keyswap { wasm, job, .. } => {
                let file = wasm.file_name()?.to_string_lossy().into_owned();
                let label = match job.label() {
                    "" => file,
                    label => format!("{file}, {label}"),
                };
                Some((l.name.clone(), label))
            }
            Kind::NoopWasm { calls, two_stages } => {
                let stages = if *two_stages { ", in both stages" } else { "" };
                Some((l.name.clone(), format!("no-op calling [{calls}]{stages}")))
            }
            _ => None,
        })
        .collect();
    let meta = json!({
        "machine": machine(),
        "rounds": args.rounds,
        "duration_s": args.duration,
        "connections": args.connections,
        "envoy_cpu": args.envoy_cpu,
        "load_cpu": args.load_cpu,
        "listeners": names,
        "variants": variants,
    });
    let summary = summarise(&names, &rounds);
    let results = json!({"meta": meta, "summary": summary, "rounds": rounds});
    write_outputs(&run, &results, &Shape { names, variants }, args.update_docs)
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("bench: {message}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quartiles_interpolate_like_pythons_inclusive_method() {
        assert_eq!(quartiles(&[1.0, 2.0, 3.0, 4.0]), [1.75, 2.5, 3.25]);
        assert_eq!(quartiles(&[5.0]), [5.0, 5.0, 5.0]);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
    }

    #[test]
    fn wrk_figures_and_envoy_release_are_read() {
        assert_eq!(micros("1.50ms"), Some(1500.0));
        assert_eq!(micros("2.00s"), Some(2e6));
        assert_eq!(envoy_release("envoy  version: 9e55/1.40.0/Clean/RELEASE/BoringSSL"), "1.40.0");
        assert_eq!(
            replace_block("a<!-- bench:envoy:start -->old<!-- bench:envoy:end -->b", "new\n").unwrap(),
            "a<!-- bench:envoy:start -->\nnew\n<!-- bench:envoy:end -->b"
        );
    }
}
