//! The keyswap component (`component/`, built for `wasm32-wasip2`) in
//! wasmtime, through bindings generated from the same `wit/` the guest
//! reads.
//!
//! ```text
//! PolicyComponent::load ─▶ compile once, link WASI p2 and wasi:http
//!        └─▶ instance(): a fresh Store, world `filter`
//!               configure(config, env) ─▶ Ok(summary) | Err(config-error)
//!               decide(request-view) ───▶ forward(edits) | deny(status, headers, body)
//!               strip-response(headers) ▶ names to remove
//! ```
//!
//! [`crate::serve`] runs the same file as world `gateway` on wasi:http.

use std::path::Path;

use keyswap_conformance::{Observed, SuiteCase};
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Engine, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use crate::artifact::{Artifact, ArtifactError};

/// The generated bindings, boxed: the rest of the harness sees only the
/// re-exports below.
pub(crate) mod bindings {
    /// World `filter`, called synchronously.
    pub(crate) mod filter {
        wasmtime::component::bindgen!({ path: "../wit", world: "filter" });
    }
    /// World `gateway`, called asynchronously on wasmtime-wasi-http's own
    /// WASI and HTTP host types.
    pub(crate) mod gateway {
        wasmtime::component::bindgen!({
            path: "../wit",
            world: "gateway",
            exports: { default: async },
            with: {
                "wasi:io": wasmtime_wasi::p2::bindings::io,
                "wasi:clocks": wasmtime_wasi::p2::bindings::clocks,
                "wasi:random": wasmtime_wasi::p2::bindings::random,
                "wasi:cli": wasmtime_wasi::p2::bindings::cli,
                "wasi:http": wasmtime_wasi_http::p2::bindings::http,
            },
        });
    }
    pub use filter::exports::keyswap::gateway::policy::{ConfigError, Decision, Denial, Forward, RequestView, Summary};
}

pub use bindings::{ConfigError, Decision, Denial, Forward, RequestView, Summary};

/// Anything that keeps the harness from running the component.
#[derive(Debug, thiserror::Error)]
pub enum ComponentError {
    /// The component's file is missing (the message says how to build
    /// it) or unreadable.
    #[error(transparent)]
    Artifact(#[from] ArtifactError),
    #[error("cannot compile the component: {0}")]
    Compile(String),
    /// The component does not have the exports of `wit/` or needs imports
    /// the harness does not provide.
    #[error("cannot link the component: {0}")]
    Link(String),
    /// A call into the component trapped.
    #[error("{call} trapped: {message}")]
    Trap { call: &'static str, message: String },
}

/// Reads and compiles a component.
///
/// # Errors
/// [`ComponentError::Artifact`] (a missing file says how to build it), or
/// a binary that is not a component.
pub fn compile(engine: &Engine, path: &Path) -> Result<Component, ComponentError> {
    let bytes = Artifact::Component.read(path)?;
    Component::new(engine, &bytes).map_err(|e| ComponentError::Compile(format!("{e:#}")))
}

/// One exported or imported interface and its functions, as the binary has
/// them.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct InterfaceItems {
    /// For example `keyswap:gateway/policy@0.1.0`.
    pub name: String,
    /// Function names, sorted.
    pub functions: Vec<String>,
}

/// The component's exports (`imports = false`) or imports, sorted by name.
pub fn interfaces(engine: &Engine, component: &Component, imports: bool) -> Vec<InterfaceItems> {
    use wasmtime::component::types::ComponentItem;
    let ty = component.component_type();
    let items: Vec<(&str, ComponentItem)> = if imports {
        ty.imports(engine).map(|(name, item)| (name, item.ty)).collect()
    } else {
        ty.exports(engine).map(|(name, item)| (name, item.ty)).collect()
    };
    let mut out: Vec<InterfaceItems> = items
        .into_iter()
        .map(|(name, item)| {
            let mut functions: Vec<String> = match item {
                ComponentItem::ComponentInstance(instance) => instance
                    .exports(engine)
                    .filter(|(_, item)| matches!(item.ty, ComponentItem::ComponentFunc(_)))
                    .map(|(name, _)| name.to_string())
                    .collect(),
                _ => Vec::new(),
            };
            functions.sort();
            InterfaceItems { name: name.to_string(), functions }
        })
        .collect();
    out.sort();
    out
}

/// The state of one instance's store: WASI p2 for what `std` imports, and
/// an HTTP context the filter world never uses.
pub struct ComponentState {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    table: ResourceTable,
}

impl WasiHttpView for ComponentState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView { ctx: &mut self.http, table: &mut self.table, hooks: Default::default() }
    }
}

impl WasiView for ComponentState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

/// The compiled component, linked for world `filter`; cheap to clone.
#[derive(Clone)]
pub struct PolicyComponent {
    engine: Engine,
    component: Component,
    pre: bindings::filter::FilterPre<ComponentState>,
}

impl std::fmt::Debug for PolicyComponent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyComponent").finish_non_exhaustive()
    }
}

impl PolicyComponent {
    /// Reads, compiles and links the component at `path`.
    ///
    /// # Errors
    /// See [`compile`], and [`ComponentError::Link`] when its exports are
    /// not those of world `filter`.
    pub fn load(path: &Path) -> Result<Self, ComponentError> {
        let engine = crate::artifact::engine().map_err(|e| ComponentError::Compile(format!("{e:#}")))?;
        let component = compile(&engine, path)?;
        Self::new(engine, component)
    }

    /// Links a compiled component: WASI p2 for the guest's standard
    /// library, and `wasi:http` because the same binary is also the gateway
    /// (world `filter` never calls it).
    ///
    /// # Errors
    /// [`ComponentError::Link`] when the exports do not type-check against
    /// `wit/`.
    pub fn new(engine: Engine, component: Component) -> Result<Self, ComponentError> {
        let link = |e: wasmtime::Error| ComponentError::Link(format!("{e:#}"));
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(link)?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_sync(&mut linker).map_err(link)?;
        let pre = bindings::filter::FilterPre::new(linker.instantiate_pre(&component).map_err(link)?).map_err(link)?;
        Ok(Self { engine, component, pre })
    }

    /// The engine the component was compiled with.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The compiled component.
    pub fn component(&self) -> &Component {
        &self.component
    }

    /// A fresh instance with no configuration (its stderr is the
    /// harness's).
    ///
    /// # Errors
    /// A trap while instantiating.
    pub fn instance(&self) -> Result<PolicyInstance, ComponentError> {
        let wasi = WasiCtx::builder().inherit_stderr().build();
        let mut store =
            Store::new(&self.engine, ComponentState { wasi, http: WasiHttpCtx::new(), table: ResourceTable::new() });
        let filter = self.pre.instantiate(&mut store).map_err(|e| trap("instantiate", &e))?;
        Ok(PolicyInstance { store, filter })
    }
}

fn trap(call: &'static str, e: &wasmtime::Error) -> ComponentError {
    ComponentError::Trap { call, message: format!("{e:#}") }
}

/// One component instance: the policy's state lives in it.
pub struct PolicyInstance {
    store: Store<ComponentState>,
    filter: bindings::filter::Filter,
}

impl PolicyInstance {
    /// `policy.configure`: the outer `Err` is a trap, the inner one the
    /// configuration's refusal.
    ///
    /// # Errors
    /// A trap.
    pub fn configure(
        &mut self,
        config: &str,
        env: &[(String, String)],
    ) -> Result<Result<Summary, ConfigError>, ComponentError> {
        let policy = self.filter.keyswap_gateway_policy();
        policy.call_configure(&mut self.store, config, env).map_err(|e| trap("configure", &e))
    }

    /// `policy.decide`.
    ///
    /// # Errors
    /// A trap.
    pub fn decide(&mut self, request: &RequestView) -> Result<Decision, ComponentError> {
        let policy = self.filter.keyswap_gateway_policy();
        policy.call_decide(&mut self.store, request).map_err(|e| trap("decide", &e))
    }

    /// `policy.strip-response`.
    ///
    /// # Errors
    /// A trap.
    pub fn strip_response(&mut self, headers: &[(String, Vec<u8>)]) -> Result<Vec<String>, ComponentError> {
        let policy = self.filter.keyswap_gateway_policy();
        policy.call_strip_response(&mut self.store, headers).map_err(|e| trap("strip-response", &e))
    }
}

/// Applies a forward's edits to a header list (pseudo-headers included) the
/// way the WIT documents them, by the policy's one rule
/// ([`keyswap_policy::edit::apply`]).
pub fn apply(forward: &Forward, headers: &mut Vec<(String, Vec<u8>)>) {
    let removes = |name: &str| forward.remove_headers.iter().any(|r| name.eq_ignore_ascii_case(r));
    let add = forward.add_headers.iter().map(|(n, v)| (n.as_str(), v.as_slice()));
    keyswap_policy::edit::apply(headers, removes, forward.path.as_deref().map(str::as_bytes), add);
}

/// Runs a conformance case through a fresh instance: its configuration
/// with its environment, its request, and its upstream response when it
/// has one. A refused configuration is reported as the line a host logs,
/// `<path>: <message>`.
///
/// # Errors
/// A trap, as text.
pub fn observe(component: &PolicyComponent, case: &SuiteCase) -> Result<Observed, String> {
    let mut instance = component.instance().map_err(|e| e.to_string())?;
    let env: Vec<(String, String)> = case.env.iter().map(|(n, v)| (n.clone(), v.clone())).collect();
    if let Err(refused) = instance.configure(&case.config, &env).map_err(|e| e.to_string())? {
        return Ok(Observed::ConfigRefused { log: format!("{}: {}", refused.path, refused.message) });
    }
    let mut headers = case.request.header_list();
    let request = RequestView {
        route_name: case.request.route_name.clone(),
        cluster: case.request.cluster().map(str::to_string),
        method: case.request.method.clone(),
        path: case.request.path.clone(),
        authority: case.request.authority.clone(),
        headers: headers.clone(),
    };
    let text = |v: &[u8]| String::from_utf8_lossy(v).into_owned();
    let pairs = |list: &[(String, Vec<u8>)]| list.iter().map(|(n, v)| (n.clone(), text(v))).collect();
    match instance.decide(&request).map_err(|e| e.to_string())? {
        Decision::Deny(denial) => Ok(Observed::Denied {
            status: denial.status,
            headers: pairs(&denial.headers),
            body: denial.body.into_bytes(),
        }),
        Decision::Forward(forward) => {
            apply(&forward, &mut headers);
            let path = headers.iter().find(|(n, _)| n == ":path").map(|(_, v)| text(v)).unwrap_or_default();
            headers.retain(|(n, _)| !n.starts_with(':'));
            let client_response = match &case.response {
                None => None,
                Some(response) => {
                    let sent: Vec<(String, Vec<u8>)> =
                        response.headers.iter().map(|(n, v)| (n.to_ascii_lowercase(), v.as_bytes().to_vec())).collect();
                    let removed = instance.strip_response(&sent).map_err(|e| e.to_string())?;
                    let kept: Vec<(String, Vec<u8>)> =
                        sent.into_iter().filter(|(n, _)| !removed.iter().any(|r| r.eq_ignore_ascii_case(n))).collect();
                    Some(pairs(&kept))
                }
            };
            Ok(Observed::Forwarded { path, headers: pairs(&headers), client_response })
        }
    }
}
