//! The plugin's root context: loads a configuration (the policy, its
//! metrics, the dynamic credentials' refresh) and hands every stream what
//! it shares.

use std::cell::RefCell;
use std::rc::Rc;

use keyswap_policy::credential::Refresher;
use keyswap_policy::Policy;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{ContextType, LogLevel};

use crate::metrics::Metrics;
use crate::{audit, credentials, log, unix_millis, unix_seconds, KeyswapHttp, Stage};

/// What every stream of one configuration shares.
pub(crate) struct Shared {
    pub(crate) policy: Policy,
    pub(crate) metrics: Metrics,
    pub(crate) audit: RefCell<audit::Limiter>,
    /// The access-log field being written (see `KeyswapHttp::record`).
    pub(crate) field: RefCell<String>,
    /// The shared-data key of each dynamic credential provider, by number.
    pub(crate) record_keys: Vec<String>,
}

/// The plugin's root context: owns the compiled policy.
#[derive(Default)]
pub struct KeyswapRoot {
    shared: Option<Rc<Shared>>,
    refresher: Refresher,
}

impl Context for KeyswapRoot {
    fn on_http_call_response(&mut self, token_id: u32, num_headers: usize, body_size: usize, _num_trailers: usize) {
        if let Some(shared) = &self.shared {
            let now = unix_millis(self.get_current_time());
            let call = (token_id, num_headers, body_size);
            credentials::answer(&mut self.refresher, &shared.policy, &shared.record_keys, call, now);
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
                let record_keys: Vec<String> =
                    policy.credential_providers().iter().map(credentials::record_key).collect();
                credentials::start(&mut self.refresher, &policy, &record_keys);
                crate::limits::prepare(&policy);
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
            credentials::tick(&mut self.refresher, &shared.policy, &shared.record_keys, now);
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(KeyswapHttp { shared: self.shared.clone(), stage: Stage::First }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
