//! Rate limits and quotas through the real filter on a controlled clock:
//! what the conformance steps cannot say (workers sharing buckets, host
//! calls, metrics, the audit line, the cost).

use std::collections::BTreeMap;
use std::time::{Duration, Instant, UNIX_EPOCH};

use keyswap_harness::{Clock, FilterInstance, Handled, SharedData};

const CONFIG: &str = r#"{
  "clients": [{"id": "limited", "key": "limited-key", "routes": ["*"],
               "limits": {"rate": {"requests": 2, "per": "second", "burst": 3}}},
              {"id": "other", "key": "other-key", "routes": ["*"],
               "limits": {"rate": {"requests": 2, "per": "second", "burst": 3}}},
              {"id": "free", "key": "free-key", "routes": ["*"]}],
  "key_sources": [{"header": "x-api-key"}],
  "routes": [{"name": "r", "match": {"route_name": "r", "clusters": ["r"]}, "inject": [{"header": "x-up", "value": {"inline": "s"}}]}]}"#;

fn worker(shared: &SharedData, clock: &Clock) -> FilterInstance {
    let mut w = crate::filter().start_worker(&BTreeMap::new(), shared, clock).unwrap();
    w.configure(CONFIG.as_bytes()).unwrap();
    w
}

fn at(clock: &Clock, ms: u64) {
    clock.set(UNIX_EPOCH + Duration::from_secs(1_800_000_000) + Duration::from_millis(ms));
}

/// Sends one request with `key`; true when forwarded.
fn send(w: &mut FilterInstance, key: &str) -> bool {
    let headers: Vec<(String, Vec<u8>)> = [(":method", "GET"), (":path", "/"), (":authority", "a"), ("x-api-key", key)]
        .iter()
        .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
        .collect();
    let outcome = w.request(Some("r"), &headers).unwrap();
    w.finish().unwrap();
    match outcome {
        Handled::Forwarded { .. } => true,
        Handled::Local(local) => {
            assert_eq!(local.status, 429);
            false
        }
        other => panic!("{other:?}"),
    }
}

/// Two workers (VMs sharing shared data, as Envoy's) interleaving one
/// client's requests admit exactly what one would: 1 + burst at an
/// instant, then one per emission interval; another client has its own.
#[test]
fn workers_share_one_bucket_per_client() {
    let (shared, clock) = (SharedData::default(), Clock::real());
    at(&clock, 0);
    let mut workers = [worker(&shared, &clock), worker(&shared, &clock)];
    let admitted = (0..20).filter(|i| send(&mut workers[i % 2], "limited-key")).count();
    assert_eq!(admitted, 4, "1 + burst 3 at one instant, across both workers");
    let other = (0..20).filter(|i| send(&mut workers[i % 2], "other-key")).count();
    assert_eq!(other, 4, "another client never shares the bucket");
    // Every 500 ms one more, whichever worker asks.
    for step in 1..=10u64 {
        at(&clock, step * 500);
        let n = (0..6).filter(|i| send(&mut workers[(i + step as usize) % 2], "limited-key")).count();
        assert_eq!(n, 1, "at {} ms", step * 500);
    }
    // A second configuration load (a push keeping the limit) keeps the bucket.
    workers[0].configure(CONFIG.as_bytes()).unwrap();
    assert!(!send(&mut workers[0], "limited-key"), "the push did not reset the bucket");
    let metrics = workers[0].metrics();
    let limited = metrics
        .iter()
        .find(|(name, _)| name.contains("route=r;outcome=denied;reason=rate_limited"))
        .map(|(_, (_, value))| *value);
    assert!(limited.is_some_and(|v| v > 0), "{metrics:?}");
    let log = workers[0].log_text() + &workers[1].log_text();
    assert!(
        log.contains("reason=rate_limited status=429 route=r client=limited limit=client-rate 2/second burst 3"),
        "{log}"
    );
    assert!(!log.contains("limited-key"), "no key in the log");
}

/// The cost: a client without limits makes no shared-data call and reads
/// no clock; a limited one reads and writes its one bucket once and reads
/// the clock once. Prints µs per request for both (docs/performance.md).
#[test]
fn a_client_without_limits_pays_nothing() {
    let (shared, clock) = (SharedData::default(), Clock::real());
    at(&clock, 0);
    let mut w = worker(&shared, &clock);
    let calls = |w: &mut FilterInstance, key: &str| {
        assert!(send(w, key));
        w.last_request_host_calls().expect("a finished stream").clone()
    };
    let free = calls(&mut w, "free-key");
    for name in ["proxy_get_shared_data", "proxy_set_shared_data", "proxy_get_current_time_nanoseconds"] {
        assert_eq!(free.get(name), 0, "free: {name}");
    }
    let limited = calls(&mut w, "limited-key");
    assert_eq!(limited.get("proxy_get_shared_data"), 1);
    assert_eq!(limited.get("proxy_set_shared_data"), 1);
    assert_eq!(limited.get("proxy_get_current_time_nanoseconds"), 1);
    assert_eq!(limited.total(), free.total() + 3, "three host calls more, nothing else");
    let time = |w: &mut FilterInstance, key: &str, n: u32| {
        let start = Instant::now();
        for i in 0..n {
            at(&clock, u64::from(i) * 1_000);
            assert!(send(w, key));
        }
        start.elapsed().as_secs_f64() * 1e6 / f64::from(n)
    };
    let (free_us, limited_us) = (time(&mut w, "free-key", 500), time(&mut w, "limited-key", 500));
    println!(
        "host calls per request: free {}, limited {}; harness µs per request: free {free_us:.1}, limited {limited_us:.1}",
        free.total(),
        limited.total()
    );
}
