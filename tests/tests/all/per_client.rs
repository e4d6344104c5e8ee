//! Per-client credentials (`clients[].inject`, docs/config.md "Per-client
//! credentials") in the real Envoy, two workers, attacked from outside:
//! every request reaches the upstream with exactly its own client's
//! credentials (a client's own list whole, else the route's), over
//! hundreds of interleaved requests on both workers; a client cannot
//! smuggle a value under any injected name (another client's header or
//! query parameter, in any case, with `_` for `-`, repeated, padded), nor
//! use a route another client brings its own credential for; a client's
//! own OAuth2 token is fetched by its own call and reaches only its
//! requests, and an upstream's 401 to it refetches that one token alone
//! (the old one still sent to that client until the new one arrives).
//!
//! The oracle is the echo upstream's view of each request: for every name
//! any client or route injects, the values the upstream got must be the
//! expected client's, and no other credential (nor any value the client
//! sent under such a name) may appear anywhere in the request.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use keyswap_tests::echo::{Echo, Echoed};
use keyswap_tests::envoy::{Envoy, Listener, ROUTE_HEADER};
use keyswap_tests::http::{Request, Response};
use keyswap_tests::raw;
use keyswap_tests::rejecting::Rejecting;
use keyswap_tests::token::TokenServer;

use crate::credentials::{keyswap_lines, rejected_total, serving_workers, start_listener, unavailable, upstream_401};

const LISTENER: &str = "pc";
/// The Envoy routes (each to the cluster of its name), selected by
/// [`ROUTE_HEADER`].
const ROUTES: [&str; 4] = ["openai", "search", "partner", "orders"];
const CLIENT_ID_HEADER: &str = "x-keyswap-client";
/// What the attacks send under injected names; never upstream.
const SMUGGLED: &str = "smuggled";

/// Where a credential goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Header(&'static str),
    Query(&'static str),
}

/// Every name a route or a client's own list injects.
const SLOTS: [Slot; 6] = [
    Slot::Header("authorization"),
    Slot::Header("openai-organization"),
    Slot::Header("openai-project"),
    Slot::Header("x-partner-key"),
    Slot::Query("key"),
    Slot::Query("api-key"),
];

/// The environment credentials, by variable.
const ENV: [(&str, &str); 6] = [
    ("ROUTE_OPENAI", "sk-route-openai-0001"),
    ("A_OPENAI", "sk-team-a-openai-0003"),
    ("A_SEARCH", "team-a-search-0004"),
    ("B_OPENAI", "sk-team-b-openai-0005"),
    ("B_PARTNER", "team-b-partner-0008"),
    ("Q_OPENAI", "team-q-openai-0009"),
];
/// The inline credentials.
const ORG: &str = "org-gateway-0002";
const B_PROJECT: &str = "proj-team-b-0006";
const B_SEARCH: &str = "team-b-search-0007";

fn env(name: &str) -> &'static str {
    ENV.iter().find(|(n, _)| *n == name).map(|(_, v)| *v).expect("a test variable")
}

/// Every credential the configuration holds.
fn secrets() -> Vec<&'static str> {
    ENV.iter().map(|(_, v)| *v).chain([ORG, B_PROJECT, B_SEARCH]).collect()
}

/// `(id, key)` of each client.
const CLIENTS: [(&str, &str); 4] =
    [("batch", "batch-key-1"), ("team-a", "team-a-key-2"), ("team-b", "team-b-key-3"), ("team-q", "team-q-key-4")];

fn key(client: &str) -> &'static str {
    CLIENTS.iter().find(|(id, _)| *id == client).map(|(_, k)| *k).expect("a test client")
}

/// Two routes with their own credentials and a route without; `batch`
/// brings nothing, `team-a` an env header and an env query parameter,
/// `team-b` an env header with an inline one, an inline query parameter
/// and the only list for `partner`, `team-q` a query parameter where the
/// route injects headers.
fn config() -> String {
    let bearer = |var: &str| serde_json::json!({"header": "authorization", "prefix": "Bearer ", "value": {"env": var}});
    serde_json::json!({
        "clients": [
            {"id": "batch", "key": key("batch"), "routes": ["openai"]},
            {"id": "team-a", "key": key("team-a"), "routes": ["openai", "search"],
             "inject": {"openai": [bearer("A_OPENAI")],
                        "search": [{"query": "key", "value": {"env": "A_SEARCH"}}]}},
            {"id": "team-b", "key": key("team-b"), "routes": ["openai", "search", "partner"],
             "inject": {"openai": [bearer("B_OPENAI"), {"header": "openai-project", "value": {"inline": B_PROJECT}}],
                        "search": [{"query": "key", "value": {"inline": B_SEARCH}}],
                        "partner": [{"header": "x-partner-key", "value": {"env": "B_PARTNER"}}]}},
            {"id": "team-q", "key": key("team-q"), "routes": ["openai"],
             "inject": {"openai": [{"query": "api-key", "value": {"env": "Q_OPENAI"}}]}}
        ],
        "key_sources": [{"header": "x-api-key"}],
        "routes": [
            {"name": "openai", "match": {"route_name": "openai", "clusters": ["openai"]},
             "inject": [bearer("ROUTE_OPENAI"), {"header": "openai-organization", "value": {"inline": ORG}}]},
            {"name": "search", "match": {"route_name": "search", "clusters": ["search"]}},
            {"name": "partner", "match": {"route_name": "partner", "clusters": ["partner"]}}
        ],
        "client_id_header": CLIENT_ID_HEADER
    })
    .to_string()
}

/// What the upstream must get from `client` on `route`: the client's own
/// list whole, else the route's.
fn expected(client: &str, route: &str) -> Vec<(Slot, String)> {
    let bearer = |var: &str| (Slot::Header("authorization"), format!("Bearer {}", env(var)));
    match (client, route) {
        ("batch", "openai") => vec![bearer("ROUTE_OPENAI"), (Slot::Header("openai-organization"), ORG.into())],
        ("team-a", "openai") => vec![bearer("A_OPENAI")],
        ("team-a", "search") => vec![(Slot::Query("key"), env("A_SEARCH").into())],
        ("team-b", "openai") => vec![bearer("B_OPENAI"), (Slot::Header("openai-project"), B_PROJECT.into())],
        ("team-b", "search") => vec![(Slot::Query("key"), B_SEARCH.into())],
        ("team-b", "partner") => vec![(Slot::Header("x-partner-key"), env("B_PARTNER").into())],
        ("team-q", "openai") => vec![(Slot::Query("api-key"), env("Q_OPENAI").into())],
        other => panic!("{other:?} is not allowed"),
    }
}

/// Every `(client, route)` the configuration allows.
const ALLOWED: [(&str, &str); 7] = [
    ("batch", "openai"),
    ("team-a", "openai"),
    ("team-a", "search"),
    ("team-b", "openai"),
    ("team-b", "search"),
    ("team-b", "partner"),
    ("team-q", "openai"),
];

/// The query parameters of a request target, undecoded (`&` and `;`).
fn query(target: &str) -> Vec<(String, String)> {
    let Some((_, q)) = target.split_once('?') else {
        return Vec::new();
    };
    q.split(['&', ';'])
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (n, v) = p.split_once('=').unwrap_or((p, ""));
            (n.to_string(), v.to_string())
        })
        .collect()
}

/// Judges what the upstream got for a request by `client` on `route`:
/// every injected name carries exactly the expected values, the client's
/// id, no key, and no other credential or smuggled value anywhere.
fn judge(echoed: &Echoed, client: &str, route: &str) -> Result<(), String> {
    let want = expected(client, route);
    let params = query(&echoed.path);
    for slot in SLOTS {
        let wanted: Vec<&str> = want.iter().filter(|(s, _)| *s == slot).map(|(_, v)| v.as_str()).collect();
        let got: Vec<&str> = match slot {
            Slot::Header(name) => echoed.header_all(name),
            Slot::Query(name) => params.iter().filter(|(n, _)| n == name).map(|(_, v)| v.as_str()).collect(),
        };
        if got != wanted {
            return Err(format!("{client} on {route}: {slot:?} is {got:?}, want {wanted:?}"));
        }
    }
    if echoed.header_all(CLIENT_ID_HEADER) != [client] {
        return Err(format!("{client} on {route}: {CLIENT_ID_HEADER} {:?}", echoed.header_all(CLIENT_ID_HEADER)));
    }
    // `x-other` is no injected name: a client may write anything there
    // (the folded-line attack shows only that the fold is no header).
    let headers = echoed.headers.iter().filter(|(n, _)| n != "x-other").map(|(_, v)| v.as_str());
    let everything: Vec<&str> = std::iter::once(echoed.path.as_str()).chain(headers).collect();
    let own: Vec<&str> = want.iter().map(|(_, v)| v.trim_start_matches("Bearer ")).collect();
    let keys = CLIENTS.iter().map(|(_, k)| *k);
    for foreign in secrets().into_iter().filter(|s| !own.contains(s)).chain(keys).chain([SMUGGLED]) {
        if let Some(hit) = everything.iter().find(|v| v.to_ascii_lowercase().contains(&foreign.to_ascii_lowercase())) {
            return Err(format!("{client} on {route}: {foreign:?} reached the upstream in {hit:?}"));
        }
    }
    Ok(())
}

/// Envoy (two workers) with [`config`]-style `config` and `env`, its
/// routes reaching `upstream`, and a cluster per `(name, server)`.
fn start(
    config: String,
    env: BTreeMap<String, String>,
    upstream: SocketAddr,
    tokens: &[(&str, &TokenServer)],
) -> Envoy {
    let route_names = ROUTES.iter().map(|r| r.to_string()).collect();
    let listener = Listener { name: LISTENER.into(), config, env, route_names, ..Listener::default() };
    start_listener(listener, tokens, upstream, 2)
}

fn start_static(echo: &Echo) -> Envoy {
    let env = ENV.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect();
    start(config(), env, echo.addr(), &[])
}

/// A request by `client` (its key in `x-api-key`) to Envoy route `route`.
fn request(client: &str, route: &str, target: &str) -> Request {
    Request::get(target).header("host", "api.test").header(ROUTE_HEADER, route).header("x-api-key", key(client))
}

fn forwarded(response: &Response) -> Result<Echoed, String> {
    if response.status != 200 {
        return Err(format!("{} {}", response.status, response.text()));
    }
    Echoed::parse(&response.body).ok_or_else(|| format!("not the echo: {}", response.text()))
}

#[test]
fn every_request_carries_its_own_clients_credentials_over_interleaved_requests_on_both_workers() {
    const SENDERS: usize = 4;
    const EACH: usize = 105;
    let echo = Echo::start("127.0.0.1:0").expect("echo");
    let envoy = start_static(&echo);
    let addr = envoy.listener(LISTENER).expect("listener");
    // Each sender walks the allowed pairs from its own start with its own
    // stride, every third request over HTTP/2, a new connection each (so
    // either worker): the pairs interleave across senders and workers.
    let started = Instant::now();
    let results: Vec<(usize, Result<(), String>)> = std::thread::scope(|s| {
        let senders: Vec<_> = (0..SENDERS)
            .map(|sender| {
                s.spawn(move || {
                    (0..EACH)
                        .map(|i| {
                            let (client, route) = ALLOWED[(sender + i * (sender + 1)) % ALLOWED.len()];
                            let mut r = request(client, route, &format!("/v1/{sender}/{i}?n={i}"));
                            if i % 3 == 2 {
                                r = r.http2();
                            }
                            let response = r.send(addr).map_err(|e| e.to_string());
                            let judged = response.and_then(|r| forwarded(&r)).and_then(|e| judge(&e, client, route));
                            (i, judged)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        senders.into_iter().flat_map(|t| t.join().expect("sender")).collect()
    });
    let took = started.elapsed();
    let wrong: Vec<&String> = results.iter().filter_map(|(_, r)| r.as_ref().err()).collect();
    assert!(
        wrong.is_empty(),
        "{} of {} requests wrong, first: {:?}",
        wrong.len(),
        results.len(),
        &wrong[..wrong.len().min(5)]
    );
    assert_eq!(results.len(), SENDERS * EACH);
    assert_eq!(serving_workers(&envoy, SystemTime::UNIX_EPOCH).len(), 2, "both workers served");
    eprintln!("{} interleaved requests judged in {took:?}, zero mix-ups", results.len());
}

/// One attack: a request and what must come of it.
struct Attack {
    name: &'static str,
    client: &'static str,
    route: &'static str,
    target: &'static str,
    headers: &'static [(&'static str, &'static str)],
    /// `None`: forwarded and judged; `Some((status, reason))`: refused.
    denied: Option<(u16, &'static str)>,
}

const ATTACKS: &[Attack] = &[
    Attack {
        name: "another client's header name",
        client: "team-a",
        route: "openai",
        target: "/v1/chat",
        headers: &[("openai-project", SMUGGLED)],
        denied: None,
    },
    Attack {
        name: "the route's header, which the client's own list leaves out",
        client: "team-a",
        route: "openai",
        target: "/v1/chat",
        headers: &[("openai-organization", SMUGGLED)],
        denied: None,
    },
    Attack {
        name: "the client's own injected header, with another value",
        client: "team-a",
        route: "openai",
        target: "/v1/chat",
        headers: &[("authorization", "Bearer smuggled")],
        denied: None,
    },
    Attack {
        name: "a header only another route's client injects",
        client: "team-a",
        route: "openai",
        target: "/v1/chat",
        headers: &[("x-partner-key", SMUGGLED)],
        denied: None,
    },
    Attack {
        name: "underscore look-alikes",
        client: "team-a",
        route: "openai",
        target: "/v1/chat",
        headers: &[("openai_project", SMUGGLED), ("x_partner_key", SMUGGLED), ("openai_organization", SMUGGLED)],
        denied: None,
    },
    Attack {
        name: "repeated injected headers",
        client: "team-a",
        route: "openai",
        target: "/v1/chat",
        headers: &[
            ("authorization", "Bearer smuggled-1"),
            ("openai-project", "smuggled-1"),
            ("authorization", "Bearer smuggled-2"),
            ("openai-project", "smuggled-2"),
        ],
        denied: None,
    },
    Attack {
        name: "padded values",
        client: "team-b",
        route: "openai",
        target: "/v1/chat",
        headers: &[("openai-project", "   smuggled   "), ("x-partner-key", "\tsmuggled\t")],
        denied: None,
    },
    Attack {
        name: "another client's id",
        client: "team-a",
        route: "openai",
        target: "/v1/chat",
        headers: &[(CLIENT_ID_HEADER, "team-b")],
        denied: None,
    },
    Attack {
        name: "query names other clients inject, where the client injects a header",
        client: "team-a",
        route: "openai",
        target: "/v1/chat?key=smuggled&api-key=smuggled&x=1",
        headers: &[],
        denied: None,
    },
    Attack {
        name: "query look-alikes: case, percent-encoding, array suffix, `.` `_` and space for `-`, `;`",
        client: "team-a",
        route: "openai",
        target: "/v1/chat?KEY=smuggled&k%65y=smuggled&key%5B%5D=smuggled&api_key=smuggled&api.key=smuggled&%20key=smuggled&api%2Dkey=smuggled&API%2dKEY=smuggled;key=smuggled&api+key=smuggled",
        headers: &[],
        denied: None,
    },
    Attack {
        name: "the client's own query parameter, given twice",
        client: "team-a",
        route: "search",
        target: "/search?key=smuggled&q=x&key=smuggled",
        headers: &[],
        denied: None,
    },
    Attack {
        name: "another client's query parameter on the route the client brings a header for",
        client: "team-q",
        route: "openai",
        target: "/v1/chat?api-key=smuggled&key=smuggled",
        headers: &[("authorization", "Bearer smuggled")],
        denied: None,
    },
    Attack {
        name: "a route only another client brings a credential for",
        client: "team-a",
        route: "partner",
        target: "/partner",
        headers: &[("x-partner-key", SMUGGLED)],
        denied: Some((403, "route_forbidden")),
    },
    Attack {
        name: "a route without inject, for a client without a list for it",
        client: "team-q",
        route: "search",
        target: "/search?key=smuggled",
        headers: &[],
        denied: Some((403, "route_forbidden")),
    },
    Attack {
        name: "a route without inject, for the client that uses the route's credential elsewhere",
        client: "batch",
        route: "search",
        target: "/search",
        headers: &[],
        denied: Some((403, "route_forbidden")),
    },
    Attack {
        name: "two clients' keys at once",
        client: "team-a",
        route: "openai",
        target: "/v1/chat",
        headers: &[("x-api-key", "team-b-key-3")],
        denied: Some((401, "ambiguous_key")),
    },
];

fn judge_attack(attack: &Attack, response: &Response) -> Result<(), String> {
    match attack.denied {
        None => forwarded(response).and_then(|e| judge(&e, attack.client, attack.route)),
        Some((status, reason)) => {
            let body = response.json().map_err(|e| format!("{e}: {}", response.text()))?;
            if response.status != status || body["error"] != reason {
                return Err(format!("want {status} {reason}, got {} {}", response.status, response.text()));
            }
            Ok(())
        }
    }
}

/// Hand-made HTTP/1.1 header bytes no library sends: each request is
/// forwarded and judged like any other, or refused by Envoy's codec (400)
/// before anything reaches the upstream.
const RAW_HEADERS: &[(&str, &[(&str, &str)])] = &[
    (
        "header names in other cases",
        &[
            ("OpenAI-Project", SMUGGLED),
            ("AUTHORIZATION", "Bearer smuggled"),
            ("X-Partner-Key", SMUGGLED),
            ("Openai_Organization", SMUGGLED),
        ],
    ),
    ("a space before the colon", &[("openai-project ", SMUGGLED)]),
    ("a tab before the colon", &[("openai-project\t", SMUGGLED)]),
    ("a tab-padded value", &[("openai-project", "\tsmuggled \t")]),
    (
        "interleaved repeats, mixed case",
        &[("Openai-Project", "smuggled-1"), ("x-other", "1"), ("openai-PROJECT", "smuggled-2")],
    ),
    (
        "a folded continuation line (Envoy unfolds it into `x-other`'s value)",
        &[("x-other", "1\r\n openai-project: smuggled")],
    ),
];

#[test]
fn a_client_cannot_smuggle_a_value_under_another_clients_names_or_use_its_route() {
    let echo = Echo::start("127.0.0.1:0").expect("echo");
    let envoy = start_static(&echo);
    let addr = envoy.listener(LISTENER).expect("listener");
    let mut failures = Vec::new();
    for attack in ATTACKS {
        for http2 in [false, true] {
            let mut r = request(attack.client, attack.route, attack.target);
            for (name, value) in attack.headers {
                r = r.header(name, value);
            }
            if http2 {
                r = r.http2();
            }
            match r.send(addr) {
                Ok(response) => {
                    if let Err(e) = judge_attack(attack, &response) {
                        failures.push(format!("{} (http2 {http2}): {e}", attack.name));
                    }
                }
                Err(e) => failures.push(format!("{} (http2 {http2}): {e}", attack.name)),
            }
        }
    }
    let mut refused_by_envoy = Vec::new();
    for (name, headers) in RAW_HEADERS {
        let mut r = raw::Request::get("/v1/chat")
            .header("Host", "api.test")
            .header(ROUTE_HEADER, "openai")
            .header("X-Api-Key", key("team-a"));
        for (n, v) in *headers {
            r = r.header(n, v);
        }
        match r.header("Connection", "close").send(addr) {
            Ok(response) if response.status == 400 && Echoed::parse(&response.body).is_none() => {
                refused_by_envoy.push(*name);
            }
            Ok(response) => {
                if let Err(e) = forwarded(&response).and_then(|e| judge(&e, "team-a", "openai")) {
                    failures.push(format!("raw: {name}: {e}"));
                }
            }
            Err(e) => failures.push(format!("raw: {name}: {e}")),
        }
    }
    assert!(failures.is_empty(), "{} attacks got through:\n{}", failures.len(), failures.join("\n"));
    // What Envoy's codec refuses never reaches keyswap; the rest were
    // forwarded and judged (names and cases Envoy passes on included).
    assert!(refused_by_envoy.len() < RAW_HEADERS.len(), "every raw request refused: {refused_by_envoy:?}");
    eprintln!("refused by Envoy's codec: {refused_by_envoy:?}");
}

fn oauth2(secret_var: &str) -> serde_json::Value {
    serde_json::json!({"header": "authorization", "prefix": "Bearer ",
                       "value": {"oauth2": {"cluster": "idp", "token_path": "/oauth/token",
                                            "client_id": {"inline": "keyswap-gw"},
                                            "client_secret": {"env": secret_var}, "timeout_ms": 5000}}})
}

/// The route `orders` and two clients' own lists make the same OAuth2
/// call, each its own (`batch` uses the route's).
fn dynamic_config() -> String {
    serde_json::json!({
        "clients": [
            {"id": "batch", "key": key("batch"), "routes": ["orders"]},
            {"id": "team-a", "key": key("team-a"), "routes": ["orders"], "inject": {"orders": [oauth2("IDP_SECRET")]}},
            {"id": "team-b", "key": key("team-b"), "routes": ["orders"],
             "inject": {"orders": [oauth2("IDP_SECRET"), {"header": "x-team", "value": {"inline": "team-b-static"}}]}}
        ],
        "key_sources": [{"header": "x-api-key"}],
        "routes": [{"name": "orders", "match": {"route_name": "orders", "clusters": ["orders"]}, "inject": [oauth2("IDP_SECRET")]}],
        "client_id_header": CLIENT_ID_HEADER
    })
    .to_string()
}

/// `client`'s request on `orders`: `Ok((authorization, x-team))` when
/// forwarded, else Envoy's (or the upstream's) answer.
fn send_orders(envoy: &Envoy, client: &str) -> Result<(String, Option<String>), Response> {
    let addr = envoy.listener(LISTENER).expect("listener");
    let response = request(client, "orders", "/orders").send(addr).expect("a response");
    if response.status != 200 {
        return Err(response);
    }
    let echoed = Echoed::parse(&response.body).expect("echo JSON");
    assert_eq!(echoed.header_all(CLIENT_ID_HEADER), [client]);
    let bearer = echoed.header_all("authorization");
    assert_eq!(bearer.len(), 1, "{client}: one authorization: {bearer:?}");
    Ok((bearer[0].to_string(), echoed.header("x-team").map(str::to_string)))
}

/// Polls `client`'s requests through 503 `credential_unavailable` until
/// one is forwarded; returns its bearer.
fn first_token(envoy: &Envoy, client: &str, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        match send_orders(envoy, client) {
            Ok((bearer, _)) => return bearer,
            Err(r) => assert!(unavailable(&r), "{client}: {} {}", r.status, r.text()),
        }
        assert!(Instant::now() < deadline, "{client}: no token within {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_clients_own_oauth2_token_is_its_own_call_reaches_only_it_and_is_refetched_alone_on_401() {
    const CLIENT_SECRET: &str = "idp-client-secret-pc";
    let token =
        TokenServer::start_numbered(r#"{"access_token":"tok-{n}-issued","token_type":"Bearer","expires_in":3600}"#)
            .expect("token server");
    let upstream = Rejecting::start().expect("upstream");
    let env = BTreeMap::from([("IDP_SECRET".to_string(), CLIENT_SECRET.to_string())]);
    let envoy = start(dynamic_config(), env, upstream.addr(), &[("idp", &token)]);
    // The three calls first, so that few requests are refused meanwhile
    // (keyswap's 401 line below shares the denial lines' rate limit).
    let deadline = Instant::now() + Duration::from_secs(15);
    while token.count() < 3 {
        assert!(Instant::now() < deadline, "{} token calls within 15 s\n{}", token.count(), envoy.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let clients = ["batch", "team-a", "team-b"];
    let mut tokens = BTreeMap::new();
    for client in clients {
        tokens.insert(client, first_token(&envoy, client, Duration::from_secs(15)));
    }
    // Three records, three calls (the same call each: the grant is the
    // same), three different tokens.
    let calls = token.calls();
    assert_eq!(calls.len(), 3, "one call per record: {:?}", calls.iter().map(|c| &c.body).collect::<Vec<_>>());
    assert!(calls.iter().all(|c| c.body == calls[0].body && c.path == "/oauth/token"));
    let distinct: std::collections::BTreeSet<&String> = tokens.values().collect();
    assert_eq!(distinct.len(), 3, "each client its own token: {tokens:?}");

    // Interleaved on both workers: each client only ever gets its own.
    let judge = |client: &str, tokens: &BTreeMap<&str, String>| -> Result<(), String> {
        match send_orders(&envoy, client) {
            Ok((bearer, team)) if bearer == tokens[client] => {
                let want = (client == "team-b").then(|| "team-b-static".to_string());
                (team == want).then_some(()).ok_or_else(|| format!("{client}: x-team {team:?}"))
            }
            Ok((bearer, _)) => Err(format!("{client} got {bearer:?}, its own is {:?}", tokens[client])),
            Err(r) => Err(format!("{client}: {} {}", r.status, r.text())),
        }
    };
    let wrong: Vec<String> = std::thread::scope(|s| {
        let senders: Vec<_> = (0..3)
            .map(|sender| {
                let tokens = &tokens;
                s.spawn(move || {
                    (0..50).filter_map(|i| judge(clients[(sender + i) % 3], tokens).err()).collect::<Vec<_>>()
                })
            })
            .collect();
        senders.into_iter().flat_map(|t| t.join().expect("sender")).collect()
    });
    assert!(wrong.is_empty(), "{} mix-ups: {wrong:?}", wrong.len());
    assert_eq!(serving_workers(&envoy, SystemTime::UNIX_EPOCH).len(), 2, "both workers served");

    // The upstream rejects team-a's token. team-a's record alone is
    // refetched; while that call is in flight (the token server holds it)
    // team-a's old token is still sent (the upstream answers 401, keyswap
    // never 503), and team-b and batch keep theirs throughout.
    token.hold();
    upstream.reject(&tokens["team-a"], 1);
    let rejected = send_orders(&envoy, "team-a").expect_err("team-a's token rejected");
    assert!(upstream_401(&rejected), "{} {}", rejected.status, rejected.text());
    let mut team_a_401s = 1;
    let deadline = Instant::now() + Duration::from_secs(5);
    while token.count() < 4 {
        assert!(Instant::now() < deadline, "no refresh for team-a within 5 s of its 401\n{}", envoy.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let others = |tokens: &BTreeMap<&str, String>| {
        for other in ["team-b", "batch"] {
            judge(other, tokens).unwrap_or_else(|e| panic!("after team-a's 401: {e}"));
        }
    };
    let held = Instant::now();
    while held.elapsed() < Duration::from_millis(800) {
        others(&tokens);
        let r = send_orders(&envoy, "team-a").expect_err("team-a's old token, until replaced");
        assert!(upstream_401(&r), "team-a while its refresh is in flight: {} {}", r.status, r.text());
        team_a_401s += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    token.release();
    let deadline = Instant::now() + Duration::from_secs(10);
    let renewed = loop {
        others(&tokens);
        match send_orders(&envoy, "team-a") {
            Ok((bearer, _)) => break bearer,
            Err(r) => assert!(upstream_401(&r), "team-a after its 401: {} {}", r.status, r.text()),
        }
        team_a_401s += 1;
        assert!(Instant::now() < deadline, "team-a: no new token within 10 s\n{}", envoy.log());
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(renewed, "Bearer tok-4-issued", "team-a's new token is the fourth call's");
    assert_eq!(upstream.rejected(), team_a_401s, "every 401 was team-a's old token");
    assert_eq!(token.count(), 4, "{team_a_401s} 401s: one more call, for team-a's record only");
    assert_eq!(rejected_total(&envoy, "orders"), Some(1));
    tokens.insert("team-a", renewed);
    for client in clients {
        judge(client, &tokens).unwrap_or_else(|e| panic!("afterwards: {e}"));
    }
    let ours = keyswap_lines(&envoy.log());
    let line = |path: &str, text: &str| ours.matches(&format!("credential {path} (oauth2): {text}")).count();
    let (a, b, route) = (
        "clients[1].inject.orders[0].value.oauth2",
        "clients[2].inject.orders[0].value.oauth2",
        "routes[0].inject[0].value.oauth2",
    );
    let marked = "the upstream answered 401 to it; replacing it, fetching a new one";
    let replaced = "new value fetched after the upstream rejected the last one";
    assert_eq!((line(a, marked), line(a, replaced)), (1, 1), "{ours}");
    assert_eq!([b, route].map(|p| line(p, marked) + line(p, replaced)), [0, 0], "{ours}");
    for secret in ["-issued", CLIENT_SECRET] {
        assert!(!ours.contains(secret), "{secret} in keyswap's log:\n{ours}");
    }
}
