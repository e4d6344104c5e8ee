//! keyswap as a proxy-wasm HTTP filter: thin glue around `keyswap-policy`.
//!
//! ```text
//! Envoy ──on_configure──▶ KeyswapRoot ── Policy::from_json ──▶ Rc<Policy>
//! Envoy ──on_http_request_headers──▶ KeyswapHttp ── Policy::decide ──▶ set headers | local reply
//! Envoy ──on_http_response_headers──▶ KeyswapHttp ── Policy::response_removals ──▶ remove headers
//! ```
//!
//! Per request the filter makes one call to read the headers, one for the
//! route name (only when a route matches on it), one for the clock (only
//! when the client has `expires`), and one to write the edited headers.
//! No decision is taken here; no key or credential is ever logged.

use std::rc::Rc;
use std::time::UNIX_EPOCH;

use keyswap_policy::{Decision, Policy, RequestView};
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

/// The plugin's root context: owns the compiled policy.
#[derive(Default)]
pub struct KeyswapRoot {
    policy: Option<Rc<Policy>>,
}

impl Context for KeyswapRoot {}

impl RootContext for KeyswapRoot {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let config = self.get_plugin_configuration().unwrap_or_default();
        let env = |name: &str| std::env::var(name).ok();
        match Policy::from_json(&config, &env) {
            Ok(policy) => {
                log(LogLevel::Info, &format!("keyswap: configuration loaded: {}", policy.summary()));
                self.policy = Some(Rc::new(policy));
                true
            }
            Err(err) => {
                log(LogLevel::Error, &format!("keyswap: configuration refused: {err}"));
                false
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(KeyswapHttp { policy: self.policy.clone() }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// One HTTP stream.
pub struct KeyswapHttp {
    policy: Option<Rc<Policy>>,
}

impl Context for KeyswapHttp {}

impl HttpContext for KeyswapHttp {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let Some(policy) = self.policy.clone() else {
            // Envoy never runs a plugin whose configuration was refused; if
            // it ever did, fail closed.
            let body = br#"{"error":"not_configured","message":"The gateway has no keyswap configuration."}"#;
            self.send_http_response(500, vec![("content-type", "application/json")], Some(body));
            return Action::Pause;
        };
        let mut headers = self.get_http_request_headers_bytes();
        let route_name = if policy.needs_route_name() {
            self.get_property(vec!["xds", "route_name"]).and_then(|b| String::from_utf8(b).ok())
        } else {
            None
        };
        let now = || {
            let since = self.get_current_time().duration_since(UNIX_EPOCH);
            since.map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        };
        let view = RequestView::from_headers(route_name.as_deref(), &headers);
        match policy.decide(&view, &now) {
            Decision::Forward(forward) => {
                if !forward.is_noop() {
                    forward.apply(&mut headers);
                    let pairs = headers.iter().map(|(n, v)| (n.as_str(), v.as_slice())).collect();
                    self.set_http_request_headers_bytes(pairs);
                }
                Action::Continue
            }
            Decision::Deny(denial) => {
                let reason = denial.reason;
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
        if let Some(policy) = self.policy.as_ref().filter(|p| p.strips_responses()) {
            let headers = self.get_http_response_headers_bytes();
            for name in policy.response_removals(&headers) {
                self.set_http_response_header(name, None);
            }
        }
        Action::Continue
    }
}
