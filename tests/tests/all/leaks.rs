//! Secrets never leak: Envoy at `trace` through every denial, the success
//! path of every credential form, a client's several `keys` (live,
//! expired, disabled, not yet valid; its metadata sent upstream), a
//! configuration reload (LDS) and `keyswap push` (ECDS: a revocation, and
//! a push Envoy rejects), `keyswap rotate` and `revoke --key` (the new key
//! may show once, in rotate's output, and nowhere else), and
//! dynamic credentials (`oauth2` with Basic and with body client
//! authentication, `token_exchange`, `fetch`, against loopback token
//! servers: a refused answer, first values, a rotation; an on-behalf-of
//! exchange and a per-client fetch, with a caller's subject token and
//! caller token, allowed and denied), then every inbound
//! key, every upstream credential that came from Envoy's environment, every
//! secret the filter sends its token endpoints (client secrets, also as
//! base64 of `client_id:client_secret`, the subject token, the credential
//! service's `authorization`, a caller's subject and caller tokens) and
//! every token or value they answered is
//! searched for in Envoy's whole log (with the shipped access log), in
//! every local response, and in the admin's `/config_dump` and `/stats`,
//! and in what `keyswap push` prints. None may appear.
//!
//! The search is shown to work on the same texts: the `inline` credential
//! and the plaintext `key` (both part of the configuration, documented as
//! visible) must be found in `/config_dump`, and the log must hold trace
//! lines, the filter's lines (for dynamic credentials: every refresh, a
//! failed one and its recovery) and one access-log line per request.
//! Every dynamic route is polled until the upstream receives what its
//! server issued, and the token servers must have received the secrets.
//!
//! Envoy's own HTTP components print request headers verbatim at
//! debug/trace (see SECURITY.md, "Envoy's own logs"); they run at `info`
//! here, as [`QUIET_COMPONENTS`], the setting SECURITY.md recommends.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::sha256_hex;

use keyswap_tests::echo::{Echo, Echoed};
use keyswap_tests::envoy::{filter_wasm, gateway, repo_root, Envoy, Launch, Listener, LogLevels, ROUTE_HEADER};
use keyswap_tests::http::{Request, Response};
use keyswap_tests::revocation::EcdsGateway;

/// Envoy components that print request headers verbatim below `info`,
/// found by running this test without them (every secret leaked):
/// `http` (the connection manager's "request headers complete" at debug,
/// the HTTP/1 codec's "completed header: key=… value=…" at trace),
/// `router` ("router decoding headers" at debug: the upstream request,
/// with the injected credential). `http2`, the HTTP/2 codec's component,
/// is added as a precaution: this test speaks HTTP/1.1, so it is not
/// exercised. The rest of Envoy stays at `trace`.
pub const QUIET_COMPONENTS: &str = "http:info,http2:info,router:info";

// Inbound keys: each names where it is used, so a finding says which path leaked.
const KEY_ALPHA: &str = "ksk-alpha-9f2c41d7e0b3"; // allowed on every route
const KEY_BETA: &str = "ksk-beta-51a8e6c2d94f"; // allowed on `chat` only
const KEY_EXPIRED: &str = "ksk-expired-0c7d3b92a1e5";
const KEY_DISABLED: &str = "ksk-disabled-e84f2a6b17c9";
const KEY_UNKNOWN: &str = "ksk-unknown-3b6e9d0f42a8"; // configured nowhere
const KEY_ROTATED_1: &str = "ksk-rotated-one-7a1c5e38b2d0"; // the LDS listener, before the reload
const KEY_ROTATED_2: &str = "ksk-rotated-two-d29b0e4f6c17"; // ... and after
const KEY_PUSHED_1: &str = "ksk-pushed-one-5c2e8a1f93d4"; // the ECDS gateway, before `keyswap push`
const KEY_PUSHED_2: &str = "ksk-pushed-two-b7d04f6a2e91"; // ... and after
                                                          // One client's `keys`: live (given id), expired, disabled, not yet valid.
const KEY_MULTI_LIVE: &str = "ksk-multi-live-0d4e7a2c9b15";
const KEY_MULTI_OLD: &str = "ksk-multi-old-8b3f1e6d0a72";
const KEY_MULTI_OFF: &str = "ksk-multi-off-5e9a2d7c4b01";
const KEY_MULTI_LATER: &str = "ksk-multi-later-c7a0e3b9f264";

// Upstream credentials from Envoy's environment (host_env_keys).
const CREDENTIALS: [(&str, &str); 8] = [
    ("CHAT_CREDENTIAL", "cred-chat-6d0e2b9a4f71"),
    ("FILES_CREDENTIAL", "cred-files-a3f95c1e08b2"),
    ("REGISTRY_PASSWORD", "cred-registry-4e7b2d9c05a6"),
    ("MAPS_CREDENTIAL", "cred-maps-b81f3a6e2c94"),
    ("ROTATED_CREDENTIAL_1", "cred-rotated-one-2c5a9e0d7f13"),
    ("ROTATED_CREDENTIAL_2", "cred-rotated-two-9e4d1b7a3c58"),
    ("PUSHED_CREDENTIAL_1", "cred-pushed-one-41e9c7b2a0d6"),
    ("PUSHED_CREDENTIAL_2", "cred-pushed-two-e05a3d8c6f27"),
];

// Dynamic credentials: what the filter sends its token endpoints and
// credential service, from Envoy's environment (host_env_keys) ...
const DYNAMIC_ENV: [(&str, &str); 4] = [
    ("IDP_CLIENT_SECRET", "idp-secret-basic-7c1e93a0d5f2"), // oauth2, Basic client auth (the default)
    ("IDP_BODY_CLIENT_SECRET", "idp-secret-body-e2a6f08b4c19"), // oauth2, `client_auth: "body"`
    ("SUBJECT_TOKEN", "subject-token-3f8b5d2e9a07"),        // token_exchange
    ("VAULT_AUTHORIZATION", "Bearer vault-token-a94c1e6b2d38"), // fetch's `authorization`
];
const CLIENT_ID_BASIC: &str = "gw-basic";
const CLIENT_ID_BODY: &str = "gw-body";
const VAULT_TOKEN: &str = "vault-token-a94c1e6b2d38";
// ... and what those answer.
const ISSUED: [(&str, &str); 9] = [
    ("token rejected", "at-rejected-8e2b4d6f1a03"), // an answer the filter refuses (bad expires_in)
    ("token basic", "at-basic-5d9e2c7b10f4"),
    ("token body", "at-body-b37a0e9c6d21"),
    ("token exchanged", "te-billing-0f6c2a8e4b95"),
    ("fetched id 1", "fk-id-one-2a7d9b3e5c01"),
    ("fetched secret 1", "fk-secret-one-c4e81f0a7b36"),
    ("fetched id 2", "fk-id-two-93e0b6d1a7f4"),
    ("fetched secret 2", "fk-secret-two-6b0d3a9e2f48"),
    ("token on behalf", "te-obo-7b2e9c4a1d63f805"), // an on-behalf-of exchange's token
];
// What callers send for the filter's calls only: an on-behalf-of
// exchange's subject token (`x-user-token`) and a per-client fetch's
// caller token (`caller_token_header`).
const SUBJECT_TOKEN_USER: &str = "user-subject-5e1a9c3f7b20";
const CALLER_TOKEN: &str = "caller-token-2d8f4b6e0a91";
const KEY_DYNAMIC: &str = "ksk-dynamic-4c9a2e7f1b60"; // the dynamic-credential listener

fn issued(name: &str) -> &'static str {
    ISSUED.iter().find(|(n, _)| *n == name).map(|(_, v)| *v).expect("an issued test token")
}

fn dynamic_env(name: &str) -> &'static str {
    DYNAMIC_ENV.iter().find(|(n, _)| *n == name).map(|(_, v)| *v).expect("a dynamic test secret")
}

// Part of the configuration by design, and so visible in /config_dump.
const INLINE_CREDENTIAL: &str = "cred-inline-visible-5f0a2e7c";
const PLAIN_KEY: &str = "ksk-plaintext-visible-8b3d1f";

fn credential(name: &str) -> &'static str {
    CREDENTIALS.iter().find(|(n, _)| *n == name).map(|(_, v)| *v).expect("a test credential")
}

/// Every form in which a secret could be written: as is, and base64 (of
/// itself, and, for a Basic password or an OAuth2 client secret, of
/// `user:password`).
fn forms(secret: &str) -> Vec<String> {
    let mut out = vec![secret.to_string(), base64(secret.as_bytes())];
    let user = match secret {
        s if s == credential("REGISTRY_PASSWORD") => Some("ci"),
        s if s == dynamic_env("IDP_CLIENT_SECRET") => Some(CLIENT_ID_BASIC),
        s if s == dynamic_env("IDP_BODY_CLIENT_SECRET") => Some(CLIENT_ID_BODY),
        _ => None,
    };
    if let Some(user) = user {
        out.push(base64(format!("{user}:{secret}").as_bytes()));
    }
    out
}

/// Inbound keys, environment credentials, and the secrets of dynamic
/// credentials (sent to and answered by their endpoints): none may appear
/// anywhere.
fn secrets() -> Vec<(&'static str, &'static str)> {
    let mut all = vec![
        ("key alpha", KEY_ALPHA),
        ("key beta", KEY_BETA),
        ("key expired", KEY_EXPIRED),
        ("key disabled", KEY_DISABLED),
        ("key unknown", KEY_UNKNOWN),
        ("key rotated 1", KEY_ROTATED_1),
        ("key rotated 2", KEY_ROTATED_2),
        ("key pushed 1", KEY_PUSHED_1),
        ("key pushed 2", KEY_PUSHED_2),
        ("key multi live", KEY_MULTI_LIVE),
        ("key multi old", KEY_MULTI_OLD),
        ("key multi off", KEY_MULTI_OFF),
        ("key multi later", KEY_MULTI_LATER),
        ("key dynamic", KEY_DYNAMIC),
    ];
    all.extend(CREDENTIALS.iter().map(|(name, value)| (*name, *value)));
    all.extend(
        DYNAMIC_ENV.iter().filter(|(name, _)| *name != "VAULT_AUTHORIZATION").map(|(name, value)| (*name, *value)),
    );
    all.push(("VAULT_AUTHORIZATION's token", VAULT_TOKEN));
    all.push(("a caller's subject token", SUBJECT_TOKEN_USER));
    all.push(("a caller's token", CALLER_TOKEN));
    all.extend(ISSUED);
    all
}

/// Every secret (in any of its [`forms`]) that shows in `text`, each with
/// what precedes its first appearance on that line.
fn findings(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for (name, secret) in secrets() {
        for form in forms(secret) {
            if let Some(at) = text.find(&form) {
                let line = text[..at].rsplit('\n').next().unwrap_or("");
                let before: Vec<char> = line.chars().rev().take(120).collect();
                let before: String = before.into_iter().rev().collect();
                found.push(format!("{name} ({form}) after: {before:?}"));
            }
        }
    }
    found
}

/// The main listener's configuration: every key state, every inject form.
fn main_config() -> String {
    format!(
        r#"{{
  "clients": [
    {{"id": "alpha", "key_sha256": "{alpha}", "routes": ["*"]}},
    {{"id": "beta", "key_sha256": "{beta}", "routes": ["chat"]}},
    {{"id": "gone", "key_sha256": "{expired}", "routes": ["*"], "expires": "2001-01-01T00:00:00Z"}},
    {{"id": "off", "key_sha256": "{disabled}", "routes": ["*"], "disabled": true}},
    {{"id": "local", "key": "{PLAIN_KEY}", "routes": ["chat"]}},
    {{"id": "multi", "routes": ["*"], "metadata": {{"team": "leak-team", "tier": "gold"}}, "keys": [
      {{"id": "m-live", "key_sha256": "{multi_live}"}},
      {{"key_sha256": "{multi_old}", "expires": "2001-01-01T00:00:00Z"}},
      {{"key_sha256": "{multi_off}", "disabled": true}},
      {{"key_sha256": "{multi_later}", "not_before": "2999-01-01T00:00:00Z"}}]}}
  ],
  "metadata_headers": {{"team": "x-keyswap-team"}},
  "key_sources": [{{"header": "authorization", "prefix": "Bearer "}}, {{"header": "x-api-key"}}, {{"query": "api_key"}}],
  "routes": [
    {{"name": "chat", "match": {{"route_name": "chat", "clusters": ["chat"]}},
     "inject": [{{"header": "authorization", "prefix": "Bearer ", "value": {{"env": "CHAT_CREDENTIAL"}}}}]}},
    {{"name": "files", "match": {{"route_name": "files", "clusters": ["files"]}},
     "inject": [{{"header": "x-upstream-key", "value": {{"env": "FILES_CREDENTIAL"}}}}]}},
    {{"name": "registry", "match": {{"route_name": "registry", "clusters": ["registry"]}},
     "inject": [{{"header": "authorization", "basic": {{"username": "ci", "password": {{"env": "REGISTRY_PASSWORD"}}}}}}]}},
    {{"name": "maps", "match": {{"route_name": "maps", "clusters": ["maps"]}},
     "inject": [{{"query": "key", "value": {{"env": "MAPS_CREDENTIAL"}}}}]}},
    {{"name": "demo", "match": {{"route_name": "demo", "clusters": ["demo"]}},
     "inject": [{{"header": "authorization", "prefix": "Bearer ", "value": {{"inline": "{INLINE_CREDENTIAL}"}}}}]}}
  ],
  "strip_request_headers": ["cookie"],
  "strip_response_headers": ["set-cookie"],
  "client_id_header": "x-keyswap-client"
}}"#,
        alpha = sha256_hex(KEY_ALPHA),
        beta = sha256_hex(KEY_BETA),
        expired = sha256_hex(KEY_EXPIRED),
        disabled = sha256_hex(KEY_DISABLED),
        multi_live = sha256_hex(KEY_MULTI_LIVE),
        multi_old = sha256_hex(KEY_MULTI_OLD),
        multi_off = sha256_hex(KEY_MULTI_OFF),
        multi_later = sha256_hex(KEY_MULTI_LATER),
    )
}

/// The reloaded listener's configuration, before (1) and after (2): one
/// route on Envoy's route (and cluster) `all`.
fn rotated_config(n: u8) -> String {
    let key = if n == 1 { KEY_ROTATED_1 } else { KEY_ROTATED_2 };
    format!(
        r#"{{"clients": [{{"id": "rotated", "key_sha256": "{}", "routes": ["*"]}}],
 "routes": [{{"name": "all", "match": {{"route_name": "all", "clusters": ["all"]}},
  "inject": [{{"header": "authorization", "prefix": "Bearer ", "value": {{"env": "ROTATED_CREDENTIAL_{n}"}}}}]}}]}}"#,
        sha256_hex(key)
    )
}

const MAIN_ROUTES: [&str; 5] = ["chat", "files", "registry", "maps", "demo"];
const ENV_NAMES: [&str; 4] = ["CHAT_CREDENTIAL", "FILES_CREDENTIAL", "REGISTRY_PASSWORD", "MAPS_CREDENTIAL"];

/// How a request carries its key.
#[derive(Debug, Clone, Copy)]
enum Place {
    Bearer,
    ApiKey,
    Query,
}

const PLACES: [Place; 3] = [Place::Bearer, Place::ApiKey, Place::Query];

fn request(route: Option<&str>, key: Option<&str>, place: Place) -> Request {
    let target = match (key, place) {
        (Some(key), Place::Query) => format!("/v1/things?api_key={key}&page=2"),
        _ => "/v1/things?page=2".to_string(),
    };
    let mut request = Request::get(&target).header("host", "gateway.test").header("cookie", "session=s");
    if let Some(route) = route {
        request = request.header(ROUTE_HEADER, route);
    }
    match (key, place) {
        (Some(key), Place::Bearer) => request.header("authorization", format!("Bearer {key}")),
        (Some(key), Place::ApiKey) => request.header("x-api-key", key),
        _ => request,
    }
}

/// A response as text: status line, headers, body.
fn response_text(response: &Response) -> String {
    let mut text = format!("{}\n", response.status);
    for (name, value) in &response.headers {
        text.push_str(&format!("{name}: {value}\n"));
    }
    text.push_str(&response.text());
    text
}

/// What the test saw, to be searched at the end.
#[derive(Default)]
struct Seen {
    /// Local responses (keyswap's denials), whole.
    local: Vec<String>,
    /// Forwarded responses: status and headers only (the echo upstream
    /// reflects the credential it received in its body, by design).
    forwarded_heads: Vec<String>,
    requests: usize,
    reasons: BTreeMap<String, usize>,
}

impl Seen {
    fn deny(&mut self, response: &Response, status: u16, reason: &str, what: &str) {
        self.requests += 1;
        assert_eq!(response.status, status, "{what}: {}", response.text());
        let body = response.json().unwrap_or_else(|e| panic!("{what}: a JSON denial: {e}: {}", response.text()));
        assert_eq!(body["error"], reason, "{what}: {body}");
        *self.reasons.entry(reason.to_string()).or_default() += 1;
        self.local.push(response_text(response));
    }

    /// A forwarded request: returns what the upstream received.
    fn forward(&mut self, response: &Response, what: &str) -> Echoed {
        self.requests += 1;
        assert_eq!(response.status, 200, "{what}: {}", response.text());
        let seen = Echoed::parse(&response.body);
        let seen = seen.unwrap_or_else(|| panic!("{what}: not forwarded: {}", response.text()));
        let head = Response { status: response.status, headers: response.headers.clone(), body: Vec::new() };
        self.forwarded_heads.push(response_text(&head));
        seen
    }
}

/// Sends every denial and every success through the main listener.
fn main_paths(addr: SocketAddr, seen: &mut Seen) {
    let send = |r: Request, what: &str| r.send(addr).unwrap_or_else(|e| panic!("{what}: {e}"));
    for place in PLACES {
        let what = |s: &str| format!("{s} ({place:?})");
        // Every denial reason, with the key in each place.
        let denials: [(Option<&str>, Option<&str>, u16, &str); 9] = [
            (Some("chat"), Some(KEY_UNKNOWN), 401, "invalid_key"),
            (Some("chat"), Some(KEY_DISABLED), 401, "invalid_key"),
            (Some("chat"), Some(KEY_MULTI_OLD), 401, "expired_key"),
            (Some("files"), Some(KEY_MULTI_OFF), 401, "invalid_key"),
            (Some("maps"), Some(KEY_MULTI_LATER), 401, "invalid_key"),
            (Some("files"), Some(KEY_EXPIRED), 401, "expired_key"),
            (Some("files"), Some(KEY_BETA), 403, "route_forbidden"),
            (None, Some(KEY_ALPHA), 404, "no_route"),
            (Some("chat"), None, 401, "missing_key"),
        ];
        for (route, key, status, reason) in denials {
            let w = what(&format!("{reason} on {route:?}"));
            seen.deny(&send(request(route, key, place), &w), status, reason, &w);
        }
        // Two different keys: one in this place, another in a header.
        let alpha = request(Some("chat"), Some(KEY_ALPHA), place);
        let other = match place {
            Place::ApiKey => alpha.header("authorization", format!("Bearer {KEY_BETA}")),
            _ => alpha.header("x-api-key", KEY_BETA),
        };
        let w = what("ambiguous_key");
        seen.deny(&send(other, &w), 401, "ambiguous_key", &w);

        // Every route, allowed: the credential arrives, the key does not.
        for route in MAIN_ROUTES {
            let w = what(&format!("allowed on {route}"));
            let echoed = seen.forward(&send(request(Some(route), Some(KEY_ALPHA), place), &w), &w);
            let sent = format!("{} {:?}", echoed.path, echoed.headers);
            assert!(!sent.contains(KEY_ALPHA), "{w}: the key reached the upstream: {sent}");
            let expected = match route {
                "chat" => format!("Bearer {}", credential("CHAT_CREDENTIAL")),
                "files" => credential("FILES_CREDENTIAL").to_string(),
                "registry" => format!("Basic {}", base64(format!("ci:{}", credential("REGISTRY_PASSWORD")).as_bytes())),
                "maps" => format!("key={}", credential("MAPS_CREDENTIAL")),
                _ => format!("Bearer {INLINE_CREDENTIAL}"),
            };
            assert!(sent.contains(&expected), "{w}: the upstream did not get {expected:?}: {sent}");
        }
        let w = what("allowed with the plaintext key");
        seen.forward(&send(request(Some("chat"), Some(PLAIN_KEY), place), &w), &w);
        let w = what("allowed with beta's key");
        seen.forward(&send(request(Some("chat"), Some(KEY_BETA), place), &w), &w);
        // A key of a client's `keys`, with metadata sent upstream and a
        // forged copy of its header replaced.
        for route in MAIN_ROUTES {
            let w = what(&format!("allowed on {route} with a key of `keys`"));
            let forged = request(Some(route), Some(KEY_MULTI_LIVE), place).header("x-keyswap-team", "forged");
            let echoed = seen.forward(&send(forged, &w), &w);
            assert_eq!(echoed.header_all("x-keyswap-team"), ["leak-team"], "{w}");
        }
    }
}

/// The LDS-served listener's address (it changes when the listener is replaced).
fn lds_listener(admin: SocketAddr) -> Option<SocketAddr> {
    let listeners = Request::get("/listeners?format=json").header("host", "admin").send(admin).ok()?.json().ok()?;
    let entry = listeners["listener_statuses"].as_array()?.iter().find(|l| l["name"] == "rotating")?.clone();
    let port = entry["local_address"]["socket_address"]["port_value"].as_u64()?;
    Some(SocketAddr::from(([127, 0, 0, 1], u16::try_from(port).ok()?)))
}

/// Through the LDS listener with `key` until the upstream receives `want`.
fn until_served(admin: SocketAddr, key: &str, want: &str, seen: &mut Seen) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let response = lds_listener(admin)
            .and_then(|addr| request(Some("all"), Some(key), Place::Bearer).send(addr).ok())
            .filter(|r| r.status == 200);
        if let Some(response) = response {
            let echoed = seen.forward(&response, "the reloaded listener");
            if echoed.header("authorization") == Some(want) {
                return;
            }
        }
        assert!(Instant::now() < deadline, "the LDS listener never forwarded with {want:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn admin_text(envoy: &Envoy, path: &str) -> String {
    let response = Request::get(path).header("host", "admin").send(envoy.admin());
    let response = response.unwrap_or_else(|e| panic!("{path}: {e}"));
    assert_eq!(response.status, 200, "{path}: {}", response.text());
    response.text()
}

/// The CDS file beside the LDS file `lds`.
fn cds_path(lds: &Path) -> std::path::PathBuf {
    lds.with_file_name("cds.json")
}

/// Writes the LDS file: `listener`, with the shipped access log; first its
/// clusters (they carry keyswap's final stage, the one that injects) to
/// the CDS file beside it ([`cds_path`]).
fn write_lds(path: &Path, listener: &Listener, upstream: SocketAddr, wasm: &Path) {
    let bootstrap = gateway(std::slice::from_ref(listener), upstream, wasm);
    let mut clusters = bootstrap["static_resources"]["clusters"].as_array().cloned().unwrap_or_default();
    clusters.iter_mut().for_each(|c| c["@type"] = "type.googleapis.com/envoy.config.cluster.v3.Cluster".into());
    let mut resource = bootstrap["static_resources"]["listeners"][0].clone();
    resource["@type"] = "type.googleapis.com/envoy.config.listener.v3.Listener".into();
    resource["filter_chains"][0]["filters"][0]["typed_config"]["access_log"] = shipped_access_log();
    // Envoy watches for a file moved into place.
    let place = |path: &Path, resources: Vec<serde_json::Value>| {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::json!({ "resources": resources }).to_string()).expect("write");
        std::fs::rename(&tmp, path).expect("move into place");
    };
    place(&cds_path(path), clusters);
    place(path, vec![resource]);
}

/// The shipped `envoy.yaml`'s access log, so what users log is searched too.
fn shipped_access_log() -> serde_json::Value {
    let text = std::fs::read_to_string(repo_root().join("envoy.yaml")).expect("envoy.yaml");
    let yaml: serde_yaml::Value = serde_yaml::from_str(&text).expect("envoy.yaml parses");
    let hcm = &yaml["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"];
    serde_json::to_value(&hcm["access_log"]).expect("YAML that is also JSON")
}

#[test]
fn no_key_or_environment_credential_leaks_at_trace() {
    let wasm = filter_wasm().unwrap_or_else(|e| panic!("{e}"));
    let echo = Echo::start("127.0.0.1:0").expect("echo");
    let dir = std::env::temp_dir().join(format!("keyswap-leaks-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temp dir");
    let lds = dir.join("lds.json");

    let main = Listener {
        name: "main".into(),
        config: main_config(),
        host_env_keys: ENV_NAMES.iter().map(|s| s.to_string()).collect(),
        route_names: MAIN_ROUTES.iter().map(|s| s.to_string()).collect(),
        ..Listener::default()
    };
    let rotating = |n: u8| Listener {
        name: "rotating".into(),
        config: rotated_config(n),
        host_env_keys: vec![format!("ROTATED_CREDENTIAL_{n}")],
        route_names: vec!["all".into()],
        ..Listener::default()
    };
    write_lds(&lds, &rotating(1), echo.addr(), &wasm);
    let mut bootstrap = gateway(std::slice::from_ref(&main), echo.addr(), &wasm);
    bootstrap["dynamic_resources"] = serde_json::json!({
        "cds_config": {"path_config_source": {"path": cds_path(&lds).display().to_string()}, "resource_api_version": "V3"},
        "lds_config": {"path_config_source": {"path": lds.display().to_string()}, "resource_api_version": "V3"}
    });
    bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["access_log"] =
        shipped_access_log();
    let launch = Launch {
        file_name: "envoy.json".into(),
        text: bootstrap.to_string(),
        env: CREDENTIALS.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        cwd: None,
        expect_configs: vec![main.config.clone(), rotated_config(1)],
        args: Vec::new(),
    };
    let log_levels = LogLevels { level: "trace".into(), components: Some(QUIET_COMPONENTS.into()) };
    let envoy = Envoy::start_logging(&launch, &log_levels).unwrap_or_else(|e| panic!("Envoy starts: {e}"));

    let mut seen = Seen::default();
    main_paths(envoy.listener("main").expect("main"), &mut seen);

    // The reload: the LDS listener, replaced by one with a new key and a
    // new credential from the environment. (`keyswap push`, the ECDS path,
    // is the next test.)
    let bearer = |n: &str| format!("Bearer {}", credential(n));
    until_served(envoy.admin(), KEY_ROTATED_1, &bearer("ROTATED_CREDENTIAL_1"), &mut seen);
    write_lds(&lds, &rotating(2), echo.addr(), &wasm);
    until_served(envoy.admin(), KEY_ROTATED_2, &bearer("ROTATED_CREDENTIAL_2"), &mut seen);
    let old = lds_listener(envoy.admin()).map(|a| request(Some("all"), Some(KEY_ROTATED_1), Place::Bearer).send(a));
    let old = old.expect("the LDS listener").expect("the old key");
    seen.deny(&old, 401, "invalid_key", "the old key after the reload");

    let searched = searched(&envoy, &seen);
    let Searched { config_dump, stats, log, .. } = &searched;

    // The searched texts are the real thing.
    assert_eq!(access_lines(log), seen.requests, "one access-log line a request");
    for reason in ["missing_key", "invalid_key", "expired_key", "ambiguous_key", "route_forbidden", "no_route"] {
        assert!(seen.reasons.contains_key(reason), "no {reason} denial: {:?}", seen.reasons);
        assert!(log.contains(&format!("reason={reason} ")), "no {reason} in the log");
    }
    assert!(log.lines().any(|l| l.contains("[trace]")), "Envoy logged no trace line");
    assert!(log.lines().any(|l| l.contains("[debug]")), "Envoy logged no debug line");
    assert!(log.contains("keyswap: denied reason="), "no keyswap audit line");
    for config in [main.config.as_str(), &rotated_config(1), &rotated_config(2)] {
        let version = keyswap_policy::content_version(config.as_bytes());
        assert!(log.contains(&format!("version {version}")), "configuration {version} never loaded");
    }
    assert!(config_dump.contains("type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"));
    for name in ENV_NAMES.iter().chain(&["ROTATED_CREDENTIAL_2"]) {
        assert!(config_dump.contains(name), "/config_dump holds the filter configuration naming {name}");
    }
    assert!(config_dump.contains(&sha256_hex(KEY_ALPHA)), "/config_dump holds the key digests");
    // Documented (SECURITY.md): what is written in the configuration is in
    // the config dump. The search finds it.
    assert!(config_dump.contains(INLINE_CREDENTIAL), "an `inline` credential is visible in /config_dump");
    assert!(config_dump.contains(PLAIN_KEY), "a plaintext `key` is visible in /config_dump");
    assert!(stats.contains("keyswap_requests_total"), "keyswap's metrics are in /stats");

    // None of the secrets, anywhere.
    assert_none_leaked(&searched, &seen);
    drop(envoy);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The ECDS gateway's configuration: key `n` forwarded with credential `n`,
/// read from the variable `env`, on Envoy's route (and cluster) `all`.
fn pushed_config(n: u8, env: &str) -> String {
    let key = if n == 1 { KEY_PUSHED_1 } else { KEY_PUSHED_2 };
    format!(
        r#"{{"clients": [{{"id": "pushed-{n}", "key_sha256": "{}", "routes": ["*"]}}],
 "routes": [{{"name": "all", "match": {{"route_name": "all", "clusters": ["all"]}},
   "inject": [{{"header": "authorization", "prefix": "Bearer ", "value": {{"env": "{env}"}}}}]}}]}}"#,
        sha256_hex(key)
    )
}

/// `keyswap push` at `trace`: a push that revokes a key and swaps the
/// credential, and one Envoy rejects; none of the secrets in Envoy's log,
/// the answers, `/config_dump`, or what `keyswap push` prints.
#[test]
fn no_key_or_environment_credential_leaks_through_keyswap_push_at_trace() {
    let listener = Listener {
        config: pushed_config(1, "PUSHED_CREDENTIAL_1"),
        host_env_keys: vec!["PUSHED_CREDENTIAL_1".into(), "PUSHED_CREDENTIAL_2".into()],
        route_names: vec!["all".into()],
        ..Listener::default()
    };
    let log_levels = LogLevels { level: "trace".into(), components: Some(QUIET_COMPONENTS.into()) };
    let envoy_env: Vec<(&str, &str)> = CREDENTIALS.to_vec();
    let gw = EcdsGateway::start_with(listener, &envoy_env, &log_levels).unwrap_or_else(|e| panic!("{e}"));
    let mut seen = Seen::default();
    let bearer = |n: &str| format!("Bearer {}", credential(n));

    let echoed =
        seen.forward(&request(Some("all"), Some(KEY_PUSHED_1), Place::Bearer).send(gw.addr).expect("key 1"), "key 1");
    assert_eq!(echoed.header("authorization"), Some(bearer("PUSHED_CREDENTIAL_1").as_str()));

    // A push that revokes key 1 and brings key 2 with a new credential.
    let mut printed = String::new();
    let file = gw.envoy.dir().join("pushed-2.json");
    std::fs::write(&file, pushed_config(2, "PUSHED_CREDENTIAL_2")).expect("write the config");
    let out = gw.push_cli(&file).unwrap_or_else(|e| panic!("{e}"));
    printed.push_str(&String::from_utf8_lossy(&out.stdout));
    printed.push_str(&String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && printed.contains("active: Envoy runs version"), "push: {printed}");
    let old = request(Some("all"), Some(KEY_PUSHED_1), Place::Bearer).send(gw.addr).expect("key 1 again");
    seen.deny(&old, 401, "invalid_key", "key 1 after the push");
    let echoed =
        seen.forward(&request(Some("all"), Some(KEY_PUSHED_2), Place::Bearer).send(gw.addr).expect("key 2"), "key 2");
    assert_eq!(echoed.header("authorization"), Some(bearer("PUSHED_CREDENTIAL_2").as_str()));

    // A push Envoy rejects (a variable its VM does not have): push prints
    // Envoy's reason.
    let file = gw.envoy.dir().join("rejected.json");
    std::fs::write(&file, pushed_config(2, "NOT_IN_ENVOYS_ENVIRONMENT")).expect("write the config");
    let out = gw.push_cli(&file).unwrap_or_else(|e| panic!("{e}"));
    let rejected = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success() && rejected.contains("NOT_IN_ENVOYS_ENVIRONMENT"), "push: {rejected}");
    printed.push_str(&rejected);
    let still =
        seen.forward(&request(Some("all"), Some(KEY_PUSHED_2), Place::Bearer).send(gw.addr).expect("key 2"), "key 2");
    assert_eq!(still.header("authorization"), Some(bearer("PUSHED_CREDENTIAL_2").as_str()));

    // `keyswap rotate` (a new key, printed once) and `keyswap revoke --key`
    // of the old one, pushed the same way.
    let file = gw.envoy.dir().join("rotated.json");
    std::fs::write(&file, pushed_config(2, "PUSHED_CREDENTIAL_2")).expect("write the config");
    let run = |subcommand: &str, args: &[&str]| {
        let out = gw.cli_command(subcommand, &file, args).and_then(|mut c| c.output().map_err(|e| e.to_string()));
        let out = out.unwrap_or_else(|e| panic!("keyswap {subcommand}: {e}"));
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success() && text.contains("active: Envoy runs version"), "{subcommand}: {text}");
        text
    };
    let rotated = run("rotate", &["--client", "pushed-2", "--grace", "1h"]);
    let new_key = rotated.lines().find(|l| l.starts_with("ks_")).expect("the new key").to_string();
    printed.push_str(&rotated.replacen(&new_key, "", 1));
    let old_id = keyswap_policy::key_id(&{
        use sha2::Digest as _;
        sha2::Sha256::digest(KEY_PUSHED_2.as_bytes()).into()
    });
    printed.push_str(&run("revoke", &["--client", "pushed-2", "--key", &old_id]));
    let old = request(Some("all"), Some(KEY_PUSHED_2), Place::Bearer).send(gw.addr).expect("key 2 again");
    seen.deny(&old, 401, "invalid_key", "key 2 after its revocation");
    let echoed = request(Some("all"), Some(&new_key), Place::Bearer).send(gw.addr).expect("the new key");
    assert_eq!(
        seen.forward(&echoed, "the new key").header("authorization"),
        Some(bearer("PUSHED_CREDENTIAL_2").as_str())
    );

    let config_dump = gw.admin("/config_dump").expect("config dump");
    let log = gw.envoy.log();
    for (place, text) in [("Envoy's log", &log), ("/config_dump", &config_dump), ("keyswap rotate/revoke", &printed)] {
        for form in forms(&new_key) {
            assert!(!text.contains(&form), "{place}: the rotated key ({form})");
        }
        assert!(!text.contains(&new_key[3..]), "{place}: the rotated key without its prefix");
    }
    assert!(log.contains(&format!("key={old_id}")), "the revoked key's denial names its id");
    assert!(log.lines().any(|l| l.contains("[trace]")), "Envoy logged no trace line");
    for n in [1, 2] {
        let version = keyswap_policy::content_version(pushed_config(n, &format!("PUSHED_CREDENTIAL_{n}")).as_bytes());
        assert!(log.contains(&format!("version {version}")), "configuration {version} never loaded");
    }
    assert!(config_dump.contains(&sha256_hex(KEY_PUSHED_2)), "/config_dump holds the pushed configuration");

    let mut leaks = Vec::new();
    for (place, text) in [("Envoy's log", &log), ("/config_dump", &config_dump), ("keyswap push", &printed)] {
        leaks.extend(findings(text).into_iter().map(|f| format!("{place}: {f}")));
    }
    for (i, text) in seen.local.iter().chain(&seen.forwarded_heads).enumerate() {
        leaks.extend(findings(text).into_iter().map(|f| format!("response {i}: {f}")));
    }
    assert!(leaks.is_empty(), "{} secrets leaked:\n{}", leaks.len(), leaks.join("\n"));
}

/// The dynamic-credential listener's configuration: `oauth2` with Basic
/// and with body client authentication, `token_exchange`, and `fetch` (a
/// header and a query parameter from one call), each from its own server.
fn dynamic_config() -> String {
    let oauth2 = |cluster: &str, id: &str, secret: &str, client_auth: &str| {
        serde_json::json!({"oauth2": {"cluster": cluster, "token_path": "/oauth/token", "authority": "idp.test",
                                      "client_id": {"inline": id}, "client_secret": {"env": secret},
                                      "client_auth": client_auth, "scopes": ["orders"], "timeout_ms": 2000}})
    };
    let fetch = |pointer: &str| {
        serde_json::json!({"fetch": {"cluster": "vault", "path": "/v1/creds", "authorization": {"env": "VAULT_AUTHORIZATION"},
                                     "json_pointer": pointer, "refresh_seconds": 1, "timeout_ms": 2000}})
    };
    let bearer = |value: serde_json::Value| serde_json::json!([{"header": "authorization", "prefix": "Bearer ", "value": value}]);
    serde_json::json!({
        "clients": [{"id": "dynamic", "key_sha256": sha256_hex(KEY_DYNAMIC), "routes": ["*"]}],
        "routes": [
            {"name": "basic", "match": {"route_name": "basic", "clusters": ["basic"]},
             "inject": bearer(oauth2("idp_basic", CLIENT_ID_BASIC, "IDP_CLIENT_SECRET", "basic"))},
            {"name": "body", "match": {"route_name": "body", "clusters": ["body"]},
             "inject": bearer(oauth2("idp_body", CLIENT_ID_BODY, "IDP_BODY_CLIENT_SECRET", "body"))},
            {"name": "exchange", "match": {"route_name": "exchange", "clusters": ["exchange"]},
             "inject": bearer(serde_json::json!({"token_exchange": {"cluster": "sts", "token_path": "/token",
                 "subject_token": {"env": "SUBJECT_TOKEN"}, "audience": "https://billing.internal", "timeout_ms": 2000}}))},
            {"name": "fetch", "match": {"route_name": "fetch", "clusters": ["fetch"]},
             "inject": [{"header": "x-key-id", "value": fetch("/data/key_id")},
                        {"query": "sig", "value": fetch("/data/secret")}]},
            {"name": "obo", "match": {"route_name": "obo", "clusters": ["obo"]},
             "inject": bearer(serde_json::json!({"token_exchange": {"cluster": "sts_obo", "token_path": "/token",
                 "subject_token": {"header": "x-user-token", "prefix": "Bearer "},
                 "audience": "https://mcp.internal", "timeout_ms": 2000}}))},
            {"name": "broker", "match": {"route_name": "broker", "clusters": ["broker"]},
             "inject": [{"header": "x-key-id", "value": {"fetch": {"cluster": "vault", "path": "/v1/creds/{client}",
                 "authorization": {"env": "VAULT_AUTHORIZATION"}, "json_pointer": "/data/key_id", "timeout_ms": 2000}}}]}
        ],
        "caller_token_header": "x-caller-token"
    })
    .to_string()
}

fn token_answer(token: &str, expires_in: &str) -> String {
    format!(r#"{{"access_token": "{token}", "token_type": "Bearer", "expires_in": {expires_in}}}"#)
}

fn vault_answer(n: u8) -> String {
    let (id, secret) = (issued(&format!("fetched id {n}")), issued(&format!("fetched secret {n}")));
    format!(r#"{{"data": {{"key_id": "{id}", "secret": "{secret}"}}}}"#)
}

/// The dynamic listener's Envoy route for `path`: its first segment
/// (`/basic/v1` is on route `basic`).
fn dynamic_route(path: &str) -> &str {
    path.trim_start_matches('/').split('/').next().unwrap_or_default()
}

/// Sends requests to `path` (every 50 ms) until one is forwarded and the
/// upstream's view passes `arrived`; every other answer must be a 503
/// `credential_unavailable`, or a forward `allowed` passes.
fn until_injected(
    addr: SocketAddr,
    path: &str,
    arrived: impl Fn(&Echoed) -> bool,
    allowed: impl Fn(&Echoed) -> bool,
    seen: &mut Seen,
) -> Echoed {
    let deadline = Instant::now() + Duration::from_secs(30);
    let what = format!("dynamic credential on {path}");
    loop {
        let request = Request::get(path)
            .header("host", "gateway.test")
            .header(ROUTE_HEADER, dynamic_route(path))
            .header("x-api-key", KEY_DYNAMIC);
        let response = request.send(addr).unwrap_or_else(|e| panic!("{what}: {e}"));
        if response.status == 200 {
            let echoed = seen.forward(&response, &what);
            let sent = format!("{} {:?}", echoed.path, echoed.headers);
            assert!(!sent.contains(KEY_DYNAMIC), "{what}: the key reached the upstream: {sent}");
            if arrived(&echoed) {
                return echoed;
            }
            assert!(allowed(&echoed), "{what}: forwarded with an unexpected credential: {sent}");
        } else {
            seen.deny(&response, 503, "credential_unavailable", &what);
        }
        assert!(Instant::now() < deadline, "{what}: not injected within 30 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls Envoy's log until it holds `text`.
fn until_logged(envoy: &Envoy, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !envoy.log().contains(text) {
        assert!(Instant::now() < deadline, "never logged: {text}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Dynamic credentials at `trace`: the secrets the filter sends its token
/// endpoints and credential service (the OAuth2 client secrets, Basic and
/// body, the token-exchange subject token, the credential service's
/// `authorization`) and every token and value they answer (a refused one,
/// the first ones, and a rotation) appear nowhere: not in Envoy's log, its
/// local responses, `/config_dump` or `/stats`.
#[test]
fn no_dynamic_credential_secret_or_token_leaks_at_trace() {
    use super::credentials::token_cluster;
    use keyswap_tests::token::{TokenCall, TokenServer};

    let wasm = filter_wasm().unwrap_or_else(|e| panic!("{e}"));
    let echo = Echo::start("127.0.0.1:0").expect("echo");
    // The Basic route's server first answers a token the filter refuses.
    let idp_basic = TokenServer::start(&token_answer(issued("token rejected"), r#""soon""#)).expect("idp_basic");
    let idp_body = TokenServer::start(&token_answer(issued("token body"), "3600")).expect("idp_body");
    let sts = TokenServer::start(&token_answer(issued("token exchanged"), "3600")).expect("sts");
    let vault = TokenServer::start(&vault_answer(1)).expect("vault");
    let sts_obo = TokenServer::start(&token_answer(issued("token on behalf"), "3600")).expect("sts_obo");

    let listener = Listener {
        name: "dynamic".into(),
        config: dynamic_config(),
        host_env_keys: DYNAMIC_ENV.iter().map(|(name, _)| name.to_string()).collect(),
        route_names: ["basic", "body", "exchange", "fetch", "obo", "broker"].iter().map(|r| r.to_string()).collect(),
        ..Listener::default()
    };
    let mut bootstrap = gateway(std::slice::from_ref(&listener), echo.addr(), &wasm);
    let clusters = bootstrap["static_resources"]["clusters"].as_array_mut().expect("clusters");
    let servers =
        [("idp_basic", &idp_basic), ("idp_body", &idp_body), ("sts", &sts), ("vault", &vault), ("sts_obo", &sts_obo)];
    for (name, server) in servers {
        clusters.push(token_cluster(name, server));
    }
    bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["access_log"] =
        shipped_access_log();
    let launch = Launch {
        file_name: "envoy.json".into(),
        text: bootstrap.to_string(),
        env: DYNAMIC_ENV.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        cwd: None,
        expect_configs: vec![listener.config.clone()],
        args: Vec::new(),
    };
    let log_levels = LogLevels { level: "trace".into(), components: Some(QUIET_COMPONENTS.into()) };
    let envoy = Envoy::start_logging(&launch, &log_levels).unwrap_or_else(|e| panic!("Envoy starts: {e}"));
    let addr = envoy.listener("dynamic").expect("the dynamic listener");
    let mut seen = Seen::default();

    // The refused answer: the route has no token yet, and says so.
    until_logged(&envoy, "routes[0].inject[0].value.oauth2 (oauth2): refresh failed");
    let request = Request::get("/basic/v1")
        .header("host", "gateway.test")
        .header(ROUTE_HEADER, "basic")
        .header("x-api-key", KEY_DYNAMIC);
    let refused = request.send(addr).expect("the Basic route before its token");
    seen.deny(&refused, 503, "credential_unavailable", "the Basic route before its token");
    idp_basic.set_answer(&token_answer(issued("token basic"), "3600"));

    // Every route forwards with what its server issued.
    let bearer = |name: &'static str| {
        move |e: &Echoed| e.header("authorization") == Some(format!("Bearer {}", issued(name)).as_str())
    };
    let never = |_: &Echoed| false;
    until_injected(addr, "/basic/v1", bearer("token basic"), never, &mut seen);
    until_injected(addr, "/body/v1", bearer("token body"), never, &mut seen);
    until_injected(addr, "/exchange/v1", bearer("token exchanged"), never, &mut seen);
    let fetched = |n: u8| {
        move |e: &Echoed| {
            let sig = format!("sig={}", issued(&format!("fetched secret {n}")));
            e.header("x-key-id") == Some(issued(&format!("fetched id {n}"))) && e.path.contains(&sig)
        }
    };
    until_injected(addr, "/fetch/v1", fetched(1), never, &mut seen);
    // A rotation at the credential service, picked up at its next refresh.
    vault.set_answer(&vault_answer(2));
    until_injected(addr, "/fetch/v1", fetched(2), fetched(1), &mut seen);

    // On behalf of a caller: the subject token goes to the STS only, the
    // caller's token to the credential service only; the first request of
    // each waits for its call, and is forwarded with what was issued.
    let on_behalf = |path: &str, route: &str| {
        Request::get(path)
            .header("host", "gateway.test")
            .header(ROUTE_HEADER, route)
            .header("x-user-token", format!("Bearer {SUBJECT_TOKEN_USER}"))
            .header("x-caller-token", format!("Bearer {CALLER_TOKEN}"))
    };
    for _ in 0..2 {
        let response = on_behalf("/obo/v1", "obo").header("x-api-key", KEY_DYNAMIC).send(addr).expect("obo");
        let echoed = seen.forward(&response, "the on-behalf-of route");
        assert_eq!(echoed.header("authorization"), Some(format!("Bearer {}", issued("token on behalf")).as_str()));
        assert_eq!((echoed.header("x-user-token"), echoed.header("x-caller-token")), (None, None));
        let response = on_behalf("/broker/v1", "broker").header("x-api-key", KEY_DYNAMIC).send(addr).expect("broker");
        let echoed = seen.forward(&response, "the per-client fetch");
        assert!(echoed.header("x-key-id").is_some_and(|v| v.starts_with("fk-id-")), "{:?}", echoed.headers);
        assert_eq!((echoed.header("x-user-token"), echoed.header("x-caller-token")), (None, None));
    }
    // Denied with both tokens: a wrong key, and none.
    let response = on_behalf("/obo/v1", "obo").header("x-api-key", KEY_UNKNOWN).send(addr).expect("denied");
    seen.deny(&response, 401, "invalid_key", "the on-behalf-of route, unknown key");
    let response = on_behalf("/broker/v1", "broker").send(addr).expect("denied");
    seen.deny(&response, 401, "missing_key", "the per-client fetch, no key");
    let response = Request::get("/obo/v1")
        .header("host", "gateway.test")
        .header(ROUTE_HEADER, "obo")
        .header("x-api-key", KEY_DYNAMIC)
        .send(addr)
        .expect("no subject");
    seen.deny(&response, 401, "missing_subject_token", "the on-behalf-of route, no subject");

    // The secrets really went out, each the way its route says.
    let header = |call: &TokenCall, name: &str| {
        call.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.clone())
    };
    let basic =
        format!("Basic {}", base64(format!("{CLIENT_ID_BASIC}:{}", dynamic_env("IDP_CLIENT_SECRET")).as_bytes()));
    let calls = idp_basic.calls();
    assert!(calls.len() >= 2, "a refused answer, then a token: {calls:?}");
    assert!(calls.iter().all(|c| header(c, "authorization").as_deref() == Some(basic.as_str())), "{calls:?}");
    let call = &idp_body.calls()[0];
    let form = format!("client_id={CLIENT_ID_BODY}&client_secret={}", dynamic_env("IDP_BODY_CLIENT_SECRET"));
    assert!(call.body.contains(&form) && header(call, "authorization").is_none(), "{call:?}");
    let call = &sts.calls()[0];
    assert!(call.body.contains(&format!("subject_token={}", dynamic_env("SUBJECT_TOKEN"))), "{call:?}");
    let calls = sts_obo.calls();
    assert_eq!(calls.len(), 1, "one exchange for the subject: {calls:?}");
    assert!(calls[0].body.ends_with(&format!("&subject_token={SUBJECT_TOKEN_USER}")), "{calls:?}");
    let (route_calls, client_calls): (Vec<_>, Vec<_>) = vault.calls().into_iter().partition(|c| c.path == "/v1/creds");
    assert!(route_calls.len() >= 2, "a first answer and a rotation: {route_calls:?}");
    let gateway_identity = Some(dynamic_env("VAULT_AUTHORIZATION"));
    assert!(route_calls.iter().all(|c| header(c, "authorization").as_deref() == gateway_identity));
    assert_eq!(client_calls.len(), 1, "one fetch for the client: {client_calls:?}");
    let caller = format!("Bearer {CALLER_TOKEN}");
    assert_eq!(header(&client_calls[0], "authorization").as_deref(), Some(caller.as_str()));

    let searched = searched(&envoy, &seen);
    let Searched { config_dump, stats, log, .. } = &searched;

    // The searched texts are the real thing: trace lines, and the filter's
    // lines for every refresh (a failure, its recovery, first values).
    assert_eq!(access_lines(log), seen.requests, "one access-log line a request");
    assert!(log.lines().any(|l| l.contains("[trace]")), "Envoy logged no trace line");
    assert!(log.lines().any(|l| l.contains("[debug]")), "Envoy logged no debug line");
    for line in [
        "routes[0].inject[0].value.oauth2 (oauth2): refresh failed: `expires_in` in the answer is not a number",
        "routes[0].inject[0].value.oauth2 (oauth2): refreshed again after",
        "routes[1].inject[0].value.oauth2 (oauth2): first value fetched",
        "routes[2].inject[0].value.token_exchange (token_exchange): first value fetched",
        "routes[3].inject[0].value.fetch (fetch): first value fetched",
        "routes[4].inject[0].value.token_exchange (token_exchange) for a subject: first value fetched",
        "routes[5].inject[0].value.fetch (fetch) for client dynamic: first value fetched",
    ] {
        assert!(log.contains(&format!("keyswap: credential {line}")), "not logged: {line}");
    }
    assert!(seen.reasons.contains_key("credential_unavailable"), "{:?}", seen.reasons);
    for name in
        ["IDP_CLIENT_SECRET", "IDP_BODY_CLIENT_SECRET", "SUBJECT_TOKEN", "VAULT_AUTHORIZATION", "idp_basic", "vault"]
    {
        assert!(config_dump.contains(name), "/config_dump holds the configuration naming {name}");
    }
    assert!(stats.contains("credential_unavailable"), "keyswap's metrics are in /stats");

    assert_none_leaked(&searched, &seen);
}

/// What is searched for secrets, read once every request of `seen` is in
/// the access log.
struct Searched {
    config_dump: String,
    stats: String,
    prometheus: String,
    log: String,
}

/// Every secret (see [`findings`]) in what was searched and in every
/// answer `seen`; fails the test with where each was found.
fn assert_none_leaked(searched: &Searched, seen: &Seen) {
    let admin = [
        ("Envoy's log", &searched.log),
        ("/config_dump", &searched.config_dump),
        ("/stats", &searched.stats),
        ("/stats/prometheus", &searched.prometheus),
    ];
    let mut leaks = Vec::new();
    for (place, text) in admin {
        leaks.extend(findings(text).into_iter().map(|f| format!("{place}: {f}")));
    }
    for (i, text) in seen.local.iter().enumerate() {
        leaks.extend(findings(text).into_iter().map(|f| format!("local response {i}: {f}")));
    }
    for (i, text) in seen.forwarded_heads.iter().enumerate() {
        leaks.extend(findings(text).into_iter().map(|f| format!("forwarded response {i} (status, headers): {f}")));
    }
    println!(
        "searched {} log lines ({} bytes), {} local and {} forwarded responses, /config_dump ({} bytes), /stats",
        searched.log.lines().count(),
        searched.log.len(),
        seen.local.len(),
        seen.forwarded_heads.len(),
        searched.config_dump.len()
    );
    assert!(leaks.is_empty(), "{} secrets leaked:\n{}", leaks.len(), leaks.join("\n"));
}

fn access_lines(log: &str) -> usize {
    log.lines().filter(|l| l.contains(" keyswap[outcome=")).count()
}

fn searched(envoy: &Envoy, seen: &Seen) -> Searched {
    let deadline = Instant::now() + Duration::from_secs(15);
    while access_lines(&envoy.log()) < seen.requests && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    Searched {
        config_dump: admin_text(envoy, "/config_dump"),
        stats: admin_text(envoy, "/stats"),
        prometheus: admin_text(envoy, "/stats/prometheus"),
        log: envoy.log(),
    }
}

fn base64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}
