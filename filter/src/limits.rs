//! Rate limits and quotas in the filter: the policy's buckets
//! (`keyswap_policy::limit`) kept in Envoy's shared data, which every
//! worker of the VM sees, written with compare-and-swap.
//!
//! ```text
//! on_configure ──Policy::limit_keys──▶ get_shared_data; set_shared_data (zero) for each bucket not there yet
//! request ──Policy::decide_limited(EnvoyCounters)──▶ get_shared_data, set_shared_data(cas), per bucket that applies
//! ```
//!
//! Envoy's `set_shared_data` creates a missing key whatever the version
//! given, so two workers could both create a bucket on their first
//! requests; the buckets are therefore created when a configuration loads,
//! before it serves a request. A configuration that keeps a limit finds its
//! buckets as they are (their keys hold the limit's definition).

use keyswap_policy::limit::{Counter, SharedCounters};
use keyswap_policy::Policy;
use proxy_wasm::hostcalls;

/// The buckets in Envoy's shared data.
pub struct EnvoyCounters;

impl SharedCounters for EnvoyCounters {
    fn read(&self, key: &str) -> Option<(Counter, Option<u32>)> {
        match hostcalls::get_shared_data(key) {
            Ok((Some(bytes), cas)) => Some((Counter::decode(&bytes), cas)),
            // Missing, or unreadable: a fresh bucket, written without a version.
            Ok((None, _)) | Err(_) => None,
        }
    }

    fn write(&mut self, key: &str, counter: Counter, version: Option<u32>) -> bool {
        hostcalls::set_shared_data(key, Some(&counter.encode()), version).is_ok()
    }
}

/// Creates the buckets of a newly loaded configuration that are not in
/// shared data yet; returns how many it created.
pub fn prepare(policy: &Policy) -> usize {
    let mut created = 0;
    for key in policy.limit_keys() {
        if matches!(hostcalls::get_shared_data(&key), Ok((None, _)))
            && hostcalls::set_shared_data(&key, Some(&Counter::default().encode()), None).is_ok()
        {
            created += 1;
        }
    }
    created
}
