//! The `keyswap:gateway/policy` export: the policy behind WIT, for hosts
//! that handle HTTP themselves. Converts WIT values to and from the
//! policy's, nothing more.

use std::cell::RefCell;
use std::rc::Rc;

use keyswap_policy::credential::NoRecords;
use keyswap_policy::{Policy, RequestView, Routing};

use crate::bindings::policy as wit;

thread_local! {
    /// The instance's configured policy.
    static POLICY: RefCell<Option<Rc<Policy>>> = const { RefCell::new(None) };
}

impl wit::Guest for crate::Component {
    fn configure(config: String, env: Vec<(String, String)>) -> Result<wit::Summary, wit::ConfigError> {
        crate::install_panic_hook();
        let lookup = |name: &str| env.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
        // The host routes by the decision's route, so keyswap's own rules
        // (`host`, `path_prefix`) are the routing here.
        let policy = Policy::from_json_for(config.as_bytes(), &lookup, Routing::Own)
            .map_err(|e| wit::ConfigError { path: e.path, message: e.message })?;
        // No storage outlives the host's call, so no rate limit or quota
        // could be counted: refused, by its path.
        if let Some(path) = policy.first_limit() {
            return Err(wit::ConfigError { path: path.to_string(), message: crate::NO_COUNTERS.to_string() });
        }
        let summary = summary(&policy);
        POLICY.with(|p| *p.borrow_mut() = Some(Rc::new(policy)));
        Ok(summary)
    }

    fn decide(request: wit::RequestView) -> wit::Decision {
        crate::install_panic_hook();
        let Some(policy) = POLICY.with(|p| p.borrow().clone()) else {
            return wit::Decision::Deny(not_configured());
        };
        let view = RequestView {
            route_name: request.route_name.as_deref(),
            cluster: request.cluster.as_deref(),
            method: request.method.as_bytes(),
            path: request.path.as_bytes(),
            authority: request.authority.as_bytes(),
            headers: &request.headers,
            key: None,
            subject: None,
        };
        // No records: a component keeps no dynamic credentials, so a route
        // with them is refused (`credential_unavailable`), never forwarded
        // without them.
        match policy.decide(&view, &crate::now_ms, &NoRecords).without_waiting() {
            Ok(f) => wit::Decision::Forward(wit::Forward {
                route: f.route.map(str::to_string),
                client: f.client.map(str::to_string),
                remove_headers: f
                    .remove_headers
                    .iter()
                    .map(|n| n.to_string())
                    .chain(f.remove_look_alikes.iter().cloned())
                    .collect(),
                add_headers: f.add_headers.iter().map(|(n, v)| (n.to_string(), v.as_bytes().to_vec())).collect(),
                // The policy only rewrites around ASCII separators of the
                // (UTF-8) path it was given, so this is never lossy.
                path: f.path.map(|p| String::from_utf8_lossy(&p).into_owned()),
            }),
            Err(d) => {
                let reason = d.reason;
                wit::Decision::Deny(wit::Denial {
                    status: reason.status(),
                    code: reason.code().to_string(),
                    message: reason.message().to_string(),
                    headers: reason.headers().iter().map(|(n, v)| (n.to_string(), v.as_bytes().to_vec())).collect(),
                    body: reason.body(),
                    route: d.route.map(str::to_string),
                    client: d.client.map(str::to_string),
                })
            }
        }
    }

    fn strip_response(headers: Vec<wit::Header>) -> Vec<String> {
        POLICY.with(|p| match p.borrow().as_ref() {
            Some(policy) => policy.response_removals(&headers).into_iter().map(str::to_string).collect(),
            None => Vec::new(),
        })
    }
}

/// The summary as a WIT value.
pub(crate) fn summary(policy: &Policy) -> wit::Summary {
    let s = policy.summary();
    let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    wit::Summary { clients: count(s.clients), routes: count(s.routes), version: s.version }
}

/// The answer before any configuration: fail closed, as the proxy-wasm
/// filter does.
fn not_configured() -> wit::Denial {
    let why = keyswap_policy::Unconfigured::NoConfiguration;
    wit::Denial {
        status: keyswap_policy::Unconfigured::STATUS,
        code: keyswap_policy::Unconfigured::CODE.to_string(),
        message: why.message().to_string(),
        headers: vec![
            ("content-type".to_string(), b"application/json".to_vec()),
            ("cache-control".to_string(), b"no-store".to_vec()),
        ],
        body: why.body().to_string(),
        route: None,
        client: None,
    }
}
