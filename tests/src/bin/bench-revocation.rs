//! `bench-revocation`: how fast a pushed revocation is enforced on every
//! worker, for configurations of 2 to 1,000,000 clients, with the ECDS file
//! in JSON and in binary protobuf side by side; and what a push does to the
//! latency of concurrent requests. Not a test: it prints figures
//! (`scripts/bench-revocation` runs it).
//!
//! For each `--clients N`, two Envoys run at once (`--concurrency 2`, V8),
//! one fed by a JSON ECDS file (`keyswap.json`), one by a binary one
//! (`keyswap.pb`), each with an echo upstream, all on loopback. The rounds
//! alternate between them (JSON, then binary, then JSON…), so both see the
//! same machine load: paired rounds. On each, while K2 runs steady
//! keep-alive load (2 connections, a request every ~2 ms each) and K1 is
//! sent on fresh connections back to back (so both workers see it), a round
//! pushes K1 back in (waits until both workers loaded it), then pushes its
//! revocation and measures from the rename:
//!
//! - `version`: Envoy's ECDS stats show the new version (`version_text`,
//!   polled every 5 ms): the main thread parsed the file and built the
//!   filter (keyswap configured once there);
//! - `reload`: the filter's `config_reload` counter moved (same poll);
//! - `main loaded` / `workers loaded`: keyswap logged `configuration loaded`
//!   for the version on the main thread / on each worker;
//! - `refused`: each worker's first `invalid_key` for K1 (its audit line),
//!   and the later of the two: "refused on every worker".
//!
//! The configuration is K1, K2, a client named after the round (every push
//! is new content, a new version) and N-2 more clients given by digest.
//! K2's answers during all of it must all be 200. Bounded: `--pushes`
//! rounds per format (default 20, at most 200), every wait 5 s plus 5 s
//! per 100,000 clients at most, the whole run 40 minutes at most.

use std::fmt::Write as _;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use keyswap_tests::ecds::{self, Format};
use keyswap_tests::envoy::{Listener, LogLevels};
use keyswap_tests::http::Request;
use keyswap_tests::load::{percentile, Bounds, Load};
use keyswap_tests::revocation::{
    first_per_thread, keyed, keyed_once, main_thread, since, workers, EcdsGateway, LogLine, LogTail, Options,
    INVALID_KEY_LINE,
};
use sha2::{Digest as _, Sha256};

const K1: &str = "bench-k1-key";
const K2: &str = "bench-k2-key";
const RUN_LIMIT: Duration = Duration::from_secs(40 * 60);

/// `clients` clients: K1 `disabled` or not, K2, one named after `round`
/// (so that every push is new content, a new version, as a real one is),
/// and `clients - 2` more by digest; one route bound to the gateway's
/// catch-all cluster (`LISTENER`'s `<name>-default`).
fn config(clients: usize, k1_disabled: bool, round: usize) -> String {
    let mut text = String::with_capacity(clients * 110 + 512);
    text.push_str("{\"clients\": [\n");
    let _ =
        writeln!(text, "  {{\"id\": \"k1\", \"key\": \"{K1}\", \"routes\": [\"*\"], \"disabled\": {k1_disabled}}},");
    let _ = writeln!(text, "  {{\"id\": \"k2\", \"key\": \"{K2}\", \"routes\": [\"*\"]}},");
    let round_digest = Sha256::digest(format!("bench-round-{round}-{k1_disabled}").as_bytes());
    let _ = write!(
        text,
        "  {{\"id\": \"round-{round}\", \"key_sha256\": \"{}\", \"routes\": [\"*\"], \"disabled\": true}}",
        round_digest.iter().map(|b| format!("{b:02x}")).collect::<String>()
    );
    // Real SHA-256 digests (uniform, as keys' digests are), not counters.
    for i in 0..clients.saturating_sub(2) {
        let digest = Sha256::digest(format!("bench-filler-{i}").as_bytes());
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        let _ = write!(text, ",\n  {{\"id\": \"c{i}\", \"key_sha256\": \"{hex}\", \"routes\": [\"*\"]}}");
    }
    text.push_str(
        "],\n \"routes\": [{\"name\": \"all\", \"match\": {\"clusters\": [\"gateway-default\"]}, \"inject\": \
         [{\"header\": \"authorization\", \"prefix\": \"Bearer \", \"value\": {\"env\": \"CREDENTIAL\"}}]}]}",
    );
    text
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-revocation: {e}");
            ExitCode::FAILURE
        }
    }
}

const USAGE: &str = "usage: bench-revocation [--pushes N] [--clients N[,N…]] [--formats json,pb]";

fn run() -> Result<(), String> {
    let mut pushes = 20usize;
    let mut sizes = vec![2usize];
    let mut formats = vec![Format::Json, Format::Binary];
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--pushes" => {
                pushes = args
                    .next()
                    .and_then(|n| n.parse().ok())
                    .filter(|n| (1..=200).contains(n))
                    .ok_or("--pushes N (1-200)")?;
            }
            "--clients" => {
                let list = args.next().ok_or(USAGE)?;
                sizes = list
                    .split(',')
                    .map(|n| n.trim().replace('_', "").parse::<usize>().ok().filter(|n| (2..=1_000_000).contains(n)))
                    .collect::<Option<Vec<_>>>()
                    .ok_or("--clients N[,N…]: each from 2 to 1000000")?;
            }
            "--formats" => {
                let list = args.next().ok_or(USAGE)?;
                formats = list
                    .split(',')
                    .map(|f| match f.trim() {
                        "json" => Some(Format::Json),
                        "pb" => Some(Format::Binary),
                        _ => None,
                    })
                    .collect::<Option<Vec<_>>>()
                    .filter(|f| !f.is_empty())
                    .ok_or("--formats json,pb (either or both)")?;
            }
            _ => return Err(format!("unknown argument {arg}; {USAGE}")),
        }
    }
    let started = Instant::now();
    let mut summary = Vec::new();
    let mut failed = false;
    for &clients in &sizes {
        let results = measure(clients, &formats, pushes, started)?;
        for result in results {
            failed |= !result.ok();
            summary.push(result);
        }
    }
    println!();
    println!("## Summary (ms from the rename; p50 / p99 / max over the pushes)");
    println!();
    println!("| clients | ECDS file | file size | version shown | config_reload moved | main thread loaded | workers loaded | refused on every worker | K2 requests (errors, not 200) |");
    println!("|---:|---|---:|---|---|---|---|---|---|");
    for r in &summary {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} ({}, {}) |",
            r.clients,
            r.format_name(),
            size(r.file_bytes),
            triple(&r.version),
            triple(&r.reload),
            triple(&r.main_loaded),
            triple(&r.loaded),
            triple(&r.every_worker),
            r.k2_requests,
            r.k2_errors,
            r.k2_not_ok
        );
    }
    println!();
    println!("total run: {:.1} s", started.elapsed().as_secs_f64());
    if failed {
        return Err("failures above (a push not enforced, or an error for K2)".into());
    }
    Ok(())
}

fn size(bytes: usize) -> String {
    if bytes >= 1 << 20 {
        format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
    } else {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    }
}

fn triple(values: &[Duration]) -> String {
    let get =
        |p: f64| percentile(values, p).map_or_else(|| "-".to_string(), |d| format!("{:.0}", d.as_secs_f64() * 1000.0));
    format!("{} / {} / {}", get(50.0), get(99.0), get(100.0))
}

/// What one format's rounds measured.
#[derive(Default)]
struct CaseResult {
    clients: usize,
    format: Option<Format>,
    file_bytes: usize,
    version: Vec<Duration>,
    reload: Vec<Duration>,
    main_loaded: Vec<Duration>,
    loaded: Vec<Duration>,
    every_worker: Vec<Duration>,
    failures: usize,
    k2_requests: usize,
    k2_errors: usize,
    k2_not_ok: usize,
}

impl CaseResult {
    fn ok(&self) -> bool {
        self.failures == 0 && self.k2_errors == 0 && self.k2_not_ok == 0
    }

    fn format_name(&self) -> &'static str {
        match self.format {
            Some(Format::Binary) => ".pb",
            _ => ".json",
        }
    }
}

/// One Envoy of a case, its load and its prober.
struct Case {
    gw: EcdsGateway,
    tail: LogTail,
    load: Option<Load>,
    stop: Arc<AtomicBool>,
    prober: Option<JoinHandle<(u64, u64)>>,
    renames: Vec<SystemTime>,
    result: CaseResult,
}

fn measure(clients: usize, formats: &[Format], pushes: usize, started: Instant) -> Result<Vec<CaseResult>, String> {
    let wait = Duration::from_secs(5) + Duration::from_secs(5) * u32::try_from(clients / 100_000).unwrap_or(50);
    println!();
    println!(
        "# {clients} clients: {} (waits up to {wait:?})",
        formats.iter().map(|f| f.name()).collect::<Vec<_>>().join(" and ")
    );
    let mut cases = Vec::new();
    for &format in formats {
        let first = config(clients, false, 0);
        let listener = Listener {
            config: first,
            env: [("CREDENTIAL".to_string(), "bench-upstream-credential".to_string())].into_iter().collect(),
            ..Listener::default()
        };
        let options = Options { json: format == Format::Json, ..Options::default() };
        let gw = EcdsGateway::start_options(listener, &[], &LogLevels::serving(), &options)?;
        // Debug lines (one per request and more) would be most of the log.
        let level = Request::new("POST", "/logging?level=info").header("host", "admin").send(gw.envoy.admin());
        if !level.is_ok_and(|r| r.status == 200) {
            return Err("could not set Envoy's log level to info".into());
        }
        let tail = LogTail::new(&gw.envoy.log_path());
        let load = Load::start(
            gw.addr,
            &keyed(K2),
            Bounds {
                connections: 2,
                pause: Duration::from_millis(2),
                max_requests_per_connection: 400_000,
                max_duration: Duration::from_secs(40 * 60),
            },
        )
        .map_err(|e| format!("K2 load: {e}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let prober = {
            let (stop, addr) = (stop.clone(), gw.addr);
            std::thread::spawn(move || {
                let (mut sent, mut failed) = (0u64, 0u64);
                while !stop.load(Ordering::SeqCst) && sent < 2_000_000 {
                    if keyed_once(K1).send(addr).is_err() {
                        failed += 1;
                    }
                    sent += 1;
                    std::thread::sleep(Duration::from_millis(1));
                }
                (sent, failed)
            })
        };
        let result = CaseResult { clients, format: Some(format), ..CaseResult::default() };
        cases.push(Case { gw, tail, load: Some(load), stop, prober: Some(prober), renames: Vec::new(), result });
    }

    for round in 1..=pushes {
        for case in &mut cases {
            if started.elapsed() > RUN_LIMIT {
                return Err(format!("the run took over {RUN_LIMIT:?}; stopped"));
            }
            one_round(case, clients, round, wait)?;
        }
    }

    let mut out = Vec::new();
    for mut case in cases {
        case.stop.store(true, Ordering::SeqCst);
        let (probes, probe_errors) = case.prober.take().map(|p| p.join().unwrap_or((0, 0))).unwrap_or((0, 0));
        let samples = case.load.take().map(Load::stop).unwrap_or_default();
        let r = &mut case.result;
        let name = r.format_name();
        println!();
        println!("## {clients} clients, {name} ECDS file ({} bytes)", r.file_bytes);
        println!("revocation pushes: {pushes} ({} not enforced within {wait:?})", r.failures);
        println!("K1 probes (fresh connections): {probes}, {probe_errors} failed");
        print_stats("rename -> version_text shows it", &r.version);
        print_stats("rename -> config_reload moved", &r.reload);
        print_stats("rename -> loaded on the main thread", &r.main_loaded);
        print_stats("rename -> loaded, per worker", &r.loaded);
        print_stats("rename -> K1 refused on every worker", &r.every_worker);
        let window = Duration::from_millis(250);
        let renames = &case.renames;
        let near =
            |sent: SystemTime| renames.iter().any(|r| sent + Duration::from_millis(20) >= *r && sent <= *r + window);
        r.k2_requests = samples.len();
        r.k2_errors = samples.iter().filter(|s| s.result.is_err()).count();
        r.k2_not_ok = samples.iter().filter(|s| s.result.as_ref().is_ok_and(|x| x.status != 200)).count();
        let during: Vec<Duration> = samples.iter().filter(|s| near(s.sent)).map(|s| s.latency).collect();
        let other: Vec<Duration> = samples.iter().filter(|s| !near(s.sent)).map(|s| s.latency).collect();
        println!(
            "K2 under load: {} requests on 2 keep-alive connections, {} I/O errors (dropped connections), {} not 200",
            r.k2_requests, r.k2_errors, r.k2_not_ok
        );
        print_stats("K2 latency, within 250 ms of a push", &during);
        print_stats("K2 latency, otherwise", &other);
        out.push(case.result);
    }
    Ok(out)
}

/// The filter's ECDS `version_text` and the sum of its `config_reload`
/// counters (the listener's and the clusters' providers), from the admin.
fn ecds_stats(gw: &EcdsGateway) -> Option<(Option<String>, u64)> {
    let text =
        gw.admin(&format!("/stats?filter=^extension_config_discovery\\..*\\.{}\\.", ecds::RESOURCE_NAME)).ok()?;
    let mut view = ecds::EnvoyView::default();
    ecds::parse_stats(&text, &mut view);
    let reloads = text
        .lines()
        .filter(|l| l.contains(".config_reload: "))
        .filter_map(|l| l.rsplit_once(": ").and_then(|(_, v)| v.trim().parse::<u64>().ok()))
        .sum();
    Some((view.accepted, reloads))
}

fn one_round(case: &mut Case, clients: usize, round: usize, wait: Duration) -> Result<(), String> {
    // K1 back in, on both workers.
    let back = config(clients, false, round);
    let renamed = case.gw.push(&back)?;
    case.renames.push(renamed);
    let version = keyswap_policy::content_version(back.as_bytes());
    wait_until(&mut case.tail, wait, |lines| {
        (workers(lines, main_thread(lines), &version, renamed).len() == 2).then_some(())
    })
    .ok_or_else(|| {
        format!("round {round}: the workers did not load {version} within {wait:?}{}", log_tail(&case.gw))
    })?;
    std::thread::sleep(Duration::from_millis(200));

    // K1 revoked: from the rename, the stats, the loads and each worker's
    // first invalid_key.
    let revoked = config(clients, true, round);
    let version = keyswap_policy::content_version(revoked.as_bytes());
    let bytes = case.gw.file_bytes(&revoked)?;
    case.result.file_bytes = bytes.len();
    let reloads_before = ecds_stats(&case.gw).map_or(0, |(_, r)| r);
    let renamed =
        ecds::write_atomically(&case.gw.ecds, &bytes).map_err(|e| format!("{}: {e}", case.gw.ecds.display()))?;
    case.renames.push(renamed);
    let (mut shown, mut reloaded) = (None, None);
    let gw = &case.gw;
    let result = wait_until(&mut case.tail, wait, |lines| {
        if shown.is_none() || reloaded.is_none() {
            if let Some((accepted, reloads)) = ecds_stats(gw) {
                let now = since(renamed, SystemTime::now());
                if shown.is_none() && accepted.as_deref() == Some(version.as_str()) {
                    shown = Some(now);
                }
                if reloaded.is_none() && reloads > reloads_before {
                    reloaded = Some(now);
                }
            }
        }
        let main = main_thread(lines);
        let on = workers(lines, main, &version, renamed);
        let denied = first_per_thread(lines, renamed, INVALID_KEY_LINE);
        let per: Vec<(Duration, Duration)> = on
            .iter()
            .filter_map(|(w, at)| denied.get(w).map(|l| (since(renamed, l.time), since(renamed, *at))))
            .collect();
        let on_main = main.and_then(|m| {
            lines.iter().find(|l| {
                l.thread == m
                    && l.time >= renamed.checked_sub(Duration::from_millis(1)).unwrap_or(renamed)
                    && keyswap_policy::Summary::from_log_line(&l.text).is_some_and(|s| s.version == version)
            })
        });
        (per.len() == 2 && shown.is_some()).then(|| (per, on_main.map(|l| since(renamed, l.time))))
    });
    let r = &mut case.result;
    let name = r.format_name();
    match result {
        Some((per, on_main)) => {
            let worst = per.iter().map(|(d, _)| *d).max().unwrap_or_default();
            r.every_worker.push(worst);
            r.loaded.extend(per.iter().map(|(_, l)| *l));
            r.version.extend(shown);
            r.reload.extend(reloaded);
            r.main_loaded.extend(on_main);
            println!(
                "{clients} clients {name:5} push {round:2}: refused on every worker {} ms (workers {} ms; loaded {} ms; main thread {} ms; version shown {} ms; config_reload {} ms)",
                ms(worst),
                per.iter().map(|(d, _)| ms(*d)).collect::<Vec<_>>().join(", "),
                per.iter().map(|(_, l)| ms(*l)).collect::<Vec<_>>().join(", "),
                on_main.map_or("-".into(), ms),
                shown.map_or("-".into(), ms),
                reloaded.map_or("-".into(), ms),
            );
        }
        None => {
            r.failures += 1;
            println!(
                "{clients} clients {name:5} push {round:2}: NOT enforced on both workers within {wait:?}{}",
                log_tail(&case.gw)
            );
        }
    }
    // A quiet stretch, for K2's latency away from any push.
    std::thread::sleep(Duration::from_millis(300));
    Ok(())
}

/// Envoy's last lines about configuration, to say why a round failed.
fn log_tail(gw: &EcdsGateway) -> String {
    let log = gw.envoy.log();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("config") || l.contains("keyswap")).collect();
    format!("\nEnvoy's last configuration lines:\n{}", lines[lines.len().saturating_sub(12)..].join("\n"))
}

/// Polls Envoy's log every 5 ms until `done` answers (bounded by `wait`).
fn wait_until<T>(tail: &mut LogTail, wait: Duration, mut done: impl FnMut(&[LogLine]) -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + wait;
    loop {
        tail.poll();
        if let Some(v) = done(&tail.lines) {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn print_stats(what: &str, values: &[Duration]) {
    let get = |p: f64| percentile(values, p).map_or_else(|| "-".to_string(), ms);
    println!(
        "{what:<44} n={:<6} min {:>7} ms  p50 {:>7} ms  p99 {:>7} ms  max {:>7} ms",
        values.len(),
        get(0.0),
        get(50.0),
        get(99.0),
        get(100.0)
    );
}
