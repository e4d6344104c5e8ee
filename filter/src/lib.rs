//! keyswap as a proxy-wasm HTTP filter: thin glue around `keyswap-policy`.
//!
//! ```text
//! Envoy ──on_configure──▶ KeyswapRoot ── Policy::from_json ──▶ Rc<Shared>
//! Envoy ──on_http_request_headers──▶ KeyswapHttp ── Policy::decide ──▶ set headers | local reply
//! Envoy ──on_http_response_headers──▶ KeyswapHttp ── Policy::response_removals ──▶ remove headers
//! ```
//!
//! - [`metrics`]: counters and gauges in Envoy's stats.
//! - [`audit`]: rate-limited denial lines.
//! - [`credentials`]: dynamic credentials: the root context refreshes them
//!   on a timer; requests read the shared values.
//!
//! Per allowed request the filter makes one host call to read the headers,
//! one for the route name (only when a route matches on it), one for the
//! clock (only when the client has `expires`), one to write the edited
//! headers, one for the counter and one for the access-log field. No
//! decision is taken here; no key or credential is ever logged.

pub mod audit;
pub mod credentials;
pub mod metrics;

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{SystemTime, UNIX_EPOCH};

use keyswap_policy::{Decision, Denial, Policy, RequestView};
use metrics::{Metrics, Outcome};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

proxy_wasm::main! {{
    std::panic::set_hook(Box::new(|info| {
        let at = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        // The payload is left out: it is not ours to prove free of secrets.
        log(LogLevel::Critical, &format!("keyswap: panic{at}"));
    }));
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(KeyswapRoot::default()) });
}}

fn log(level: LogLevel, message: &str) {
    // A failed log call has nowhere better to go.
    let _ = proxy_wasm::hostcalls::log(level, message);
}

fn unix_millis(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn unix_seconds(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// The name of the filter-state entry the access log reads
/// (`%FILTER_STATE(wasm.keyswap:PLAIN)%`).
pub const ACCESS_LOG_PROPERTY: &str = "keyswap";

/// What every stream of one configuration shares.
struct Shared {
    policy: Policy,
    metrics: Metrics,
    audit: RefCell<audit::Limiter>,
    /// The access-log field being written (see `KeyswapHttp::record`).
    field: RefCell<String>,
    /// The shared-data key of each dynamic credential source, by index.
    record_keys: Vec<String>,
}

/// The plugin's root context: owns the compiled policy.
#[derive(Default)]
pub struct KeyswapRoot {
    shared: Option<Rc<Shared>>,
    refresher: credentials::Refresher,
}

impl Context for KeyswapRoot {
    fn on_http_call_response(&mut self, token_id: u32, num_headers: usize, body_size: usize, _num_trailers: usize) {
        if let Some(shared) = &self.shared {
            let now = unix_millis(self.get_current_time());
            self.refresher.answer(&shared.policy, token_id, num_headers, body_size, now);
        }
    }
}

impl RootContext for KeyswapRoot {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let config = self.get_plugin_configuration().unwrap_or_default();
        let env = |name: &str| std::env::var(name).ok();
        match Policy::from_json(&config, &env) {
            Ok(policy) => {
                log(LogLevel::Info, &format!("keyswap: configuration loaded: {}", policy.summary()));
                if policy.refuses_all() {
                    log(LogLevel::Error, audit::REFUSING_ALL);
                }
                let metrics = Metrics::define(&policy, unix_seconds(self.get_current_time()));
                self.refresher.start(&policy);
                let record_keys = policy.credential_sources().iter().map(credentials::record_key).collect();
                let (audit, field) = (RefCell::default(), RefCell::default());
                self.shared = Some(Rc::new(Shared { policy, metrics, audit, field, record_keys }));
                true
            }
            Err(err) => {
                log(LogLevel::Error, &format!("keyswap: configuration refused: {err}"));
                false
            }
        }
    }

    fn on_tick(&mut self) {
        if let Some(shared) = &self.shared {
            let now = unix_millis(self.get_current_time());
            self.refresher.tick(&shared.policy, now);
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(KeyswapHttp { shared: self.shared.clone() }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// One HTTP stream.
pub struct KeyswapHttp {
    shared: Option<Rc<Shared>>,
}

impl Context for KeyswapHttp {}

impl KeyswapHttp {
    fn record(&self, shared: &Shared, route: Option<&str>, client: Option<&str>, outcome: Outcome) {
        shared.metrics.count(route, client, outcome);
        let (outcome, reason) = outcome.labels();
        // One buffer per configuration, reused: no allocation per request.
        let mut field = shared.field.borrow_mut();
        field.clear();
        for part in [
            "outcome=",
            outcome,
            " reason=",
            if reason.is_empty() { "-" } else { reason },
            " route=",
            route.unwrap_or("-"),
            " client=",
            client.unwrap_or("-"),
        ] {
            field.push_str(part);
        }
        self.set_property(vec![ACCESS_LOG_PROPERTY], Some(field.as_bytes()));
    }
}

impl HttpContext for KeyswapHttp {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let Some(shared) = self.shared.clone() else {
            // Envoy never runs a plugin whose configuration was refused; if
            // it ever did, fail closed.
            let body = br#"{"error":"not_configured","message":"The gateway has no keyswap configuration."}"#;
            self.send_http_response(500, vec![("content-type", "application/json")], Some(body));
            return Action::Pause;
        };
        let policy = &shared.policy;
        let headers = self.get_http_request_headers_bytes();
        let route_name = if policy.needs_route_name() {
            self.get_property(vec!["xds", "route_name"]).and_then(|b| String::from_utf8(b).ok())
        } else {
            None
        };
        let now = || unix_seconds(self.get_current_time());
        let view = RequestView::from_headers(route_name.as_deref(), &headers);
        let decision = match policy.decide(&view, &now) {
            // A route with dynamic credentials gets them all, or none.
            Decision::Forward(forward) => {
                let route = forward.route.unwrap_or_default();
                let now_ms = || unix_millis(self.get_current_time());
                match credentials::request_edits(policy, &shared.record_keys, route, &view, &now_ms) {
                    Ok(dynamic) => Ok((forward, dynamic)),
                    Err(reason) => Err(Denial { reason, route: forward.route, client: forward.client }),
                }
            }
            Decision::Deny(denial) => Err(denial),
        };
        match decision {
            Ok((forward, dynamic)) => {
                let outcome = if forward.route.is_some() { Outcome::Allowed } else { Outcome::Passed };
                self.record(&shared, forward.route, forward.client, outcome);
                match &dynamic {
                    // One call replaces the whole map, borrowing every
                    // header rather than copying it.
                    None if !forward.is_noop() => self.set_http_request_headers_bytes(forward.edited(&headers)),
                    None => {}
                    Some(dynamic) => {
                        let mut headers = headers;
                        forward.apply(&mut headers);
                        dynamic.apply(&mut headers);
                        let pairs = headers.iter().map(|(n, v)| (n.as_str(), v.as_slice())).collect();
                        self.set_http_request_headers_bytes(pairs);
                    }
                }
                Action::Continue
            }
            Err(denial) => {
                let reason = denial.reason;
                self.record(&shared, denial.route, denial.client, Outcome::Denied(reason));
                if let Some(suppressed) = shared.audit.borrow_mut().admit(now()) {
                    log(LogLevel::Info, &audit::denial_line(&denial, suppressed));
                }
                let body = reason.body();
                self.send_http_response(
                    u32::from(reason.status()),
                    reason.headers().to_vec(),
                    Some(body.as_bytes()),
                );
                Action::Pause
            }
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if let Some(shared) = self.shared.as_ref().filter(|s| s.policy.strips_responses()) {
            let headers = self.get_http_response_headers_bytes();
            for name in shared.policy.response_removals(&headers) {
                self.set_http_response_header(name, None);
            }
        }
        Action::Continue
    }
}
