//! The benchmark job: one definition for the Envoy side-by-side benchmark
//! (`tests/src/bin/envoy-bench.rs`: keyswap and the listeners doing the
//! same job another way) and the in-harness micro-benchmark
//! (`host-harness/src/bench.rs`, `keyswap bench`).
//!
//! The job: [`CLIENTS`] clients, client `i` with key [`key`]`(i)` and id
//! [`client_id`]`(i)`; the key comes in `authorization: Bearer <key>`; the
//! client id is forwarded in [`CLIENT_HEADER`]; the key never reaches the
//! upstream, which gets `authorization: Bearer` [`CREDENTIAL`]; the
//! [`STRIPPED`] headers are removed. Client [`EXPIRED_CLIENT`] has expired
//! and client [`OTHER_ROUTE_CLIENT`] may use only route [`OTHER_ROUTE`], so
//! that every denial can be provoked; the load uses [`load_client`].
//!
//! Variants of the job change one thing each: [`with_limits`] gives
//! clients a rate and a quota; [`with_per_client_fetch`] and
//! [`with_on_behalf_of`] take route [`ROUTE`]'s credential from a
//! credential service per client (issue 16's broker) or from an STS per
//! caller's subject ([`SUBJECT_HEADER`]), for what the cached dynamic
//! paths cost next to the static one.
//!
//! It lives here, beside the ECDS resource, because it is a keyswap
//! configuration bound to Envoy's routes and clusters, and because both
//! benchmarks' crates already depend on this one (the harness for
//! `keyswap push`, the tests for the resources they write) while this one
//! depends on neither: no import circle, no new dependency.

use std::collections::BTreeMap;

use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

/// The client count of the Envoy benchmark.
pub const CLIENTS: usize = 1_000;

/// The route every load request takes (keyswap's, and Envoy's of that name).
pub const ROUTE: &str = "bench";

/// The route only [`OTHER_ROUTE_CLIENT`] may use.
pub const OTHER_ROUTE: &str = "other";

/// The VM environment variable the route's credential comes from.
pub const CREDENTIAL_ENV: &str = "BENCH_UPSTREAM_CREDENTIAL";

/// The upstream credential (a benchmark value that guards nothing).
pub const CREDENTIAL: &str = "bench-upstream-credential";

/// The header the client id is forwarded in.
pub const CLIENT_HEADER: &str = "x-keyswap-client";

/// The header the key comes in, and its prefix.
pub const KEY_HEADER: &str = "authorization";
pub const KEY_PREFIX: &str = "Bearer ";

/// The request headers removed before the upstream.
pub const STRIPPED: [&str; 4] = ["cookie", "proxy-authorization", "x-debug-token", "x-internal-user"];

/// The client whose key has expired.
pub const EXPIRED_CLIENT: usize = 0;

/// The client allowed only [`OTHER_ROUTE`].
pub const OTHER_ROUTE_CLIENT: usize = 1;

/// Client `i`'s key.
pub fn key(i: usize) -> String {
    format!("bench-key-{i:06}")
}

/// Client `i`'s id.
pub fn client_id(i: usize) -> String {
    format!("client-{i:06}")
}

/// The client whose key the load uses: one in the middle.
pub fn load_client(clients: usize) -> usize {
    clients / 2
}

/// `authorization`'s value carrying client `i`'s key.
pub fn bearer(i: usize) -> String {
    format!("{KEY_PREFIX}{}", key(i))
}

/// What `authorization` carries to the upstream: the credential.
pub fn upstream_authorization() -> String {
    format!("{KEY_PREFIX}{CREDENTIAL}")
}

/// The [`STRIPPED`] headers as every load request carries them.
pub fn stripped_headers() -> [(&'static str, &'static str); 4] {
    [
        ("cookie", "session=bench-session"),
        ("proxy-authorization", "Basic YmVuY2g6YmVuY2g="),
        ("x-debug-token", "bench-debug"),
        ("x-internal-user", "bench-user"),
    ]
}

/// What every load request carries besides the request line and `host`:
/// the key of [`load_client`], then the headers to strip.
pub fn load_headers(clients: usize) -> Vec<(String, String)> {
    let mut headers = vec![(KEY_HEADER.to_string(), bearer(load_client(clients)))];
    headers.extend(stripped_headers().iter().map(|(n, v)| ((*n).to_string(), (*v).to_string())));
    headers
}

/// How keyswap's routes are matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binding<'a> {
    /// Each route bound to Envoy's route of its name and a cluster:
    /// [`ROUTE`] to this one, [`OTHER_ROUTE`] to `other`. The harness gives
    /// `bench` (the route's own name); Envoy, each listener's own cluster.
    Cluster(&'a str),
    /// Routes matched by `path_prefix` (`/` for [`ROUTE`]): keyswap on the
    /// listener only, as deployed before its two stages.
    PathPrefix,
}

/// `config` (the job's configuration) with a rate and a quota no run
/// reaches given to client `which` (every client for `None`): what
/// counting a request costs (two buckets each), next to the same request
/// unlimited.
pub fn with_limits(config: &str, which: Option<usize>) -> String {
    let Ok(mut json) = serde_json::from_str::<Value>(config) else { return config.to_string() };
    let limits = json!({"rate": {"requests": 1_000_000, "per": "second", "burst": 1_000_000},
                        "quota": {"requests": 1_000_000_000, "per": "day"}});
    if let Some(clients) = json["clients"].as_array_mut() {
        for (i, client) in clients.iter_mut().enumerate() {
            if which.is_none_or(|w| w == i) {
                client["limits"] = limits.clone();
            }
        }
    }
    json.to_string()
}

/// The Envoy cluster of the credential service [`with_per_client_fetch`]
/// calls.
pub const BROKER_CLUSTER: &str = "bench-broker";

/// The path the credential service is asked, `{client}` the client's id.
pub const BROKER_PATH: &str = "/v1/credentials/{client}";

/// The Envoy cluster of the STS [`with_on_behalf_of`] calls.
pub const STS_CLUSTER: &str = "bench-sts";

/// The STS's token endpoint.
pub const STS_PATH: &str = "/v1/token";

/// The request header the subject token comes in (after [`KEY_PREFIX`]).
pub const SUBJECT_HEADER: &str = "x-user-token";

/// The audience the subject is exchanged for.
pub const AUDIENCE: &str = "bench-upstream";

/// Subject `i`'s token, as the caller forwards it (no JWT: no `exp` cap).
pub fn subject(i: usize) -> String {
    format!("bench-subject-{i:03}")
}

/// The subject the load forwards.
pub const LOAD_SUBJECT: usize = 0;

/// What the credential service answers for client `client_id`: a value of
/// that client's own, at `/credential`.
pub fn broker_answer(client_id: &str) -> String {
    json!({"credential": fetched_credential(client_id)}).to_string()
}

/// The credential fetched for client `client_id`.
pub fn fetched_credential(client_id: &str) -> String {
    format!("{CREDENTIAL}-for-{client_id}")
}

/// What the STS answers for `subject` (RFC 8693; valid a day, so no run
/// sees a refresh).
pub fn sts_answer(subject: &str) -> String {
    json!({"access_token": exchanged_token(subject),
           "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
           "token_type": "Bearer", "expires_in": 86_400})
    .to_string()
}

/// The token exchanged for `subject`.
pub fn exchanged_token(subject: &str) -> String {
    format!("{CREDENTIAL}-on-behalf-of-{subject}")
}

/// `config` (the job's configuration) with route [`ROUTE`]'s credential
/// fetched per client from [`BROKER_CLUSTER`] ([`BROKER_PATH`], the value
/// at `/credential` of [`broker_answer`]) instead of the VM environment;
/// refreshed after a day, so a run only ever reads the cache once each
/// client's first request has waited for its call.
pub fn with_per_client_fetch(config: &str) -> String {
    let fetch = json!({"fetch": {"cluster": BROKER_CLUSTER, "path": BROKER_PATH, "json_pointer": "/credential",
                                 "authorization": {"inline": "Bearer bench-gateway-identity"},
                                 "refresh_seconds": 86_400, "timeout_ms": 2000}});
    with_bench_credential(config, fetch)
}

/// `config` with route [`ROUTE`]'s credential exchanged on behalf of the
/// caller: the subject token from [`SUBJECT_HEADER`] (prefix
/// [`KEY_PREFIX`]) exchanged at [`STS_CLUSTER`] for [`AUDIENCE`]
/// ([`sts_answer`]); cached until a day runs out.
pub fn with_on_behalf_of(config: &str) -> String {
    let exchange = json!({"token_exchange": {"cluster": STS_CLUSTER, "token_path": STS_PATH, "audience": AUDIENCE,
        "subject_token": {"header": SUBJECT_HEADER, "prefix": KEY_PREFIX},
        "client_id": {"inline": "keyswap-bench"}, "client_secret": {"inline": "bench-sts-secret"},
        "timeout_ms": 2000}});
    with_bench_credential(config, exchange)
}

/// `config` with route [`ROUTE`]'s injected value replaced by `value`.
fn with_bench_credential(config: &str, value: Value) -> String {
    let Ok(mut json) = serde_json::from_str::<Value>(config) else { return config.to_string() };
    if let Some(routes) = json["routes"].as_array_mut() {
        for route in routes.iter_mut().filter(|r| r["name"] == ROUTE) {
            route["inject"] = json!([{"header": KEY_HEADER, "prefix": KEY_PREFIX, "value": value.clone()}]);
        }
    }
    json.to_string()
}

/// The job's keyswap configuration with `clients` clients (at least 3),
/// compact JSON.
pub fn config(clients: usize, binding: Binding<'_>) -> String {
    let digest =
        |i: usize| -> String { Sha256::digest(key(i).as_bytes()).iter().map(|b| format!("{b:02x}")).collect() };
    let clients: Vec<Value> = (0..clients.max(3))
        .map(|i| {
            let mut client = json!({"id": client_id(i), "key_sha256": digest(i), "routes": [ROUTE]});
            if i == EXPIRED_CLIENT {
                client["expires"] = json!("2000-01-01T00:00:00Z");
            }
            if i == OTHER_ROUTE_CLIENT {
                client["routes"] = json!([OTHER_ROUTE]);
            }
            client
        })
        .collect();
    let matching = |route: &str, cluster: &str| match binding {
        Binding::Cluster(_) => json!({"route_name": route, "clusters": [cluster]}),
        Binding::PathPrefix if route == ROUTE => json!({"path_prefix": "/"}),
        Binding::PathPrefix => json!({"path_prefix": format!("/{route}/")}),
    };
    let bench_cluster = match binding {
        Binding::Cluster(cluster) => cluster,
        Binding::PathPrefix => ROUTE,
    };
    let inject = json!([{"header": KEY_HEADER, "prefix": KEY_PREFIX, "value": {"env": CREDENTIAL_ENV}}]);
    json!({
        "clients": clients,
        "key_sources": [{"header": KEY_HEADER, "prefix": KEY_PREFIX}],
        "routes": [
            {"name": ROUTE, "match": matching(ROUTE, bench_cluster), "inject": inject},
            {"name": OTHER_ROUTE, "match": matching(OTHER_ROUTE, OTHER_ROUTE), "inject": inject},
        ],
        "strip_request_headers": STRIPPED,
        "client_id_header": CLIENT_HEADER,
        "unmatched_route": "deny",
    })
    .to_string()
}

/// The VM environment [`config`] needs.
pub fn env() -> BTreeMap<String, String> {
    BTreeMap::from([(CREDENTIAL_ENV.to_string(), CREDENTIAL.to_string())])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configuration_has_every_client_and_both_bindings() {
        let json: Value = serde_json::from_str(&config(10, Binding::Cluster("responder-keyswap"))).unwrap();
        let clients = json["clients"].as_array().unwrap();
        assert_eq!(clients.len(), 10);
        assert_eq!(clients[EXPIRED_CLIENT]["expires"], "2000-01-01T00:00:00Z");
        assert_eq!(clients[OTHER_ROUTE_CLIENT]["routes"], json!([OTHER_ROUTE]));
        assert_eq!(clients[5]["id"], client_id(5));
        assert_eq!(json["routes"][0]["match"]["clusters"], json!(["responder-keyswap"]));
        let json: Value = serde_json::from_str(&config(3, Binding::PathPrefix)).unwrap();
        assert_eq!(json["routes"][0]["match"], json!({"path_prefix": "/"}));
        assert_eq!(load_headers(CLIENTS)[0], ("authorization".to_string(), "Bearer bench-key-000500".to_string()));
    }

    #[test]
    fn the_dynamic_variants_change_only_the_bench_routes_credential() {
        let base = config(10, Binding::Cluster(ROUTE));
        let fetch: Value = serde_json::from_str(&with_per_client_fetch(&base)).unwrap();
        let obo: Value = serde_json::from_str(&with_on_behalf_of(&base)).unwrap();
        let base: Value = serde_json::from_str(&base).unwrap();
        assert_eq!(fetch["routes"][0]["inject"][0]["value"]["fetch"]["path"], BROKER_PATH);
        assert_eq!(obo["routes"][0]["inject"][0]["value"]["token_exchange"]["subject_token"]["header"], SUBJECT_HEADER);
        for changed in [&fetch, &obo] {
            assert_eq!(changed["routes"][1], base["routes"][1]);
            assert_eq!(changed["clients"], base["clients"]);
            assert_eq!(changed["strip_request_headers"], base["strip_request_headers"]);
        }
        assert_eq!(
            serde_json::from_str::<Value>(&broker_answer("client-000005")).unwrap()["credential"],
            fetched_credential("client-000005")
        );
    }
}
