//! The ABI pieces: local responses, properties, environment, the clock,
//! response headers, host-call counts and parallel instances through the
//! real filter; header-map edits, WASI output, traps and unimplemented
//! imports through small hand-written modules.

use std::collections::BTreeMap;
use std::time::{Duration, UNIX_EPOCH};

use keyswap_harness::runner::check_unimplemented;
use keyswap_harness::{ArtifactError, FilterInstance, FilterModule, Handled, HarnessError, LogLevel, MetricType};

use crate::filter;

const CONFIG: &str = r#"{
  "clients": [
    {"id": "dev", "key": "dev-key", "routes": ["*"]},
    {"id": "until-2030", "key": "until-2030-key", "routes": ["*"], "expires": "2030-01-01T00:00:00Z"}
  ],
  "routes": [
    {"name": "openai", "match": {"route_name": "openai", "clusters": ["openai"]},
     "inject": [{"header": "authorization", "prefix": "Bearer ", "value": {"env": "OPENAI_API_KEY"}}]}
  ],
  "strip_response_headers": ["set-cookie"],
  "client_id_header": "x-keyswap-client"
}"#;

fn env(credential: &str) -> BTreeMap<String, String> {
    BTreeMap::from([("OPENAI_API_KEY".to_string(), credential.to_string())])
}

fn configured(credential: &str) -> FilterInstance {
    filter().configure(CONFIG.as_bytes(), &env(credential)).expect("the configuration loads")
}

fn headers(pairs: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
    pairs.iter().map(|(n, v)| (n.to_string(), v.as_bytes().to_vec())).collect()
}

fn request(key: Option<&str>) -> Vec<(String, Vec<u8>)> {
    let mut list = headers(&[(":authority", "gw"), (":path", "/v1/models"), (":method", "GET"), (":scheme", "http")]);
    if let Some(key) = key {
        list.push(("authorization".into(), format!("Bearer {key}").into_bytes()));
    }
    list
}

fn header<'h>(list: &'h [(String, Vec<u8>)], name: &str) -> Option<&'h str> {
    list.iter().find(|(n, _)| n == name).and_then(|(_, v)| std::str::from_utf8(v).ok())
}

#[test]
fn configuration_is_logged_or_refused_with_its_field() {
    let instance = configured("sk-up");
    let loaded = instance.log().iter().find(|e| e.message.contains("configuration loaded")).expect("a summary line");
    assert_eq!(loaded.level, LogLevel::Info);

    match filter().configure(CONFIG.as_bytes(), &BTreeMap::new()) {
        Err(HarnessError::Refused { log }) => {
            assert!(log.contains("routes[0].inject[0].value.env: OPENAI_API_KEY is not set"), "{log}")
        }
        other => panic!("want a refusal, got {other:?}"),
    }
}

#[test]
fn local_responses_carry_status_headers_and_body() {
    let cases: &[(&str, Option<&str>, Option<&str>, u32, &str)] = &[
        ("no key", Some("openai"), None, 401, "missing_key"),
        ("unknown key", Some("openai"), Some("nope"), 401, "invalid_key"),
        ("no route", None, Some("dev-key"), 404, "no_route"),
    ];
    for (name, route, key, status, code) in cases {
        let mut instance = configured("sk-up");
        let Handled::Local(local) = instance.request(*route, &request(*key)).unwrap() else {
            panic!("{name}: want a local response");
        };
        assert_eq!(local.status, *status, "{name}");
        assert_eq!(header(&local.headers, "content-type"), Some("application/json"), "{name}");
        assert_eq!(local.grpc_status, -1, "{name}");
        let body: serde_json::Value = serde_json::from_slice(&local.body).unwrap();
        assert_eq!(body["error"], *code, "{name}");
    }
}

/// keyswap on a cluster whose listener does not run it: the final stage
/// finds no key record and Envoy has picked an upstream host, so it
/// refuses (500) instead of reading the key itself, which would let a
/// deployment without the first stage forward keys.
#[test]
fn a_final_stage_without_a_first_stage_refuses() {
    let mut instance = configured("sk-up");
    let outcome = instance.request_upstream_only(Some("openai"), Some("openai"), &request(Some("dev-key"))).unwrap();
    let Handled::Local(local) = outcome else { panic!("want a local response, got {outcome:?}") };
    assert_eq!(local.status, 500);
    let body: serde_json::Value = serde_json::from_slice(&local.body).unwrap();
    assert_eq!(body["error"], "not_configured");
    assert!(instance.log_text().contains("listener does not run keyswap"), "{}", instance.log_text());
}

#[test]
fn route_name_property_selects_the_route() {
    let mut instance = configured("sk-up");
    let Handled::Forwarded { headers } = instance.request(Some("openai"), &request(Some("dev-key"))).unwrap() else {
        panic!("want forwarded");
    };
    assert_eq!(header(&headers, "authorization"), Some("Bearer sk-up"));
    assert_eq!(header(&headers, "x-keyswap-client"), Some("dev"));
    assert_eq!(header(&headers, ":path"), Some("/v1/models"));
    assert!(instance.missing_properties().is_empty(), "{:?}", instance.missing_properties());

    let other = instance.request(Some("other"), &request(Some("dev-key"))).unwrap();
    assert!(matches!(other, Handled::Local(ref l) if l.status == 404), "{other:?}");
}

#[test]
fn environment_is_the_vm_environment_only() {
    // Two VMs of the one module, each with its own environment.
    for credential in ["sk-first", "sk-second"] {
        let mut instance = configured(credential);
        let Handled::Forwarded { headers } = instance.request(Some("openai"), &request(Some("dev-key"))).unwrap()
        else {
            panic!("want forwarded");
        };
        assert_eq!(header(&headers, "authorization"), Some(format!("Bearer {credential}").as_str()));
    }
    // This process's environment is not the VM's.
    let path = std::env::var("PATH").expect("tests run with a PATH");
    assert!(!path.is_empty());
    let config = CONFIG.replace("OPENAI_API_KEY", "PATH");
    assert!(matches!(filter().configure(config.as_bytes(), &BTreeMap::new()), Err(HarnessError::Refused { .. })));
}

#[test]
fn clock_is_set_per_instance() {
    let at = |secs: u64| UNIX_EPOCH + Duration::from_secs(secs);
    let cases = [("before expiry", at(1_800_000_000), true), ("after expiry", at(1_900_000_000), false)];
    for (name, now, forwarded) in cases {
        let mut instance = configured("sk-up");
        instance.clock().set(now);
        let outcome = instance.request(Some("openai"), &request(Some("until-2030-key"))).unwrap();
        match outcome {
            Handled::Forwarded { .. } => assert!(forwarded, "{name}"),
            Handled::Local(local) => {
                assert!(!forwarded, "{name}");
                let body: serde_json::Value = serde_json::from_slice(&local.body).unwrap();
                assert_eq!(body["error"], "expired_key", "{name}");
            }
            other => panic!("{name}: {other:?}"),
        }
        instance.finish().unwrap();
        // One reading for the expiry check, and on a denial one for the
        // audit line's per-second limit.
        let readings = if forwarded { 1 } else { 2 };
        assert_eq!(instance.last_request_host_calls().unwrap().get("proxy_get_current_time_nanoseconds"), readings);
    }
}

#[test]
fn response_headers_are_stripped() {
    let mut instance = configured("sk-up");
    assert!(matches!(instance.request(Some("openai"), &request(Some("dev-key"))).unwrap(), Handled::Forwarded { .. }));
    let sent = headers(&[(":status", "200"), ("Set-Cookie", "a=1"), ("x-upstream", "ok"), ("set-cookie", "b=2")]);
    let Handled::Forwarded { headers: seen } = instance.response(&sent).unwrap() else { panic!("want forwarded") };
    assert_eq!(seen, headers(&[(":status", "200"), ("x-upstream", "ok")]));
    // The stream ended with the response.
    assert!(matches!(instance.response(&sent), Err(HarnessError::NoOpenRequest)));
}

#[test]
fn host_calls_are_counted_per_request() {
    let mut instance = configured("sk-up");
    let cases: &[(&str, Option<&str>, &[(&str, u64)])] = &[
        (
            "forwarded",
            Some("dev-key"),
            &[
                // Both stages read the headers.
                ("proxy_get_header_map_pairs", 2),
                // First: the key record (absent), upstream.address (absent);
                // final: the key record, the cluster, the route name.
                ("proxy_get_property", 5),
                ("proxy_increment_metric", 1),
                // The key record, the access-log field.
                ("proxy_set_property", 2),
                // The first stage's removals (more than three edits) as
                // one map; the final stage's two additions, the
                // credential and the client id, one call each (the
                // filter's `edits`).
                ("proxy_set_header_map_pairs", 1),
                ("proxy_add_header_map_value", 2),
            ],
        ),
        (
            "denied",
            None,
            &[
                ("proxy_get_header_map_pairs", 2),
                ("proxy_get_property", 5),
                ("proxy_increment_metric", 1),
                ("proxy_set_property", 2),
                // the audit line: the clock for its rate limit, then the line
                ("proxy_get_current_time_nanoseconds", 1),
                ("proxy_log", 1),
                ("proxy_send_local_response", 1),
            ],
        ),
    ];
    for (name, key, want) in cases {
        instance.request(Some("openai"), &request(*key)).unwrap();
        instance.finish().unwrap();
        let calls = instance.last_request_host_calls().expect("a finished stream").clone();
        let want: BTreeMap<String, u64> = want.iter().map(|(n, c)| (n.to_string(), *c)).collect();
        assert_eq!(calls.by_name(), &want, "{name}");
        assert_eq!(calls.total(), want.values().sum::<u64>(), "{name}: no WASI calls per request");
        assert_eq!(calls.wasi(), 0, "{name}");
    }
    assert!(instance.host_calls().total() >= 6);
    assert!(instance.host_calls().wasi() > 0, "the VM read its environment through WASI");
}

#[test]
fn instances_run_in_parallel() {
    let threads: Vec<_> = (0..6)
        .map(|t| {
            std::thread::spawn(move || {
                let credential = format!("sk-thread-{t}");
                let mut instance = configured(&credential);
                for _ in 0..40 {
                    let outcome = instance.request(Some("openai"), &request(Some("dev-key"))).unwrap();
                    let Handled::Forwarded { headers } = outcome else { panic!("want forwarded") };
                    assert_eq!(header(&headers, "authorization"), Some(format!("Bearer {credential}").as_str()));
                }
                instance.finish().unwrap();
                instance.unimplemented_calls().clone()
            })
        })
        .collect();
    for thread in threads {
        assert!(thread.join().expect("no thread panicked").is_empty());
    }
}

// ---- hand-written modules ------------------------------------------------

/// A proxy-wasm module around `body`: memory, a bump allocator, the ABI
/// marker, and `imports`.
fn wat(imports: &str, body: &str) -> FilterModule {
    let text = format!(
        r#"(module
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  {imports}
  (memory (export "memory") 2)
  (global $heap (mut i32) (i32.const 8192))
  (func (export "proxy_on_memory_allocate") (param $size i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $size)))
    (local.get $p))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  {body}
)"#
    );
    FilterModule::from_bytes(text.as_bytes()).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn header_map_edits_reach_the_upstream() {
    let module = wat(
        r#"(import "env" "proxy_replace_header_map_value" (func $replace (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_remove_header_map_value" (func $remove (param i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_header_map_value" (func $get (param i32 i32 i32 i32 i32) (result i32)))"#,
        r#"(data (i32.const 100) "x-a") (data (i32.const 110) "new") (data (i32.const 120) "x-b")
  (data (i32.const 130) "X-C") (data (i32.const 140) "3") (data (i32.const 150) "x-d")
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (drop (call $replace (i32.const 0) (i32.const 100) (i32.const 3) (i32.const 110) (i32.const 3)))
    (drop (call $remove (i32.const 0) (i32.const 120) (i32.const 3)))
    (drop (call $add (i32.const 0) (i32.const 130) (i32.const 3) (i32.const 140) (i32.const 1)))
    (if (i32.eqz (call $get (i32.const 0) (i32.const 150) (i32.const 3) (i32.const 200) (i32.const 204)))
      (then (drop (call $log (i32.const 2) (i32.load (i32.const 200)) (i32.load (i32.const 204))))))
    (i32.const 0))"#,
    );
    let mut instance = module.start(&BTreeMap::new()).unwrap();
    instance.configure(b"").unwrap();
    let sent = headers(&[(":path", "/"), ("x-a", "old"), ("x-b", "1"), ("x-d", "value-of-d"), ("x-b", "2")]);
    let Handled::Forwarded { headers: upstream } = instance.request_stream(None, &sent).unwrap() else {
        panic!("forwarded")
    };
    assert_eq!(upstream, headers(&[(":path", "/"), ("x-a", "new"), ("x-d", "value-of-d"), ("x-c", "3")]));
    assert_eq!(instance.log_text(), "value-of-d");
    assert!(instance.last_request_host_calls().is_none(), "the forwarded stream is still open");
    instance.finish().unwrap();
    let calls = instance.last_request_host_calls().unwrap();
    assert_eq!((calls.get("proxy_get_header_map_value"), calls.total()), (1, 5));
}

#[test]
fn wasi_output_and_environment_are_captured() {
    let module = wat(
        r#"(import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_sizes_get" (func $environ_sizes (param i32 i32) (result i32)))"#,
        r#"(data (i32.const 420) "hello\n") (data (i32.const 430) "oops\n") (data (i32.const 440) "two vars")
  (func (export "proxy_on_configure") (param i32 i32) (result i32)
    (i32.store (i32.const 400) (i32.const 420)) (i32.store (i32.const 404) (i32.const 6))
    (drop (call $fd_write (i32.const 1) (i32.const 400) (i32.const 1) (i32.const 408)))
    (i32.store (i32.const 400) (i32.const 430)) (i32.store (i32.const 404) (i32.const 5))
    (drop (call $fd_write (i32.const 2) (i32.const 400) (i32.const 1) (i32.const 408)))
    (drop (call $environ_sizes (i32.const 500) (i32.const 504)))
    (if (i32.eq (i32.load (i32.const 500)) (i32.const 2))
      (then (drop (call $log (i32.const 3) (i32.const 440) (i32.const 8)))))
    (i32.const 1))"#,
    );
    let env = BTreeMap::from([("A".to_string(), "1".to_string()), ("B".to_string(), "2".to_string())]);
    let mut instance = module.start(&env).unwrap();
    instance.configure(b"{}").unwrap();
    let log: Vec<(LogLevel, &str)> = instance.log().iter().map(|e| (e.level, e.message.as_str())).collect();
    assert_eq!(log, [(LogLevel::Warn, "two vars"), (LogLevel::Info, "hello"), (LogLevel::Error, "oops")]);
    assert_eq!(instance.host_calls().wasi(), 3);
}

#[test]
fn unimplemented_imports_answer_12_and_are_counted() {
    let module = wat(
        r#"(import "env" "proxy_enqueue_shared_queue" (func $enqueue (param i32 i32 i32) (result i32)))
  (import "env" "proxy_register_shared_queue" (func $register (param i32 i32 i32) (result i32)))"#,
        r#"(data (i32.const 300) "got UNIMPLEMENTED")
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (if (i32.eq (call $enqueue (i32.const 0) (i32.const 0) (i32.const 0))
                (i32.const 12))
      (then (drop (call $log (i32.const 2) (i32.const 300) (i32.const 17)))))
    (i32.const 0))"#,
    );
    let stubbed: Vec<&str> = module.stubbed_imports().iter().map(|(_, name)| name.as_str()).collect();
    assert_eq!(stubbed, ["proxy_enqueue_shared_queue", "proxy_register_shared_queue"]);
    let mut instance = module.start(&BTreeMap::new()).unwrap();
    instance.request_stream(None, &headers(&[(":path", "/")])).unwrap();
    instance.finish().unwrap();
    assert_eq!(instance.log_text(), "got UNIMPLEMENTED");
    let want = BTreeMap::from([("proxy_enqueue_shared_queue".to_string(), 1)]);
    assert_eq!(instance.unimplemented_calls(), &want);
    assert_eq!(instance.last_request_host_calls().unwrap().get("proxy_enqueue_shared_queue"), 1);
    let err = check_unimplemented(instance.unimplemented_calls()).unwrap_err();
    assert!(err.contains("proxy_enqueue_shared_queue ×1"), "{err}");
}

/// What the conformance runner does with such a call: the test fails.
#[test]
#[should_panic(expected = "does not implement")]
fn a_call_to_an_unimplemented_import_fails_the_runner() {
    let module = wat(
        r#"(import "env" "proxy_enqueue_shared_queue" (func $enqueue (param i32 i32 i32) (result i32)))"#,
        r#"(func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (drop (call $enqueue (i32.const 1) (i32.const 0) (i32.const 0))) (i32.const 0))"#,
    );
    let mut instance = module.start(&BTreeMap::new()).unwrap();
    instance.request_stream(None, &headers(&[(":path", "/")])).unwrap();
    if let Err(message) = check_unimplemented(instance.unimplemented_calls()) {
        panic!("{message}");
    }
}

#[test]
fn a_trap_names_the_callback_and_keeps_the_log() {
    let module = wat(
        "",
        r#"(data (i32.const 100) "about to trap")
  (func (export "proxy_on_configure") (param i32 i32) (result i32)
    (drop (call $log (i32.const 5) (i32.const 100) (i32.const 13)))
    unreachable)"#,
    );
    let mut instance = module.start(&BTreeMap::new()).unwrap();
    match instance.configure(b"{}") {
        Err(HarnessError::Trap { callback, log, .. }) => {
            assert_eq!(callback, "proxy_on_configure");
            assert_eq!(log, "about to trap");
        }
        other => panic!("want a trap, got {other:?}"),
    }
    // The guest's state is not trusted after a trap.
    assert!(matches!(instance.request(None, &headers(&[(":path", "/")])), Err(HarnessError::Trap { .. })));
}

#[test]
fn modules_that_are_not_proxy_wasm_are_refused() {
    let cases: &[(&str, &str, &str)] = &[
        ("no ABI marker", r#"(module (memory (export "memory") 1))"#, "proxy_abi_version"),
        (
            "no allocator",
            r#"(module (memory (export "memory") 1) (func (export "proxy_abi_version_0_2_1")))"#,
            "allocate",
        ),
        ("not wasm", "garbage", "compile"),
    ];
    for (name, text, want) in cases {
        let err = FilterModule::from_bytes(text.as_bytes()).unwrap_err().to_string();
        assert!(err.contains(want), "{name}: {err}");
    }
}

#[test]
fn a_missing_module_says_how_to_build_it() {
    let err = FilterModule::load(std::path::Path::new("/nonexistent/keyswap_filter.wasm")).unwrap_err();
    assert!(matches!(err, HarnessError::Artifact(ArtifactError::Missing { .. })));
    assert!(err.to_string().contains("scripts/build-filter"), "{err}");
}

/// Statuses and ids as letters (`a` + value), so a module can log them.
const PUT: &str = r#"(global $cur (mut i32) (i32.const 1000))
  (func $put (param $v i32)
    (i32.store8 (global.get $cur) (i32.add (i32.const 97) (local.get $v)))
    (global.set $cur (i32.add (global.get $cur) (i32.const 1))))
  (func $flush
    (drop (call $log (i32.const 2) (i32.const 1000) (i32.sub (global.get $cur) (i32.const 1000))))
    (global.set $cur (i32.const 1000)))"#;

#[test]
fn metrics_follow_envoy() {
    let module = wat(
        r#"(import "env" "proxy_define_metric" (func $define (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_increment_metric" (func $inc (param i32 i64) (result i32)))
  (import "env" "proxy_record_metric" (func $rec (param i32 i64) (result i32)))
  (import "env" "proxy_get_metric" (func $get (param i32 i32) (result i32)))"#,
        &format!(
            r#"{PUT}
  (data (i32.const 100) "cghx")
  (func (export "proxy_on_configure") (param i32 i32) (result i32)
    ;; ids: counter c twice, gauge g, histogram h, then a type that does not exist
    (call $put (call $define (i32.const 0) (i32.const 100) (i32.const 1) (i32.const 0)))
    (call $put (i32.load (i32.const 0)))
    (call $put (call $define (i32.const 0) (i32.const 100) (i32.const 1) (i32.const 4)))
    (call $put (i32.load (i32.const 4)))
    (call $put (call $define (i32.const 1) (i32.const 101) (i32.const 1) (i32.const 8)))
    (call $put (i32.load (i32.const 8)))
    (call $put (call $define (i32.const 2) (i32.const 102) (i32.const 1) (i32.const 12)))
    (call $put (i32.load (i32.const 12)))
    (call $put (call $define (i32.const 3) (i32.const 103) (i32.const 1) (i32.const 16)))
    (call $flush)
    ;; increment: counter +1, 0, -1; gauge +5, -2; histogram; unknown; type 3
    (call $put (call $inc (i32.load (i32.const 0)) (i64.const 1)))
    (call $put (call $inc (i32.load (i32.const 0)) (i64.const 0)))
    (call $put (call $inc (i32.load (i32.const 0)) (i64.const -1)))
    (call $put (call $inc (i32.load (i32.const 8)) (i64.const 5)))
    (call $put (call $inc (i32.load (i32.const 8)) (i64.const -2)))
    (call $put (call $inc (i32.load (i32.const 12)) (i64.const 1)))
    (call $put (call $inc (i32.const 4000) (i64.const 1)))
    (call $put (call $inc (i32.const 7) (i64.const 1)))
    (call $flush)
    ;; record: through the second counter id (adds), the histogram, unknown, type 3
    (call $put (call $rec (i32.load (i32.const 4)) (i64.const 10)))
    (call $put (call $rec (i32.load (i32.const 12)) (i64.const 3)))
    (call $put (call $rec (i32.const 4000) (i64.const 1)))
    (call $put (call $rec (i32.const 7) (i64.const 1)))
    (call $flush)
    ;; get: the first counter id, the gauge, the histogram, unknown
    (call $put (call $get (i32.load (i32.const 0)) (i32.const 24)))
    (call $put (i32.load (i32.const 24)))
    (call $put (call $get (i32.load (i32.const 8)) (i32.const 24)))
    (call $put (i32.load (i32.const 24)))
    (call $put (call $get (i32.load (i32.const 12)) (i32.const 24)))
    (call $put (call $get (i32.const 4000) (i32.const 24)))
    (call $put (call $get (i32.const 7) (i32.const 24)))
    (call $flush)
    (i32.const 1))"#
        ),
    );
    let mut instance = module.start(&BTreeMap::new()).unwrap();
    instance.configure(b"").unwrap();
    let log: Vec<&str> = instance.log().iter().map(|e| e.message.as_str()).collect();
    // Status `a` is OK, `b` NOT_FOUND, `c` BAD_ARGUMENT; ids e (4), i (8),
    // f (5), g (6); values l (11) and d (3).
    let want = [
        "aeaiafagc", // a new id per define: counters 4, 8; gauge 5; histogram 6; type 3 refused
        "accaacbc",  // counters take positive offsets only; gauges any; histograms none
        "aabb",      // record adds to a counter; unknown ids are NOT_FOUND
        "aladcbc",   // counter 1 + 10 through either id; gauge 5 - 2; no get for histograms
    ];
    assert_eq!(log, want);
    let metrics = instance.metrics();
    let want = BTreeMap::from([
        ("c".to_string(), (MetricType::Counter, 11)),
        ("g".to_string(), (MetricType::Gauge, 3)),
        ("h".to_string(), (MetricType::Histogram, 1)),
    ]);
    assert_eq!(metrics, want);
    assert_eq!(instance.histogram("h"), Some(&[3][..]));
    assert!(instance.unimplemented_calls().is_empty());
    assert_eq!(instance.host_calls().get("proxy_define_metric"), 5);
}

#[test]
fn set_property_fills_the_streams_filter_state() {
    let module = wat(
        r#"(import "env" "proxy_set_property" (func $set (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_property" (func $get (param i32 i32 i32 i32) (result i32)))"#,
        &format!(
            r#"{PUT}
  (data (i32.const 100) "k") (data (i32.const 110) "first") (data (i32.const 120) "second")
  (data (i32.const 130) "a\00b")
  (func (export "proxy_on_configure") (param i32 i32) (result i32)
    ;; no stream: NOT_FOUND, as in Envoy
    (call $put (call $set (i32.const 100) (i32.const 1) (i32.const 110) (i32.const 5)))
    (call $flush)
    (i32.const 1))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (call $put (call $set (i32.const 100) (i32.const 1) (i32.const 110) (i32.const 5)))
    (call $put (call $set (i32.const 100) (i32.const 1) (i32.const 120) (i32.const 6)))
    (call $put (call $set (i32.const 130) (i32.const 3) (i32.const 110) (i32.const 5)))
    (call $put (call $get (i32.const 100) (i32.const 1) (i32.const 200) (i32.const 204)))
    (call $flush)
    (drop (call $log (i32.const 2) (i32.load (i32.const 200)) (i32.load (i32.const 204))))
    (i32.const 0))"#
        ),
    );
    let mut instance = module.start(&BTreeMap::new()).unwrap();
    instance.configure(b"").unwrap();
    assert!(instance.filter_state().is_none(), "no request yet");
    let outcome = instance.request_stream(None, &headers(&[(":path", "/")])).unwrap();
    assert!(matches!(outcome, Handled::Forwarded { .. }));
    let want =
        BTreeMap::from([("wasm.a\0b".to_string(), b"first".to_vec()), ("wasm.k".to_string(), b"second".to_vec())]);
    assert_eq!(instance.filter_state(), Some(&want), "the open stream's");
    instance.finish().unwrap();
    assert_eq!(instance.filter_state(), Some(&want), "the finished stream's");
    assert_eq!(instance.log_text(), "b\naaaa\nsecond");
    assert!(instance.missing_properties().is_empty());

    instance.request_stream(None, &headers(&[(":path", "/")])).unwrap();
    assert_eq!(instance.filter_state().map(BTreeMap::len), Some(2), "a new stream starts empty and is filled again");
}
