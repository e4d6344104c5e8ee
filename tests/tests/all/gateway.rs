//! Named end-to-end behaviours of keyswap in Envoy that the conformance
//! vectors cannot express: the shipped `envoy.yaml`, refusing to start,
//! where credentials come from and when they are read, and surviving
//! hostile traffic. Each test starts at most one serving Envoy.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use keyswap_tests::echo::{Echo, Echoed, RESPOND_HEADER};
use keyswap_tests::envoy::{filter_wasm, gateway, repo_root, validate, Envoy, Launch, Listener, ROUTE_HEADER};
use keyswap_tests::http::{Request, Response};
use keyswap_tests::raw;

// ---- the shipped envoy.yaml ------------------------------------------------

/// The demo values `envoy.yaml` and `scripts/demo` use.
const DEMO_KEY: &str = "keyswap-demo-key";
const DEMO_CREDENTIAL: &str = "demo-upstream-credential";

fn shipped_yaml() -> String {
    std::fs::read_to_string(repo_root().join("envoy.yaml")).expect("envoy.yaml at the repository root")
}

/// The keyswap configuration in `envoy.yaml`: the `value: |` block scalar
/// of its ECDS `default_config`, as YAML hands it to Envoy (indentation
/// removed, one final newline): the fail-closed `{"refuse_all": true}`.
fn plugin_config(yaml: &str) -> String {
    let lines: Vec<&str> = yaml.lines().collect();
    let start = lines.iter().position(|l| l.trim() == "value: |").expect("a `value: |` block") + 1;
    let indent = |l: &str| l.len() - l.trim_start().len();
    let content = indent(lines[start]);
    let block: Vec<&str> = lines[start..]
        .iter()
        .take_while(|l| l.trim().is_empty() || indent(l) >= content)
        .map(|l| l.get(content..).unwrap_or(""))
        .collect();
    format!("{}\n", block.join("\n").trim_end())
}

/// The demo configuration `scripts/setup` writes into the ECDS file.
fn demo_config() -> String {
    std::fs::read_to_string(repo_root().join("docs/examples/demo.json")).expect("docs/examples/demo.json")
}

/// `envoy.yaml` with its commented real-world blocks turned on: the Envoy
/// routes and clusters uncommented in place; and the demo configuration
/// with the real-world keyswap routes (commented next to envoy.yaml's
/// default_config) put first in its `"routes"`.
fn with_real_world(yaml: &str) -> (String, String) {
    let mut out: Vec<String> = Vec::new();
    let mut snippet: Vec<String> = Vec::new();
    let mut block: Option<bool> = None; // Some(true): the JSON snippet
    let uncomment = |l: &str| l.replacen("# ", "", 1);
    for line in yaml.lines() {
        let t = line.trim();
        if t.starts_with("# ---- real-world") {
            block = Some(t.contains("keyswap routes"));
        } else if t.starts_with("# ---- end of real-world") {
            block = None;
        } else if block == Some(true) {
            snippet.push(uncomment(line).trim().to_string());
        } else if block == Some(false) {
            out.push(uncomment(line));
        } else {
            out.push(line.to_string());
        }
    }
    assert!(snippet.len() >= 6, "the real-world keyswap routes were not found: {snippet:?}");
    let mut config: Vec<String> = demo_config().lines().map(str::to_string).collect();
    let at = config.iter().position(|l| l.trim() == r#""routes": ["#).expect("the configuration's routes") + 1;
    let indent = " ".repeat(config[at].len() - config[at].trim_start().len());
    for (i, line) in snippet.iter().enumerate() {
        config.insert(at + i, format!("{indent}{line}"));
    }
    (out.join("\n"), format!("{}\n", config.join("\n")))
}

/// `envoy.yaml` with its fixed ports replaced: admin and listener on
/// kernel-picked ports, the demo cluster at `echo`.
fn on_local_ports(yaml: &str, echo: std::net::SocketAddr) -> String {
    let mut text = yaml.to_string();
    for (from, to) in [
        ("port_value: 9901}", "port_value: 0}".to_string()),
        ("port_value: 10000}", "port_value: 0}".to_string()),
        ("port_value: 10001}", format!("port_value: {}}}", echo.port())),
    ] {
        assert_eq!(text.matches(from).count(), 1, "envoy.yaml should hold `{from}` once");
        text = text.replace(from, &to);
    }
    with_own_ecds_file(&text, &demo_config())
}

/// `envoy.yaml` with keyswap's ECDS file (`.run/ecds/keyswap.pb`) moved
/// to a fresh directory of its own, holding `config` (as `scripts/setup`
/// creates it with the demo configuration), so tests never share or read
/// the repository's.
fn with_own_ecds_file(yaml: &str, config: &str) -> String {
    static RUNS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("keyswap-shipped-ecds-{}-{run}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temp dir");
    use keyswap_tests::ecds;
    let vm = ecds::VmConfig::Json(ecds::default_vm_config());
    let seed = ecds::encode(ecds::Format::Binary, config, &vm).expect("encode");
    ecds::write_atomically(&dir.join("keyswap.pb"), &seed).expect("seed");
    let mut text = yaml.to_string();
    for (from, to) in [
        ("path: .run/ecds/keyswap.pb", format!("path: {}", dir.join("keyswap.pb").display())),
        ("path: .run/ecds}", format!("path: {}}}", dir.display())),
    ] {
        assert_eq!(text.matches(from).count(), 1, "envoy.yaml should hold `{from}` once");
        text = text.replace(from, &to);
    }
    text
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

#[test]
fn shipped_envoy_yaml_validates_with_and_without_the_real_world_routes() {
    filter_wasm().unwrap_or_else(|e| panic!("{e}"));
    let root = repo_root();
    let dir = std::env::temp_dir().join(format!("keyswap-validate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temp dir");
    let (real_yaml, real_config) = with_real_world(&shipped_yaml());
    let real = dir.join("envoy-real-world.yaml");
    std::fs::write(&real, with_own_ecds_file(&real_yaml, &real_config)).expect("write");
    let shipped = dir.join("envoy.yaml");
    std::fs::write(&shipped, with_own_ecds_file(&shipped_yaml(), &demo_config())).expect("write");
    // `--mode validate` loads the ECDS default_config (the fail-closed
    // one), not the file: the configurations in the file are compiled here.
    let all_env: BTreeMap<&str, &str> = [
        ("KEYSWAP_DEMO_CREDENTIAL", DEMO_CREDENTIAL),
        ("OPENAI_API_KEY", "sk-test-openai"),
        ("ANTHROPIC_API_KEY", "sk-ant-test"),
        ("GITHUB_TOKEN", "ghp_test"),
    ]
    .into();
    let lookup = |name: &str| all_env.get(name).map(|v| v.to_string());
    for (config, routes) in [(demo_config(), 1), (real_config, 4)] {
        let policy = keyswap_policy::Policy::from_json(config.as_bytes(), &lookup)
            .unwrap_or_else(|e| panic!("the configuration loads: {e}\n{config}"));
        assert_eq!((policy.summary().clients, policy.summary().routes), (1, routes), "{config}");
    }
    // Both at once: each compiles the filter in V8.
    let (shipped, real_world) = std::thread::scope(|s| {
        let a = s.spawn(|| validate(&shipped, &[], &root));
        let b = s.spawn(|| validate(&real, &[], &root));
        (a.join().expect("thread"), b.join().expect("thread"))
    });
    let _ = std::fs::remove_dir_all(&dir);
    for out in [shipped, real_world] {
        let out = out.unwrap_or_else(|e| panic!("envoy.yaml validates: {e}"));
        assert!(out.contains("keyswap: configuration loaded: 0 clients, 0 routes"), "{out}");
        assert!(out.contains("keyswap: refusing every request (503 configuration_unavailable)"), "{out}");
    }
}

/// The request `scripts/demo` shows: the demo key, a cookie, and a
/// `set-cookie` the echo upstream is asked to answer with.
fn demo_request() -> Request {
    Request::get("/demo/hello")
        .header("host", "127.0.0.1:10000")
        .header("user-agent", "curl/8")
        .header("accept", "*/*")
        .header("authorization", format!("Bearer {DEMO_KEY}"))
        .header("cookie", "session=demo")
        .header(RESPOND_HEADER, r#"[["set-cookie","tracking=demo"],["x-upstream","demo-echo"]]"#)
}

/// Starts the shipped `envoy.yaml` (ports moved, run from the repository
/// root as the scripts do, so the relative wasm path is exercised).
fn start_shipped(echo: &Echo, credential: &str) -> Envoy {
    let yaml = shipped_yaml();
    Envoy::start(&Launch {
        file_name: "envoy.yaml".into(),
        text: on_local_ports(&yaml, echo.addr()),
        env: env(&[("KEYSWAP_DEMO_CREDENTIAL", credential)]),
        cwd: Some(repo_root()),
        expect_configs: vec![demo_config()],
        args: Vec::new(),
    })
    .unwrap_or_else(|e| panic!("Envoy starts with the shipped envoy.yaml: {e}"))
}

#[test]
fn shipped_envoy_yaml_serves_the_demo_swap() {
    filter_wasm().unwrap_or_else(|e| panic!("{e}"));
    let echo = Echo::start("127.0.0.1:0").expect("echo");
    let envoy = start_shipped(&echo, DEMO_CREDENTIAL);
    let gateway = envoy.listener("gateway").expect("the gateway listener");

    let response = demo_request().send(gateway).expect("the demo request");
    assert_eq!(response.status, 200, "{}", response.text());
    let seen = Echoed::parse(&response.body).expect("the echo upstream answered");
    assert_eq!(seen.path, "/demo/hello");
    assert_eq!(seen.header_all("authorization"), [format!("Bearer {DEMO_CREDENTIAL}")]);
    assert_eq!(seen.header("x-keyswap-client"), Some("demo-client"));
    assert_eq!(seen.header("cookie"), None, "cookie is stripped on the way up");
    assert!(!response.text().contains(DEMO_KEY), "the gateway key must not reach the upstream: {:?}", seen.headers);
    assert_eq!(response.header_all("set-cookie"), Vec::<&str>::new(), "set-cookie is stripped on the way down");
    assert_eq!(response.header("x-upstream"), Some("demo-echo"));

    // The other answers a new user meets.
    let wrong = Request::get("/demo/hello").header("host", "gw").header("authorization", "Bearer wrong-key");
    let wrong = wrong.send(gateway).expect("a wrong key");
    assert_denied(&wrong, 401, "invalid_key");
    assert_denied(&Request::get("/demo/hello").header("host", "gw").send(gateway).expect("no key"), 401, "missing_key");
    let elsewhere =
        Request::get("/elsewhere").header("host", "gw").header("authorization", format!("Bearer {DEMO_KEY}"));
    assert_denied(&elsewhere.send(gateway).expect("no route"), 404, "no_route");
}

fn assert_denied(response: &Response, status: u16, error: &str) {
    assert_eq!(response.status, status, "{}", response.text());
    assert_eq!(response.header("content-type"), Some("application/json"));
    let body = response.json().expect("a JSON body");
    assert_eq!(body["error"], error, "{body}");
}

// ---- refusing to start ------------------------------------------------------

#[test]
fn envoy_refuses_to_start_on_a_bad_configuration() {
    let wasm = filter_wasm().unwrap_or_else(|e| panic!("{e}"));
    let echo = Echo::start("127.0.0.1:0").expect("echo");
    // A configuration that is not JSON, inline in a listener.
    let broken = Listener { name: "broken".into(), config: "{\"clients\": [".into(), ..Listener::default() };
    let refusal = Envoy::refuse(&Launch::gateway(&[broken], echo.addr(), &wasm))
        .unwrap_or_else(|e| panic!("Envoy should refuse to start: {e}"));
    let line = "keyswap: configuration refused: $: EOF while parsing a list at line 1 column 13";
    assert!(!refusal.status.success());
    let logged = refusal.log.lines().find(|l| l.ends_with(line));
    let logged = logged.unwrap_or_else(|| panic!("no line ending {line:?} in:\n{}", refusal.log));
    assert!(logged.contains("[error][wasm]"), "the refusal is logged at error level: {logged}");
    assert!(refusal.log.contains("Unable to create Wasm plugin keyswap"), "Envoy says why it stops");
}

/// The shipped envoy.yaml and the demo configuration, without the demo
/// credential in Envoy's environment: the filter refuses the ECDS file's
/// configuration, and Envoy serves its default_config, which refuses every
/// request. (Before, the default was the demo configuration itself, and
/// Envoy refused to start.)
#[test]
fn shipped_envoy_yaml_fails_closed_when_its_ecds_configuration_is_refused() {
    filter_wasm().unwrap_or_else(|e| panic!("{e}"));
    let echo = Echo::start("127.0.0.1:0").expect("echo");
    let yaml = shipped_yaml();
    let envoy = Envoy::start(&Launch {
        file_name: "envoy.yaml".into(),
        text: on_local_ports(&yaml, echo.addr()),
        env: Vec::new(),
        cwd: Some(repo_root()),
        expect_configs: vec![plugin_config(&yaml)],
        args: Vec::new(),
    })
    .unwrap_or_else(|e| panic!("Envoy starts with the shipped envoy.yaml: {e}"));
    let gateway = envoy.listener("gateway").expect("the gateway listener");
    let refused = "keyswap: configuration refused: routes[0].inject[0].value.env: KEYSWAP_DEMO_CREDENTIAL is not set";
    let deadline = Instant::now() + Duration::from_secs(10);
    while !envoy.log().lines().any(|l| l.contains("[error][wasm]") && l.ends_with(refused)) {
        assert!(Instant::now() < deadline, "no line ending {refused:?} in:\n{}", envoy.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    for _ in 0..5 {
        let response = demo_request().send(gateway).expect("the demo request");
        assert_denied(&response, 503, "configuration_unavailable");
    }
    let log = envoy.log();
    assert!(log.contains("[error][wasm]") && log.contains("keyswap: refusing every request"), "{log}");
}

// ---- where credentials come from, and when ---------------------------------

/// A keyswap configuration with one route, `up`, that injects env `TOKEN`,
/// bound to Envoy's route `route` and its cluster (each listener has its
/// own: a cluster carries one listener's configuration).
fn token_config(route: &str) -> String {
    format!(
        r#"{{"clients": [{{"id": "c", "key": "k", "routes": ["*"]}}],
 "routes": [{{"name": "up", "match": {{"route_name": "{route}", "clusters": ["{route}"]}},
  "inject": [{{"header": "authorization", "prefix": "Bearer ", "value": {{"env": "TOKEN"}}}}]}}]}}"#
    )
}

/// What the upstream received as `authorization` through `listener`, whose
/// route `route` is bound by [`token_config`].
fn token_seen(listener: std::net::SocketAddr, route: &str) -> Result<String, String> {
    let response =
        Request::get("/x").header("host", "gw").header(ROUTE_HEADER, route).header("x-api-key", "k").send(listener);
    let response = response.map_err(|e| e.to_string())?;
    let seen = Echoed::parse(&response.body).ok_or_else(|| format!("{} {}", response.status, response.text()))?;
    Ok(seen.header("authorization").unwrap_or_default().to_string())
}

#[test]
fn credentials_are_read_from_the_vm_environment_at_configuration() {
    let wasm = filter_wasm().unwrap_or_else(|e| panic!("{e}"));
    let echo = Echo::start("127.0.0.1:0").expect("echo");
    let dir =
        std::env::temp_dir().join(format!("keyswap-lds-{}-{:?}", std::process::id(), std::thread::current().id()));
    std::fs::create_dir_all(&dir).expect("a temp dir");
    let lds = dir.join("lds.json");

    // Listener `host` inherits TOKEN from Envoy's own environment
    // (host_env_keys); listener `pushed` is given it in its configuration
    // (key_values), and is served by LDS from a file so it can be replaced,
    // its clusters (which carry keyswap's final stage, the one that injects)
    // by CDS from another, written first.
    let host = Listener {
        name: "host".into(),
        config: token_config("host"),
        host_env_keys: vec!["TOKEN".into()],
        route_names: vec!["host".into()],
        ..Listener::default()
    };
    let pushed = |token: &str| Listener {
        name: "pushed".into(),
        config: token_config("pushed"),
        env: BTreeMap::from([("TOKEN".to_string(), token.to_string())]),
        route_names: vec!["pushed".into()],
        ..Listener::default()
    };
    let cds = dir.join("cds.json");
    let write_lds = |token: &str| {
        let pushed = gateway(&[pushed(token)], echo.addr(), &wasm);
        let resources = |kind: &str, type_url: &str| {
            let mut list = pushed["static_resources"][kind].as_array().cloned().unwrap_or_default();
            list.iter_mut().for_each(|r| r["@type"] = type_url.into());
            serde_json::json!({ "resources": list }).to_string()
        };
        // Envoy watches for a file moved into place.
        let place = |path: &std::path::Path, text: String| {
            let tmp = path.with_extension("json.tmp");
            std::fs::write(&tmp, text).expect("write a dynamic resource file");
            std::fs::rename(&tmp, path).expect("move it into place");
        };
        place(&cds, resources("clusters", "type.googleapis.com/envoy.config.cluster.v3.Cluster"));
        place(&lds, resources("listeners", "type.googleapis.com/envoy.config.listener.v3.Listener"));
    };
    write_lds("pushed-one");
    let mut bootstrap = gateway(&[host], echo.addr(), &wasm);
    bootstrap["dynamic_resources"] = serde_json::json!({
        "cds_config": {"path_config_source": {"path": cds.display().to_string()}, "resource_api_version": "V3"},
        "lds_config": {"path_config_source": {"path": lds.display().to_string()}, "resource_api_version": "V3"}
    });
    let envoy = Envoy::start(&Launch {
        file_name: "envoy.json".into(),
        text: bootstrap.to_string(),
        env: env(&[("TOKEN", "from-envoy-environment")]),
        cwd: None,
        expect_configs: vec![token_config("host")],
        args: Vec::new(),
    })
    .unwrap_or_else(|e| panic!("Envoy starts: {e}"));

    assert_eq!(
        token_seen(envoy.listener("host").expect("host"), "host").as_deref(),
        Ok("Bearer from-envoy-environment")
    );
    let pushed_addr = || {
        let admin = envoy.admin();
        let listeners = Request::get("/listeners?format=json").header("host", "admin").send(admin).ok()?.json().ok()?;
        let entry = listeners["listener_statuses"].as_array()?.iter().find(|l| l["name"] == "pushed")?.clone();
        let port = entry["local_address"]["socket_address"]["port_value"].as_u64()?;
        Some(std::net::SocketAddr::from(([127, 0, 0, 1], u16::try_from(port).ok()?)))
    };
    let until = |want: &str| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let seen = pushed_addr().map(|addr| token_seen(addr, "pushed"));
            if let Some(Ok(seen)) = &seen {
                if seen == want {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "listener `pushed` never served {want:?}; last {seen:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    until("Bearer pushed-one");
    // The value in effect is the one the VM was configured with: it stays
    // until a new configuration replaces it...
    for _ in 0..20 {
        assert_eq!(pushed_addr().map(|addr| token_seen(addr, "pushed")), Some(Ok("Bearer pushed-one".into())));
    }
    // ...and a new configuration brings the new value.
    write_lds("pushed-two");
    until("Bearer pushed-two");
    assert_eq!(
        token_seen(envoy.listener("host").expect("host"), "host").as_deref(),
        Ok("Bearer from-envoy-environment")
    );
    drop(envoy);
    let _ = std::fs::remove_dir_all(&dir);
}

// ---- the filter never takes a worker down -----------------------------------

/// keyswap's swap holds when Envoy speaks HTTP/2 (h2c) to the upstream:
/// every cluster of the gateway is switched to `http2_protocol_options`,
/// the echo upstream reports the protocol it was spoken to in, and what it
/// received has the credential and no trace of the key, for a client on
/// HTTP/1.1 and one on HTTP/2.
#[test]
fn the_swap_holds_when_the_upstream_speaks_http2() {
    let wasm = filter_wasm().unwrap_or_else(|e| panic!("{e}"));
    let echo = Echo::start("127.0.0.1:0").expect("echo");
    let listener = Listener {
        name: "h2".into(),
        config: token_config("h2"),
        env: BTreeMap::from([("TOKEN".to_string(), "h2-upstream-credential".to_string())]),
        route_names: vec!["h2".into()],
        ..Listener::default()
    };
    let mut bootstrap = gateway(std::slice::from_ref(&listener), echo.addr(), &wasm);
    let clusters = bootstrap["static_resources"]["clusters"].as_array_mut().expect("the gateway's clusters");
    for cluster in clusters.iter_mut() {
        let options =
            &mut cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"];
        assert!(options.is_object(), "a cluster without HttpProtocolOptions: {cluster}");
        options["explicit_http_config"] = serde_json::json!({"http2_protocol_options": {}});
    }
    let launch = Launch {
        file_name: "envoy.json".into(),
        text: bootstrap.to_string(),
        expect_configs: vec![listener.config.clone()],
        ..Launch::default()
    };
    let envoy = Envoy::start(&launch).unwrap_or_else(|e| panic!("Envoy starts: {e}"));
    let addr = envoy.listener("h2").expect("listener h2");
    let keyed = Request::get("/v1/x?q=1").header("host", "gw").header(ROUTE_HEADER, "h2").header("x-api-key", "k");
    for (client, request) in [("HTTP/1.1", keyed.clone()), ("HTTP/2", keyed.clone().http2())] {
        let response = request.send(addr).unwrap_or_else(|e| panic!("{client} through Envoy: {e}"));
        let seen = Echoed::parse(&response.body)
            .unwrap_or_else(|| panic!("{client}: not forwarded: {} {}", response.status, response.text()));
        assert_eq!(seen.version, "HTTP/2.0", "{client}: Envoy spoke {} to the upstream", seen.version);
        // Compared, never printed: no credential in a panic message.
        let names: Vec<&str> = seen.headers.iter().map(|(n, _)| n.as_str()).collect();
        assert!(seen.header("authorization") == Some("Bearer h2-upstream-credential"), "{client}: {names:?}");
        assert!(seen.header("x-api-key").is_none(), "{client}: the key reached the upstream");
        assert_eq!(seen.path, "/v1/x?q=1", "{client}");
    }
    // And a request without a key is denied before any upstream.
    let denied = Request::get("/v1/x").header("host", "gw").header(ROUTE_HEADER, "h2").send(addr).expect("a denial");
    assert_denied(&denied, 401, "missing_key");
}

/// Requests meant to break a filter: oversized, repeated, malformed, odd
/// request lines and bytes. Envoy itself refuses some; whatever reaches
/// keyswap must be answered without a panic.
fn hostile_requests() -> Vec<Vec<u8>> {
    // Raw: invalid bytes, absolute-form and CONNECT lines, hand-made chunks.
    use keyswap_tests::raw::Request;
    let bearer = |key: &str| {
        Request::get("/v1/x")
            .header("host", "gw")
            .header(ROUTE_HEADER, "up")
            .header("authorization", format!("Bearer {key}"))
    };
    let mut many_keys = Request::get("/v1/x").header("host", "gw").header(ROUTE_HEADER, "up");
    for i in 0..200 {
        many_keys = many_keys.header("authorization", format!("Bearer key-{i}"));
    }
    let mut many_params = String::from("/v1/x?");
    for i in 0..1000 {
        many_params.push_str(&format!("api_key=k{i}&"));
    }
    // Client metadata's header, forged: repeated, oversized, odd bytes,
    // with a key of a client's `keys` (live, and expired).
    let mut many_teams = bearer("multi-live");
    for i in 0..100 {
        many_teams = many_teams.header("x-keyswap-team", format!("team-{i}"));
    }
    let metadata_forgeries = [
        many_teams.to_bytes(),
        bearer("multi-live").header("x-keyswap-team", "t".repeat(50_000)).to_bytes(),
        bearer("multi-live").header("x_keyswap_team", b"\xff\xfe").header("X-KEYSWAP-TEAM", "").to_bytes(),
        bearer("multi-old").header("x-keyswap-team", "admins").to_bytes(),
        bearer("multi-later").header("x-keyswap-client", "multi").to_bytes(),
    ];
    let mut cookies = Request::get("/v1/x").header("host", "gw").header(ROUTE_HEADER, "up").header("x-api-key", "k");
    for i in 0..100 {
        cookies = cookies.header("cookie", format!("c{i}=v"));
    }
    vec![
        bearer(&"k".repeat(5000)).to_bytes(),
        bearer(&"x".repeat(50_000)).to_bytes(),
        bearer("").to_bytes(),
        Request::get("/v1/x")
            .header("host", "gw")
            .header(ROUTE_HEADER, "up")
            .header("authorization", b"Bearer \xff\xfe\x80")
            .to_bytes(),
        Request::get("/v1/x")
            .header("host", "gw")
            .header(ROUTE_HEADER, "up")
            .header("x-api-key", b"\xc3\x28")
            .to_bytes(),
        many_keys.to_bytes(),
        Request::get(&many_params).header("host", "gw").header(ROUTE_HEADER, "up").to_bytes(),
        Request::get("/v1/x?api_key=%ZZ%&api_key=%&=&&==").header("host", "gw").header(ROUTE_HEADER, "up").to_bytes(),
        Request::get(&format!("/{}", "a".repeat(8000))).header("host", "gw").header("x-api-key", "k").to_bytes(),
        Request::raw("GET http://evil.example/v1/x?api_key=k HTTP/1.1")
            .header("host", "gw")
            .header(ROUTE_HEADER, "up")
            .to_bytes(),
        Request::raw("CONNECT evil.example:443 HTTP/1.1")
            .header("host", "evil.example:443")
            .header("x-api-key", "k")
            .to_bytes(),
        Request::raw("OPTIONS * HTTP/1.1").header("host", "gw").header("x-api-key", "k").to_bytes(),
        Request::raw("get /v1/x HTTP/1.1")
            .header("host", "gw")
            .header(ROUTE_HEADER, "up")
            .header("x-api-key", "k")
            .to_bytes(),
        Request::raw("GET /v1/x HTTP/1.0").header(ROUTE_HEADER, "up").header("x-api-key", "k").to_bytes(),
        Request::new("POST", "/v1/x")
            .header("host", "gw")
            .header(ROUTE_HEADER, "up")
            .header("x-api-key", "k")
            .header("transfer-encoding", "chunked")
            .body_raw("5\r\nhello\r\n0\r\n\r\n")
            .to_bytes(),
        Request::new("POST", "/v1/x")
            .header("host", "gw")
            .header(ROUTE_HEADER, "up")
            .header("x-api-key", "k")
            .body(vec![0u8; 100_000])
            .to_bytes(),
        Request::get("/v1/x").header("host", "").header(ROUTE_HEADER, "up").header("x-api-key", "k").to_bytes(),
        Request::get("/v1/x")
            .header("host", "gw")
            .header(ROUTE_HEADER, "up")
            .header("x-api-key", "k")
            .header("x-api-key", "other")
            .to_bytes(),
        Request::get("/v1/x")
            .header("host", "gw")
            .header(ROUTE_HEADER, "up")
            .header("x-keyswap-client", "forged")
            .to_bytes(),
        cookies.to_bytes(),
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03garbage-tls-hello\r\n\r\n".to_vec(),
        b"GET /v1/x HTTP/1.1\r\nhost: gw\r\nx-test-route: up\r\nx-api-key: k\r\n folded: continuation\r\n\r\n".to_vec(),
    ]
    .into_iter()
    .chain(metadata_forgeries)
    .collect()
}

#[test]
fn filter_survives_a_burst_of_hostile_requests() {
    let wasm = filter_wasm().unwrap_or_else(|e| panic!("{e}"));
    let echo = Echo::start("127.0.0.1:0").expect("echo");
    let config = r#"{"clients": [{"id": "c", "key": "k", "routes": ["*"]},
  {"id": "multi", "routes": ["*"], "metadata": {"team": "search"}, "keys": [{"id": "live", "key": "multi-live"},
   {"key": "multi-old", "expires": "2001-01-01T00:00:00Z"}, {"key": "multi-later", "not_before": "2999-01-01T00:00:00Z"}]}],
 "metadata_headers": {"team": "x-keyswap-team"},
 "key_sources": [{"header": "authorization", "prefix": "Bearer "}, {"header": "x-api-key"}, {"query": "api_key"}],
 "routes": [{"name": "up", "match": {"route_name": "up", "clusters": ["up"]},
  "inject": [{"header": "authorization", "prefix": "Bearer ", "value": {"inline": "sk-upstream"}},
             {"query": "key", "value": {"inline": "q-upstream"}}]}],
 "strip_request_headers": ["cookie"], "strip_response_headers": ["set-cookie"],
 "client_id_header": "x-keyswap-client"}"#;
    let listener = Listener {
        name: "hostile".into(),
        config: config.into(),
        route_names: vec!["up".into()],
        ..Listener::default()
    };
    let mut envoy =
        Envoy::start(&Launch::gateway(&[listener], echo.addr(), &wasm)).unwrap_or_else(|e| panic!("Envoy starts: {e}"));
    let addr = envoy.listener("hostile").expect("listener");

    // A bounded burst: every hostile request 10 times, a few at a time.
    let requests = hostile_requests();
    let started = Instant::now();
    let tally: BTreeMap<String, usize> = std::thread::scope(|s| {
        let workers: Vec<_> = requests
            .chunks(requests.len().div_ceil(4))
            .map(|chunk| {
                s.spawn(move || {
                    let mut tally = BTreeMap::<String, usize>::new();
                    for _ in 0..10 {
                        for bytes in chunk {
                            // Envoy may answer 400/431, close, or wait for
                            // more bytes that never come: all are fine here.
                            let outcome = match raw::send_bytes_within(addr, bytes, false, Duration::from_secs(2)) {
                                Ok(r) if Echoed::parse(&r.body).is_some() => "forwarded".to_string(),
                                Ok(r) => match r.json().ok().and_then(|j| j["error"].as_str().map(String::from)) {
                                    Some(error) => format!("keyswap {} {error}", r.status),
                                    None => format!("envoy {}", r.status),
                                },
                                Err(e) => format!("no response: {:?}", e.kind()),
                            };
                            *tally.entry(outcome).or_default() += 1;
                        }
                    }
                    tally
                })
            })
            .collect();
        let mut all = BTreeMap::new();
        for worker in workers {
            for (k, n) in worker.join().expect("a burst thread") {
                *all.entry(k).or_default() += n;
            }
        }
        all
    });
    let sent = requests.len() * 10;
    println!("{sent} hostile requests in {:?}: {tally:#?}", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(120), "{sent} requests took {:?}", started.elapsed());
    // The burst reached the filter: keyswap both forwarded and refused some.
    assert!(tally.contains_key("forwarded"), "{tally:?}");
    assert!(tally.keys().any(|k| k.starts_with("keyswap 401")), "{tally:?}");

    // Still the same Envoy, still answering correctly on every worker.
    assert!(envoy.is_running(), "Envoy exited during the burst");
    for _ in 0..20 {
        let ok = Request::get("/v1/models?a=1")
            .header("host", "gw")
            .header(ROUTE_HEADER, "up")
            .header("authorization", "Bearer k")
            .send(addr)
            .expect("a valid request");
        let seen = Echoed::parse(&ok.body).unwrap_or_else(|| panic!("not forwarded: {} {}", ok.status, ok.text()));
        assert_eq!(seen.path, "/v1/models?a=1&key=q-upstream");
        assert_eq!(seen.header_all("authorization"), ["Bearer sk-upstream"]);
        let bad = Request::get("/v1/models")
            .header("host", "gw")
            .header(ROUTE_HEADER, "up")
            .header("authorization", "Bearer nope")
            .send(addr)
            .expect("a bad key");
        assert_denied(&bad, 401, "invalid_key");
        // A key of `keys`: its client's metadata, never a forged copy.
        let multi = Request::get("/v1/models")
            .header("host", "gw")
            .header(ROUTE_HEADER, "up")
            .header("authorization", "Bearer multi-live")
            .header("x-keyswap-team", "forged")
            .send(addr)
            .expect("a key of keys");
        let seen = Echoed::parse(&multi.body).unwrap_or_else(|| panic!("not forwarded: {}", multi.status));
        assert_eq!(seen.header_all("x-keyswap-team"), ["search"]);
        assert_eq!(seen.header_all("x-keyswap-client"), ["multi"]);
    }
    let log = envoy.log();
    for sign in ["keyswap: panic", "Wasm VM failed", "wasm log: keyswap: configuration refused"] {
        assert!(!log.contains(sign), "the log shows `{sign}` after {sent} hostile requests");
    }
    assert!(!log.lines().any(|l| l.contains("[critical]")), "a critical line in Envoy's log");
}
