//! Dynamic credentials in the filter: the policy's refresh state machine
//! (`keyswap_policy::credential::Refresher`) run over Envoy's shared data,
//! with the host calls it needs. The policy says what to ask, how to read
//! the answer and when to ask again; this module does the I/O.
//!
//! ```text
//! on_tick (every worker) ──Refresher::tick(EnvoyRecords)──▶ dispatch_http_call(cluster) for each lease won
//! on_http_call_response ──Reply──▶ Refresher::answer(EnvoyRecords) ──▶ Note ──▶ log
//! request ──Policy::decide(EnvoyRecords)──▶ get_shared_data, once per provider of the route
//!   (a per-client fetch: the client's own record; a first request is held, see `broker`)
//! response :status ──Policy::upstream_status(EnvoyRecords)──▶ on a 401, the values sent marked rejected (CAS), refreshed at once ──▶ log, count
//! ```
//!
//! Every worker of a VM sees the same shared data, so the compare-and-swap
//! of [`EnvoyRecords::write`] lets one worker lead each refresh. Logs name a
//! provider by its configuration path and never carry a value, a client
//! secret or a response body.

use std::time::Duration;

use keyswap_policy::credential::{self, Hints, Provider, Reply, SharedRecords, Slot, Used, MAX_ANSWER_BYTES};
use keyswap_policy::Policy;
use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, LogLevel, MapType, Status};

use crate::log;
use crate::root::Shared;

/// How often every worker checks whether a refresh is due.
pub const TICK: Duration = Duration::from_millis(500);

/// The shared-data key of each unkeyed provider's record, by number
/// (made once per configuration; a keyed record's key is made when read).
pub fn record_keys(policy: &Policy) -> Vec<String> {
    let providers = policy.credential_providers();
    (0..providers.len()).map(|p| Slot::Provider(p).storage_key(providers).unwrap_or_default()).collect()
}

/// The providers' records in Envoy's shared data, under
/// [`Slot::storage_key`], with this worker's hints of where keyed records
/// are.
pub struct EnvoyRecords<'k> {
    keys: &'k [String],
    providers: &'k [Provider],
    hints: &'k Hints,
}

impl<'k> EnvoyRecords<'k> {
    /// The records of `shared`'s configuration.
    pub(crate) fn new(shared: &'k Shared) -> Self {
        Self { keys: &shared.record_keys, providers: shared.policy.credential_providers(), hints: &shared.hints }
    }

    fn with<T>(&self, slot: Slot<'_>, f: impl FnOnce(&str) -> T) -> Option<T> {
        match slot {
            // The hot path: a name made once per configuration.
            Slot::Provider(p) => self.keys.get(p).map(|key| f(key)),
            other => other.storage_key(self.providers).map(|key| f(&key)),
        }
    }
}

impl SharedRecords for EnvoyRecords<'_> {
    fn read_bytes(&self, slot: Slot<'_>) -> Option<(Vec<u8>, Option<u32>)> {
        self.with(slot, |key| match hostcalls::get_shared_data(key) {
            Ok((Some(bytes), cas)) => Some((bytes, cas)),
            Ok((None, _)) => None,
            // Unreadable: read as empty, and never created over.
            Err(_) => Some((Vec::new(), None)),
        })?
    }

    fn write_bytes(&mut self, slot: Slot<'_>, bytes: &[u8], version: Option<u32>) -> bool {
        self.with(slot, |key| hostcalls::set_shared_data(key, Some(bytes), version).is_ok()).unwrap_or(false)
    }

    fn hint(&self, provider: usize, key: &str) -> Option<u32> {
        self.hints.get(provider, key)
    }

    fn remember(&self, provider: usize, key: &str, slot: u32) {
        self.hints.set(provider, key, slot);
    }
}

fn note(shared: &Shared, note: Option<keyswap_policy::credential::Note<'_>>) {
    let Some(note) = note else { return };
    let level = if note.is_warning() { LogLevel::Warn } else { LogLevel::Info };
    if note.key.is_some() && note.provider.subject.is_some() {
        // Subjects are as many as callers send: their lines share the
        // denial lines' limit, so a flood of new subjects (or an STS
        // outage meeting one) cannot flood the log.
        if let Some(suppressed) = shared.audit.borrow_mut().admit(crate::now_millis().div_euclid(1000)) {
            let tail = if suppressed > 0 { format!(" ({suppressed} earlier lines suppressed)") } else { String::new() };
            log(level, &format!("keyswap: {note}{tail}"));
        }
        return;
    }
    log(level, &format!("keyswap: {note}"));
}

/// Starts refreshing a newly loaded configuration's credentials: creates
/// their records and the timer.
pub(crate) fn start(shared: &Shared) {
    shared.refresher.borrow_mut().restart(shared.policy.credential_providers(), &mut EnvoyRecords::new(shared));
    if !shared.policy.credential_providers().is_empty() {
        pace(shared, Some(TICK));
    }
}

/// Sets the root's timer to `period`, or (`None`) to what is needed now:
/// [`crate::broker::WAIT_TICK`] while requests are held or calls asked
/// for, else [`TICK`]. A host call only when the period changes.
pub(crate) fn pace(shared: &Shared, period: Option<Duration>) {
    let period = period.unwrap_or_else(|| {
        let busy = !shared.waiters.borrow().is_empty() || shared.refresher.borrow().has_demands();
        if busy {
            crate::broker::WAIT_TICK
        } else {
            TICK
        }
    });
    if shared.tick.get() != Some(period) {
        if hostcalls::set_tick_period(period).is_err() {
            log(LogLevel::Error, "keyswap: could not start the credential refresh timer");
        }
        shared.tick.set(Some(period));
    }
}

/// One tick: a call for each record due whose lease this worker won.
pub(crate) fn tick(shared: &Shared, now_ms: i64) {
    let mut call = |provider: &Provider, headers: &[(String, String)], body: Option<&[u8]>| {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
        let timeout = Duration::from_millis(provider.timeout_ms);
        hostcalls::dispatch_http_call(&provider.cluster, headers, body, vec![], timeout).map_err(
            |status| match status {
                Status::BadArgument => "the call was refused (is the cluster defined?)".to_string(),
                other => format!("the call could not be made ({other:?})"),
            },
        )
    };
    let providers = shared.policy.credential_providers();
    let notes = shared.refresher.borrow_mut().tick(providers, &mut EnvoyRecords::new(shared), now_ms, &mut call);
    notes.into_iter().for_each(|n| note(shared, Some(n)));
}

/// A call's answer (`num_headers` 0: no answer, the call failed or timed
/// out), read and stored.
pub(crate) fn answer(shared: &Shared, (token, num_headers, body_size): (u32, usize, usize), now_ms: i64) {
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
    let providers = shared.policy.credential_providers();
    let mut records = EnvoyRecords::new(shared);
    let answered = shared.refresher.borrow_mut().answer(providers, &mut records, token, reply, now_ms);
    note(shared, answered);
}

/// What a forwarded request asks of the keyed records it used: marked
/// used (at most once per `touch_ms` per worker), and a due refresh asked
/// for with the caller's token (and subject token). Nothing for unkeyed
/// values.
pub(crate) fn used(shared: &Shared, records: &mut EnvoyRecords<'_>, used: &[Used], request: &crate::broker::Request) {
    let providers = shared.policy.credential_providers();
    for u in used.iter().filter(|u| u.touch || u.due) {
        if u.touch {
            credential::touch(providers, records, u, crate::now_millis());
        }
        if let (true, Some(key)) = (u.due, &u.key) {
            shared.refresher.borrow_mut().demand(
                u.provider,
                key,
                request.caller.as_deref(),
                request.subject.as_deref(),
            );
        }
    }
}

/// The upstream's answer `status` to a request on `route` that carried the
/// dynamic values `used`: on a 401 the policy marks those values rejected
/// in the shared records (refreshed at once, kept until replaced); each
/// mark is counted and logged (rate-limited with the denial lines, by
/// credential path, never a value).
pub(crate) fn upstream_status(shared: &Shared, route: &str, status: u16, used: &[Used], now_ms: &dyn Fn() -> i64) {
    for rejection in shared.policy.upstream_status(status, used, now_ms, &mut EnvoyRecords::new(shared)) {
        shared.metrics.count_rejected(route);
        if let Some(suppressed) = shared.audit.borrow_mut().admit(rejection.now.div_euclid(1000)) {
            let tail = if suppressed > 0 { format!(" (suppressed {suppressed} earlier lines)") } else { String::new() };
            log(LogLevel::Warn, &format!("keyswap: route {route}: {rejection}{tail}"));
        }
    }
}
