//! keyswap's configuration pushed to a running Envoy through ECDS, and the
//! measurement of a revocation: shared by the end-to-end tests
//! (`tests/all/revocation.rs`) and the benchmark (`bench-revocation`).
//!
//! ```text
//! EcdsGateway::start ─▶ Envoy (--concurrency 2), its keyswap filter from
//!                       config_discovery: a watched file in the run's dir
//! push(config) ───────▶ ecds::encode (binary .pb, or JSON) + write_atomically ─▶ Envoy reloads
//! Envoy's log ────────▶ which worker thread loaded / denied what, and when
//! ```
//!
//! Which worker served a request is read from Envoy's own log: every line
//! carries its thread id, the filter logs `configuration loaded` once per
//! worker (and on the main thread), and the first denial of each
//! configuration on each worker is always logged (the audit limiter starts
//! empty with every configuration). Envoy runs with `TZ=UTC`, so its log
//! times compare with this process's clock.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::ecds;
use crate::echo::Echo;
use crate::envoy::{filter_wasm, gateway, Envoy, Launch, Listener, LogLevels};
use crate::http::{Request, Response};

/// The listener's name in an [`EcdsGateway`].
pub const LISTENER: &str = "gateway";

/// An Envoy whose keyswap filter takes its configuration from an ECDS file,
/// in front of an echo upstream.
pub struct EcdsGateway {
    pub envoy: Envoy,
    pub echo: Echo,
    /// The file Envoy watches.
    pub ecds: PathBuf,
    /// The filter's `vm_config` (absolute wasm path, the VM's environment).
    pub vm_config: Value,
    /// How the ECDS file is encoded: binary (`keyswap.pb`, as `envoy.yaml`)
    /// unless [`Options::json`].
    pub format: ecds::Format,
    pub addr: SocketAddr,
    /// How Envoy was started, for [`EcdsGateway::restart`].
    launch: Launch,
    log: LogLevels,
}

/// How an [`EcdsGateway`] differs from the plain one.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The keyswap configuration of the ECDS `default_config` (what Envoy
    /// serves without a usable ECDS file); the listener's own if `None`.
    pub default_config: Option<String>,
    /// Admin and listener on ports picked once, so that a restarted Envoy
    /// answers where the first one did (a push in flight keeps its admin URL).
    pub fixed_ports: bool,
    /// A JSON ECDS file (`keyswap.json`) instead of the binary
    /// `keyswap.pb` `envoy.yaml` uses.
    pub json: bool,
}

/// A loopback port free right now (the kernel's pick; released at once).
///
/// # Errors
/// No port could be bound.
pub fn free_port() -> Result<u16, String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("a free port: {e}"))?;
    listener.local_addr().map(|a| a.port()).map_err(|e| format!("a free port: {e}"))
}

/// A bootstrap like [`gateway`]'s with one listener, whose keyswap filter
/// is discovered from `ecds` (watched directory: its parent) with the
/// listener's own configuration as `default_config`.
pub fn ecds_bootstrap(listener: &Listener, upstream: SocketAddr, wasm: &Path, ecds: &Path) -> Value {
    let mut bootstrap = gateway(std::slice::from_ref(listener), upstream, wasm);
    let filters = &mut bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        ["http_filters"];
    let inline = filters[0]["typed_config"].take();
    let dir = ecds.parent().map(Path::to_path_buf).unwrap_or_default();
    // One resource, discovered by the listener's filter and by every
    // cluster's: both stages always run the same configuration.
    let discovered = json!({
        "name": ecds::RESOURCE_NAME,
        "config_discovery": {
            "config_source": {"path_config_source": {
                "path": ecds.display().to_string(),
                "watched_directory": {"path": dir.display().to_string()},
            }},
            "default_config": inline,
            "apply_default_config_without_warming": true,
            "type_urls": [ecds::WASM_TYPE],
        },
    });
    filters[0] = discovered.clone();
    if let Some(clusters) = bootstrap["static_resources"]["clusters"].as_array_mut() {
        for cluster in clusters {
            cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
                ["http_filters"][0] = discovered.clone();
        }
    }
    bootstrap
}

impl EcdsGateway {
    /// Starts Envoy with `config` both as the default and as the ECDS
    /// file's first resource, and `env` as the VM's environment; returns
    /// once the filter logged that configuration.
    ///
    /// # Errors
    /// Envoy or the filter is missing, or Envoy does not start.
    pub fn start(config: &str, env: &[(&str, &str)]) -> Result<Self, String> {
        let listener = Listener {
            name: LISTENER.into(),
            config: config.into(),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>(),
            ..Listener::default()
        };
        Self::start_with(listener, &[], &LogLevels::serving())
    }

    /// [`EcdsGateway::start`] for a `listener` of the caller's (its name
    /// becomes [`LISTENER`]), with `envoy_env` in Envoy's own environment
    /// (for the listener's `host_env_keys`) and Envoy logging at `log`.
    ///
    /// # Errors
    /// As [`EcdsGateway::start`].
    pub fn start_with(listener: Listener, envoy_env: &[(&str, &str)], log: &LogLevels) -> Result<Self, String> {
        Self::start_options(listener, envoy_env, log, &Options::default())
    }

    /// [`EcdsGateway::start_with`] with [`Options`].
    ///
    /// # Errors
    /// As [`EcdsGateway::start`].
    pub fn start_options(
        listener: Listener,
        envoy_env: &[(&str, &str)],
        log: &LogLevels,
        options: &Options,
    ) -> Result<Self, String> {
        let wasm = filter_wasm()?;
        let echo = Echo::start("127.0.0.1:0").map_err(|e| format!("echo upstream: {e}"))?;
        let listener = Listener { name: LISTENER.into(), ..listener };
        let config = listener.config.clone();
        let dir = std::env::temp_dir().join(format!(
            "keyswap-ecds-{}-{}",
            std::process::id(),
            SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos())
        ));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let (format, name) =
            if options.json { (ecds::Format::Json, "keyswap.json") } else { (ecds::Format::Binary, "keyswap.pb") };
        let ecds_path = dir.join(name);
        let mut bootstrap = ecds_bootstrap(&listener, echo.addr(), &wasm, &ecds_path);
        let discovery = &mut bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
            ["typed_config"]["http_filters"][0]["config_discovery"];
        if let Some(default) = &options.default_config {
            discovery["default_config"]["config"]["configuration"]["value"] = json!(default);
        }
        if options.fixed_ports {
            bootstrap["admin"]["address"]["socket_address"]["port_value"] = json!(free_port()?);
            bootstrap["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"] =
                json!(free_port()?);
        }
        let filter = &bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
            ["http_filters"][0];
        let vm_config = filter["config_discovery"]["default_config"]["config"]["vm_config"].clone();
        let first = ecds::encode(format, &config, &ecds::VmConfig::Json(vm_config.clone()))?;
        ecds::write_atomically(&ecds_path, &first).map_err(|e| format!("{}: {e}", ecds_path.display()))?;
        let mut env = vec![("TZ".to_string(), "UTC".to_string())];
        env.extend(envoy_env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let launch = Launch {
            file_name: "envoy.json".into(),
            text: bootstrap.to_string(),
            env,
            expect_configs: vec![config],
            ..Launch::default()
        };
        let envoy = Envoy::start_logging(&launch, log)?;
        let addr = envoy.listener(LISTENER)?;
        Ok(Self { envoy, echo, ecds: ecds_path, vm_config, format, addr, launch, log: log.clone() })
    }

    /// Kills Envoy and starts it again with the same bootstrap, environment
    /// and ECDS file (whatever that holds now); returns once the new Envoy
    /// is ready and has logged loading each of `expect` (keyswap
    /// configurations). With [`Options::fixed_ports`] it answers on the
    /// same ports.
    ///
    /// # Errors
    /// The new Envoy does not start.
    pub fn restart(&mut self, expect: &[String]) -> Result<(), String> {
        self.envoy.kill();
        self.start_again(expect)
    }

    /// Starts Envoy after [`Envoy::kill`]: see [`EcdsGateway::restart`].
    ///
    /// # Errors
    /// The new Envoy does not start.
    pub fn start_again(&mut self, expect: &[String]) -> Result<(), String> {
        let launch = Launch { expect_configs: expect.to_vec(), ..self.launch.clone() };
        self.envoy = Envoy::start_logging(&launch, &self.log)?;
        self.addr = self.envoy.listener(LISTENER)?;
        Ok(())
    }

    /// Runs `keyswap push CONFIG_FILE` against this Envoy (its ECDS file,
    /// admin and log) with the filter under test.
    ///
    /// # Errors
    /// The CLI or the filter is missing, or the CLI could not run.
    pub fn push_cli(&self, config_file: &Path) -> Result<std::process::Output, String> {
        self.push_command(config_file, &[])?.output().map_err(|e| format!("keyswap push: {e}"))
    }

    /// The `keyswap push CONFIG_FILE` command of [`EcdsGateway::push_cli`]
    /// with `extra` arguments (`--timeout`, `--force`), to run or spawn.
    ///
    /// # Errors
    /// The CLI or the filter is missing.
    pub fn push_command(&self, config_file: &Path, extra: &[&str]) -> Result<std::process::Command, String> {
        let mut command = std::process::Command::new(keyswap_cli()?);
        command
            .arg("push")
            .arg(config_file)
            .arg("--ecds")
            .arg(&self.ecds)
            .arg("--envoy-admin")
            .arg(format!("http://{}", self.envoy.admin()))
            .arg("--envoy-log")
            .arg(self.envoy.log_path())
            .arg("--filter")
            .arg(filter_wasm()?)
            .args(extra)
            .env_remove("KEYSWAP_FILTER");
        Ok(command)
    }

    /// Writes `config` as the ECDS resource (temp file + rename); returns the
    /// moment of the rename.
    ///
    /// # Errors
    /// The file could not be written.
    pub fn push(&self, config: &str) -> Result<SystemTime, String> {
        ecds::write_atomically(&self.ecds, &self.file_bytes(config)?)
            .map_err(|e| format!("{}: {e}", self.ecds.display()))
    }

    /// The ECDS file's bytes for `config`, in this gateway's format, with
    /// its `vm_config`: what `keyswap push` writes there.
    ///
    /// # Errors
    /// The `vm_config` cannot be encoded (not for the gateway's own).
    pub fn file_bytes(&self, config: &str) -> Result<Vec<u8>, String> {
        ecds::encode(self.format, config, &ecds::VmConfig::Json(self.vm_config.clone()))
    }

    /// GET `path` on Envoy's admin; the body.
    ///
    /// # Errors
    /// The admin did not answer 200.
    pub fn admin(&self, path: &str) -> Result<String, String> {
        let response =
            Request::get(path).header("host", "admin").send(self.envoy.admin()).map_err(|e| e.to_string())?;
        if response.status == 200 {
            Ok(response.text())
        } else {
            Err(format!("admin {path}: {} {}", response.status, response.text()))
        }
    }

    /// What Envoy's admin says about the keyswap ECDS resource.
    ///
    /// # Errors
    /// The admin did not answer.
    pub fn view(&self) -> Result<ecds::EnvoyView, String> {
        let mut view = ecds::EnvoyView::default();
        ecds::parse_stats(&self.admin("/stats?filter=^extension_config_discovery")?, &mut view);
        let dump: Value = serde_json::from_str(&self.admin("/config_dump?resource=ecds_filters")?)
            .map_err(|e| format!("config_dump: {e}"))?;
        ecds::parse_config_dump(&dump, &mut view);
        Ok(view)
    }
}

/// `GET /v1/things` with `authorization: Bearer <key>` on a new connection.
pub fn keyed(key: &str) -> Request {
    Request::get("/v1/things").header("host", "gateway.test").header("authorization", format!("Bearer {key}"))
}

/// [`keyed`] with `connection: close`, for one request on a new
/// connection: Envoy closes first, so the TIME_WAIT is its, and a prober
/// opening thousands of connections does not use up the client's ports.
pub fn keyed_once(key: &str) -> Request {
    keyed(key).header("connection", "close")
}

/// True for keyswap's 401 `invalid_key` answer.
pub fn is_invalid_key(response: &Response) -> bool {
    response.status == 401 && response.json().is_ok_and(|b| b["error"] == "invalid_key")
}

/// One line of Envoy's log: `[2026-11-23 10:59:25.556][27757][info][wasm] …`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub time: SystemTime,
    pub thread: u64,
    pub text: String,
}

/// Parses Envoy's default log format (times in UTC); other lines are skipped.
pub fn parse_log(log: &str) -> Vec<LogLine> {
    log.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<LogLine> {
    let rest = line.strip_prefix('[')?;
    let (stamp, rest) = rest.split_once("][")?;
    let (thread, _) = rest.split_once(']')?;
    let (date, clock) = stamp.split_once(' ')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (year, month, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, millis) = clock.split_once('.')?;
    let mut t = hms.split(':').map(|p| p.parse::<i64>().ok());
    let (h, m, s) = (t.next()??, t.next()??, t.next()??);
    let seconds = days_from_civil(year, month, day) * 86_400 + h * 3600 + m * 60 + s;
    let millis: u64 = millis.parse().ok()?;
    let time = UNIX_EPOCH + Duration::from_secs(u64::try_from(seconds).ok()?) + Duration::from_millis(millis);
    Some(LogLine { time, thread: thread.parse().ok()?, text: line.to_string() })
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year - era * 400;
    let doy = (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Envoy's main thread: the thread of its first log line.
pub fn main_thread(lines: &[LogLine]) -> Option<u64> {
    lines.first().map(|l| l.thread)
}

/// The worker threads that logged loading `version` at or after `since`
/// (all but `main`, which loads every configuration too).
pub fn workers(lines: &[LogLine], main: Option<u64>, version: &str, since: SystemTime) -> BTreeMap<u64, SystemTime> {
    let since = since.checked_sub(Duration::from_millis(1)).unwrap_or(since);
    let mut out = BTreeMap::new();
    for line in lines.iter().filter(|l| l.time >= since && Some(l.thread) != main) {
        if keyswap_policy::Summary::from_log_line(&line.text).is_some_and(|s| s.version == version) {
            out.entry(line.thread).or_insert(line.time);
        }
    }
    out
}

/// Envoy's log read as it grows: only new bytes are parsed, and only the
/// first line (the main thread's) and keyswap's lines are kept.
pub struct LogTail {
    path: PathBuf,
    offset: u64,
    partial: String,
    pub lines: Vec<LogLine>,
}

impl LogTail {
    pub fn new(path: &Path) -> Self {
        Self { path: path.to_path_buf(), offset: 0, partial: String::new(), lines: Vec::new() }
    }

    /// Reads what was appended since the last call.
    pub fn poll(&mut self) {
        use std::io::{Read as _, Seek as _};
        let Ok(mut file) = std::fs::File::open(&self.path) else {
            return;
        };
        if file.seek(std::io::SeekFrom::Start(self.offset)).is_err() {
            return;
        }
        let mut bytes = Vec::new();
        let Ok(n) = file.read_to_end(&mut bytes) else {
            return;
        };
        self.offset += n as u64;
        self.partial.push_str(&String::from_utf8_lossy(&bytes));
        let Some(end) = self.partial.rfind('\n') else {
            return;
        };
        let complete: String = self.partial.drain(..=end).collect();
        for line in complete.lines() {
            if self.lines.is_empty() || line.contains("keyswap: ") {
                if let Some(parsed) = parse_line(line) {
                    self.lines.push(parsed);
                }
            }
        }
    }
}

/// Per worker thread, the first line at or after `since` that contains `needle`.
pub fn first_per_thread<'a>(lines: &'a [LogLine], since: SystemTime, needle: &str) -> BTreeMap<u64, &'a LogLine> {
    let mut out = BTreeMap::new();
    // Log times are truncated to the millisecond.
    let since = since.checked_sub(Duration::from_millis(1)).unwrap_or(since);
    for line in lines.iter().filter(|l| l.time >= since && l.text.contains(needle)) {
        out.entry(line.thread).or_insert(line);
    }
    out
}

/// The `keyswap: denied reason=invalid_key` audit line.
pub const INVALID_KEY_LINE: &str = "keyswap: denied reason=invalid_key";

/// `later - earlier`, 0 when `later` is (by a truncated millisecond) earlier.
pub fn since(earlier: SystemTime, later: SystemTime) -> Duration {
    later.duration_since(earlier).unwrap_or_default()
}

/// The `keyswap` binary cargo built next to the running test (`cargo test
/// --workspace` builds it; alone: `cargo build -p keyswap-harness --bin
/// keyswap`), or `KEYSWAP_CLI`.
///
/// # Errors
/// There is no such file.
pub fn keyswap_cli() -> Result<PathBuf, String> {
    let path = match std::env::var_os("KEYSWAP_CLI") {
        Some(path) => PathBuf::from(path),
        None => {
            let exe = std::env::current_exe().map_err(|e| format!("the test's path: {e}"))?;
            exe.parent().and_then(Path::parent).map(|debug| debug.join("keyswap")).ok_or("no target/debug")?
        }
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "no keyswap CLI at {}: build it with `cargo build -p keyswap-harness --bin keyswap` (or set KEYSWAP_CLI)",
            path.display()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envoy_log_lines_are_parsed_in_utc() {
        let line = "[2026-11-23 10:59:25.556][27757][info][wasm] [source/x.cc:1] wasm log: keyswap: configuration loaded: 1 clients, 1 routes, version abc";
        let parsed = parse_line(line).unwrap();
        assert_eq!(parsed.thread, 27757);
        // date -u -d '2026-11-23 10:59:25' +%s
        assert_eq!(parsed.time, UNIX_EPOCH + Duration::from_millis(1_795_431_565_556));
        assert_eq!(parse_line("not a log line"), None);
        let first = "[2026-11-23 10:59:25.000][1][info][main] starting";
        let lines = parse_log(&format!("{first}\n{line}\n{}", line.replace("27757", "9")));
        let main = main_thread(&lines);
        assert_eq!(main, Some(1));
        let all: Vec<u64> = workers(&lines, main, "abc", UNIX_EPOCH).into_keys().collect();
        assert_eq!(all, [9, 27757]);
        assert!(workers(&lines, main, "abd", UNIX_EPOCH).is_empty());
        assert!(workers(&lines, main, "abc", parsed.time + Duration::from_millis(2)).is_empty());
    }
}
