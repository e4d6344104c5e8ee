//! `keyswap serve`: the component's world `gateway` as an HTTP/1.1 server,
//! on wasmtime-wasi-http (hyper and tokio), shaped like `wasmtime serve`.
//!
//! ```text
//! Gateway::load ─▶ compile once, link WASI p2 + wasi:http, check() the configuration
//! TCP accept ─▶ hyper http1 ─▶ a fresh Store + instance per request
//!     ─▶ incoming-handler.handle(request, response-outparam) ─▶ response streamed back
//! ```
//!
//! The component's environment holds `KEYSWAP_GATEWAY_CONFIG` (the
//! configuration file's text) and the variables given with `--env`, nothing
//! else of this process's. Bodies stream through in bounded chunks
//! (wasmtime-wasi-http's outgoing buffer, the component's splices); nothing
//! holds a whole body.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use hyper::server::conn::http1;
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Engine, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::io::TokioIo;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use crate::artifact::Artifact;
use crate::component::bindings::gateway::{exports::keyswap::gateway::policy, GatewayPre};
use crate::component::{compile, ComponentError};

/// The variable the component reads its configuration from (see
/// `component/src/config.rs`).
pub const CONFIG_VAR: &str = "KEYSWAP_GATEWAY_CONFIG";

/// Anything that keeps `keyswap serve` from serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Component(#[from] ComponentError),
    #[error("cannot read the configuration {path}: {source}")]
    Config { path: String, source: std::io::Error },
    /// The component refused the configuration: `path: message`.
    #[error("the configuration was refused: {0}")]
    Refused(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("{0}")]
    Runtime(String),
}

/// What the component reported for a configuration it accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    pub clients: u32,
    pub routes: u32,
    pub version: String,
}

/// The state of one request's store.
pub struct GatewayState {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    table: ResourceTable,
}

impl WasiView for GatewayState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl WasiHttpView for GatewayState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView { ctx: &mut self.http, table: &mut self.table, hooks: Default::default() }
    }
}

/// The compiled, linked gateway component and the environment each of its
/// instances gets; cheap to share.
pub struct Gateway {
    pre: GatewayPre<GatewayState>,
    env: Vec<(String, String)>,
}

impl Gateway {
    /// Compiles and links the component at `path`, to run with
    /// `KEYSWAP_GATEWAY_CONFIG=config` and `env`.
    ///
    /// # Errors
    /// A missing or broken component, or one without world `gateway`'s
    /// exports.
    pub fn load(path: &Path, config: &str, env: &[(String, String)]) -> Result<Self, ServeError> {
        let engine = crate::artifact::engine().map_err(|e| ComponentError::Compile(format!("{e:#}")))?;
        let component = compile(&engine, path)?;
        Ok(Self::new(&engine, &component, config, env)?)
    }

    /// Links a compiled component (compile once, serve many
    /// configurations).
    ///
    /// # Errors
    /// [`ComponentError::Link`] when its exports are not world `gateway`'s.
    pub fn new(
        engine: &Engine,
        component: &Component,
        config: &str,
        env: &[(String, String)],
    ) -> Result<Self, ComponentError> {
        let link = |e: wasmtime::Error| ComponentError::Link(format!("{e:#}"));
        let mut linker = Linker::new(engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(link)?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker).map_err(link)?;
        let pre = GatewayPre::new(linker.instantiate_pre(component).map_err(link)?).map_err(link)?;
        let mut all = vec![(CONFIG_VAR.to_string(), config.to_string())];
        all.extend(env.iter().filter(|(n, _)| n != CONFIG_VAR).cloned());
        Ok(Self { pre, env: all })
    }

    fn store(&self) -> Store<GatewayState> {
        let wasi = WasiCtx::builder().envs(&self.env).inherit_stderr().build();
        let state = GatewayState { wasi, http: WasiHttpCtx::new(), table: ResourceTable::new() };
        Store::new(self.pre.engine(), state)
    }

    /// Loads the configuration in a throwaway instance, exactly as each
    /// request's instance will (`gateway-config.check`).
    ///
    /// # Errors
    /// [`ServeError::Refused`] with the field path, or a trap.
    pub async fn check(&self) -> Result<Loaded, ServeError> {
        let mut store = self.store();
        let trap = |call| move |e: wasmtime::Error| ComponentError::Trap { call, message: format!("{e:#}") };
        let gateway = self.pre.instantiate_async(&mut store).await.map_err(trap("instantiate"))?;
        let checked = gateway.keyswap_gateway_gateway_config().call_check(&mut store).await.map_err(trap("check"))?;
        match checked {
            Ok(policy::Summary { clients, routes, version }) => Ok(Loaded { clients, routes, version }),
            Err(e) => Err(ServeError::Refused(format!("{}: {}", e.path, e.message))),
        }
    }

    /// Serves one request in a fresh instance.
    async fn handle(
        self: Arc<Self>,
        request: hyper::Request<hyper::body::Incoming>,
    ) -> wasmtime::Result<hyper::Response<HyperOutgoingBody>> {
        let mut store = self.store();
        let (sender, receiver) = tokio::sync::oneshot::channel();
        let request = store.data_mut().http().new_incoming_request(Scheme::Http, request)?;
        let out = store.data_mut().http().new_response_outparam(sender)?;
        let gateway = self.clone();
        // The guest keeps streaming the response body after it has set the
        // response, so it runs in its own task.
        let task = tokio::task::spawn(async move {
            let instance = gateway.pre.instantiate_async(&mut store).await?;
            instance.wasi_http_incoming_handler().call_handle(&mut store, request, out).await
        });
        match receiver.await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(code)) => Err(wasmtime::format_err!("the gateway answered with an error: {code:?}")),
            Err(_) => {
                let why = match task.await {
                    Ok(Ok(())) => wasmtime::format_err!("the gateway set no response"),
                    Ok(Err(e)) => e,
                    Err(e) => wasmtime::format_err!("the gateway's task failed: {e}"),
                };
                Err(why.context("the gateway set no response"))
            }
        }
    }
}

/// Accepts connections until the runtime stops.
async fn accept_loop(gateway: Arc<Gateway>, listener: tokio::net::TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of descriptors, most likely: let connections finish.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let gateway = gateway.clone();
        tokio::task::spawn(async move {
            let service = hyper::service::service_fn(move |request| gateway.clone().handle(request));
            if let Err(e) = http1::Builder::new().keep_alive(true).serve_connection(TokioIo::new(stream), service).await
            {
                eprintln!("keyswap serve: connection error: {e}");
            }
        });
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, ServeError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| ServeError::Runtime(format!("cannot start the async runtime: {e}")))
}

async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, ServeError> {
    tokio::net::TcpListener::bind(addr).await.map_err(|source| ServeError::Listen { addr, source })
}

/// The environment `--env` arguments give a VM or component; one meaning
/// for every subcommand that takes `--env` (`check`, `run`, `serve`):
/// `NAME=VALUE` sets a variable, a bare `NAME` passes this process's value
/// on, and nothing else of this process's environment passes. A message
/// never holds a value: an argument that is neither form is not quoted
/// unless it reads as a conventional variable name (`OPENAI_API_KEY`),
/// the rule the policy follows for `{"env": NAME}`.
///
/// # Errors
/// An empty name, or a bare NAME this process does not have.
pub fn env_args(args: &[String]) -> Result<Vec<(String, String)>, String> {
    args.iter()
        .map(|arg| match arg.split_once('=') {
            Some((name, value)) if !name.is_empty() => Ok((name.to_string(), value.to_string())),
            Some(_) => Err("an --env argument has no variable name before `=` (NAME=VALUE, or NAME)".to_string()),
            None if is_conventional_env_name(arg) => {
                std::env::var(arg).map(|value| (arg.clone(), value)).map_err(|_| {
                    format!("--env {arg}: {arg} is not set in this shell; give its value with --env {arg}=VALUE")
                })
            }
            None => match std::env::var(arg) {
                Ok(value) => Ok((arg.clone(), value)),
                Err(_) => Err("an --env argument is neither NAME=VALUE nor the name of a variable set in this shell \
                               (not shown: it may be a value)"
                    .to_string()),
            },
        })
        .collect()
}

/// The line to add when a configuration was refused because an `{"env"}`
/// variable is unset (`refusal` holds the refusal's lines), saying how to
/// give it; `None` for any other refusal. It names the variable only when
/// the refusal did (the policy quotes conventional names only), and says
/// whether this shell has it, never its value. `holder` is what runs the
/// configuration: "the filter", "the component".
pub fn env_hint(refusal: &str, holder: &str) -> Option<String> {
    let unset = refusal.lines().find_map(|line| {
        let (_, rest) = line.split_once(".env: ")?;
        rest.trim_end().strip_suffix(" is not set")
    })?;
    let how = if is_conventional_env_name(unset) {
        let here = if std::env::var_os(unset).is_some() { "set in this shell" } else { "not set in this shell" };
        format!("--env {unset} passes this shell's value ({here}), --env {unset}=VALUE sets one")
    } else {
        "--env NAME passes this shell's value of NAME, --env NAME=VALUE sets one".to_string()
    };
    Some(format!("hint: {holder} sees only the variables --env gives: {how}"))
}

/// `OPENAI_API_KEY`: upper-case letters, digits and `_`, not starting
/// with a digit (the policy's test for a name it may quote).
fn is_conventional_env_name(name: &str) -> bool {
    (1..=256).contains(&name.len())
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
}

/// `keyswap serve`: checks the configuration, prints one line with the
/// address and the loaded configuration's summary, then serves until
/// Ctrl-C. `component` defaults to [`Artifact::Component`]`.default_path()`; `env`
/// are `--env` arguments ([`env_args`]).
///
/// # Errors
/// Anything that keeps it from starting, as text.
pub fn main(component: Option<&Path>, config: &Path, listen: SocketAddr, env: &[String]) -> Result<(), String> {
    let env = env_args(env)?;
    let component = component.map_or_else(|| Artifact::Component.default_path(), Path::to_path_buf);
    run(&component, config, listen, &env).map_err(|e| match &e {
        ServeError::Refused(why) => match env_hint(why, "the component") {
            Some(hint) => format!("{e}\n{hint}"),
            None => e.to_string(),
        },
        _ => e.to_string(),
    })
}

/// Serves `component` with the configuration file `config` on `listen`
/// until Ctrl-C.
///
/// # Errors
/// Anything that keeps it from starting.
pub fn run(component: &Path, config: &Path, listen: SocketAddr, env: &[(String, String)]) -> Result<(), ServeError> {
    let text = std::fs::read_to_string(config)
        .map_err(|source| ServeError::Config { path: config.display().to_string(), source })?;
    let gateway = Arc::new(Gateway::load(component, &text, env)?);
    runtime()?.block_on(async move {
        let loaded = gateway.check().await?;
        let listener = bind(listen).await?;
        let addr = listener.local_addr().map_err(|source| ServeError::Listen { addr: listen, source })?;
        println!(
            "keyswap serve: listening on http://{addr} ({} clients, {} routes, version {})",
            loaded.clients, loaded.routes, loaded.version
        );
        tokio::task::spawn(accept_loop(gateway, listener));
        tokio::signal::ctrl_c().await.map_err(|e| ServeError::Runtime(format!("waiting for Ctrl-C: {e}")))
    })
}

/// A gateway served on a thread of its own (for tests and embedders); it
/// stops when dropped.
pub struct RunningGateway {
    pub addr: SocketAddr,
    pub loaded: Loaded,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RunningGateway {
    /// Checks the configuration and starts serving on `listen` (port 0 for
    /// any free one).
    ///
    /// # Errors
    /// A refused configuration, or an address that cannot be bound.
    pub fn start(gateway: Gateway, listen: SocketAddr) -> Result<Self, ServeError> {
        let gateway = Arc::new(gateway);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = match runtime() {
                Ok(runtime) => runtime,
                Err(e) => return drop(ready_tx.send(Err(e))),
            };
            runtime.block_on(async move {
                let started = async {
                    let loaded = gateway.check().await?;
                    let listener = bind(listen).await?;
                    let addr = listener.local_addr().map_err(|source| ServeError::Listen { addr: listen, source })?;
                    Ok::<_, ServeError>((listener, addr, loaded))
                };
                match started.await {
                    Ok((listener, addr, loaded)) => {
                        tokio::task::spawn(accept_loop(gateway, listener));
                        let _ = ready_tx.send(Ok((addr, loaded)));
                        let _ = stop_rx.await;
                    }
                    Err(e) => drop(ready_tx.send(Err(e))),
                }
            });
            // Ends every connection's task; a guest blocked in the host gets
            // a moment, not forever.
            runtime.shutdown_timeout(std::time::Duration::from_secs(2));
        });
        match ready_rx.recv() {
            Ok(Ok((addr, loaded))) => Ok(Self { addr, loaded, stop: Some(stop_tx), thread: Some(thread) }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ServeError::Runtime("the server thread ended before it started".into())),
        }
    }
}

impl Drop for RunningGateway {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
