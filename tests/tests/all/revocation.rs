//! Revocation by configuration push: keyswap's configuration delivered to
//! a running Envoy (`--concurrency 2`) through ECDS from a watched file.
//!
//! - Under steady keep-alive load with key K2, a push revoking K1 is
//!   enforced on every worker (measured from the rename to each worker's
//!   first `invalid_key`, read from Envoy's log), and K2 sees no error, no
//!   5xx and no dropped connection.
//! - A bad resource written by hand is refused (log, stats) and Envoy keeps
//!   serving the previous configuration: K1 and K2 answer exactly as before.
//! - A push adds, removes and changes clients (`expires`, routes) and
//!   routes and their credentials.
//! - `keyswap push --envoy-admin` reports the version only once Envoy runs
//!   it, says when nothing changed, and reports Envoy's rejection with its
//!   reason.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use keyswap_tests::ecds;
use keyswap_tests::echo::Echoed;
use keyswap_tests::envoy::{repo_root, Listener, LogLevels, ROUTE_HEADER};
use keyswap_tests::http::{Request, Response};
use keyswap_tests::load::{percentile, Bounds, Load};
use keyswap_tests::revocation::{
    first_per_thread, is_invalid_key, main_thread, parse_log, since, workers, EcdsGateway, INVALID_KEY_LINE,
};

const K1: &str = "k1-key-to-be-revoked";
const K2: &str = "k2-key-that-stays";
const CREDENTIAL: &str = "the-upstream-credential";
const K3_KEY: &str = "k3-new-key";

/// The Envoy route (and cluster) the gateway's requests take.
const ROUTE: &str = "all";

/// Two clients on one route, bound to Envoy's route and cluster [`ROUTE`],
/// injecting `CREDENTIAL`; K1 `disabled` or not.
fn config(k1_disabled: bool) -> String {
    format!(
        r#"{{"clients": [
  {{"id": "k1-client", "key": "{K1}", "routes": ["*"], "disabled": {k1_disabled}}},
  {{"id": "k2-client", "key": "{K2}", "routes": ["*"]}}],
 "routes": [{{"name": "all", "match": {{"route_name": "{ROUTE}", "clusters": ["{ROUTE}"]}},
   "inject": [{{"header": "authorization", "prefix": "Bearer ", "value": {{"env": "UPSTREAM_CREDENTIAL"}}}}]}}],
 "client_id_header": "x-keyswap-client"}}"#
    )
}

/// The gateway with `config(false)`, its listener routing [`ROUTE`] and
/// `more_routes` (each selected by [`ROUTE_HEADER`], to the cluster of its
/// name), the VM given `env`.
fn start_with_routes(env: &[(&str, &str)], more_routes: &[&str]) -> EcdsGateway {
    let listener = Listener {
        config: config(false),
        env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        route_names: std::iter::once(ROUTE).chain(more_routes.iter().copied()).map(String::from).collect(),
        ..Listener::default()
    };
    EcdsGateway::start_with(listener, &[], &LogLevels::serving()).unwrap_or_else(|e| panic!("{e}"))
}

fn start() -> EcdsGateway {
    start_with_routes(&[("UPSTREAM_CREDENTIAL", CREDENTIAL)], &[])
}

/// A request with `key` as a Bearer token on Envoy's route [`ROUTE`].
fn keyed(key: &str) -> Request {
    keyswap_tests::revocation::keyed(key).header(ROUTE_HEADER, ROUTE)
}

/// [`keyed`] on a new connection that Envoy closes.
fn keyed_once(key: &str) -> Request {
    keyswap_tests::revocation::keyed_once(key).header(ROUTE_HEADER, ROUTE)
}

fn version(config: &str) -> String {
    keyswap_policy::content_version(config.as_bytes())
}

/// What the upstream saw of the swap: path, `authorization`, client id.
type Upstream = (String, Option<String>, Option<String>);

/// Status, and what the upstream saw (`None` for a local answer).
fn outcome(response: &Response) -> (u16, Option<Upstream>) {
    let seen = Echoed::parse(&response.body).map(|e| {
        (
            e.path.clone(),
            e.header("authorization").map(str::to_string),
            e.header("x-keyswap-client").map(str::to_string),
        )
    });
    (response.status, seen)
}

fn forwarded_as(client: &str) -> (u16, Option<Upstream>) {
    (200, Some(("/v1/things".into(), Some(format!("Bearer {CREDENTIAL}")), Some(client.into()))))
}

fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ---- under load ---------------------------------------------------------------

/// One K1 request of the prober: sent on a fresh connection (so the kernel
/// spreads them over both workers), and its answer.
struct Probe {
    sent: SystemTime,
    status: Result<(u16, bool), String>,
}

#[test]
fn a_revoked_key_stops_on_every_worker_under_load_and_nothing_else_breaks() {
    let gw = start();
    assert_eq!(outcome(&keyed(K1).send(gw.addr).expect("K1")), forwarded_as("k1-client"), "K1 works before the push");

    // K2: 4 keep-alive connections, one request every ~2 ms each; bounded.
    let bounds = Bounds {
        connections: 4,
        pause: Duration::from_millis(2),
        max_requests_per_connection: 5000,
        max_duration: Duration::from_secs(30),
    };
    let load = Load::start(gw.addr, &keyed(K2), bounds).expect("K2 load");
    assert!(wait_for(Duration::from_secs(10), || (load.count() >= 100).then_some(())).is_some(), "K2 load runs");

    // K1: fresh connections, back to back, until told to stop (bounded).
    let stop = Arc::new(AtomicBool::new(false));
    let probes = Arc::new(Mutex::new(Vec::<Probe>::new()));
    let prober = {
        let (stop, probes, addr) = (stop.clone(), probes.clone(), gw.addr);
        std::thread::spawn(move || {
            let started = Instant::now();
            while !stop.load(Ordering::SeqCst) && started.elapsed() < Duration::from_secs(20) {
                let sent = SystemTime::now();
                let status =
                    keyed_once(K1).send(addr).map(|r| (r.status, is_invalid_key(&r))).map_err(|e| e.to_string());
                probes.lock().unwrap().push(Probe { sent, status });
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    assert!(wait_for(Duration::from_secs(10), || (probes.lock().unwrap().len() >= 20).then_some(())).is_some());

    let revoked = config(true);
    let new_version = version(&revoked);
    let renamed = gw.push(&revoked).expect("push");

    // Until each worker has loaded the new version and denied K1 once.
    let enforced = wait_for(Duration::from_secs(10), || {
        let lines = parse_log(&gw.envoy.log());
        let workers = workers(&lines, main_thread(&lines), &new_version, renamed);
        let denied = first_per_thread(&lines, renamed, INVALID_KEY_LINE);
        let per_worker: Vec<(u64, Duration)> =
            workers.keys().filter_map(|w| denied.get(w).map(|l| (*w, since(renamed, l.time)))).collect();
        (workers.len() == 2 && per_worker.len() == 2).then_some(per_worker)
    });
    let enforced_at = SystemTime::now();
    stop.store(true, Ordering::SeqCst);
    prober.join().expect("prober");
    let per_worker = enforced.unwrap_or_else(|| {
        panic!("K1 was not denied on both workers within 10 s of the rename; Envoy's log:\n{}", gw.envoy.log())
    });

    // From now on K1 is refused whichever worker takes the connection.
    for _ in 0..40 {
        let response = keyed(K1).send(gw.addr).expect("K1 after the push");
        assert!(is_invalid_key(&response), "K1 after every worker enforced: {} {}", response.status, response.text());
    }
    std::thread::sleep(Duration::from_millis(300));
    let samples = load.stop();

    // Every worker enforced within a second of the rename.
    eprintln!("rename -> first invalid_key per worker thread: {per_worker:?}");
    for (worker, latency) in &per_worker {
        assert!(*latency < Duration::from_secs(1), "worker {worker} enforced {latency:?} after the rename");
    }
    // The prober: K1 forwarded before the rename, refused once both enforced.
    let probes = probes.lock().unwrap();
    let first_401 = probes.iter().find(|p| p.sent >= renamed && matches!(p.status, Ok((401, true))));
    eprintln!(
        "K1 probes: {} ({} before the rename); client-side rename -> first 401: {:?}",
        probes.len(),
        probes.iter().filter(|p| p.sent < renamed).count(),
        first_401.map(|p| since(renamed, p.sent))
    );
    for probe in probes.iter() {
        let status = probe.status.as_ref().unwrap_or_else(|e| panic!("a K1 probe failed: {e}"));
        if probe.sent < renamed {
            assert_eq!(*status, (200, false), "K1 before the rename");
        } else {
            assert!(matches!(status, (200, false) | (401, true)), "K1 during the push: {status:?}");
        }
    }
    let last_enforcement = per_worker.iter().map(|(_, d)| renamed + *d).max().unwrap();
    // Log times are truncated to the millisecond: leave one.
    let settled = last_enforcement + Duration::from_millis(1);
    for probe in probes.iter().filter(|p| p.sent > settled) {
        assert_eq!(probe.status.as_ref().unwrap(), &(401, true), "K1 sent after every worker enforced");
    }

    // K2: nothing but forwarded requests, on connections that never dropped.
    let errors: Vec<String> = samples.iter().filter_map(|s| s.result.as_ref().err().cloned()).collect();
    assert!(errors.is_empty(), "K2 connections failed (dropped?): {errors:?}");
    for sample in &samples {
        let response = sample.result.as_ref().unwrap();
        assert_eq!(outcome(response), forwarded_as("k2-client"), "K2 on connection {}", sample.connection);
    }
    for connection in 0..bounds.connections {
        let mine: Vec<_> = samples.iter().filter(|s| s.connection == connection).collect();
        assert!(mine.iter().any(|s| s.sent < renamed), "connection {connection} served K2 before the push");
        assert!(mine.iter().any(|s| s.sent > enforced_at), "connection {connection} still serves K2 after the push");
    }
    let latencies: Vec<Duration> = samples.iter().map(|s| s.latency).collect();
    eprintln!(
        "K2: {} requests on {} connections, 0 errors; latency p50 {:?} p99 {:?} max {:?}",
        samples.len(),
        bounds.connections,
        percentile(&latencies, 50.0).unwrap(),
        percentile(&latencies, 99.0).unwrap(),
        percentile(&latencies, 100.0).unwrap()
    );
    let view = gw.view().expect("admin");
    assert_eq!(view.accepted.as_deref(), Some(new_version.as_str()), "Envoy's ECDS stats show the new version");
}

// ---- a bad resource -------------------------------------------------------------

#[test]
fn a_bad_resource_leaves_the_previous_configuration_serving() {
    let gw = start();
    let good = version(&config(false));
    let before = |gw: &EcdsGateway| {
        let k1: Vec<_> = (0..10).map(|_| outcome(&keyed(K1).send(gw.addr).expect("K1"))).collect();
        let k2: Vec<_> = (0..10).map(|_| outcome(&keyed(K2).send(gw.addr).expect("K2"))).collect();
        (k1, k2)
    };
    let (k1, k2) = before(&gw);
    assert!(k1.iter().all(|o| *o == forwarded_as("k1-client")), "{k1:?}");
    assert!(k2.iter().all(|o| *o == forwarded_as("k2-client")), "{k2:?}");
    let view = gw.view().expect("admin");
    assert_eq!(view.accepted.as_deref(), Some(good.as_str()));

    // 1. The filter refuses it: K1 revoked, but a client names a route that
    //    does not exist. Were it applied, K1 would be refused.
    let bad = config(true).replace(r#""routes": ["*"]}],"#, r#""routes": ["nowhere"]}],"#);
    assert_ne!(bad, config(true), "the bad configuration differs");
    // By hand: straight into the file, bypassing `keyswap push`'s check.
    gw.push(&bad).expect("write the bad resource");
    let rejected = wait_for(Duration::from_secs(10), || gw.view().ok().filter(|v| v.rejected > view.rejected));
    let after = rejected.unwrap_or_else(|| panic!("Envoy did not reject the resource; log:\n{}", gw.envoy.log()));
    assert_eq!(after.accepted.as_deref(), Some(good.as_str()), "Envoy still runs the previous version");
    // Envoy 1.40's config dump shows the resource it read, refused or not.
    assert_eq!(after.dumped.as_deref(), Some(version(&bad).as_str()), "{after:?}");
    let log = gw.envoy.log();
    let refused = "keyswap: configuration refused: clients[1].routes[0]: names no route (`nowhere` is not in `routes`)";
    assert!(log.lines().any(|l| l.contains("[error][wasm]") && l.ends_with(refused)), "{refused} in:\n{log}");
    assert!(log.contains("config update rejected: Unable to create Wasm plugin keyswap"), "Envoy logs the rejection");
    assert_eq!(before(&gw), (k1.clone(), k2.clone()), "K1 and K2 answered exactly as before");

    // 2. Not even a resource: Envoy's own parser refuses it.
    ecds::write_atomically(&gw.ecds, b"{ this is not json\n").expect("write garbage");
    let failed = wait_for(Duration::from_secs(10), || gw.view().ok().filter(|v| v.failed > after.failed));
    let again = failed.unwrap_or_else(|| panic!("Envoy did not refuse garbage; log:\n{}", gw.envoy.log()));
    assert_eq!(again.accepted.as_deref(), Some(good.as_str()));
    assert!(gw.envoy.log().contains("Filesystem config update failure: in "), "Envoy logs the parse failure");
    assert_eq!(before(&gw), (k1, k2), "K1 and K2 answered exactly as before");
    // (Envoy's own debug lines print request headers; keyswap's never hold a key.)
    let log = gw.envoy.log();
    let keyswap_lines: Vec<&str> = log.lines().filter(|l| l.contains("keyswap: ")).collect();
    assert!(keyswap_lines.iter().any(|l| l.contains("configuration refused")));
    for line in keyswap_lines {
        assert!(!line.contains(K1) && !line.contains(K2) && !line.contains(CREDENTIAL), "a secret in: {line}");
    }
}

// ---- keyswap push -----------------------------------------------------------------

struct Pushed {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn push(gw: &EcdsGateway, config: &str, name: &str) -> Pushed {
    let file = gw.envoy.dir().join(name);
    std::fs::write(&file, config).expect("write the config");
    let output = gw.push_cli(&file).unwrap_or_else(|e| panic!("{e}"));
    let pushed = Pushed {
        ok: output.status.success(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    };
    for secret in [K1, K2, CREDENTIAL, "secret-in-config"] {
        assert!(!pushed.stdout.contains(secret) && !pushed.stderr.contains(secret), "{secret} printed by push");
    }
    pushed
}

#[test]
fn push_reports_the_version_once_envoy_has_it_and_a_rejection_with_envoys_reason() {
    let gw = start();
    let revoked = config(true);
    let v2 = version(&revoked);

    // 1. A good push: `active` is printed only once Envoy runs it.
    let pushed = push(&gw, &revoked, "revoked.json");
    assert!(pushed.ok, "push failed:\n{}{}", pushed.stdout, pushed.stderr);
    let view = gw.view().expect("admin");
    assert_eq!(view.accepted.as_deref(), Some(v2.as_str()), "push returned before Envoy ran {v2}: {view:?}");
    assert!(pushed.stdout.contains(&format!("wrote {}: version {v2} (2 clients, 1 routes)", gw.ecds.display())));
    assert!(pushed.stdout.contains(&format!("active: Envoy runs version {v2} (")), "{}", pushed.stdout);
    let denied = wait_for(Duration::from_secs(1), || is_invalid_key(&keyed(K1).send(gw.addr).ok()?).then_some(()));
    assert!(denied.is_some(), "K1 still forwarded a second after push said active");
    for _ in 0..20 {
        assert!(is_invalid_key(&keyed(K1).send(gw.addr).expect("K1")), "K1 on a fresh connection");
        assert_eq!(outcome(&keyed(K2).send(gw.addr).expect("K2")), forwarded_as("k2-client"));
    }
    let file = std::fs::read(&gw.ecds).expect("the ECDS file");
    let on_disk: serde_json::Value = serde_json::from_slice(&file).expect("JSON");
    assert_eq!(on_disk["version_info"], v2.as_str());
    assert_eq!(ecds::configuration_of(&on_disk), Some(revoked.as_str()), "the configuration, byte for byte");
    assert_eq!(ecds::vm_config_of(&on_disk).as_ref(), Some(&gw.vm_config), "push kept the file's vm_config");

    // 2. The same content again: nothing written, said so.
    let modified = std::fs::metadata(&gw.ecds).and_then(|m| m.modified()).expect("mtime");
    std::thread::sleep(Duration::from_millis(20));
    let again = push(&gw, &revoked, "revoked-again.json");
    assert!(again.ok, "{}{}", again.stdout, again.stderr);
    assert!(again.stdout.contains(&format!("unchanged: {} already holds version {v2}", gw.ecds.display())));
    assert!(again.stdout.contains(&format!("active: Envoy runs version {v2}")), "{}", again.stdout);
    assert!(!again.stdout.contains("wrote"), "{}", again.stdout);
    assert_eq!(std::fs::metadata(&gw.ecds).and_then(|m| m.modified()).expect("mtime"), modified, "file untouched");
    assert_eq!(std::fs::read(&gw.ecds).expect("file"), file);

    // 3. Envoy rejects it (the filter in Envoy's VM lacks the variable):
    //    push reports Envoy's reason, exits 1, and puts the file back.
    let needs_env = revoked.replace("UPSTREAM_CREDENTIAL", "NOT_IN_ENVOY");
    let v3 = version(&needs_env);
    let rejected = push(&gw, &needs_env, "needs-env.json");
    assert!(!rejected.ok, "push of a configuration Envoy refuses succeeded:\n{}", rejected.stdout);
    assert!(
        rejected.stdout.contains(&format!("rejected: Envoy refused version {v3} and keeps running {v2}")),
        "{}",
        rejected.stdout
    );
    assert!(
        rejected
            .stdout
            .contains("Envoy: keyswap: configuration refused: routes[0].inject[0].value.env: NOT_IN_ENVOY is not set"),
        "Envoy's reason: {}",
        rejected.stdout
    );
    assert!(rejected.stdout.contains("restored"), "{}", rejected.stdout);
    assert_eq!(std::fs::read(&gw.ecds).expect("file"), file, "the file holds the running configuration again");
    let view = wait_for(Duration::from_secs(5), || gw.view().ok().filter(|v| v.dumped.as_deref() == Some(v2.as_str())));
    assert_eq!(view.expect("Envoy re-read the restored file").accepted.as_deref(), Some(v2.as_str()));
    assert!(is_invalid_key(&keyed(K1).send(gw.addr).expect("K1")));
    assert_eq!(outcome(&keyed(K2).send(gw.addr).expect("K2")), forwarded_as("k2-client"));

    // 4. The filter refuses it: nothing is written, the error names the
    //    field, and neither the key nor the credential in it is printed.
    let rejected_before = gw.view().expect("admin").rejected;
    let refused = r#"{"clients": [{"id": "c", "key": "secret-in-config-key", "routes": ["nowhere"]}],
 "routes": [{"name": "r", "match": {"route_name": "r", "clusters": ["r"]}, "inject": [{"header": "x-api-key", "value": {"inline": "secret-in-config-credential"}}]}]}"#;
    let refused = push(&gw, refused, "refused.json");
    assert!(!refused.ok);
    assert!(
        refused.stderr.contains("error: configuration refused: clients[0].routes[0]: names no route"),
        "{}",
        refused.stderr
    );
    assert!(refused.stderr.contains("nothing written"), "{}", refused.stderr);
    assert_eq!(std::fs::read(&gw.ecds).expect("file"), file, "nothing written");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(gw.view().expect("admin").rejected, rejected_before, "Envoy saw nothing");
}

// ---- the shipped envoy.yaml -------------------------------------------------------

#[test]
fn shipped_envoy_yaml_takes_keyswap_from_an_ecds_file_in_the_ignored_run_dir() {
    let text = std::fs::read_to_string(repo_root().join("envoy.yaml")).expect("envoy.yaml");
    let yaml: serde_yaml::Value = serde_yaml::from_str(&text).expect("YAML");
    let hcm = &yaml["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"];
    let filter = &hcm["http_filters"][0];
    assert_eq!(filter["name"].as_str(), Some(ecds::RESOURCE_NAME));
    let discovery = &filter["config_discovery"];
    let source = &discovery["config_source"]["path_config_source"];
    assert_eq!(source["path"].as_str(), Some(".run/ecds/keyswap.json"));
    assert_eq!(source["watched_directory"]["path"].as_str(), Some(".run/ecds"));
    assert_eq!(discovery["apply_default_config_without_warming"].as_bool(), Some(true), "serves from the start");
    let vm: serde_json::Value = serde_json::to_value(&discovery["default_config"]["config"]["vm_config"]).unwrap();
    assert_eq!(vm, ecds::default_vm_config(), "keyswap push's default vm_config is envoy.yaml's");
    // Pushes write under .run/, which git ignores: they never dirty the tree.
    let ignore = std::fs::read_to_string(repo_root().join(".gitignore")).expect(".gitignore");
    assert!(ignore.lines().any(|l| l.trim() == "/.run"), ".run is ignored");
}

// ---- what a push can change ---------------------------------------------------------

#[test]
fn a_push_adds_removes_and_changes_clients_routes_and_credentials() {
    let gw = start_with_routes(&[("UPSTREAM_CREDENTIAL", CREDENTIAL), ("OTHER_CREDENTIAL", "other-cred")], &["a", "b"]);
    // K1 removed; K2 narrowed to route `a`, which now injects another
    // credential in another header; K3 added; K4 added, already expired.
    // Routes `a` and `b` are Envoy's routes (and clusters) `a` and `b`.
    let changed = format!(
        r#"{{"clients": [
  {{"id": "k2-client", "key": "{K2}", "routes": ["a"]}},
  {{"id": "k3-client", "key": "{K3_KEY}", "routes": ["a", "b"]}},
  {{"id": "k4-client", "key": "k4-expired-key", "routes": ["*"], "expires": "2020-01-01T00:00:00Z"}}],
 "routes": [
  {{"name": "a", "match": {{"route_name": "a", "clusters": ["a"]}},
    "inject": [{{"header": "x-api-key", "value": {{"env": "OTHER_CREDENTIAL"}}}}]}},
  {{"name": "b", "match": {{"route_name": "b", "clusters": ["b"]}},
    "inject": [{{"header": "authorization", "prefix": "Bearer ", "value": {{"env": "UPSTREAM_CREDENTIAL"}}}}]}}],
 "client_id_header": "x-keyswap-client"}}"#
    );
    let v = version(&changed);
    gw.push(&changed).expect("push");
    let loaded = wait_for(Duration::from_secs(10), || {
        let lines = parse_log(&gw.envoy.log());
        (workers(&lines, main_thread(&lines), &v, SystemTime::UNIX_EPOCH).len() == 2).then_some(())
    });
    assert!(loaded.is_some(), "both workers load {v}; log:\n{}", gw.envoy.log());

    // `/a/…` on Envoy's route `a`, anything else on `b`.
    let get = |path: &str, key: &str| {
        let route = if path.starts_with("/a/") { "a" } else { "b" };
        Request::get(path)
            .header("host", "gateway.test")
            .header(ROUTE_HEADER, route)
            .header("authorization", format!("Bearer {key}"))
            .header("connection", "close")
            .send(gw.addr)
            .expect("a request")
    };
    let error =
        |r: &Response| r.json().map(|b| b["error"].as_str().unwrap_or_default().to_string()).unwrap_or_default();
    for _ in 0..10 {
        // Removed client: unknown key.
        assert!(is_invalid_key(&get("/a/x", K1)), "K1 removed");
        // Route `a` now injects OTHER_CREDENTIAL as x-api-key, and no authorization.
        let k2 = get("/a/x", K2);
        let seen = Echoed::parse(&k2.body).unwrap_or_else(|| panic!("K2 on /a/: {} {}", k2.status, k2.text()));
        assert_eq!((seen.header("x-api-key"), seen.header("authorization")), (Some("other-cred"), None));
        assert_eq!(seen.header("x-keyswap-client"), Some("k2-client"));
        // K2's routes narrowed: route `b` is now forbidden to it.
        let k2b = get("/b/x", K2);
        assert_eq!((k2b.status, error(&k2b)), (403, "route_forbidden".to_string()));
        // Added client, on both routes.
        let k3 = Echoed::parse(&get("/b/x", K3_KEY).body).expect("K3 forwarded on b");
        assert_eq!(k3.header("authorization"), Some(format!("Bearer {CREDENTIAL}").as_str()));
        assert_eq!(k3.header("x-keyswap-client"), Some("k3-client"));
        // Added client whose key has expired.
        let k4 = get("/a/x", "k4-expired-key");
        assert_eq!((k4.status, error(&k4)), (401, "expired_key".to_string()));
    }
}
