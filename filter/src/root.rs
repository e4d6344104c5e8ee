//! The plugin's root context: loads a configuration (the policy, its
//! metrics, the dynamic credentials' refresh) and hands every stream what
//! it shares.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

use keyswap_policy::credential::{Hints, Refresher};
use keyswap_policy::Policy;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{ContextType, LogLevel};

use crate::broker::{self, Waiter};
use crate::metrics::Metrics;
use crate::{audit, credentials, log, unix_millis, unix_seconds, KeyswapHttp, Stage};

/// What every stream of one configuration shares.
pub(crate) struct Shared {
    pub(crate) policy: Policy,
    pub(crate) metrics: Metrics,
    pub(crate) audit: RefCell<audit::Limiter>,
    /// The access-log field being written (see `KeyswapHttp::record`).
    pub(crate) field: RefCell<String>,
    /// The shared-data key of each unkeyed provider's record, by number.
    pub(crate) record_keys: Vec<String>,
    /// The pool slot this worker last found each keyed record in.
    pub(crate) hints: Hints,
    /// This worker's side of the refresh; streams ask it for a client's
    /// record (`broker`).
    pub(crate) refresher: RefCell<Refresher>,
    /// Requests held for a client's first credential (`broker`).
    pub(crate) waiters: RefCell<Vec<Waiter>>,
    /// The root's timer period, once set.
    pub(crate) tick: Cell<Option<Duration>>,
}

/// The plugin's root context: owns the compiled policy.
pub struct KeyswapRoot {
    shared: Option<Rc<Shared>>,
    context_id: u32,
}

impl KeyswapRoot {
    /// The root context `context_id`.
    pub fn new(context_id: u32) -> Self {
        Self { shared: None, context_id }
    }
}

impl Context for KeyswapRoot {
    fn on_http_call_response(&mut self, token_id: u32, num_headers: usize, body_size: usize, _num_trailers: usize) {
        if let Some(shared) = &self.shared {
            let now = unix_millis(self.get_current_time());
            credentials::answer(shared, (token_id, num_headers, body_size), now);
            broker::release(shared, self.context_id, now);
        }
    }
}

impl RootContext for KeyswapRoot {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let config = self.get_plugin_configuration().unwrap_or_default();
        let env = |name: &str| std::env::var(name).ok();
        match Policy::from_json(&config, &env) {
            Ok(policy) => {
                log(LogLevel::Info, &policy.summary().log_line());
                if policy.refuses_all() {
                    log(LogLevel::Error, audit::REFUSING_ALL);
                }
                let metrics = Metrics::define(&policy, unix_seconds(self.get_current_time()));
                let record_keys = credentials::record_keys(&policy);
                crate::limits::prepare(&policy);
                let hints = Hints::new(policy.credential_providers());
                let (audit, field) = (RefCell::default(), RefCell::default());
                let (refresher, waiters, tick) = (RefCell::default(), RefCell::default(), Cell::default());
                let shared = Shared { policy, metrics, audit, field, record_keys, hints, refresher, waiters, tick };
                credentials::start(&shared);
                self.shared = Some(Rc::new(shared));
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
            broker::ask_again(shared);
            credentials::tick(shared, now);
            broker::release(shared, self.context_id, now);
            credentials::pace(shared, None);
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(KeyswapHttp { shared: self.shared.clone(), stage: Stage::First, context_id }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
