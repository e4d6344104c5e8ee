//! The hosts that run the suite ([`Runner`]), what a case may need of its
//! host ([`Capability`]), and what each runner lacks, said once with its
//! reason. A runner skips every case that needs something it lacks; only
//! differences that belong to one case are left to `skip.json`.

use serde::Deserialize;

/// What a case may need of its host beyond sending a request and observing
/// what comes of it. A case names these in its `needs` (but `timeline`,
/// which its `steps` imply).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Capability {
    /// keyswap is the router: routes match by `host` and `path_prefix`, and
    /// `clusters` are optional (the policy's `Routing::Own`).
    OwnRouting,
    /// Envoy is the router: keyswap refuses `host` and `path_prefix` and
    /// requires `clusters` (the policy's `Routing::Envoy`).
    EnvoyRouting,
    /// The host hands keyswap the request's Envoy route name and cluster
    /// (`xds.route_name`, `xds.cluster_name`), and the case's outcome
    /// depends on them.
    RouteAndCluster,
    /// The case's `steps`: a clock stopped at [`crate::STEPS_START`] that
    /// moves only by `tick_at`, and token calls answered or failed by the
    /// case.
    Timeline,
    /// keyswap cleans the upstream's response of the credentials the
    /// request was given (`Policy::reflections`: a header handing one back
    /// removed, a `location` losing the injected parameter), besides
    /// removing `strip_response_headers`.
    EchoRemoval,
    /// The host shows the access-log field keyswap set for the request
    /// (`outcome=… route=… client=… key=…`): implied by an `access_log`
    /// in the case's `expect`, not written in `needs`.
    AccessLog,
}

impl Capability {
    /// Every capability, in the order a skip names the first one lacking.
    pub const ALL: [Capability; 6] = [
        Capability::OwnRouting,
        Capability::EnvoyRouting,
        Capability::RouteAndCluster,
        Capability::Timeline,
        Capability::EchoRemoval,
        Capability::AccessLog,
    ];

    /// The name a case's `needs` uses.
    pub fn name(self) -> &'static str {
        match self {
            Capability::OwnRouting => "own-routing",
            Capability::EnvoyRouting => "envoy-routing",
            Capability::RouteAndCluster => "route-and-cluster",
            Capability::Timeline => "timeline",
            Capability::EchoRemoval => "echo-removal",
            Capability::AccessLog => "access-log",
        }
    }
}

/// The proxy-wasm filter's routing, shared by the runners that run it.
const FILTER_ROUTES_IN_ENVOY: &str = "host and path_prefix are keyswap's own routing, used only where keyswap is the \
     router (the component); in Envoy a route is bound to Envoy's routing by clusters and route_name";

/// The component's routing, shared by the runners that run it.
const COMPONENT_ROUTES_ITSELF: &str = "the component is keyswap's own router (Routing::Own): host and path_prefix are \
     its routing and clusters are optional there, so a configuration the Envoy filter refuses for them loads; the \
     refusal is the Envoy filter's, where Envoy routes";

/// Why the component's hosts show no access-log field.
const COMPONENT_HAS_NO_ACCESS_LOG: &str = "world `filter` hands the host the route and client of a decision, not the \
     access-log field (no key id): the field is the proxy-wasm filter's filter state, shown by the harness and by \
     Envoy's access log";

/// A host that runs the suite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Runner {
    /// `keyswap-policy` directly, no wasm (`policy/tests/all/conformance.rs`).
    Native,
    /// The proxy-wasm filter module in the wasmtime harness
    /// (`keyswap_harness::runner`).
    Harness,
    /// The keyswap component, world `filter` (`keyswap_harness::component`).
    Component,
    /// `keyswap serve`: the component's `wasi:http` gateway over HTTP/1.1
    /// (`host-harness/tests/all/serve.rs`).
    Serve,
    /// The filter module in a real Envoy (`tests/tests/all/conformance.rs`).
    Envoy,
}

impl Runner {
    /// Every runner.
    pub const ALL: [Runner; 5] = [Runner::Native, Runner::Harness, Runner::Component, Runner::Serve, Runner::Envoy];

    /// The runner's name in `skip.json` and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Runner::Native => "native",
            Runner::Harness => "harness",
            Runner::Component => "component",
            Runner::Serve => "serve",
            Runner::Envoy => "envoy",
        }
    }

    /// The runner named `name` in `skip.json`.
    pub fn from_name(name: &str) -> Option<Runner> {
        Runner::ALL.into_iter().find(|r| r.name() == name)
    }

    /// What this runner cannot do, each with the one reason why; it skips
    /// every case that needs one of them.
    pub fn lacks(self) -> &'static [(Capability, &'static str)] {
        match self {
            Runner::Native | Runner::Harness => &[(Capability::OwnRouting, FILTER_ROUTES_IN_ENVOY)],
            Runner::Component => &[
                (Capability::EnvoyRouting, COMPONENT_ROUTES_ITSELF),
                (
                    Capability::Timeline,
                    "the component refuses oauth2, token_exchange and fetch values (it cannot fetch in the \
                     background; docs/component.md) and rate limits and quotas (it keeps no counters between \
                     requests), so a case with steps cannot run there",
                ),
                (
                    Capability::EchoRemoval,
                    "world `filter` hands the host a decision and, for responses, only `strip-response`: the host \
                     forwards and answers itself, and the WIT has no call that finds a credential echoed in a \
                     response (the gateway world, run by `serve`, does it)",
                ),
                (Capability::AccessLog, COMPONENT_HAS_NO_ACCESS_LOG),
            ],
            Runner::Serve => &[
                (Capability::EnvoyRouting, COMPONENT_ROUTES_ITSELF),
                (
                    Capability::RouteAndCluster,
                    "matches on Envoy's route name and cluster (xds.route_name, xds.cluster_name); a wasi:http \
                     gateway has neither (it routes by keyswap's own rules), so routes bound by route_name and \
                     clusters match nothing here; the component runner covers it with both",
                ),
                (
                    Capability::Timeline,
                    "keyswap serve runs the component, which refuses oauth2, token_exchange and fetch values (it \
                     cannot fetch in the background) and rate limits and quotas (no counters between requests)",
                ),
                (Capability::AccessLog, COMPONENT_HAS_NO_ACCESS_LOG),
            ],
            Runner::Envoy => &[
                (Capability::OwnRouting, FILTER_ROUTES_IN_ENVOY),
                (
                    Capability::Timeline,
                    "steps drive a controlled clock and answer token calls by hand, which a real Envoy cannot do; \
                     tests/tests/all/credentials.rs covers refresh, rotation, outage, expiry and two workers in \
                     Envoy with a real token server, and tests/tests/all/broker.rs the per-client fetch (held \
                     first requests, isolation, one call per client) with a real credential service (rate limits \
                     and quotas: limit- cases need the stopped clock for their exact instants)",
                ),
                (
                    Capability::AccessLog,
                    "the runner reads each case's answer from the client's side, and Envoy writes its access log \
                     after the response, to a file shared by every listener; tests/tests/all/keys.rs reads the \
                     field (key ids, metadata) from Envoy's access log",
                ),
            ],
        }
    }

    /// Why this runner cannot run a case that needs `needs`: the first
    /// capability it lacks, with its reason.
    pub fn cannot_run(self, needs: impl IntoIterator<Item = Capability>) -> Option<(Capability, &'static str)> {
        let needs: Vec<Capability> = needs.into_iter().collect();
        Capability::ALL
            .into_iter()
            .filter(|c| needs.contains(c))
            .find_map(|c| self.lacks().iter().find(|(lacked, _)| *lacked == c).copied())
    }
}

impl std::fmt::Display for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::fmt::Display for Capability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_each_lack_is_said_once() {
        for runner in Runner::ALL {
            assert_eq!(Runner::from_name(runner.name()), Some(runner));
            let lacked: Vec<Capability> = runner.lacks().iter().map(|(c, _)| *c).collect();
            for (capability, reason) in runner.lacks() {
                assert_eq!(lacked.iter().filter(|c| *c == capability).count(), 1, "{runner} lacks {capability} twice");
                assert!(!reason.trim().is_empty(), "{runner} lacks {capability} without a reason");
            }
        }
        assert_eq!(Runner::from_name("wasmtime"), None);
        for capability in Capability::ALL {
            let parsed: Capability = serde_json::from_value(serde_json::json!(capability.name())).unwrap();
            assert_eq!(parsed, capability);
        }
    }

    #[test]
    fn every_capability_is_had_by_some_runner_and_lacked_by_another() {
        for capability in Capability::ALL {
            let lacking = Runner::ALL.iter().filter(|r| r.cannot_run([capability]).is_some()).count();
            assert!(lacking > 0, "no runner lacks {capability}: it need not be a capability");
            assert!(lacking < Runner::ALL.len(), "every runner lacks {capability}: a case needing it runs nowhere");
        }
    }

    #[test]
    fn the_first_capability_lacking_is_the_reason() {
        let (capability, _) = Runner::Serve.cannot_run([Capability::Timeline, Capability::RouteAndCluster]).unwrap();
        assert_eq!(capability, Capability::RouteAndCluster);
        assert_eq!(Runner::Component.cannot_run([Capability::RouteAndCluster, Capability::OwnRouting]), None);
    }
}
