//! The per-client fetch (a credential broker) in the real Envoy with two
//! workers: a loopback credential service answers each client its own
//! value (`ak-<client>`), and several clients' first requests arrive at
//! once, interleaved, on both workers. Every upstream request must carry
//! exactly its own client's value, and the service must see one call per
//! client across both workers (no refresh is due within the test).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use keyswap_tests::echo::{Echo, Echoed};
use keyswap_tests::envoy::{filter_wasm, gateway, Envoy, Launch, Listener, ROUTE_HEADER};
use keyswap_tests::http::Request;
use keyswap_tests::server::{Received, Reply, Server};

const CLIENTS: usize = 6;
const ROUNDS: usize = 12;
const CALLER_HEADER: &str = "x-caller-token";

fn key(i: usize) -> String {
    format!("broker-client-key-{i}")
}

fn config() -> String {
    let clients: Vec<serde_json::Value> = (0..CLIENTS)
        .map(|i| serde_json::json!({"id": format!("client-{i}"), "key": key(i), "routes": ["*"]}))
        .collect();
    serde_json::json!({
        "clients": clients,
        "key_sources": [{"header": "x-api-key"}],
        "caller_token_header": CALLER_HEADER,
        "routes": [{"name": "orders", "match": {"route_name": "orders", "clusters": ["orders"]},
                    "inject": [{"header": "x-access-key",
                                "value": {"fetch": {"cluster": "broker", "path": "/v1/credentials/{client}",
                                                    "authorization": {"inline": "Bearer gateway-identity"},
                                                    "json_pointer": "/access_key", "timeout_ms": 3000}}}]}]
    })
    .to_string()
}

/// Calls per client, and the `authorization` each call carried.
type Calls = Arc<Mutex<BTreeMap<String, Vec<String>>>>;

fn credential_service(calls: Calls) -> Server {
    Server::start("127.0.0.1:0", move |request: Received| {
        let client = request.target.strip_prefix("/v1/credentials/").unwrap_or("?").to_string();
        let auth = request.header("authorization").unwrap_or_default().to_string();
        if let Ok(mut calls) = calls.lock() {
            calls.entry(client.clone()).or_default().push(auth);
        }
        Reply::json(200, serde_json::json!({"access_key": format!("ak-{client}")}).to_string())
    })
    .expect("credential service")
}

#[test]
fn each_client_gets_only_its_own_value_with_one_call_per_client_across_two_workers() {
    let calls = Calls::default();
    let service = credential_service(Arc::clone(&calls));
    let wasm = filter_wasm().unwrap_or_else(|e| panic!("{e}"));
    let echo = Echo::start("127.0.0.1:0").expect("echo");
    let listener =
        Listener { name: "broker".into(), config: config(), route_names: vec!["orders".into()], ..Listener::default() };
    let mut bootstrap = gateway(std::slice::from_ref(&listener), echo.addr(), &wasm);
    bootstrap["static_resources"]["clusters"].as_array_mut().expect("clusters").push(serde_json::json!({
        "name": "broker", "type": "STATIC", "connect_timeout": "1s",
        "load_assignment": {"cluster_name": "broker", "endpoints": [{"lb_endpoints": [{"endpoint": {"address":
            {"socket_address": {"address": "127.0.0.1", "port_value": service.addr().port()}}}}]}]}
    }));
    let launch = Launch {
        file_name: "envoy.json".into(),
        text: bootstrap.to_string(),
        expect_configs: vec![listener.config],
        ..Launch::default()
    };
    let envoy = Envoy::start_workers(&launch, 2).unwrap_or_else(|e| panic!("Envoy starts: {e}"));
    let addr = envoy.listener("broker").expect("listener");

    // Every client's requests from two threads at once, from the first
    // one on: first requests wait together, later ones hit the cache.
    let threads: Vec<_> = (0..CLIENTS * 2)
        .map(|t| {
            std::thread::spawn(move || {
                let i = t % CLIENTS;
                let mut seen = Vec::new();
                for round in 0..ROUNDS {
                    let mut request =
                        Request::get("/v1/orders").header("host", "api.test").header(ROUTE_HEADER, "orders");
                    request = request.header("x-api-key", key(i));
                    if t < CLIENTS && round == 0 {
                        request = request.header(CALLER_HEADER, format!("Bearer user-of-{i}"));
                    }
                    let response = request.send(addr).expect("request");
                    assert_eq!(response.status, 200, "client {i}: {}", String::from_utf8_lossy(&response.body));
                    let echoed = Echoed::parse(&response.body).expect("echo JSON");
                    assert_eq!(echoed.header(CALLER_HEADER), None, "the caller token reached the upstream");
                    seen.push(echoed.header("x-access-key").map(str::to_string));
                }
                (i, seen)
            })
        })
        .collect();
    for thread in threads {
        let (i, seen) = thread.join().expect("client thread");
        let own = Some(format!("ak-client-{i}"));
        assert!(seen.iter().all(|s| *s == own), "client {i} saw {seen:?}\n{}", envoy.log());
    }
    let calls = calls.lock().expect("calls").clone();
    assert_eq!(calls.len(), CLIENTS, "{calls:?}");
    for (client, auths) in &calls {
        assert_eq!(auths.len(), 1, "{client}: one call across both workers, got {auths:?}");
        let caller = format!("Bearer user-of-{}", client.trim_start_matches("client-"));
        assert!(
            auths[0] == caller || auths[0] == "Bearer gateway-identity",
            "{client}: the call carried neither its caller's token nor the gateway's: {auths:?}"
        );
    }
}
