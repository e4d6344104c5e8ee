//! The real Envoy, run as a child process for a test.
//!
//! - [`envoy_binary`] and [`filter_wasm`] find what `scripts/setup` installs
//!   and builds (`KEYSWAP_ENVOY`, `KEYSWAP_FILTER` override them).
//! - [`gateway`] writes a bootstrap: an admin and any number of listeners,
//!   each with its own keyswap configuration and VM environment, placed as
//!   keyswap is deployed: an HTTP filter of the listener (the first stage)
//!   and an upstream HTTP filter of each of the listener's clusters (the
//!   final stage). Each named route `N` goes to a cluster `N`, the
//!   catch-all route to `<listener>-default`; every cluster reaches the one
//!   upstream address. Every port is picked by the kernel
//!   (port 0); the admin's address comes back through
//!   `--admin-address-path` and the listeners' through the admin, so
//!   parallel tests never race for a port.
//! - [`Envoy::start`] runs it (`--concurrency 2 -l debug
//!   --disable-hot-restart`, so parallel Envoys share no memory segment and
//!   need no `--base-id`), waits on the admin's `/ready` (polled, bounded),
//!   then proves the filter is loaded with the expected configuration: the
//!   filter's log line `keyswap: configuration loaded: … version V`, where
//!   `V` is [`keyswap_policy::content_version`] of the configuration bytes.
//! - Dropping an [`Envoy`] kills it; if the thread is panicking (a failed
//!   test), Envoy's log is printed first and its directory kept.
//! - [`Envoy::start_logging`] is [`Envoy::start`] at other [`LogLevels`]
//!   (the leak test runs Envoy at `trace`); [`Envoy::start_with`] also sets
//!   the worker count (the benchmark: one worker, `warn` but `wasm:info`).
//! - The pieces [`gateway`] is made of build other bootstraps too (the
//!   benchmark's, `envoy-bench`): [`bootstrap`], [`http_listener`],
//!   [`cluster`] (with or without keyswap's final stage), [`wasm_filter`].
//! - [`wait_ready`] and [`wait_loaded`] are [`Envoy::start`]'s two waits,
//!   for an Envoy something else started (`envoy-tool wait`, `scripts/demo`).
//! - [`Envoy::refuse`] runs a configuration Envoy must refuse to start;
//!   [`validate`] runs `envoy --mode validate`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::http::Request;

/// How long Envoy may take to become ready (V8 compiles the filter once per
/// worker; a loaded 2-core machine is slow).
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The test-only request header that selects a named route in a
/// [`gateway`]: `x-test-route: openai` takes the Envoy route named
/// `openai`; without it the request takes the unnamed catch-all route.
pub const ROUTE_HEADER: &str = "x-test-route";

/// The repository root.
pub fn repo_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map_or_else(|| manifest.to_path_buf(), Path::to_path_buf)
}

/// The Envoy binary: `KEYSWAP_ENVOY`, else `.venv/bin/envoy` at the root.
///
/// # Errors
/// It does not exist; the message says to run `scripts/setup`.
pub fn envoy_binary() -> Result<PathBuf, String> {
    let path = std::env::var_os("KEYSWAP_ENVOY").map_or_else(|| repo_root().join(".venv/bin/envoy"), PathBuf::from);
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!("no Envoy at {}: run scripts/setup (or set KEYSWAP_ENVOY)", path.display()))
    }
}

/// The filter: `KEYSWAP_FILTER`, else the release wasm32-wasip1 build at the root.
///
/// # Errors
/// It does not exist; the message says to run `scripts/setup`.
pub fn filter_wasm() -> Result<PathBuf, String> {
    let path = std::env::var_os("KEYSWAP_FILTER")
        .map_or_else(|| repo_root().join("target/wasm32-wasip1/release/keyswap_filter.wasm"), PathBuf::from);
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!("no filter at {}: run scripts/setup (or set KEYSWAP_FILTER)", path.display()))
    }
}

/// One listener of a generated [`gateway`], with its own keyswap filter.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listener {
    /// The listener's name (also its stat prefix and route table name).
    pub name: String,
    /// The plugin configuration, passed to the filter byte for byte.
    pub config: String,
    /// The VM's environment (`vm_config.environment_variables.key_values`).
    pub env: BTreeMap<String, String>,
    /// Variables the VM inherits from Envoy's own environment
    /// (`vm_config.environment_variables.host_env_keys`).
    pub host_env_keys: Vec<String>,
    /// Envoy route names, each selected by [`ROUTE_HEADER`] and sent to the
    /// cluster of the same name; before the unnamed catch-all route.
    pub route_names: Vec<String>,
    /// More routes, `(route name, cluster)`, each selected by
    /// [`ROUTE_HEADER`] `route@cluster` (see [`route_selector`]).
    pub routes_to: Vec<(String, String)>,
}

/// The [`ROUTE_HEADER`] value that selects the Envoy route named `route`
/// sending to `cluster`: the route name alone when the cluster is named
/// like it.
pub fn route_selector(route: &str, cluster: &str) -> String {
    if route == cluster {
        route.to_string()
    } else {
        format!("{route}@{cluster}")
    }
}

impl Listener {
    /// The cluster of the catch-all route.
    pub fn default_cluster(&self) -> String {
        format!("{}-default", self.name)
    }

    /// Every cluster this listener's routes reach.
    pub fn clusters(&self) -> Vec<String> {
        let mut clusters = self.route_names.clone();
        for (_, cluster) in &self.routes_to {
            if !clusters.contains(cluster) {
                clusters.push(cluster.clone());
            }
        }
        clusters.push(self.default_cluster());
        clusters
    }
}

/// Splits `listeners` into groups whose clusters have distinct names, each
/// group one Envoy (a cluster carries one listener's keyswap
/// configuration, so two listeners cannot share a cluster name).
pub fn without_shared_clusters(listeners: &[Listener]) -> Vec<Vec<Listener>> {
    let mut groups: Vec<(Vec<Listener>, std::collections::BTreeSet<String>)> = Vec::new();
    for l in listeners {
        let names = l.clusters();
        match groups.iter_mut().find(|(_, taken)| names.iter().all(|n| !taken.contains(n))) {
            Some((group, taken)) => {
                taken.extend(names);
                group.push(l.clone());
            }
            None => groups.push((vec![l.clone()], names.into_iter().collect())),
        }
    }
    groups.into_iter().map(|(group, _)| group).collect()
}

/// A bootstrap: admin and listeners on loopback port 0, each listener's
/// clusters reaching `upstream`, the filter loaded from `wasm` in V8.
///
/// # Panics
/// Two listeners with a cluster of the same name (see
/// [`without_shared_clusters`]).
pub fn gateway(listeners: &[Listener], upstream: SocketAddr, wasm: &Path) -> serde_json::Value {
    let mut clusters: Vec<serde_json::Value> = Vec::new();
    let mut names = std::collections::BTreeSet::new();
    for l in listeners {
        let filter = keyswap_filter(l, wasm);
        for name in l.clusters() {
            assert!(names.insert(name.clone()), "two listeners of one bootstrap have a cluster `{name}`");
            clusters.push(cluster(&name, upstream, Some(&filter)));
        }
    }
    let listeners: Vec<serde_json::Value> = listeners.iter().map(|l| listener(l, wasm)).collect();
    bootstrap(listeners, clusters)
}

/// A bootstrap: the admin on loopback port 0 (its address comes back
/// through `--admin-address-path`), `listeners` and `clusters`.
pub fn bootstrap(listeners: Vec<serde_json::Value>, clusters: Vec<serde_json::Value>) -> serde_json::Value {
    json!({
        // Required as soon as a test adds dynamic resources (LDS).
        "node": {"id": "keyswap-test", "cluster": "keyswap-test"},
        "admin": {"address": loopback(0)},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    })
}

/// A cluster reaching `upstream` over HTTP/1.1; with `filter` (keyswap's
/// final stage), that as its upstream HTTP filter.
pub fn cluster(name: &str, upstream: SocketAddr, filter: Option<&serde_json::Value>) -> serde_json::Value {
    cluster_speaking(name, upstream, json!({"http_protocol_options": {}}), filter)
}

/// A cluster reaching `upstream` with Envoy's `explicit_http_config`
/// `protocol` (e.g. `{"http2_protocol_options": {}}`); with `filter`, that
/// as its upstream HTTP filter.
pub fn cluster_speaking(
    name: &str,
    upstream: SocketAddr,
    protocol: serde_json::Value,
    filter: Option<&serde_json::Value>,
) -> serde_json::Value {
    let mut options = json!({
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": protocol,
    });
    if let Some(filter) = filter {
        options["http_filters"] = json!([filter, {
            "name": "envoy.filters.http.upstream_codec",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec"},
        }]);
    }
    json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "2s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                "address": upstream.ip().to_string(),
                "port_value": upstream.port(),
            }}}}]}],
        },
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": options},
    })
}

fn loopback(port: u16) -> serde_json::Value {
    json!({"socket_address": {"address": "127.0.0.1", "port_value": port}})
}

/// The keyswap HTTP filter of listener `l`: the same object in the
/// listener's chain and in its clusters'.
pub fn keyswap_filter(l: &Listener, wasm: &Path) -> serde_json::Value {
    wasm_filter("keyswap", wasm, &l.config, &l.env, &l.host_env_keys)
}

/// A proxy-wasm HTTP filter named `name` (its plugin too) running `wasm`
/// in V8 with `configuration` byte for byte, the VM environment `env` and
/// the variables `host_env_keys` it inherits from Envoy's.
pub fn wasm_filter(
    name: &str,
    wasm: &Path,
    configuration: &str,
    env: &BTreeMap<String, String>,
    host_env_keys: &[String],
) -> serde_json::Value {
    json!({
        "name": name,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": name,
                "configuration": {
                    "@type": "type.googleapis.com/google.protobuf.StringValue",
                    "value": configuration,
                },
                "vm_config": {
                    "runtime": "envoy.wasm.runtime.v8",
                    "code": {"local": {"filename": wasm.display().to_string()}},
                    "environment_variables": {
                        "host_env_keys": host_env_keys,
                        "key_values": env,
                    },
                },
            },
        },
    })
}

fn listener(l: &Listener, wasm: &Path) -> serde_json::Value {
    let mut routes: Vec<serde_json::Value> = l
        .route_names
        .iter()
        .map(|name| {
            json!({
                "name": name,
                "match": {"prefix": "/", "headers": [{"name": ROUTE_HEADER, "string_match": {"exact": name}}]},
                "route": {"cluster": name},
            })
        })
        .collect();
    routes.extend(l.routes_to.iter().map(|(name, cluster)| {
        json!({
            "name": name,
            "match": {"prefix": "/", "headers": [{"name": ROUTE_HEADER, "string_match": {"exact": route_selector(name, cluster)}}]},
            "route": {"cluster": cluster},
        })
    }));
    routes.push(json!({"match": {"prefix": "/"}, "route": {"cluster": l.default_cluster()}}));
    http_listener(&l.name, routes, vec![keyswap_filter(l, wasm)])
}

/// A listener on loopback port 0 named `name` (also its stat prefix and
/// route table): an HTTP connection manager running `http_filters`, then
/// the router, over one virtual host of `routes` for every domain.
pub fn http_listener(
    name: &str,
    routes: Vec<serde_json::Value>,
    http_filters: Vec<serde_json::Value>,
) -> serde_json::Value {
    let hosts = json!([{"name": "all", "domains": ["*"], "routes": routes}]);
    http_listener_hosts(name, hosts, http_filters, serde_json::Map::new())
}

/// [`http_listener`] over Envoy's `virtual_hosts` as given, with `options`
/// added to its connection manager (`normalize_path`, …).
pub fn http_listener_hosts(
    name: &str,
    virtual_hosts: serde_json::Value,
    mut http_filters: Vec<serde_json::Value>,
    options: serde_json::Map<String, serde_json::Value>,
) -> serde_json::Value {
    http_filters.push(json!({
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
    }));
    let mut hcm = json!({
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": name,
        "route_config": {"name": name, "virtual_hosts": virtual_hosts},
        "http_filters": http_filters,
    });
    if let Some(hcm) = hcm.as_object_mut() {
        hcm.extend(options);
    }
    json!({
        "name": name,
        "address": loopback(0),
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}],
    })
}

/// How to run Envoy.
#[derive(Debug, Clone, Default)]
pub struct Launch {
    /// The bootstrap's file name; its extension tells Envoy the format
    /// (`envoy.json`, `envoy.yaml`).
    pub file_name: String,
    pub text: String,
    /// Envoy's environment; nothing else is inherited.
    pub env: Vec<(String, String)>,
    /// The working directory, against which relative paths in the
    /// configuration resolve; the run's temporary directory if `None`.
    pub cwd: Option<PathBuf>,
    /// keyswap configurations that must be loaded before Envoy counts as
    /// started (probed by their version in the filter's log).
    pub expect_configs: Vec<String>,
    /// More command-line arguments (`--config-yaml`, say).
    pub args: Vec<String>,
}

impl Launch {
    /// A [`gateway`] bootstrap, expecting every listener's configuration.
    pub fn gateway(listeners: &[Listener], upstream: SocketAddr, wasm: &Path) -> Self {
        Self {
            file_name: "envoy.json".into(),
            text: gateway(listeners, upstream, wasm).to_string(),
            expect_configs: listeners.iter().map(|l| l.config.clone()).collect(),
            ..Self::default()
        }
    }
}

/// A running Envoy; killed on drop.
pub struct Envoy {
    child: Child,
    dir: PathBuf,
    admin: SocketAddr,
    listeners: BTreeMap<String, SocketAddr>,
}

/// An Envoy that stopped by itself before it was ready.
#[derive(Debug)]
pub struct Refusal {
    pub status: ExitStatus,
    pub log: String,
}

/// A fresh directory for one run.
fn run_dir() -> Result<PathBuf, String> {
    static RUNS: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let name = format!("keyswap-envoy-{}-{}-{nanos}", std::process::id(), RUNS.fetch_add(1, Ordering::SeqCst));
    let dir = std::env::temp_dir().join(name);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(dir)
}

fn spawn(launch: &Launch, dir: &Path, extra: &[&str]) -> Result<Child, String> {
    let envoy = envoy_binary()?;
    let config = dir.join(&launch.file_name);
    std::fs::write(&config, &launch.text).map_err(|e| format!("{}: {e}", config.display()))?;
    let log = std::fs::File::create(dir.join("envoy.log")).map_err(|e| format!("envoy.log: {e}"))?;
    let log2 = log.try_clone().map_err(|e| format!("envoy.log: {e}"))?;
    Command::new(&envoy)
        .arg("-c")
        .arg(&config)
        .args(extra)
        .env_clear()
        .envs(launch.env.iter().map(|(k, v)| (k, v)))
        .current_dir(launch.cwd.as_deref().unwrap_or(dir))
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .spawn()
        .map_err(|e| format!("{}: {e}", envoy.display()))
}

/// How much Envoy logs: `-l` and, if set, `--component-log-level`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLevels {
    /// Every component's level (`trace`, `debug`, `info`, ...).
    pub level: String,
    /// Per-component exceptions, `component:level,component:level`.
    pub components: Option<String>,
}

impl LogLevels {
    /// What a serving test Envoy logs by default: everything at `debug`.
    pub fn serving() -> Self {
        Self { level: "debug".into(), components: None }
    }
}

/// `serving`: a gateway that will take requests (two workers, `log`);
/// otherwise a start that should fail at configuration, where neither
/// workers nor debug lines matter and each costs time.
fn run_args(dir: &Path, serving: bool, log: &LogLevels) -> Vec<String> {
    let admin = dir.join("admin-address");
    let (concurrency, level) = if serving { ("2", log.level.as_str()) } else { ("1", "info") };
    let mut args: Vec<String> = vec![
        "--concurrency".into(),
        concurrency.into(),
        "-l".into(),
        level.into(),
        "--disable-hot-restart".into(),
        "--admin-address-path".into(),
        admin.display().to_string(),
    ];
    if let (true, Some(components)) = (serving, &log.components) {
        args.extend(["--component-log-level".into(), components.clone()]);
    }
    args
}

/// The admin's address once Envoy has written it.
fn admin_address(dir: &Path) -> Option<SocketAddr> {
    std::fs::read_to_string(dir.join("admin-address")).ok()?.trim().parse().ok()
}

fn is_ready(admin: SocketAddr) -> bool {
    Request::get("/ready").header("host", "admin").send(admin).is_ok_and(|r| r.status == 200)
}

fn read_log(dir: &Path) -> String {
    std::fs::read(dir.join("envoy.log")).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
}

/// The last `lines` lines of `log`, with a header saying how many there were.
pub fn tail(log: &str, lines: usize) -> String {
    let all: Vec<&str> = log.lines().collect();
    let start = all.len().saturating_sub(lines);
    let mut out = format!("(last {} of {} lines)\n", all.len() - start, all.len());
    for line in &all[start..] {
        let _ = writeln!(out, "{line}");
    }
    out
}

/// Polls `done` every 20 ms until it gives an answer or `timeout` passes.
fn poll<T>(timeout: Duration, mut done: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = done() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How long keyswap may take to log a configuration once Envoy is ready.
pub const LOADED_TIMEOUT: Duration = Duration::from_secs(10);

/// Waits until Envoy's admin answers `/ready` with 200: `admin` gives its
/// address once known (`None` until then), `exited` how Envoy stopped once
/// it has (its exit status, say). Returns the admin's address.
///
/// # Errors
/// Envoy exited first, or `timeout` passed.
pub fn wait_ready(
    mut admin: impl FnMut() -> Option<SocketAddr>,
    mut exited: impl FnMut() -> Option<String>,
    timeout: Duration,
) -> Result<SocketAddr, String> {
    let ready = poll(timeout, || {
        if let Some(status) = exited() {
            return Some(Err(format!("Envoy exited ({status}) before it was ready")));
        }
        let admin = admin()?;
        is_ready(admin).then_some(Ok(admin))
    });
    ready.unwrap_or_else(|| Err(format!("Envoy was not ready within {timeout:?}")))
}

/// Waits until Envoy's log (`log` reads it) holds keyswap's
/// [`keyswap_policy::Summary::log_line`] for every version in `versions`;
/// returns those summaries, in `versions` order.
///
/// # Errors
/// A version was not logged within `timeout`.
pub fn wait_loaded(
    mut log: impl FnMut() -> String,
    versions: &[String],
    timeout: Duration,
) -> Result<Vec<keyswap_policy::Summary>, String> {
    let loaded = poll(timeout, || {
        let loaded: Vec<keyswap_policy::Summary> =
            log().lines().filter_map(keyswap_policy::Summary::from_log_line).collect();
        versions.iter().map(|v| loaded.iter().find(|s| &s.version == v).cloned()).collect::<Option<Vec<_>>>()
    });
    loaded.ok_or_else(|| format!("keyswap did not log `configuration loaded` for versions {versions:?}"))
}

impl Envoy {
    /// Starts Envoy and returns once it is ready and every expected keyswap
    /// configuration is loaded.
    ///
    /// # Errors
    /// Envoy is missing, exits, or is not ready in time; the message holds
    /// the end of its log.
    pub fn start(launch: &Launch) -> Result<Self, String> {
        Self::start_logging(launch, &LogLevels::serving())
    }

    /// [`Envoy::start`] with other log levels than `-l debug`.
    ///
    /// # Errors
    /// As [`Envoy::start`].
    pub fn start_logging(launch: &Launch, log: &LogLevels) -> Result<Self, String> {
        Self::start_with(launch, log, 2)
    }

    /// [`Envoy::start`] with `workers` worker threads (`--concurrency`).
    ///
    /// # Errors
    /// As [`Envoy::start`].
    pub fn start_workers(launch: &Launch, workers: u32) -> Result<Self, String> {
        Self::start_with(launch, &LogLevels::serving(), workers)
    }

    /// [`Envoy::start`] with other log levels and `workers` worker threads.
    ///
    /// # Errors
    /// As [`Envoy::start`].
    pub fn start_with(launch: &Launch, log: &LogLevels, workers: u32) -> Result<Self, String> {
        let dir = run_dir()?;
        let mut args = run_args(&dir, true, log);
        args[1] = workers.to_string();
        args.extend(launch.args.iter().cloned());
        let child = spawn(launch, &dir, &args.iter().map(String::as_str).collect::<Vec<_>>())?;
        // From here on, dropping `envoy` kills the child.
        let mut envoy = Self { child, dir, admin: SocketAddr::from(([127, 0, 0, 1], 0)), listeners: BTreeMap::new() };
        let fail = |envoy: &Envoy, why: &str| {
            format!("{why}\n---- Envoy log {}\n{}", envoy.log_path().display(), tail(&envoy.log(), 150))
        };
        let dir = envoy.dir.clone();
        let ready = wait_ready(
            || admin_address(&dir),
            || envoy.child.try_wait().ok().flatten().map(|s| s.to_string()),
            READY_TIMEOUT,
        );
        envoy.admin = ready.map_err(|why| fail(&envoy, &why))?;
        envoy.listeners = envoy.fetch_listeners().map_err(|e| fail(&envoy, &e))?;
        // The first check: the filter runs with exactly these configurations.
        let versions: Vec<String> =
            launch.expect_configs.iter().map(|c| keyswap_policy::content_version(c.as_bytes())).collect();
        wait_loaded(|| envoy.log(), &versions, LOADED_TIMEOUT).map_err(|why| fail(&envoy, &why))?;
        Ok(envoy)
    }

    /// Runs a configuration Envoy must refuse: returns once it has exited
    /// by itself, with its log (one worker, `-l info`: the refusal is
    /// logged at error level).
    ///
    /// # Errors
    /// Envoy became ready instead, exited with status 0, or neither
    /// happened in time.
    pub fn refuse(launch: &Launch) -> Result<Refusal, String> {
        let dir = run_dir()?;
        let mut args = run_args(&dir, false, &LogLevels::serving());
        args.extend(launch.args.iter().cloned());
        let child = spawn(launch, &dir, &args.iter().map(String::as_str).collect::<Vec<_>>())?;
        let mut envoy = Self { child, dir, admin: SocketAddr::from(([127, 0, 0, 1], 0)), listeners: BTreeMap::new() };
        let outcome = poll(READY_TIMEOUT, || {
            if let Ok(Some(status)) = envoy.child.try_wait() {
                return Some(Ok(status));
            }
            let admin = admin_address(&envoy.dir)?;
            is_ready(admin).then_some(Err("Envoy started and became ready; it should have refused".to_string()))
        });
        let log = envoy.log();
        match outcome {
            Some(Ok(status)) if !status.success() => Ok(Refusal { status, log }),
            Some(Ok(status)) => Err(format!("Envoy exited with {status}; it should have failed\n{}", tail(&log, 100))),
            Some(Err(why)) => Err(format!("{why}\n{}", tail(&log, 100))),
            None => Err(format!("Envoy neither exited nor became ready within {READY_TIMEOUT:?}\n{}", tail(&log, 100))),
        }
    }

    fn fetch_listeners(&self) -> Result<BTreeMap<String, SocketAddr>, String> {
        let response = Request::get("/listeners?format=json")
            .header("host", "admin")
            .send(self.admin)
            .map_err(|e| format!("admin /listeners: {e}"))?;
        let json = response.json().map_err(|e| format!("admin /listeners: {e}"))?;
        let mut out = BTreeMap::new();
        for status in json["listener_statuses"].as_array().into_iter().flatten() {
            let address = &status["local_address"]["socket_address"];
            let (Some(name), Some(ip), Some(port)) =
                (status["name"].as_str(), address["address"].as_str(), address["port_value"].as_u64())
            else {
                return Err(format!("admin /listeners: unexpected entry {status}"));
            };
            let addr = format!("{ip}:{port}").parse().map_err(|e| format!("admin /listeners: {e}"))?;
            out.insert(name.to_string(), addr);
        }
        Ok(out)
    }

    /// The admin's address.
    pub fn admin(&self) -> SocketAddr {
        self.admin
    }

    /// The address of listener `name`.
    ///
    /// # Errors
    /// Envoy has no such listener.
    pub fn listener(&self, name: &str) -> Result<SocketAddr, String> {
        self.listeners.get(name).copied().ok_or_else(|| format!("Envoy has no listener {name}: {:?}", self.listeners))
    }

    /// Every listener by name.
    pub fn listeners(&self) -> &BTreeMap<String, SocketAddr> {
        &self.listeners
    }

    /// Envoy's log so far.
    pub fn log(&self) -> String {
        read_log(&self.dir)
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("envoy.log")
    }

    /// The run's directory (config, log).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Envoy's process id (to stop or continue it with a signal).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills Envoy now (SIGKILL) and reaps it; its directory stays until drop.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- Envoy log, kept at {} {}", self.log_path().display(), tail(&self.log(), 300));
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Runs `envoy --mode validate` on a configuration file.
///
/// # Errors
/// Envoy rejects it (or cannot run); the message is its output.
pub fn validate(config: &Path, env: &[(String, String)], cwd: &Path) -> Result<String, String> {
    let envoy = envoy_binary()?;
    let output = Command::new(&envoy)
        .arg("--mode")
        .arg("validate")
        .arg("-c")
        .arg(config)
        .args(["-l", "info", "--disable-hot-restart"])
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(cwd)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{}: {e}", envoy.display()))?;
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    if output.status.success() {
        Ok(text)
    } else {
        Err(format!("envoy --mode validate -c {} failed ({}):\n{}", config.display(), output.status, tail(&text, 60)))
    }
}
