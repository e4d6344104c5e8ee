//! `keyswap`: check a configuration, make and hash keys, run requests or
//! the conformance suite through the real filter module without Envoy, and
//! push a configuration to a running Envoy (ECDS).
//!
//! Every command exits 0 on success and 1 on failure (usage errors too).

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use base64::Engine as _;
use clap::{Args, Parser, Subcommand};
use keyswap_conformance::{default_dir, Request, Suite};
use keyswap_harness::manifest;
use keyswap_harness::runner::{check_unimplemented, run_suite, text_pairs};
use keyswap_harness::{default_filter_path, FilterInstance, FilterModule, HarnessError, LogLevel, MetricType, Outcome};
use sha2::{Digest as _, Sha256};

#[derive(Parser)]
#[command(
    name = "keyswap",
    version,
    about = "keyswap's tools: the real filter module in a wasmtime host, no Envoy needed"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load a configuration into the filter and print its summary, or the
    /// error with its field path.
    Check {
        /// The plugin configuration (JSON).
        config: PathBuf,
        #[command(flatten)]
        vm: VmArgs,
    },
    /// Read a key from stdin and print its lowercase hex SHA-256 (for
    /// `key_sha256`). One trailing newline is ignored.
    HashKey,
    /// Make a fresh random key and print it once, with its `clients` entry.
    NewKey {
        /// The client's id.
        #[arg(long)]
        id: String,
        /// The routes the client may use, comma-separated (default: `*`,
        /// every route).
        #[arg(long, value_delimiter = ',')]
        routes: Vec<String>,
    },
    /// Run one request through the filter and print the decision, what
    /// the upstream receives (or the local response), the access-log field
    /// the filter set and the metrics the request moved.
    Run {
        /// The plugin configuration (JSON).
        config: PathBuf,
        /// The request, shaped like a conformance case's `request`:
        /// {"route_name", "method", "path", "authority", "headers": [[name, value], ...]}.
        request: PathBuf,
        #[command(flatten)]
        vm: VmArgs,
    },
    /// Run the conformance suite through the filter module; ends with
    /// `N passed, M failed`.
    Conformance {
        /// The suite's directory (with cases/, configs/, skip.json).
        dir: Option<PathBuf>,
        #[command(flatten)]
        filter: FilterArg,
    },
    /// Push a configuration to a running Envoy through the ECDS file it
    /// watches: checked by the filter first, written atomically, versioned
    /// by its content; with --envoy-admin, confirmed by Envoy (or its
    /// rejection reported, exit 1).
    Push(keyswap_harness::push::PushArgs),
    /// Measure the filter module: per-request cost and host calls (allowed
    /// request and each denial), configuration time and VM memory, for
    /// 10, 1,000 and 100,000 clients; and the .wasm size. A benchmark, not
    /// a test: prints markdown tables.
    Bench(BenchArgs),
    /// Serve the keyswap component (wasm32-wasip2) as a wasi:http gateway
    /// until Ctrl-C; see docs/component.md.
    Serve(keyswap_harness::serve::ServeArgs),
    /// Print the Kubernetes manifests that run a configuration on Istio or
    /// Envoy Gateway, both stages with the same configuration, for
    /// `kubectl apply -f -` (deploy/README.md). Warns on stderr when an
    /// object is too large for client-side `kubectl apply`.
    #[command(subcommand)]
    Manifest(Platform),
}

#[derive(Subcommand)]
enum Platform {
    /// A WasmPlugin (the listener stage, by ECDS) and an EnvoyFilter (the
    /// same ECDS resource on each bound cluster).
    Istio {
        /// The plugin configuration (JSON); its routes' `match.clusters`
        /// are Istio cluster names (`outbound|443||api.openai.com`).
        config: PathBuf,
        /// The Istio release (1.19 to 1.31): how it names the plugin's
        /// ECDS resource, which the cluster patch must reference.
        #[arg(long, value_name = "1.MINOR", value_parser = manifest::parse_istio_version)]
        istio_version: u32,
        /// The gateway pods' label: keyswap's own gateway (the plugin
        /// takes every request of the pods it selects).
        #[arg(long, value_name = "KEY=VALUE", default_value = "istio=keyswap-gateway", value_parser = manifest::parse_label)]
        selector: (String, String),
        /// The namespace of the WasmPlugin and EnvoyFilter (the gateway's).
        #[arg(long, default_value = "istio-system")]
        namespace: String,
        #[command(flatten)]
        common: ManifestArgs,
    },
    /// An EnvoyExtensionPolicy (the listener stage, on the HTTPRoutes) and
    /// an EnvoyPatchPolicy (the final stage on each bound cluster).
    EnvoyGateway {
        /// The plugin configuration (JSON); its routes' `match.clusters`
        /// are Envoy Gateway cluster names
        /// (`httproute/<namespace>/<name>/rule/<index>`).
        config: PathBuf,
        /// An HTTPRoute whose requests keyswap reads; repeatable.
        #[arg(long = "route", value_name = "NAME", required = true)]
        routes: Vec<String>,
        /// The Gateway whose clusters are patched.
        #[arg(long, default_value = "eg")]
        gateway: String,
        /// The namespace of the HTTPRoutes, the Gateway and both policies.
        #[arg(long, default_value = "default")]
        namespace: String,
        /// Where the Envoy pods find the filter module for the cluster
        /// stage (deploy/envoy-gateway/envoyproxy.yaml mounts it).
        #[arg(long, value_name = "PATH", default_value = "/etc/keyswap/plugin.wasm")]
        module_path: String,
        #[command(flatten)]
        common: ManifestArgs,
    },
}

#[derive(Args)]
struct ManifestArgs {
    /// The plugin image, as `scripts/image` built and pushed it (Istio:
    /// `oci://registry/keyswap/filter:TAG`).
    #[arg(long)]
    image: String,
    /// The listener resource's name; the cluster patch is `<name>-upstream`.
    #[arg(long, default_value = "keyswap")]
    name: String,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    filter: FilterArg,
    /// The no-op filter module, the harness's floor (default:
    /// keyswap_bench_noop.wasm next to the filter module; skipped when absent).
    #[arg(long, value_name = "PATH")]
    noop: Option<PathBuf>,
    /// Client counts, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "10,1000,100000")]
    sizes: Vec<usize>,
    /// Requests per timed batch (5 batches per case).
    #[arg(long, default_value_t = 20_000)]
    iterations: usize,
    /// Also write the tables between `<!-- bench:harness:start -->` and
    /// `<!-- bench:harness:end -->` in this file (docs/performance.md).
    #[arg(long, value_name = "PATH")]
    update_docs: Option<PathBuf>,
}

#[derive(Args)]
struct FilterArg {
    /// The filter module (default: $KEYSWAP_FILTER, else the workspace's
    /// target/wasm32-wasip1/release/keyswap_filter.wasm).
    #[arg(long, value_name = "PATH")]
    filter: Option<PathBuf>,
}

#[derive(Args)]
struct VmArgs {
    /// A variable of the VM's environment, like Envoy's
    /// vm_config.environment_variables; repeatable. These are the VM's whole
    /// environment: nothing is taken from this process's.
    #[arg(long = "env", value_name = "NAME=VALUE", value_parser = parse_env_var)]
    env: Vec<(String, String)>,
    #[command(flatten)]
    filter: FilterArg,
}

fn parse_env_var(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_string(), value.to_string())),
        _ => Err(format!("`{text}` is not NAME=VALUE")),
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            // --help and --version print to stdout and succeed; usage
            // errors exit 1 like every other failure.
            let _ = err.print();
            return if err.use_stderr() { ExitCode::FAILURE } else { ExitCode::SUCCESS };
        }
    };
    let result = match cli.command {
        Command::Check { config, vm } => check(&config, &vm),
        Command::HashKey => hash_key(),
        Command::NewKey { id, routes } => new_key(&id, routes),
        Command::Run { config, request, vm } => run(&config, &request, &vm),
        Command::Conformance { dir, filter } => conformance(dir, &filter),
        Command::Push(args) => keyswap_harness::push::main(&args),
        Command::Bench(args) => bench(&args),
        Command::Serve(args) => keyswap_harness::serve::main(&args),
        Command::Manifest(platform) => print_manifest(platform),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            if !message.is_empty() {
                eprintln!("error: {message}");
            }
            ExitCode::FAILURE
        }
    }
}

fn load_filter(arg: &FilterArg) -> Result<FilterModule, String> {
    let path = arg.filter.clone().unwrap_or_else(default_filter_path);
    FilterModule::load(&path).map_err(|e| e.to_string())
}

fn bench(args: &BenchArgs) -> Result<(), String> {
    use keyswap_harness::bench;
    let path = args.filter.filter.clone().unwrap_or_else(default_filter_path);
    let wasm_bytes = read(&path)?.len();
    let module = FilterModule::load(&path).map_err(|e| e.to_string())?;
    let noop_path = args.noop.clone().unwrap_or_else(|| path.with_file_name("keyswap_bench_noop.wasm"));
    let noop = match FilterModule::load(&noop_path) {
        Ok(noop) => Some(noop),
        Err(HarnessError::WasmMissing { .. }) if args.noop.is_none() => {
            eprintln!("bench: no no-op module at {}: no floor (build it: cargo build --release --target wasm32-wasip1 -p keyswap-bench-noop)", noop_path.display());
            None
        }
        Err(e) => return Err(e.to_string()),
    };
    let progress = |line: &str| eprintln!("bench: {line}");
    let report = bench::run(&module, wasm_bytes, noop.as_ref(), &args.sizes, args.iterations, &progress)
        .map_err(|e| e.to_string())?;
    let machine = machine_line();
    let table = bench::markdown(&report, &machine);
    println!("{table}");
    if let Some(doc) = &args.update_docs {
        let text = std::fs::read_to_string(doc).map_err(|e| format!("cannot read {}: {e}", doc.display()))?;
        let updated = bench::replace_block(&text, &table)
            .ok_or_else(|| format!("{} has no <!-- bench:harness:start/end --> block", doc.display()))?;
        std::fs::write(doc, updated).map_err(|e| format!("cannot write {}: {e}", doc.display()))?;
        eprintln!("bench: {} updated", doc.display());
    }
    Ok(())
}

/// `Machine: N CPUs, <model>` from /proc/cpuinfo, when it can be read.
fn machine_line() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".to_string());
    format!("Machine: {cpus} CPUs, {model}; release build of the harness.")
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// A filter log line without the `keyswap: ` every line starts with.
fn bare(message: &str) -> &str {
    message.strip_prefix("keyswap: ").unwrap_or(message)
}

/// Loads `config` into a fresh VM; a refusal prints each logged error and
/// fails with nothing more to say.
fn configured(config: &Path, vm: &VmArgs) -> Result<FilterInstance, String> {
    let module = load_filter(&vm.filter)?;
    let config = read(config)?;
    let env: BTreeMap<String, String> = vm.env.iter().cloned().collect();
    match module.configure(&config, &env) {
        Ok(instance) => Ok(instance),
        Err(HarnessError::Refused { log }) => {
            let mut printed = false;
            for line in log.lines().filter(|l| l.contains("refused") || l.contains("panic")) {
                println!("error: {}", bare(line));
                printed = true;
            }
            if !printed {
                println!("error: the filter refused the configuration; its log:\n{log}");
            }
            Err(String::new())
        }
        Err(err) => Err(err.to_string()),
    }
}

fn check(config: &Path, vm: &VmArgs) -> Result<(), String> {
    let instance = configured(config, vm)?;
    let summary = instance
        .log()
        .iter()
        .rev()
        .find(|e| e.level >= LogLevel::Info)
        .map_or("configuration loaded", |e| bare(&e.message));
    println!("ok: {summary}");
    let text = String::from_utf8_lossy(&read(config)?).into_owned();
    for warning in manifest::delivery_warnings(&text) {
        println!("warning: {warning}");
    }
    Ok(())
}

fn print_manifest(platform: Platform) -> Result<(), String> {
    let (docs, config) = match platform {
        Platform::Istio { config, istio_version, selector, namespace, common } => {
            let common = manifest::Common { name: common.name, namespace, image: common.image };
            let text = String::from_utf8_lossy(&read(&config)?).into_owned();
            let opts = manifest::Istio { common, selector, minor: istio_version };
            (manifest::istio(&text, &opts), config)
        }
        Platform::EnvoyGateway { config, routes, gateway, namespace, module_path, common } => {
            let common = manifest::Common { name: common.name, namespace, image: common.image };
            let text = String::from_utf8_lossy(&read(&config)?).into_owned();
            let opts = manifest::EnvoyGateway { common, routes, gateway, module_path };
            (manifest::envoy_gateway(&text, &opts), config)
        }
    };
    let docs = docs.map_err(|e| format!("{}: {e}", config.display()))?;
    for warning in manifest::size_warnings(&docs) {
        eprintln!("warning: {warning}");
    }
    let header = format!(
        "# Made by `keyswap manifest` from {}: edit that file and run the command again;\n\
         # `kubectl apply -f` the output to add, change or revoke keys (deploy/README.md).\n",
        config.display()
    );
    print!("{}", manifest::to_stream(&docs, &header));
    Ok(())
}

fn hash_key() -> Result<(), String> {
    let mut input = Vec::new();
    std::io::stdin().read_to_end(&mut input).map_err(|e| format!("cannot read stdin: {e}"))?;
    let key = trim_one_newline(&input);
    if key.is_empty() {
        return Err("no key on stdin (pipe it in: `printf %s KEY | keyswap hash-key`)".into());
    }
    println!("{}", hex(&Sha256::digest(key)));
    Ok(())
}

fn trim_one_newline(bytes: &[u8]) -> &[u8] {
    bytes.strip_suffix(b"\r\n").or_else(|| bytes.strip_suffix(b"\n")).unwrap_or(bytes)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn new_key(id: &str, routes: Vec<String>) -> Result<(), String> {
    if id.trim().is_empty() {
        return Err("--id must not be empty".into());
    }
    let mut routes: Vec<String> = routes.into_iter().map(|r| r.trim().to_string()).filter(|r| !r.is_empty()).collect();
    if routes.is_empty() {
        eprintln!("note: no --routes given: the entry allows every route (\"*\"); narrow it if you can");
        routes.push("*".into());
    }
    let mut random = [0u8; 32];
    getrandom::fill(&mut random).map_err(|e| format!("no randomness from the OS: {e}"))?;
    let key = format!("ks_{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random));
    let entry = serde_json::json!({ "id": id, "key_sha256": hex(&Sha256::digest(key.as_bytes())), "routes": routes });
    println!("key (shown once; give it to the client and keep no copy):");
    println!("{key}");
    println!("clients entry:");
    println!("{entry}");
    Ok(())
}

fn run(config: &Path, request: &Path, vm: &VmArgs) -> Result<(), String> {
    let request_text = read(request)?;
    let request: Request = serde_json::from_slice(&request_text)
        .map_err(|e| format!("{}: not a request object: {e}", request.display()))?;
    let mut instance = configured(config, vm)?;
    let before = instance.metrics();
    let outcome = instance
        .request_to(request.route_name.as_deref(), request.cluster(), &request.header_list())
        .map_err(|e| e.to_string())?;
    instance.finish().map_err(|e| e.to_string())?;
    for entry in instance.log() {
        eprintln!("log: {entry}");
    }
    match outcome {
        Outcome::Forwarded { headers } => {
            println!("decision: forward");
            println!("upstream request:");
            let get = |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| String::from_utf8_lossy(v));
            println!("  {} {}", get(":method").unwrap_or_default(), get(":path").unwrap_or_default());
            for (name, value) in text_pairs(&headers) {
                println!("  {name}: {value}");
            }
        }
        Outcome::Local(local) => {
            println!("decision: deny {}", local.status);
            println!("local response:");
            println!("  status: {}", local.status);
            for (name, value) in text_pairs(&local.headers) {
                println!("  {name}: {value}");
            }
            println!("  body: {}", String::from_utf8_lossy(&local.body));
        }
        Outcome::Paused { .. } => return Err("the filter paused the request without answering it".into()),
    }
    print_observability(&instance, &before);
    if let Some(calls) = instance.last_request_host_calls() {
        eprintln!("host calls: {}", calls.total());
    }
    Ok(())
}

/// What Envoy's access log and stats would show of the request: the filter
/// state it set (`%FILTER_STATE(wasm.keyswap:PLAIN)%`) and the metrics it
/// moved.
fn print_observability(instance: &FilterInstance, before: &BTreeMap<String, (MetricType, u64)>) {
    let state = instance.filter_state().cloned().unwrap_or_default();
    if state.is_empty() {
        println!("access log: (no filter state set)");
    }
    for (name, value) in &state {
        println!("access log: %FILTER_STATE({name}:PLAIN)% = {}", String::from_utf8_lossy(value));
    }
    let moved: Vec<String> = instance
        .metrics()
        .into_iter()
        .filter_map(|(name, (kind, now))| {
            let was = before.get(&name).map_or(0, |(_, v)| *v);
            (now != was).then(|| {
                let change = if now >= was { format!("+{}", now - was) } else { format!("-{}", was - now) };
                format!("  {name} {change} ({kind}, now {now})")
            })
        })
        .collect();
    if moved.is_empty() {
        println!("metrics: none changed");
    } else {
        println!("metrics:");
        for line in moved {
            println!("{line}");
        }
    }
}

fn conformance(dir: Option<PathBuf>, filter: &FilterArg) -> Result<(), String> {
    let dir = dir.unwrap_or_else(default_dir);
    let suite = Suite::load(&dir)?;
    let module = load_filter(filter)?;
    let (report, unimplemented) = run_suite(&module, &suite);
    let implemented = check_unimplemented(&unimplemented);
    if let Err(message) = &implemented {
        println!("FAIL {message}");
    }
    println!("{}", report.render());
    if report.failed.is_empty() && implemented.is_ok() {
        Ok(())
    } else {
        Err(String::new())
    }
}
