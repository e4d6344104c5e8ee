//! The in-harness micro-benchmark behind `keyswap bench`: what the filter
//! module costs per request (the allowed request, the allowed request of a
//! limited client, the cached per-client-fetch and on-behalf-of paths, and
//! each denial) and how many host calls it makes, with 10, 1,000 and 100,000 clients; how long a
//! configuration takes to load and how much VM memory it leaves; and the
//! module's size.
//!
//! ```text
//! config(n) ─▶ FilterModule::start + configure (timed, memory read)
//!           └▶ cases(n): one request per case, checked, then timed in batches
//! dynamic_cases(n) ─▶ configure, prime (the first request waits; its call
//!           is answered), then timed like a case: the cached path
//! noop module ─▶ the same allowed request: the harness's own cost (the floor)
//! BenchReport ─▶ markdown tables (docs/performance.md)
//! ```
//!
//! The times are the benchmark thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`),
//! so other work on a shared machine is not counted; they are wasmtime's
//! (cranelift), not V8's, and include the harness's side of every host
//! call. The no-op module's time is that floor, and "filter" columns
//! subtract it. This is a benchmark, not a test: nothing here fails on a
//! slow machine.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use keyswap_envoy_config::bench::{self as job, STRIPPED};
pub use keyswap_envoy_config::bench::{key, CREDENTIAL_ENV};

use crate::{FilterInstance, FilterModule, Handled, HarnessError, HeaderList};

/// The client counts measured.
pub const SIZES: [usize; 3] = [10, 1_000, 100_000];

/// The benchmark's configuration with `clients` clients (at least 3): the
/// Envoy benchmark's job (`keyswap_envoy_config::bench`), with client 0
/// expired and client 1 allowed only route `other`, so that every denial
/// can be provoked. Each route is bound to Envoy's route and cluster of its
/// name ([`BenchRequest::route`]).
pub fn config(clients: usize) -> Vec<u8> {
    job::config(clients, job::Binding::Cluster(job::ROUTE)).into_bytes()
}

/// [`config`] with client [`LIMITED_CLIENT`] given a rate and a quota no
/// run reaches: the configuration of the `allowed, limited` case (what
/// counting a request costs, next to the same request unlimited).
pub fn limited_config(clients: usize) -> Vec<u8> {
    job::with_limits(&job::config(clients, job::Binding::Cluster(job::ROUTE)), Some(LIMITED_CLIENT)).into_bytes()
}

/// The client with limits in [`limited_config`]: a rate and a quota, both
/// counted on every request (two buckets), never reached.
pub const LIMITED_CLIENT: usize = 2;

/// The `allowed, limited` case: [`LIMITED_CLIENT`]'s allowed request.
pub fn limited_case() -> BenchRequest {
    let headers = request("/bench/load", Some(&job::bearer(LIMITED_CLIENT)));
    BenchRequest {
        name: "allowed, limited",
        route: Some(job::ROUTE),
        headers,
        status: None,
        credential: static_credential(),
    }
}

/// A row whose credential comes from a call (issue 16): the job's
/// configuration with route `bench`'s credential fetched, the allowed
/// request, and the answer its first request waits for. The row times the
/// request after that: the cached path.
#[derive(Debug, Clone)]
pub struct DynamicCase {
    pub config: Vec<u8>,
    pub case: BenchRequest,
    /// The cluster the first request's call goes to, and its answer (JSON).
    pub cluster: &'static str,
    pub answer: String,
}

/// The cached dynamic rows for `clients` clients: route `bench`'s
/// credential fetched per client (`{client}` in the path: the broker), and
/// exchanged on behalf of the caller's subject (`token_exchange`, the
/// subject in [`job::SUBJECT_HEADER`]); the same client's request as the
/// `allowed` row, the subject's header added for the second.
pub fn dynamic_cases(clients: usize) -> Vec<DynamicCase> {
    let base = job::config(clients, job::Binding::Cluster(job::ROUTE));
    let mid = job::load_client(clients);
    let client = job::client_id(mid);
    let subject = job::subject(job::LOAD_SUBJECT);
    let mut obo_headers = request("/bench/load", Some(&job::bearer(mid)));
    obo_headers.push((job::SUBJECT_HEADER.to_string(), format!("{}{subject}", job::KEY_PREFIX).into_bytes()));
    vec![
        DynamicCase {
            config: job::with_per_client_fetch(&base).into_bytes(),
            case: BenchRequest {
                name: "allowed, per-client fetch, cached",
                route: Some(job::ROUTE),
                headers: request("/bench/load", Some(&job::bearer(mid))),
                status: None,
                credential: format!("{}{}", job::KEY_PREFIX, job::fetched_credential(&client)),
            },
            cluster: job::BROKER_CLUSTER,
            answer: job::broker_answer(&client),
        },
        DynamicCase {
            config: job::with_on_behalf_of(&base).into_bytes(),
            case: BenchRequest {
                name: "allowed, on-behalf-of, cached",
                route: Some(job::ROUTE),
                headers: obo_headers,
                status: None,
                credential: format!("{}{}", job::KEY_PREFIX, job::exchanged_token(&subject)),
            },
            cluster: job::STS_CLUSTER,
            answer: job::sts_answer(&subject),
        },
    ]
}

/// What `authorization` carries upstream on the static route.
fn static_credential() -> String {
    job::upstream_authorization()
}

/// The VM environment the configuration needs.
pub fn env() -> BTreeMap<String, String> {
    job::env()
}

/// One kind of request, and what the filter must answer to it.
#[derive(Debug, Clone)]
pub struct BenchRequest {
    pub name: &'static str,
    /// Envoy's route name, and the cluster of the same name the request
    /// goes to; `None`: the catch-all route, whose cluster no route binds.
    pub route: Option<&'static str>,
    pub headers: HeaderList,
    /// `None`: forwarded; `Some(status)`: answered locally.
    pub status: Option<u32>,
    /// What `authorization` must carry upstream when forwarded.
    pub credential: String,
}

/// A request as Envoy hands it to the filter after wrk sent it: the
/// pseudo-headers, the four headers to strip, Envoy's own two, and
/// `authorization` when given.
fn request(path: &str, authorization: Option<&str>) -> HeaderList {
    let mut headers: Vec<(&str, &str)> =
        vec![(":authority", "127.0.0.1:19104"), (":path", path), (":method", "GET"), (":scheme", "http")];
    if let Some(value) = authorization {
        headers.push((job::KEY_HEADER, value));
    }
    headers.extend(job::stripped_headers());
    headers.extend([("x-forwarded-proto", "http"), ("x-request-id", "5d2f7a0c-5a43-4b3a-9f2e-1f8a2b9c0d11")]);
    headers.into_iter().map(|(n, v)| (n.to_string(), v.as_bytes().to_vec())).collect()
}

/// The allowed request and one request per denial, for `clients` clients.
pub fn cases(clients: usize) -> Vec<BenchRequest> {
    let bearer = job::bearer;
    let mid = job::load_client(clients);
    let bench = Some(job::ROUTE);
    vec![
        BenchRequest {
            name: "allowed",
            route: bench,
            headers: request("/bench/load", Some(&bearer(mid))),
            status: None,
            credential: static_credential(),
        },
        BenchRequest {
            name: "missing_key",
            route: bench,
            headers: request("/bench/load", None),
            status: Some(401),
            credential: static_credential(),
        },
        BenchRequest {
            name: "invalid_key",
            route: bench,
            headers: request("/bench/load", Some("Bearer not-a-key")),
            status: Some(401),
            credential: static_credential(),
        },
        BenchRequest {
            name: "expired_key",
            route: bench,
            headers: request("/bench/load", Some(&bearer(job::EXPIRED_CLIENT))),
            status: Some(401),
            credential: static_credential(),
        },
        BenchRequest {
            name: "ambiguous_key",
            route: bench,
            headers: request("/bench/load", Some(&format!("{}, {}", bearer(mid), bearer(2)))),
            status: Some(401),
            credential: static_credential(),
        },
        BenchRequest {
            name: "route_forbidden",
            route: bench,
            headers: request("/bench/load", Some(&bearer(job::OTHER_ROUTE_CLIENT))),
            status: Some(403),
            credential: static_credential(),
        },
        BenchRequest {
            name: "no_route",
            route: None,
            headers: request("/nothing", Some(&bearer(mid))),
            status: Some(404),
            credential: static_credential(),
        },
    ]
}

/// What one case cost.
#[derive(Debug, Clone)]
pub struct CaseResult {
    pub name: &'static str,
    /// Median over batches, per request, through the harness.
    pub per_request: Duration,
    /// Every host call of one request's stream, WASI included.
    pub host_calls: u64,
    /// The `proxy_*` calls by name.
    pub calls_by_name: BTreeMap<String, u64>,
}

/// Configuration load for one size.
#[derive(Debug, Clone)]
pub struct LoadResult {
    pub clients: usize,
    pub config_bytes: usize,
    /// Instantiation, `_initialize`, `proxy_on_vm_start` (median).
    pub vm_start: Duration,
    /// `proxy_on_configure` (median).
    pub configure: Duration,
    /// The VM's linear memory after starting, and after configuring.
    pub memory_started: usize,
    pub memory_configured: usize,
}

/// Everything one run measured.
#[derive(Debug, Clone)]
pub struct BenchReport {
    pub wasm_bytes: usize,
    pub loads: Vec<LoadResult>,
    /// Per size, the cases in [`cases`] order.
    pub requests: Vec<(usize, Vec<CaseResult>)>,
    /// The no-op module's allowed request: the harness's own cost.
    pub floor: Option<CaseResult>,
    pub iterations: usize,
}

/// CPU time this thread has used.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(u64::try_from(ts.tv_sec).unwrap_or(0), u32::try_from(ts.tv_nsec).unwrap_or(0))
}

/// Times `f` in this thread's CPU time.
struct Stopwatch(Duration);

impl Stopwatch {
    fn start() -> Self {
        Self(thread_cpu())
    }
    fn elapsed(&self) -> Duration {
        thread_cpu().saturating_sub(self.0)
    }
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values.get(values.len() / 2).copied().unwrap_or_default()
}

/// Checks that `outcome` is what `case` expects, so a misconfigured run
/// cannot time the wrong path.
fn check(case: &BenchRequest, outcome: &Handled, filter: bool) -> Result<(), HarnessError> {
    let wrong = |what: String| Err(HarnessError::Abi(format!("bench case {}: {what}", case.name)));
    match (outcome, case.status) {
        (Handled::Forwarded { headers }, None) => {
            if !filter {
                return Ok(());
            }
            let get = |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_slice());
            if get(job::KEY_HEADER) != Some(case.credential.as_bytes()) {
                return wrong("the upstream would not get the injected credential".into());
            }
            if get(job::CLIENT_HEADER).is_none()
                || STRIPPED.iter().chain([&job::SUBJECT_HEADER]).any(|h| get(h).is_some())
            {
                return wrong("the client id is missing or a stripped header (or the subject) remains".into());
            }
            Ok(())
        }
        (Handled::Local(response), Some(status)) if response.status == status => Ok(()),
        (Handled::Local(response), _) => wrong(format!("answered {}", response.status)),
        (other, _) => wrong(format!("unexpected outcome {other:?}")),
    }
}

/// Times `case` through `instance`: one checked request, a warm-up, then
/// `batches` batches of `iterations` requests; the median batch's mean.
fn time_case(
    instance: &mut FilterInstance,
    case: &BenchRequest,
    iterations: usize,
    filter: bool,
) -> Result<CaseResult, HarnessError> {
    let outcome = instance.request(case.route, &case.headers)?;
    check(case, &outcome, filter)?;
    instance.finish()?;
    let calls = instance.last_request_host_calls().cloned().unwrap_or_default();
    for _ in 0..iterations / 10 {
        instance.request(case.route, &case.headers)?;
    }
    let mut batches = Vec::new();
    for _ in 0..5 {
        let started = Stopwatch::start();
        for _ in 0..iterations {
            instance.request(case.route, &case.headers)?;
        }
        instance.finish()?;
        batches.push(started.elapsed() / u32::try_from(iterations.max(1)).unwrap_or(u32::MAX));
    }
    // The audit log of denials is rate-limited, but keep the harness's copy small.
    instance.take_log();
    Ok(CaseResult {
        name: case.name,
        per_request: median(batches),
        host_calls: calls.total(),
        calls_by_name: calls.by_name().clone(),
    })
}

/// Sends `dynamic`'s request once on a fresh `instance`: it must wait for
/// one call to its cluster, which is answered with its answer; the request
/// must then go on, checked like any allowed one. The cache is then warm.
fn prime(instance: &mut FilterInstance, dynamic: &DynamicCase) -> Result<(), HarnessError> {
    let case = &dynamic.case;
    let wrong = |what: String| Err(HarnessError::Abi(format!("bench case {}: {what}", case.name)));
    let first = instance.request(case.route, &case.headers)?;
    if !matches!(first, Handled::Paused { .. }) {
        return wrong(format!("the first request did not wait for its call: {first:?}"));
    }
    if instance.pending_calls().is_empty() {
        instance.tick()?;
    }
    let Some(call) = instance.pending_calls().iter().find(|c| c.cluster == dynamic.cluster).map(|c| c.token) else {
        return wrong(format!("no call to `{}` is pending", dynamic.cluster));
    };
    let headers =
        vec![(":status".to_string(), b"200".to_vec()), ("content-type".to_string(), b"application/json".to_vec())];
    instance.answer_call(call, Some((headers, dynamic.answer.clone().into_bytes())))?;
    match instance.held_outcome()? {
        Some(outcome) => check(case, &outcome, true)?,
        None => return wrong("the first request was not let go once its call was answered".into()),
    }
    instance.finish()?;
    no_call_pending(instance, case)
}

/// Fails when a call is pending: the timed path must be the cached one.
fn no_call_pending(instance: &FilterInstance, case: &BenchRequest) -> Result<(), HarnessError> {
    match instance.pending_calls().len() {
        0 => Ok(()),
        n => Err(HarnessError::Abi(format!("bench case {}: {n} calls pending, the path is not cached", case.name))),
    }
}

/// Loads `clients` clients `reps` times; the medians and the memory.
fn time_load(module: &FilterModule, clients: usize, reps: usize) -> Result<(LoadResult, FilterInstance), HarnessError> {
    let config = config(clients);
    let env = env();
    let (mut starts, mut configures) = (Vec::new(), Vec::new());
    let mut last = None;
    for _ in 0..reps.max(1) {
        let started = Stopwatch::start();
        let mut instance = module.start(&env)?;
        starts.push(started.elapsed());
        let memory_started = instance.memory_bytes();
        let started = Stopwatch::start();
        instance.configure(&config)?;
        configures.push(started.elapsed());
        last = Some((memory_started, instance));
    }
    let Some((memory_started, instance)) = last else {
        return Err(HarnessError::Abi("no load ran".into()));
    };
    let result = LoadResult {
        clients,
        config_bytes: config.len(),
        vm_start: median(starts),
        configure: median(configures),
        memory_started,
        memory_configured: instance.memory_bytes(),
    };
    Ok((result, instance))
}

/// Runs the whole benchmark.
///
/// # Errors
/// A configuration refused, a trap, or a case answered otherwise than
/// expected.
pub fn run(
    module: &FilterModule,
    wasm_bytes: usize,
    noop: Option<&FilterModule>,
    sizes: &[usize],
    iterations: usize,
    progress: &dyn Fn(&str),
) -> Result<BenchReport, HarnessError> {
    let mut report = BenchReport { wasm_bytes, loads: Vec::new(), requests: Vec::new(), floor: None, iterations };
    if let Some(noop) = noop {
        let mut instance = noop.configure(b"", &BTreeMap::new())?;
        let allowed = cases(10).into_iter().next().ok_or_else(|| HarnessError::Abi("no cases".into()))?;
        report.floor = Some(time_case(&mut instance, &allowed, iterations, false)?);
        progress("no-op module: done");
    }
    for &clients in sizes {
        let reps = if clients >= 100_000 { 3 } else { 5 };
        let (load, mut instance) = time_load(module, clients, reps)?;
        progress(&format!(
            "{clients} clients: configured in {:.1} ms, {:.1} MiB",
            ms(load.configure),
            mib(load.memory_configured)
        ));
        report.loads.push(load);
        let mut results = Vec::new();
        for case in cases(clients) {
            results.push(time_case(&mut instance, &case, iterations, true)?);
        }
        drop(instance);
        // A module built before limits refuses them: no such row then.
        let mut at = 1;
        match module.configure(&limited_config(clients), &env()) {
            Ok(mut limited) => {
                results.insert(at, time_case(&mut limited, &limited_case(), iterations, true)?);
                at += 1;
            }
            Err(err) => progress(&format!("{clients} clients: no `allowed, limited` row: {err}")),
        }
        // The cached per-client and on-behalf-of paths, after the allowed
        // rows (a module built before them refuses them: no row then).
        for dynamic in dynamic_cases(clients) {
            match module.configure(&dynamic.config, &env()) {
                Ok(mut instance) => {
                    prime(&mut instance, &dynamic)?;
                    let timed = time_case(&mut instance, &dynamic.case, iterations, true)?;
                    no_call_pending(&instance, &dynamic.case)?;
                    results.insert(at, timed);
                    at += 1;
                }
                Err(err) => progress(&format!("{clients} clients: no `{}` row: {err}", dynamic.case.name)),
            }
        }
        report.requests.push((clients, results));
    }
    Ok(report)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// The report as markdown tables.
pub fn markdown(report: &BenchReport, machine: &str) -> String {
    let mut out = String::new();
    let sizes: Vec<usize> = report.requests.iter().map(|(n, _)| *n).collect();
    let _ = writeln!(out, "{machine}\n");
    let _ = writeln!(
        out,
        "Per request, through the harness (wasmtime, cranelift; thread CPU time): median of 5 batches of {} requests after a warm-up. \
         \"filter\" subtracts the no-op module's time for the same request (the harness's own cost{}).\n",
        report.iterations,
        report.floor.as_ref().map_or(String::new(), |f| format!(": {:.2} µs", us(f.per_request)))
    );
    let mut head = String::from("| request | host calls |");
    let mut rule = String::from("|---|---:|");
    for n in &sizes {
        let _ = write!(head, " {} clients: total µs | filter µs |", thousands(*n));
        rule.push_str("---:|---:|");
    }
    let _ = writeln!(out, "{head}\n{rule}");
    let floor = report.floor.as_ref().map(|f| f.per_request);
    let names: Vec<&'static str> =
        report.requests.first().map(|(_, r)| r.iter().map(|c| c.name).collect()).unwrap_or_default();
    for (i, name) in names.iter().enumerate() {
        let calls = report.requests.first().and_then(|(_, r)| r.get(i)).map_or(0, |c| c.host_calls);
        let _ = write!(out, "| {name} | {calls} |");
        for (_, results) in &report.requests {
            match results.get(i) {
                Some(c) => {
                    let net = floor.map_or("-".to_string(), |f| format!("{:.2}", us(c.per_request.saturating_sub(f))));
                    let _ = write!(out, " {:.2} | {net} |", us(c.per_request));
                }
                None => out.push_str(" - | - |"),
            }
        }
        out.push('\n');
    }
    if let Some(f) = &report.floor {
        let _ = write!(out, "| no-op module, same request | {} |", f.host_calls);
        for _ in &sizes {
            let _ = write!(out, " {:.2} | - |", us(f.per_request));
        }
        out.push('\n');
    }
    let allowed = report.requests.first().into_iter().flat_map(|(_, r)| r).filter(|c| c.name.starts_with("allowed"));
    for case in allowed {
        let calls: Vec<String> = case.calls_by_name.iter().map(|(n, c)| format!("`{n}` ×{c}")).collect();
        let what = if case.name == "allowed" { "an allowed request".to_string() } else { format!("`{}`", case.name) };
        let _ = writeln!(out, "\nHost calls of {what}: {} ({} in all).", calls.join(", "), case.host_calls);
    }
    let _ = writeln!(
        out,
        "\n| clients | configuration JSON | VM start | configure (`proxy_on_configure`) | VM memory after start | VM memory configured |\n|---:|---:|---:|---:|---:|---:|"
    );
    for l in &report.loads {
        let _ = writeln!(
            out,
            "| {} | {:.2} MiB | {:.1} ms | {:.1} ms | {:.1} MiB | {:.1} MiB |",
            thousands(l.clients),
            mib(l.config_bytes),
            ms(l.vm_start),
            ms(l.configure),
            mib(l.memory_started),
            mib(l.memory_configured)
        );
    }
    let _ = writeln!(
        out,
        "\nRelease `keyswap_filter.wasm`: {} bytes ({:.0} KiB).",
        thousands(report.wasm_bytes),
        report.wasm_bytes as f64 / 1024.0
    );
    out
}

fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// Replaces the text between `<!-- bench:harness:start -->` and
/// `<!-- bench:harness:end -->` in `doc` with `block`; `None` when the
/// markers are missing.
pub fn replace_block(doc: &str, block: &str) -> Option<String> {
    let (start, end) = ("<!-- bench:harness:start -->", "<!-- bench:harness:end -->");
    let i = doc.find(start)? + start.len();
    let j = doc[i..].find(end)? + i;
    Some(format!("{}\n{}{}", &doc[..i], block, &doc[j..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configuration_is_valid_json_with_every_client() {
        let json: serde_json::Value = serde_json::from_slice(&config(10)).unwrap();
        assert_eq!(json["clients"].as_array().unwrap().len(), 10);
        assert_eq!(thousands(100_000), "100,000");
        assert_eq!(
            replace_block("a<!-- bench:harness:start -->old<!-- bench:harness:end -->b", "new\n").unwrap(),
            "a<!-- bench:harness:start -->\nnew\n<!-- bench:harness:end -->b"
        );
    }
}
