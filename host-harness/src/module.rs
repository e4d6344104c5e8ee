//! The filter as Envoy drives it: [`FilterModule`] compiles and links the
//! module once (cheap to clone, shared by any number of instances);
//! [`FilterInstance`] is one VM with its own `Store<HostState>`, started and
//! configured like a plugin, then fed requests and responses.
//!
//! ```text
//! FilterModule::load ─▶ start(env): _initialize, context_create(root), on_vm_start
//!                  └─▶ configure(config): on_configure ─▶ Ok(instance) | Refused { log }
//! instance.request(route, headers): context_create(stream), on_request_headers
//!     ─▶ Forwarded { headers } (stream stays open) | Local(response) | Paused
//! instance.response(headers): on_response_headers ─▶ Forwarded { headers the client sees }
//! (every stream ends with on_done, on_log, on_delete)
//! instance.metrics(), instance.filter_state(): what Envoy's stats and access log would see
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use wasmtime::{CallHook, Engine, Instance, InstancePre, Linker, Module, Store, TypedFunc, WasmParams, WasmResults};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::WasiCtxBuilder;

use crate::abi::{self, action};
use crate::artifact::{self, Artifact};
use crate::error::HarnessError;
use crate::model::codec::HeaderList;
use crate::model::metrics::MetricType;
use crate::model::shared::SharedData;
use crate::state::{CallCounts, Clock, GuestExports, HostState, HttpCall, LocalResponse, LogEntry, Stdio, StreamState};

/// The most WASI stdout or stderr output one instance keeps.
const STDIO_CAPACITY: usize = 1 << 20;

/// What `upstream.address` answers in the final stage.
const UPSTREAM_ADDRESS: &str = "127.0.0.1:10001";

/// A compiled and linked proxy-wasm module.
#[derive(Clone)]
pub struct FilterModule {
    engine: Engine,
    pre: InstancePre<HostState>,
    stubbed: Vec<(String, String)>,
}

impl std::fmt::Debug for FilterModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FilterModule").field("stubbed", &self.stubbed).finish_non_exhaustive()
    }
}

impl FilterModule {
    /// Reads, compiles and links the module at `path`.
    ///
    /// # Errors
    /// [`HarnessError::Artifact`] (a missing file says how to build it),
    /// or what [`Self::from_bytes`] refuses.
    pub fn load(path: &Path) -> Result<Self, HarnessError> {
        Self::from_bytes(&Artifact::Filter.read(path)?)
    }

    /// Compiles and links a module from its binary (or, for tests, WAT text).
    ///
    /// # Errors
    /// A module that does not compile, does not advertise proxy-wasm ABI
    /// 0.2.x, exports no memory or allocator, or cannot be linked.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, HarnessError> {
        let engine = artifact::engine().map_err(|e| HarnessError::Compile(format!("{e:#}")))?;
        let module = Module::new(&engine, bytes).map_err(|e| HarnessError::Compile(format!("{e:#}")))?;
        let exports: Vec<&str> = module.exports().map(|e| e.name()).collect();
        if !exports.iter().any(|e| *e == "proxy_abi_version_0_2_1" || *e == "proxy_abi_version_0_2_0") {
            return Err(HarnessError::Abi("it exports no proxy_abi_version_0_2_1 (or _0_2_0) marker".into()));
        }
        if !exports.contains(&"memory") {
            return Err(HarnessError::Abi("it exports no memory".into()));
        }
        if !exports.iter().any(|e| *e == "proxy_on_memory_allocate" || *e == "malloc") {
            return Err(HarnessError::Abi("it exports no proxy_on_memory_allocate (or malloc)".into()));
        }
        let mut linker = Linker::new(&engine);
        let stubbed = abi::link(&mut linker, &module).map_err(|e| HarnessError::Link(format!("{e:#}")))?;
        let pre = linker.instantiate_pre(&module).map_err(|e| HarnessError::Link(format!("{e:#}")))?;
        Ok(Self { engine, pre, stubbed })
    }

    /// The imports linked to an `Unimplemented` stub, as (module, name).
    pub fn stubbed_imports(&self) -> &[(String, String)] {
        &self.stubbed
    }

    /// Starts a VM: WASI with `env` as its whole environment (like Envoy's
    /// `vm_config.environment_variables`; nothing is inherited from this
    /// process), `_initialize`, the root context, `proxy_on_vm_start`.
    ///
    /// # Errors
    /// A trap, a missing export, or a VM that refuses to start.
    pub fn start(&self, env: &BTreeMap<String, String>) -> Result<FilterInstance, HarnessError> {
        self.start_worker(env, &SharedData::default(), &Clock::real())
    }

    /// Starts a VM like [`Self::start`] that shares `shared` and `clock`
    /// with the other VMs given them, as the workers of one Envoy share
    /// shared data and time.
    ///
    /// # Errors
    /// As [`Self::start`].
    pub fn start_worker(
        &self,
        env: &BTreeMap<String, String>,
        shared: &SharedData,
        clock: &Clock,
    ) -> Result<FilterInstance, HarnessError> {
        let clock = clock.clone();
        let stdio = Stdio {
            stdout: MemoryOutputPipe::new(STDIO_CAPACITY),
            stderr: MemoryOutputPipe::new(STDIO_CAPACITY),
            seen: (0, 0),
        };
        let vars: Vec<(&String, &String)> = env.iter().collect();
        let wasi = WasiCtxBuilder::new()
            .envs(&vars)
            .stdout(stdio.stdout.clone())
            .stderr(stdio.stderr.clone())
            .wall_clock(clock.clone())
            .build_p1();
        let mut store = Store::new(&self.engine, HostState::new(wasi, stdio, clock, shared.clone()));
        store.call_hook(|mut ctx, hook| {
            if matches!(hook, CallHook::CallingHost) {
                ctx.data_mut().entered_host();
            }
            Ok(())
        });
        let instance = self.pre.instantiate(&mut store).map_err(|e| HarnessError::Trap {
            callback: "instantiate",
            message: format!("{e:#}"),
            log: String::new(),
        })?;
        let callbacks = Callbacks::find(&instance, &mut store)?;
        let mut filter =
            FilterInstance { store, callbacks, next_context_id: 2, first_stage: None, trapped: None, held: false };
        filter.boot()?;
        Ok(filter)
    }

    /// Starts a VM with `env` and configures the plugin with `config`.
    ///
    /// # Errors
    /// [`HarnessError::Refused`] with the filter's log when it refuses the
    /// configuration; anything [`Self::start`] returns.
    pub fn configure(&self, config: &[u8], env: &BTreeMap<String, String>) -> Result<FilterInstance, HarnessError> {
        let mut instance = self.start(env)?;
        instance.configure(config)?;
        Ok(instance)
    }
}

/// What the filter did with a request's or a response's headers (the
/// filter's own counted outcome is `keyswap_filter::metrics::Outcome`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handled {
    /// Passed on: the headers as the next hop sees them (the upstream for a
    /// request, the client for a response).
    Forwarded { headers: HeaderList },
    /// Answered locally.
    Local(LocalResponse),
    /// Paused without answering (a proxy would hold the stream).
    Paused { headers: HeaderList },
}

/// `proxy_on_http_call_response`'s parameters: root context, token,
/// header count, body size, trailer count.
type CallResponseParams = (u32, u32, u32, u32, u32);

/// The guest's exported callbacks; all optional but memory management, as
/// the ABI says.
struct Callbacks {
    initialize: Option<TypedFunc<(), ()>>,
    main: Option<TypedFunc<(u32, u32), u32>>,
    start: Option<TypedFunc<(), ()>>,
    context_create: Option<TypedFunc<(u32, u32), ()>>,
    vm_start: Option<TypedFunc<(u32, u32), u32>>,
    configure: Option<TypedFunc<(u32, u32), u32>>,
    request_headers: Option<TypedFunc<(u32, u32, u32), u32>>,
    response_headers: Option<TypedFunc<(u32, u32, u32), u32>>,
    done: Option<TypedFunc<u32, u32>>,
    tick: Option<TypedFunc<u32, ()>>,
    call_response: Option<TypedFunc<CallResponseParams, ()>>,
    log: Option<TypedFunc<u32, ()>>,
    delete: Option<TypedFunc<u32, ()>>,
}

impl Callbacks {
    fn find(instance: &Instance, store: &mut Store<HostState>) -> Result<Self, HarnessError> {
        let memory = instance
            .get_memory(&mut *store, "memory")
            .ok_or_else(|| HarnessError::Abi("the export `memory` is not a memory".into()))?;
        let alloc = match typed::<u32, u32>(instance, store, "proxy_on_memory_allocate")? {
            Some(alloc) => alloc,
            None => typed(instance, store, "malloc")?.ok_or_else(|| HarnessError::Abi("no allocator export".into()))?,
        };
        store.data_mut().guest = Some(GuestExports { memory, alloc });
        Ok(Self {
            initialize: typed(instance, store, "_initialize")?,
            main: typed(instance, store, "main")?,
            start: typed(instance, store, "_start")?,
            context_create: typed(instance, store, "proxy_on_context_create")?,
            vm_start: typed(instance, store, "proxy_on_vm_start")?,
            configure: typed(instance, store, "proxy_on_configure")?,
            request_headers: typed(instance, store, "proxy_on_request_headers")?,
            response_headers: typed(instance, store, "proxy_on_response_headers")?,
            done: typed(instance, store, "proxy_on_done")?,
            tick: typed(instance, store, "proxy_on_tick")?,
            call_response: typed(instance, store, "proxy_on_http_call_response")?,
            log: typed(instance, store, "proxy_on_log")?,
            delete: typed(instance, store, "proxy_on_delete")?,
        })
    }
}

/// An export as a typed function: `None` when absent, an error when its
/// type is not the ABI's.
fn typed<P: WasmParams, R: WasmResults>(
    instance: &Instance,
    store: &mut Store<HostState>,
    name: &str,
) -> Result<Option<TypedFunc<P, R>>, HarnessError> {
    match instance.get_func(&mut *store, name) {
        None => Ok(None),
        Some(func) => func
            .typed::<P, R>(&*store)
            .map(Some)
            .map_err(|e| HarnessError::Abi(format!("the export `{name}` has the wrong type: {e}"))),
    }
}

/// One running VM with one plugin (root context 1); streams get ids from 2.
pub struct FilterInstance {
    store: Store<HostState>,
    callbacks: Callbacks,
    next_context_id: u32,
    /// The open request's first stage (the listener's filter), parked while
    /// its final stage (the cluster's upstream filter) is the active stream.
    first_stage: Option<StreamState>,
    /// Set once a callback trapped: the guest's state is no longer sound.
    trapped: Option<String>,
    /// The open request's final stage paused it (held for a credential):
    /// a later callback may let it go ([`Self::held_outcome`]).
    held: bool,
}

impl std::fmt::Debug for FilterInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FilterInstance").field("trapped", &self.trapped).finish_non_exhaustive()
    }
}

impl FilterInstance {
    fn root(&self) -> u32 {
        self.store.data().root_context_id
    }

    /// Runs one callback, capturing WASI output and turning a trap into an
    /// error that carries the guest's log.
    fn call<P: WasmParams, R: WasmResults>(
        &mut self,
        callback: &'static str,
        func: TypedFunc<P, R>,
        params: P,
    ) -> Result<R, HarnessError> {
        if let Some(earlier) = &self.trapped {
            return Err(HarnessError::Trap {
                callback,
                message: format!("not called: the instance trapped earlier in {earlier}"),
                log: self.log_text(),
            });
        }
        let result = func.call(&mut self.store, params);
        self.store.data_mut().drain_stdio();
        result.map_err(|e| {
            self.trapped = Some(callback.to_string());
            HarnessError::Trap { callback, message: format!("{e:#}"), log: self.log_text() }
        })
    }

    fn boot(&mut self) -> Result<(), HarnessError> {
        let cb = &self.callbacks;
        let (initialize, main, start) = (cb.initialize.clone(), cb.main.clone(), cb.start.clone());
        if let Some(initialize) = initialize {
            self.call("_initialize", initialize, ())?;
            if let Some(main) = main {
                self.call("main", main, (0, 0))?;
            }
        } else if let Some(start) = start {
            self.call("_start", start, ())?;
        }
        let root = self.root();
        if let Some(create) = self.callbacks.context_create.clone() {
            self.call("proxy_on_context_create", create, (root, 0))?;
        }
        if let Some(vm_start) = self.callbacks.vm_start.clone() {
            let size = len_u32(self.store.data().vm_configuration.len());
            if self.call("proxy_on_vm_start", vm_start, (root, size))? == 0 {
                return Err(HarnessError::VmRefused { log: self.log_text() });
            }
        }
        Ok(())
    }

    /// Hands the plugin its configuration (`proxy_on_configure`).
    ///
    /// # Errors
    /// [`HarnessError::Refused`] with the filter's log when it returns false;
    /// a trap.
    pub fn configure(&mut self, config: &[u8]) -> Result<(), HarnessError> {
        self.store.data_mut().plugin_configuration = config.to_vec();
        let Some(configure) = self.callbacks.configure.clone() else {
            return Ok(());
        };
        let root = self.root();
        if self.call("proxy_on_configure", configure, (root, len_u32(config.len())))? == 0 {
            return Err(HarnessError::Refused { log: self.log_text() });
        }
        Ok(())
    }

    /// Runs a headers-only request through the filter as Envoy does, with
    /// the cluster named like the route ([`Self::request_to`]).
    ///
    /// # Errors
    /// A trap.
    pub fn request(
        &mut self,
        route_name: Option<&str>,
        headers: &[(String, Vec<u8>)],
    ) -> Result<Handled, HarnessError> {
        self.request_to(route_name, route_name, headers)
    }

    /// Runs a headers-only request (`end_of_stream` true) through the
    /// filter's two places in Envoy: a stream of the listener's filter (the
    /// first stage), then, if it continues, a stream of the cluster's
    /// upstream filter (the final stage, where `upstream.address` is set)
    /// with the first stage's headers and filter state. `headers` is the
    /// full list, pseudo-headers included; names are lower-cased as Envoy's
    /// are. `route_name` and `cluster` are what `xds.route_name` and
    /// `xds.cluster_name` answer. A forwarded request keeps both streams
    /// open for [`Self::response`]; any other outcome ends them. A request
    /// still open is ended first.
    ///
    /// # Errors
    /// A trap.
    pub fn request_to(
        &mut self,
        route_name: Option<&str>,
        cluster: Option<&str>,
        headers: &[(String, Vec<u8>)],
    ) -> Result<Handled, HarnessError> {
        self.finish()?;
        let headers: HeaderList = headers.iter().map(|(n, v)| (n.to_ascii_lowercase(), v.clone())).collect();
        let id = self.new_context_id();
        let first = self.request_headers(StreamState::new(id, route_name, cluster, None, headers, BTreeMap::new()))?;
        let Handled::Forwarded { headers } = first else {
            self.finish()?;
            return Ok(first);
        };
        let parked = self.store.data_mut().stream.take();
        let filter_state = parked.as_ref().map(|s| s.filter_state.clone()).unwrap_or_default();
        self.first_stage = parked;
        let id = self.new_context_id();
        let last = self.request_headers(StreamState::new(
            id,
            route_name,
            cluster,
            Some(UPSTREAM_ADDRESS),
            headers,
            filter_state,
        ))?;
        match last {
            Handled::Forwarded { .. } => {}
            // Held: both streams stay open until the filter lets it go.
            Handled::Paused { .. } => self.held = true,
            Handled::Local(_) => self.finish()?,
        }
        Ok(last)
    }

    /// What became of a request the filter held ([`Handled::Paused`] from
    /// [`Self::request_to`]) since: `Some(Forwarded)` once it let it go
    /// (`proxy_continue_stream`; the stream stays open for
    /// [`Self::response`]), `Some(Local)` once it answered it (the streams
    /// end), `None` while it still holds it or none is held.
    ///
    /// # Errors
    /// A trap while ending the streams.
    pub fn held_outcome(&mut self) -> Result<Option<Handled>, HarnessError> {
        if !self.held {
            return Ok(None);
        }
        let Some(stream) = self.store.data_mut().stream.as_mut() else {
            self.held = false;
            return Ok(None);
        };
        if let Some(local) = stream.local_response.take() {
            self.held = false;
            self.finish()?;
            return Ok(Some(Handled::Local(local)));
        }
        if stream.resumed {
            self.held = false;
            return Ok(Some(Handled::Forwarded { headers: stream.request_headers.clone() }));
        }
        Ok(None)
    }

    /// Runs a headers-only request through one stream of the listener's
    /// filter chain only: a filter placed once, as the ABI tests' modules
    /// are (keyswap itself runs in two places: [`Self::request_to`]).
    ///
    /// # Errors
    /// A trap.
    pub fn request_stream(
        &mut self,
        route_name: Option<&str>,
        headers: &[(String, Vec<u8>)],
    ) -> Result<Handled, HarnessError> {
        self.single_stream(route_name, route_name, None, headers)
    }

    /// Runs only the final stage, as on a cluster whose listener lacks the
    /// filter (a misdeployment the filter must refuse).
    ///
    /// # Errors
    /// A trap.
    pub fn request_upstream_only(
        &mut self,
        route_name: Option<&str>,
        cluster: Option<&str>,
        headers: &[(String, Vec<u8>)],
    ) -> Result<Handled, HarnessError> {
        self.single_stream(route_name, cluster, Some(UPSTREAM_ADDRESS), headers)
    }

    fn single_stream(
        &mut self,
        route_name: Option<&str>,
        cluster: Option<&str>,
        upstream_address: Option<&str>,
        headers: &[(String, Vec<u8>)],
    ) -> Result<Handled, HarnessError> {
        self.finish()?;
        let id = self.new_context_id();
        let headers = headers.iter().map(|(n, v)| (n.to_ascii_lowercase(), v.clone())).collect();
        let outcome = self.request_headers(StreamState::new(
            id,
            route_name,
            cluster,
            upstream_address,
            headers,
            BTreeMap::new(),
        ))?;
        if !matches!(outcome, Handled::Forwarded { .. }) {
            self.finish()?;
        }
        Ok(outcome)
    }

    fn new_context_id(&mut self) -> u32 {
        let id = self.next_context_id;
        self.next_context_id = self.next_context_id.wrapping_add(1).max(2);
        id
    }

    /// Opens `stream` as the active stream and runs its request headers.
    fn request_headers(&mut self, stream: StreamState) -> Result<Handled, HarnessError> {
        let (id, count) = (stream.context_id, len_u32(stream.request_headers.len()));
        self.store.data_mut().stream = Some(stream);
        let root = self.root();
        if let Some(create) = self.callbacks.context_create.clone() {
            self.call("proxy_on_context_create", create, (id, root))?;
        }
        let action = match self.callbacks.request_headers.clone() {
            Some(on_headers) => self.call("proxy_on_request_headers", on_headers, (id, count, 1))?,
            None => action::CONTINUE,
        };
        Ok(self.outcome(action, |s| Some(&s.request_headers)))
    }

    /// Runs the upstream's response headers through the open request (the
    /// final stage, then the first, as Envoy's upstream and downstream
    /// filter chains do), then ends it.
    ///
    /// # Errors
    /// [`HarnessError::NoOpenRequest`] when no forwarded request is open; a
    /// trap.
    pub fn response(&mut self, headers: &[(String, Vec<u8>)]) -> Result<Handled, HarnessError> {
        let headers: HeaderList = headers.iter().map(|(n, v)| (n.to_ascii_lowercase(), v.clone())).collect();
        let mut outcome = self.response_headers(headers)?;
        if let (Handled::Forwarded { headers }, Some(mut first)) = (&outcome, self.first_stage.take()) {
            let state = self.store.data_mut();
            if let Some(last) = state.stream.take() {
                first.filter_state = last.filter_state.clone();
                first.calls.add(&last.calls);
                self.end_parked(last)?;
            }
            self.store.data_mut().stream = Some(first);
            outcome = self.response_headers(headers.clone())?;
        }
        self.finish()?;
        Ok(outcome)
    }

    fn response_headers(&mut self, headers: HeaderList) -> Result<Handled, HarnessError> {
        let count = len_u32(headers.len());
        let stream = self.store.data_mut().stream.as_mut().ok_or(HarnessError::NoOpenRequest)?;
        stream.response_headers = Some(headers);
        let id = stream.context_id;
        let action = match self.callbacks.response_headers.clone() {
            Some(on_headers) => self.call("proxy_on_response_headers", on_headers, (id, count, 1))?,
            None => action::CONTINUE,
        };
        Ok(self.outcome(action, |s| s.response_headers.as_ref()))
    }

    /// Ends a stream that is no longer the active one, keeping the active
    /// one as it is.
    fn end_parked(&mut self, parked: StreamState) -> Result<(), HarnessError> {
        let id = parked.context_id;
        let active = self.store.data_mut().stream.replace(parked);
        let result = self.end_stream(id);
        self.store.data_mut().stream = active;
        result
    }

    fn outcome(&mut self, action: u32, map: impl Fn(&StreamState) -> Option<&HeaderList>) -> Handled {
        let Some(stream) = self.store.data_mut().stream.as_mut() else {
            return Handled::Paused { headers: Vec::new() };
        };
        if let Some(local) = stream.local_response.take() {
            return Handled::Local(local);
        }
        let headers = map(stream).cloned().unwrap_or_default();
        if action == action::CONTINUE {
            Handled::Forwarded { headers }
        } else {
            Handled::Paused { headers }
        }
    }

    /// Ends the open stream, if any: `proxy_on_done`, `proxy_on_log`,
    /// `proxy_on_delete` (the last two even when `on_done` asks to wait, as
    /// the harness has no later event to wait for). Its host calls become
    /// [`Self::last_request_host_calls`].
    ///
    /// # Errors
    /// A trap.
    pub fn finish(&mut self) -> Result<(), HarnessError> {
        self.held = false;
        let parked = self.first_stage.take();
        let Some(active) = self.store.data_mut().stream.take() else {
            return Ok(());
        };
        // The active stream holds the request's whole filter state; both
        // stages' host calls count as the request's.
        let filter_state = active.filter_state.clone();
        let mut calls = CallCounts::default();
        let mut result = Ok(());
        for stream in [Some(active), parked].into_iter().flatten() {
            let id = stream.context_id;
            self.store.data_mut().stream = Some(stream);
            result = result.and(self.end_stream(id));
            if let Some(ended) = self.store.data_mut().stream.take() {
                calls.add(&ended.calls);
            }
        }
        let state = self.store.data_mut();
        state.last_stream_calls = Some(calls);
        state.last_stream_filter_state = Some(filter_state);
        result
    }

    fn end_stream(&mut self, id: u32) -> Result<(), HarnessError> {
        if self.trapped.is_some() {
            return Ok(());
        }
        if let Some(done) = self.callbacks.done.clone() {
            self.call("proxy_on_done", done, id)?;
        }
        if let Some(log) = self.callbacks.log.clone() {
            self.call("proxy_on_log", log, id)?;
        }
        if let Some(delete) = self.callbacks.delete.clone() {
            self.call("proxy_on_delete", delete, id)?;
        }
        Ok(())
    }

    /// The root context's tick period, once it set one.
    pub fn tick_period(&self) -> Option<std::time::Duration> {
        self.store.data().tick_period_ms.map(|ms| std::time::Duration::from_millis(u64::from(ms)))
    }

    /// One timer event (`proxy_on_tick` on the root context), if the root
    /// context asked for a timer; returns whether it did.
    ///
    /// # Errors
    /// A trap.
    pub fn tick(&mut self) -> Result<bool, HarnessError> {
        let (Some(_), Some(tick)) = (self.store.data().tick_period_ms, self.callbacks.tick.clone()) else {
            return Ok(false);
        };
        let root = self.root();
        self.call("proxy_on_tick", tick, root)?;
        Ok(true)
    }

    /// The HTTP calls made and not answered yet, oldest first.
    pub fn pending_calls(&self) -> &[HttpCall] {
        &self.store.data().http_calls
    }

    /// Refuses calls to `cluster` from now on, as Envoy refuses a cluster
    /// it does not know.
    pub fn refuse_cluster(&mut self, cluster: &str) {
        self.store.data_mut().unknown_clusters.push(cluster.to_string());
    }

    /// The shared data this VM sees.
    pub fn shared_data(&self) -> &SharedData {
        &self.store.data().shared
    }

    /// Answers a pending call: `Some((headers, body))` (`:status` among the
    /// headers) delivers a response; `None` is a call that failed without
    /// one (timeout, reset), which Envoy reports with no headers.
    ///
    /// # Errors
    /// [`HarnessError::Abi`] for a token that is not pending; a trap.
    pub fn answer_call(&mut self, token: u32, answer: Option<(HeaderList, Vec<u8>)>) -> Result<(), HarnessError> {
        let state = self.store.data_mut();
        let Some(at) = state.http_calls.iter().position(|c| c.token == token) else {
            return Err(HarnessError::Abi(format!("no pending HTTP call has token {token}")));
        };
        state.http_calls.remove(at);
        let (headers, body) = match &answer {
            Some((h, b)) => (len_u32(h.len()), len_u32(b.len())),
            None => (0, 0),
        };
        state.call_response = answer;
        let Some(on_response) = self.callbacks.call_response.clone() else {
            return Ok(());
        };
        let root = self.root();
        let result = self.call("proxy_on_http_call_response", on_response, (root, token, headers, body, 0));
        self.store.data_mut().call_response = None;
        result
    }

    /// The instance's clock (real time until set).
    pub fn clock(&self) -> &Clock {
        &self.store.data().clock
    }

    /// Every line the guest logged, in order.
    pub fn log(&self) -> &[LogEntry] {
        &self.store.data().log
    }

    /// The logged messages, one a line, without levels.
    pub fn log_text(&self) -> String {
        let lines: Vec<&str> = self.log().iter().map(|e| e.message.as_str()).collect();
        lines.join("\n")
    }

    /// Empties the log, returning what it held.
    pub fn take_log(&mut self) -> Vec<LogEntry> {
        std::mem::take(&mut self.store.data_mut().log)
    }

    /// Every host call since the VM started.
    pub fn host_calls(&self) -> &CallCounts {
        &self.store.data().calls
    }

    /// The host calls of the last finished stream, from its context's
    /// creation to its deletion.
    pub fn last_request_host_calls(&self) -> Option<&CallCounts> {
        self.store.data().last_stream_calls.as_ref()
    }

    /// Calls to functions the harness does not implement, by name. A
    /// runner must treat any entry as a failure.
    pub fn unimplemented_calls(&self) -> &BTreeMap<String, u64> {
        &self.store.data().unimplemented
    }

    /// The filter state the current request's filter set
    /// (`proxy_set_property`), by Envoy's names (`wasm.keyswap`): the open
    /// stream's, else the last finished stream's; `None` before any request.
    pub fn filter_state(&self) -> Option<&BTreeMap<String, Vec<u8>>> {
        let state = self.store.data();
        match &state.stream {
            Some(stream) => Some(&stream.filter_state),
            None => state.last_stream_filter_state.as_ref(),
        }
    }

    /// Every metric the module defined, by name, with its type and value
    /// (a histogram's value is the number of values recorded), since the
    /// VM started. Envoy shows them as `wasmcustom.<name>` and sums every
    /// VM of a plugin.
    pub fn metrics(&self) -> BTreeMap<String, (MetricType, u64)> {
        self.store.data().metrics.snapshot()
    }

    /// The values recorded into a histogram, in order.
    pub fn histogram(&self, name: &str) -> Option<&[u64]> {
        self.store.data().metrics.histogram(name)
    }

    /// The size of the guest's linear memory in bytes: what the VM holds
    /// (wasm memory only grows, so this is its high-water mark).
    pub fn memory_bytes(&self) -> usize {
        let state = self.store.data();
        state.guest.as_ref().map_or(0, |g| g.memory.data_size(&self.store))
    }

    /// Property paths the guest asked for that the harness does not know.
    pub fn missing_properties(&self) -> &BTreeMap<String, u64> {
        &self.store.data().missing_properties
    }
}

fn len_u32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}
