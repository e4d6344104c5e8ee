//! keyswap's Envoy metrics, defined once per configuration and incremented
//! with one host call per request.
//!
//! proxy-wasm metrics have no labels, so labels are written into the name
//! (`keyswap_requests_total;route=openai;outcome=denied;reason=invalid_key`)
//! and Envoy's `stats_config.stats_tags` turns them back into tags (see
//! `envoy.yaml`); Prometheus then sees
//! `keyswap_requests_total{route="openai",outcome="denied",reason="invalid_key"}`.

use std::cell::RefCell;
use std::collections::HashMap;

use keyswap_policy::{DenialReason, Policy};
use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;

/// What happened to a request, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Allowed,
    Passed,
    Denied(DenialReason),
}

impl Outcome {
    fn slot(self) -> usize {
        match self {
            Outcome::Allowed | Outcome::Passed => 0,
            Outcome::Denied(reason) => 1 + DenialReason::ALL.iter().position(|r| *r == reason).unwrap_or(0),
        }
    }

    /// `outcome=…;reason=…` for a metric name or an access-log field.
    pub fn labels(self) -> (&'static str, &'static str) {
        match self {
            Outcome::Allowed => ("allowed", ""),
            Outcome::Passed => ("passed", ""),
            Outcome::Denied(reason) => ("denied", reason.code()),
        }
    }
}

const SLOTS: usize = 1 + DenialReason::ALL.len();

/// Counter ids for one configuration.
pub struct Metrics {
    /// Per route name: the allowed counter, then one per denial reason
    /// (a list: routes are few, and comparing a short name beats hashing it).
    routes: Vec<(String, [Option<u32>; SLOTS])>,
    /// Requests that matched no route: passed, or denied `no_route`.
    unmatched: [Option<u32>; SLOTS],
    per_client: bool,
    /// Per route with dynamic credentials: values marked rejected after an
    /// upstream's 401 (`keyswap_credential_rejected_total;route=…`).
    rejected: Vec<(String, Option<u32>)>,
    /// Per client, per route: defined on the client's first request there.
    clients: RefCell<HashMap<String, HashMap<String, Option<u32>>>>,
}

fn counter(name: &str) -> Option<u32> {
    hostcalls::define_metric(MetricType::Counter, name).ok()
}

fn requests_name(route: &str, outcome: Outcome) -> String {
    let (outcome, reason) = outcome.labels();
    format!("keyswap_requests_total;route={route};outcome={outcome};reason={reason}")
}

impl Metrics {
    /// Defines every per-route counter and sets the configuration gauges.
    pub fn define(policy: &Policy, now: i64) -> Self {
        let route_outcomes = |route: &str| {
            let mut ids = [None; SLOTS];
            ids[0] = counter(&requests_name(route, Outcome::Allowed));
            for reason in policy.route_denials(route) {
                ids[Outcome::Denied(reason).slot()] = counter(&requests_name(route, Outcome::Denied(reason)));
            }
            ids
        };
        let routes = policy.route_names().map(|r| (r.to_string(), route_outcomes(r))).collect();
        let rejected = policy
            .route_names()
            .filter(|r| !policy.route_providers(r).is_empty())
            .map(|r| (r.to_string(), counter(&format!("keyswap_credential_rejected_total;route={r}"))))
            .collect();
        let mut unmatched = [None; SLOTS];
        // In Envoy no route matches on `host` (refused at load), so
        // `invalid_authority` is not among these.
        for outcome in policy.unrouted_outcomes() {
            let outcome = outcome.map_or(Outcome::Passed, Outcome::Denied);
            unmatched[outcome.slot()] = counter(&requests_name("", outcome));
        }

        let summary = policy.summary();
        let gauge = |name: &str, value: u64| {
            if let Ok(id) = hostcalls::define_metric(MetricType::Gauge, name) {
                let _ = hostcalls::record_metric(id, value);
            }
        };
        gauge("keyswap_active_clients", policy.active_clients(now) as u64);
        gauge("keyswap_routes", summary.routes as u64);
        gauge("keyswap_refusing_all", u64::from(policy.refuses_all()));
        gauge(&format!("keyswap_config_info;version={}", summary.version), 1);
        Metrics { routes, unmatched, per_client: policy.per_client_metrics(), rejected, clients: RefCell::default() }
    }

    /// Counts dynamic values of `route` marked rejected after an upstream's 401.
    pub fn count_rejected(&self, route: &str) {
        if let Some((_, Some(id))) = self.rejected.iter().find(|(name, _)| name == route) {
            let _ = hostcalls::increment_metric(*id, 1);
        }
    }

    /// Counts one request.
    pub fn count(&self, route: Option<&str>, client: Option<&str>, outcome: Outcome) {
        let ids = match route {
            Some(route) => self.routes.iter().find(|(name, _)| name == route).map(|(_, ids)| ids),
            None => Some(&self.unmatched),
        };
        if let Some(id) = ids.and_then(|ids| ids[outcome.slot()]) {
            let _ = hostcalls::increment_metric(id, 1);
        }
        if let (true, Outcome::Allowed, Some(route), Some(client)) = (self.per_client, outcome, route, client) {
            let mut clients = self.clients.borrow_mut();
            if !clients.contains_key(client) {
                clients.insert(client.to_string(), HashMap::new());
            }
            let Some(routes) = clients.get_mut(client) else { return };
            if !routes.contains_key(route) {
                let name = format!("keyswap_client_requests_total;client={client};route={route}");
                routes.insert(route.to_string(), counter(&name));
            }
            if let Some(&Some(id)) = routes.get(route) {
                let _ = hostcalls::increment_metric(id, 1);
            }
        }
    }
}
