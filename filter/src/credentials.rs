//! Dynamic credentials in the filter: the root context's refresh engine and
//! the request path's read of the shared values. The policy says what to
//! ask and how to read the answer (`keyswap_policy::credential`); this
//! module does the host calls.
//!
//! ```text
//! on_tick (every worker) ──get_shared_data──▶ Record::due? ──set_shared_data(CAS)──▶ lease won?
//!        └─ yes ──dispatch_http_call(cluster)──▶ on_http_call_response ──▶ Record::succeeded | failed ──CAS──▶ shared data
//! request ──get_shared_data (one per source of the route)──▶ Policy::dynamic_edits ──▶ edits | credential_unavailable
//! ```
//!
//! Every worker of a VM sees the same shared data, so one worker leads each
//! refresh: it wins the compare-and-swap that writes the lease, makes the
//! one call, and writes the answer back. Requests never wait for a call;
//! they read the last good value. Logs name a source by its configuration
//! path and never carry a value, a client secret or a response body.

use std::collections::HashMap;
use std::time::Duration;

use keyswap_policy::credential::{DynamicEdits, Record, Source};
use keyswap_policy::{DenialReason, Policy, RequestView};
use proxy_wasm::hostcalls;
use proxy_wasm::types::{LogLevel, Status};

use crate::log;

/// How often every worker checks whether a refresh is due.
pub const TICK: Duration = Duration::from_millis(500);

/// The largest answer read from a token endpoint or credential service.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// The shared-data key of a source's record.
pub fn record_key(source: &Source) -> String {
    format!("keyswap.credential.{}", source.id)
}

fn read(key: &str) -> (Record, Option<u32>) {
    match hostcalls::get_shared_data(key) {
        Ok((Some(bytes), cas)) => (Record::decode(&bytes), cas),
        Ok((None, cas)) => (Record::default(), cas),
        Err(_) => (Record::default(), None),
    }
}

/// The edits for a forwarded request on `route`, or `None` for a route
/// with static credentials only. `now_ms` is called only on a route with
/// dynamic credentials. `record_keys` holds [`record_key`] of each source,
/// made once at configuration.
///
/// # Errors
/// [`DenialReason::CredentialUnavailable`] when one of the route's
/// credentials has no usable value at `now_ms`.
pub fn request_edits<'p>(
    policy: &'p Policy,
    record_keys: &[String],
    route: &str,
    req: &RequestView<'_>,
    now_ms: &dyn Fn() -> i64,
) -> Result<Option<DynamicEdits<'p>>, DenialReason> {
    // Static configurations pay nothing: no host call, no lookup.
    if policy.credential_sources().is_empty() {
        return Ok(None);
    }
    let needed = policy.route_sources(route);
    if needed.is_empty() {
        return Ok(None);
    }
    let now_ms = now_ms();
    // One read per source: every value of a source comes from one record,
    // written whole by one refresh.
    let records: Vec<(usize, Record)> =
        needed.iter().filter_map(|&s| record_keys.get(s).map(|key| (s, read(key).0))).collect();
    let mut values: Vec<Option<&[String]>> = vec![None; record_keys.len()];
    for (s, record) in &records {
        values[*s] = record.usable(now_ms);
    }
    policy.dynamic_edits(route, req, &values).map(Some)
}

/// The root context's refresh state: calls in flight, by token.
#[derive(Default)]
pub struct Refresher {
    in_flight: HashMap<u32, usize>,
}

impl Refresher {
    /// Creates the records that do not exist yet, so that every later write
    /// is a compare-and-swap, and starts the timer.
    pub fn start(&mut self, policy: &Policy) {
        // Calls made for an earlier configuration are known by the index of
        // their source in it: their answers must not land in this one's.
        self.in_flight.clear();
        if policy.credential_sources().is_empty() {
            return;
        }
        for source in policy.credential_sources() {
            let key = record_key(source);
            if let Ok((None, _)) = hostcalls::get_shared_data(&key) {
                let _ = hostcalls::set_shared_data(&key, Some(&Record::default().encode()), None);
            }
        }
        if hostcalls::set_tick_period(TICK).is_err() {
            log(LogLevel::Error, "keyswap: could not start the credential refresh timer");
        }
    }

    /// One tick: for each source due for a refresh, try to take the lease
    /// and, if won, make the call.
    pub fn tick(&mut self, policy: &Policy, now_ms: i64) {
        for (s, source) in policy.credential_sources().iter().enumerate() {
            if self.in_flight.values().any(|&f| f == s) {
                continue;
            }
            let key = record_key(source);
            let (record, cas) = read(&key);
            if !record.due(now_ms) {
                continue;
            }
            let leased = record.leased(source, now_ms);
            match hostcalls::set_shared_data(&key, Some(&leased.encode()), cas) {
                Ok(()) => {}
                // Another worker took it first.
                Err(_) => continue,
            }
            let headers: Vec<(&str, &str)> = source.headers.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
            let timeout = Duration::from_millis(source.timeout_ms);
            match hostcalls::dispatch_http_call(&source.cluster, headers, source.body.as_deref(), vec![], timeout) {
                Ok(token) => {
                    self.in_flight.insert(token, s);
                }
                Err(status) => {
                    let why = match status {
                        Status::BadArgument => "the call was refused (is the cluster defined?)".to_string(),
                        other => format!("the call could not be made ({other:?})"),
                    };
                    finish(source, &key, now_ms, Err(why));
                }
            }
        }
    }

    /// A call's answer (`num_headers` 0: no answer, the call failed or timed
    /// out). Returns false for a token this refresher did not send.
    pub fn answer(&mut self, policy: &Policy, token: u32, num_headers: usize, body_size: usize, now_ms: i64) -> bool {
        let Some(s) = self.in_flight.remove(&token) else { return false };
        let Some(source) = policy.credential_sources().get(s) else { return true };
        let result = if num_headers == 0 {
            Err(format!("no answer from cluster `{}` (timeout or connection failure)", source.cluster))
        } else if body_size > MAX_ANSWER_BYTES {
            Err(format!("the answer is larger than {MAX_ANSWER_BYTES} bytes"))
        } else {
            let status = hostcalls::get_map_value(proxy_wasm::types::MapType::HttpCallResponseHeaders, ":status")
                .ok()
                .flatten()
                .and_then(|s| s.parse::<u16>().ok())
                .unwrap_or(0);
            let body = if body_size == 0 {
                Vec::new()
            } else {
                hostcalls::get_buffer(proxy_wasm::types::BufferType::HttpCallResponseBody, 0, body_size)
                    .ok()
                    .flatten()
                    .unwrap_or_default()
            };
            source.parse(status, &body, now_ms).map_err(|e| e.0)
        };
        finish(source, &record_key(source), now_ms, result.map(Some));
        true
    }
}

/// Writes a refresh's outcome into the shared record (compare-and-swap,
/// retried on a concurrent write) and logs the start and end of a failure
/// streak.
fn finish(
    source: &Source,
    key: &str,
    now_ms: i64,
    result: Result<Option<keyswap_policy::credential::Fetched>, String>,
) {
    for _ in 0..8 {
        let (record, cas) = read(key);
        let (next, note) = match &result {
            Ok(Some(fetched)) => {
                let (next, success) = record.succeeded(fetched.clone());
                let note = if success.recovered_after > 0 {
                    Some((LogLevel::Info, format!("refreshed again after {} failed attempts", success.recovered_after)))
                } else if record.values.is_empty() {
                    Some((LogLevel::Info, "first value fetched".to_string()))
                } else {
                    None
                };
                (next, note)
            }
            Ok(None) => (record.clone(), None),
            Err(why) => {
                let next = record.failed(now_ms);
                let note = (next.failures == 1).then(|| {
                    let keeping = if record.usable(now_ms).is_some() {
                        "keeping the last good value until it expires"
                    } else {
                        "its routes answer 503 credential_unavailable until one arrives"
                    };
                    (LogLevel::Warn, format!("refresh failed: {why}; {keeping}; retrying with backoff"))
                });
                (next, note)
            }
        };
        if hostcalls::set_shared_data(key, Some(&next.encode()), cas).is_ok() {
            if let Some((level, text)) = note {
                log(level, &format!("keyswap: credential {} ({}): {text}", source.path, source.kind.name()));
            }
            return;
        }
    }
    log(
        LogLevel::Warn,
        &format!("keyswap: credential {}: could not store a refresh (shared data kept changing)", source.path),
    );
}
