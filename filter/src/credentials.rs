//! Dynamic credentials in the filter: the policy's refresh state machine
//! (`keyswap_policy::credential::Refresher`) run over Envoy's shared data,
//! with the host calls it needs. The policy says what to ask, how to read
//! the answer and when to ask again; this module does the I/O.
//!
//! ```text
//! on_tick (every worker) ──Refresher::tick(EnvoyRecords)──▶ dispatch_http_call(cluster) for each lease won
//! on_http_call_response ──Reply──▶ Refresher::answer(EnvoyRecords) ──▶ Note ──▶ log
//! request ──Policy::decide(EnvoyRecords)──▶ get_shared_data, once per provider of the route
//! response :status ──Policy::upstream_status(EnvoyRecords)──▶ on a 401, the values sent marked rejected (CAS), refreshed at once ──▶ log, count
//! ```
//!
//! Every worker of a VM sees the same shared data, so the compare-and-swap
//! of [`EnvoyRecords::write`] lets one worker lead each refresh. Logs name a
//! provider by its configuration path and never carry a value, a client
//! secret or a response body.

use std::time::Duration;

use keyswap_policy::credential::{Provider, Record, Refresher, Reply, SharedRecords, Used, MAX_ANSWER_BYTES};
use keyswap_policy::Policy;
use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, LogLevel, MapType, Status};

use crate::log;
use crate::root::Shared;

/// How often every worker checks whether a refresh is due.
pub const TICK: Duration = Duration::from_millis(500);

/// The shared-data key of a provider's record.
pub fn record_key(provider: &Provider) -> String {
    format!("keyswap.credential.{}", provider.id)
}

/// The providers' records in Envoy's shared data, under [`record_key`]
/// (made once per configuration, by provider number).
pub struct EnvoyRecords<'k> {
    pub keys: &'k [String],
}

impl SharedRecords for EnvoyRecords<'_> {
    fn read(&self, provider: usize) -> Option<(Record, Option<u32>)> {
        match hostcalls::get_shared_data(self.keys.get(provider)?) {
            Ok((Some(bytes), cas)) => Some((Record::decode(&bytes), cas)),
            Ok((None, _)) => None,
            // Unreadable: read as empty, and never created over.
            Err(_) => Some((Record::default(), None)),
        }
    }

    fn write(&mut self, provider: usize, record: &Record, version: Option<u32>) -> bool {
        let Some(key) = self.keys.get(provider) else { return false };
        hostcalls::set_shared_data(key, Some(&record.encode()), version).is_ok()
    }
}

fn note(note: Option<keyswap_policy::credential::Note<'_>>) {
    if let Some(note) = note {
        let level = if note.is_warning() { LogLevel::Warn } else { LogLevel::Info };
        log(level, &format!("keyswap: {note}"));
    }
}

/// Starts refreshing a newly loaded configuration's credentials: creates
/// their records and the timer.
pub fn start(refresher: &mut Refresher, policy: &Policy, keys: &[String]) {
    refresher.restart(policy.credential_providers(), &mut EnvoyRecords { keys });
    if !policy.credential_providers().is_empty() && hostcalls::set_tick_period(TICK).is_err() {
        log(LogLevel::Error, "keyswap: could not start the credential refresh timer");
    }
}

/// One tick: a call for each provider due whose lease this worker won.
pub fn tick(refresher: &mut Refresher, policy: &Policy, keys: &[String], now_ms: i64) {
    let mut call = |_: usize, provider: &Provider| {
        let headers: Vec<(&str, &str)> = provider.headers.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
        let timeout = Duration::from_millis(provider.timeout_ms);
        hostcalls::dispatch_http_call(&provider.cluster, headers, provider.body.as_deref(), vec![], timeout).map_err(
            |status| match status {
                Status::BadArgument => "the call was refused (is the cluster defined?)".to_string(),
                other => format!("the call could not be made ({other:?})"),
            },
        )
    };
    let notes = refresher.tick(policy.credential_providers(), &mut EnvoyRecords { keys }, now_ms, &mut call);
    notes.into_iter().for_each(|n| note(Some(n)));
}

/// A call's answer (`num_headers` 0: no answer, the call failed or timed
/// out), read and stored.
pub fn answer(
    refresher: &mut Refresher,
    policy: &Policy,
    keys: &[String],
    (token, num_headers, body_size): (u32, usize, usize),
    now_ms: i64,
) {
    let body;
    let reply = if num_headers == 0 {
        Reply::Lost
    } else if body_size > MAX_ANSWER_BYTES {
        Reply::TooLarge
    } else {
        let status = hostcalls::get_map_value(MapType::HttpCallResponseHeaders, ":status")
            .ok()
            .flatten()
            .and_then(|s| s.parse::<u16>().ok())
            .unwrap_or(0);
        body = if body_size == 0 {
            Vec::new()
        } else {
            hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size).ok().flatten().unwrap_or_default()
        };
        Reply::Answered { status, body: &body }
    };
    let providers = policy.credential_providers();
    note(refresher.answer(providers, &mut EnvoyRecords { keys }, token, reply, now_ms));
}

/// The upstream's answer `status` to a request on `route` that carried the
/// dynamic values `used`: on a 401 the policy marks those values rejected
/// in the shared records (refreshed at once, kept until replaced); each
/// mark is counted and logged (rate-limited with the denial lines, by
/// credential path, never a value).
pub(crate) fn upstream_status(shared: &Shared, route: &str, status: u16, used: &[Used], now_ms: &dyn Fn() -> i64) {
    let keys = &shared.record_keys;
    for rejection in shared.policy.upstream_status(status, used, now_ms, &mut EnvoyRecords { keys }) {
        shared.metrics.count_rejected(route);
        if let Some(suppressed) = shared.audit.borrow_mut().admit(rejection.now.div_euclid(1000)) {
            let tail = if suppressed > 0 { format!(" (suppressed {suppressed} earlier lines)") } else { String::new() };
            log(LogLevel::Warn, &format!("keyswap: route {route}: {rejection}{tail}"));
        }
    }
}
