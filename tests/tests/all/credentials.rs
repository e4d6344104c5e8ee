//! Dynamic credentials in the real Envoy: an `oauth2` route whose token
//! comes from a local token server (loopback, `keyswap_tests::token`)
//! through an Envoy cluster, refreshed by the filter's root context on its
//! timer; and an upstream that answers 401 to a token
//! (`keyswap_tests::rejecting`), which keyswap goes on sending until it has
//! fetched a new one (and drops if that fetch fails).
//! Times are bounded by polling, never by a fixed sleep before an
//! assertion, and timing bounds leave room for a loaded 2-core CI machine
//! (Envoy's ticks and answers run late there) while staying well inside
//! what a wrong behaviour would give (a refresh period, a token's life).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use keyswap_tests::echo::{Echo, Echoed};
use keyswap_tests::envoy::{filter_wasm, gateway, Envoy, Launch, Listener, ROUTE_HEADER};
use keyswap_tests::http::{Request, Response};
use keyswap_tests::rejecting::Rejecting;
use keyswap_tests::revocation::{main_thread, parse_log};
use keyswap_tests::token::TokenServer;

const KEY: &str = "dyn-client-key";
const CLIENT_SECRET: &str = "idp-client-secret-value";

/// The listener's Envoy routes (each sent to the cluster of its name) that
/// the configurations here bind: `/billing/…` and `/signed/…` go to routes
/// `billing` and `signed`, anything else to `orders` ([`route_of`]).
const ROUTES: [&str; 3] = ["orders", "billing", "signed"];

/// The Envoy route a request to `path` takes here.
fn route_of(path: &str) -> &'static str {
    ROUTES.into_iter().find(|r| path.starts_with(&format!("/{r}/"))).unwrap_or("orders")
}

fn config() -> String {
    config_with_timeout(1000)
}

/// [`config`] with the token call's `timeout_ms`.
fn config_with_timeout(timeout_ms: u64) -> String {
    serde_json::json!({
        "clients": [{"id": "app", "key": KEY, "routes": ["*"]}],
        "key_sources": [{"header": "x-api-key"}],
        "routes": [{"name": "orders", "match": {"route_name": "orders", "clusters": ["orders"]},
                    "inject": [{"header": "authorization", "prefix": "Bearer ",
                                "value": {"oauth2": {"cluster": "idp", "token_path": "/oauth/token",
                                                     "authority": "idp.test", "client_id": {"inline": "gw"},
                                                     "client_secret": {"env": "IDP_SECRET"},
                                                     "scopes": ["orders"], "timeout_ms": timeout_ms}}}]}]
    })
    .to_string()
}

fn answer(token: &str, expires_in: u64) -> String {
    serde_json::json!({"access_token": token, "token_type": "Bearer", "expires_in": expires_in}).to_string()
}

/// Echo upstream and Envoy (`workers` workers) with the `idp` cluster
/// pointing at `token`.
pub fn start(token: &TokenServer, workers: u32) -> (Echo, Envoy) {
    let env = BTreeMap::from([("IDP_SECRET".to_string(), CLIENT_SECRET.to_string())]);
    start_with(config(), env, &[("idp", token)], workers)
}

/// Echo upstream and Envoy running `config`, with a cluster per
/// `(name, server)`.
pub fn start_with(
    config: String,
    env: BTreeMap<String, String>,
    clusters: &[(&str, &TokenServer)],
    workers: u32,
) -> (Echo, Envoy) {
    let echo = Echo::start("127.0.0.1:0").expect("echo");
    let envoy = start_at(config, env, clusters, echo.addr(), workers);
    (echo, envoy)
}

/// Envoy running `config` with its routes' clusters reaching `upstream`
/// and a cluster per `(name, server)`.
pub fn start_at(
    config: String,
    env: BTreeMap<String, String>,
    clusters: &[(&str, &TokenServer)],
    upstream: SocketAddr,
    workers: u32,
) -> Envoy {
    let route_names = ROUTES.iter().map(|r| r.to_string()).collect();
    let listener = Listener { name: "dyn".into(), config, env, route_names, ..Listener::default() };
    start_listener(listener, clusters, upstream, workers)
}

/// Envoy (`workers` workers) serving `listener`, its routes' clusters
/// reaching `upstream`, and a cluster per `(name, server)`.
pub fn start_listener(
    listener: Listener,
    clusters: &[(&str, &TokenServer)],
    upstream: SocketAddr,
    workers: u32,
) -> Envoy {
    let wasm = filter_wasm().unwrap_or_else(|e| panic!("{e}"));
    let mut bootstrap = gateway(std::slice::from_ref(&listener), upstream, &wasm);
    for (name, server) in clusters {
        bootstrap["static_resources"]["clusters"].as_array_mut().expect("clusters").push(token_cluster(name, server));
    }
    let launch = Launch {
        file_name: "envoy.json".into(),
        text: bootstrap.to_string(),
        expect_configs: vec![listener.config],
        ..Launch::default()
    };
    Envoy::start_workers(&launch, workers).unwrap_or_else(|e| panic!("Envoy starts: {e}"))
}

/// The Envoy cluster `name`, pointing at `server`.
pub fn token_cluster(name: &str, server: &TokenServer) -> serde_json::Value {
    serde_json::json!({
        "name": name, "type": "STATIC", "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address":
            {"socket_address": {"address": "127.0.0.1", "port_value": server.addr().port()}}}}]}]}
    })
}

/// One request; `Ok(bearer)` when forwarded (the upstream's
/// `authorization`), `Err(response)` when answered by Envoy.
pub fn send(envoy: &Envoy) -> Result<String, Response> {
    send_to(envoy, "/v1/orders").map(|e| e.header("authorization").unwrap_or_default().to_string())
}

/// One request to `path`; the upstream's view when forwarded.
pub fn send_to(envoy: &Envoy, path: &str) -> Result<Echoed, Response> {
    let addr = envoy.listener("dyn").expect("listener");
    let request = Request::get(path).header("host", "api.test").header(ROUTE_HEADER, route_of(path));
    let response = request.header("x-api-key", KEY).send(addr).expect("request");
    if response.status != 200 {
        return Err(response);
    }
    Ok(Echoed::parse(&response.body).expect("echo JSON"))
}

/// What keyswap itself logged (Envoy's own debug lines print headers and
/// the configuration, the test's secrets included: that is Envoy's `-l
/// debug`, not keyswap).
pub fn keyswap_lines(log: &str) -> String {
    log.lines().filter(|l| l.contains("wasm log")).collect::<Vec<_>>().join("\n")
}

pub fn unavailable(response: &Response) -> bool {
    response.status == 503 && String::from_utf8_lossy(&response.body).contains("\"credential_unavailable\"")
}

/// Polls requests every 20 ms until one is forwarded with `bearer`; every
/// other answer must be a 503 `credential_unavailable` or a forward with
/// one of `allowed`. Returns when it was seen.
pub fn wait_for(envoy: &Envoy, bearer: &str, allowed: &[&str], within: Duration) -> Instant {
    let deadline = Instant::now() + within;
    loop {
        match send(envoy) {
            Ok(seen) if seen == bearer => return Instant::now(),
            Ok(seen) => assert!(allowed.contains(&seen.as_str()), "unexpected credential {seen:?}"),
            Err(r) => assert!(unavailable(&r), "unexpected answer {} {:?}", r.status, String::from_utf8_lossy(&r.body)),
        }
        assert!(Instant::now() < deadline, "{bearer:?} not injected within {within:?}\n{}", envoy.log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_first_request_waits_no_longer_than_the_first_refresh() {
    let token = TokenServer::start(&answer("tok-1", 3600)).expect("token server");
    let (_echo, envoy) = start(&token, 2);
    let ready = Instant::now();
    let seen = wait_for(&envoy, "Bearer tok-1", &[], Duration::from_secs(10));
    let calls = token.calls();
    assert_eq!(calls.len(), 1, "one token call for the first token: {calls:?}");
    let call = &calls[0];
    // The grant as RFC 6749 4.4 has it, the client authenticated with Basic.
    assert_eq!((call.method.as_str(), call.path.as_str()), ("POST", "/oauth/token"));
    assert_eq!(call.body, "grant_type=client_credentials&scope=orders");
    let basic = call.headers.iter().find(|(n, _)| n == "authorization").map(|(_, v)| v.as_str());
    assert_eq!(basic, Some("Basic Z3c6aWRwLWNsaWVudC1zZWNyZXQtdmFsdWU="));
    // The first call follows the first tick (500 ms) after Envoy is ready,
    // not a refresh period or a request; the token is in use right after
    // it is answered, not at a later refresh. (Nominal: 500 ms and one
    // 20 ms poll; the bounds are for a loaded machine.)
    let first_call = call.at.saturating_duration_since(ready);
    assert!(first_call < Duration::from_millis(3000), "first call {first_call:?} after Envoy was ready");
    let after_call = seen.saturating_duration_since(call.at);
    assert!(after_call < Duration::from_millis(1500), "token in use {after_call:?} after its call");
    let log = envoy.log();
    assert!(
        log.contains("keyswap: credential routes[0].inject[0].value.oauth2 (oauth2): first value fetched"),
        "{log}"
    );
    let ours = keyswap_lines(&log);
    assert!(!ours.contains("tok-1") && !ours.contains(CLIENT_SECRET) && !ours.contains("Z3c6"), "{ours}");
}

#[test]
fn a_rotated_token_is_used_after_the_next_refresh_and_expires_in_is_honoured() {
    // expires_in 4 s: refreshed half-way, every 2 s.
    let token = TokenServer::start(&answer("tok-1", 4)).expect("token server");
    let (_echo, envoy) = start(&token, 2);
    let first = wait_for(&envoy, "Bearer tok-1", &[], Duration::from_secs(10));
    token.set_answer(&answer("tok-2", 4));
    let rotated = wait_for(&envoy, "Bearer tok-2", &["Bearer tok-1"], Duration::from_secs(10));
    let calls = token.calls();
    assert_eq!(calls.len(), 2, "one call per refresh: {:?}", calls.iter().map(|c| c.at).collect::<Vec<_>>());
    // Due 2 s after the first answer was parsed, picked up at the next
    // 500 ms tick: nominally 2.0-2.5 s; never early, and well before the
    // token's 4 s life runs out.
    let gap = calls[1].at.saturating_duration_since(calls[0].at);
    assert!(
        gap >= Duration::from_millis(1500) && gap <= Duration::from_millis(3500),
        "refresh after {gap:?}, want ~2 s"
    );
    // The rotated token is in use right after its call, not a refresh later.
    let after_call = rotated.saturating_duration_since(calls[1].at);
    assert!(after_call < Duration::from_millis(1500), "tok-2 in use {after_call:?} after its call");
    assert!(rotated.saturating_duration_since(first) <= Duration::from_millis(5000));
}

#[test]
fn the_token_server_down_keeps_the_last_token_until_it_expires() {
    let token = TokenServer::start(&answer("tok-1", 6)).expect("token server");
    let (_echo, envoy) = start(&token, 2);
    // The filter counts expires_in from when it parsed the answer, which is
    // after the call reached the server (`called`) and before the token
    // was first in use (`first`).
    let first = wait_for(&envoy, "Bearer tok-1", &[], Duration::from_secs(10));
    let called = token.calls()[0].at;
    token.take_down();
    // Until expires_in (6 s) runs out, every request still gets tok-1
    // (sent until 5 s after the call: a late request has a second).
    while called.elapsed() < Duration::from_millis(5000) {
        assert_eq!(send(&envoy).map_err(|r| r.status), Ok("Bearer tok-1".to_string()));
        std::thread::sleep(Duration::from_millis(100));
    }
    // After it: 503 credential_unavailable, never the expired token.
    while first.elapsed() < Duration::from_millis(6300) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let refused = send(&envoy).expect_err("an expired token is not sent");
    assert!(unavailable(&refused), "{}", refused.status);
    assert_eq!(refused.header("retry-after"), Some("1"));
    let failed_calls = token.count() - 1;
    assert!((2..=4).contains(&failed_calls), "retried with backoff: {failed_calls} failed calls in ~3 s");
    // One log line for the whole failure streak, and no secret in the log.
    let log = envoy.log();
    let lines = log.lines().filter(|l| l.contains("refresh failed")).count();
    assert_eq!(lines, 1, "{log}");
    assert!(log.contains("the token endpoint answered status 503"), "{log}");
    let ours = keyswap_lines(&log);
    assert!(!ours.contains("tok-1") && !ours.contains(CLIENT_SECRET) && !ours.contains("Z3c6"), "{ours}");
    // Back up: the next retry brings a token again.
    token.set_answer(&answer("tok-2", 60));
    wait_for(&envoy, "Bearer tok-2", &[], Duration::from_secs(10));
    assert!(envoy.log().contains("refreshed again after"), "recovery logged");
}

#[test]
fn two_workers_make_one_token_call_per_refresh() {
    // expires_in 2 s: a refresh every second, raced for by both workers.
    let token = TokenServer::start(&answer("tok", 2)).expect("token server");
    let (_echo, envoy) = start(&token, 2);
    wait_for(&envoy, "Bearer tok", &[], Duration::from_secs(10));
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(6) {
        assert_eq!(send(&envoy).map_err(|r| r.status), Ok("Bearer tok".to_string()));
        std::thread::sleep(Duration::from_millis(50));
    }
    let window = started.elapsed();
    let calls = token.calls();
    let times: Vec<Duration> = calls.windows(2).map(|w| w[1].at.saturating_duration_since(w[0].at)).collect();
    // One call per refresh: consecutive calls are a refresh period apart,
    // never two for one refresh (which would be milliseconds apart).
    assert!(times.iter().all(|gap| *gap >= Duration::from_millis(700)), "calls too close: {times:?}");
    // Counted in the measured window: at most one a second (a refresh is
    // due 1 s after the previous answer), and at least one every 2 s (or
    // the 2 s token would have expired between them).
    let in_window = calls.iter().filter(|c| c.at >= started).count();
    let secs = usize::try_from(window.as_secs()).unwrap_or(usize::MAX);
    let (least, most) = ((secs / 2).saturating_sub(1), secs + 1);
    assert!((least..=most).contains(&in_window), "{in_window} calls in {window:?} at one refresh a second");
}

#[test]
fn token_exchange_and_a_credential_service_work_end_to_end() {
    let sts = TokenServer::start(&answer("te-token", 3600)).expect("sts");
    let vault = TokenServer::start(r#"{"data":{"key_id":"kid-1","secret":"sec-1"}}"#).expect("vault");
    let config = serde_json::json!({
        "clients": [{"id": "app", "key": KEY, "routes": ["*"]}],
        "key_sources": [{"header": "x-api-key"}],
        "routes": [
            {"name": "billing", "match": {"route_name": "billing", "clusters": ["billing"]},
             "inject": [{"header": "authorization", "prefix": "Bearer ",
                         "value": {"token_exchange": {"cluster": "sts", "token_path": "/token",
                                                      "subject_token": {"env": "SUBJECT"},
                                                      "audience": "https://billing.internal"}}}]},
            {"name": "signed", "match": {"route_name": "signed", "clusters": ["signed"]},
             "inject": [{"header": "x-key-id", "value": {"fetch": {"cluster": "vault", "path": "/v1/creds",
                                                                   "json_pointer": "/data/key_id", "refresh_seconds": 2}}},
                        {"header": "x-key-secret", "value": {"fetch": {"cluster": "vault", "path": "/v1/creds",
                                                                       "json_pointer": "/data/secret", "refresh_seconds": 2}}}]}
        ]
    })
    .to_string();
    let env = BTreeMap::from([("SUBJECT".to_string(), "gw-subject".to_string())]);
    let (_echo, envoy) = start_with(config, env, &[("sts", &sts), ("vault", &vault)], 2);
    let deadline = Instant::now() + Duration::from_secs(10);
    let billing = loop {
        match send_to(&envoy, "/billing/v1") {
            Ok(echoed) => break echoed,
            Err(r) => assert!(unavailable(&r) && Instant::now() < deadline, "{}", r.status),
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(billing.header("authorization"), Some("Bearer te-token"));
    let call = &sts.calls()[0];
    assert!(call.body.starts_with("grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange&audience=https%3A%2F%2Fbilling.internal&subject_token=gw-subject"), "{}", call.body);
    // Both values of the credential service come from one answer, and a
    // rotation replaces both at the next refresh (2 s).
    let pair = |e: &Echoed| (e.header("x-key-id").map(str::to_string), e.header("x-key-secret").map(str::to_string));
    let first = send_to(&envoy, "/signed/v1").map(|e| pair(&e)).map_err(|r| r.status);
    assert_eq!(first, Ok((Some("kid-1".into()), Some("sec-1".into()))));
    vault.set_answer(r#"{"data":{"key_id":"kid-2","secret":"sec-2"}}"#);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let seen = send_to(&envoy, "/signed/v1").map(|e| pair(&e)).map_err(|r| r.status);
        match seen {
            Ok((Some(id), Some(secret))) if id == "kid-2" => {
                assert_eq!(secret, "sec-2");
                break;
            }
            Ok((Some(id), Some(secret))) => {
                assert_eq!((id.as_str(), secret.as_str()), ("kid-1", "sec-1"), "a mixed set")
            }
            other => panic!("{other:?}"),
        }
        assert!(Instant::now() < deadline, "rotation not picked up");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(sts.count(), 1, "one exchange for a token valid an hour");
}

/// Refreshes among `calls`: calls less than half a refresh period (500 ms)
/// after the previous one belong to the same refresh (several workers
/// calling for it).
fn refreshes(calls: &[keyswap_tests::token::TokenCall]) -> u32 {
    let new = calls.windows(2).filter(|w| w[1].at.saturating_duration_since(w[0].at) >= Duration::from_millis(500));
    u32::from(!calls.is_empty()) + u32::try_from(new.count()).unwrap_or(u32::MAX)
}

/// The figures in docs/performance.md (`## Dynamic credentials`):
/// `cargo test -p keyswap-tests --test all credentials::figures -- --ignored --nocapture`.
#[test]
#[ignore = "measurement for docs/performance.md; run by hand"]
fn figures() {
    println!("| workers | refreshes seen in 10 s (1 s due, at 500 ms ticks) | token calls | calls per refresh | first token in use after ready | rotation seen after its call |");
    println!("|---|---|---|---|---|---|");
    for workers in [1u32, 2, 4] {
        let token = TokenServer::start(&answer("tok-1", 2)).expect("token server");
        let (_echo, envoy) = start(&token, workers);
        let ready = Instant::now();
        let first = wait_for(&envoy, "Bearer tok-1", &[], Duration::from_secs(10));
        let before = token.count();
        let window = Instant::now();
        token.set_answer(&answer("tok-2", 2));
        let rotated = wait_for(&envoy, "Bearer tok-2", &["Bearer tok-1"], Duration::from_secs(5));
        let rotation_call = token.calls().get(before).map(|c| c.at).unwrap_or(rotated);
        while window.elapsed() < Duration::from_secs(10) {
            let _ = send(&envoy);
            std::thread::sleep(Duration::from_millis(50));
        }
        let calls = token.calls().split_off(before);
        let refreshes = refreshes(&calls);
        let calls = calls.len();
        println!(
            "| {workers} | {refreshes} | {calls} | {:.2} | {} ms | {} ms |",
            calls as f64 / f64::from(refreshes),
            first.saturating_duration_since(ready).as_millis(),
            rotated.saturating_duration_since(rotation_call).as_millis()
        );
    }
}

/// keyswap's counter `keyswap_credential_rejected_total;route=ROUTE` in
/// Envoy's `/stats` (which names it `wasmcustom.…`; one value for all
/// workers); `None` when absent.
pub fn rejected_total(envoy: &Envoy, route: &str) -> Option<u64> {
    let stats = Request::get("/stats?filter=keyswap_credential_rejected_total")
        .header("host", "admin")
        .send(envoy.admin())
        .expect("/stats");
    let series = format!("keyswap_credential_rejected_total;route={route}");
    let text = stats.text();
    let found = text.lines().find_map(|l| l.rsplit_once(": ").filter(|(name, _)| name.ends_with(&series)));
    found.and_then(|(_, v)| v.trim().parse().ok())
}

/// The worker threads that opened a downstream stream (Envoy's debug line
/// `new stream`; the admin's run on the main thread) at or after `since`.
pub fn serving_workers(envoy: &Envoy, since: SystemTime) -> std::collections::BTreeSet<u64> {
    let lines = parse_log(&envoy.log());
    let main = main_thread(&lines);
    let streams = lines.iter().filter(|l| l.time >= since && l.text.ends_with("] new stream"));
    streams.filter(|l| Some(l.thread) != main).map(|l| l.thread).collect()
}

/// The upstream's own 401 (not one of keyswap's denials): the request was
/// forwarded with a value the upstream refuses.
pub fn upstream_401(response: &Response) -> bool {
    response.status == 401 && response.text().contains("\"invalid_token\"") && !response.text().contains("\"message\"")
}

/// What became of one request on `orders` while the upstream rejects a
/// token.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// Forwarded with this `authorization`, and echoed.
    Forwarded(String),
    /// Forwarded with the value the upstream rejects: its 401.
    Rejected,
    /// keyswap's `503 credential_unavailable`, `retry-after: 1`: nothing
    /// sent.
    Unavailable,
    /// Anything else (always a failure).
    Other(u16, String),
}

fn outcome(envoy: &Envoy) -> Outcome {
    match send(envoy) {
        Ok(bearer) => Outcome::Forwarded(bearer),
        Err(r) if upstream_401(&r) => Outcome::Rejected,
        Err(r) if unavailable(&r) && r.header("retry-after") == Some("1") => Outcome::Unavailable,
        Err(r) => Outcome::Other(r.status, r.text()),
    }
}

/// One request of [`poll`]: when it was sent, when answered, and how.
#[derive(Debug, Clone)]
struct Try {
    sent: Instant,
    answered: Instant,
    outcome: Outcome,
}

/// `senders` threads send one request after another (20 ms apart, a new
/// connection each, so either worker) until `done` holds for what all have
/// seen, or `within` passes (which fails the test). Returns every try, in
/// the order they were sent.
fn poll(envoy: &Envoy, senders: usize, within: Duration, done: impl Fn(&[Try]) -> bool + Sync) -> Vec<Try> {
    let tries = Mutex::new(Vec::new());
    let deadline = Instant::now() + within;
    std::thread::scope(|s| {
        for _ in 0..senders {
            s.spawn(|| loop {
                let sent = Instant::now();
                let got = outcome(envoy);
                let answered = Instant::now();
                let mut all = tries.lock().expect("tries");
                all.push(Try { sent, answered, outcome: got });
                if done(&all) || Instant::now() > deadline {
                    return;
                }
                drop(all);
                std::thread::sleep(Duration::from_millis(20));
            });
        }
    });
    let mut tries = tries.into_inner().expect("tries");
    assert!(done(&tries), "not done within {within:?}: {:?}\n{}", outcomes(&tries), envoy.log());
    tries.sort_by_key(|t| t.sent);
    tries
}

fn outcomes(tries: &[Try]) -> Vec<&Outcome> {
    tries.iter().map(|t| &t.outcome).collect()
}

fn count(tries: &[Try], outcome: &Outcome) -> usize {
    tries.iter().filter(|t| t.outcome == *outcome).count()
}

#[test]
fn a_token_the_upstream_answers_401_to_is_sent_until_replaced_refetched_once_and_dropped_if_that_fails() {
    const BURST: usize = 12;
    let token = TokenServer::start_numbered(&answer("tok-{n}", 3600)).expect("token server");
    let upstream = Rejecting::start().expect("upstream");
    let env = BTreeMap::from([("IDP_SECRET".to_string(), CLIENT_SECRET.to_string())]);
    // A token call may take 5 s: the token server holds one below.
    let envoy = start_at(config_with_timeout(5000), env, &[("idp", &token)], upstream.addr(), 2);
    assert_eq!(rejected_total(&envoy, "orders"), Some(0), "the counter is defined at 0");
    wait_for(&envoy, "Bearer tok-1", &[], Duration::from_secs(15));
    // A second of tok-1 on both workers: the 503s before it fall in an
    // earlier second of the rate limit keyswap's 401 line shares with the
    // denial lines, so that line is written below.
    let warm = Instant::now();
    while warm.elapsed() < Duration::from_millis(1100) {
        assert_eq!(outcome(&envoy), Outcome::Forwarded("Bearer tok-1".into()));
        std::thread::sleep(Duration::from_millis(20));
    }

    // 1. tok-1 revoked under load: twelve requests carrying it, held by
    // the upstream until all are in flight on Envoy's two workers, all
    // answered 401. The next token call is held by the token server.
    token.hold();
    upstream.reject("Bearer tok-1", BURST);
    let burst_at = SystemTime::now();
    let burst: Vec<Outcome> = std::thread::scope(|s| {
        let senders: Vec<_> = (0..BURST).map(|_| s.spawn(|| outcome(&envoy))).collect();
        senders.into_iter().map(|t| t.join().expect("sender")).collect()
    });
    assert!(burst.iter().all(|o| *o == Outcome::Rejected), "every burst request answered 401: {burst:?}");
    assert_eq!(upstream.rejected(), BURST, "tok-1 reached the upstream once per request");
    let first_401 = upstream.first_rejected_at().expect("a 401 answered");
    assert_eq!(serving_workers(&envoy, burst_at).len(), 2, "both workers served the burst");

    // 2. The refresh is due at once: the next tick (500 ms; bounds for a
    // loaded machine) makes one call for all those 401s on both workers.
    // While it is in flight tok-1 is kept, and sent, on either worker
    // (the upstream answers 401 to each; keyswap never answers 503).
    let deadline = Instant::now() + Duration::from_secs(5);
    while token.count() < 2 {
        assert!(Instant::now() < deadline, "no forced refresh within 5 s of the 401s\n{}", envoy.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let held_at = Instant::now();
    let kept =
        poll(&envoy, 3, Duration::from_secs(10), |t| t.len() >= 15 && held_at.elapsed() >= Duration::from_secs(1));
    assert!(kept.iter().all(|t| t.outcome == Outcome::Rejected), "tok-1 sent until replaced: {:?}", outcomes(&kept));
    token.release();
    let replaced = poll(&envoy, 1, Duration::from_secs(10), |t| {
        t.last().is_some_and(|t| t.outcome == Outcome::Forwarded("Bearer tok-2".into()))
    });
    let before = &replaced[..replaced.len() - 1];
    assert!(before.iter().all(|t| t.outcome == Outcome::Rejected), "then tok-2: {:?}", outcomes(&replaced));
    let calls = token.calls();
    assert_eq!(calls.len(), 2, "{} 401s for tok-1 on two workers: one token call", upstream.rejected());
    assert_eq!(calls[1].body, calls[0].body, "the same grant again");
    let forced = calls[1].at.saturating_duration_since(first_401);
    assert!(forced <= Duration::from_secs(3), "forced refresh {forced:?} after the first 401, want the next tick");
    let tok1_401s = BURST + kept.len() + before.len();
    assert_eq!(upstream.rejected(), tok1_401s, "every 401 a client saw was tok-1's");
    assert_eq!(rejected_total(&envoy, "orders"), Some(1), "{tok1_401s} 401s for one value: one count");

    // 3. tok-2 rejected too, under 5 s after tok-1's forced refresh: the
    // next one waits for the bound, and tok-2 goes on being sent until
    // then. That call fails (the token endpoint is down): tok-2 is not
    // kept past it, and every request is answered 503 from then on.
    let since_first = first_401.elapsed();
    assert!(since_first < Duration::from_secs(4), "{since_first:?} after the first 401: too late to see the bound");
    token.take_down();
    upstream.reject("Bearer tok-2", 1);
    assert_eq!(outcome(&envoy), Outcome::Rejected, "tok-2 answered 401");
    let dropped = poll(&envoy, 3, Duration::from_secs(20), |tries| {
        let first = tries.iter().find(|t| t.outcome == Outcome::Unavailable).map(|t| t.answered);
        first.is_some_and(|f| f.elapsed() >= Duration::from_millis(800))
    });
    let calls = token.calls();
    let bound = calls[2].at;
    let after_first = bound.saturating_duration_since(first_401);
    assert!(after_first >= Duration::from_millis(4900), "second forced refresh {after_first:?} after the first 401");
    let gap = bound.saturating_duration_since(calls[1].at);
    assert!(gap <= Duration::from_secs(10), "forced refreshes {gap:?} apart, want ~5 s");
    let first_503 = dropped.iter().filter(|t| t.outcome == Outcome::Unavailable).map(|t| t.answered).min();
    let first_503 = first_503.expect("a 503");
    for t in &dropped {
        match t.outcome {
            Outcome::Rejected => assert!(t.sent <= first_503, "tok-2 sent after it was dropped: {t:?}"),
            Outcome::Unavailable => assert!(t.answered >= bound, "503 before the refresh failed: {t:?}"),
            _ => panic!("after tok-2's 401: {:?}", outcomes(&dropped)),
        }
    }
    let last_sent = dropped.iter().filter(|t| t.outcome == Outcome::Rejected).map(|t| t.sent).max();
    let last_sent = last_sent.expect("tok-2 kept while the refresh waited");
    assert!(last_sent + Duration::from_secs(1) >= bound, "tok-2 sent until the refresh at the bound: {last_sent:?}");
    assert_eq!(upstream.rejected(), 1 + count(&dropped, &Outcome::Rejected), "every 401 was tok-2's");
    assert!(count(&dropped, &Outcome::Unavailable) >= 5);
    assert_eq!(rejected_total(&envoy, "orders"), Some(2), "two values marked");

    // 4. Back up: the next retry (backoff 1 s, 2 s, …) brings a new token.
    token.set_answer(&answer("tok-{n}", 3600));
    let back =
        poll(&envoy, 1, Duration::from_secs(15), |t| t.last().is_some_and(|t| t.outcome != Outcome::Unavailable));
    let last = token.count();
    assert_eq!(back.last().map(|t| &t.outcome), Some(&Outcome::Forwarded(format!("Bearer tok-{last}"))));
    assert!((4..=6).contains(&last), "{last} calls: two forced, failures retried with backoff, one success");

    // Each mark logged once across the workers, with the bound's wait for
    // the second; the failed refetch says the value is gone. No value in
    // any of keyswap's lines.
    let ours = keyswap_lines(&envoy.log());
    let path = "credential routes[0].inject[0].value.oauth2 (oauth2)";
    let lines = |text: &str| ours.matches(&format!("{path}: {text}")).count();
    assert_eq!(lines("the upstream answered 401 to it; replacing it, fetching a new one"), 2, "{ours}");
    assert_eq!(ours.matches("fetching a new one in ").count(), 1, "{ours}");
    assert_eq!(ours.matches("(at most one forced refresh per 5 s)").count(), 1, "{ours}");
    assert_eq!(lines("new value fetched after the upstream rejected the last one"), 1, "{ours}");
    let failed = "refresh failed: the token endpoint answered status 503; its routes answer 503 \
                  credential_unavailable until one arrives; retrying with backoff";
    assert_eq!(lines(failed), 1, "{ours}");
    assert_eq!(lines("refreshed again after"), 1, "{ours}");
    for n in 1..=last {
        assert!(!ours.contains(&format!("tok-{n}")), "tok-{n} in keyswap's log:\n{ours}");
    }
    for secret in [CLIENT_SECRET, "Z3c6"] {
        assert!(!ours.contains(secret), "{secret} in keyswap's log:\n{ours}");
    }
}
