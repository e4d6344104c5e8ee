//! What an operator sees of keyswap in Envoy: metrics in `/stats`, the
//! access-log field, rate-limited audit lines, and the deployment
//! manifests in `deploy/`. The stats tags and the access-log format are
//! read from the shipped `envoy.yaml`, so the rules tested are the ones
//! users get.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use keyswap_tests::echo::Echo;
use keyswap_tests::envoy::{filter_wasm, gateway, repo_root, Envoy, Launch, Listener, ROUTE_HEADER};
use keyswap_tests::http::{Request, Response};
use serde_json::Value;

const CONFIG: &str = r#"{
  "clients": [
    {"id": "alpha", "key": "alpha-key-1", "routes": ["chat"]},
    {"id": "beta", "key": "beta-key-2", "routes": ["*"]},
    {"id": "gone", "key": "gone-key-3", "routes": ["*"], "expires": "2001-01-01T00:00:00Z"},
    {"id": "off", "key": "off-key-4", "routes": ["*"], "disabled": true}
  ],
  "routes": [
    {"name": "chat", "match": {"route_name": "chat", "clusters": ["chat"]},
     "inject": [{"header": "authorization", "prefix": "Bearer ", "value": {"env": "CHAT_CREDENTIAL"}}]},
    {"name": "files", "match": {"route_name": "files", "clusters": ["files"]},
     "inject": [{"header": "x-api-key", "value": {"env": "FILES_CREDENTIAL"}}]}
  ],
  "client_id_header": "x-keyswap-client",
  "metrics": {"per_client": true}
}"#;
const KEYS: [&str; 4] = ["alpha-key-1", "beta-key-2", "gone-key-3", "off-key-4"];
const CREDENTIALS: [&str; 2] = ["chat-upstream-credential", "files-upstream-credential"];

fn shipped() -> serde_yaml::Value {
    let text = std::fs::read_to_string(repo_root().join("envoy.yaml")).expect("envoy.yaml");
    serde_yaml::from_str(&text).expect("envoy.yaml parses")
}

fn to_json(value: &serde_yaml::Value) -> Value {
    serde_json::to_value(value).expect("YAML that is also JSON")
}

/// A gateway with the shipped `stats_config` and access log.
fn start() -> (Echo, Envoy) {
    let echo = Echo::start("127.0.0.1:0").expect("echo upstream");
    let env: BTreeMap<String, String> = [("CHAT_CREDENTIAL", CREDENTIALS[0]), ("FILES_CREDENTIAL", CREDENTIALS[1])]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let listener = Listener {
        name: "ops".into(),
        config: CONFIG.into(),
        env,
        route_names: vec!["chat".into(), "files".into()],
        ..Listener::default()
    };
    let mut bootstrap = gateway(std::slice::from_ref(&listener), echo.addr(), &filter_wasm().expect("the filter"));
    let yaml = shipped();
    bootstrap["stats_config"] = to_json(&yaml["stats_config"]);
    let hcm = &yaml["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"];
    bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["access_log"] =
        to_json(&hcm["access_log"]);
    let launch = Launch {
        file_name: "envoy.json".into(),
        text: bootstrap.to_string(),
        expect_configs: vec![listener.config],
        ..Launch::default()
    };
    let envoy = Envoy::start(&launch).expect("Envoy starts");
    (echo, envoy)
}

fn send(envoy: &Envoy, route: Option<&str>, key: Option<&str>) -> Response {
    let mut request = Request::get("/v1/things").header("host", "gateway.test");
    if let Some(route) = route {
        request = request.header(ROUTE_HEADER, route);
    }
    if let Some(key) = key {
        request = request.header("authorization", format!("Bearer {key}"));
    }
    request.send(envoy.listener("ops").expect("the listener")).expect("a response")
}

/// `/stats/prometheus` as `name{sorted labels}` → value, keyswap series only.
fn prometheus(envoy: &Envoy) -> BTreeMap<String, u64> {
    let response = Request::get("/stats/prometheus").header("host", "admin").send(envoy.admin()).expect("stats");
    let mut out = BTreeMap::new();
    for line in response.text().lines().filter(|l| l.starts_with("keyswap_")) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (name, labels) = match series.split_once('{') {
            Some((name, labels)) => (name, labels.trim_end_matches('}')),
            None => (series, ""),
        };
        let mut labels: Vec<&str> = labels.split(',').filter(|l| !l.is_empty()).collect();
        labels.sort_unstable();
        out.insert(format!("{name}{{{}}}", labels.join(",")), value.parse().unwrap_or(u64::MAX));
    }
    out
}

fn requests(route: &str, outcome: &str, reason: &str) -> String {
    format!(r#"keyswap_requests_total{{outcome="{outcome}",reason="{reason}",route="{route}"}}"#)
}

/// Polls `what` until it holds (Envoy flushes access logs and counters
/// from its workers asynchronously).
fn eventually(what: &str, mut check: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match check() {
            Ok(()) => return,
            Err(why) if Instant::now() >= deadline => panic!("{what}: {why}"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// The lines the filter itself logged (Envoy's own debug lines dump the
/// request headers and the configuration verbatim, and are not keyswap's).
fn keyswap_lines(envoy: &Envoy) -> Vec<String> {
    envoy.log().lines().filter(|l| l.contains("wasm log") && l.contains("keyswap:")).map(str::to_string).collect()
}

#[test]
fn metrics_count_a_known_mix_of_requests_exactly() {
    let (_echo, envoy) = start();
    let mix: [(Option<&str>, Option<&str>, u16, usize); 9] = [
        (Some("chat"), Some("alpha-key-1"), 200, 3),
        (Some("files"), Some("beta-key-2"), 200, 2),
        (Some("chat"), None, 401, 2),
        (Some("chat"), Some("nobody-key"), 401, 1),
        (Some("files"), Some("off-key-4"), 401, 1),
        (Some("files"), Some("alpha-key-1"), 403, 1),
        (Some("files"), Some("gone-key-3"), 401, 1),
        (None, Some("beta-key-2"), 404, 2),
        (Some("chat"), Some("beta-key-2"), 200, 1),
    ];
    for (route, key, status, times) in mix {
        for _ in 0..times {
            assert_eq!(send(&envoy, route, key).status, status, "{route:?} {key:?}");
        }
    }
    let want: BTreeMap<String, u64> = [
        (requests("chat", "allowed", ""), 4),
        (requests("files", "allowed", ""), 2),
        (requests("chat", "denied", "missing_key"), 2),
        (requests("chat", "denied", "invalid_key"), 1),
        (requests("files", "denied", "invalid_key"), 1),
        (requests("files", "denied", "route_forbidden"), 1),
        (requests("files", "denied", "expired_key"), 1),
        (requests("", "denied", "no_route"), 2),
        (r#"keyswap_client_requests_total{client="alpha",route="chat"}"#.to_string(), 3),
        (r#"keyswap_client_requests_total{client="beta",route="files"}"#.to_string(), 2),
        (r#"keyswap_client_requests_total{client="beta",route="chat"}"#.to_string(), 1),
        ("keyswap_active_clients{}".to_string(), 2),
        ("keyswap_routes{}".to_string(), 2),
        (format!(r#"keyswap_config_info{{version="{}"}}"#, keyswap_policy::content_version(CONFIG.as_bytes())), 1),
    ]
    .into_iter()
    .collect();
    eventually("the metrics match the mix", || {
        let got = prometheus(&envoy);
        // Every series asked for has its value; every other series is 0.
        let wrong: Vec<String> = want
            .iter()
            .filter(|(series, value)| got.get(*series) != Some(value))
            .map(|(series, value)| format!("{series}: want {value}, got {:?}", got.get(series)))
            .chain(got.iter().filter(|(s, v)| !want.contains_key(*s) && **v != 0).map(|(s, v)| format!("{s}: {v}")))
            .collect();
        if wrong.is_empty() {
            Ok(())
        } else {
            Err(format!("{wrong:#?}\nall: {got:#?}"))
        }
    });
}

#[test]
fn access_log_lines_carry_decision_route_and_client_but_no_key() {
    let (_echo, envoy) = start();
    assert_eq!(send(&envoy, Some("chat"), Some("alpha-key-1")).status, 200);
    assert_eq!(send(&envoy, Some("files"), Some("alpha-key-1")).status, 403);
    assert_eq!(send(&envoy, Some("chat"), Some("nobody-key")).status, 401);
    let access = |envoy: &Envoy| -> Vec<String> {
        envoy.log().lines().filter(|l| l.contains("\"GET /v1/things\"")).map(str::to_string).collect()
    };
    eventually("three access-log lines", || {
        let lines = access(&envoy);
        let want = [
            "200 keyswap[outcome=allowed reason=- route=chat client=alpha]",
            "403 keyswap[outcome=denied reason=route_forbidden route=files client=alpha]",
            "401 keyswap[outcome=denied reason=invalid_key route=chat client=-]",
        ];
        let missing: Vec<&str> = want.iter().copied().filter(|w| !lines.iter().any(|l| l.ends_with(w))).collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!("missing {missing:?} in {lines:#?}"))
        }
    });
    for line in access(&envoy) {
        assert!(KEYS.iter().chain(&["nobody-key"]).all(|k| !line.contains(k)), "a key in {line}");
    }
}

#[test]
fn denials_are_audited_once_each_up_to_the_rate_limit() {
    let (_echo, envoy) = start();
    let audit = |envoy: &Envoy| -> Vec<String> {
        keyswap_lines(envoy).into_iter().filter(|l| l.contains("keyswap: denied")).collect()
    };
    // A few denials: one line each, naming reason, route and client.
    for _ in 0..3 {
        assert_eq!(send(&envoy, Some("files"), Some("alpha-key-1")).status, 403);
    }
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(send(&envoy, Some("chat"), None).status, 401);
    eventually("four audit lines", || {
        let lines = audit(&envoy);
        let forbidden =
            lines.iter().filter(|l| l.contains("reason=route_forbidden status=403 route=files client=alpha")).count();
        let missing = lines.iter().filter(|l| l.contains("reason=missing_key status=401 route=chat client=-")).count();
        if (forbidden, missing, lines.len()) == (3, 1, 4) {
            Ok(())
        } else {
            Err(format!("{lines:#?}"))
        }
    });

    // A flood: at most 10 lines a second per worker (2 workers), and the
    // lines left out are counted in a later line of the same worker.
    std::thread::sleep(Duration::from_millis(1100));
    let before = audit(&envoy).len();
    let started = Instant::now();
    let flood = 200;
    for _ in 0..flood {
        assert_eq!(send(&envoy, Some("chat"), Some("nobody-key")).status, 401);
    }
    let seconds = started.elapsed().as_secs() + 1;
    let written = audit(&envoy).len() - before;
    assert!(written >= 1, "no audit line for the flood");
    assert!(
        written as u64 <= 2 * 10 * (seconds + 1) && written < flood,
        "{written} lines for {flood} denials in {seconds} s"
    );
    eventually("a line reporting suppressed denials", || {
        std::thread::sleep(Duration::from_millis(150));
        send(&envoy, Some("chat"), Some("nobody-key"));
        let lines = audit(&envoy);
        if lines.iter().any(|l| l.contains("earlier denial lines)")) {
            Ok(())
        } else {
            Err("none yet".into())
        }
    });
    for line in keyswap_lines(&envoy) {
        for secret in KEYS.iter().chain(&["nobody-key"]).chain(&CREDENTIALS) {
            assert!(!line.contains(secret), "a key or credential in {line}");
        }
    }
}

// ---- deploy/ ---------------------------------------------------------------

fn manifests(file: &str) -> Vec<serde_yaml::Value> {
    let path = repo_root().join("deploy").join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| serde::Deserialize::deserialize(doc).unwrap_or_else(|e| panic!("{file}: {e}")))
        .collect()
}

/// Loads a manifest's keyswap configuration into the policy with exactly
/// the variables the manifest passes into the VM (each set to a dummy).
fn loads(file: &str, config: &serde_yaml::Value, env_names: &[String]) {
    let json = to_json(config).to_string();
    let env = |name: &str| env_names.iter().any(|n| n == name).then(|| format!("dummy-{name}"));
    if let Err(err) = keyswap_policy::Policy::from_json(json.as_bytes(), &env) {
        panic!("{file}: the keyswap configuration is refused: {err}");
    }
}

fn strings(value: &serde_yaml::Value) -> Vec<String> {
    value.as_sequence().into_iter().flatten().filter_map(|v| v.as_str().map(str::to_string)).collect()
}

#[test]
fn istio_wasmplugin_carries_a_loadable_configuration() {
    let docs = manifests("istio/keyswap.yaml");
    let plugin = &docs[0];
    assert_eq!(plugin["apiVersion"].as_str(), Some("extensions.istio.io/v1alpha1"));
    assert_eq!(plugin["kind"].as_str(), Some("WasmPlugin"));
    assert_eq!(plugin["spec"]["failStrategy"].as_str(), Some("FAIL_CLOSE"));
    let env: Vec<String> = plugin["spec"]["vmConfig"]["env"]
        .as_sequence()
        .into_iter()
        .flatten()
        .inspect(|e| assert_eq!(e["valueFrom"].as_str(), Some("HOST"), "credentials come from the host: {e:?}"))
        .filter_map(|e| e["name"].as_str().map(str::to_string))
        .collect();
    assert!(!env.is_empty());
    loads("istio/keyswap.yaml", &plugin["spec"]["pluginConfig"], &env);
    // The gateway's environment gets those variables from the Secret.
    let secret = &manifests("secret.yaml")[0];
    for name in &env {
        assert!(!secret["stringData"][name.as_str()].is_null(), "the Secret has no {name}");
    }
    let patch = &manifests("istio/gateway-patch.yaml")[0];
    let pod = &patch["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(container["name"].as_str(), Some("istio-proxy"));
    assert_eq!(container["envFrom"][0]["secretRef"]["name"], secret["metadata"]["name"]);
    // The stats tags: the ConfigMap, mounted where the override points.
    let tags = &manifests("istio/stats-tags-configmap.yaml")[0];
    let bootstrap: Value =
        serde_json::from_str(tags["data"]["custom_bootstrap.json"].as_str().expect("bootstrap")).expect("JSON");
    let tags_of = |v: &Value| v["stats_config"]["stats_tags"].clone();
    assert_eq!(tags_of(&bootstrap), tags_of(&to_json(&shipped())), "same stats tags as envoy.yaml");
    let volume = &pod["volumes"][0];
    assert_eq!(volume["configMap"]["name"], tags["metadata"]["name"]);
    let mount = &container["volumeMounts"][0];
    assert_eq!(mount["name"], volume["name"]);
    let override_path = container["env"][0]["value"].as_str().expect("ISTIO_BOOTSTRAP_OVERRIDE");
    assert_eq!(container["env"][0]["name"].as_str(), Some("ISTIO_BOOTSTRAP_OVERRIDE"));
    assert_eq!(
        override_path,
        format!("{}/custom_bootstrap.json", mount["mountPath"].as_str().expect("mountPath")),
        "the override names the mounted file"
    );
    // The WasmPlugin and EnvoyFilter select the gateway the routes use.
    let routes = manifests("istio/routes.yaml");
    let selector = &routes[0]["spec"]["selector"];
    assert_eq!(&plugin["spec"]["selector"]["matchLabels"], selector);
    assert_eq!(&docs[1]["spec"]["workloadSelector"]["labels"], selector);
}

#[test]
fn envoy_gateway_policy_carries_a_loadable_configuration() {
    let docs = manifests("envoy-gateway/keyswap.yaml");
    let policy = &docs[0];
    assert_eq!(policy["apiVersion"].as_str(), Some("gateway.envoyproxy.io/v1alpha1"));
    assert_eq!(policy["kind"].as_str(), Some("EnvoyExtensionPolicy"));
    let wasm = &policy["spec"]["wasm"][0];
    assert_eq!(wasm["failOpen"].as_bool(), Some(false));
    let env = strings(&wasm["env"]["hostKeys"]);
    assert!(!env.is_empty());
    loads("envoy-gateway/keyswap.yaml", &wasm["config"], &env);
    let proxy = &manifests("envoy-gateway/envoyproxy.yaml")[0];
    assert_eq!(proxy["kind"].as_str(), Some("EnvoyProxy"));
    let deployment = &proxy["spec"]["provider"]["kubernetes"]["envoyDeployment"];
    let container_env = &deployment["container"]["env"];
    for name in &env {
        let entry = container_env
            .as_sequence()
            .into_iter()
            .flatten()
            .find(|e| e["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("the Envoy container has no {name}"));
        assert!(!entry["valueFrom"]["secretKeyRef"].is_null(), "{name} must come from a Secret");
    }
    let bootstrap: serde_yaml::Value =
        serde_yaml::from_str(proxy["spec"]["bootstrap"]["value"].as_str().expect("bootstrap")).expect("YAML");
    assert_eq!(to_json(&bootstrap["stats_config"]), to_json(&shipped()["stats_config"]));
    // The cluster stage loads the module from where the EnvoyProxy mounts it.
    let mount = deployment["container"]["volumeMounts"][0]["mountPath"].as_str().expect("mountPath");
    let patches = docs[1]["spec"]["jsonPatches"].as_sequence().expect("jsonPatches");
    for patch in patches {
        let filter = &patch["operation"]["value"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
            ["http_filters"][0]["typed_config"]["config"];
        let module = filter["vm_config"]["code"]["local"]["filename"].as_str().expect("filename");
        assert_eq!(module, format!("{mount}/plugin.wasm"), "the ConfigMap's key is plugin.wasm");
    }
    // The EnvoyProxy is where the Gateway looks for it: its own namespace.
    let docs = manifests("envoy-gateway/gateway.yaml");
    let gateway = docs.iter().find(|d| d["kind"].as_str() == Some("Gateway")).expect("a Gateway");
    assert_eq!(gateway["spec"]["infrastructure"]["parametersRef"]["name"], proxy["metadata"]["name"]);
    assert_eq!(gateway["metadata"]["namespace"], proxy["metadata"]["namespace"]);
}

#[test]
fn grafana_dashboard_queries_only_keyswap_metrics() {
    let path = repo_root().join("deploy/grafana/keyswap-dashboard.json");
    let dashboard: Value = serde_json::from_slice(&std::fs::read(path).expect("dashboard")).expect("JSON");
    let exprs: Vec<&str> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .filter_map(|t| t["expr"].as_str())
        .collect();
    assert!(exprs.len() >= 5, "{exprs:?}");
    let known =
        ["keyswap_requests_total", "keyswap_client_requests_total", "keyswap_active_clients", "keyswap_config_info"];
    for expr in exprs {
        assert!(known.iter().any(|m| expr.contains(m)), "{expr}");
    }
}
