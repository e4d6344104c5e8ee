//! Everything one filter instance's host side holds (configurations, clock,
//! log, metrics, the open stream and its filter state, call counts): it lives in the
//! instance's `Store<HostState>`, so instances share nothing and tests run
//! in parallel.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use wasmtime::{Memory, TypedFunc};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;

use crate::model::codec::HeaderList;
use crate::model::metrics::MetricStore;

/// `proxy_log_level_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
    Critical,
}

impl LogLevel {
    /// The level for an ABI value, if it is one.
    pub fn from_abi(level: u32) -> Option<Self> {
        Some(match level {
            0 => Self::Trace,
            1 => Self::Debug,
            2 => Self::Info,
            3 => Self::Warn,
            4 => Self::Error,
            5 => Self::Critical,
            _ => return None,
        })
    }

    /// The ABI value.
    pub fn to_abi(self) -> u32 {
        self as u32
    }
}

impl fmt::Display for LogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Self::Trace => "trace",
            Self::Debug => "debug",
            Self::Info => "info",
            Self::Warn => "warn",
            Self::Error => "error",
            Self::Critical => "critical",
        };
        f.write_str(name)
    }
}

/// One line the guest logged (through `proxy_log`, or WASI stdout at
/// `info` and stderr at `error`, as the ABI says).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    pub level: LogLevel,
    pub message: String,
}

impl fmt::Display for LogEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}] {}", self.level, self.message)
    }
}

/// The instance's clock: real time, or a time the test sets. Both
/// `proxy_get_current_time_nanoseconds` and WASI's wall clock read it.
/// Clones share the setting (one per instance, never global).
#[derive(Debug, Clone)]
pub struct Clock(Arc<AtomicU64>);

/// The stored value that means "real time".
const REAL_TIME: u64 = u64::MAX;

impl Clock {
    /// A clock that reads the system's time.
    pub fn real() -> Self {
        Self(Arc::new(AtomicU64::new(REAL_TIME)))
    }

    /// A clock stopped at `at`.
    pub fn fixed(at: SystemTime) -> Self {
        let clock = Self::real();
        clock.set(at);
        clock
    }

    /// Stops the clock at `at` (before 1970 counts as 1970).
    pub fn set(&self, at: SystemTime) {
        let nanos = at.duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(REAL_TIME - 1));
        self.0.store(nanos.min(REAL_TIME - 1), Ordering::Relaxed);
    }

    /// Makes the clock follow the system's time again.
    pub fn set_real(&self) {
        self.0.store(REAL_TIME, Ordering::Relaxed);
    }

    /// Nanoseconds since the Unix epoch.
    pub fn now_nanos(&self) -> u64 {
        match self.0.load(Ordering::Relaxed) {
            REAL_TIME => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(REAL_TIME - 1)),
            fixed => fixed,
        }
    }
}

impl wasmtime_wasi::HostWallClock for Clock {
    fn resolution(&self) -> Duration {
        Duration::from_nanos(1)
    }

    fn now(&self) -> Duration {
        Duration::from_nanos(self.now_nanos())
    }
}

/// Host calls counted by name, plus the total of every host call the guest
/// made (WASI ones included, which are not named).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallCounts {
    by_name: BTreeMap<String, u64>,
    total: u64,
}

impl CallCounts {
    /// Every host call, WASI included.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Calls to one `env` function (`proxy_log`, …) or stub.
    pub fn get(&self, name: &str) -> u64 {
        self.by_name.get(name).copied().unwrap_or(0)
    }

    /// The named (`env` and stubbed) calls.
    pub fn by_name(&self) -> &BTreeMap<String, u64> {
        &self.by_name
    }

    /// Calls not counted by name: WASI preview1's.
    pub fn wasi(&self) -> u64 {
        self.total.saturating_sub(self.by_name.values().sum())
    }

    /// Adds another stream's calls (a request's two stages).
    pub fn add(&mut self, other: &CallCounts) {
        for (name, count) in &other.by_name {
            *self.by_name.entry(name.clone()).or_insert(0) += count;
        }
        self.total += other.total;
    }

    fn named(&mut self, name: &str) {
        match self.by_name.get_mut(name) {
            Some(count) => *count += 1,
            None => {
                self.by_name.insert(name.to_string(), 1);
            }
        }
    }
}

/// A local response the filter sent (`proxy_send_local_response`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalResponse {
    pub status: u32,
    /// `status_code_details`, usually empty.
    pub details: String,
    pub headers: HeaderList,
    pub body: Vec<u8>,
    /// `-1` for a plain HTTP response.
    pub grpc_status: i32,
}

/// An HTTP call the guest made (`proxy_http_call`), waiting for the test
/// to answer it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpCall {
    pub token: u32,
    /// The Envoy cluster it goes to.
    pub cluster: String,
    pub headers: HeaderList,
    pub body: Vec<u8>,
    pub timeout_ms: u32,
}

impl HttpCall {
    /// A header's value, as text.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }
}

/// The open HTTP stream (request and response share one context).
#[derive(Debug)]
pub(crate) struct StreamState {
    pub context_id: u32,
    pub route_name: Option<String>,
    /// What `xds.cluster_name` answers.
    pub cluster: Option<String>,
    /// What `upstream.address` answers: set only in the cluster's upstream
    /// filter chain, where Envoy has picked a host.
    pub upstream_address: Option<String>,
    pub request_headers: HeaderList,
    /// Present once the upstream's response arrived.
    pub response_headers: Option<HeaderList>,
    pub local_response: Option<LocalResponse>,
    /// The filter let a paused request go on (`proxy_continue_stream`).
    pub resumed: bool,
    pub calls: CallCounts,
    /// `proxy_set_property` values, under Envoy's filter-state names
    /// (`wasm.<path>`).
    pub filter_state: BTreeMap<String, Vec<u8>>,
}

impl StreamState {
    /// A new stream before its request headers are handed to the guest.
    pub fn new(
        context_id: u32,
        route_name: Option<&str>,
        cluster: Option<&str>,
        upstream_address: Option<&str>,
        request_headers: HeaderList,
        filter_state: BTreeMap<String, Vec<u8>>,
    ) -> Self {
        Self {
            context_id,
            route_name: route_name.map(str::to_string),
            cluster: cluster.map(str::to_string),
            upstream_address: upstream_address.map(str::to_string),
            request_headers,
            response_headers: None,
            local_response: None,
            resumed: false,
            calls: CallCounts::default(),
            filter_state,
        }
    }
}

/// The guest's memory and allocator, known once the instance exists.
#[derive(Clone)]
pub(crate) struct GuestExports {
    pub memory: Memory,
    pub alloc: TypedFunc<u32, u32>,
}

/// WASI stdout and stderr, captured into the log after each callback.
pub(crate) struct Stdio {
    pub stdout: MemoryOutputPipe,
    pub stderr: MemoryOutputPipe,
    /// Bytes of each already moved to the log.
    pub seen: (usize, usize),
}

/// The host side of one filter instance.
pub struct HostState {
    wasi: WasiP1Ctx,
    pub(crate) stdio: Stdio,
    pub(crate) guest: Option<GuestExports>,
    pub(crate) root_context_id: u32,
    pub(crate) vm_configuration: Vec<u8>,
    pub(crate) plugin_configuration: Vec<u8>,
    pub(crate) plugin_name: String,
    pub(crate) clock: Clock,
    pub(crate) log: Vec<LogEntry>,
    pub(crate) calls: CallCounts,
    pub(crate) unimplemented: BTreeMap<String, u64>,
    pub(crate) missing_properties: BTreeMap<String, u64>,
    pub(crate) metrics: MetricStore,
    pub(crate) stream: Option<StreamState>,
    /// The host calls of the last stream that finished.
    pub(crate) last_stream_calls: Option<CallCounts>,
    /// The filter state of the last stream that finished.
    pub(crate) last_stream_filter_state: Option<BTreeMap<String, Vec<u8>>>,
    /// The root context's tick period, once it set one.
    pub(crate) tick_period_ms: Option<u32>,
    /// HTTP calls made and not answered yet, oldest first.
    pub(crate) http_calls: Vec<HttpCall>,
    pub(crate) next_call_token: u32,
    /// Clusters whose calls are refused (`BAD_ARGUMENT`), as Envoy refuses
    /// a cluster it does not know.
    pub(crate) unknown_clusters: Vec<String>,
    /// The response being delivered by `proxy_on_http_call_response`.
    pub(crate) call_response: Option<(HeaderList, Vec<u8>)>,
    pub(crate) shared: crate::model::shared::SharedData,
}

impl HostState {
    pub(crate) fn new(wasi: WasiP1Ctx, stdio: Stdio, clock: Clock, shared: crate::model::shared::SharedData) -> Self {
        Self {
            wasi,
            stdio,
            guest: None,
            root_context_id: 1,
            vm_configuration: Vec::new(),
            plugin_configuration: Vec::new(),
            plugin_name: "keyswap".to_string(),
            clock,
            log: Vec::new(),
            calls: CallCounts::default(),
            unimplemented: BTreeMap::new(),
            missing_properties: BTreeMap::new(),
            metrics: MetricStore::default(),
            stream: None,
            last_stream_calls: None,
            last_stream_filter_state: None,
            tick_period_ms: None,
            http_calls: Vec::new(),
            next_call_token: 0,
            unknown_clusters: Vec::new(),
            call_response: None,
            shared,
        }
    }

    pub(crate) fn wasi_mut(&mut self) -> &mut WasiP1Ctx {
        &mut self.wasi
    }

    /// Counts one host call by name (the total is counted by the store's
    /// call hook, [`Self::entered_host`]).
    pub(crate) fn record(&mut self, name: &str) {
        self.calls.named(name);
        if let Some(stream) = &mut self.stream {
            stream.calls.named(name);
        }
    }

    /// Counts one call of a function the harness does not implement.
    pub(crate) fn record_unimplemented(&mut self, name: &str) {
        self.record(name);
        *self.unimplemented.entry(name.to_string()).or_insert(0) += 1;
    }

    /// Called by the store's call hook whenever the guest enters the host.
    pub(crate) fn entered_host(&mut self) {
        self.calls.total += 1;
        if let Some(stream) = &mut self.stream {
            stream.calls.total += 1;
        }
    }

    /// Moves new WASI stdout/stderr output into the log, one entry a line.
    pub(crate) fn drain_stdio(&mut self) {
        let (out, err) = (self.stdio.stdout.contents(), self.stdio.stderr.contents());
        let (seen_out, seen_err) = self.stdio.seen;
        for (bytes, seen, level) in [(&out, seen_out, LogLevel::Info), (&err, seen_err, LogLevel::Error)] {
            let fresh = bytes.get(seen..).unwrap_or_default();
            for line in String::from_utf8_lossy(fresh).lines().filter(|l| !l.is_empty()) {
                self.log.push(LogEntry { level, message: line.to_string() });
            }
        }
        self.stdio.seen = (out.len(), err.len());
    }
}
