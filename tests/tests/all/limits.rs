//! Rate limits and quotas (docs/config.md, "Rate limits and quotas") in the
//! real Envoy with two workers, counted in Envoy's shared data by both:
//!
//! - exactness: 32 connections at once ask far more often than a rate of
//!   N per second allows, for more than ten one-second windows. Every
//!   answer is the forwarded request or 429 `rate_limited` with its
//!   `retry-after` and `RateLimit` fields. No over-admission, proven from
//!   the client's side (any N + burst + 1 admissions were sent and answered
//!   more than a window apart); no under-admission beyond the algorithm's
//!   (1 + burst, then one per N-th of the window, from the first admission
//!   to the last request, short only by what gaps in the requests longer
//!   than the burst absorbs may cost). The admitted count per window
//!   (`N + burst` in the first, `N` after; decisions placed at the middle
//!   of their round trips) is printed: the report, exact when no round trip
//!   crosses a window edge, not asserted (a loaded machine moves answers
//!   across edges).
//! - clients never share a bucket: four clients with the same limit
//!   definition (a route default, a client's own), hammered together, are
//!   each admitted exactly their own number.
//! - a push that changes one client's limit starts that client afresh and
//!   leaves the other client's counts as they were.
//! - fleet composition: Envoy's `local_ratelimit` after keyswap on the
//!   listener, its descriptor on the client id keyswap's first stage sets
//!   (`client_id_on_listener`), counts each client by its key, never by a
//!   client-sent id (a bad, disabled or missing key with a forged id,
//!   another client's key with it; repeated, with `_` for `-`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use keyswap_tests::echo::{Echo, Echoed};
use keyswap_tests::envoy::{filter_wasm, gateway, Envoy, Launch, Listener, LogLevels, ROUTE_HEADER};
use keyswap_tests::http::{Request, Response};
use keyswap_tests::revocation::EcdsGateway;

use crate::credentials::start_listener;

const CLIENT_ID_HEADER: &str = "x-keyswap-client";
const UPSTREAM_KEY: &str = "upstream-secret-for-limits";

/// The Envoy route (and cluster) the requests take.
const ROUTE: &str = "api";

/// A configuration with `clients` on one route [`ROUTE`] with `route_limits`
/// as its default (`null`: none).
fn config(clients: serde_json::Value, route_limits: serde_json::Value) -> String {
    let mut route = serde_json::json!({"name": ROUTE, "match": {"route_name": ROUTE, "clusters": [ROUTE]},
                                       "inject": [{"header": "x-upstream-key", "value": {"inline": UPSTREAM_KEY}}]});
    if !route_limits.is_null() {
        route["limits"] = route_limits;
    }
    serde_json::json!({
        "clients": clients,
        "key_sources": [{"header": "x-api-key"}],
        "routes": [route],
        "client_id_header": CLIENT_ID_HEADER
    })
    .to_string()
}

fn start(config: String, echo: &Echo) -> Envoy {
    let listener = Listener { name: "limits".into(), config, route_names: vec![ROUTE.into()], ..Listener::default() };
    start_listener(listener, &[], echo.addr(), 2)
}

fn request(key: &str) -> Request {
    Request::get("/v1/things").header("host", "api.test").header(ROUTE_HEADER, ROUTE).header("x-api-key", key)
}

fn error(response: &Response) -> String {
    response.json().map(|b| b["error"].as_str().unwrap_or_default().to_string()).unwrap_or_default()
}

/// An answer is either forwarded (the echo, as `client`) or keyswap's 429
/// `rate_limited`; `Ok(true)` when forwarded.
fn judge(response: &Response, client: &str) -> Result<bool, String> {
    match response.status {
        200 => {
            let echoed = Echoed::parse(&response.body).ok_or_else(|| format!("not the echo: {}", response.text()))?;
            if echoed.header(CLIENT_ID_HEADER) != Some(client) || echoed.header("x-upstream-key") != Some(UPSTREAM_KEY)
            {
                return Err(format!("{client}: forwarded as {:?}", echoed.headers));
            }
            Ok(true)
        }
        429 if error(response) == "rate_limited"
            && response.header("retry-after").is_some_and(|s| s.parse::<u64>().is_ok_and(|s| s >= 1))
            && response.header("ratelimit-policy").is_some()
            && response.header("ratelimit").is_some_and(|v| v.contains(";r=0;t=")) =>
        {
            Ok(false)
        }
        _ => Err(format!("{client}: {} {:?} {}", response.status, response.headers, response.text())),
    }
}

#[test]
fn a_rate_of_n_per_second_admits_exactly_n_per_window_across_two_workers_and_32_connections() {
    const N: u64 = 10;
    const BURST: u64 = 1;
    const CONNECTIONS: usize = 32;
    /// Long enough for eleven whole windows after the first admission.
    const RUN: Duration = Duration::from_millis(11_800);
    /// Each connection's bound on requests, besides [`RUN`].
    const MOST: usize = 3_000;
    let emission = Duration::from_millis(1000 / N);
    let echo = Echo::start("127.0.0.1:0").expect("echo");
    let clients = serde_json::json!([{"id": "metered", "key": "metered-key", "routes": ["*"],
        "limits": {"rate": {"requests": N, "per": "second", "burst": BURST}}}]);
    let envoy = start(config(clients, serde_json::Value::Null), &echo);
    let addr = envoy.listener("limits").expect("listener");

    // Every connection asks every 5 ms (a new connection a request, so
    // either worker): far more often than 10 per second, so a request is
    // always there within a millisecond of the next admission being due.
    let started = Instant::now();
    // Each answer: when it was sent, when it came back, whether admitted.
    let answers: Vec<Result<(Instant, Instant, bool), String>> = std::thread::scope(|s| {
        let senders: Vec<_> = (0..CONNECTIONS)
            .map(|_| {
                s.spawn(move || {
                    let mut out = Vec::new();
                    while started.elapsed() < RUN && out.len() < MOST {
                        let sent = Instant::now();
                        let answer = request("metered-key").send(addr).map_err(|e| e.to_string());
                        let back = Instant::now();
                        out.push(answer.and_then(|r| judge(&r, "metered")).map(|admitted| (sent, back, admitted)));
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    out
                })
            })
            .collect();
        senders.into_iter().flat_map(|h| h.join().expect("sender")).collect()
    });
    let ended = Instant::now();
    let failures: Vec<&String> = answers.iter().filter_map(|a| a.as_ref().err()).collect();
    assert!(failures.is_empty(), "{} bad answers, first: {:?}", failures.len(), failures.first());
    // The decision was made between sending and the answer.
    let mut admitted: Vec<(Instant, Instant)> =
        answers.iter().filter_map(|a| a.as_ref().ok()).filter(|a| a.2).map(|a| (a.0, a.1)).collect();
    admitted.sort_by_key(|(sent, back)| *sent + (*back - *sent) / 2);
    let sent = answers.len();
    let (first_sent, first_back) = *admitted.first().expect("something was admitted");
    // Admissions are due at first + k·T (T = 100 ms): windows start half an
    // emission interval before, so that no admission is near an edge.
    let origin = first_sent + (first_back - first_sent) / 2 - emission / 2;
    let window = Duration::from_secs(1);
    let index = |t: Instant| (t.saturating_duration_since(origin).as_millis() / window.as_millis()) as usize;
    let whole = index(ended);
    assert!(whole >= 10, "at least ten whole windows: {whole}");
    let mut midpoints = vec![0u64; whole];
    for (sent, back) in &admitted {
        if let Some(m) = midpoints.get_mut(index(*sent + (*back - *sent) / 2)) {
            *m += 1;
        }
    }
    let crossing = admitted.iter().filter(|(s, b)| index(*s) != index(*b)).count();
    println!(
        "rate {N}/second burst {BURST}, {CONNECTIONS} connections, 2 workers: {sent} requests in {:.1} s \
         ({:.0}/s), admitted per 1 s window: {midpoints:?} (want {} then {N}; {crossing} admissions' round \
         trips crossed a window edge)",
        (ended - started).as_secs_f64(),
        sent as f64 / (ended - started).as_secs_f64(),
        N + BURST
    );
    // No over-admission, proven from the client's side: any N + BURST + 1
    // admissions were decided more than a window apart (each decision lies
    // between its request's sending and its answer; GCRA admits at most
    // N + BURST in any half-open window).
    let span = usize::try_from(N + BURST).expect("small");
    for group in admitted.windows(span + 1) {
        let earliest = group.iter().map(|(s, _)| *s).min().expect("a group");
        let latest = group.iter().map(|(_, b)| *b).max().expect("a group");
        // Envoy's clock is read in whole milliseconds: 1 ms of slack.
        let spread = latest - earliest + Duration::from_millis(1);
        assert!(spread >= window, "{} admissions within {:?}", span + 1, latest - earliest);
    }
    // No under-admission beyond the algorithm's: from the first admission
    // to the last request, 1 + BURST, then one per T, except where the
    // requests themselves stopped for longer than the burst absorbs
    // (BURST·T: a loaded machine can starve the senders), each such gap
    // costing at most its length in T.
    let mut sends: Vec<Instant> = answers.iter().filter_map(|a| a.as_ref().ok()).map(|a| a.0).collect();
    sends.sort();
    let tolerance = emission * u32::try_from(BURST).expect("small");
    let lost: u64 = sends
        .windows(2)
        .map(|p| p[1] - p[0])
        .filter(|gap| *gap > tolerance)
        .map(|gap| (gap.as_millis() / emission.as_millis()) as u64 + 1)
        .sum();
    let last_sent = *sends.last().expect("requests");
    let due = 1 + BURST + ((last_sent - first_back).as_millis() / emission.as_millis()) as u64;
    let got = admitted.len() as u64;
    println!("admitted {got} in all; due by the last request: {due}; arrival gaps over {tolerance:?} may cost {lost}");
    assert!(got + 1 + lost >= due, "admitted {got}, due {due} (gaps may cost {lost}); per window {midpoints:?}");
}

#[test]
fn clients_with_the_same_limit_never_share_a_bucket() {
    const SENDERS: usize = 8;
    const EACH: usize = 25;
    let echo = Echo::start("127.0.0.1:0").expect("echo");
    // `a` and `b` get the route's default (1 per hour, burst 4: five at
    // once), `own` its own limit for the route with the same numbers but
    // burst 2, `free` no limit on the route.
    let clients = serde_json::json!([
        {"id": "a", "key": "key-a", "routes": ["*"]},
        {"id": "b", "key": "key-b", "routes": ["*"]},
        {"id": "own", "key": "key-own", "routes": ["*"],
         "route_limits": {ROUTE: {"rate": {"requests": 1, "per": "hour", "burst": 2}}}},
        {"id": "free", "key": "key-free", "routes": ["*"], "route_limits": {ROUTE: {}}}
    ]);
    let route_limits = serde_json::json!({"rate": {"requests": 1, "per": "hour", "burst": 4}});
    let envoy = start(config(clients, route_limits), &echo);
    let addr = envoy.listener("limits").expect("listener");
    let clients = [("a", "key-a"), ("b", "key-b"), ("own", "key-own"), ("free", "key-free")];
    // Every sender walks the four clients in turn, so their requests
    // interleave on both workers.
    let answers: Vec<(&str, Result<bool, String>)> = std::thread::scope(|s| {
        let senders: Vec<_> = (0..SENDERS)
            .map(|sender| {
                s.spawn(move || {
                    let mut out = Vec::new();
                    for i in 0..EACH * clients.len() {
                        let (client, key) = clients[(sender + i) % clients.len()];
                        let answer = request(key).send(addr).map_err(|e| e.to_string());
                        out.push((client, answer.and_then(|r| judge(&r, client))));
                    }
                    out
                })
            })
            .collect();
        senders.into_iter().flat_map(|h| h.join().expect("sender")).collect()
    });
    let mut admitted: BTreeMap<&str, usize> = BTreeMap::new();
    for (client, answer) in &answers {
        match answer {
            Ok(true) => *admitted.entry(client).or_default() += 1,
            Ok(false) => {}
            Err(e) => panic!("{e}"),
        }
    }
    println!("admitted of {} each: {admitted:?}", SENDERS * EACH);
    let want = BTreeMap::from([("a", 5), ("b", 5), ("own", 3), ("free", SENDERS * EACH)]);
    assert_eq!(admitted, want, "each client its own bucket; log:\n{}", envoy.log());
}

#[test]
fn a_push_changing_one_clients_limit_keeps_the_other_clients_counts() {
    let clients = |a_burst: u64, extra: bool| {
        let mut list = vec![
            serde_json::json!({"id": "a", "key": "push-key-a", "routes": ["*"],
                               "limits": {"rate": {"requests": 1, "per": "hour", "burst": a_burst}}}),
            serde_json::json!({"id": "b", "key": "push-key-b", "routes": ["*"],
                               "limits": {"rate": {"requests": 1, "per": "hour", "burst": 2}}}),
        ];
        if extra {
            list.push(serde_json::json!({"id": "probe", "key": "push-key-probe", "routes": ["*"]}));
        }
        let route = serde_json::json!({"name": "all", "match": {"clusters": ["gateway-default"]},
                                       "inject": [{"header": "x-upstream-key", "value": {"inline": UPSTREAM_KEY}}]});
        serde_json::json!({"clients": list, "key_sources": [{"header": "x-api-key"}], "routes": [route],
                           "client_id_header": CLIENT_ID_HEADER})
        .to_string()
    };
    let listener = Listener { config: clients(2, false), ..Listener::default() };
    let gw = EcdsGateway::start_with(listener, &[], &LogLevels::serving()).unwrap_or_else(|e| panic!("{e}"));
    let get = |key: &str| {
        let request = Request::get("/v1/things").header("host", "gateway.test").header("x-api-key", key);
        request.header("connection", "close").send(gw.addr).expect("a request")
    };
    let send = |key: &str, client: &str| judge(&get(key), client).unwrap_or_else(|e| panic!("{e}"));
    // Both use two of their three (1 + burst 2).
    for _ in 0..2 {
        assert!(send("push-key-a", "a") && send("push-key-b", "b"), "admitted before the push");
    }
    // `a`'s burst goes from 2 to 5 (a new definition: a fresh bucket of
    // six); `b`'s limit is as it was; a client `probe` is added.
    gw.push(&clients(5, true)).expect("push");
    // In force on every worker once twenty fresh connections in a row take
    // `probe`'s key (it exists only in the new configuration).
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(0..20).all(|_| get("push-key-probe").status == 200) {
        assert!(Instant::now() < deadline, "the push is in force within 10 s; log:\n{}", gw.envoy.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let admitted = |key: &str, client: &str| (0..10).filter(|_| send(key, client)).count();
    assert_eq!(admitted("push-key-b", "b"), 1, "b keeps its count: one of three left");
    assert_eq!(admitted("push-key-a", "a"), 6, "a's changed limit starts afresh at the push");
}

/// The listener's `local_ratelimit` of [`local_ratelimit_counts_each_client_by_its_key_never_by_a_client_sent_id`]:
/// a descriptor per client on keyswap's client id, `per_client` requests
/// an hour each; a request without the header takes the (unbounded)
/// default bucket.
fn local_ratelimit(clients: &[&str], per_client: u32) -> serde_json::Value {
    let bucket = |n: u32| serde_json::json!({"max_tokens": n, "tokens_per_fill": n, "fill_interval": "3600s"});
    let all = serde_json::json!({"runtime_key": "keyswap_clients_enabled", "default_value": {"numerator": 100, "denominator": "HUNDRED"}});
    let descriptors: Vec<serde_json::Value> = clients
        .iter()
        .map(|c| serde_json::json!({"entries": [{"key": "client", "value": c}], "token_bucket": bucket(per_client)}))
        .collect();
    serde_json::json!({
        "name": "envoy.filters.http.local_ratelimit",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
            "stat_prefix": "keyswap_clients",
            "token_bucket": bucket(1_000_000),
            "filter_enabled": all, "filter_enforced": all,
            "descriptors": descriptors,
        },
    })
}

#[test]
fn local_ratelimit_counts_each_client_by_its_key_never_by_a_client_sent_id() {
    let echo = Echo::start("127.0.0.1:0").expect("echo");
    let clients = serde_json::json!([
        {"id": "team-a", "key": "lr-key-a", "routes": ["*"]},
        {"id": "team-b", "key": "lr-key-b", "routes": ["*"]},
        {"id": "off", "key": "lr-key-off", "routes": ["*"], "disabled": true}
    ]);
    let mut keyswap: serde_json::Value = serde_json::from_str(&config(clients, serde_json::Value::Null)).expect("JSON");
    keyswap["client_id_on_listener"] = serde_json::json!(true);
    let listener = Listener {
        name: "fleet".into(),
        config: keyswap.to_string(),
        route_names: vec![ROUTE.into()],
        ..Listener::default()
    };
    let wasm = filter_wasm().unwrap_or_else(|e| panic!("{e}"));
    let mut bootstrap = gateway(std::slice::from_ref(&listener), echo.addr(), &wasm);
    // keyswap, then local_ratelimit, then the router; every route's
    // descriptor is the client id header.
    let hcm = &mut bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"];
    hcm["http_filters"].as_array_mut().expect("filters").insert(1, local_ratelimit(&["team-a", "team-b"], 3));
    for route in hcm["route_config"]["virtual_hosts"][0]["routes"].as_array_mut().expect("routes") {
        route["route"]["rate_limits"] = serde_json::json!([{"actions": [
            {"request_headers": {"header_name": CLIENT_ID_HEADER, "descriptor_key": "client"}}]}]);
    }
    let launch = Launch {
        file_name: "envoy.json".into(),
        text: bootstrap.to_string(),
        expect_configs: vec![listener.config.clone()],
        ..Launch::default()
    };
    let envoy = Envoy::start(&launch).unwrap_or_else(|e| panic!("Envoy starts: {e}"));
    let addr = envoy.listener("fleet").expect("listener");
    let send = |key: Option<&str>, forged: &[(&str, &str)], http2: bool| {
        let mut r = Request::get("/v1/things").header("host", "api.test").header(ROUTE_HEADER, ROUTE);
        if let Some(key) = key {
            r = r.header("x-api-key", key);
        }
        for (name, value) in forged {
            r = r.header(name, value);
        }
        if http2 {
            r = r.http2();
        }
        r.send(addr).expect("a request")
    };
    let local_429 = |r: &Response| r.status == 429 && r.text().contains("local_rate_limited");
    let forged_a: &[(&str, &str)] =
        &[("x-keyswap-client", "team-a"), ("X-Keyswap-Client", "team-a"), ("x_keyswap_client", "team-a")];

    // A forged id with a bad, a disabled or no key: keyswap's 401, never
    // counted as team-a (team-a's three are all there afterwards).
    for i in 0..6 {
        for (key, want) in [(Some("nope"), "invalid_key"), (Some("lr-key-off"), "invalid_key"), (None, "missing_key")] {
            let r = send(key, forged_a, i % 2 == 1);
            assert_eq!((r.status, error(&r)), (401, want.to_string()), "{key:?} with a forged id: {}", r.text());
        }
    }
    // team-b's key with team-a's id: counted, and forwarded, as team-b.
    for i in 0..3 {
        let r = send(Some("lr-key-b"), forged_a, i == 1);
        assert_eq!(judge(&r, "team-b"), Ok(true), "team-b as team-a, request {i}");
    }
    // team-a: exactly its own three, then the local_ratelimit's 429.
    for i in 0..3 {
        assert_eq!(judge(&send(Some("lr-key-a"), &[], false), "team-a"), Ok(true), "team-a, request {i}");
    }
    let r = send(Some("lr-key-a"), &[], false);
    assert!(local_429(&r), "team-a's fourth: {} {}", r.status, r.text());
    // team-b's three went to its own bucket, whatever id it sent.
    let r = send(Some("lr-key-b"), &[], false);
    assert!(local_429(&r), "team-b's fourth: {} {}", r.status, r.text());
    // team-a's bucket is empty: a forged id with a bad key is still
    // keyswap's 401, never the limiter's 429.
    let r = send(Some("nope"), forged_a, false);
    assert_eq!((r.status, error(&r)), (401, "invalid_key".to_string()), "{}", r.text());
}
