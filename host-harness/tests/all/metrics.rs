//! The filter's metrics and access-log field through the harness: after a
//! known mix of requests, every series the filter defined holds exactly the
//! expected value, and each request set exactly its `wasm.keyswap` field.

use std::collections::BTreeMap;
use std::time::{Duration, UNIX_EPOCH};

use keyswap_harness::{FilterInstance, Handled, MetricType};

use crate::filter;

const CONFIG: &str = r#"{
  "clients": [
    {"id": "team-a", "key": "team-a-key", "routes": ["openai"]},
    {"id": "team-b", "key": "team-b-key", "routes": ["*"]},
    {"id": "old-bot", "key": "old-bot-key", "routes": ["*"], "disabled": true},
    {"id": "expired-bot", "key": "expired-bot-key", "routes": ["*"], "expires": "2026-01-01T00:00:00Z"}
  ],
  "routes": [
    {"name": "openai", "match": {"route_name": "openai", "clusters": ["openai"]},
     "inject": [{"header": "authorization", "prefix": "Bearer ", "value": {"inline": "sk-up-openai"}}]},
    {"name": "anthropic", "match": {"route_name": "anthropic", "clusters": ["anthropic"]},
     "inject": [{"header": "x-api-key", "value": {"inline": "sk-up-anthropic"}}]}
  ],
  "metrics": {"per_client": true}
}"#;

const REQUESTS: &str = "keyswap_requests_total";
const REASONS: [&str; 6] =
    ["missing_key", "invalid_key", "expired_key", "ambiguous_key", "route_forbidden", "method_not_allowed"];

fn requests(route: &str, outcome: &str, reason: &str) -> String {
    format!("{REQUESTS};route={route};outcome={outcome};reason={reason}")
}

fn client(client: &str, route: &str) -> String {
    format!("keyswap_client_requests_total;client={client};route={route}")
}

/// A request on Envoy route `route_name` to `path` with `headers`.
fn send(instance: &mut FilterInstance, route_name: Option<&str>, path: &str, headers: &[(&str, &str)]) -> Handled {
    let mut list: Vec<(String, Vec<u8>)> =
        [(":authority", "gw"), (":method", "GET"), (":scheme", "http"), (":path", path)]
            .iter()
            .chain(headers)
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
            .collect();
    list.retain(|(n, _)| !n.is_empty());
    let outcome = instance.request(route_name, &list).unwrap();
    instance.finish().unwrap();
    outcome
}

fn configured() -> FilterInstance {
    let mut instance = filter().start(&BTreeMap::new()).unwrap();
    // Fixed, so that the expired client is expired and the audit lines'
    // per-second limit never resets mid-test.
    instance.clock().set(UNIX_EPOCH + Duration::from_secs(1_800_000_000));
    instance.configure(CONFIG.as_bytes()).unwrap();
    instance
}

#[test]
fn a_known_mix_of_requests_gives_exact_metrics_and_access_log_fields() {
    let mut instance = configured();
    let defined = instance.metrics();
    assert!(
        defined.keys().any(|name| name.starts_with(REQUESTS)),
        "the filter defines no {REQUESTS} metrics (it defined {defined:?}): is KEYSWAP_FILTER an old build? \
         (scripts/build-filter builds this workspace's)"
    );

    // (request, access-log field, the one requests_total series it counts)
    let bearer = |key: &'static str| ("authorization", Box::leak(format!("Bearer {key}").into_boxed_str()) as &str);
    let mix: Vec<(Option<&str>, &str, Vec<(&str, &str)>, &str, String)> = vec![
        (
            Some("openai"),
            "/v1/models",
            vec![bearer("team-a-key")],
            "outcome=allowed reason=- route=openai client=team-a",
            requests("openai", "allowed", ""),
        ),
        (
            Some("openai"),
            "/v1/chat",
            vec![bearer("team-a-key")],
            "outcome=allowed reason=- route=openai client=team-a",
            requests("openai", "allowed", ""),
        ),
        (
            Some("openai"),
            "/v1/chat",
            vec![("x-api-key", "team-b-key")],
            "outcome=allowed reason=- route=openai client=team-b",
            requests("openai", "allowed", ""),
        ),
        (
            Some("openai"),
            "/v1/models",
            vec![],
            "outcome=denied reason=missing_key route=openai client=-",
            requests("openai", "denied", "missing_key"),
        ),
        (
            Some("openai"),
            "/v1/models",
            vec![],
            "outcome=denied reason=missing_key route=openai client=-",
            requests("openai", "denied", "missing_key"),
        ),
        (
            Some("openai"),
            "/v1/models",
            vec![bearer("not-a-key")],
            "outcome=denied reason=invalid_key route=openai client=-",
            requests("openai", "denied", "invalid_key"),
        ),
        (
            Some("openai"),
            "/v1/models",
            vec![bearer("old-bot-key")],
            "outcome=denied reason=invalid_key route=openai client=old-bot",
            requests("openai", "denied", "invalid_key"),
        ),
        (
            Some("openai"),
            "/v1/models",
            vec![bearer("expired-bot-key")],
            "outcome=denied reason=expired_key route=openai client=expired-bot",
            requests("openai", "denied", "expired_key"),
        ),
        (
            Some("openai"),
            "/v1/models",
            vec![bearer("team-a-key"), ("x-api-key", "team-b-key")],
            "outcome=denied reason=ambiguous_key route=openai client=-",
            requests("openai", "denied", "ambiguous_key"),
        ),
        (
            Some("anthropic"),
            "/anthropic/v1/messages",
            vec![bearer("team-a-key")],
            "outcome=denied reason=route_forbidden route=anthropic client=team-a",
            requests("anthropic", "denied", "route_forbidden"),
        ),
        (
            Some("anthropic"),
            "/anthropic/v1/messages",
            vec![("x-api-key", "team-b-key")],
            "outcome=allowed reason=- route=anthropic client=team-b",
            requests("anthropic", "allowed", ""),
        ),
        (
            None,
            "/elsewhere",
            vec![bearer("team-b-key")],
            "outcome=denied reason=no_route route=- client=-",
            requests("", "denied", "no_route"),
        ),
    ];
    for (i, (route_name, path, headers, field, series)) in mix.iter().enumerate() {
        let before = instance.metrics();
        let outcome = send(&mut instance, *route_name, path, headers);
        let allowed = matches!(outcome, Handled::Forwarded { .. });
        assert_eq!(allowed, field.starts_with("outcome=allowed"), "request {i}: {outcome:?}");

        // The access-log field, and the first stage's record for the final
        // one: the presented key's SHA-256, or why there is none; never the
        // key.
        let state = instance.filter_state().expect("a finished stream");
        let names: Vec<&str> = state.keys().map(String::as_str).collect();
        assert_eq!(names, ["wasm.keyswap", "wasm.keyswap_key"], "request {i}");
        assert_eq!(String::from_utf8_lossy(&state["wasm.keyswap"]), *field, "request {i}: the access-log field");
        let record = keyswap_policy::KeyCheck::decode(&state["wasm.keyswap_key"]);
        assert!(record.is_some(), "request {i}: the key record");

        // Exactly one requests_total series moved, by one (plus the client's
        // series for an allowed request).
        let after = instance.metrics();
        let moved: BTreeMap<&String, u64> = after
            .iter()
            .filter_map(|(name, (_, value))| {
                let old = before.get(name).map_or(0, |(_, v)| *v);
                (*value != old).then_some((name, value - old))
            })
            .collect();
        let mut want = BTreeMap::from([(series, 1)]);
        let client_series = field.split(' ').find_map(|kv| kv.strip_prefix("client=")).filter(|_| allowed);
        let route = field.split(' ').find_map(|kv| kv.strip_prefix("route=")).unwrap_or_default();
        let client_name = client_series.map(|c| client(c, route));
        if let Some(name) = &client_name {
            want.insert(name, 1);
        }
        assert_eq!(moved, want, "request {i}: the series it counted");
        let calls = instance.last_request_host_calls().expect("a finished stream");
        assert_eq!(calls.get("proxy_increment_metric"), want.len() as u64, "request {i}");
        assert_eq!(calls.get("proxy_set_property"), 2, "request {i}: the key record and the access-log field");
    }

    // Every series the filter defined, with its exact value.
    let counter = |n: u64| (MetricType::Counter, n);
    let mut want: BTreeMap<String, (MetricType, u64)> = BTreeMap::new();
    for route in ["openai", "anthropic"] {
        want.insert(requests(route, "allowed", ""), counter(0));
        for reason in REASONS {
            want.insert(requests(route, "denied", reason), counter(0));
        }
    }
    for (name, value) in [
        (requests("openai", "allowed", ""), 3),
        (requests("openai", "denied", "missing_key"), 2),
        (requests("openai", "denied", "invalid_key"), 2),
        (requests("openai", "denied", "expired_key"), 1),
        (requests("openai", "denied", "ambiguous_key"), 1),
        (requests("anthropic", "allowed", ""), 1),
        (requests("anthropic", "denied", "route_forbidden"), 1),
        (requests("", "denied", "no_route"), 1),
        (client("team-a", "openai"), 2),
        (client("team-b", "openai"), 1),
        (client("team-b", "anthropic"), 1),
    ] {
        want.insert(name, counter(value));
    }
    let version = keyswap_policy::content_version(CONFIG.as_bytes());
    want.insert("keyswap_active_clients".into(), (MetricType::Gauge, 2));
    want.insert("keyswap_routes".into(), (MetricType::Gauge, 2));
    want.insert("keyswap_refusing_all".into(), (MetricType::Gauge, 0));
    want.insert(format!("keyswap_config_info;version={version}"), (MetricType::Gauge, 1));
    assert_eq!(instance.metrics(), want);

    // Every denial wrote an audit line (fewer than the per-second limit),
    // and nothing the filter logged or counted holds a key or a credential.
    let denials = instance.log().iter().filter(|e| e.message.starts_with("keyswap: denied ")).count();
    assert_eq!(denials, 8);
    let everything = format!("{}\n{:?}", instance.log_text(), instance.metrics());
    for secret in ["team-a-key", "team-b-key", "old-bot-key", "expired-bot-key", "not-a-key", "sk-up-"] {
        assert!(!everything.contains(secret), "{secret} leaked");
    }
    assert!(instance.unimplemented_calls().is_empty(), "{:?}", instance.unimplemented_calls());
}

#[test]
fn a_new_configuration_keeps_the_counts_and_sets_the_gauges_again() {
    // As in Envoy, where stats outlive a configuration: the same names are
    // defined again (new ids), and counting goes on.
    let mut instance = configured();
    send(&mut instance, Some("openai"), "/", &[("x-api-key", "team-b-key")]);
    let revoked =
        CONFIG.replace(r#""team-b-key", "routes": ["*"]"#, r#""team-b-key", "routes": ["*"], "disabled": true"#);
    assert_ne!(revoked, CONFIG);
    instance.configure(revoked.as_bytes()).unwrap();
    send(&mut instance, Some("openai"), "/", &[("x-api-key", "team-b-key")]);
    let metrics = instance.metrics();
    assert_eq!(metrics[&requests("openai", "allowed", "")], (MetricType::Counter, 1));
    assert_eq!(metrics[&requests("openai", "denied", "invalid_key")], (MetricType::Counter, 1));
    assert_eq!(metrics["keyswap_active_clients"], (MetricType::Gauge, 1));
    let new_version = keyswap_policy::content_version(revoked.as_bytes());
    assert_eq!(metrics[&format!("keyswap_config_info;version={new_version}")], (MetricType::Gauge, 1));
}
