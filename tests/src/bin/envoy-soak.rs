//! `envoy-soak`: the soak benchmark behind `scripts/soak` (not a test): a
//! million requests through Envoy with keyswap on loopback, a rotating mix
//! of good, bad, missing, forbidden and expired keys (wrk with
//! `scripts/soak.lua`), then a report and its checks:
//!
//! - every status and every keyswap answer counted (only 200, 401 and 403
//!   may appear, each kind in its share of the mix), cross-checked against
//!   keyswap's own counters in Envoy's `/stats`;
//! - the error rate (socket errors, timeouts, unexpected answers): must be 0;
//! - Envoy's memory when idle after a warm-up and when idle at the end: RSS
//!   (`/proc`) and the heap's allocated bytes (admin `/memory`); each may
//!   grow by less than 5%.
//!
//! The Envoy is a `keyswap_tests::envoy::gateway` (keyswap on the listener
//! and on each route's cluster), started by `Envoy::start_logging`, which
//! waits for `/ready` and for keyswap to log loading this configuration.
//! Exits 1 if any check fails. The run's files stay in
//! `/tmp/keyswap-soak.*`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use keyswap_tests::bench::{rss_kib, sibling_binary, Responder};
use keyswap_tests::envoy::{self, filter_wasm, Envoy, Launch, Listener, LogLevels};
use keyswap_tests::http::Request;
use serde_json::{json, Value};

/// Requests of the warm-up.
const WARMUP: u64 = 20_000;

/// The variable the routes' credential comes from, and its value.
const CREDENTIAL_ENV: &str = "SOAK_CREDENTIAL";
const CREDENTIAL: &str = "soak-upstream-credential";

#[derive(Parser)]
#[command(about = "scripts/soak's Envoy, load and checks")]
struct Args {
    /// Requests of the main run.
    #[arg(default_value_t = 1_000_000)]
    requests: u64,
    /// The main run's bound, in seconds.
    #[arg(long, default_value_t = 1200)]
    max_seconds: u64,
    /// wrk's connections.
    #[arg(long, default_value_t = 16)]
    connections: u64,
    /// wrk's threads.
    #[arg(long, default_value_t = 2)]
    threads: u64,
    /// The echo-upstream binary (default: next to this program).
    #[arg(long)]
    responder: Option<PathBuf>,
}

fn random_hex() -> String {
    let mut bytes = [0u8; 8];
    let _ = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256_hex(text: &str) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(text.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// The keys of the mix.
struct Keys {
    good: String,
    expired: String,
    bad: String,
}

/// keyswap's configuration: the good and expired clients, and 1,000 others
/// so the key lookup is not trivially small; routes `chat` (the good
/// client's) and `admin` (nobody's), each bound to its own cluster.
fn config(keys: &Keys) -> String {
    let mut clients = vec![
        json!({"id": "soak-good", "key_sha256": sha256_hex(&keys.good), "routes": ["chat"]}),
        json!({"id": "soak-expired", "key_sha256": sha256_hex(&keys.expired), "routes": ["*"], "expires": "2001-01-01T00:00:00Z"}),
    ];
    clients.extend(
        (0..1000)
            .map(|i| json!({"id": format!("other-{i}"), "key_sha256": sha256_hex(&random_hex()), "routes": ["*"]})),
    );
    let route = |name: &str| {
        json!({"name": name, "match": {"route_name": name, "clusters": [name]},
               "inject": [{"header": "authorization", "prefix": "Bearer ", "value": {"env": CREDENTIAL_ENV}}]})
    };
    json!({
        "clients": clients,
        "key_sources": [{"header": "authorization", "prefix": "Bearer "}, {"header": "x-api-key"}, {"query": "api_key"}],
        "routes": [route("chat"), route("admin")],
        "strip_request_headers": ["cookie"],
        "client_id_header": "x-keyswap-client",
    })
    .to_string()
}

/// Envoy's memory: RSS, and tcmalloc's allocated bytes and heap size.
fn memory(envoy: &Envoy) -> Result<Value, String> {
    let rss = rss_kib(envoy.pid())?;
    let response =
        Request::get("/memory").header("host", "admin").send(envoy.admin()).map_err(|e| format!("/memory: {e}"))?;
    let m = response.json().map_err(|e| format!("/memory: {e}"))?;
    let number = |k: &str| m[k].as_str().and_then(|v| v.parse::<u64>().ok()).or_else(|| m[k].as_u64()).unwrap_or(0);
    Ok(json!({"rss_kib": rss, "allocated": number("allocated"), "heap_size": number("heap_size")}))
}

/// Runs wrk with `scripts/soak.lua` for `requests` requests (each thread
/// its share), bounded by `seconds`; wrk's output goes to `out`. Returns
/// the seconds until every thread was done (or `seconds`).
fn load(args: &Args, url: &str, keys: &Keys, requests: u64, seconds: u64, out: &Path) -> Result<f64, String> {
    let per_thread = requests.div_ceil(args.threads);
    let name = out.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let done_dir = out.with_file_name(format!("done-{name}"));
    std::fs::create_dir_all(&done_dir).map_err(|e| format!("{}: {e}", done_dir.display()))?;
    let output = std::fs::File::create(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let errors = output.try_clone().map_err(|e| e.to_string())?;
    let script = envoy::repo_root().join("scripts/soak.lua");
    let start = Instant::now();
    let mut wrk = Command::new("wrk")
        .args(["-t", &args.threads.to_string(), "-c", &args.connections.to_string()])
        .args(["-d", &format!("{seconds}s"), "--timeout", "10s", "-s"])
        .arg(&script)
        .args([url, "--", &per_thread.to_string(), &keys.good, &keys.bad, &keys.expired])
        .arg(&done_dir)
        .stdin(Stdio::null())
        .stdout(output)
        .stderr(errors)
        .spawn()
        .map_err(|e| format!("wrk: {e}"))?;
    let mut took = None;
    let status = loop {
        if let Some(status) = wrk.try_wait().map_err(|e| format!("wrk: {e}"))? {
            break status;
        }
        let done = std::fs::read_dir(&done_dir).map(|d| d.count()).unwrap_or(0) as u64;
        if took.is_none() && done >= args.threads {
            took = Some(start.elapsed().as_secs_f64());
            // wrk reports as usual on SIGINT.
            let _ = Command::new("kill").args(["-INT", &wrk.id().to_string()]).status();
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    if !status.success() {
        return Err(format!("wrk failed ({status}):\n{}", std::fs::read_to_string(out).unwrap_or_default()));
    }
    Ok(took.unwrap_or(seconds as f64))
}

/// The `SOAK-RESULT {json}` line of a wrk run's output.
fn result(path: &Path) -> Result<Value, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    text.lines()
        .find_map(|l| l.strip_prefix("SOAK-RESULT "))
        .and_then(|j| serde_json::from_str(j).ok())
        .ok_or_else(|| format!("{text}\nno result from wrk"))
}

/// keyswap's counters in `/stats` text, by answer (`forwarded` or the
/// denial reason), summed over routes.
fn keyswap_counts(stats: &str) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for line in stats.lines() {
        let Some((_, rest)) = line.trim().split_once("keyswap_requests_total;") else { continue };
        let Some((tags, count)) = rest.rsplit_once(": ") else { continue };
        let tag = |name: &str| tags.split(';').find_map(|t| t.strip_prefix(name)?.strip_prefix('='));
        let (Some(outcome), Some(reason), Ok(count)) = (tag("outcome"), tag("reason"), count.trim().parse::<u64>())
        else {
            continue;
        };
        let answer = if outcome == "allowed" { "forwarded" } else { reason };
        *counts.entry(answer.to_string()).or_insert(0) += count;
    }
    counts
}

fn counts(v: &Value) -> BTreeMap<String, u64> {
    v.as_object().into_iter().flatten().map(|(k, n)| (k.clone(), n.as_u64().unwrap_or(0))).collect()
}

fn listing(map: &BTreeMap<String, u64>) -> String {
    map.iter().map(|(k, n)| format!("{k}: {n}")).collect::<Vec<_>>().join(", ")
}

/// What one soak measured.
struct Measured {
    main: Value,
    warm: Value,
    mem: BTreeMap<&'static str, Value>,
    stats: String,
    log: String,
    alive: bool,
    elapsed: f64,
}

/// The report and the failed checks.
fn report(m: &Measured, total: u64, connections: u64) -> (String, Vec<String>) {
    let mut failures = Vec::new();
    // The mix: six requests in rotation, so each answer is a known share.
    let shares = [
        ("forwarded", 2.0 / 6.0),
        ("invalid_key", 1.0 / 6.0),
        ("missing_key", 1.0 / 6.0),
        ("route_forbidden", 1.0 / 6.0),
        ("expired_key", 1.0 / 6.0),
    ];
    let statuses = counts(&m.main["statuses"]);
    let answers = counts(&m.main["answers"]);
    let warm_answers = counts(&m.warm["answers"]);
    let answered: u64 = statuses.values().sum();
    let unexpected: BTreeMap<_, _> =
        statuses.iter().filter(|(s, _)| !["200", "401", "403"].contains(&s.as_str())).collect();
    let unexpected_answers: BTreeMap<_, _> =
        answers.iter().filter(|(a, _)| !shares.iter().any(|(s, _)| s == a)).collect();
    let socket = counts(&m.main["errors"]);
    let socket_errors: u64 = socket.values().sum();
    let errors =
        socket_errors + unexpected.values().copied().sum::<u64>() + unexpected_answers.values().copied().sum::<u64>();
    if answered < total {
        failures.push(format!("only {answered} of {total} requests answered within the bound"));
    }
    if !unexpected.is_empty() || !unexpected_answers.is_empty() {
        failures.push(format!("unintended answers: statuses {unexpected:?}, answers {unexpected_answers:?}"));
    }
    if socket_errors > 0 {
        failures.push(format!("socket errors: {}", listing(&socket)));
    }
    for (answer, share) in shares {
        let got = answers.get(answer).copied().unwrap_or(0) as f64 / answered.max(1) as f64;
        if (got - share).abs() > 0.005 {
            failures.push(format!("{answer}: {got:.4} of answers, expected {share:.4}"));
        }
    }
    // keyswap's own counters: every request wrk counted was decided by
    // keyswap (Envoy may have decided a few more: requests in flight when
    // wrk stopped).
    let envoy_counts = keyswap_counts(&m.stats);
    for (answer, _) in shares {
        let by_wrk = answers.get(answer).copied().unwrap_or(0) + warm_answers.get(answer).copied().unwrap_or(0);
        let by_envoy = envoy_counts.get(answer).copied().unwrap_or(0);
        let diff = by_envoy as i128 - by_wrk as i128;
        if !(0..=2 * i128::from(connections)).contains(&diff) {
            failures.push(format!("{answer}: keyswap counted {by_envoy}, wrk {by_wrk}"));
        }
    }
    let mem = |when: &str, k: &str| m.mem.get(when).and_then(|v| v[k].as_u64()).unwrap_or(0) as f64;
    let growth = |k: &str| (mem("end", k) - mem("start", k)) / mem("start", k).max(1.0);
    for k in ["rss_kib", "allocated"] {
        if growth(k) >= 0.05 {
            failures.push(format!("memory {k} grew {:.1}% (limit 5%)", growth(k) * 100.0));
        }
    }
    if !m.alive {
        failures.push("Envoy exited".into());
    }
    for sign in ["keyswap: panic", "Wasm VM failed", "[critical]"] {
        if m.log.contains(sign) {
            failures.push(format!("Envoy's log shows {sign:?}"));
        }
    }
    let mib = |bytes: f64| format!("{:.1} MiB", bytes / 1_048_576.0);
    let latency = |k: &str| m.main["latency_us"][k].as_f64().unwrap_or(0.0) / 1000.0;
    let mut out = String::new();
    let _ =
        writeln!(out, "requests answered   {answered} in {:.1} s ({:.0}/s)", m.elapsed, answered as f64 / m.elapsed);
    let _ = writeln!(out, "statuses            {}", listing(&statuses));
    let _ = writeln!(out, "answers             {}", listing(&answers));
    let _ = writeln!(
        out,
        "keyswap's counters  {} (warm-up {} + main run)",
        listing(&envoy_counts),
        warm_answers.values().sum::<u64>()
    );
    let _ = writeln!(
        out,
        "errors              {errors} (rate {:.6}); socket {}",
        errors as f64 / answered.max(1) as f64,
        listing(&socket)
    );
    let _ = writeln!(
        out,
        "latency             mean {:.2} ms, p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms",
        latency("mean"),
        latency("p50"),
        latency("p99"),
        latency("max")
    );
    let _ = writeln!(
        out,
        "Envoy RSS           boot {}, start {}, end {} (growth {:+.2}%)",
        mib(mem("boot", "rss_kib") * 1024.0),
        mib(mem("start", "rss_kib") * 1024.0),
        mib(mem("end", "rss_kib") * 1024.0),
        growth("rss_kib") * 100.0
    );
    let _ = write!(
        out,
        "Envoy heap (/memory allocated) boot {}, start {}, end {} (growth {:+.2}%); heap_size end {}",
        mib(mem("boot", "allocated")),
        mib(mem("start", "allocated")),
        mib(mem("end", "allocated")),
        growth("allocated") * 100.0,
        mib(mem("end", "heap_size"))
    );
    (out, failures)
}

fn run(args: &Args) -> Result<bool, String> {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let dir = std::env::temp_dir().join(format!("keyswap-soak.{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let responder_bin = args.responder.clone().unwrap_or_else(|| sibling_binary("echo-upstream"));
    let responder = Responder::start(&responder_bin, None, &dir.join("echo.log"))?;
    let keys = Keys {
        good: format!("soak-good-{}", random_hex()),
        expired: format!("soak-expired-{}", random_hex()),
        bad: format!("soak-bad-{}", random_hex()),
    };
    // soak.lua selects the routes `chat` and `admin` by the gateway's
    // route header; each goes to the cluster of its name.
    let listener = Listener {
        name: "soak".into(),
        config: config(&keys),
        host_env_keys: vec![CREDENTIAL_ENV.into()],
        route_names: vec!["chat".into(), "admin".into()],
        ..Listener::default()
    };
    let mut launch = Launch::gateway(std::slice::from_ref(&listener), responder.addr(), &filter_wasm()?);
    launch.env = vec![(CREDENTIAL_ENV.into(), CREDENTIAL.into())];
    std::fs::write(dir.join("envoy.json"), &launch.text).map_err(|e| format!("envoy.json: {e}"))?;
    let mut envoy = Envoy::start_logging(&launch, &LogLevels { level: "info".into(), components: None })?;
    let url = format!("http://{}", envoy.listener("soak")?);
    let version = envoy::envoy_binary().ok().and_then(|e| Command::new(e).arg("--version").output().ok());
    let version = version.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
    let version = version.split_once("version: ").map_or("", |(_, v)| v).split_whitespace().next().unwrap_or("?");
    println!(
        "soak: Envoy version: {version}, 2 workers; echo upstream on {}; run dir {}",
        responder.addr(),
        dir.display()
    );

    let measured = (|| {
        let mut mem = BTreeMap::new();
        mem.insert("boot", memory(&envoy)?);
        println!("soak: warm-up: {WARMUP} requests");
        load(args, &url, &keys, WARMUP, 120, &dir.join("wrk-warmup.txt"))?;
        std::thread::sleep(Duration::from_secs(2));
        mem.insert("start", memory(&envoy)?);
        println!(
            "soak: main run: {} requests (bounded at {}s), wrk -t{} -c{}",
            args.requests, args.max_seconds, args.threads, args.connections
        );
        let elapsed = load(args, &url, &keys, args.requests, args.max_seconds, &dir.join("wrk-main.txt"))?;
        std::thread::sleep(Duration::from_secs(2));
        mem.insert("end", memory(&envoy)?);
        let stats = Request::get("/stats?filter=keyswap_requests_total")
            .header("host", "admin")
            .send(envoy.admin())
            .map_err(|e| format!("/stats: {e}"))?
            .text();
        Ok::<_, String>((mem, stats, elapsed))
    })();
    let alive = envoy.is_running();
    let log = envoy.log();
    let _ = std::fs::write(dir.join("envoy.log"), &log);
    for (name, value) in measured.as_ref().map(|(mem, _, _)| mem.clone()).unwrap_or_default() {
        let _ = std::fs::write(dir.join(format!("memory-{name}.json")), value.to_string());
    }
    drop(envoy);
    drop(responder);
    let (mem, stats, elapsed) = measured?;
    let _ = std::fs::write(dir.join("stats.txt"), &stats);
    let m = Measured {
        main: result(&dir.join("wrk-main.txt"))?,
        warm: result(&dir.join("wrk-warmup.txt"))?,
        mem,
        stats,
        log,
        alive,
        elapsed,
    };
    let (text, failures) = report(&m, args.requests, args.connections);
    let _ = std::fs::write(dir.join("report.txt"), format!("{text}\n"));
    println!("{text}");
    if failures.is_empty() {
        println!("\nsoak: passed (start = idle after the warm-up; end = idle after the main run)");
        Ok(true)
    } else {
        println!("\nsoak: FAILED\n  {}", failures.join("\n  "));
        Ok(false)
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(message) => {
            eprintln!("soak: {message}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyswap_counters_are_summed_by_answer() {
        let stats = "keyswap_requests_total;route=chat;outcome=allowed;reason=: 10\n\
                     keyswap_requests_total;route=admin;outcome=denied;reason=route_forbidden: 3\n\
                     keyswap_requests_total;route=chat;outcome=denied;reason=invalid_key: 4\n\
                     keyswap_requests_total;route=admin;outcome=allowed;reason=: 1\n";
        let counts = keyswap_counts(stats);
        assert_eq!(counts["forwarded"], 11);
        assert_eq!(counts["route_forbidden"], 3);
        assert_eq!(counts["invalid_key"], 4);
    }
}
