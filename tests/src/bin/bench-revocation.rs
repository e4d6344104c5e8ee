//! `bench-revocation`: how fast a pushed revocation is enforced on every
//! worker, and what a push does to the latency of concurrent requests.
//! Not a test: it prints figures (`scripts/bench-revocation` runs it).
//!
//! One Envoy (`--concurrency 2`, V8) with keyswap fed by an ECDS file, an
//! echo upstream, all on loopback. While K2 runs steady keep-alive load
//! (4 connections, a request every ~2 ms each) and K1 is sent on fresh
//! connections back to back (so both workers see it), each round pushes
//! K1 back in (waits until both workers loaded it), then pushes its
//! revocation and measures, from the rename, each worker's first
//! `invalid_key` for K1 (its audit line in Envoy's log, with its thread id
//! and millisecond time), then lets 600 ms pass without a push. K2's
//! latency is reported for requests sent within 250 ms after a rename
//! (either push) and for all others. Bounded: `--pushes` rounds (default 20, at most
//! 200), every wait 5 s at most, the whole run 10 minutes at most.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use keyswap_tests::http::Request;
use keyswap_tests::load::{percentile, Bounds, Load};
use keyswap_tests::revocation::{
    first_per_thread, keyed, keyed_once, main_thread, since, workers, EcdsGateway, LogLine, LogTail, INVALID_KEY_LINE,
};

const K1: &str = "bench-k1-key";
const K2: &str = "bench-k2-key";
const WAIT: Duration = Duration::from_secs(5);

/// Two clients; K1 `disabled` or not; one route bound to the gateway's
/// catch-all cluster (`LISTENER`'s `<name>-default`). `round` names a third, unused client
/// so that every push is new content (a new version), as a real one is.
fn config(k1_disabled: bool, round: usize) -> String {
    format!(
        r#"{{"clients": [
  {{"id": "k1", "key": "{K1}", "routes": ["*"], "disabled": {k1_disabled}}},
  {{"id": "k2", "key": "{K2}", "routes": ["*"]}},
  {{"id": "round-{round}", "key_sha256": "{:064x}", "routes": ["*"], "disabled": true}}],
 "routes": [{{"name": "all", "match": {{"clusters": ["gateway-default"]}}, "inject": [{{"header": "authorization", "prefix": "Bearer ", "value": {{"env": "CREDENTIAL"}}}}]}}]}}"#,
        round * 2 + usize::from(k1_disabled)
    )
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

fn run() -> Result<(), String> {
    let mut pushes = 20usize;
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
            _ => return Err(format!("unknown argument {arg}; usage: bench-revocation [--pushes N]")),
        }
    }
    let started = Instant::now();
    let gw = EcdsGateway::start(&config(false, 0), &[("CREDENTIAL", "bench-upstream-credential")])?;
    // Debug lines (one per request and more) would be most of the log.
    let level = Request::new("POST", "/logging?level=info").header("host", "admin").send(gw.envoy.admin());
    if !level.is_ok_and(|r| r.status == 200) {
        return Err("could not set Envoy's log level to info".into());
    }
    let mut tail = LogTail::new(&gw.envoy.log_path());

    let load = Load::start(
        gw.addr,
        &keyed(K2),
        Bounds {
            connections: 4,
            pause: Duration::from_millis(2),
            max_requests_per_connection: 200_000,
            max_duration: Duration::from_secs(600),
        },
    )
    .map_err(|e| format!("K2 load: {e}"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let prober = {
        let (stop, addr) = (stop.clone(), gw.addr);
        std::thread::spawn(move || {
            let (mut sent, mut failed) = (0u64, 0u64);
            while !stop.load(Ordering::SeqCst) && sent < 1_000_000 {
                if keyed_once(K1).send(addr).is_err() {
                    failed += 1;
                }
                sent += 1;
                std::thread::sleep(Duration::from_millis(1));
            }
            (sent, failed)
        })
    };

    let mut renames: Vec<SystemTime> = Vec::new();
    let mut every_worker: Vec<Duration> = Vec::new();
    let mut each_worker: Vec<Duration> = Vec::new();
    let mut loaded: Vec<Duration> = Vec::new();
    let mut failures = 0usize;
    for round in 1..=pushes {
        if started.elapsed() > Duration::from_secs(600) {
            return Err("the run took over 10 minutes; stopped".into());
        }
        // K1 back in, on both workers.
        let back = config(false, round);
        let renamed = gw.push(&back)?;
        renames.push(renamed);
        let version = keyswap_policy::content_version(back.as_bytes());
        wait_until(&mut tail, |lines| (workers(lines, main_thread(lines), &version, renamed).len() == 2).then_some(()))
            .ok_or_else(|| {
                format!("round {round}: the workers did not load {version} within {WAIT:?}{}", log_tail(&gw))
            })?;
        std::thread::sleep(Duration::from_millis(200));

        // K1 revoked: each worker's first invalid_key since the rename.
        let revoked = config(true, round);
        let version = keyswap_policy::content_version(revoked.as_bytes());
        let renamed = gw.push(&revoked)?;
        renames.push(renamed);
        let result = wait_until(&mut tail, |lines| {
            let main = main_thread(lines);
            let on = workers(lines, main, &version, renamed);
            let denied = first_per_thread(lines, renamed, INVALID_KEY_LINE);
            let per: Vec<(Duration, Duration)> = on
                .iter()
                .filter_map(|(w, at)| denied.get(w).map(|l| (since(renamed, l.time), since(renamed, *at))))
                .collect();
            (per.len() == 2).then_some(per)
        });
        match result {
            Some(per) => {
                let worst = per.iter().map(|(d, _)| *d).max().unwrap_or_default();
                every_worker.push(worst);
                each_worker.extend(per.iter().map(|(d, _)| *d));
                loaded.extend(per.iter().map(|(_, l)| *l));
                println!(
                    "push {round:2}: enforced on every worker {} ms after the rename (workers: {} ms; loaded: {} ms)",
                    ms(worst),
                    per.iter().map(|(d, _)| ms(*d)).collect::<Vec<_>>().join(", "),
                    per.iter().map(|(_, l)| ms(*l)).collect::<Vec<_>>().join(", ")
                );
            }
            None => {
                failures += 1;
                println!("push {round:2}: NOT enforced on both workers within {WAIT:?}{}", log_tail(&gw));
            }
        }
        // A quiet stretch, for K2's latency away from any push.
        std::thread::sleep(Duration::from_millis(600));
    }
    stop.store(true, Ordering::SeqCst);
    let (probes, probe_errors) = prober.join().map_err(|_| "the K1 prober panicked")?;
    let samples = load.stop();

    println!();
    println!("revocation pushes: {pushes} ({failures} not enforced within {WAIT:?})");
    println!("K1 probes (fresh connections): {probes}, {probe_errors} failed");
    print_stats("rename -> K1 refused on every worker", &every_worker);
    print_stats("rename -> K1 refused, per worker", &each_worker);
    print_stats("rename -> configuration loaded, per worker", &loaded);

    // Concurrent K2 requests: those in flight within 250 ms of any rename
    // (both kinds of push) against all the others.
    let window = Duration::from_millis(250);
    let near = |sent: SystemTime| renames.iter().any(|r| sent + Duration::from_millis(20) >= *r && sent <= *r + window);
    let errors = samples.iter().filter(|s| s.result.is_err()).count();
    let not_ok = samples.iter().filter(|s| s.result.as_ref().is_ok_and(|r| r.status != 200)).count();
    let during: Vec<Duration> = samples.iter().filter(|s| near(s.sent)).map(|s| s.latency).collect();
    let other: Vec<Duration> = samples.iter().filter(|s| !near(s.sent)).map(|s| s.latency).collect();
    println!();
    println!(
        "K2 under load: {} requests on 4 keep-alive connections, {errors} I/O errors (dropped connections), {not_ok} not 200",
        samples.len()
    );
    print_stats("K2 latency, within 250 ms of a push", &during);
    print_stats("K2 latency, otherwise", &other);
    println!("total run: {:.1} s", started.elapsed().as_secs_f64());
    if failures > 0 || errors > 0 || not_ok > 0 {
        return Err("failures above".into());
    }
    Ok(())
}

/// Envoy's last lines about configuration, to say why a round failed.
fn log_tail(gw: &EcdsGateway) -> String {
    let log = gw.envoy.log();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("config") || l.contains("keyswap")).collect();
    format!("\nEnvoy's last configuration lines:\n{}", lines[lines.len().saturating_sub(12)..].join("\n"))
}

/// Polls Envoy's log until `done` answers (bounded by [`WAIT`]).
fn wait_until<T>(tail: &mut LogTail, mut done: impl FnMut(&[LogLine]) -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + WAIT;
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
