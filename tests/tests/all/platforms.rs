//! The manifests `keyswap manifest` makes, run by a real Envoy in the shape
//! each control plane gives them: no istiod or Envoy Gateway runs here, so
//! each test builds the Envoy configuration that control plane makes of
//! the manifests (read from its source; the one substitution is the
//! transport, a watched file instead of ADS) and checks what a client can
//! and cannot do through it.
//!
//! - Istio (`WasmPlugin` + `EnvoyFilter`): the listener and each bound
//!   cluster reference one ECDS resource, of the name that release gives
//!   the plugin; credentials reach only their clusters, other clusters of
//!   the gateway get requests without keys or credentials, a revocation
//!   in the resource holds in both stages, the deny-all filter Istio's
//!   agent substitutes when the image cannot be fetched (`FAIL_CLOSE`)
//!   refuses everything, and a cluster patch naming the resource as
//!   another release does fails closed (500), never open.
//! - Envoy Gateway (`EnvoyExtensionPolicy` + `EnvoyPatchPolicy`): the
//!   listener filter inline, disabled, enabled on the policy's HTTPRoute
//!   only; clusters by CDS with the patch applied. A revocation is a
//!   cluster update, in force on a connection that is already open (no
//!   listener drain), and a configuration keyswap refuses is rejected by
//!   Envoy (`update_rejected`) with the previous one still serving.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::sha256_hex;

use keyswap_tests::ecds::{self, WASM_TYPE};
use keyswap_tests::echo::{Echo, Echoed};
use keyswap_tests::envoy::{filter_wasm, repo_root, Envoy, Launch};
use keyswap_tests::http::{Request, Response};
use keyswap_tests::manifest;
use keyswap_tests::raw::{self, KeepAlive};
use serde_json::{json, Value};

const TEAM_KEY: &str = "platform-team-key";
const BOT_KEY: &str = "platform-bot-key";
const CREDENTIAL_A: &str = "credential-for-a";
const CREDENTIAL_B: &str = "credential-for-b";
const OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
/// The route header tests use to pick a cluster.
const PICK: &str = "x-pick";
/// Set by each route: which cluster the echo's request came through.
const REACHED: &str = "x-reached";

/// Team: route `a` only; bot: route `b`, or nothing when `bot_disabled`.
fn config(a: &str, b: &str, bot_disabled: bool) -> String {
    json!({
        "clients": [
            {"id": "team", "key_sha256": sha256_hex(TEAM_KEY), "routes": ["a"]},
            {"id": "bot", "key_sha256": sha256_hex(BOT_KEY), "routes": ["b"], "disabled": bot_disabled},
        ],
        "routes": [
            {"name": "a", "match": {"clusters": [a]},
             "inject": [{"header": "authorization", "prefix": "Bearer ", "value": {"env": "CREDENTIAL_A"}}]},
            {"name": "b", "match": {"clusters": [b]},
             "inject": [{"header": "x-api-key", "value": {"env": "CREDENTIAL_B"}}]},
        ],
        "client_id_header": "x-keyswap-client",
        "unmatched_route": "pass",
    })
    .to_string()
}

/// `file` in a fresh directory of its own (Envoy watches the directory).
fn watched_file(test: &str, file: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("keyswap-{test}-{}-{:?}", std::process::id(), Instant::now()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    dir.join(file)
}

fn static_cluster(name: &str, upstream: std::net::SocketAddr) -> Value {
    json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "2s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address":
            {"socket_address": {"address": upstream.ip().to_string(), "port_value": upstream.port()}}}}]}]},
    })
}

/// A route to `cluster`, picked by `x-pick: <cluster>`, telling the echo
/// which cluster it came through.
fn route_to(cluster: &str, name: &str) -> Value {
    json!({
        "name": name,
        "match": {"prefix": "/", "headers": [{"name": PICK, "string_match": {"exact": cluster}}]},
        "route": {"cluster": cluster},
        "request_headers_to_add": [{"header": {"key": REACHED, "value": cluster}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}],
    })
}

fn hcm(routes: Vec<Value>, http_filters: Vec<Value>) -> Value {
    json!({
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": "gateway",
            // Clusters may come later by CDS, as with a control plane's RDS.
            "route_config": {"name": "gateway", "validate_clusters": false,
                             "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}]},
            "http_filters": http_filters,
        },
    })
}

fn router() -> Value {
    json!({"name": "envoy.filters.http.router",
           "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}})
}

fn path_source(file: &Path) -> Value {
    json!({"path_config_source": {
        "path": file.display().to_string(),
        "watched_directory": {"path": file.parent().unwrap_or(Path::new("/")).display().to_string()},
    }})
}

fn send(envoy: &Envoy, cluster: &str, key: Option<&str>, extra: &[(&str, &str)]) -> Response {
    let mut request = Request::get("/v1/models").header("host", "gateway.example").header(PICK, cluster);
    if let Some(key) = key {
        request = request.header("authorization", format!("Bearer {key}"));
    }
    for (name, value) in extra {
        request = request.header(name, value);
    }
    request.send(envoy.listener("gateway").unwrap_or_else(|e| panic!("{e}"))).unwrap_or_else(|e| panic!("{e}"))
}

/// What the upstream of `cluster` received, or why nothing did.
fn reached(response: &Response, cluster: &str) -> Echoed {
    assert_eq!(response.status, 200, "{cluster}: {}", response.text());
    let echoed = Echoed::parse(&response.body).unwrap_or_else(|| panic!("not the echo: {}", response.text()));
    assert_eq!(echoed.header(REACHED), Some(cluster));
    echoed
}

fn status_within(timeout: Duration, want: u16, mut send: impl FnMut() -> Response) -> Duration {
    let start = Instant::now();
    loop {
        let got = send();
        if got.status == want {
            return start.elapsed();
        }
        assert!(start.elapsed() < timeout, "still {} after {timeout:?}, want {want}: {}", got.status, got.text());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn launch(bootstrap: &Value, expect: Vec<String>) -> Launch {
    Launch {
        file_name: "envoy.json".into(),
        text: bootstrap.to_string(),
        env: vec![("CREDENTIAL_A".into(), CREDENTIAL_A.into()), ("CREDENTIAL_B".into(), CREDENTIAL_B.into())],
        expect_configs: expect,
        ..Launch::default()
    }
}

// ---- Istio ----------------------------------------------------------------

const ISTIO_A: &str = "outbound|80||api-a.example.com";
const ISTIO_B: &str = "outbound|80||api-b.example.com";
const ISTIO_OTHER: &str = "outbound|80||other.example.com";

fn istio_docs(config: &str, minor: u32) -> Vec<Value> {
    let opts = manifest::Istio {
        common: manifest::Common {
            name: "keyswap".into(),
            namespace: "istio-system".into(),
            image: "oci://registry.example.com/keyswap/filter:0.1.0".into(),
        },
        selector: ("istio".into(), "keyswap-gateway".into()),
        minor,
    };
    manifest::istio(config, &opts).unwrap_or_else(|e| panic!("{e}"))
}

/// The ECDS resource Istio's agent hands Envoy for the WasmPlugin: the
/// image fetched to a local file, `pluginConfig` as JSON text, `HOST`
/// variables as `host_env_keys` (istio/istio `pilot/pkg/model/extensions.go`,
/// `pkg/wasm/convert.go`).
fn istio_resource(name: &str, plugin: &Value, wasm: &Path) -> Value {
    let spec = &plugin["spec"];
    let env: Vec<&str> =
        spec["vmConfig"]["env"].as_array().into_iter().flatten().filter_map(|e| e["name"].as_str()).collect();
    let typed_config = json!({
        "@type": WASM_TYPE,
        "config": {
            "name": format!("{}.{}", plugin["metadata"]["namespace"].as_str().unwrap_or(""), plugin["metadata"]["name"].as_str().unwrap_or("")),
            "fail_open": spec["failStrategy"] != "FAIL_CLOSE",
            "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": spec["pluginConfig"].to_string()},
            "vm_config": {
                "runtime": "envoy.wasm.runtime.v8",
                "code": {"local": {"filename": wasm.display().to_string()}},
                "environment_variables": {"host_env_keys": env},
            },
        },
    });
    discovery(name, typed_config)
}

/// What the agent hands Envoy when it cannot fetch a `FAIL_CLOSE` plugin:
/// an RBAC filter that denies everything (istio/istio `pkg/wasm/convert.go`).
fn istio_deny_all(name: &str) -> Value {
    discovery(name, json!({"@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC", "rules": {}}))
}

fn discovery(name: &str, typed_config: Value) -> Value {
    json!({"version_info": format!("{}", typed_config.to_string().len()), "resources": [{
        "@type": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
        "name": name,
        "typed_config": typed_config,
    }]})
}

/// The gateway istiod builds from the two manifests: the WasmPlugin's
/// filter in the listener by ECDS, the EnvoyFilter's patches merged the
/// way Istio merges them (a `typed_extension_protocol_options` entry is
/// replaced whole; the HCM's fields merged), every `ads` source replaced
/// by the watched `ecds` file.
fn istio_gateway(
    docs: &[Value],
    listener_name: &str,
    ecds: &Path,
    upstream: std::net::SocketAddr,
    silent_istiod: Option<std::net::SocketAddr>,
) -> Value {
    let patches = docs[1]["spec"]["configPatches"].as_array().cloned().unwrap_or_default();
    let by_file = |mut v: Value| {
        v["config_discovery"]["config_source"] = path_source(ecds);
        v
    };
    // An istiod that does not serve the clusters' resource: a gRPC source
    // that never answers, with the patch's own `initial_fetch_timeout`.
    let by_silence = |mut v: Value| {
        let source = &mut v["config_discovery"]["config_source"];
        source.as_object_mut().map(|s| s.remove("ads"));
        source["api_config_source"] = json!({"api_type": "GRPC", "transport_api_version": "V3",
            "grpc_services": [{"envoy_grpc": {"cluster_name": "silent-istiod"}}]});
        v
    };
    let clusters: Vec<Value> = [ISTIO_A, ISTIO_B, ISTIO_OTHER]
        .iter()
        .map(|name| {
            let mut cluster = static_cluster(name, upstream);
            for p in patches.iter().filter(|p| p["applyTo"] == "CLUSTER" && p["match"]["cluster"]["name"] == **name) {
                let mut options = p["patch"]["value"]["typed_extension_protocol_options"].clone();
                let filters = &mut options[OPTIONS]["http_filters"];
                filters[0] = match silent_istiod {
                    Some(_) => by_silence(filters[0].clone()),
                    None => by_file(filters[0].clone()),
                };
                cluster["typed_extension_protocol_options"] = options;
            }
            cluster
        })
        .collect();
    let mut clusters = clusters;
    if let Some(istiod) = silent_istiod {
        let mut xds = static_cluster("silent-istiod", istiod);
        xds["typed_extension_protocol_options"] = json!({OPTIONS: {"@type":
            "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}}});
        clusters.push(xds);
    }
    let listener_filter = by_file(json!({
        "name": listener_name,
        "config_discovery": {"type_urls": [WASM_TYPE, "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"]},
    }));
    let routes = [ISTIO_A, ISTIO_B, ISTIO_OTHER].iter().map(|c| route_to(c, c)).collect();
    let mut manager = hcm(routes, vec![listener_filter, router()]);
    for p in patches.iter().filter(|p| p["applyTo"] == "NETWORK_FILTER") {
        if let Some(fields) = p["patch"]["value"]["typed_config"].as_object() {
            for (k, v) in fields.iter().filter(|(k, _)| *k != "@type") {
                manager["typed_config"][k] = v.clone();
            }
        }
    }
    json!({
        "node": {"id": "istio-shaped", "cluster": "istio-shaped"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "stats_config": istio_stats_config(),
        "static_resources": {
            "listeners": [{"name": "gateway", "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                           "filter_chains": [{"filters": [manager]}]}],
            "clusters": clusters,
        },
    })
}

/// The stats part of the bootstrap Istio's agent writes: no default tags,
/// and only the stats its inclusion list names are kept (istio/istio
/// `tools/packaging/common/envoy_bootstrap.json`; the required prefixes
/// and suffixes of `pkg/bootstrap/config.go`). keyswap's metrics are kept
/// because Envoy names them `wasmcustom.…`, under the `wasm` prefix.
fn istio_stats_config() -> Value {
    let prefixes = ["reporter=", "cluster_manager", "listener_manager", "server", "cluster.xds-grpc", "wasm"];
    let suffixes = ["rbac.allowed", "rbac.denied", "shadow_allowed", "shadow_denied", "downstream_cx_active"];
    let patterns: Vec<Value> = prefixes
        .iter()
        .map(|p| json!({"prefix": p}))
        .chain(suffixes.iter().map(|s| json!({"suffix": s})))
        .chain(["component", "istio"].iter().map(|p| json!({"prefix": p})))
        .collect();
    json!({
        "use_all_default_tags": false,
        "stats_tags": [{"tag_name": "response_code", "regex": "_rq(_(\\d{3}))$"}],
        "stats_matcher": {"inclusion_list": {"patterns": patterns}},
    })
}

/// deploy/istio/stats-tags-configmap.yaml's bootstrap fragment, which the
/// gateway patch hands Istio's agent (`ISTIO_BOOTSTRAP_OVERRIDE`), and the
/// agent Envoy (`--config-yaml`).
fn istio_bootstrap_override() -> String {
    let path = repo_root().join("deploy/istio/stats-tags-configmap.yaml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let map: serde_yaml::Value = serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    map["data"]["custom_bootstrap.json"].as_str().unwrap_or_else(|| panic!("no custom_bootstrap.json")).to_string()
}

fn write_json(path: &Path, value: &Value) {
    ecds::write_atomically(path, value.to_string().as_bytes()).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// An Istio-shaped gateway running the manifests made for Istio
/// 1.`made_for` as an istiod of 1.`runs` serves them, reaching `echo`;
/// with the watched ECDS file and the resource name istiod serves. When
/// the releases differ, the clusters ask `silent_istiod`, which never
/// answers (istiod serves no resource of the name they ask for).
fn start_istio(
    made_for: u32,
    runs: u32,
    echo: &Echo,
    silent_istiod: Option<std::net::SocketAddr>,
) -> (Envoy, PathBuf, String) {
    let wasm = filter_wasm().unwrap_or_else(|e| panic!("{e}"));
    let ecds_file = watched_file("istio", "resource.json");
    let docs = istio_docs(&config(ISTIO_A, ISTIO_B, false), made_for);
    let served = manifest::istio_ecds_name(runs, "istio-system", "keyswap").unwrap_or_else(|e| panic!("{e}"));
    write_json(&ecds_file, &istio_resource(&served, &docs[0], &wasm));
    let bootstrap = istio_gateway(&docs, &served, &ecds_file, echo.addr(), silent_istiod);
    let mut launch = launch(&bootstrap, vec![docs[0]["spec"]["pluginConfig"].to_string()]);
    launch.args = vec!["--config-yaml".into(), istio_bootstrap_override()];
    let envoy = Envoy::start(&launch).unwrap_or_else(|e| panic!("{e}"));
    (envoy, ecds_file, served)
}

#[test]
fn istio_manifests_run_as_istio_delivers_them() {
    let wasm = filter_wasm().unwrap_or_else(|e| panic!("{e}"));
    let echo = Echo::start("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
    let (envoy, ecds_file, name) = start_istio(29, 29, &echo, None);

    // The team's credential reaches cluster a, with the key gone.
    let got = reached(&send(&envoy, ISTIO_A, Some(TEAM_KEY), &[]), ISTIO_A);
    assert_eq!(got.header("authorization"), Some(format!("Bearer {CREDENTIAL_A}").as_str()));
    // Not cluster b, whatever the request says.
    assert_eq!(send(&envoy, ISTIO_B, Some(TEAM_KEY), &[]).status, 403);
    let got = reached(&send(&envoy, ISTIO_B, Some(BOT_KEY), &[]), ISTIO_B);
    assert_eq!(got.header("x-api-key"), Some(CREDENTIAL_B));
    assert_eq!(got.header("authorization"), None, "the key is removed");
    // Another service of the gateway: keys removed, no credential.
    let got = reached(&send(&envoy, ISTIO_OTHER, Some(TEAM_KEY), &[("x-api-key", BOT_KEY)]), ISTIO_OTHER);
    assert!(
        got.headers.iter().all(|(_, v)| !v.contains(TEAM_KEY)
            && !v.contains(BOT_KEY)
            && !v.contains(CREDENTIAL_A)
            && !v.contains(CREDENTIAL_B)),
        "{:?}",
        got.headers
    );
    // The EnvoyFilter's HCM patch: `_` look-alikes are refused.
    assert_eq!(send(&envoy, ISTIO_A, Some(TEAM_KEY), &[("x_api_key", "x")]).status, 400);
    // Istio keeps keyswap's metrics, and the override labels them.
    let metrics = admin(&envoy, "/stats/prometheus");
    let allowed = metrics.lines().find(|l| {
        l.starts_with("keyswap_requests_total{") && l.contains(r#"route="a""#) && l.contains(r#"outcome="allowed""#)
    });
    assert!(
        allowed.is_some_and(|l| l.ends_with(" 1")),
        "{}",
        metrics.lines().filter(|l| l.contains("keyswap")).collect::<Vec<_>>().join("\n")
    );

    // A revocation applied to the WasmPlugin reaches both stages.
    let revoked = config(ISTIO_A, ISTIO_B, true);
    write_json(&ecds_file, &istio_resource(&name, &istio_docs(&revoked, 29)[0], &wasm));
    status_within(Duration::from_secs(10), 401, || send(&envoy, ISTIO_B, Some(BOT_KEY), &[]));
    reached(&send(&envoy, ISTIO_A, Some(TEAM_KEY), &[]), ISTIO_A);

    // A configuration keyswap refuses: both stages keep the revoked one,
    // and the refusal shows in the ECDS stats the override keeps.
    let mut refused = istio_docs(&revoked, 29).remove(0);
    refused["spec"]["pluginConfig"]["clients"] = json!("not a list");
    write_json(&ecds_file, &istio_resource(&name, &refused, &wasm));
    for stage in ["http_filter", "upstream_http_filter"] {
        let stat = format!("extension_config_discovery.{stage}.{name}.update_rejected");
        let start = Instant::now();
        while counter(&envoy, &stat) == 0 {
            assert!(start.elapsed() < Duration::from_secs(10), "{stat} stayed 0");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    assert_eq!(send(&envoy, ISTIO_B, Some(BOT_KEY), &[]).status, 401, "the revocation holds");
    reached(&send(&envoy, ISTIO_A, Some(TEAM_KEY), &[]), ISTIO_A);

    // The image cannot be fetched (FAIL_CLOSE): the agent's deny-all.
    write_json(&ecds_file, &istio_deny_all(&name));
    status_within(Duration::from_secs(10), 403, || send(&envoy, ISTIO_A, Some(TEAM_KEY), &[]));
    // The listener watches the resource too, on a subscription of its own.
    status_within(Duration::from_secs(10), 403, || send(&envoy, ISTIO_OTHER, None, &[]));
}

#[test]
fn an_istio_cluster_patch_for_another_release_fails_closed() {
    let echo = Echo::start("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
    // Manifests made for 1.25 on an Istio 1.29 gateway: istiod serves the
    // plugin under 1.29's name and the listener (istiod's) asks for it;
    // the clusters (the patch's) ask for 1.25's, which istiod never sends.
    // The gateway starts once the patch's fetch timeout has passed.
    let istiod = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
    let started = Instant::now();
    let (envoy, _, _) = start_istio(25, 29, &echo, istiod.local_addr().ok());
    let waited = started.elapsed();
    let timeout: u64 = manifest::ISTIO_FETCH_TIMEOUT.trim_end_matches('s').parse().unwrap_or_else(|e| panic!("{e}"));
    assert!(waited < Duration::from_secs(timeout + 20), "ready after {waited:?}");
    let response = send(&envoy, ISTIO_A, Some(TEAM_KEY), &[]);
    assert_eq!(response.status, 500, "{}", response.text());
    assert!(!response.text().contains(CREDENTIAL_A));
    // Unpatched clusters are untouched by the mistake.
    reached(&send(&envoy, ISTIO_OTHER, None, &[]), ISTIO_OTHER);
}

// ---- Envoy Gateway --------------------------------------------------------

const EG_A: &str = "httproute/default/api-openai/rule/0";
const EG_B: &str = "httproute/default/api-anthropic/rule/0";
const EG_OTHER: &str = "httproute/default/other/rule/0";

fn eg_docs(config: &str, wasm: &Path) -> Vec<Value> {
    let opts = manifest::EnvoyGateway {
        common: manifest::Common {
            name: "keyswap".into(),
            namespace: "default".into(),
            image: "registry.example.com/keyswap/filter:0.1.0".into(),
        },
        routes: vec!["api-openai".into(), "api-anthropic".into()],
        gateway: "eg".into(),
        module_path: wasm.display().to_string(),
    };
    manifest::envoy_gateway(config, &opts).unwrap_or_else(|e| panic!("{e}"))
}

/// The clusters Envoy Gateway makes for the three HTTPRoute rules, with
/// the EnvoyPatchPolicy's JSON patches applied (each an `add` of
/// `/typed_extension_protocol_options`), as a CDS response.
fn eg_clusters(docs: &[Value], upstream: std::net::SocketAddr) -> Value {
    let patches = docs[1]["spec"]["jsonPatches"].as_array().cloned().unwrap_or_default();
    let clusters: Vec<Value> = [EG_A, EG_B, EG_OTHER]
        .iter()
        .map(|name| {
            let mut cluster = static_cluster(name, upstream);
            cluster["@type"] = json!("type.googleapis.com/envoy.config.cluster.v3.Cluster");
            for p in patches.iter().filter(|p| p["name"] == **name) {
                assert_eq!(p["operation"]["op"], "add");
                assert_eq!(p["operation"]["path"], "/typed_extension_protocol_options");
                cluster["typed_extension_protocol_options"] = p["operation"]["value"].clone();
            }
            cluster
        })
        .collect();
    json!({"version_info": format!("{}", clusters.iter().map(|c| c.to_string().len()).sum::<usize>()), "resources": clusters})
}

/// The listener Envoy Gateway makes for the EnvoyExtensionPolicy: the
/// Wasm filter inline and disabled, enabled by `typed_per_filter_config`
/// on the policy's HTTPRoute's routes only (envoyproxy/gateway
/// `internal/xds/translator/wasm.go`); clusters by CDS from `cds`.
fn eg_gateway(docs: &[Value], wasm: &Path, cds: &Path) -> Value {
    let spec = &docs[0]["spec"]["wasm"][0];
    let filter_name = "envoy.filters.http.wasm/envoyextensionpolicy/default/keyswap/wasm/0";
    let filter = json!({
        "name": filter_name,
        "disabled": true,
        "typed_config": {"@type": WASM_TYPE, "config": {
            "name": spec["name"],
            "fail_open": spec["failOpen"],
            "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": spec["config"].to_string()},
            "vm_config": {
                "vm_id": "envoyextensionpolicy/default/keyswap/wasm/0",
                "runtime": "envoy.wasm.runtime.v8",
                "code": {"local": {"filename": wasm.display().to_string()}},
                "environment_variables": {"host_env_keys": spec["env"]["hostKeys"]},
            },
        }},
    });
    let enabled =
        json!({filter_name: {"@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "config": {}}});
    let mut routes: Vec<Value> = [EG_A, EG_B].iter().map(|c| route_to(c, &format!("{c}/match/0"))).collect();
    for route in &mut routes {
        route["typed_per_filter_config"] = enabled.clone();
    }
    routes.push(route_to(EG_OTHER, &format!("{EG_OTHER}/match/0")));
    json!({
        "node": {"id": "eg-shaped", "cluster": "eg-shaped"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "dynamic_resources": {"cds_config": {"resource_api_version": "V3", "path_config_source": path_source(cds)["path_config_source"]}},
        "static_resources": {
            "listeners": [{"name": "gateway", "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                           "filter_chains": [{"filters": [hcm(routes, vec![filter, router()])]}]}],
        },
    })
}

fn admin(envoy: &Envoy, path: &str) -> String {
    Request::get(path).header("host", "admin").send(envoy.admin()).map(|r| r.text()).unwrap_or_default()
}

fn counter(envoy: &Envoy, name: &str) -> u64 {
    admin(envoy, &format!("/stats?filter=^{name}$"))
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0)
}

#[test]
fn envoy_gateway_manifests_run_as_envoy_gateway_delivers_them() {
    let wasm = filter_wasm().unwrap_or_else(|e| panic!("{e}"));
    let echo = Echo::start("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
    let cds = watched_file("envoy-gateway", "clusters.json");
    let live = config(EG_A, EG_B, false);
    let docs = eg_docs(&live, &wasm);
    write_json(&cds, &eg_clusters(&docs, echo.addr()));
    let listener_config = docs[0]["spec"]["wasm"][0]["config"].to_string();
    let envoy =
        Envoy::start(&launch(&eg_gateway(&docs, &wasm, &cds), vec![listener_config])).unwrap_or_else(|e| panic!("{e}"));

    let got = reached(&send(&envoy, EG_A, Some(TEAM_KEY), &[]), EG_A);
    assert_eq!(got.header("authorization"), Some(format!("Bearer {CREDENTIAL_A}").as_str()));
    assert_eq!(send(&envoy, EG_B, Some(TEAM_KEY), &[]).status, 403);
    assert_eq!(reached(&send(&envoy, EG_B, Some(BOT_KEY), &[]), EG_B).header("x-api-key"), Some(CREDENTIAL_B));
    // Another HTTPRoute of the Gateway: keyswap is not there at all.
    let got = reached(&send(&envoy, EG_OTHER, Some("their-own-token"), &[]), EG_OTHER);
    assert_eq!(got.header("authorization"), Some("Bearer their-own-token"));

    // Revocation: `kubectl apply` of both policies; the cluster update
    // alone refuses the key, on a connection opened before it.
    let gateway = envoy.listener("gateway").unwrap_or_else(|e| panic!("{e}"));
    let mut open = KeepAlive::connect(gateway).unwrap_or_else(|e| panic!("{e}"));
    let bot = || {
        Request::get("/v1/models")
            .header("host", "gateway.example")
            .header(PICK, EG_B)
            .header("authorization", format!("Bearer {BOT_KEY}"))
    };
    assert_eq!(open.send(&raw::Request::from(&bot())).map(|r| r.status).unwrap_or(0), 200);
    let updates = counter(&envoy, "cluster_manager.cds.update_success");
    let revoked = eg_docs(&config(EG_A, EG_B, true), &wasm);
    write_json(&cds, &eg_clusters(&revoked, echo.addr()));
    let took = status_within(Duration::from_secs(10), 401, || {
        open.send(&raw::Request::from(&bot())).unwrap_or_else(|e| panic!("{e}"))
    });
    assert!(counter(&envoy, "cluster_manager.cds.update_success") > updates);
    eprintln!("revoked on an open connection {took:?} after the cluster update was written");

    // A configuration keyswap refuses: Envoy rejects the cluster update and
    // the revoked configuration keeps serving.
    let rejected = counter(&envoy, "cluster_manager.cds.update_rejected");
    let mut broken = eg_clusters(&docs, echo.addr());
    broken["resources"][1]["typed_extension_protocol_options"][OPTIONS]["http_filters"][0]["typed_config"]["config"]
        ["configuration"]["value"] = json!(r#"{"clients": "not a list"}"#);
    write_json(&cds, &broken);
    let start = Instant::now();
    while counter(&envoy, "cluster_manager.cds.update_rejected") == rejected {
        assert!(start.elapsed() < Duration::from_secs(10), "Envoy did not reject the refused configuration");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(open.send(&raw::Request::from(&bot())).map(|r| r.status).unwrap_or(0), 401, "the revocation holds");
    reached(&send(&envoy, EG_A, Some(TEAM_KEY), &[]), EG_A);
}
