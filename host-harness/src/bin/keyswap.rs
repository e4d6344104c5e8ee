//! `keyswap`: check a configuration, make and hash keys, run requests or
//! the conformance suite through the real filter module without Envoy, and
//! push a configuration to a running Envoy (ECDS).
//!
//! Every command exits 0 on success and 1 on failure (usage errors too).

use std::collections::BTreeMap;
use std::io::Read as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use base64::Engine as _;
use clap::{Args, Parser, Subcommand};
use keyswap_conformance::{default_dir, Request, Suite};
use keyswap_harness::runner::{check_unimplemented, run_suite, text_pairs};
use keyswap_harness::{delivery, manifest};
use keyswap_harness::{
    Artifact, ArtifactError, FilterInstance, FilterModule, Handled, HarnessError, LogLevel, MetricType,
};
use keyswap_policy::KeyCheck;
use sha2::{Digest as _, Sha256};

/// What `keyswap --help` ends with: real commands, run from the
/// repository root after `scripts/setup` (the CLI tests run each).
const EXAMPLES: &str = "\
Examples (from the repository root after scripts/setup; from source, `keyswap` is `cargo run -q -p keyswap-harness --`):
  keyswap new-key --id team-a --routes demo
  KEYSWAP_DEMO_CREDENTIAL=demo-upstream-credential keyswap check docs/examples/demo.json --env KEYSWAP_DEMO_CREDENTIAL
  keyswap run docs/examples/demo.json '{\"route_name\": \"demo\", \"cluster\": \"demo_echo\", \"headers\": [[\"authorization\", \"Bearer keyswap-demo-key\"]]}' --env KEYSWAP_DEMO_CREDENTIAL=demo-upstream-credential
  keyswap push docs/examples/demo.json --ecds .run/ecds/keyswap.pb --envoy-admin http://127.0.0.1:9901
  keyswap manifest istio deploy/istio/keyswap.json --istio-version 1.29 --image oci://registry.example.com/keyswap/filter:0.1.0
";

/// `keyswap run --help`'s complete example.
const RUN_EXAMPLE: &str = "\
Example (from the repository root; the request inline, from a file, or `-` for stdin):
  keyswap run docs/examples/demo.json '{\"route_name\": \"demo\", \"cluster\": \"demo_echo\", \"path\": \"/demo/hello\", \"headers\": [[\"authorization\", \"Bearer keyswap-demo-key\"]]}' --env KEYSWAP_DEMO_CREDENTIAL=demo-upstream-credential
";

#[derive(Parser)]
#[command(
    name = "keyswap",
    version,
    about = "keyswap's tools: the real filter module in a wasmtime host, no Envoy needed",
    after_help = EXAMPLES
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load a configuration into the filter and print its summary, or the
    /// error with its field path; then its size, as each delivery path
    /// carries it, and a warning for each common limit it does not fit
    /// (a ConfigMap, a gRPC xDS message, a Kubernetes object).
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
    /// the filter set and the metrics the request moved. A credential the
    /// filter injected is shown by its source (`<env NAME>`), never its
    /// value.
    #[command(after_help = RUN_EXAMPLE)]
    Run {
        /// The plugin configuration (JSON).
        config: PathBuf,
        /// The request: a JSON file, `-` for stdin, or the JSON itself when
        /// it starts with `{`. Shaped like a conformance case's `request`:
        /// {"route_name", "cluster", "method", "path", "authority",
        /// "headers": [[name, value], ...]}, each optional; `cluster` is
        /// Envoy's final cluster (default: `route_name`).
        request: String,
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
    Push(PushArgs),
    /// Measure the filter module: per-request cost and host calls (allowed
    /// request and each denial), configuration time and VM memory, for
    /// 10, 1,000 and 100,000 clients; and the .wasm size. A benchmark, not
    /// a test: prints markdown tables.
    Bench(BenchArgs),
    /// Serve the keyswap component (wasm32-wasip2) as a wasi:http gateway
    /// until Ctrl-C; see docs/component.md.
    Serve(ServeArgs),
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

/// `keyswap push`'s arguments.
#[derive(Args)]
struct PushArgs {
    /// The keyswap configuration (JSON), sent byte for byte.
    config: PathBuf,
    /// The ECDS file Envoy watches (envoy.yaml: .run/ecds/keyswap.pb).
    /// Written as Envoy reads it by its name: binary protobuf for `.pb`
    /// (fastest for Envoy to parse), JSON for any other name (`.json`).
    #[arg(long, value_name = "PATH")]
    ecds: PathBuf,
    /// Envoy's admin (http://127.0.0.1:9901): wait until Envoy runs the new
    /// version, or report its rejection and exit 1.
    #[arg(long, value_name = "URL")]
    envoy_admin: Option<String>,
    /// Envoy's log file: on a rejection, print the lines that say why
    /// (Envoy's admin does not keep the reason for a file source).
    #[arg(long, value_name = "PATH")]
    envoy_log: Option<PathBuf>,
    /// The longest push waits, in seconds, for anything: another push to
    /// the same file, Envoy's admin (a restarting Envoy), Envoy taking the
    /// version.
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0)]
    timeout: f64,
    /// Write (rename) the file even when it already holds these bytes, so
    /// Envoy reads it again: after a file was written in place (`cp`,
    /// `cat >`), which Envoy never sees.
    #[arg(long)]
    force: bool,
    /// The filter module (default: $KEYSWAP_FILTER, else the workspace's
    /// target/wasm32-wasip1/release/keyswap_filter.wasm).
    #[arg(long, value_name = "PATH")]
    filter: Option<PathBuf>,
}

impl From<PushArgs> for keyswap_harness::push::PushOptions {
    fn from(args: PushArgs) -> Self {
        let PushArgs { config, ecds, envoy_admin, envoy_log, timeout, force, filter } = args;
        Self { config, ecds, envoy_admin, envoy_log, timeout, force, filter }
    }
}

/// `keyswap serve`'s arguments.
#[derive(Args)]
struct ServeArgs {
    /// The gateway component (default: $KEYSWAP_COMPONENT, else the
    /// workspace's target/wasm32-wasip2/release/keyswap_component.wasm).
    #[arg(long, value_name = "PATH")]
    component: Option<PathBuf>,
    /// The gateway configuration: {"keyswap": <policy configuration>,
    /// "upstreams": {"<route>" | "*": "http://host:port"}}.
    #[arg(long, value_name = "PATH")]
    config: PathBuf,
    /// Where to listen (port 0: any free port, printed at start).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// A variable of the component's environment (for `{"env": NAME}`
    /// credentials), repeatable: `NAME=VALUE`, or a bare `NAME` to pass
    /// this shell's value on. Nothing else of this process's environment
    /// reaches the component.
    #[arg(long = "env", value_name = "NAME[=VALUE]")]
    env: Vec<String>,
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
    /// vm_config.environment_variables; repeatable: `NAME=VALUE`, or a bare
    /// `NAME` to pass this shell's value on. Nothing else passes: these are
    /// the VM's whole environment.
    #[arg(long = "env", value_name = "NAME[=VALUE]")]
    env: Vec<String>,
    #[command(flatten)]
    filter: FilterArg,
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
        Command::Push(args) => keyswap_harness::push::main(&args.into()),
        Command::Bench(args) => bench(&args),
        Command::Serve(args) => {
            keyswap_harness::serve::main(args.component.as_deref(), &args.config, args.listen, &args.env)
        }
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
    let path = arg.filter.clone().unwrap_or_else(|| Artifact::Filter.default_path());
    FilterModule::load(&path).map_err(|e| e.to_string())
}

fn bench(args: &BenchArgs) -> Result<(), String> {
    use keyswap_harness::bench;
    let path = args.filter.filter.clone().unwrap_or_else(|| Artifact::Filter.default_path());
    let wasm_bytes = read(&path)?.len();
    let module = FilterModule::load(&path).map_err(|e| e.to_string())?;
    let noop_path = args.noop.clone().unwrap_or_else(|| path.with_file_name("keyswap_bench_noop.wasm"));
    let noop = match FilterModule::load(&noop_path) {
        Ok(noop) => Some(noop),
        Err(HarnessError::Artifact(ArtifactError::Missing { .. })) if args.noop.is_none() => {
            eprintln!(
                "bench: no no-op module at {}: no floor (build it: scripts/build-filter keyswap-bench-noop)",
                noop_path.display()
            );
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

/// Loads `config` into a fresh VM with `env` (from `--env`); a refusal
/// prints each logged error (and, for an unset variable, how to give it)
/// and fails with nothing more to say.
fn configured(config: &Path, env: &[(String, String)], filter: &FilterArg) -> Result<FilterInstance, String> {
    let module = load_filter(filter)?;
    let config = read(config)?;
    let env: BTreeMap<String, String> = env.iter().cloned().collect();
    match module.configure(&config, &env) {
        Ok(instance) => Ok(instance),
        Err(HarnessError::Refused { log }) => {
            let refusals: Vec<&str> =
                log.lines().filter(|l| l.contains("refused") || l.contains("panic")).map(bare).collect();
            for line in &refusals {
                println!("error: {line}");
            }
            if refusals.is_empty() {
                println!("error: the filter refused the configuration; its log:");
                for line in log.lines() {
                    println!("  {line}");
                }
            }
            if let Some(hint) = keyswap_harness::serve::env_hint(&refusals.join("\n"), "the filter") {
                println!("{hint}");
            }
            Err(String::new())
        }
        Err(err) => Err(err.to_string()),
    }
}

fn check(config: &Path, vm: &VmArgs) -> Result<(), String> {
    let env = keyswap_harness::serve::env_args(&vm.env)?;
    let instance = configured(config, &env, &vm.filter)?;
    let summary = instance
        .log()
        .iter()
        .rev()
        .find(|e| e.level >= LogLevel::Info)
        .map_or("configuration loaded", |e| bare(&e.message));
    println!("ok: {summary}");
    let text = String::from_utf8_lossy(&read(config)?).into_owned();
    println!("{}", delivery::size_line(&delivery::sizes(&text)));
    for warning in delivery::warnings(&text) {
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

/// `run`'s REQUEST: `-` is stdin, text starting with `{` is the JSON
/// itself, anything else a file.
fn read_request(arg: &str) -> Result<Request, String> {
    let (what, bytes) = if arg == "-" {
        let mut input = Vec::new();
        std::io::stdin().read_to_end(&mut input).map_err(|e| format!("cannot read stdin: {e}"))?;
        ("the request on stdin".to_string(), input)
    } else if arg.trim_start().starts_with('{') {
        ("the request".to_string(), arg.as_bytes().to_vec())
    } else {
        (arg.to_string(), read(Path::new(arg))?)
    };
    serde_json::from_slice(&bytes).map_err(|e| format!("{what}: not a request object: {e}"))
}

fn run(config: &Path, request: &str, vm: &VmArgs) -> Result<(), String> {
    let request = read_request(request)?;
    let env = keyswap_harness::serve::env_args(&vm.env)?;
    let mut instance = configured(config, &env, &vm.filter)?;
    let secrets = Secrets::new(&read(config)?, &env);
    let before = instance.metrics();
    let sent = request.header_list();
    let outcome =
        instance.request_to(request.route_name.as_deref(), request.cluster(), &sent).map_err(|e| e.to_string())?;
    instance.finish().map_err(|e| e.to_string())?;
    for entry in instance.log() {
        eprintln!("log: {}", one_line(&entry.to_string()));
    }
    match outcome {
        Handled::Forwarded { headers } => {
            println!("decision: forward");
            println!("upstream request:");
            // What the filter set or changed is shown with its credentials
            // masked; what the client sent, as sent.
            let shown = |name: &str, value: &[u8]| {
                let text = String::from_utf8_lossy(value);
                if sent.iter().any(|(n, v)| n == name && v == value) {
                    one_line(&text)
                } else {
                    one_line(&secrets.mask(&text))
                }
            };
            let get = |name: &str| headers.iter().find(|(n, _)| n == name).map(|(n, v)| shown(n, v));
            println!("  {} {}", get(":method").unwrap_or_default(), get(":path").unwrap_or_default());
            for (name, value) in &headers {
                println!("  {name}: {}", shown(name, value));
            }
        }
        Handled::Local(local) => {
            println!("decision: deny {}", local.status);
            println!("local response:");
            println!("  status: {}", local.status);
            for (name, value) in text_pairs(&local.headers) {
                println!("  {name}: {}", one_line(&value));
            }
            println!("  body: {}", one_line(&String::from_utf8_lossy(&local.body)));
        }
        Handled::Paused { .. } => return Err("the filter paused the request without answering it".into()),
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
        // The first stage's record for the final one is bytes, not text.
        let record = (name == KEY_RECORD).then(|| KeyCheck::decode(value)).flatten();
        match record {
            Some(KeyCheck::Digest(digest)) => {
                println!("filter state: {name} = sha256 of the presented key {}", hex(&digest));
            }
            Some(KeyCheck::Missing) => println!("filter state: {name} = no key presented"),
            Some(KeyCheck::Ambiguous) => println!("filter state: {name} = different keys presented"),
            Some(KeyCheck::TooLong) => println!("filter state: {name} = a key over the size limit"),
            None => {
                println!("access log: %FILTER_STATE({name}:PLAIN)% = {}", one_line(&String::from_utf8_lossy(value)));
            }
        }
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

/// The filter-state entry the first stage leaves for the final one
/// (keyswap-filter's `KEY_RECORD_PROPERTY`, under Envoy's `wasm.`).
const KEY_RECORD: &str = "wasm.keyswap_key";

/// `text` on one line: control characters (a newline, say) escaped, so
/// that every line printed is one line.
fn one_line(text: &str) -> String {
    if text.chars().any(char::is_control) {
        text.chars().flat_map(|c| if c.is_control() { c.escape_default().collect() } else { vec![c] }).collect()
    } else {
        text.to_string()
    }
}

/// The credentials a configuration can inject, as `run` hides them: the
/// `--env` values and the configuration's `inline` ones, each with the
/// source it is shown as.
struct Secrets(Vec<(String, String)>);

impl Secrets {
    fn new(config: &[u8], env: &[(String, String)]) -> Self {
        fn inline(value: &serde_json::Value, out: &mut Vec<(String, String)>) {
            match value {
                serde_json::Value::Object(map) => {
                    for (key, inner) in map {
                        match (key.as_str(), inner) {
                            ("inline", serde_json::Value::String(v)) => out.push(("<inline>".into(), v.clone())),
                            _ => inline(inner, out),
                        }
                    }
                }
                serde_json::Value::Array(items) => items.iter().for_each(|v| inline(v, out)),
                _ => {}
            }
        }
        let mut secrets: Vec<(String, String)> = env.iter().map(|(n, v)| (format!("<env {n}>"), v.clone())).collect();
        if let Ok(config) = serde_json::from_slice(config) {
            inline(&config, &mut secrets);
        }
        secrets.retain(|(_, v)| !v.is_empty());
        // The longest first: a value that holds another is hidden whole.
        secrets.sort_by_key(|(_, v)| std::cmp::Reverse(v.len()));
        Self(secrets)
    }

    /// `text` with each credential in it, as sent or percent-encoded (a
    /// query parameter) or inside HTTP Basic, replaced by its source.
    fn mask(&self, text: &str) -> String {
        let b64 = base64::engine::general_purpose::STANDARD;
        if let Some(encoded) = text.strip_prefix("Basic ") {
            if let Some(pair) = b64.decode(encoded.trim()).ok().and_then(|d| String::from_utf8(d).ok()) {
                let masked = self.mask(&pair);
                if masked != pair {
                    return format!("Basic base64({masked})");
                }
            }
        }
        let mut out = text.to_string();
        for (source, value) in &self.0 {
            out = out.replace(value.as_str(), source);
            let encoded = keyswap_policy::query::encode_component(value);
            if encoded != *value {
                out = out.replace(&encoded, source);
            }
        }
        out
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
