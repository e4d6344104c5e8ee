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
    bad_resource_case(&start());
}

/// The same with a JSON ECDS file (`keyswap.json`), as one written and
/// kept by hand: Envoy parses it as JSON, and garbage fails to parse.
#[test]
fn a_bad_json_resource_leaves_the_previous_configuration_serving() {
    let listener = Listener {
        config: config(false),
        env: [("UPSTREAM_CREDENTIAL".to_string(), CREDENTIAL.to_string())].into(),
        route_names: vec![ROUTE.into()],
        ..Listener::default()
    };
    let options = keyswap_tests::revocation::Options { json: true, ..Default::default() };
    let gw =
        EcdsGateway::start_options(listener, &[], &LogLevels::serving(), &options).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(gw.format, ecds::Format::Json);
    bad_resource_case(&gw);
}

fn bad_resource_case(gw: &EcdsGateway) {
    let good = version(&config(false));
    let before = |gw: &EcdsGateway| {
        let k1: Vec<_> = (0..10).map(|_| outcome(&keyed(K1).send(gw.addr).expect("K1"))).collect();
        let k2: Vec<_> = (0..10).map(|_| outcome(&keyed(K2).send(gw.addr).expect("K2"))).collect();
        (k1, k2)
    };
    let (k1, k2) = before(gw);
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
    assert_eq!(before(gw), (k1.clone(), k2.clone()), "K1 and K2 answered exactly as before");

    // 2. Not even a resource. A JSON file: Envoy's own parser refuses it
    //    (update_failure). A binary file: Envoy 1.40 ignores a failed
    //    binary parse (MessageUtil::loadFromFile) and hands ECDS an empty
    //    response, which it rejects (update_rejected).
    ecds::write_atomically(&gw.ecds, b"{ this is not json\n").expect("write garbage");
    let again = match gw.format {
        ecds::Format::Json => {
            let failed = wait_for(Duration::from_secs(10), || gw.view().ok().filter(|v| v.failed > after.failed));
            let again = failed.unwrap_or_else(|| panic!("Envoy did not refuse garbage; log:\n{}", gw.envoy.log()));
            assert!(gw.envoy.log().contains("Filesystem config update failure: in "), "Envoy logs the parse failure");
            again
        }
        ecds::Format::Binary => {
            let rejected = wait_for(Duration::from_secs(10), || gw.view().ok().filter(|v| v.rejected > after.rejected));
            let again = rejected.unwrap_or_else(|| panic!("Envoy did not refuse garbage; log:\n{}", gw.envoy.log()));
            let said =
                "Filesystem config update rejected: Unexpected number of resources in ExtensionConfigDS response: 0";
            assert!(gw.envoy.log().contains(said), "Envoy logs the refusal");
            again
        }
    };
    assert_eq!(again.accepted.as_deref(), Some(good.as_str()));
    assert_eq!(before(gw), (k1, k2), "K1 and K2 answered exactly as before");
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
    // The time Envoy took to apply it: from the rename to its ECDS stats.
    let took = pushed.stdout.split_once(&format!("active: Envoy runs version {v2} (")).map(|(_, rest)| rest);
    let ms = took.and_then(|rest| rest.strip_suffix(" ms from the rename to Envoy applying it, by its ECDS stats)\n"));
    assert!(ms.is_some_and(|n| n.parse::<u64>().is_ok_and(|n| n < 10_000)), "{}", pushed.stdout);
    let denied = wait_for(Duration::from_secs(1), || is_invalid_key(&keyed(K1).send(gw.addr).ok()?).then_some(()));
    assert!(denied.is_some(), "K1 still forwarded a second after push said active");
    for _ in 0..20 {
        assert!(is_invalid_key(&keyed(K1).send(gw.addr).expect("K1")), "K1 on a fresh connection");
        assert_eq!(outcome(&keyed(K2).send(gw.addr).expect("K2")), forwarded_as("k2-client"));
    }
    let file = std::fs::read(&gw.ecds).expect("the ECDS file");
    let on_disk = ecds::read_resource(&file).expect("a keyswap resource");
    assert_eq!(on_disk.format, gw.format, "push writes the format Envoy reads the file in");
    assert_eq!(on_disk.version.as_deref(), Some(v2.as_str()));
    assert_eq!(on_disk.configuration.as_deref(), Some(revoked.as_str()), "the configuration, byte for byte");
    let vm = on_disk.vm_config.expect("vm_config").to_binary().expect("encodable");
    let expected = ecds::VmConfig::Json(gw.vm_config.clone()).to_binary().expect("encodable");
    assert_eq!(vm, expected, "push kept the file's vm_config");

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
    assert_eq!(source["path"].as_str(), Some(".run/ecds/keyswap.pb"), "binary: Envoy parses it fastest");
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
    // Each worker runs keyswap in several places (the listener's filter and
    // each cluster's upstream filter), each loading every configuration:
    // the push is in force once the new version was loaded as many times
    // as the first one.
    let loads = |version: &str| {
        let log = gw.envoy.log();
        log.lines().filter_map(keyswap_policy::Summary::from_log_line).filter(|s| s.version == version).count()
    };
    let before = loads(&version(&config(false)));
    assert!(before >= 2, "the first configuration was loaded; log:\n{}", gw.envoy.log());
    gw.push(&changed).expect("push");
    let loaded = wait_for(Duration::from_secs(10), || (loads(&v) >= before).then_some(()));
    assert!(loaded.is_some(), "every filter instance loads {v}; log:\n{}", gw.envoy.log());

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
    // The load lines can count a version in before every worker's every
    // stage runs it (each subscription, the listener's and each cluster's,
    // hands it to the workers on its own): wait, bounded, until twenty
    // fresh connections in a row see the removal, then hold every answer
    // to the new configuration.
    let settled = wait_for(Duration::from_secs(10), || (0..20).all(|_| is_invalid_key(&get("/a/x", K1))).then_some(()));
    assert!(settled.is_some(), "K1 is refused on every worker after the push; log:\n{}", gw.envoy.log());
    for _ in 0..10 {
        // Removed client: unknown key.
        let k1 = get("/a/x", K1);
        assert!(is_invalid_key(&k1), "K1 removed: {} {}", k1.status, k1.text());
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

// ---- what can undo a revocation (issue 22) ------------------------------------------

/// The `keyswap: refusing every request` line the fail-closed configuration logs.
const REFUSING_ALL_LINE: &str = "keyswap: refusing every request (503 configuration_unavailable)";

/// The keyswap configuration of the shipped envoy.yaml's ECDS `default_config`.
fn shipped_default() -> String {
    let text = std::fs::read_to_string(repo_root().join("envoy.yaml")).expect("envoy.yaml");
    let yaml: serde_yaml::Value = serde_yaml::from_str(&text).expect("YAML");
    let filter =
        &yaml["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"][0];
    let value = &filter["config_discovery"]["default_config"]["config"]["configuration"]["value"];
    value.as_str().expect("a default configuration").to_string()
}

/// docs/examples/demo.json (what scripts/setup puts in the ECDS file), its
/// demo key `disabled` or not.
fn demo(disabled: bool) -> String {
    let text = std::fs::read_to_string(repo_root().join("docs/examples/demo.json")).expect("demo.json");
    let from = r#""routes": ["demo"]}"#;
    assert_eq!(text.matches(from).count(), 1, "demo.json's client");
    if disabled {
        text.replace(from, r#""routes": ["demo"], "disabled": true}"#)
    } else {
        text
    }
}

const DEMO_KEY: &str = "keyswap-demo-key";

/// The demo request on Envoy's route `demo` with the demo key.
fn demo_request(gw: &EcdsGateway) -> Response {
    let selector = keyswap_tests::envoy::route_selector("demo", "demo_echo");
    keyed_once(DEMO_KEY).header(keyswap_tests::envoy::ROUTE_HEADER, selector).send(gw.addr).expect("the demo request")
}

fn error_of(response: &Response) -> String {
    response.json().map(|b| b["error"].as_str().unwrap_or_default().to_string()).unwrap_or_default()
}

/// Waits until Envoy runs `version` (its ECDS stats), or panics with its log.
fn await_version(gw: &EcdsGateway, version: &str) {
    let ran = wait_for(Duration::from_secs(15), || gw.view().ok().filter(|v| v.accepted.as_deref() == Some(version)));
    assert!(ran.is_some(), "Envoy does not run {version}: {:?}; log:\n{}", gw.view(), gw.envoy.log());
}

/// A restart with an ECDS file Envoy cannot use serves envoy.yaml's
/// default_config. Before: the demo configuration, so the demo key, revoked
/// by a push, answered 200 again. Now: `{"refuse_all": true}`, every
/// request 503 `configuration_unavailable`, an error line and a gauge.
#[test]
fn a_restart_with_an_unusable_ecds_file_never_accepts_a_revoked_key() {
    let listener = keyswap_tests::envoy::Listener {
        config: demo(false),
        env: [("KEYSWAP_DEMO_CREDENTIAL".to_string(), "demo-upstream-credential".to_string())].into(),
        // demo.json binds its route to envoy.yaml's cluster `demo_echo`.
        routes_to: vec![("demo".into(), "demo_echo".into())],
        ..Default::default()
    };
    let options = keyswap_tests::revocation::Options { default_config: Some(shipped_default()), ..Default::default() };
    let log = keyswap_tests::envoy::LogLevels { level: "info".into(), components: None };
    let mut gw = EcdsGateway::start_options(listener, &[], &log, &options).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(demo_request(&gw).status, 200, "the demo key works before the revocation");
    let revoked = demo(true);
    gw.push(&revoked).expect("push the revocation");
    await_version(&gw, &version(&revoked));
    assert!(is_invalid_key(&demo_request(&gw)), "the demo key is revoked");
    let good = std::fs::read(&gw.ecds).expect("the ECDS file");

    // The file is binary (.pb): its resource edited through the same
    // hand-declared messages push writes it with.
    let resource = |f: &dyn Fn(&mut keyswap_envoy_config::proto::TypedExtensionConfig)| {
        use keyswap_envoy_config::proto::{self, Message as _};
        let mut response = proto::DiscoveryResponse::decode(good.as_slice()).expect("binary");
        let mut extension =
            proto::TypedExtensionConfig::decode(response.resources[0].value.as_slice()).expect("binary");
        f(&mut extension);
        response.resources[0].value = extension.encode_to_vec();
        response.encode_to_vec()
    };
    let refused_by_filter =
        demo(true).replace(r#""routes": ["demo"], "disabled""#, r#""routes": ["nowhere"], "disabled""#);
    let missing_env = demo(true).replace("KEYSWAP_DEMO_CREDENTIAL", "NOT_IN_ENVOY");
    let bad: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("truncated", good[..good.len() / 2].to_vec()),
        (
            "wrong type",
            resource(&|e| {
                e.typed_config = Some(keyswap_envoy_config::proto::Any {
                    type_url: "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router".into(),
                    value: Vec::new(),
                });
            }),
        ),
        ("wrong name", resource(&|e| e.name = "other".into())),
        // Written by hand in the other format: Envoy reads a .pb file as binary only.
        ("JSON in the .pb file", ecds::resource_bytes(&revoked, &gw.vm_config)),
        ("refused by the filter", gw.file_bytes(&refused_by_filter).expect("encode")),
        ("missing env", gw.file_bytes(&missing_env).expect("encode")),
    ];
    for (kind, bytes) in &bad {
        ecds::write_atomically(&gw.ecds, bytes).expect("write the bad file");
        gw.restart(&[shipped_default()]).unwrap_or_else(|e| panic!("{kind}: {e}"));
        // Ready (restart waits for /ready), but nothing gets through.
        for _ in 0..10 {
            let response = demo_request(&gw);
            assert_eq!((response.status, error_of(&response)), (503, "configuration_unavailable".into()), "{kind}");
        }
        let view = gw.view().expect("admin");
        assert_eq!(view.accepted, None, "{kind}: no ECDS version runs");
        let stats = gw.admin("/stats?filter=keyswap_refusing_all").expect("stats");
        assert!(stats.contains("keyswap_refusing_all: 1"), "{kind}: the gauge says so: {stats}");
        let log = gw.envoy.log();
        assert!(log.lines().any(|l| l.contains("[error][wasm]") && l.contains(REFUSING_ALL_LINE)), "{kind}: {log}");
    }
    // A restart with the good file serves the revocation again.
    ecds::write_atomically(&gw.ecds, &good).expect("write the good file");
    gw.restart(std::slice::from_ref(&revoked)).unwrap_or_else(|e| panic!("{e}"));
    await_version(&gw, &version(&revoked));
    assert!(is_invalid_key(&demo_request(&gw)), "the demo key stays revoked");
}

/// Starts `keyswap push` of `config` (written to `name` in Envoy's
/// directory) with `extra` arguments, without waiting for it.
fn spawn_push(gw: &EcdsGateway, name: &str, config: &str, extra: &[&str]) -> std::process::Child {
    let file = gw.envoy.dir().join(name);
    std::fs::write(&file, config).expect("write the config");
    let mut command = gw.push_command(&file, extra).unwrap_or_else(|e| panic!("{e}"));
    command.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    command.spawn().expect("keyswap push starts")
}

/// Waits for a [`spawn_push`]; what it printed (which holds no secret).
fn finish(child: std::process::Child) -> Pushed {
    let output = child.wait_with_output().expect("keyswap push ends");
    let pushed = Pushed {
        ok: output.status.success(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    };
    for secret in [K1, K2, CREDENTIAL] {
        assert!(!pushed.stdout.contains(secret) && !pushed.stderr.contains(secret), "{secret} printed by push");
    }
    pushed
}

/// Runs `keyswap push` for each of `configs` at once (each from its own
/// file); their outputs, in order.
fn push_at_once(gw: &EcdsGateway, configs: &[(&str, &str)]) -> Vec<Pushed> {
    let children: Vec<_> = configs.iter().map(|(name, config)| spawn_push(gw, name, config, &[])).collect();
    children.into_iter().map(finish).collect()
}

/// Puts `config` back in the ECDS file (by hand) and waits until Envoy runs it.
fn reset(gw: &EcdsGateway, config: &str) {
    gw.push(config).expect("write");
    await_version(gw, &version(config));
}

/// Two operators pushing at once: the pushes take turns (the lock), each
/// reports what it replaced and that Envoy ran it, and the file and Envoy
/// end with the later one, never the configuration both replaced. Before:
/// no turns, and nothing said which push replaced which.
#[test]
fn two_concurrent_pushes_take_turns_and_report_truthfully() {
    let gw = start();
    let initial = version(&config(false));
    let a = config(true);
    let b = config(false).replace(
        r#""id": "k2-client", "key": "k2-key-that-stays", "routes": ["*"]}"#,
        r#""id": "k2-client", "key": "k2-key-that-stays", "routes": ["*"], "disabled": true}"#,
    );
    assert_ne!(b, config(false));
    let (va, vb) = (version(&a), version(&b));
    for round in 0..3 {
        reset(&gw, &config(false));
        let out = push_at_once(&gw, &[("a.json", &a), ("b.json", &b)]);
        let all =
            format!("round {round}:\nA: {}{}\nB: {}{}", out[0].stdout, out[0].stderr, out[1].stdout, out[1].stderr);
        assert!(out[0].ok && out[1].ok, "{all}");
        assert!(out[0].stdout.contains(&format!("active: Envoy runs version {va}")), "{all}");
        assert!(out[1].stdout.contains(&format!("active: Envoy runs version {vb}")), "{all}");
        // Exactly one went second, and says whose version it replaced.
        let a_second = out[0].stdout.contains(&format!("replacing version {vb}"));
        let b_second = out[1].stdout.contains(&format!("replacing version {va}"));
        assert!(a_second != b_second, "exactly one push replaced the other's version: {all}");
        let (first, later, later_version) = if b_second { (&out[0], &out[1], &vb) } else { (&out[1], &out[0], &va) };
        assert!(first.stdout.contains(&format!("replacing version {initial}")), "{all}");
        let on_disk = std::fs::read(&gw.ecds).expect("file");
        assert_eq!(ecds::version_of(&on_disk).as_deref(), Some(later_version.as_str()), "{all}");
        assert_eq!(gw.view().expect("admin").accepted.as_deref(), Some(later_version.as_str()), "{all}");
        // "active" was true when said: both versions were loaded by the workers.
        let lines = parse_log(&gw.envoy.log());
        for v in [&va, &vb] {
            assert_eq!(workers(&lines, main_thread(&lines), v, SystemTime::UNIX_EPOCH).len(), 2, "{v} loaded: {all}");
        }
        let _ = later;
    }
}

/// A push Envoy refuses, racing a push Envoy accepts (a revocation): the
/// refused one restores only what it replaced, and only while the file
/// still holds its own bytes, so the revocation is never undone. (Issue 22
/// saw the old push restore the file over the revocation in 9 of 24 runs;
/// against the old push this test's 8 rounds did not hit that window.)
#[test]
fn a_refused_push_racing_an_accepted_one_never_undoes_it() {
    let gw = start();
    let revoke = config(true);
    let refused = config(false).replace("UPSTREAM_CREDENTIAL", "NOT_IN_ENVOY");
    let (v_revoke, v_refused) = (version(&revoke), version(&refused));
    let revoke_bytes = gw.file_bytes(&revoke).expect("encode");
    for round in 0..8 {
        reset(&gw, &config(false));
        // The refused push first, the revocation 0 to 70 ms later: the
        // revocation's write lands while the refused push waits for Envoy's
        // answer (or, with the lock, once the refused push is done).
        let refusing = spawn_push(&gw, "refused.json", &refused, &[]);
        std::thread::sleep(Duration::from_millis(10 * round));
        let revoking = spawn_push(&gw, "revoke.json", &revoke, &[]);
        let (bad, good) = (finish(refusing), finish(revoking));
        let (good, bad) = (&good, &bad);
        let all =
            format!("round {round}:\nrevoke: {}{}\nrefused: {}{}", good.stdout, good.stderr, bad.stdout, bad.stderr);
        assert!(good.ok && good.stdout.contains(&format!("active: Envoy runs version {v_revoke}")), "{all}");
        assert!(!bad.ok && bad.stdout.contains(&format!("rejected: Envoy refused version {v_refused}")), "{all}");
        assert_eq!(std::fs::read(&gw.ecds).expect("file"), revoke_bytes, "the file holds the revocation: {all}");
        await_version(&gw, &v_revoke);
        for _ in 0..5 {
            assert!(is_invalid_key(&keyed_once(K1).send(gw.addr).expect("K1")), "K1 stays revoked: {all}");
        }
    }
}

/// An [`EcdsGateway`] serving `config` (K1, K2), with the shipped
/// fail-closed default, on ports a restart keeps, Envoy at `info`.
fn restartable(config: &str) -> EcdsGateway {
    let listener = keyswap_tests::envoy::Listener {
        config: config.into(),
        env: [("UPSTREAM_CREDENTIAL".to_string(), CREDENTIAL.to_string())].into(),
        route_names: vec![ROUTE.into()],
        ..Default::default()
    };
    let options = keyswap_tests::revocation::Options {
        default_config: Some(shipped_default()),
        fixed_ports: true,
        ..Default::default()
    };
    let log = keyswap_tests::envoy::LogLevels { level: "info".into(), components: None };
    EcdsGateway::start_options(listener, &[], &log, &options).unwrap_or_else(|e| panic!("{e}"))
}

/// Sends `sig` (`-STOP`, `-CONT`) to process `pid`.
fn signal(pid: u32, sig: &str) {
    let status = std::process::Command::new("kill").arg(sig).arg(pid.to_string()).status();
    assert!(status.is_ok_and(|s| s.success()), "kill {sig} {pid}");
}

/// Envoy killed and started again in the middle of a push of a
/// configuration the new Envoy refuses: push waits for the new Envoy, sees
/// the refusal, restores the revocation it replaced and says so; the
/// revoked key is never accepted (Envoy is stopped before the push writes,
/// killed once it has, and started again). Then Envoy paused for 6 s during
/// a push with `--timeout 30`: push waits it out and reports `active`.
/// Before: push gave up on a silent admin after 5 s without writing, and
/// exited on a reset connection without restoring anything.
#[test]
fn a_push_follows_an_envoy_that_restarts_or_pauses_in_the_middle() {
    let mut gw = restartable(&config(true));
    let revoked_bytes = std::fs::read(&gw.ecds).expect("file");
    let v_revoked = version(&config(true));

    // 1. A restart in the middle of a push Envoy refuses (K1 would be back).
    let refused = config(false).replace("UPSTREAM_CREDENTIAL", "NOT_IN_ENVOY");
    let refused_bytes = gw.file_bytes(&refused).expect("encode");
    // Envoy is stopped first, so that only the new Envoy ever reads the
    // refused file: push finds the admin silent, writes anyway, and waits.
    signal(gw.envoy.pid(), "-STOP");
    let mut child = spawn_push(&gw, "refused.json", &refused, &["--timeout", "60"]);
    let written = wait_for(Duration::from_secs(30), || {
        let exited = child.try_wait().ok().flatten().is_some();
        (exited || std::fs::read(&gw.ecds).ok()? == refused_bytes).then_some(exited)
    });
    if written != Some(false) {
        let _ = child.kill();
        let pushed = finish(child);
        panic!("push did not write the file (or ended first):\n{}{}", pushed.stdout, pushed.stderr);
    }
    gw.envoy.kill();
    gw.start_again(&[]).unwrap_or_else(|e| panic!("{e}"));
    for _ in 0..10 {
        let status = keyed_once(K1).send(gw.addr).expect("K1").status;
        assert!(status == 401 || status == 503, "K1 answered {status} after the restart");
    }
    let pushed = finish(child);
    let (stdout, all) = (&pushed.stdout, format!("{}{}", pushed.stdout, pushed.stderr));
    eprintln!("push across a restart:\n{all}");
    assert!(!pushed.ok, "{all}");
    assert!(stdout.contains(&format!("rejected: Envoy refused version {}", version(&refused))), "{all}");
    assert!(
        stdout
            .contains(&format!("restored {} to what it held before the push (version {v_revoked})", gw.ecds.display())),
        "{all}"
    );
    assert_eq!(std::fs::read(&gw.ecds).expect("file"), revoked_bytes, "the revocation is back in the file");
    await_version(&gw, &v_revoked);
    assert!(is_invalid_key(&keyed_once(K1).send(gw.addr).expect("K1")), "K1 stays revoked");
    assert_eq!(outcome(&keyed_once(K2).send(gw.addr).expect("K2")), forwarded_as("k2-client"));

    // 2. Envoy paused for longer than a read timeout during a push.
    let both = config(true).replace(r#""routes": ["*"]}],"#, r#""routes": ["*"], "disabled": true}],"#);
    assert_ne!(both, config(true));
    signal(gw.envoy.pid(), "-STOP");
    let child = spawn_push(&gw, "both.json", &both, &["--timeout", "30"]);
    std::thread::sleep(Duration::from_secs(6));
    signal(gw.envoy.pid(), "-CONT");
    let pushed = finish(child);
    let (stdout, all) = (&pushed.stdout, format!("{}{}", pushed.stdout, pushed.stderr));
    eprintln!("push across a pause:\n{all}");
    assert!(pushed.ok, "{all}");
    assert!(stdout.contains(&format!("active: Envoy runs version {}", version(&both))), "{all}");
    assert!(is_invalid_key(&keyed_once(K2).send(gw.addr).expect("K2")), "K2 revoked too");
}

/// ECDS files are private and keep their owner; a symbolic link is refused,
/// not replaced; `scripts/ecds-resource` (setup, demo) writes exactly what
/// push writes, 0600. Before: a replaced file kept 0644 and became root's,
/// and a link was silently replaced by a regular file.
#[test]
fn pushed_files_are_0600_keep_their_owner_and_links_are_refused() {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let gw = start();
    let mode = |p: &std::path::Path| std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777;
    std::fs::set_permissions(&gw.ecds, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let root = std::fs::metadata(&gw.ecds).expect("metadata").uid() == 0;
    if root {
        std::os::unix::fs::chown(&gw.ecds, Some(65534), Some(65534)).expect("chown to nobody");
    }
    let pushed = push(&gw, &config(true), "revoked.json");
    assert!(pushed.ok, "{}{}", pushed.stdout, pushed.stderr);
    assert_eq!(mode(&gw.ecds), 0o600, "the pushed file is its owner's only");
    if root {
        let meta = std::fs::metadata(&gw.ecds).expect("metadata");
        assert_eq!((meta.uid(), meta.gid()), (65534, 65534), "the replaced file's owner is kept");
    } else {
        eprintln!("not root: the owner part is not exercised");
    }
    let dir = gw.ecds.parent().expect("dir");
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, [".keyswap.pb.lock", "keyswap.pb"], "no temporary file left");
    assert_eq!(mode(&dir.join(".keyswap.pb.lock")), 0o600);

    // A link where the file was: refused, link and target untouched.
    let target = dir.join("real.json");
    std::fs::copy(&gw.ecds, &target).expect("copy");
    let link = dir.join(".link.tmp");
    std::os::unix::fs::symlink(&target, &link).expect("symlink");
    std::fs::rename(&link, &gw.ecds).expect("rename the link into place");
    let before = std::fs::read(&target).expect("target");
    let refused = push(&gw, &config(false), "unrevoked.json");
    assert!(!refused.ok);
    assert!(
        refused.stderr.contains("is a symbolic link") && refused.stderr.contains("nothing written"),
        "{}",
        refused.stderr
    );
    assert!(std::fs::symlink_metadata(&gw.ecds).expect("link").file_type().is_symlink(), "still a link");
    assert_eq!(std::fs::read(&target).expect("target"), before);
    assert!(is_invalid_key(&keyed_once(K1).send(gw.addr).expect("K1")), "K1 stays revoked");

    // What scripts/setup and scripts/demo write: push's bytes, 0600.
    let demo_config = std::fs::read_to_string(repo_root().join("docs/examples/demo.json")).expect("demo.json");
    for (name, format) in [("seeded.pb", ecds::Format::Binary), ("seeded.json", ecds::Format::Json)] {
        let seeded = gw.envoy.dir().join(name);
        let status = std::process::Command::new(repo_root().join("scripts/ecds-resource"))
            .arg(repo_root().join("docs/examples/demo.json"))
            .arg(&seeded)
            .stdout(std::process::Stdio::null())
            .status()
            .expect("scripts/ecds-resource runs");
        assert!(status.success());
        assert_eq!(mode(&seeded), 0o600);
        let vm = ecds::VmConfig::Json(ecds::default_vm_config());
        assert_eq!(
            std::fs::read(&seeded).expect("seeded"),
            ecds::encode(format, &demo_config, &vm).expect("encode"),
            "scripts/ecds-resource writes what keyswap push writes ({name})"
        );
    }
}

/// A file written in place (`cp`, `cat >`) is never seen by Envoy, which
/// reacts to renames: push says so (not "refused"), and `push --force`
/// renames the same bytes into place. Before: push blamed a refusal that
/// never happened and could not redeliver.
#[test]
fn an_in_place_write_is_named_and_push_force_redelivers_it() {
    use std::io::Write as _;
    let gw = start();
    let revoked = config(true);
    let v = version(&revoked);
    let mut file = std::fs::OpenOptions::new().write(true).truncate(true).open(&gw.ecds).expect("open in place");
    file.write_all(&gw.file_bytes(&revoked).expect("encode")).expect("write in place");
    drop(file);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(outcome(&keyed_once(K1).send(gw.addr).expect("K1")), forwarded_as("k1-client"), "Envoy never saw it");

    let unchanged = push(&gw, &revoked, "revoked.json");
    assert!(!unchanged.ok, "{}", unchanged.stdout);
    assert!(unchanged.stdout.contains("unchanged"), "{}", unchanged.stdout);
    assert!(
        unchanged.stderr.contains("Envoy never read it") && unchanged.stderr.contains("--force"),
        "{}",
        unchanged.stderr
    );

    let file = gw.envoy.dir().join("revoked.json");
    let output = gw.push_command(&file, &["--force"]).unwrap_or_else(|e| panic!("{e}")).output().expect("push --force");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("--force: the same bytes again"), "{stdout}");
    assert!(stdout.contains(&format!("active: Envoy runs version {v}")), "{stdout}");
    assert!(is_invalid_key(&keyed_once(K1).send(gw.addr).expect("K1")), "K1 revoked");
}

/// The soak of issue 22 (not part of the suite: `cargo test -p keyswap-tests
/// --test all soak -- --ignored --nocapture`; `KEYSWAP_SOAK_ROUNDS`, 100 by
/// default, bounded to 30 minutes): each round two pushes race (every
/// configuration revokes K1; every third round one of them is refused by
/// Envoy), every fifth round Envoy is killed and started again while they
/// run (two seconds in), and a prober sends K1 all along. At the end every `active` a push
/// printed names a version Envoy loaded, every `rejected` one it never ran,
/// and K1 was never answered 200 after the first push was reported active.
#[test]
#[ignore = "a soak: minutes; run by hand"]
fn soak_racing_pushes_and_restarts_never_undo_a_revocation() {
    let rounds: u64 = std::env::var("KEYSWAP_SOAK_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(100);
    let until = Instant::now() + Duration::from_secs(30 * 60);
    let mut gw = restartable(&config(false));
    let addr = gw.addr;

    // The prober: K1 on a new connection, all along; (sent, status).
    let stop = Arc::new(AtomicBool::new(false));
    let answers: Arc<Mutex<Vec<(Instant, u16)>>> = Arc::default();
    let prober = {
        let (stop, answers) = (Arc::clone(&stop), Arc::clone(&answers));
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let sent = Instant::now();
                if let Ok(response) = keyed_once(K1).send(addr) {
                    answers.lock().expect("answers").push((sent, response.status));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };

    let mut first_active: Option<Instant> = None;
    let (mut actives, mut rejections, mut logs) = (Vec::new(), Vec::new(), Vec::new());
    let mut done = 0;
    for round in 0..rounds {
        if Instant::now() >= until {
            break;
        }
        // Two K1 revocations, told apart by a client of their own.
        let revoking = |tag: &str| {
            config(true).replace(
                r#""client_id_header""#,
                &format!(r#""strip_request_headers": ["x-soak-{round}-{tag}"], "client_id_header""#),
            )
        };
        let a = revoking("a");
        let b =
            if round % 3 == 2 { revoking("b").replace("UPSTREAM_CREDENTIAL", "NOT_IN_ENVOY") } else { revoking("b") };
        let children =
            [spawn_push(&gw, "a.json", &a, &["--timeout", "60"]), spawn_push(&gw, "b.json", &b, &["--timeout", "60"])];
        if round % 5 == 4 {
            std::thread::sleep(Duration::from_millis(2000 + 100 * (round % 7)));
            logs.push(gw.envoy.log());
            gw.restart(&[]).unwrap_or_else(|e| panic!("round {round}: {e}"));
            assert_eq!(gw.addr, addr, "the same port after a restart");
        }
        let outs: Vec<Pushed> = children.into_iter().map(finish).collect();
        for (config, out) in [(&a, &outs[0]), (&b, &outs[1])] {
            let v = version(config);
            let all = format!("round {round} {v}:\n{}{}", out.stdout, out.stderr);
            if out.stdout.contains(&format!("active: Envoy runs version {v}")) {
                assert!(out.ok, "{all}");
                actives.push((round, v));
                // Conservative: once both pushes of the round have ended.
                first_active.get_or_insert_with(Instant::now);
            } else if out.stdout.contains(&format!("rejected: Envoy refused version {v}")) {
                assert!(!out.ok && config.contains("NOT_IN_ENVOY"), "{all}");
                rejections.push((round, v));
            } else {
                panic!("neither active nor rejected: {all}");
            }
        }
        done += 1;
    }
    stop.store(true, Ordering::Relaxed);
    prober.join().expect("prober");
    logs.push(gw.envoy.log());
    let log = logs.concat();
    let loaded =
        |v: &str| log.lines().any(|l| keyswap_policy::Summary::from_log_line(l).is_some_and(|s| s.version == v));
    for (round, v) in &actives {
        assert!(loaded(v), "round {round}: {v} reported active, never loaded");
    }
    for (round, v) in &rejections {
        assert!(!loaded(v), "round {round}: {v} reported rejected, but loaded");
    }
    let answers = answers.lock().expect("answers");
    let first = first_active.expect("some push was active");
    let after: Vec<u16> = answers.iter().filter(|(sent, _)| *sent > first).map(|(_, s)| *s).collect();
    let accepted = after.iter().filter(|s| **s == 200).count();
    eprintln!(
        "soak: {done} rounds, {} active, {} rejected, {} K1 probes after the first active ({} answered 200)",
        actives.len(),
        rejections.len(),
        after.len(),
        accepted
    );
    assert_eq!(accepted, 0, "K1 was accepted after its revocation was reported active");
}
