//! Issue 13 through the real Envoy: a credential reaches only an upstream
//! of a cluster its route is bound to, as Envoy finally routes the request;
//! a gateway key never leaves the gateway in any part of a request; a
//! credential never comes back to a client.
//!
//! One gateway shape for every test ([`virtual_hosts`]): a virtual host an
//! upstream (`registry.internal`, `api.anthropic.test` and its ports,
//! `google.test`, `trailers.test`) and a catch-all `*` whose routes match
//! on the presence of `x-api-key` (cluster `keyed`) and of the `api_key`
//! query parameter (`queried`), split by weight (`weighted-a`/`-b`), let
//! the client pick the cluster (`x-pick-cluster`), send `/anthropic/` to
//! `anthropic`, and everything else to `catchall`. Each cluster has its
//! own [`Recorder`], so a test knows which upstream received what. Four
//! listeners serve it: `plain`, `normalized` (`normalize_path`,
//! `merge_slashes`), `strict` (`headers_with_underscores_action:
//! REJECT_REQUEST`) and `trailers` (HTTP/1.1 `enable_trailers`); each test runs a `deny` and a `pass`
//! gateway. HTTP/2 requests go through curl (`--http2-prior-knowledge`),
//! which sends a `host` it is given as `:authority` and cannot send both.
//!
//! Every answer is judged by one oracle, [`judge`]: a credential an
//! upstream received belongs to a keyswap route bound to that upstream's
//! cluster and the client whose key was presented may use that route; a
//! bound cluster never receives a request without its credential; no
//! upstream receives a client key, a client-sent client id, a look-alike
//! of a protected header or a protected trailer; no answer carries a
//! credential or a key. One test a class of the issue, then
//! [`mirrors_and_internal_redirects_carry_no_credential`] and
//! [`routing_agreement`], which throws thousands of generated requests at
//! both gateways.
//!
//! Found here and left to the deployment: with `proxy_100_continue: true`
//! on the connection manager, an upstream's `100 Continue` or `103 Early
//! Hints` reaches the client unfiltered (proxy-wasm has no callback for
//! 1xx headers), so keyswap needs Envoy's default, `false` (SECURITY.md);
//! class 4 checks that default.
//!
//! `KEYSWAP_PLACEMENT=listener-only` runs the same tests the way keyswap
//! was deployed before issue 13 (the listener's filter only, routes
//! matched by `host`, `path_prefix` and `route_name`), against a filter
//! given in `KEYSWAP_FILTER` (built from a272b53, say): each class test and
//! the routing agreement fail there.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use keyswap_tests::envoy::{filter_wasm, Envoy, Launch, LogLevels};
use keyswap_tests::routing::{
    bootstrap, curl_has_http2, relay, send_h1, send_h2, ClusterSpec, H2Request, ListenerSpec, Placement, Protocol,
    Received, Recorder, Reply, BASIC_DECODED_HEADER, EARLY_HINTS_HEADER, REDIRECT_HEADER, TRAILERS_HEADER,
};
use serde_json::json;

// ---- the gateway ------------------------------------------------------------

/// The header that names each request, so its records can be found.
const REQUEST_ID: &str = "x-test-request";

const CLIENT_ID_HEADER: &str = "x-keyswap-client";

/// Gateway clusters other than the trailer ones.
const CLUSTERS: [&str; 12] = [
    "registry",
    "anthropic",
    "google",
    "keyed",
    "queried",
    "weighted-a",
    "weighted-b",
    "picked-1",
    "picked-2",
    "catchall",
    "mirror-guarded",
    "mirror-bare",
];

/// The trailer test's clusters: HTTP/1.1 with trailers, and HTTP/2 (to a
/// relay), bound to a route and not.
const TRAILER_CLUSTERS: [(&str, Protocol); 4] = [
    ("trailers-h1", Protocol::Http1Trailers),
    ("trailers-h2", Protocol::Http2),
    ("open-h1", Protocol::Http1Trailers),
    ("open-h2", Protocol::Http2),
];

/// A keyswap route: its clusters, its pre-issue-13 `match`, what it
/// injects, and the forms its secret can take on the wire.
struct Route {
    name: &'static str,
    clusters: &'static [&'static str],
    old_match: serde_json::Value,
    inject: serde_json::Value,
    forms: Vec<String>,
}

fn bearer(secret: &str) -> serde_json::Value {
    json!({"header": "authorization", "prefix": "Bearer ", "value": {"inline": secret}})
}

fn header(name: &str, secret: &str) -> serde_json::Value {
    json!({"header": name, "value": {"inline": secret}})
}

fn base64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

const REGISTRY_USER: &str = "robot";
const REGISTRY_SECRET: &str = "cred-registry-e5f6a7b8";

fn routes() -> Vec<Route> {
    let simple = |name, clusters, inject, secret: &str| Route {
        name,
        clusters,
        old_match: json!({"route_name": name}),
        inject,
        forms: vec![secret.to_string()],
    };
    vec![
        Route {
            name: "anthropic",
            clusters: &["anthropic"],
            old_match: json!({"path_prefix": "/anthropic/"}),
            inject: bearer("cred-anthropic-a1b2c3d4"),
            forms: vec!["cred-anthropic-a1b2c3d4".into()],
        },
        Route {
            name: "registry",
            clusters: &["registry"],
            old_match: json!({"host": "registry.internal"}),
            inject: json!({"header": "authorization",
                           "basic": {"username": REGISTRY_USER, "password": {"inline": REGISTRY_SECRET}}}),
            forms: vec![REGISTRY_SECRET.into(), base64(format!("{REGISTRY_USER}:{REGISTRY_SECRET}").as_bytes())],
        },
        Route {
            name: "google",
            clusters: &["google"],
            old_match: json!({"host": "google.test"}),
            inject: json!({"query": "key", "value": {"inline": "cred-google-c9d0e1f2"}}),
            forms: vec!["cred-google-c9d0e1f2".into()],
        },
        simple("keyed", &["keyed"], header("x-keyed-credential", "cred-keyed-13579bdf"), "cred-keyed-13579bdf"),
        simple("queried", &["queried"], bearer("cred-queried-2468ace0"), "cred-queried-2468ace0"),
        simple(
            "weighted",
            &["weighted-a", "weighted-b"],
            header("x-weighted-credential", "cred-weighted-0f1e2d3c"),
            "cred-weighted-0f1e2d3c",
        ),
        simple("picked", &["picked-1"], header("x-picked-credential", "cred-picked-4b5a6978"), "cred-picked-4b5a6978"),
        simple("th1", &["trailers-h1"], bearer("cred-trailers1-8899aabb"), "cred-trailers1-8899aabb"),
        simple("th2", &["trailers-h2"], bearer("cred-trailers2-ccddeeff"), "cred-trailers2-ccddeeff"),
    ]
}

/// A client: its id, key and routes (`*`: all).
#[derive(Debug)]
struct Client {
    id: &'static str,
    key: &'static str,
    routes: &'static [&'static str],
}

const CLIENTS: [Client; 8] = [
    Client { id: "c-anthropic", key: "ks-key-anthropic-0001", routes: &["anthropic"] },
    Client { id: "c-registry", key: "ks-key-registry-0002", routes: &["registry"] },
    Client { id: "c-google", key: "ks-key-google-0003", routes: &["google"] },
    Client { id: "c-keyed", key: "ks-key-keyed-0004", routes: &["keyed", "queried"] },
    Client { id: "c-weighted", key: "ks-key-weighted-0005", routes: &["weighted"] },
    Client { id: "c-picked", key: "ks-key-picked-0006", routes: &["picked"] },
    Client { id: "c-trailers", key: "ks-key-trailers-0007", routes: &["th1", "th2"] },
    Client { id: "c-all", key: "ks-key-all-0008", routes: &["*"] },
];

/// A key no client has.
const UNKNOWN_KEY: &str = "ks-key-unknown-9999";

fn client(id: &str) -> &'static Client {
    CLIENTS.iter().find(|c| c.id == id).expect("a client of CLIENTS")
}

impl Client {
    fn may_use(&self, route: &str) -> bool {
        self.routes.iter().any(|r| *r == "*" || *r == route)
    }
}

/// Header names keyswap protects: key sources, stripped, client id,
/// injected.
const PROTECTED: [&str; 7] = [
    "authorization",
    "x-api-key",
    "cookie",
    CLIENT_ID_HEADER,
    "x-keyed-credential",
    "x-weighted-credential",
    "x-picked-credential",
];

/// True for the pre-issue-13 deployment (see the module doc).
fn old() -> bool {
    Placement::from_env() == Placement::ListenerOnly
}

/// The keyswap configuration: `unmatched` is `deny` or `pass`.
fn config(unmatched: &str) -> String {
    let routes: Vec<serde_json::Value> = routes()
        .iter()
        .map(|r| {
            let matcher = if old() { r.old_match.clone() } else { json!({"clusters": r.clusters}) };
            json!({"name": r.name, "match": matcher, "inject": [r.inject]})
        })
        .collect();
    let clients: Vec<serde_json::Value> =
        CLIENTS.iter().map(|c| json!({"id": c.id, "key": c.key, "routes": c.routes})).collect();
    json!({
        "clients": clients,
        "key_sources": [{"header": "authorization", "prefix": "Bearer "}, {"header": "x-api-key"}, {"query": "api_key"}],
        "routes": routes,
        "strip_request_headers": ["cookie"],
        "strip_response_headers": ["set-cookie", "x-upstream-secret"],
        "client_id_header": CLIENT_ID_HEADER,
        "unmatched_route": unmatched,
    })
    .to_string()
}

fn to(name: &str, prefix: &str, cluster: &str) -> serde_json::Value {
    json!({"name": name, "match": {"prefix": prefix}, "route": {"cluster": cluster}})
}

/// Envoy's virtual hosts (see the module doc); `trailers`: with the
/// trailer test's.
fn virtual_hosts(trailers: bool) -> serde_json::Value {
    let mut hosts = vec![
        json!({"name": "registry", "domains": ["registry.internal"], "routes": [to("registry", "/", "registry")]}),
        json!({"name": "anthropic", "domains": ["api.anthropic.test", "api.anthropic.test:*"],
               "routes": [to("anthropic", "/", "anthropic")]}),
        json!({"name": "google", "domains": ["google.test"], "routes": [to("google", "/", "google")]}),
    ];
    if trailers {
        hosts.push(json!({"name": "trailers", "domains": ["trailers.test"], "routes": [
            to("th1", "/h1/", "trailers-h1"), to("th2", "/h2/", "trailers-h2"),
            to("open-h1", "/open-h1/", "open-h1"), to("open-h2", "/open-h2/", "open-h2"),
            to("catchall", "/", "catchall")]}));
    }
    hosts.push(json!({"name": "catchall", "domains": ["*"], "routes": [
        {"name": "keyed", "match": {"prefix": "/", "headers": [{"name": "x-api-key", "present_match": true}]},
         "route": {"cluster": "keyed"}},
        {"name": "queried", "match": {"prefix": "/", "query_parameters": [{"name": "api_key", "present_match": true}]},
         "route": {"cluster": "queried"}},
        {"name": "weighted", "match": {"prefix": "/weighted/"}, "route": {"weighted_clusters": {"clusters": [
            {"name": "weighted-a", "weight": 50}, {"name": "weighted-b", "weight": 50}]}}},
        {"name": "picked", "match": {"prefix": "/picked/"}, "route": {"cluster_header": "x-pick-cluster"}},
        {"name": "mirrored", "match": {"prefix": "/mirrored/"}, "route": {"cluster": "weighted-a",
         "request_mirror_policies": [{"cluster": "mirror-guarded"}, {"cluster": "mirror-bare"}]}},
        {"name": "redirecting", "match": {"prefix": "/redirecting/"}, "route": {"cluster": "weighted-b",
         "internal_redirect_policy": {"redirect_response_codes": [301], "max_internal_redirects": 2}}},
        to("anthropic-path", "/anthropic/", "anthropic"),
        to("catchall", "/", "catchall"),
    ]}));
    serde_json::Value::Array(hosts)
}

/// The listeners every gateway has.
const LISTENERS: [&str; 4] = ["plain", "normalized", "strict", "trailers"];

fn listener_specs() -> Vec<ListenerSpec> {
    vec![
        ListenerSpec { name: "plain".into(), ..ListenerSpec::default() },
        ListenerSpec { name: "normalized".into(), normalize: true, ..ListenerSpec::default() },
        ListenerSpec { name: "strict".into(), reject_underscores: true, ..ListenerSpec::default() },
        ListenerSpec { name: "trailers".into(), trailers: true, ..ListenerSpec::default() },
    ]
}

/// A running gateway with its recorders.
struct Gateway {
    unmatched: &'static str,
    recorders: Vec<Recorder>,
    envoy: Envoy,
    _relay: Option<Envoy>,
}

fn quiet() -> LogLevels {
    LogLevels { level: "info".into(), components: None }
}

impl Gateway {
    /// A gateway; `trailers` adds the trailer clusters (and the relay
    /// Envoy their HTTP/2 ones need).
    fn start(unmatched: &'static str, trailers: bool) -> Self {
        let wasm = filter_wasm().unwrap();
        let mut recorders: Vec<Recorder> = CLUSTERS.iter().map(|c| Recorder::start(c).unwrap()).collect();
        let mut clusters: Vec<ClusterSpec> = recorders
            .iter()
            .map(|r| ClusterSpec {
                name: r.name().into(),
                upstream: r.addr(),
                protocol: Protocol::Http1,
                bare: r.name() == "mirror-bare",
            })
            .collect();
        let mut relay_envoy = None;
        if trailers {
            let extra: Vec<Recorder> = TRAILER_CLUSTERS.iter().map(|(c, _)| Recorder::start(c).unwrap()).collect();
            let relayed: Vec<(String, SocketAddr)> = TRAILER_CLUSTERS
                .iter()
                .zip(&extra)
                .filter(|((_, p), _)| *p == Protocol::Http2)
                .map(|((c, _), r)| (c.to_string(), r.addr()))
                .collect();
            let launch =
                Launch { file_name: "envoy.json".into(), text: relay(&relayed).to_string(), ..Launch::default() };
            let relay_envoy_ = Envoy::start_logging(&launch, &quiet()).unwrap();
            for ((name, protocol), r) in TRAILER_CLUSTERS.iter().zip(&extra) {
                let upstream =
                    if *protocol == Protocol::Http2 { relay_envoy_.listener(name).unwrap() } else { r.addr() };
                clusters.push(ClusterSpec { name: name.to_string(), upstream, protocol: *protocol, bare: false });
            }
            recorders.extend(extra);
            relay_envoy = Some(relay_envoy_);
        }
        let config = config(unmatched);
        let text =
            bootstrap(&listener_specs(), &virtual_hosts(trailers), &clusters, &config, &wasm, Placement::from_env());
        let launch = Launch {
            file_name: "envoy.json".into(),
            text: text.to_string(),
            expect_configs: vec![config],
            ..Launch::default()
        };
        let envoy = Envoy::start_logging(&launch, &quiet()).unwrap();
        Self { unmatched, recorders, envoy, _relay: relay_envoy }
    }

    fn listener(&self, name: &str) -> SocketAddr {
        self.envoy.listener(name).unwrap()
    }

    /// Every record of request `id`.
    fn records(&self, id: &str) -> Vec<Received> {
        self.recorders.iter().flat_map(Recorder::received).filter(|r| r.header(REQUEST_ID) == Some(id)).collect()
    }

    /// Every record, by request id.
    fn all_records(&self) -> BTreeMap<String, Vec<Received>> {
        let mut out: BTreeMap<String, Vec<Received>> = BTreeMap::new();
        for r in self.recorders.iter().flat_map(Recorder::received) {
            out.entry(r.header(REQUEST_ID).unwrap_or("-").to_string()).or_default().push(r);
        }
        out
    }
}

// ---- the oracle -------------------------------------------------------------

fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(h), Some(l)) => {
                out.push(u8::try_from(h * 16 + l).unwrap_or(b'?'));
                i += 3;
            }
            (b'+', _, _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Every place of a record a secret could be in.
fn texts(r: &Received) -> Vec<String> {
    let mut out = vec![r.target.clone(), percent_decoded(&r.target), String::from_utf8_lossy(&r.body).into_owned()];
    for (n, v) in r.headers.iter().chain(&r.trailers) {
        out.push(format!("{n}: {v}"));
    }
    out
}

fn holds(texts: &[String], secret: &str) -> bool {
    texts.iter().any(|t| t.contains(secret))
}

/// The protected name a header name is a look-alike of.
fn look_alike(name: &str) -> Option<&'static str> {
    let normal = name.replace('_', "-");
    (name.contains('_')).then(|| PROTECTED.iter().find(|p| p.eq_ignore_ascii_case(&normal)).copied()).flatten()
}

/// What request `id`, sent with the key of `client` (if any), did wrong:
/// one line a violation, naming routes, clusters and clients, never a
/// secret.
fn judge(routes: &[Route], id: &str, client: Option<&Client>, records: &[Received], reply: &Reply) -> Vec<String> {
    let mut out = Vec::new();
    let who = client.map_or("no client", |c| c.id);
    for r in records {
        let texts = texts(r);
        let cluster = r.cluster.as_str();
        let mut credentialed = false;
        for route in routes {
            if !route.forms.iter().any(|f| holds(&texts, f)) {
                continue;
            }
            if !route.clusters.contains(&cluster) {
                out.push(format!("{id}: route {}'s credential reached cluster {cluster}, not bound to it", route.name));
            } else if !client.is_some_and(|c| c.may_use(route.name)) {
                out.push(format!(
                    "{id}: route {}'s credential reached {cluster} for {who}, not allowed there",
                    route.name
                ));
            } else {
                credentialed = true;
            }
        }
        let bound = routes.iter().any(|route| route.clusters.contains(&cluster));
        if bound && !credentialed {
            out.push(format!("{id}: {cluster} (bound to a route) received a request without its credential"));
        }
        for c in &CLIENTS {
            if holds(&texts, c.key) {
                out.push(format!("{id}: {cluster} received the key of {}", c.id));
            }
        }
        if holds(&texts, UNKNOWN_KEY) {
            out.push(format!("{id}: {cluster} received the unknown key"));
        }
        for (name, value) in &r.headers {
            if let Some(p) = look_alike(name) {
                out.push(format!("{id}: {cluster} received `{name}`, a look-alike of `{p}`"));
            }
            if name == CLIENT_ID_HEADER && !(credentialed && client.is_some_and(|c| c.id == value)) {
                out.push(format!("{id}: {cluster} received a `{CLIENT_ID_HEADER}` keyswap did not set"));
            }
        }
        for (name, _) in &r.trailers {
            if PROTECTED.contains(&name.as_str()) || look_alike(name).is_some() {
                out.push(format!("{id}: {cluster} received the request trailer `{name}`"));
            }
        }
    }
    let answer = String::from_utf8_lossy(&reply.raw);
    let mut last: Vec<String> = vec![String::from_utf8_lossy(&reply.body).into_owned()];
    last.extend(reply.headers.iter().chain(&reply.trailers).map(|(n, v)| format!("{n}: {v}")));
    for route in routes {
        for form in &route.forms {
            if holds(&last, form) {
                out.push(format!("{id}: the answer ({}) carried route {}'s credential", reply.status, route.name));
            } else if answer.contains(form.as_str()) {
                out.push(format!("{id}: an informational (1xx) answer carried route {}'s credential", route.name));
            } else {
                continue;
            }
            break;
        }
    }
    for c in &CLIENTS {
        if answer.contains(c.key) {
            out.push(format!("{id}: the answer carried the key of {}", c.id));
        }
    }
    out
}

// ---- sending ----------------------------------------------------------------

/// One request a test sends, in either protocol.
#[derive(Debug, Clone)]
struct Probe {
    id: String,
    method: String,
    /// The request target (HTTP/1.1) or `:path` (HTTP/2).
    target: String,
    /// `host` (HTTP/1.1) or `:authority` (HTTP/2); none when `None`.
    host: Option<String>,
    headers: Vec<(String, String)>,
    /// A chunked body with these trailers (HTTP/1.1 only).
    trailers: Option<Vec<(String, String)>>,
    /// The client whose key the request presents.
    client: Option<&'static Client>,
}

impl Probe {
    fn new(id: impl Into<String>, method: &str, host: &str, target: &str) -> Self {
        Self {
            id: id.into(),
            method: method.into(),
            target: target.into(),
            host: Some(host.into()),
            headers: Vec::new(),
            trailers: None,
            client: None,
        }
    }

    fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Presents `client`'s key as `Authorization: Bearer`.
    fn bearer(mut self, client: &'static Client) -> Self {
        self.client = Some(client);
        self.header("authorization", &format!("Bearer {}", client.key))
    }

    fn h1_bytes(&self) -> Vec<u8> {
        let mut out = format!("{} {} HTTP/1.1\r\n", self.method, self.target);
        if let Some(host) = &self.host {
            out.push_str(&format!("host: {host}\r\n"));
        }
        out.push_str(&format!("{REQUEST_ID}: {}\r\n", self.id));
        for (n, v) in &self.headers {
            out.push_str(&format!("{n}: {v}\r\n"));
        }
        match &self.trailers {
            Some(trailers) => {
                out.push_str("transfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n");
                for (n, v) in trailers {
                    out.push_str(&format!("{n}: {v}\r\n"));
                }
                out.push_str("\r\n");
            }
            None => out.push_str("\r\n"),
        }
        out.into_bytes()
    }

    fn h2(&self) -> H2Request {
        let mut headers = vec![(REQUEST_ID.to_string(), self.id.clone())];
        headers.extend(self.headers.iter().cloned());
        H2Request {
            method: self.method.clone(),
            path: self.target.clone(),
            authority: self.host.clone().unwrap_or_default(),
            headers,
        }
    }
}

const TIMEOUT: Duration = Duration::from_secs(15);

fn h1(addr: SocketAddr, p: &Probe) -> Reply {
    send_h1(addr, &p.h1_bytes(), p.method == "HEAD", TIMEOUT).unwrap_or_else(|e| Reply {
        status: 0,
        raw: e.to_string().into_bytes(),
        ..Reply::default()
    })
}

fn h2(addr: SocketAddr, probes: &[Probe]) -> Vec<Reply> {
    // The HTTP/2 half of every class is required, never skipped.
    assert!(curl_has_http2(), "curl without HTTP/2: scripts/setup installs Debian's curl, which has it");
    let requests: Vec<H2Request> = probes.iter().map(Probe::h2).collect();
    send_h2(addr, &requests).unwrap()
}

/// Sends every probe over HTTP/1.1 and HTTP/2 to `listener`
/// of `gw`; returns (probe, protocol, answer) with the protocol in the id.
fn send_both(gw: &Gateway, listener: &str, probes: &[Probe]) -> Vec<(Probe, Reply)> {
    let addr = gw.listener(listener);
    let mut out = Vec::new();
    for p in probes {
        let mut p = p.clone();
        p.id = format!("{}/{listener}/h1/{}", gw.unmatched, p.id);
        let reply = h1(addr, &p);
        out.push((p, reply));
    }
    let renamed: Vec<Probe> =
        probes.iter().map(|p| Probe { id: format!("{}/{listener}/h2/{}", gw.unmatched, p.id), ..p.clone() }).collect();
    let replies = h2(addr, &renamed);
    out.extend(renamed.into_iter().zip(replies));
    out
}

/// Judges every sent probe; returns the violations.
fn judge_all(gw: &Gateway, sent: &[(Probe, Reply)]) -> Vec<String> {
    let routes = routes();
    let mut out = Vec::new();
    for (p, reply) in sent {
        out.extend(judge(&routes, &p.id, p.client, &gw.records(&p.id), reply));
    }
    out
}

/// Fails with every problem at once.
fn assert_none(what: &str, problems: &[String]) {
    assert!(problems.is_empty(), "{what}: {} problems:\n{}", problems.len(), problems.join("\n"));
}

/// `expect(problems, id, got, wanted)`: records a status other than `wanted`.
fn expect_status(problems: &mut Vec<String>, p: &Probe, reply: &Reply, wanted: &[u16]) {
    if !wanted.contains(&reply.status) {
        problems.push(format!("{}: status {}, expected {wanted:?}", p.id, reply.status));
    }
}

// ---- one test a class -------------------------------------------------------

/// Class 1: a client allowed only on `anthropic` sends anthropic's path
/// with the registry's host. Envoy routes by host to `registry`: the
/// client is refused there (403), the Anthropic credential reaches no
/// upstream, the registry's is never set.
#[test]
fn class1_the_host_of_one_route_and_the_path_of_another() {
    let mut problems = Vec::new();
    for unmatched in ["deny", "pass"] {
        let gw = Gateway::start(unmatched, false);
        let a = client("c-anthropic");
        let paths = ["/anthropic/v1/messages", "/anthropic//v1/messages", "/x/../anthropic/v1/messages"];
        for listener in ["plain", "normalized"] {
            let mut probes: Vec<Probe> = paths
                .iter()
                .enumerate()
                .map(|(i, path)| Probe::new(format!("cross{i}"), "POST", "registry.internal", path).bearer(a))
                .collect();
            probes.push(Probe::new("control", "POST", "api.anthropic.test", "/anthropic/v1/messages").bearer(a));
            let sent = send_both(&gw, listener, &probes);
            for (p, reply) in &sent {
                if p.id.ends_with("control") {
                    expect_status(&mut problems, p, reply, &[200]);
                    if !gw.records(&p.id).iter().any(|r| r.cluster == "anthropic") {
                        problems.push(format!("{}: the control did not reach anthropic", p.id));
                    }
                } else {
                    expect_status(&mut problems, p, reply, &[403]);
                }
            }
            problems.extend(judge_all(&gw, &sent));
        }
    }
    assert_none("class 1", &problems);
}

/// Class 2: authorities Envoy matches to no virtual host of the registry
/// (empty port, doubled port, a port where the virtual host lists the
/// bare name), over HTTP/1.1 and HTTP/2: the catch-all never receives a
/// credential, and the registry never a request without its credential
/// (on `pass` too), whoever asks, with or without a key.
#[test]
fn class2_authorities_envoy_and_keyswap_could_read_differently() {
    let mut problems = Vec::new();
    let authorities = ["registry.internal:", "registry.internal:80:80", "registry.internal:8080", "registry.internal"];
    for unmatched in ["deny", "pass"] {
        let gw = Gateway::start(unmatched, false);
        for listener in ["plain", "normalized"] {
            let mut probes = Vec::new();
            for (i, authority) in authorities.iter().enumerate() {
                for c in ["c-registry", "c-all"] {
                    probes.push(Probe::new(format!("a{i}-{c}"), "GET", authority, "/v2/_catalog").bearer(client(c)));
                }
                probes.push(Probe::new(format!("a{i}-nokey"), "GET", authority, "/v2/_catalog"));
            }
            let sent = send_both(&gw, listener, &probes);
            for (p, reply) in &sent {
                // The bare name: the registry, checked.
                if p.id.contains("/a3-c-") {
                    expect_status(&mut problems, p, reply, &[200]);
                    if !gw.records(&p.id).iter().any(|r| r.cluster == "registry") {
                        problems.push(format!("{}: the control did not reach the registry", p.id));
                    }
                }
                if p.id.contains("/a3-nokey") {
                    expect_status(&mut problems, p, reply, &[401]);
                }
            }
            problems.extend(judge_all(&gw, &sent));
        }
    }
    assert_none("class 2", &problems);
}

/// Class 3: request trailers carrying every key source, the client id,
/// `cookie` and a look-alike never reach the upstream, over an HTTP/1.1
/// cluster with `enable_trailers` and an HTTP/2 cluster, on bound routes
/// and (on `pass`) unbound ones; response trailers named in
/// `strip_response_headers` never reach the client. A benign trailer
/// each way proves trailers get through at all.
#[test]
fn class3_trailers() {
    let mut problems = Vec::new();
    let t = client("c-trailers");
    let key = t.key;
    for unmatched in ["deny", "pass"] {
        let gw = Gateway::start(unmatched, true);
        let addr = gw.listener("trailers");
        for path in ["/h1/upload", "/h2/upload", "/open-h1/upload", "/open-h2/upload"] {
            let mut p = Probe::new(format!("{unmatched}/trailers/h1{path}"), "POST", "trailers.test", path)
                .bearer(t)
                .header(TRAILERS_HEADER, "1");
            p.trailers = Some(vec![
                ("authorization".into(), format!("Bearer {key}")),
                ("x-api-key".into(), key.into()),
                (CLIENT_ID_HEADER.into(), "admin".into()),
                ("cookie".into(), "session=trailer-cookie".into()),
                ("x_api_key".into(), key.into()),
                ("x-benign-request-trailer".into(), "ok".into()),
            ]);
            let reply = h1(addr, &p);
            let records = gw.records(&p.id);
            let forwarded = path.starts_with("/h") || unmatched == "pass";
            if forwarded {
                expect_status(&mut problems, &p, &reply, &[200]);
                if !records.iter().any(|r| r.trailers.iter().any(|(n, _)| n == "x-benign-request-trailer")) {
                    problems
                        .push(format!("{}: no request trailer reached the upstream (the test proves nothing)", p.id));
                }
                if !reply.trailers.iter().any(|(n, _)| n == "x-benign-trailer") {
                    problems
                        .push(format!("{}: no response trailer reached the client (the test proves nothing)", p.id));
                }
                for (n, _) in &reply.trailers {
                    if n == "x-upstream-secret" || n == "set-cookie" {
                        problems.push(format!("{}: the response trailer `{n}` reached the client", p.id));
                    }
                }
            } else {
                expect_status(&mut problems, &p, &reply, &[404]);
            }
            problems.extend(judge(&routes(), &p.id, p.client, &records, &reply));
        }
    }
    assert_none("class 3", &problems);
}

/// Class 4: an upstream that reflects the request. A 301 whose `location`
/// and `content-location` repeat the query lose the injected `key=`; a
/// response header repeating the injected `authorization` never reaches
/// the client; `TRACE` and `TRACK` on a credentialed route are refused
/// (405) before any upstream sees them.
#[test]
fn class4_the_upstream_echoes_the_credential() {
    let mut problems = Vec::new();
    let (g, a) = (client("c-google"), client("c-anthropic"));
    for unmatched in ["deny", "pass"] {
        let gw = Gateway::start(unmatched, false);
        for listener in ["plain", "normalized"] {
            let probes = vec![
                Probe::new("redirect", "GET", "google.test", "/x?alt=json").bearer(g).header(REDIRECT_HEADER, "1"),
                Probe::new("reflect", "GET", "api.anthropic.test", "/anthropic/v1/models").bearer(a),
                Probe::new("hints", "GET", "api.anthropic.test", "/anthropic/v1/models")
                    .bearer(a)
                    .header(EARLY_HINTS_HEADER, "1"),
                Probe::new("trace", "TRACE", "api.anthropic.test", "/anthropic/v1/models").bearer(a),
                Probe::new("track", "TRACK", "api.anthropic.test", "/anthropic/v1/models").bearer(a),
            ];
            let sent = send_both(&gw, listener, &probes);
            for (p, reply) in &sent {
                match p.id.rsplit('/').next().unwrap_or_default() {
                    "redirect" => {
                        expect_status(&mut problems, p, reply, &[301]);
                        if reply.header("location") != Some("/x?alt=json") {
                            problems.push(format!("{}: location is not `/x?alt=json`", p.id));
                        }
                        if reply.header("content-location") != Some("http://google.test/x?alt=json") {
                            problems.push(format!("{}: content-location is not `http://google.test/x?alt=json`", p.id));
                        }
                    }
                    "reflect" | "hints" => {
                        expect_status(&mut problems, p, reply, &[200]);
                        if reply.header("x-r-x-keyswap-client").is_none() {
                            problems.push(format!("{}: the upstream did not reflect the request", p.id));
                        }
                    }
                    method => {
                        // Envoy's HTTP/1.1 parser refuses `TRACK` itself.
                        let h1_track = method == "track" && p.id.contains("/h1/");
                        expect_status(&mut problems, p, reply, if h1_track { &[400, 405] } else { &[405] });
                        if !gw.records(&p.id).is_empty() {
                            problems.push(format!("{}: {} reached an upstream", p.id, p.method));
                        }
                    }
                }
            }
            problems.extend(judge_all(&gw, &sent));
        }
    }
    assert_none("class 4", &problems);
}

/// Class 4 continued: an upstream that repeats the password of the Basic
/// credential it received, decoded (`x-r-basic-decoded: robot:<password>`,
/// as a debugging or error page might): the header never reaches the client.
#[test]
fn class4_a_basic_password_echoed_decoded() {
    let mut problems = Vec::new();
    let r = client("c-registry");
    for unmatched in ["deny", "pass"] {
        let gw = Gateway::start(unmatched, false);
        let probes = vec![Probe::new("reflect-basic", "GET", "registry.internal", "/v2/_catalog")
            .bearer(r)
            .header(BASIC_DECODED_HEADER, "1")];
        let sent = send_both(&gw, "plain", &probes);
        for (p, reply) in &sent {
            expect_status(&mut problems, p, reply, &[200]);
            if reply.header("x-r-x-keyswap-client") != Some("c-registry") {
                problems.push(format!("{}: the upstream did not reflect the request", p.id));
            }
        }
        problems.extend(judge_all(&gw, &sent));
    }
    assert_none("class 4, a Basic password echoed decoded", &problems);
}

/// Class 5: `x_keyswap_client: admin` and `x_api_key` (another client's
/// key) next to a valid key never reach the upstream with Envoy's default
/// underscore handling, on a bound route and (on `pass`) an unbound one;
/// `headers_with_underscores_action: REJECT_REQUEST` answers 400.
#[test]
fn class5_underscore_look_alikes() {
    let mut problems = Vec::new();
    let a = client("c-anthropic");
    let other = client("c-all").key;
    for unmatched in ["deny", "pass"] {
        let gw = Gateway::start(unmatched, false);
        for listener in ["plain", "normalized", "strict"] {
            let probes = vec![
                Probe::new("bound", "GET", "api.anthropic.test", "/anthropic/v1/models")
                    .bearer(a)
                    .header("x_keyswap_client", "admin")
                    .header("X_Keyswap_Client", "admin")
                    .header("x_api_key", other),
                Probe::new("unbound", "GET", "other.test", "/v1/models")
                    .header("x_keyswap_client", "admin")
                    .header("x_api_key", other)
                    .header("cookie_", "session=1"),
            ];
            let sent = send_both(&gw, listener, &probes);
            for (p, reply) in &sent {
                let wanted: &[u16] = match (listener, p.id.ends_with("unbound"), unmatched) {
                    // HTTP/2 refuses with a stream reset: no status.
                    ("strict", _, _) if p.id.contains("/h2/") => &[400, 0],
                    ("strict", _, _) => &[400],
                    (_, false, _) => &[200],
                    (_, true, "deny") => &[404],
                    (_, true, _) => &[200],
                };
                expect_status(&mut problems, p, reply, wanted);
                if listener == "strict" && !gw.records(&p.id).is_empty() {
                    problems.push(format!("{}: refused, yet it reached an upstream", p.id));
                }
            }
            problems.extend(judge_all(&gw, &sent));
        }
    }
    assert_none("class 5", &problems);
}

/// Class 6: Envoy routes again after keyswap removes the key. The route
/// matching the presence of `x-api-key` (or of `api_key` in the query)
/// goes to `keyed` (`queried`); without it, to `catchall`. The credential
/// of `keyed` or `queried` never reaches `catchall`.
#[test]
fn class6_envoy_routes_again_after_the_key_is_removed() {
    let mut problems = Vec::new();
    let k = client("c-keyed");
    for unmatched in ["deny", "pass"] {
        let gw = Gateway::start(unmatched, false);
        for listener in ["plain", "normalized"] {
            let mut header_only = Probe::new("header", "GET", "other.test", "/v1/models").header("x-api-key", k.key);
            header_only.client = Some(k);
            let mut query = Probe::new("query", "GET", "other.test", &format!("/v1/models?api_key={}", k.key));
            query.client = Some(k);
            let both = Probe::new("both", "GET", "other.test", "/v1/models").bearer(k).header("x-api-key", k.key);
            let sent = send_both(&gw, listener, &[header_only, query, both]);
            problems.extend(judge_all(&gw, &sent));
        }
    }
    assert_none("class 6", &problems);
}

/// Beyond the six classes: Envoy features that send one request to more
/// than one cluster. A route mirrored to two clusters (one with keyswap's
/// upstream filter, one without, against the documentation) sends no
/// credential to either mirror; a route whose upstream redirects, with an
/// internal redirect policy, sends no credential to the cluster Envoy
/// follows the redirect to unless the client may use it there.
#[test]
fn mirrors_and_internal_redirects_carry_no_credential() {
    let mut problems = Vec::new();
    let (w, all) = (client("c-weighted"), client("c-all"));
    for unmatched in ["deny", "pass"] {
        let gw = Gateway::start(unmatched, false);
        let mut probes = vec![
            Probe::new("mirror", "POST", "other.test", "/mirrored/x").bearer(w).header("content-length", "0"),
            Probe::new("mirror-all", "GET", "other.test", "/mirrored/x").bearer(all),
        ];
        for (i, to) in REDIRECTS.iter().enumerate() {
            for c in [w, all] {
                probes.push(
                    Probe::new(format!("redirect{i}-{}", c.id), "GET", "other.test", "/redirecting/x?alt=json")
                        .bearer(c)
                        .header(REDIRECT_HEADER, to),
                );
            }
        }
        let sent = send_both(&gw, "plain", &probes);
        // Mirrors are sent in the background: give them a moment.
        std::thread::sleep(Duration::from_millis(500));
        for (p, reply) in &sent {
            if p.id.contains("/mirror") {
                expect_status(&mut problems, p, reply, &[200]);
            }
        }
        problems.extend(judge_all(&gw, &sent));
        let mirrored = gw.recorders.iter().filter(|r| r.name().starts_with("mirror-")).map(|r| r.received().len());
        eprintln!("{unmatched}: mirrors received {:?} requests", mirrored.collect::<Vec<_>>());
    }
    assert_none("mirrors and internal redirects", &problems);
}

// ---- the routing agreement --------------------------------------------------

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[usize::try_from(self.next() % items.len() as u64).unwrap_or(0)]
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

const HOSTS: [&str; 22] = [
    "registry.internal",
    "REGISTRY.Internal",
    "registry.internal.",
    "registry.internal:80",
    "registry.internal:",
    "registry.internal:80:80",
    "registry.internal:0080",
    "api.anthropic.test",
    "api.anthropic.test:443",
    "api.anthropic.test:",
    "api.anthropic.test:443:443",
    "google.test",
    "Google.Test:8080",
    "google.test.",
    "trailers.test",
    "other.test",
    "[::1]",
    "[::1]:80",
    "127.0.0.1",
    "registry.internal@google.test",
    "google.test\tx",
    "",
];

const PATHS: [&str; 23] = [
    "/",
    "/mirrored/x",
    "/redirecting/x",
    "/redirecting/../mirrored/x",
    "/v1/models",
    "/anthropic/v1/messages",
    "/anthropic//v1/messages",
    "//anthropic/v1",
    "/x/../anthropic/v1",
    "/anthropic/../v1",
    "/anthropic%2Fv1",
    "/%61nthropic/v1",
    "/ANTHROPIC/v1",
    "/weighted/x",
    "/weighted/../picked/x",
    "/picked/x",
    "/picked/%2E%2E/anthropic/x",
    "/h1/x",
    "/v2/_catalog?alt=json",
    "/x?key=client-chosen",
    "/x?API_KEY=1",
    "/x#frag",
    "/x;api_key=1",
];

const PICKS: [&str; 9] =
    ["picked-1", "picked-2", "registry", "anthropic", "google", "catchall", "keyed", "mirror-bare", "no-such-cluster"];

/// Where an upstream asked to redirect sends the client (or Envoy, on the
/// route with an internal redirect policy).
const REDIRECTS: [&str; 5] = [
    "1",
    "http://registry.internal/r",
    "http://other.test/r",
    "http://api.anthropic.test/anthropic/r",
    "http://google.test/r",
];

/// Where the generated request puts its key.
#[derive(Debug, Clone, Copy)]
enum KeyAt {
    Bearer,
    ApiKey,
    Query,
    QueryEncodedName,
    BearerAndApiKey,
    Nowhere,
}

const KEY_AT: [KeyAt; 6] =
    [KeyAt::Bearer, KeyAt::ApiKey, KeyAt::Query, KeyAt::QueryEncodedName, KeyAt::BearerAndApiKey, KeyAt::Nowhere];

/// One generated request and how it is sent.
fn generate(rng: &mut Rng, n: usize) -> (Probe, bool, &'static str) {
    let host = *rng.pick(&HOSTS);
    let mut path = rng.pick(&PATHS).to_string();
    let who = rng.next() % 10;
    let (client, key) = match usize::try_from(who).unwrap_or(0) {
        i if i < CLIENTS.len() => (Some(&CLIENTS[i]), CLIENTS[i].key),
        8 => (None, UNKNOWN_KEY),
        _ => (None, ""),
    };
    let at = if key.is_empty() { KeyAt::Nowhere } else { *rng.pick(&KEY_AT) };
    let sep = |p: &str| if p.contains('?') { '&' } else { '?' };
    match at {
        KeyAt::Query => path = format!("{path}{}api_key={key}", sep(&path)),
        KeyAt::QueryEncodedName => path = format!("{path}{}api%5Fkey={key}", sep(&path)),
        _ => {}
    }
    let h2 = rng.chance(25);
    let absolute = !h2 && rng.chance(15);
    let target = if absolute { format!("http://{}{path}", rng.pick(&HOSTS[..16])) } else { path };
    let target = target.as_str();
    let method = if rng.chance(5) {
        "TRACE"
    } else if rng.chance(10) {
        "POST"
    } else {
        "GET"
    };
    let mut p = Probe::new(format!("g{n}"), method, host, target);
    if host.is_empty() && !h2 && rng.chance(50) {
        p.host = None;
    }
    p.client = client;
    match at {
        KeyAt::Bearer => p = p.header("authorization", &format!("Bearer {key}")),
        KeyAt::ApiKey => p = p.header("x-api-key", key),
        KeyAt::BearerAndApiKey => p = p.header("authorization", &format!("Bearer {key}")).header("x-api-key", key),
        KeyAt::Query | KeyAt::QueryEncodedName | KeyAt::Nowhere => {}
    }
    if matches!(at, KeyAt::Nowhere) {
        p.client = None;
    }
    if rng.chance(40) {
        p = p.header("x-pick-cluster", rng.pick::<&str>(&PICKS));
    }
    if rng.chance(10) {
        p = p.header(CLIENT_ID_HEADER, "admin");
    }
    if rng.chance(10) {
        p = p.header("x_api_key", key);
    }
    if rng.chance(10) {
        p = p.header("cookie", "session=1");
    }
    if rng.chance(if target.contains("/redirecting/") { 60 } else { 10 }) {
        p = p.header(REDIRECT_HEADER, rng.pick::<&str>(&REDIRECTS));
    }
    if method == "POST" {
        p = p.header("content-length", "0");
    }
    let listener = *rng.pick(&LISTENERS);
    (p, h2, listener)
}

/// The routing agreement: at least a few thousand generated requests (hosts
/// and their case, trailing dots, ports, empty and doubled ports, IPv6
/// literals; paths with route prefixes (a mirrored route, one with an
/// internal redirect policy), `..`, `//`, `%2F` and other
/// encodings; key parameters `api_key` and `api%5Fkey`; absolute-form
/// targets over HTTP/1.1; HTTP/2 `:authority`; the key in each key source;
/// clients with different routes; a client-picked cluster, bound or not,
/// with keyswap's upstream filter or without; spoofed client ids,
/// look-alikes, cookies, redirects asked of the upstream) against a `deny`
/// and a `pass` gateway, every answer judged by [`judge`]. Bounded: 5000
/// requests or 60 s, whichever comes first.
#[test]
fn routing_agreement() {
    const MAX: usize = 5000;
    const BUDGET: Duration = Duration::from_secs(60);
    let gateways = [Gateway::start("deny", false), Gateway::start("pass", false)];
    let started = Instant::now();
    let mut rng = Rng(0x5eed_1313_2026_0001);
    let mut plan: Vec<(usize, Probe, bool, &str)> = Vec::with_capacity(MAX);
    for n in 0..MAX {
        let (p, h2, listener) = generate(&mut rng, n);
        plan.push((usize::from(rng.chance(50)), p, h2, listener));
    }
    // Four senders over disjoint slices of the plan.
    let results: Vec<Vec<(usize, Probe, Reply)>> = std::thread::scope(|s| {
        let handles: Vec<_> = plan
            .chunks(MAX.div_ceil(4))
            .map(|chunk| {
                let gateways = &gateways;
                s.spawn(move || {
                    let mut out = Vec::new();
                    let mut batch: Vec<(usize, Probe, &str)> = Vec::new();
                    for (g, p, h2, listener) in chunk {
                        if started.elapsed() > BUDGET {
                            break;
                        }
                        if *h2 {
                            batch.push((*g, p.clone(), listener));
                            if batch.len() == 25 {
                                out.extend(flush_h2(gateways, &mut batch));
                            }
                        } else {
                            let reply = h1(gateways[*g].listener(listener), p);
                            out.push((*g, p.clone(), reply));
                        }
                    }
                    out.extend(flush_h2(gateways, &mut batch));
                    out
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let records: Vec<BTreeMap<String, Vec<Received>>> = gateways.iter().map(Gateway::all_records).collect();
    let routes = routes();
    let mut problems = Vec::new();
    let mut tally: BTreeMap<String, usize> = BTreeMap::new();
    let mut tried = 0;
    for (g, p, reply) in results.iter().flatten() {
        tried += 1;
        let got = records[*g].get(&p.id).cloned().unwrap_or_default();
        problems.extend(judge(&routes, &p.id, p.client, &got, reply));
        let credentialed = |r: &Received| routes.iter().any(|route| route.forms.iter().any(|f| holds(&texts(r), f)));
        let reached = if got.is_empty() {
            "no upstream".to_string()
        } else {
            let each: Vec<String> = got
                .iter()
                .map(|r| format!("{} {}", r.cluster, if credentialed(r) { "with a credential" } else { "without" }))
                .collect();
            each.join(" + ")
        };
        *tally.entry(format!("{:>4} {} {}", gateways[*g].unmatched, reply.status, reached)).or_default() += 1;
    }
    let unrecorded = records.iter().map(|r| r.get("-").map_or(0, Vec::len)).sum::<usize>();
    eprintln!("routing agreement: {tried} requests in {:.1?}; by gateway, status and upstream:", started.elapsed());
    for (outcome, count) in &tally {
        eprintln!("  {count:>6}  {outcome}");
    }
    assert!(tried >= 2000, "only {tried} requests in {BUDGET:?}");
    assert_eq!(unrecorded, 0, "upstream requests without a request id");
    if problems.len() > 200 {
        let more = problems.len() - 200;
        problems.truncate(200);
        problems.push(format!("… and {more} more"));
    }
    assert_none("routing agreement", &problems);
}

fn flush_h2(gateways: &[Gateway; 2], batch: &mut Vec<(usize, Probe, &str)>) -> Vec<(usize, Probe, Reply)> {
    let mut out = Vec::new();
    // One curl a (gateway, listener), in the batch's order within each.
    let mut groups: BTreeMap<(usize, &str), Vec<Probe>> = BTreeMap::new();
    for (g, p, l) in batch.drain(..) {
        groups.entry((g, l)).or_default().push(p);
    }
    for ((g, l), probes) in groups {
        let replies = h2(gateways[g].listener(l), &probes);
        out.extend(probes.into_iter().zip(replies).map(|(p, r)| (g, p, r)));
    }
    out
}
