//! Dynamic credentials through the real filter on a controlled clock:
//! what the conformance steps cannot say (logs, host calls, metrics).

use std::collections::BTreeMap;
use std::time::{Duration, UNIX_EPOCH};

use keyswap_harness::{Clock, FilterInstance, Handled, HeaderList, LogLevel, SharedData};

const SECRET: &str = "idp-secret-never-logged";

const CONFIG: &str = r#"{
  "clients": [{"id": "app", "key": "app-key", "routes": ["*"]}],
  "key_sources": [{"header": "x-api-key"}],
  "routes": [
    {"name": "static", "match": {"route_name": "static", "clusters": ["static"]}, "inject": [{"header": "x-up", "value": {"inline": "s"}}]},
    {"name": "orders", "match": {"route_name": "orders", "clusters": ["orders"]},
     "inject": [{"header": "authorization", "prefix": "Bearer ",
                 "value": {"oauth2": {"cluster": "idp", "token_path": "/token", "client_id": {"inline": "gw"},
                                      "client_secret": {"env": "IDP_SECRET"}}}}]}]}"#;

fn worker(shared: &SharedData, clock: &Clock) -> FilterInstance {
    let env = BTreeMap::from([("IDP_SECRET".to_string(), SECRET.to_string())]);
    let mut w = crate::filter().start_worker(&env, shared, clock).unwrap();
    w.configure(CONFIG.as_bytes()).unwrap();
    w
}

fn at(clock: &Clock, ms: u64) {
    clock.set(UNIX_EPOCH + Duration::from_secs(1_800_000_000) + Duration::from_millis(ms));
}

fn answer(w: &mut FilterInstance, status: u16, body: &str) {
    let token = w.pending_calls().first().expect("a pending call").token;
    let headers: HeaderList = vec![(":status".into(), status.to_string().into_bytes())];
    w.answer_call(token, Some((headers, body.as_bytes().to_vec()))).unwrap();
}

/// A request on Envoy route `route` (sent to the cluster of that name).
fn request(w: &mut FilterInstance, route: &str, path: &str) -> Handled {
    let headers: Vec<(String, Vec<u8>)> =
        [(":method", "GET"), (":path", path), (":authority", "a"), ("x-api-key", "app-key")]
            .iter()
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
            .collect();
    w.request(Some(route), &headers).unwrap()
}

#[test]
fn a_failure_streak_logs_once_and_never_a_secret() {
    let (shared, clock) = (SharedData::default(), Clock::real());
    at(&clock, 0);
    let mut w = worker(&shared, &clock);
    assert_eq!(w.tick_period(), Some(Duration::from_millis(500)));
    w.tick().unwrap();
    answer(&mut w, 200, r#"{"access_token":"tok-secret-1","expires_in":120}"#);
    // Five failures in a row: 500, not JSON, timeout, 401, no token.
    let mut t = 60_000;
    for (i, failure) in ["500", "text", "timeout", "401", "empty"].iter().enumerate() {
        at(&clock, t);
        w.tick().unwrap();
        assert_eq!(w.pending_calls().len(), 1, "failure {i}");
        match *failure {
            "500" => answer(&mut w, 500, r#"{"access_token":"tok-secret-2"}"#),
            "text" => answer(&mut w, 200, "tok-secret-3"),
            "timeout" => {
                let token = w.pending_calls()[0].token;
                w.answer_call(token, None).unwrap();
            }
            "401" => answer(&mut w, 401, r#"{"error":"invalid_client","client_secret":"tok-secret-4"}"#),
            _ => answer(&mut w, 200, r#"{"access_token":""}"#),
        }
        t += 1000 << i.min(5);
    }
    at(&clock, t);
    w.tick().unwrap();
    answer(&mut w, 200, r#"{"access_token":"tok-secret-5","expires_in":120}"#);
    let lines: Vec<(LogLevel, String)> =
        w.log().iter().filter(|e| e.message.contains("credential")).map(|e| (e.level, e.message.clone())).collect();
    let path = "keyswap: credential routes[1].inject[0].value.oauth2 (oauth2)";
    assert_eq!(
        lines,
        [
            (LogLevel::Info, format!("{path}: first value fetched")),
            (LogLevel::Warn, format!("{path}: refresh failed: the token endpoint answered status 500; keeping the last good value until it expires; retrying with backoff")),
            (LogLevel::Info, format!("{path}: refreshed again after 5 failed attempts")),
        ]
    );
    let everything = format!("{}\n{:?}", w.log_text(), w.metrics());
    for secret in [SECRET, "tok-secret", "Z3c6"] {
        assert!(!everything.contains(secret), "{secret} leaked:\n{everything}");
    }
    match request(&mut w, "orders", "/v1") {
        Handled::Forwarded { headers } => {
            assert!(headers.contains(&("authorization".to_string(), b"Bearer tok-secret-5".to_vec())));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn static_routes_make_no_credential_host_calls_and_denials_are_counted() {
    let (shared, clock) = (SharedData::default(), Clock::real());
    at(&clock, 0);
    let mut w = worker(&shared, &clock);
    assert!(matches!(request(&mut w, "static", "/static/x"), Handled::Forwarded { .. }));
    w.finish().unwrap();
    let calls = w.last_request_host_calls().unwrap();
    assert_eq!((calls.get("proxy_get_shared_data"), calls.get("proxy_get_current_time_nanoseconds")), (0, 0));
    // Before the first token: 503, counted under its reason.
    let Handled::Local(local) = request(&mut w, "orders", "/v1") else { panic!("not refused") };
    assert_eq!(local.status, 503);
    let calls = w.last_request_host_calls().unwrap();
    assert_eq!(calls.get("proxy_get_shared_data"), 1, "one read per credential source");
    let metrics = w.metrics();
    let series = "keyswap_requests_total;route=orders;outcome=denied;reason=credential_unavailable";
    assert_eq!(metrics.get(series).map(|(_, v)| *v), Some(1));
    // Static routes have no such series.
    assert!(!metrics.keys().any(|k| k.contains("route=static") && k.contains("credential_unavailable")));
}

/// A 401 from the upstream: one line naming the route and the credential's
/// path (never the token), one count, no host call on a 200, and a static
/// route reads neither the clock nor shared data for its response.
#[test]
fn a_rejected_token_is_logged_by_path_and_counted() {
    let (shared, clock) = (SharedData::default(), Clock::real());
    at(&clock, 0);
    let mut w = worker(&shared, &clock);
    w.tick().unwrap();
    answer(&mut w, 200, r#"{"access_token":"tok-secret-1","expires_in":300}"#);
    let status = |code: &str| -> HeaderList { vec![(":status".into(), code.as_bytes().to_vec())] };
    let series = "keyswap_credential_rejected_total;route=orders";
    assert_eq!(w.metrics().get(series).map(|(_, v)| *v), Some(0));
    assert!(!w.metrics().keys().any(|k| k.contains("rejected") && k.contains("route=static")));

    // A 200 reads nothing more than the reflections do.
    assert!(matches!(request(&mut w, "orders", "/v1"), Handled::Forwarded { .. }));
    w.response(&status("200")).unwrap();
    let calls = w.last_request_host_calls().unwrap();
    assert_eq!(calls.get("proxy_set_shared_data"), 0);
    // A static route's 401 touches no record.
    assert!(matches!(request(&mut w, "static", "/static/x"), Handled::Forwarded { .. }));
    w.response(&status("401")).unwrap();
    let calls = w.last_request_host_calls().unwrap();
    assert_eq!((calls.get("proxy_get_shared_data"), calls.get("proxy_set_shared_data")), (0, 0));

    at(&clock, 1000);
    assert!(matches!(request(&mut w, "orders", "/v1"), Handled::Forwarded { .. }));
    w.response(&status("401")).unwrap();
    assert_eq!(w.metrics().get(series).map(|(_, v)| *v), Some(1));
    let lines: Vec<(LogLevel, String)> =
        w.log().iter().filter(|e| e.message.contains("401")).map(|e| (e.level, e.message.clone())).collect();
    assert_eq!(
        lines,
        [(
            LogLevel::Warn,
            "keyswap: route orders: credential routes[1].inject[0].value.oauth2 (oauth2): the upstream answered 401 \
             to it; replacing it, fetching a new one"
                .to_string()
        )]
    );
    // Kept until replaced: one client's 401 never cuts the others off.
    assert!(matches!(request(&mut w, "orders", "/v1"), Handled::Forwarded { .. }), "the route must keep serving");
    w.tick().unwrap();
    answer(&mut w, 200, r#"{"access_token":"tok-secret-2","expires_in":300}"#);
    assert!(w.log_text().contains("new value fetched after the upstream rejected the last one"));
    let everything = format!("{}\n{:?}", w.log_text(), w.metrics());
    assert!(!everything.contains("tok-secret"), "{everything}");
}
