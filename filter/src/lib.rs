//! keyswap as a proxy-wasm HTTP filter: thin glue around `keyswap-policy`.
//!
//! The same module, with the same configuration, runs in two places of one
//! Envoy, and each request meets it twice:
//!
//! ```text
//!            listener (HTTP filter, before the router)          cluster (upstream HTTP filter)
//! request ─▶ first stage: Policy::key_check + admit ─▶ router ─▶ final stage: Policy::decide
//!            keys and look-alikes removed, nothing added         on Envoy's final route and cluster,
//!            the key's digest left in filter state               with that digest: every credential
//!                                                                set (edits applied) | local reply
//! response ◀ strip_response_headers ◀──────────────────────────── credentials echoed back removed;
//!                                                                 on a 401, Policy::upstream_status
//!                                                                 drops the dynamic values sent
//! ```
//!
//! A credential is set only in the final stage, which runs after Envoy has
//! routed the request for the last time (an upstream filter of the cluster
//! the request is sent to), so it reaches only a cluster its route is
//! bound to. The first stage is told from the final one by the filter-state
//! record it leaves: a stream without one is in its first stage, unless
//! Envoy already picked an upstream host (an upstream filter with no first
//! stage before it: refused, 500).
//!
//! - `root`: [`KeyswapRoot`], the root context: loads a configuration,
//!   runs the credential refresh.
//! - [`metrics`]: counters and gauges in Envoy's stats.
//! - [`audit`]: rate-limited denial lines.
//! - [`limits`]: rate limits and quotas: the policy's buckets in Envoy's
//!   shared data (compare-and-swap), created when a configuration loads.
//! - [`edits`]: a decision's header edits, one call or one per edit.
//! - [`credentials`]: dynamic credentials: the policy's refresh state
//!   machine over Envoy's shared data, run by the root context on a timer;
//!   the policy reads the shared values when it decides.
//! - `broker`: the final stage's decision, and requests held for a
//!   client's first per-client credential (`{client}` fetch), let go by the
//!   root context when the value arrives or the wait times out.
//!
//! Per allowed request, the first stage reads the record (absent), the
//! upstream address (absent), the headers, writes the edited headers and
//! the record; the final stage reads the record, the cluster, the route
//! name (only when a route matches on it), the headers, the clock (only
//! when the client has `expires` or the route dynamic credentials), the
//! shared data (only for dynamic credentials, and for the buckets of a
//! client's rate limits and quotas), writes the edited headers,
//! the counter and the access-log field. Only a configuration with a
//! per-client fetch or an on-behalf-of exchange adds anything: the first
//! stage reads the caller-token and subject headers from the headers it
//! already has (a filter-state write for each one present), the final
//! stage a filter-state read for each. No decision is taken here; no key
//! or credential is ever logged.

pub mod audit;
mod broker;
pub mod credentials;
pub mod edits;
pub mod limits;
pub mod metrics;
mod root;

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{SystemTime, UNIX_EPOCH};

use keyswap_policy::credential::Used;
use keyswap_policy::{AccessLog, Denial, KeyCheck, Policy, RequestView, Unconfigured};
use metrics::Outcome;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, LogLevel};
pub use root::KeyswapRoot;
use root::Shared;

proxy_wasm::main! {{
    std::panic::set_hook(Box::new(|info| {
        let at = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        // The payload is left out: it is not ours to prove free of secrets.
        log(LogLevel::Critical, &format!("keyswap: panic{at}"));
    }));
    proxy_wasm::set_root_context(|id| -> Box<dyn RootContext> { Box::new(KeyswapRoot::new(id)) });
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

/// The filter-state entry (`wasm.keyswap_key`) the first stage leaves for
/// the final one: the presented key's SHA-256 or why there is none
/// ([`KeyCheck::encode`]), never the key.
pub const KEY_RECORD_PROPERTY: &str = "keyswap_key";

/// The filter-state entry (`wasm.keyswap_caller`) the first stage leaves
/// for the final one when the request carries the caller's own token
/// (`caller_token_header`) and some credential is a per-client fetch: the
/// token for the credential service, read only by keyswap's final stage;
/// the header itself is removed with every protected name.
pub const CALLER_TOKEN_PROPERTY: &str = "keyswap_caller";

/// The filter-state entry (`wasm.keyswap_subject`) the first stage leaves
/// for the final one when the request carries a subject token and some
/// credential is an on-behalf-of exchange: the token for the STS, read only
/// by keyswap's final stage; the header itself is removed with every
/// protected name.
pub const SUBJECT_TOKEN_PROPERTY: &str = "keyswap_subject";

/// Where this stream's context runs, once its request headers are seen.
pub(crate) enum Stage {
    /// The listener's filter, before routing is final.
    First,
    /// The cluster's upstream filter; `route` is the route the credentials
    /// were set for, `secrets` the dynamic values injected, `used` their
    /// records and generations (handed back with the upstream's status).
    Final { route: Option<String>, secrets: Vec<String>, used: Vec<Used> },
    /// The final stage, held for a client's first per-client credential
    /// (`broker`): the root context puts the final stage here when it lets
    /// the request go.
    Held(Rc<RefCell<Option<Stage>>>),
}

/// One HTTP stream.
pub struct KeyswapHttp {
    shared: Option<Rc<Shared>>,
    stage: Stage,
    context_id: u32,
}

impl Context for KeyswapHttp {}

/// The current time, Unix milliseconds (0 if the host cannot say).
pub(crate) fn now_millis() -> i64 {
    proxy_wasm::hostcalls::get_current_time().map_or(0, unix_millis)
}

/// Counts `outcome` and writes the access-log field (`log`, written by
/// the policy), on the effective context's stream.
pub(crate) fn record(shared: &Shared, log: &AccessLog<'_>, outcome: Outcome) {
    shared.metrics.count(log.route, log.client, outcome);
    // One buffer per configuration, reused: no allocation per request.
    let mut field = shared.field.borrow_mut();
    log.write(&mut field);
    let _ = proxy_wasm::hostcalls::set_property(vec![ACCESS_LOG_PROPERTY], Some(field.as_bytes()));
}

/// Answers `denial` locally on the effective context's stream, counted and
/// (rate-limited) logged.
pub(crate) fn deny(shared: &Shared, denial: &Denial<'_>) -> Action {
    let reason = denial.reason;
    record(shared, &denial.access_log(), Outcome::Denied(reason));
    if let Some(suppressed) = shared.audit.borrow_mut().admit(now_millis().div_euclid(1000)) {
        log(LogLevel::Info, &audit::denial_line(denial, suppressed));
    }
    let body = reason.body();
    let headers = denial.headers();
    let headers = headers.iter().map(|(n, v)| (*n, v.as_ref())).collect();
    let _ = proxy_wasm::hostcalls::send_http_response(u32::from(reason.status()), headers, Some(body.as_bytes()));
    Action::Pause
}

impl KeyswapHttp {
    fn refuse_unconfigured(&self, why: Unconfigured) -> Action {
        let headers = vec![("content-type", "application/json")];
        self.send_http_response(u32::from(Unconfigured::STATUS), headers, Some(why.body().as_bytes()));
        Action::Pause
    }

    /// The first stage: read the key, remove every place a key can be, and
    /// leave the key's digest for the final stage (and the caller's token,
    /// for a configuration with per-client fetches). Nothing is added but,
    /// with `client_id_on_listener`, the client id of a valid key.
    fn first_stage(&mut self, policy: &Policy) -> Action {
        let headers = self.get_http_request_headers_bytes();
        let view = RequestView::from_headers(None, &headers);
        let key = policy.key_check(&view);
        let admit = policy.admit_with_id(&view, &key, &now_millis);
        if policy.has_keyed_credentials() {
            if let Some(token) = policy.caller_token(&view) {
                self.set_property(vec![CALLER_TOKEN_PROPERTY], Some(token));
            }
            if let Some(subject) = policy.subject_token(&view) {
                self.set_property(vec![SUBJECT_TOKEN_PROPERTY], Some(subject));
            }
        }
        if !admit.is_noop() {
            self.set_http_request_headers_bytes(admit.edited(&headers));
        }
        self.set_property(vec![KEY_RECORD_PROPERTY], Some(&key.encode()));
        Action::Continue
    }

    /// The final stage: decide on Envoy's final route and cluster, with
    /// the key the first stage read, and apply the answer; a request that
    /// waits for a client's first credential is held (`broker`).
    fn final_stage(&mut self, shared: &Rc<Shared>, key: KeyCheck) -> Action {
        let policy = &shared.policy;
        let text = |b: Vec<u8>| String::from_utf8(b).ok();
        let cluster = self.get_property(vec!["xds", "cluster_name"]).and_then(text);
        let route_name =
            if policy.needs_route_name() { self.get_property(vec!["xds", "route_name"]).and_then(text) } else { None };
        let (caller, subject) = if policy.has_keyed_credentials() {
            let subject = if policy.has_subject_credentials() {
                self.get_property(vec![SUBJECT_TOKEN_PROPERTY]).and_then(text)
            } else {
                None
            };
            (self.get_property(vec![CALLER_TOKEN_PROPERTY]).and_then(text), subject)
        } else {
            (None, None)
        };
        let request = broker::Request { key, cluster, route_name, caller, subject };
        match broker::decide(shared, &request, false, &mut limits::EnvoyCounters) {
            broker::Outcome::Go(stage) => {
                self.stage = stage;
                Action::Continue
            }
            broker::Outcome::Answered => Action::Pause,
            broker::Outcome::Hold { slots, timeout_ms } => {
                self.stage = Stage::Held(broker::hold(shared, self.context_id, request, slots, timeout_ms));
                Action::Pause
            }
        }
    }

    /// A held request's final stage, once the root context let it go.
    fn settle(&mut self) {
        if let Stage::Held(cell) = &self.stage {
            let settled = cell.borrow_mut().take();
            self.stage = settled.unwrap_or(Stage::Final { route: None, secrets: Vec::new(), used: Vec::new() });
        }
    }
}

impl HttpContext for KeyswapHttp {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let Some(shared) = self.shared.clone() else {
            // Envoy never runs a plugin whose configuration was refused; if
            // it ever did, fail closed.
            return self.refuse_unconfigured(Unconfigured::NoConfiguration);
        };
        if let Some(denial) = shared.policy.refusal() {
            // The fail-closed configuration: nothing goes on, at the first
            // stage already (a cluster without the final stage included).
            return deny(&shared, &denial);
        }
        match self.get_property(vec![KEY_RECORD_PROPERTY]) {
            Some(record) => self.final_stage(&shared, KeyCheck::from_record(&record)),
            None if self.get_property(vec!["upstream", "address"]).is_some() => {
                if let Some(suppressed) = shared.audit.borrow_mut().admit(unix_seconds(self.get_current_time())) {
                    log(
                        LogLevel::Error,
                        &format!(
                            "keyswap: refused a request on a cluster whose listener does not run keyswap \
                             (add it to the listener's http_filters; {suppressed} suppressed)"
                        ),
                    );
                }
                self.refuse_unconfigured(Unconfigured::NoListenerStage)
            }
            None => self.first_stage(&shared.policy),
        }
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        if let Some(shared) = &self.shared {
            let trailers = self.get_http_request_trailers_bytes();
            for name in shared.policy.trailer_removals(&trailers) {
                self.set_http_request_trailer(&name, None);
            }
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let Some(shared) = self.shared.clone() else {
            return Action::Continue;
        };
        self.settle();
        match &self.stage {
            Stage::First if shared.policy.strips_responses() => {
                let headers = self.get_http_response_headers_bytes();
                for name in shared.policy.response_removals(&headers) {
                    self.set_http_response_header(name, None);
                }
            }
            Stage::First | Stage::Final { route: None, .. } | Stage::Held(_) => {}
            Stage::Final { route: Some(route), secrets, used } => {
                if !used.is_empty() {
                    // A 401 drops the dynamic values this request carried.
                    let status = self.get_http_response_header(":status").and_then(|s| s.parse().ok()).unwrap_or(0);
                    credentials::upstream_status(&shared, route, status, used, &now_millis);
                }
                let headers = self.get_http_response_headers_bytes();
                let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
                for (name, value) in shared.policy.reflections(route, &secrets, &headers) {
                    self.set_http_response_header_bytes(&name, value.as_deref());
                }
            }
        }
        Action::Continue
    }

    fn on_http_response_trailers(&mut self, _num_trailers: usize) -> Action {
        let Some(shared) = self.shared.clone() else {
            return Action::Continue;
        };
        self.settle();
        let trailers = self.get_http_response_trailers_bytes();
        let mut removals: Vec<String> =
            shared.policy.response_removals(&trailers).into_iter().map(str::to_string).collect();
        if let Stage::Final { route: Some(route), secrets, .. } = &self.stage {
            let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
            removals.extend(shared.policy.reflections(route, &secrets, &trailers).into_iter().map(|(n, _)| n));
        }
        for name in removals {
            self.set_http_response_trailer(&name, None);
        }
        Action::Continue
    }
}
