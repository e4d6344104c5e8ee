//! Runner `envoy`: the conformance suite through the real Envoy.
//!
//! Cases are grouped by (configuration, environment); each group is one
//! listener with its own keyswap filter in ONE Envoy, so the suite costs one
//! Envoy start. A case's `request.route_name` becomes the Envoy route name:
//! each listener has a route per name, selected by the test-only header
//! [`ROUTE_HEADER`], then an unnamed catch-all, all to the echo upstream.
//! `config_error` cases each start an Envoy that must refuse to start
//! (concurrently, a few at a time). The comparison is `SuiteCase::check`,
//! the same as every runner's.

use std::collections::BTreeMap;

use keyswap_conformance::{default_dir, Expect, Observed, Runner, Suite, SuiteCase, SuiteReport};
use keyswap_tests::echo::{Echo, Echoed, RESPOND_HEADER};
use keyswap_tests::envoy::{
    filter_wasm, route_selector, without_shared_clusters, Envoy, Launch, Listener, ROUTE_HEADER,
};
// Raw: a case's request line and header bytes are sent exactly as the case
// file writes them (name case, repeats, CONNECT authority-form, absolute-form).
use keyswap_tests::raw::Request;

/// Request headers the upstream receives that neither the client sent nor
/// keyswap added; left out of the comparison, as the suite's contract says
/// ("what the host itself adds").
const HOST_ADDED: &[&str] = &[
    // HTTP/1's spelling of `:authority`, a pseudo-header to the filter.
    "host",
    // Envoy's HTTP connection manager adds these to every request.
    "x-forwarded-proto",
    "x-request-id",
    // Envoy's router, for the route timeout.
    "x-envoy-expected-rq-timeout-ms",
    // This runner's own test-only headers.
    ROUTE_HEADER,
    RESPOND_HEADER,
];

/// How many Envoys that must refuse their configuration run at once. Each
/// takes ~0.8 s, about half of it on a core compiling the filter in V8.
const REFUSALS_AT_ONCE: usize = 6;

type Group = (String, BTreeMap<String, String>);

/// The request line, headers and test-only headers for a case.
fn request_for(case: &SuiteCase) -> Request {
    let r = &case.request;
    // CONNECT carries its authority as the target (authority-form); an
    // absolute-form path is sent as the target it is.
    let target = if r.method.eq_ignore_ascii_case("CONNECT") && r.path.is_empty() { &r.authority } else { &r.path };
    let mut request = Request::new(&r.method, target).header("host", &r.authority);
    for (name, value) in &r.headers {
        request = request.header(name, value);
    }
    if let Some(route) = &r.route_name {
        request = request.header(ROUTE_HEADER, route_selector(route, r.cluster().unwrap_or(route)));
    }
    if let Some(response) = &case.response {
        request = request.header(RESPOND_HEADER, serde_json::json!(response.headers).to_string());
    }
    request
}

/// Sends a case's request through `listener` and says what happened: the
/// echo's JSON body means the request was forwarded, anything else that it
/// was answered by the gateway.
fn observe(case: &SuiteCase, listener: std::net::SocketAddr) -> Result<Observed, String> {
    let response = request_for(case).send(listener).map_err(|e| format!("request through Envoy: {e}"))?;
    match Echoed::parse(&response.body) {
        Some(echoed) if response.status == 200 => {
            let client_framed = case.request.headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("content-length"));
            let headers = echoed
                .headers
                .into_iter()
                .filter(|(n, _)| !HOST_ADDED.contains(&n.as_str()))
                // Envoy frames a body-less POST, PUT, ... with
                // `content-length: 0`; only that is left out.
                .filter(|(n, v)| client_framed || !(n == "content-length" && v == "0"))
                .collect();
            let client_response = case.response.as_ref().map(|_| response.headers.clone());
            Ok(Observed::Forwarded { path: echoed.path, headers, client_response })
        }
        _ => Ok(Observed::Denied { status: response.status, headers: response.headers, body: response.body }),
    }
}

fn group_of(case: &SuiteCase) -> Group {
    (case.config.clone(), case.env.clone())
}

/// Starts one Envoy that must refuse `case`'s configuration.
fn refused(case: &SuiteCase, upstream: std::net::SocketAddr, wasm: &std::path::Path) -> Result<Observed, String> {
    let listener =
        Listener { name: "refused".into(), config: case.config.clone(), env: case.env.clone(), ..Listener::default() };
    let refusal = Envoy::refuse(&Launch::gateway(&[listener], upstream, wasm))?;
    Ok(Observed::ConfigRefused { log: refusal.log })
}

/// One Envoy with every listener; if it does not start (some group's
/// configuration refused where the case expects it loaded), one Envoy per
/// listener, so the failure lands on the cases of that group alone.
fn start_gateways(
    listeners: &[Listener],
    upstream: std::net::SocketAddr,
    wasm: &std::path::Path,
) -> Vec<Result<Envoy, String>> {
    // Listeners whose clusters share a name need an Envoy each (a cluster
    // carries its listener's configuration).
    without_shared_clusters(listeners)
        .iter()
        .flat_map(|group| match Envoy::start(&Launch::gateway(group, upstream, wasm)) {
            Ok(envoy) => vec![Ok(envoy)],
            Err(_) => group
                .iter()
                .map(|l| {
                    Envoy::start(&Launch::gateway(std::slice::from_ref(l), upstream, wasm))
                        .map_err(|e| format!("Envoy with listener {} alone did not start: {e}", l.name))
                })
                .collect(),
        })
        .collect()
}

#[test]
fn conformance_suite_passes_in_envoy() {
    let wasm = filter_wasm().unwrap_or_else(|e| panic!("{e}"));
    let suite = Suite::load(&default_dir()).unwrap_or_else(|e| panic!("the suite does not load: {e}"));
    let plan = suite.plan(Runner::Envoy);
    let echo = Echo::start("127.0.0.1:0").expect("the echo upstream starts");

    // config_error cases: one Envoy each, that must exit by itself.
    let refusing: Vec<&SuiteCase> =
        plan.run.iter().copied().filter(|c| matches!(c.expect, Expect::ConfigError(_))).collect();
    let mut refusals: BTreeMap<String, Result<Observed, String>> = BTreeMap::new();
    for batch in refusing.chunks(REFUSALS_AT_ONCE) {
        std::thread::scope(|scope| {
            let handles: Vec<_> = batch
                .iter()
                .map(|case| (case.name.clone(), scope.spawn(|| refused(case, echo.addr(), &wasm))))
                .collect();
            for (name, handle) in handles {
                let outcome = handle.join().unwrap_or_else(|_| Err("the runner thread panicked".into()));
                refusals.insert(name, outcome);
            }
        });
    }

    // Every other case: a listener per (config, env), all in one Envoy.
    let mut groups: BTreeMap<Group, Vec<&SuiteCase>> = BTreeMap::new();
    for case in plan.run.iter().copied().filter(|c| !matches!(c.expect, Expect::ConfigError(_))) {
        groups.entry(group_of(case)).or_default().push(case);
    }
    let listeners: Vec<Listener> = groups
        .iter()
        .enumerate()
        .map(|(i, ((config, env), cases))| {
            fn named<'c>(c: &&'c SuiteCase) -> Option<(&'c str, &'c str)> {
                c.request.route_name.as_deref().map(|r| (r, c.request.cluster().unwrap_or(r)))
            }
            let mut route_names: Vec<String> =
                cases.iter().filter_map(named).filter(|(r, c)| r == c).map(|(r, _)| r.to_string()).collect();
            route_names.sort();
            route_names.dedup();
            let mut routes_to: Vec<(String, String)> = cases
                .iter()
                .filter_map(named)
                .filter(|(r, c)| r != c)
                .map(|(r, c)| (r.to_string(), c.to_string()))
                .collect();
            routes_to.sort();
            routes_to.dedup();
            Listener {
                name: format!("group-{i}"),
                config: config.clone(),
                env: env.clone(),
                route_names,
                routes_to,
                ..Listener::default()
            }
        })
        .collect();
    let listener_of: BTreeMap<&Group, &str> = groups.keys().zip(listeners.iter().map(|l| l.name.as_str())).collect();
    let gateways = start_gateways(&listeners, echo.addr(), &wasm);

    let report = SuiteReport::run(&plan, |case| {
        if let Some(outcome) = refusals.remove(&case.name) {
            return outcome;
        }
        let listener = listener_of.get(&group_of(case)).ok_or("no listener for this case")?;
        let envoy = gateways.iter().find_map(|g| g.as_ref().ok().filter(|e| e.listeners().contains_key(*listener)));
        match envoy {
            Some(envoy) => observe(case, envoy.listener(listener)?),
            None => {
                let mine = format!("listener {listener} alone");
                Err(gateways
                    .iter()
                    .filter_map(|g| g.as_ref().err())
                    .find(|e| e.contains(&mine))
                    .cloned()
                    .unwrap_or(mine))
            }
        }
    });
    println!("{}", report.render());
    assert!(report.failed.is_empty(), "the conformance suite in Envoy:\n{}", report.render());
    assert!(report.passed >= 1, "no case ran");
}
