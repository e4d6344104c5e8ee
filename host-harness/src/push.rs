//! `keyswap push`: deliver a keyswap configuration to a running Envoy
//! through the ECDS file it watches, and confirm it with Envoy itself.
//!
//! ```text
//! CONFIG.json ─▶ the real filter module (refused? stop; nothing written)
//!             ─▶ ecds::encode (version = content_version of CONFIG.json): binary
//!                protobuf for a `.pb` file, JSON otherwise (as Envoy reads it),
//!                the file's vm_config kept
//!             ─▶ ecds::lock: one push at a time per file (waits, within --timeout)
//!             ─▶ same bytes as the file already holds? "unchanged" (--force: write anyway)
//!             ─▶ temp file (0600, random name, owner kept) + rename + fsync of the directory
//!             ─▶ --envoy-admin: poll Envoy's admin (every 5 ms) until it runs that
//!                version (exit 0; prints the ms from the rename), refused it (restore what this push replaced, if the
//!                file still holds this push's bytes; exit 1), or --timeout
//!                passes (exit 1); an admin that does not answer (Envoy
//!                restarting, paused) is waited for, within --timeout
//! ```
//!
//! Envoy 1.40 shows a refused file resource in `/config_dump` anyway (its
//! `version_info` and content, no `error_state`), so "active" is read from
//! the ECDS stats: `extension_config_discovery.http_filter.keyswap.version_text`
//! (the accepted version), and "refused" from `update_rejected` having grown
//! while the dump shows this version (an Envoy that restarted reads the file
//! at start: its counters begin at 0). Nothing printed holds a key or a
//! credential: the configuration's values are never echoed, and the
//! filter's own lines never contain them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use crate::ecds::{self, EnvoyView};
use crate::{Artifact, FilterModule, HarnessError, LogLevel};

/// The value `push` gives each `{"env": NAME}` variable when it checks a
/// configuration: the credentials live in Envoy's environment, not here, so
/// only Envoy can tell whether they are set (and `push` reports it if not).
pub const PLACEHOLDER: &str = "keyswap-push-placeholder";

/// What `push` says Envoy runs when its ECDS stats show no version.
const DEFAULT_RUNS: &str = "its default_config (no pushed version; the shipped envoy.yaml's refuses every request)";

/// What `keyswap push` is asked to do (the CLI's `PushArgs` documents each
/// field for `--help`).
#[derive(Debug, Clone)]
pub struct PushOptions {
    /// The keyswap configuration (JSON), sent byte for byte.
    pub config: PathBuf,
    /// The ECDS file Envoy watches.
    pub ecds: PathBuf,
    /// Envoy's admin: wait until Envoy runs the new version.
    pub envoy_admin: Option<String>,
    /// Envoy's log file, for the reason of a rejection.
    pub envoy_log: Option<PathBuf>,
    /// The longest push waits, in seconds, for anything.
    pub timeout: f64,
    /// Write (rename) the file even when it already holds these bytes.
    pub force: bool,
    /// The filter module (default: [`Artifact::Filter`]`.default_path()`).
    pub filter: Option<PathBuf>,
}

/// Runs `keyswap push`, printing as it goes.
///
/// # Errors
/// The message to print after `error: ` (empty when already printed).
pub fn main(args: &PushOptions) -> Result<(), String> {
    let text = std::fs::read(&args.config).map_err(|e| format!("cannot read {}: {e}", args.config.display()))?;
    let text = String::from_utf8(text).map_err(|_| format!("{}: not UTF-8 text", args.config.display()))?;
    let module = FilterModule::load(&args.filter.clone().unwrap_or_else(|| Artifact::Filter.default_path()))
        .map_err(|e| e.to_string())?;
    let summary = check(&module, &text)?;
    let version = keyswap_policy::content_version(text.as_bytes());
    let admin = args.envoy_admin.as_deref().map(Admin::parse).transpose()?;
    let timeout =
        Duration::try_from_secs_f64(args.timeout).map_err(|_| "--timeout: not a number of seconds".to_string())?;
    let deadline = Instant::now() + timeout;
    let path = &args.ecds;
    let format = ecds::Format::of(path).map_err(|e| format!("{e} (nothing written)"))?;
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(format!("{} (nothing written)", ecds::symlink_error(path)));
    }

    // One push at a time per file, until this one is confirmed or undone.
    let (_lock, waited) =
        ecds::lock(path, deadline).map_err(|e| format!("cannot lock {}: {e}; nothing written", path.display()))?;
    if waited >= Duration::from_millis(20) {
        println!("waited {} ms for another push to {}", waited.as_millis(), path.display());
    }
    let existing = match std::fs::read(path) {
        Ok(bytes) => Some(bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(format!("cannot read {}: {e}; nothing written", path.display())),
    };
    let default_vm = || ecds::VmConfig::Json(ecds::default_vm_config());
    let held = existing.as_deref().map(ecds::read_resource);
    let vm_config = match held {
        None => default_vm(),
        Some(Some(held)) => {
            if held.format != format {
                // Envoy reads the file by its name: what it holds now it cannot parse.
                println!(
                    "note: {} holds {} but Envoy reads a file of that name as {}; writing {}",
                    path.display(),
                    held.format.name(),
                    format.name(),
                    format.name()
                );
            }
            held.vm_config.unwrap_or_else(default_vm)
        }
        Some(None) => {
            println!("note: {} is not a keyswap ECDS resource; replacing it (default vm_config)", path.display());
            default_vm()
        }
    };
    let bytes =
        ecds::encode(format, &text, &vm_config).map_err(|e| format!("{}: {e}; nothing written", path.display()))?;
    let same = existing.as_deref() == Some(bytes.as_slice());

    if same && !args.force {
        println!("unchanged: {} already holds version {version}; nothing written", path.display());
        let Some(admin) = admin else { return Ok(()) };
        let view = admin.wait_view(deadline)?;
        if view.accepted.as_deref() == Some(version.as_str()) {
            println!("active: Envoy runs version {version}");
            return Ok(());
        }
        let runs = view.accepted.as_deref().unwrap_or(DEFAULT_RUNS);
        let why = if view.dumped.as_deref() == Some(version.as_str()) {
            "Envoy read it and refused it (see Envoy's log for `keyswap: configuration refused`)"
        } else {
            "Envoy never read it: the file was written in place (cp, cat >), and Envoy reacts only to a rename; \
             `keyswap push --force` renames the same bytes into place"
        };
        return Err(format!("Envoy runs {runs}, not version {version}, although the file holds it: {why}"));
    }

    let before = admin.as_ref().map(Admin::view);
    if let Some(Err(e)) = &before {
        println!("note: {e}; writing anyway (Envoy reads the file when it starts), then waiting for Envoy");
    }
    let log_offset = args.envoy_log.as_deref().map(|p| std::fs::metadata(p).map_or(0, |m| m.len()));
    ecds::write_atomically(path, &bytes).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    let renamed = Instant::now();
    let previous = existing.as_deref().and_then(ecds::version_of);
    let replacing = match (&existing, &previous) {
        _ if same => " (--force: the same bytes again, renamed so that Envoy reads them)".to_string(),
        (None, _) => String::new(),
        (Some(_), Some(previous)) => format!(", replacing version {previous}"),
        (Some(_), None) => ", replacing a file with no keyswap configuration".to_string(),
    };
    println!("wrote {}: version {version} ({summary}){replacing}", path.display());
    let Some(admin) = admin else { return Ok(()) };

    let pushed = Pushed { path, bytes: &bytes, version: &version, existing: existing.as_deref(), env: &env_of(&text) };
    let log = args.envoy_log.as_deref().zip(log_offset);
    confirm(&admin, &pushed, before.and_then(Result::ok), renamed, deadline, timeout, log)
}

/// What one push wrote, and what it replaced.
struct Pushed<'a> {
    path: &'a Path,
    bytes: &'a [u8],
    version: &'a str,
    existing: Option<&'a [u8]>,
    /// The variables the configuration reads from Envoy's environment.
    env: &'a [String],
}

/// Polls Envoy's admin until it runs `pushed.version` (Ok), refuses it
/// (restores the file, Err), something else replaces the file, or
/// `deadline` passes. A restarted Envoy is followed: its counters start
/// at 0 and it reads the file at start.
fn confirm(
    admin: &Admin,
    pushed: &Pushed<'_>,
    mut baseline: Option<EnvoyView>,
    renamed: Instant,
    deadline: Instant,
    timeout: Duration,
    log: Option<(&Path, u64)>,
) -> Result<(), String> {
    let version = pushed.version;
    let mut last: Option<EnvoyView> = baseline.clone();
    let mut unreachable: Option<String> = None;
    let mut restarted = false;
    loop {
        // When this poll was sent: the figure reported is within one poll
        // interval (5 ms) of the moment Envoy's stats first showed the
        // version, and does not include the admin's answer time.
        let asked = renamed.elapsed();
        match admin.stats_view() {
            Err(e) => {
                if unreachable.is_none() {
                    println!("waiting: {e} (restarting?); waiting up to {timeout:?} in all");
                }
                unreachable = Some(e);
            }
            Ok(mut view) => {
                // Fewer reads of the file than before: another Envoy process,
                // whose counters started at 0 and which read the file at start.
                let new_envoy = last.as_ref().is_some_and(|l| view.attempts < l.attempts);
                if unreachable.take().is_some() {
                    println!("Envoy's admin answers again{}", if new_envoy { " (a new Envoy process)" } else { "" });
                    baseline = None;
                }
                if new_envoy {
                    restarted = true;
                    baseline = None;
                }
                last = Some(view.clone());
                if view.accepted.as_deref() == Some(version) {
                    let by = if restarted { " (an Envoy that restarted during the push)" } else { "" };
                    println!(
                        "active: Envoy runs version {version}{by} ({} ms from the rename to Envoy applying it, by its ECDS stats)",
                        asked.as_millis()
                    );
                    return Ok(());
                }
                if std::fs::read(pushed.path).ok().as_deref() != Some(pushed.bytes) {
                    let holds = std::fs::read(pushed.path).ok().and_then(|b| ecds::version_of(&b));
                    return Err(format!(
                        "superseded: {} no longer holds version {version} (it holds {}): something other than \
                         keyswap push (which waits for this one) replaced it; Envoy runs {}; version {version} is not in effect",
                        pushed.path.display(),
                        holds.as_deref().unwrap_or("no keyswap configuration"),
                        view.accepted.as_deref().unwrap_or(DEFAULT_RUNS)
                    ));
                }
                let refusals = view.rejected + view.failed;
                let grew = baseline.as_ref().map_or(refusals > 0, |b| refusals > b.rejected + b.failed);
                if grew {
                    admin.add_dump(&mut view).ok();
                    if view.dumped.as_deref() == Some(version) {
                        return Err(rejected(admin, pushed, &view, log, deadline));
                    }
                }
            }
        }
        if Instant::now() >= deadline {
            let Some(view) = last.filter(|_| unreachable.is_none()) else {
                return Err(format!(
                    "Envoy's admin did not answer within {timeout:?} ({}); {} holds version {version}, which \
                     Envoy reads when it starts",
                    unreachable.unwrap_or_default(),
                    pushed.path.display()
                ));
            };
            let mut view = view;
            admin.add_dump(&mut view).ok();
            return Err(format!(
                "Envoy did not take version {version} within {timeout:?} (it runs {}; config_dump shows {}); \
                 is --ecds the file this Envoy watches?",
                view.accepted.as_deref().unwrap_or(DEFAULT_RUNS),
                view.dumped.as_deref().unwrap_or("no keyswap resource"),
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Envoy refused the push: says so, with Envoy's reason, and puts back
/// what this push replaced if the file still holds this push's bytes.
/// Returns the (already printed) error.
fn rejected(
    admin: &Admin,
    pushed: &Pushed<'_>,
    view: &EnvoyView,
    log: Option<(&Path, u64)>,
    deadline: Instant,
) -> String {
    let version = pushed.version;
    let runs = view.accepted.as_deref().unwrap_or(DEFAULT_RUNS);
    println!("rejected: Envoy refused version {version} and keeps running {runs}");
    if let Some(error) = &view.dump_error {
        println!("  Envoy: {error}");
    }
    let reason_found = match log {
        Some((log, offset)) => print_reasons(log, offset, deadline),
        None => {
            println!("  (give --envoy-log PATH to see Envoy's reason; it logs it, the admin does not keep it)");
            true
        }
    };
    if !reason_found && !pushed.env.is_empty() {
        println!(
            "  (Envoy logs the filter's reason only the first time it refuses a configuration, then caches the \
             failure; this one reads {} from Envoy's environment: is each set in Envoy's process and listed in \
             vm_config host_env_keys?)",
            pushed.env.join(", ")
        );
    }
    restore(admin, pushed, deadline);
    String::new()
}

/// Puts back what the ECDS file held before a push Envoy rejected, so that
/// the file says what Envoy runs and a restart does not start from the
/// refused resource; only if the file still holds this push's bytes (else
/// someone else's write would be undone).
fn restore(admin: &Admin, pushed: &Pushed<'_>, deadline: Instant) {
    let path = pushed.path;
    if std::fs::read(path).ok().as_deref() != Some(pushed.bytes) {
        println!(
            "  not restored: {} no longer holds version {} (something else replaced it)",
            path.display(),
            pushed.version
        );
        return;
    }
    let Some(previous) = pushed.existing else {
        println!("  {} keeps the refused resource (it held nothing before); push a good configuration", path.display());
        return;
    };
    if previous == pushed.bytes {
        println!("  nothing to restore: {} held version {} before this push", path.display(), pushed.version);
        return;
    }
    if let Err(e) = ecds::write_atomically(path, previous) {
        println!("  could not restore {}: {e}; push a good configuration", path.display());
        return;
    }
    let Some(previous) = ecds::version_of(previous) else {
        println!("  restored {} to what it held before the push (no keyswap configuration)", path.display());
        return;
    };
    // Envoy reads the restored file too; say whether it runs it (asked at
    // least once, then until --timeout runs out).
    let runs = loop {
        let view = admin.stats_view().ok();
        let runs = view.and_then(|v| v.accepted);
        if runs.as_deref() == Some(previous.as_str()) || Instant::now() >= deadline {
            break runs;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    println!(
        "  restored {} to what it held before the push (version {previous}); Envoy runs {}",
        path.display(),
        runs.as_deref().unwrap_or(DEFAULT_RUNS)
    );
}

/// The variables a configuration reads from the VM's environment.
fn env_of(text: &str) -> Vec<String> {
    serde_json::from_str::<Value>(text).map(|v| ecds::env_names(&v)).unwrap_or_default()
}

/// Loads `text` into a fresh VM of the filter, with a placeholder for every
/// variable it names; returns the load line's summary.
fn check(module: &FilterModule, text: &str) -> Result<String, String> {
    let env: BTreeMap<String, String> = env_of(text).into_iter().map(|n| (n, PLACEHOLDER.to_string())).collect();
    match module.configure(text.as_bytes(), &env) {
        Ok(instance) => Ok(instance
            .log()
            .iter()
            .rev()
            .find(|e| e.level >= LogLevel::Info)
            .and_then(|e| keyswap_policy::Summary::from_log_line(&e.message))
            .map(|s| format!("{} clients, {} routes", s.clients, s.routes))
            .unwrap_or_else(|| "loaded".to_string())),
        Err(HarnessError::Refused { log }) => {
            let lines: Vec<&str> = log.lines().filter(|l| l.contains("refused") || l.contains("panic")).collect();
            let why = if lines.is_empty() { "the filter refused it".to_string() } else { lines.join("; ") };
            Err(format!("{why} (nothing written)").replace("keyswap: ", ""))
        }
        Err(err) => Err(err.to_string()),
    }
}

/// Prints the lines Envoy logged after `offset` that say why it refused an
/// update (waiting briefly: the log may trail the stats); true when the
/// filter's own reason was among them.
fn print_reasons(log: &Path, offset: u64, deadline: Instant) -> bool {
    let wanted = |l: &&str| {
        l.contains("config update rejected")
            || l.contains("config update failure")
            || l.contains("configuration refused")
    };
    // Read at least once; wait at most 2 s, and never past --timeout.
    let deadline = deadline.min(Instant::now() + Duration::from_secs(2));
    let lines: Vec<String> = loop {
        let text = std::fs::read(log).ok().map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
        // A log that shrank was started again (a restarted Envoy): read it all.
        let offset = if (text.len() as u64) < offset { 0 } else { offset };
        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(text.len());
        let new = text.get(start..).unwrap_or_default();
        let mut lines: Vec<String> = new.lines().filter(wanted).map(|l| without_prefix(l).to_string()).collect();
        // One line per worker says the same thing.
        let mut seen = std::collections::BTreeSet::new();
        lines.retain(|l| seen.insert(l.clone()));
        if lines.iter().any(|l| l.contains("config update")) || Instant::now() >= deadline {
            break lines;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if lines.is_empty() {
        println!("  (no rejection found in {})", log.display());
    }
    let reason = lines.iter().any(|l| l.contains("configuration refused"));
    for line in lines {
        println!("  Envoy: {line}");
    }
    reason
}

/// An Envoy log line without its `[time][thread][level][logger] [source:line] ` prefix.
fn without_prefix(line: &str) -> &str {
    let rest = line.find("[source/").and_then(|i| line[i..].find("] ").map(|j| &line[i + j + 2..])).unwrap_or(line);
    rest.strip_prefix("wasm log: ").unwrap_or(rest)
}

/// Envoy's admin endpoint, asked with hyper's pooled HTTP/1.1 client on
/// a runtime of this thread's own.
struct Admin {
    /// `HOST:PORT`.
    authority: String,
    client: Client<HttpConnector, Empty<Bytes>>,
    runtime: tokio::runtime::Runtime,
}

impl Admin {
    fn parse(url: &str) -> Result<Self, String> {
        let rest = url.strip_prefix("http://").ok_or_else(|| format!("--envoy-admin {url}: want http://HOST:PORT"))?;
        let authority = rest.split('/').next().unwrap_or_default();
        if authority.is_empty() || !authority.contains(':') {
            return Err(format!("--envoy-admin {url}: want http://HOST:PORT"));
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the async runtime: {e}"))?;
        let mut connector = HttpConnector::new();
        // Short enough to notice a restarted Envoy; a paused Envoy is
        // waited for by asking again, within --timeout.
        connector.set_connect_timeout(Some(Duration::from_secs(1)));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Ok(Self { authority: authority.to_string(), client, runtime })
    }

    /// The ECDS stats and the config dump.
    fn view(&self) -> Result<EnvoyView, String> {
        let mut view = self.stats_view()?;
        self.add_dump(&mut view)?;
        Ok(view)
    }

    /// [`Admin::view`], waiting for an admin that does not answer yet
    /// (Envoy starting) until `deadline`.
    fn wait_view(&self, deadline: Instant) -> Result<EnvoyView, String> {
        loop {
            match self.view() {
                Ok(view) => return Ok(view),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// The ECDS stats alone (cheap: polled while waiting).
    fn stats_view(&self) -> Result<EnvoyView, String> {
        let mut view = EnvoyView::default();
        let filter = format!("^extension_config_discovery\\.http_filter\\.{}\\.", ecds::RESOURCE_NAME);
        ecds::parse_stats(&self.get(&format!("/stats?filter={filter}"))?, &mut view);
        Ok(view)
    }

    /// Adds what `/config_dump` says of the resource to `view`.
    fn add_dump(&self, view: &mut EnvoyView) -> Result<(), String> {
        let dump = self.get("/config_dump?resource=ecds_filters")?;
        // An Envoy without ECDS answers an empty object, or an error text.
        if let Ok(dump) = serde_json::from_str::<Value>(&dump) {
            ecds::parse_config_dump(&dump, view);
        }
        Ok(())
    }

    /// GET `path`; the body of a 200 answer.
    fn get(&self, path: &str) -> Result<String, String> {
        let fail = |e: &dyn std::fmt::Display| format!("Envoy's admin at http://{}: {e}", self.authority);
        let uri: hyper::Uri = format!("http://{}{path}", self.authority).parse().map_err(|e| fail(&e))?;
        let request = async {
            let response = self.client.get(uri).await.map_err(|e| fail(&ErrorChain(&e)))?;
            let status = response.status();
            let body = response.into_body().collect().await.map_err(|e| fail(&e))?.to_bytes();
            Ok::<_, String>((status, body))
        };
        // Long enough for a big dump.
        let (status, body) = self
            .runtime
            .block_on(async { tokio::time::timeout(Duration::from_secs(3), request).await })
            .map_err(|_| fail(&"no answer within 3 s (paused?)"))??;
        if status != hyper::StatusCode::OK {
            return Err(fail(&format!("GET {path}: {status}")));
        }
        Ok(String::from_utf8_lossy(&body).into_owned())
    }
}

/// An error and its sources, `: `-separated (hyper-util's client error
/// says only "client error (Connect)" without them).
struct ErrorChain<'a>(&'a dyn std::error::Error);

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(e) = source {
            write!(f, ": {e}")?;
            source = e.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envoy_prefixes_are_removed() {
        let line = "[2026-11-23 10:59:31.789][27757][error][wasm] [source/extensions/common/wasm/context.cc:1157] \
                    wasm log: keyswap: configuration refused: x: y";
        assert_eq!(without_prefix(line), "keyswap: configuration refused: x: y");
    }

    #[test]
    fn admin_urls_need_a_port() {
        assert!(Admin::parse("http://127.0.0.1:9901").is_ok());
        assert!(Admin::parse("127.0.0.1:9901").is_err());
        assert!(Admin::parse("http://localhost/").is_err());
    }
}
